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
