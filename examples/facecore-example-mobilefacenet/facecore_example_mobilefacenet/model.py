"""MobileFaceNet (Chen et al., 2018): a ~1M-parameter embedding network for 112x112 face crops.

Inverted-residual bottlenecks with PReLU, and a global depthwise convolution (GDC) instead
of average pooling, so each position of the final 7x7 map gets its own learned weight.
"""

from __future__ import annotations

import torch
from torch import nn

from facecore import DataError

# The paper's bottleneck rows: (expansion t, output channels c, repeats n, first stride s).
BOTTLENECKS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)
STEM_CHANNELS = 64
LAST_CHANNELS = 512
INPUT_SIZE = 112
FINAL_MAP = 7  # 112 / 2**4: four stride-2 stages


def scaled(channels: int, width_mult: float) -> int:
    """Channels times ``width_mult``, rounded to a multiple of 8 (at least 8)."""
    return max(8, int(channels * width_mult / 8 + 0.5) * 8)


class ConvBN(nn.Sequential):
    """Convolution without bias, BatchNorm, and PReLU unless ``linear``."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, linear: bool = False):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2 if kernel == 3 else 0, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if not linear:
            layers.append(nn.PReLU(cout))
        super().__init__(*layers)


class Bottleneck(nn.Module):
    """1x1 expansion, 3x3 depthwise (carries the stride), linear 1x1 projection; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            ConvBN(cin, hidden, 1),
            ConvBN(hidden, hidden, 3, stride, groups=hidden),
            ConvBN(hidden, cout, 1, linear=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileFaceNet(nn.Module):
    """Images (N, 3, 112, 112) in [-1, 1] -> embeddings (N, embedding_size)."""

    def __init__(self, embedding_size: int = 512, width_mult: float = 1.0, dropout: float = 0.0):
        super().__init__()
        stem = scaled(STEM_CHANNELS, width_mult)
        last = scaled(LAST_CHANNELS, width_mult)
        layers: list[nn.Module] = [
            ConvBN(3, stem, 3, stride=2),
            ConvBN(stem, stem, 3, groups=stem),  # depthwise 3x3
        ]
        cin = stem
        for t, c, n, s in BOTTLENECKS:
            cout = scaled(c, width_mult)
            for i in range(n):
                layers.append(Bottleneck(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(ConvBN(cin, last, 1))
        self.features = nn.Sequential(*layers)
        # GDC: a linear depthwise 7x7 conv reduces the 7x7 map to 1x1, one weight per position.
        self.gdc = ConvBN(last, last, FINAL_MAP, groups=last, linear=True)
        self.dropout = nn.Dropout(dropout)
        self.embedding = nn.Linear(last, embedding_size, bias=False)  # the paper's linear 1x1 conv
        self.bn = nn.BatchNorm1d(embedding_size)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu", a=0.25)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
            raise DataError(
                f"example-mobilefacenet expects images of shape (N, 3, {INPUT_SIZE}, {INPUT_SIZE}), got "
                f"{tuple(x.shape)}; set data.img_size: {INPUT_SIZE} (its GDC layer is sized for a 7x7 map)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            self._check_input(x)
        x = self.gdc(self.features(x))
        x = self.embedding(self.dropout(torch.flatten(x, 1)))
        return self.bn(x)
