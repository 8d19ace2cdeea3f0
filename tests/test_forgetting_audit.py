"""Forgetting measured against Retrain, example by example: margins, KLOM and its
Retrain-vs-Retrain floor, the per-example attack and its floor, ``audit_forgetting``,
``model_outputs`` and ``mean_ci``, called the way a user calls them (``fedunlearn.<name>``).

Hand-made margin arrays check each statistic; tiny MLPs on the embedded digits build the
issue's case (an "unlearned" model that is the original is above the floor on the forget
set, a Retrain of other seeds is at it); a user package outside fedunlearn checks the
two-line plugin path."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import fedunlearn as fu


def _normal(seed: int, shape, loc=0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc, 1.0, size=shape)


# --- margins and logit-scaled confidence ---------------------------------------------

def test_margin_is_the_true_logit_minus_the_largest_other():
    logits = np.array([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0]])
    assert fu.margins(logits, [0, 0]).tolist() == [1.0, -3.0]
    assert fu.margins(logits, [2, 1]).tolist() == [-1.5, 2.0]
    stacked = np.stack([logits, 2 * logits])
    assert fu.margins(stacked, [0, 0]).tolist() == [[1.0, -3.0], [2.0, -6.0]]


def test_logit_confidence_is_log_odds_of_the_true_class_even_for_huge_logits():
    from fedunlearn.metrics.forgetting import logit_confidence

    logits = np.array([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0]])
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = np.log(p[[0, 1], [0, 1]] / (1 - p[[0, 1], [0, 1]]))
    assert np.allclose(logit_confidence(logits, [0, 1]), expected)
    assert logit_confidence(np.array([[1000.0, 0.0]]), [0]).tolist() == [1000.0]


# --- KLOM on hand-made margins --------------------------------------------------------

def test_klom_of_identical_margins_is_zero_and_of_one_distribution_near_zero():
    a = _normal(0, (16, 50))
    assert np.array_equal(fu.klom(a, a.copy()), np.zeros(50))
    big_a, big_b = _normal(1, (4000, 20)), _normal(2, (4000, 20))
    assert fu.klom(big_a, big_b).max() < 0.02


def test_klom_of_disjoint_margins_is_large():
    same = fu.klom(_normal(3, (16, 30)), _normal(4, (16, 30)))
    apart = fu.klom(_normal(5, (16, 30), loc=20.0), _normal(6, (16, 30)))
    # 16 + 16 margins in 20 bins, 0.1 smoothing: disjoint supports give
    # log((16 + 0.1 * b) / 0.1 ...) per bin, far above what two samples of one law give.
    assert apart.min() > 3.0 > same.max()


def test_audit_of_one_distribution_is_at_the_floor_and_the_attack_at_chance():
    """K = L = 32 models of one distribution: KLOM's percentiles and share above the floor
    match the floor's (the floor is calibrated, not flattering)."""
    audit = fu.audit_forgetting(_normal(7, (32, 300)), _normal(8, (32, 300)),
                                reference="retrain")
    forget = audit["all"]
    assert 0.03 < forget.share_above_floor < 0.07
    for p in ("p50", "p95", "p99"):
        assert abs(forget.klom[p] - forget.klom_floor[p]) < 0.1, p
    assert abs(forget.attack["auc"] - 0.5) < 0.05
    assert abs(forget.attack_floor["auc"] - 0.5) < 0.05
    assert forget.attack["tpr_at_1pct_fpr"] < 0.05


def test_audit_of_separated_distributions_is_far_above_the_floor():
    reference = _normal(9, (16, 200))
    above = fu.audit_forgetting(_normal(10, (16, 200), loc=6.0), reference, reference="r")
    assert above["all"].share_above_floor > 0.95
    assert above["all"].klom["p50"] > above["all"].klom_floor["p99"]
    assert above["all"].attack["auc"] > 0.99
    assert above["all"].attack["tpr_at_1pct_fpr"] > 0.9
    # A model less confident than Retrain stands out two-sided, not one-sided.
    below = _normal(11, (16, 200), loc=-6.0)
    assert fu.audit_forgetting(below, reference, reference="r")["all"].attack["auc"] > 0.99
    greater = fu.audit_forgetting(below, reference, reference="r", attack_tail="greater")
    assert greater["all"].attack["auc"] < 0.01


def test_audit_is_deterministic_and_each_point_set_independent_of_the_others():
    method, reference = _normal(12, (8, 120), loc=0.5), _normal(13, (10, 120))
    sets = {"forget": np.arange(40), "test": np.arange(40, 120)}
    one = fu.audit_forgetting(method, reference, reference="r", point_sets=sets)
    two = fu.audit_forgetting(method, reference, reference="r", point_sets=sets)
    alone = fu.audit_forgetting(method, reference, reference="r",
                                point_sets={"forget": np.arange(40)})
    assert one.to_dict(per_point=True) == two.to_dict(per_point=True)
    assert alone.to_dict()["point_sets"]["forget"] == one.to_dict()["point_sets"]["forget"]
    other_seed = fu.audit_forgetting(method, reference, reference="r", point_sets=sets, seed=1)
    assert other_seed.to_dict() != one.to_dict()


def test_to_dict_is_strict_json_and_names_the_reference():
    audit = fu.audit_forgetting(_normal(14, (6, 30)), _normal(15, (8, 30)), method="not",
                                reference="retrain-41", point_sets={"forget": [0, 1, 2]})
    out = json.loads(json.dumps(audit.to_dict(per_point=True), allow_nan=False))
    assert (out["method"], out["reference"], out["k_method"], out["k_reference"]) == \
        ("not", "retrain-41", 6, 8)
    forget = out["point_sets"]["forget"]
    assert forget["ids"] == [0, 1, 2]
    assert np.shape(forget["klom_values"]) == np.shape(forget["floor_values"]) == (20, 3)
    assert set(forget["attack"]) == {"auc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr"}
    assert out["settings"]["klom_models_per_side"] == 4
    assert (out["settings"]["attack_fit_models"], out["settings"]["attack_heldout_models"]) \
        == (4, 2)
    assert "not (K=6) against retrain-41 (K=8)" in audit.table()
    assert "margin" == out["attack_score"]


# --- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("method, reference, labels, kwargs, match", [
    (np.zeros((4, 10)), np.zeros((6, 11)), None, {}, "10 examples and reference_outputs 11"),
    (np.zeros((4, 10)), np.zeros((3, 10)), None, {}, "hold 3 model.*at least 4"),
    (np.zeros((1, 10)), np.zeros((6, 10)), None, {}, "hold 1 model.*at least 2"),
    (np.zeros((4, 10, 3)), np.zeros((6, 10)), [0] * 10, {}, "logits and reference_outputs margins"),
    (np.zeros((4, 10, 3)), np.zeros((6, 10, 3)), None, {}, "pass labels"),
    (np.zeros((4, 10, 3)), np.zeros((6, 10, 3)), [3] * 10, {}, "0..2.*got 3 at position 0"),
    (np.zeros((4, 10, 3)), np.zeros((6, 10, 3)), [0] * 9, {}, r"shape \(10,\)"),
    (np.zeros(10), np.zeros((6, 10)), None, {}, r"\(K, n, C\) logits or \(K, n\) margins"),
    (np.full((4, 10), np.nan), np.zeros((6, 10)), None, {}, "finite, got nan"),
    (np.zeros((4, 10)), np.zeros((6, 10)), None, {"point_sets": {"forget": [3, 10]}},
     "id 10 outside 0..9"),
    (np.zeros((4, 10)), np.zeros((6, 10)), None, {"point_sets": {"forget": [1, 1]}},
     "repeats ids"),
    (np.zeros((4, 10)), np.zeros((6, 10)), None, {"point_sets": {"forget": []}},
     "non-empty 1-D list"),
    (np.zeros((4, 10)), np.zeros((6, 10)), None, {"bins": 1}, "bins must be an integer >= 2"),
    (np.zeros((4, 10)), np.zeros((6, 10)), None, {"smoothing": 0}, "smoothing must be"),
    (np.zeros((4, 10)), np.zeros((6, 10)), None, {"splits": 0}, "splits must be"),
    (np.zeros((4, 10)), np.zeros((6, 10)), None, {"attack_tail": "less"},
     r"one of \['two-sided', 'greater'\], got 'less'"),
    (np.zeros((4, 10)), np.zeros((6, 10)), None, {"reference": ""}, "reference must name"),
    (np.zeros((4, 10)), np.zeros((6, 10)), [0] * 9, {}, r"labels have shape \(9,\).*10 examples"),
])
def test_bad_input_is_refused_naming_the_value(method, reference, labels, kwargs, match):
    kwargs = {"reference": "retrain", **kwargs}
    with pytest.raises(ValueError, match=match):
        fu.audit_forgetting(method, reference, labels, **kwargs)


def test_an_unknown_point_set_names_the_known_ones():
    audit = fu.audit_forgetting(_normal(16, (4, 10)), _normal(17, (4, 10)), reference="r",
                                point_sets={"forget": [0, 1], "test": [5, 6, 7]})
    with pytest.raises(KeyError, match=r"no point set 'retain'.*\['forget', 'test'\]"):
        audit["retain"]


def test_model_outputs_refuses_a_single_module_and_reads_datasets_like_tensors():
    net = nn.Linear(4, 3)
    with pytest.raises(TypeError, match="non-empty list of torch.nn.Module"):
        fu.model_outputs(net, torch.zeros(2, 4))
    x = torch.randn(5, 4)
    from_tensor = fu.model_outputs([net, nn.Linear(4, 3)], x)
    dataset = torch.utils.data.TensorDataset(x, torch.zeros(5, dtype=torch.long))
    assert from_tensor.shape == (2, 5, 3)
    assert np.allclose(fu.model_outputs([net], dataset, batch_size=2)[0], from_tensor[0])
    assert np.allclose(fu.model_outputs([net], x.numpy())[0], from_tensor[0])
    with pytest.raises(ValueError, match=r"one shape, got \[\(5, 3\), \(5, 2\)\]"):
        fu.model_outputs([net, nn.Linear(4, 2)], x)


# --- mean ± 95% CI --------------------------------------------------------------------------

def test_mean_ci_is_the_student_t_interval():
    ci = fu.mean_ci([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2  # t(0.975, 3) * sd / sqrt(4)
    assert (ci.mean, ci.n) == (2.5, 4) and math.isclose(ci.half_width, half)
    assert str(ci) == f"2.50 ± {half:.2f}"
    assert math.isclose(fu.mean_ci([1.0, 2.0, 3.0, 4.0], confidence=0.99).half_width,
                        5.840909309733355 * math.sqrt(5 / 3) / 2)
    with pytest.raises(ValueError, match="at least 2 values.*got 1"):
        fu.mean_ci([1.0])
    with pytest.raises(ValueError, match="finite, got nan at position 1"):
        fu.mean_ci([1.0, float("nan")])


# --- the case: the original is above the floor, another Retrain at it -------------

def _train_mlps(x, y, seeds, hidden=64, steps=150):
    """One 64-hidden MLP per seed, full-batch Adam, trained together; as nn.Modules."""
    nets = []
    for seed in seeds:
        torch.manual_seed(seed)
        nets.append(nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)))
    w1 = torch.stack([n[0].weight.detach().T for n in nets]).requires_grad_()
    b1 = torch.stack([n[0].bias.detach() for n in nets]).unsqueeze(1).requires_grad_()
    w2 = torch.stack([n[2].weight.detach().T for n in nets]).requires_grad_()
    b2 = torch.stack([n[2].bias.detach() for n in nets]).unsqueeze(1).requires_grad_()
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=0.01)
    xs, ys = x.expand(len(seeds), -1, -1), y.repeat(len(seeds))
    for _ in range(steps):
        opt.zero_grad()
        out = torch.relu(xs @ w1 + b1) @ w2 + b2
        nn.functional.cross_entropy(out.reshape(-1, 10), ys).backward()
        opt.step()
    with torch.no_grad():
        for k, net in enumerate(nets):
            net[0].weight.copy_(w1[k].T), net[0].bias.copy_(b1[k, 0])
            net[2].weight.copy_(w2[k].T), net[2].bias.copy_(b2[k, 0])
    return nets


@pytest.fixture(scope="module")
def digits_case(single_thread):
    """8 originals (trained with the forget set), 8 Retrains of other seeds, 8 reference
    Retrains; outputs on 40 forget, 100 retain and 200 test digits."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    order = np.random.default_rng(0).permutation(len(y))
    forget, retain, test = order[:40], order[40:240], order[240:440]
    everything = np.concatenate([retain, forget])
    original = _train_mlps(x[everything], y[everything], range(100, 108))
    other_retrain = _train_mlps(x[retain], y[retain], range(200, 208))
    reference = _train_mlps(x[retain], y[retain], range(8))
    shown = np.concatenate([forget, retain[:100], test])
    sets = {"forget": np.arange(40), "retain": np.arange(40, 140), "test": np.arange(140, 340)}
    outputs = {name: fu.model_outputs(models, x[shown]) for name, models in
               (("original", original), ("retrain-other-seeds", other_retrain),
                ("reference", reference))}
    return outputs, y[shown].numpy(), sets


def test_the_original_as_unlearned_model_is_above_the_floor_on_the_forget_set(digits_case):
    outputs, labels, sets = digits_case
    audit = fu.audit_forgetting(outputs["original"], outputs["reference"], labels,
                                reference="retrain", method="original", point_sets=sets)
    forget = audit["forget"]
    assert forget.share_above_floor > 0.12 > 3 * forget.floor_share_above_floor
    assert forget.klom["p95"] > forget.klom_floor["p99"]
    assert forget.share_above_floor > audit["test"].share_above_floor
    assert forget.attack["auc"] > 0.7 and abs(forget.attack_floor["auc"] - 0.5) < 0.05
    assert forget.attack["tpr_at_5pct_fpr"] > 3 * forget.attack_floor["tpr_at_5pct_fpr"]
    # It memorised its training data: the forget set stands out more than unseen data.
    assert forget.attack["auc"] > audit["test"].attack["auc"]
    assert audit.attack_score == "logit_confidence"


def test_a_retrain_of_other_seeds_is_at_the_floor(digits_case):
    outputs, labels, sets = digits_case
    audit = fu.audit_forgetting(outputs["retrain-other-seeds"], outputs["reference"], labels,
                                reference="retrain", point_sets=sets)
    for name in sets:
        point_set = audit[name]
        assert point_set.share_above_floor < 0.1, name
        assert abs(point_set.attack["auc"] - point_set.attack_floor["auc"]) < 0.07, name
        assert point_set.attack["tpr_at_5pct_fpr"] < 0.12, name


# --- the plugin path, from a package outside fedunlearn -------------------------------------

USER_AUDIT = '''
import json
import torch
from torch import nn
import fedunlearn
from fedunlearn import ForgettingAudit, audit_forgetting, model_outputs

def linear(seed, shift):
    torch.manual_seed(seed)
    net = nn.Linear(8, 3)
    with torch.no_grad():
        net.bias[0] += shift
    return net

x = torch.randn(60, 8, generator=torch.Generator().manual_seed(0))
labels = torch.zeros(60, dtype=torch.long)
unlearned = [linear(100 + k, 3.0) for k in range(4)]
retrained = [linear(k, 0.0) for k in range(8)]

audit = audit_forgetting(model_outputs(unlearned, x), model_outputs(retrained, x), labels,
                         reference="retrain", point_sets={"forget": range(20)})
assert isinstance(audit, ForgettingAudit)
print({n: getattr(fedunlearn, n).__module__ for n in ("audit_forgetting", "ForgettingAudit",
       "model_outputs", "margins", "klom", "mean_ci") if n in fedunlearn.__all__})
print(json.dumps(audit.to_dict(), allow_nan=False))
'''


def test_a_user_audits_k_models_in_two_lines(tmp_path):
    """The names a user imports resolve from fedunlearn.metrics (never the harness) and an
    unlearned model more confident than Retrain is caught, with the floor beside it."""
    user = tmp_path / "userpkg"
    user.mkdir()
    (user / "__init__.py").write_text("")
    (user / "audit.py").write_text(textwrap.dedent(USER_AUDIT))
    done = subprocess.run([sys.executable, "-m", "userpkg.audit"], cwd=tmp_path,
                          capture_output=True, text=True, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert (out["reference"], out["k_method"], out["k_reference"]) == ("retrain", 4, 8)
    forget = out["point_sets"]["forget"]
    assert forget["attack"]["auc"] > 0.9 and forget["share_above_floor"] > 0.2
    assert abs(forget["attack_floor"]["auc"] - 0.5) < 0.2
    modules = eval(done.stdout.strip().splitlines()[-2])
    assert len(modules) == 6
    assert all(m.startswith("fedunlearn.metrics.") for m in modules.values()), modules


@pytest.mark.slow
def test_the_docs_worked_example_prints_the_table_it_shows(tmp_path):
    """docs/measuring-forgetting.md's worked example, run as written, prints its table
    (16 small MLPs trained one by one: one to three minutes on 2 shared cores)."""
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "measuring-forgetting.md").read_text()
    section = page.split("## Worked example: the function API", 1)[1]
    code, rest = section.split("```python\n", 1)[1].split("```", 1)
    shown = rest.split("```\n", 1)[1].split("```", 1)[0]
    (tmp_path / "example.py").write_text(code)
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == shown.strip()
