"""The training loop: assemble parts from the registries, train, validate, checkpoint, resume.

One code path serves a single process and torchrun/DDP; only rank 0 writes files. The
backbone, margin head, classifier, LR schedule and metrics are separate objects; the step
(:mod:`.step`) and the checkpoint (:mod:`.checkpointing`) are units of their own, so the loop
here only sequences them.
"""

from __future__ import annotations

import copy
import gc
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from ..core.build import (build_backbone, build_head, build_metrics, build_pair_set, build_scheduler, build_train_dataset,
                          pair_set_names, pair_set_paths)
from ..core.loggers import RunInfo, Trackers
from ..core.runtime import capture_rng, collect_before_fork, decided_on_main, device_for, init_distributed, restore_rng, seed_everything
from ..data.images import model_input
from ..errors import DataError, FacecoreError, PluginError, TrainingError, TrainingStopped
from .augment import Augmenter
from .checkpointing import TrainingCheckpoint, TrainState
from .classifier import check_labels
from .distill import build_distiller
from .loss_window import LossWindow
from .runs import RunWriter, check_writable, new_run_dir, newest_checkpoint, setup_logging
from .step import LossFn, TrainStep
from .stopping import StopAgreement, StopRequest, ignore_stop_signals

class ResumableSampler(Sampler[int]):
    """A DistributedSampler whose epoch can start part-way, skipping batches already trained on."""

    def __init__(self, base: DistributedSampler, batch_size: int):
        self.base, self.batch_size, self.skip = base, batch_size, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.skip = skip_batches

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip * self.batch_size, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip * self.batch_size)


class ClassifierModel(nn.Module):
    """Backbone + classifier as one module, so DDP averages the gradients of both; returns the loss terms."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module):
        super().__init__()
        self.backbone, self.classifier = backbone, classifier

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return classify(self.classifier, self.backbone(images), labels)


class TermsOf(nn.Module):
    """A classifier whose forward returns its loss terms, so DDP can wrap it (a frozen backbone's phase)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return classify(self.classifier, embeddings, labels)


def classify(classifier: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The margin classifier's loss terms in float32, whatever autocast the backbone ran under."""
    with torch.autocast(embeddings.device.type, enabled=False):
        return classifier.loss_terms(embeddings.float(), labels)


class Trainer:
    """Build everything a config names and train it; ``run()`` returns a summary dict."""

    def __init__(self, config: dict, resume: str | bool | None = None, verbose: bool = True):
        self.config = copy.deepcopy(config)
        self.resume = resume if resume not in (None, False) else (True if config["training"]["resume"] else None)
        self.verbose = verbose
        self.owns_group = dist.is_available() and not dist.is_initialized()  # then close() destroys what init made
        self.info = init_distributed(config["device"])
        self.device = device_for(self.info, config["device"])
        self.state = TrainState()
        self.logger = setup_logging([], verbose=verbose and self.info.is_main)
        self.pretrained_report = None  # what model.pretrained loaded (logged once the run directory exists)
        self.frozen: bool | None = None  # the backbone's phase (training.freeze_backbone_epochs)
        self.writer: RunWriter | None = None
        self.trackers: Trackers | None = None  # rank 0's loggers (logging.loggers)
        self.loader: DataLoader | None = None
        self.stop_request = StopRequest()
        self.resume_notes = DeferredLog()  # what --resume skipped and why, logged once the run's log files exist
        self.stopped = False  # the current epoch ended on a stop signal

    # ----------------------------------------------------------------- assembly
    def _build(self, resume_path: Path | None = None) -> None:
        seed_everything(self.config["seed"], self.config["deterministic"])
        self._build_data()
        self._build_model(resuming=resume_path is not None)
        self._build_optimization()
        self._build_validation()
        self.checkpoint = TrainingCheckpoint(self.config, self.backbone, self.classifier, self.optimizer, self.scheduler,
                                             self.scaler, self.info, self.sharded, self.logger, self.distiller)

    def _build_data(self) -> None:
        cfg, info = self.config, self.info
        self.dataset = build_train_dataset(cfg, train=False)  # augmentations happen in self.augment
        self.augment = Augmenter.from_config(cfg)
        num = int(getattr(self.dataset, "num_classes", 0))
        declared = cfg["head"]["num_classes"]
        if declared is not None and declared != num:
            raise DataError(
                f"head.num_classes is {declared} but the {cfg['data']['type']} dataset at data.root "
                f"({cfg['data'].get('root')}) has {num} identities; set head.num_classes: {num} or leave it out"
            )
        cfg["head"]["num_classes"] = num
        self.images_from = f"the {cfg['data']['type']} dataset (data.type)"  # names it in dtype errors
        batch = cfg["data"]["batch_size"]
        base = DistributedSampler(
            self.dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg["seed"], drop_last=True
        )
        self.sampler = ResumableSampler(base, batch)
        self.steps_per_epoch_batches = len(base) // batch
        if self.steps_per_epoch_batches == 0:
            raise DataError(
                f"data.batch_size ({batch}) x {info.world_size} process(es) is larger than the dataset "
                f"({len(self.dataset)} images): lower data.batch_size"
            )
        workers = cfg["data"]["num_workers"]
        if workers > 0:
            collect_before_fork()
        self.loader = DataLoader(
            self.dataset,
            batch_size=batch,
            sampler=self.sampler,
            num_workers=workers,
            drop_last=True,
            pin_memory=cfg["data"]["pin_memory"] and self.device.type == "cuda",
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(cfg["seed"]),  # keeps the global RNG untouched
            worker_init_fn=ignore_stop_signals if workers > 0 else None,  # they serve the step a signal lets finish
        )

    def _build_model(self, resuming: bool) -> None:
        from .classifier import MarginClassifier, ShardedMarginClassifier

        cfg, info = self.config, self.info
        num = cfg["head"]["num_classes"]
        self.backbone = build_backbone(cfg)
        self._init_backbone(resuming)
        self.backbone = self.backbone.to(self.device)
        head = build_head(cfg)
        emb, rate = cfg["model"]["embedding_size"], cfg["head"]["sample_rate"]
        self.sharded = bool(cfg["head"]["shard"]) and info.enabled
        if self.sharded:
            # ddp_backbone: every rank back-propagates the global loss into its own embeddings, so the
            # classifier scales that gradient by the world size to undo DDP's averaging
            self.classifier = ShardedMarginClassifier(emb, num, head, sample_rate=rate, ddp_backbone=True).to(self.device)
        else:
            self.classifier = MarginClassifier(emb, num, head, sample_rate=rate).to(self.device)
            self.classifier.replicas = (info.rank, info.world_size)  # a head's batch-wide quantities span every rank
        self.classifier.checks_labels = False  # the loop checks them on the host, where reading them is free
        if self.device.type == "cuda":
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self._loss_fns: dict[bool, LossFn] = {}
        self.distiller = build_distiller(cfg, self.device, info, self.state)  # training.distill: the teacher and its terms

    def _init_backbone(self, resuming: bool) -> None:
        """Load ``model.pretrained`` into the new backbone (not when resuming: the checkpoint has the weights)."""
        from ..core.pretrained import load_pretrained

        model, t = self.config["model"], self.config["training"]
        if t["freeze_backbone_epochs"] and not model["pretrained"] and not resuming:
            self.logger.warning("training.freeze_backbone_epochs is %d but model.pretrained is not set: the randomly "
                                "initialised backbone stays fixed for those epochs", t["freeze_backbone_epochs"])
        if not model["pretrained"]:
            return
        if resuming:
            self.logger.info("resuming: model.pretrained (%s) is not applied again; the weights come from the checkpoint",
                             model["pretrained"])
            return
        self.pretrained_report = load_pretrained(self.backbone, model["pretrained"], model["backbone"], model["pretrained_skip"])

    def _build_optimization(self) -> None:
        cfg = self.config
        t = cfg["training"]
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        classifier = [p for p in self.classifier.parameters() if p.requires_grad]
        classifier += self.distiller.parameters() if self.distiller else []  # fresh, like the centers: at training.lr
        # One param group unless the backbone has its own LR (checkpoints of older runs keep loading)
        mult = t["backbone_lr_mult"]
        params: list = ([{"params": backbone + classifier}] if mult == 1
                        else [{"params": backbone, "lr": t["lr"] * mult}, {"params": classifier}])
        if t["optimizer"] == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"], nesterov=t["nesterov"])
        else:
            self.optimizer = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
        self.accumulate = t["accumulate_steps"]
        self.steps_per_epoch = self.steps_per_epoch_batches // self.accumulate
        if self.steps_per_epoch == 0:
            raise DataError(f"training.accumulate_steps ({self.accumulate}) exceeds the {self.steps_per_epoch_batches} batches of an epoch")
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.amp_dtype = self._amp_dtype(t["amp"])
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def _build_validation(self) -> None:
        cfg = self.config
        self.pair_sets, self.metrics = [], []
        paths = pair_set_paths(cfg)
        # every rank knows whether the run validates (a collective follows each validation); only rank 0 reads the sets
        self.validates = bool(paths)
        if self.info.is_main:
            for name, path in zip(pair_set_names(paths), paths):
                self.pair_sets.append((name, build_pair_set(cfg, path)))
            if self.pair_sets:
                self.metrics = build_metrics(cfg)

    def _amp_dtype(self, amp: Any) -> torch.dtype | None:
        """The autocast dtype for ``training.amp`` on this device, or None for float32.

        CUDA: bf16 or fp16 (``true`` takes bf16 where the GPU has it). CPU: ``bf16`` autocasts (so
        the AMP path runs anywhere); ``true`` and ``fp16`` fall back to float32 with a warning, as
        fp16 on the CPU is slower than float32 and would need a grad scaler.
        """
        if not amp:
            return None
        if self.device.type == "cuda":
            if amp == "fp16" or (amp is True and not torch.cuda.is_bf16_supported()):
                return torch.float16
            return torch.bfloat16
        if self.device.type == "cpu" and amp == "bf16":
            return torch.bfloat16
        self.logger.warning("training.amp: %s needs CUDA (the CPU autocasts only with training.amp: bf16): "
                            "training in float32 on %s", amp, self.device)
        return None

    # ----------------------------------------------------------------- the forward of each phase
    def _loss_fn(self, frozen: bool) -> LossFn:
        """``loss_fn(images, labels) -> {term: loss}`` for a trainable or a frozen backbone, made once per phase.

        A frozen backbone runs in eval mode under ``no_grad``: its weights get no gradient (the
        optimizer skips them, so they stay unchanged and no momentum builds up) and its BatchNorm
        statistics stay as loaded. Only the classifier is then data-parallel: DDP must only see
        parameters that receive gradients. The trainable backbone runs through torch.compile when
        ``training.compile`` is on (self.backbone stays the plain module, so checkpoints have no
        "_orig_mod." prefixes and validation does not compile another graph).
        """
        if frozen in self._loss_fns:
            return self._loss_fns[frozen]
        ids = [self.device] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel
        net = self._compile(self.backbone) if self.config["training"]["compile"] and not frozen else self.backbone
        if self.distiller is not None and not frozen:  # the student with its teacher (training.distill)
            wrap = (lambda m: ddp(m, device_ids=ids)) if self.info.enabled else (lambda m: m)
            start = self.config["training"]["freeze_backbone_epochs"] * self.steps_per_epoch
            loss_fn = self.distiller.loss_fn(net, self.classifier, classify, self.sharded, wrap, start)
        elif frozen:
            terms = TermsOf(self.classifier)
            terms = ddp(terms, device_ids=ids) if self.info.enabled and not self.sharded else terms

            def loss_fn(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
                with torch.no_grad():
                    embeddings = net(x)
                return terms(embeddings, y)
        elif self.sharded:  # centers differ per rank: only the backbone is data-parallel
            ddp_backbone = ddp(net, device_ids=ids)

            def loss_fn(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
                return classify(self.classifier, ddp_backbone(x), y)
        else:
            model: nn.Module = ClassifierModel(net, self.classifier)
            loss_fn = ddp(model, device_ids=ids) if self.info.enabled else model
        if self.config["training"]["compile"] and not frozen:
            loss_fn = _naming_compile_failures(loss_fn)
        self._loss_fns[frozen] = loss_fn
        return loss_fn

    @staticmethod
    def _compile(backbone: nn.Module) -> nn.Module:
        """``torch.compile(backbone)``; a clear TrainingError where torch.compile is not supported."""
        try:
            return torch.compile(backbone)
        except RuntimeError as exc:  # e.g. a Python version this torch's compiler does not support
            raise TrainingError(f"training.compile: torch.compile is not available here ({exc}); "
                                "set training.compile: false") from None

    def _enter_phase(self) -> None:
        """Freeze the backbone for the first training.freeze_backbone_epochs epochs, then train it."""
        t = self.config["training"]
        frozen = self.state.epoch < t["freeze_backbone_epochs"]
        if frozen != self.frozen:
            self.frozen = frozen
            self.loss_fn = self._loss_fn(frozen)
            if frozen:
                self.logger.info("epochs %d-%d: the backbone is frozen (eval mode, no gradients); only the classifier trains",
                                 self.state.epoch + 1, min(t["freeze_backbone_epochs"], t["epochs"]))
            elif t["freeze_backbone_epochs"]:
                self.logger.info("epoch %d: the backbone trains from now on, at training.lr x %g",
                                 self.state.epoch + 1, t["backbone_lr_mult"])

    def _train_mode(self) -> None:
        """Training mode for what trains; a frozen backbone stays in eval mode."""
        self.classifier.train()
        self.backbone.train(not self.frozen)

    # ----------------------------------------------------------------- run directory and checkpoints
    def _resume_path(self) -> Path | None:
        """The checkpoint to continue (rank 0 looks; every rank gets its answer)."""
        if self.resume is None:
            return None
        if self.resume is True or self.resume == "auto":
            return decided_on_main(self.info, lambda: newest_checkpoint(self.config["checkpoint"]["save_dir"],
                                                                        self.resume_notes))
        return Path(self.resume)

    def _prepare_run_dir(self, resume_path: Path | None) -> None:
        cfg = self.config

        def make() -> Path:
            return resume_path.parent if resume_path else new_run_dir(cfg["checkpoint"]["save_dir"], cfg["model"]["backbone"])

        self.run_dir = Path(decided_on_main(self.info, make))
        if self.info.is_main:
            log_dir = Path(cfg["logging"]["log_dir"])
            tag = f"{cfg['model']['backbone']}_{self.run_dir.name}"
            self.logger = setup_logging([self.run_dir / "train.log", log_dir / f"train_{tag}.log"], verbose=self.verbose)
            self.checkpoint.logger = self.logger
            self.writer = RunWriter(self.run_dir, self.trackers)
            self.writer.write_config(cfg)

    def _save(self, name: str) -> None:
        """Write ``name`` in the run directory (every rank gathers its part; rank 0 writes)."""
        if self.writer:
            self.state.loggers = self.writer.trackers.known_states()
        self.checkpoint.save(self.state, self.run_dir / name)
        if self.writer and name == "best.pth":
            self.writer.artifact("best_checkpoint", self.run_dir / name, "checkpoint", self.state.step)

    def _start_loggers(self, resumed: bool) -> None:
        """Rank 0 starts the loggers of logging.loggers; a resumed run continues their runs (ids in the checkpoint)."""
        if not self.writer:
            return
        cfg = self.config
        run = RunInfo("train", f"{cfg['model']['backbone']}/{self.run_dir.name}", self.run_dir,
                      Path(cfg["logging"]["log_dir"]), cfg, step=self.state.step)
        self.state.loggers = self.writer.start_loggers(run, self.state.loggers if resumed else None)

    # ----------------------------------------------------------------- validation
    def validate(self) -> dict[str, dict[str, float]]:
        """Run every metric on every pair set; returns ``{set: {key: value}}`` on every rank.

        Rank 0 evaluates and broadcasts the results, so every decision taken from them (is this the
        best model? write best.pth, whose sharded state is a collective) is taken by all ranks
        alike. RNG states are put back afterwards, so validating never changes the training that
        follows (a run resumed from a checkpoint written after validation continues exactly).
        """
        import warnings

        from ..eval.evaluation import evaluate_pair_set

        results: dict[str, dict[str, float]] = {}
        if self.info.is_main and self.pair_sets:
            rng = capture_rng()
            batch = self.config["eval"]["test_batch_size"]
            for name, pairs in self.pair_sets:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    results[name] = evaluate_pair_set(self.backbone, pairs, self.metrics, batch, self.device)
                for w in {str(w.message) for w in caught}:
                    self.logger.warning("[%s] %s", name, w)
                shown = ", ".join(f"{k} {v:.4f}" for k, v in results[name].items() if isinstance(v, float))
                self.logger.info("[%s] step %d epoch %d: %s", name, self.state.step, self.state.epoch, shown)
                self.writer.record("validation", self.state.step, self.state.epoch, {"set": name, **results[name]}, tb_prefix=f"val/{name}")
            restore_rng(rng)
        if self.info.enabled:
            box = [results]
            dist.broadcast_object_list(box, src=0)
            results = box[0]
        return results

    def _after_validation(self, results: dict) -> bool:
        """Keep the results; True when checkpoint.best_metric (mean over the pair sets) is the best so far."""
        if not results:
            return False
        self.state.val_metrics = results
        best = self.config["checkpoint"]["best_metric"]
        values = [r[best["key"]] for r in results.values() if isinstance(r.get(best["key"]), (int, float))]
        if not values:
            return False
        value = float(sum(values) / len(values))
        if math.isnan(value):
            return False
        previous = self.state.best
        better = previous is None or (value > previous if best["mode"] == "max" else value < previous)
        if better:
            self.state.best = value
        return better

    # ----------------------------------------------------------------- the loop
    def run(self) -> dict:
        folders = {"checkpoint.save_dir": self.config["checkpoint"]["save_dir"], "logging.log_dir": self.config["logging"]["log_dir"]}
        decided_on_main(self.info, lambda: [check_writable(path, key) for key, path in folders.items()])  # before any build
        decided_on_main(self.info, self._build_trackers)  # a logger's missing package stops every rank before the build
        resume_path = self._resume_path()
        self._build(resume_path)
        self.stop_request.install()  # from here a stop signal finishes the step and writes last.pth
        self.stopping = StopAgreement(self.stop_request, self.info, self.config["training"]["preempt_every"])
        self._prepare_run_dir(resume_path)
        for line in self.resume_notes.lines:
            self.logger.warning("%s", line)
        if self.pretrained_report is not None:
            for line in self.pretrained_report.lines():
                self.logger.info("%s", line)
        for line in self.distiller.lines() if self.distiller else []:
            self.logger.info("%s", line)
        if resume_path:
            self.checkpoint.restore(resume_path, self.state)
            s = self.state
            self.logger.info("resumed from %s at epoch %d, batch %d, step %d", resume_path, s.epoch, s.batch_in_epoch, s.step)
        self._start_loggers(resumed=resume_path is not None)
        cfg, t, s = self.config, self.config["training"], self.state
        batch, world = cfg["data"]["batch_size"], self.info.world_size
        max_steps = t["max_steps"] or math.inf
        self.logger.info(
            "run %s: %s + %s, %d images, %d classes, %d steps/epoch x %d epochs, %d process(es) on %s",
            self.run_dir, cfg["model"]["backbone"], cfg["head"]["type"], len(self.dataset), cfg["head"]["num_classes"],
            self.steps_per_epoch, t["epochs"], world, self.device,
        )
        if not self.validates:
            self.logger.info("no pair set in eval.bin_file: the run is not validated and writes no best.pth")
        show_bar = self.info.is_main and self.verbose and sys.stderr.isatty()
        initial = self.validate() if cfg["eval"]["at_start"] and s.step == 0 else {}
        stop = False
        while s.epoch < t["epochs"] and s.step < max_steps and not stop:
            self.epoch_skipped = 0
            self._enter_phase()
            try:
                stop = self._train_epoch(max_steps, batch * world, show_bar)
            except RuntimeError as exc:
                if "DataLoader worker" not in str(exc):
                    raise
                raise self._worker_died(exc) from None
            self._report_skipped(self.epoch_skipped)
            if self.stopped:  # a stop signal: every rank ends after the same step, mid-epoch
                self._save("last.pth")
                raise self._stopped_error()
            if not stop:
                s.epoch, s.batch_in_epoch = s.epoch + 1, 0
            stop = stop or s.epoch >= t["epochs"] or s.step >= max_steps
            due = cfg["eval"]["eval_unit"] == "epoch" and (s.epoch % cfg["eval"]["eval_freq"] == 0 or stop)
            improved = self._after_validation(self.validate()) if due or (stop and self.validates) else False
            self._save("last.pth")
            if improved:
                self._save("best.pth")
            if not stop and self.stopping.agreed():  # a signal during validation or the save: stop at the epoch's end
                raise self._stopped_error()
        best = cfg["checkpoint"]["best_metric"]
        summary = {"run_dir": str(self.run_dir), "rank": self.info.rank, "step": s.step, "epoch": s.epoch,
                   "best_metric": {**best, "value": s.best}, "val_metrics": s.val_metrics,
                   "initial_metrics": initial, "skipped_images": s.skipped_images}
        self.logger.info("done: step %d, epoch %d, best mean %s %s, run directory %s", s.step, s.epoch, best["key"],
                         "-" if s.best is None else f"{s.best:.4f}", self.run_dir)
        return summary

    def _build_trackers(self) -> None:
        """The loggers (rank 0 only; no other rank logs). A plugin's own failure becomes a PluginError, which
        decided_on_main hands every rank."""
        try:
            self.trackers = Trackers.from_config(self.config)
        except FacecoreError:
            raise
        except Exception as exc:
            raise PluginError(f"logging.loggers: a logger could not be made ({type(exc).__name__}: {exc})") from None

    def close(self, status: str = "finished") -> None:
        """Release the DataLoader workers, the loggers (told ``status``: finished, stopped or failed) and the
        process group this trainer joined.

        A process group left alive at exit is destroyed by the interpreter's teardown while gloo's
        worker threads still hold work objects with tensors in them; freeing those then needs the GIL
        of an interpreter that is going away, and the process dies with "terminate called without an
        active exception" (SIGABRT) after training finished, so torchrun reports a failure. Hence an
        explicit destroy: after a barrier when the run finished (no rank still sends), and on failure
        too with gloo, where destroying returns at once and the other ranks get a connection error
        instead of waiting. NCCL's teardown of a group whose peers are inside a collective can block,
        so after a failure there the process exits without it.
        """
        self.stop_request.uninstall()
        # Persistent workers live in the loader's iterator, which an exception's traceback may still
        # reference (a DataError raised in a worker): shut them down here rather than whenever it is freed.
        shutdown = getattr(getattr(self.loader, "_iterator", None), "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.loader = None
        if self.writer is not None:
            self.writer.close(status)
            self.writer = None
        # The DDP wrappers hold the process group and sit in reference cycles: drop them and collect
        # now, so nothing keeps the group's C++ threads alive into the interpreter's teardown.
        self.loss_fn, self._loss_fns = None, {}
        gc.collect()
        if not (self.owns_group and self.info.enabled and dist.is_initialized()):
            return
        if status != "failed":  # every rank ended after the same step
            dist.barrier()
        elif dist.get_backend() == "nccl":
            return
        dist.destroy_process_group()
        gc.collect()

    def _stopped_error(self) -> TrainingStopped:
        s = self.state
        where = (f"after step {s.step} (epoch {s.epoch + 1}, batch {s.batch_in_epoch} of {self.steps_per_epoch_batches})"
                 if s.batch_in_epoch else f"after step {s.step} (the end of epoch {s.epoch})")
        self.logger.warning("stopped by %s %s; last.pth written", self.stop_request.name, where)
        return TrainingStopped(
            f"{self.stop_request.name} received: stopped {where} and wrote {self.run_dir / 'last.pth'}. Continue exactly "
            f"where it stopped with the same command plus --resume (or --resume {self.run_dir / 'last.pth'})"
        )

    def _report_skipped(self, count: int) -> None:  # count: this rank's skips in the epoch just trained
        """Log and record the undecodable images skipped in the epoch just trained (all ranks together)."""
        if self.info.enabled:
            total = torch.tensor([count], device=self.device)
            dist.all_reduce(total)
            count = int(total.item())
        self.state.skipped_images += count  # all ranks together, the same on every rank
        if count:
            self.logger.warning("epoch %d: %d undecodable image(s) were skipped (data.on_bad_image: skip)",
                                self.state.epoch + 1, count)
        if self.writer:
            self.writer.record("data", self.state.step, self.state.epoch,
                               {"skipped_images": count, "skipped_images_total": self.state.skipped_images},
                               tb_prefix="data")

    def _clip_gradients(self) -> None:
        """Clip the global gradient norm; with sharded centers the norm covers every rank's shard."""
        max_norm = self.config["training"]["grad_clip_norm"]
        # the backbone and the head's own parameters are the same on every rank; only the centers are split
        extra = self.distiller.parameters() if self.distiller else []  # the distillation losses' own, same on every rank
        grads = [p.grad for p in [*self.backbone.parameters(), *self.classifier.head.parameters(), *extra] if p.grad is not None]
        shard = [self.classifier.weight.grad] if self.classifier.weight.grad is not None else []
        if not self.sharded:
            nn.utils.clip_grad_norm_([p for m in (self.backbone, self.classifier) for p in m.parameters() if p.grad is not None]
                                     + [p for p in extra if p.grad is not None], max_norm)
            return
        sq = torch.stack([g.detach().float().pow(2).sum() for g in shard]).sum() if shard else torch.zeros((), device=self.device)
        dist.all_reduce(sq)  # the shards' squared norms add up; the backbone is the same on every rank
        if grads:
            sq = sq + torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
        scale = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads + shard:
            g.mul_(scale.to(g.dtype))

    def _loader_batches(self) -> Iterator[Any]:
        """The DataLoader's batches; a FacecoreError raised in a worker keeps its own message."""
        iterator = iter(self.loader)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except (DataError, TrainingError) as exc:  # from a worker, re-raised with the worker's traceback in it
                raise type(exc)(worker_message(exc)) from None
            yield batch

    def _worker_died(self, exc: RuntimeError) -> TrainingError:
        """A DataLoader worker's death (noticed in the loader or by its SIGCHLD handler anywhere in the step)."""
        last = self.run_dir / "last.pth"
        where = str(last) if last.exists() else f"none yet (run directory {self.run_dir})"
        return TrainingError(
            f"{str(exc).strip().splitlines()[0]}. A worker killed by the operating system most likely ran out of "
            f"memory (see dmesg): lower data.num_workers or data.batch_size. The last checkpoint is {where}; "
            "continue with --resume"
        )

    def _batches(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(index in epoch, images, labels)`` of the rest of the epoch, on the device, normalized and augmented.

        Labels are checked on the host copy (free there); images travel as uint8 and are normalized
        on the device; an image the dataset skipped (label -1, ``on_bad_image: skip``) is counted
        and dropped after augmentation, so every other image keeps its random numbers.
        """
        s, seed = self.state, self.config["seed"]
        for i, (images, labels) in enumerate(self._loader_batches(), start=s.batch_in_epoch):
            labels = torch.as_tensor(labels)
            keep = labels >= 0
            skipped = int((~keep).sum())  # counted on the CPU: no device sync on the hot path
            check_labels(labels[keep] if skipped else labels, self.classifier.num_classes)
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            images = model_input(images, self.images_from)  # uint8 -> float32 in [-1, 1], on the device
            images = self.augment(images, seed, s.epoch, i, self.info, inplace=True)
            self.classifier.draw_key = (seed, s.epoch, i)  # a head's random numbers, keyed like the augmentations'
            if skipped:
                self.epoch_skipped += skipped
                keep = keep.to(self.device, non_blocking=True)
                images, labels = images[keep], labels[keep]
            if self.device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            yield i, images, labels

    def _train_epoch(self, max_steps: float, global_batch: int, show_bar: bool) -> bool:
        """Train the rest of the current epoch; True when max_steps stopped it early.

        The host never waits for the device inside a log window: the loss and its terms stay on
        the device (``self.window``) until the window is read every ``training.log_every`` steps.
        """
        from tqdm import tqdm

        cfg, s = self.config, self.state
        t, every = cfg["training"], cfg["checkpoint"]["save_every_steps"]
        self._train_mode()
        self.sampler.set_epoch(s.epoch, s.batch_in_epoch)
        bar = tqdm(total=self.steps_per_epoch_batches, initial=s.batch_in_epoch, desc=f"epoch {s.epoch + 1}/{t['epochs']}",
                   disable=not show_bar, leave=False, dynamic_ncols=True)
        self.window = LossWindow(self.device, s.step + 1, self.info.world_size)
        step = TrainStep(self.optimizer, self.scheduler, self.scaler, self.window, accumulate=self.accumulate,
                         amp_dtype=self.amp_dtype, clip=self._clip_gradients if t["grad_clip_norm"] else None,
                         before_step=self.classifier.sync_head_gradients if self.sharded else None)
        self.optimizer.zero_grad(set_to_none=True)
        for i, images, labels in self._batches():
            step.backward(self.loss_fn, images, labels, global_batch)
            s.batch_in_epoch = i + 1
            bar.update(1)
            if not step.due:
                continue
            step.optimizer_step()
            s.step += 1
            if s.step % t["log_every"] == 0 or s.batch_in_epoch == self.steps_per_epoch_batches:
                self._close_window(bar, show_bar)
            if every and s.step % every == 0 and s.batch_in_epoch < self.steps_per_epoch_batches:
                self._check_finite()
                self._save("last.pth")
            if cfg["eval"]["eval_unit"] == "step" and s.step % cfg["eval"]["eval_freq"] == 0:
                self._check_finite()
                if self._after_validation(self.validate()):
                    self._save("best.pth")
                self._train_mode()
            if s.step >= max_steps:
                break
            if self.stopping.due(s.step):
                self.stopped = True
                break
        if self.window.losses:  # batches after the last read (max_steps, or an epoch's last partial accumulation)
            self._close_window(bar, show_bar)
        bar.close()
        return self.stopped or s.batch_in_epoch < self.steps_per_epoch_batches

    def _close_window(self, bar: Any, show_bar: bool) -> None:
        """Read the loss window (the loop's one wait for the device), stop on a non-finite loss, log it."""
        s, w = self.state, self.window
        reading = w.read()
        now = time.perf_counter()
        if not reading.finite:
            raise self._nonfinite_error(reading.loss)
        lr = self.optimizer.param_groups[-1]["lr"]  # the group at training.lr (the classifier)
        speed = w.images / max(now - w.started, 1e-9)
        bar.set_postfix(loss=f"{reading.loss:.3f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}")
        if not show_bar:
            parts = f" ({', '.join(f'{k} {v:.4f}' for k, v in reading.terms.items())})" if len(reading.terms) > 1 else ""
            self.logger.info("epoch %d step %d: loss %.4f%s lr %.3e %.1f images/s", s.epoch + 1, s.step, reading.loss,
                             parts, lr, speed)
        if self.writer:
            terms = {f"loss_{k}": v for k, v in reading.terms.items()}
            self.writer.record("train", s.step, s.epoch, {"loss": reading.loss, **terms, "lr": lr, "images_per_s": speed},
                               tb_prefix="train")
        w.reset(s.step + 1, started=now)  # logging time counts in the next window's speed

    def _check_finite(self) -> None:
        """Before writing a checkpoint mid-window: stop if any loss since the last read was not finite."""
        reading = self.window.read()
        if not reading.finite:
            raise self._nonfinite_error(reading.loss)

    def _nonfinite_error(self, value: float) -> TrainingError:
        s, first = self.state, self.window.first_step
        last = max(s.step, first)
        where = f"at step {first}" if last == first else f"between step {first} and {last}"
        return TrainingError(
            f"the loss became {value} {where} (epoch {s.epoch + 1}); stopped without saving, so the last good "
            f"checkpoint in {self.run_dir} is intact. Lower training.lr, check training.grad_clip_norm, or turn off "
            "training.amp"
        )


class DeferredLog:
    """Collects ``warning(msg, *args)`` lines to log later (before the run's log files exist)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def warning(self, msg: str, *args: Any) -> None:
        self.lines.append(msg % args if args else msg)


def worker_message(exc: BaseException) -> str:
    """The message of an error raised in a DataLoader worker, without the traceback text the loader adds."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    name = type(exc).__name__
    return last[len(name) + 2:] if last.startswith(f"{name}: ") else last


def _naming_compile_failures(loss_fn: LossFn) -> LossFn:
    """Wrap a compiled forward: a compiler failure (first call) becomes a TrainingError naming training.compile."""

    def call(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        from torch._dynamo.exc import BackendCompilerFailed

        try:
            return loss_fn(x, y)
        except BackendCompilerFailed as exc:  # the first call compiles: no C++ compiler, no Triton, ...
            inner = getattr(exc, "inner_exception", None) or exc
            reason = f"{type(inner).__name__}: {(str(inner).strip().splitlines() or [''])[0][:300]}"
            raise TrainingError(f"training.compile: torch.compile could not compile the backbone ({reason}); "
                                "set training.compile: false") from None

    return call


def train(config: dict, resume: str | bool | None = None, verbose: bool = True) -> dict:
    """Train from an effective config; see :class:`Trainer`. Everything the run holds is released on
    the way out, whether it finished or failed."""
    trainer = Trainer(config, resume=resume, verbose=verbose)
    status = "failed"
    try:
        summary = trainer.run()
        status = "finished"
        return summary
    except TrainingStopped:
        status = "stopped"  # every rank stopped after the same step: a clean teardown
        raise
    finally:
        trainer.close(status)
