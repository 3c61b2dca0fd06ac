"""Heads with state (CurricularFace's t) or randomness (ElasticFace's margins) resume bit-exactly mid-epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_tiny_data
from test_trainer import tiny_config

from facecore.core.checkpoint import load_checkpoint
from facecore.train.trainer import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("heads-resume-data"))


@pytest.mark.parametrize("head", [{"type": "curricularface", "scale": 16.0, "margin": 0.2, "t_alpha": 0.5},
                                  {"type": "elasticface", "scale": 16.0, "margin": 0.2, "plus": True}],
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
