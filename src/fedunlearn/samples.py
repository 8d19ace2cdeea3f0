"""How fedunlearn's own loops read one sample: :func:`pair` -> ``(x, y)``.

Accuracy (:func:`fedunlearn.metrics.predict`), membership features, fedunlearn's SGD
(:func:`fedunlearn.training.train_local`) and the client actions' steps read samples
``(x, y)`` through :func:`pair` and nothing else. Data with dict samples (a Hugging Face
/ ``flwr-datasets`` partition) reaches them through
:class:`fedunlearn.client.user_data.Samples`, which :func:`fedunlearn.client.attach`
builds from its ``image_key`` / ``label_key``; a dict that arrives here unconverted is
refused by name instead of being unpacked into its two keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def pair(sample) -> tuple:
    """``(x, y)`` of one sample (or one collated batch)."""
    if isinstance(sample, Mapping):
        raise TypeError(f"fedunlearn reads (x, y) samples, got a dict with keys "
                        f"{list(sample)}: hand dict data to fedunlearn.client.attach(..., "
                        "image_key=..., label_key=...), which reads it as (x, y)")
    if not isinstance(sample, (tuple, list)) or len(sample) != 2:
        shown = (f"{type(sample).__name__} of length {len(sample)}"
                 if isinstance(sample, (tuple, list)) else type(sample).__name__)
        raise TypeError(f"fedunlearn reads (x, y) samples, got {shown}")
    return sample[0], sample[1]


def labels_of(dataset) -> np.ndarray:
    """Every sample's label (``int64``): the dataset's ``targets`` when it has them, else
    read sample by sample through :func:`pair`."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets, dtype=np.int64)
    return np.asarray([int(pair(dataset[i])[1]) for i in range(len(dataset))],
                      dtype=np.int64)


__all__ = ["labels_of", "pair"]
