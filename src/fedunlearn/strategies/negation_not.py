"""NoT: federated unlearning via weight negation (Khalil et al., CVPR 2025).

https://arxiv.org/abs/2503.05657
"""

from __future__ import annotations

from logging import INFO

from flwr.app import ArrayRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from ..negation import negate_layers
from ..training import load_arrays, to_arrays
from . import register_method
from .base import UnlearningContext
from .finetune import FineTune


@register_method("not")
class NoT(FineTune):
    """Negate the chosen layers of the converged global model, then fine-tune.

    Eq. (3) of the paper: ``theta' = (-theta_l)_{l in L_neg} (+) (theta_l)_{l not in L_neg}``.
    ``L_neg`` defaults to the first layer in execution order (``negation.layers``
    overrides it with a comma-separated list of module names); weight and bias are
    negated unless ``negation.bias=false``. Negating a convolution/linear layer together
    with the normalisation right after it is refused (the negations cancel out, the
    paper's footnote 4). The unlearning step is server-side only (no message, one sign
    flip per negated weight, counted as server FLOPs); recovery is :class:`FineTune`'s:
    client-wise targets are excluded, class-/instance-wise targets fine-tune on their
    retained data. Stores nothing.
    """

    @classmethod
    def preflight(cls, context: UnlearningContext) -> None:
        """Resolve the layers to negate on a fresh model: a bad ``negation.layers`` fails
        before pretraining, not after it."""
        cfg = context.cfg
        negate_layers(context.model_factory(), context.example_input,
                      layers=list(cfg.negate_layers) or None, include_bias=cfg.negate_bias)

    def negated(self, arrays: ArrayRecord) -> ArrayRecord:
        model = load_arrays(self.context.model_factory(), arrays)
        negated = negate_layers(model, self.context.example_input,
                                layers=list(self.cfg.negate_layers) or None,
                                include_bias=self.cfg.negate_bias)
        params = dict(model.named_parameters())
        self.meter.extra_flops += sum(params[n].numel() for n in negated if n in params)
        self.notes["negated"] = negated
        log(INFO, "[not] negated %s", ", ".join(negated))
        return to_arrays(model)

    def unlearning_step(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        return self.negated(arrays)
