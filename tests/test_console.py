"""The console of a job: a progress display fed by the ServerApp's progress events, the
lines that matter, and everything (without colour codes) in the log file."""

from __future__ import annotations

import io
import json

from fedunlearn.console import CHATTER, MARK, JobConsole, parse, strip_colours

FLOWER_LOG = [
    "Starting local SuperLink on 127.0.0.1:42931...",
    "Successfully started run 3331063858615260904",
    "\x1b[92mINFO \x1b[0m:      Starting logstream for run_id `3331063858615260904`",
    "\x1b[92mINFO \x1b[0m:      Starting Flower Simulation",
    "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.",
    "\x1b[92mINFO \x1b[0m:      fedunlearn: client on digits/cnn, 10 clients (iid), methods: ft",
    "/x/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions of Ray, Ray will "
    "no longer override",
    "  warnings.warn(",
    "\x1b[92mINFO \x1b[0m:      aggregate_train: Received 9 results and 0 failures",
    "\x1b[92mINFO \x1b[0m:      [ft] unlearning starts (params: none)",
    "\x1b[92mINFO \x1b[0m:      " + MARK + json.dumps({"kind": "phase", "phase": "ft",
                                                       "index": 1, "of": 1}),
    "\x1b[92mINFO \x1b[0m:      " + MARK + json.dumps({"kind": "round", "phase": "ft",
                                                       "round": 1, "rounds": 2}),
    "\x1b[92mINFO \x1b[0m:      [ft] round 2/2  test accuracy 96.94%",
    "\x1b[92mINFO \x1b[0m:      " + MARK + json.dumps({"kind": "round", "phase": "ft",
                                                       "round": 2, "rounds": 2, "test": 96.94}),
    "\x1b[92mINFO \x1b[0m:      [ft] unlearned: retain 99.13, forget 97.39, test 96.94, mia 52.17",
    "\x1b[92mINFO \x1b[0m:      [ft] wrote /tmp/o/results.json",
    "\x1b[91mERROR \x1b[0m:     aggregate_train: something went wrong",
    "\x1b[92mINFO \x1b[0m:      Results written to /tmp/o",
]


def _shown(**kwargs) -> str:
    out = io.StringIO()
    with JobConsole(out, **kwargs) as console:
        for line in FLOWER_LOG:
            console.write(line + "\n")
    return out.getvalue()


def test_the_default_console_keeps_what_a_user_reads():
    shown = _shown()
    lines = [line for line in shown.splitlines() if line.strip()]
    assert "fedunlearn: client on digits/cnn, 10 clients (iid), methods: ft" in lines
    assert "[ft] unlearned: retain 99.13, forget 97.39, test 96.94, mia 52.17" in lines
    assert "Results written to /tmp/o" in lines
    # an error is shown even where its text looks like chatter
    assert "aggregate_train: something went wrong" in lines
    for hidden in ("SuperLink", "logstream", "Starting Flower", "SuperNodes changed",
                   "FutureWarning", "warnings.warn", "Received 9 results", "round 2/2",
                   "unlearning starts", "wrote /tmp", MARK.strip()):
        assert hidden not in shown, hidden
    assert "\x1b[9" not in shown  # no colour codes of the log's levels


def test_verbose_prints_every_line_as_it_came():
    assert _shown(verbose=True).splitlines() == FLOWER_LOG


def test_a_tag_and_a_filter_for_sweeps():
    shown = _shown(tag="[job 2/6]", show=lambda m: "[ft]" in m or "Results" in m)
    lines = shown.splitlines()
    assert any(line.endswith("[job 2/6] [ft] unlearned: retain 99.13, forget 97.39, test "
                             "96.94, mia 52.17") for line in lines)
    assert not any("fedunlearn: client" in line for line in lines)


def test_events_are_parsed_and_colours_stripped():
    message, event = parse(FLOWER_LOG[13])
    assert event == {"kind": "round", "phase": "ft", "round": 2, "rounds": 2, "test": 96.94}
    assert parse(FLOWER_LOG[5])[1] is None
    assert parse("INFO :  " + MARK + "{not json")[1] is None
    assert strip_colours(FLOWER_LOG[3]) == "INFO :      Starting Flower Simulation"
    assert CHATTER.search("aggregate_train: Received 3 results and 0 failures")
    assert not CHATTER.search("[not] round 3 validation accuracy 91.00% (target 92.00%)")
