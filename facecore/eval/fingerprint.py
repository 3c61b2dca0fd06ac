"""The model fingerprint: one string that says whether two backbones give the same embeddings.

A gallery index stores it, so a gallery is never searched with another model's embeddings
(the scores would look plausible and be meaningless). It is the SHA-256 of the backbone's
configuration and of every tensor of its state dict, defined here and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Config keys of the model section that say how the weights were obtained, not what the network
# computes: the weights themselves are hashed.
_NOT_MODEL = ("pretrained", "pretrained_skip")
# BatchNorm's batch counter: eval mode never reads it, and it is no part of what the network computes.
_NOT_WEIGHTS = ("num_batches_tracked",)


def model_description(config: dict) -> dict:
    """The config that shapes a backbone's embeddings: the ``model`` section (backbone, embedding_size,
    the backbone's options) less the fine-tuning keys, and ``data.img_size`` (the input size)."""
    model = {k: v for k, v in config["model"].items() if k not in _NOT_MODEL}
    return {"model": model, "img_size": config["data"]["img_size"]}


def model_fingerprint(backbone: Any, config: dict) -> str:
    """``sha256:<hex>`` of :func:`model_description` (canonical JSON) and each state-dict tensor (name, dtype,
    shape, bytes, in name order), ``num_batches_tracked`` counters left out. Equal for the same weights on
    any device; different when one weight, the architecture or the input size differs."""
    import torch

    digest = hashlib.sha256()
    digest.update(json.dumps(model_description(config), sort_keys=True, separators=(",", ":")).encode())
    state = backbone.state_dict()
    for name in sorted(state):
        if name.rsplit(".", 1)[-1] in _NOT_WEIGHTS:
            continue
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


__all__ = ["model_description", "model_fingerprint"]
