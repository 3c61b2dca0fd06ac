"""CurricularFace and MagFace against float64 transcriptions of the authors' formulas: loss and gradients
through MarginClassifier, edges (theta + m past pi, norms at and beyond the clip ends, rows whose target is
not among the columns), CurricularFace's running t, MagFace's loss terms, options, and short training runs."""

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
from facecore.core.checkpoint import load_checkpoint
from facecore.core.config import validate_config
from facecore.core.plugins import registry
from facecore.errors import ConfigError
from facecore.testing import check_head
from facecore.train.classifier import MarginClassifier
from facecore.train.head_batch import HeadBatch
from facecore.train.trainer import train

D, C = 8, 12


# -- float64 transcriptions of the authors' formulas ---------------------------------------------
def unit_cosines(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    e = embeddings / embeddings.norm(dim=1, keepdim=True)
    w = weight / weight.norm(dim=1, keepdim=True)
    return (e @ w.T).clamp(-1, 1)


def curricular_logits(cos: torch.Tensor, labels: torch.Tensor, target: torch.Tensor, t: float, s: float,
                      m: float) -> torch.Tensor:
    """Logits of CurricularFace for cosines ``cos``, each row's target cosine ``target`` (N, 1) and the t in use.

    Rows labelled -1 have their target elsewhere: all their columns are negatives.
    """
    sin = torch.sqrt(1.0 - target**2)
    cos_theta_m = target * math.cos(m) - sin * math.sin(m)
    final = torch.where(target > math.cos(math.pi - m), cos_theta_m, target - math.sin(math.pi - m) * m)
    one_hot = torch.zeros_like(cos)
    rows = (labels >= 0).nonzero().flatten()
    one_hot[rows, labels[rows]] = 1.0
    mask = (cos > cos_theta_m.detach()) & (one_hot == 0)
    out = torch.where(mask, cos * (t + cos), cos)
    out = one_hot * final + (1 - one_hot) * out
    return s * out


def curricular_reference(embeddings, weight, labels, t_before, s=64.0, m=0.5, alpha=0.01):
    """(loss, t after the step): t is updated from the batch's mean target cosine before it is used."""
    cos = unit_cosines(embeddings, weight)
    target = cos.gather(1, labels.view(-1, 1))
    t = alpha * target.mean().item() + (1 - alpha) * t_before
    return F.cross_entropy(curricular_logits(cos, labels, target, t, s, m), labels), t


def magface_reference(embeddings, weight, labels, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=20.0):
    """(margin loss, lambda_g * mean g): easy margin, as the authors' MagLinear defaults to."""
    a = embeddings.norm(dim=1, keepdim=True).clamp(l_a, u_a)
    margin = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
    cos = unit_cosines(embeddings, weight)
    sin = torch.sqrt(1.0 - cos**2)
    cos_theta_m = torch.where(cos > 0, cos * torch.cos(margin) - sin * torch.sin(margin), cos)
    one_hot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
    logits = s * (one_hot * cos_theta_m + (1 - one_hot) * cos)
    g = a / u_a**2 + 1 / a
    return F.cross_entropy(logits, labels), lambda_g * g.mean()


# -- inputs with the edges in them ---------------------------------------------------------------
def inputs(seed: int, n: int = 10):
    gen = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n, D, generator=gen) * 20
    labels = torch.randint(0, C, (n,), generator=gen)
    labels[:4] = torch.tensor([0, 1, 2, 3])
    weight = torch.randn(C, D, generator=gen) * 0.01
    return embeddings, labels, weight


def place_target(embeddings, weight, row, label, cosine, gen):
    """Set center ``label`` so that its cosine to row ``row`` is ``cosine`` (a unit direction off the row)."""
    e = embeddings[row] / embeddings[row].norm()
    other = torch.randn(D, generator=gen, dtype=embeddings.dtype)
    other = other - (other @ e) * e
    other = other / other.norm()
    weight[label] = 0.01 * (cosine * e + math.sqrt(1 - cosine**2) * other)


def classifier_with(head, weight, sample_rate=1.0):
    classifier = MarginClassifier(D, C, head, sample_rate=sample_rate).train()
    with torch.no_grad():
        classifier.weight.copy_(weight)
    return classifier


def loss_and_grads(classifier, embeddings, labels):
    emb = embeddings.clone().requires_grad_(True)
    classifier.zero_grad()
    terms = classifier.loss_terms(emb, labels)
    loss = sum(terms.values())
    loss.backward()
    return terms, emb.grad, classifier.weight.grad.clone()


def reference_grads(loss_fn, embeddings, weight):
    emb = embeddings.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    values = loss_fn(emb, w)
    total = values if isinstance(values, torch.Tensor) else sum(values)
    total.backward()
    return values, emb.grad, w.grad


def close(got, want, rtol=2e-4, atol=2e-6):
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


# -- CurricularFace --------------------------------------------------------------------------------
def curricular_inputs(seed):
    embeddings, labels, weight = inputs(seed)
    gen = torch.Generator().manual_seed(seed + 100)
    m = 0.5
    place_target(embeddings, weight, 0, 0, -0.97, gen)  # theta + m past pi: the fallback
    place_target(embeddings, weight, 1, 1, math.cos(math.pi - m) - 0.02, gen)  # just past
    place_target(embeddings, weight, 2, 2, 0.95, gen)  # easy: few hard negatives
    place_target(embeddings, weight, 3, 3, math.cos(math.pi - m) + 0.02, gen)  # just inside
    return embeddings, labels, weight


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_curricularface_loss_and_gradients_match_the_authors_formulas(seed):
    embeddings, labels, weight = curricular_inputs(seed)
    head = facecore.create("heads", "curricularface")
    head.t.fill_(0.3)  # a t well away from 0, so the hard negatives' weighting shows
    classifier = classifier_with(head, weight)
    terms, g_emb, g_w = loss_and_grads(classifier, embeddings, labels)

    def loss_fn(emb, w):
        return curricular_reference(emb, w, labels, 0.3)[0]

    want, want_emb, want_w = reference_grads(loss_fn, embeddings, weight)
    _, t_after = curricular_reference(embeddings.double(), weight.double(), labels, 0.3)
    assert list(terms) == ["margin"]
    close(terms["margin"], want)
    close(g_emb, want_emb)
    close(g_w, want_w)
    assert head.t.item() == pytest.approx(t_after, rel=1e-5)
    cos = unit_cosines(embeddings.double(), weight.double())
    target = cos.gather(1, labels.view(-1, 1))
    assert (target[:2] < math.cos(math.pi - 0.5)).all() and (target[2:4] > math.cos(math.pi - 0.5)).all()
    hard = cos > target * math.cos(0.5) - torch.sqrt(1 - target**2) * math.sin(0.5)
    hard[torch.arange(len(labels)), labels] = False
    assert hard.any() and (~hard).any()  # both kinds of negatives are exercised


def test_curricularface_t_after_two_steps_is_the_ema_updated_before_use():
    alpha = 0.2
    head = facecore.create("heads", "curricularface", t_alpha=alpha, scale=16.0)
    embeddings, labels, weight = curricular_inputs(5)
    classifier = classifier_with(head, weight)
    second = inputs(6)[0]
    t = 0.0
    for emb in (embeddings, second):
        logits, _ = classifier.logits(emb, labels)
        cos = unit_cosines(emb.double(), weight.double())
        target = cos.gather(1, labels.view(-1, 1))
        t = alpha * target.mean().item() + (1 - alpha) * t
        assert head.t.item() == pytest.approx(t, rel=1e-5, abs=1e-7)
        close(logits, curricular_logits(cos, labels, target, t, 16.0, 0.5), rtol=1e-4, atol=1e-4)
    classifier.eval()
    classifier.logits(embeddings, labels)
    assert head.t.item() == pytest.approx(t, rel=1e-5, abs=1e-7)  # eval: t is used but not updated
    assert "t" in head.state_dict()


def test_curricularface_rows_without_their_target_column_use_the_batch_target_cosine():
    gen = torch.Generator().manual_seed(3)
    cos = torch.rand(6, 5, generator=gen, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, -1, 2, -1, 4, 1])
    target = cos.gather(1, labels.clamp(min=0).view(-1, 1)).clone()
    target[1], target[3] = -0.2, 0.6  # rows 1 and 3: the center is on another rank
    others_sum, others = torch.tensor([1.5], dtype=torch.float64), 4  # the other rank's 4 rows
    batch = HeadBatch(target, torch.arange(6), 10, None, lambda x: x + others_sum)
    head = facecore.create("heads", "curricularface", t_alpha=0.5, scale=10.0).train()
    head.t.fill_(0.1)
    got = head(cos, labels, None, batch)
    t = 0.5 * (target.sum().item() + 1.5) / (6 + others) + 0.5 * 0.1  # the global mean, not this rank's
    assert head.t.item() == pytest.approx(t, rel=1e-6)
    torch.testing.assert_close(got, curricular_logits(cos, labels, target, t, 10.0, 0.5), rtol=1e-6, atol=1e-6)
    assert got.dtype == torch.float64


def test_curricularface_two_halves_of_a_batch_agree_with_the_whole():
    gen = torch.Generator().manual_seed(4)
    cos = torch.rand(8, 6, generator=gen) * 2 - 1
    labels = torch.randint(0, 6, (8,), generator=gen)
    target = cos.gather(1, labels.view(-1, 1))
    whole = facecore.create("heads", "curricularface", t_alpha=0.3)
    expected = whole(cos, labels, None, HeadBatch(target, torch.arange(8), 8, None, lambda x: x))
    for rows, other in ((slice(0, 4), slice(4, 8)), (slice(4, 8), slice(0, 4))):
        half = facecore.create("heads", "curricularface", t_alpha=0.3)
        other_sum = target[other].sum(0)
        batch = HeadBatch(target[rows], torch.arange(8)[rows], 8, None, lambda x: x + other_sum)
        torch.testing.assert_close(half(cos[rows], labels[rows], None, batch), expected[rows])
        assert torch.equal(half.t, whole.t)


def test_curricularface_with_partial_fc_matches_the_formulas_on_the_sampled_columns():
    embeddings, labels, weight = curricular_inputs(7)
    torch.manual_seed(0)
    head = facecore.create("heads", "curricularface", scale=16.0)
    classifier = classifier_with(head, weight, sample_rate=0.5)
    torch.manual_seed(1)
    logits, targets = classifier.logits(embeddings, labels)
    torch.manual_seed(1)
    index, _ = classifier.sample_centers(labels)
    cos = unit_cosines(embeddings.double(), weight.double()[index])
    target = cos.gather(1, targets.view(-1, 1))
    t = 0.01 * target.mean().item()
    close(logits, curricular_logits(cos, targets, target, t, 16.0, 0.5), rtol=1e-4, atol=1e-4)


# -- MagFace ---------------------------------------------------------------------------------------
def magface_inputs(seed):
    embeddings, labels, weight = inputs(seed)
    gen = torch.Generator().manual_seed(seed + 200)
    unit = embeddings / embeddings.norm(dim=1, keepdim=True)
    # norms below, at and beyond both clip ends, and inside; one-hot rows have exactly the norm asked
    norms = [5.0, 10.0, 110.0, 150.0, 60.0, 25.0, 90.0, 10.5, 109.0, 40.0]
    embeddings = unit * torch.tensor(norms).unsqueeze(1)
    embeddings[1] = torch.zeros(D).index_fill_(0, torch.tensor([1]), 10.0)  # exactly l_a
    embeddings[2] = torch.zeros(D).index_fill_(0, torch.tensor([2]), 110.0)  # exactly u_a
    place_target(embeddings, weight, 0, 0, -0.3, gen)  # cos theta <= 0: no margin (easy margin)
    place_target(embeddings, weight, 3, 3, 0.9, gen)
    return embeddings, labels, weight


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_magface_loss_terms_and_gradients_match_the_authors_formulas(seed):
    embeddings, labels, weight = magface_inputs(seed)
    head = facecore.create("heads", "magface")
    classifier = classifier_with(head, weight)
    assert embeddings[1].norm().item() == 10.0 and embeddings[2].norm().item() == 110.0
    terms, g_emb, g_w = loss_and_grads(classifier, embeddings, labels)

    def loss_fn(emb, w):
        return magface_reference(emb, w, labels)

    (want_margin, want_g), want_emb, want_w = reference_grads(loss_fn, embeddings, weight)
    assert list(terms) == ["margin", "magface_g"]
    close(terms["margin"], want_margin)
    close(terms["magface_g"], want_g)
    close(g_emb, want_emb)
    close(g_w, want_w)
    torch.testing.assert_close(classifier(embeddings, labels), terms["margin"] + terms["magface_g"])
    cos = unit_cosines(embeddings.double(), weight.double())
    assert (cos.gather(1, labels.view(-1, 1)) <= 0).any() and (cos.gather(1, labels.view(-1, 1)) > 0).any()


def test_magface_margin_is_linear_in_the_clipped_norm_and_g_uses_the_clipped_norm():
    head = facecore.create("heads", "magface", l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=2.0)
    norms = torch.tensor([[1.0], [10.0], [60.0], [110.0], [500.0]])
    torch.testing.assert_close(head.margin_of(norms).flatten(), torch.tensor([0.45, 0.45, 0.625, 0.8, 0.8]))
    a = torch.tensor([10.0, 10.0, 60.0, 110.0, 110.0])
    torch.testing.assert_close(head.extra_terms(norms)["magface_g"], 2.0 * (a / 110**2 + 1 / a).mean())
    cos = torch.tensor([[0.5, 0.1], [-0.5, 0.1], [0.0, 0.2]])
    got = head(cos, torch.tensor([0, 0, 0]), torch.tensor([[60.0], [60.0], [60.0]]))
    want0 = math.cos(math.acos(0.5) + 0.625)
    torch.testing.assert_close(got, 64.0 * torch.tensor([[want0, 0.1], [-0.5, 0.1], [0.0, 0.2]]))
    assert head(cos, torch.tensor([-1, -1, -1]), norms[:3]).equal(64.0 * cos)  # no target here: no margin


# -- both ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["curricularface", "magface"])
def test_contract_half_precision_and_finite_gradients_at_the_ends(name):
    check_head(registry("heads").get(name).factory)
    head = facecore.create("heads", name).train()
    cos = torch.tensor([[1.0, -1.0, 0.3], [-1.0, 1.0, 0.2], [0.5, 1.0, -1.0]])
    labels = torch.tensor([0, 0, 2])
    norms = torch.tensor([[10.0], [50.0], [120.0]])
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        inp = cos.to(dtype).requires_grad_(True)
        out = head(inp, labels, norms)
        assert out.dtype == torch.float32
        out.sum().backward()
        assert out.isfinite().all() and inp.grad.isfinite().all(), dtype
    head.eval()
    half = head(cos.half(), labels, norms)
    torch.testing.assert_close(half, head(cos.half().float(), labels, norms))


@pytest.mark.parametrize("name, options, message", [
    ("curricularface", {"margin": 1.6}, "head.margin: must be in [0, pi/2)"),
    ("curricularface", {"t_alpha": 0.0}, "head.t_alpha: must be in (0, 1]"),
    ("curricularface", {"scale": 0.0}, "head.scale: must be > 0"),
    ("magface", {"l_a": 120.0}, "head.u_a: must be > head.l_a (120.0)"),  # both keys named
    ("magface", {"l_a": 0.0}, "head.l_a: must be > 0"),
    ("magface", {"l_m": 0.9}, "head.u_m: must be in [head.l_m (0.9), pi/2)"),
    ("magface", {"u_m": 1.6}, "head.u_m: must be in [head.l_m"),
    ("magface", {"lambda_g": -1.0}, "head.lambda_g: must be >= 0"),
])
def test_out_of_range_options_raise_one_config_error_naming_the_key(name, options, message):
    key = message.split(":")[0].split(".")[1]
    with pytest.raises(ConfigError) as info:  # the schema's bounds, or the factory's for two keys together
        facecore.create("heads", name, **options)
    assert f"{key}:" in str(info.value) and "1 problem" in str(info.value)
    with pytest.raises(ConfigError) as info:  # the factory checks too, also without the schema
        registry("heads").get(name).factory(**options)
    assert message in str(info.value) and "1 problem" in str(info.value)


@pytest.mark.parametrize("name", ["curricularface", "magface"])
def test_defaults_and_schema(name):
    head = facecore.create("heads", name)
    reg = registry("heads").get(name)
    assert reg.description and "\n" not in reg.description
    if name == "curricularface":
        assert (head.scale, head.margin, head.t_alpha) == (64.0, 0.5, 0.01) and head.t.item() == 0.0
    else:
        assert (head.scale, head.l_a, head.u_a, head.l_m, head.u_m, head.lambda_g) == (64.0, 10.0, 110.0, 0.45, 0.8, 20.0)
    for key, option in reg.options.items():
        assert option["default"] == getattr(head, key) and option.get("description")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("curmag-data"))


@pytest.mark.slow
@pytest.mark.parametrize("head", [{"type": "curricularface", "scale": 16.0},
                                  {"type": "magface", "scale": 16.0, "lambda_g": 2.0}])
def test_short_training_run(tiny_data: Path, tmp_path: Path, head: dict) -> None:
    raw = raw_config(tiny_data, tmp_path)
    raw["head"] = dict(head)  # test_trainer's tiny_config, with this head instead of arcface
    cfg = validate_config(raw)
    summary = train(cfg, verbose=False)
    run = Path(summary["run_dir"])
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if line["event"] == "train"]
    assert train_lines and all(math.isfinite(line["loss"]) for line in train_lines)
    classifier = load_checkpoint(run / "last.pth")["classifier"]
    if head["type"] == "curricularface":
        assert classifier["head.t"].shape == (1,) and 0 < abs(classifier["head.t"].item()) < 1
    else:
        assert all(math.isfinite(line["loss_magface_g"]) for line in train_lines)
        assert all(math.isclose(line["loss"], line["loss_margin"] + line["loss_magface_g"], rel_tol=1e-4)
                   for line in train_lines)
