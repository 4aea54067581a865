"""File names, formats and checksums shared by the writers and readers of sparse checkpoints."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from ...core.adapters import CONFIG_NAME, PREPROCESSOR_CONFIG_NAME, WEIGHTS_NAME

DENSE_WEIGHTS_NAME = WEIGHTS_NAME
BITMASK_WEIGHTS_NAME = "model.bitmask.safetensors"
SPARSITY_FILE_NAME = "sparsity.json"
SAVE_FORMATS = ("dense", "bitmask")
# the files besides the weights whose SHA-256 sparsity.json records and readers verify
CHECKSUMMED_CONFIGS = (CONFIG_NAME, PREPROCESSOR_CONFIG_NAME)

__all__ = [
    "BITMASK_WEIGHTS_NAME",
    "CHECKSUMMED_CONFIGS",
    "CONFIG_NAME",
    "DENSE_WEIGHTS_NAME",
    "PREPROCESSOR_CONFIG_NAME",
    "SAVE_FORMATS",
    "SPARSITY_FILE_NAME",
    "SparseFormatError",
    "sha256_file",
    "sha256_tensor",
]


class SparseFormatError(ValueError):
    """A sparse checkpoint is corrupted, truncated, inconsistent or in an unknown format."""


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The raw little-endian bytes of a tensor (no copy for contiguous CPU tensors)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return flat.view(torch.uint8).numpy()


def sha256_tensor(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes."""
    return hashlib.sha256(tensor_bytes(tensor)).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
