"""The one registry helper (fedunlearn.registry) and the four registries built on it:
one name rule, one unknown-name message, duplicates refused naming both."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedunlearn.client import register_action
from fedunlearn.client.actions import get_action, list_actions
from fedunlearn.harness.models import MODELS, create_model, list_models, register_model
from fedunlearn.perturbations import get_perturbation, list_perturbations, register_perturbation
from fedunlearn.registry import Registry
from fedunlearn.strategies import get_method, list_methods, register_method
from fedunlearn.strategies.finetune import FineTune

GOOD = ["not", "ft", "l1_sparse", "resnet18", "vit_tiny", "default", "retained", "a", "x_1_"]
BAD = ["", "Not", "vit-tiny", "vit.tiny", "1cnn", "_hidden", "my method", "café", "l1-sparse",
       "ResNet18", None, 3]

REGISTER = {"method": register_method, "client action": register_action,
            "model": register_model, "perturbation": register_perturbation}


def test_every_name_registered_today_follows_the_rule():
    registered = list_methods() + list_actions() + list_models() + list_perturbations()
    assert {"not", "ft", "l1_sparse", "default", "retained", "resnet18", "vit_tiny",
            "negate", "none"} <= set(registered)
    plugins = Registry("plugin")
    for name in registered:
        plugins.register(name)(object())  # the rule accepts each of them
    assert plugins.names() == sorted(set(registered))


@pytest.mark.parametrize("name", GOOD)
def test_the_name_rule_accepts(name):
    plugins = Registry("plugin")
    obj = object()
    assert plugins.register(name)(obj) is obj
    assert plugins.get(name) is obj and name in plugins and list(plugins) == [name]


@pytest.mark.parametrize("kind, register", REGISTER.items())
@pytest.mark.parametrize("name", BAD)
def test_every_registry_refuses_a_name_off_the_rule_at_once(kind, register, name):
    with pytest.raises(ValueError) as err:
        register(name)  # before anything is decorated
    assert str(err.value) == (f"{kind} name {name!r} is not allowed: use a lower-case "
                              "letter, then lower-case letters, digits and '_'")


@pytest.mark.parametrize("kind, get, names", [
    ("method", get_method, list_methods),
    ("client action", get_action, list_actions),
    ("perturbation", get_perturbation, list_perturbations),
    ("model", lambda name: create_model(name, 10, 3, 32), list_models),
])
def test_an_unknown_name_lists_the_choices(kind, get, names):
    with pytest.raises(ValueError) as err:
        get("nope")
    assert str(err.value) == f"unknown {kind} name 'nope'; choose from {names()}"
    assert len(names()) >= 4


def test_the_unknown_model_message_keeps_its_old_prefix():
    with pytest.raises(ValueError, match=r"^unknown model name 'lenet'; choose from \["):
        create_model("lenet", 10, 3, 32)


def _one(name, value, context):
    return value


def _other(name, value, context):
    return -value


def test_a_second_object_under_a_taken_name_is_refused_naming_both():
    plugins = Registry("plugin")
    plugins.register("twice")(_one)
    assert plugins.register("twice")(_one) is _one  # the same object again: a no-op
    with pytest.raises(ValueError) as err:
        plugins.register("twice")(_other)
    assert str(err.value) == (
        "plugin name 'twice' is already registered to tests.test_registry._one; refusing "
        "to register tests.test_registry._other under it")
    assert plugins.get("twice") is _one


def test_the_public_registries_refuse_duplicates_naming_both():
    with pytest.raises(ValueError, match=r"^method name 'ft' is already registered to "
                                         r"fedunlearn\.strategies\.finetune\.FineTune; "
                                         r"refusing to register .*Imposter under it$"):
        @register_method("ft")
        class Imposter(FineTune):
            pass
    assert get_method("ft") is FineTune and FineTune.name == "ft"

    with pytest.raises(ValueError, match=r"^client action name 'default' is already "
                                         r"registered to fedunlearn\.client\.actions\."):
        register_action("default")(lambda job: job)

    with pytest.raises(ValueError, match=r"^perturbation name 'negate' is already "
                                         r"registered to fedunlearn\.perturbations\.negate; "
                                         r"refusing to register tests\.test_registry\._other"):
        register_perturbation("negate")(_other)
    assert get_perturbation("negate")("w", torch.ones(1), None).item() == -1

    with pytest.raises(ValueError, match=r"^model name 'cnn' is already registered to "):
        register_model("cnn")(lambda **_: nn.Identity())


def test_a_model_registered_by_a_user_is_built_and_can_be_removed():
    @register_model("toy_for_registry_test")
    def build(num_classes, in_channels, image_size):
        return nn.Flatten()

    try:
        assert "toy_for_registry_test" in list_models() and "toy_for_registry_test" in MODELS
        assert isinstance(create_model("toy_for_registry_test", 2, 1, 4), nn.Flatten)
        assert register_model("toy_for_registry_test")(build) is build  # same builder: fine
    finally:
        MODELS.pop("toy_for_registry_test", None)
    assert "toy_for_registry_test" not in list_models()


def test_a_copy_is_independent():
    plugins = Registry("plugin")
    plugins.register("kept")(_one)
    copy = plugins.copy()
    copy.register("added")(_other)
    assert plugins.names() == ["kept"] and copy.names() == ["added", "kept"]
    assert copy.kind == "plugin" and len(copy) == 2
