"""NoT: federated unlearning via weight negation (Khalil et al., CVPR 2025).

https://arxiv.org/abs/2503.05657
"""

from __future__ import annotations

from logging import INFO

from flwr.app import ArrayRecord
from flwr.common.logger import log

from ..negation import negate_layers
from ..training import load_arrays, to_arrays
from . import register_method
from .finetune import FineTune


@register_method("not")
class NoT(FineTune):
    """Negate the chosen layers of the converged global model, then fine-tune.

    Eq. (3) of the paper: ``theta' = (-theta_l)_{l in L_neg} (+) (theta_l)_{l not in L_neg}``.
    ``L_neg`` defaults to the first layer in execution order (``negation.layers``
    overrides it with a comma-separated list of module names); weight and bias are
    negated unless ``negation.bias=false``. Negating a convolution/linear layer together
    with the normalisation right after it is refused (the negations cancel out, the
    paper's footnote 4). Fine-tuning is :class:`FineTune`'s: client-wise targets are
    excluded, class-/instance-wise targets fine-tune on their retained data.
    """

    def initial_arrays(self, pretrained: ArrayRecord) -> ArrayRecord:
        model = load_arrays(self.context.model_factory(), pretrained)
        negated = negate_layers(model, self.context.example_input,
                                layers=list(self.cfg.negate_layers) or None,
                                include_bias=self.cfg.negate_bias)
        self.notes["negated"] = negated
        log(INFO, "[not] negated %s", ", ".join(negated))
        return to_arrays(model)
