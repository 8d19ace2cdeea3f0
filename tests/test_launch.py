"""The `fedunlearn-run` launcher: presets, overrides, validation before Flower starts."""

from __future__ import annotations

import pytest

from fedunlearn.launch import (check_run_config, load_preset, main, parse_overrides,
                               run_config_arg, superlink_pids)


def test_presets_load_and_validate():
    for name in ("backdoor", "class-forgetting"):
        merged = check_run_config(load_preset(name))
        assert merged["method"] == "retrain,ft,not"
    bd = load_preset("backdoor")
    assert bd["backdoor.clients"] == bd["forget.clients"] == "0"
    assert load_preset("class-forgetting")["forget.clients"] == "0,1,2,3,4,5,6,7,8,9"


def test_unknown_preset_lists_available():
    with pytest.raises(ValueError, match="'nope' not found.*backdoor"):
        load_preset("nope")


def test_overrides_are_typed_and_quoted_for_flwr():
    ov = parse_overrides(["method=not", "pretrain.rounds=3", "unlearn.lr=0.05",
                          "dataset.download=true", 'forget.classes="3,5"'])
    assert ov == {"method": "not", "pretrain.rounds": 3, "unlearn.lr": 0.05,
                  "dataset.download": True, "forget.classes": "3,5"}
    assert run_config_arg(ov) == ('method="not" pretrain.rounds=3 unlearn.lr=0.05 '
                                  'dataset.download=true forget.classes="3,5"')


def test_bad_input_exits_before_starting_flower(capsys):
    with pytest.raises(SystemExit) as err:
        main(["method=bogus"])
    assert err.value.code == 2
    assert "method='bogus' is unknown" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--preset", "nope"])
    assert "available presets" in capsys.readouterr().err


def test_no_superlink_on_an_unused_port():
    assert superlink_pids(1) == []


class _FakeFlwr:
    """``flwr run --stream`` that prints ``lines`` and exits 0 (as it does even when the
    ServerApp was killed)."""

    def __init__(self, lines):
        self.stdout = iter(lines)

    def wait(self):
        return 0


def test_a_serverapp_that_never_finished_fails_the_launcher(monkeypatch, capsys):
    import fedunlearn.launch as launch

    for lines, expected in ((["[not] unlearning starts\n"], 1),
                            (["Results written to /tmp/x\n"], 0),
                            (["An unhandled exception occurred\n"], 1)):
        monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, _l=lines, **k: _FakeFlwr(_l))
        rc = launch.flwr_run({}, num_supernodes=2, ports=(1, 2), echo=False,
                             finished_marker=launch.HARNESS_FINISHED)
        assert rc == expected, lines
    # Without a marker (another app), flwr run's own verdict stands.
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: _FakeFlwr(["x\n"]))
    assert launch.flwr_run({}, num_supernodes=2, ports=(1, 2), echo=False) == 0
    assert "the ServerApp did not finish" in capsys.readouterr().err


def test_the_next_run_records_an_interrupted_one(tmp_path):
    from fedunlearn.audit import AuditLog, read_audit

    log = AuditLog(tmp_path / "audit.jsonl", run_id=1)
    assert log.note_interrupted() is None  # an empty log: nothing to say
    log.record("job.started", methods=["not"])
    log.record("unlearning.started", method="not")  # then the ServerApp was killed
    nxt = AuditLog(tmp_path / "audit.jsonl", run_id=2)
    record = nxt.note_interrupted()
    assert record["interrupted_run"] == 1 and record["last_event"] == "unlearning.started"
    assert nxt.note_interrupted() is None  # said once
    nxt.record("job.finished", methods=["not"])
    assert AuditLog(tmp_path / "audit.jsonl", run_id=3).note_interrupted() is None
    reading = read_audit(tmp_path / "audit.jsonl")
    assert reading.intact and [r["event"] for r in reading.records][2] == "job.interrupted"


def test_fedunlearn_run_fails_where_flwr_run_exits_0_after_a_failure(monkeypatch, tmp_path,
                                                                    capsys):
    """The example app's run whose dependencies could not be installed: `flwr run` exits
    0, `fedunlearn-run --app DIR` exits 1 (and shows Flower's error)."""
    from pathlib import Path

    import fedunlearn.launch as launch

    example = Path(__file__).resolve().parents[1] / "examples" / "quickstart-pytorch-unlearning"
    failed = ["Successfully started run 7632652077284403983\n",
              "\x1b[91mERROR \x1b[0m:     Simulation raised an exception\n",
              "\x1b[91mERROR \x1b[0m:     Exit Code: 608\n",
              "Runtime installation of app dependencies failed. Check the logs for details.\n"]
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: _FakeFlwr(failed))
    rc = main(["--app", str(example), "--log-file", str(tmp_path / "job.log")])
    assert rc == 1
    assert "Exit Code: 608" in capsys.readouterr().out
    assert "Exit Code: 608" in (tmp_path / "job.log").read_text()
    # the same app's run that finished: 0
    monkeypatch.setattr(launch.subprocess, "Popen",
                        lambda *a, **k: _FakeFlwr(["Successfully started run 1\n", "done\n"]))
    assert main(["--app", str(example), "--log-file", str(tmp_path / "job.log")]) == 0
