"""Tests of fedunlearn.harness.data: datasets, partitions, client splits, FederatedData."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fedunlearn.harness.data import (
    DATASETS,
    DataInfo,
    FederatedData,
    build_federated_data,
    client_split,
    load_dataset,
    partition_indices,
)


def _stack(dataset) -> tuple[torch.Tensor, np.ndarray]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), np.array(ys)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


# ----------------------------------------------------------------------------- datasets


def test_digits_shapes_sizes_and_normalization(digits) -> None:
    train, test, info = digits
    assert info == DataInfo("digits", 10, 1, 8, 1437, 360)
    assert (len(train), len(test)) == (1437, 360)
    x, y = train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8)
    assert type(y) is int
    for ds in (train, test):
        assert isinstance(ds.targets, np.ndarray) and ds.targets.dtype == np.int64
        assert len(ds.targets) == len(ds)
    xs, ys = _stack(train)
    np.testing.assert_array_equal(ys, train.targets)
    assert abs(xs.mean().item()) < 1e-4 and abs(xs.std().item() - 1.0) < 1e-3
    # stratified: every class in both splits, ~20% of it in test
    counts_train = np.bincount(train.targets, minlength=10)
    counts_test = np.bincount(test.targets, minlength=10)
    np.testing.assert_allclose(counts_test / (counts_train + counts_test), 0.2, atol=0.01)


def test_digits_split_is_fixed_across_calls(digits) -> None:
    train, test, _ = digits
    train2, test2, _ = load_dataset("digits")
    np.testing.assert_array_equal(train.targets, train2.targets)
    np.testing.assert_array_equal(test.targets, test2.targets)
    assert torch.equal(_stack(test)[0], _stack(test2)[0])


def test_digits_image_size_resizes() -> None:
    train, _, info = load_dataset("digits", image_size=16)
    assert info.image_size == 16 and train[3][0].shape == (1, 16, 16)


def test_synthetic_is_small_and_learnable() -> None:
    train, test, info = load_dataset("synthetic")
    assert info == DataInfo("synthetic", 10, 1, 8, 800, 200)
    assert np.array_equal(np.bincount(train.targets), np.bincount(load_dataset("synthetic")[0].targets))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    for _ in range(3):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    x_test, y_test = _stack(test)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1).numpy() == y_test).mean()
    assert accuracy > 0.9


def test_unknown_dataset_names_value_and_choices() -> None:
    with pytest.raises(ValueError, match="mnist") as err:
        load_dataset("mnist")
    assert all(name in str(err.value) for name in DATASETS)
    with pytest.raises(ValueError, match="-3"):
        load_dataset("digits", image_size=-3)


# ----------------------------------------------------------------------------- partitions


def test_iid_partitions_disjoint_covering_balanced(digits) -> None:
    labels = digits[0].targets
    parts = partition_indices(labels, 10, "iid", seed=0)
    assert len(parts) == 10
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert len(partition_indices(labels, 1)[0]) == len(labels)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_deterministic_in_seed(digits, scheme: str) -> None:
    labels = digits[0].targets
    a = partition_indices(labels, 10, scheme, alpha=0.5, seed=3)
    b = partition_indices(labels, 10, scheme, alpha=0.5, seed=3)
    c = partition_indices(labels, 10, scheme, alpha=0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def _label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each partition's and the global label mix."""
    k = labels.max() + 1
    overall = np.bincount(labels, minlength=k) / len(labels)
    return float(np.mean([
        0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - overall).sum() for p in parts
    ]))


def test_dirichlet_is_skewed_disjoint_and_covering(digits) -> None:
    labels = digits[0].targets
    parts = partition_indices(labels, 10, "dirichlet", alpha=0.1, seed=0)
    assert all(len(p) > 0 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    iid_skew = _label_skew(labels, partition_indices(labels, 10, "iid"))
    assert iid_skew < 0.1
    assert _label_skew(labels, parts) > 0.4
    assert _label_skew(labels, parts) > _label_skew(
        labels, partition_indices(labels, 10, "dirichlet", alpha=100.0)
    )


def test_dirichlet_many_clients_on_small_dataset_terminates(digits) -> None:
    parts = partition_indices(digits[0].targets, 100, "dirichlet", alpha=0.5, seed=0)
    assert len(parts) == 100 and min(len(p) for p in parts) >= 1


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"scheme": "pathological"}, "pathological"),
        ({"num_partitions": 0}, r"got 0\b"),
        ({"num_partitions": 21}, "got 21"),
        ({"alpha": 0.0}, "got 0.0"),
        ({"alpha": -2.5}, "got -2.5"),
    ],
)
def test_partition_bad_inputs(kwargs: dict, bad: str) -> None:
    args = {"labels": np.arange(20) % 4, "num_partitions": 2, **kwargs}
    with pytest.raises(ValueError, match=bad) as err:
        partition_indices(**args)
    if "scheme" in kwargs:
        assert "iid" in str(err.value) and "dirichlet" in str(err.value)


# ----------------------------------------------------------------------------- client split


def test_client_split_80_20_deterministic() -> None:
    indices = np.arange(1000, 1100)
    train, val = client_split(indices, seed=1)
    assert (len(train), len(val)) == (80, 20)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), indices)
    train2, val2 = client_split(indices, seed=1)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(val, val2)
    assert not np.array_equal(val, client_split(indices, seed=2)[1])
    assert len(client_split(indices, val_fraction=0.0)[1]) == 0


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_client_split_bad_fraction(bad: float) -> None:
    with pytest.raises(ValueError, match=f"got {bad}"):
        client_split(np.arange(10), val_fraction=bad)


# ----------------------------------------------------------------------------- FederatedData


def test_federated_data_splits_inside_partitions() -> None:
    fed = build_federated_data("digits", 10, "dirichlet", alpha=0.5, seed=0)
    assert isinstance(fed, FederatedData) and fed.num_clients() == 10
    assert fed.info.num_train == len(fed.train) == 1437
    for pid in range(fed.num_clients()):
        train, val = fed.train_indices(pid), fed.val_indices(pid)
        assert len(np.intersect1d(train, val)) == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), fed.partitions[pid])
        assert len(val) == round(0.2 * len(fed.partitions[pid]))
        np.testing.assert_array_equal(train, fed.train_indices(pid))
    # memoized: Flower ClientApps call this on every message
    assert build_federated_data("digits", 10, "dirichlet", alpha=0.5, seed=0) is fed
    resized = build_federated_data("digits", 10, "dirichlet", alpha=0.5, seed=0, image_size=16)
    assert resized.info.image_size == 16 and resized.train[0][0].shape == (1, 16, 16)
    assert all(np.array_equal(a, b) for a, b in zip(resized.partitions, fed.partitions))


@pytest.mark.parametrize("bad", [10, -1])
def test_federated_data_bad_partition_id(bad: int) -> None:
    fed = build_federated_data("digits", 10)
    with pytest.raises(ValueError, match=rf"{bad}.*0\.\.9"):
        fed.train_indices(bad)


def test_build_federated_data_bad_inputs() -> None:
    with pytest.raises(ValueError, match="nope"):
        build_federated_data("nope", 10)
    with pytest.raises(ValueError, match="1.0"):
        build_federated_data("synthetic", 10, val_fraction=1.0)
    with pytest.raises(ValueError, match="5000"):
        build_federated_data("synthetic", 5000)


# ----------------------------------------------------------------------------- torchvision formats


def _write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` CIFAR rows: uint8, 3072 values each (R plane, G plane, B plane)."""
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


@pytest.fixture
def skip_cifar_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our tiny files cannot match the real md5 sums: check only that they exist."""
    import torchvision.datasets.cifar

    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )


def _write_cifar10(root: Path) -> tuple[list[int], list[int]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_labels: list[int] = []
    for i in range(1, 6):
        labels = [int(v) for v in rng.integers(0, 10, 4)]
        data = _images(rng, 4)
        if i == 1:
            data[0] = 255  # a white image: known normalized value
        _write_pickle(folder / f"data_batch_{i}", {
            "batch_label": f"training batch {i} of 5", "labels": labels, "data": data,
            "filenames": [f"img_{i}_{j}.png" for j in range(4)],
        })
        train_labels += labels
    test_labels = [3, 1, 4]
    _write_pickle(folder / "test_batch", {
        "batch_label": "testing batch 1 of 1", "labels": test_labels, "data": _images(rng, 3),
        "filenames": ["t0.png", "t1.png", "t2.png"],
    })
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _write_pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": 4, "num_vis": 3072})
    return train_labels, test_labels


def test_cifar10_tiny_files(tmp_path: Path, skip_cifar_md5: None) -> None:
    train_labels, test_labels = _write_cifar10(tmp_path)
    train, test, info = load_dataset("cifar10", root=str(tmp_path))
    assert info == DataInfo("cifar10", 10, 3, 32, 20, 3)
    np.testing.assert_array_equal(train.targets, train_labels)
    np.testing.assert_array_equal(test.targets, test_labels)
    assert train.targets.dtype == np.int64
    x, y = train[0]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and type(y) is int
    assert y == train_labels[0]
    expected = (1.0 - torch.tensor([0.4914, 0.4822, 0.4465])) / torch.tensor([0.2470, 0.2435, 0.2616])
    torch.testing.assert_close(x[:, 5, 7], expected)
    resized, _, info16 = load_dataset("cifar10", root=str(tmp_path), image_size=16)
    assert info16.image_size == 16 and resized[1][0].shape == (3, 16, 16)


def test_cifar100_tiny_files(tmp_path: Path, skip_cifar_md5: None) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    fine_train, fine_test = [0, 57, 99, 12, 57], [99, 3]
    for name, fine in (("train", fine_train), ("test", fine_test)):
        _write_pickle(folder / name, {
            "filenames": [f"{name}{j}.png" for j in range(len(fine))], "batch_label": name,
            "fine_labels": fine, "coarse_labels": [f % 20 for f in fine], "data": _images(rng, len(fine)),
        })
    _write_pickle(folder / "meta", {
        "fine_label_names": [f"fine{i}" for i in range(100)],
        "coarse_label_names": [f"coarse{i}" for i in range(20)],
    })
    train, test, info = load_dataset("cifar100", root=str(tmp_path))
    assert info == DataInfo("cifar100", 100, 3, 32, 5, 2)
    np.testing.assert_array_equal(train.targets, fine_train)
    assert test[0][1] == 99 and test[0][0].shape == (3, 32, 32)


def test_cifar_missing_files_and_empty_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", root=str(tmp_path))
    message = str(err.value)
    assert str(tmp_path) in message and "dataset.download=true" in message
    assert "cifar-10-batches-py" in message
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", root=str(tmp_path))
    with pytest.raises(ValueError, match="root"):
        load_dataset("cifar10", root="")


def test_cifar_checksum_mismatch_is_explained(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)  # real md5 check, not patched: tiny files fail it
    with pytest.raises(ValueError, match="checksum") as err:
        load_dataset("cifar10", root=str(tmp_path))
    assert str(tmp_path) in str(err.value)


def _write_caltech101(root: Path, per_class: int = 5) -> list[str]:
    from PIL import Image

    objects = root / "caltech101" / "101_ObjectCategories"
    classes = ["accordion", "airplanes", "Faces_easy"]
    rng = np.random.default_rng(0)
    for name in ["BACKGROUND_Google", *classes]:
        (objects / name).mkdir(parents=True)
        for j in range(1, per_class + 1):
            h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
            if name == "Faces_easy" and j == 1:  # some Caltech-101 images are grayscale
                img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
            else:
                img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")
            img.save(objects / name / f"image_{j:04d}.jpg")
    return sorted(classes)  # torchvision's label order: "Faces_easy" (upper case) first


def test_caltech101_tiny_files(tmp_path: Path) -> None:
    classes = _write_caltech101(tmp_path)
    train, test, info = load_dataset("caltech101", root=str(tmp_path))
    assert info == DataInfo("caltech101", 3, 3, 64, 12, 3)
    assert sorted(test.targets.tolist()) == [0, 1, 2]  # stratified: one per class
    assert len(np.intersect1d(train.indices, test.indices)) == 0
    for ds in (train, test):
        assert ds.targets.dtype == np.int64 and len(ds.targets) == len(ds)
    assert classes[0] == "Faces_easy"
    for ds in (train, test):  # all items load, the grayscale one as RGB too
        xs, ys = _stack(ds)
        assert xs.shape == (len(ds), 3, 64, 64) and xs.dtype == torch.float32
        np.testing.assert_array_equal(ys, ds.targets)
    train2, test2, _ = load_dataset("caltech101", root=str(tmp_path), image_size=32)
    np.testing.assert_array_equal(test.indices, test2.indices)  # fixed split
    assert train2[0][0].shape == (3, 32, 32)


def test_caltech101_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("caltech101", root=str(tmp_path))
    assert str(tmp_path) in str(err.value) and "dataset.download=true" in str(err.value)
    assert "101_ObjectCategories" in str(err.value)
    assert not (tmp_path / "caltech101").exists()  # no side effects on the user's folder
    with pytest.raises(ValueError, match="root"):
        load_dataset("caltech101")


def test_the_known_training_sizes_match_the_loaded_data():
    """federation.num-clients is bounded before any data is loaded by these sizes."""
    from fedunlearn.harness.data import DATASET_TRAIN_SIZES

    for name in ("digits", "synthetic"):
        train, _, info = load_dataset(name)
        assert DATASET_TRAIN_SIZES[name] == len(train) == info.num_train


def test_synthetic_data_has_a_size_setting_for_many_clients():
    from fedunlearn.harness.config import ExperimentConfig
    from fedunlearn.harness.data import load_dataset
    from tests.helpers import run_config

    default_train, default_test, info = load_dataset("synthetic")
    assert (len(default_train), len(default_test), info.num_train) == (800, 200, 800)
    same, _, _ = load_dataset("synthetic", size=800)  # the default size is the same draw
    assert np.array_equal(np.asarray(same.targets), np.asarray(default_train.targets))
    big, test, info = load_dataset("synthetic", size=20_000)
    assert (len(big), len(test), info.num_train) == (20_000, 200, 20_000)
    with pytest.raises(ValueError, match="dataset.size=5 applies to synthetic only"):
        load_dataset("digits", size=5)
    # 1,000 clients need more than synthetic's 800 samples: the size setting gives them.
    rc = run_config(**{"dataset.name": "synthetic", "federation.num-clients": 1000})
    with pytest.raises(ValueError, match="federation.num-clients=1000: synthetic has 800"):
        ExperimentConfig.from_run_config(rc)
    cfg = ExperimentConfig.from_run_config({**rc, "dataset.size": 20_000})
    assert cfg.data_size == 20_000
    with pytest.raises(ValueError, match="dataset.size=100 applies to synthetic only"):
        ExperimentConfig.from_run_config(run_config(**{"dataset.size": 100}))
    with pytest.raises(ValueError, match="dataset.size"):
        ExperimentConfig.from_run_config({**rc, "dataset.size": -1})
    # Without a size the pretraining cache key is what it always was.
    base = ExperimentConfig.from_run_config(run_config(**{"dataset.name": "synthetic"}))
    sized = ExperimentConfig.from_run_config(run_config(**{"dataset.name": "synthetic",
                                                           "dataset.size": 900}))
    assert base.pretrain_key() == "cb281f572aa2284a"  # as before the setting existed
    assert sized.pretrain_key() != base.pretrain_key()
