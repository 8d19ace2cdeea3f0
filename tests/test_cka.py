"""Tests for linear CKA (:mod:`fedunlearn.metrics.cka`) and ``fedunlearn cka``."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from fedunlearn.cli import main
from fedunlearn.metrics.cka import cka_by_layer, layer_activations, linear_cka
from fedunlearn.harness.models import create_model
from fedunlearn.layers import example_input_for, trace_layers
from fedunlearn.negation import negate_layers

pytestmark = pytest.mark.usefixtures("single_thread")

CNN_LAYERS = ["conv1", "norm1", "conv2", "norm2", "fc1", "fc2"]
# Identical representations give 1 up to float64 rounding (~1e-15); 1e-6 leaves room
# for activations stored in float32 and summed over thousands of products.
EXACT = 1e-6


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("cnn", num_classes=10, in_channels=1, image_size=8)


def _negated_copy(model: nn.Module) -> nn.Module:
    twin = _cnn()
    twin.load_state_dict(model.state_dict())
    negate_layers(twin, example_input_for(1, 8))  # the first layer: conv1 (weight and bias)
    return twin


def _images(n: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _digits(n: int = 200) -> torch.Tensor:
    from fedunlearn.harness.data import load_dataset

    _, test, _ = load_dataset("digits")
    return torch.stack([test[i][0] for i in range(n)])


# ----------------------------------------------------------------------- linear_cka


def _reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Textbook feature form, no shortcuts."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    return (np.linalg.norm(yc.T @ xc) ** 2
            / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))


def test_identical_features_give_one():
    x = torch.randn(300, 20, generator=torch.Generator().manual_seed(0))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=EXACT)
    assert linear_cka(x.numpy(), x) == pytest.approx(1.0, abs=EXACT)


@pytest.mark.parametrize("n,d", [(200, 16), (40, 300)])  # feature form, Gram form (d >> n)
def test_invariant_to_orthogonal_transform_scaling_and_shift(n, d):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, d))
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    assert np.allclose(q.T @ q, np.eye(d))
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=EXACT)
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0, abs=EXACT)
    assert linear_cka(x, -x) == pytest.approx(1.0, abs=EXACT)  # a sign flip is a scaling
    y = rng.standard_normal((n, 5))
    base = linear_cka(x, y)
    assert linear_cka(x + 100.0, y - 3.0) == pytest.approx(base, abs=1e-9)
    assert linear_cka(x + rng.standard_normal(d), y) == pytest.approx(base, abs=1e-9)


@pytest.mark.parametrize("n,d1,d2", [(150, 8, 12), (30, 500, 700), (30, 500, 3)])
def test_gram_and_feature_forms_agree_with_textbook_formula(n, d1, d2):
    rng = np.random.default_rng(n + d1)
    x = rng.standard_normal((n, d1))
    y = x[:, :1] @ rng.standard_normal((1, d2)) + rng.standard_normal((n, d2))
    assert linear_cka(x, y) == pytest.approx(_reference_cka(x, y), rel=1e-9)
    assert linear_cka(torch.tensor(x, dtype=torch.float32), y) == pytest.approx(
        _reference_cka(x, y), rel=1e-5)


def test_symmetric_and_flattens_extra_dimensions():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((50, 2, 3, 3)), rng.standard_normal((50, 7))
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), rel=1e-12)
    assert linear_cka(x, y) == pytest.approx(linear_cka(x.reshape(50, -1), y), rel=1e-12)


def test_unrelated_features_are_near_zero():
    """Independent Gaussian X, Y (n x d): E[CKA] ~ d / (n + d).

    With unit-variance columns, E||Yc^T Xc||_F^2 ~ n d^2 (d^2 entries, each a sum
    of n independent products) and ||Xc^T Xc||_F ~ sqrt(n^2 d + n d^2) (d diagonal
    entries ~ n, d^2 off-diagonal ~ sqrt(n)), so CKA ~ d / (n + d): 0.005 for
    n=2000, d=10. The numerator is ~ n * chi2 with d^2 = 100 degrees of freedom
    (relative spread sqrt(2/100) = 14%), so 3x the mean (0.015) is far in the tail
    (P(chi2_100 > 300) < 4e-20 by a Chernoff bound; the denominators vary by well
    under 5%). Measured over these 10 seeds: 0.0035-0.0060, mean 0.0047.
    The bias grows with d/n (n=200, d=50 gives ~0.2), which is why unrelated
    features only score near 0 when n >> d.
    """
    n, d = 2000, 10
    expected = d / (n + d)
    values = []
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        values.append(linear_cka(torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)))
    assert max(values) < 3 * expected  # 0.0149
    assert np.mean(values) == pytest.approx(expected, rel=0.25)
    # d >> n: the bias of linear CKA, same formula (Gram path)
    g = torch.Generator().manual_seed(0)
    wide = linear_cka(torch.randn(50, 2000, generator=g), torch.randn(50, 2000, generator=g))
    assert wide == pytest.approx(2000 / 2050, abs=0.02)


def test_constant_features_give_nan():
    x = np.ones((20, 3))
    assert np.isnan(linear_cka(x, np.random.default_rng(0).standard_normal((20, 3))))


@pytest.mark.parametrize("x,y,match", [
    (np.zeros((10, 3)), np.zeros((11, 3)), "x has 10 samples but y has 11"),
    (np.zeros((0, 3)), np.zeros((0, 3)), "x: empty"),
    (np.zeros((1, 3)), np.ones((1, 3)), "at least 2 samples, got n=1"),
    (np.zeros((4, 0)), np.zeros((4, 3)), "x: feature matrix with 0 features"),
    (np.array([[1.0, np.nan], [0.0, 1.0]]), np.eye(2), "x: contains NaN"),
    (np.eye(3), 5.0, "y: expected an .n, d. feature matrix, got a scalar"),
])
def test_linear_cka_errors(x, y, match):
    with pytest.raises(ValueError, match=match):
        linear_cka(x, y)


# --------------------------------------------------------------- layers of models


def test_layer_activations_shapes_order_and_model_untouched():
    model = _cnn()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acts = layer_activations(model, _images(70), batch_size=32)  # 3 batches, last partial
    assert list(acts) == [i.name for i in trace_layers(model, example_input_for(1, 8))]
    assert list(acts) == CNN_LAYERS
    assert {k: tuple(v.shape) for k, v in acts.items()} == {
        "conv1": (70, 32 * 8 * 8), "norm1": (70, 32 * 8 * 8), "conv2": (70, 64 * 4 * 4),
        "norm2": (70, 64 * 4 * 4), "fc1": (70, 128), "fc2": (70, 10)}
    with torch.no_grad():
        model.eval()
        logits = model(_images(70))
    assert torch.allclose(acts["fc2"], logits, atol=1e-6)
    assert torch.allclose(acts["conv1"], model.conv1(_images(70)).flatten(1).detach(),
                          atol=1e-6)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model.train()  # flags were restored, not left in eval
    assert layer_activations(model, _images(8), layers=["fc1", "conv1"]).keys() == {
        "conv1", "fc1"}
    assert list(layer_activations(model, _images(8), layers=["fc1", "conv1"])) == [
        "conv1", "fc1"]  # execution order, whatever order was asked
    assert model.training


def test_model_against_itself_is_one_on_every_layer():
    model = _cnn()
    twin = _cnn()  # same seed: equal weights, distinct object
    for other in (model, twin):
        result = cka_by_layer(model, other, _images(100), batch_size=40)
        assert [layer for layer, _ in result] == CNN_LAYERS
        for layer, value in result:
            assert value == pytest.approx(1.0, abs=EXACT), layer


def test_vit_against_itself_is_one_on_every_layer():
    torch.manual_seed(0)
    vit = create_model("vit_tiny", num_classes=10, in_channels=1, image_size=8)
    result = cka_by_layer(vit, vit, _images(24), batch_size=10)
    assert result[0][0] == "patch_embed.proj"
    assert len(result) == len(trace_layers(vit, example_input_for(1, 8)))
    assert all(v == pytest.approx(1.0, abs=EXACT) for _, v in result)


def test_negated_first_layer_breaks_later_layers_only():
    """Negating conv1 (weight and bias) negates its output: linear CKA cannot see a
    sign flip, so conv1 -- and norm1, a LayerNorm whose per-position affine part is
    removed by centring -- stay at 1 (the paper's "high CKA at the negated layer").
    The ReLU after norm1 turns the flip into a different representation, so CKA
    drops from conv2 on (the "break in co-adaptation")."""
    model = _cnn()
    negated = _negated_copy(model)
    inputs = _digits(200)
    result = dict(cka_by_layer(model, negated, inputs))
    assert result["conv1"] == pytest.approx(1.0, abs=EXACT)
    assert result["norm1"] == pytest.approx(1.0, abs=EXACT)
    for layer in ("conv2", "norm2", "fc1", "fc2"):
        assert result[layer] < 0.99, (layer, result[layer])
    assert result["fc2"] < result["conv2"]
    # the model with itself still gives 1 everywhere
    assert all(v == pytest.approx(1.0, abs=EXACT)
               for _, v in cka_by_layer(model, model, inputs))


def test_cka_by_layer_subset_and_errors():
    model = _cnn()
    assert [name for name, _ in cka_by_layer(model, model, _images(10), layers=["fc2"])] == [
        "fc2"]
    with pytest.raises(ValueError, match="unknown layer 'conv9' for model_a.*'conv1'"):
        cka_by_layer(model, model, _images(10), layers=["conv1", "conv9"])
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        layer_activations(model, _images(10), layers=["nope"])
    with pytest.raises(ValueError, match="empty batch"):
        cka_by_layer(model, model, torch.zeros(0, 1, 8, 8))
    with pytest.raises(ValueError, match="empty batch"):
        layer_activations(model, torch.zeros(0, 1, 8, 8))
    with pytest.raises(ValueError, match="at least 2 input samples, got 1"):
        cka_by_layer(model, model, _images(1))
    with pytest.raises(ValueError, match="batch_size=0"):
        layer_activations(model, _images(4), batch_size=0)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10)

        def forward(self, x):
            return self.lin(x.flatten(1))

    with pytest.raises(ValueError, match="unknown layer 'conv1' for model_b"):
        cka_by_layer(model, Other(), _images(4))


# ------------------------------------------------------------------ fedunlearn cka


def test_cli_cka_writes_json_table_and_png(tmp_path, capsys):
    model = _cnn()
    torch.save(model.state_dict(), tmp_path / "ref.pt")
    torch.save(_cnn().state_dict(), tmp_path / "same.pt")
    torch.save(_negated_copy(model).state_dict(), tmp_path / "neg.pt")
    (tmp_path / "ft").mkdir()
    torch.save(model.state_dict(), tmp_path / "ft" / "model.pt")
    out = tmp_path / "report"
    rc = main(["cka", "--data", "digits", "--model", "cnn", f"ref={tmp_path / 'ref.pt'}",
               f"same={tmp_path / 'same.pt'}", f"neg={tmp_path / 'neg.pt'}",
               str(tmp_path / "ft" / "model.pt"), "--samples", "120", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "| layer (CKA vs ref)" in printed.out and "cka.png" in printed.err

    doc = json.loads((out / "cka.json").read_text())
    assert doc["reference"] == "ref" and doc["samples"] == 120
    assert doc["dataset"] == "digits" and doc["model"] == "cnn"
    assert [layer["name"] for layer in doc["layers"]] == CNN_LAYERS
    assert doc["layers"][0]["type"] == "Conv2d"
    assert list(doc["cka"]) == ["same", "neg", "ft"]  # a bare .../ft/model.pt is "ft"
    assert all(v == pytest.approx(1.0, abs=EXACT) for v in doc["cka"]["same"] + doc["cka"]["ft"])
    neg = dict(zip(CNN_LAYERS, doc["cka"]["neg"]))
    assert neg["conv1"] == pytest.approx(1.0, abs=EXACT)  # sign flip: invisible to CKA
    assert all(neg[layer] < 0.99 for layer in ("conv2", "norm2", "fc1", "fc2"))

    table = (out / "cka.md").read_text().splitlines()
    assert [c.strip() for c in table[0].strip("|").split("|")] == [
        "layer (CKA vs ref)", "same", "neg", "ft"]
    assert [row.strip("|").split("|")[0].strip() for row in table[2:]] == CNN_LAYERS
    assert table[2].strip("|").split("|")[1].strip() == "1.0000"
    assert printed.out.splitlines() == table

    png = (out / "cka.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_cli_cka_layers_option(tmp_path, capsys):
    path = tmp_path / "m.pt"
    torch.save(_cnn().state_dict(), path)
    rc = main(["cka", "--data", "digits", "--model", "cnn", f"a={path}", f"b={path}",
               "--layers", "fc2,conv1", "--samples", "5000", "--out", str(tmp_path / "o")])
    assert rc == 0
    doc = json.loads((tmp_path / "o" / "cka.json").read_text())
    assert [layer["name"] for layer in doc["layers"]] == ["conv1", "fc2"]
    assert doc["samples"] == 360  # the whole digits test split, and the user is told
    assert "test split has 360 images" in capsys.readouterr().err


def test_cli_cka_vit_top_level_layer(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "vit.pt"
    torch.save(create_model("vit_tiny", 10, 1, 8).state_dict(), path)
    rc = main(["cka", "--data", "digits", "--model", "vit_tiny", f"a={path}", f"b={path}",
               "--layers", "(top level),patch_embed.proj", "--samples", "20",
               "--out", str(tmp_path / "o")])
    assert rc == 0
    doc = json.loads((tmp_path / "o" / "cka.json").read_text())
    assert [layer["name"] for layer in doc["layers"]] == ["patch_embed.proj", ""]
    assert "| (top level) " in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    (["only={m}"], "the reference and at least one model"),
    (["a={m}", "a={m}"], "model name 'a' is used twice"),
    (["a={m}", "b={tmp}/missing.pt"], "no model file at"),
    (["a={m}", "b={tmp}/junk.pt"], "is not a torch state dict"),
    (["a={m}", "b={tmp}/vit.pt"], "b=.*does not fit model 'cnn'"),
    (["a={m}", "b={m}", "--layers", "conv7"], "unknown layer 'conv7'"),
    (["a={m}", "b={m}", "--samples", "1"], "samples=1"),
    (["a={m}", "=x"], "expected NAME=PATH"),
])
def test_cli_cka_errors(tmp_path, capsys, extra, message):
    m = tmp_path / "m.pt"
    torch.save(_cnn().state_dict(), m)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.manual_seed(0)
    torch.save(create_model("vit_tiny", 10, 1, 8).state_dict(), tmp_path / "vit.pt")
    args = [a.format(m=m, tmp=tmp_path) for a in extra]
    rc = main(["cka", "--data", "digits", "--model", "cnn", *args, "--out",
               str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("fedunlearn cka: ")
    assert re.search(message, err), err
