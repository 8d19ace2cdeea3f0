"""The plugin path of the forgetting audit: a user with K models of their own per kind
(unlearned and Retrain) calls ``fedunlearn.model_outputs`` and
``fedunlearn.audit_forgetting`` from a package outside fedunlearn, as
docs/measuring-forgetting.md documents it, for a class-wise and an instance-wise request
(the forget points: the class's samples; the requested samples)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

USER_MODULE = '''
"""A user's own K models of two kinds, audited for class- and instance-wise forgetting."""
import json

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedunlearn import audit_forgetting, model_outputs

torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
centres = torch.randn(3, 8, generator=gen) * 2.5
y = torch.arange(3).repeat_interleave(120)
x = centres[y] + torch.randn(len(y), 8, generator=gen)
train, test = np.arange(0, 360, 2), np.arange(1, 360, 2)      # 180 + 180 samples
noisy = train[:24]                                            # instance-wise: 24 ids...
y_train = y.clone()
y_train[noisy] = (y[noisy] + 1) % 3                           # ...with labels the user got wrong


def fit(ids, seed, labels, steps=200):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[ids]), labels[ids]).backward()
        opt.step()
    return net


def audit(forget, retained, labels, shown_as):
    """Models trained with everything (unlearning that did nothing), Retrains of other
    seeds (unlearning as good as Retrain) and the reference Retrains, on forget + test."""
    everything = np.union1d(retained, forget)
    kinds = {"did-nothing": [fit(everything, 100 + k, labels) for k in range(6)],
             "retrain-other-seeds": [fit(retained, 200 + k, labels) for k in range(6)]}
    reference = [fit(retained, k, labels) for k in range(12)]
    shown = np.concatenate([forget, test])
    points = {"forget": range(len(forget)), "test": range(len(forget), len(shown))}
    inputs = {"tensor": x[shown], "dataset": TensorDataset(x[shown], labels[shown])}
    ref = model_outputs(reference, inputs["tensor"])
    out = {}
    for kind, models in kinds.items():
        mine = model_outputs(models, inputs[shown_as])
        result = audit_forgetting(mine, ref, labels[shown], reference="retrain",
                                  method=kind, point_sets=points)
        out[kind] = result.to_dict()
    return out


in_class = (y[train] == 2).numpy()                            # class-wise: class 2
print(json.dumps({
    "class": audit(train[in_class], train[~in_class], y, "tensor"),
    "instance": audit(noisy, np.setdiff1d(train, noisy), y_train, "dataset")},
    allow_nan=False))
'''


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    """The user's module run as ``python -m userpkg.audit``: every kind's audit as JSON."""
    root = tmp_path_factory.mktemp("plugin-audit")
    (root / "userpkg").mkdir()
    (root / "userpkg" / "__init__.py").write_text("")
    (root / "userpkg" / "audit.py").write_text(textwrap.dedent(USER_MODULE))
    done = subprocess.run([sys.executable, "-m", "userpkg.audit"], cwd=root,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("scope", ["class", "instance"])
def test_models_that_kept_the_forget_data_are_above_the_floor(audits, scope):
    audit = audits[scope]["did-nothing"]
    assert (audit["method"], audit["reference"]) == ("did-nothing", "retrain")
    assert (audit["k_method"], audit["k_reference"]) == (6, 12)
    forget, test = audit["point_sets"]["forget"], audit["point_sets"]["test"]
    assert forget["share_above_floor"] > 0.5 and forget["floor_share_above_floor"] < 0.1
    assert forget["attack"]["auc"] > 0.95 and abs(forget["attack_floor"]["auc"] - 0.5) < 0.1
    # what it was asked to forget stands out more than data it never saw
    assert forget["share_above_floor"] > test["share_above_floor"]
    assert forget["attack"]["auc"] > test["attack"]["auc"]


@pytest.mark.parametrize("scope", ["class", "instance"])
def test_models_as_good_as_retrain_are_at_the_floor(audits, scope):
    audit = audits[scope]["retrain-other-seeds"]
    for name, point_set in audit["point_sets"].items():
        assert point_set["share_above_floor"] < 0.1, name
        assert abs(point_set["attack"]["auc"] - point_set["attack_floor"]["auc"]) < 0.2, name
