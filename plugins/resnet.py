"""The IR family of the ArcFace paper by depth: ``resnet18``, ``resnet34``, ``resnet50``, ``resnet100``, ``resnet200``.

One network (improved residual blocks, BN-dropout-FC-BN embedding) with the stage depths of
InsightFace's ``iresnet18/34/50/100/200``. Parameter names and shapes follow arcface_torch's
``iresnet``, so its published ``backbone.pth`` of the same depth loads with ``strict=True``
(``facecore.core.pretrained.load_backbone``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from facecore import hookimpl
from facecore.errors import ConfigError

INPUT_SIZE = 112  # four stride-2 stages take 112 to the 7x7 map that ``fc`` expects
WIDTHS = (64, 128, 256, 512)

# Blocks per stage of each registered depth (InsightFace's iresnet recipes), with the size
# shown by ``facecore list-plugins`` (parameters at embedding 512, multiply-adds at 112x112).
DEPTHS: dict[str, tuple[list[int], str]] = {
    "resnet18": ([2, 2, 2, 2], "24.0M params, 2.6 GMACs"),
    "resnet34": ([3, 4, 6, 3], "34.1M params, 4.5 GMACs"),
    "resnet50": ([3, 4, 14, 3], "43.6M params, 6.3 GMACs"),
    "resnet100": ([3, 13, 30, 3], "65.2M params, 12.1 GMACs"),
    "resnet200": ([6, 26, 60, 6], "118.8M params, 23.4 GMACs"),
}
IR50_LAYERS = DEPTHS["resnet50"][0]


def options_schema(layers: list[int]) -> dict:
    """The options of one IR depth: ``layers`` defaults to that depth's stage recipe."""
    recipe = ", ".join(map(str, layers))
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "dropout": {
                "type": "number",
                "minimum": 0,
                "exclusiveMaximum": 1,
                "default": 0.0,
                "description": "Dropout on the flattened 512x7x7 map before the embedding layer.",
            },
            "layers": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1},
                "minItems": 4,
                "maxItems": 4,
                "default": list(layers),
                "description": f"Blocks per stage; [{recipe}] is this depth (other values: custom or quick test variants).",
            },
        },
    }


class IRBlock(nn.Module):
    """Improved residual block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                nn.BatchNorm2d(channels, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut  # no activation after the add


class IResNet(nn.Module):
    """IR-ResNet for 112x112 faces: stem, four stages of IRBlocks, BN-dropout-FC-BN embedding."""

    def __init__(self, embedding_size: int = 512, layers: Sequence[int] = IR50_LAYERS, dropout: float = 0.0,
                 name: str = "resnet"):
        super().__init__()
        self.name = name  # the registered name, for error messages
        layers = list(layers)
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ConfigError([f"model.layers: need 4 positive block counts, got {layers}"])
        if not 0 <= dropout < 1:
            raise ConfigError([f"model.dropout: must be in [0, 1), got {dropout}"])
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0], eps=1e-5)
        self.prelu = nn.PReLU(WIDTHS[0])
        in_channels = WIDTHS[0]
        for i, (blocks, width) in enumerate(zip(layers, WIDTHS), start=1):
            stage = [IRBlock(in_channels, width, stride=2)] + [IRBlock(width, width) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*stage))
            in_channels = width
        self.bn2 = nn.BatchNorm2d(WIDTHS[-1], eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(WIDTHS[-1] * 7 * 7, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights()

    def _init_weights(self) -> None:
        # The initialisation of InsightFace's recipes: conv N(0, 0.1), BN (1, 0); fixed unit BN1d scale.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ConfigError(
                [f"model.backbone: {self.name} takes images of shape (N, 3, 112, 112), got {tuple(x.shape)}; "
                 "set data.img_size: 112 (its embedding layer is sized for a 7x7 final map)"]
            )
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def _factory(name: str, default_layers: list[int]) -> Callable[..., IResNet]:
    """The factory of one registered depth: the same network, that depth's ``layers`` by default."""

    def build(embedding_size: int = 512, layers: Sequence[int] = default_layers, dropout: float = 0.0) -> IResNet:
        return IResNet(embedding_size=embedding_size, layers=layers, dropout=dropout, name=name)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"IR-{name[6:]} (or another depth through ``layers``) mapping (N,3,112,112) to (N, embedding_size)."
    return build


FACTORIES = {name: _factory(name, layers) for name, (layers, _) in DEPTHS.items()}


@hookimpl
def register_backbones(register):
    for name, (layers, size) in DEPTHS.items():
        register(
            name,
            FACTORIES[name],
            schema=options_schema(layers),
            description=f"IR-{name[6:]} of ArcFace ({size} at 112x112); loads InsightFace iresnet{name[6:]} weights",
        )
