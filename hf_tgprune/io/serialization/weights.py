"""Reading the weights file of a sparse checkpoint (either format), verified against its checksums."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ...core.adapters import get_adapter, unwrap_model
from ...core.kernel_masks import KERNEL_MASK_STATISTICS, attach_kernel_masks
from .bitmask import decode_bitmask, read_bitmask_header
from .formats import BITMASK_WEIGHTS_NAME, DENSE_WEIGHTS_NAME, SPARSITY_FILE_NAME, SparseFormatError
from .record import describes, read_sparsity_record, verify_record_files, verify_record_tensors

logger = logging.getLogger(__name__)


def resolve_weights_file(path: str | os.PathLike) -> Path:
    """The weights file of a sparse checkpoint: `path` itself, or the one weights file in the folder `path`.

    Raises:
        FileNotFoundError: `path` does not exist or the folder holds no weights file.
        SparseFormatError: the folder holds both formats.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"No sparse checkpoint at {path}: not a file or folder.")
    candidates = [path / name for name in (BITMASK_WEIGHTS_NAME, DENSE_WEIGHTS_NAME) if (path / name).is_file()]
    if not candidates:
        raise FileNotFoundError(
            f"{path} holds neither {BITMASK_WEIGHTS_NAME} nor {DENSE_WEIGHTS_NAME}; pass the weights file itself."
        )
    if len(candidates) > 1:
        raise SparseFormatError(
            f"{path} holds both {BITMASK_WEIGHTS_NAME} and {DENSE_WEIGHTS_NAME}; pass the file to load explicitly."
        )
    return candidates[0]


def _record_for(weights_file: Path) -> dict | None:
    """The ``sparsity.json`` next to `weights_file` when it is the record of that file (None when there is none)."""
    if not (weights_file.parent / SPARSITY_FILE_NAME).is_file():
        return None
    record = read_sparsity_record(weights_file.parent)
    return record if describes(record, weights_file) else None


def read_weights(
    path: str | os.PathLike, *, verify: bool = True, return_masks: bool = False, check_record: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Path]:
    """(tensors, masks, weights file) of a sparse checkpoint, keyed by the names in the file.

    Args:
        path: the folder or the weights file.
        verify: check the checksums (per tensor for the bitmask format) and the ``sparsity.json`` next to the file.
        return_masks: also return the masks: a bitmask file's own; for a dense file with a verified
            ``sparsity.json``, the non-zero pattern of the layers it lists; otherwise none.
        check_record: cross-check with the ``sparsity.json`` next to the file (when it is the record of this file):
            its ``files`` entry (size, SHA-256), its per-layer counts and its mask hash.

    Raises:
        SparseFormatError: the file or its ``sparsity.json`` is truncated, corrupted or inconsistent (the message
            names the file).
    """
    weights_file = resolve_weights_file(path)
    record = _record_for(weights_file) if verify and check_record else None
    if record is not None:
        verify_record_files(record, weights_file)
    try:
        with safe_open(weights_file, framework="pt", device="cpu") as handle:
            header = read_bitmask_header(handle)
            if header is None:  # a plain dense safetensors file
                state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
                masks = {}
            else:
                state_dict, masks = decode_bitmask(
                    handle, header, str(weights_file), verify=verify, return_masks=return_masks or record is not None
                )
    except SafetensorError as err:
        raise SparseFormatError(
            f"{weights_file} is not a readable safetensors file ({err}); it is truncated or corrupted. "
            "Re-download or re-save it."
        ) from err
    except (OSError, RuntimeError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise SparseFormatError(f"Could not read {weights_file} ({err}); it is truncated or corrupted.") from err
    if record is not None:
        recorded = verify_record_tensors(record, state_dict, masks if header is not None else None, weights_file)
        masks = recorded if return_masks else {}
    return state_dict, masks, weights_file


def convert_masks(
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    masks: Mapping[str, torch.Tensor],
    shapes: Mapping[str, torch.Size],
) -> dict[str, torch.Tensor]:
    """Masks renamed (or fused / split) by the same conversion as the tensors they mask.

    Args:
        convert: maps a complete ``{name: tensor}`` dict (every name of `shapes`) to the other naming, e.g.
            ``ModelAdapter.checkpoint_state_dict`` (module names -> names on disk).
        masks: bool masks for some of the names.
        shapes: the shape of every tensor of the state dict.

    Returns:
        bool masks keyed by the converted names, for every converted tensor built from at least one masked one.
    """
    true = torch.ones((), dtype=torch.bool)
    kept = convert({name: masks[name] if name in masks else true.expand(shape) for name, shape in shapes.items()})
    covered = convert({name: (true if name in masks else ~true).expand(shape) for name, shape in shapes.items()})
    return {name: kept[name].contiguous() for name, flag in covered.items() if bool(flag.any())}


def verify_sparse_folder(path: str | os.PathLike) -> dict:
    """Verify a folder written by :func:`save_sparse_model` without loading it into a model; returns its
    ``sparsity.json`` record.

    Reads the weights file and checks it against its ``sparsity.json``: the ``files`` entry (size and SHA-256), the
    per-layer counts, the layer list and the mask hash (and, for the bitmask format, every tensor's own checksum).

    Raises:
        FileNotFoundError: no weights file or no ``sparsity.json``.
        SparseFormatError: a truncated, corrupted or inconsistent file (the message names it).
    """
    weights_file = resolve_weights_file(path)
    record = read_sparsity_record(weights_file.parent)
    if not describes(record, weights_file):
        raise SparseFormatError(
            f"{weights_file.parent / SPARSITY_FILE_NAME} describes {record.get('weights_file')!r}, not "
            f"{weights_file.name}; re-save the model."
        )
    read_weights(weights_file, verify=True)
    return record


def read_model_state_dict(path: str | os.PathLike, model: nn.Module, *, verify: bool = True) -> dict:
    """The tensors of a sparse checkpoint keyed like ``model.state_dict()`` (names on disk converted by the
    model's adapter, e.g. transformers 5's weight renaming)."""
    model = unwrap_model(model)
    state_dict, _, _ = read_weights(path, verify=verify)
    return get_adapter(model).model_state_dict(model, state_dict)


def load_sparse(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    strict: bool = True,
    verify: bool = True,
) -> dict[str, torch.Tensor] | nn.Module:
    """Load a checkpoint written by :func:`save_sparse_model` (either format), bit-exactly.

    Args:
        path: the output folder, or the weights file itself (``model.bitmask.safetensors`` or any safetensors
            file).
        model: when given, the weights are loaded into it (``load_state_dict``, ``strict``; names on disk are
            converted to the model's own) and the model is returned; otherwise the state dict is returned, keyed
            by the names on disk (those ``save_pretrained`` writes). The architecture is always the caller's
            choice: no class or loader is ever picked from a string in the checkpoint.
        strict: passed to ``load_state_dict``.
        verify: check the per-tensor SHA-256 of the bitmask format and, when a ``sparsity.json`` sits next to
            the file, the file's SHA-256 recorded there.

    Raises:
        SparseFormatError: the file is corrupted, truncated, inconsistent or of an unknown format version.
    """
    if model is None:
        state_dict, _, _ = read_weights(path, verify=verify)
        return state_dict
    unwrap_model(model).load_state_dict(read_model_state_dict(path, model, verify=verify), strict=strict)
    restore_kernel_masks(path, model, verify=False)
    return model


def restore_kernel_masks(path: str | os.PathLike, model: nn.Module, *, verify: bool = True) -> list[str]:
    """Re-attach the kernel masks of the weight-standardised convolutions a model was trained with
    (``mask_standardized_kernels``: ``masked_kernel_layers`` in ``sparsity.json``), so that the loaded model
    computes what was trained; returns their names (none for a folder without them).

    Args:
        path: the saved folder or its weights file.
        model: the model the folder's weights were loaded into.
        verify: as for :func:`load_sparse`.
    """
    weights_file = resolve_weights_file(path)
    folder = weights_file.parent
    if not (folder / SPARSITY_FILE_NAME).is_file():
        return []
    record = read_sparsity_record(folder)
    statistics = record.get("masked_kernel_layers") or {}
    if not statistics or not describes(record, weights_file):
        return []
    if not isinstance(statistics, dict) or not all(
        isinstance(name, str) and value in KERNEL_MASK_STATISTICS for name, value in statistics.items()
    ):
        raise SparseFormatError(
            f"{folder / SPARSITY_FILE_NAME}: masked_kernel_layers is not a mapping of weight names to one of "
            f"{KERNEL_MASK_STATISTICS}; re-save the model."
        )
    names = list(statistics)
    masks = load_sparse_masks(weights_file, model, verify=verify)
    missing = [name for name in names if name not in masks]
    if missing:
        raise SparseFormatError(
            f"{folder / SPARSITY_FILE_NAME} lists masked_kernel_layers {missing[:3]} that the folder's masks do not "
            "hold; re-save the model."
        )
    return attach_kernel_masks(model, {name: masks[name] for name in names}, statistics)


def load_sparse_masks(
    path: str | os.PathLike, model: nn.Module | None = None, *, verify: bool = True
) -> dict[str, torch.Tensor]:
    """The masks of a saved sparse checkpoint (True = kept).

    Exact for the bitmask format. For the dense format the masks are not stored; they are rebuilt from the
    layers listed in ``sparsity.json`` as "non-zero" (a kept weight that is exactly zero reads as pruned).

    Args:
        path: the folder or the weights file.
        model: when given, the masks are keyed by the model's parameter names (as ``trainer.masks`` and
            ``masks.safetensors``); otherwise by the names on disk.
        verify: as for :func:`load_sparse`.
    """
    state_dict, masks, weights_file = read_weights(path, verify=verify, return_masks=True)
    if not masks:
        if not (weights_file.parent / SPARSITY_FILE_NAME).is_file():
            raise FileNotFoundError(f"No masks stored in {weights_file} and no {SPARSITY_FILE_NAME} next to it.")
        record = read_sparsity_record(weights_file.parent)
        layers = (record.get("sparsity") or {}).get("layers")
        if not isinstance(layers, dict) or any(name not in state_dict for name in layers):
            raise SparseFormatError(
                f"{weights_file.parent / SPARSITY_FILE_NAME} does not list the masked layers of {weights_file.name}; "
                "re-save the model."
            )
        masks = {name: state_dict[name] != 0 for name in layers}
    if model is None:
        return masks
    model = unwrap_model(model)
    adapter = get_adapter(model)
    shapes = {name: tensor.shape for name, tensor in state_dict.items()}
    return convert_masks(lambda tensors: adapter.model_state_dict(model, tensors), masks, shapes)
