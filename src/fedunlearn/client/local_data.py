"""A node's own data on its own disk: node-config ``dataset-path``.

Flower's examples name a SuperNode's local data with node-config ``dataset-path`` and
load it with Hugging Face ``datasets.load_from_disk``. :func:`load_local_dataset` reads

* an on-disk Hugging Face ``datasets`` folder (``Dataset.save_to_disk``; a
  ``DatasetDict`` uses its ``train`` split, and ``validation``/``val``/``test`` as the
  validation set when present), with the image and label columns configurable
  (defaults: the first of ``img``, ``image``, ``pixel_values``, ``x`` and of
  ``label``, ``labels``, ``fine_label``, ``y``);
* an image folder: one sub-folder per class (``<path>/<class>/<file>``), classes sorted
  by name, read with Pillow; a ``train``/``val`` pair of such folders when present.

Images become float tensors in ``[0, 1]``, channels first. The result yields ``(x, y)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_COLUMNS = ("img", "image", "pixel_values", "x")
LABEL_COLUMNS = ("label", "labels", "fine_label", "y")
VAL_SPLITS = ("validation", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class TableDataset(Dataset):
    """A Hugging Face ``datasets.Dataset`` as ``(x, y)`` pairs."""

    def __init__(self, table, image_column: str, label_column: str) -> None:
        self.table, self.image_column, self.label_column = table, image_column, label_column
        self.targets = np.asarray(table[label_column], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int):
        return to_tensor(self.table[int(i)][self.image_column]), int(self.targets[i])


class ImageFolderDataset(Dataset):
    """``<root>/<class>/<image>`` as ``(x, y)`` pairs (classes sorted by name)."""

    def __init__(self, root: Path, classes: list[str] | None = None) -> None:
        self.classes = classes or sorted(d.name for d in root.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(f"dataset-path {root}: no class sub-folders")
        self.files, targets = [], []
        for label, name in enumerate(self.classes):
            folder = root / name
            for f in sorted(folder.iterdir()) if folder.is_dir() else []:
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    self.files.append(f)
                    targets.append(label)
        if not self.files:
            raise ValueError(f"dataset-path {root}: no images ({', '.join(IMAGE_SUFFIXES)})")
        self.targets = np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.files[int(i)]) as img:
            return to_tensor(img.copy()), int(self.targets[i])


def to_tensor(value) -> torch.Tensor:
    """An image (PIL, array, nested list) as a float tensor, channels first, in [0, 1]
    for 8-bit data."""
    if hasattr(value, "mode") and hasattr(value, "size"):  # PIL
        value = np.asarray(value)
    array = np.asarray(value)
    scale = 255.0 if np.issubdtype(array.dtype, np.integer) else 1.0  # 8-bit pixels
    tensor = torch.as_tensor(array.astype(np.float32) / scale)
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    elif tensor.ndim == 3 and tensor.shape[-1] in (1, 3, 4) and tensor.shape[0] not in (1, 3, 4):
        tensor = tensor.permute(2, 0, 1)
    return tensor.contiguous()


def load_local_dataset(path: str, image_column: str = "", label_column: str = ""
                       ) -> tuple[Dataset, Dataset | None]:
    """``(train, val)`` from a node's ``dataset-path`` (``val`` may be ``None``)."""
    root = Path(str(path)).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"dataset-path={str(path)!r} does not exist on this node")
    if (root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists():
        from datasets import DatasetDict, load_from_disk

        loaded = load_from_disk(str(root))
        if isinstance(loaded, DatasetDict):
            if "train" not in loaded:
                raise ValueError(f"dataset-path {root}: a DatasetDict without a 'train' split "
                                 f"(splits: {list(loaded)})")
            train = loaded["train"]
            val = next((loaded[s] for s in VAL_SPLITS if s in loaded), None)
        else:
            train, val = loaded, None
        image = _column(train.column_names, image_column, IMAGE_COLUMNS, "image", root)
        label = _column(train.column_names, label_column, LABEL_COLUMNS, "label", root)
        return (TableDataset(train, image, label),
                TableDataset(val, image, label) if val is not None else None)
    if (root / "train").is_dir():
        train = ImageFolderDataset(root / "train")
        val_dir = next((root / s for s in VAL_SPLITS if (root / s).is_dir()), None)
        return train, ImageFolderDataset(val_dir, train.classes) if val_dir else None
    return ImageFolderDataset(root), None


def _column(columns, wanted: str, defaults, what: str, root) -> str:
    if wanted:
        if wanted not in columns:
            raise ValueError(f"dataset-path {root}: no {what} column {wanted!r} (columns: "
                             f"{columns})")
        return wanted
    for name in defaults:
        if name in columns:
            return name
    raise ValueError(f"dataset-path {root}: no {what} column among {list(defaults)} (columns: "
                     f"{columns}); name it with the node-config's {what}-column")


__all__ = ["ImageFolderDataset", "TableDataset", "load_local_dataset", "to_tensor"]
