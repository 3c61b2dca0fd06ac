"""The combined margin head against a float64 transcription of s*(cos(m1*theta + m2) - m3) and its
fallback: logits, loss and gradients (on cosines and through MarginClassifier), the arcface and
cosface special cases, a target decreasing in theta, check_head, option errors and a short run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import make_tiny_data
from test_trainer import raw_config

import facecore
from facecore.core.config import validate_config
from facecore.core.plugins import registry
from facecore.errors import ConfigError
from facecore.testing import check_head
from facecore.train.classifier import MarginClassifier
from facecore.train.trainer import train

# (m1, m2, m3): ArcFace, CosFace, ArcFace + CosFace, SphereFace-like, mixes, the largest margins.
OPTION_SETS = [(1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.0, 0.3, 0.2), (1.35, 0.0, 0.0), (1.35, 0.25, 0.1),
               (4.0, 0.0, 0.0), (2.0, 1.2, 0.5), (1.0, 1.5, 1.0), (1.0, 0.0, 0.0)]
IDS = [f"m1={a}-m2={b}-m3={c}" for a, b, c in OPTION_SETS]


def combined(scale=64.0, m1=1.0, m2=0.5, m3=0.0):
    return facecore.create("heads", "combined", scale=scale, m1=m1, m2=m2, m3=m3)


# -- the reference: written from the formula, scalar by scalar, in float64 ----------------------
def theta0(m1, m2):
    """The angle where m1*theta + m2 reaches pi."""
    return (math.pi - m2) / m1


def ref_target(c, m1, m2, m3):
    theta = math.acos(c)
    if theta < theta0(m1, m2):
        return math.cos(m1 * theta + m2) - m3
    if m1 == 1 and m3 == 0:  # arcface_torch's ArcFace fallback: cos(theta) - sin(pi - m2) * m2
        return c - math.sin(math.pi - m2) * m2
    return c - (1 + math.cos(theta0(m1, m2)) + m3)  # the cosine shifted to meet -1 - m3 at theta0


def ref_slope(c, m1, m2, m3):
    """d target / d cos; at cos = +-1 the value at the nearest float64 cosine inside (-1, 1)."""
    c = min(max(c, math.nextafter(-1.0, 0.0)), math.nextafter(1.0, 0.0))
    theta = math.acos(c)
    if theta < theta0(m1, m2):
        return m1 * math.sin(m1 * theta + m2) / math.sin(theta)
    return 1.0


def ref_logits_and_chain(cos, labels, s, m1, m2, m3):
    """Reference logits and d logits / d cos (elementwise), as float64 tensors."""
    logits, chain = cos.double().clone() * s, torch.full(cos.shape, float(s), dtype=torch.float64)
    for i, label in enumerate(labels.tolist()):
        if label >= 0:
            c = cos[i, label].item()
            logits[i, label] = s * ref_target(c, m1, m2, m3)
            chain[i, label] = s * ref_slope(c, m1, m2, m3)
    return logits, chain


def edge_inputs(m1, m2, seed=0):
    """Random cosines and labels plus the edges: targets at cos = +-1, just before and just past
    theta0 (m1*theta + m2 passing pi), non-targets at +-1, and rows whose class is not a column."""
    gen = torch.Generator().manual_seed(seed)
    n, classes = 40, 7
    cos = torch.rand(n, classes, generator=gen, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, classes, (n,), generator=gen)
    labels[::9] = -1
    edge = theta0(m1, m2)
    targets = [1.0, -1.0, math.cos(edge * 0.999), math.cos(min(edge * 1.001, math.pi)), math.cos(edge + 0.3 * (math.pi - edge)),
               math.cos(math.pi * 0.999), math.cos(1e-4)]
    for row, value in enumerate(targets, start=1):
        cos[row, labels[row]] = value
    cos[10, (labels[10] + 1) % classes], cos[11, (labels[11] + 2) % classes] = 1.0, -1.0
    cos[9, 0], cos[9, 1] = 1.0, -1.0  # row 9 is labelled -1: its ends get no margin either
    assert labels[9] == -1 and all(labels[r] >= 0 for r in range(1, 8))
    return cos, labels


# -- (1) logits, loss and gradients equal the reference ----------------------------------------
@pytest.mark.parametrize("m1, m2, m3", OPTION_SETS, ids=IDS)
def test_logits_loss_and_cosine_gradients_match_the_formula(m1, m2, m3):
    s = 64.0
    cos, labels = edge_inputs(m1, m2)
    weights = torch.randn(cos.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss_of(logits):  # cross-entropy over the rows with a target, and every entry through a random projection
        return F.cross_entropy(logits, labels, ignore_index=-1) + (weights * logits).sum() / len(labels)

    inp = cos.clone().requires_grad_(True)
    logits = combined(s, m1, m2, m3)(inp, labels, None)
    loss = loss_of(logits)
    loss.backward()

    ref_logits, chain = ref_logits_and_chain(cos, labels, s, m1, m2, m3)
    ref_logits.requires_grad_(True)
    ref_loss = loss_of(ref_logits)
    ref_loss.backward()  # the cross-entropy's own gradient; the head's part is ``chain``
    torch.testing.assert_close(logits, ref_logits.detach(), rtol=0, atol=1e-12 * s)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(inp.grad, ref_logits.grad * chain, rtol=1e-7, atol=1e-12)
    assert torch.isfinite(inp.grad).all()


@pytest.mark.parametrize("m1, m2, m3", [(1.0, 0.5, 0.0), (1.0, 0.3, 0.2), (1.35, 0.25, 0.1), (2.0, 1.2, 0.5)],
                         ids=["arcface", "arc+cos", "sphere+arc+cos", "large"])
def test_loss_and_gradients_through_the_classifier_match_the_formula(m1, m2, m3):
    """Normalized embeddings and centers -> combined head -> cross-entropy, against float64 autograd."""
    s, dim, classes, n = 16.0, 8, 6, 12
    torch.manual_seed(0)
    clf = MarginClassifier(dim, classes, combined(s, m1, m2, m3))
    labels = torch.arange(n) % classes
    emb = torch.randn(n, dim) * 3
    with torch.no_grad():  # targets at every angle, some past theta0, row 0 nearly opposite its center
        for i in range(n):
            t = 0.1 + (math.pi - 0.15) * i / (n - 1)  # away from 0: float32 sines there lose digits
            center = F.normalize(clf.weight[labels[i]], dim=0)
            other = F.normalize(torch.randn(dim) - center * (torch.randn(dim) @ center), dim=0)
            other = F.normalize(other - center * (other @ center), dim=0)
            emb[i] = (math.cos(t) * center + math.sin(t) * other) * (1 + i)
    emb.requires_grad_(True)
    loss = clf(emb, labels)
    loss.backward()

    e = emb.detach().double().requires_grad_(True)
    w = clf.weight.detach().double().requires_grad_(True)
    cos = F.normalize(e, dim=1) @ F.normalize(w, dim=1).T
    target = cos.gather(1, labels[:, None])
    theta = torch.acos(target)
    assert ((target - math.cos(theta0(m1, m2))).abs() > 1e-4).all()  # float32 and float64 take the same branch
    assert (theta > theta0(m1, m2)).any() and (theta < theta0(m1, m2)).any()
    joined = 1 + math.cos(theta0(m1, m2)) + m3 if (m1, m3) != (1.0, 0.0) else m2 * math.sin(m2)
    new = torch.where(m1 * theta + m2 < math.pi, torch.cos(m1 * theta + m2) - m3, target - joined)
    onehot = F.one_hot(labels, classes).bool()
    ref_loss = F.cross_entropy(s * torch.where(onehot, new, cos), labels)
    ref_loss.backward()

    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    # The classifier works in float32: allow its rounding, relative to each gradient's largest entry.
    for got, want in ((emb.grad, e.grad), (clf.weight.grad, w.grad)):
        assert (got.double() - want).abs().max() <= 3e-4 * want.abs().max()


@pytest.mark.parametrize("m1, m2, m3", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.3), (1.35, 0.0, 0.0), (1.35, 0.4, 0.2)],
                         ids=["arcface", "cosface", "sphere", "mix"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_gradient_at_cos_one_is_the_neighbours(m1, m2, m3, dtype):
    """At cos = 1 exactly the derivative is that of the largest cosine under 1 in the input dtype."""
    below = 1.0 - torch.finfo(dtype).eps / 2
    cos = torch.tensor([[1.0, 0.0], [below, 0.0]], dtype=dtype, requires_grad=True)
    out = combined(1.0, m1, m2, m3)(cos, torch.tensor([0, 0]), None)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    out[:, 0].sum().backward()
    grad = cos.grad[:, 0].double()
    assert torch.isfinite(grad).all() and (grad > 0).all()
    torch.testing.assert_close(grad[0], grad[1], rtol=0.05, atol=0)


def test_gradcheck_float64():
    cos = (edge_inputs(1.35, 0.25)[0] * 0.98).requires_grad_(True)
    labels = edge_inputs(1.35, 0.25)[1]
    for m1, m2, m3 in [(1.35, 0.25, 0.1), (1.0, 0.3, 0.2), (1.0, 0.5, 0.0)]:
        module = combined(4.0, m1, m2, m3)
        assert torch.autograd.gradcheck(lambda c: module(c, labels, None), (cos,), eps=1e-7, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_in_float32_out(dtype):
    cos, labels = edge_inputs(1.35, 0.25)
    low = cos.to(dtype)
    got = combined(64.0, 1.35, 0.25, 0.1)(low, labels, None)
    assert got.dtype == torch.float32
    want, _ = ref_logits_and_chain(low.double(), labels, 64.0, 1.35, 0.25, 0.1)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=64.0 * 1e-5)


# -- (2) the special cases are the other heads -------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("other, options", [("arcface", {"m2": 0.5}), ("arcface", {"m2": 0.2}),
                                            ("cosface", {"m3": 0.35}), ("cosface", {"m3": 1.0})])
def test_special_cases_are_arcface_and_cosface(other, options, dtype):
    margin = options.get("m2", options.get("m3"))
    mine = combined(30.0, m1=1.0, m2=options.get("m2", 0.0), m3=options.get("m3", 0.0))
    theirs = facecore.create("heads", other, scale=30.0, margin=margin)
    cos, labels = edge_inputs(1.0, options.get("m2", 0.0))
    a, b = cos.to(dtype).requires_grad_(True), cos.to(dtype).requires_grad_(True)
    got, want = mine(a, labels, None), theirs(b, labels, None)
    assert torch.equal(got, want)
    weights = torch.randn(got.shape, dtype=got.dtype)
    (weights * got).sum().backward()
    (weights * want).sum().backward()
    assert torch.equal(a.grad, b.grad)


# -- (3) the target logit decreases with the angle ---------------------------------------------
def target_curve(m1, m2, m3, points=20001):
    theta = torch.linspace(0, math.pi, points, dtype=torch.float64)
    cos = torch.cos(theta).unsqueeze(1).repeat(1, 2)
    return theta, combined(1.0, m1, m2, m3)(cos, torch.zeros(points, dtype=torch.long), None)[:, 0]


@pytest.mark.parametrize("m1, m2, m3", OPTION_SETS, ids=IDS)
def test_target_logit_decreases_with_the_angle(m1, m2, m3):
    theta, logit = target_curve(m1, m2, m3)
    assert (logit[1:] < logit[:-1]).all()
    steps = (logit[:-1] - logit[1:]).abs()
    if (m1, m3) == (1.0, 0.0) and m2 > 0:
        # arcface_torch's ArcFace fallback: one drop where theta + m2 reaches pi, of cos m2 + m2 sin m2 - 1
        jump = int(steps.argmax())
        assert theta[jump] <= theta0(m1, m2) <= theta[jump + 1]
        assert steps[jump] == pytest.approx(math.cos(m2) + m2 * math.sin(m2) - 1, abs=2e-3)
        steps[jump] = 0
    # Continuous: no step is larger than the steepest slope (m1 on the arc, 1 past it) times the grid step.
    assert steps.max() <= max(m1, 1.0) * (theta[1] - theta[0]) * (1 + 1e-6)
    assert logit[0] == pytest.approx(math.cos(m2) - m3) and logit[-1] <= -1 - m3 + 1e-12


def test_fallback_starts_where_the_angle_passes_pi():
    m1, m2, m3 = 1.35, 0.25, 0.1
    edge = theta0(m1, m2)
    cos = torch.tensor([[math.cos(edge - 1e-3), 0.0], [math.cos(edge + 1e-3), 0.0]], dtype=torch.float64)
    got = combined(1.0, m1, m2, m3)(cos, torch.tensor([0, 0]), None)[:, 0]
    assert got[0] == pytest.approx(math.cos(m1 * (edge - 1e-3) + m2) - m3, abs=1e-12)  # still on the arc
    assert got[1] == pytest.approx(math.cos(edge + 1e-3) - math.cos(edge) - 1 - m3, abs=1e-12)  # the joined cosine
    assert got[1] < -1 - m3 < got[0]


# -- (4) the head contract -----------------------------------------------------------------------
@pytest.mark.parametrize("m1, m2, m3", OPTION_SETS, ids=IDS)
def test_check_head(m1, m2, m3):
    check_head(registry("heads").get("combined").factory, m1=m1, m2=m2, m3=m3)


def test_registered_with_the_authors_defaults():
    reg = registry("heads").get("combined")
    assert {k: v["default"] for k, v in reg.options.items()} == {"scale": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0}
    assert reg.description
    assert repr(combined()) == "CombinedMargin(scale=64.0, m1=1.0, m2=0.5, m3=0.0)"


# -- (5) options out of range --------------------------------------------------------------------
@pytest.mark.parametrize("options, key", [({"m1": -1}, "m1"), ({"m1": 0.5}, "m1"), ({"m2": 2.0}, "m2"),
                                          ({"m2": math.pi / 2}, "m2"), ({"m2": -0.1}, "m2"), ({"m3": 1.5}, "m3"),
                                          ({"m3": -0.2}, "m3"), ({"scale": 0}, "scale"), ({"m4": 1}, "m4")])
def test_bad_options_are_one_config_error_naming_the_key(options, key):
    with pytest.raises(ConfigError) as err:
        facecore.create("heads", "combined", **options)
    assert key in str(err.value)


def test_direct_construction_names_every_bad_key():
    from facecore_plugins.heads import CombinedMargin

    with pytest.raises(ConfigError, match="head.m1"):
        CombinedMargin(m1=-1)
    with pytest.raises(ConfigError) as err:
        CombinedMargin(m1=0, m2=2.0, m3=2)
    assert all(f"head.{k}" in str(err.value) for k in ("m1", "m2", "m3"))


# -- (6) a short training run ----------------------------------------------------------------------
def test_short_training_run_has_a_finite_loss(tmp_path: Path):
    data = make_tiny_data(tmp_path / "tiny")
    config = raw_config(data, tmp_path / "out", training={"epochs": 1})
    config = validate_config({**config, "head": {"type": "combined", "scale": 16, "m2": 0.2}})
    assert config["head"]["m1"] == 1.0 and config["head"]["m3"] == 0.0  # the plugin's defaults filled in
    summary = train(config, verbose=False)
    lines = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if line["event"] == "train"]
    assert losses and all(math.isfinite(v) and v > 0 for v in losses)
    assert summary["step"] == 6
