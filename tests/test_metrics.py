"""Tests for fedunlearn.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedunlearn.metrics import (
    METRIC_KEYS,
    accuracy,
    accuracy_from_logits,
    arrayrecord_nbytes,
    average_gap,
    deltas,
    flops_per_sample,
    membership_features,
    mia_score,
    predict,
    split_nonmembers,
    state_nbytes,
)

# ---------------------------------------------------------------- accuracy


class _PairDataset(Dataset):
    """Items ``(x: Tensor[1, 1, 2], y: int)`` like an image dataset."""

    def __init__(self, xs: torch.Tensor, ys: list[int]) -> None:
        self.xs, self.ys = xs, ys

    def __len__(self) -> int:
        return len(self.ys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.xs[i], self.ys[i]


def _identity_model() -> nn.Module:
    """Flatten + Linear(2, 2) with identity weights: predicts argmax of the 2 pixels."""
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2))
        lin.bias.zero_()
    return nn.Sequential(nn.Flatten(), lin)


def _toy_data() -> _PairDataset:
    xs = torch.tensor(
        [[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [5.0, 4.0], [1.0, 2.0]]
    ).reshape(6, 1, 1, 2)
    # predictions are          0, 1, 0, 1, 0, 1
    return _PairDataset(xs, [0, 1, 1, 1, 1, 0])  # correct: 0, 1, 3 -> 3/6


def test_predict_returns_logits_labels_in_order() -> None:
    model = _identity_model()
    data = _toy_data()
    logits, labels = predict(model, data, [3, 0, 4], batch_size=2)
    assert logits.dtype == np.float32 and logits.shape == (3, 2)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, [1, 0, 1])
    np.testing.assert_allclose(logits, [[0.0, 3.0], [1.0, 0.0], [5.0, 4.0]])


def test_predict_restores_training_flags_and_empty() -> None:
    model = _identity_model()
    model.train()
    model[0].eval()  # mixed state must survive
    predict(model, _toy_data(), np.arange(6))
    assert model.training and model[1].training and not model[0].training
    logits, labels = predict(model, _toy_data(), np.array([], dtype=np.int64))
    assert logits.shape == (0, 0) and labels.shape == (0,)


def test_accuracy_known_values() -> None:
    model = _identity_model()
    data = _toy_data()
    assert accuracy(model, data, range(6), batch_size=4) == pytest.approx(50.0)
    assert accuracy(model, data, [0, 1, 3]) == pytest.approx(100.0)
    assert accuracy(model, data, [2, 4, 5]) == pytest.approx(0.0)
    assert accuracy(model, data, [0, 2, 4, 5]) == pytest.approx(25.0)
    assert math.isnan(accuracy(model, data, []))


def test_accuracy_tensordataset() -> None:
    model = _identity_model()
    xs = torch.tensor([[3.0, 1.0], [1.0, 3.0]]).reshape(2, 1, 1, 2)
    data = TensorDataset(xs, torch.tensor([0, 0]))
    assert accuracy(model, data, [0, 1]) == pytest.approx(50.0)


def test_accuracy_from_logits() -> None:
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert accuracy_from_logits(logits, np.array([1, 0, 0, 0])) == pytest.approx(75.0)
    assert math.isnan(accuracy_from_logits(np.zeros((0, 0)), np.zeros(0)))


# ---------------------------------------------------------------- MIA features


def test_membership_features_manual() -> None:
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1000.0, 0.0, -1000.0]])
    labels = np.array([0, 2, 1])
    feats = membership_features(logits, labels)
    assert feats.shape == (3, 3)
    for row, (z, y) in zip(feats, zip(logits, labels)):
        if np.abs(z).max() < 100:  # manual naive softmax is safe here
            p = np.exp(z) / np.exp(z).sum()
            expected = [-np.log(p[y]), p[y], -(p * np.log(p)).sum()]
            np.testing.assert_allclose(row, expected, rtol=1e-10, atol=1e-12)
    # uniform: loss = entropy = log 3, confidence 1/3
    np.testing.assert_allclose(feats[1], [np.log(3), 1 / 3, np.log(3)])
    # extreme logits: stable, true label has p = e^-1000 -> loss 1000, entropy ~0
    assert np.all(np.isfinite(feats[2]))
    assert feats[2, 0] == pytest.approx(1000.0)
    assert feats[2, 1] == 0.0
    assert feats[2, 2] == pytest.approx(0.0, abs=1e-12)
    assert membership_features(np.zeros((0, 0)), np.zeros(0)).shape == (0, 3)


# ---------------------------------------------------------------- MIA score


def _gauss(rng: np.random.Generator, n: int, mean: float) -> np.ndarray:
    return rng.normal(mean, 1.0, size=(n, 3))


def test_mia_same_distribution_is_chance() -> None:
    rng = np.random.default_rng(1)
    member = _gauss(rng, 600, 2.0)
    nonmember = _gauss(rng, 500, 0.0)
    target = _gauss(rng, 400, 0.0)  # forget set looks like unseen data
    heldout = _gauss(rng, 500, 0.0)
    score = mia_score(member, nonmember, target, heldout, seed=0)
    assert 42.0 <= score <= 58.0


def test_mia_member_target_is_high() -> None:
    rng = np.random.default_rng(2)
    member = _gauss(rng, 600, 2.0)
    nonmember = _gauss(rng, 500, 0.0)
    target = _gauss(rng, 300, 2.0)  # forget set still looks like training data
    heldout = _gauss(rng, 500, 0.0)
    score = mia_score(member, nonmember, target, heldout, seed=0)
    assert score > 80.0


def test_mia_on_real_features() -> None:
    """Members: confident correct logits; non-members: noisy logits."""
    rng = np.random.default_rng(3)

    def logits(n: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, size=n)
        z = rng.normal(0.0, 1.0, size=(n, 10))
        z[np.arange(n), y] += margin
        return z, y

    mem = membership_features(*logits(400, 8.0))
    non = membership_features(*logits(400, 1.0))
    held = membership_features(*logits(400, 1.0))
    assert mia_score(mem, non, membership_features(*logits(200, 8.0)), held) > 80.0
    assert 40.0 <= mia_score(mem, non, membership_features(*logits(200, 1.0)), held) <= 60.0


def test_mia_deterministic_under_seed() -> None:
    rng = np.random.default_rng(4)
    args = (_gauss(rng, 300, 1.0), _gauss(rng, 200, 0.0), _gauss(rng, 150, 0.5), _gauss(rng, 90, 0.0))
    a = mia_score(*args, seed=7)
    b = mia_score(*(x.copy() for x in args), seed=7)
    assert a == b
    assert 0.0 <= a <= 100.0


def test_mia_nan_cases() -> None:
    rng = np.random.default_rng(5)
    m, n = _gauss(rng, 50, 1.0), _gauss(rng, 50, 0.0)
    empty = np.zeros((0, 3))
    assert math.isnan(mia_score(m, n, empty, n))
    assert math.isnan(mia_score(m, n, m, empty))
    assert math.isnan(mia_score(m[:1], n, m, n))  # < 2 members to fit
    assert math.isnan(mia_score(m, empty, m, n))  # no non-members to fit


def test_split_nonmembers() -> None:
    a, b = split_nonmembers(11, seed=3)
    assert len(a) == 5 and len(b) == 6
    assert a.dtype == np.int64
    np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.arange(11))
    a2, b2 = split_nonmembers(11, seed=3)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)
    e1, e2 = split_nonmembers(0)
    assert e1.size == 0 and e2.size == 0


# ---------------------------------------------------------------- costs


def test_flops_linear_exact() -> None:
    model = nn.Linear(10, 5)
    model.train()
    model.weight.grad = torch.ones_like(model.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flops = flops_per_sample(model, (10,), num_classes=5)
    # Forward: addmm [1x10] @ [10x5] = 10*5 MACs = 2*10*5 = 100 FLOPs per sample.
    # Backward: torch counts only the weight-gradient mm (grad_out^T @ x: 5*10 MACs
    # = 100 FLOPs); the input does not require grad so no input-gradient mm, and the
    # bias gradient (a sum) and the cross-entropy loss are not counted.
    # => train = 100 + 100 = 200 = 2 * forward.
    assert flops == {"forward": 100, "train": 200}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(model.weight.grad, torch.ones_like(model.weight))
    assert model.bias.grad is None
    assert model.training
    assert model.weight.requires_grad


def test_flops_two_layers_and_frozen_params() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    model[1].weight.requires_grad_(False)
    flops = flops_per_sample(model, (3, 2, 2), num_classes=3)
    fwd = 2 * 12 * 8 + 2 * 8 * 3
    # backward: both weight grads (2*12*8 + 2*8*3) + input grad of the 2nd Linear (2*8*3)
    assert flops == {"forward": fwd, "train": fwd + fwd + 2 * 8 * 3}
    assert not model[1].weight.requires_grad  # restored


def test_arrayrecord_and_state_nbytes() -> None:
    model = nn.Sequential(nn.Linear(100, 50), nn.Linear(50, 10))
    state = model.state_dict()
    numel = sum(t.numel() for t in state.values())
    assert state_nbytes(state) == numel * 4
    record = ArrayRecord(state)
    nbytes = arrayrecord_nbytes(record)
    assert nbytes >= numel * 4
    # .npy header is at most a few hundred bytes per array
    assert nbytes - numel * 4 <= 256 * len(state)
    assert state_nbytes({"h": torch.zeros(3, dtype=torch.float16)}) == 6


# ---------------------------------------------------------------- gap


def test_average_gap_not_table() -> None:
    ft = {"retain": 92.48, "forget": 85.56, "test": 82.36, "mia": 50.90}
    retrain = {"retain": 91.66, "forget": 83.05, "test": 82.32, "mia": 50.23}
    d = deltas(ft, retrain)
    assert set(d) == set(METRIC_KEYS)
    assert d["retain"] == pytest.approx(0.82)
    assert d["forget"] == pytest.approx(2.51)
    assert d["test"] == pytest.approx(0.04)
    assert d["mia"] == pytest.approx(0.67)
    assert round(average_gap(ft, retrain), 2) == 1.01


def test_average_gap_signs_and_nan() -> None:
    ref = {"retain": 90.0, "forget": 80.0, "test": 85.0, "mia": 50.0}
    m = {"retain": 88.0, "forget": 84.0, "test": float("nan"), "mia": 51.0}
    assert deltas(m, ref)["retain"] == pytest.approx(-2.0)
    assert math.isnan(average_gap(m, ref))  # test accuracy missing: no gap
    assert average_gap({**m, "test": 86.0}, ref) == pytest.approx((2.0 + 4.0 + 1.0 + 1.0) / 4)
    # A metric that could not be computed makes the gap missing, not a mean of fewer terms.
    assert math.isnan(average_gap({"retain": 88.0}, ref))
    assert math.isnan(average_gap({k: float("nan") for k in METRIC_KEYS}, ref))
    assert average_gap(m, ref, keys=("forget",)) == pytest.approx(4.0)
