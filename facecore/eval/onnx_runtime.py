"""A facecore ONNX export run by ONNX Runtime: what ``eval --onnx`` and ``Predictor(onnx_path=...)`` embed with.

An export carries its description as ONNX metadata (``metadata_props``, keys ``facecore.*``):
the facecore version, backbone, embedding size, input size and normalisation, whether it is
quantised, the effective config and the validation threshold. A file without them is not taken
for a facecore export. NumPy and onnxruntime only: importing this module never imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, FacecoreError

PREFIX = "facecore."
# The keys every facecore export has; the rest (config, threshold, calibration) are optional.
REQUIRED_KEYS = ("version", "backbone", "embedding_size", "img_size", "input", "quantized")


def metadata(config: dict, *, quantized: str = "no", threshold: float | None = None,
             extra: dict[str, str] | None = None) -> dict[str, str]:
    """The ``facecore.*`` metadata of an export of a model trained with ``config``.

    ``quantized``: "no" or the scheme ("int8 ..."); ``threshold``: the cosine threshold of the
    checkpoint's validation (``Predictor.is_same``); ``extra``: more keys (prefixed here).
    """
    from .. import __version__
    from ..data.pixels import INPUT_DESCRIPTION

    out = {
        "version": __version__,
        "backbone": str(config["model"]["backbone"]),
        "embedding_size": str(config["model"]["embedding_size"]),
        "img_size": str(config["data"]["img_size"]),
        "input": INPUT_DESCRIPTION,
        "output": "embeddings (N, D) float32, not normalized: add the mirrored image's, then L2-normalize",
        "quantized": quantized,
        "config": json.dumps(config, sort_keys=True),
    }
    if threshold is not None:
        out["threshold"] = repr(float(threshold))
    out.update(extra or {})
    return {PREFIX + k: v for k, v in out.items()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class OnnxModel:
    """A facecore ONNX export in an ONNX Runtime session on the CPU: float batches in, embeddings out.

    ``OnnxModel(path, threads=None)``; a missing file, a file ONNX Runtime cannot load and an ONNX
    model without facecore's metadata are each a DataError naming the file. Calling it on an
    (N, 3, H, W) float batch in [-1, 1] (a NumPy array, or a torch tensor during ``facecore eval``)
    returns the (N, D) embeddings of the same kind.
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"ONNX model not found: {self.path}")
        try:
            import onnxruntime as ort
        except ModuleNotFoundError:
            raise FacecoreError("running an ONNX model needs onnxruntime: pip install 'facecore[onnx]'") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT warns about initializers it could fold
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf/... types
            raise DataError(f"{self.path} is not an ONNX model ONNX Runtime can load ({_first_line(exc)}); "
                            "pass a file written by 'facecore export --format onnx'") from None
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
        missing = [k for k in REQUIRED_KEYS if k not in self.metadata]
        inputs = self.session.get_inputs()
        if missing or len(inputs) != 1 or len(inputs[0].shape) != 4:
            what = f"no facecore.{', facecore.'.join(missing)} metadata" if missing else "not one 4-D image input"
            raise DataError(f"{self.path} is not a facecore export ({what}); export a checkpoint with "
                            "'facecore export --checkpoint best.pth --format onnx --output model.onnx'")
        self.input_name = inputs[0].name
        try:
            self.embedding_size = int(self.metadata["embedding_size"])
            self.img_size = int(self.metadata["img_size"])
            self.threshold = float(self.metadata["threshold"]) if "threshold" in self.metadata else None
            self.config: dict | None = json.loads(self.metadata["config"]) if "config" in self.metadata else None
        except (ValueError, TypeError) as exc:
            raise DataError(f"{self.path}: its facecore metadata is damaged ({exc}); export the model again") from None
        self.backbone: str = self.metadata["backbone"]
        self.quantized: str = self.metadata["quantized"]

    @property
    def precision(self) -> str:
        """``float32``, or the first word of the quantisation scheme (``int8``)."""
        return "float32" if self.quantized == "no" else self.quantized.split()[0]

    @property
    def describe(self) -> str:
        """One line: backbone, precision, input size, embedding size."""
        return (f"{self.path} ({self.backbone}, {self.precision}, input {self.img_size}x{self.img_size}, "
                f"embedding size {self.embedding_size}, ONNX Runtime CPU)")

    def run(self, images: np.ndarray) -> np.ndarray:
        """Embeddings (N, D) float32 of an (N, 3, H, W) float32 batch in [-1, 1]."""
        x = np.ascontiguousarray(images, dtype=np.float32)
        return self.session.run(None, {self.input_name: x})[0]

    def __call__(self, images: Any) -> Any:
        """:meth:`run` for a NumPy batch, or for a torch tensor (returned as a tensor on its device)."""
        if isinstance(images, np.ndarray):
            return self.run(images)
        import torch  # only reached when the caller already works with torch tensors

        out = self.run(images.detach().float().cpu().numpy())
        return torch.from_numpy(out).to(images.device)


__all__ = ["OnnxModel", "PREFIX", "REQUIRED_KEYS", "metadata"]
