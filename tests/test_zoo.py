"""The bundled MobileFaceNet and ViTs keep arcface_torch's parameter names and shapes (so its
published mbf / vit_t / vit_s weights load strictly), their published sizes, and their
training-time behaviour (the ViT's token masking and stochastic depth).

The expected layouts are written here from the published architecture descriptions, not
taken from the plugins. Big models are built on the meta device: shapes only, no memory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import facecore
from facecore.core.pretrained import load_backbone
from facecore.core.plugins import registry


def bn(c, prefix):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def ln(c, prefix):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def build_meta(name, **options):
    with torch.device("meta"):
        return facecore.create("backbones", name, **options)


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def random_state(layout, seed=1):
    """Weights with the given names and shapes, as a published backbone.pth would hold."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(s, generator=gen) * 0.1 if s else torch.tensor(7)) for k, s in layout.items()}
    for k in state:
        if k.endswith("running_var"):
            state[k] = state[k].abs() + 0.5
    return state


# -- MobileFaceNet as arcface_torch's mbf ------------------------------------------------------
def arcface_mbf_layout(embedding_size, blocks=(1, 4, 6, 2), scale=2):
    """Key -> shape of arcface_torch's MobileFaceNet (get_mbf; get_mbf_large with blocks (2, 8, 12, 4), scale 4).

    Its recipe: ConvBlock = conv (no bias), BN, PReLU in ``.layers``; LinearBlock = conv, BN;
    DepthWise(in, out, groups=g) = ConvBlock 1x1 in->g, ConvBlock 3x3 depthwise g, LinearBlock 1x1 g->out;
    Residual(c, n, groups=g) = n residual DepthWise(c, c, g); GDC = LinearBlock 512 depthwise 7x7,
    Flatten, Linear(512, E, no bias), BatchNorm1d(E).
    """
    keys = {}

    def conv_block(prefix, cin, cout, k, groups=1, prelu=True):
        keys[f"{prefix}.layers.0.weight"] = (cout, cin // groups, k, k)
        keys.update(bn(cout, f"{prefix}.layers.1"))
        if prelu:
            keys[f"{prefix}.layers.2.weight"] = (cout,)

    def depthwise(prefix, cin, cout, groups):
        conv_block(f"{prefix}.layers.0", cin, groups, 1)
        conv_block(f"{prefix}.layers.1", groups, groups, 3, groups=groups)
        conv_block(f"{prefix}.layers.2", groups, cout, 1, prelu=False)

    def residual(prefix, c, n, groups):
        for i in range(n):
            depthwise(f"{prefix}.layers.{i}", c, c, groups)

    low, high = 64 * scale, 128 * scale
    conv_block("layers.0", 3, low, 3)
    if blocks[0] == 1:
        conv_block("layers.1", low, low, 3, groups=64)
    else:
        residual("layers.1", low, blocks[0], 128)
    depthwise("layers.2", low, low, 128)
    residual("layers.3", low, blocks[1], 128)
    depthwise("layers.4", low, high, 256)
    residual("layers.5", high, blocks[2], 256)
    depthwise("layers.6", high, high, 512)
    residual("layers.7", high, blocks[3], 256)
    conv_block("conv_sep", high, 512, 1)
    conv_block("features.layers.0", 512, 512, 7, groups=512, prelu=False)
    keys["features.layers.2.weight"] = (embedding_size, 512)
    keys.update(bn(embedding_size, "features.layers.3"))
    return keys


def parameter_count(layout):
    """Parameters of a layout: everything but the BN running statistics."""
    skip = ("running_mean", "running_var", "num_batches_tracked")
    return sum(math.prod(s) for k, s in layout.items() if not k.endswith(skip))


@pytest.mark.parametrize("options", [{}, {"blocks": [2, 8, 12, 4], "scale": 4}], ids=["mbf", "mbf_large"])
def test_mobilefacenet_matches_arcface_torch_mbf(options):
    model = build_meta("mobilefacenet", embedding_size=512, **options)
    expected = arcface_mbf_layout(512, **options)
    assert shapes(model) == expected
    assert sum(p.numel() for p in model.parameters()) == parameter_count(expected)


def test_mobilefacenet_size():
    model = build_meta("mobilefacenet", embedding_size=512)
    params = sum(p.numel() for p in model.parameters())
    assert params == 2_059_520  # arcface_torch's mbf: "2.0M"; the paper's 1x-width MobileFaceNet has 1.0M
    assert f"{params / 1e6:.1f}M params" in registry("backbones").get("mobilefacenet").description


def test_mobilefacenet_published_layout_loads_and_is_used(tmp_path):
    """A backbone.pth in mbf layout loads strictly, and the loaded weights decide the output."""
    layout = arcface_mbf_layout(64, blocks=(1, 1, 1, 1), scale=1)
    state = random_state(layout)
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    model = facecore.create("backbones", "mobilefacenet", embedding_size=64, blocks=[1, 1, 1, 1], scale=1)
    load_backbone(model, torch.load(path, weights_only=True), path, "mobilefacenet")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    sizes = []
    model.conv_sep.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape)) and None)
    with torch.no_grad():
        out = model.eval()(x)
        model.features.layers[2].weight.mul_(2)  # the embedding Linear, by its published name
        again = model(x)
    assert sizes[0] == (2, 512, 7, 7)  # the GDC sees a 7x7 map
    assert out.shape == (2, 64) and not torch.allclose(out, again)


# -- the ViTs of arcface_torch -------------------------------------------------------------------
def arcface_vit_layout(dim, depth, embedding_size):
    """Key -> shape of arcface_torch's VisionTransformer(img_size=112, patch_size=9, embed_dim=dim, depth,
    num_heads=8, norm_layer="ln", qkv_bias=False, mlp_ratio=4): 144 patch tokens, no class token, and the
    ``feature`` head Linear(dim*144, dim, no bias), BN(dim), Linear(dim, E, no bias), BN(E)."""
    tokens = (112 // 9) ** 2
    keys = {"pos_embed": (1, tokens, dim), "mask_token": (1, 1, dim),
            "patch_embed.proj.weight": (dim, 3, 9, 9), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        p = f"blocks.{i}"
        keys.update(ln(dim, f"{p}.norm1"))
        keys[f"{p}.attn.qkv.weight"] = (3 * dim, dim)
        keys.update({f"{p}.attn.proj.weight": (dim, dim), f"{p}.attn.proj.bias": (dim,)})
        keys.update(ln(dim, f"{p}.norm2"))
        keys.update({f"{p}.mlp.fc1.weight": (4 * dim, dim), f"{p}.mlp.fc1.bias": (4 * dim,),
                     f"{p}.mlp.fc2.weight": (dim, 4 * dim), f"{p}.mlp.fc2.bias": (dim,)})
    keys.update(ln(dim, "norm"))
    keys["feature.0.weight"] = (dim, dim * tokens)
    keys.update(bn(dim, "feature.1"))
    keys["feature.2.weight"] = (embedding_size, dim)
    keys.update(bn(embedding_size, "feature.3"))
    return keys


@pytest.mark.parametrize("name, dim, params", [("vit_t", 256, 19_137_792), ("vit_s", 512, 76_023_296)])
def test_vit_matches_arcface_torch_layout_and_size(name, dim, params):
    model = build_meta(name, embedding_size=512)
    expected = arcface_vit_layout(dim, 12, 512)
    assert shapes(model) == expected
    assert sum(p.numel() for p in model.parameters()) == parameter_count(expected) == params
    assert f"{params / 1e6:.1f}M params" in registry("backbones").get(name).description
    assert [round(b.drop_path.rate, 6) for b in model.blocks] == [round(0.1 * i / 11, 6) for i in range(12)]


def small_vit(**options):
    torch.manual_seed(0)
    return facecore.create("backbones", "vit_t", embedding_size=16, depth=1, **options)


def test_vit_published_layout_loads_strictly(tmp_path):
    layout = arcface_vit_layout(256, 1, 16)
    state = random_state(layout)
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    model = small_vit()
    load_backbone(model, torch.load(path, weights_only=True), path, "vit_t")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_vit_attention_is_multi_head_softmax_attention():
    attn = small_vit().blocks[0].attn
    x = torch.randn(2, 5, 256)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)  # arcface_torch's qkv rows: all q, then all k, then all v

    def heads(t):
        return t.reshape(2, 5, 8, 32).transpose(1, 2)

    weights = F.softmax(heads(q) @ heads(k).transpose(-2, -1) / math.sqrt(32), dim=-1)
    expected = attn.proj((weights @ heads(v)).transpose(1, 2).reshape(2, 5, 256))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_vit_masks_tokens_in_training_only():
    model = small_vit(mask_ratio=0.25, drop_path=0.0)
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]) and None)
    rows = []
    model.feature.register_forward_hook(lambda m, i, o: rows.append(i[0].reshape(i[0].shape[0], 144, 256)) and None)
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    model.train()(x)
    model.eval()(x)
    assert seen == [108, 144]  # int(144 * 0.75) tokens go through the blocks in training, all in eval
    masked = (rows[0] == model.mask_token.detach().reshape(1, 1, 256)).all(dim=-1)
    assert masked.sum(dim=1).tolist() == [36, 36, 36]  # the dropped tokens come back as the mask token
    assert not torch.equal(masked[0], masked[1])  # each sample drops its own tokens
    assert not (rows[1] == model.mask_token.detach().reshape(1, 1, 256)).all(dim=-1).any()


def test_vit_without_masking_freezes_the_unused_mask_token():
    assert not small_vit(mask_ratio=0.0).mask_token.requires_grad  # DDP fails on parameters without gradients
    assert small_vit().mask_token.requires_grad
