"""A local stand-in for ``uoft-cs/cifar10`` where the Hugging Face hub is unreachable.

Built the way the hub's data set is: a ``datasets.Dataset`` with an ``Image`` column
``img`` (32x32 RGB) and a ``ClassLabel`` column ``label`` (10 classes), in ``train`` and
``test`` splits, written as Parquet files that ``datasets.load_dataset(folder)`` and
``flwr_datasets.FederatedDataset(dataset=folder)`` read like a hub data set. The images
are scikit-learn's embedded digits (8x8, 1,797 of them) scaled up, so nothing downloads.

    python -m pytorchexample.standin /tmp/quickstart-data
    export QUICKSTART_DATASET=/tmp/quickstart-data
"""

import sys
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage
from sklearn.datasets import load_digits

TEST_SIZE = 297


def write_standin(folder: str) -> Path:
    """Write ``train.parquet`` and ``test.parquet`` under ``folder``; return it."""
    digits = load_digits()
    pixels = (digits.images * (255 / 16)).astype(np.uint8)
    images = [PILImage.fromarray(np.repeat(p[..., None], 3, axis=-1)).resize((32, 32))
              for p in pixels]
    features = Features({"img": Image(),
                         "label": ClassLabel(names=[str(i) for i in range(10)])})
    data = Dataset.from_dict({"img": images, "label": digits.target.tolist()},
                             features=features)
    splits = data.train_test_split(test_size=TEST_SIZE, seed=0)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        split.to_parquet(str(out / f"{name}.parquet"))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m pytorchexample.standin FOLDER")
    print(write_standin(sys.argv[1]))
