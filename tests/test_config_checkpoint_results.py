"""Run-config parsing, checkpoint keys and reuse, results tables."""

from __future__ import annotations

import dataclasses
import json
import os
import stat

import pytest
import torch
from flwr.app import ArrayRecord

from fedunlearn.harness.pretrain_cache import checkpoint_path, load_checkpoint, save_checkpoint
from fedunlearn.harness.config import ExperimentConfig
from fedunlearn.launch import check_run_config, default_run_config
from fedunlearn.harness.results import comparison_markdown, comparison_rows, results_path

from .helpers import run_config


def test_defaults_match_pyproject():
    cfg = ExperimentConfig.from_run_config(default_run_config())
    assert cfg == ExperimentConfig()  # dataclass defaults == pyproject defaults
    assert cfg.methods == ("retrain", "ft", "not")
    assert cfg.forget.clients == (0,) and cfg.num_clients == 10 and cfg.dataset == "digits"


@pytest.mark.parametrize("key, value, expected", [
    ("method", "not,magic", "'magic'"),
    ("dataset.name", "mnist", "'mnist'"),
    ("model.name", "vgg", "'vgg'"),
    ("federation.partitioning", "random", "'random'"),
    ("unlearn.lr", 0.0, "unlearn.lr=0.0"),
    ("forget.classes", "3,x", "'x' is not an integer"),
    ("federation.num-clients", 0, "federation.num-clients=0"),
])
def test_bad_config_values_are_named(key, value, expected):
    with pytest.raises(ValueError) as err:
        check_run_config({key: value})
    assert expected in str(err.value)


def test_unknown_key_rejected_before_starting_flower():
    with pytest.raises(ValueError, match="'pretrain.epochs'"):
        check_run_config({"pretrain.epochs": 3})


@pytest.mark.parametrize("key,suggested", [
    ("federation.num_clients", "'federation.num-clients'"),  # Hydra's spelling
    ("unlearn.rouns", "'unlearn.rounds'"),
    ("federation.local_epoch", "'federation.local-epochs'"),
])
def test_unknown_key_error_says_did_you_mean_and_not_every_key(key, suggested):
    with pytest.raises(ValueError) as err:
        check_run_config({key: 1})
    message = str(err.value)
    assert f"unknown run-config key {key!r}: did you mean {suggested}?" in message
    assert "docs/running.md" in message and "pretrain.rounds" not in message


def test_unknown_key_without_a_close_one_lists_its_section():
    with pytest.raises(ValueError) as err:
        check_run_config({"pretrain.epochs": 3})
    assert "the 'pretrain' keys: ['pretrain.lr', 'pretrain.rounds']" in str(err.value)
    assert "federation." not in str(err.value)


def test_pretrain_key_tracks_everything_that_determines_the_model():
    base = ExperimentConfig.from_run_config(run_config())
    same = dataclasses.replace(base, methods=("not",), unlearn_rounds=3, output_dir="/x")
    assert base.pretrain_key() == same.pretrain_key()
    for change in ({"seed": 1}, {"pretrain_rounds": 31}, {"model": "resnet18"},
                   {"num_clients": 5}, {"partitioning": "dirichlet"}, {"dataset": "synthetic"},
                   {"pretrain_lr": 0.02}, {"local_epochs": 2}, {"batch_size": 16}):
        assert dataclasses.replace(base, **change).pretrain_key() != base.pretrain_key(), change


def test_checkpoint_roundtrip_is_atomic(tmp_path):
    arrays = ArrayRecord({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)})
    path = checkpoint_path(tmp_path / "ck", "abc")
    assert load_checkpoint(path) is None
    save_checkpoint(path, arrays, {"key": "abc"})
    loaded, meta = load_checkpoint(path)
    assert meta["key"] == "abc"
    assert torch.equal(loaded.to_torch_state_dict()["w"], arrays.to_torch_state_dict()["w"])
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.with_suffix(".json").name])
    assert json.loads(path.with_suffix(".json").read_text())["key"] == "abc"


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_saved_models_and_results_get_the_umask_s_permissions(tmp_path, umask, mode):
    """A saved model (serve()'s ``model.pt``, the pretraining cache) and a results file
    are readable as any file the user creates is: 0666 less the umask, not 0600."""
    from fedunlearn.files import save_state_dict, write_json

    old = os.umask(umask)
    try:
        model = save_state_dict(tmp_path / "model.pt", {"w": torch.zeros(2)})
        results = write_json(tmp_path / "results.json", {"ok": True})
    finally:
        os.umask(old)
    assert stat.S_IMODE(model.stat().st_mode) == mode
    assert stat.S_IMODE(results.stat().st_mode) == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "results.json"]


def result(method, retain, forget, test, mia, comm=100, asr=None):
    unlearned = {"retain": retain, "forget": forget, "test": test, "mia": mia}
    if asr is not None:
        unlearned["asr"] = asr
    return {"method": method, "original": {"retain": 99.0, "forget": 99.0, "test": 95.0, "mia": 60.0},
            "unlearned": unlearned,
            "cost": {"rounds": 3, "comm_bytes": comm, "flops": 10, "wall_s": 1.0, "storage_bytes": 0}}


def test_comparison_table_deltas_and_average_gap():
    rows = [result("retrain", 91.66, 83.05, 82.32, 50.23),
            result("ft", 92.48, 85.56, 82.36, 50.90)]
    header, table = comparison_rows(rows)
    assert header[:6] == ["Method", "Retain", "Forget", "Test", "MIA", "Avg. Gap"]
    ft = table[2]
    assert ft[1] == "92.48 (0.82)" and ft[2] == "85.56 (2.51)" and ft[5] == "1.01"
    md = comparison_markdown(rows)
    assert "| ft | 92.48 (0.82)" in md and "Avg. Gap" in md


def test_comparison_without_retrain_has_no_deltas():
    md = comparison_markdown([result("ft", 92.0, 85.0, 82.0, 50.0)])
    assert "Avg. Gap |" not in md and "(" not in md.split("\n")[3]
    assert "Add `retrain`" in md


def test_results_path_layout(tmp_path):
    """One folder per method, for one method as for a list."""
    assert results_path(tmp_path, "not") == tmp_path / "not" / "results.json"


def test_the_closing_table_fits_100_columns_with_the_same_numbers():
    """The console's closing table (every method's metrics, ASR, costs, storage, a
    centralized title and a refusal) fits a 100-column terminal and shows every number
    of comparison.md's table."""
    from fedunlearn.harness.results import comparison_markdown, comparison_text

    results = []
    for i, name in enumerate(["retrain", "federaser", "l1_sparse", "not"]):
        r = result(name, 97.0 + i / 7, 96.5 - i / 3, 95.0 + i / 9, 50.0 + i, comm=1.29e8 + i,
                   asr=0.31 * i)
        r["cost"].update(storage_bytes=7.92e7 * i, flops=6.34e10 - i, wall_s=123.4 + i)
        r["original"]["asr"] = 64.2
        r["config"] = {"num_clients": 1}
        results.append(r)
    skipped = {"fcu": "cannot serve client-wise requests: " + "a long reason " * 10}
    text = comparison_text(results, skipped=skipped)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100, text
    assert lines[0] == "fedunlearn results (centralized: one client holds all training data)"
    md_cells = [c.strip() for line in comparison_markdown(results).splitlines()[2:]
                if line.startswith("| ") for c in line.strip("|").split("|")[1:] if c.strip()]
    for cell in md_cells:  # every number, with its |Δ|, as in the markdown table
        assert cell in text, cell
    assert "fcu: refused (cannot serve client-wise requests" in text
    assert "Gap: Avg. Gap" in text
