"""The documentation's plain ``flwr run`` commands work as shown: every code block that
runs the app on Flower's local simulation (``flwr run .`` without a SuperLink connection)
sets ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` before it. Without it Flower 1.42
``uv sync``s the app's dependencies into a new environment for every run: PyTorch again
at the repository root (about 6 GB), and a failure for the example app (``fedunlearn``
is not on the package index).

Standard library only; no network, no import of fedunlearn.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
         *sorted((ROOT / "examples").glob("*/README.md"))]
VARIABLE = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1"
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")


def code_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every fenced code block, continuation lines
    (ending in a backslash) joined."""
    blocks, current, start, fence = [], [], 0, None
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence, current, start = match.group(1), [], number + 1
            continue
        if fence is not None and line.strip().startswith(fence):
            blocks.append((start, current))
            fence = None
            continue
        if fence is not None:
            if current and current[-1].endswith("\\"):
                current[-1] = current[-1][:-1] + " " + line.strip()
            else:
                current.append(line.strip())
    return blocks


def local_flwr_run(line: str) -> bool:
    """Whether ``line`` runs an app on the local simulation: ``flwr run <app>`` with no
    SuperLink connection named after the app folder."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return False
    for i in range(len(words) - 1):
        if words[i].endswith("flwr") and words[i + 1] == "run":
            rest = words[i + 2:]
            positional = [w for w in rest if not w.startswith("-")]
            # `flwr run . --stream`, `flwr run . --run-config X`: only the app folder
            # (an option's value follows its option and is skipped)
            values = {rest[j + 1] for j, w in enumerate(rest[:-1])
                      if w.startswith("--") and "=" not in w and not rest[j + 1].startswith("-")
                      and w not in ("--stream",)}
            return len([w for w in positional if w not in values]) <= 1
    return False


def sets_variable(lines: list[str], upto: int) -> bool:
    """Whether the variable is exported before line ``upto`` or set on that line."""
    before = any(line.startswith("export ") and VARIABLE in line for line in lines[:upto])
    return before or lines[upto].startswith(VARIABLE + " ")


def test_the_checker_tells_local_runs_from_deployments():
    assert local_flwr_run('flwr run . --stream --federation-config "num-supernodes=10"')
    assert local_flwr_run("flwr run . --stream --run-config presets/backdoor.toml")
    assert local_flwr_run("flwr run .")
    assert not local_flwr_run("flwr run . my-deployment --stream --run-config 'a=1'")
    assert not local_flwr_run("flwr run . prod --stream")
    assert not local_flwr_run("fedunlearn-run --app .")
    block = ["pip install -e .", "export " + VARIABLE, "flwr run . --stream"]
    assert sets_variable(block, 2) and not sets_variable(block[:1] + block[2:], 1)
    assert sets_variable([VARIABLE + " flwr run ."], 0)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_local_flwr_run_sets_the_variable(page):
    missing = []
    for start, lines in code_blocks(page.read_text()):
        for i, line in enumerate(lines):
            if local_flwr_run(line) and not sets_variable(lines, i):
                missing.append(f"block at line {start}: {line}")
    assert not missing, (f"{page.relative_to(ROOT)}: `flwr run` on the local simulation "
                         f"without `export {VARIABLE}` before it in the same block: {missing}")


def test_the_front_door_commands_are_covered():
    """The README's plain-Flower command and the example's are among those checked."""
    for page in (ROOT / "README.md",
                 ROOT / "examples" / "quickstart-pytorch-unlearning" / "README.md"):
        runs = [line for _, lines in code_blocks(page.read_text()) for line in lines
                if local_flwr_run(line)]
        assert runs, page
