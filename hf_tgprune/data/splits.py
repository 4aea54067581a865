"""Splits and samples: validation carved from train (stratified), the test split kept for the final report, and
the one seeded sampler that draws calibration images (the recipe and `TeacherGuidedPruningTrainer` use it alike).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from .loading import LABEL_COLUMN, TEST_SPLIT_CANDIDATES, DataError

logger = logging.getLogger(__name__)


@dataclass
class DataSplits:
    train: Any
    validation: Any | None
    test: Any


def _carve(dataset, n_out: int, seed: int):
    """(rest, n_out examples) split deterministically; stratified by label when every class can be."""
    import datasets

    stratify = None
    feature = dataset.features.get(LABEL_COLUMN)
    if isinstance(feature, datasets.ClassLabel):
        counts = np.bincount(np.asarray(dataset[LABEL_COLUMN]), minlength=feature.num_classes)
        present = int((counts > 0).sum())
        if counts[counts > 0].min() >= 2 and present <= n_out <= len(dataset) - present:
            stratify = LABEL_COLUMN
    parts = dataset.train_test_split(test_size=n_out, seed=seed, stratify_by_column=stratify)
    return parts["train"], parts["test"]


def _count(n_total: int, percentage: float, flag: str) -> int:
    if not 0 <= percentage < 100:
        raise DataError(f"{flag} must be in [0, 100); got {percentage}.")
    return 0 if percentage == 0 else max(1, round(n_total * percentage / 100))


def split_train_validation(dataset, validation_split_percentage: float, seed: int = 42):
    """(train, validation) carved deterministically from `dataset`; stratified by label when possible.

    `validation_split_percentage` is in [0, 100); 0 returns `(dataset, None)`.
    """
    n_validation = _count(len(dataset), validation_split_percentage, "--validation_split_percentage")
    if n_validation == 0:
        return dataset, None
    if n_validation >= len(dataset):
        raise DataError(
            f"A {validation_split_percentage}% validation split of {len(dataset)} examples leaves none to train on."
        )
    return _carve(dataset, n_validation, seed)


def resolve_splits(
    dataset_dict,
    validation_split_percentage: float = 10.0,
    seed: int = 42,
    train_split: str = "train",
    test_split: str | None = None,
) -> DataSplits:
    """Train / validation / test: validation always carved from train, test from the dataset's own test split.

    `test_split=None` takes the first of `TEST_SPLIT_CANDIDATES` that exists; a dataset with a train split
    only gets its test split carved from train as well (same percentage of the train split, at least
    10%), with a warning.
    """
    available = list(dataset_dict)
    if train_split not in dataset_dict:
        raise DataError(f"No {train_split!r} split in this dataset; available splits: {available}.")
    train = dataset_dict[train_split]
    if test_split is not None and test_split not in dataset_dict:
        raise DataError(f"--test_split {test_split!r} is not a split of this dataset; available: {available}.")
    if test_split is None:
        test_split = next((s for s in TEST_SPLIT_CANDIDATES if s in dataset_dict and s != train_split), None)
    if test_split is None:
        logger.warning("The dataset has no test split; carving one from %r (seed %d).", train_split, seed)
        n_validation = _count(len(train), validation_split_percentage, "--validation_split_percentage")
        n_test = _count(len(train), max(10.0, validation_split_percentage), "test percentage")
        if n_validation + n_test >= len(train):
            raise DataError(f"{len(train)} training examples are too few to carve validation and test splits.")
        train, test = _carve(train, n_test, seed=seed + 1)
        if n_validation == 0:
            return DataSplits(train=train, validation=None, test=test)
        train, validation = _carve(train, n_validation, seed=seed)
        return DataSplits(train=train, validation=validation, test=test)
    test = dataset_dict[test_split]
    train, validation = split_train_validation(train, validation_split_percentage, seed=seed)
    return DataSplits(train=train, validation=validation, test=test)


def limit_samples(dataset, max_samples: int | None, seed: int | None = None):
    """The first `max_samples` examples (after a seeded shuffle when `seed` is given); all when None."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    if max_samples <= 0:
        raise DataError(f"max samples must be positive; got {max_samples}.")
    if seed is not None:
        indices = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:max_samples])
        return dataset.select(indices)
    return dataset.select(range(max_samples))


def deterministic_sample(dataset, num_samples: int, seed: int):
    """`num_samples` examples of `dataset` drawn by a seeded torch permutation (the whole set if it is smaller).

    The one calibration sampler: `TeacherGuidedPruningTrainer` draws its calibration images with it, and so does
    `sample_calibration` (the recipe), so the same seed gives the same images in the same order either way.
    """
    if len(dataset) <= num_samples:
        return dataset
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_samples].tolist()
    return dataset.select(indices) if hasattr(dataset, "select") else Subset(dataset, indices)


def sample_calibration(train_part, num_samples: int, seed: int = 42):
    """A deterministic random sample of `num_samples` examples from the training part (all if it is smaller).

    Draw it from the training part returned by `split_train_validation`/`resolve_splits`, never from the
    validation or test data: the scores must not see the data the pruned model is judged on.
    """
    if num_samples <= 0:
        raise DataError(f"--num_calibration_samples must be positive; got {num_samples}.")
    if len(train_part) == 0:
        raise DataError("The training split is empty; there is nothing to calibrate the pruning scores on.")
    return deterministic_sample(train_part, num_samples, seed)
