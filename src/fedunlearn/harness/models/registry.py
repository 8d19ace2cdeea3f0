"""A small timm-style registry mapping model names to builder functions (a
:class:`fedunlearn.registry.Registry` of kind ``"model"``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from ...registry import Registry

__all__ = ["MODELS", "ModelBuilder", "create_model", "list_models", "register_model"]

ModelBuilder = Callable[..., nn.Module]
"""Signature ``builder(num_classes, in_channels, image_size, **kwargs) -> nn.Module``."""

MODELS: dict[str, ModelBuilder] = {}
"""Registered model builders, keyed by model name (the entries of the model registry)."""
_MODELS: Registry[ModelBuilder] = Registry("model", MODELS)

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
        If ``name`` breaks the name rule of :mod:`fedunlearn.registry` (a lower-case
        letter, then lower-case letters, digits and '_'), or another builder is
        registered under it.
    """
    return _MODELS.register(name)


def list_models() -> list[str]:
    """Return the registered model names, sorted alphabetically.

    Returns
    -------
    list of str
        Names accepted by :func:`create_model`.
    """
    return _MODELS.names()


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
    builder = _MODELS.get(name)
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
    return builder(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs
    )
