"""Tests of the example-mobilefacenet plugin, written the way any facecore plugin can test itself.

Run ``pytest`` in this folder (pyproject puts the folder on sys.path); nothing here needs
the entry point to be installed.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jsonschema import Draft202012Validator

from facecore import DataError
from facecore.testing import check_backbone

import facecore_example_mobilefacenet
from facecore_example_mobilefacenet import SCHEMA, example_mobilefacenet


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_meets_the_backbone_contract():
    check_backbone(example_mobilefacenet, embedding_size=32, width_mult=0.5, dropout=0.2)


def test_traces_and_exports_to_onnx():
    check_backbone(example_mobilefacenet, embedding_size=16, width_mult=0.25, torchscript=True, onnx=True)


def test_full_width_has_about_one_million_parameters():
    # Chen et al. 2018 report 0.99M parameters for 128-d embeddings.
    assert 0.95e6 < _params(example_mobilefacenet(embedding_size=128)) < 1.05e6


def test_width_mult_scales_the_network():
    assert _params(example_mobilefacenet(64, width_mult=0.5)) < 0.5 * _params(example_mobilefacenet(64, width_mult=1.0))


def test_reduces_a_112_input_to_a_7x7_map_before_gdc():
    model = example_mobilefacenet(16, width_mult=0.25).eval()
    with torch.no_grad():
        fmap = model.features(torch.zeros(1, 3, 112, 112))
    assert fmap.shape[-2:] == (7, 7)


def test_dropout_option_is_used():
    model = example_mobilefacenet(16, width_mult=0.25, dropout=0.5).train()
    x = torch.randn(4, 3, 112, 112)
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.equal(model(x), model(x))


def test_other_input_size_is_a_data_error_naming_the_config_key():
    model = example_mobilefacenet(16, width_mult=0.25).eval()
    with pytest.raises(DataError, match="data.img_size"):
        model(torch.zeros(1, 3, 96, 96))


def test_schema_defaults_are_the_factory_defaults():
    params = inspect.signature(example_mobilefacenet).parameters
    for name, prop in SCHEMA["properties"].items():
        assert params[name].default == prop["default"], name
    # every factory argument except the core's embedding_size is a declared option
    assert set(params) - {"embedding_size"} == set(SCHEMA["properties"])


@pytest.mark.parametrize("options", [{"width_mult": 0}, {"width_mult": -1}, {"dropout": 1.0}, {"widht_mult": 1}])
def test_schema_rejects_bad_options(options):
    assert list(Draft202012Validator(SCHEMA).iter_errors(options))


def test_hook_registers_example_mobilefacenet():
    calls = []

    def register(name, factory, *, schema=None, description=""):
        calls.append((name, factory, schema, description))

    facecore_example_mobilefacenet.register_backbones(register)
    assert [(c[0], c[1], c[2]) for c in calls] == [("example-mobilefacenet", example_mobilefacenet, SCHEMA)]
    assert calls[0][3]
    Draft202012Validator.check_schema(SCHEMA)


def test_importing_the_plugin_does_not_import_torch():
    code = "import sys, facecore_example_mobilefacenet; print('torch' in sys.modules)"
    here = str(Path(facecore_example_mobilefacenet.__file__).parent.parent)  # works installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"
