"""A small timm-style registry mapping model names to builder functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["MODELS", "ModelBuilder", "create_model", "list_models", "register_model"]

ModelBuilder = Callable[..., nn.Module]
"""Signature ``builder(num_classes, in_channels, image_size, **kwargs) -> nn.Module``."""

MODELS: dict[str, ModelBuilder] = {}
"""Registered model builders, keyed by model name."""

_B = TypeVar("_B", bound=ModelBuilder)


def register_model(name: str) -> Callable[[_B], _B]:
    """Register a model builder under ``name`` (decorator).

    Parameters
    ----------
    name : str
        Name under which the builder becomes available to :func:`create_model`.

    Returns
    -------
    Callable
        Decorator that stores the builder in :data:`MODELS` and returns it unchanged.

    Raises
    ------
    ValueError
        If ``name`` is empty or already registered.
    """
    if not name:
        raise ValueError("model name must be a non-empty string")

    def decorator(builder: _B) -> _B:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Return the registered model names, sorted alphabetically.

    Returns
    -------
    list of str
        Names accepted by :func:`create_model`.
    """
    return sorted(MODELS)


def create_model(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    **kwargs: Any,
) -> nn.Module:
    """Build a freshly initialised (never pretrained) model by name.

    Parameters
    ----------
    name : str
        Registered model name, see :func:`list_models`.
    num_classes : int
        Number of output logits.
    in_channels : int
        Number of input image channels.
    image_size : int
        Height and width of the (square) input images.
    **kwargs
        Extra builder-specific options.

    Returns
    -------
    torch.nn.Module
        The model; it maps ``[B, in_channels, image_size, image_size]`` to
        ``[B, num_classes]`` logits.

    Raises
    ------
    ValueError
        If ``name`` is unknown, a size argument is not a positive integer, or
        pretrained weights are requested (nothing is ever downloaded).
    """
    if name not in MODELS:
        raise ValueError(
            f"unknown model name {name!r}; available models: {', '.join(list_models())}"
        )
    for arg, value in (
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("image_size", image_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    if kwargs.pop("pretrained", False):
        raise ValueError(
            "pretrained weights are not supported: models are always built from scratch"
        )
    return MODELS[name](
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs
    )
