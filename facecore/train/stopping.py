"""Stopping a run on request: SIGTERM, SIGINT or SIGUSR1 finish the current optimizer step, then stop.

Clusters preempt jobs with a signal and a grace period (SLURM: SIGTERM, or SIGUSR1 with
``--signal``; torchrun forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT to its workers and kills them
30 s later). The handler only sets a flag; the trainer looks at it between optimizer steps and,
under torchrun, the ranks agree on it over gloo every ``training.preempt_every`` steps (a host
collective: no device sync), so every rank stops after the same step and writes one consistent
``last.pth``. DataLoader workers ignore these signals (:func:`ignore_stop_signals`) so they keep
serving batches until the step is done; the trainer shuts them down afterwards.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

from ..core.runtime import DistInfo

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGINT", None),
                                 getattr(signal, "SIGUSR1", None)) if s is not None)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: the workers outlive a stop signal until the trainer closes them."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopRequest:
    """Handlers for the stop signals that record the first one (and count the rest) without raising."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.repeats = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Take over the stop signals (main thread only; elsewhere Python does not deliver them)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signum
            return
        self.repeats += 1  # a second signal must not interrupt the save: say so, keep going
        os.write(2, f"facecore: already stopping after this step ({signal.Signals(signum).name} again); "
                    "a checkpoint is being written, kill -9 aborts without it\n".encode())

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""


class StopAgreement:
    """Whether any rank was asked to stop, decided alike on every rank.

    One process: the flag, read at every optimizer step. Several: an all-reduce (max) of the
    flags over gloo every ``every`` steps and at every epoch end, so the worst-case delay after a
    signal is ``every`` optimizer steps (plus the step running when it came).
    """

    def __init__(self, request: StopRequest, info: DistInfo, every: int):
        self.request, self.info, self.every = request, info, max(1, int(every))
        self.group = None
        if info.enabled and dist.get_backend() != "gloo":  # a host-side group: agreeing never waits for the GPU
            self.group = dist.new_group(backend="gloo")

    def due(self, step: int) -> bool:
        """True when every rank should stop after optimizer step ``step``."""
        if not self.info.enabled:
            return self.request.signal is not None
        if step % self.every:
            return False
        return self.agreed()

    def agreed(self) -> bool:
        """The collective check itself (every rank must call it at the same point)."""
        if not self.info.enabled:
            return self.request.signal is not None
        flag = torch.tensor([0 if self.request.signal is None else self.request.signal], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if self.request.signal is None and int(flag):
            self.request.signal = int(flag)  # another rank's signal: name it in this rank's message too
        return bool(int(flag))
