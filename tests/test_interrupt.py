"""Ctrl-C on a launcher: one line, the shell's exit code for SIGINT, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _default_sigint() -> None:
    # A CI script's background job inherits SIGINT ignored; a user's shell does not.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "fedunlearn.launch", "--engine", "local"],
    [sys.executable, "-m", "fedunlearn.experiment", "engine=local"],
])
def test_ctrl_c_ends_a_job_with_a_line_and_exit_code_130(command, tmp_path: Path):
    env = {**os.environ, "FEDUNLEARN_CACHE": str(tmp_path / "cache"),
           "PYTHONUNBUFFERED": "1"}
    extra = ([f"output-dir={tmp_path / 'out'}"] if "fedunlearn.launch" in command
             else [f"hydra.run.dir={tmp_path / 'hydra'}", f"output_dir={tmp_path / 'out'}"])
    proc = subprocess.Popen(command + extra, cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_default_sigint)
    time.sleep(12)  # into the job: imports done, pretraining under way
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "interrupted (Ctrl-C)" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
