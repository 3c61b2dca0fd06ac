"""Process-level concerns: device choice, seeding, RNG state capture, torch.distributed setup."""

from __future__ import annotations

import gc
import os
import random
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import FacecoreError, TrainingError


def resolve_device(name: str) -> Any:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without CUDA is a clear error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(
                f"device '{name}' was asked for, but this machine has no usable CUDA device "
                "(torch.cuda.is_available() is False); use --device cpu or device: auto"
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise TrainingError(f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` also force deterministic kernels."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = torch.cuda.is_available()


def capture_rng() -> dict:
    """All RNG states as tensors/ints, so a checkpoint loads with ``weights_only=True``."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Undo :func:`capture_rng`."""
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def capture_rng_all_ranks(world_size: int) -> list[dict]:
    """Every rank's :func:`capture_rng`, in rank order, on every rank (a collective when ``world_size > 1``).

    Ranks draw different amounts of randomness (a shard of the class centers samples its own
    negatives), so a checkpoint keeps each rank's state, not rank 0's for all.
    """
    import torch.distributed as dist

    mine = capture_rng()
    if world_size <= 1:
        return [mine]
    states: list = [None] * world_size
    dist.all_gather_object(states, mine)
    return states


def reseed_for_rank(seed: int, step: int, rank: int) -> None:
    """Seed Python, NumPy and torch from (seed, step, rank): fresh, reproducible streams for a
    resume whose saved per-rank states do not fit this number of ranks."""
    import numpy as np
    import torch

    mixed = (seed * 0x9E3779B1 + step * 0x85EBCA77 + rank * 0xC2B2AE3D + 1) % 2**63
    random.seed(mixed)
    np.random.seed(mixed % 2**32)
    torch.manual_seed(mixed)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a torchrun launch (world size 1 when not launched so)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def decided_on_main(info: DistInfo, decide: Callable[[], Any]) -> Any:
    """``decide()`` on rank 0, its result (or its FacecoreError) shared with every rank.

    For what only one process may decide or do (the newest checkpoint on a shared disk, the run
    directory, writing a checkpoint): every rank then goes on with the same value, or raises the
    same error, so no rank waits alone in a collective the others never reach.
    """
    if not info.enabled:
        return decide()
    import torch.distributed as dist

    box: list[Any] = [None]
    if info.is_main:
        try:
            box[0] = ("ok", decide())
        except FacecoreError as exc:
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group that torchrun describes in the environment (gloo on CPU, NCCL on GPU)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local)


def device_for(info: DistInfo, device_name: str) -> Any:
    """The device of this process: ``cuda:<local_rank>`` under torchrun on GPUs."""
    import torch

    device = resolve_device(device_name)
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def collect_before_fork() -> None:
    """Collect cyclic garbage here before worker processes are forked from this process.

    A forked child that inherits garbage may destroy it, and some native objects cannot be
    destroyed there: an ONNX Runtime session left in a reference cycle deadlocks a forked worker
    whose garbage collector frees it (its thread pool does not exist in the child)."""
    gc.collect()
