"""Static int8 quantisation of an ONNX export with ONNX Runtime, calibrated on the user's own face images.

``facecore export --format onnx --quantize int8 --calibrate FILE.bin|DIR``: the float32 export
is pre-processed (ONNX Runtime's ``quant_pre_process``: shape inference, graph optimisation,
redundant nodes removed; BatchNorm after a convolution is already folded by the exporter), then
``quantize_static`` writes QDQ nodes around the convolutions and linear layers: weights int8 per
output channel, activations uint8 per tensor with ranges from the calibration images (MinMax).
ONNX Runtime fuses each DequantizeLinear -> Conv -> QuantizeLinear into one integer convolution
when the model is loaded.

Weights use the reduced range (7 bits, -64..63). On x86 CPUs with AVX2 but without VNNI, ONNX
Runtime's uint8 x int8 kernels add pairs of products in 16 bits (``vpmaddubsw``), which saturates
for 255 x 127 x 2; on the project's AMD EPYC (AVX2, no VNNI) that took the tiny test network's
int8-to-float32 cosine from 0.998 to 0.96. The reduced range cannot saturate, costs nothing in
speed there, and loses one bit of weight precision on CPUs with VNNI. Dynamic quantisation would touch MatMul/Gemm only, so it does nothing
for a convolutional network.

Calibration images are decoded and normalized exactly as evaluation feeds the model
(``data/images.py``). What stays float (PReLU, a BatchNorm before a convolution, the residual
Add) is listed by :func:`op_counts`, so the export can say what it did not quantise.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import DataError, FacecoreError

QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")  # the layers with weights; everything else stays float
CALIBRATION_IMAGES = 200  # default number of calibration images (evenly spaced over the set)
_BATCH = 16  # images per calibration batch
_SHAPE_OPS = {"QuantizeLinear", "DequantizeLinear", "Flatten", "Reshape", "Identity", "Shape", "Gather",
              "Unsqueeze", "Squeeze", "Concat", "Constant"}


@dataclass
class QuantizeReport:
    """What the int8 export did: per weighted op type (quantised, total), ops left float, agreement with float32."""

    calibration: str  # "<source>: N images"
    quantized: dict[str, tuple[int, int]]
    float_ops: dict[str, int]
    cosine_mean: float | None = None  # int8 vs float32 embeddings (flip-summed, normalized) on calibration images
    cosine_min: float | None = None
    compared: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def conv_share(self) -> float:
        done, total = self.quantized.get("Conv", (0, 0))
        return done / total if total else float("nan")

    def lines(self) -> list[str]:
        """The export's report, one line each."""
        parts = [f"{op} {done}/{total}" for op, (done, total) in self.quantized.items() if total]
        left = ", ".join(f"{op} x{n}" for op, n in sorted(self.float_ops.items(), key=lambda kv: -kv[1]))
        out = [f"int8 (QDQ; weights 7-bit per channel, activations uint8 per tensor) calibrated on {self.calibration}",
               f"quantised: {', '.join(parts) or 'nothing'} ({100 * self.conv_share:.0f}% of Conv nodes)",
               f"left in float: {left or 'nothing'}"]
        if self.cosine_mean is not None:
            out.append(f"int8 vs float32 on {self.compared} calibration images: cosine of embeddings mean "
                       f"{self.cosine_mean:.4f}, min {self.cosine_min:.4f}")
        return out + self.notes


def _image_files(root: Path) -> list[Path]:
    from ..data.images import IMAGE_EXTENSIONS

    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _spread(n: int, limit: int) -> list[int]:
    """``min(n, limit)`` indices spread evenly over range(n), so a set sorted by identity gives many identities."""
    if n <= limit:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, limit)})


def calibration_images(source: str | Path, img_size: int, limit: int = CALIBRATION_IMAGES) -> tuple[np.ndarray, str]:
    """Up to ``limit`` images of ``source`` as the model takes them: (N, 3, H, W) float32 in [-1, 1], and a label.

    ``source`` is a .bin pair set or a folder of aligned images (.jpg/.jpeg/.png, searched
    recursively, hidden entries skipped), taken evenly spaced. A missing or empty source, an image
    that does not decode or is not ``img_size`` x ``img_size``: DataError naming the file.
    """
    import torch

    from ..data.images import BadImageError, check_size, decode_chw, normalize

    path = Path(source)
    what = f"pass a .bin pair set or a folder of aligned {img_size}x{img_size} face images"
    if limit < 1:
        raise DataError(f"the number of calibration images must be at least 1, got {limit}")
    if path.is_dir():
        files = _image_files(path)
        if not files:
            raise DataError(f"calibration folder {path} has no .jpg/.jpeg/.png images: {what}")
        picked = [files[i] for i in _spread(len(files), limit)]
        items = [(str(f), f.read_bytes()) for f in picked]
        total = len(files)
    elif path.is_file():
        from ..data.binfile import load_bin
        from ..data.images import IMAGE_EXTENSIONS

        if path.suffix.lower() in IMAGE_EXTENSIONS:
            raise DataError(f"calibration set {path} is one image: {what} (many images of your data)")

        images, _ = load_bin(path)
        if not images:
            raise DataError(f"calibration set {path} holds no images: {what}")
        items = [(f"{path}: image {i}", images[i]) for i in _spread(len(images), limit)]
        total = len(images)
    else:
        raise DataError(f"calibration set not found: {path} ({what})")
    batch = []
    for where, data in items:
        try:
            chw = decode_chw(data)
        except BadImageError as exc:
            raise DataError(f"{where}: {exc}; fix or remove it, or calibrate on another set") from None
        if check_size(chw, img_size) is not None:
            raise DataError(f"{where}: the image is {chw.shape[2]}x{chw.shape[1]} but the model takes "
                            f"{img_size}x{img_size}: calibrate on aligned {img_size}x{img_size} crops of your data")
        batch.append(chw)
    label = f"{path}: {len(batch)} of {total} images" if len(batch) < total else f"{path}: {len(batch)} images"
    return normalize(torch.stack(batch)).numpy(), label


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """ONNX Runtime's quantisation tools log advice through the root logger; keep the CLI's output ours."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(fp32_path: Path, out_path: Path, images: np.ndarray, *, per_channel: bool = True,
                  work_dir: Path | None = None) -> None:
    """Write the static int8 (QDQ) quantisation of the ONNX model ``fp32_path`` to ``out_path``.

    Ranges of activations from ``images`` (MinMax over all of them); weights of Conv, Gemm and
    MatMul int8 in the reduced 7-bit range (per output channel when ``per_channel``), activations
    uint8 (the form ONNX Runtime's x86 kernels are made for).
    """
    try:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                              QuantType, quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ModuleNotFoundError:
        raise FacecoreError("int8 quantisation needs onnxruntime: pip install 'facecore[onnx]'") from None

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, len(images), _BATCH))

        def get_next(self) -> dict | None:
            start = next(self.starts, None)
            return None if start is None else {"images": images[start : start + _BATCH]}

    work = work_dir or out_path.parent
    prepared = work / "prepared.onnx"
    with _quiet_logging():
        # Symbolic shape inference is for dynamic shapes (transformers); ONNX's own suffices here and is faster.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out_path), Batches(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OPS), per_channel=per_channel, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    prepared.unlink(missing_ok=True)


def op_counts(path: str | Path) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    """Of a QDQ model: per op type of QUANTIZED_OPS (nodes whose data and weight inputs are dequantized, all
    nodes), and the count per type of the compute nodes left in float."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    quantized: dict[str, list[int]] = {op: [0, 0] for op in QUANTIZED_OPS}
    left: Counter[str] = Counter()
    for node in graph.node:
        if node.op_type in QUANTIZED_OPS:
            quantized[node.op_type][1] += 1
            if len(node.input) >= 2 and all(producer.get(i) == "DequantizeLinear" for i in node.input[:2]):
                quantized[node.op_type][0] += 1
                continue
        if node.op_type not in _SHAPE_OPS:
            left[node.op_type] += 1
    return {op: (d, t) for op, (d, t) in quantized.items()}, dict(left)


def agreement(fp32_path: Path, int8_path: Path, images: np.ndarray, limit: int = 64) -> tuple[float, float, int]:
    """Mean and min cosine between the two models' flip-summed embeddings of up to ``limit`` of ``images``."""
    import onnxruntime as ort

    x = images[: min(limit, len(images))]
    x2 = np.concatenate([x, x[:, :, :, ::-1]])

    def embed(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = np.concatenate([session.run(None, {"images": np.ascontiguousarray(x2[i : i + _BATCH])})[0]
                              for i in range(0, len(x2), _BATCH)]).astype(np.float64)
        e = out[: len(x)] + out[len(x) :]
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)

    cos = np.sum(embed(fp32_path) * embed(int8_path), axis=1)
    return float(cos.mean()), float(cos.min()), len(x)


def export_int8(backbone: Any, path: str | Path, images: np.ndarray, calibration: str, *, img_size: int = 112,
                check: bool = True, metadata: dict[str, str] | None = None,
                per_channel: bool = True) -> tuple[float | None, QuantizeReport]:
    """Export ``backbone`` to ONNX, quantise it to int8 on ``images`` and write it to ``path`` with ``metadata``.

    Returns the float32 export's max abs difference to PyTorch (None without ``check``) and the
    :class:`QuantizeReport`. Everything is staged beside ``path``: a failure writes nothing.
    """
    import os

    from .export import OPSET, set_metadata, staging, write_onnx

    path = Path(path)
    with staging(path) as tmp:
        fp32 = tmp / "float32.onnx"
        diff = write_onnx(backbone, fp32, img_size, OPSET, check, None, shown_as=path)
        staged = tmp / path.name
        quantize_int8(fp32, staged, images, per_channel=per_channel, work_dir=tmp)
        quantized, float_ops = op_counts(staged)
        report = QuantizeReport(calibration, quantized, float_ops)
        if check:
            report.cosine_mean, report.cosine_min, report.compared = agreement(fp32, staged, images)
        if metadata:
            set_metadata(staged, metadata)
        os.replace(staged, path)
    return diff, report


__all__ = ["CALIBRATION_IMAGES", "QUANTIZED_OPS", "QuantizeReport", "agreement", "calibration_images",
           "export_int8", "op_counts", "quantize_int8"]
