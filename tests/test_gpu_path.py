"""The GPU-shaped hot path, tested on the CPU: uint8 batches normalized on the device, the loss kept on
the device between log lines, bf16 autocast, torch.compile (and, on CUDA only, no host sync per step)."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TinyNet, make_tiny_data

import facecore
from facecore import DataError, TrainingError, hookimpl
from facecore.core.checkpoint import load_checkpoint
from facecore.core.config import validate_config
from facecore.data.images import model_input, normalize, training_set_schema
from facecore.train import trainer as trainer_module
from facecore.train.loss_window import LossWindow
from facecore.train.trainer import train


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("gpu-path-data"))


class Probe(TinyNet):
    """TinyNet that records, for each training forward, the CPU autocast state and its output dtype."""

    seen: list[tuple[bool, torch.dtype, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training:
            Probe.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype))
        return out


class FloatImages(torch.utils.data.Dataset):
    """The recordio set as a third-party dataset that normalizes its images itself (float in [-1, 1])."""

    def __init__(self, train: bool, **options):
        self.inner = facecore.create("datasets", "recordio", train=train, **options)
        self.num_classes = self.inner.num_classes

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        image, label = self.inner[index]
        return normalize(image), label


class Parts:
    """Test plugins: the Probe backbone and the float-image dataset."""

    @hookimpl
    def register_backbones(self, register):
        register("probe", Probe, description="test backbone recording autocast")

    @hookimpl
    def register_datasets(self, register):
        register("float-recordio", FloatImages, schema=training_set_schema("recordio folder"),
                 description="test dataset yielding float images")


def config(data: Path, out: Path, **training) -> dict:
    return validate_config({
        "seed": 3,
        "device": "cpu",
        "model": {"backbone": "probe", "embedding_size": 8},
        "head": {"type": "arcface", "scale": 16.0, "margin": 0.2},
        "data": {"root": str(data), "batch_size": 8, "num_workers": 0},
        "training": {"epochs": 1, "lr": 0.05, "log_every": 2, **training},
        "checkpoint": {"save_dir": str(out / "runs")},
        "logging": {"log_dir": str(out / "logs"), "tensorboard": False},
        "eval": {"bin_file": None},
    })


def checkpoint(summary: dict) -> dict:
    return load_checkpoint(Path(summary["run_dir"]) / "last.pth")


def test_model_input_normalizes_uint8_on_its_device_and_passes_float_through() -> None:
    batch = torch.randint(0, 256, (3, 3, 5, 4), dtype=torch.uint8)
    out = model_input(batch)
    assert out.dtype == torch.float32 and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, torch.stack([normalize(image) for image in batch]))  # the per-image arithmetic
    assert torch.allclose(out, (batch.float() - 127.5) / 127.5, atol=2e-7)
    scaled = out.double()
    assert model_input(scaled).dtype == torch.float32 and torch.equal(model_input(scaled), out)
    with pytest.raises(DataError, match=r"the x dataset \(data.type\) yields torch.int32 images; images must be uint8"):
        model_input(batch.int(), "the x dataset (data.type)")


def test_uint8_batches_train_to_the_weights_of_float_batches(tiny_data, tmp_path, register_plugin) -> None:
    register_plugin(Parts(), name="gpu-path-parts")
    image, _ = facecore.create("datasets", "recordio", root=str(tiny_data), train=False)[0]
    assert image.dtype == torch.uint8  # what travels through the loader
    as_uint8 = checkpoint(train(config(tiny_data, tmp_path / "u8"), verbose=False))
    cfg = config(tiny_data, tmp_path / "f32")
    cfg["data"]["type"] = "float-recordio"  # a dataset that still yields float images keeps working
    as_float = checkpoint(train(validate_config(cfg), verbose=False))
    for part in ("backbone", "classifier"):
        assert as_uint8[part].keys() == as_float[part].keys()
        for key, value in as_uint8[part].items():
            assert torch.allclose(value.float(), as_float[part][key].float(), rtol=0, atol=1e-6), (part, key)
    assert as_uint8["step"] == as_float["step"] == 6


def test_bf16_autocasts_on_the_cpu_and_fp16_falls_back_to_float32(tiny_data, tmp_path, register_plugin, capsys) -> None:
    register_plugin(Parts(), name="gpu-path-parts")
    Probe.seen.clear()
    summary = train(config(tiny_data, tmp_path / "bf16", amp="bf16", max_steps=3), verbose=False)
    assert len(Probe.seen) == 3 and set(Probe.seen) == {(True, torch.bfloat16, torch.bfloat16)}
    lines = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if line["event"] == "train"]
    assert losses and all(0 < loss < 100 for loss in losses)  # finite, read from the device-side window
    Probe.seen.clear()
    capsys.readouterr()
    train(config(tiny_data, tmp_path / "fp16", amp="fp16", max_steps=1), verbose=False)
    assert [seen[0] for seen in Probe.seen] == [False] and Probe.seen[0][2] == torch.float32
    assert "training.amp: fp16 needs CUDA" in capsys.readouterr().err  # warned before the run directory exists


def test_loss_window_sums_on_the_device_and_flags_non_finite_losses() -> None:
    window = LossWindow(torch.device("cpu"), first_step=5)
    for value in (1.0, 2.0, 6.0):
        window.add(torch.tensor(value, requires_grad=True) * 1, images=4)
    assert window.read() == (3.0, True, {}) and window.images == 12 and window.losses == 3
    window.add(torch.tensor(float("inf")), images=4)
    mean, finite, _ = window.read()
    assert not finite and mean == float("inf")
    window.reset(first_step=9)
    assert window.read() == (0.0, True, {}) and window.first_step == 9 and window.losses == 0


def test_loss_window_keeps_each_term_of_the_loss() -> None:
    window = LossWindow(torch.device("cpu"), first_step=1)
    for margin, reg in ((1.0, 0.5), (3.0, 1.5)):
        terms = {"margin": torch.tensor(margin), "regulariser": torch.tensor(reg)}
        window.add(terms["margin"] + terms["regulariser"], images=2, terms=terms)
    reading = window.read()
    assert reading.loss == 3.0 and reading.terms == {"margin": 2.0, "regulariser": 1.0}


def test_partial_fc_fixed_size_draw_picks_the_centers_of_the_unique_based_draw() -> None:
    from facecore.train.classifier import MarginClassifier

    classifier = MarginClassifier(4, 1000, facecore.create("heads", "cosface"), sample_rate=0.05).train()
    for seed in range(5):
        labels = torch.randint(0, 1000, (32,), generator=torch.Generator().manual_seed(seed))
        labels[:4] = labels[4]  # repeated classes
        torch.manual_seed(seed)
        index, targets = classifier.sample_centers(labels)  # 32 labels <= 50 sampled centers: no host sync
        torch.manual_seed(seed)
        score = torch.rand(1000)  # the draw as it was: unique positives (a host sync), then the same top-k
        score[torch.unique(labels)] = 2.0
        want = torch.topk(score, 50, sorted=False).indices.sort().values
        assert torch.equal(index, want) and torch.equal(index[targets], labels)


def _compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def test_a_backend_that_cannot_compile_is_a_clear_training_error(tiny_data, tmp_path, register_plugin, monkeypatch) -> None:
    register_plugin(Parts(), name="gpu-path-parts")

    def no_compiler(graph, example_inputs):
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=no_compiler))
    try:
        with pytest.raises(TrainingError, match=r"training.compile: torch.compile could not compile the backbone "
                                                r"\(.*no working C\+\+ compiler.*set training.compile: false"):
            train(config(tiny_data, tmp_path, compile=True, max_steps=1), verbose=False)
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.skipif(_compiler() is None, reason="no C++ compiler (g++, c++ or clang++) on PATH: torch.compile's CPU backend needs one")
def test_compiled_backbone_trains_like_the_eager_one_and_saves_plain_weights(tiny_data, tmp_path, register_plugin,
                                                                             monkeypatch) -> None:
    register_plugin(Parts(), name="gpu-path-parts")
    compiled_modules = []
    real_compile = torch.compile

    def spy(module, *args, **kwargs):
        compiled_modules.append(type(module).__name__)
        return real_compile(module, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    try:
        compiled = checkpoint(train(config(tiny_data, tmp_path / "c", compile=True, max_steps=2), verbose=False))
    finally:
        torch._dynamo.reset()
    eager = checkpoint(train(config(tiny_data, tmp_path / "e", max_steps=2), verbose=False))
    assert compiled_modules == ["Probe"]
    assert compiled["backbone"].keys() == eager["backbone"].keys()  # no "_orig_mod." prefixes
    for key, value in eager["backbone"].items():
        assert torch.allclose(compiled["backbone"][key].float(), value.float(), atol=1e-4), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: counts host syncs with torch.cuda.set_sync_debug_mode")
def test_the_cuda_training_loop_waits_for_the_device_only_when_it_reads_the_loss_window(tiny_data, tmp_path,
                                                                                       register_plugin, monkeypatch) -> None:
    register_plugin(Parts(), name="gpu-path-parts")
    reads, epoch, read = [], trainer_module.Trainer._train_epoch, LossWindow.read

    def strict_epoch(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")  # any other sync raises
        try:
            return epoch(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def allowed_read(self):
        reads.append(self.first_step)
        torch.cuda.set_sync_debug_mode("default")
        try:
            return read(self)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(trainer_module.Trainer, "_train_epoch", strict_epoch)
    monkeypatch.setattr(LossWindow, "read", allowed_read)
    cfg = config(tiny_data, tmp_path, amp="bf16", log_every=3)
    cfg["device"] = "cuda"
    summary = train(cfg, verbose=False)
    assert summary["step"] == 6 and reads == [1, 4]  # one read per log window, none per step
