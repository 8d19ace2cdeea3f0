"""What a job shows on the console: a progress bar, the lines that matter, nothing else.

The harness's ServerApp reports its progress as log lines that start with
:data:`MARK` and carry a JSON event (:func:`emit`): the job's plan, each training round
of each phase, the test accuracy when it is measured. Such lines travel the same way on
both engines (``flwr run --stream`` prints the ServerApp's log; the in-process engine
logs in this process), and :class:`JobConsole`, the file-like echo target of
:func:`fedunlearn.launch.flwr_run` and :func:`fedunlearn.engine.local_run`, turns them
into a `rich <https://rich.readthedocs.io>`_ progress display: phase, method, round of
rounds, test accuracy, elapsed and remaining time. The rest of the log is printed above
the bar, except Flower's and Ray's per-round chatter (``aggregate_train: Received ...``,
``configure_train: Sampled ...``, start-up notes, Ray's warnings) and the per-round lines
the bar replaces. ``verbose`` prints every line as it came. The job's log file always
gets every line, without colour codes.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable

from flwr.common.logger import FLOWER_LOGGER

MARK = "fedunlearn-progress "
"""Start of a progress event's log message (the rest is one JSON object)."""

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_LEVEL = re.compile(r"^\s*(INFO|WARNING|ERROR|DEBUG|CRITICAL)\s*:\s*")

# Lines that say nothing a user of a fedunlearn job needs (all still in the log file).
CHATTER = re.compile("|".join([
    r"aggregate_(train|evaluate): Received", r"configure_(train|evaluate): Sampled",
    r"^\[ROUND \d+\]", r"^\s*[│├└]", r"Starting logstream", r"Starting Flower Simulation",
    r"default simulated SuperNodes changed", r"^Federation `", r"To change federation size",
    r"flwr federation simulation-config", r"Successfully installed ", r"^Starting local SuperLink",
    r"^Using SuperLink", r"^Successfully started run", r"Flower configuration not found",
    r"ray/_private", r"^\s*warnings\.warn\(", r"^\(raylet\)", r"Ray will no longer",
    r"^\s*$", r"\] round \d+/\d+ ", r"\] unlearning starts \(params", r"\] wrote /",
    r"^Loading project configuration", r"^Success$", r"^\(ClientAppActor pid=\d+\)",
]))
"""Per-round and start-up lines kept out of the default console."""


def emit(kind: str, **fields) -> None:
    """Log one progress event: ``phase`` (a method starts: ``phase``, ``index``, ``of``)
    or ``round`` (``phase``, ``round``, ``rounds``, and ``test`` when measured).

    On Flower's logger, not the library's (:mod:`fedunlearn.logs`): an event is the
    launcher's input, not a message, and a user's ``fedunlearn`` level must not stop
    the progress bar."""
    event = json.dumps({"kind": kind, **fields}, allow_nan=False, default=str)
    FLOWER_LOGGER.log(logging.INFO, "%s%s", MARK, event)


def parse(line: str) -> tuple[str, dict | None]:
    """``(message, event)`` of a log line: the message without colour codes and level,
    and the progress event it carries (or ``None``)."""
    text = ANSI.sub("", line).rstrip("\n")
    level = _LEVEL.match(text)
    message = text[level.end():] if level else text
    if message.startswith(MARK):
        try:
            event = json.loads(message[len(MARK):])
        except ValueError:
            return message, None
        return message, event if isinstance(event, dict) else None
    return message, None


class JobConsole:
    """A line-buffered stand-in for ``sys.stdout`` while a job runs (see module doc).

    Parameters
    ----------
    out : text stream, optional
        Where the display goes (default: ``sys.stdout`` when created).
    verbose : bool
        Print every line as it came (no bar, nothing hidden).
    tag : str
        Prefix of every printed line, after the time of day (the Hydra runner's
        ``[job 2/6]``).
    show : callable, optional
        ``show(message) -> bool`` for lines that are not chatter (default: all of them);
        errors are always shown.
    """

    def __init__(self, out=None, verbose: bool = False, tag: str = "",
                 show: Callable[[str], bool] | None = None) -> None:
        from rich.console import Console

        self.out = out or sys.stdout
        self.verbose, self.tag, self.show = verbose, tag, show
        self._buf = ""
        self.console = Console(file=self.out, highlight=False, soft_wrap=True)
        self.progress = None
        self.task = None
        self.current = ""
        self.method: tuple[str, int, int] = ("", 0, 0)

    # file-like ----------------------------------------------------------------------------
    def write(self, text: str) -> int:
        self._buf += text
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self.line(line)
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return False

    def __enter__(self) -> JobConsole:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # lines --------------------------------------------------------------------------------
    def line(self, raw: str) -> None:
        if self.verbose:
            self.out.write(raw + "\n")
            self.out.flush()
            return
        message, event = parse(raw)
        if message.startswith(MARK):
            if event is not None:
                self._event(event)
            return
        level = _LEVEL.match(ANSI.sub("", raw))
        severe = level is not None and level.group(1) in ("ERROR", "CRITICAL")
        if not severe and (CHATTER.search(message)
                           or (self.show is not None and not self.show(message))):
            return
        text = f"{time.strftime('%H:%M:%S')} {self.tag} {message}" if self.tag else message
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            self.console.print(text, markup=False, highlight=False)

    def _event(self, event: dict) -> None:
        kind = event.get("kind")
        phase = str(event.get("phase", ""))
        if kind == "phase":  # a method starts: its rounds come with its round events
            self.method = (phase, int(event.get("index", 0) or 0), int(event.get("of", 0) or 0))
            self._start_phase(phase, None)
        elif kind == "round":
            rounds = int(event.get("rounds", 0) or 0) or None
            if self.task is None or phase != self.current:
                self._start_phase(phase, rounds)
            fields = {}
            if isinstance(event.get("test"), (int, float)):
                fields["test"] = f"test {event['test']:.2f}%"
            # redrawn now, not at the next of 4 refreshes a second: a round is news
            self.progress.update(self.task, completed=int(event.get("round", 0) or 0),
                                 total=rounds, refresh=True, **fields)

    def _start_phase(self, name: str, rounds: int | None) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        if self.progress is None:
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(bar_width=24),
                MofNCompleteColumn(), TextColumn("rounds  {task.fields[test]}"),
                TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                console=self.console, transient=True, refresh_per_second=4,
                # This object is the job's sys.stdout: rich's live display must not
                # swap it for its own proxy, which would print the lines this filter
                # hides (and, restored when the bar stops, outlive the job).
                redirect_stdout=False)
            self.progress.start()
        if self.task is not None:
            self.progress.remove_task(self.task)
        method, index, of = self.method
        which = f" method {index}/{of}" if of and name.split(":")[0] == method else ""
        label = f"[{name}]{which}"
        self.current = name
        from rich.markup import escape

        label = escape(f"{self.tag} {label}" if self.tag else label)
        self.task = self.progress.add_task(label, total=rounds, test="")

    def close(self) -> None:
        if self._buf:
            self.line(self._buf)
            self._buf = ""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            self.task = None


def strip_colours(text: str) -> str:
    """``text`` without ANSI colour and cursor codes (for log files)."""
    return ANSI.sub("", text)


__all__ = ["CHATTER", "MARK", "JobConsole", "emit", "parse", "strip_colours"]
