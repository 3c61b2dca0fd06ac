"""The margin classifier: loss against a hand-written reference, Partial FC sampling, checkpoints
that do not depend on the number of ranks, and the sharded classifier on 2 gloo processes."""

from __future__ import annotations

import math
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import facecore
from facecore.train.classifier import (
    INIT_BLOCK,
    MarginClassifier,
    ShardedMarginClassifier,
    init_centers,
    shard_range,
)
from facecore.errors import CheckpointError, ConfigError, DataError


def head(name="arcface", **options):
    return facecore.create("heads", name, **options)


def reference_loss(embeddings, labels, weight, s=64.0, m=0.5):
    """ArcFace softmax loss written out directly from its definition."""
    cos = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).T
    theta = torch.acos(cos.gather(1, labels[:, None]).clamp(-1 + 1e-7, 1 - 1e-7))
    target = torch.where(theta + m <= math.pi, torch.cos(theta + m), torch.cos(theta) - m * math.sin(m))
    logits = cos.scatter(1, labels[:, None], target) * s
    return F.cross_entropy(logits, labels)


def batch(n=6, d=8, c=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen), torch.randint(0, c, (n,), generator=gen)


def test_loss_matches_reference_and_sample_rate_one_is_full():
    torch.manual_seed(0)  # the centers' initial values come from the global RNG
    emb, labels = batch()
    clf = MarginClassifier(8, 10, head(), sample_rate=1.0).train()
    e1 = emb.clone().requires_grad_(True)
    loss = clf(e1, labels)
    loss.backward()
    w = clf.weight.detach().clone().requires_grad_(True)
    e2 = emb.clone().requires_grad_(True)
    ref = reference_loss(e2, labels, w)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    # the reference takes acos then cos(theta + m), the classifier the expanded form: float32
    # rounding differs by a few ulps of gradients of size ~s
    torch.testing.assert_close(clf.weight.grad, w.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(e1.grad, e2.grad, rtol=1e-4, atol=1e-4)
    assert clf.weight.shape == (10, 8) and isinstance(clf.head, torch.nn.Module)


def test_sampling_every_center_equals_the_full_classifier_exactly():
    emb, labels = batch()
    full = MarginClassifier(8, 10, head()).train()
    sampled = MarginClassifier(8, 10, head(), sample_rate=0.95).train()  # ceil(9.5) = all 10 centers
    sampled.load_state_dict(full.state_dict())
    losses, grads = [], []
    for clf in (full, sampled):
        e = emb.clone().requires_grad_(True)
        loss = clf(e, labels)
        loss.backward()
        losses.append(loss)
        grads.append((clf.weight.grad, e.grad))
    assert sampled.sample_centers(labels)[0].tolist() == list(range(10))
    assert torch.equal(losses[0], losses[1])
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_partial_fc_keeps_positives_and_only_they_and_sampled_negatives_learn():
    torch.manual_seed(0)
    emb, labels = batch(n=5, c=40)
    clf = MarginClassifier(8, 40, head(), sample_rate=0.25).train()
    torch.manual_seed(1)
    index, targets = clf.sample_centers(labels)
    assert len(index) == 10 and set(labels.tolist()) <= set(index.tolist())
    assert torch.equal(index[targets], labels)
    assert torch.equal(index, index.sort().values)
    logits, targets2 = clf.logits(emb, labels)  # a new draw of negatives, same contract
    assert logits.shape == (5, 10) and logits.dtype == torch.float32

    torch.manual_seed(1)  # the same draw as above for the loss
    clf(emb, labels).backward()
    used = torch.zeros(40, dtype=torch.bool)
    used[index] = True
    assert clf.weight.grad[~used].abs().sum() == 0
    assert (clf.weight.grad[used].abs().sum(dim=1) > 0).all()

    clf.eval()  # evaluation uses every center
    assert clf.sample_centers(labels)[0] is None
    assert clf.logits(emb, labels)[0].shape == (5, 40)


def test_partial_fc_with_more_positives_than_samples_uses_exactly_the_positives():
    clf = MarginClassifier(8, 40, head(), sample_rate=0.05).train()  # 2 centers, 4 distinct labels
    labels = torch.tensor([3, 17, 3, 30, 8])
    index, targets = clf.sample_centers(labels)
    assert index.tolist() == [3, 8, 17, 30]
    assert torch.equal(index[targets], labels)


def test_bad_inputs_are_reported():
    clf = MarginClassifier(8, 10, head())
    with pytest.raises(DataError, match=r"label 10 is outside \[0, 10\).*head.num_classes"):
        clf(torch.randn(2, 8), torch.tensor([1, 10]))
    with pytest.raises(DataError, match="label -1"):
        clf(torch.randn(2, 8), torch.tensor([-1, 0]))
    with pytest.raises(ConfigError, match="model.embedding_size"):
        clf(torch.randn(2, 16), torch.tensor([1, 2]))
    with pytest.raises(DataError, match="3 labels for 2 embeddings"):
        clf(torch.randn(2, 8), torch.tensor([1, 2, 3]))
    with pytest.raises(ConfigError, match="head.sample_rate"):
        MarginClassifier(8, 10, head(), sample_rate=0)
    with pytest.raises(ConfigError, match="head.num_classes"):
        MarginClassifier(8, 1, head())


def test_full_state_dict_round_trip_keeps_head_buffers():
    emb, labels = batch()
    a = MarginClassifier(8, 10, head("adaface")).train()
    a(emb, labels)  # moves AdaFace's running statistics
    state = a.full_state_dict()
    assert set(state) == {"weight", "head.batch_mean", "head.batch_std"}
    assert state["head.batch_mean"].item() != 20.0
    b = MarginClassifier(8, 10, head("adaface"))
    b.load_full_state_dict(state)
    assert torch.equal(b.weight, a.weight) and torch.equal(b.head.batch_mean, a.head.batch_mean)
    b.load_full_state_dict(a.state_dict())  # a plain state dict is the same format
    with pytest.raises(CheckpointError, match=r"\(12, 8\)"):
        MarginClassifier(8, 12, head("adaface")).load_full_state_dict(state, "last.pth")
    with pytest.raises(CheckpointError, match="head.type"):
        MarginClassifier(8, 10, head("arcface")).load_full_state_dict(state, "last.pth")


def test_initial_centers_do_not_depend_on_sharding():
    whole = init_centers(0, INIT_BLOCK + 300, 4, seed=7)
    part = init_centers(INIT_BLOCK - 100, 250, 4, seed=7)  # crosses a block boundary
    assert torch.equal(part, whole[INIT_BLOCK - 100 : INIT_BLOCK + 150])
    assert whole.std().item() == pytest.approx(0.01, rel=0.05)
    assert not torch.equal(init_centers(0, 10, 4, seed=8), whole[:10])


@pytest.mark.parametrize("num_classes, world", [(11, 2), (10, 3), (7, 7), (1000, 8)])
def test_shard_ranges_partition_the_classes(num_classes, world):
    ranges = [shard_range(num_classes, world, r) for r in range(world)]
    assert ranges[0][0] == 0
    for (start, count), (nxt, _) in zip(ranges, ranges[1:]):
        assert start + count == nxt
    assert sum(c for _, c in ranges) == num_classes
    counts = [c for _, c in ranges]
    assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)


def test_sharded_without_process_group_is_the_plain_classifier():
    emb, labels = batch()
    torch.manual_seed(3)
    plain = MarginClassifier(8, 10, head())
    torch.manual_seed(3)
    sharded = ShardedMarginClassifier(8, 10, head())
    assert sharded.world_size == 1 and torch.equal(sharded.weight, plain.weight)
    assert torch.equal(sharded(emb, labels), plain(emb, labels))
    assert torch.equal(sharded.full_state_dict()["weight"], plain.weight.detach())


# -- 2 processes with gloo ----------------------------------------------------------------------
D, C, SIZES = 8, 11, [4, 3]  # 11 classes: shards of 6 and 5; uneven local batches
# softmax heads, and heads with an element-wise loss of their own (summed over the shards) and a learned bias
SHARDED_HEADS = ("arcface", "adaface", "sphereface2", "uniface")


def global_data():
    gen = torch.Generator().manual_seed(42)
    weight = torch.randn(C, D, generator=gen)
    emb = torch.randn(sum(SIZES), D, generator=gen)
    labels = torch.tensor([0, 5, 6, 10, 3, 7, 5])  # classes on both shards, one repeated
    return weight, emb, labels


def _worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        weight, emb, labels = global_data()
        lo, hi = sum(SIZES[:rank]), sum(SIZES[: rank + 1])
        results = {}
        for name in SHARDED_HEADS:
            clf = ShardedMarginClassifier(D, C, head(name)).train()
            clf.load_full_state_dict({"weight": weight, **{f"head.{k}": v for k, v in clf.head.state_dict().items()}})
            local = emb[lo:hi].clone().requires_grad_(True)
            loss = clf(local, labels[lo:hi])
            loss.backward()
            clf.sync_head_gradients()  # what the trainer does before the step: a head's bias sees every shard
            results[name] = {"loss": loss.detach(), "weight_grad": clf.weight.grad.clone(), "emb_grad": local.grad,
                             "start": clf.class_start, "count": clf.num_local, "state": clf.full_state_dict(),
                             "head_grads": {k: p.grad.clone() for k, p in clf.head.named_parameters()}}

        clf = ShardedMarginClassifier(D, C, head(), ddp_backbone=True).train()
        clf.load_full_state_dict({"weight": weight})
        local = emb[lo:hi].clone().requires_grad_(True)
        clf(local, labels[lo:hi]).backward()
        results["ddp_emb_grad"] = local.grad

        torch.manual_seed(100 + rank)  # each rank draws its own negatives
        clf = ShardedMarginClassifier(D, C, head(), sample_rate=0.4).train()
        index, targets = clf.sample_centers(labels)
        owned = [int(x) - clf.class_start for x in labels if clf.class_start <= x < clf.class_start + clf.num_local]
        results["positives_kept"] = set(owned) <= set(index.tolist())
        results["num_sampled"] = len(index)
        local = emb[lo:hi].clone().requires_grad_(True)
        loss = clf(local, labels[lo:hi])
        loss.backward()
        results["sampled_loss"] = loss.detach()
        results["sampled_grad_finite"] = bool(torch.isfinite(local.grad).all() and torch.isfinite(clf.weight.grad).all())
        results["rank0_only"] = clf.full_state_dict(rank0_only=True)

        torch.manual_seed(0 if rank == 0 else 999)  # ranks seeded differently: init must still agree
        clf = ShardedMarginClassifier(4, INIT_BLOCK + 1000, head())
        results["init"] = clf.full_state_dict()["weight"]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    ctx = mp.start_processes(_worker, args=(2, free_port(), str(out)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the 2-process gloo test hung for 120 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", SHARDED_HEADS)
def test_two_ranks_match_one_process(two_ranks, name):
    weight, emb, labels = global_data()
    ref = MarginClassifier(D, C, head(name)).train()
    ref.load_full_state_dict({"weight": weight, **{f"head.{k}": v for k, v in ref.head.state_dict().items()}})
    e = emb.clone().requires_grad_(True)
    loss = ref(e, labels)
    loss.backward()
    for rank, res in enumerate(two_ranks):
        r = res[name]
        assert (r["start"], r["count"]) == shard_range(C, 2, rank)
        torch.testing.assert_close(r["loss"], loss.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["weight_grad"], ref.weight.grad[r["start"] : r["start"] + r["count"]],
                                   rtol=1e-4, atol=1e-6)
        lo = sum(SIZES[:rank])
        torch.testing.assert_close(r["emb_grad"], e.grad[lo : lo + SIZES[rank]], rtol=1e-4, atol=1e-6)
        assert r["head_grads"].keys() == {k for k, _ in ref.head.named_parameters()}
        for key, p in ref.head.named_parameters():
            torch.testing.assert_close(r["head_grads"][key], p.grad, rtol=1e-4, atol=1e-6)
        # The checkpoint does not depend on the number of ranks: same weight, same head statistics.
        assert set(r["state"]) == set(ref.full_state_dict())
        for key, value in ref.full_state_dict().items():
            torch.testing.assert_close(r["state"][key], value)


def test_ddp_backbone_scales_embedding_gradients_by_world_size(two_ranks):
    for res in two_ranks:
        torch.testing.assert_close(res["ddp_emb_grad"], 2 * res["arcface"]["emb_grad"])


def test_two_ranks_with_sampling(two_ranks):
    for rank, res in enumerate(two_ranks):
        assert res["positives_kept"]
        assert res["num_sampled"] >= math.ceil(0.4 * shard_range(C, 2, rank)[1])
        assert torch.isfinite(res["sampled_loss"]) and res["sampled_grad_finite"]
    assert two_ranks[0]["sampled_loss"] == two_ranks[1]["sampled_loss"]
    assert set(two_ranks[0]["rank0_only"]) == {"weight"} and two_ranks[0]["rank0_only"]["weight"].shape == (C, D)
    assert two_ranks[1]["rank0_only"] == {}


def test_sharded_init_equals_unsharded_init(two_ranks):
    torch.manual_seed(0)
    plain = MarginClassifier(4, INIT_BLOCK + 1000, head())
    for res in two_ranks:
        assert torch.equal(res["init"], plain.weight.detach())
