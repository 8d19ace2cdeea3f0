"""The library's logger, ``logging.getLogger("fedunlearn")``, as a user configures it
(docs/running.md, "The console"): its level silences the library's INFO lines, a handler
added to it receives them, and by default they reach Flower's handlers, where Flower's
own lines go (the console, ``flwr run --stream``, the job's log file)."""

from __future__ import annotations

import logging

import pytest

from .test_plugin import fedavg, user_grid, userapp  # noqa: F401  (fixtures)

SERVE_LINE = "4 node(s) answered, none filed a request"   # serve()'s INFO line
FLOWER_LINE = "aggregate_train: Received"                  # Flower's FedAvg's INFO line


class Lines(logging.Handler):
    """Collects ``(logger name, level, message)`` of the records it is handed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))

    def text(self) -> str:
        return "\n".join(message for _, _, message in self.records)


@pytest.fixture()
def library_logger():
    """``logging.getLogger("fedunlearn")``, its level and handlers restored afterwards."""
    logger = logging.getLogger("fedunlearn")
    level, handlers = logger.level, list(logger.handlers)
    yield logger
    logger.setLevel(level)
    for handler in [h for h in logger.handlers if h not in handlers]:
        logger.removeHandler(handler)


@pytest.fixture()
def flower_handler():
    """A handler on Flower's logger (``flwr``), as Flower's console handler sits there."""
    flower, handler = logging.getLogger("flwr"), Lines()
    flower.addHandler(handler)
    yield handler
    flower.removeHandler(handler)


def serve_without_requests(userapp, user_grid, tmp_path):  # noqa: F811
    """A one-round federation of 4 nodes, then ``serve()``: no node filed a request."""
    from fedunlearn import FineTune, Recovery, serve

    client_app, task = userapp
    grid = user_grid(client_app.app)
    arrays = fedavg(grid, task, rounds=1)
    outcome = serve(grid, arrays, FineTune(Recovery(rounds=1)), output_dir=tmp_path / "o")
    assert outcome.methods == {}


def test_by_default_the_library_lines_go_where_flowers_go(
        userapp, user_grid, tmp_path, library_logger, flower_handler):  # noqa: F811
    serve_without_requests(userapp, user_grid, tmp_path)
    assert SERVE_LINE in flower_handler.text()
    assert FLOWER_LINE in flower_handler.text()
    names = {name for name, _, message in flower_handler.records if SERVE_LINE in message}
    assert names == {"fedunlearn"}   # the library's own logger, handed to Flower's handlers


def test_the_fedunlearn_level_silences_the_library_info_lines(
        userapp, user_grid, tmp_path, library_logger, flower_handler):  # noqa: F811
    library_logger.setLevel(logging.WARNING)
    serve_without_requests(userapp, user_grid, tmp_path)
    assert SERVE_LINE not in flower_handler.text()
    assert not [r for r in flower_handler.records
                if r[0] == "fedunlearn" and r[1] < logging.WARNING]
    assert FLOWER_LINE in flower_handler.text()   # Flower's own level is Flower's business


def test_a_handler_added_to_the_fedunlearn_logger_receives_the_library_lines(
        userapp, user_grid, tmp_path, library_logger, flower_handler):  # noqa: F811
    mine = Lines()
    library_logger.addHandler(mine)
    serve_without_requests(userapp, user_grid, tmp_path)
    assert SERVE_LINE in mine.text()
    assert FLOWER_LINE not in mine.text()          # only the library's lines
    assert SERVE_LINE in flower_handler.text()     # and Flower's handlers still get them


def test_progress_events_reach_flowers_handlers_whatever_the_library_level(
        library_logger, flower_handler):
    """The progress bar's events are the launcher's input, not library messages: a user
    who silences ``fedunlearn`` keeps the progress bar of ``fedunlearn-run``."""
    from fedunlearn.console import MARK, emit, parse

    library_logger.setLevel(logging.ERROR)
    emit("round", phase="ft", round=3, rounds=11)
    (line,) = [m for _, _, m in flower_handler.records if m.startswith(MARK)]
    assert parse(f"INFO :      {line}")[1] == {"kind": "round", "phase": "ft", "round": 3,
                                               "rounds": 11}


def test_the_library_records_reach_the_root_logger_once(library_logger):
    """An application's ``logging.basicConfig()`` (a root handler) shows each library
    line once: through Flower's logger, which propagates, not a second time directly."""
    from fedunlearn.logs import log

    root, mine = logging.getLogger(), Lines()
    root.addHandler(mine)
    try:
        log(logging.WARNING, "one line %d", 1)
    finally:
        root.removeHandler(mine)
    assert logging.getLogger("flwr").propagate   # Flower's default
    assert [m for _, _, m in mine.records].count("one line 1") == 1
