"""Bundled backbones: the facecore contract (through facecore.testing), the IR family's InsightFace
layout and parameter counts per depth, FastContextFace's structure, and the testing helper's own
failure reports. (MobileFaceNet and the ViTs: test_zoo.py; the timm bridge: test_timm_backbone.py.)"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import facecore
from facecore.core.pretrained import load_backbone
from facecore.errors import ConfigError
from facecore.core.plugins import registry
from facecore.testing import check_backbone
from facecore_plugins.fastcontextface import trunc_normal_

IR_DEPTHS = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3], "resnet50": [3, 4, 14, 3],
             "resnet100": [3, 13, 30, 3], "resnet200": [6, 26, 60, 6]}  # InsightFace's iresnet recipes

# Shallow variants keep the contract checks fast; a backbone not listed is checked with its defaults.
SHALLOW = {
    **{name: {"layers": [1, 1, 1, 1]} for name in IR_DEPTHS},
    "fastcontextface": {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]},
    "mobilefacenet": {"blocks": [2, 1, 1, 1], "scale": 1},
    "vit_t": {"depth": 1},
    "vit_s": {"depth": 1},
    "timm": {"model_name": "test_convnext"},  # one of timm's tiny test models
}
# Names built by the same class as another, with the same options here: their trace and ONNX
# export is that other's, so it is not repeated. timm's trunks are timm's to export.
EXPORT_CHECKED_BY = {"resnet18": "resnet50", "resnet34": "resnet50", "resnet100": "resnet50",
                     "resnet200": "resnet50", "vit_s": "vit_t", "timm": None}
NEEDS = {"timm": "timm"}  # backbone -> the optional package it needs


def factory_of(name):
    def build(**options):
        return facecore.create("backbones", name, **options)

    build.__qualname__ = name
    return build


@pytest.mark.parametrize("name", facecore.available("backbones"))
def test_backbone_contract_trace_and_onnx(name):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name], reason=f"{name} needs the optional package {NEEDS[name]}")
    export = name not in EXPORT_CHECKED_BY
    check_backbone(factory_of(name), embedding_size=16, torchscript=name == "timm" or export, onnx=export,
                   **SHALLOW.get(name, {}))


def test_export_is_checked_for_every_backbone_class():
    """A name skips the export checks only when another name of the same factory class runs them."""
    for name, other in EXPORT_CHECKED_BY.items():
        if other is None:
            continue
        assert other not in EXPORT_CHECKED_BY
        with torch.device("meta"):
            pair = [facecore.create("backbones", n, embedding_size=16, **SHALLOW[n]) for n in (name, other)]
        assert type(pair[0]) is type(pair[1])


@pytest.mark.parametrize("name", facecore.available("backbones"))
def test_schema_defaults_match_factory_defaults(name):
    reg = registry("backbones").get(name)
    params = inspect.signature(reg.factory).parameters
    required = set((reg.schema or {}).get("required", []))
    assert "embedding_size" in params, "backbones receive embedding_size from the core"
    for key, param in params.items():
        if key == "embedding_size" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        assert key in reg.options, f"{name}: factory argument '{key}' is not in the options schema"
        assert reg.options[key].get("description"), f"{name}.{key}: the option has no description"
        if key in required:
            assert param.default is param.empty and "default" not in reg.options[key], f"{name}.{key} is required"
            continue
        assert reg.options[key].get("default") == param.default, f"{name}.{key}: schema and factory defaults differ"
    assert set(reg.options) <= set(params)


@pytest.mark.parametrize(
    "name, options",
    [("resnet50", {"layers": [3, 4, 14]}), ("resnet50", {"dropout": 1.5}), ("fastcontextface", {"dims": [48, 96]}),
     ("fastcontextface", {"drop_path": -0.1}), ("resnet50", {"img_size": 112}), ("resnet100", {"layers": [0, 1, 1, 1]}),
     ("mobilefacenet", {"blocks": [1, 2, 3]}), ("mobilefacenet", {"scale": 1.5}), ("vit_t", {"mask_ratio": 1.0}),
     ("vit_s", {"depth": 0}), ("timm", {"model_name": ""}), ("timm", {"model_name": "x", "pretrained": True})],
)
def test_bad_options_are_config_errors(name, options):
    with pytest.raises(ConfigError) as err:
        facecore.create("backbones", name, embedding_size=8, **options)
    assert list(options)[-1] in str(err.value)


def test_timm_backbone_needs_model_name():
    with pytest.raises(ConfigError, match="model_name: required key is missing"):
        facecore.create("backbones", "timm", embedding_size=8)


@pytest.mark.parametrize("name", ["resnet50", "resnet18", "fastcontextface", "mobilefacenet", "vit_t"])
def test_other_input_sizes_are_refused_clearly(name):
    model = facecore.create("backbones", name, embedding_size=8, **SHALLOW[name]).eval()
    with pytest.raises(ConfigError, match="data.img_size: 112") as err:
        model(torch.zeros(1, 3, 96, 96))
    assert f"model.backbone: {name} takes" in str(err.value)


# -- IR-50 -------------------------------------------------------------------------------------
def bn(c, prefix):
    """A BatchNorm's state-dict entries."""
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def insightface_iresnet_layout(layers, embedding_size):
    """Key -> shape of InsightFace's iresnet, written down from the architecture description."""
    keys = {"conv1.weight": (64, 3, 3, 3), **bn(64, "bn1"), "prelu.weight": (64,)}
    cin = 64
    for stage, (blocks, c) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            keys.update(bn(cin, f"{p}.bn1"))
            keys[f"{p}.conv1.weight"] = (c, cin, 3, 3)
            keys.update(bn(c, f"{p}.bn2"))
            keys[f"{p}.prelu.weight"] = (c,)
            keys[f"{p}.conv2.weight"] = (c, c, 3, 3)
            keys.update(bn(c, f"{p}.bn3"))
            if b == 0:  # every stage starts with stride 2, so its first block has a projection shortcut
                keys[f"{p}.downsample.0.weight"] = (c, cin, 1, 1)
                keys.update(bn(c, f"{p}.downsample.1"))
            cin = c
    keys.update(bn(512, "bn2"))
    keys.update({"fc.weight": (embedding_size, 512 * 7 * 7), "fc.bias": (embedding_size,)})
    keys.update(bn(embedding_size, "features"))
    return keys


@pytest.fixture(scope="module")
def ir50():
    torch.manual_seed(0)
    return facecore.create("backbones", "resnet50", embedding_size=512)


def test_ir50_state_dict_matches_insightface_layout(ir50):
    own = {k: tuple(v.shape) for k, v in ir50.state_dict().items()}
    expected = insightface_iresnet_layout([3, 4, 14, 3], 512)
    assert own == expected
    # 24 blocks of 3 BN (5 keys each) + 2 convs + PReLU, 4 projection shortcuts (conv + BN),
    # stem conv + BN + PReLU, then bn2, fc (2) and features.
    assert len(own) == 24 * (3 * 5 + 3) + 4 * (1 + 5) + (1 + 5 + 1) + 5 + 2 + 5 == 475
    assert [k for k in own if k.startswith("layer1.0.")] == [
        f"layer1.0.{k}" for k in (
            "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
            "conv1.weight",
            "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var", "bn2.num_batches_tracked",
            "prelu.weight", "conv2.weight",
            "bn3.weight", "bn3.bias", "bn3.running_mean", "bn3.running_var", "bn3.num_batches_tracked",
            "downsample.0.weight", "downsample.1.weight", "downsample.1.bias", "downsample.1.running_mean",
            "downsample.1.running_var", "downsample.1.num_batches_tracked",
        )
    ]
    assert "layer1.1.downsample.0.weight" not in own


def test_ir50_parameter_count(ir50):
    def block(cin, c, projection):
        params = 2 * cin + 9 * cin * c + 2 * c + c + 9 * c * c + 2 * c  # bn1, conv1, bn2, prelu, conv2, bn3
        return params + (cin * c + 2 * c if projection else 0)

    stem = 3 * 64 * 9 + 2 * 64 + 64
    stages = (block(64, 64, True) + 2 * block(64, 64, False)
              + block(64, 128, True) + 3 * block(128, 128, False)
              + block(128, 256, True) + 13 * block(256, 256, False)
              + block(256, 512, True) + 2 * block(512, 512, False))
    output = 2 * 512 + (512 * 49 * 512 + 512) + 2 * 512  # bn2, fc, features
    assert stem + stages + output == 43_590_848  # "43.6M" of the InsightFace model zoo
    assert sum(p.numel() for p in ir50.parameters()) == stem + stages + output


# -- the IR family by depth (built on the meta device: shapes without memory or time) ----------
def iresnet_parameter_count(layers, embedding_size):
    """Parameters of an IR network, summed block by block from the layer recipe."""
    total = 3 * 64 * 9 + 2 * 64 + 64  # stem conv, BN, PReLU
    cin = 64
    for blocks, c in zip(layers, (64, 128, 256, 512)):
        for b in range(blocks):
            total += 2 * cin + 9 * cin * c + 2 * c + c + 9 * c * c + 2 * c  # bn1, conv1, bn2, prelu, conv2, bn3
            total += cin * c + 2 * c if b == 0 else 0  # projection shortcut: conv1x1 + BN
            cin = c
    return total + 2 * 512 + 512 * 49 * embedding_size + embedding_size + 2 * embedding_size  # bn2, fc, features


# Parameters at embedding 512, checked against the published sizes (InsightFace's model zoo
# lists IR-100 at 65.2M); a change here means the network no longer matches theirs.
IR_PARAMETERS = {"resnet18": 24_025_600, "resnet34": 34_139_328, "resnet50": 43_590_848,
                 "resnet100": 65_156_160, "resnet200": 118_833_920}


@pytest.mark.parametrize("name", list(IR_DEPTHS))
def test_ir_depth_matches_insightface_layout_and_size(name):
    with torch.device("meta"):
        model = facecore.create("backbones", name, embedding_size=512)
    layers = IR_DEPTHS[name]
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == layers
    expected = insightface_iresnet_layout(layers, 512)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert len(expected) == sum(layers) * 18 + 4 * 6 + 7 + 5 + 2 + 5  # blocks, shortcuts, stem, bn2, fc, features
    # a state dict with exactly the published names and shapes loads strictly (meta tensors: shapes only)
    model.load_state_dict({k: torch.empty(s, device="meta") for k, s in expected.items()}, strict=True)
    params = sum(p.numel() for p in model.parameters())
    assert params == iresnet_parameter_count(layers, 512) == IR_PARAMETERS[name]
    reg = registry("backbones").get(name)
    assert reg.options["layers"]["default"] == layers
    assert f"{params / 1e6:.1f}M params" in reg.description



def test_ir50_fixed_feature_scale_and_full_forward(ir50):
    assert not ir50.features.weight.requires_grad
    assert torch.equal(ir50.features.weight, torch.ones(512))
    trainable = [n for n, p in ir50.named_parameters() if not p.requires_grad]
    assert trainable == ["features.weight"]
    ir50.eval()
    with torch.no_grad():
        out = ir50(torch.rand(1, 3, 112, 112) * 2 - 1)
    assert out.shape == (1, 512) and torch.isfinite(out).all()


def test_insightface_style_weights_load_strictly(tmp_path):
    """A bare state dict with InsightFace's names and shapes (as in backbone.pth) loads with strict=True."""
    layers = [1, 2, 1, 1]
    layout = insightface_iresnet_layout(layers, 64)
    gen = torch.Generator().manual_seed(1)
    state = {k: (torch.randn(s, generator=gen) if s else torch.tensor(3)) for k, s in layout.items()}
    for k in state:
        if k.endswith("running_var"):
            state[k] = state[k].abs() + 0.5
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    model = facecore.create("backbones", "resnet50", embedding_size=64, layers=layers)
    load_backbone(model, torch.load(path, weights_only=True), path, "resnet50")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_ir50_dropout_acts_in_training_only():
    torch.manual_seed(0)
    model = facecore.create("backbones", "resnet50", embedding_size=8, layers=[1, 1, 1, 1], dropout=0.5)
    assert model.dropout.p == 0.5
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    seen = {}
    model.fc.register_forward_hook(lambda m, inp, out: seen.update({m.training: inp[0]}))
    model.train()(x)
    model.eval()(x)
    assert (seen[True] == 0).float().mean() > 0.3  # about half the features dropped
    assert (seen[False] == 0).float().mean() < 0.01


# -- FastContextFace -------------------------------------------------------------------------
def fastcontextface_parameter_count(depths, dims, embedding_size):
    def block(d):
        # dw7x7 (no bias), BN, 1x1 d->3d (+bias), 1x1 3d->d (+bias), layer scale, SE d->d/4->d (no bias)
        return 49 * d + 2 * d + (d * 3 * d + 3 * d) + (3 * d * d + d) + d + 2 * d * (d // 4)

    stem = 3 * dims[0] * 9 + dims[0] + 2 * dims[0]  # conv3x3 with bias + LayerNorm
    blocks = sum(n * block(d) for n, d in zip(depths, dims))
    downsamples = sum(2 * a + (4 * a * b + b) for a, b in zip(dims, dims[1:]))  # LN + conv2x2 with bias
    last = dims[-1]
    output = 2 * last + 49 * last + 2 * last + last * embedding_size + 2 * embedding_size  # LN, GDC, BN, FC, BN1d
    return stem + blocks + downsamples + output


def test_fastcontextface_parameter_count():
    model = facecore.create("backbones", "fastcontextface", embedding_size=512)
    expected = fastcontextface_parameter_count([2, 2, 6, 2], [48, 96, 192, 384], 512)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert 4.1e6 < expected < 4.3e6  # "about 4.2M"


def test_fastcontextface_structure():
    model = facecore.create("backbones", "fastcontextface", embedding_size=16, depths=[1, 2, 1, 1])
    assert [len(s) for s in model.stages] == [1, 2, 1, 1]
    block = model.stages[1][0]
    assert block.dwconv.kernel_size == (7, 7) and block.dwconv.groups == 96 and block.dwconv.bias is None
    assert block.pwconv1.out_channels == 3 * 96
    assert torch.equal(block.gamma, torch.full((96, 1, 1), 1e-6))
    assert block.se.reduce.out_channels == 24 and block.se.reduce.bias is None
    assert model.gdc.kernel_size == (7, 7) and model.gdc.groups == 384
    assert model.dropout.p == 0.4
    sizes = []
    for stage in model.stages:
        stage.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:])) and None)
    model.eval()(torch.zeros(1, 3, 112, 112))
    assert sizes == [(48, 56, 56), (96, 28, 28), (192, 14, 14), (384, 7, 7)]
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])
    assert weights.abs().max() <= 0.04 + 1e-6  # truncated normal, std 0.02, cut at 2 std
    sample = trunc_normal_(torch.empty(200_000), std=0.02)
    # The std of a normal cut at +-2 sigma is sigma * sqrt(1 - 4 phi(2) / (2 Phi(2) - 1)) = 0.8796 sigma.
    assert sample.std().item() == pytest.approx(0.02 * 0.8796, rel=0.02)
    assert abs(sample.mean().item()) < 1e-3
    no_scale = facecore.create("backbones", "fastcontextface", embedding_size=16, depths=[1, 1, 1, 1],
                               layer_scale_init=0)
    assert no_scale.stages[0][0].gamma is None


def test_stochastic_depth_drops_whole_samples():
    torch.manual_seed(0)
    model = facecore.create("backbones", "fastcontextface", embedding_size=8, depths=[1, 1, 1, 2], drop_path=0.5)
    rates = [b.drop_path.rate for s in model.stages for b in s]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5) and rates == sorted(rates)
    drop = model.stages[3][1].drop_path
    x = torch.ones(64, 4, 2, 2)
    y = drop.train()(x)
    per_sample = y.flatten(1)
    assert set(per_sample[:, 0].tolist()) == {0.0, 2.0}  # dropped, or kept and rescaled by 1/(1-0.5)
    assert (per_sample == per_sample[:, :1]).all()
    assert torch.equal(drop.eval()(x), x)


# -- the testing helper reports broken backbones ---------------------------------------------
class Tiny(nn.Module):
    def __init__(self, embedding_size=8):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.fc = nn.Linear(4, embedding_size)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


class Unused(Tiny):
    def __init__(self, embedding_size=8):
        super().__init__(embedding_size)
        self.spare = nn.Linear(2, 2)


class WrongShape(Tiny):
    def forward(self, x):
        return super().forward(x)[:, :-1]


class NoisyEval(Tiny):
    def forward(self, x):
        return nn.functional.dropout(super().forward(x), 0.5, training=True)


class HiddenState(Tiny):
    def __init__(self, embedding_size=8):
        super().__init__(embedding_size)
        self.offset = torch.randn(embedding_size)  # not a buffer: lost by state_dict

    def forward(self, x):
        return super().forward(x) + self.offset


class BatchMixing(Tiny):
    def forward(self, x):
        out = super().forward(x)
        return out - out.mean(dim=0, keepdim=True)


def test_check_backbone_accepts_a_correct_model():
    check_backbone(Tiny, embedding_size=8, img_size=16, torchscript=True, onnx=True)


@pytest.mark.parametrize(
    "model, message",
    [(Unused, "'spare.weight' received no gradient"), (WrongShape, "output shape"),
     (NoisyEval, "not deterministic"), (HiddenState, "state dict"), (BatchMixing, "rest of the batch")],
)
def test_check_backbone_reports_what_broke(model, message):
    with pytest.raises(AssertionError, match=message):
        check_backbone(model, embedding_size=8, img_size=16)


def test_check_backbone_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_backbone(Tiny, embedding_size=8, img_size=16)
    assert torch.equal(torch.rand(3), expected)
