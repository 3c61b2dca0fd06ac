"""The class centers and the margin softmax loss, shared by every head.

``MarginClassifier`` holds all centers on one process, with optional Partial FC sampling
of negative centers. ``ShardedMarginClassifier`` splits the centers across the ranks of a
torch.distributed group (model parallel, Partial FC style) for class counts that do not
fit one device; its checkpoints (``full_state_dict``) do not depend on the number of ranks.

A head may set ``centers_per_class = K`` (default 1; sub-center ArcFace): the classifier then holds K
centers per class, class-major, and a class's cosine is the largest of its K centers' before the head
sees it, so heads always get (N, classes) cosines. Partial FC samples classes and keeps all K of each.

A head may set ``elementwise_loss = True`` (SphereFace2, UniFace): it then returns loss elements, one per
(row, class column), instead of logits, and the ``margin`` term is their sum over every class, averaged
over the rows. A sum over classes splits over shards: each rank sums its own columns, the values are
all-reduced and each rank's gradient stays with its own centers (:meth:`margin_loss`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError, DataError
from .head_batch import HeadBatch

INIT_STD = 0.01
INIT_BLOCK = 4096  # the initial centers are drawn in independently seeded blocks of this many rows


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(first class, number of classes) held by ``rank``: an even split, the last ranks may hold one fewer."""
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


def init_centers(start: int, count: int, embedding_size: int, seed: int) -> torch.Tensor:
    """Rows ``[start, start + count)`` of the N(0, 0.01) initial centers drawn from ``seed``.

    Rows come from fixed seeded blocks, so a shard gets exactly the rows the unsharded matrix has.
    """
    out = torch.empty(count, embedding_size)
    for block in range(start // INIT_BLOCK, (start + count - 1) // INIT_BLOCK + 1 if count else 0):
        gen = torch.Generator().manual_seed((seed + block * 0x9E3779B97F4A7C15) % 2**63)
        rows = torch.randn(INIT_BLOCK, embedding_size, generator=gen).mul_(INIT_STD)
        lo, hi = max(start, block * INIT_BLOCK), min(start + count, (block + 1) * INIT_BLOCK)
        out[lo - start : hi - start] = rows[lo - block * INIT_BLOCK : hi - block * INIT_BLOCK]
    return out


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Raise DataError unless ``labels`` are integers in [0, num_classes).

    Reads the labels: on a GPU that is a host sync, so the trainer calls this on the host copy.
    """
    if labels.numel() and (labels.is_floating_point() or labels.is_complex()):
        raise DataError(f"labels must be integers, got {labels.dtype}")
    if labels.numel():
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise DataError(
                f"label {bad} is outside [0, {num_classes}): head.num_classes is {num_classes}; "
                "set it to the dataset's number of identities (or null to take it from the dataset)"
            )


def total_loss(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of named loss terms, in their order (the same float rounding on every rank)."""
    values = list(terms.values())
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


def _draw_seed() -> int:
    """A seed for the centers taken from torch's global RNG, so ``seed`` in the config governs it."""
    return int(torch.randint(0, 2**62, (1,)).item())


class _CenterClassifier(nn.Module):
    """Common part: the centers of classes ``[class_start, class_start + num_local)``, sampling, margin logits."""

    def __init__(self, embedding_size: int, num_classes: int, head: nn.Module, sample_rate: float,
                 class_start: int, num_local: int, seed: int):
        super().__init__()
        problems = []
        if embedding_size < 1:
            problems.append(f"model.embedding_size: must be >= 1, got {embedding_size}")
        if num_classes < 2:
            problems.append(f"head.num_classes: need at least 2 classes, got {num_classes}")
        if not 0 < sample_rate <= 1:
            problems.append(f"head.sample_rate: must be in (0, 1], got {sample_rate}")
        per_class = getattr(head, "centers_per_class", 1)
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
            problems.append(f"head.centers_per_class: the head '{type(head).__name__}' asks for {per_class!r} "
                            "centers per class; it must be an integer >= 1")
        if problems:
            raise ConfigError(problems)
        self.embedding_size, self.num_classes, self.sample_rate = embedding_size, num_classes, float(sample_rate)
        self.class_start, self.num_local = class_start, num_local
        # K centers per class, class-major: class c's are rows c*K ... c*K+K-1 (of the unsharded matrix)
        self.centers_per_class = per_class
        self.weight = nn.Parameter(init_centers(class_start * per_class, num_local * per_class, embedding_size, seed))
        self.head = head
        configure = getattr(head, "configure", None)
        if callable(configure):  # e.g. an initial bias that depends on the class count
            configure(num_classes=num_classes, sample_rate=self.sample_rate)
        self.draw_key: tuple[int, int, int] | None = None  # (seed, epoch, batch), set by the trainer per micro-batch
        # reading label values is a host sync on a GPU; the trainer turns this off and checks them on the host
        self.checks_labels = True

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch's loss: the sum of :meth:`loss_terms`."""
        return total_loss(self.loss_terms(embeddings, labels))

    def loss_terms(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named scalar terms whose sum is the batch's loss (``margin``: the margin softmax loss)."""
        raise NotImplementedError

    def _check_shape(self, embeddings: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ConfigError([f"model.embedding_size: the classifier takes (N, {self.embedding_size}) "
                               f"embeddings, the backbone gave {tuple(embeddings.shape)}"])

    def _check_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        self._check_shape(embeddings)
        if labels.numel() != embeddings.shape[0]:
            raise DataError(f"{labels.numel()} labels for {embeddings.shape[0]} embeddings "
                            f"(labels shape {tuple(labels.shape)})")
        if labels.numel() and (labels.is_floating_point() or labels.is_complex()):
            raise DataError(f"labels must be integers, got {labels.dtype}")
        if self.checks_labels:
            check_labels(labels, self.num_classes)

    def sample_centers(self, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(index of the local classes used, or None for all; each label's column in them, -1 if not local).

        Partial FC: in training mode with ``sample_rate < 1`` every local positive class is kept and
        random negatives fill up to ``ceil(sample_rate * num_local)`` classes (with K centers per class,
        :meth:`logits` takes all K rows of each). When the batch has no
        more labels than that, the draw has a fixed size and never waits for the device; otherwise
        (tiny class counts) the number of distinct positives decides it, which reads them.
        """
        local = labels.reshape(-1).long() - self.class_start
        local = torch.where((local >= 0) & (local < self.num_local), local, torch.full_like(local, -1))
        if not self.training or self.sample_rate >= 1.0:
            return None, local
        num_sample = min(self.num_local, max(1, math.ceil(self.sample_rate * self.num_local)))
        if local.numel() <= num_sample:  # every positive fits: no host sync
            positive = torch.zeros(self.num_local + 1, dtype=torch.bool, device=local.device)
            positive[torch.where(local >= 0, local, self.num_local)] = True  # rows not held here mark the spare slot
            score = torch.rand(self.num_local, device=local.device).masked_fill_(positive[:-1], 2.0)
            index = torch.topk(score, num_sample, sorted=False).indices.sort().values  # 2.0: positives always win
        else:
            positive = torch.unique(local[local >= 0])
            if positive.numel() >= num_sample:
                index = positive
            else:
                score = torch.rand(self.num_local, device=local.device)
                score[positive] = 2.0  # above any uniform draw: positives always win
                index = torch.topk(score, num_sample, sorted=False).indices.sort().values
        targets = torch.searchsorted(index, local.clamp(min=0))
        return index, torch.where(local >= 0, targets, torch.full_like(targets, -1))

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor,
               rows: Callable[[], tuple[torch.Tensor, int, Any]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Margin logits (N, used centers) in float32 and the target column of each row (-1: not here).

        For a head with ``elementwise_loss`` the first tensor holds its loss elements instead of logits.

        ``rows``: a callable giving (positions in the global batch, global row count, sum over the
        ranks holding other rows), called only for a head that uses a :class:`HeadBatch`; default:
        these rows are the whole batch.
        """
        index, targets = self.sample_centers(labels)
        per_class = self.centers_per_class
        if per_class > 1 and index is not None:  # every center of each sampled class
            index = (index.unsqueeze(1) * per_class + torch.arange(per_class, device=index.device)).reshape(-1)
        weight = self.weight if index is None else self.weight[index]
        cosine = F.linear(F.normalize(embeddings.to(weight.dtype), dim=1), F.normalize(weight, dim=1))
        cosine = cosine.float().clamp(-1.0, 1.0)
        if per_class > 1:  # a class's cosine is that of its nearest center; only that center gets the gradient
            cosine = cosine.reshape(cosine.shape[0], -1, per_class).max(dim=2).values
        norms = torch.linalg.vector_norm(embeddings.float(), dim=1, keepdim=True)
        if not getattr(self.head, "uses_batch", False):
            return self.head(cosine, targets, norms).float(), targets
        batch = self.head_batch(cosine, targets, rows)
        return self.head(cosine, targets, norms, batch).float(), targets

    def head_batch(self, cosine: torch.Tensor, targets: torch.Tensor,
                   rows: Callable[[], tuple[torch.Tensor, int, Any]] | None) -> HeadBatch:
        """The :class:`HeadBatch` of these rows; the target cosines come from whichever rank holds the center."""
        owned = (targets >= 0).unsqueeze(1)
        with torch.no_grad():
            target_cosine = cosine.gather(1, targets.clamp(min=0).unsqueeze(1)) * owned
            target_cosine = self.sum_over_shards(target_cosine)
        n = cosine.shape[0]
        positions, global_rows, reduce_sum = rows() if rows is not None else (torch.arange(n), n, lambda t: t)
        return HeadBatch(target_cosine, positions, global_rows, self.draw_key, reduce_sum)

    def sum_over_shards(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks that hold the other centers (none here: all centers are local)."""
        return tensor

    def margin_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The ``margin`` term: softmax cross-entropy of the head's logits, or its own loss.

        A head with ``elementwise_loss`` returns (N, columns) loss elements; a row's loss is their sum over
        every class, so the term is the sum of this process's elements divided by N, summed over the
        ranks that hold the other centers. Only the value is summed over ranks: each rank's gradient
        reaches its own columns (its centers, its share of the head's parameters' gradient) and the
        embeddings, whose gradient the sharded gather sums, as with the softmax.
        """
        if getattr(self.head, "elementwise_loss", False):
            return self.sum_loss_over_shards(outputs.sum() / outputs.shape[0])
        return self.cross_entropy(outputs, targets)

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean softmax cross-entropy; every row's target is among these columns."""
        return F.cross_entropy(logits, targets)

    def sum_loss_over_shards(self, value: torch.Tensor) -> torch.Tensor:
        """A loss summed over the ranks holding other centers, the gradient left to each rank's own part."""
        return value

    def head_terms(self, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms the head adds beside the margin loss (e.g. MagFace's regulariser), named by the head."""
        extra = getattr(self.head, "extra_terms", None)
        if not callable(extra):
            return {}
        return dict(extra(torch.linalg.vector_norm(embeddings.float(), dim=1, keepdim=True)))

    # -- checkpoints that do not depend on the number of ranks ---------------------------------
    def full_rows(self, local: torch.Tensor, rank0_only: bool = False) -> torch.Tensor | None:
        """All classes' rows of a per-center tensor shaped like ``weight`` (e.g. optimizer momentum)."""
        return local.detach().cpu().clone()

    def local_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This process's rows of an all-classes tensor (the inverse of ``full_rows``): K rows per class."""
        k = self.centers_per_class
        return full[self.class_start * k : (self.class_start + self.num_local) * k]

    def full_state_dict(self, rank0_only: bool = False) -> dict[str, torch.Tensor]:
        """``{'weight': (num_classes * K, D), 'head.*': buffers}`` on the CPU; collective when sharded.

        With ``rank0_only`` the other ranks get an empty dict (and hold no full copy).
        """
        weight = self.full_rows(self.weight, rank0_only)
        if weight is None:
            return {}
        state = {"weight": weight}
        state.update({f"head.{k}": v.detach().cpu().clone() for k, v in self.head.state_dict().items()})
        return state

    def load_full_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        """Load a ``full_state_dict`` (or a MarginClassifier ``state_dict``) saved with any number of ranks."""
        weight = state.get("weight")
        k = self.centers_per_class
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (self.num_classes * k, self.embedding_size):
            found = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            if k == 1:
                needs = f"({self.num_classes}, {self.embedding_size}) (head.num_classes, model.embedding_size)"
            else:
                needs = (f"({self.num_classes * k}, {self.embedding_size}) (head.num_classes x {k} centers per class "
                         f"of head '{type(self.head).__name__}', model.embedding_size)")
            hint = ""
            if (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] % self.num_classes == 0
                    and weight.shape[0] // self.num_classes != k):
                hint = (f" (it holds {weight.shape[0] // self.num_classes} centers per class: was it saved with "
                        "another head.type or its k?)")
            raise CheckpointError(
                f"{source}: the classifier weight is {found}, the config needs {needs}; "
                f"resume with the config it was saved with{hint}"
            )
        head_state = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        extra = sorted(k for k in state if k != "weight" and not k.startswith("head."))
        if extra:
            raise CheckpointError(f"{source}: unexpected classifier key(s) {', '.join(extra)}")
        try:
            self.head.load_state_dict(head_state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"{source}: the saved head state does not fit head '{type(self.head).__name__}' "
                                  f"({first}); was it saved with another head.type?") from None
        with torch.no_grad():
            self.weight.copy_(self.local_rows(weight).to(self.weight.device, self.weight.dtype))

    def extra_repr(self) -> str:
        per_class = f", centers_per_class={self.centers_per_class}" if self.centers_per_class > 1 else ""
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"classes=[{self.class_start}, {self.class_start + self.num_local}), sample_rate={self.sample_rate}"
                f"{per_class}")


class MarginClassifier(_CenterClassifier):
    """All class centers on this process: normalized embeddings and centers -> head -> cross-entropy.

    ``forward(embeddings, labels)`` returns the batch's loss; ``loss_terms`` the named terms it sums. With ``sample_rate < 1`` (training mode
    only) each step uses the batch's positive centers plus random negatives (Partial FC); only
    those centers get a gradient.
    """

    def __init__(self, embedding_size: int, num_classes: int, head: nn.Module, sample_rate: float = 1.0):
        super().__init__(embedding_size, num_classes, head, sample_rate, 0, num_classes, _draw_seed())
        # (rank, world size) when DDP runs one replica per rank, each on its part of the global batch
        self.replicas: tuple[int, int] = (0, 1)

    def _rows(self, n: int) -> tuple[torch.Tensor, int, Any]:
        rank, world = self.replicas
        if world == 1:
            return torch.arange(n), n, lambda t: t

        def reduce_sum(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            dist.all_reduce(t)
            return t

        return torch.arange(n) * world + rank, n * world, reduce_sum  # DistributedSampler's order

    def loss_terms(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_inputs(embeddings, labels)
        logits, targets = self.logits(embeddings, labels, lambda: self._rows(embeddings.shape[0]))
        return {"margin": self.margin_loss(logits, targets), **self.head_terms(embeddings)}


class ShardedMarginClassifier(_CenterClassifier):
    """Class centers split across the ranks of a process group; the loss is that of the global batch.

    ``forward(local_embeddings, local_labels)`` all-gathers embeddings (gradient flows back to each
    rank's own) and labels, computes margin logits for this rank's centers and a distributed
    softmax cross-entropy (or the head's element-wise loss summed over the ranks), and returns the
    same mean loss on every rank. Do not wrap it in DDP:
    its centers differ per rank. Set ``ddp_backbone=True`` when the backbone is wrapped in
    DistributedDataParallel (which averages gradients over ranks): the embeddings' gradient is
    then multiplied by the world size so the averaged backbone gradient is the global loss's.
    Without an initialised process group (or with one rank) it behaves as MarginClassifier.
    """

    def __init__(self, embedding_size: int, num_classes: int, head: nn.Module, sample_rate: float = 1.0,
                 group: Any = None, ddp_backbone: bool = False):
        distributed = dist.is_available() and dist.is_initialized()
        self_world = dist.get_world_size(group) if distributed else 1
        self_rank = dist.get_rank(group) if distributed else 0
        if num_classes < self_world:
            raise ConfigError([f"head.num_classes: {num_classes} classes cannot be sharded over {self_world} ranks"])
        seed = _draw_seed()
        if self_world > 1:  # one seed for all ranks: the shards are a partition of one matrix
            seed_tensor = torch.tensor([seed], dtype=torch.int64, device=_device_for(group))
            dist.broadcast(seed_tensor, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
            seed = int(seed_tensor.item())
        start, count = shard_range(num_classes, self_world, self_rank)
        super().__init__(embedding_size, num_classes, head, sample_rate, start, count, seed)
        self.group, self.world_size, self.rank = group, self_world, self_rank
        self.ddp_backbone = bool(ddp_backbone)
        # the ranks' batch sizes are host numbers: exchanging them over gloo on the CPU keeps the host
        # from waiting for the device, as reading an NCCL result would (a collective call: all ranks build it)
        self.size_group = group
        if self_world > 1 and dist.get_backend(group) != "gloo":
            ranks = dist.get_process_group_ranks(group) if group is not None else None
            self.size_group = dist.new_group(ranks=ranks, backend="gloo")

    def loss_terms(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.world_size == 1:
            self._check_inputs(local_embeddings, local_labels)
            logits, targets = self.logits(local_embeddings, local_labels)
            return {"margin": self.margin_loss(logits, targets), **self.head_terms(local_embeddings)}
        self._check_shape(local_embeddings)  # the same model on every rank: all raise or none
        if local_labels.numel() != local_embeddings.shape[0]:
            raise DataError(f"rank {self.rank}: {local_labels.numel()} labels for {local_embeddings.shape[0]} embeddings")
        sizes = _gather_sizes(local_embeddings.shape[0], torch.device("cpu"), self.size_group)
        scale = float(self.world_size) if self.ddp_backbone else 1.0
        embeddings = _GatherRows.apply(local_embeddings, sizes, self.group, scale)
        labels = _gather_padded(local_labels.reshape(-1).long().to(local_embeddings.device), sizes, self.group)
        self._check_inputs(embeddings, labels)  # the same global labels on every rank: all raise or none
        def rows() -> tuple[torch.Tensor, int, Any]:  # every rank holds the whole batch, gathered rank-major:
            # rank r's i-th row is global position i * world + r (DistributedSampler's order)
            positions = torch.cat([torch.arange(n) * self.world_size + r for r, n in enumerate(sizes)])
            return positions, sum(sizes), lambda t: t

        logits, targets = self.logits(embeddings, labels, rows)
        terms = {"margin": self.margin_loss(logits, targets)}
        for name, term in self.head_terms(embeddings).items():
            # the same term on every rank of the same global rows: its gradient reaches the embeddings once per
            # rank through the gather's all-reduce, so each rank passes on 1/world of it (the value stays whole)
            share = term / self.world_size
            terms[name] = share + (term - share).detach()
        return terms

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return F.cross_entropy(logits, targets)
        return _DistCrossEntropy.apply(logits, targets, self.group)

    def sum_loss_over_shards(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return value
        return _SumOverRanks.apply(value, self.group)

    def sum_over_shards(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            tensor = tensor.contiguous()
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def sync_head_gradients(self) -> None:
        """Sum the head's own parameters' gradients over the ranks (each saw only its shard's classes).

        The classifier is not under DDP when sharded, so without this a head's bias or threshold would
        step differently on every rank.
        """
        if self.world_size == 1:
            return
        for p in self.head.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.group)

    def full_rows(self, local: torch.Tensor, rank0_only: bool = False) -> torch.Tensor | None:
        if self.world_size == 1:
            return super().full_rows(local)
        counts = [shard_range(self.num_classes, self.world_size, r)[1] * self.centers_per_class
                  for r in range(self.world_size)]
        local = local.detach()
        if not rank0_only:
            return _gather_padded(local, counts, self.group).cpu()
        padded = _pad_rows(local, max(counts))
        dst = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        buffers = [torch.empty_like(padded) for _ in counts] if self.rank == 0 else None
        dist.gather(padded, buffers, dst=dst, group=self.group)
        if self.rank != 0:
            return None
        return torch.cat([b[:n] for b, n in zip(buffers, counts)]).cpu()


# -- collectives -------------------------------------------------------------------------------
def _device_for(group: Any) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor.contiguous()
    padded = tensor.new_zeros((rows,) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    return padded


def _gather_sizes(n: int, device: torch.device, group: Any) -> list[int]:
    world = dist.get_world_size(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s.item()) for s in sizes]


def _gather_padded(tensor: torch.Tensor, sizes: list[int], group: Any) -> torch.Tensor:
    """Concatenate every rank's rows (``sizes[r]`` rows from rank r) on every rank."""
    padded = _pad_rows(tensor, max(sizes))
    buffers = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(buffers, padded, group=group)
    return torch.cat([b[:n] for b, n in zip(buffers, sizes)])


class _GatherRows(torch.autograd.Function):
    """All-gather rows with autograd: the backward sums every rank's gradient and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int], group: Any, grad_scale: float) -> torch.Tensor:
        ctx.sizes, ctx.group, ctx.grad_scale = sizes, group, grad_scale
        ctx.rank = dist.get_rank(group)
        return _gather_padded(tensor, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        mine = grad[start : start + ctx.sizes[ctx.rank]]
        if ctx.grad_scale != 1.0:
            mine = mine * ctx.grad_scale
        return mine, None, None, None


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) a loss over the ranks; the backward passes the gradient on unchanged.

    Each rank's part depends only on its own centers (and on the gathered embeddings, whose gather sums
    the ranks' gradients), so d(total)/d(part) = 1 is the whole of the chain on every rank.
    """

    @staticmethod
    def forward(ctx, value: torch.Tensor, group: Any) -> torch.Tensor:
        total = value.detach().clone().contiguous()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _DistCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over logits whose columns are split across ranks."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, group: Any) -> torch.Tensor:
        row_max = logits.max(dim=1, keepdim=True).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        exp = torch.exp(logits - row_max)
        owned = (targets >= 0).unsqueeze(1)
        target_logit = logits.gather(1, targets.clamp(min=0).unsqueeze(1)) * owned
        stats = torch.cat([exp.sum(dim=1, keepdim=True), target_logit], dim=1)
        dist.all_reduce(stats, group=group)  # every row's target lives on exactly one rank
        row_sum, target_logit = stats[:, :1], stats[:, 1:]
        ctx.save_for_backward(exp.div_(row_sum), targets)
        return (row_sum.log() + row_max - target_logit).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        prob, targets = ctx.saved_tensors
        owned = (targets >= 0).unsqueeze(1).to(prob.dtype)  # subtract 1 at each owned target, 0 elsewhere: no sync
        grad_logits = prob.clone().scatter_add_(1, targets.clamp(min=0).unsqueeze(1), -owned)
        return grad_logits.mul_(grad / prob.shape[0]), None, None
