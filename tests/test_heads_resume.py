"""Heads with state (CurricularFace's t), randomness (ElasticFace's margins) or parameters of their own
(SphereFace2's and UniFace's bias, with its optimizer momentum) resume bit-exactly mid-epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_tiny_data
from test_trainer import tiny_config

import facecore
from facecore.core.checkpoint import load_checkpoint
from facecore.train.trainer import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("heads-resume-data"))


@pytest.mark.parametrize("head", [{"type": "curricularface", "scale": 16.0, "margin": 0.2, "t_alpha": 0.5},
                                  {"type": "elasticface", "scale": 16.0, "margin": 0.2, "plus": True},
                                  {"type": "sphereface2", "scale": 16.0, "loss_weight": 10.0},
                                  {"type": "uniface", "scale": 16.0, "margin": 0.2}],
                         ids=lambda h: h["type"])
def test_a_run_stopped_mid_epoch_and_resumed_ends_bit_exact(tiny_data: Path, tmp_path: Path, head: dict) -> None:
    straight = train(tiny_config(tiny_data, tmp_path / "straight", head=head), verbose=False)
    cfg = tiny_config(tiny_data, tmp_path / "stopped", head=head,
                      checkpoint={"save_dir": str(tmp_path / "stopped" / "runs"), "save_every_steps": 1})
    stopped = dict(cfg, training={**cfg["training"], "max_steps": 8})  # epoch 2, batch 2 of 6
    first = train(stopped, verbose=False)
    assert first["step"] == 8
    resumed = train(cfg, resume=True, verbose=False)
    a = load_checkpoint(Path(resumed["run_dir"]) / "last.pth")
    b = load_checkpoint(Path(straight["run_dir"]) / "last.pth")
    assert a["step"] == b["step"] == 12
    for part in ("backbone", "classifier"):
        for key in b[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    if head["type"] == "curricularface":
        assert b["classifier"]["head.t"].abs().item() > 0  # the state did move, and resumed to the same value
    if head["type"] in ("sphereface2", "uniface"):  # the bias learned (and its momentum resumed with it)
        start = facecore.create("heads", head["type"], **{k: v for k, v in head.items() if k != "type"})
        start.configure(num_classes=b["classifier"]["weight"].shape[0], sample_rate=1.0)
        assert abs(b["classifier"]["head.bias"].item() - start.bias.item()) > 1e-3
