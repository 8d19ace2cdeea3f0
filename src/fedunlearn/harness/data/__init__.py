"""Datasets, their federated partitions and per-client train/val splits."""

from fedunlearn.harness.data.datasets import (
    DATASET_SHAPES,
    DATASET_TRAIN_SIZES,
    DATASETS,
    ArrayDataset,
    DataInfo,
    LabeledSubset,
    load_dataset,
    stratified_split,
)
from fedunlearn.harness.data.federated import FederatedData, build_federated_data, federated_data
from fedunlearn.harness.data.partition import PARTITIONING_SCHEMES, client_split, partition_indices

__all__ = [
    "DATASETS",
    "DATASET_SHAPES",
    "DATASET_TRAIN_SIZES",
    "PARTITIONING_SCHEMES",
    "ArrayDataset",
    "DataInfo",
    "FederatedData",
    "LabeledSubset",
    "build_federated_data",
    "federated_data",
    "client_split",
    "load_dataset",
    "partition_indices",
    "stratified_split",
]
