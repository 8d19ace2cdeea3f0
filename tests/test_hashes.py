"""Hashes a person can check (issue 29): for every saved model, the SHA-256 that serve()'s
table, ``results.json``, the inbox receipt, ``fedunlearn versions`` / ``versions.json``
and the audit log name is ``sha256sum`` of the file; ``fedunlearn verify`` recomputes it
and names the records. Also: ``results.json`` is strict JSON, partial FLOPs say so, and
``fedunlearn request list`` names every method that served a request.

The user's own app (tests/test_plugin.py) runs on the in-process grid; no ``flwr run``."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.test_plugin import USER_NODE, fedavg, user_grid, userapp  # noqa: F401  (fixtures)
from tests.test_service_mode import _service


def sha256sum(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def strict_json(path: Path):
    """``path`` parsed as strict JSON: a bare NaN or Infinity fails, as in JSON.parse."""
    def refuse(token):
        raise ValueError(f"{path}: {token} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def audit_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_serve_names_every_saved_model_by_its_file_sha256(userapp, tmp_path, user_grid,
                                                          capsys):
    """Table, results.json, the receipts and the audit log all name the file's SHA-256;
    verify finds them; results.json is strict JSON (the client-wise target retains
    nothing: retain is null); FLOPs without a model are marked partial; request list
    names both methods."""
    from fedunlearn import PUF, FineTune, Recovery, serve
    from fedunlearn.audit import model_digest
    from fedunlearn.cli import main as cli
    from fedunlearn.inbox import Inbox
    from fedunlearn.serving import load_model

    client_app, task = userapp
    inbox = tmp_path / "inbox-0"
    request_id = Inbox(str(inbox)).file(scope="client").id
    grid = user_grid(client_app.app, inboxes={0: inbox})
    arrays = fedavg(grid, task, rounds=2)
    out = tmp_path / "out"
    recovery = Recovery(rounds=1, lr=0.05, server_momentum=0.0)
    outcome = serve(grid, arrays, [FineTune(recovery), PUF(recovery)], output_dir=out)
    table = outcome.table()
    receipts = [e for e in Inbox(str(inbox)).events(request_id) if e["status"] == "honoured"]
    log = audit_records(out / "audit.jsonl")
    for name in ("ft", "puf"):
        path = out / name / "model.pt"
        sha = sha256sum(path)
        m = outcome.methods[name]
        # 1. the table (and the outcome it prints)
        assert m.model_sha256 == sha and f"{path} ({sha[:12]})" in table
        # 2. results.json, strict JSON
        result = strict_json(out / name / "results.json")
        assert result["model_sha256"] == sha and result["model_path"] == str(path)
        assert result["model_arrays_sha256"] == model_digest(load_model(path)) != sha
        assert result["metrics"]["retain"] is None  # nothing retained: not measured
        # 3. the inbox receipt
        (receipt,) = [e for e in receipts if e["method"] == name]
        assert receipt["model_sha256"] == sha
        assert receipt["model_arrays_sha256"] == result["model_arrays_sha256"]
        # 4. the audit log
        finished = [e for e in log if e["event"] == "unlearning.finished" and e["method"] == name]
        honoured = [e for e in log if e["event"] == "request.honoured" and e["method"] == name]
        assert [e["model_sha256"] for e in finished + honoured] == [sha, sha]
        # partial FLOPs: no model_fn / example_input, yet the nodes trained
        assert result["flops_partial"] is True and "server-side" in result["flops_partial_reason"]
        # verify: the file's records, found from the model's own folders
        capsys.readouterr()
        assert cli(["verify", str(path)]) == 0
        said = capsys.readouterr().out
        assert sha in said and f"{out / name / 'results.json'}: model_sha256 (file sha256)" in said
        assert "unlearning.finished" in said and "request.honoured" in said
        assert cli(["verify", str(path), "--audit", str(inbox), "--json"]) == 0
        found = json.loads(capsys.readouterr().out)
        assert any("receipts" in m["source"] and m["field"] == "model_sha256"
                   for m in found["matches"])
    assert "* partial FLOPs (ft, puf): only server-side arithmetic" in table
    assert table.splitlines()[1].split()[7].endswith("*")  # the FLOPs column of ft
    # request list names both methods that served the request
    capsys.readouterr()
    assert cli(["request", "list", "--inbox", str(inbox), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["requests"]
    assert row["status"] == "honoured" and row["methods"] == ["ft", "puf"]
    assert cli(["request", "list", "--inbox", str(inbox)]) == 0
    assert "ft, puf" in capsys.readouterr().out


def test_service_versions_receipts_and_log_name_the_file_sha256(userapp, tmp_path, user_grid,
                                                                capsys):
    """Service mode: versions.json, ``fedunlearn versions``, the honoured receipt and the
    audit log name each version file's SHA-256; verify finds the version."""
    from fedunlearn import read_versions
    from fedunlearn.cli import main as cli
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    inbox = tmp_path / "inbox-0"
    grid = user_grid(client_app.app, inboxes={0: inbox})
    arrays = fedavg(grid, task, rounds=1)
    request_id = Inbox(str(inbox)).file(scope="client").id
    _service(task, tmp_path, rounds=2).run(grid, arrays)
    state = tmp_path / "state"
    versions = read_versions(state)
    capsys.readouterr()
    assert cli(["versions", str(state), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["versions"]
    assert cli(["versions", str(state)]) == 0
    text = capsys.readouterr().out
    published = {e["published_version"]: e for e in audit_records(state / "audit.jsonl")
                 if e["event"] == "version.published"}
    for v, shown in zip(versions, listed):
        sha = sha256sum(v["path"])
        assert v["sha256"] == shown["sha256"] == sha and sha[:12] in text
        assert published[v["version"]]["model_sha256"] == sha
        assert published[v["version"]]["model_arrays_sha256"] == v["arrays_sha256"] != sha
    (unlearned,) = [v for v in versions if v["kind"] == "unlearned"]
    receipt = Inbox(str(inbox)).events(request_id)[-1]
    assert receipt["status"] == "honoured" and receipt["model_sha256"] == sha256sum(
        unlearned["path"])
    assert receipt["check"]["model-arrays-sha256-ok"] is True  # the node's own check
    honoured = [e for e in audit_records(state / "audit.jsonl")
                if e["event"] == "request.honoured"]
    assert [e["model_sha256"] for e in honoured] == [unlearned["sha256"]]
    assert cli(["verify", unlearned["path"], "--audit", str(inbox)]) == 0
    said = capsys.readouterr().out
    assert "versions.json: versions[1].sha256 (file sha256)" in said
    assert "version.published" in said and "receipts" in said


def test_verify_fails_on_a_changed_file_and_an_unknown_model(userapp, tmp_path, user_grid,
                                                             capsys):
    """A file changed after it was recorded is a MISMATCH (exit 1); a model no record
    names is said so (exit 1); a log written before the split (its array digest under
    ``model_after``) still matches, as an array digest."""
    import torch

    from fedunlearn import FineTune, Recovery, serve
    from fedunlearn.audit import AuditLog, model_digest
    from fedunlearn.cli import main as cli
    from fedunlearn.inbox import Inbox
    from fedunlearn.serving import load_model

    client_app, task = userapp
    inbox = tmp_path / "inbox-1"
    Inbox(str(inbox)).file(scope="class", classes=[1])
    grid = user_grid(client_app.app, inboxes={1: inbox})
    arrays = fedavg(grid, task, rounds=1)
    out = tmp_path / "out"
    serve(grid, arrays, FineTune(Recovery(rounds=1, lr=0.05), model_fn=task.Net,
                                 example_input=torch.zeros(1, 1, 8, 8)), output_dir=out)
    path = out / "ft" / "model.pt"
    assert not strict_json(out / "ft" / "results.json")["flops_partial"]
    # A file that changed: results.json names its path with another hash.
    torch.save(task.Net().state_dict(), path)
    capsys.readouterr()
    assert cli(["verify", str(path)]) == 1
    said = capsys.readouterr().out
    assert "MISMATCH" in said and "results.json: model_sha256 names this file" in said
    # A model no record names.
    elsewhere = tmp_path / "elsewhere" / "model.pt"
    elsewhere.parent.mkdir()
    torch.save(task.Net().state_dict(), elsewhere)
    assert cli(["verify", str(elsewhere)]) == 1
    assert "matches no record" in capsys.readouterr().out
    # A log written before the hashes were split: model_after held the array digest.
    old = tmp_path / "old" / "audit.jsonl"
    AuditLog(old).record("unlearning.finished", method="ft",
                         model_after=model_digest(load_model(elsewhere)))
    assert cli(["verify", str(elsewhere), "--audit", str(old)]) == 0
    assert "model_after (array digest)" in capsys.readouterr().out
    assert cli(["verify", str(tmp_path / "none.pt")]) == 2


def test_write_json_is_strict_json():
    """NaN and infinities (Python's and numpy's) are written as null; numpy numbers as
    numbers; nothing a strict parser refuses."""
    from fedunlearn.files import write_json

    payload = {"nan": float("nan"), "inf": float("inf"), "ninf": -math.inf,
               "np": np.float32("nan"), "np64": np.float64(1.5), "arr": np.array([1.0, np.inf]),
               "nested": [{"x": (float("nan"), 2)}], "ok": 97.25, 3: {"a"}}
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = write_json(Path(folder) / "r.json", payload)
        text = path.read_text()
        assert "NaN" not in text and "Infinity" not in text
        assert strict_json(path) == {"nan": None, "inf": None, "ninf": None, "np": None,
                                     "np64": 1.5, "arr": [1.0, None],
                                     "nested": [{"x": [None, 2]}], "ok": 97.25, "3": ["a"]}


@pytest.mark.parametrize("argv", [["request", "file", "--help"]])
def test_cli_help_calls_sample_ids_positions_in_the_node_training_set(argv, capsys):
    from fedunlearn.cli import main as cli

    with pytest.raises(SystemExit):
        cli(argv)
    text = " ".join(capsys.readouterr().out.split())
    assert "global" not in text and "positions in this node's training set" in text
