"""What a user sees in a real terminal: ``fedunlearn-run`` and ``fedunlearn-experiment``
run under a pseudo-terminal, their screen rebuilt from what they wrote to it.

In a terminal rich draws a live progress bar; a display that took over ``sys.stdout``
would print Flower's raw lines and the progress events past the job's filter (and, in a
sweep, outlive the job). Piped output never shows that, so these tests use a pty.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import textwrap
from pathlib import Path

import pytest

_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")
_EVENT = "fedunlearn-progress "
# What `flwr run --stream` prints for a 3-round pretraining (colour codes as Flower's).
FAKE_FLWR_LINES = [
    "Starting local SuperLink on 127.0.0.1:40001...",
    "\x1b[92mINFO \x1b[0m:      Starting logstream for run_id `1`",
    "\x1b[92mINFO \x1b[0m:      fedunlearn: client on digits/cnn, 3 clients (iid), methods: not",
    "\x1b[92mINFO \x1b[0m:      configure_train: Sampled 3 nodes (out of 3)",
    "\x1b[92mINFO \x1b[0m:      aggregate_train: Received 3 results and 0 failures",
] + [line for r in (1, 2, 3) for line in (
    "\x1b[92mINFO \x1b[0m:      aggregate_train: Received 3 results and 0 failures",
    f"\x1b[92mINFO \x1b[0m:      [pretrain] round {r}/3  test accuracy 9{r}.00%",
    "\x1b[92mINFO \x1b[0m:      " + _EVENT + json.dumps(
        {"kind": "round", "phase": "pretrain", "round": r, "rounds": 3,
         **({"test": 93.0} if r == 3 else {})}),
    f"\x1b[92mINFO \x1b[0m:      [pretrain] checkpoint after round {r}",
)] + [
    "\x1b[92mINFO \x1b[0m:      [not] unlearned: retain 97.67, forget 96.52, test 96.67, mia 50.43",
    "\x1b[92mINFO \x1b[0m:      Results written to /tmp/somewhere",
]
RAW = ("aggregate_train", "configure_train", _EVENT.strip(), "Starting logstream",
       "SuperLink", "round 2/3  test accuracy")


def run_in_pty(args: list[str], *, cwd: Path, columns: int = 100, rows: int = 40,
               timeout: float = 600) -> tuple[int, str]:
    """``(exit code, everything written to the terminal)`` of ``args`` run with a
    pseudo-terminal of ``columns`` x ``rows`` as stdin, stdout and stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {k: v for k, v in os.environ.items()
           if k not in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE",
                        "TTY_INTERACTIVE", "CI", "GITHUB_ACTIONS")}
    env.update(TERM="xterm-256color", PYTHONPATH=os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[1] / "src"),
                    env.get("PYTHONPATH", "")) if p))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                            close_fds=True)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        rc = proc.wait(timeout=timeout)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return rc, b"".join(chunks).decode(errors="replace")


def screen(raw: str) -> list[str]:
    """The terminal's lines once ``raw`` was written to it (carriage returns, cursor up,
    erase line; colours dropped), trailing blank lines removed."""
    lines, row, col, i = [[]], 0, 0, 0
    while i < len(raw):
        match = _CSI.match(raw, i)
        if match:
            arg, op = match.groups()
            n = int(arg) if arg.isdigit() else 1
            if op == "A":
                row = max(0, row - n)
            elif op == "K":
                lines[row] = lines[row][:col] if arg in ("", "0") else []
                col = col if arg in ("", "0") else col
            elif op == "G":
                col = n - 1
            i = match.end()
            continue
        char = raw[i]
        i += 1
        if char == "\r":
            col = 0
        elif char == "\n":
            row += 1
            lines.extend([] for _ in range(row + 1 - len(lines)))
        elif char >= " ":
            line = lines[row]
            line.extend(" " for _ in range(col + 1 - len(line)))
            line[col] = char
            col += 1
    text = ["".join(line).rstrip() for line in lines]
    while text and not text[-1]:
        text.pop()
    return text


def plain(raw: str) -> str:
    """Everything ever drawn, without escape codes (also what was drawn over)."""
    return _CSI.sub("", raw)


def _assert_no_raw_line(raw: str) -> None:
    drawn = plain(raw)
    for text in RAW:
        assert text not in drawn, f"{text!r} reached the terminal"


def test_screen_replays_cursor_moves():
    assert screen("a\r\nbar 1\r\x1b[2Kline\r\nbar 2\x1b[?25h\r\x1b[2K") == ["a", "line"]
    assert screen("x\r\n\x1b[1A\x1b[2Ky\r\n") == ["y"]


# ---------------------------------------------------------------------------------------
# fedunlearn-run: its real launcher, `flwr run` replaced by a process printing its output
# ---------------------------------------------------------------------------------------
FAKE_RUN = textwrap.dedent("""
    import json, sys
    import fedunlearn.launch as launch

    lines = json.loads(sys.argv[1])
    code = ("import sys, time\\nfor line in %r:\\n    print(line, flush=True)\\n"
            "    time.sleep(0.02)\\n" % (lines,))
    launch._flwr_command = lambda *a, **k: [sys.executable, "-c", code]
    sys.exit(launch.main(sys.argv[2:]))
""")


def test_fedunlearn_run_in_a_terminal_shows_a_bar_and_no_raw_line(tmp_path):
    rc, raw = run_in_pty([sys.executable, "-c", FAKE_RUN, json.dumps(FAKE_FLWR_LINES),
                          "method=not", f"output-dir={tmp_path / 'out'}",
                          f"checkpoint-dir={tmp_path / 'ckpt'}"], cwd=tmp_path)
    assert rc == 0, raw
    _assert_no_raw_line(raw)
    drawn = plain(raw)
    # the bar was drawn and advanced with the progress events, round by round
    for counted in ("1/3 rounds", "2/3 rounds", "3/3 rounds  test 93.00%"):
        assert counted in drawn, counted
    assert screen(raw) == [
        # during Flower's start-up (20-80 s of nothing else), one line says what is going on
        "starting Flower: a simulation of 10 SuperNodes (the first round follows in 20-80 s) "
        "...",
        "fedunlearn: client on digits/cnn, 3 clients (iid), methods: not",
        "[pretrain] checkpoint after round 1",
        "[pretrain] checkpoint after round 2",
        "[pretrain] checkpoint after round 3",
        "[not] unlearned: retain 97.67, forget 96.52, test 96.67, mia 50.43",
        "Results written to /tmp/somewhere",
    ]
    # the log file has every line, without colour codes
    log = (tmp_path / "out" / "job.log").read_text()
    assert "aggregate_train: Received 3 results" in log and "\x1b[" not in log


# ---------------------------------------------------------------------------------------
# fedunlearn-experiment: a 2-job sweep, each job's launcher printing Flower's output
# ---------------------------------------------------------------------------------------
FAKE_SWEEP = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from fedunlearn.experiment import runner

    lines = json.loads(sys.argv[1])

    def launcher(run_config, *, log_file, echo, **_):
        with open(log_file, "a") as log:
            for line in lines:
                log.write(line + "\\n")
                sys.stdout.write(line + "\\n")
        method = run_config["method"]
        metrics = {"retrain": [98.0, 96.5, 95.3, 52.6], "not": [97.7, 96.5, 96.7, 50.4]}
        unlearned = dict(zip(("retain", "forget", "test", "mia"), metrics[method]))
        result = {
            "method": method, "request": [{"scope": "client", "partition_id": 0}],
            "original": {"retain": 97.8, "forget": 96.5, "test": 95.8, "mia": 50.9},
            "unlearned": unlearned,
            "cost": {"rounds": 3, "comm_bytes": 1e6, "bytes_down": 5e5, "bytes_up": 5e5,
                     "flops": 1e9, "wall_s": 1.0, "storage_bytes": 0},
            "config": {"methods": [method], "seed": run_config["seed"], "dataset": "digits",
                       "model": "cnn", "num_clients": 3, "partitioning": "iid",
                       "pretrain_rounds": 2, "unlearn_rounds": 1, "unlearn_lr": 0.01,
                       "forget": {"scope": "client", "clients": [0], "classes": [],
                                  "fraction": 0.1, "sample_ids": [], "data_of": -1}}}
        Path(run_config["output-dir"], "results.json").write_text(json.dumps(result))
        return 0

    runner.flwr_run = launcher
    sys.argv = ["fedunlearn-experiment", *sys.argv[2:]]
    runner.main()
""")


def test_a_sweep_in_a_terminal_shows_every_job_and_the_report(tmp_path):
    sweep = tmp_path / "sweep"
    rc, raw = run_in_pty([sys.executable, "-c", FAKE_SWEEP, json.dumps(FAKE_FLWR_LINES),
                          "-m", "method=retrain,not", "federation=tiny",
                          f"checkpoint_dir={tmp_path / 'ckpt'}", f"hydra.sweep.dir={sweep}"],
                         cwd=Path(__file__).resolve().parents[1])
    assert rc == 0, raw
    _assert_no_raw_line(raw)
    shown = screen(raw)
    text = "\n".join(shown)
    for k in (1, 2):
        assert any(line.startswith(f"=== job {k}/2") for line in shown), text
        assert any(line.startswith(f"[job {k}/2] done in ") for line in shown), text
        assert any(line.endswith(f"[job {k}/2] Results written to /tmp/somewhere")
                   for line in shown), text
    # each line carries one job's tag and one time of day
    assert not any("[job 1/2]" in line and "[job 2/2]" in line for line in shown), text
    assert not any(len(re.findall(r"\d\d:\d\d:\d\d", line)) > 1 for line in shown), text
    # the report's table closes the sweep
    assert any(line.startswith("| Retrain |") for line in shown), text
    assert any(line.startswith("| **NoT** ★ |") for line in shown), text
    assert shown[-1] == f"Report: {sweep / 'report'}"
    assert "3/3 rounds  test 93.00%" in plain(raw)  # each job's bar advanced
    # Hydra's runner.log would stay empty: it is not written (flwr.log has the job's log)
    assert not list(sweep.rglob("runner.log"))
    assert "aggregate_train" in (sweep / "1_federation=tiny,method=not" / "flwr.log").read_text()


# ---------------------------------------------------------------------------------------
# the real job, both engines (slow: the flower engine starts a SuperLink and Ray)
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["flower", "local"])
def test_a_real_job_in_a_terminal(tmp_path, engine, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    # the closing tables fit a terminal of 100 columns
    rc, raw = run_in_pty([sys.executable, "-m", "fedunlearn.launch", "--engine", engine,
                          "method=retrain,not", "federation.num-clients=3",
                          "pretrain.rounds=2", "unlearn.rounds=2",
                          f"output-dir={tmp_path / 'out'}", f"checkpoint-dir={tmp_path / 'c'}"],
                         cwd=tmp_path, columns=100)
    assert rc == 0, raw
    _assert_no_raw_line(raw)
    assert "[retrain] method 1/2" in plain(raw) and "2/2 rounds" in plain(raw)
    shown = screen(raw)
    text = "\n".join(shown)
    assert len(shown) <= 25, text
    assert any(line.lstrip().startswith("Method") for line in shown), text
    table = shown[shown.index("fedunlearn results"):]  # a path line may be longer
    assert max(map(len, table[:-1])) <= 100, text  # the closing table fits 100 columns
    for method in ("retrain", "not"):
        assert any(line.lstrip().startswith(f"{method} ") for line in shown), text
    assert shown[-1] == f"Results written to {tmp_path / 'out'}", text
