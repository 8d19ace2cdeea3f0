"""The user's data as :func:`fedunlearn.client.attach` receives it, read one way.

Flower apps hold their data in three shapes, and ``attach(data=...)`` takes each:

* a map-style dataset yielding ``(x, y)`` (a torchvision dataset, a ``TensorDataset``);
* a ``torch.utils.data.DataLoader`` (what Flower's ``load_data`` returns): its
  ``dataset`` is the data, and its ``batch_size``, ``collate_fn`` and ``drop_last`` are
  kept for the loaders fedunlearn builds for the user's ``train_fn``;
* a dataset with dict samples: a Hugging Face ``datasets.Dataset`` (a ``flwr-datasets``
  partition, ``with_transform`` or not) or any map-style dataset yielding dicts. Its image
  and label columns are named by ``image_key`` / ``label_key``, or found from the
  dataset's ``features`` (one ``Image``/array column, one ``ClassLabel`` column) or,
  without features, from the first sample (one array value, one integer value).

:class:`UserData` holds the dataset as the user has it (``raw``: the user's ``train_fn``
gets batches of it, unchanged) and ``samples``, the one accessor through which
fedunlearn's own loops (accuracy, membership features, its SGD, the methods' steps) read
``(x, y)``: ``raw`` itself when it yields pairs, else :class:`Samples` over it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from .local_data import to_tensor

ARRAY_FEATURES = ("Image", "Array2D", "Array3D", "Array4D", "Array5D", "Sequence", "List",
                  "LargeList")


@dataclass(frozen=True)
class LoaderOptions:
    """What a user's DataLoader sets that their ``train_fn`` may rely on."""

    batch_size: int | None = None
    collate_fn: object = None
    drop_last: bool = False


@dataclass
class UserData:
    """One of the user's datasets: ``raw`` as they hold it, ``samples`` yielding
    ``(x, y)``, the dict keys (``None`` for pair samples) and the user's loader options
    (``None`` when they passed a dataset, not a DataLoader)."""

    raw: Dataset
    samples: Dataset
    image_key: str | None = None
    label_key: str | None = None
    loader: LoaderOptions | None = None

    def __len__(self) -> int:
        return len(self.raw)

    def labels(self) -> np.ndarray:
        """Every sample's label, read without touching images where the data allows:
        a Hugging Face column, a ``targets`` attribute, else the samples."""
        if self.label_key is None:
            targets = getattr(self.raw, "targets", None)
            if targets is not None:
                return np.asarray(targets, dtype=np.int64)
            return np.asarray([int(self.raw[i][1]) for i in range(len(self.raw))],
                              dtype=np.int64)
        if self.label_key in (getattr(self.raw, "column_names", None) or ()):
            # The column alone, past any with_transform (which may need every column).
            column = self.raw.with_format("numpy")[self.label_key]
            return np.asarray(column[:], dtype=np.int64)
        return np.asarray([int(self.raw[i][self.label_key]) for i in range(len(self.raw))],
                          dtype=np.int64)

    def class_count(self) -> int | None:
        """The ``ClassLabel``'s number of classes, when the data has one."""
        feature = (getattr(self.raw, "features", None) or {}).get(self.label_key or "")
        return int(feature.num_classes) if _kind(feature) == "ClassLabel" else None


class Samples(Dataset):
    """A dataset with dict samples as ``(x, y)`` pairs: ``x`` is ``sample[image_key]``
    as a tensor (PIL images and arrays converted with :func:`.local_data.to_tensor`),
    ``y`` is ``int(sample[label_key])``."""

    def __init__(self, raw: Dataset, image_key: str, label_key: str) -> None:
        self.raw, self.image_key, self.label_key = raw, image_key, label_key

    def __len__(self) -> int:
        return len(self.raw)

    def pair(self, sample: Mapping) -> tuple[torch.Tensor, int]:
        x = sample[self.image_key]
        return (x if isinstance(x, torch.Tensor) else to_tensor(x)), int(sample[self.label_key])

    def __getitem__(self, i: int):
        return self.pair(self.raw[int(i)])

    def __getitems__(self, indices: list) -> list:
        fetch = getattr(self.raw, "__getitems__", None)
        if fetch is None:
            return [self[i] for i in indices]
        return [self.pair(s) for s in fetch([int(i) for i in indices])]


def user_data(value, name: str, image_key: str | None = None,
              label_key: str | None = None) -> UserData:
    """``value`` (a dataset or a DataLoader, passed as argument ``name``) read as
    :class:`UserData`; a clear error naming ``name`` when it is none of the shapes the
    module docstring lists."""
    raw, loader = value, None
    if isinstance(value, DataLoader):
        raw = value.dataset
        loader = LoaderOptions(value.batch_size, value.collate_fn, bool(value.drop_last))
    what = f"a DataLoader over {type(raw).__name__}" if loader else type(raw).__name__
    if isinstance(raw, (IterableDataset, str, bytes)) or not (hasattr(raw, "__getitem__")
                                                              and hasattr(raw, "__len__")):
        raise TypeError(f"{name}: expected a map-style dataset (with __getitem__ and __len__: "
                        f"(x, y) or dict samples) or a DataLoader over one, got {what}")
    if len(raw) == 0:
        if image_key or label_key:
            return UserData(raw, Samples(raw, image_key or "", label_key or ""), image_key,
                            label_key, loader)
        return UserData(raw, raw, loader=loader)
    first = raw[0]
    if isinstance(first, Mapping):
        image, label = sample_keys(raw, first, name, image_key, label_key)
        return UserData(raw, Samples(raw, image, label), image, label, loader)
    if image_key or label_key:
        raise TypeError(f"image_key / label_key name the columns of dict samples, and {name} "
                        f"({what}) yields {type(first).__name__} samples: leave them out")
    if not isinstance(first, (tuple, list)) or len(first) != 2:
        shown = (f"{type(first).__name__} of length {len(first)}"
                 if isinstance(first, (tuple, list)) else type(first).__name__)
        where = f" from {what}" if loader else ""
        raise TypeError(f"{name}: expected samples (x, y) or dicts, got {shown}{where}")
    return UserData(raw, raw, loader=loader)


def sample_keys(raw, first: Mapping, name: str, image_key: str | None,
                label_key: str | None) -> tuple[str, str]:
    """The image and label keys of dict samples: as given, else from the dataset's
    ``features``, else from the first sample's values."""
    keys = list(first)
    for arg, key in (("image_key", image_key), ("label_key", label_key)):
        if key is not None and key not in first:
            raise KeyError(f"{arg}={key!r}: {name}'s samples have no such key (keys: {keys})")
    # The features where they name a column the samples have (a with_transform may
    # rename or add keys), else the first sample's values.
    features = {k: v for k, v in (getattr(raw, "features", None) or {}).items() if k in first}
    by_values = {"image": [k for k, v in first.items() if _is_array(v)],
                 "label": [k for k, v in first.items() if _is_label(v)]}
    by_features = {"image": [k for k, f in features.items() if _kind(f) in ARRAY_FEATURES],
                   "label": [k for k, f in features.items() if _kind(f) == "ClassLabel"]}
    found = {role: by_features[role] or by_values[role] for role in by_values}
    basis = {role: "features" if by_features[role] else "first sample" for role in by_values}
    seen = ", ".join(f"{k}: {_kind(features[k]) if k in features else type(v).__name__}"
                     for k, v in first.items())
    chosen = []
    for role, given in (("image", image_key), ("label", label_key)):
        if given is not None:
            chosen.append(given)
            continue
        candidates = [k for k in found[role] if k not in chosen]
        if len(candidates) != 1:
            which = (f"several {role} columns ({', '.join(candidates)})" if candidates
                     else f"no {role} column")
            raise ValueError(f"{name}: dict samples with {which} by the dataset's "
                             f"{basis[role]} "
                             f"({seen}); name it with attach(..., {role}_key=...)")
        chosen.append(candidates[0])
    return chosen[0], chosen[1]


def _kind(feature) -> str:
    return type(feature).__name__


def _is_array(value) -> bool:
    if hasattr(value, "mode") and hasattr(value, "size"):  # a PIL image
        return True
    return isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim >= 1


def _is_label(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return (isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0
            and not (value.dtype.is_floating_point if isinstance(value, torch.Tensor)
                     else np.issubdtype(value.dtype, np.floating)))


def split_returned(returned, val_data) -> tuple[object, object]:
    """What ``data(context)`` returned, as ``(train, val)``: one dataset or DataLoader;
    ``(train, val)`` (Flower's ``load_data``: ``(trainloader, testloader)``, the second
    the node's validation set); or a ``DatasetDict`` with a ``train`` split and a
    ``validation``, ``val`` or ``test`` one."""
    if isinstance(returned, tuple):
        if len(returned) != 2:
            raise ValueError(f"data: data(context) returned a tuple of {len(returned)}; "
                             "expected a dataset, a DataLoader or (train, val)")
        train, val = returned
    elif isinstance(returned, Mapping) and "train" in returned:
        train = returned["train"]
        val = next((returned[k] for k in ("validation", "val", "test") if k in returned), None)
    else:
        return returned, val_data
    if val is not None and val_data is not None:
        raise ValueError("val_data: given to attach() while data(context) also returns a "
                         "validation set; keep one of them")
    return train, val if val is not None else val_data


def retained_loader(data: UserData | None, dataset: Dataset, ids: list[int],
                    batch_size: int, seed: int) -> DataLoader:
    """A shuffled (``seed``) DataLoader over ``ids`` of the user's training set as they
    hold it (``data.raw``), with their DataLoader's batch size, ``collate_fn`` and
    ``drop_last``: the batches their ``train_fn`` reads, without the forgotten samples.
    ``data=None`` (a view built without :class:`UserData`): batches of ``dataset``."""
    options = (data.loader if data is not None else None) or LoaderOptions()
    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(Subset(data.raw if data is not None else dataset, list(ids)),
                      batch_size=options.batch_size or batch_size, shuffle=True,
                      generator=generator, collate_fn=options.collate_fn,
                      drop_last=options.drop_last)


def check_labels(value, n_train: int, n_val: int) -> np.ndarray:
    """``attach(labels=...)`` as an int64 array: one non-negative class index per
    sample, training then validation; a clear error naming ``labels`` otherwise."""
    expected = (f"one non-negative integer class index per sample, {n_train + n_val} in all "
                f"({n_train} training then {n_val} validation), as a 1-D sequence")
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__"):
        raise TypeError(f"labels: expected {expected}, got {type(value).__name__}")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as err:  # ragged or mixed: say so in our own words
        raise TypeError(f"labels: expected {expected}, got a {type(value).__name__} that "
                        f"is not a flat array ({err})") from None
    if array.shape != (n_train + n_val,):
        raise ValueError(f"labels: expected {expected}, got shape {array.shape}")
    if array.size and array.dtype.kind not in "iu" and not (
            array.dtype.kind == "f" and np.all(np.isfinite(array))
            and np.all(array == np.round(array))):
        raise TypeError(f"labels: expected {expected}, got values of type {array.dtype} "
                        f"(first: {array.reshape(-1)[0]!r})")
    array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise ValueError(f"labels: expected {expected}, got {int(array.min())} at position "
                         f"{int(np.argmin(array))}")
    return array


__all__ = ["LoaderOptions", "Samples", "UserData", "check_labels", "retained_loader",
           "sample_keys", "split_returned", "user_data"]
