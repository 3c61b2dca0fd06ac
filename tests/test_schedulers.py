"""The bundled LR schedules: closed-form values, warmup, param groups, resume and option checks."""

from __future__ import annotations

import inspect
import io
import math

import pytest
import torch

import facecore
from facecore.errors import ConfigError
from facecore.core.plugins import registry

BASE = 0.1


def make(name: str, lrs=(BASE,), steps_per_epoch: int = 10, epochs: int = 4, warmup_epochs: float = 0, **options):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)], lr=lrs[0])
    scheduler = facecore.create(
        "schedulers", name, optimizer=optimizer, steps_per_epoch=steps_per_epoch, epochs=epochs,
        warmup_epochs=warmup_epochs, **options,
    )
    return optimizer, scheduler


def lrs_over(optimizer, scheduler, steps: int) -> list[list[float]]:
    """The LR of every param group used at each of ``steps`` optimizer steps."""
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("name", ["multistep", "cosine", "poly", "constant"])
def test_warmup_endpoints_and_midpoint(name):
    opt, sch = make(name, warmup_epochs=1, warmup_start=0.2, steps_per_epoch=10, epochs=4)
    seen = [lr[0] for lr in lrs_over(opt, sch, 11)]
    assert seen[0] == pytest.approx(0.2 * BASE)
    assert seen[5] == pytest.approx((0.2 + 0.8 * 0.5) * BASE)
    assert seen[10] == pytest.approx(BASE)  # warmup ends exactly at the base LR
    assert all(a < b for a, b in zip(seen[:10], seen[1:11]))


def test_fractional_warmup():
    opt, sch = make("constant", warmup_epochs=0.25, steps_per_epoch=10, epochs=2)  # 2.5 steps
    seen = [lr[0] for lr in lrs_over(opt, sch, 4)]
    assert seen[:3] == pytest.approx([0.0, BASE * 1 / 2.5, BASE * 2 / 2.5])
    assert seen[3] == pytest.approx(BASE)


def test_multistep_boundaries():
    opt, sch = make("multistep", milestones=[1.5, 3], gamma=0.5, steps_per_epoch=10, epochs=4)
    seen = [lr[0] for lr in lrs_over(opt, sch, 40)]
    assert seen[14] == pytest.approx(BASE)
    assert seen[15] == pytest.approx(BASE * 0.5)
    assert seen[29] == pytest.approx(BASE * 0.5)
    assert seen[30] == pytest.approx(BASE * 0.25)


def test_multistep_default_milestones_fall_inside_training():
    opt, sch = make("multistep", steps_per_epoch=10, epochs=10)
    seen = [lr[0] for lr in lrs_over(opt, sch, 100)]
    assert seen[49] == pytest.approx(BASE) and seen[50] == pytest.approx(BASE * 0.1)
    assert seen[80] == pytest.approx(BASE * 0.01)


@pytest.mark.parametrize("milestones", [[5, 3], [2, 2]])
def test_multistep_rejects_unordered_milestones(milestones):
    with pytest.raises(ConfigError, match=r"training\.scheduler\.milestones"):
        make("multistep", milestones=milestones, epochs=10)


def test_multistep_rejects_milestone_after_the_end():
    with pytest.raises(ConfigError, match=r"training\.scheduler\.milestones.*never"):
        make("multistep", milestones=[2, 8], epochs=5)


def test_cosine_midpoint_and_end_with_warmup():
    # 10 warmup steps, then 30 cosine steps: the midpoint of the decay is step 25.
    opt, sch = make("cosine", warmup_epochs=1, steps_per_epoch=10, epochs=4, min_lr_ratio=0.1)
    seen = [lr[0] for lr in lrs_over(opt, sch, 41)]
    floor = 0.1 * BASE
    assert seen[25] == pytest.approx((BASE + floor) / 2)
    assert seen[40] == pytest.approx(floor)
    expected = floor + (BASE - floor) * 0.5 * (1 + math.cos(math.pi * 7 / 30))
    assert seen[17] == pytest.approx(expected)


def test_cosine_absolute_floor_is_shared_by_param_groups():
    opt, sch = make("cosine", lrs=(0.1, 0.02), min_lr=0.01, epochs=2)
    seen = lrs_over(opt, sch, 21)
    assert seen[0] == pytest.approx([0.1, 0.02])
    assert seen[20] == pytest.approx([0.01, 0.01])


def test_cosine_floor_above_base_is_an_error():
    with pytest.raises(ConfigError, match="min_lr"):
        make("cosine", min_lr=0.5)


def test_poly_reaches_zero_at_the_end():
    opt, sch = make("poly", power=2.0, warmup_epochs=1, steps_per_epoch=10, epochs=3)
    seen = [lr[0] for lr in lrs_over(opt, sch, 31)]
    assert seen[20] == pytest.approx(BASE * 0.25)  # halfway through the 20 decay steps
    assert seen[30] == pytest.approx(0.0, abs=1e-12)
    assert seen[29] > 0


def test_param_groups_scale_from_their_own_lr():
    opt, sch = make("poly", lrs=(0.1, 0.01), warmup_epochs=0.5, steps_per_epoch=10, epochs=2)
    for a, b in lrs_over(opt, sch, 20):
        assert b == pytest.approx(a / 10)


@pytest.mark.parametrize("name,options", [
    ("cosine", {"min_lr_ratio": 0.05}),
    ("multistep", {"milestones": [1, 2.5]}),
    ("poly", {"power": 0.9}),
])
def test_state_dict_round_trip_resumes_the_schedule(name, options):
    kwargs = dict(lrs=(0.1, 0.03), warmup_epochs=0.7, steps_per_epoch=10, epochs=4, **options)
    opt, sch = make(name, **kwargs)
    full = lrs_over(opt, sch, 40)

    opt, sch = make(name, **kwargs)
    lrs_over(opt, sch, 17)
    buffer = io.BytesIO()
    torch.save({"scheduler": sch.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # what facecore's checkpoint loader uses

    opt2, sch2 = make(name, **kwargs)
    sch2.load_state_dict(saved["scheduler"])  # before the optimizer: order must not matter
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx(full[17])
    opt2.load_state_dict(saved["optimizer"])
    assert lrs_over(opt2, sch2, 23) == [pytest.approx(v) for v in full[17:]]


def test_bad_context_gives_config_errors():
    with pytest.raises(ConfigError, match="batch_size"):
        make("cosine", steps_per_epoch=0)
    with pytest.raises(ConfigError, match="warmup_epochs"):
        make("cosine", warmup_epochs=5, epochs=2)


def test_options_are_validated_by_schema():
    with pytest.raises(ConfigError, match="powr"):
        make("poly", powr=2)
    with pytest.raises(ConfigError, match="gamma"):
        make("multistep", gamma="0.1")


@pytest.mark.parametrize("name", ["multistep", "cosine", "poly", "constant"])
def test_schema_defaults_match_factory_defaults(name):
    reg = registry("schedulers").get(name)
    params = inspect.signature(reg.factory).parameters
    context = {"optimizer", "steps_per_epoch", "epochs", "warmup_epochs"}
    assert set(reg.options) == set(params) - context
    for key, sub in reg.options.items():
        assert sub["default"] == params[key].default, key
        assert sub.get("description"), key
