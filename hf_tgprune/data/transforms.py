"""What a model expects and the transforms that give it: `resolve_data_config(model, ...)` (image size, mean, std and
interpolation from the model's own library, through its adapter, or from a transformers image processor),
`build_transforms(...)` (train/eval transforms, CIFAR augmentation by default) and `set_transforms(...)` (examples
come out as `{"pixel_values", "labels"}`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..core.adapters import data_config, forward_logits, unwrap_model
from ..core.preprocessing import DEFAULT_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, PIL_RESAMPLE, DataConfig  # noqa: F401
from ..core.registry import Registry
from .loading import IMAGE_COLUMN, LABEL_COLUMN, DataError

logger = logging.getLogger(__name__)

# Datasets whose images are at most this many pixels a side (CIFAR: 32, TinyImageNet: 64) are trained at
# their own resolution unless `image_size` is given; larger images go to the model's input size.
SMALL_IMAGE_MAX_SIZE = 64


def _pil_resample_names() -> dict[int, str]:
    return {code: name for name, code in PIL_RESAMPLE.items()}


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
        interpolation=_pil_resample_names().get(resample, base.interpolation),
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
    return data_config(model)


@torch.no_grad()
def accepts_image_size(model: nn.Module, size: int) -> bool:
    """Whether `model` runs on `size`×`size` images (ViTs with a fixed input size do not), probed with one
    zero image in eval mode; the model's training mode, parameters and buffers are left as they were."""
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
_AUGMENTATIONS: Registry[Augmentation] = Registry("augmentation")


def register_augmentation(name: str) -> Callable[[Augmentation], Augmentation]:
    """Register a training augmentation: a function from a `DataConfig` to a list of PIL transforms."""

    def decorator(fn: Augmentation) -> Augmentation:
        return _AUGMENTATIONS.register(name, fn)

    return decorator


def available_augmentations() -> list[str]:
    return _AUGMENTATIONS.names()


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
    train = T.Compose([*_AUGMENTATIONS.get(augmentation)(config), *_to_normalized_tensor(config)])
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
