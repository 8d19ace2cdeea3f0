"""conf/ (Hydra) and [tool.flwr.app.config] (pyproject.toml) must not drift apart from the
run-config key table (fedunlearn.harness.keys.KEYS), where the keys are declared."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedunlearn.harness.config import ExperimentConfig
from fedunlearn.harness.keys import KEYS
from fedunlearn.experiment.config import (RUN_CONFIG_MAP, compose, conf_dir,
                                          federation_settings, hydra_path, ratio_clients,
                                          to_run_config)
from fedunlearn.launch import default_run_config

GROUPS = ("method", "dataset", "model", "forget", "federation", "backdoor")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def pyproject_defaults() -> dict:
    """The key table's defaults (which pyproject.toml must repeat: the first test)."""
    return {key.name: key.default for key in KEYS}


def test_pyproject_run_config_is_the_key_table(pyproject_defaults):
    """[tool.flwr.app.config] holds exactly the key table's keys, in its order, with its
    defaults and types (Flower reads the defaults from there)."""
    pyproject = default_run_config()
    assert list(pyproject) == list(pyproject_defaults), (
        f"pyproject.toml lacks {sorted(set(pyproject_defaults) - set(pyproject))}, has "
        f"keys the table lacks {sorted(set(pyproject) - set(pyproject_defaults))}, or "
        "another order")
    for key in KEYS:
        value = pyproject[key.name]
        assert value == key.default and type(value) is key.type, (
            f"{key.name}: pyproject.toml says {value!r} ({type(value).__name__}), the key "
            f"table {key.default!r} ({key.type.__name__})")


def test_defaults_compose_to_the_pyproject_run_config(pyproject_defaults):
    """The top config with its defaults IS the README's default job: same keys, values, types."""
    flat = to_run_config(compose())
    unknown = sorted(set(flat) - set(pyproject_defaults))
    assert not unknown, f"Hydra passes keys that the key table lacks: {unknown}"
    for key, value in flat.items():
        default = pyproject_defaults[key]
        assert value == default and type(value) is type(default), (
            f"{key}: conf/ composes to {value!r} ({type(value).__name__}) but the key table "
            f"says {default!r} ({type(default).__name__})")
    missing = sorted(set(pyproject_defaults) - set(flat))
    assert not missing, (
        f"run-config keys {missing} cannot be set from Hydra: add them to conf/ (at "
        "fedunlearn.experiment.config.hydra_path(key))")


def test_every_key_is_mapped_with_its_type(pyproject_defaults):
    assert list(RUN_CONFIG_MAP) == list(pyproject_defaults)
    for key in KEYS:
        assert RUN_CONFIG_MAP[key.name] == (hydra_path(key.name), key.type), key.name
    assert hydra_path("unlearn.lr") == "method.unlearn.lr"
    assert hydra_path("unlearn.min-delta") == "federation.unlearn.min_delta"
    assert hydra_path("negation.bias") == "method.negation.bias"
    assert hydra_path("server-data.fraction") == "server_data.fraction"


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_passes_only_known_keys_with_default_values(group, pyproject_defaults):
    """Each option changes only what it is about; everything else keeps the app defaults."""
    assert options(group), f"conf/{group}/ is empty"
    base = to_run_config(compose())
    for option in options(group):
        flat = to_run_config(compose([f"{group}={option}"]))
        assert set(flat) <= set(pyproject_defaults), (group, option)
        changed = {k for k in flat if flat[k] != base.get(k)}
        prefix = {"method": ("method", "unlearn.lr", "unlearn.local-epochs",
                             "unlearn.clip-norm", "negation."),
                  "dataset": ("dataset.",), "model": ("model.",), "forget": ("forget.",),
                  "federation": ("federation.", "pretrain.", "unlearn.rounds",
                                 "unlearn.server-momentum", "unlearn.stop",
                                 "unlearn.validate-every", "unlearn.target-gap",
                                 "unlearn.patience", "unlearn.min-delta"),
                  "backdoor": ("backdoor.",)}[group]
        assert all(k.startswith(prefix) for k in changed), (group, option, changed)
        ExperimentConfig.from_run_config({**pyproject_defaults, **flat})  # valid


def test_groups_mirror_the_library():
    from fedunlearn.harness.data import DATASETS
    from fedunlearn.harness.models import list_models
    from fedunlearn.strategies import list_methods

    assert set(options("dataset")) == set(DATASETS)
    assert set(options("model")) == set(list_models())
    assert set(list_methods()) <= set(options("method"))
    assert {"client", "class", "instance"} <= set(options("forget"))
    for option in options("method"):
        name = compose([f"method={option}"]).method.name
        assert set(name.split(",")) <= set(list_methods()), option


def test_one_method_per_job_and_the_comma_list_job():
    assert to_run_config(compose(["method=not"]))["method"] == "not"
    flat = to_run_config(compose(["method=compare", "method.name='retrain,not'"]))
    assert flat["method"] == "retrain,not"
    retrain = to_run_config(compose(["method=retrain"]))
    assert not any(k.startswith(("unlearn.lr", "negation.")) for k in retrain)
    assert retrain["unlearn.rounds"] == 11  # the protocol lives in federation/


@pytest.mark.parametrize("ratio,clients", [(0.1, "0"), (0.5, "0,1,2,3,4"),
                                           (0.9, "0,1,2,3,4,5,6,7,8"), (1.0, ",".join(map(str, range(10))))])
def test_forget_ratio_sets_the_target_clients(ratio, clients):
    assert ratio_clients(ratio, 10) == clients
    flat = to_run_config(compose([f"forget.ratio={ratio}", "forget.clients='7'"]))
    assert flat["forget.clients"] == clients  # ratio wins over clients


@pytest.mark.parametrize("ratio,num_clients,targets", [(0.5, 10, (0, 1, 2, 3, 4)),
                                                        (0.1, 3, (0,)), (1.0, 3, (0, 1, 2))])
def test_forget_ratio_is_a_run_config_key_with_the_hydra_meaning(ratio, num_clients, targets):
    """``fedunlearn-run forget.ratio=0.5`` (or ``flwr run --run-config``) picks the same
    target clients as the Hydra override ``forget.ratio=0.5``; it replaces
    ``forget.clients``, and 0 (the default) leaves ``forget.clients`` in charge."""
    run_config = {"forget.ratio": ratio, "forget.clients": "2",
                  "federation.num-clients": num_clients}
    assert ExperimentConfig.from_run_config(run_config).forget.clients == targets
    hydra = to_run_config(compose([f"forget.ratio={ratio}", "forget.clients='2'",
                                   f"federation.num_clients={num_clients}"]))
    assert hydra["forget.ratio"] == ratio
    assert ExperimentConfig.from_run_config(hydra).forget.clients == targets
    assert ExperimentConfig.from_run_config({**run_config, "forget.ratio": 0.0}) \
        .forget.clients == (2,)


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_a_forget_ratio_outside_0_1_is_refused_naming_it(ratio):
    with pytest.raises(ValueError, match=rf"forget.ratio={ratio} must be in \[0, 1\] "
                                         r"\(0: forget.clients names the targets\)"):
        ExperimentConfig.from_run_config({"forget.ratio": ratio})


def test_forget_ratio_bounds_and_small_federations():
    assert ratio_clients(0.1, 3) == "0"  # at least one target
    assert ratio_clients(0.5, 3) == "0,1"
    with pytest.raises(ValueError):
        ratio_clients(0.0, 10)
    with pytest.raises(ValueError):
        ratio_clients(1.5, 10)


def test_lists_and_numbers_become_run_config_strings():
    flat = to_run_config(compose(["forget=class", "forget.ratio=0", "forget.clients=[0,2]",
                                  "forget.classes=3"]))
    assert flat["forget.clients"] == "0,2" and flat["forget.classes"] == "3"
    assert flat["forget.scope"] == "class"
    flat = to_run_config(compose(["method=not", "method.negation.layers=[conv1,conv2]"]))
    assert flat["negation.layers"] == "conv1,conv2"
    flat = to_run_config(compose(["federation.alpha=1", "method=ft", "method.unlearn.lr=1"]))
    assert flat["federation.alpha"] == 1.0 and isinstance(flat["federation.alpha"], float)
    with pytest.raises(ValueError, match="federation.num_clients"):
        to_run_config(compose(["federation.num_clients=2.5"]))


def test_federation_settings_carry_client_resources():
    fed = federation_settings(compose())
    assert fed == {"num_supernodes": 10, "num_cpus": 1, "num_gpus": 0.0}
    fed = federation_settings(compose(["federation=tiny",
                                       "federation.client_resources.num_gpus=0.25",
                                       "federation.client_resources.num_cpus=2"]))
    assert fed == {"num_supernodes": 3, "num_cpus": 2, "num_gpus": 0.25}
    with pytest.raises(ValueError, match="integer"):
        federation_settings(compose(["federation.client_resources.num_cpus=0.5"]))
    # runner-only keys never reach the run-config
    flat = to_run_config(compose(["federation.client_resources.num_gpus=1"]))
    assert not any(k.endswith(("resources.num-gpus", "num-supernodes"))
                   or "client_resources" in k for k in flat)
    assert set(flat) <= set(default_run_config())


def test_conf_dir_is_the_repo_conf():
    assert conf_dir() == Path(__file__).resolve().parents[1] / "conf"


def test_a_sweep_over_retrain_and_not_can_set_a_not_parameter():
    """``-m method=retrain,not method.params.perturbation=negate,reinit``: Retrain is the
    reference such a sweep needs; it runs without NoT's parameter (noted), NoT with it."""
    from fedunlearn.experiment.config import foreign_method_settings
    from fedunlearn.experiment.runner import open_method_settings

    argv = ["fedunlearn-experiment", "-m", "method=retrain,not",
            "method.params.perturbation=negate,reinit", "method.unlearn.lr=0.05"]
    opened = open_method_settings(argv)
    assert opened[3:] == ["++method.params.perturbation=negate,reinit",
                          "++method.unlearn.lr=0.05"]
    assert open_method_settings(argv[:1] + argv[2:]) == argv[:1] + argv[2:]  # one job: as is
    for value in ("negate", "reinit"):  # each job of the sweep, as Hydra composes it
        retrain = compose(["method=retrain", f"++method.params.perturbation={value}",
                           "++method.unlearn.lr=0.05"])
        assert foreign_method_settings(retrain) == ["method.params.perturbation",
                                                    "method.unlearn.lr"]
        flat = to_run_config(retrain)
        # Retrain's own parameter (its yaml's budget) only, none of NoT's
        assert flat["method"] == "retrain" and flat["method-params"] == "retrain.budget=pretrain"
        assert "unlearn.lr" not in flat
        noT = compose(["method=not", f"++method.params.perturbation={value}",
                       "++method.unlearn.lr=0.05"])
        assert foreign_method_settings(noT) == []
        flat = to_run_config(noT)
        assert f"not.perturbation={value}" in flat["method-params"].split()
        assert flat["unlearn.lr"] == 0.05


def test_a_sweep_still_refuses_a_method_setting_no_method_has():
    from hydra.errors import ConfigCompositionException

    from fedunlearn.experiment.runner import open_method_settings

    argv = ["x", "-m", "method=retrain,not", "method.params.perturbaton=negate"]
    assert open_method_settings(argv) == argv
    with pytest.raises(ConfigCompositionException, match="perturbaton"):
        compose(["method=not", "method.params.perturbaton=negate"])


def test_experiment_help_says_what_it_runs_with_examples_and_the_guide():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fedunlearn.experiment", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    head = done.stdout.split("== Configuration groups ==")[0]
    assert "is powered by Hydra" not in head
    assert "one Hydra job = one Flower" in head and "docs/experiments.md" in head
    assert "fedunlearn-experiment -m method=retrain,ft,not seed=0,1,2" in head
    assert "federation.num_clients" in head and "federation.num-clients" in head
