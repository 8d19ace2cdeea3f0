"""Datasets by name: in-memory ones (digits, synthetic) and torchvision ones.

Every dataset returned here yields ``(x, y)`` with ``x`` a normalized float32
tensor of shape ``[C, H, W]`` and ``y`` a Python ``int``, and exposes the labels
of all its items as ``targets`` (an int64 :class:`numpy.ndarray`), so that
partitioning and forget-set selection never need to touch the pixels.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

DATASETS: tuple[str, ...] = ("digits", "synthetic", "cifar10", "cifar100", "caltech101")

#: (classes, channels, default image side) of each dataset, known without loading it:
#: enough to build the model (e.g. to size a training history before any data exists).
DATASET_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (10, 1, 8), "synthetic": (10, 1, 8), "cifar10": (10, 3, 32),
    "cifar100": (100, 3, 32), "caltech101": (101, 3, 64),
}

#: Training samples of each dataset (the pool the clients' partitions are drawn from),
#: known without loading it: the bound on federation.num-clients. Caltech-101: 8677
#: images, 80% of them (stratified) for training.
DATASET_TRAIN_SIZES: dict[str, int] = {
    "digits": 1437, "synthetic": 800, "cifar10": 50_000, "cifar100": 50_000,
    "caltech101": 6941,
}

#: Training samples of ``synthetic`` unless ``dataset.size`` says otherwise.
SYNTHETIC_TRAIN_SIZE = 800

# Fixed seeds: the train/test split and the synthetic data are the same in every
# experiment, whatever the experiment seed, so test sets are comparable across runs.
SPLIT_SEED = 0
SYNTHETIC_SEED = 1234

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CALTECH101_IMAGE_SIZE = 64
CALTECH101_TEST_FRACTION = 0.2
DIGITS_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DataInfo:
    """Static description of a loaded dataset.

    Parameters
    ----------
    name : str
        Dataset name, one of :data:`DATASETS`.
    num_classes : int
        Number of classes (labels are ``0 .. num_classes - 1``).
    in_channels : int
        Channels of one image tensor.
    image_size : int
        Height and width of one image tensor (images are square).
    num_train : int
        Number of training samples.
    num_test : int
        Number of test samples.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    num_train: int
    num_test: int


class ArrayDataset(Dataset):
    """In-memory image dataset backed by one tensor.

    Parameters
    ----------
    images : torch.Tensor
        Normalized float32 images, shape ``[N, C, H, W]``.
    targets : numpy.ndarray
        Integer labels, shape ``[N]``.
    image_size : int or None
        If given and different from ``H``, each image is resized (bilinear) to
        ``image_size x image_size`` when it is read, not up front, so that large
        sizes do not multiply the memory held by every client process.
    """

    def __init__(
        self, images: torch.Tensor, targets: np.ndarray, image_size: int | None = None
    ) -> None:
        if len(images) != len(targets):
            raise ValueError(
                f"images ({len(images)}) and targets ({len(targets)}) differ in length"
            )
        self.images = images.to(torch.float32).contiguous()
        self.targets = np.asarray(targets, dtype=np.int64)
        native = int(images.shape[-1])
        self.image_size = native if image_size is None else int(image_size)
        self._resize = self.image_size != native

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index]
        if self._resize:
            x = F.interpolate(
                x.unsqueeze(0),
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
            ).squeeze(0)
        return x, int(self.targets[index])


class LabeledSubset(Dataset):
    """A view of selected items of another dataset, with their labels as ``targets``.

    Parameters
    ----------
    dataset : Dataset
        Underlying dataset whose items are ``(x, label)``.
    indices : Sequence[int]
        Positions in ``dataset`` that this view exposes, in order.
    targets : numpy.ndarray
        Labels of the selected items (``targets[i]`` is the label of
        ``dataset[indices[i]]``); read from metadata, not from the images.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], targets: np.ndarray) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)
        if len(self.indices) != len(self.targets):
            raise ValueError(
                f"indices ({len(self.indices)}) and targets ({len(self.targets)}) "
                "differ in length"
            )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        x, _ = self.dataset[int(self.indices[index])]
        return x, int(self.targets[index])


def load_dataset(
    name: str, root: str = "", download: bool = False, image_size: int | None = None,
    size: int = 0,
) -> tuple[Dataset, Dataset, DataInfo]:
    """Load a dataset's train and test splits by name.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS`.
    root : str
        Folder holding the files of the torchvision datasets (cifar10, cifar100,
        caltech101); ignored by digits and synthetic.
    download : bool
        Let torchvision download missing files into ``root`` (needs internet).
    image_size : int or None
        Side of the square images returned; ``None`` keeps the dataset's
        default (8 for digits/synthetic, 32 for CIFAR, 64 for Caltech-101).
    size : int
        Training samples of ``synthetic`` (0: its default, 800; the test split stays
        200): enough data for federations of thousands of clients. The first 800
        samples of a larger set are not those of the default one (one draw). Other
        data sets have their own size: 0 only.

    Returns
    -------
    tuple[Dataset, Dataset, DataInfo]
        ``(train, test, info)``. Both datasets have a ``targets`` attribute.

    Raises
    ------
    ValueError
        If ``name`` is unknown, ``image_size`` is not positive, or ``root`` is
        empty for a dataset that needs files.
    FileNotFoundError
        If the files are not under ``root`` and ``download`` is False.
    """
    if name not in _LOADERS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {list(DATASETS)}")
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) < 1):
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"dataset.size={size!r}: expected an integer >= 0 (0: the data "
                         "set's own size)")
    if name == "synthetic":
        return _load_synthetic(root, download, image_size, size)
    if size:
        raise ValueError(f"dataset.size={size} applies to synthetic only; {name} has its "
                         "own size (use dataset.size=0)")
    return _LOADERS[name](root, download, image_size)


# ----------------------------------------------------------------------------- helpers


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..N-1`` into sorted train and test index arrays, stratified.

    Parameters
    ----------
    labels : numpy.ndarray
        Label of each sample.
    test_fraction : float
        Fraction of the samples that go to the test split.
    seed : int
        Seed of the shuffle.

    Returns
    -------
    tuple[numpy.ndarray, numpy.ndarray]
        Sorted int64 train and test positions.
    """
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(labels))
    train, test = train_test_split(
        positions, test_size=test_fraction, stratify=labels, random_state=seed
    )
    return np.sort(train).astype(np.int64), np.sort(test).astype(np.int64)


def _normalize_by_train(
    train: np.ndarray, test: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalize ``[N, C, H, W]`` arrays per channel with the train mean and std."""
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), keepdims=True)
    std = np.where(std > 0, std, 1.0)
    return (
        torch.from_numpy(((train - mean) / std).astype(np.float32)),
        torch.from_numpy(((test - mean) / std).astype(np.float32)),
    )


def _require_root(root: str, dataset: str) -> str:
    if not root:
        raise ValueError(
            f"Dataset {dataset!r} is read from files: a root folder is needed "
            "(set dataset.root to the folder holding the dataset)"
        )
    return os.path.expanduser(root)


# ----------------------------------------------------------------------------- loaders


def _load_digits(
    root: str, download: bool, image_size: int | None
) -> tuple[Dataset, Dataset, DataInfo]:
    """scikit-learn's 8x8 digits (ships with the package), fixed 80/20 stratified split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = (x.reshape(-1, 1, 8, 8) / 16.0).astype(np.float64)
    labels = y.astype(np.int64)
    train_idx, test_idx = stratified_split(labels, DIGITS_TEST_FRACTION, SPLIT_SEED)
    x_train, x_test = _normalize_by_train(images[train_idx], images[test_idx])
    train = ArrayDataset(x_train, labels[train_idx], image_size)
    test = ArrayDataset(x_test, labels[test_idx], image_size)
    info = DataInfo("digits", 10, 1, train.image_size, len(train), len(test))
    return train, test, info


def _load_synthetic(
    root: str, download: bool, image_size: int | None, size: int = 0
) -> tuple[Dataset, Dataset, DataInfo]:
    """Class prototypes plus Gaussian noise: tiny, fast and easy to learn (for tests and
    for federations of many clients: ``size`` training samples, default 800)."""
    num_classes, num_train, num_test, side = 10, size or SYNTHETIC_TRAIN_SIZE, 200, 8
    rng = np.random.default_rng(SYNTHETIC_SEED)
    prototypes = rng.normal(0.0, 1.0, size=(num_classes, 1, side, side))
    n = num_train + num_test
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    images = prototypes[labels] + rng.normal(0.0, 0.5, size=(n, 1, side, side))
    x_train, x_test = _normalize_by_train(images[:num_train], images[num_train:])
    train = ArrayDataset(x_train, labels[:num_train], image_size)
    test = ArrayDataset(x_test, labels[num_train:], image_size)
    info = DataInfo("synthetic", num_classes, 1, train.image_size, num_train, num_test)
    return train, test, info


def _load_cifar(
    name: str, root: str, download: bool, image_size: int | None
) -> tuple[Dataset, Dataset, DataInfo]:
    """CIFAR-10/100 through torchvision, normalized with the usual mean and std."""
    import torchvision
    from torchvision import transforms

    root = _require_root(root, name)
    if name == "cifar10":
        cls, mean, std = torchvision.datasets.CIFAR10, CIFAR10_MEAN, CIFAR10_STD
    else:
        cls, mean, std = torchvision.datasets.CIFAR100, CIFAR100_MEAN, CIFAR100_STD
    folder = os.path.join(root, cls.base_folder)
    expected = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [f for f in expected if not os.path.isfile(os.path.join(folder, f))]
    if missing and not download:
        raise FileNotFoundError(
            f"{name} files not found under root {root!r}: missing {missing} in {folder!r}. "
            "Set dataset.download=true (needs internet) or place the "
            f"{cls.base_folder!r} folder (the extracted python version) in that root."
        )

    size = 32 if image_size is None else int(image_size)
    steps: list[Any] = [] if size == 32 else [transforms.Resize((size, size))]
    transform = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])
    try:
        train_set = cls(root, train=True, transform=transform, download=download)
        test_set = cls(root, train=False, transform=transform, download=False)
    except RuntimeError as err:  # torchvision's md5 check failed
        raise ValueError(
            f"{name} files under root {root!r} failed torchvision's checksum check "
            f"(corrupted or partial copy?): {err}"
        ) from err

    train = LabeledSubset(train_set, np.arange(len(train_set)), np.asarray(train_set.targets))
    test = LabeledSubset(test_set, np.arange(len(test_set)), np.asarray(test_set.targets))
    info = DataInfo(name, len(train_set.classes), 3, size, len(train), len(test))
    return train, test, info


def _to_rgb(image: Any) -> Any:
    """Convert a PIL image to RGB (some Caltech-101 images are grayscale)."""
    return image.convert("RGB")


def _load_caltech101(
    root: str, download: bool, image_size: int | None
) -> tuple[Dataset, Dataset, DataInfo]:
    """Caltech-101 through torchvision, fixed 80/20 stratified split, resized, RGB."""
    import torchvision
    from torchvision import transforms

    root = _require_root(root, "caltech101")
    folder = os.path.join(root, "caltech101", "101_ObjectCategories")
    if not os.path.isdir(folder) and not download:
        raise FileNotFoundError(
            f"caltech101 files not found under root {root!r}: no folder {folder!r}. "
            "Set dataset.download=true (needs internet) or place the extracted "
            "'caltech101/101_ObjectCategories' folder in that root."
        )

    size = CALTECH101_IMAGE_SIZE if image_size is None else int(image_size)
    transform = transforms.Compose(
        [
            transforms.Lambda(_to_rgb),
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    full = torchvision.datasets.Caltech101(
        root, target_type="category", transform=transform, download=download
    )
    labels = np.asarray(full.y, dtype=np.int64)
    train_idx, test_idx = stratified_split(labels, CALTECH101_TEST_FRACTION, SPLIT_SEED)
    train = LabeledSubset(full, train_idx, labels[train_idx])
    test = LabeledSubset(full, test_idx, labels[test_idx])
    info = DataInfo("caltech101", len(full.categories), 3, size, len(train), len(test))
    return train, test, info


_LOADERS: dict[str, Callable[[str, bool, int | None], tuple[Dataset, Dataset, DataInfo]]] = {
    "digits": _load_digits,
    "synthetic": _load_synthetic,
    "cifar10": partial(_load_cifar, "cifar10"),
    "cifar100": partial(_load_cifar, "cifar100"),
    "caltech101": _load_caltech101,
}
