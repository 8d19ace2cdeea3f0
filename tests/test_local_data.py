"""A node's own data from node-config ``dataset-path``: an on-disk Hugging Face folder
or an image folder, written here (nothing downloads)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedunlearn.client import node_dataset
from fedunlearn.client.local_data import load_local_dataset


def ctx(**nc):
    return Context(run_id=1, node_id=1, node_config=nc, state=RecordDict(), run_config={})


def test_hugging_face_folder_with_train_and_test_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    rng = np.random.default_rng(0)
    def split(n):
        return Dataset.from_dict({"img": rng.integers(0, 256, (n, 8, 8), dtype=np.uint8).tolist(),
                                  "label": rng.integers(0, 3, n).tolist()})
    DatasetDict({"train": split(12), "test": split(4)}).save_to_disk(tmp_path / "hf")
    train, val = node_dataset(ctx(**{"dataset-path": str(tmp_path / "hf")}))
    assert len(train) == 12 and len(val) == 4
    x, y = train[3]
    assert x.shape == (1, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert y == int(train.targets[3])
    with pytest.raises(ValueError, match="no image column 'pixels'"):
        load_local_dataset(str(tmp_path / "hf"), image_column="pixels")


def test_image_folder_one_sub_folder_per_class(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    train, val = load_local_dataset(str(tmp_path / "imgs"))
    assert val is None and len(train) == 6 and list(train.targets) == [0, 0, 0, 1, 1, 1]
    assert train[5][0].shape == (3, 6, 6)


def test_missing_dataset_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="dataset-path"):
        node_dataset(ctx())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        node_dataset(ctx(**{"dataset-path": str(tmp_path / "nope")}))
