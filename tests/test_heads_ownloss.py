"""Heads with a loss of their own (SphereFace2-C, UniFace's UCE) against float64 transcriptions of the
authors' code: loss and gradients (embeddings, centers, the learned bias) through MarginClassifier, the
clamps and detached terms, the initial bias, Partial FC samples, rows whose class is on another shard,
and options. The 2-process sharded check is in test_classifier.py (its gloo worker loops over heads)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import facecore
from facecore.core.plugins import registry
from facecore.errors import ConfigError
from facecore.train.classifier import MarginClassifier

D, C = 8, 12


# -- float64 transcriptions of the authors' forward passes -----------------------------------------
def unit_cosines(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    e = embeddings / embeddings.norm(dim=1, keepdim=True)
    w = weight / weight.norm(dim=1, keepdim=True)
    return (e @ w.T).clamp(-1, 1)


def one_hot_of(labels: torch.Tensor, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows labelled -1 (their class is not among the columns) are all zeros."""
    out = torch.zeros(labels.numel(), columns, dtype=dtype)
    rows = (labels >= 0).nonzero().flatten()
    out[rows, labels[rows]] = 1.0
    return out


def sphereface2_loss(cos, labels, b, lam=0.7, r=40.0, m=0.4, t=3.0, lw=50.0):
    """opensphere's SphereFace2 (magn_type 'C') over the columns of ``cos``: num_class = their count."""
    num_class = cos.shape[1]
    one_hot = one_hot_of(labels, num_class, cos.dtype)
    with torch.no_grad():
        g_cos_theta = 2.0 * ((cos + 1.0) / 2.0).pow(t) - 1.0
        g_cos_theta = g_cos_theta - m * (2.0 * one_hot - 1.0)
        d_theta = g_cos_theta - cos
    logits = r * (cos + d_theta) + b
    weight = lam * one_hot + (1.0 - lam) * (1.0 - one_hot)
    weight = lw * num_class / r * weight
    return F.binary_cross_entropy_with_logits(logits, one_hot, weight=weight)


def sphereface2_bias(num_class, lam=0.7, r=40.0, m=0.4, t=3.0):
    z = lam / ((1.0 - lam) * (num_class - 1.0))
    ay = r * (2.0 * 0.5**t - 1.0 - m)
    ai = r * (2.0 * 0.5**t - 1.0 + m)
    temp = (1.0 - z) ** 2 + 4.0 * z * math.exp(ay - ai)
    return math.log(2.0 * z) - ai - math.log(1.0 - z + math.sqrt(temp))


def uniface_loss(cos, labels, bias, s=64.0, m=0.4, l=1.0):
    """UniFace's Unified_Cross_Entropy_Loss over the columns of ``cos``."""
    cos_m_theta_p = s * (cos - m) - bias
    cos_m_theta_n = s * cos - bias
    p_loss = torch.log(1 + torch.exp(-cos_m_theta_p.clamp(min=-s, max=s)))
    n_loss = torch.log(1 + torch.exp(cos_m_theta_n.clamp(min=-s, max=s))) * l
    one_hot = one_hot_of(labels, cos.shape[1], torch.float64).bool()
    loss = one_hot * p_loss + (~one_hot) * n_loss
    return loss.sum(dim=1).mean()


REFERENCES = {"sphereface2": sphereface2_loss, "uniface": uniface_loss}


# -- inputs with the edges in them -----------------------------------------------------------------
def place(embeddings, weight, row, column, cosine, gen):
    """Set center ``column`` so that its cosine to row ``row`` is ``cosine``."""
    e = embeddings[row] / embeddings[row].norm()
    other = torch.randn(D, generator=gen)
    other = other - (other @ e) * e
    weight[column] = 0.01 * (cosine * e + math.sqrt(1 - cosine**2) * other / other.norm())


def inputs(seed: int, n: int = 10):
    gen = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n, D, generator=gen) * 5
    labels = torch.randint(0, C, (n,), generator=gen)
    labels[:4] = torch.tensor([0, 1, 2, 3])
    labels[4:][labels[4:] == 5] = 6  # column 5 is nobody's target
    weight = torch.randn(C, D, generator=gen) * 0.01
    place(embeddings, weight, 0, 0, -0.8, gen)  # UniFace: positive logit below -s, clamped (no gradient)
    place(embeddings, weight, 1, 5, -0.97, gen)  # UniFace: a negative logit below -s, clamped
    place(embeddings, weight, 2, 2, 0.999, gen)  # nearly on its center
    place(embeddings, weight, 3, 3, 0.3, gen)
    return embeddings, labels, weight


def classifier_with(name, weight, bias=None, sample_rate=1.0, **options):
    head = facecore.create("heads", name, **options)
    classifier = MarginClassifier(D, C, head, sample_rate=sample_rate).train()
    with torch.no_grad():
        classifier.weight.copy_(weight)
        if bias is not None:
            head.bias.fill_(bias)
    return classifier


def run(classifier, embeddings, labels):
    emb = embeddings.clone().requires_grad_(True)
    classifier.zero_grad()
    terms = classifier.loss_terms(emb, labels)
    sum(terms.values()).backward()
    return terms, emb.grad, classifier.weight.grad.clone(), classifier.head.bias.grad.clone()


def reference(name, embeddings, weight, labels, bias, index=None, **options):
    emb = embeddings.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    b = torch.tensor([float(bias)], dtype=torch.float64, requires_grad=True)
    cos = unit_cosines(emb, w if index is None else w[index])
    loss = REFERENCES[name](cos, labels, b, **options)
    loss.backward()
    return loss, emb.grad, w.grad, b.grad


def close(got, want, rtol=2e-4, atol=2e-6):
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


# -- loss and gradients ----------------------------------------------------------------------------
CASES = [
    ("sphereface2", {}, {}),
    ("sphereface2", {"scale": 30.0, "margin": 0.2, "t": 2.0, "lambda_pos": 0.6, "loss_weight": 10.0},
     {"r": 30.0, "m": 0.2, "t": 2.0, "lam": 0.6, "lw": 10.0}),
    ("uniface", {}, {}),
    ("uniface", {"scale": 32.0, "margin": 0.3, "lambda_neg": 0.5}, {"s": 32.0, "m": 0.3, "l": 0.5}),
]


@pytest.mark.parametrize("name, options, ref_options", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradients_equal_the_authors_code(name, options, ref_options, seed):
    embeddings, labels, weight = inputs(seed)
    bias = 3.0 + seed  # a bias moved off its start, so its gradient is not ~0
    classifier = classifier_with(name, weight, bias, **options)
    terms, g_emb, g_w, g_b = run(classifier, embeddings, labels)
    want, want_emb, want_w, want_b = reference(name, embeddings, weight, labels, bias, **ref_options)
    assert list(terms) == ["margin"] and terms["margin"].dtype == torch.float32
    close(terms["margin"], want)
    close(g_emb, want_emb)
    close(g_w, want_w)
    close(g_b, want_b)
    torch.testing.assert_close(classifier(embeddings, labels), terms["margin"])
    if name == "uniface":  # the clamp ends are exercised: rows 0 and 1 have clamped terms, no gradient
        s, m = options.get("scale", 64.0), options.get("margin", 0.4)
        cos = unit_cosines(embeddings.double(), weight.double())
        assert s * (cos[0, 0] - m) - bias < -s and s * cos[1, 5] - bias < -s


def test_sphereface2_gradient_in_the_cosine_is_r_as_the_detached_g_makes_it():
    head = facecore.create("heads", "sphereface2", loss_weight=40.0)  # lw / r = 1
    head.configure(num_classes=3, sample_rate=1.0)
    with torch.no_grad():
        head.bias.zero_()
    cos = torch.tensor([[0.5, -0.2, 0.9]], requires_grad=True)
    head(cos, torch.tensor([0])).sum().backward()
    g = 2 * ((cos.detach() + 1) / 2) ** 3 - 1
    z = 40.0 * (g + torch.tensor([[-0.4, 0.4, 0.4]]))
    # d/dc of lambda*softplus(-z) and (1 - lambda)*softplus(z), with dz/dc = r (not r*g'(c))
    want = 40.0 * torch.tensor([[-0.7, 0.3, 0.3]]) * torch.sigmoid(torch.tensor([[-1.0, 1.0, 1.0]]) * z)
    torch.testing.assert_close(cos.grad, want)


# -- the initial bias ------------------------------------------------------------------------------
def test_sphereface2_initial_bias_is_the_closed_form_that_zeroes_its_initial_gradient():
    from facecore_plugins.sphereface2 import initial_bias

    for classes, rate, per_row in ((12, 1.0, 12), (1000, 1.0, 1000), (1000, 0.1, 100), (5, 0.1, 2), (3, 1.0, 3)):
        head = facecore.create("heads", "sphereface2")
        MarginClassifier(D, classes, head, sample_rate=rate)  # the classifier tells the head the class count
        b0 = initial_bias(per_row, 40.0, 0.4, 3.0, 0.7)  # in float64, before the bias parameter's float32
        assert head.bias.item() == pytest.approx(b0, rel=1e-6)
        if per_row > 3:  # z < 1: the authors' expression, number for number
            assert b0 == pytest.approx(sphereface2_bias(per_row), rel=1e-12)
        else:  # z > 1: theirs cancels (off by ~1e-3); the root is the same
            assert b0 == pytest.approx(sphereface2_bias(per_row), rel=1e-4)
        b = torch.tensor([b0], dtype=torch.float64, requires_grad=True)
        cos = torch.zeros(1, per_row, dtype=torch.float64)  # every cosine 0, as at the start
        sphereface2_loss(cos, torch.tensor([0]), b).backward()
        assert abs(b.grad.item()) < 1e-9


def test_uniface_initial_bias_is_log_10_c_r_with_r_the_sample_rate():
    for classes, rate in ((12, 1.0), (93431, 1.0), (10572, 0.3)):
        head = facecore.create("heads", "uniface")
        MarginClassifier(D, classes, head, sample_rate=rate)
        assert head.bias.item() == pytest.approx(math.log(10 * classes * rate), rel=1e-6)


@pytest.mark.parametrize("name", ["sphereface2", "uniface"])
def test_an_unconfigured_head_refuses_to_run(name):
    with pytest.raises(RuntimeError, match="configure"):
        facecore.create("heads", name)(torch.zeros(2, 3), torch.tensor([0, 1]))


# -- sampled columns and shards --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sphereface2", "uniface"])
def test_partial_fc_is_the_authors_loss_on_the_sampled_columns(name):
    embeddings, labels, weight = inputs(3, n=4)  # 4 positives, 6 columns sampled
    classifier = classifier_with(name, weight, sample_rate=0.5)
    bias = classifier.head.bias.item()
    torch.manual_seed(1)
    terms, g_emb, g_w, g_b = run(classifier, embeddings, labels)
    torch.manual_seed(1)
    index, targets = classifier.sample_centers(labels)
    assert len(index) == 6 and (targets >= 0).all()
    want, want_emb, want_w, want_b = reference(name, embeddings, weight, targets, bias, index=index)
    close(terms["margin"], want)
    close(g_emb, want_emb)
    close(g_w, want_w)
    close(g_b, want_b)
    unsampled = torch.ones(C, dtype=torch.bool)
    unsampled[index] = False
    assert (g_w[unsampled] == 0).all() and (g_w[index].abs().sum(1) > 0).all()


@pytest.mark.parametrize("name", ["sphereface2", "uniface"])
def test_shards_of_the_columns_sum_to_the_whole_loss(name):
    """What each rank of a sharded classifier computes: its columns, rows whose class is elsewhere labelled -1."""
    gen = torch.Generator().manual_seed(5)
    cos = (torch.rand(9, C, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    labels = torch.randint(0, C, (9,), generator=gen)
    head = facecore.create("heads", name)
    head.configure(num_classes=C, sample_rate=1.0)
    whole = head(cos, labels)
    parts = []
    for lo, hi in ((0, 7), (7, C)):  # uneven shards; every shard has rows whose class is on the other
        local = torch.where((labels >= lo) & (labels < hi), labels - lo, torch.full_like(labels, -1))
        assert (local == -1).any() and (local >= 0).any()
        parts.append(head(cos[:, lo:hi], local))
    torch.testing.assert_close(torch.cat(parts, dim=1), whole)
    bias = head.bias.item()
    want = REFERENCES[name](cos, labels, torch.tensor([bias], dtype=torch.float64))
    torch.testing.assert_close(whole.sum() / 9, want, rtol=1e-6, atol=1e-9)
    assert whole.dtype == torch.float64


# -- precision, options ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sphereface2", "uniface"])
def test_fp32_math_for_half_precision_cosines(name):  # check_head runs on every head in test_heads.py
    head = facecore.create("heads", name)
    head.configure(num_classes=4, sample_rate=1.0)
    cos = torch.tensor([[1.0, -1.0, 0.3, 0.0], [-1.0, 1.0, 0.2, 0.5]])
    labels = torch.tensor([0, -1])
    for dtype in (torch.float16, torch.bfloat16):
        out = head(cos.to(dtype), labels)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, head(cos.to(dtype).float(), labels))


@pytest.mark.parametrize("name, options, message", [
    ("sphereface2", {"lambda_pos": 1.0}, "head.lambda_pos: must be in (0, 1)"),
    ("sphereface2", {"t": 0.0}, "head.t: must be > 0"),
    ("sphereface2", {"margin": 1.5}, "head.margin: must be in [0, 1]"),
    ("sphereface2", {"loss_weight": 0.0}, "head.loss_weight: must be > 0"),
    ("sphereface2", {"scale": -1.0}, "head.scale: must be > 0"),
    ("uniface", {"lambda_neg": 0.0}, "head.lambda_neg: must be > 0"),
    ("uniface", {"margin": -0.1}, "head.margin: must be in [0, 1]"),
    ("uniface", {"scale": 0.0}, "head.scale: must be > 0"),
])
def test_out_of_range_options_raise_one_config_error_naming_the_key(name, options, message):
    key = message.split(":")[0].split(".")[1]
    with pytest.raises(ConfigError) as info:  # the schema's bounds
        facecore.create("heads", name, **options)
    assert f"{key}:" in str(info.value) and "1 problem" in str(info.value)
    with pytest.raises(ConfigError) as info:  # and the factory's, without the schema
        registry("heads").get(name).factory(**options)
    assert message in str(info.value) and "1 problem" in str(info.value)


@pytest.mark.parametrize("name, defaults", [
    ("sphereface2", {"scale": 40.0, "margin": 0.4, "t": 3.0, "lambda_pos": 0.7, "loss_weight": 50.0}),
    ("uniface", {"scale": 64.0, "margin": 0.4, "lambda_neg": 1.0}),
])
def test_defaults_are_the_authors_and_the_schema_matches(name, defaults):
    head = facecore.create("heads", name)
    reg = registry("heads").get(name)
    assert reg.description and "\n" not in reg.description
    assert {key: getattr(head, key) for key in defaults} == defaults
    assert set(reg.options) == set(defaults)
    for key, option in reg.options.items():
        assert option["default"] == defaults[key] and option.get("description")
    assert [n for n, _ in head.named_parameters()] == ["bias"]
