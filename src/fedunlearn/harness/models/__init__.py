"""Model zoo: a timm-style registry of the architectures used in the NoT experiments.

Registered names: ``cnn`` (the paper's small CNN), ``resnet18`` (torchvision,
CIFAR stem for small images), ``vit`` (timm ViT-B/16) and ``vit_tiny`` (a small
timm ViT for CPU experiments). Models are always randomly initialised.
"""

from fedunlearn.harness.models import cnn as _cnn  # noqa: F401  (registers "cnn")
from fedunlearn.harness.models import resnet as _resnet  # noqa: F401  (registers "resnet18")
from fedunlearn.harness.models import vit as _vit  # noqa: F401  (registers "vit", "vit_tiny")
from fedunlearn.harness.models.cnn import SmallCNN
from fedunlearn.harness.models.registry import (
    MODELS,
    ModelBuilder,
    create_model,
    list_models,
    register_model,
)

__all__ = ["MODELS", "ModelBuilder", "SmallCNN", "create_model", "list_models", "register_model"]
