"""``sparsity.json``: what a saved folder records next to its weights (measured sparsity, checksums, provenance)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ...core.masking import mask_hash
from ...core.utils import public_name
from .formats import (
    BITMASK_WEIGHTS_NAME,
    CHECKSUMMED_CONFIGS,
    DENSE_WEIGHTS_NAME,
    SPARSITY_FILE_NAME,
    SparseFormatError,
    sha256_file,
)

# Fields that save_sparse_model measures or derives itself; metadata may not set them.
RESERVED_KEYS = frozenset(
    {
        "format",
        "weights_file",
        "files",
        "sparsity",
        "mask",
        "library",
        "model_family",
        "preprocessing",
        "masked_kernel_layers",
    }
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
            if package == "hf_tgprune":  # a source checkout that is not installed (as the package's __version__)
                versions[package] = "0.0.0+unknown"
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


_RESAVE = (
    "The folder was modified after it was saved, or its files come from different saves: re-save the model "
    "(hf_tgprune.save_sparse_model or trainer.save_model()) or restore the folder from its source."
)
# families whose weights files use the model's own parameter names (transformers may rename them on disk)
_SAME_NAMES_ON_DISK = ("timm", "torch")


def _record_error(path: Path, problem: str) -> SparseFormatError:
    return SparseFormatError(f"{path}: {problem}. {_RESAVE}")


def read_sparsity_record(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``sparsity.json`` of a saved folder.

    Raises:
        FileNotFoundError: the folder has no ``sparsity.json``.
        SparseFormatError: it is not valid JSON (e.g. truncated) or not a JSON object.
    """
    path = Path(folder) / SPARSITY_FILE_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{folder} has no {SPARSITY_FILE_NAME}; was it written by save_sparse_model?"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SparseFormatError(f"{path} is not valid JSON ({err}); it is truncated or corrupted. {_RESAVE}") from err
    except RecursionError:  # nesting deeper than any record save_sparse_model writes
        raise SparseFormatError(
            f"{path} nests JSON deeper than Python can read: not a sparsity record. {_RESAVE}"
        ) from None
    if not isinstance(record, dict):
        raise _record_error(path, f"holds a JSON {type(record).__name__}, not the record save_sparse_model writes")
    named = record.get("weights_file", DENSE_WEIGHTS_NAME)
    if named not in (DENSE_WEIGHTS_NAME, BITMASK_WEIGHTS_NAME):  # a bare known file name: no path, nothing else
        raise _record_error(
            path, f"names the weights file {named!r}, which is neither {DENSE_WEIGHTS_NAME} nor {BITMASK_WEIGHTS_NAME}"
        )
    return record


def describes(record: Mapping[str, Any], weights_file: Path) -> bool:
    """Whether `record` (a ``sparsity.json`` next to `weights_file`) is the record of that weights file.

    Raises:
        SparseFormatError: the record names the other weights file of the two formats: a record next to a weights
            file is always that file's (a save removes the other format's file), so verification cannot be
            switched off by editing the record.
    """
    named = record.get("weights_file", weights_file.name)
    if named != weights_file.name and weights_file.name in (DENSE_WEIGHTS_NAME, BITMASK_WEIGHTS_NAME):
        raise _record_error(
            weights_file.parent / SPARSITY_FILE_NAME,
            f"names the weights file {named!r}, but the file is {weights_file.name}",
        )
    return named == weights_file.name


def verify_record_files(record: Mapping[str, Any], weights_file: Path) -> None:
    """Check a weights file against the ``files`` entry of its ``sparsity.json``: the entry must be there, and the
    file's size and SHA-256 must be the recorded ones.

    Raises:
        SparseFormatError: a missing or malformed entry, another format, a truncated file, or another SHA-256.
    """
    path = weights_file.parent / SPARSITY_FILE_NAME
    files = record.get("files")
    if not isinstance(files, Mapping):
        raise _record_error(path, "has no `files` table with the checksums of the weights file")
    entry = files.get(weights_file.name)
    if not isinstance(entry, Mapping) or not isinstance(entry.get("sha256"), str):
        raise _record_error(path, f"`files` has no SHA-256 entry for {weights_file.name} (it was removed or edited)")
    save_format = record.get("format")
    expected_format = "bitmask" if weights_file.name == BITMASK_WEIGHTS_NAME else "dense"
    if save_format is not None and save_format != expected_format:
        raise _record_error(path, f"records format {save_format!r}, but the weights file is {weights_file.name}")
    size = weights_file.stat().st_size
    if isinstance(entry.get("bytes"), int) and size != entry["bytes"]:
        raise SparseFormatError(
            f"{weights_file} is {size} bytes, but {SPARSITY_FILE_NAME} recorded {entry['bytes']}: the file is "
            "truncated or was replaced. Re-download or re-save it."
        )
    if sha256_file(weights_file) != entry["sha256"]:
        raise SparseFormatError(
            f"{weights_file}: SHA-256 differs from the one recorded in {SPARSITY_FILE_NAME}; the file is corrupted or "
            "was modified after saving. Re-download or re-save it."
        )
    for name in CHECKSUMMED_CONFIGS:  # recorded since configs are checksummed; older records have no entry
        entry = files.get(name)
        if entry is None:
            continue
        config = weights_file.parent / name
        if not isinstance(entry, Mapping) or not config.is_file() or sha256_file(config) != entry.get("sha256"):
            raise SparseFormatError(
                f"{config}: missing, or its SHA-256 differs from the one recorded in {SPARSITY_FILE_NAME}; the model "
                f"would be built or fed differently from the saved one. {_RESAVE}"
            )


def _counts(value: Any) -> tuple[Any, Any]:
    return (value.get("numel"), value.get("zeros")) if isinstance(value, Mapping) else (None, None)


def verify_record_tensors(
    record: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    file_masks: Mapping[str, torch.Tensor] | None,
    weights_file: Path,
) -> dict[str, torch.Tensor]:
    """Cross-check ``sparsity.json`` with the tensors read from its weights file; returns the masks it describes
    (keyed by the names on disk): the file's own masks (bitmask format), else the non-zero pattern of every layer
    the record lists.

    Checked: every listed layer is in the file with the recorded size and number of zeros; the prunable totals are
    the sums over the layers; a bitmask file masks exactly the listed layers; the recorded mask hash is the hash of
    the masks whenever the file determines them (bitmask format; dense when the zeros are exactly the pruned
    weights).

    Raises:
        SparseFormatError: naming the first disagreement.
    """
    path = weights_file.parent / SPARSITY_FILE_NAME
    sparsity = record.get("sparsity")
    layers = sparsity.get("layers") if isinstance(sparsity, Mapping) else None
    if not isinstance(layers, Mapping):
        raise _record_error(path, "has no `sparsity.layers` table")
    if file_masks:
        if set(layers) != set(file_masks):
            extra, missing = sorted(set(layers) - set(file_masks)), sorted(set(file_masks) - set(layers))
            raise _record_error(
                path,
                f"lists other layers than {weights_file.name} masks (listed but not masked: {extra[:5]}; masked "
                f"but not listed: {missing[:5]})",
            )
    numel_sum = zeros_sum = 0
    for name, counts in layers.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise _record_error(path, f"lists the layer {name!r}, which {weights_file.name} does not hold")
        measured = (tensor.numel(), int((tensor == 0).sum()))
        if _counts(counts) != measured:
            raise _record_error(
                path,
                f"records (numel, zeros) = {_counts(counts)} for {name!r}, but {weights_file.name} holds {measured}",
            )
        numel_sum += measured[0]
        zeros_sum += measured[1]
    if _counts(sparsity.get("prunable")) != (numel_sum, zeros_sum):
        raise _record_error(
            path,
            f"records (numel, zeros) = {_counts(sparsity.get('prunable'))} over the prunable weights, but the layers "
            f"it lists hold {(numel_sum, zeros_sum)}",
        )
    masks = dict(file_masks) if file_masks else {name: tensors[name] != 0 for name in layers}
    mask = record.get("mask") if isinstance(record.get("mask"), Mapping) else {}
    on_disk, in_model = mask.get("sha256_on_disk"), mask.get("sha256")
    if on_disk is not None and in_model is not None and record.get("model_family") in _SAME_NAMES_ON_DISK:
        if on_disk != in_model:
            raise _record_error(path, "records two different mask hashes for the same masks")
    determined = bool(file_masks) or (
        sparsity.get("nonzero_outside_mask", 0) == 0 and sparsity.get("pruned_by_mask") == zeros_sum
    )
    if on_disk is not None and determined:
        if mask_hash(masks) != on_disk:
            raise _record_error(path, f"records the mask hash {on_disk[:12]}..., but the masks of the file differ")
    return masks
