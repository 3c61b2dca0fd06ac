"""Backbone weights from a published or earlier model, for fine-tuning, evaluation and export.

One place knows every file layout facecore reads backbone weights from: its own checkpoints,
bare state dicts (InsightFace's ``backbone.pth``), arcface_torch training checkpoints
(``state_dict_backbone``), Lightning checkpoints and AdaFace's ``.ckpt`` (IR layout, mapped
here onto InsightFace's iresnet layout for any depth). :func:`load_backbone` loads the weights
strictly and reports which tensors were loaded and which were skipped, and why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import CheckpointError, ConfigError
from .checkpoint import FORMAT, load_checkpoint

BN_EPS = 1e-5  # BatchNorm eps of InsightFace's iresnet and of AdaFace's IR (PyTorch's default)

# AdaFace's IR block is Sequential(BN, conv3x3, BN, PReLU, conv3x3(stride), BN) in ``res_layer`` and
# Sequential(conv1x1(stride), BN) in ``shortcut_layer``: the same operations, in the same order, as
# InsightFace's IBasicBlock, whose modules carry names.
ADAFACE_BLOCK = {"res_layer.0": "bn1", "res_layer.1": "conv1", "res_layer.2": "bn2", "res_layer.3": "prelu",
                 "res_layer.4": "conv2", "res_layer.5": "bn3", "shortcut_layer.0": "downsample.0",
                 "shortcut_layer.1": "downsample.1"}
# input_layer = (conv3x3, BN, PReLU); output_layer = (BN2d, Dropout, Flatten, Linear, BN1d without affine).
ADAFACE_OUTER = {"input_layer.0": "conv1", "input_layer.1": "bn1", "input_layer.2": "prelu",
                 "output_layer.0": "bn2", "output_layer.3": "fc", "output_layer.4": "features"}


@dataclass
class BackboneWeights:
    """Backbone tensors in facecore's layout, what the file was, and what in it goes unused."""

    path: Path
    source: str  # e.g. "an AdaFace IR checkpoint with [3, 4, 14, 3] blocks (mapped to the iresnet layout)"
    state: dict[str, Any]
    unused: dict[str, str] = field(default_factory=dict)  # a part of the file -> why it is not loaded
    saved_for: str = ""  # for facecore checkpoints: " (it was saved for backbone 'x' with embedding_size n)"


@dataclass
class LoadReport:
    """Which backbone tensors came from the file, and which did not and why."""

    path: Path
    source: str
    loaded: list[str]
    skipped: dict[str, str]  # backbone key -> reason it keeps its fresh initialisation
    unused: dict[str, str]  # part of the file -> reason it was not loaded

    def lines(self) -> list[str]:
        """Log lines: one summary, then one per group of skipped keys and per unused part of the file."""
        out = [f"initialised the backbone from {self.path} ({self.source}): loaded {len(self.loaded)} tensors "
               f"[{group_keys(self.loaded)}]"]
        by_reason: dict[str, list[str]] = {}
        for key, why in self.skipped.items():
            by_reason.setdefault(why, []).append(key)
        for why, keys in by_reason.items():
            out.append(f"kept freshly initialised, {why}: {len(keys)} tensors [{group_keys(keys)}]")
        for part, why in self.unused.items():
            out.append(f"not loaded from the file: {part} ({why})")
        return out


def group_keys(keys: Iterable[str]) -> str:
    """``conv1.weight, layer1.0.bn1.weight, ...`` -> ``conv1 (1), layer1 (1), ...``: tensors per top-level module."""
    counts: dict[str, int] = {}
    for key in keys:
        top = key.split(".", 1)[0]
        counts[top] = counts.get(top, 0) + 1
    return ", ".join(f"{name} ({n})" for name, n in counts.items())


def _is_tensor_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _not_a_state_dict(path: Path, obj: Any) -> CheckpointError:
    found = f"a dict with keys {list(obj)[:5]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    return CheckpointError(
        f"{path} holds neither a facecore checkpoint nor a state dict of tensors (found {found}). Pass a "
        "facecore run's last.pth/best.pth, a backbone's state_dict() saved with torch.save (e.g. InsightFace's "
        "backbone.pth), or an AdaFace .ckpt"
    )


def backbone_weights(obj: Any, path: str | Path = "checkpoint") -> BackboneWeights:
    """Find the backbone tensors in a loaded file and bring them into facecore's layout.

    Recognised: a facecore checkpoint (``backbone``; its classifier and optimizer stay
    unused), arcface_torch's training checkpoint (``state_dict_backbone``), a Lightning
    checkpoint (``state_dict``; with ``model.``/``head.`` keys, AdaFace's, only ``model.`` is
    the backbone), and a bare state dict. A ``module.`` prefix (DDP saves) is removed. State
    dicts in AdaFace's IR layout are mapped with :func:`adaface_to_iresnet`.
    """
    path = Path(path)
    unused: dict[str, str] = {}
    saved_for = ""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        state = obj.get("backbone")
        model = obj.get("config", {}).get("model", {}) if isinstance(obj.get("config"), dict) else {}
        source = f"facecore checkpoint of backbone '{model.get('backbone')}'"
        saved_for = f" (it was saved for backbone '{model.get('backbone')}' with embedding_size {model.get('embedding_size')})"
        if "classifier" in obj:
            unused["classifier"] = "class centers of the identities it was trained on; the classifier starts fresh"
        if "optimizer" in obj:
            unused["optimizer, scheduler, step"] = "training state; a fine-tune starts its own schedule"
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict_backbone"), dict):
        state, source = obj["state_dict_backbone"], "arcface_torch training checkpoint (state_dict_backbone)"
        if "state_dict_softmax_fc" in obj:
            unused["state_dict_softmax_fc"] = "class centers of the identities it was trained on; the classifier starts fresh"
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and not _is_tensor_dict(obj):
        state, source = obj["state_dict"], "Lightning checkpoint (state_dict)"
        if any(k.startswith("model.") for k in state):
            rest = sorted({k.split(".", 1)[0] for k in state if not k.startswith("model.")})
            for prefix in rest:
                what = "AdaFace's margin head and class centers" if prefix == "head" else "not part of the backbone"
                unused[f"state_dict['{prefix}.*']"] = f"{what}; the classifier starts fresh"
            state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    else:
        state, source = obj, "state dict"
    if not _is_tensor_dict(state):
        raise _not_a_state_dict(path, obj if state is obj else state)
    state = _strip(state, "module.")
    if is_adaface_layout(state):
        state, layers = adaface_to_iresnet(state, path)
        source = f"AdaFace IR with {layers} blocks, from a {source}, mapped to the iresnet layout"
    return BackboneWeights(path=path, source=source, state=state, unused=unused, saved_for=saved_for)


def is_adaface_layout(state: dict) -> bool:
    """True for a state dict of AdaFace's ``net.Backbone`` (input_layer / body.N / output_layer)."""
    return "input_layer.0.weight" in state and any(k.startswith("body.0.") for k in state)


def adaface_to_iresnet(state: dict, path: str | Path = "checkpoint") -> tuple[dict, list[int]]:
    """Map AdaFace IR weights (any depth of basic blocks: IR-18/34/50/100) to InsightFace's iresnet layout.

    Returns the new state dict and the blocks per stage. The two networks compute the same
    function in eval mode (``docs/finetuning.md`` gives the table); the differences are folded
    into the weights:

    - AdaFace feeds BGR images, facecore RGB: the stem conv's input channels are reversed.
    - AdaFace's body is one flat ``Sequential``; a block with a conv shortcut starts a new stage
      (stages 2-4, where the width doubles), which gives ``layer{s}.{i}`` for any depth.
    - The first block's shortcut is a strided identity in AdaFace (``MaxPool2d(1, 2)``, 64 -> 64
      channels) but a 1x1 conv + BN in iresnet: it gets an identity conv and a BN whose running
      statistics make it the identity in eval mode. In training mode that BN normalizes with
      batch statistics, the one difference that cannot be folded into weights.
    - The embedding BN has no affine parameters in AdaFace: scale 1 and shift 0 here (iresnet
      keeps the scale fixed at 1 anyway).
    """
    import torch

    path = Path(path)
    where = f"{path} looks like an AdaFace IR checkpoint, but"
    if any("se_block" in k for k in state):
        raise CheckpointError(f"{where} it is an IR-SE network (squeeze-excite blocks), which facecore's iresnet "
                              "layout does not have; use an IR (not IR-SE) model")
    if any(re.match(r"body\.\d+\.res_layer\.[6-9]\.", k) for k in state):
        raise CheckpointError(f"{where} it uses bottleneck blocks (AdaFace's IR-152/IR-200 layout), which facecore's "
                              "iresnet layout does not have; use an IR-18/34/50/100 model")
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.", k))})
    if blocks != list(range(len(blocks))):
        raise CheckpointError(f"{where} its body blocks are not numbered 0..n-1 (found {blocks[:8]}...): the file is damaged")
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    stage, index, layers = 1, -1, [0]
    for n in blocks:
        starts_stage = n > 0 and f"body.{n}.shortcut_layer.0.weight" in state
        if starts_stage:
            stage, index = stage + 1, 0
            layers.append(0)
        else:
            index += 1
        layers[-1] += 1
        prefix = f"body.{n}."
        for key in [k for k in state if k.startswith(prefix)]:
            module, _, leaf = key[len(prefix):].rpartition(".")
            if module not in ADAFACE_BLOCK:
                unmapped.append(key)
                continue
            out[f"layer{stage}.{index}.{ADAFACE_BLOCK[module]}.{leaf}"] = state[key]
        if n == 0 and "body.0.shortcut_layer.0.weight" not in state:
            channels = state["body.0.res_layer.0.weight"].shape[0]
            out.update(_identity_shortcut("layer1.0.downsample", channels))
    if len(layers) != 4:
        raise CheckpointError(f"{where} its body has {len(layers)} stages ({layers} blocks), not the 4 of an IR network")
    for key, value in state.items():
        if key.startswith("body."):
            continue
        module, _, leaf = key.rpartition(".")
        if module not in ADAFACE_OUTER:
            unmapped.append(key)
            continue
        if key == "input_layer.0.weight":
            value = value.flip(1)  # BGR -> RGB: the stem sees the colour channels in the other order
        out[f"{ADAFACE_OUTER[module]}.{leaf}"] = value
    if unmapped:
        raise CheckpointError(f"{where} {len(unmapped)} of its tensors have no place in the iresnet layout, e.g. "
                              f"{', '.join(unmapped[:3])}; is it a modified network?")
    if "features.running_mean" in out and "features.weight" not in out:  # BatchNorm1d(affine=False)
        size = out["features.running_mean"].shape[0]
        out["features.weight"] = torch.ones(size)
        out["features.bias"] = torch.zeros(size)
    return out, layers


def _identity_shortcut(prefix: str, channels: int) -> dict:
    """A 1x1 conv + BN (in eval mode) that passes its input through unchanged."""
    import torch

    return {
        f"{prefix}.0.weight": torch.eye(channels).reshape(channels, channels, 1, 1),
        f"{prefix}.1.weight": torch.ones(channels),
        f"{prefix}.1.bias": torch.zeros(channels),
        f"{prefix}.1.running_mean": torch.zeros(channels),
        # (x - 0) / sqrt(var + eps) = x: var = 1 - eps, computed in float64 before rounding
        f"{prefix}.1.running_var": torch.full((channels,), 1.0 - BN_EPS, dtype=torch.float64).float(),
        f"{prefix}.1.num_batches_tracked": torch.tensor(0),
    }


def _matches(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _some(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def load_backbone(backbone: Any, obj: Any, path: str | Path, backbone_name: str = "backbone",
                  skip: Iterable[str] = (), skip_key: str | None = None) -> LoadReport:
    """Load the backbone weights found in ``obj`` (a loaded file) into ``backbone``, strictly.

    Every backbone tensor must come from the file with its exact shape, except those under a
    prefix in ``skip`` (e.g. ``fc`` and ``features`` to change the embedding size): those keep
    their fresh initialisation. Anything else that does not fit -- a missing or extra tensor,
    a shape mismatch -- is a CheckpointError naming the keys; nothing is loaded then.
    ``skip_key`` is the config key that ``skip`` came from, for messages (fine-tuning).
    """
    weights = backbone_weights(obj, path)
    own = backbone.state_dict()
    skip = list(skip)
    idle = [p for p in skip if not any(_matches(k, p) for k in own)]
    if idle:
        tops = sorted({k.split(".", 1)[0] for k in own})
        raise ConfigError([f"{skip_key or 'skip'}: {', '.join(map(repr, idle))} matches no tensor of backbone '{backbone_name}' "
                           f"(its top-level modules: {', '.join(tops)})"])
    skipped = {k: f"{skip_key or 'skip'} lists '{p}'" for k in own for p in skip if _matches(k, p)}
    state = {k: v for k, v in weights.state.items() if k not in skipped}
    missing = [k for k in own if k not in state and k not in skipped]
    unexpected = [k for k in state if k not in own and not any(_matches(k, p) for p in skip)]
    shape = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shape:
        details = []
        if shape:
            k = shape[0]
            details.append(f"{len(shape)} shape mismatch(es): {_some(shape)}, e.g. {k}: file "
                           f"{tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        if missing:
            details.append(f"{len(missing)} key(s) missing from the file: {_some(missing)}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected key(s) in the file: {_some(unexpected)}")
        hint = ""
        if skip_key and shape and set(shape) <= {k for k in own if k.split(".", 1)[0] in {"fc", "features"}}:
            hint = (f". To change the embedding size, list the embedding layers in {skip_key} "
                    "(e.g. [fc, features]) so they start fresh")
        raise CheckpointError(
            f"{weights.path} ({weights.source}) does not fit the configured backbone "
            f"'{backbone_name}'{weights.saved_for}: " + "; ".join(details) + hint
        )
    backbone.load_state_dict({**own, **state}, strict=True)
    return LoadReport(path=weights.path, source=weights.source, loaded=[k for k in own if k in state],
                      skipped=skipped, unused=weights.unused)


def load_pretrained(backbone: Any, path: str | Path, backbone_name: str, skip: Iterable[str] = ()) -> LoadReport:
    """Read ``path`` safely (:func:`~facecore.core.checkpoint.load_checkpoint`) and :func:`load_backbone` it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.pretrained: {path} not found (give the path of a checkpoint or state dict)")
    return load_backbone(backbone, load_checkpoint(path), path, backbone_name, skip, skip_key="model.pretrained_skip")
