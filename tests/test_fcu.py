"""FCU: frequency-guided fusion on hand-made weights, penultimate features, the
contrastive step, and the method through the in-process grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedunlearn.client import NodeView
from fedunlearn.client.actions.contrastive_fusion import (contrastive_loss,
                                                          frequency_fusion, fuse_into,
                                                          low_band)
from fedunlearn.client.local_steps import PenultimateFeatures, random_model
from fedunlearn.launch import check_run_config
from fedunlearn.metrics import arrayrecord_nbytes
from fedunlearn.harness.models import create_model
from fedunlearn.requests import UnlearningRequest
from fedunlearn.harness.methods import create_method
from fedunlearn.training import to_arrays
from fedunlearn.harness.node import harness_view

from .helpers import NODE_ID, NUM, RC, bytes_of, context, make_context


@pytest.fixture(scope="module")
def app():
    from flower_apps.client_app import app as client_app

    return client_app


def spectrum(w: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft2(w))


# -- the fusion on hand-made weights ---------------------------------------------------------
def test_low_band_is_the_centred_symmetric_block():
    band = low_band(6, 5, 0.5)  # floor(6*0.5/2) = 1, floor(5*0.5/2) = 1
    # fftshift puts frequency 0 at index n // 2: rows 3 +- 1, columns 2 +- 1.
    expected = np.zeros((6, 5), dtype=bool)
    expected[2:5, 1:4] = True
    assert np.array_equal(band, expected)
    assert low_band(4, 4, 0.0).sum() == 1  # the DC term only
    assert low_band(4, 6, 1.0).all()


@pytest.mark.parametrize("preserve", ["original_low", "unlearned_low"])
def test_fusion_keeps_the_originals_phase_and_swaps_the_chosen_amplitude_band(preserve):
    rng = np.random.default_rng(0)
    original = rng.normal(size=(6, 8))
    unlearned = rng.normal(size=(6, 8))
    fused = frequency_fusion(unlearned, original, rho=0.5, preserve=preserve)
    assert fused.shape == (6, 8) and fused.dtype == original.dtype
    s_f, s_o, s_u = spectrum(fused), spectrum(original), spectrum(unlearned)
    band = low_band(6, 8, 0.5)
    assert 1 < band.sum() < band.size
    # Phase: the original's at every frequency.
    assert np.allclose(np.exp(1j * np.angle(s_f)), np.exp(1j * np.angle(s_o)), atol=1e-9)
    # Amplitude: the low band from one side, the rest from the other.
    low, high = (s_o, s_u) if preserve == "original_low" else (s_u, s_o)
    assert np.allclose(np.abs(s_f)[band], np.abs(low)[band])
    assert np.allclose(np.abs(s_f)[~band], np.abs(high)[~band])
    # The symmetric band keeps the spectrum Hermitian: the inverse FFT is real, so
    # taking its real part loses nothing.
    assert np.allclose(np.fft.ifft2(np.fft.ifftshift(s_f)).imag, 0, atol=1e-12)


def test_fusion_of_a_conv_weight_round_trips_its_layout():
    rng = np.random.default_rng(1)
    conv = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)  # (C_out, C_in, k_h, k_w)
    assert np.allclose(frequency_fusion(conv, conv, 0.5), conv, atol=1e-6)
    other = rng.normal(size=conv.shape).astype(np.float32)
    fused = frequency_fusion(other, conv, 0.5, "original_low")
    assert fused.shape == conv.shape and fused.dtype == np.float32
    # The fused matrix is the reference's layout: permute(1, 2, 3, 0), (C_in*k_h, k_w*C_out).
    as_matrix = lambda w: np.transpose(w, (1, 2, 3, 0)).reshape(9, 12)
    s_f, s_o = spectrum(as_matrix(fused)), spectrum(as_matrix(conv))
    band = low_band(9, 12, 0.5)
    assert np.allclose(np.abs(s_f)[band], np.abs(s_o)[band], atol=1e-4)
    assert np.allclose(np.abs(s_f)[~band], np.abs(spectrum(as_matrix(other)))[~band],
                       atol=1e-4)


def test_bad_preserve_is_rejected():
    with pytest.raises(ValueError, match="preserve='both'"):
        frequency_fusion(np.zeros((2, 2)), np.zeros((2, 2)), 0.5, "both")
    with pytest.raises(ValueError) as err:
        check_run_config({"method": "fcu", "method-params": "fcu.preserve=both"})
    assert "preserve='both'; allowed: original_low, unlearned_low" in str(err.value)


def test_fuse_into_fuses_conv_and_linear_weights_and_resets_the_rest():
    original = create_model("cnn", num_classes=10, in_channels=1, image_size=8)
    torch.manual_seed(1)
    model = create_model("cnn", num_classes=10, in_channels=1, image_size=8)
    fused = fuse_into(model, original, 0.5, "original_low")
    assert fused == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    state, ref = model.state_dict(), original.state_dict()
    for key in state:
        if key in fused:
            assert not torch.equal(state[key], ref[key])
        else:  # biases and LayerNorm parameters come from the original
            assert torch.equal(state[key], ref[key]), key


def test_fuse_into_selects_by_module_type_on_resnet(single_thread):
    """ResNet's ``downsample.0`` and ``fc`` match no reference name pattern; by type they
    are fused like every other Conv/Linear weight."""
    original = create_model("resnet18", num_classes=10, in_channels=3, image_size=8)
    model = create_model("resnet18", num_classes=10, in_channels=3, image_size=8)
    fused = fuse_into(model, original, 0.5, "original_low")
    assert "layer2.0.downsample.0.weight" in fused and "fc.weight" in fused
    assert "layer2.0.downsample.1.weight" not in fused  # BatchNorm: from the original
    assert len(fused) == 21  # 20 convolutions + fc


# -- features and the contrastive step --------------------------------------------------------
def test_penultimate_features_are_the_input_of_the_last_linear():
    torch.manual_seed(0)
    model = create_model("cnn", num_classes=10, in_channels=1, image_size=8)
    x = torch.randn(5, 1, 8, 8)
    logits, h = PenultimateFeatures(model, x[:1])(x)
    hidden = model.act(model.fc1(torch.flatten(
        model.pool(model.act(model.norm2(model.conv2(
            model.pool(model.act(model.norm1(model.conv1(x)))))))), 1)))
    assert h.shape == (5, 128) and torch.allclose(h, hidden)
    assert torch.allclose(logits, model.fc2(hidden))
    resnet = create_model("resnet18", num_classes=10, in_channels=3, image_size=8)
    features = PenultimateFeatures(resnet, torch.randn(1, 3, 8, 8))
    assert features.layer is resnet.fc


def test_contrastive_steps_pull_features_towards_the_downgraded_model(single_thread):
    torch.manual_seed(0)
    new = lambda: create_model("cnn", num_classes=10, in_channels=1, image_size=8)
    model = new()
    original = new().eval()
    original.load_state_dict(model.state_dict())
    downgraded = random_model(new, 3).eval()
    assert torch.equal(random_model(new, 3).fc2.weight, downgraded.fc2.weight)  # seeded
    x = torch.randn(16, 1, 8, 8)
    f, f_o, f_dn = (PenultimateFeatures(m, x[:1]) for m in (model, original, downgraded))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        _, h = f(x)
        with torch.no_grad():
            h_o, h_dn = f_o(x)[1], f_dn(x)[1]
        loss = contrastive_loss(h, h_o, h_dn, 0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    # Identical features: logits [1/tau, cos(h, h_dn)/tau], so the loss is above ln 2.
    assert losses[0] > np.log(2)


# -- the method through the in-process grid ------------------------------------------------
def test_fcu_runs_at_the_client_wise_target_and_reports_its_two_extra_models(
        app, server_identity, single_thread, local_grid):
    rc = {**RC, "method": "fcu", "method-params": "fcu.iterations=6 fcu.fusion_interval=4"}
    target = NODE_ID[0]
    request = UnlearningRequest("client", 0, node_id=target)
    strategy = create_method("fcu", make_context(rc, {target: request}))
    assert strategy.refusal({target: request}) is None
    grid = local_grid(app, NUM, rc)
    start = to_arrays(strategy.context.model_factory())
    with strategy.cost_phase("unlearning"):
        out = strategy.unlearning_step(grid, start)
    assert [m.metadata.dst_node_id for m in grid.sent] == [target]
    assert grid.sent[0].metadata.message_type == "train.contrastive_fusion"
    assert grid.sent[0].content["config"]["param.preserve"] == "original_low"
    meter = strategy.costs["unlearning"]
    model_bytes = arrayrecord_nbytes(start)
    assert meter.bytes_down == bytes_of(grid.sent) == model_bytes  # only the global model
    assert meter.bytes_up == model_bytes
    metrics = grid.replies[0].content["metrics"]
    view = harness_view(context(0, RC))
    assert metrics["num-examples"] == view.train_indices().size
    assert metrics["samples-processed"] == 6 * 32
    assert meter.forward_samples == 2 * meter.samples_processed  # theta_o and theta_dn
    assert strategy.notes["target_temporary_bytes"] == 2 * model_bytes
    # Biases and LayerNorm come back as the original's (reset at each fusion).
    for key in ("conv1.bias", "norm1.weight", "fc2.bias"):
        assert np.array_equal(out[key].numpy(), start[key].numpy())
    assert not np.array_equal(out["conv1.weight"].numpy(), start["conv1.weight"].numpy())
    # Recovery: the client-wise target drops out.
    assert target not in strategy.participants(strategy.recovery_phase().role, grid)


def test_fusion_interval_beyond_iterations_is_rejected():
    with pytest.raises(ValueError) as err:
        check_run_config({"method": "fcu",
                          "method-params": "fcu.iterations=5 fcu.fusion_interval=10"})
    assert "fusion_interval=10 must be in [1, iterations=5]" in str(err.value)


def test_random_model_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    random_model(lambda: nn.Linear(2, 2), 7)
    assert torch.equal(torch.rand(1), expected)
