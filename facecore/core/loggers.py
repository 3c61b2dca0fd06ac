"""Experiment trackers (the ``loggers`` group, ``logging.loggers``) as the main process drives them.

Each logger gets a thread and a bounded queue of its own: training only puts records on the queue,
so a tracker that is slow or unreachable (MLflow's client retries for minutes) never holds it up.
What goes wrong is reported once per logger (a call that fails, a call that does not return within
``logging.logger_timeout`` seconds, a full queue) and the run goes on; the run's own files
(metrics.jsonl, train.log) are complete regardless. Starting and finishing wait for a logger at most
that long.

A logger is an object with any of these methods, each called from its thread, in order:

- ``start(run: RunInfo) -> dict | None``: open or continue the tracker's run. The dict (e.g. the
  tracker's run id) is stored in checkpoints and handed back as ``run.resume`` when the run is resumed
  or evaluated, so a resumed run continues the same tracker run.
- ``scalars(prefix, values, step)``: finite numbers under ``prefix`` (``train``, ``val/lfw``, ``eval/lfw``).
- ``artifact(name, path, kind, step)``: ``kind`` is ``image`` (a PNG), ``file`` (a result JSON) or
  ``checkpoint`` (a path to refer to, not to copy: checkpoints are large).
- ``finish(status)``: ``finished``, ``stopped`` (by a signal; ``--resume`` continues) or ``failed``.

A call returns once its record is safe (written, or flushed): the core then counts it delivered.
Training records carry their line number in metrics.jsonl, and the last one each logger got is kept
in ``loggers.json`` in the run directory. A logger whose tracker buffers (W&B's offline file) may
instead set ``logged_through`` in ``start`` to the last step its files hold. A run resumed after
``kill -9`` then sends each logger the records it lacks up to the checkpoint, and does not send again
the steps it redoes that the logger has: of a step logged twice, the first copy wins.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

STATUSES = ("finished", "stopped", "failed")
LEDGER = "loggers.json"  # in the run directory: {logger name: last metrics.jsonl line it was given}
QUEUE_SIZE = 10_000  # records per logger; a log window or a validation is one record

Report = Callable[[str], None]


@dataclass(frozen=True)
class RunInfo:
    """What a logger's ``start`` learns about the run.

    ``kind``: ``train`` or ``eval``. ``name``: ``<backbone>/<run folder>`` for training,
    ``<name>/eval_<time>`` for ``facecore eval`` (TensorBoard's folder under ``log_dir/tensorboard``).
    ``run_dir``: where a logger may keep local files (the training run's folder). ``config``: the
    effective config. ``step``: the step training starts or resumes at (eval: the checkpoint's).
    ``resume``: what this logger's ``start`` returned for the run being continued or evaluated.
    """

    kind: str
    name: str
    run_dir: Path
    log_dir: Path
    config: Mapping[str, Any]
    step: int = 0
    resume: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Record:
    """One line of metrics.jsonl as the loggers get it: ``prefix`` (``train``, ``val/<set>``), numbers, step."""

    seq: int
    prefix: str
    values: Mapping[str, Any]
    step: int


def finite_numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``values`` (booleans are not numbers here): what a tracker can plot."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class _Worker:
    """One logger on a thread of its own, fed through a bounded queue; its troubles are reported once each."""

    def __init__(self, name: str, logger: Any, timeout: float, report: Report, delivered: Callable[[str, int], None]):
        self.name, self.logger, self.timeout, self.report = name, logger, timeout, report
        self.delivered = delivered
        self.queue: queue.SimpleQueue = queue.SimpleQueue()  # bounded for records only: start and finish always go in
        self.busy_since: float | None = None
        self.busy_with = ""
        self.failures, self.dropped = 0, 0
        self.reported: set[str] = set()
        self.state: dict | None = None
        self.skip: set[tuple[str, int]] = set()  # (prefix, step) of redone steps the tracker already has
        self.abandoned = False  # finish() stopped waiting: records still queued are dropped, finish still runs
        self.thread = threading.Thread(target=self._loop, name=f"facecore-logger-{name}", daemon=True)
        self.thread.start()

    def _once(self, what: str, message: str) -> None:
        if what not in self.reported:
            self.reported.add(what)
            self.report(f"logger '{self.name}': {message}")

    def submit(self, method: str, *args: Any, seq: int | None = None) -> threading.Event | None:
        """Queue a call; returns an Event set once it ran (None when the record was dropped: QUEUE_SIZE are waiting)."""
        self.check_slow()
        if method in ("scalars", "artifact") and self.queue.qsize() >= QUEUE_SIZE:
            self.dropped += 1
            self._once("full", f"{QUEUE_SIZE} records are waiting (the tracker is slow or down): records are dropped "
                               "until it catches up; metrics.jsonl has every one")
            return None
        done = threading.Event()
        self.queue.put((method, args, seq, done))
        return done

    def check_slow(self) -> None:
        since = self.busy_since
        if since is not None and time.monotonic() - since > self.timeout:
            self._once("slow", f"{self.busy_with}() has not returned for {self.timeout:g} s (logging.logger_timeout): "
                               "the tracker is slow or unreachable; training goes on and its records wait")

    def _loop(self) -> None:
        while True:
            method, args, seq, done = self.queue.get()
            self.busy_since, self.busy_with = time.monotonic(), method
            try:
                if method == "resume":
                    self._resume(*args)
                elif method == "finish" or not (self.abandoned or (method == "scalars" and (args[0], args[2]) in self.skip)):
                    self._call(method, args, seq)
            finally:
                self.busy_since = None
                done.set()
            if method == "finish":
                return

    def _call(self, method: str, args: tuple, seq: int | None) -> None:
        try:
            call = getattr(self.logger, method, None)  # every method is optional
            result = call(*args) if callable(call) else None
        except Exception as exc:  # a tracker's error never reaches training
            self.failures += 1
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            self._once("error", f"{method}() failed ({type(exc).__name__}: {first}); later failures are counted, "
                                "not shown, and the run goes on")
            return
        if method == "start" and isinstance(result, dict):
            self.state = result
        if seq is not None and not self.abandoned:
            try:
                self.delivered(self.name, seq)
            except OSError as exc:
                self._once("ledger", f"cannot record what it was given in {LEDGER} ({exc}); a resumed run may "
                                     "send it some records again")

    def _resume(self, history: list[Record], given: int, step: int) -> None:
        """After ``start`` of a resumed run: send what the tracker lacks up to ``step`` (the checkpoint), and
        note the redone steps it has. What it has: ``logger.logged_through`` (the last step its own files
        hold) where its start set that, else the records up to line ``given`` of metrics.jsonl (the ledger)."""
        through = getattr(self.logger, "logged_through", None)
        has = (lambda r: r.step <= through) if isinstance(through, int) else (lambda r: r.seq <= given)
        self.skip = {(r.prefix, r.step) for r in history if has(r) and r.step > step}
        for r in history:
            if not has(r) and r.step <= step:
                self._call("scalars", (r.prefix, dict(r.values), r.step), r.seq)

    def summary(self) -> str | None:
        if not (self.failures or self.dropped):
            return None
        return f"logger '{self.name}': {self.failures} call(s) failed and {self.dropped} record(s) were dropped in this run"


class Trackers:
    """The loggers of ``logging.loggers``; every method returns at once except ``start`` and ``finish`` (bounded).

    Made on rank 0 only: no other rank logs, and nothing here takes part in a collective.
    """

    def __init__(self, loggers: Iterable[tuple[str, Any]], timeout: float = 30.0, report: Report | None = None):
        self.loggers = list(loggers)
        self.timeout = timeout
        self.report = report or _warn
        self.workers: dict[str, _Worker] = {}
        self.ledger_path: Path | None = None
        self.ledger: dict[str, int] = {}
        self.lock = threading.Lock()
        self.states: dict[str, dict] = {}  # what each start() returned; checkpoints store it

    @classmethod
    def from_config(cls, config: Mapping[str, Any], report: Report | None = None) -> Trackers:
        """Build the loggers ``logging.loggers`` names (a missing optional package is the plugin's ConfigError)."""
        from .build import build_slot

        return cls(build_slot(dict(config), "logging.loggers"), config["logging"]["logger_timeout"], report)

    def __bool__(self) -> bool:
        return bool(self.loggers)

    # -- start ---------------------------------------------------------------------------------------
    def start(self, run: RunInfo, states: Mapping[str, Any] | None = None, history: Iterable[Record] = (),
              ledger: Path | None = None) -> dict[str, dict]:
        """Start every logger, waiting at most ``logging.logger_timeout`` s; returns the states known by then.

        ``states``: what the loggers' ``start`` returned in the run being continued. ``history`` (a
        resumed training run): the records of metrics.jsonl; each logger gets those it lacks up to
        ``run.step`` (the checkpoint), and the redone steps it has are not sent again (see ``_Worker._resume``).
        """
        states = dict(states or {})
        self.ledger_path = ledger
        self.ledger = _read_ledger(ledger) if ledger is not None else {}
        history = list(history)
        waits = []
        for name, logger in self.loggers:
            worker = self.workers[name] = _Worker(name, logger, self.timeout, self.report, self._delivered)
            waits.append(worker.submit("start", dataclasses.replace(run, resume=states.get(name))))
            if history:
                waits[-1] = worker.submit("resume", history, self.ledger.get(name, -1), run.step)
        self._wait(waits, "start")
        return self.known_states()

    def known_states(self) -> dict[str, dict]:
        """``{logger: state}`` of the loggers whose ``start`` has returned one (for checkpoints)."""
        for name, worker in self.workers.items():
            if worker.state is not None:
                self.states[name] = worker.state
        return dict(self.states)

    # -- records -------------------------------------------------------------------------------------
    def scalars(self, prefix: str, values: Mapping[str, Any], step: int, seq: int | None = None) -> None:
        numbers = finite_numbers(values)
        if not numbers:
            return
        for worker in self.workers.values():
            worker.submit("scalars", prefix, numbers, step, seq=seq)

    def artifact(self, name: str, path: str | Path, kind: str, step: int) -> None:
        for worker in self.workers.values():
            worker.submit("artifact", name, Path(path), kind, step)

    def finish(self, status: str) -> None:
        """Tell every logger how the run ended; wait at most ``logging.logger_timeout`` s for all of them."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
        self._wait([w.submit("finish", status) for w in self.workers.values()], "finish")
        for worker in self.workers.values():
            worker.abandoned = True  # one still busy drops what waits and only finishes; writes nothing more
            line = worker.summary()
            if line:
                self.report(line)
        self.workers = {}

    def _wait(self, events: list[threading.Event | None], method: str) -> None:
        deadline = time.monotonic() + self.timeout
        for (name, worker), event in zip(self.workers.items(), events):
            if event is not None and not event.wait(max(0.0, deadline - time.monotonic())):
                worker._once("slow", f"{method}() has not returned within {self.timeout:g} s (logging.logger_timeout); "
                                     "the run goes on without waiting for it")

    # -- the ledger: the last metrics.jsonl line each logger was given ------------------------------
    def _delivered(self, name: str, seq: int) -> None:
        if self.ledger_path is None:
            return
        with self.lock:
            if seq <= self.ledger.get(name, -1):
                return
            self.ledger[name] = seq
            tmp = self.ledger_path.with_name(f".{LEDGER}.tmp")
            tmp.write_text(json.dumps(self.ledger, sort_keys=True))
            os.replace(tmp, self.ledger_path)


def _read_ledger(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, int)} if isinstance(data, dict) else {}


def _warn(message: str) -> None:
    import logging

    logging.getLogger("facecore").warning("%s", message)


__all__ = ["LEDGER", "STATUSES", "Record", "RunInfo", "Trackers", "finite_numbers"]
