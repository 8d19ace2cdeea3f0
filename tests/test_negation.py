"""Tests for layer discovery and weight negation (:mod:`fedunlearn.negation`)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from timm.layers import LayerNorm2d
from torch import nn

from fedunlearn.harness.models import create_model
from fedunlearn.layers import (
    LayerInfo,
    example_input_for,
    first_layer,
    is_affine_layer,
    is_norm_layer,
    trace_layers,
)
from fedunlearn.negation import negate_layers, negate_state, select_negation_params

# (name, in_channels, image_size, expected first layer)
FAMILIES = [
    ("cnn", 1, 8, "conv1"),
    ("cnn", 3, 32, "conv1"),
    ("resnet18", 3, 16, "conv1"),
    ("vit_tiny", 1, 8, "patch_embed.proj"),
    ("vit_tiny", 3, 32, "patch_embed.proj"),
]


pytestmark = pytest.mark.usefixtures("single_thread")


def _build(name: str, in_channels: int, image_size: int) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, 10, in_channels, image_size)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_exact_negation(
    model: nn.Module, before: dict[str, torch.Tensor], negated: list[str]
) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, old in before.items():
        expected = -old if key in negated else old
        assert torch.equal(after[key], expected), key


class Reversed(nn.Module):
    """Attributes are registered in the reverse of their execution order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, 2)
        self.mid = nn.Linear(5, 6)
        self.stem = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(torch.relu(self.stem(x)))))


class ContainerWithParams(nn.Module):
    """Owns parameters itself (used after its first child) and has a child layer called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.unused = nn.Parameter(torch.zeros(1))
        self.out = nn.Linear(4, 2)
        self.shared = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(x) * self.scale
        return self.out(self.shared(x))


class UnusedParamLeaf(nn.Module):
    """A leaf whose forward runs but never touches its parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.fixture(scope="module")
def vit_b() -> nn.Module:
    """ViT-B/16 at 32x32 (built once: it has ~86M parameters)."""
    torch.manual_seed(0)
    return create_model("vit", 10, 3, 32)


def test_example_input_for_shape() -> None:
    x = example_input_for(3, 32)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32


@pytest.mark.parametrize(("name", "in_channels", "image_size", "expected"), FAMILIES)
def test_first_layer(name: str, in_channels: int, image_size: int, expected: str) -> None:
    model = _build(name, in_channels, image_size)
    assert first_layer(model, example_input_for(in_channels, image_size)) == expected


def test_cnn_trace_is_complete_and_ordered() -> None:
    model = _build("cnn", 1, 8)
    layers = trace_layers(model, example_input_for(1, 8))
    assert [layer.name for layer in layers] == ["conv1", "norm1", "conv2", "norm2", "fc1", "fc2"]
    assert layers[0] == LayerInfo("conv1", "Conv2d", ("conv1.weight", "conv1.bias"))
    traced = [p for layer in layers for p in layer.param_names]
    assert sorted(traced) == sorted(name for name, _ in model.named_parameters())


def test_vit_container_params_come_after_patch_embedding() -> None:
    model = _build("vit_tiny", 3, 32)
    names = [layer.name for layer in trace_layers(model, example_input_for(3, 32))]
    assert names[:3] == ["patch_embed.proj", "", "blocks.0.norm1"]
    assert names[-2:] == ["norm", "head"]
    root = trace_layers(model, example_input_for(3, 32))[1]
    assert root.module_type == "VisionTransformer"
    assert set(root.param_names) == {"cls_token", "pos_embed"}


def test_trace_follows_execution_not_registration() -> None:
    model = Reversed()
    registration = list(dict.fromkeys(n.rsplit(".", 1)[0] for n, _ in model.named_parameters()))
    assert registration == ["head", "mid", "stem"]
    traced = [layer.name for layer in trace_layers(model, torch.zeros(1, 4))]
    assert traced == ["stem", "mid", "head"]
    assert first_layer(model, torch.zeros(1, 4)) == "stem"


def test_container_params_and_repeated_calls() -> None:
    layers = trace_layers(ContainerWithParams(), torch.zeros(1, 4))
    # "shared" runs twice but appears once; the root's "scale" is used after shared's
    # first call; "unused" is never consumed, so the root falls back to "right after
    # its first parametrised child finished" - which it already is.
    assert [layer.name for layer in layers] == ["shared", "", "out"]
    assert layers[1].param_names == ("scale", "unused")


def test_unused_parameter_leaf_falls_back_to_forward_start() -> None:
    model = nn.Sequential(nn.Linear(3, 3), UnusedParamLeaf(), nn.Linear(3, 1))
    assert [layer.name for layer in trace_layers(model, torch.zeros(1, 3))] == ["0", "1", "2"]


def test_layers_not_executed_are_not_reported() -> None:
    model = Reversed()
    model.spare = nn.Linear(2, 2)  # never called
    assert "spare" not in [layer.name for layer in trace_layers(model, torch.zeros(1, 4))]


def test_trace_restores_modes_and_removes_hooks() -> None:
    model = _build("resnet18", 3, 16)
    model.train()
    model.layer1.eval()
    before = {name: m.training for name, m in model.named_modules()}
    trace_layers(model, example_input_for(3, 16))
    assert {name: m.training for name, m in model.named_modules()} == before
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    # Eval mode during tracing: BatchNorm running statistics are untouched.
    assert torch.equal(model.bn1.running_mean, torch.zeros(64))
    assert int(model.bn1.num_batches_tracked) == 0


@pytest.mark.parametrize(("name", "in_channels", "image_size", "expected"), FAMILIES)
def test_negation_is_exact(name: str, in_channels: int, image_size: int, expected: str) -> None:
    model = _build(name, in_channels, image_size)
    if name == "resnet18":  # non-trivial buffers that must stay untouched
        model.train()
        with torch.no_grad():
            model(torch.randn(4, in_channels, image_size, image_size))
    before = _snapshot(model)
    negated = negate_layers(model, example_input_for(in_channels, image_size))
    expected_params = [n for n, _ in model.get_submodule(expected).named_parameters()]
    assert negated == [f"{expected}.{p}" for p in expected_params]
    _assert_exact_negation(model, before, negated)


def test_negation_is_exact_for_vit_b(vit_b: nn.Module) -> None:
    before = _snapshot(vit_b)
    negated = negate_layers(vit_b, example_input_for(3, 32))
    assert negated == ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    _assert_exact_negation(vit_b, before, negated)


def test_include_bias_false_negates_weights_only() -> None:
    model = _build("cnn", 1, 8)
    before = _snapshot(model)
    negated = negate_layers(model, example_input_for(1, 8), include_bias=False)
    assert negated == ["conv1.weight"]
    _assert_exact_negation(model, before, negated)
    assert torch.equal(model.conv1.bias, before["conv1.bias"])


def test_several_layers_and_explicit_parameter_names() -> None:
    model = _build("cnn", 1, 8)
    before = _snapshot(model)
    negated = negate_layers(model, example_input_for(1, 8), ["conv1", "conv2", "conv1"])
    assert negated == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]
    _assert_exact_negation(model, before, negated)

    vit = _build("vit_tiny", 1, 8)
    before = _snapshot(vit)
    assert negate_layers(vit, example_input_for(1, 8), ["pos_embed"]) == ["pos_embed"]
    _assert_exact_negation(vit, before, ["pos_embed"])


def test_negating_twice_restores_the_model() -> None:
    model = _build("resnet18", 3, 16)
    before = _snapshot(model)
    negate_layers(model, example_input_for(3, 16))
    negate_layers(model, example_input_for(3, 16))
    _assert_exact_negation(model, before, [])


def test_unknown_layer_is_rejected() -> None:
    model = _build("cnn", 1, 8)
    with pytest.raises(ValueError, match=r"unknown layer 'conv9'.*'conv1', 'norm1'"):
        negate_layers(model, example_input_for(1, 8), ["conv9"])


def test_long_layer_lists_are_abbreviated() -> None:
    model = _build("resnet18", 1, 8)
    with pytest.raises(ValueError, match=r"more\)") as info:
        select_negation_params(model, example_input_for(1, 8), ["nope"])
    assert "'conv1'" in str(info.value) and "'fc'" not in str(info.value)


@pytest.mark.parametrize(
    ("model", "example", "layers"),
    [
        (lambda: _build("cnn", 1, 8), example_input_for(1, 8), ["conv1", "norm1"]),
        (lambda: _build("cnn", 1, 8), example_input_for(1, 8), ["conv2", "norm2"]),
        (lambda: _build("resnet18", 3, 16), example_input_for(3, 16), ["conv1", "bn1"]),
        (lambda: nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)), torch.zeros(1, 4), ["0", "1"]),
        (
            lambda: nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)),
            torch.zeros(1, 4),
            ["0.weight", "1"],
        ),
    ],
    ids=[
        "cnn-conv1-norm1",
        "cnn-conv2-norm2",
        "resnet-conv1-bn1",
        "linear-layernorm",
        "param-name",
    ],
)
def test_conv_or_linear_with_following_norm_is_refused(
    model: Callable[[], nn.Module], example: torch.Tensor, layers: list[str]
) -> None:
    net = model()
    before = _snapshot(net)
    with pytest.raises(ValueError, match=r"footnote 4.*cancel out"):
        negate_layers(net, example, layers)
    _assert_exact_negation(net, before, [])  # nothing was touched


def test_non_adjacent_norm_is_accepted() -> None:
    model = _build("cnn", 1, 8)
    # norm1 executes right after conv1, not after conv2: no cancellation.
    negated = negate_layers(model, example_input_for(1, 8), ["norm1", "conv2"], include_bias=False)
    assert negated == ["norm1.weight", "conv2.weight"]


def test_footnote_4_conv_plus_norm_negation_cancels_out() -> None:
    """Why the refusal exists: negating conv1 and norm1's scale leaves the CNN unchanged."""
    model = _build("cnn", 1, 8).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        reference = model(x)
        model.load_state_dict(
            negate_state(model.state_dict(), ["conv1.weight", "conv1.bias", "norm1.weight"])
        )
        assert torch.allclose(model(x), reference, atol=1e-5)


def test_negate_state() -> None:
    model = _build("cnn", 1, 8)
    state = model.state_dict()
    names = select_negation_params(model, example_input_for(1, 8))
    assert names == ["conv1.weight", "conv1.bias"]
    new = negate_state(state, names)
    assert new is not state and new.keys() == state.keys()
    for key, value in state.items():
        if key in names:
            assert torch.equal(new[key], -value) and new[key] is not value
        else:
            assert new[key] is value
    assert torch.equal(state["conv1.weight"], model.conv1.weight)  # input untouched

    negate_layers(model, example_input_for(1, 8))
    for key, value in model.state_dict().items():
        assert torch.equal(value, new[key])

    with pytest.raises(ValueError, match=r"'conv7\.weight'"):
        negate_state(state, ["conv7.weight"])


@pytest.mark.parametrize(
    "module",
    [
        nn.BatchNorm2d(3),
        nn.BatchNorm1d(3),
        nn.LayerNorm(3),
        nn.GroupNorm(1, 3),
        nn.InstanceNorm2d(3),
        LayerNorm2d(3),
    ],
)
def test_is_norm_layer(module: nn.Module) -> None:
    assert is_norm_layer(module) and not is_affine_layer(module)


def test_is_norm_layer_by_class_name() -> None:
    class FancyNorm(nn.Module):
        pass

    assert is_norm_layer(FancyNorm())
    assert not is_norm_layer(nn.ReLU()) and not is_norm_layer(nn.Linear(2, 2))


@pytest.mark.parametrize("module", [nn.Conv2d(1, 1, 3), nn.Conv1d(1, 1, 3), nn.Linear(2, 2)])
def test_is_affine_layer(module: nn.Module) -> None:
    assert is_affine_layer(module)


def test_negating_first_layer_of_trained_cnn_breaks_it() -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    model = create_model("cnn", 10, 1, 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert (logits.argmax(1) == y).float().mean() > 0.85

    assert negate_layers(model, example_input_for(1, 8)) == ["conv1.weight", "conv1.bias"]
    with torch.no_grad():
        negated = model(x)
    loss_before = F.cross_entropy(logits, y).item()
    loss_after = F.cross_entropy(negated, y).item()
    assert loss_after > 2.0 and loss_after > 5 * loss_before
    changed = (negated.argmax(1) != logits.argmax(1)).float().mean()
    assert changed > 0.5
