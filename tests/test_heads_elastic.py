"""ElasticFace: loss and gradients through the classifier against a float64 transcription with the same
drawn margins (arc, cos, plus), margins keyed by (seed, epoch, batch, global position), ElasticFace+ over
the global batch also when each rank holds only its rows, sigma = 0 against arcface/cosface, option
validation, and a short training run that is reproducible."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import make_tiny_data

import facecore
from facecore.errors import ConfigError
from facecore.train.classifier import MarginClassifier, ShardedMarginClassifier
from facecore.train.head_batch import HeadBatch
from facecore.train.trainer import train

KEY = (11, 2, 5)  # (seed, epoch, batch)
D, C = 8, 10


def elastic(**options):
    return facecore.create("heads", "elasticface", **options)


def draws(rows: int, key=KEY) -> list[float]:
    """The standard normals the head gets for global rows 0..rows-1 (a HeadBatch built as the classifier does)."""
    batch = HeadBatch(torch.zeros(rows, 1), torch.arange(rows), rows, key, lambda t: t)
    return batch.normal(1).double().reshape(-1).tolist()


def reference_margins(kind: str, m: float, sigma: float, plus: bool, z: list[float], target_cos: list[float]):
    """Per-row margins, transcribed: plus hands the sorted draws out, smallest to the largest target cosine."""
    if plus:
        by_cosine = sorted(range(len(z)), key=lambda i: (-target_cos[i], i))
        ranked = sorted(z)
        z = [0.0] * len(z)
        for k, i in enumerate(by_cosine):
            z[i] = ranked[k]
    margins = [m + sigma * v for v in z]
    if kind == "arc":
        margins = [min(max(v, 0.0), math.pi / 2) for v in margins]
    return margins


def reference_logits(cos: torch.Tensor, labels: list[int], margins: list[float], kind: str, s: float) -> torch.Tensor:
    """float64 margin logits: each target entry by its closed form, picked per row (no acos at the ends)."""
    rows = []
    for i, row in enumerate(cos):
        y = labels[i]
        if y < 0:
            rows.append(row * s)
            continue
        c, m = row[y], margins[i]
        if kind == "cos":
            target = c - m
        elif math.acos(min(max(float(c.detach()), -1.0), 1.0)) + m <= math.pi:
            target = torch.cos(torch.acos(c) + m)
        else:  # theta + m past pi: arcface's continuation
            target = c - m * math.sin(m)
        rows.append(torch.cat([row[:y], target.reshape(1), row[y + 1:]]) * s)
    return torch.stack(rows)


def through_classifier(head, embeddings, labels, key=KEY, seed=0):
    torch.manual_seed(seed)
    classifier = MarginClassifier(D, C, head).train()
    classifier.draw_key = key
    emb = embeddings.clone().requires_grad_(True)
    loss = classifier(emb, labels)
    loss.backward()
    return loss.detach(), emb.grad, classifier.weight.grad, classifier.weight.detach().clone()


def reference_loss(embeddings, weight, labels, kind, m, sigma, plus, s, key=KEY):
    emb = embeddings.double().clone().requires_grad_(True)
    w = weight.double().clone().requires_grad_(True)
    cos = F.normalize(emb, dim=1) @ F.normalize(w, dim=1).T
    target_cos = [float(cos.detach()[i, y]) for i, y in enumerate(labels.tolist())]
    margins = reference_margins(kind, m, sigma, plus, draws(len(labels), key), target_cos)
    loss = F.cross_entropy(reference_logits(cos, labels.tolist(), margins, kind, s), labels)
    loss.backward()
    return loss.detach(), emb.grad, w.grad


def batch_with_a_target_past_pi(seed: int = 1):
    """6 rows; row 0 points almost exactly away from its center, so theta + m passes pi."""
    torch.manual_seed(seed)
    embeddings, labels = torch.randn(6, D), torch.tensor([3, 1, 4, 1, 5, 9])
    torch.manual_seed(0)  # the classifier's centers, as through_classifier draws them
    centers = MarginClassifier(D, C, elastic()).weight.detach()
    embeddings[0] = -centers[3] * 40 + 0.01 * torch.randn(D)
    return embeddings, labels


CASES = [("arc", False), ("cos", False), ("arc", True), ("cos", True)]


@pytest.mark.parametrize("kind, plus", CASES)
def test_loss_and_gradients_equal_a_float64_transcription_with_the_same_margins(kind, plus) -> None:
    embeddings, labels = batch_with_a_target_past_pi()
    m, sigma, s = (0.5, 0.3, 16.0) if kind == "arc" else (0.35, 0.2, 16.0)  # a large sigma: margins spread widely
    loss, g_emb, g_w, weight = through_classifier(elastic(kind=kind, plus=plus, margin=m, sigma=sigma, scale=s),
                                                  embeddings, labels)
    ref_loss, ref_emb, ref_w = reference_loss(embeddings, weight, labels, kind, m, sigma, plus, s)
    cos0 = F.cosine_similarity(embeddings[0:1], weight[3:4]).item()
    assert math.acos(cos0) + m > math.pi  # the edge is exercised
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_emb.double(), ref_emb, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_w.double(), ref_w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind, plus", CASES)
def test_direct_call_with_unowned_rows_and_half_precision(kind, plus) -> None:
    # Rows labelled -1 (their center on another rank) keep their logits, but still take part in the plus sort.
    torch.manual_seed(3)
    cos = (torch.rand(6, 5, dtype=torch.float64) * 2 - 1)
    labels = torch.tensor([0, -1, 2, 4, -1, 1])
    target = torch.tensor([0.3, -0.2, 1.0, -1.0, 0.1, 0.6], dtype=torch.float64)  # targets at both ends
    for i, y in enumerate(labels.tolist()):
        if y >= 0:
            cos[i, y] = target[i]
    cos[0, 3], cos[5, 4] = 1.0, -1.0  # non-targets at both ends
    head = elastic(kind=kind, plus=plus, sigma=0.2, scale=10.0).train()
    m = head.margin
    batch = HeadBatch(target.float().reshape(-1, 1), torch.arange(6), 6, KEY, lambda t: t)
    inp = cos.clone().requires_grad_(True)
    out = head(inp, labels, None, batch)
    margins = reference_margins(kind, m, 0.2, plus, draws(6), target.tolist())
    torch.testing.assert_close(out, reference_logits(cos, labels.tolist(), margins, kind, 10.0), rtol=0, atol=1e-9)
    out.sum().backward()
    assert inp.grad.isfinite().all()
    for dtype in (torch.float16, torch.bfloat16):
        low = cos.to(dtype).requires_grad_(True)
        out = head(low, labels, None, batch)
        assert out.dtype == torch.float32 and out.isfinite().all()
        out.sum().backward()
        assert low.grad.isfinite().all()


@pytest.mark.parametrize("kind, plus", CASES)
def test_the_same_key_gives_the_same_loss_and_another_batch_index_another(kind, plus) -> None:
    embeddings, labels = batch_with_a_target_past_pi()
    head = elastic(kind=kind, plus=plus, scale=16.0)
    first = through_classifier(head, embeddings, labels)[0]
    again = through_classifier(head, embeddings, labels)[0]
    other = through_classifier(head, embeddings, labels, key=(KEY[0], KEY[1], KEY[2] + 1))[0]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def two_ranks(head, cosine, labels, target, rows=4):
    """The head on rows 0,2 and 1,3 in two threads whose reduce_sum sums over both, like replicated DDP."""
    barrier, deposited, outputs = threading.Barrier(2), {}, {}

    def reduce_sum_for(rank):
        def reduce_sum(t):
            deposited[rank] = t
            barrier.wait()
            total = deposited[0] + deposited[1]
            barrier.wait()
            return total
        return reduce_sum

    def run(rank):
        positions = torch.arange(rank, rows, 2)
        batch = HeadBatch(target[positions], positions, rows, KEY, reduce_sum_for(rank))
        outputs[rank] = head(cosine[positions], labels[positions], None, batch)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outputs[0], outputs[1]


@pytest.mark.parametrize("kind, plus", CASES)
def test_margins_depend_only_on_the_global_position(kind, plus) -> None:
    torch.manual_seed(4)
    cosine = torch.rand(4, 6) * 2 - 1
    labels = torch.tensor([5, 0, 2, 2])
    target = cosine.gather(1, labels.unsqueeze(1))
    head = elastic(kind=kind, plus=plus, sigma=0.2).train()
    whole = head(cosine, labels, None, HeadBatch(target, torch.arange(4), 4, KEY, lambda t: t))
    if not plus:  # each rank alone: its own rows' draws, no exchange needed
        even = head(cosine[0::2], labels[0::2], None, HeadBatch(target[0::2], torch.tensor([0, 2]), 4, KEY, lambda t: t))
        odd = head(cosine[1::2], labels[1::2], None, HeadBatch(target[1::2], torch.tensor([1, 3]), 4, KEY, lambda t: t))
    else:  # plus sorts over the global batch: each rank gathers the other's rows through reduce_sum
        even, odd = two_ranks(head, cosine, labels, target)
    assert torch.equal(whole[0::2], even) and torch.equal(whole[1::2], odd)


def global_batch():
    gen = torch.Generator().manual_seed(42)
    weight, emb = torch.randn(C, D, generator=gen), torch.randn(8, D, generator=gen)
    return weight, emb, torch.tensor([0, 5, 6, 9, 3, 7, 5, 2])


def _rank_main(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        weight, emb, labels = global_batch()
        mine = slice(rank, None, 2)  # DistributedSampler's order: global position i * 2 + rank
        results = {}
        for kind in ("arc", "cos"):
            replicated = MarginClassifier(D, C, elastic(kind=kind, plus=True, sigma=0.2, scale=16.0)).train()
            replicated.load_full_state_dict({"weight": weight})
            replicated.replicas, replicated.draw_key = (rank, 2), KEY
            logits, _ = replicated.logits(emb[mine], labels[mine], lambda: replicated._rows(4))
            sharded = ShardedMarginClassifier(D, C, elastic(kind=kind, plus=True, sigma=0.2, scale=16.0)).train()
            sharded.load_full_state_dict({"weight": weight})
            sharded.draw_key = KEY
            results[kind] = {"replicated": logits.detach(), "sharded": sharded(emb[mine], labels[mine]).detach()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_plus_over_two_processes_matches_one_replicated_and_sharded(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.start_processes(_rank_main, args=(port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the 2-process gloo run hung for 120 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    weight, emb, labels = global_batch()
    for kind in ("arc", "cos"):
        one = MarginClassifier(D, C, elastic(kind=kind, plus=True, sigma=0.2, scale=16.0)).train()
        one.load_full_state_dict({"weight": weight})
        one.draw_key = KEY
        logits, _ = one.logits(emb, labels)
        for r in range(2):  # each replica's rows got the margins of their place in the global sort
            torch.testing.assert_close(ranks[r][kind]["replicated"], logits[r::2].detach(), rtol=1e-6, atol=1e-5)
            # sharded: the global batch's loss (rows gathered rank-major, margins by global position)
            torch.testing.assert_close(ranks[r][kind]["sharded"], one(emb, labels).detach(), rtol=1e-6, atol=1e-6)


def test_plus_refuses_rows_that_do_not_cover_the_global_batch() -> None:
    head = elastic(plus=True).train()
    cosine, labels = torch.rand(2, 4), torch.tensor([0, 1])
    lonely = HeadBatch(cosine[:, :1], torch.tensor([0, 2]), 4, KEY, lambda t: t)  # no exchange with the other rank
    with pytest.raises(ConfigError, match="head.plus"):
        head(cosine, labels, None, lonely)


def test_plus_gives_the_smallest_margin_to_the_row_closest_to_its_center() -> None:
    target = torch.tensor([[0.1], [0.9], [-0.4], [0.5], [0.2]])
    head = elastic(kind="cos", plus=True, sigma=0.1)
    margins = head.margins(HeadBatch(target, torch.arange(5), 5, KEY, lambda t: t)).reshape(-1)
    order = target.reshape(-1).argsort(descending=True)
    assert (margins[order].diff() > 0).all()  # larger target cosine, smaller margin
    assert sorted(margins.tolist()) == sorted(0.35 + 0.1 * v for v in draws(5))


@pytest.mark.parametrize("kind, plain", [("arc", "arcface"), ("cos", "cosface")])
@pytest.mark.parametrize("plus", [False, True])
def test_sigma_zero_is_the_fixed_margin_head(kind, plain, plus) -> None:
    embeddings, labels = batch_with_a_target_past_pi()
    got = through_classifier(elastic(kind=kind, plus=plus, sigma=0.0, margin=0.2, scale=16.0), embeddings, labels)
    fixed = through_classifier(facecore.create("heads", plain, margin=0.2, scale=16.0), embeddings, labels)
    for a, b in zip(got, fixed):
        assert torch.equal(a, b)


def test_eval_mode_uses_the_mean_margin() -> None:
    cosine, labels = torch.rand(3, 4) * 2 - 1, torch.tensor([0, 3, 1])
    head = elastic(kind="cos", margin=0.3).eval()
    batch = HeadBatch(cosine[:, :1], torch.arange(3), 3, None, lambda t: t)  # no draw key outside training
    torch.testing.assert_close(head(cosine, labels, None, batch), facecore.create("heads", "cosface", margin=0.3)(cosine, labels))


def test_margin_default_follows_the_kind() -> None:
    assert elastic().margin == 0.5 and elastic(kind="cos").margin == 0.35
    assert elastic(kind="cos", margin=0.2).margin == 0.2
    assert elastic().scale == 64.0 and elastic().sigma == 0.05


@pytest.mark.parametrize("options, key", [
    ({"sigma": -0.01}, "sigma"),
    ({"margin": 1.6}, "margin"),  # arc: below pi/2
    ({"kind": "cos", "margin": 1.5}, "margin"),  # cos: at most 1
    ({"margin": -0.1}, "margin"),
    ({"kind": "sphere"}, "kind"),
    ({"scale": 0}, "scale"),
])
def test_out_of_range_options_raise_a_config_error_naming_the_key(options, key) -> None:
    with pytest.raises(ConfigError, match=key):
        elastic(**options)
    from facecore_plugins.elasticface import ElasticFace
    with pytest.raises(ConfigError, match=rf"head\.{key}"):
        ElasticFace(**options)


def test_a_short_training_run_is_finite_and_reproducible(tmp_path: Path) -> None:
    from test_trainer import final_weights, tiny_config

    data = make_tiny_data(tmp_path / "data")
    head = {"type": "elasticface", "scale": 16, "margin": 0.2}
    runs = [train(tiny_config(data, tmp_path / name, head=head), verbose=False) for name in ("a", "b")]
    fixed = train(tiny_config(data, tmp_path / "c", head={"type": "arcface", "scale": 16, "margin": 0.2}), verbose=False)
    lines = [json.loads(line) for line in (Path(runs[0]["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if line["event"] == "train"]
    assert losses and all(math.isfinite(v) for v in losses)
    a, b = (final_weights(run["run_dir"]) for run in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = final_weights(fixed["run_dir"])  # the training loop does draw margins: not arcface's fixed one
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
