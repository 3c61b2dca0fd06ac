"""The training checkpoint's handling of the class centers among the optimizer's parameters."""

from __future__ import annotations

import logging

import torch
from torch import nn

from facecore.core.runtime import DistInfo
from facecore.train.checkpointing import TrainingCheckpoint
from facecore.train.classifier import MarginClassifier


class ThresholdHead(nn.Module):
    """A head with a learnable parameter of its own (as UniFace's threshold), registered after the centers."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, cosine, labels, norms):
        return 8.0 * cosine + self.bias


def test_the_centers_are_found_by_identity_not_by_place() -> None:
    backbone = nn.Linear(4, 4)
    classifier = MarginClassifier(4, 5, ThresholdHead())
    params = list(backbone.parameters()) + list(classifier.parameters())
    assert params[-1] is classifier.head.bias  # the last parameter is the head's, not the centers
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    loss = classifier(backbone(torch.randn(6, 4)), torch.tensor([0, 1, 2, 3, 4, 0]))
    loss.backward()
    optimizer.step()
    ckpt = TrainingCheckpoint({}, backbone, classifier, optimizer, None, None, DistInfo(), True, logging.getLogger("t"))
    index = ckpt.center_index()
    assert params[index] is classifier.weight
    state = ckpt._optimizer_state()
    assert state["state"][index]["momentum_buffer"].shape == (5, 4)
    assert state["state"][len(params) - 1]["momentum_buffer"].shape == (1,)
    ckpt._load_optimizer_state(state)  # splits the centers' rows again and loads
    assert torch.equal(optimizer.state[classifier.weight]["momentum_buffer"], state["state"][index]["momentum_buffer"])
