"""Backdoor planting and attack success rate."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import fedunlearn.client.actions.default as client_mod
from fedunlearn.harness.backdoor import (BackdoorConfig, PoisonTransform, attack_success_rate,
                                 patch_size_for, poisoned_ids, stamp_trigger, trigger_value)
from fedunlearn.client import NodeView, handle_train
from fedunlearn.harness.config import ExperimentConfig
from fedunlearn.training import to_arrays
from fedunlearn.harness.node import harness_view

from .helpers import context, run_config
from .test_client_strategy import train_message


def test_stamp_trigger_shape_position_and_value():
    x = torch.zeros(2, 3, 8, 8)
    value = torch.tensor([1.0, 2.0, 3.0])
    out = stamp_trigger(x, 2, "bottom-right", value)
    assert out.shape == x.shape and torch.equal(x, torch.zeros_like(x))  # input untouched
    for c in range(3):
        assert torch.all(out[:, c, 6:, 6:] == value[c])
    out[:, :, 6:, 6:] = 0
    assert torch.equal(out, x), "nothing outside the patch changes"
    tl = stamp_trigger(torch.zeros(1, 8, 8), 3, "top-left", torch.tensor([5.0]))
    assert tl[0, :3, :3].eq(5).all() and tl[0, 3:, :].eq(0).all() and tl[0, :, 3:].eq(0).all()


def test_patch_size_defaults_for_digits_and_cifar():
    cfg = BackdoorConfig(clients=(0,))
    assert patch_size_for(cfg, 8) == 3 and patch_size_for(cfg, 32) == 4
    with pytest.raises(ValueError, match="larger than"):
        patch_size_for(dataclasses.replace(cfg, patch_size=9), 8)


def test_poisoned_ids_are_the_chosen_fraction_of_non_target_samples():
    labels = np.array([0, 1, 2, 3] * 25)
    train = np.arange(0, 100, 2)  # labels 0 and 2 only
    cfg = BackdoorConfig(clients=(0,), fraction=0.4, target=0)
    ids = poisoned_ids(train, labels, cfg, seed=3)
    assert ids.size == round(0.4 * 25)
    assert set(ids) <= set(train) and not (labels[ids] == 0).any()
    assert np.array_equal(ids, poisoned_ids(train, labels, cfg, seed=3))


def test_poison_transform_touches_only_poisoned_samples():
    transform = PoisonTransform(np.array([5, 7]), 2, "bottom-right", torch.tensor([9.0]), 0)
    x, y, ids = torch.zeros(4, 1, 4, 4), torch.tensor([1, 2, 3, 4]), torch.tensor([4, 5, 6, 7])
    xp, yp = transform(x, y, ids)
    assert yp.tolist() == [1, 0, 3, 0]
    assert xp[1, 0, 2:, 2:].eq(9).all() and xp[3, 0, 2:, 2:].eq(9).all()
    assert torch.equal(xp[[0, 2]], x[[0, 2]])


def test_only_backdoor_clients_poison_their_training(monkeypatch):
    rc = run_config(**{"federation.num-clients": 4, "dataset.name": "synthetic",
                       "backdoor.clients": "1", "backdoor.fraction": 0.5})
    transforms = []
    real = client_mod.train_local

    def spy(model, dataset, indices, **kw):
        transforms.append(kw.get("transform"))
        return real(model, dataset, indices, **kw)

    monkeypatch.setattr(client_mod, "train_local", spy)
    for pid in (0, 1):
        view = harness_view(context(pid, rc))
        handle_train(train_message(to_arrays(view.new_model()), None), context(pid, rc), harness_view)
    assert transforms[0] is None
    poison = transforms[1]
    view = harness_view(context(1, rc))
    candidates = view.train_indices()[view.labels()[view.train_indices()] != 0]
    assert len(poison.ids) == round(0.5 * len(candidates))
    assert set(poison.ids.tolist()) <= set(view.train_indices().tolist())


def test_trigger_value_auto_is_brightest_value():
    ds = TensorDataset(torch.tensor([[[[0.0, 1.0]]], [[[3.0, -1.0]]]]), torch.tensor([0, 1]))
    assert trigger_value(BackdoorConfig(clients=(0,)), ds).tolist() == [3.0]
    assert trigger_value(BackdoorConfig(clients=(0,), value="-2"), ds).tolist() == [-2.0]


class PatchDetector(nn.Module):
    """Predicts class 0 when the bottom-right pixel is bright, else class 1."""

    def forward(self, x):
        bright = (x[:, 0, -1, -1] > 0.5).float()
        return torch.stack([bright, 1 - bright], dim=1)


def test_asr_arithmetic_on_hand_made_model():
    x = torch.zeros(10, 1, 4, 4)
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    ds = TensorDataset(x, labels)
    cfg = BackdoorConfig(clients=(0,), target=0, patch_size=1)
    # Trigger bright: every non-target sample flips to the target -> 100%.
    asr = attack_success_rate(PatchDetector(), ds, labels.numpy(), cfg, torch.tensor([1.0]), 4)
    assert asr == 100.0
    # Trigger dark: no flip -> 0%.
    asr = attack_success_rate(PatchDetector(), ds, labels.numpy(), cfg, torch.tensor([0.0]), 4)
    assert asr == 0.0
    # Trigger at the wrong corner for half the model: a model that looks top-left.
    cfg_tl = dataclasses.replace(cfg, position="top-left")
    asr = attack_success_rate(PatchDetector(), ds, labels.numpy(), cfg_tl, torch.tensor([1.0]), 4)
    assert asr == 0.0


def test_backdoor_changes_checkpoint_key_and_is_validated():
    base = ExperimentConfig.from_run_config(run_config())
    bd = ExperimentConfig.from_run_config(run_config(**{"backdoor.clients": "0"}))
    assert bd.backdoor.enabled and not base.backdoor.enabled
    assert bd.pretrain_key() != base.pretrain_key()
    other = ExperimentConfig.from_run_config(run_config(**{"backdoor.clients": "0",
                                                           "backdoor.fraction": 0.3}))
    assert other.pretrain_key() != bd.pretrain_key()
    # Backdoor settings without backdoor clients do not change the key.
    idle = ExperimentConfig.from_run_config(run_config(**{"backdoor.fraction": 0.3}))
    assert idle.pretrain_key() == base.pretrain_key()
    for key, value, msg in [("backdoor.position", "middle", "'middle'"),
                            ("backdoor.fraction", 0.0, "backdoor.fraction=0.0"),
                            ("backdoor.clients", "12", "[12]"),
                            ("backdoor.value", "bright", "'bright'")]:
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            ExperimentConfig.from_run_config(run_config(**{"backdoor.clients": "0", key: value}))
