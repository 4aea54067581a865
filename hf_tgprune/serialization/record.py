"""``sparsity.json``: what a saved folder records next to its weights (measured sparsity, checksums, provenance)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..utils import public_name
from .formats import SPARSITY_FILE_NAME, SparseFormatError

# Fields that save_sparse_model measures or derives itself; metadata may not set them.
RESERVED_KEYS = frozenset(
    {"format", "weights_file", "files", "sparsity", "mask", "library", "model_family", "preprocessing"}
)
# Fields that name a model or a dataset: published as a Hub id or a plain folder name, never a local path.
NAME_KEYS = ("base_model", "teacher", "dataset")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that wrote and can read the checkpoint."""
    from importlib import metadata

    versions = {}
    for package in ("hf_tgprune", "torch", "timm", "transformers", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            if package == "hf_tgprune":
                import hf_tgprune

                versions[package] = str(getattr(hf_tgprune, "__version__", "unknown"))
    return versions


def _without_absolute_paths(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _without_absolute_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_absolute_paths(item) for item in value]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        return public_name(value)
    return value


def public_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """`metadata` (already JSON-able) as it may be published: model and dataset names (``base_model``,
    ``teacher``, ``dataset``) as Hub ids or plain folder names, and no absolute local path anywhere."""
    metadata = {key: public_name(value) if key in NAME_KEYS else value for key, value in metadata.items()}
    return _without_absolute_paths(metadata)


def check_metadata(metadata: Mapping[str, Any]) -> None:
    """Raise a ValueError when `metadata` sets a field that ``save_sparse_model`` measures itself."""
    clash = RESERVED_KEYS & metadata.keys()
    if clash:
        raise ValueError(f"metadata keys {sorted(clash)} are reserved for values measured by save_sparse_model")


def read_sparsity_record(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``sparsity.json`` of a saved folder.

    Raises:
        FileNotFoundError: the folder has no ``sparsity.json``.
        SparseFormatError: it is not valid JSON.
    """
    path = Path(folder) / SPARSITY_FILE_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{folder} has no {SPARSITY_FILE_NAME}; was it written by save_sparse_model?"
        ) from None
    except json.JSONDecodeError as err:
        raise SparseFormatError(f"{path} is not valid JSON ({err})") from err
