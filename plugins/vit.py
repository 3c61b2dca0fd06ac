"""The ``vit_t`` and ``vit_s`` backbones: arcface_torch's Vision Transformers for 112x112 faces.

Non-overlapping 9x9 patches (a 12x12 grid, the last 4 pixel rows and columns unused), a
learned position embedding and no class token; pre-norm blocks (LayerNorm, multi-head
attention without qkv bias, LayerNorm, ReLU6 MLP of 4x width) with stochastic depth. In
training a random 10% of the patch tokens skip the blocks and come back as a learned mask
token. The embedding flattens all 144 normalized tokens: Linear -> BN -> Linear -> BN.

Parameter names and shapes are those of arcface_torch's ``vit_t`` / ``vit_s`` (``backbones/vit.py``),
so their ``backbone.pth`` loads with ``strict=True``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from facecore import hookimpl
from facecore.errors import ConfigError
from facecore_plugins.layers import DropPath

INPUT_SIZE = 112
PATCH = 9
GRID = INPUT_SIZE // PATCH  # 12
TOKENS = GRID * GRID  # 144
HEADS = 8
MLP_RATIO = 4
DEPTH = 12
# name -> (token width, description size): the arcface_torch recipes (depth 12, 8 heads for both)
WIDTHS: dict[str, tuple[int, str]] = {
    "vit_t": (256, "19.1M params, 1.5 GMACs"),
    "vit_s": (512, "76.0M params, 5.7 GMACs"),
}

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "depth": {
            "type": "integer",
            "minimum": 1,
            "default": DEPTH,
            "description": "Transformer blocks (12 in arcface_torch's recipe; fewer give quick test variants).",
        },
        "drop_path": {
            "type": "number",
            "minimum": 0,
            "exclusiveMaximum": 1,
            "default": 0.1,
            "description": "Stochastic depth rate of the last block, rising linearly from 0 at the first.",
        },
        "mask_ratio": {
            "type": "number",
            "minimum": 0,
            "exclusiveMaximum": 1,
            "default": 0.1,
            "description": "Fraction of patch tokens replaced by the learned mask token in training; 0 is off.",
        },
    },
}


class PatchEmbed(nn.Module):
    """9x9 stride-9 conv: (N, 3, 112, 112) -> (N, 144, dim) tokens in row-major grid order."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, stride=PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: one qkv projection without bias, scaled dot product, output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head dim)) v
        return self.proj(out.transpose(1, 2).reshape(n, tokens, dim))


class Mlp(nn.Module):
    """Linear to ``MLP_RATIO`` x width -> ReLU6 -> Linear back."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, MLP_RATIO * dim)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(MLP_RATIO * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)), each branch with stochastic depth."""

    def __init__(self, dim: int, heads: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class FaceViT(nn.Module):
    """Patch tokens + position embedding -> blocks (random token masking in training) -> LN -> flattened embedding."""

    def __init__(self, embedding_size: int = 512, dim: int = 256, depth: int = DEPTH, drop_path: float = 0.1,
                 mask_ratio: float = 0.1, name: str = "vit"):
        super().__init__()
        problems = []
        if depth < 1:
            problems.append(f"model.depth: must be >= 1, got {depth}")
        if not 0 <= drop_path < 1:
            problems.append(f"model.drop_path: must be in [0, 1), got {drop_path}")
        if not 0 <= mask_ratio < 1:
            problems.append(f"model.mask_ratio: must be in [0, 1), got {mask_ratio}")
        if problems:
            raise ConfigError(problems)
        self.name, self.dim, self.mask_ratio = name, dim, mask_ratio
        self.patch_embed = PatchEmbed(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, TOKENS, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim), requires_grad=mask_ratio > 0)  # unused without masking
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # 0 at the first block, drop_path at the last
        self.blocks = nn.ModuleList([Block(dim, HEADS, rate) for rate in rates])
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(
            nn.Linear(dim * TOKENS, dim, bias=False),
            nn.BatchNorm1d(dim, eps=2e-5),
            nn.Linear(dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=2e-5),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # arcface_torch's recipe: linear weights and the position embedding N(0, 0.02) (cut at +-2), zero biases;
        # mask token N(0, 0.02); LayerNorm (1, 0); the patch conv keeps PyTorch's default.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ConfigError(
                [f"model.backbone: {self.name} takes images of shape (N, 3, 112, 112), got {tuple(x.shape)}; "
                 "set data.img_size: 112 (its position embedding and embedding layer are sized for 144 patches)"]
            )
        x = self.patch_embed(x) + self.pos_embed
        keep = None
        if self.training and self.mask_ratio > 0:
            # Each sample keeps a random subset of its tokens, the same count for all (as arcface_torch does).
            count = int(TOKENS * (1 - self.mask_ratio))
            keep = torch.rand(x.shape[0], TOKENS, device=x.device).argsort(dim=1)[:, :count]
            x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, self.dim))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if keep is not None:  # the dropped tokens come back as the mask token, the kept ones at their places
            full = self.mask_token.to(x.dtype).expand(x.shape[0], TOKENS, self.dim)
            x = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, self.dim), x)
        return self.feature(x.flatten(1))


def _factory(name: str, dim: int) -> Callable[..., FaceViT]:
    """The factory of one registered width."""

    def build(embedding_size: int = 512, depth: int = DEPTH, drop_path: float = 0.1,
              mask_ratio: float = 0.1) -> FaceViT:
        return FaceViT(embedding_size, dim, depth, drop_path, mask_ratio, name=name)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"arcface_torch's {name} (token width {dim}) mapping (N,3,112,112) to (N, embedding_size)."
    return build


FACTORIES = {name: _factory(name, dim) for name, (dim, _) in WIDTHS.items()}


@hookimpl
def register_backbones(register):
    for name, (dim, size) in WIDTHS.items():
        register(
            name,
            FACTORIES[name],
            schema=SCHEMA,
            description=f"ViT of arcface_torch, width {dim}, 9x9 patches ({size} at 112x112); loads its {name} weights",
        )
