"""The run-config key table (fedunlearn.harness.keys.KEYS) is the one declaration of the
keys: ExperimentConfig, the library's settings classes and the user docs agree with it.

* every ExperimentConfig field is set by exactly one key, and its default is the key's;
* a key shared with a library field (``unlearn.*`` and Recovery, ``pretrain.*`` and
  Training, ``service.*`` and ServiceConfig) takes that field's Range object, and the
  run-config parser and the class accept and refuse exactly the same values;
* docs/running.md's key table lists every key with the table's default.

(pyproject.toml's ``[tool.flwr.app.config]`` against the table: test_experiment_config.py.)
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest

from fedunlearn import Recovery, ServiceConfig, Training
from fedunlearn.harness.config import ExperimentConfig, ForgetConfig
from fedunlearn.harness.backdoor import BackdoorConfig
from fedunlearn.harness.keys import BY_NAME, KEYS, Key
from fedunlearn.ranges import SERVER_MOMENTUM, Range
from fedunlearn.service.config import RUN_CONFIG_KEYS, field_label
from fedunlearn.strategies.settings import Phase

DOCS = Path(__file__).resolve().parents[1] / "docs" / "running.md"
SHARED = [(key, cls, name) for key in KEYS for cls, name in key.shared]
# The values checked in service mode need it on (and service mode serves one method).
BASE = {"method": "not", "service.rounds": 1}


def test_every_experiment_config_field_is_set_by_one_key_with_its_default():
    fields = [f"{group}.{f.name}" if group else f.name
              for group, cls in (("", ExperimentConfig), ("forget", ForgetConfig),
                                 ("backdoor", BackdoorConfig))
              for f in dataclasses.fields(cls) if f.name not in ("forget", "backdoor")]
    assert sorted(key.field for key in KEYS) == sorted(fields)
    assert len(BY_NAME) == len(KEYS)
    assert ExperimentConfig.from_run_config({}) == ExperimentConfig()
    for key in KEYS:
        assert type(key.default) is key.type, key.name
        assert key.doc and "\n" not in key.doc, key.name
        assert key.parse(key.default) == ExperimentConfig().value(key.field), key.name


def test_keys_with_a_range_or_choices_refuse_a_value_outside_naming_the_key():
    for key in KEYS:
        if key.range is not None:
            outside = _below(key.range)
            with pytest.raises(ValueError, match=re.escape(f"{key.name}=")):
                key.check(outside)
            with pytest.raises(ValueError, match="must be"):
                key.check(outside)
        if key.choices is not None:
            with pytest.raises(ValueError, match=re.escape(f"{key.name}='nope'; choose from")):
                key.check("nope")


def test_a_shared_key_takes_the_library_fields_range_object():
    assert {cls for _, cls, _ in SHARED} == {Recovery, Training, ServiceConfig}
    for key, cls, name in SHARED:
        assert key.range is cls.RANGES[name], (key.name, cls.__name__, name)
    cfg = ExperimentConfig.from_run_config(BASE)
    ranges = cfg.ranges()
    for key, _, _ in SHARED:
        assert ranges[key.name][1] is key.range, key.name
    # Every Recovery and Training field with a range has its run-config key.
    for cls in (Recovery, Training):
        assert {n for k, c, n in SHARED if c is cls} == set(cls.RANGES), cls.__name__


def test_service_config_names_the_run_config_key_of_each_shared_field():
    from_table = {name: key.name for key, cls, name in SHARED if cls is ServiceConfig}
    assert RUN_CONFIG_KEYS == from_table
    for name, key in from_table.items():
        assert f"(run-config {key})" in field_label(name)
    assert field_label("server_momentum") == "ServiceConfig server_momentum"


def _below(allowed: Range):
    if allowed.integer:
        return int(allowed.lo) - 1
    return math.nextafter(allowed.lo, -math.inf)


def _boundary_values(allowed: Range) -> list:
    """lo, just below lo, just above lo, hi, just below hi, just above hi (or a large
    value when unbounded), NaN, infinities and values of the wrong type."""
    step_up = (lambda x: int(x) + 1) if allowed.integer else (
        lambda x: math.nextafter(x, math.inf))
    step_down = (lambda x: int(x) - 1) if allowed.integer else (
        lambda x: math.nextafter(x, -math.inf))
    cast = int if allowed.integer else float
    values = [cast(allowed.lo), _below(allowed), step_up(allowed.lo)]
    if allowed.hi is None:
        values.append(10**9 if allowed.integer else 1e12)
    else:
        values += [cast(allowed.hi), step_down(allowed.hi), step_up(allowed.hi)]
    values += [math.nan, math.inf, -math.inf, True, False, "abc", None, [1]]
    if allowed.integer:
        values += [2.5, 2.0]
    return values


def _parser_accepts(key: Key, value) -> bool:
    try:
        ExperimentConfig.from_run_config({**BASE, key.name: value})
    except ValueError as err:
        assert key.name in str(err), (key.name, value, err)
        return False
    return True


def _class_accepts(cls: type, name: str, value) -> bool:
    try:
        cls(**{name: value})
    except ValueError as err:
        assert name in str(err), (cls.__name__, name, value, err)
        return False
    return True


@pytest.mark.parametrize("key, cls, name", SHARED,
                         ids=[f"{k.name}-{c.__name__}.{n}" for k, c, n in SHARED])
def test_run_config_and_library_class_accept_and_refuse_the_same_values(key, cls, name):
    for value in _boundary_values(key.range):
        parser, library = _parser_accepts(key, value), _class_accepts(cls, name, value)
        assert parser == library, (f"{key.name}={value!r}: run-config "
                                   f"{'accepts' if parser else 'refuses'}, {cls.__name__}."
                                   f"{name} {'accepts' if library else 'refuses'}")
        assert library == key.range.allows(value), (key.name, value)


def test_service_server_momentum_is_refused_where_phase_would_refuse_it():
    """ServiceConfig(server_momentum=1.0) used to pass and fail at the first round."""
    with pytest.raises(ValueError, match=r"server_momentum=1.0 must be in \[0, 1\)"):
        ServiceConfig(server_momentum=1.0)
    with pytest.raises(ValueError, match=r"phase server_momentum=1.0 must be in \[0, 1\)"):
        Phase("service", rounds=1, lr=0.1, local_epochs=1, server_momentum=1.0)
    assert ServiceConfig.RANGES["server_momentum"] is SERVER_MOMENTUM
    assert Recovery.RANGES["server_momentum"] is SERVER_MOMENTUM
    ServiceConfig(server_momentum=0.99)
    Phase("service", rounds=1, lr=0.1, local_epochs=1, server_momentum=0.99)


def test_min_replies_is_a_count_or_a_share_for_both():
    key = BY_NAME["service.min-replies"]
    for value in (0.5, 1, 1.0, 3, 3.0, 1e6):
        assert _parser_accepts(key, value) and _class_accepts(ServiceConfig, "min_replies",
                                                              value), value
    for value in (0, 0.0, 2.5, -1):
        assert not _parser_accepts(key, value), value
        assert not _class_accepts(ServiceConfig, "min_replies", value), value


def _docs_table() -> dict[str, str]:
    """docs/running.md's key table: key -> default as written (rows may group keys)."""
    text = DOCS.read_text()
    section = text.split("## Run-config keys", 1)[1].split("\n## ", 1)[0]
    out: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        keys, defaults = re.findall(r"`([^`]*)`", cells[0]), re.findall(r"`([^`]*)`", cells[1])
        assert len(keys) == len(defaults), line
        out.update(zip(keys, defaults))
    return out


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value + '"'
    return repr(value)


def test_the_docs_key_table_lists_every_key_with_its_default():
    docs = _docs_table()
    assert sorted(docs) == sorted(BY_NAME), (
        f"docs/running.md lacks {sorted(set(BY_NAME) - set(docs))}, has unknown "
        f"{sorted(set(docs) - set(BY_NAME))}")
    for key in KEYS:
        assert docs[key.name] == _toml(key.default), (
            f"{key.name}: docs/running.md says {docs[key.name]}, the key table "
            f"{_toml(key.default)}")
