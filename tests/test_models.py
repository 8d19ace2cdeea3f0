"""Tests for the model registry in :mod:`fedunlearn.harness.models`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from fedunlearn.harness.models import MODELS, SmallCNN, create_model, list_models, register_model
from fedunlearn.layers import example_input_for, first_layer

NUM_CLASSES = 10
SMALL_FAMILIES = ["cnn", "resnet18", "vit_tiny"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def vit_b() -> nn.Module:
    """ViT-B/16 at 32x32 (built once: it has ~86M parameters)."""
    torch.manual_seed(0)
    return create_model("vit", NUM_CLASSES, 3, 32).eval()


def _logits(model: nn.Module, in_channels: int, image_size: int, batch: int = 2) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, in_channels, image_size, image_size))


def test_list_models_has_the_four_families() -> None:
    assert {"cnn", "resnet18", "vit", "vit_tiny"} <= set(list_models())
    assert list_models() == sorted(MODELS)


@pytest.mark.parametrize("name", SMALL_FAMILIES)
@pytest.mark.parametrize(("in_channels", "image_size"), [(1, 8), (3, 32)])
def test_small_models_produce_logits(name: str, in_channels: int, image_size: int) -> None:
    model = create_model(name, NUM_CLASSES, in_channels, image_size)
    out = _logits(model, in_channels, image_size)
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()


def test_cnn_handles_28x28_grayscale() -> None:
    assert _logits(create_model("cnn", 7, 1, 28), 1, 28).shape == (2, 7)


def test_vit_b16_produces_logits_and_first_layer(vit_b: nn.Module) -> None:
    assert _logits(vit_b, 3, 32, batch=1).shape == (1, NUM_CLASSES)
    assert vit_b.patch_embed.proj.kernel_size == (16, 16)
    assert vit_b.embed_dim == 768 and len(vit_b.blocks) == 12
    assert first_layer(vit_b, example_input_for(3, 32)) == "patch_embed.proj"


def test_vit_rejects_image_size_not_multiple_of_16() -> None:
    with pytest.raises(ValueError, match=r"multiple of 16.*vit_tiny"):
        create_model("vit", NUM_CLASSES, 1, 8)


def test_vit_tiny_rejects_image_size_not_multiple_of_patch() -> None:
    with pytest.raises(ValueError, match="multiple of its patch size 4"):
        create_model("vit_tiny", NUM_CLASSES, 3, 30)


def test_unknown_model_name_lists_available() -> None:
    with pytest.raises(ValueError, match="unknown model name 'lenet'") as info:
        create_model("lenet", NUM_CLASSES, 3, 32)
    for name in ("cnn", "resnet18", "vit", "vit_tiny"):
        assert name in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 0, "in_channels": 3, "image_size": 32},
        {"num_classes": 10, "in_channels": -1, "image_size": 32},
        {"num_classes": 10, "in_channels": 3, "image_size": 32.0},
    ],
)
def test_invalid_sizes_are_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must be a positive integer"):
        create_model("cnn", **kwargs)  # type: ignore[arg-type]


def test_pretrained_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="pretrained"):
        create_model("resnet18", NUM_CLASSES, 3, 32, pretrained=True)


@pytest.fixture
def toy_registration() -> Iterator[str]:
    name = "toy_linear_for_tests"

    @register_model(name)
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))

    try:
        yield name
    finally:
        MODELS.pop(name, None)


def test_register_model_decorator(toy_registration: str) -> None:
    assert toy_registration in list_models()
    model = create_model(toy_registration, 3, 1, 4)
    assert _logits(model, 1, 4).shape == (2, 3)
    with pytest.raises(ValueError, match="already registered"):
        register_model(toy_registration)(lambda **_: nn.Identity())


def test_cnn_layout() -> None:
    model = create_model("cnn", NUM_CLASSES, 1, 8)
    assert isinstance(model, SmallCNN)
    assert isinstance(model.conv1, nn.Conv2d) and model.conv1.in_channels == 1
    assert isinstance(model.norm1, nn.LayerNorm) and model.norm1.normalized_shape == (32, 8, 8)
    assert isinstance(model.conv2, nn.Conv2d)
    assert isinstance(model.norm2, nn.LayerNorm) and model.norm2.normalized_shape == (64, 4, 4)
    assert model.fc1.in_features == 64 * 2 * 2 and model.fc1.out_features == 128
    assert model.fc2.out_features == NUM_CLASSES


def test_resnet18_cifar_stem_for_small_images() -> None:
    model = create_model("resnet18", NUM_CLASSES, 1, 32)
    assert model.conv1.in_channels == 1
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.padding == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.fc.out_features == NUM_CLASSES


def test_resnet18_standard_stem_for_large_images() -> None:
    model = create_model("resnet18", NUM_CLASSES, 1, 224)
    assert model.conv1.in_channels == 1
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)


def test_vit_tiny_layout() -> None:
    small = create_model("vit_tiny", NUM_CLASSES, 1, 8)
    assert small.patch_embed.proj.kernel_size == (2, 2)
    assert small.embed_dim == 64 and len(small.blocks) == 4
    large = create_model("vit_tiny", NUM_CLASSES, 3, 32)
    assert large.patch_embed.proj.kernel_size == (4, 4)
    assert large.patch_embed.proj.in_channels == 3


def test_models_are_randomly_initialised() -> None:
    torch.manual_seed(1)
    a = create_model("cnn", NUM_CLASSES, 1, 8)
    torch.manual_seed(2)
    b = create_model("cnn", NUM_CLASSES, 1, 8)
    assert not torch.equal(a.conv1.weight, b.conv1.weight)
