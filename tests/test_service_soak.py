"""The service-mode soak (bench/soak_service.py) in a smaller configuration: the service
in a child process, killed with SIGKILL at random points and started again on its state
directory; every request ends with one final verdict on its receipt and in the audit
log, versions without a gap each holding its model, no temporary file left, the audit
chain and every inbox's receipt anchors verified."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_service_killed_at_random_points_keeps_every_promise(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak_service.py"), "--kills", "6",
         "--rounds", "10", "--seed", "1", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures, _ = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{"):])
    assert figures["problems"] == []
    assert figures["kills"] >= 6 and figures["lives"] == figures["kills"] + 1
    verdicts = figures["verdicts"]  # a withdrawal that came too late: honoured, and again
    assert verdicts["withdrawn"] == 1 and verdicts["rejected"] == 1
    assert verdicts["honoured"] == figures["requests"] - 2 >= 3
    assert figures["starts"] == 1
