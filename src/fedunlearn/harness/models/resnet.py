"""ResNet-18 from torchvision, with a CIFAR-style stem for small images."""

from __future__ import annotations

from typing import Any

from torch import nn

from fedunlearn.harness.models.registry import register_model

__all__ = ["SMALL_IMAGE_MAX", "build_resnet18"]

SMALL_IMAGE_MAX = 64
"""Images up to this size get the CIFAR stem (3x3 stride-1 conv1, no max-pool)."""


@register_model("resnet18")
def build_resnet18(num_classes: int, in_channels: int, image_size: int, **kwargs: Any) -> nn.Module:
    """Build a randomly initialised torchvision ResNet-18.

    Parameters
    ----------
    num_classes : int
        Number of output logits.
    in_channels : int
        Number of input channels.
    image_size : int
        Input height/width. For ``image_size <= 64`` ``conv1`` is a 3x3,
        stride-1, padding-1 convolution and ``maxpool`` is the identity (CIFAR
        stem); otherwise the standard 7x7 stride-2 stem is kept.
    **kwargs
        Forwarded to :func:`torchvision.models.resnet18` (never ``weights``).

    Returns
    -------
    torch.nn.Module
        The ResNet-18.
    """
    # Imported here: torchvision costs ~1 s of start-up in every ClientApp process.
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes, **kwargs)
    if image_size <= SMALL_IMAGE_MAX:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    # Same initialisation torchvision applies to its own conv layers.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model
