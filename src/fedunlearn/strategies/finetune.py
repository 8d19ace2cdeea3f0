"""FT: fine-tune the converged model on retained data only (natural forgetting)."""

from __future__ import annotations

from . import register_method
from .base import UnlearningStrategy


@register_method("ft")
class FineTune(UnlearningStrategy):
    """Fine-tuning baseline of the NoT paper (Khalil et al., CVPR 2025, Sec. 6.1).

    ``unlearn.rounds`` FedAvg rounds from the pretrained model at ``unlearn.lr``.
    Client-wise targets are left out; class-/instance-wise targets train on their
    retained data. Forgetting happens only through drift ("natural forgetting").
    """
