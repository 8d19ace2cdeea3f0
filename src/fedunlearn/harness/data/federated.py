"""One object holding everything a federation needs to know about its data."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from torch.utils.data import Dataset

from fedunlearn.harness.data.datasets import DataInfo, load_dataset
from fedunlearn.harness.data.partition import client_split, partition_indices


@dataclass
class FederatedData:
    """A dataset split among clients, each client's share split into train and val.

    Parameters
    ----------
    info : DataInfo
        Description of the dataset.
    train : Dataset
        The full training set; partitions hold global indices into it.
    test : Dataset
        The global (server-side) test set.
    partitions : list[numpy.ndarray]
        Sorted global training indices of each client.
    server_indices : numpy.ndarray
        Sorted global training indices reserved for the server (e.g. FUKD's unlabeled
        distillation data): in no partition. Empty unless a server fraction is set.
    val_fraction : float
        Share of each partition held out for validation.
    seed : int
        Experiment seed; each client's train/val split is seeded from it and
        the partition id.
    """

    info: DataInfo
    train: Dataset
    test: Dataset
    partitions: list[np.ndarray]
    val_fraction: float
    seed: int
    server_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def num_clients(self) -> int:
        """Number of partitions (clients)."""
        return len(self.partitions)

    def train_indices(self, partition_id: int) -> np.ndarray:
        """Global indices of the client's training split."""
        return self._split(partition_id)[0]

    def val_indices(self, partition_id: int) -> np.ndarray:
        """Global indices of the client's validation split."""
        return self._split(partition_id)[1]

    def _split(self, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
        if (
            isinstance(partition_id, bool)
            or not isinstance(partition_id, (int, np.integer))
            or not 0 <= partition_id < len(self.partitions)
        ):
            raise ValueError(
                f"partition_id {partition_id!r} is out of range: valid ids are "
                f"0..{len(self.partitions) - 1}"
            )
        # Mix seed and id so clients' shuffles are independent but reproducible.
        client_seed = int(np.random.SeedSequence([self.seed, int(partition_id)]).generate_state(1)[0])
        return client_split(self.partitions[partition_id], self.val_fraction, client_seed)


@lru_cache(maxsize=8)
def build_federated_data(
    dataset: str,
    num_clients: int,
    partitioning: str = "iid",
    alpha: float = 0.5,
    val_fraction: float = 0.2,
    seed: int = 0,
    root: str = "",
    download: bool = False,
    image_size: int | None = None,
    server_fraction: float = 0.0,
    size: int = 0,
) -> FederatedData:
    """Load a dataset and partition its training set among ``num_clients`` clients.

    Memoized per process: Flower ClientApps call it on every message, and the
    same arguments return the same (shared, not to be mutated) object.

    Parameters
    ----------
    dataset : str
        Dataset name, see :func:`fedunlearn.harness.data.load_dataset`.
    num_clients : int
        Number of partitions.
    partitioning : str
        ``"iid"`` or ``"dirichlet"``.
    alpha : float
        Dirichlet concentration (used by ``"dirichlet"``).
    val_fraction : float
        Share of each client's data held out for validation.
    seed : int
        Seed of the partitioning and of the train/val splits.
    root : str
        Folder with the dataset files (torchvision datasets).
    download : bool
        Let torchvision download missing files.
    image_size : int or None
        Image side passed to :func:`~fedunlearn.harness.data.load_dataset` (e.g. 224 for
        a ViT); ``None`` keeps the dataset's default.
    server_fraction : float
        Share of the training pool reserved for the server before partitioning
        (a seeded random draw, in no client's partition); 0 reserves nothing and
        leaves the partitions exactly as without it.
    size : int
        Training samples of ``synthetic`` (0: its default); see
        :func:`~fedunlearn.harness.data.load_dataset`.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    train, test, info = load_dataset(dataset, root=root, download=download,
                                     image_size=image_size, size=size)
    labels = np.asarray(getattr(train, "targets"), dtype=np.int64)
    pool, server = server_split(len(labels), server_fraction, num_clients, seed)
    partitions = [pool[p] for p in partition_indices(labels[pool], num_clients, partitioning,
                                                     alpha, seed)]
    return FederatedData(info, train, test, partitions, float(val_fraction), seed, server)


def server_split(num_samples: int, fraction: float, num_clients: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(client pool, server share)``: sorted, disjoint global indices covering
    ``0..num_samples-1``; the server share is ``round(fraction * num_samples)`` indices
    drawn at random under ``seed`` (its own stream, independent of partitioning)."""
    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"server-data.fraction={fraction} must be in [0, 1)")
    everything = np.arange(num_samples, dtype=np.int64)
    n_server = int(round(fraction * num_samples))
    if fraction == 0.0 or n_server == 0:
        if fraction > 0.0:
            raise ValueError(f"server-data.fraction={fraction} of {num_samples} training "
                             "samples reserves no sample; use a larger fraction")
        return everything, np.zeros(0, dtype=np.int64)
    if num_samples - n_server < num_clients:
        raise ValueError(f"server-data.fraction={fraction} leaves {num_samples - n_server} "
                         f"training samples for {num_clients} clients")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E7A]))
    order = rng.permutation(num_samples)
    return np.sort(order[n_server:]), np.sort(order[:n_server])


def federated_data(cfg) -> FederatedData:
    """The federation's data for an experiment config (the harness's public partitions)."""
    return build_federated_data(
        cfg.dataset, cfg.num_clients, partitioning=cfg.partitioning, alpha=cfg.alpha,
        val_fraction=cfg.val_fraction, seed=cfg.split_seed, root=cfg.data_root,
        download=cfg.data_download, server_fraction=cfg.server_data_fraction,
        size=cfg.data_size,
    )
