"""Server-side measurement: class-matched MIA, its interval, failed nodes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedunlearn.client import NodeView
from fedunlearn.harness.config import ExperimentConfig
from fedunlearn.harness.evaluation import Evaluator, forgotten_classes
from fedunlearn.metrics import mia_result
from fedunlearn.requests import UnlearningRequest
from fedunlearn.training import to_arrays
from fedunlearn.harness.node import harness_view
from fedunlearn.harness.data import federated_data

from .helpers import NODE, NODE_ID, NUM, RC, RecordingGrid, context


@pytest.fixture(scope="module")
def setup():
    from flower_apps.client_app import app

    cfg = ExperimentConfig.from_run_config(RC)
    view = harness_view(context(0, RC))
    evaluator = Evaluator(cfg, federated_data(cfg), view.new_model, torch.device("cpu"))
    torch.manual_seed(0)
    return app, view, evaluator, to_arrays(view.new_model())


def test_class_wise_mia_uses_held_out_samples_of_the_forgotten_classes(
        setup, server_identity, single_thread, local_grid):
    app, view, evaluator, arrays = setup
    requests = {n: UnlearningRequest("class", p, classes=(2,), node_id=n)
                for n, p in NODE.items()}
    details: dict = {}
    metrics = evaluator.evaluate(local_grid(app, NUM, RC), arrays, requests, NODE,
                                 details=details)
    assert details["mia_class_matched"] == [2]
    test_labels = np.asarray(evaluator.data.test.targets)
    heldout_of_class = int((test_labels == 2).sum())  # every test sample of class 2
    n_forget = sum(int((view.labels()[evaluator.data.train_indices(p)] == 2).sum())
                   for p in NODE.values())
    assert details["mia_n_heldout"] == details["mia_n_forget"] == min(heldout_of_class,
                                                                      n_forget)
    low, high = details["mia_ci95"]
    assert low <= metrics["mia"] <= high
    assert details["failed_nodes"] == []
    # Client-wise: the whole held-out half, no class matching.
    details = {}
    evaluator.evaluate(local_grid(app, NUM, RC), arrays,
                       {NODE_ID[0]: UnlearningRequest("client", 0, node_id=NODE_ID[0])}, NODE,
                       details=details)
    assert details["mia_class_matched"] == []


def test_a_failed_node_makes_the_federated_metrics_missing(setup, server_identity,
                                                           single_thread):
    app, view, evaluator, arrays = setup

    class OneNodeFails(RecordingGrid):  # the in-process grid, one node never answering
        def send_and_receive(self, messages, *, timeout=None):
            silent = NODE_ID[0]  # partition 0's node never answers
            return super().send_and_receive(
                [m for m in messages if m.metadata.dst_node_id != silent], timeout=timeout)

    details: dict = {}
    metrics = evaluator.evaluate(OneNodeFails(app, NUM, RC), arrays, {}, NODE,
                                 details=details)
    assert details["failed_nodes"] == [NODE_ID[0]]
    assert math.isnan(metrics["retain"]) and math.isnan(metrics["mia"])
    assert not math.isnan(metrics["test"])  # the server's own data is still measured


def test_forgotten_classes_only_when_every_request_is_class_wise():
    assert forgotten_classes({1: UnlearningRequest("class", 0, classes=(3, 1)),
                              2: UnlearningRequest("class", 1, classes=(3,))}) == [1, 3]
    assert forgotten_classes({1: UnlearningRequest("class", 0, classes=(3,)),
                              2: UnlearningRequest("client", 1)}) == []


def test_mia_interval_and_small_sample_flag():
    rng = np.random.default_rng(0)
    member, nonmember = rng.normal(0, 1, (200, 3)), rng.normal(1, 1, (200, 3))
    big = mia_result(member, nonmember, rng.normal(0, 1, (300, 3)),
                     rng.normal(1, 1, (300, 3)))
    small = mia_result(member, nonmember, rng.normal(0, 1, (20, 3)),
                       rng.normal(1, 1, (20, 3)))
    assert big["n_forget"] == 300 and not big["too_small"]
    assert small["n_forget"] == 20 and small["too_small"]
    width = lambda r: r["ci95"][1] - r["ci95"][0]  # noqa: E731
    assert width(small) > width(big) > 0
    assert big["ci95"][0] <= big["score"] <= big["ci95"][1]


def test_mia_interval_stays_wide_at_extreme_rates_on_few_samples():
    rng = np.random.default_rng(1)
    member, nonmember = rng.normal(0, 1, (200, 3)), rng.normal(8, 1, (200, 3))
    # Every forget sample looks like a member, every held-out one like a non-member.
    r = mia_result(member, nonmember, rng.normal(0, 1, (10, 3)), rng.normal(8, 1, (10, 3)))
    assert r["score"] == 100.0 and r["too_small"]
    assert r["ci95"][0] < 90.0 and r["ci95"][1] == 100.0
