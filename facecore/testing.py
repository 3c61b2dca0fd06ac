"""Checks for plugin authors: does a backbone or head keep the facecore contract?

``check_backbone(factory)`` and ``check_head(factory)`` raise AssertionError with a message
that says what broke. Call them from your plugin's tests::

    from facecore.testing import check_backbone
    def test_my_backbone():
        check_backbone(my_backbone, embedding_size=64, onnx=True)

Importing this module has no side effects; the checks leave torch's global RNG as they found it.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from typing import Any, Callable

__all__ = ["check_backbone", "check_head"]


def _fail(what: str, message: str) -> None:
    raise AssertionError(f"{what}: {message}")


def _max_diff(a: Any, b: Any) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _name(factory: Callable[..., Any]) -> str:
    return getattr(factory, "__qualname__", None) or type(factory).__name__


def _check_gradients(what: str, model: Any) -> None:
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            _fail(what, f"parameter '{name}' received no gradient: it is unused in forward (DDP would fail on it); "
                        "remove it or set requires_grad=False")
        if not bool(p.grad.isfinite().all()):
            _fail(what, f"parameter '{name}' has a non-finite gradient")


def check_backbone(
    factory: Callable[..., Any],
    *,
    embedding_size: int = 64,
    img_size: int = 112,
    batch_size: int = 2,
    onnx: bool = False,
    torchscript: bool = False,
    **options: Any,
) -> None:
    """Build ``factory(embedding_size=..., **options)`` and check the backbone contract.

    Output (N, embedding_size) float32 for (N, 3, img_size, img_size) input in [-1, 1]; every
    trainable parameter gets a finite gradient; train and eval modes work; eval is deterministic
    and batch-independent; a state-dict round trip reproduces the outputs; optionally
    ``torch.jit.trace`` and ONNX export (checked with onnxruntime when it is installed).
    """
    import torch

    what = f"backbone {_name(factory)}"
    if batch_size < 2:
        raise ValueError("check_backbone needs batch_size >= 2 (BatchNorm in training mode needs two samples)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = factory(embedding_size=embedding_size, **options)
        x = torch.rand(batch_size, 3, img_size, img_size) * 2 - 1

        model.train()
        out = model(x)
        if not isinstance(out, torch.Tensor):
            _fail(what, f"forward returned {type(out).__name__}, expected a tensor")
        if tuple(out.shape) != (batch_size, embedding_size):
            _fail(what, f"output shape {tuple(out.shape)} in train mode, expected {(batch_size, embedding_size)}")
        if out.dtype != torch.float32:
            _fail(what, f"output dtype {out.dtype}, expected torch.float32")
        if not bool(out.isfinite().all()):
            _fail(what, "non-finite output in train mode")
        # A random projection: a plain sum has zero gradient through an output BatchNorm.
        (out * torch.randn_like(out)).sum().backward()
        _check_gradients(what, model)

        model.eval()
        with torch.no_grad():
            first, second = model(x), model(x)
            single = model(x[:1])
        if tuple(first.shape) != (batch_size, embedding_size):
            _fail(what, f"output shape {tuple(first.shape)} in eval mode, expected {(batch_size, embedding_size)}")
        if not torch.equal(first, second):
            _fail(what, f"eval mode is not deterministic (max difference {_max_diff(first, second):.3g})")
        if _max_diff(single, first[:1]) > 1e-4 * max(1.0, float(first.abs().max())):
            _fail(what, "in eval mode a sample's embedding depends on the rest of the batch "
                        f"(max difference {_max_diff(single, first[:1]):.3g})")

        _check_round_trip(what, model, factory(embedding_size=embedding_size, **options), (x,), first)

        if torchscript:
            _check_trace(what, model, x, first)
        if onnx:
            _check_onnx(what, model, x, batch_size)


def _check_round_trip(what: str, model: Any, fresh: Any, inputs: tuple, expected: Any) -> None:
    """A fresh instance loaded with ``model``'s state dict must give ``expected`` in eval mode."""
    import torch

    try:
        fresh.load_state_dict(model.state_dict(), strict=True)
    except Exception as exc:
        _fail(what, f"its state dict does not load into a fresh instance: {exc}")
    fresh.eval()
    with torch.no_grad():
        again = fresh(*inputs)
    if _max_diff(again, expected) > 1e-6:
        _fail(what, f"a fresh instance with the loaded state dict gives other outputs (max difference "
                    f"{_max_diff(again, expected):.3g}); is some state (e.g. running statistics) kept outside "
                    "the state dict?")


def _check_trace(what: str, model: Any, x: Any, expected: Any) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still widely deployed
        try:
            traced = torch.jit.trace(model, x, check_trace=False)
        except Exception as exc:
            _fail(what, f"torch.jit.trace failed: {type(exc).__name__}: {exc}")
        with torch.no_grad():
            got = traced(x)
    limit = 1e-4 * max(1.0, float(expected.abs().max()))
    if _max_diff(got, expected) > limit:
        _fail(what, f"the traced module's output differs by {_max_diff(got, expected):.3g} (limit {limit:.3g})")


def _check_onnx(what: str, model: Any, x: Any, batch_size: int) -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "backbone.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if importlib.util.find_spec("onnxscript") is not None:
                    batch = torch.export.Dim("batch", min=1)
                    torch.onnx.export(model, (x,), path, input_names=["images"], output_names=["embeddings"],
                                      dynamic_shapes=({0: batch},), dynamo=True, external_data=False)
                else:  # the TorchScript-based exporter needs no extra package
                    torch.onnx.export(model, (x,), path, input_names=["images"], output_names=["embeddings"],
                                      dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                                      dynamo=False)
            except Exception as exc:
                _fail(what, f"ONNX export failed: {type(exc).__name__}: {exc}")
        if importlib.util.find_spec("onnxruntime") is None:
            return
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        other = torch.rand(batch_size + 1, 3, x.shape[2], x.shape[3]) * 2 - 1  # a new batch size: dynamic axis
        for images in (x, other):
            with torch.no_grad():
                expected = model(images)
            got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
            if tuple(got.shape) != tuple(expected.shape):
                _fail(what, f"ONNX output shape {tuple(got.shape)} for batch {images.shape[0]}, "
                            f"expected {tuple(expected.shape)}")
            limit = 1e-4 * max(1.0, float(expected.abs().max()))
            if _max_diff(got, expected) > limit:
                _fail(what, f"ONNX Runtime output differs from PyTorch by {_max_diff(got, expected):.3g} "
                            f"(limit 1e-4 relative to the largest output, {limit:.3g})")


def check_head(factory: Callable[..., Any], *, num_classes: int = 10, batch_size: int = 6, **options: Any) -> None:
    """Build ``factory(**options)`` and check the head contract.

    ``head(cosine, labels, norms)`` returns finite (N, C) logits (loss elements for a head with
    ``elementwise_loss``) with finite gradients, also at cos = +-1 exactly, in float32, bfloat16 and
    float16; rows labelled -1 (class not among the columns) are accepted; eval mode is deterministic;
    a state-dict round trip reproduces the outputs. A head with ``configure`` is told ``num_classes``
    (and sample rate 1) first, as facecore's classifier does.
    """
    import torch

    what = f"head {_name(factory)}"
    if batch_size < 4 or num_classes < 4:
        raise ValueError("check_head needs batch_size >= 4 and num_classes >= 4")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = _configured(factory(**options), num_classes)
        cosine = torch.rand(batch_size, num_classes) * 2 - 1
        labels = torch.randint(0, num_classes, (batch_size,))
        labels[-1] = -1
        # Targets and non-targets exactly at the ends of the range.
        cosine[0, labels[0]], cosine[1, labels[1]] = 1.0, -1.0
        cosine[2, (labels[2] + 1) % num_classes], cosine[3, (labels[3] + 1) % num_classes] = 1.0, -1.0
        norms = torch.rand(batch_size, 1) * 30 + 1

        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            head.train()
            inp = cosine.detach().to(dtype).clone().requires_grad_(True)
            out = head(inp, labels, norms)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (batch_size, num_classes):
                found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                _fail(what, f"returned {found} for {dtype} input, expected shape {(batch_size, num_classes)}")
            if not bool(out.isfinite().all()):
                _fail(what, f"non-finite logits for {dtype} cosines that include +-1")
            (out.float() * torch.randn(out.shape)).sum().backward()
            if inp.grad is None or not bool(inp.grad.isfinite().all()):
                _fail(what, f"non-finite (or no) gradient for {dtype} cosines that include +-1")

        head.eval()
        with torch.no_grad():
            first, second = head(cosine, labels, norms), head(cosine, labels, norms)
        if not torch.equal(first, second):
            _fail(what, "eval mode is not deterministic")
        _check_round_trip(what, head, _configured(factory(**options), num_classes), (cosine, labels, norms), first)


def _configured(head: Any, num_classes: int) -> Any:
    """``head`` after the ``configure`` call facecore's classifier makes when it is built (if it has one)."""
    configure = getattr(head, "configure", None)
    if callable(configure):
        configure(num_classes=num_classes, sample_rate=1.0)
    return head
