"""Export a trained backbone to ONNX (dynamic batch, opset 17) or TorchScript, checked against PyTorch.

The exported graph is the bare backbone: input ``images`` (N, 3, H, W) float32 RGB in [-1, 1],
output ``embeddings`` (N, D), not normalized; flip-summing and L2 normalization are the caller's.
An ONNX export carries ``facecore.*`` metadata (eval/onnx_runtime.py reads it). Every file is
written under a temporary name beside the output and renamed when complete and checked, so a
failed export leaves nothing behind and an existing file stays as it was.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

from ..errors import FacecoreError

# Max abs difference allowed between the export and PyTorch in fp32, per unit of output scale:
# the limit is TOLERANCE * max(1, max |output|), since fp32 rounding grows with the values (an
# untrained network's embeddings reach ~1e3, where PyTorch itself differs from fp64 by ~3e-3).
TOLERANCE = 1e-4
OPSET = 17


def _sample(batch: int, img_size: int, seed: int) -> Any:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, img_size, img_size, generator=gen) * 2 - 1


def _reference(backbone: Any, x: Any) -> Any:
    import torch

    with torch.no_grad():
        return backbone(x).float().numpy()


def _compare(got: Any, want: Any, what: str, path: Path) -> float:
    import numpy as np

    if got.shape != want.shape:
        raise FacecoreError(f"{what} export {path} gives shape {got.shape}, PyTorch gives {want.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - want)))
    limit = check_limit(want)
    if not diff <= limit:
        raise FacecoreError(
            f"{what} export {path} differs from the PyTorch model by {diff:.3g} (max abs; allowed "
            f"{limit:.3g} = {TOLERANCE:g} x max(1, max |output|)); the backbone may use an operation "
            "the exporter does not translate faithfully"
        )
    return diff


def check_limit(reference: Any) -> float:
    """The allowed max abs difference for outputs like ``reference``: TOLERANCE x max(1, max |value|)."""
    import numpy as np

    return TOLERANCE * max(1.0, float(np.max(np.abs(reference))) if reference.size else 1.0)


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


@contextlib.contextmanager
def staging(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``path`` (same file system, so the final rename is atomic), removed afterwards."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        yield Path(tmp)


def set_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    """Add ``metadata`` to the ``metadata_props`` of the ONNX model at ``path`` (rewritten in place)."""
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update(metadata)
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))


def export_onnx(
    backbone: Any, path: str | Path, img_size: int = 112, opset: int = OPSET, check: bool = True,
    metadata: dict[str, str] | None = None,
) -> float | None:
    """Write ``backbone`` (CPU, eval mode) as ONNX with a dynamic batch axis and ``metadata`` (see onnx_runtime).

    Returns the max abs difference to PyTorch on a random batch of another size than the one
    traced (which also proves the batch axis is dynamic), or None when onnxruntime is missing
    or ``check`` is False. A difference above 1e-4 (scaled by the outputs' magnitude when it
    exceeds 1, see TOLERANCE) raises FacecoreError and writes nothing.
    """
    path = Path(path)
    with staging(path) as tmp:
        diff = write_onnx(backbone, tmp / path.name, img_size, opset, check, metadata, shown_as=path)
        os.replace(tmp / path.name, path)
    return diff


def write_onnx(backbone: Any, path: Path, img_size: int, opset: int, check: bool, metadata: dict[str, str] | None,
               shown_as: Path | None = None) -> float | None:
    """:func:`export_onnx` without the staging: writes ``path`` directly (errors name ``shown_as``)."""
    import torch

    backbone = backbone.cpu().eval()
    try:
        with warnings.catch_warnings():  # the TorchScript-based exporter warns it is legacy
            warnings.simplefilter("ignore")
            torch.onnx.export(
                backbone,
                (_sample(2, img_size, 0),),
                str(path),
                dynamo=False,  # the torch.export-based exporter needs onnxscript, not a dependency
                opset_version=opset,
                input_names=["images"],
                output_names=["embeddings"],
                dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
            )
    except ModuleNotFoundError as exc:
        raise FacecoreError(f"ONNX export needs the '{exc.name}' package: pip install 'facecore[onnx]'") from None
    if metadata:
        set_metadata(path, metadata)
    if not check or not onnxruntime_available():
        return None
    import onnxruntime as ort

    x = _sample(3, img_size, 1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    return _compare(got, _reference(backbone, x), "ONNX", shown_as or path)


def export_torchscript(backbone: Any, path: str | Path, img_size: int = 112, check: bool = True) -> float | None:
    """Write ``backbone`` as a traced TorchScript module; returns the max abs difference on a new batch."""
    import torch

    path = Path(path)
    backbone = backbone.cpu().eval()
    with staging(path) as tmp, warnings.catch_warnings():  # torch.jit is marked deprecated but still works
        warnings.simplefilter("ignore")
        staged = tmp / path.name
        with torch.no_grad():
            traced = torch.jit.trace(backbone, _sample(2, img_size, 0))
        traced.save(str(staged))
        diff = None
        if check:
            loaded = torch.jit.load(str(staged), map_location="cpu")
            x = _sample(3, img_size, 1)
            with torch.no_grad():
                got = loaded(x).float().numpy()
            diff = _compare(got, _reference(backbone, x), "TorchScript", path)
        os.replace(staged, path)
    return diff


FORMATS = {"onnx": export_onnx, "torchscript": export_torchscript}


def export_backbone(
    backbone: Any, path: str | Path, fmt: str = "onnx", img_size: int = 112, check: bool = True,
    metadata: dict[str, str] | None = None,
) -> float | None:
    """Export in ``fmt`` (``onnx`` or ``torchscript``); see :func:`export_onnx` (``metadata``: ONNX only)."""
    if fmt not in FORMATS:
        raise FacecoreError(f"unknown export format '{fmt}': choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        return export_onnx(backbone, path, img_size=img_size, check=check, metadata=metadata)
    return FORMATS[fmt](backbone, path, img_size=img_size, check=check)


__all__ = [
    "OPSET",
    "TOLERANCE",
    "check_limit",
    "export_backbone",
    "export_onnx",
    "export_torchscript",
    "onnxruntime_available",
    "set_metadata",
    "staging",
    "write_onnx",
]
