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


__all__ = ["pair"]
