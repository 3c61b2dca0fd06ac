"""The seams a margin head may use: HeadBatch (target cosines, positions, global means, keyed random
numbers), configure(num_classes, sample_rate) at build time, and loss terms of its own."""

from __future__ import annotations

import torch
from torch import nn

from facecore.train.classifier import MarginClassifier
from facecore.train.head_batch import HeadBatch


class Recorder(nn.Module):
    uses_batch = True

    def __init__(self):
        super().__init__()
        self.seen: list[HeadBatch] = []
        self.configured = None

    def configure(self, num_classes, sample_rate):
        self.configured = (num_classes, sample_rate)

    def forward(self, cosine, labels, norms, batch):
        self.seen.append(batch)
        return 8.0 * cosine

    def extra_terms(self, norms):
        return {"regulariser": 0.5 * norms.mean()}


def test_the_head_learns_the_class_count_and_sees_each_rows_target_cosine_with_sampling() -> None:
    torch.manual_seed(0)
    head = Recorder()
    classifier = MarginClassifier(4, 50, head, sample_rate=0.2).train()
    assert head.configured == (50, 0.2)
    embeddings, labels = torch.randn(6, 4), torch.tensor([3, 7, 7, 49, 0, 21])
    classifier.draw_key = (1, 0, 0)
    terms = classifier.loss_terms(embeddings, labels)
    batch = head.seen[-1]
    expected = nn.functional.cosine_similarity(embeddings, classifier.weight[labels].detach(), dim=1).unsqueeze(1)
    assert torch.allclose(batch.target_cosine, expected, atol=1e-6)  # from the sampled columns, in any order
    assert batch.positions.tolist() == list(range(6)) and batch.global_rows == 6
    assert torch.allclose(batch.global_mean(batch.target_cosine), expected.mean(0))
    assert set(terms) == {"margin", "regulariser"}
    assert torch.allclose(terms["regulariser"], 0.5 * embeddings.norm(dim=1).mean())
    classifier.eval()  # no sampling: forward is exactly the sum of the terms
    terms = classifier.loss_terms(embeddings, labels)
    assert torch.allclose(classifier(embeddings, labels), terms["margin"] + terms["regulariser"])


def test_random_numbers_are_a_function_of_key_and_global_position_only() -> None:
    def batch(positions: list[int], rows: int, key=(3, 1, 5)) -> HeadBatch:
        return HeadBatch(torch.zeros(len(positions), 1), torch.tensor(positions), rows, key, lambda t: t)

    whole = batch(list(range(8)), 8).normal(2)
    even, odd = batch([0, 2, 4, 6], 8).normal(2), batch([1, 3, 5, 7], 8).normal(2)  # 2 ranks, strided
    assert torch.equal(whole[0::2], even) and torch.equal(whole[1::2], odd)
    assert not torch.equal(whole, batch(list(range(8)), 8, key=(3, 1, 6)).normal(2))  # next batch: new numbers
    assert not torch.equal(whole[:, :1], batch(list(range(8)), 8).normal(1, stream=1))
    u = batch(list(range(8)), 8).uniform(3)
    assert u.shape == (8, 3) and float(u.min()) >= 0 and float(u.max()) < 1


def test_by_position_puts_every_rows_values_in_global_order() -> None:
    parts = {}
    for rank in (0, 1):  # two replicas, rows strided as DistributedSampler deals them; the sum is the all-reduce
        positions = torch.tensor([rank, rank + 2, rank + 4])
        values = positions.float().unsqueeze(1) * 10
        parts[rank] = HeadBatch(torch.zeros(3, 1), positions, 6, None, lambda t: t).by_position(values)
    assert torch.equal(parts[0] + parts[1], torch.arange(6).float().unsqueeze(1) * 10)
