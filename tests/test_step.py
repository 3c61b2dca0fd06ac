"""The training step alone: named loss terms summed and back-propagated, accumulation, clipping, the LR step."""

from __future__ import annotations

import torch
from torch import nn

from facecore.train.loss_window import LossWindow
from facecore.train.step import TrainStep


def parts(lr: float = 0.1) -> tuple[nn.Linear, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return model, optimizer, scheduler


def two_terms(model: nn.Module):
    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        out = model(x)
        return {"margin": (out - y).pow(2).mean(), "regulariser": 0.1 * model.weight.pow(2).sum()}

    return loss_fn


def test_accumulated_micro_batches_step_with_the_gradient_of_the_summed_terms() -> None:
    model, optimizer, scheduler = parts()
    window = LossWindow(torch.device("cpu"), first_step=1)
    step = TrainStep(optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=False), window, accumulate=2)
    xs, ys = torch.randn(2, 4, 3), torch.randn(2, 4, 2)

    reference = nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    total = sum(two_terms(reference)(x, y)["margin"] + two_terms(reference)(x, y)["regulariser"] for x, y in zip(xs, ys)) / 2
    grads = torch.autograd.grad(total, list(reference.parameters()))
    expected = [p.detach() - 0.1 * g for p, g in zip(reference.parameters(), grads)]

    step.backward(two_terms(model), xs[0], ys[0], images_counted=4)
    assert not step.due and optimizer.param_groups[0]["lr"] == 0.1
    step.backward(two_terms(model), xs[1], ys[1], images_counted=4)
    assert step.due
    step.optimizer_step()
    assert not step.due and optimizer.param_groups[0]["lr"] == 0.05  # the schedule moved once per optimizer step
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p, e, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # cleared for the next step

    reading = window.read()
    assert set(reading.terms) == {"margin", "regulariser"} and window.images == 8
    assert abs(reading.loss - sum(reading.terms.values())) < 1e-5


def test_clip_runs_after_unscaling_and_before_the_optimizer_step() -> None:
    model, optimizer, scheduler = parts(lr=1.0)
    seen = []

    def clip() -> None:
        seen.append([p.grad.clone() for p in model.parameters()])
        nn.utils.clip_grad_norm_(model.parameters(), 1e-3)

    before = [p.detach().clone() for p in model.parameters()]
    step = TrainStep(optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=False),
                     LossWindow(torch.device("cpu"), 1), clip=clip)
    step.backward(two_terms(model), torch.randn(4, 3) * 100, torch.randn(4, 2), images_counted=4)
    step.optimizer_step()
    assert len(seen) == 1 and all(g.abs().sum() > 0 for g in seen[0])
    moved = torch.sqrt(sum((p.detach() - b).pow(2).sum() for p, b in zip(model.parameters(), before)))
    assert moved <= 1e-3 + 1e-6  # lr 1: the step is the clipped gradient


def test_autocast_applies_to_the_forward_only() -> None:
    model, optimizer, scheduler = parts()
    dtypes = []

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        out = model(x)
        dtypes.append(out.dtype)
        return {"margin": (out.float() - y).pow(2).mean()}

    step = TrainStep(optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=False),
                     LossWindow(torch.device("cpu"), 1), amp_dtype=torch.bfloat16)
    step.backward(loss_fn, torch.randn(4, 3), torch.randn(4, 2), images_counted=4)
    assert dtypes == [torch.bfloat16] and model.weight.grad.dtype == torch.float32
