"""The ``timm`` backbone: any timm model wrapped as a face backbone, and its errors.

Uses timm's own tiny ``test_*`` models (no download: ``timm_pretrained`` stays false, there is
no network here). Tests that need timm skip when it is not installed; the message for a
missing timm is tested either way, by hiding the package."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import facecore
from facecore.core.config import validate_config
from facecore.errors import ConfigError


def timm_face(model_name, **options):
    torch.manual_seed(0)
    return facecore.create("backbones", "timm", embedding_size=32, model_name=model_name, **options)


def test_missing_timm_is_a_config_error_saying_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ConfigError) as err:
        timm_face("resnet18")
    assert "model.backbone" in str(err.value) and "pip install 'facecore[timm]'" in str(err.value)
    assert "facecore[timm]" in facecore.core.plugins.registry("backbones").get("timm").description


def test_config_needs_model_name_and_checks_option_types(tmp_path):
    base = {"model": {"backbone": "timm"}, "data": {"root": str(tmp_path)}}
    with pytest.raises(ConfigError) as err:
        validate_config(base)
    assert any(e.startswith("model.model_name: required key is missing") for e in err.value.errors)
    with pytest.raises(ConfigError) as err:
        validate_config({**base, "model": {"backbone": "timm", "model_name": "test_vit", "timm_pretrained": "yes"}})
    assert [e.split(":")[0] for e in err.value.errors] == ["model.timm_pretrained"]
    ok = validate_config({**base, "model": {"backbone": "timm", "model_name": "test_vit"}})
    assert ok["model"]["timm_pretrained"] is False and ok["model"]["dropout"] == 0.0


def test_unknown_model_name_lists_close_matches():
    pytest.importorskip("timm")
    with pytest.raises(ConfigError) as err:
        timm_face("resnet5")
    message = str(err.value)
    assert "model.model_name" in message and "'resnet5'" in message
    close = message.split("close matches: ")[1].split(")")[0].split(", ")
    assert "resnet50" in close and len(close) <= 5


def test_vit_style_models_are_built_for_112x112():
    timm = pytest.importorskip("timm")
    assert timm.create_model("test_vit").pretrained_cfg["input_size"] == (3, 160, 160)  # its own default
    model = timm_face("test_vit").eval()
    assert tuple(model.trunk.patch_embed.img_size) == (112, 112)
    with torch.no_grad():
        assert model(torch.rand(2, 3, 112, 112) * 2 - 1).shape == (2, 32)


def test_embedding_layer_sits_on_the_pooled_features():
    pytest.importorskip("timm")
    model = timm_face("test_resnet", dropout=0.3).eval()  # a CNN: takes any size, no img_size argument
    with torch.no_grad():
        pooled = model.trunk(torch.zeros(1, 3, 112, 112))
    assert pooled.shape == (1, model.fc.in_features)
    assert model.fc.out_features == model.features.num_features == 32 and model.fc.bias is None
    assert model.dropout.p == 0.3


def test_inputs_are_moved_to_the_models_pretraining_normalisation():
    pytest.importorskip("timm")
    model = timm_face("test_efficientnet")
    mean, std = model.trunk.pretrained_cfg["mean"], model.trunk.pretrained_cfg["std"]
    assert mean != (0.5, 0.5, 0.5)
    seen = []
    model.trunk.register_forward_pre_hook(lambda m, args: seen.append(args[0]) and None)
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3).expand(2, 3, 112, 3).contiguous()  # pixels 0, 127.5, 255
    model.eval()(torch.nn.functional.pad(x, (0, 109)))
    for c in range(3):
        got = seen[0][0, c, 0, :3]
        want = torch.tensor([(v - mean[c]) / std[c] for v in (0.0, 0.5, 1.0)])
        torch.testing.assert_close(got, want)
    assert "input_scale" not in model.state_dict()  # derived from model_name, not saved


def test_drop_path_reaches_the_timm_model():
    pytest.importorskip("timm")
    rates = [b.drop_path1.drop_prob for b in timm_face("test_vit", drop_path=0.2).trunk.blocks
             if hasattr(b.drop_path1, "drop_prob")]
    assert rates and max(rates) == pytest.approx(0.2)
    assert not any(hasattr(b.drop_path1, "drop_prob") for b in timm_face("test_vit").trunk.blocks)


def test_unavailable_pretrained_weights_name_the_option(monkeypatch):
    timm = pytest.importorskip("timm")

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("cannot reach the Hugging Face Hub")
        return create(name, **kwargs)

    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ConfigError) as err:
        timm_face("test_resnet", timm_pretrained=True)
    assert "model.timm_pretrained" in str(err.value) and "cannot reach the Hugging Face Hub" in str(err.value)
    assert timm_face("test_resnet").fc.in_features == 96


@pytest.mark.slow
def test_a_timm_model_trains_and_a_bad_name_stops_the_cli_cleanly(tmp_path):
    """End to end: a timm trunk trains, validates and reloads from its checkpoint; an unknown name is one
    message and exit code 2 at the CLI, no traceback."""
    pytest.importorskip("timm")
    import subprocess

    from helpers import make_tiny_data, subprocess_env

    from facecore.core.checkpoint import load_checkpoint
    from facecore.eval.predictor import Predictor
    from facecore.train.trainer import train

    data = make_tiny_data(tmp_path, identities=3, per_identity=4, pairs=10)
    config = {
        "seed": 0, "device": "cpu",
        "model": {"backbone": "timm", "model_name": "test_convnext", "embedding_size": 32},
        "data": {"root": str(data), "batch_size": 4, "num_workers": 0},
        "training": {"epochs": 1, "max_steps": 2, "lr": 0.01, "log_every": 1},
        "checkpoint": {"save_dir": str(tmp_path / "runs")},
        "logging": {"log_dir": str(tmp_path / "logs"), "tensorboard": False},
        "eval": {"bin_file": "val.bin", "metrics": ["verification"], "test_batch_size": 8},
    }
    result = train(validate_config(config), verbose=False)
    checkpoint = load_checkpoint(f"{result['run_dir']}/last.pth")
    assert checkpoint["step"] == 2 and checkpoint["config"]["model"]["model_name"] == "test_convnext"
    assert any(k.startswith("trunk.") for k in checkpoint["backbone"]) and "fc.weight" in checkpoint["backbone"]
    predictor = Predictor(checkpoint_path=f"{result['run_dir']}/last.pth", use_cpu=True)
    assert predictor.embed(torch.zeros(3, 112, 112, dtype=torch.uint8)).shape == (1, 32)

    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent(f"""\
        device: cpu
        model: {{backbone: timm, model_name: convnext_tiniest, embedding_size: 32}}
        data: {{root: {data}, num_workers: 0, batch_size: 4}}
        eval: {{bin_file: null}}
        """))
    out = subprocess.run([sys.executable, "-m", "facecore.cli", "train", "--config", str(bad)],
                         capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert "model.model_name" in out.stderr and "convnext_tiny" in out.stderr
