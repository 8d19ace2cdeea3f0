"""When is recovery done? A stopping rule an operator can use without Retrain.

Every ``validate_every`` recovery rounds the retained clients report accuracy on their
validation splits (the 80:20 split; class-wise requests leave the forgotten classes out).
Recovery stops at the first of:

* ``target reached``: validation accuracy >= the original (pretrained) model's accuracy on
  the same clients' validation data minus ``target_gap`` points;
* ``plateau``: ``patience`` validations in a row without an improvement of more than
  ``min_delta`` points over the best so far;
* ``maximum``: ``unlearn.rounds`` rounds ran.

The same rule serves every method's recovery, so comparisons stay fair; Retrain keeps its
fixed budget (it is the reference), and ``unlearn.stop="fixed"`` turns the rule off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

TARGET_REACHED = "target reached"
PLATEAU = "plateau"
MAXIMUM = "maximum"
FIXED = "fixed budget"


@dataclass
class StoppingRule:
    """Feed it validation accuracies with :meth:`update`; it says when to stop.

    Parameters
    ----------
    target : float
        Validation accuracy (%) that counts as recovered.
    patience : int
        Validations without an improvement > ``min_delta`` before a plateau is called.
    min_delta : float
        Smallest improvement (points) that resets the patience counter.
    """

    target: float
    patience: int = 3
    min_delta: float = 0.1
    best: float = -math.inf
    since_best: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience={self.patience} must be >= 1")
        if self.min_delta < 0:
            raise ValueError(f"min_delta={self.min_delta} must be >= 0")

    def update(self, server_round: int, accuracy: float) -> str | None:
        """Record round ``server_round``'s validation accuracy; return why to stop, or
        ``None`` to go on. A NaN accuracy (no validation data answered) counts as no
        improvement."""
        self.history.append((server_round, accuracy))
        if not math.isnan(accuracy) and accuracy >= self.target:
            return TARGET_REACHED
        if not math.isnan(accuracy) and accuracy > self.best + self.min_delta:
            self.best, self.since_best = accuracy, 0
        else:
            self.since_best += 1
            if not math.isnan(accuracy):
                self.best = max(self.best, accuracy)
        if self.since_best >= self.patience:
            return PLATEAU
        return None
