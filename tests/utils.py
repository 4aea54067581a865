"""Tiny models and data for the tests (built from configs, nothing downloaded)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

NUM_LABELS = 4
IMAGE_SIZE = 32


def make_timm_resnet(num_labels: int = NUM_LABELS, seed: int = 0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=num_labels)


def make_timm_vit(num_labels: int = NUM_LABELS, seed: int = 0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("test_vit", num_classes=num_labels, img_size=IMAGE_SIZE)


def make_hf_resnet(num_labels: int = NUM_LABELS, seed: int = 0):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(num_labels=num_labels, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    return ResNetForImageClassification(config)


# the tiny transformers ViT every test builds (also the base of the ViT-family configs of test_architectures.py)
TINY_HF_VIT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=IMAGE_SIZE,
    patch_size=8,
)


def make_hf_vit(num_labels: int = NUM_LABELS, seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(num_labels=num_labels, **TINY_HF_VIT)
    return ViTForImageClassification(config)


MODEL_FACTORIES = {
    "timm_resnet": make_timm_resnet,
    "timm_vit": make_timm_vit,
    "hf_resnet": make_hf_resnet,
    "hf_vit": make_hf_vit,
}


def make_model(name: str, num_labels: int = NUM_LABELS, seed: int = 0):
    return MODEL_FACTORIES[name](num_labels=num_labels, seed=seed)


class RandomImages(Dataset):
    """Deterministic random images with labels that depend on the image (so there is something to learn)."""

    def __init__(self, n: int, num_labels: int = NUM_LABELS, size: int = IMAGE_SIZE, seed: int = 0, labels=True):
        g = torch.Generator().manual_seed(seed)
        self.pixel_values = torch.randn(n, 3, size, size, generator=g)
        self.labels = self.pixel_values.mean(dim=(1, 2, 3)).argsort().remainder(num_labels)
        self.with_labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        item = {"pixel_values": self.pixel_values[i]}
        if self.with_labels:
            item["labels"] = self.labels[i]
        return item


# settings every test run shares: offline, quiet, CPU, nothing saved unless asked
TINY_RUN_DEFAULTS = dict(
    pruning_method="tgp",  # one-shot, one scoring pass (the trainer's default, gradual, needs >= 32 steps)
    report_to="none",
    disable_tqdm=True,
    save_strategy="no",
    use_cpu=True,
    seed=0,
    per_device_train_batch_size=8,
    per_device_eval_batch_size=8,
    num_calibration_samples=16,
    calibration_batch_size=8,
)


def tiny_config(tmp_path, **overrides):
    """A `TeacherGuidedPruningConfig` for tiny test runs in `tmp_path / "out"`; `overrides` win."""
    from hf_tgprune import TeacherGuidedPruningConfig

    return TeacherGuidedPruningConfig(**{"output_dir": str(tmp_path / "out"), **TINY_RUN_DEFAULTS, **overrides})
