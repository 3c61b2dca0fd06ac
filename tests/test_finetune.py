"""Fine-tuning: the backbone starts from a file, the classifier fresh; a frozen backbone stays unchanged;
the backbone's own LR; exact resume across the freeze; bad files refused through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import make_tiny_data

import facecore
from facecore.cli import main
from facecore.core.build import build_backbone
from facecore.core.checkpoint import load_checkpoint, save_checkpoint
from facecore.core.config import validate_config
from facecore.errors import CheckpointError
from facecore.train.trainer import Trainer, train

MODEL = {"backbone": "fastcontextface", "embedding_size": 32, "depths": [1, 1, 1, 1], "dims": [8, 16, 16, 32]}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("finetune-data"))


def config(data: Path, out: Path, **training) -> dict:
    return validate_config({
        "seed": 5,
        "device": "cpu",
        "model": dict(MODEL),
        "head": {"type": "cosface", "scale": 16.0, "margin": 0.1},
        "data": {"root": str(data), "batch_size": 8, "num_workers": 0},
        "training": {"epochs": 3, "optimizer": "sgd", "lr": 0.05, "scheduler": "cosine", "warmup_epochs": 0.5,
                     "log_every": 3, **training},
        "checkpoint": {"save_dir": str(out / "runs")},
        "logging": {"log_dir": str(out / "logs"), "tensorboard": False},
        "eval": {"bin_file": "val.bin", "metrics": ["verification"]},
    })


def source_checkpoint(path: Path, cfg: dict) -> dict:
    """A facecore checkpoint of a 'pretrained' backbone whose weights and BN statistics are not an init's."""
    torch.manual_seed(123)
    model = build_backbone(cfg)
    with torch.no_grad():
        model.train()(torch.rand(16, 3, 112, 112) * 2 - 1)  # moves the BN running statistics
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint({"config": cfg, "backbone": state, "classifier": {"weight": torch.randn(11, 32)}}, path)
    return state


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_backbone_starts_as_the_file_and_the_classifier_fresh(tiny_data: Path, tmp_path: Path) -> None:
    cfg = config(tiny_data, tmp_path)
    cfg["model"]["pretrained"] = str(tmp_path / "src.pth")
    source = source_checkpoint(tmp_path / "src.pth", cfg)
    trainer = Trainer(cfg, verbose=False)
    trainer._build()
    assert_same(trainer.backbone.state_dict(), source)
    reference = build_backbone(cfg)
    reference.load_state_dict(source)
    images = torch.rand(4, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.equal(trainer.backbone.eval()(images), reference.eval()(images))
    assert trainer.classifier.weight.shape == (6, 32)  # the new identities, not the file's 11
    assert trainer.pretrained_report.unused["classifier"].endswith("the classifier starts fresh")


@pytest.mark.slow
def test_frozen_backbone_then_own_lr_and_exact_resume_across_the_freeze(tiny_data: Path, tmp_path: Path) -> None:
    """3 epochs of 6 steps: epoch 1 trains only the classifier, then the backbone at lr x 0.5. A run
    stopped after the frozen epoch and again mid-epoch 2, then resumed, ends where an uninterrupted one does."""
    src = tmp_path / "src.pth"
    finetune = {"freeze_backbone_epochs": 1, "backbone_lr_mult": 0.5}
    straight_cfg = config(tiny_data, tmp_path / "straight", **finetune)
    source = source_checkpoint(src, straight_cfg)
    straight_cfg["model"]["pretrained"] = str(src)
    straight = load_checkpoint(Path(train(straight_cfg, verbose=False)["run_dir"]) / "last.pth")

    cfg = config(tiny_data, tmp_path / "split", **finetune, max_steps=6)
    cfg["model"]["pretrained"] = str(src)
    run_dir = Path(train(cfg, verbose=False)["run_dir"])
    frozen = load_checkpoint(run_dir / "last.pth")
    assert frozen["step"] == 6 and frozen["epoch"] == 1
    assert_same(frozen["backbone"], source)  # weights and BatchNorm statistics untouched
    backbone_params = len(list(build_backbone(cfg).parameters()))
    assert set(frozen["optimizer"]["state"]) == {backbone_params}  # momentum for the centers only
    log = (run_dir / "train.log").read_text()
    assert f"initialised the backbone from {src}" in log and "not loaded from the file: classifier" in log
    assert "epochs 1-1: the backbone is frozen" in log

    cfg["training"]["max_steps"] = 9
    middle = load_checkpoint(Path(train(cfg, resume=str(run_dir / "last.pth"), verbose=False)["run_dir"]) / "last.pth")
    assert (middle["epoch"], middle["batch_in_epoch"]) == (1, 3)
    assert any(not torch.equal(middle["backbone"][k], source[k]) for k in source if source[k].is_floating_point())
    groups = middle["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[0]["initial_lr"] == 0.5 * groups[1]["initial_lr"] == 0.025
    assert groups[0]["lr"] == pytest.approx(0.5 * groups[1]["lr"])

    src.unlink()  # a resumed run takes its weights from the checkpoint, never from model.pretrained again
    cfg["training"]["max_steps"] = None
    resumed = load_checkpoint(Path(train(cfg, resume=str(run_dir / "last.pth"), verbose=False)["run_dir"]) / "last.pth")
    assert resumed["step"] == straight["step"] == 18
    assert_same(resumed["backbone"], straight["backbone"])
    assert_same(resumed["classifier"], straight["classifier"])

    cfg["training"]["backbone_lr_mult"] = 1.0
    with pytest.raises(CheckpointError, match="2 param group.* this config makes 1: training.backbone_lr_mult"):
        train(cfg, resume=str(run_dir / "last.pth"), verbose=False)


def test_bundled_schedulers_scale_every_param_group() -> None:
    for name in ("cosine", "multistep", "poly", "constant"):
        weights = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
        optimizer = torch.optim.SGD([{"params": [weights[0]], "lr": 0.01}, {"params": [weights[1]]}], lr=0.1)
        scheduler = facecore.create("schedulers", name, optimizer=optimizer, steps_per_epoch=5, epochs=4,
                                    warmup_epochs=1)
        seen = set()
        for _ in range(19):
            optimizer.step()
            scheduler.step()
            backbone, head = (g["lr"] for g in optimizer.param_groups)
            assert backbone == pytest.approx(0.1 * head, abs=1e-12), name
            seen.add(round(head, 6))
        assert len(seen) > 2, name  # the schedule really moved both


class _Trap:
    """Unpickling this would create a file: nothing in a refused file may run."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


@pytest.mark.parametrize("kind", ["other-architecture", "not-a-state-dict", "pickled-code"])
def test_bad_init_file_is_one_message_naming_it_and_nothing_runs(tiny_data: Path, tmp_path: Path, kind: str) -> None:
    cfg = config(tiny_data, tmp_path)
    bad = tmp_path / "init.pth"
    if kind == "other-architecture":
        resnet = facecore.create("backbones", "resnet50", embedding_size=32, layers=[1, 1, 1, 1])
        save_checkpoint({"config": {"model": {"backbone": "resnet50", "embedding_size": 32}},
                         "backbone": resnet.state_dict()}, bad)
        expected = ["does not fit the configured backbone 'fastcontextface'", "saved for backbone 'resnet50'",
                    "missing from the file"]
    elif kind == "not-a-state-dict":
        torch.save({"epoch": 4, "accuracy": 0.93}, bad)
        expected = ["holds neither a facecore checkpoint nor a state dict", "state_dict() saved with torch.save"]
    else:
        torch.save({"backbone": {"w": torch.ones(1)}, "x": _Trap(tmp_path / "pwned")}, bad)
        expected = ["holds pickled Python objects", "will not run pickled code", "save just its state_dict"]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(main, ["train", "--config", str(cfg_file), "--init", str(bad)])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert result.output.count("Error:") == 1 and "Traceback" not in result.output
    assert str(bad) in result.output and all(e in result.output for e in expected), result.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_frozen_epoch_under_ddp_matches_one_process(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """DDP must only see parameters that get gradients: with the backbone frozen for an epoch and then
    trained at its own LR, 2 gloo processes train what 1 process trains with the same global batch."""
    from test_distributed import PROBE, run

    from helpers import fake_distribution, subprocess_env

    root = tmp_path_factory.mktemp("ddp-freeze")
    data = make_tiny_data(root, identities=6, per_identity=8)
    fake_distribution(root, "fc-probe", "fc_probe_plugin", PROBE)
    env = subprocess_env(PYTHONPATH=str(root))
    extra = ("--set", "training.freeze_backbone_epochs=1", "--set", "training.backbone_lr_mult=0.5")
    one = run(tmp_path / "one", data, env, 1, False, *extra)
    two = run(tmp_path / "two", data, env, 2, False, *extra)
    assert one["step"] == two["step"] == 6 and len(two["optimizer"]["param_groups"]) == 2
    for part in ("backbone", "classifier"):
        for key in one[part]:
            assert torch.allclose(one[part][key], two[part][key], atol=1e-5, rtol=1e-4), (part, key)
