"""examples/flower-quickstart-unlearning: Flower's quickstart-pytorch as published, with
the lines fedunlearn adds (``# fedunlearn``), on flwr-datasets partitions with dict
samples (the local stand-in: an ``Image`` column and a ``ClassLabel``, nothing
downloads). The same code in process (fast) and under ``flwr run`` (slow)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower-quickstart-unlearning"
METHODS = ("not", "ft", "puf")


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """The stand-in data set written where the example reads it (QUICKSTART_DATASET),
    with the Hugging Face cache in the test's folder and the hub off."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from pytorchexample.standin import write_standin

    data = write_standin(str(tmp_path / "data"))
    env = {"QUICKSTART_DATASET": str(data), "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_OFFLINE": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield env
    for name in [m for m in sys.modules if m.startswith("pytorchexample")]:
        del sys.modules[name]


def _file_request(tmp_path, node: int, **fields) -> tuple[Path, str]:
    from fedunlearn.inbox import Inbox

    inboxes = tmp_path / "inboxes"
    return inboxes, Inbox(str(inboxes / f"node-{node}")).file(**fields).id


def _check_outputs(out: Path, inboxes: Path, node: int, request_id: str) -> dict:
    """Every method's results.json, its model file's sha256sum equal to the hash it
    names, and the data owner's receipt: honoured."""
    from fedunlearn.inbox import Inbox

    results = {}
    for method in METHODS:
        res = json.loads((out / method / "results.json").read_text())
        digest = hashlib.sha256((out / method / "model.pt").read_bytes()).hexdigest()
        assert res["model_sha256"] == digest
        results[method] = res
    assert results["ft"]["status"] == "honoured"
    entry = Inbox(str(inboxes / f"node-{node}")).entry(request_id)
    assert entry.status == "honoured"
    return results


def test_the_added_lines_are_few_and_only_calls():
    """The README's count: at most 25 lines added to Flower's files, all marked."""
    added = [line for f in ("pytorchexample/client_app.py", "pytorchexample/server_app.py",
                            "pyproject.toml")
             for line in (EXAMPLE / f).read_text().splitlines() if line.endswith("# fedunlearn")]
    assert len(added) == 17
    assert not any(line.lstrip().startswith(("class ", "def ")) for line in added)
    assert "**22** (17 of code)" in (EXAMPLE / "README.md").read_text()


def test_the_quickstart_serves_a_class_wise_request_in_process(standin, tmp_path):
    import torch

    from fedunlearn.engine import run_app

    inboxes, request_id = _file_request(tmp_path, 1, scope="class", classes=[3])
    out = tmp_path / "out"
    torch.set_num_threads(1)
    run_app({"num-server-rounds": 3, "learning-rate": 0.02, "recovery-rounds": 3,
             "rounds-after": 1, "inbox-root": str(inboxes), "output-dir": str(out)}, 3,
            app=EXAMPLE, run_id=17)
    results = _check_outputs(out, inboxes, 1, request_id)
    for res in results.values():  # the app's own global_evaluate gives the test column
        assert 0.0 <= res["metrics"]["test"] <= 100.0
        assert res["request"][0]["scope"] == "class"
    assert (out / "audit.jsonl").exists()


@pytest.mark.slow
def test_the_quickstart_under_flwr_run(standin, tmp_path):
    """The example's own commands: a data owner files, ``flwr run`` on 3 simulated
    nodes serves it with NoT, FT and PUF."""
    from fedunlearn.launch import flwr_run

    inboxes, request_id = _file_request(tmp_path, 2, scope="instance",
                                        sample_ids=[0, 5, 9, 11])
    out, log = tmp_path / "out", tmp_path / "run.log"
    rc = flwr_run({"num-server-rounds": 3, "learning-rate": 0.02, "recovery-rounds": 3,
                   "rounds-after": 1, "inbox-root": str(inboxes), "output-dir": str(out)},
                  num_supernodes=3, app=EXAMPLE,
                  env={**standin, "FLWR_HOME": str(tmp_path / "home")}, log_file=log,
                  echo=False)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    results = _check_outputs(out, inboxes, 2, request_id)
    assert results["ft"]["request"][0]["num_samples"] == 4
    assert "ft         honoured" in text and "ExcludeForgotten" in text
