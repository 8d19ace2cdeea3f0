"""Split a training set among clients, and each client's share into train and val.

Partitioning uses flwr-datasets partitioners on a small in-memory table of
``(index, label)`` rows rather than on the images, so it is fast for any dataset
and returns global indices into the training set.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

PARTITIONING_SCHEMES: tuple[str, ...] = ("iid", "dirichlet")

# flwr-datasets' Dirichlet partitioner resamples until every partition has at least
# `min_partition_size` samples (at most 10 tries, then it raises). Its default, 10, is
# our cap; small datasets with many partitions get a smaller floor.
MAX_MIN_PARTITION_SIZE = 10


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Partition sample indices ``0..N-1`` among ``num_partitions`` clients.

    Parameters
    ----------
    labels : numpy.ndarray
        Label of every training sample, shape ``[N]``.
    num_partitions : int
        Number of partitions (clients), ``1 <= num_partitions <= N``.
    scheme : str
        ``"iid"`` (shuffle, then equal contiguous shards) or ``"dirichlet"``
        (label skew from a Dirichlet(``alpha``) distribution per class, with
        flwr-datasets' self-balancing so no client grows far above ``N / K``).
    alpha : float
        Dirichlet concentration (``> 0``); smaller means more skewed.
    seed : int
        Seed; the same inputs and seed always give the same partitions.

    Returns
    -------
    list[numpy.ndarray]
        One sorted int64 array of global indices per partition; the arrays are
        disjoint and together cover all ``N`` samples.

    Raises
    ------
    ValueError
        On an unknown scheme, a bad ``num_partitions`` or ``alpha``, or when the
        Dirichlet sampling cannot give every partition enough samples.
    """
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    labels, num_partitions = _checked_arguments(labels, num_partitions, scheme, alpha)
    num_samples = len(labels)
    table = datasets.Dataset.from_dict(
        {"index": np.arange(num_samples, dtype=np.int64), "label": labels.astype(np.int64)}
    )
    if scheme == "iid":
        # IidPartitioner has no seed and no shuffle: it cuts the table into
        # contiguous shards. Shuffling the table first makes it random and seeded.
        iid = IidPartitioner(num_partitions=num_partitions)
        iid.dataset = table.shuffle(seed=seed)
        return _read_partitions(iid)
    return _dirichlet_partitions(table, num_samples, num_partitions, alpha, seed)


def _checked_arguments(labels, num_partitions, scheme: str,
                       alpha: float) -> tuple[np.ndarray, int]:
    """``(labels, num_partitions)`` of :func:`partition_indices` as a 1-D array and an
    int, once every argument is checked (``ValueError`` otherwise)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    num_samples = len(labels)
    if scheme not in PARTITIONING_SCHEMES:
        raise ValueError(
            f"Unknown partitioning scheme {scheme!r}; choose one of {list(PARTITIONING_SCHEMES)}"
        )
    if isinstance(num_partitions, bool) or not 1 <= int(num_partitions) <= num_samples:
        raise ValueError(
            f"num_partitions must be between 1 and the number of samples ({num_samples}), "
            f"got {num_partitions!r}"
        )
    num_partitions = int(num_partitions)
    if not float(alpha) > 0:  # also rejects NaN
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    return labels, num_partitions


def _dirichlet_partitions(table, num_samples: int, num_partitions: int, alpha: float,
                          seed: int) -> list[np.ndarray]:
    """The ``"dirichlet"`` scheme of :func:`partition_indices` on the ``(index, label)``
    table: a floor of up to 10 samples per client, then of 1, else ``ValueError``."""
    from flwr_datasets.partitioner import DirichletPartitioner

    # Try a floor of up to 10 samples per client (a quarter of the even share),
    # then a floor of 1, before giving up: each floor gets flwr-datasets' 10 tries.
    preferred = max(1, min(MAX_MIN_PARTITION_SIZE, num_samples // (4 * num_partitions)))
    error: ValueError | None = None
    for min_size in dict.fromkeys((preferred, 1)):
        dirichlet = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_size,
            self_balancing=True,
            shuffle=True,
            seed=seed,
        )
        dirichlet.dataset = table
        try:
            with warnings.catch_warnings():
                # Each resampling warns; we either succeed quietly or raise below.
                warnings.filterwarnings("ignore", message="The specified min_partition_size")
                return _read_partitions(dirichlet)
        except ValueError as err:
            error = err
    raise ValueError(
        f"Dirichlet partitioning with alpha={alpha} could not give each of the "
        f"{num_partitions} partitions at least one of the {num_samples} samples; "
        f"increase alpha or use fewer partitions ({error})"
    ) from error


def _read_partitions(partitioner: Partitioner) -> list[np.ndarray]:
    """Global indices (the table's ``index`` column) of every partition, sorted."""
    return [
        np.sort(partitioner.load_partition(pid).with_format("numpy")["index"][:].astype(np.int64))
        for pid in range(partitioner.num_partitions)
    ]


def client_split(
    indices: np.ndarray, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split a client's indices into train and validation parts (80:20 by default).

    Parameters
    ----------
    indices : numpy.ndarray
        The client's global sample indices.
    val_fraction : float
        Share of the indices that go to validation, ``0 <= val_fraction < 1``;
        the count is rounded and at least one index stays in train.
    seed : int
        Seed of the shuffle before the split.

    Returns
    -------
    tuple[numpy.ndarray, numpy.ndarray]
        Sorted int64 ``(train, val)`` arrays, disjoint, covering ``indices``.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {indices.shape}")
    n = len(indices)
    n_val = min(int(round(float(val_fraction) * n)), max(n - 1, 0))
    shuffled = np.random.default_rng(seed).permutation(indices)
    return np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])
