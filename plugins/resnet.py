"""The ``resnet50`` backbone: IR-50 of the ArcFace paper in InsightFace's ``iresnet50`` layout.

Parameter names and shapes follow InsightFace's arcface_torch ``iresnet50``, so its published
``backbone.pth`` loads with ``strict=True`` (``facecore.core.checkpoint.load_backbone_weights``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from facecore import hookimpl
from facecore.errors import ConfigError

INPUT_SIZE = 112  # four stride-2 stages take 112 to the 7x7 map that ``fc`` expects
WIDTHS = (64, 128, 256, 512)
IR50_LAYERS = [3, 4, 14, 3]

SCHEMA = {
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
            "default": IR50_LAYERS,
            "description": "Blocks per stage; [3, 4, 14, 3] is IR-50 (smaller values give quick test variants).",
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

    def __init__(self, embedding_size: int = 512, layers: Sequence[int] = IR50_LAYERS, dropout: float = 0.0):
        super().__init__()
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
                [f"model.backbone: resnet50 takes images of shape (N, 3, 112, 112), got {tuple(x.shape)}; "
                 "set data.img_size: 112 (its embedding layer is sized for a 7x7 final map)"]
            )
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def resnet50(embedding_size: int = 512, layers: Sequence[int] = IR50_LAYERS, dropout: float = 0.0) -> IResNet:
    """IR-50 (or a shallower IR variant through ``layers``) mapping (N,3,112,112) to (N, embedding_size)."""
    return IResNet(embedding_size=embedding_size, layers=layers, dropout=dropout)


@hookimpl
def register_backbones(register):
    register(
        "resnet50",
        resnet50,
        schema=SCHEMA,
        description="IR-50 of ArcFace (43.6M params, 6.3 GMACs at 112x112); loads InsightFace iresnet50 weights",
    )
