"""FCU: model-contrastive unlearning with frequency-guided fusion at the target, then
recovery (Deng, Luo, Chen, MICCAI 2024, arXiv 2407.02356; reference ``dzp2095/FCU``)."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord

from ..protocol import PRESERVE
from . import register_method
from .data_holder import DataHolderUnlearning
from .params import MethodParams


@dataclass(frozen=True)
class FCUParams(MethodParams):
    """FCU's parameters (the reference's ICH setting).

    iterations : Adam steps on forget batches (I).
    fusion_interval : steps between two frequency fusions (F).
    lr, weight_decay : Adam (betas 0.9, 0.9999).
    rho : low-frequency ratio: the band ``|k| <= floor(n * rho / 2)`` per axis.
    temperature : tau of the contrastive logits.
    preserve : ``original_low`` (the paper: the low-frequency amplitudes of the global
        model are kept, the unlearned model gives the high ones) or ``unlearned_low``
        (the reference code: the other way round).
    """

    iterations: int = 100
    fusion_interval: int = 10
    lr: float = 1e-5
    weight_decay: float = 5e-4
    rho: float = 0.5
    temperature: float = 0.5
    preserve: str = "original_low"

    def validate(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations={self.iterations} must be >= 1")
        if not 1 <= self.fusion_interval <= self.iterations:
            raise ValueError(f"fusion_interval={self.fusion_interval} must be in "
                             f"[1, iterations={self.iterations}]")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"rho={self.rho} must be in [0, 1]")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.preserve not in PRESERVE:
            raise ValueError(f"preserve={self.preserve!r}; allowed: {', '.join(PRESERVE)}")


@register_method("fcu")
class FCU(DataHolderUnlearning):
    """Federated unlearning with model-contrastive unlearning and frequency-guided fusion.

    Each target pulls its penultimate features on its forget data towards a freshly
    initialised "downgraded" model and away from the global model, fusing every
    Conv/Linear weight with the global model in the frequency domain at a fixed
    interval (client action ``contrastive_fusion``); the server averages the targets'
    models, and recovery runs on the retained data without client-wise targets.

    Needs only the forget data, so it serves client-wise requests. The target holds two
    extra models (the original and the downgraded one) while it runs.
    """

    Params = FCUParams
    action = "contrastive_fusion"

    def temporary_bytes(self, arrays: ArrayRecord) -> int:
        return 2 * self.model_bytes(arrays)
