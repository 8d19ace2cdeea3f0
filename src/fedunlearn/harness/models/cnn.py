"""The small CNN used in the NoT paper."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedunlearn.harness.models.registry import register_model

__all__ = ["SmallCNN", "build_cnn"]


class SmallCNN(nn.Module):
    """Two conv blocks (conv -> LayerNorm -> ReLU -> 2x2 max-pool) and an MLP head.

    Parameters
    ----------
    num_classes : int
        Number of output logits.
    in_channels : int
        Number of input channels.
    image_size : int
        Height and width of the square input; must be at least 4 so that two
        2x2 poolings leave a non-empty feature map.
    channels : tuple of int, optional
        Output channels of ``conv1`` and ``conv2``.
    hidden : int, optional
        Width of the hidden layer of the head.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        channels: tuple[int, int] = (32, 64),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"the cnn needs image_size >= 4 (two 2x2 poolings), got {image_size}")
        c1, c2 = channels
        size1 = image_size
        size2 = size1 // 2
        size3 = size2 // 2
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=3, padding=1)
        self.norm1 = nn.LayerNorm([c1, size1, size1])
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.norm2 = nn.LayerNorm([c2, size2, size2])
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(c2 * size3 * size3, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute logits of shape ``[B, num_classes]``."""
        x = self.pool(self.act(self.norm1(self.conv1(x))))
        x = self.pool(self.act(self.norm2(self.conv2(x))))
        x = torch.flatten(x, 1)
        return self.fc2(self.act(self.fc1(x)))


@register_model("cnn")
def build_cnn(num_classes: int, in_channels: int, image_size: int, **kwargs: Any) -> nn.Module:
    """Build :class:`SmallCNN` (extra ``kwargs``: ``channels``, ``hidden``)."""
    return SmallCNN(num_classes, in_channels, image_size, **kwargs)
