"""Margin heads against their closed forms, gradcheck in float64, finiteness at cos = +-1 in low
precision, AdaFace's running statistics, option validation, and check_head's failure reports."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

import facecore
from facecore.errors import ConfigError
from facecore.core.plugins import registry
from facecore.testing import check_head

DEG = math.pi / 180
ANGLES = [30.0, 60.0, 150.0, 170.0]
# Row i has its target in column i, so each row checks one target angle and three non-targets.
COS = torch.tensor([[math.cos(a * DEG) for a in ANGLES]] * 4, dtype=torch.float64)
LABELS = torch.arange(4)
NORMS = torch.tensor([[5.0], [20.0], [40.0], [80.0]], dtype=torch.float64)


def head(name, **options):
    return facecore.create("heads", name, **options)


def expected(target_fn, scale, labels=LABELS, cos=COS):
    out = cos.clone() * scale
    for i, label in enumerate(labels.tolist()):
        if label >= 0:
            out[i, label] = scale * target_fn(i, math.acos(cos[i, label].item()))
    return out


def test_all_three_heads_are_registered():
    assert {"arcface", "cosface", "adaface"} <= set(facecore.available("heads"))


@pytest.mark.parametrize("name", facecore.available("heads"))
def test_head_contract(name):
    check_head(registry("heads").get(name).factory)


@pytest.mark.parametrize("name", facecore.available("heads"))
def test_schema_defaults_match_factory_defaults(name):
    reg = registry("heads").get(name)
    params = inspect.signature(reg.factory).parameters
    assert set(reg.options) == set(params)
    for key, param in params.items():
        assert reg.options[key]["default"] == param.default, f"{name}.{key}"
        assert reg.options[key].get("description"), f"{name}.{key} has no description"
    assert "scale" in reg.options  # every head is scaled; its margins are its own (combined has m1, m2, m3)


def test_arcface_closed_form():
    s, m = 64.0, 0.5
    got = head("arcface", scale=s, margin=m)(COS, LABELS, NORMS)

    def target(i, theta):
        if theta + m <= math.pi:
            return math.cos(theta + m)
        return math.cos(theta) - m * math.sin(m)  # 170 deg + 28.6 deg passes pi

    assert ANGLES[3] * DEG + m > math.pi > ANGLES[2] * DEG + m
    torch.testing.assert_close(got, expected(target, s), rtol=0, atol=1e-10)


def test_arcface_target_logit_decreases_with_the_angle():
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    cos = torch.cos(theta).unsqueeze(1).repeat(1, 2)
    logits = head("arcface")(cos, torch.zeros(len(theta), dtype=torch.long), None)[:, 0]
    assert (logits[1:] < logits[:-1]).all()


def test_cosface_closed_form():
    s, m = 30.0, 0.35
    got = head("cosface", scale=s, margin=m)(COS, LABELS, NORMS)
    torch.testing.assert_close(got, expected(lambda i, theta: math.cos(theta) - m, s), rtol=0, atol=1e-10)


def adaface_expected(norms, mean, std, s=64.0, m=0.4, h=0.333, eps=1e-3):
    def target(i, theta):
        safe = min(max(norms[i], 0.001), 100.0)
        scaler = min(max(h * (safe - mean) / (std + eps), -1.0), 1.0)
        angle = min(max(theta - m * scaler, eps), math.pi - eps)
        return math.cos(angle) - (m + m * scaler)

    return expected(target, s)


def test_adaface_closed_form_in_eval_mode():
    ada = head("adaface").eval()
    ada.batch_mean.fill_(30.0)
    ada.batch_std.fill_(10.0)
    norms = NORMS.clone()
    norms[3] = 1000.0  # clipped to 100: the scaler saturates at 1
    got = ada(COS, LABELS, norms)
    torch.testing.assert_close(got, adaface_expected(norms.flatten().tolist(), 30.0, 10.0), rtol=0, atol=1e-5)
    assert ada.batch_mean.item() == 30.0 and ada.batch_std.item() == 10.0  # eval: no update


def test_adaface_updates_running_statistics_before_use():
    alpha = 0.25
    ada = head("adaface", t_alpha=alpha).train()
    got = ada(COS, LABELS, NORMS)
    n = NORMS.flatten().tolist()
    mean = sum(n) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in n) / 3)  # unbiased
    new_mean, new_std = (1 - alpha) * 20 + alpha * mean, (1 - alpha) * 100 + alpha * std
    assert ada.batch_mean.item() == pytest.approx(new_mean, rel=1e-6)
    assert ada.batch_std.item() == pytest.approx(new_std, rel=1e-6)
    torch.testing.assert_close(got, adaface_expected(n, new_mean, new_std), rtol=0, atol=1e-4)
    assert {"batch_mean", "batch_std"} <= set(ada.state_dict())  # checkpoints keep them


def test_adaface_single_sample_batch_keeps_std():
    ada = head("adaface", t_alpha=0.5).train()
    out = ada(COS[:1], LABELS[:1], NORMS[:1])
    assert torch.isfinite(out).all()
    assert ada.batch_std.item() == 100.0 and ada.batch_mean.item() == pytest.approx(12.5)


def test_adaface_norms_get_no_gradient():
    norms = NORMS.clone().requires_grad_(True)
    cos = COS.clone().requires_grad_(True)
    out = head("adaface")(cos, LABELS, norms)
    out.sum().backward()
    assert cos.grad is not None and (norms.grad is None or not norms.grad.any())


@pytest.mark.parametrize("name", ["arcface", "cosface", "adaface"])
def test_rows_without_a_target_get_no_margin(name):
    labels = torch.tensor([0, -1, 2, -1])
    module = head(name).eval()
    got = module(COS, labels, NORMS)
    plain = COS.clamp(-1 + 1e-3, 1 - 1e-3) if name == "adaface" else COS
    torch.testing.assert_close(got[1], 64.0 * plain[1])
    torch.testing.assert_close(got[3], 64.0 * plain[3])
    assert got[0, 0] < 64.0 * COS[0, 0]  # rows with a target still get their margin


@pytest.mark.parametrize("name", ["arcface", "cosface", "adaface"])
def test_gradcheck_float64(name):
    module = head(name, scale=4.0).eval()  # eval: AdaFace's statistics stay fixed between evaluations
    cos = (COS * 0.98).clone().requires_grad_(True)
    labels = torch.tensor([0, 1, -1, 3])
    assert torch.autograd.gradcheck(lambda c: module(c, labels, NORMS), (cos,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["arcface", "cosface", "adaface"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_at_cos_plus_minus_one(name, dtype):
    cos = torch.tensor([[1.0, -1.0, 0.5], [-1.0, 1.0, 0.0], [1.0, 1.0, -1.0]], dtype=dtype, requires_grad=True)
    labels = torch.tensor([0, 0, 2])
    out = head(name).train()(cos, labels, torch.tensor([[10.0], [20.0], [30.0]]))
    assert out.dtype in (torch.float32, torch.float64)
    (out * torch.tensor([1.0, -2.0, 3.0])).sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(cos.grad).all()


def test_finite_under_cpu_autocast():
    emb = torch.randn(4, 8, requires_grad=True)
    centers = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    centers[0] = torch.nn.functional.normalize(emb[0].detach(), dim=0)  # cos exactly 1 (or next to it)
    for name in ["arcface", "cosface", "adaface"]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cos = torch.nn.functional.linear(torch.nn.functional.normalize(emb, dim=1), centers).clamp(-1, 1)
            out = head(name)(cos, torch.tensor([0, 1, 2, 3]), emb.norm(dim=1, keepdim=True))
        torch.nn.functional.cross_entropy(out.float(), torch.tensor([0, 1, 2, 3])).backward()
        assert torch.isfinite(emb.grad).all(), name
        emb.grad = None


def test_arcface_gradient_at_cos_one_is_the_neighbours():
    """At cos = 1 exactly the derivative takes the value at the nearest cosine below 1."""
    module = head("arcface", scale=1.0)
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        below = 1.0 - torch.finfo(dtype).eps / 2  # the largest cosine under 1 in this dtype
        cos = torch.tensor([[1.0, 0.0], [below, 0.0]], dtype=dtype, requires_grad=True)
        module(cos, torch.tensor([0, 0]), None)[:, 0].sum().backward()
        grad = cos.grad[:, 0]
        assert torch.isfinite(grad).all() and grad[0] > 0
        torch.testing.assert_close(grad[0], grad[1], rtol=0.05, atol=0)


@pytest.mark.parametrize(
    "name, options, key",
    [("arcface", {"scale": 0}, "scale"), ("arcface", {"margin": -0.1}, "margin"), ("arcface", {"margin": 2.0}, "margin"),
     ("cosface", {"scale": -1.0}, "scale"), ("adaface", {"t_alpha": 0}, "t_alpha"), ("adaface", {"h": -1}, "h"),
     ("adaface", {"eps": 0.5}, "eps"), ("cosface", {"margn": 0.3}, "margn"), ("arcface", {"scale": "64"}, "scale")],
)
def test_bad_options_are_reported(name, options, key):
    with pytest.raises(ConfigError) as err:
        head(name, **options)
    assert key in str(err.value)


def test_direct_construction_validates_too():
    from facecore_plugins.heads import AdaFace, ArcFace

    with pytest.raises(ConfigError, match="head.margin"):
        ArcFace(margin=-1)
    with pytest.raises(ConfigError) as err:
        AdaFace(scale=0, t_alpha=2)
    assert "head.scale" in str(err.value) and "head.t_alpha" in str(err.value)


# -- check_head reports broken heads --------------------------------------------------------
class NaiveArcFace(nn.Module):
    """sqrt(1 - cos^2) without care: infinite gradient at cos = +-1."""

    def forward(self, cosine, labels, norms):
        sine = torch.sqrt(1 - cosine * cosine)
        target = cosine * math.cos(0.5) - sine * math.sin(0.5)
        onehot = torch.nn.functional.one_hot(labels.clamp(min=0), cosine.shape[1]).bool() & (labels >= 0)[:, None]
        return 64 * torch.where(onehot, target, cosine)


class ForgetfulStats(nn.Module):
    """Keeps a running value as a plain attribute: lost by the state dict."""

    def __init__(self):
        super().__init__()
        self.mean = 0.0

    def forward(self, cosine, labels, norms):
        if self.training:
            self.mean = 0.5 * self.mean + 0.5 * float(norms.mean())
        return cosine * self.mean


class WrongShapeHead(nn.Module):
    def forward(self, cosine, labels, norms):
        return cosine[:, :-1]


@pytest.mark.parametrize(
    "factory, message",
    [(NaiveArcFace, "non-finite"), (ForgetfulStats, "state dict"), (WrongShapeHead, "expected shape")],
)
def test_check_head_reports_what_broke(factory, message):
    with pytest.raises(AssertionError, match=message):
        check_head(factory)
