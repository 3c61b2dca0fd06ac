"""The ``mobilefacenet`` backbone: MobileFaceNet as arcface_torch trains it (its ``mbf``).

MobileFaceNet (Chen et al., 2018) is a stack of inverted-residual bottlenecks with PReLU and
a global depthwise convolution (GDC) in place of average pooling, so each position of the
final 7x7 map keeps its own weight. arcface_torch's ``mbf`` doubles the channels of the paper
(``scale`` 2) and fixes the hidden width of each bottleneck group. This module is built
so that its parameter names and shapes are those of arcface_torch's ``get_mbf`` (and, with
``blocks: [2, 8, 12, 4]``, ``scale: 4``, of ``get_mbf_large``): their ``backbone.pth`` loads
with ``strict=True``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from facecore import hookimpl
from facecore.errors import ConfigError

INPUT_SIZE = 112  # four stride-2 steps: 112 -> 7, the GDC kernel size
BLOCKS = [1, 4, 6, 2]  # bottlenecks in the stem group and after each of the three downsamplings
SCALE = 2
STEM_DW_GROUPS = 64  # the stem's 3x3 conv is grouped in 64 groups at any scale (2 channels each at scale 2)
HIDDEN = (128, 256, 512)  # bottleneck widths, fixed whatever the scale: 56x56, 28x28/14x14 repeats, last downsampling
EMBED_IN = 512  # channels of the 1x1 conv before the GDC

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "blocks": {
            "type": "array",
            "items": {"type": "integer", "minimum": 1},
            "minItems": 4,
            "maxItems": 4,
            "default": BLOCKS,
            "description": "Bottlenecks per group ([1, 4, 6, 2] is arcface_torch's mbf, [2, 8, 12, 4] its mbf_large).",
        },
        "scale": {
            "type": "integer",
            "minimum": 1,
            "maximum": 8,
            "default": SCALE,
            "description": "Channel multiplier of the 64/128 base widths (2 is mbf, 4 is mbf_large).",
        },
    },
}


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm -> PReLU, or without the PReLU when ``linear``; in ``layers`` as in mbf."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, linear: bool = False):
        super().__init__()
        parts: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2 if kernel == 3 else 0, groups=groups,
                      bias=False),
            nn.BatchNorm2d(cout),
        ]
        if not linear:
            parts.append(nn.PReLU(cout))
        self.layers = nn.Sequential(*parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Bottleneck(nn.Module):
    """1x1 to ``hidden`` -> depthwise 3x3 (carries the stride) -> linear 1x1 to ``cout``; residual when asked."""

    def __init__(self, cin: int, cout: int, hidden: int, stride: int = 1, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBN(cin, hidden, 1),
            ConvBN(hidden, hidden, 3, stride, groups=hidden),
            ConvBN(hidden, cout, 1, linear=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class BottleneckGroup(nn.Module):
    """``count`` residual bottlenecks at constant width and resolution."""

    def __init__(self, channels: int, count: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(*[Bottleneck(channels, channels, hidden, residual=True) for _ in range(count)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDCEmbedding(nn.Module):
    """Linear depthwise 7x7 conv + BN (one weight per position), flatten, Linear (no bias), BatchNorm1d."""

    def __init__(self, embedding_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            ConvBN(EMBED_IN, EMBED_IN, INPUT_SIZE // 16, groups=EMBED_IN, linear=True),
            nn.Flatten(),
            nn.Linear(EMBED_IN, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """Images (N, 3, 112, 112) in [-1, 1] -> embeddings (N, embedding_size)."""

    def __init__(self, embedding_size: int = 512, blocks: Sequence[int] = BLOCKS, scale: int = SCALE):
        super().__init__()
        blocks = list(blocks)
        if len(blocks) != 4 or any(int(n) < 1 for n in blocks):
            raise ConfigError([f"model.blocks: need 4 positive bottleneck counts, got {blocks}"])
        if int(scale) != scale or scale < 1:
            raise ConfigError([f"model.scale: must be a positive integer, got {scale}"])
        low, high = 64 * scale, 128 * scale
        stem_block: nn.Module
        if blocks[0] == 1:  # a grouped 3x3 conv, as in mbf; more blocks make a residual group, as in mbf_large
            stem_block = ConvBN(low, low, 3, groups=STEM_DW_GROUPS)
        else:
            stem_block = BottleneckGroup(low, blocks[0], HIDDEN[0])
        self.layers = nn.Sequential(
            ConvBN(3, low, 3, stride=2),                               # 112 -> 56
            stem_block,
            Bottleneck(low, low, HIDDEN[0], stride=2),                 # 56 -> 28
            BottleneckGroup(low, blocks[1], HIDDEN[0]),
            Bottleneck(low, high, HIDDEN[1], stride=2),                # 28 -> 14
            BottleneckGroup(high, blocks[2], HIDDEN[1]),
            Bottleneck(high, high, HIDDEN[2], stride=2),               # 14 -> 7
            BottleneckGroup(high, blocks[3], HIDDEN[1]),
        )
        self.conv_sep = ConvBN(high, EMBED_IN, 1)
        self.features = GDCEmbedding(embedding_size)
        self._init_weights()

    def _init_weights(self) -> None:
        # arcface_torch's mbf recipe: He-normal (fan out) convs and linear layer, BN (1, 0).
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ConfigError(
                [f"model.backbone: mobilefacenet takes images of shape (N, 3, 112, 112), got {tuple(x.shape)}; "
                 "set data.img_size: 112 (its 7x7 global depthwise conv is sized for it)"]
            )
        return self.features(self.conv_sep(self.layers(x)))


def mobilefacenet(embedding_size: int = 512, blocks: Sequence[int] = BLOCKS, scale: int = SCALE) -> MobileFaceNet:
    """MobileFaceNet in arcface_torch's mbf layout, mapping (N,3,112,112) in [-1, 1] to (N, embedding_size)."""
    return MobileFaceNet(embedding_size, blocks, scale)


@hookimpl
def register_backbones(register):
    register(
        "mobilefacenet",
        mobilefacenet,
        schema=SCHEMA,
        description="MobileFaceNet as arcface_torch's mbf (2.1M params, 0.44 GMACs); loads its mbf weights",
    )
