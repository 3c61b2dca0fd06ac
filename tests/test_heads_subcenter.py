"""Sub-center ArcFace: K centers per class in the classifier (the class cosine is the max over them) and
the ``subcenter_arcface`` head, against a float64 transcription; sampling, checkpoints, sharding on 2 gloo
processes and a short training run."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import make_tiny_data, subprocess_env
from torch import nn

import facecore
from facecore.core.checkpoint import load_checkpoint
from facecore.core.runtime import DistInfo
from facecore.errors import CheckpointError, ConfigError
from facecore.train.checkpointing import TrainingCheckpoint
from facecore.train.classifier import MarginClassifier, ShardedMarginClassifier

D, C, K = 8, 5, 3
S, M = 16.0, 0.3


def subcenter(k: int = K, scale: float = S, margin: float = M) -> nn.Module:
    return facecore.create("heads", "subcenter_arcface", k=k, scale=scale, margin=margin)


def batch(n: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=gen) * 3, torch.randint(0, C, (n,), generator=gen)


def reference_loss(emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, k: int = K,
                   scale: float = S, margin: float = M) -> torch.Tensor:
    """The loss written out in float64: normalize, (N, C, K) cosines, max over K, ArcFace margin, CE."""
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T
    cos = cos.reshape(emb.shape[0], -1, k).max(dim=2).values
    target = cos.gather(1, labels.unsqueeze(1))
    theta = torch.acos(target)
    margined = torch.where(theta + margin <= math.pi, torch.cos(theta + margin), target - margin * math.sin(margin))
    logits = scale * cos.scatter(1, labels.unsqueeze(1), margined)
    return F.cross_entropy(logits, labels)


def test_registered_with_k_and_options_checked():
    head = subcenter()
    assert head.centers_per_class == K and isinstance(head, facecore.create("heads", "arcface").__class__)
    assert facecore.create("heads", "subcenter_arcface").centers_per_class == 3  # the default k
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match=r"\.k"):
            facecore.create("heads", "subcenter_arcface", k=bad)
    with pytest.raises(ConfigError, match="head.k"):  # built directly, without the schema
        type(head)(k=0)
    with pytest.raises(ConfigError, match="margin"):
        facecore.create("heads", "subcenter_arcface", margin=2.0)


def test_the_classifier_holds_k_centers_per_class_drawn_class_major():
    torch.manual_seed(1)
    clf = MarginClassifier(D, C, subcenter())
    assert clf.weight.shape == (C * K, D) and clf.centers_per_class == K
    torch.manual_seed(1)  # the same seed: the first C*K rows of the same blocks a K=1 classifier of C*K classes draws
    plain = MarginClassifier(D, C * K, facecore.create("heads", "arcface"))
    assert torch.equal(clf.weight, plain.weight)
    assert "centers_per_class=3" in repr(clf)


def test_a_head_asking_for_a_bad_center_count_is_a_config_error():
    class Bad(nn.Module):
        centers_per_class = 0

        def forward(self, cosine, labels, norms):
            return cosine

    with pytest.raises(ConfigError, match="head.centers_per_class"):
        MarginClassifier(D, C, Bad())


def test_loss_and_gradients_equal_the_float64_transcription():
    torch.manual_seed(0)
    clf = MarginClassifier(D, C, subcenter()).train()
    emb, labels = batch()
    e = emb.clone().requires_grad_(True)
    loss = clf(e, labels)
    loss.backward()
    e64 = emb.double().requires_grad_(True)
    w64 = clf.weight.detach().double().requires_grad_(True)
    ref = reference_loss(e64, w64, labels)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e.grad.double(), e64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(clf.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    # heads see (N, C) class cosines: the logits have one column per class
    logits, targets = clf.logits(emb, labels)
    assert logits.shape == (len(labels), C) and torch.equal(targets, labels)


def test_only_the_winning_sub_center_gets_a_gradient():
    torch.manual_seed(2)
    clf = MarginClassifier(D, C, subcenter()).train()
    emb, labels = batch(n=1, seed=3)
    clf(emb, labels).backward()
    cos = F.normalize(emb, dim=1) @ F.normalize(clf.weight.detach(), dim=1).T
    winners = cos.reshape(C, K).argmax(dim=1)
    has_grad = clf.weight.grad.abs().sum(dim=1).reshape(C, K) > 0
    expected = torch.zeros(C, K, dtype=torch.bool)
    expected[torch.arange(C), winners] = True
    assert torch.equal(has_grad, expected)  # one row per class; the target class's only at its nearest center
    y = int(labels[0])
    target_rows = clf.weight.grad[y * K : y * K + K]
    assert target_rows[winners[y]].abs().sum() > 0
    assert all(target_rows[j].abs().sum() == 0 for j in range(K) if j != winners[y])


def test_sampling_keeps_every_center_of_the_sampled_classes():
    classes = 20
    torch.manual_seed(4)
    clf = MarginClassifier(D, classes, subcenter(), sample_rate=0.3).train()
    gen = torch.Generator().manual_seed(5)
    emb, labels = torch.randn(4, D, generator=gen), torch.tensor([3, 17, 3, 9])
    torch.manual_seed(6)
    index, targets = clf.sample_centers(labels)
    assert len(index) == math.ceil(0.3 * classes) and {3, 9, 17} <= set(index.tolist())
    torch.manual_seed(6)  # the same draw again, inside logits
    logits, got_targets = clf.logits(emb, labels)
    assert torch.equal(got_targets, targets)
    rows = clf.weight.detach().reshape(classes, K, D)[index].reshape(-1, D)  # all K rows of each sampled class
    cos = (F.normalize(emb, dim=1) @ F.normalize(rows, dim=1).T).clamp(-1, 1)
    cos = cos.reshape(len(labels), len(index), K).max(dim=2).values
    torch.testing.assert_close(logits, clf.head(cos, targets), rtol=1e-6, atol=1e-5)
    torch.manual_seed(6)
    clf(emb, labels).backward()
    touched = set((clf.weight.grad.abs().sum(dim=1) > 0).nonzero().flatten().div(K, rounding_mode="floor").tolist())
    assert touched == set(index.tolist())  # sampled classes only, and every one of them


def test_full_state_dict_round_trip_and_mismatched_center_counts():
    torch.manual_seed(7)
    clf = MarginClassifier(D, C, subcenter())
    state = clf.full_state_dict()
    assert state["weight"].shape == (C * K, D)
    torch.manual_seed(8)
    other = MarginClassifier(D, C, subcenter())
    assert not torch.equal(other.weight, clf.weight)
    other.load_full_state_dict(state)
    assert torch.equal(other.weight, clf.weight)
    with pytest.raises(CheckpointError, match=r"\(15, 8\).*3 centers per class.*head.type"):
        MarginClassifier(D, C, facecore.create("heads", "arcface")).load_full_state_dict(state)
    with pytest.raises(CheckpointError, match=r"needs \(10, 8\) \(head.num_classes x 2 centers per class of head "
                                              r"'SubCenterArcFace'.*head.type or its k"):
        MarginClassifier(D, C, subcenter(k=2)).load_full_state_dict(state)


@pytest.mark.parametrize("sharded", [False, True], ids=["margin", "sharded-without-group"])
def test_optimizer_state_round_trip_through_the_training_checkpoint(sharded: bool):
    torch.manual_seed(9)
    backbone = nn.Linear(D, D)
    make = ShardedMarginClassifier if sharded else MarginClassifier
    clf = make(D, C, subcenter())
    optimizer = torch.optim.SGD([*backbone.parameters(), *clf.parameters()], lr=0.1, momentum=0.9)
    emb, labels = batch()
    clf(backbone(emb), labels).backward()
    optimizer.step()
    ckpt = TrainingCheckpoint({}, backbone, clf, optimizer, None, None, DistInfo(), sharded, logging.getLogger("t"))
    index = ckpt.center_index()
    state = ckpt._optimizer_state()
    momentum = state["state"][index]["momentum_buffer"]
    assert momentum.shape == (C * K, D)
    assert torch.equal(momentum, optimizer.state[clf.weight]["momentum_buffer"])
    optimizer.state[clf.weight]["momentum_buffer"].zero_()
    ckpt._load_optimizer_state(state)
    assert torch.equal(optimizer.state[clf.weight]["momentum_buffer"], momentum)


def test_sharded_without_a_process_group_equals_margin_classifier():
    emb, labels = batch()
    results = []
    for make in (MarginClassifier, ShardedMarginClassifier):
        torch.manual_seed(10)
        clf = make(D, C, subcenter()).train()
        e = emb.clone().requires_grad_(True)
        loss = clf(e, labels)
        loss.backward()
        results.append((clf.weight.detach(), loss.detach(), e.grad, clf.weight.grad, clf.full_state_dict()["weight"]))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------ 2 gloo processes, sharded centers
RANKS = """
import logging, sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import facecore
from facecore.core.runtime import DistInfo
from facecore.train.checkpointing import TrainingCheckpoint
from facecore.train.classifier import ShardedMarginClassifier

D, C, K = 8, 7, 3  # 7 classes split 4 + 3 over 2 ranks


def head():
    return facecore.create("heads", "subcenter_arcface", k=K, scale=16.0, margin=0.3)


def rank_main(rank, out):
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    try:
        data = torch.load(out / "data.pt")
        weight, emb, labels = data["weight"], data["emb"], data["labels"]
        half = emb.shape[0] // 2
        lo, hi = (0, half) if rank == 0 else (half, emb.shape[0])
        torch.manual_seed(rank)  # ranks seeded differently: the centers' init must still agree
        clf = ShardedMarginClassifier(D, C, head()).train()
        results = {"init": clf.full_state_dict()["weight"], "start": clf.class_start, "count": clf.num_local,
                   "shape": tuple(clf.weight.shape)}
        clf.load_full_state_dict({"weight": weight})
        backbone = nn.Identity()
        optimizer = torch.optim.SGD(clf.parameters(), lr=0.1, momentum=0.9)
        local = emb[lo:hi].clone().requires_grad_(True)
        loss = clf(local, labels[lo:hi])
        loss.backward()
        results.update(loss=loss.detach(), weight_grad=clf.weight.grad.clone(), emb_grad=local.grad)
        optimizer.step()
        ckpt = TrainingCheckpoint({}, backbone, clf, optimizer, None, None, DistInfo(rank, 2, rank), True,
                                  logging.getLogger("t"))
        state = ckpt._optimizer_state()  # the centers' momentum gathered whole
        results["momentum"] = state["state"][ckpt.center_index()]["momentum_buffer"]
        mine = optimizer.state[clf.weight]["momentum_buffer"].clone()
        optimizer.state[clf.weight]["momentum_buffer"].zero_()
        ckpt._load_optimizer_state(state)  # and split again
        results["momentum_restored"] = torch.equal(optimizer.state[clf.weight]["momentum_buffer"], mine)
        results["state"] = clf.full_state_dict()
        results["rank0_only"] = clf.full_state_dict(rank0_only=True)

        torch.manual_seed(100 + rank)  # each rank draws its own negatives
        sampled = ShardedMarginClassifier(D, C, head(), sample_rate=0.5).train()
        sampled.load_full_state_dict({"weight": weight})
        local = emb[lo:hi].clone().requires_grad_(True)
        loss = sampled(local, labels[lo:hi])
        loss.backward()
        results["sampled_loss"] = loss.detach()
        results["sampled_finite"] = bool(torch.isfinite(local.grad).all() and torch.isfinite(sampled.weight.grad).all())
        touched = (sampled.weight.grad.abs().sum(dim=1) > 0).reshape(-1, K)
        results["sampled_classes_touched"] = int(touched.any(dim=1).sum())
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(rank_main, args=(Path(sys.argv[1]),), nprocs=2)
"""


def test_two_gloo_processes_with_sharded_sub_centers_match_one(tmp_path: Path):
    classes, rows = 7, 7 * K
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(rows, D, generator=gen)
    emb, labels = torch.randn(10, D, generator=gen) * 3, torch.randint(0, classes, (10,), generator=gen)
    labels[:2] = torch.tensor([0, 6])  # classes on both ranks
    torch.save({"weight": weight, "emb": emb, "labels": labels}, tmp_path / "data.pt")
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], env=subprocess_env(), capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    torch.manual_seed(0)
    ref = MarginClassifier(D, classes, subcenter()).train()
    assert torch.equal(ranks[0]["init"], ranks[1]["init"])
    assert ranks[0]["init"].shape == (rows, D)
    ref.load_full_state_dict({"weight": weight})
    optimizer = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    e = emb.clone().requires_grad_(True)
    loss = ref(e, labels)
    loss.backward()
    optimizer.step()
    for rank, res in enumerate(ranks):
        start, count = res["start"], res["count"]
        assert (start, count) == ((0, 4) if rank == 0 else (4, 3)) and res["shape"] == (count * K, D)
        torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res["weight_grad"], ref.weight.grad[start * K : (start + count) * K],
                                   rtol=1e-4, atol=1e-6)
        lo = 0 if rank == 0 else 5
        torch.testing.assert_close(res["emb_grad"], e.grad[lo : lo + 5], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res["momentum"], optimizer.state[ref.weight]["momentum_buffer"], rtol=1e-4, atol=1e-6)
        assert res["momentum_restored"]
        assert res["state"]["weight"].shape == (rows, D)
        torch.testing.assert_close(res["state"]["weight"], ref.full_state_dict()["weight"])
        assert torch.isfinite(res["sampled_loss"]) and res["sampled_finite"]
        positives = len({int(y) for y in labels if start <= y < start + count})
        assert res["sampled_classes_touched"] == max(math.ceil(0.5 * count), positives)  # positives always kept
    assert ranks[0]["sampled_loss"] == ranks[1]["sampled_loss"]
    assert ranks[0]["rank0_only"]["weight"].shape == (rows, D) and ranks[1]["rank0_only"] == {}


# ------------------------------------------------------------------------------------- through the trainer
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("subcenter-data"))


def test_a_short_training_run_saves_k_centers_per_class(tiny_data: Path, tmp_path: Path):
    from test_trainer import tiny_config

    from facecore.train.trainer import train

    config = tiny_config(tiny_data, tmp_path, head={"type": "subcenter_arcface", "scale": 16.0, "margin": 0.2})
    result = train(config, verbose=False)
    (last,) = Path(result["run_dir"]).rglob("last.pth")
    ckpt = load_checkpoint(last)
    num_classes = config["head"]["num_classes"] or 6  # tiny_data: 6 identities
    embedding_size = config["model"]["embedding_size"]
    assert ckpt["classifier"]["weight"].shape == (num_classes * 3, embedding_size)
    assert all(torch.isfinite(v).all() for v in ckpt["classifier"].values())
    lines = [json.loads(x) for x in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if line["event"] == "train"]
    assert losses and all(math.isfinite(x) and x > 0 for x in losses)
