"""Inference with a trained backbone: embeddings, similarity and same/different decisions for face images.

Inputs are aligned face crops (112x112 by default; other sizes are resized with a warning) given
as file paths, PIL images or HWC uint8 RGB arrays. Embeddings follow the evaluation protocol:
the image's and its mirror's embeddings are summed, then L2-normalized.

``Predictor(onnx_path=...)`` runs a facecore ONNX export with ONNX Runtime and never imports
torch: images go through Pillow and NumPy (``data/pixels.py``), the model through onnxruntime.
"""

from __future__ import annotations

import math
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import CheckpointError, FacecoreError
from .evaluation import embed as embed_pass
from .evaluation import l2_normalize, load_trained_backbone, resolve_device


def to_cosine(value: float, kind: str) -> float:
    """A metric's decision threshold as a cosine similarity: ``squared_l2`` d between unit vectors is 1 - d / 2."""
    if kind == "squared_l2":
        return 1.0 - value / 2.0
    if kind == "cosine":
        return value
    raise FacecoreError(f"unknown threshold kind '{kind}': a metric declares 'squared_l2' or 'cosine'")


def threshold_from_checkpoint(ckpt: Any, config: dict) -> float | None:
    """Cosine threshold from the validation results stored in a facecore checkpoint, or None.

    Which result is a threshold, and of what, is declared by the configured metric that reports
    one (``threshold={"key": ..., "kind": ...}`` at registration); the mean over the validation sets.
    """
    from ..core.build import metric_threshold

    metrics = ckpt.get("val_metrics") if isinstance(ckpt, dict) else None
    declared = metric_threshold(config)
    if not isinstance(metrics, dict) or declared is None:
        return None
    key = declared["key"]
    found = [
        float(v[key])
        for v in metrics.values()
        if isinstance(v, dict) and isinstance(v.get(key), (int, float)) and math.isfinite(v[key])
    ]
    if not found:
        return None
    return float(np.mean([to_cosine(d, declared.get("kind", "cosine")) for d in found]))


def _is_single(x: Any) -> bool:
    if isinstance(x, (str, os.PathLike, bytes, bytearray, memoryview)):
        return True
    if hasattr(x, "ndim") and hasattr(x, "shape"):  # numpy array or torch tensor
        return x.ndim in (2, 3)  # one HW/HWC array or CHW uint8 tensor; 4-D is a batch
    return type(x).__module__.startswith("PIL.")


class Predictor:
    """A trained backbone ready for face comparison.

    ``Predictor(config_path=None, checkpoint_path="best.pth", use_cpu=False)``: the config defaults
    to the one stored in the checkpoint; a bare state dict (InsightFace ``backbone.pth``) needs one.
    ``Predictor(onnx_path="model.onnx")``: a ``facecore export`` (float32 or int8) on ONNX Runtime's
    CPU provider, without torch; its size, config and threshold come from the model's metadata.
    """

    def __init__(
        self,
        config_path: str | Path | None = None,
        checkpoint_path: str | Path | None = None,
        use_cpu: bool = False,
        *,
        device: str | None = None,
        overrides: Sequence[str] = (),
        batch_size: int = 64,
        onnx_path: str | Path | None = None,
        threads: int | None = None,
    ):
        self.batch_size = batch_size
        self.onnx: Any = None  # the OnnxModel when onnx_path is given
        if onnx_path is not None:
            if checkpoint_path is not None or config_path is not None or overrides:
                raise FacecoreError("Predictor takes onnx_path= alone: the export carries its own size, config and "
                                    "threshold (leave checkpoint_path, config_path and overrides out)")
            self._init_onnx(onnx_path, threads)
            return
        import torch

        if checkpoint_path is None:
            raise CheckpointError("Predictor needs checkpoint_path= (best.pth, last.pth or a backbone state dict) "
                                  "or onnx_path= (a facecore ONNX export)")
        if device and not use_cpu:
            resolve_device(device)  # fail before reading the checkpoint
        backbone, config, ckpt = load_trained_backbone(checkpoint_path, config_path, overrides)
        self.checkpoint_path = Path(checkpoint_path)
        self.device = torch.device("cpu") if use_cpu else resolve_device(device or config["device"])
        self.backbone = backbone.to(self.device).eval()
        self.config = config
        self.img_size: int = config["data"]["img_size"]
        # Cosine threshold from the checkpoint's validation results (None if absent); see is_same.
        self.threshold: float | None = threshold_from_checkpoint(ckpt, config)

    def _init_onnx(self, path: str | Path, threads: int | None) -> None:
        from .onnx_runtime import OnnxModel

        self.onnx = OnnxModel(path, threads=threads)
        self.backbone = None
        self.device = "cpu"
        self.config = self.onnx.config
        self.img_size = self.onnx.img_size
        self.threshold = self.onnx.threshold  # stored at export from the checkpoint's validation

    def _embed_onnx(self, items: list) -> np.ndarray:
        """Flip-summed embeddings through ONNX Runtime: Pillow/NumPy decoding, the image and its mirror in one batch."""
        from ..data.pixels import model_input, rgb_array

        out = []
        for i in range(0, len(items), self.batch_size):
            x = model_input(np.stack([rgb_array(item, self.img_size) for item in items[i : i + self.batch_size]]))
            feats = self.onnx.run(np.concatenate([x, x[:, :, :, ::-1]]))
            out.append(feats[: len(x)] + feats[len(x) :])
        return np.concatenate(out)

    def _tensor(self, image: Any) -> Any:
        from ..data.images import load_image

        return load_image(image, img_size=self.img_size)

    def embed(self, images: Any) -> np.ndarray:
        """L2-normalized flip-summed embeddings (N, D) float32 of one image or a sequence of images.

        Images: paths, encoded bytes, PIL images, HWC uint8 RGB arrays, (3, H, W) uint8 tensors,
        or a batch of them: a list, an (N, H, W, 3) uint8 array or an (N, 3, H, W) uint8 tensor.
        """
        items = [images] if _is_single(images) else list(images)
        if not items:
            raise FacecoreError("Predictor.embed got no images")
        if self.onnx is not None:
            return l2_normalize(self._embed_onnx(items)).astype(np.float32)
        tensors = [self._tensor(x) for x in items]
        plain, mirrored = embed_pass(self.backbone, tensors, self.batch_size, self.device)
        return l2_normalize(plain + mirrored).astype(np.float32)

    def predict(self, a: Any, b: Any) -> float:
        """Cosine similarity in [-1, 1] of two face images (higher: more likely the same person)."""
        e = self.embed([a, b]).astype(np.float64)
        return float(np.dot(e[0], e[1]))

    def is_same(self, a: Any, b: Any, threshold: float | None = None) -> bool:
        """True when the similarity is above ``threshold`` (default: the stored validation threshold).

        Strictly above, as the verification metric calls a pair "same" when distance < threshold.
        """
        thr = self.threshold if threshold is None else threshold
        if thr is None:
            raise FacecoreError(
                "no threshold: this checkpoint holds no validation best_threshold; pass threshold= "
                "(a cosine similarity, e.g. 0.3)"
            )
        return self.predict(a, b) > thr

    @cached_property
    def fingerprint(self) -> str:
        """The model's fingerprint (weights + backbone config): what a gallery index is checked against."""
        from .fingerprint import model_fingerprint

        return model_fingerprint(self.backbone, self.config)

    @property
    def model_description(self) -> dict:
        """The backbone config that shapes the embeddings (see :mod:`facecore.eval.fingerprint`)."""
        from .fingerprint import model_description

        return model_description(self.config)

    def identify(self, images: Any, index: Any, *, fpir: float = 1e-3, top_k: int = 5,
                 search: str = "exact") -> list:
        """Who each face is in a gallery index (a ``.fcidx`` path or a loaded GalleryIndex).

        Returns one :class:`~facecore.eval.gallery_index.Identification` per image: the ``top_k`` gallery
        rows with their cosine scores, and ``known`` / ``identity`` at the index's calibrated threshold for
        ``fpir`` (None with a ``note`` when the index is uncalibrated or that FPIR not measurable). An index
        built with another model is refused.
        """
        from .gallery_index import GalleryIndex, load_index

        if not isinstance(index, GalleryIndex):
            index = load_index(index)
        index.check_model(self.fingerprint, self.model_description, str(self.checkpoint_path))
        return index.identify(self.embed(images), fpir=fpir, top_k=top_k, method=search)


__all__ = ["Predictor", "threshold_from_checkpoint"]
