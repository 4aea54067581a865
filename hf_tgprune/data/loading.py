"""Loading image-classification datasets: a `DatasetDict` from a Hub id, a local dataset folder (the layout
`load_dataset` reads, e.g. a copy of `uoft-cs/cifar10`) or an `imagefolder` tree, with the image and label columns
found automatically (or given) and renamed to `image` / `label` (a `ClassLabel`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.registry import Registry
from ..core.utils import is_local_path

logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"

# Columns tried, in order, when the image / label column is not given (after the `Image` / `ClassLabel`
# feature type). CIFAR-100 has `fine_label` and `coarse_label`: the fine labels are the benchmark.
IMAGE_COLUMN_CANDIDATES: tuple[str, ...] = ("image", "img", "images", "picture", "photo", "pixel_values")
LABEL_COLUMN_CANDIDATES: tuple[str, ...] = (
    "label",
    "labels",
    "fine_label",
    "label_id",
    "class",
    "class_id",
    "category",
    "target",
)
TEST_SPLIT_CANDIDATES: tuple[str, ...] = ("test", "validation", "valid", "val")


class DataError(ValueError):
    """A dataset, split or column that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class DatasetPreset:
    """Known column names of a dataset (used when the user gives none)."""

    image_column: str | None = None
    label_column: str | None = None


DATASET_PRESETS: Registry[DatasetPreset] = Registry("dataset preset")


def register_dataset_preset(name: str, image_column: str | None = None, label_column: str | None = None) -> None:
    """Register the image and label columns of a dataset by name (a name can be registered once)."""
    DATASET_PRESETS.register(name, DatasetPreset(image_column, label_column))


for _name in ("uoft-cs/cifar10", "cifar10"):
    register_dataset_preset(_name, "img", "label")
for _name in ("uoft-cs/cifar100", "cifar100"):
    register_dataset_preset(_name, "img", "fine_label")
register_dataset_preset("zh-plus/tiny-imagenet", "image", "label")


def _load_dataset_dict(dataset_name: str, dataset_config: str | None, data_dir: str | None, **kwargs: Any):
    import datasets

    if is_local_path(dataset_name) and dataset_name != "imagefolder":
        path = os.path.expanduser(dataset_name)
        if not os.path.exists(path):
            raise DataError(f"--dataset_name {dataset_name!r}: no such file or folder ({os.path.abspath(path)}).")
        if os.path.isdir(path) and not any(os.scandir(path)):
            raise DataError(f"--dataset_name {dataset_name!r} is an empty folder; it holds no images or data files.")
        if os.path.isfile(path):  # one data file: its format from the extension, every row in the train split
            builder = _FILE_BUILDERS.get(os.path.splitext(path)[1].lower().lstrip("."))
            if builder is None:
                raise DataError(
                    f"--dataset_name {dataset_name!r} is a file of a format load_dataset cannot read; pass a folder, "
                    f"or a {', '.join(sorted(_FILE_BUILDERS))} file."
                )
            kwargs = {**kwargs, "data_files": {"train": path}}
            dataset_name, dataset_config = builder, None
        else:
            dataset_name = path
    try:
        loaded = datasets.load_dataset(dataset_name, dataset_config, data_dir=data_dir, **kwargs)
    except datasets.data_files.EmptyDatasetError as error:
        raise DataError(f"--dataset_name {dataset_name!r} holds no data files datasets can read ({error}).") from None
    except ConnectionError as error:
        offline = any(os.environ.get(v, "0").upper() in ("1", "ON", "YES", "TRUE") for v in _OFFLINE_VARS)
        raise DataError(
            f"Could not load dataset {dataset_name!r} from the Hugging Face Hub"
            f"{' (offline mode is on: ' + ', '.join(_OFFLINE_VARS) + ')' if offline else ''} and it is not in the "
            "local cache. Pass a local folder instead, e.g. `--dataset_name path/to/cifar10` (a copy of "
            "`uoft-cs/cifar10` saved with its parquet files) or an imagefolder tree "
            "(`--dataset_name path/to/images` with one sub-folder per class)."
        ) from error
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
# single data files by extension: the `datasets` builder that reads them
_FILE_BUILDERS = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet", "arrow": "arrow"}


def _pick_column(
    features,
    given: str | None,
    preset: str | None,
    feature_type: type,
    candidates: Sequence[str],
    what: str,
    flag: str,
) -> str:
    columns = list(features)
    if given is not None:
        if given not in features:
            raise DataError(
                f"{flag} {given!r} is not a column of this dataset; available columns: {columns}. "
                f"Pass one of them with {flag}."
            )
        return given
    if preset is not None and preset in features:
        return preset
    for name in candidates:
        if name in features and isinstance(features[name], feature_type):
            return name
    typed = [name for name, feature in features.items() if isinstance(feature, feature_type)]
    if typed:
        return typed[0]
    for name in candidates:
        if name in features:
            return name
    raise DataError(f"Could not find the {what} column; available columns: {columns}. Pass it with {flag} <column>.")


def detect_columns(
    features, image_column: str | None = None, label_column: str | None = None, dataset_name: str | None = None
) -> tuple[str, str]:
    """(image column, label column) of a dataset's `features`: given names are checked, missing ones found.

    Detection order: the dataset preset (`DATASET_PRESETS`), columns typed `Image` / `ClassLabel` (preferring
    the usual names, so CIFAR-100 gets `fine_label`), then the usual names whatever their type.
    """
    import datasets

    preset = DATASET_PRESETS.get(dataset_name) if dataset_name in DATASET_PRESETS else DatasetPreset()
    image = _pick_column(
        features, image_column, preset.image_column, datasets.Image, IMAGE_COLUMN_CANDIDATES, "image", "--image_column"
    )
    label = _pick_column(
        features,
        label_column,
        preset.label_column,
        datasets.ClassLabel,
        [c for c in LABEL_COLUMN_CANDIDATES if c != image],
        "label",
        "--label_column",
    )
    if image == label:
        raise DataError(f"The image and label columns are both {image!r}; pass --image_column and --label_column.")
    return image, label


def _as_class_label(dataset_dict):
    """Make `label` a `ClassLabel` in every split (strings are encoded, integers get names "0".."n-1")."""
    import datasets

    feature = next(iter(dataset_dict.values())).features[LABEL_COLUMN]
    if isinstance(feature, datasets.ClassLabel):
        return dataset_dict
    dtype = getattr(feature, "dtype", None)
    if dtype == "string":
        names = sorted({v for split in dataset_dict.values() for v in split[LABEL_COLUMN] if v is not None})
        return dataset_dict.cast_column(LABEL_COLUMN, datasets.ClassLabel(names=names))
    if dtype is not None and ("int" in dtype):
        values = [np.asarray(split[LABEL_COLUMN]) for split in dataset_dict.values()]
        largest = max(int(v.max()) for v in values if v.size)
        return dataset_dict.cast_column(LABEL_COLUMN, datasets.ClassLabel(num_classes=largest + 1))
    raise DataError(
        f"The label column has type {feature}; single-label classification needs integer or string labels "
        "(or a ClassLabel). Pass the right one with --label_column."
    )


def _as_image(dataset_dict):
    import datasets

    feature = next(iter(dataset_dict.values())).features[IMAGE_COLUMN]
    if isinstance(feature, datasets.Image):
        return dataset_dict
    if getattr(feature, "dtype", None) in ("string", "binary"):  # file paths or encoded bytes
        return dataset_dict.cast_column(IMAGE_COLUMN, datasets.Image())
    raise DataError(f"The image column has type {feature}, not images; pass the right one with --image_column.")


def load_image_dataset(
    dataset_name: str = "uoft-cs/cifar10",
    dataset_config: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    data_dir: str | None = None,
    **load_kwargs: Any,
):
    """Load an image-classification dataset as a `DatasetDict` with columns `image` and `label` (`ClassLabel`).

    `dataset_name` is a Hub id (`uoft-cs/cifar10`, `uoft-cs/cifar100`, ...), a local dataset folder (a Hub
    dataset saved with its data files, e.g. a local copy of `uoft-cs/cifar10`), an imagefolder tree
    (`root/<class>/<image>` or `root/<split>/<class>/<image>`), or `"imagefolder"` with `data_dir`.
    Unknown columns and undetectable ones raise `DataError` listing the available columns. Other keyword
    arguments go to `datasets.load_dataset` (`cache_dir`, `revision`, `token`, ...).
    """
    dataset_dict = _load_dataset_dict(dataset_name, dataset_config, data_dir, **load_kwargs)
    features = next(iter(dataset_dict.values())).features
    image, label = detect_columns(features, image_column, label_column, dataset_name)
    logger.info("Dataset %s: image column %r, label column %r", dataset_name, image, label)
    dataset_dict = dataset_dict.select_columns([image, label])
    renames = {old: new for old, new in ((image, IMAGE_COLUMN), (label, LABEL_COLUMN)) if old != new}
    if renames:
        dataset_dict = dataset_dict.rename_columns(renames)
    return _check_labels(_as_class_label(_as_image(dataset_dict)))


def _check_labels(dataset_dict):
    """Refuse labels outside `[0, num_classes)` (e.g. -1 for "unlabelled"), naming the split, the values and the fix."""
    for split, dataset in dataset_dict.items():
        classes = dataset.features[LABEL_COLUMN].num_classes
        labels = np.asarray(dataset[LABEL_COLUMN])
        if labels.size == 0:
            continue
        bad = labels[(labels < 0) | (labels >= classes)]
        if bad.size:
            raise DataError(
                f"The {split!r} split has {bad.size} label(s) outside [0, {classes}) (e.g. {sorted(set(bad.tolist()))[:5]}): "
                "every example needs one of the dataset's classes. Drop the unlabelled examples (label -1) or fix the "
                "label column (--label_column)."
            )
    return dataset_dict


def label_names(dataset) -> list[str]:
    """Class names of a dataset (or `DatasetDict`) loaded by `load_image_dataset`."""
    if hasattr(dataset, "values") and not hasattr(dataset, "features"):
        dataset = next(iter(dataset.values()))
    return list(dataset.features[LABEL_COLUMN].names)


def label_mappings(dataset) -> tuple[dict[int, str], dict[str, int]]:
    """(id2label, label2id) for a transformers config."""
    names = label_names(dataset)
    return dict(enumerate(names)), {name: i for i, name in enumerate(names)}
