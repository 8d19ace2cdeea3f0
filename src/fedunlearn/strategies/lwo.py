"""LWO: the NoT paper's direct check of layer-wise optimality, as a method.

Khalil et al., CVPR 2025 (https://arxiv.org/abs/2503.05657), Definition 2 and Sec. 6.2
("Direct validation of LWO", Appendix 13.7).
"""

from __future__ import annotations

from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from ..logs import log
from flwr.serverapp import Grid

from ..arrays import record_from_state
from ..negation import select_negation_params
from ..param_specs import split_spec
from ..perturbations import CANCELLING
from ..protocol import MODEL_KEY
from ..training import random_model, to_arrays, to_state
from . import register_method
from .base import Phase, UnlearningFailed
from .negation_not import NoT

#: The client action that trains with some parameters frozen
#: (:mod:`fedunlearn.client.actions.frozen`) and the config key naming them.
FROZEN_ACTION = "frozen"
FROZEN_KEY = "frozen"


@register_method("lwo")
class LayerwiseOptimalityCheck(NoT):
    """Negate and freeze NoT's layers, re-initialise everything else, retrain.

    What the paper checks: a model is *layer-wise optimal* (LWO, Definition 2) if, for a
    chosen layer, freezing that layer, randomising every other layer and fine-tuning
    still reaches an acceptable optimum; negation preserves LWO (Theorem 4), which is
    why a negated model recovers fast. The paper validates it directly (Sec. 6.2,
    Appendix 13.7): freeze and negate the first layer of the trained model, re-initialise
    the others, train, and the test accuracy is comparable to training from scratch.

    This method is that experiment, run federatedly:

    * unlearning step (server-side, no message): the chosen layers of the pretrained
      model are perturbed as NoT perturbs them (default: the first layer in execution
      order negated, weight and bias; ``negation.layers``, ``negation.bias`` and
      ``lwo.perturbation`` apply as for ``not``); every other parameter and every buffer
      (norms' running statistics included) takes the values of a freshly initialised
      model, the model's own initialisation seeded as Retrain's (``seed + 1``), so
      the only difference from Retrain's starting model is the kept layer. With
      ``negation.bias=false`` the bias of a chosen layer is kept as pretrained (not
      negated) and frozen with it: the whole layer is kept.
    * training: Retrain's budget and settings (``pretrain.rounds`` FedAvg rounds at
      ``pretrain.lr`` with ``federation.local-epochs``, no clipping, no server
      momentum) on the retained data, through the client action ``frozen``, which
      leaves the kept layer's parameters out of training. Every reply must return them
      bit-identical (a reply that changed them is dropped); the server writes them back
      exactly after each FedAvg (averaging identical float32 values may round), and the
      final model is checked to hold them bit for bit (``notes.frozen``,
      ``notes.frozen_bit_identical``).

    "Comparable to Retrain": the test accuracy (and retain/forget accuracy) of ``lwo``
    should be close to ``retrain``'s of the same job (same seed, same budget, same
    initialisation of the re-initialised layers): a kept negated layer neither blocks
    training nor needs extra rounds. A large shortfall would say the negated layer is
    not layer-wise optimal for this model and data. ``lwo.perturbation=none`` keeps the
    pretrained layer itself (the LWO of the original model, Definition 2 as stated).

    Client-wise targets take no part; class-/instance-wise targets train on their
    retained data (as in NoT's recovery). It is a diagnostic, not an unlearning method
    to deploy: it costs as much as Retrain. Stores nothing.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._frozen_names: list[str] | None = None
        self._frozen_values: dict[str, np.ndarray] | None = None

    # -- selection ------------------------------------------------------------------------
    def check_ready(self) -> None:
        self._frozen(self.model_factory())

    def _frozen(self, model) -> list[str]:
        """The parameters kept from the pretrained model and frozen: every parameter of
        the chosen layers (biases included, even with ``negation.bias=false``)."""
        kept = select_negation_params(
            model, self.example_input, layers=self.layers, include_bias=True,
            refuse_cancelling=self.params.perturbation in CANCELLING)
        sliced = [n for n in kept if split_spec(n)[1] is not None]
        if sliced:
            raise ValueError(f"lwo freezes whole parameters; the selection names rows of "
                             f"one ({sliced}), which cannot be frozen")
        if len(kept) == len(dict(model.named_parameters())):
            raise ValueError("lwo: the chosen layers are the whole model; nothing would be "
                             "re-initialised and trained")
        return kept

    # -- the unlearning step --------------------------------------------------------------
    def unlearning_step(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        """The chosen layers perturbed (NoT's step) and kept; everything else fresh."""
        fresh = random_model(self.model_factory, self.seed + 1)  # Retrain's initialisation
        frozen = self._frozen(fresh)
        perturbed = to_state(self.negated(arrays))
        state = fresh.state_dict()
        with torch.no_grad():
            for name in frozen:
                state[name].copy_(perturbed[name])
        out = to_arrays(fresh)
        self._frozen_names = frozen
        self._frozen_values = {n: out[n].numpy().copy() for n in frozen}
        self.notes["frozen"] = frozen
        self.notes["reinitialised"] = [k for k in state if k not in frozen]
        log(INFO, "[lwo] kept and froze %s; re-initialised %d other tensors",
            ", ".join(frozen), len(state) - len(frozen))
        return out

    # -- training with the kept layer frozen ----------------------------------------------
    def recovery_phase(self) -> Phase:
        """Retrain's budget (:class:`~.base.PretrainingProtocol`), through ``frozen``."""
        t = self.training
        return Phase("training", rounds=t.rounds, lr=t.lr, local_epochs=t.local_epochs,
                     action=FROZEN_ACTION)

    def node_config(self, node_id: int, config: ConfigRecord) -> ConfigRecord:
        out = super().node_config(node_id, config)
        phase = self.current_phase
        if phase is not None and phase.action == FROZEN_ACTION and self._frozen_names:
            out[FROZEN_KEY] = ",".join(self._frozen_names)
        return out

    def reply_problem(self, msg: Message) -> str | None:
        problem = super().reply_problem(msg)
        if problem is not None or not self._frozen_values:
            return problem
        got = msg.content[MODEL_KEY]
        moved = [n for n, v in self._frozen_values.items()
                 if got[n].numpy().tobytes() != v.tobytes()]
        if moved:
            return f"the frozen parameter(s) {moved} came back changed"
        return None

    def aggregate_train(self, server_round: int, replies
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self._frozen_values:
            arrays = self._restore_frozen(arrays)
            reference = self.aggregator.reference() if self.aggregator else None
            if reference is not None:  # FedAvgM's reference point
                self.aggregator.set_reference(self._restore_frozen(reference))
        return arrays, metrics

    def _restore_frozen(self, arrays: ArrayRecord) -> ArrayRecord:
        """``arrays`` with the frozen parameters written back exactly (every reply held
        them bit-identical; FedAvg's float sums may round them by an ulp)."""
        state = to_state(arrays)
        for name, value in self._frozen_values.items():
            state[name] = torch.from_numpy(value.copy())
        return record_from_state(state)

    def unlearn(self, grid: Grid, pretrained: ArrayRecord) -> ArrayRecord:
        arrays = super().unlearn(grid, pretrained)
        moved = [n for n, v in (self._frozen_values or {}).items()
                 if arrays[n].numpy().tobytes() != v.tobytes()]
        if moved:
            raise UnlearningFailed(f"[lwo] the frozen parameter(s) {moved} changed during "
                                   "training")
        self.notes["frozen_bit_identical"] = True
        return arrays


__all__ = ["FROZEN_ACTION", "FROZEN_KEY", "LayerwiseOptimalityCheck"]
