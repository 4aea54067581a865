"""What preprocessing a model expects, as plain values: `DataConfig` (input size, mean, std, interpolation) and the
PIL resampling codes. A leaf module: the model adapters (`hf_tgprune.core.adapters`) describe models with it and the data
pipeline (`hf_tgprune.data`) builds transforms from it, without either importing the other's package."""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


@dataclass(frozen=True)
class DataConfig:
    """Input resolution and normalisation a model expects."""

    image_size: int = DEFAULT_IMAGE_SIZE
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
