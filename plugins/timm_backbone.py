"""The ``timm`` backbone: any model of timm (pytorch-image-models) as a face backbone.

``model: {backbone: timm, model_name: convnext_atto}`` builds the timm model without its
classifier (``num_classes=0``: pooled features), at 112x112 where the model takes an image
size (ViTs and other fixed-grid models), and adds the face embedding: dropout -> Linear ->
BatchNorm1d. Images arrive in [-1, 1] and are moved to the mean and std the timm model was
pretrained with.

timm is an optional dependency (``pip install 'facecore[timm]'``). This module does not import
it, so the backbone is always listed, and choosing it without timm installed is a config
error that says how to install it; timm is imported only when a model is built.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from facecore import hookimpl
from facecore.errors import ConfigError

INPUT_SIZE = 112
INSTALL_HINT = "pip install 'facecore[timm]'"

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["model_name"],
    "properties": {
        "model_name": {
            "type": "string",
            "minLength": 1,
            "description": "A timm model name (timm.list_models()), e.g. convnext_atto or vit_small_patch16_224.",
        },
        "timm_pretrained": {
            "type": "boolean",
            "default": False,
            "description": "Start from timm's own (ImageNet) weights, downloaded from the Hugging Face Hub "
                           "or its local cache; model.pretrained loads face weights instead.",
        },
        "dropout": {
            "type": "number",
            "minimum": 0,
            "exclusiveMaximum": 1,
            "default": 0.0,
            "description": "Dropout on the pooled features before the embedding layer.",
        },
        "drop_path": {
            "type": "number",
            "minimum": 0,
            "exclusiveMaximum": 1,
            "default": 0.0,
            "description": "Stochastic depth rate passed to timm as drop_path_rate (models that have it); 0 is off.",
        },
    },
}


def _import_timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise ConfigError(
            [f"model.backbone: 'timm' needs the timm package, which cannot be imported ({exc}); "
             f"install it with: {INSTALL_HINT}"]
        ) from None
    return timm


def _unknown_name(timm: Any, name: str) -> ConfigError:
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else "no close match"
    pattern = name.split("_")[0] + "*"
    return ConfigError(
        [f"model.model_name: timm has no model '{name}' ({hint}); "
         f"python -c \"import timm; print(timm.list_models('{pattern}'))\" lists the names that start alike"]
    )


def _create(timm: Any, name: str, pretrained: bool, drop_path: float) -> nn.Module:
    """timm.create_model without a classifier, asking for 112x112 input where the model has an image size."""
    kwargs: dict[str, Any] = {"num_classes": 0, "pretrained": pretrained}
    if drop_path > 0:  # unset options stay out, so models without stochastic depth build too
        kwargs["drop_path_rate"] = drop_path
    try:
        try:
            return timm.create_model(name, img_size=INPUT_SIZE, **kwargs)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
            return timm.create_model(name, **kwargs)  # a model whose size is not fixed (most CNNs)
    except TypeError as exc:
        if "drop_path_rate" in str(exc):
            raise ConfigError([f"model.drop_path: timm model '{name}' has no stochastic depth; set drop_path: 0"]
                              ) from None
        raise ConfigError([f"model.model_name: timm could not build '{name}': {exc}"]) from None
    except Exception as exc:
        if pretrained:
            raise ConfigError(
                [f"model.timm_pretrained: could not get timm's pretrained weights for '{name}' "
                 f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); they come from the "
                 "Hugging Face Hub or its local cache. Set timm_pretrained: false to start from random weights"]
            ) from None
        raise ConfigError([f"model.model_name: timm could not build '{name}': {type(exc).__name__}: {exc}"]) from None


class TimmFace(nn.Module):
    """A timm trunk (pooled features) -> dropout -> Linear (no bias) -> BatchNorm1d: (N,3,112,112) -> (N, D)."""

    def __init__(self, trunk: nn.Module, features: int, embedding_size: int, dropout: float,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.trunk = trunk
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(features, embedding_size, bias=False)  # BN1d follows: a bias would be redundant
        self.features = nn.BatchNorm1d(embedding_size)
        # [-1, 1] -> [0, 1] -> the trunk's normalisation, as one affine map; not saved (derived from model_name)
        scale = torch.tensor([0.5 / s for s in std]).view(1, 3, 1, 1)
        shift = torch.tensor([(0.5 - m) / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.trunk(x * self.input_scale + self.input_shift)
        return self.features(self.fc(self.dropout(pooled.flatten(1))))


def timm_backbone(embedding_size: int = 512, *, model_name: str, timm_pretrained: bool = False,
                  dropout: float = 0.0, drop_path: float = 0.0) -> TimmFace:
    """Wrap the timm model ``model_name`` as a face backbone; ConfigError when timm or the name is missing."""
    timm = _import_timm()
    if not timm.is_model(model_name):
        raise _unknown_name(timm, model_name)
    trunk = _create(timm, model_name, timm_pretrained, drop_path)
    cfg = getattr(trunk, "pretrained_cfg", None) or {}
    mean, std = tuple(cfg.get("mean", (0.5, 0.5, 0.5))), tuple(cfg.get("std", (0.5, 0.5, 0.5)))
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError([f"model.model_name: timm model '{model_name}' does not take 3-channel RGB images"])
    was_training = trunk.training
    trunk.eval()
    try:
        with torch.no_grad():  # one probe image: is 112x112 accepted, and how wide are the pooled features?
            probe = trunk(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE))
    except Exception as exc:
        raise ConfigError(
            [f"model.model_name: timm model '{model_name}' cannot take 112x112 faces "
             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); choose another model"]
        ) from None
    trunk.train(was_training)
    if probe.dim() != 2:
        raise ConfigError([f"model.model_name: timm model '{model_name}' gives features of shape "
                           f"{tuple(probe.shape)} without its classifier, not pooled vectors"])
    return TimmFace(trunk, probe.shape[1], embedding_size, dropout, mean, std)


@hookimpl
def register_backbones(register):
    register(
        "timm",
        timm_backbone,
        schema=SCHEMA,
        description=f"any timm model by model_name, plus a Linear + BN embedding (needs: {INSTALL_HINT})",
    )
