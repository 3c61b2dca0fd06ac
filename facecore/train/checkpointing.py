"""Training checkpoints: what goes in, how sharded state is gathered and split again, how a run resumes.

A checkpoint does not depend on the number of ranks: the class centers and their optimizer
statistics are saved as whole matrices (gathered from every shard) and split again on load, and
every rank's random state is kept. Gathering is a collective, so :meth:`TrainingCheckpoint.gather`
runs on every rank and only rank 0 writes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..core.checkpoint import load_checkpoint, save_checkpoint, save_numbered
from ..core.pretrained import load_backbone
from ..core.runtime import DistInfo, capture_rng_all_ranks, decided_on_main, reseed_for_rank, restore_rng
from ..errors import CheckpointError
from .distill import restore_distill


@dataclass
class TrainState:
    """Where training stands; all of it goes into the checkpoint."""

    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of ``epoch`` already trained on
    step: int = 0  # optimizer steps so far
    best: float | None = None  # the best value of checkpoint.best_metric so far
    val_metrics: dict = field(default_factory=dict)
    skipped_images: int = 0
    loggers: dict = field(default_factory=dict)  # what each logger's start() returned (tracker run ids): rank 0's


@dataclass
class TrainingCheckpoint:
    """Writes and restores the parts of a run. ``sharded``: the classifier holds a slice of the centers."""

    config: dict
    backbone: nn.Module
    classifier: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    info: DistInfo
    sharded: bool
    logger: logging.Logger
    distill: Any = None  # the run's Distiller (training.distill): its part of the checkpoint, checked at resume

    # -- the class centers among the optimizer's parameters ---------------------------------------
    def center_index(self) -> int:
        """Position of the class-center weight in the optimizer's state (found by identity, not place)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for i, p in enumerate(params):
            if p is self.classifier.weight:
                return i
        raise CheckpointError("the optimizer does not hold the class centers (classifier.weight)")

    def _optimizer_state(self) -> dict:
        """The optimizer state with the centers' statistics as full matrices (a collective when sharded)."""
        state = self.optimizer.state_dict()
        index = self.center_index()
        if self.sharded and index in state["state"]:
            center = dict(state["state"][index])  # a copy: state_dict() shares the live per-parameter dicts
            for key in sorted(center):  # the same order on every rank: full_rows is a collective
                value = center[key]
                if isinstance(value, torch.Tensor) and value.shape == self.classifier.weight.shape:
                    center[key] = self.classifier.full_rows(value)
            state = {**state, "state": {**state["state"], index: center}}
        return state

    def _load_optimizer_state(self, state: dict) -> None:
        saved, own = len(state["param_groups"]), len(self.optimizer.param_groups)
        if saved != own:
            raise CheckpointError(
                f"the optimizer state in the checkpoint has {saved} param group(s) but this config makes {own}: "
                "training.backbone_lr_mult gives the backbone its own group unless it is 1; resume with the "
                "value the run was started with"
            )
        index = self.center_index()
        if self.sharded and index in state["state"]:
            center = {k: self.classifier.local_rows(v) if isinstance(v, torch.Tensor) and v.dim() == 2 else v
                      for k, v in state["state"][index].items()}
            state = {**state, "state": {**state["state"], index: center}}
        self.optimizer.load_state_dict(state)

    # -- save ---------------------------------------------------------------------------------------
    def gather(self, state: TrainState) -> dict | None:
        """The checkpoint as a dict on rank 0 (None on the others). A collective: call it on every rank."""
        classifier = self.classifier.full_state_dict() if self.sharded else self.classifier.state_dict()
        optimizer = self._optimizer_state()
        rngs = capture_rng_all_ranks(self.info.world_size)
        if not self.info.is_main:
            return None
        best = self.config["checkpoint"]["best_metric"]
        return {
            "facecore_version": __version__,
            "config": self.config,
            "backbone": self.backbone.state_dict(),
            "classifier": classifier,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "step": state.step,
            "rng": rngs[0],  # rank 0's, as checkpoints before per-rank states had it
            "rng_per_rank": rngs,
            "best_metric": {"key": best["key"], "mode": best["mode"], "value": state.best},
            "val_metrics": state.val_metrics,
            "world_size": self.info.world_size,
            "loggers": dict(state.loggers),  # a resumed run or facecore eval continues these tracker runs
            **({"distill": self.distill.state_dict()} if self.distill is not None else {}),
        }

    def save(self, state: TrainState, path: Path) -> None:
        """Gather on every rank, write atomically on rank 0; every rank returns, or raises the same CheckpointError.

        With ``checkpoint.keep`` above 1, ``last.pth`` is written as ``ckpt-step<step>.pth`` and
        ``last.pth`` becomes the same file; the newest ``keep`` numbered files stay.
        """
        ckpt = self.gather(state)
        keep = self.config["checkpoint"]["keep"]

        def write() -> None:  # rank 0 only; its outcome reaches every rank
            if keep > 1 and Path(path).name == "last.pth":
                for old, why in save_numbered(ckpt, path, state.step, keep):
                    self.logger.warning("could not delete the old checkpoint %s (%s); delete it yourself", old, why)
            else:
                save_checkpoint(ckpt, path)

        decided_on_main(self.info, write)

    # -- resume -------------------------------------------------------------------------------------
    def restore(self, path: Path, state: TrainState) -> None:
        """Load every part from ``path`` into the live objects and ``state``."""
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt, dict) or "optimizer" not in ckpt or "backbone" not in ckpt:
            raise CheckpointError(f"{path} is not a facecore training checkpoint (a bare backbone cannot be resumed)")
        restore_distill(self.distill, ckpt, path)  # first: a changed teacher file is the one error
        load_backbone(self.backbone, ckpt, path, self.config["model"]["backbone"])
        try:
            if self.sharded:
                self.classifier.load_full_state_dict(ckpt["classifier"])
            else:
                self.classifier.load_state_dict(ckpt["classifier"])
        except (RuntimeError, KeyError) as exc:
            raise CheckpointError(f"{path}: the classifier does not fit this config ({str(exc).splitlines()[0]})") from None
        self._load_optimizer_state(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        state.epoch, state.batch_in_epoch, state.step = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]
        state.val_metrics = ckpt["val_metrics"]
        state.loggers = ckpt.get("loggers") or {}
        state.best = self._saved_best(ckpt, path)
        self._restore_rng(ckpt, path, state.step)

    def _saved_best(self, ckpt: dict, path: Path) -> float | None:
        """The best value so far, if the checkpoint ranked runs by the metric this config ranks them by."""
        best = self.config["checkpoint"]["best_metric"]
        saved = ckpt.get("best_metric")
        if saved is None:  # written before checkpoint.best_metric: the mean accuracy, -1 for none yet
            saved = {"key": "accuracy", "mode": "max", "value": ckpt.get("best_accuracy", -1.0)}
            saved["value"] = None if saved["value"] is None or saved["value"] < 0 else saved["value"]
        if (saved["key"], saved["mode"]) != (best["key"], best["mode"]):
            self.logger.warning("%s ranked best.pth by %s (%s); this config ranks by %s (%s): the next validation "
                                "writes best.pth anew", path, saved["key"], saved["mode"], best["key"], best["mode"])
            return None
        return saved["value"]

    def _restore_rng(self, ckpt: dict, path: Path, step: int) -> None:
        """Put back this rank's random state; on another number of ranks, seed fresh streams and say so.

        Each rank's state is saved because shards of different sizes draw different amounts (Partial
        FC's negatives). A resume on another world size cannot continue those streams (the shards
        themselves change): every rank then seeds from (seed, step, rank), so resuming the same
        checkpoint on the same number of ranks is still reproducible.
        """
        saved_world, rank = ckpt.get("world_size", 1), self.info.rank
        states = ckpt.get("rng_per_rank")
        if saved_world == self.info.world_size and states is not None and len(states) == saved_world:
            restore_rng(states[rank])
        elif saved_world == self.info.world_size:
            restore_rng(ckpt["rng"])
            if saved_world > 1:
                self.logger.warning("%s holds rank 0's random state only (saved by an older facecore): every rank "
                                    "continues from it, so Partial FC sampling on uneven shards is not bit-exact", path)
        else:
            reseed_for_rank(self.config["seed"], step, rank)
            self.logger.info("%s was saved by %d process(es), this run has %d: the random streams cannot continue, so "
                             "each rank seeds new ones from (seed %d, step %d, rank)", path, saved_world,
                             self.info.world_size, self.config["seed"], step)
