"""The ``fastcontextface`` backbone: a light ConvNeXt-style network (about 4.2M parameters).

Large 7x7 depthwise kernels give each block a wide spatial context at low cost; a
squeeze-excite gate adds global context per channel; a global depthwise conv (GDC) keeps
the position information that average pooling would throw away.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from facecore import hookimpl
from facecore.errors import ConfigError
from facecore_plugins.layers import DropPath

INPUT_SIZE = 112  # stem /2 and three /2 downsamplings: 112 -> 7, the GDC kernel size
DEPTHS = [2, 2, 6, 2]
DIMS = [48, 96, 192, 384]

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "depths": {
            "type": "array",
            "items": {"type": "integer", "minimum": 1},
            "minItems": 4,
            "maxItems": 4,
            "default": DEPTHS,
            "description": "Blocks per stage.",
        },
        "dims": {
            "type": "array",
            "items": {"type": "integer", "minimum": 4},
            "minItems": 4,
            "maxItems": 4,
            "default": DIMS,
            "description": "Channels per stage (multiples of 4, for the squeeze-excite reduction).",
        },
        "dropout": {
            "type": "number",
            "minimum": 0,
            "exclusiveMaximum": 1,
            "default": 0.4,
            "description": "Dropout before the embedding layer.",
        },
        "layer_scale_init": {
            "type": "number",
            "minimum": 0,
            "default": 1e-6,
            "description": "Initial per-channel scale of each block's residual branch; 0 turns layer scale off.",
        },
        "drop_path": {
            "type": "number",
            "minimum": 0,
            "exclusiveMaximum": 1,
            "default": 0.0,
            "description": "Stochastic depth rate of the last block (rising linearly from 0); 0 is off.",
        },
    },
}


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Fill with N(0, std^2) cut at two standard deviations, by inverse CDF (no rejection loop)."""
    bound = math.erf(2.0 / math.sqrt(2.0))  # erf-space image of +-2 std
    tensor.uniform_(-bound, bound).erfinv_().mul_(std * math.sqrt(2.0))
    return tensor.clamp_(-2.0 * std, 2.0 * std)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    """Channel gate: global average -> 1x1 (C -> C/r) -> ReLU -> 1x1 (C/r -> C) -> sigmoid."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.expand = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean(dim=(2, 3), keepdim=True)
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(gate))))
        return x * gate


class ContextBlock(nn.Module):
    """dw7x7 -> BN -> 1x1 (x3) -> GELU -> 1x1 -> layer scale -> SE, added to the input."""

    def __init__(self, dim: int, layer_scale_init: float = 1e-6, drop_path: float = 0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=False)
        self.norm = nn.BatchNorm2d(dim)
        self.pwconv1 = nn.Conv2d(dim, 3 * dim, 1)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv2d(3 * dim, dim, 1)
        self.gamma = nn.Parameter(torch.full((dim, 1, 1), float(layer_scale_init))) if layer_scale_init > 0 else None
        self.se = SqueezeExcite(dim, 4)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(self.se(y))


class FastContextFace(nn.Module):
    """Stem, four stages of ContextBlocks joined by LN + conv2x2/2, then LN -> GDC -> BN -> FC -> BN1d."""

    def __init__(
        self,
        embedding_size: int = 512,
        depths: Sequence[int] = DEPTHS,
        dims: Sequence[int] = DIMS,
        dropout: float = 0.4,
        layer_scale_init: float = 1e-6,
        drop_path: float = 0.0,
    ):
        super().__init__()
        depths, dims = list(depths), list(dims)
        problems = []
        if len(depths) != 4 or any(d < 1 for d in depths):
            problems.append(f"model.depths: need 4 positive block counts, got {depths}")
        if len(dims) != 4 or any(d < 4 or d % 4 for d in dims):
            problems.append(f"model.dims: need 4 channel counts that are multiples of 4, got {dims}")
        if not 0 <= dropout < 1:
            problems.append(f"model.dropout: must be in [0, 1), got {dropout}")
        if not 0 <= drop_path < 1:
            problems.append(f"model.drop_path: must be in [0, 1), got {drop_path}")
        if layer_scale_init < 0:
            problems.append(f"model.layer_scale_init: must be >= 0, got {layer_scale_init}")
        if problems:
            raise ConfigError(problems)
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 3, stride=2, padding=1), LayerNorm2d(dims[0], eps=1e-6))
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        self.downsamples = nn.ModuleList()
        self.stages = nn.ModuleList()
        first = 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            if i > 0:
                self.downsamples.append(
                    nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dim, 2, stride=2))
                )
            blocks = [ContextBlock(dim, layer_scale_init, rates[first + j]) for j in range(depth)]
            self.stages.append(nn.Sequential(*blocks))
            first += depth
        self.norm = LayerNorm2d(dims[-1], eps=1e-6)
        self.gdc = nn.Conv2d(dims[-1], dims[-1], 7, groups=dims[-1], bias=False)
        self.gdc_bn = nn.BatchNorm2d(dims[-1])
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(dims[-1], embedding_size, bias=False)  # BN1d follows: a bias would be redundant
        self.features = nn.BatchNorm1d(embedding_size)
        self.apply(self._init_weights)
        # LayerNorm2d hands its channels-last view on to the convolutions, so their feature maps are
        # channels-last and so are their weight gradients. Conv weights stored channels-last too give
        # gradients in the parameters' own layout, which DDP's buckets need (else it warns "Grad
        # strides do not match bucket view strides" and copies through a strided view every step).
        self.to(memory_format=torch.channels_last)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ConfigError(
                [f"model.backbone: fastcontextface takes images of shape (N, 3, 112, 112), got {tuple(x.shape)}; "
                 "set data.img_size: 112 (its 7x7 global depthwise conv is sized for it)"]
            )
        x = self.stages[0](self.stem(x))
        for down, stage in zip(self.downsamples, self.stages[1:]):
            x = stage(down(x))
        x = self.gdc_bn(self.gdc(self.norm(x)))
        x = self.dropout(torch.flatten(x, 1))
        return self.features(self.fc(x))


def fastcontextface(
    embedding_size: int = 512,
    depths: Sequence[int] = DEPTHS,
    dims: Sequence[int] = DIMS,
    dropout: float = 0.4,
    layer_scale_init: float = 1e-6,
    drop_path: float = 0.0,
) -> FastContextFace:
    """The FastContextFace backbone mapping (N,3,112,112) in [-1, 1] to (N, embedding_size)."""
    return FastContextFace(embedding_size, depths, dims, dropout, layer_scale_init, drop_path)


@hookimpl
def register_backbones(register):
    register(
        "fastcontextface",
        fastcontextface,
        schema=SCHEMA,
        description="Light ConvNeXt-style backbone with squeeze-excite and GDC (4.2M params at 112x112)",
    )
