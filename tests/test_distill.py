"""Distillation (training.distill): the loss values, the frozen teacher, the ramp, exact resume across a freeze
with Partial FC, the teacher's fingerprint at --resume, and bad teacher files refused before anything is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import make_tiny_data

import facecore
from facecore.cli import main
from facecore.core.checkpoint import load_checkpoint
from facecore.core.config import validate_config
from facecore.errors import CheckpointError, ConfigError
from facecore.core.runtime import DistInfo
from facecore.train.checkpointing import TrainState
from facecore.train.distill import DistillTerms, GlobalBatch, tensors_fingerprint
from facecore.train.trainer import Trainer, train

STUDENT = {"backbone": "fastcontextface", "embedding_size": 32, "depths": [1, 1, 1, 1], "dims": [8, 16, 16, 32]}
TEACHER = {"type": "fastcontextface", "embedding_size": 48, "depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("distill-data"))


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare state dict (InsightFace's backbone.pth layout) of a teacher whose BN statistics are not an init's."""
    torch.manual_seed(11)
    options = {k: v for k, v in TEACHER.items() if k not in ("type", "embedding_size")}
    model = facecore.create("backbones", "fastcontextface", embedding_size=48, **options)
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 112, 112) * 2 - 1)
    path = tmp_path_factory.mktemp("teacher") / "backbone.pth"
    torch.save(model.state_dict(), path)
    return path


def config(data: Path, out: Path, teacher: Path, distill: dict | None = None, head: dict | None = None, **training) -> dict:
    return validate_config({
        "seed": 5, "device": "cpu",
        "model": dict(STUDENT),
        "head": {"type": "cosface", "scale": 16.0, "margin": 0.1, **(head or {})},
        "data": {"root": str(data), "batch_size": 8, "num_workers": 0},
        "training": {"epochs": 3, "lr": 0.05, "warmup_epochs": 0.5, "log_every": 1, **training,
                     "distill": {"teacher": str(teacher), "backbone": dict(TEACHER), **(distill or {})}},
        "checkpoint": {"save_dir": str(out / "runs")},
        "logging": {"log_dir": str(out / "logs"), "tensorboard": False},
        "eval": {"bin_file": None},
    })


# -- the losses, against a computation written out here ------------------------------------------

def test_loss_values_match_an_independent_computation() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    unit = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731

    for metric in ("cosine", "l2"):
        loss = facecore.create("distill_losses", "embedding", student_size=4, teacher_size=3, metric=metric)
        projection = loss.projection.weight.detach()  # (3, 4): sizes differ, so the student is projected
        expected = 0.0
        for s, t in zip(student.tolist(), teacher.tolist()):
            p = unit([dot(row, s) for row in projection.tolist()])
            t = unit(t)
            expected += 1 - dot(p, t) if metric == "cosine" else math.sqrt(sum((a - b) ** 2 for a, b in zip(p, t)))
        assert loss(student, teacher).item() == pytest.approx(expected / 6, rel=1e-5), metric
    same = facecore.create("distill_losses", "embedding", student_size=3, teacher_size=3)
    assert same.projection is None and same(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)

    relational = facecore.create("distill_losses", "relational", student_size=4, teacher_size=3)
    s, t = [unit(v) for v in student.tolist()], [unit(v) for v in teacher.tolist()]
    pairs = [(i, j) for i in range(6) for j in range(6) if i != j]
    expected = sum((dot(s[i], s[j]) - dot(t[i], t[j])) ** 2 for i, j in pairs) / len(pairs)
    assert relational(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_weights_and_the_linear_warm_up_scale_the_terms() -> None:
    state = TrainState()
    loss = facecore.create("distill_losses", "relational", student_size=4, teacher_size=4)
    terms = DistillTerms([("distill_relational", 0.5, loss)], 2.0, 4, state, GlobalBatch(DistInfo()))
    terms.start_step = 6  # e.g. after a frozen epoch of 6 steps
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    full = loss(s, t).item()
    seen = []
    for step in (5, 6, 7, 9, 20):  # optimizer steps done before this one
        state.step = step
        seen.append(terms(s, t)["distill_relational"].item() / full)
    assert seen == pytest.approx([0.0, 0.25, 0.5, 1.0, 1.0])  # 2.0 x 0.5 at full weight, reached after 4 steps


# -- training with a teacher ------------------------------------------------------------------

@pytest.mark.slow
def test_distilled_run_resumes_bit_exact_and_refuses_a_changed_teacher(tiny_data: Path, tmp_path: Path,
                                                                       teacher_file: Path) -> None:
    """3 epochs of 6 steps: the first frozen (no teacher run), then the backbone at lr x 0.5 with Partial FC,
    both losses, a projection (48 vs 32) and a ramp. Stopped mid-epoch 2 and resumed: the same weights."""
    options = dict(freeze_backbone_epochs=1, backbone_lr_mult=0.5, head={"sample_rate": 0.7})
    distill = {"loss": ["embedding", {"name": "relational", "weight": 2.0}], "warmup_steps": 4}
    file_state = {k: v.clone() for k, v in torch.load(teacher_file).items()}

    trainer = Trainer(config(tiny_data, tmp_path / "straight", teacher_file, distill, **options), verbose=False)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    teacher = trainer.distiller.teacher.module
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():  # weights and BN statistics as in the file
        assert torch.equal(value, file_state[key]), key
    run = Path(summary["run_dir"])
    straight = load_checkpoint(run / "last.pth")
    assert straight["distill"]["fingerprint"] == tensors_fingerprint(file_state)
    assert straight["distill"]["teacher"] == str(teacher_file) and "backbone" not in straight["distill"]
    assert straight["distill"]["terms"]["losses.0.projection.weight"].shape == (48, 32)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    distilled = [x["step"] for x in lines if x["event"] == "train" and "loss_distill_relational" in x]
    assert distilled == list(range(7, 19))  # not while the backbone was frozen
    assert all(x["loss"] == pytest.approx(x["loss_margin"] + x["loss_distill_embedding"] + x["loss_distill_relational"])
               for x in lines if x["event"] == "train" and x["step"] > 6)
    assert "distilling from" in (run / "train.log").read_text()

    cfg = config(tiny_data, tmp_path / "split", teacher_file, distill, **options, max_steps=9)
    stopped = Path(train(cfg, verbose=False)["run_dir"]) / "last.pth"
    cfg["training"]["max_steps"] = None
    resumed = load_checkpoint(Path(train(cfg, resume=str(stopped), verbose=False)["run_dir"]) / "last.pth")
    assert resumed["step"] == straight["step"] == 18
    for part in ("backbone", "classifier"):
        for key in straight[part]:
            assert torch.equal(resumed[part][key], straight[part][key]), (part, key)
    for key, value in straight["distill"]["terms"].items():
        assert torch.equal(resumed["distill"]["terms"][key], value), key

    changed = dict(file_state)
    key = next(k for k in changed if k.endswith("running_mean"))
    changed[key] = changed[key] + 1e-3
    torch.save(changed, teacher_file.parent / "changed.pth")
    teacher_file.rename(teacher_file.parent / "original.pth")
    (teacher_file.parent / "changed.pth").rename(teacher_file)
    try:
        with pytest.raises(CheckpointError, match=rf"training.distill.teacher: {teacher_file} is not the teacher"):
            train(cfg, resume=str(stopped), verbose=False)
    finally:
        (teacher_file.parent / "original.pth").replace(teacher_file)
    assert load_checkpoint(stopped)["step"] == 18  # nothing trained or written by the refused resume


@pytest.mark.parametrize("kind", ["other-backbone", "missing"])
def test_bad_teacher_file_is_one_message_naming_it_and_nothing_is_written(tiny_data: Path, tmp_path: Path, kind: str) -> None:
    bad = tmp_path / "teacher.pth"
    if kind == "other-backbone":
        torch.save(facecore.create("backbones", "resnet18", embedding_size=48, layers=[1, 1, 1, 1]).state_dict(), bad)
        expected = ["training.distill.teacher", "does not fit the configured backbone 'fastcontextface'",
                    "missing from the file", "training.distill.backbone"]
    else:
        expected = ["training.distill.teacher", "not found"]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(config(tiny_data, tmp_path, bad)))
    result = CliRunner().invoke(main, ["train", "--config", str(cfg_file)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.count("Error:") == 1 and "Traceback" not in result.output
    assert str(bad) in result.output and all(e in result.output for e in expected), result.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "logs").exists()


def test_the_distill_section_is_checked_with_the_plugins_options(tiny_data: Path, tmp_path: Path) -> None:
    cfg = config(tiny_data, tmp_path, tmp_path / "t.pth")
    assert cfg["training"]["distill"]["loss"] == ["embedding"] and cfg["training"]["distill"]["weight"] == 1.0
    bare = {"model": dict(STUDENT), "data": {"root": str(tiny_data)}}
    assert validate_config(bare)["training"]["distill"] is None  # off by default
    raw = {**bare, "training": {"distill": {
        "teacher": "t.pth", "backbone": {"type": "fastcontextfase", "depths": [1, 1, 1, 1]},
        "loss": [{"name": "embedding", "metric": "l1"}, {"name": "relationl"}, {"name": "relational", "weight": -1}]}}}
    with pytest.raises(ConfigError) as caught:
        validate_config(raw)
    text = "\n".join(caught.value.errors)
    assert "training.distill.backbone.type: " in text and "fastcontextface" in text  # did you mean
    assert "training.distill.loss[0].metric" in text and "training.distill.loss[1]: " in text
    assert "training.distill.loss[2].weight" in text


def test_at_weight_zero_the_student_trains_exactly_as_without_a_teacher(tiny_data: Path, tmp_path: Path,
                                                                         teacher_file: Path) -> None:
    """The teacher and the projection are built under a forked RNG and add nothing but their terms: the same
    initial weights, batches, augmentations and dropout as the run without them."""
    cfg = config(tiny_data, tmp_path / "zero", teacher_file, {"loss": ["embedding", "relational"], "weight": 0.0},
                 epochs=1)
    without = config(tiny_data, tmp_path / "without", teacher_file, epochs=1)
    without["training"]["distill"] = None
    a = load_checkpoint(Path(train(cfg, verbose=False)["run_dir"]) / "last.pth")
    b = load_checkpoint(Path(train(without, verbose=False)["run_dir"]) / "last.pth")
    for part in ("backbone", "classifier"):
        for key in b[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert "distill" in a and "distill" not in b


def test_the_teacher_runs_under_the_trainers_autocast_and_the_terms_in_float32(tiny_data: Path, tmp_path: Path,
                                                                               teacher_file: Path) -> None:
    trainer = Trainer(config(tiny_data, tmp_path, teacher_file, {"loss": ["embedding", "relational"]}, amp="bf16"),
                      verbose=False)
    trainer._build()
    assert trainer.amp_dtype == torch.bfloat16
    seen = []
    trainer.distiller.teacher.module.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    images, labels = torch.rand(4, 3, 112, 112) * 2 - 1, torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as TrainStep runs the forward
        terms = trainer._loss_fn(frozen=False)(images, labels)
    assert seen == [torch.bfloat16]
    assert set(terms) == {"margin", "distill_embedding", "distill_relational"}
    assert all(t.dtype == torch.float32 and t.requires_grad for t in terms.values())
