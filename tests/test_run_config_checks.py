"""Every run-config value is checked before Flower starts: its type, its range, finite
numbers, no more clients than training samples, a device this machine has, folders this
user can write, layer names the model has. A bad value stops ``fedunlearn-run`` with
exit code 2 and a message naming the key, the value and what is allowed; nothing starts.

The property-based tests feed every key hostile values (Hypothesis): each one is
rejected naming its key, or accepted inside the key's documented range; values at the
edges of the ranges run a whole job (in-process, the real ClientApp) to its end.
"""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedunlearn.launch as launch
from fedunlearn.harness.config import ExperimentConfig
from fedunlearn.launch import check_run_config, default_run_config

HOSTILE = [
    ("federation.num-clients", 100000,
     "federation.num-clients=100000: digits has 1437 training samples"),
    ("output-dir", "/proc/x", "output-dir='/proc/x' is not a folder this user can write"),
    ("checkpoint-dir", "/proc/x",
     "checkpoint-dir='/proc/x' is not a folder this user can write"),
    ("seed", -1, "seed=-1 must be in [0, 4294967295]"),
    ("unlearn.lr", math.inf, "unlearn.lr=inf: expected a finite number"),
    ("unlearn.clip-norm", math.nan, "unlearn.clip-norm=nan: expected a finite number"),
    ("forget.fraction", 5, "forget.fraction=5.0 must be in (0, 1]"),
    ("forget.fraction", math.nan, "forget.fraction=nan: expected a finite number"),
    ("forget.scope", "bogus", "forget.scope='bogus'; choose from ('client', 'class', "
     "'instance')"),
    ("device", "cuda:99", "device='cuda:99': this machine has"),
    ("device", "tpu", "device='tpu'; use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("pretrain.rounds", 1e9, "pretrain.rounds=1000000000.0: expected an integer"),
    ("pretrain.rounds", 10**9, "pretrain.rounds=1000000000 must be in [0, 100000]"),
    ("federation.alpha", math.inf, "federation.alpha=inf: expected a finite number"),
    ("negation.layers", "doesnotexist",
     "negation.layers='doesnotexist': unknown layer 'doesnotexist' for negation; layers "
     "in execution order: 'conv1'"),
    ("federation.reply-timeout", 0, "federation.reply-timeout=0.0 must be in (0, 86400]"),
    ("forget.clients", "0,10", "forget.clients: [10] outside the partitions 0..9"),
    ("forget.ratio", 1.5, "forget.ratio=1.5 must be in [0, 1] (0: forget.clients names the "
     "targets)"),
    ("forget.data-of", 10, "forget.data-of=10 must be in [-1, 9] (-1: the client's own)"),
    ("federation.batch-size", True, "federation.batch-size=True: expected an integer"),
    ("negation.bias", "maybe", "negation.bias='maybe': expected true or false"),
]


@pytest.mark.parametrize("key, value, message", HOSTILE)
def test_a_bad_value_stops_fedunlearn_run_before_flower_starts(key, value, message,
                                                               monkeypatch, capsys):
    def flower(*args, **kwargs):
        raise AssertionError("Flower was started with a bad run-config")

    monkeypatch.setattr(launch, "flwr_run", flower)
    with pytest.raises(SystemExit) as stop:
        launch.main([f"{key}={launch.toml_value(value)}"])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_check_only_says_ok_for_a_good_run_config(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(launch, "flwr_run", lambda *a, **k: pytest.fail("started Flower"))
    assert launch.main(["--check", "method=not", f"output-dir={tmp_path / 'out'}",
                        "negation.layers=conv1", "federation.reply-timeout=30"]) == 0
    assert capsys.readouterr().out.strip() == "run-config OK"
    assert (tmp_path / "out").is_dir()  # the writability probe leaves the folder, no file
    assert not list((tmp_path / "out").iterdir())


# -- property-based: every key, hostile values -------------------------------------------
KEYS = sorted(default_run_config())
_SPECIAL = ["", " ", "nan", "inf", "-inf", "-1", "0", "1e9", "1e400", "0x10", "1,2", "3;4",
            "true", "cuda:99", "/proc/x", "a" * 300, "\x00", "☃", "-0", "1_000"]
HOSTILE_VALUES = st.one_of(
    st.integers(min_value=-2**70, max_value=2**70),
    st.integers(min_value=-3, max_value=20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(_SPECIAL),
    st.text(max_size=12),
)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A working directory for values that are relative folder names."""
    folder = tmp_path_factory.mktemp("cwd")
    before = os.getcwd()
    os.chdir(folder)
    yield folder
    os.chdir(before)


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(key=st.sampled_from(KEYS), value=HOSTILE_VALUES)
def test_every_key_rejects_a_hostile_value_by_name_or_keeps_it_in_range(sandbox, key, value):
    try:
        merged = check_run_config({key: value})
    except ValueError as err:
        assert key in str(err), f"{key}={value!r}: the error does not name the key: {err}"
        assert len(str(err)) < 2000, "an error message of unbounded size"
        return
    # Accepted: the job's config holds it inside the documented ranges.
    cfg = ExperimentConfig.from_run_config(merged)
    for name, (number, allowed) in cfg.ranges().items():
        assert math.isfinite(number), (name, number)
        allowed.check(name, number)
    assert cfg.num_clients <= 1437
    cfg.pretrain_key()  # hashable into the pretraining cache key


# -- values at the edges of the ranges run a whole job ---------------------------------------
def test_recovery_by_validation_needs_validation_data():
    with pytest.raises(ValueError, match="unlearn.stop='validation' needs validation data"):
        check_run_config({"federation.val-fraction": 0.0, "unlearn.stop": "validation"})


EDGES = [
    {"federation.val-fraction": 0.0, "unlearn.stop": "fixed"},
    {"federation.val-fraction": 0.9, "unlearn.stop": "validation"},
    {"forget.scope": "instance", "forget.fraction": 1.0, "method": "not"},
    {"server-data.fraction": 0.5, "method": "fukd"},
    {"unlearn.lr": 100.0, "unlearn.clip-norm": 0.0, "method": "not"},
    {"federation.momentum": 0.999, "unlearn.server-momentum": 0.999, "seed": 2**32 - 1},
]


@pytest.mark.parametrize("overrides", EDGES, ids=lambda o: ",".join(o))
def test_values_at_the_edges_of_their_ranges_run_a_job_to_its_end(overrides, tmp_path,
                                                                  server_identity,
                                                                  single_thread):
    """A job on a value at the edge of its range either writes its results or fails the
    method that could not finish, saying why (``failed.json``): never a traceback."""
    import json

    from fedunlearn.harness.run import run_experiment
    from fedunlearn.strategies.base import UnlearningFailed

    from .test_federation_view import LiveGrid, job_config, nodes_config
    from flower_apps.client_app import app

    rc = job_config(tmp_path, **overrides)
    check_run_config({k: v for k, v in rc.items() if k in overrides})
    out = tmp_path / "out"
    try:
        results = run_experiment(LiveGrid(app, rc, nodes_config()), rc)
    except UnlearningFailed as err:
        failed = [json.loads(p.read_text()) for p in out.rglob("failed.json")]
        assert failed and all(f["failed"] for f in failed), err
        return
    assert len(list(out.rglob("results.json"))) == len(results)
    for result in results.values():
        assert all(math.isfinite(v) for v in result["unlearned"].values()
                   if isinstance(v, float)), result["unlearned"]
