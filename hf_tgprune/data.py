"""Image-classification data: loading, splits, calibration samples and model-specific transforms.

The pieces are small functions that the recipe composes:

1. `load_image_dataset(...)`: a `DatasetDict` from a Hub id, a local dataset folder (the layout
   `load_dataset` reads, e.g. `../shared/data/cifar10`) or an `imagefolder` tree, with the image and label
   columns found automatically (or given) and renamed to `image` / `label` (a `ClassLabel`).
2. `resolve_splits(...)` / `split_train_validation(...)`: validation carved from train; the test split is
   kept for the final report only. `sample_calibration(...)`: a deterministic sample of the training part.
3. `resolve_data_config(model, ...)`: image size, mean, std and interpolation from the model's own data
   config (timm `resolve_model_data_config`, a transformers image processor, or defaults);
   `build_transforms(...)` turns it into train/eval transforms (CIFAR augmentation by default);
   `set_transforms(...)` attaches them with `Dataset.with_transform` so that examples come out as
   `{"pixel_values", "labels"}`; `collate_fn` stacks them.

Families of models and augmentations are registries (`register_data_config_resolver`,
`register_augmentation`), not if/else chains.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
# Datasets whose images are at most this many pixels a side (CIFAR: 32, TinyImageNet: 64) are trained at
# their own resolution unless `image_size` is given; larger images go to the model's input size.
SMALL_IMAGE_MAX_SIZE = 64


class DataError(ValueError):
    """A dataset, split or column that cannot be used; the message says how to fix it."""


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetPreset:
    """Known column names of a dataset (used when the user gives none)."""

    image_column: str | None = None
    label_column: str | None = None


DATASET_PRESETS: dict[str, DatasetPreset] = {}


def register_dataset_preset(name: str, image_column: str | None = None, label_column: str | None = None) -> None:
    DATASET_PRESETS[name] = DatasetPreset(image_column, label_column)


for _name in ("uoft-cs/cifar10", "cifar10"):
    register_dataset_preset(_name, "img", "label")
for _name in ("uoft-cs/cifar100", "cifar100"):
    register_dataset_preset(_name, "img", "fine_label")
register_dataset_preset("zh-plus/tiny-imagenet", "image", "label")


def _looks_local(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)


def _load_dataset_dict(dataset_name: str, dataset_config: str | None, data_dir: str | None, **kwargs: Any):
    import datasets

    if _looks_local(dataset_name) and dataset_name != "imagefolder":
        path = os.path.expanduser(dataset_name)
        if not os.path.exists(path):
            raise DataError(f"--dataset_name {dataset_name!r}: no such file or folder ({os.path.abspath(path)}).")
        dataset_name = path
    try:
        loaded = datasets.load_dataset(dataset_name, dataset_config, data_dir=data_dir, **kwargs)
    except ConnectionError as error:
        offline = any(os.environ.get(v, "0").upper() in ("1", "ON", "YES", "TRUE") for v in _OFFLINE_VARS)
        raise DataError(
            f"Could not load dataset {dataset_name!r} from the Hugging Face Hub"
            f"{' (offline mode is on: ' + ', '.join(_OFFLINE_VARS) + ')' if offline else ''} and it is not in the "
            "local cache. Pass a local folder instead, e.g. `--dataset_name ../shared/data/cifar10` (a copy of "
            "`uoft-cs/cifar10` saved with its parquet files) or an imagefolder tree "
            "(`--dataset_name path/to/images` with one sub-folder per class)."
        ) from error
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


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

    preset = DATASET_PRESETS.get(dataset_name or "", DatasetPreset())
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
    dataset saved with its data files, e.g. `../shared/data/cifar10`), an imagefolder tree
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
    return _as_class_label(_as_image(dataset_dict))


def label_names(dataset) -> list[str]:
    """Class names of a dataset (or `DatasetDict`) loaded by `load_image_dataset`."""
    if hasattr(dataset, "values") and not hasattr(dataset, "features"):
        dataset = next(iter(dataset.values()))
    return list(dataset.features[LABEL_COLUMN].names)


def label_mappings(dataset) -> tuple[dict[int, str], dict[str, int]]:
    """(id2label, label2id) for a transformers config."""
    names = label_names(dataset)
    return dict(enumerate(names)), {name: i for i, name in enumerate(names)}


# --------------------------------------------------------------------------------------------------------------
# Splits and samples
# --------------------------------------------------------------------------------------------------------------
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


def sample_calibration(train_part, num_samples: int, seed: int = 42):
    """A deterministic random sample of `num_samples` examples from the training part (all if it is smaller).

    Draw it from the training part returned by `split_train_validation`/`resolve_splits`, never from the
    validation or test data: the scores must not see the data the pruned model is judged on.
    """
    if num_samples <= 0:
        raise DataError(f"--num_calibration_samples must be positive; got {num_samples}.")
    if len(train_part) == 0:
        raise DataError("The training split is empty; there is nothing to calibrate the pruning scores on.")
    if num_samples >= len(train_part):
        return train_part
    return limit_samples(train_part, num_samples, seed=seed)


# --------------------------------------------------------------------------------------------------------------
# Data config: what the model expects
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    """Input resolution and normalisation a model expects."""

    image_size: int = DEFAULT_IMAGE_SIZE
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"


DataConfigResolver = Callable[[nn.Module], DataConfig]
_DATA_CONFIG_RESOLVERS: dict[str, DataConfigResolver] = {}


def register_data_config_resolver(family: str) -> Callable[[DataConfigResolver], DataConfigResolver]:
    """Register how to read the data config of a model family (an adapter name from hf_tgprune.adapters)."""

    def decorator(fn: DataConfigResolver) -> DataConfigResolver:
        _DATA_CONFIG_RESOLVERS[family] = fn
        return fn

    return decorator


@register_data_config_resolver("timm")
def _timm_data_config(model: nn.Module) -> DataConfig:
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(model)
    return DataConfig(
        image_size=int(config["input_size"][-1]),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        interpolation=str(config.get("interpolation") or "bilinear"),
    )


@register_data_config_resolver("transformers")
def _transformers_data_config(model: nn.Module) -> DataConfig:
    size = getattr(model.config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[-1]
    return DataConfig(image_size=int(size or DEFAULT_IMAGE_SIZE))


@register_data_config_resolver("torch")
def _default_data_config(model: nn.Module) -> DataConfig:
    return DataConfig()


_PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _side(size: Any) -> int | None:
    """One side of a processor size: an int, or a dict / `SizeDict` with height, shortest_edge or width."""
    if size is None or isinstance(size, (int, float)):
        return int(size) if size else None
    if isinstance(size, (list, tuple)):
        return int(size[0]) if size else None
    get = size.get if hasattr(size, "get") else lambda key: getattr(size, key, None)
    for key in ("height", "shortest_edge", "width"):
        if get(key):
            return int(get(key))
    return None


def data_config_from_image_processor(image_processor: Any, base: DataConfig | None = None) -> DataConfig:
    """Mean, std, size and interpolation of a transformers image processor (missing fields from `base`)."""
    base = base or DataConfig()
    side = _side(getattr(image_processor, "size", None))
    if getattr(image_processor, "do_center_crop", False):
        side = _side(getattr(image_processor, "crop_size", None)) or side
    resample = getattr(image_processor, "resample", None)
    resample = getattr(resample, "value", resample)
    mean = getattr(image_processor, "image_mean", None)
    std = getattr(image_processor, "image_std", None)
    return DataConfig(
        image_size=side or base.image_size,
        mean=tuple(mean) if mean is not None else base.mean,
        std=tuple(std) if std is not None else base.std,
        interpolation=_PIL_RESAMPLE_NAMES.get(resample, base.interpolation),
    )


def native_image_size(dataset, num_images: int = 8) -> int | None:
    """Side of the first images of `dataset` if they are square and all the same size, else None."""
    sizes = {dataset[i][IMAGE_COLUMN].size for i in range(min(num_images, len(dataset)))}
    if len(sizes) == 1:
        width, height = sizes.pop()
        if width == height:
            return int(width)
    return None


def _model_data_config(model: nn.Module) -> DataConfig:
    from .adapters import get_adapter, unwrap_model

    model = unwrap_model(model)
    return _DATA_CONFIG_RESOLVERS.get(get_adapter(model).name, _default_data_config)(model)


@torch.no_grad()
def accepts_image_size(model: nn.Module, size: int) -> bool:
    """Whether `model` runs on `size`×`size` images (ViTs with a fixed input size do not), probed with one
    zero image in eval mode; the model's training mode, parameters and buffers are left as they were."""
    from .adapters import forward_logits, unwrap_model

    model = unwrap_model(model)
    was_training = model.training
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    try:
        model.eval()
        forward_logits(model, torch.zeros(1, 3, size, size, device=device, dtype=dtype))
        return True
    except (RuntimeError, ValueError, AssertionError):
        return False
    finally:
        model.train(was_training)


def resolve_data_config(
    model: nn.Module,
    image_processor: Any = None,
    image_size: int | None = None,
    native_size: int | None = None,
    also_fit: Sequence[nn.Module] = (),
) -> DataConfig:
    """The data config for `model`: from its image processor if given, else from its family's resolver.

    Resolution: `image_size` when given (e.g. 224 for the paper's protocol); otherwise the dataset's
    `native_size` when that is small (≤ `SMALL_IMAGE_MAX_SIZE`, e.g. 32 for CIFAR) and `model` and every
    model in `also_fit` (the teacher: it sees the same batches) run at that size; otherwise the model's own
    size, or the size of a model in `also_fit` that has a fixed input size (a ViT teacher, say).
    """
    config = _model_data_config(model)
    if image_processor is not None:
        config = data_config_from_image_processor(image_processor, base=config)
    if image_size is not None:
        if image_size <= 0:
            raise DataError(f"--image_size must be positive; got {image_size}.")
        return replace(config, image_size=int(image_size))
    models = (model, *also_fit)
    candidates = [native_size] if native_size is not None and native_size <= SMALL_IMAGE_MAX_SIZE else []
    candidates += [config.image_size] + [_model_data_config(m).image_size for m in also_fit]
    if len(set(candidates)) == 1:
        return replace(config, image_size=int(candidates[0]))
    for size in dict.fromkeys(candidates):  # in order, without repeats
        if all(accepts_image_size(m, size) for m in models):
            if size != candidates[0]:
                logger.warning(
                    "Not every model runs on %d px images; using %d px (set --image_size to choose).",
                    candidates[0],
                    size,
                )
            return replace(config, image_size=int(size))
    raise DataError(
        f"The student and teacher run at no common input size among {sorted(set(candidates))}; pass --image_size."
    )


# --------------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------------
def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    return {
        "nearest": InterpolationMode.NEAREST,
        "bilinear": InterpolationMode.BILINEAR,
        "bicubic": InterpolationMode.BICUBIC,
        "lanczos": InterpolationMode.LANCZOS,
        "box": InterpolationMode.BOX,
        "hamming": InterpolationMode.HAMMING,
    }.get(name, InterpolationMode.BILINEAR)


class ToRGB:
    """Convert any PIL image (grayscale, palette, RGBA) to RGB."""

    def __call__(self, image):
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def _resize_and_crop(config: DataConfig) -> list:
    from torchvision import transforms as T

    return [
        ToRGB(),
        T.Resize(config.image_size, interpolation=_interpolation(config.interpolation), antialias=True),
        T.CenterCrop(config.image_size),
    ]


def _to_normalized_tensor(config: DataConfig) -> list:
    from torchvision import transforms as T

    return [T.ToTensor(), T.Normalize(config.mean, config.std)]


Augmentation = Callable[[DataConfig], list]
_AUGMENTATIONS: dict[str, Augmentation] = {}


def register_augmentation(name: str) -> Callable[[Augmentation], Augmentation]:
    """Register a training augmentation: a function from a `DataConfig` to a list of PIL transforms."""

    def decorator(fn: Augmentation) -> Augmentation:
        _AUGMENTATIONS[name] = fn
        return fn

    return decorator


def available_augmentations() -> list[str]:
    return sorted(_AUGMENTATIONS)


@register_augmentation("cifar")
def _cifar_augmentation(config: DataConfig) -> list:
    """Random crop with zero padding (4 px at 32 px, scaled with the image size) and a horizontal flip."""
    from torchvision import transforms as T

    padding = max(1, round(config.image_size / 8))
    return [*_resize_and_crop(config), T.RandomCrop(config.image_size, padding=padding), T.RandomHorizontalFlip()]


@register_augmentation("random_resized_crop")
def _random_resized_crop(config: DataConfig) -> list:
    """ImageNet-style: random resized crop and horizontal flip."""
    from torchvision import transforms as T

    return [
        ToRGB(),
        T.RandomResizedCrop(config.image_size, interpolation=_interpolation(config.interpolation), antialias=True),
        T.RandomHorizontalFlip(),
    ]


@register_augmentation("none")
def _no_augmentation(config: DataConfig) -> list:
    return _resize_and_crop(config)


def build_transforms(config: DataConfig, augmentation: str = "cifar"):
    """(train transform, eval transform): PIL image -> normalised float tensor [3, size, size]."""
    from torchvision import transforms as T

    if augmentation not in _AUGMENTATIONS:
        raise DataError(f"Unknown augmentation {augmentation!r}; choose one of {available_augmentations()}.")
    train = T.Compose([*_AUGMENTATIONS[augmentation](config), *_to_normalized_tensor(config)])
    evaluation = T.Compose([*_resize_and_crop(config), *_to_normalized_tensor(config)])
    return train, evaluation


class ImageClassificationTransform:
    """Batch transform for `Dataset.with_transform`: {"image", "label"} -> {"pixel_values", "labels"}."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        return {
            "pixel_values": [self.transform(image) for image in batch[IMAGE_COLUMN]],
            "labels": list(batch[LABEL_COLUMN]),
        }


def set_transforms(dataset, transform: Callable):
    """`dataset` whose examples are {"pixel_values": tensor, "labels": int}, transformed on the fly."""
    return dataset.with_transform(ImageClassificationTransform(transform))


def collate_fn(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack examples into {"pixel_values": float [B, 3, H, W], "labels": long [B]}."""
    return {
        "pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]),
        "labels": torch.as_tensor([int(e["labels"]) for e in examples], dtype=torch.long),
    }
