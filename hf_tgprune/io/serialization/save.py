"""``save_sparse_model``: write a pruned model so that its own library loads it, and measure what was written."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ...core.adapters import get_adapter, preprocessing_dict, unwrap_model
from ...core.kernel_masks import kernel_mask_statistics
from ...core.masking import mask_hash, measure_sparsity
from ...core.utils import atomic_path, jsonable, write_json_atomic
from .bitmask import encode_bitmask_state_dict
from .formats import (
    BITMASK_WEIGHTS_NAME,
    CHECKSUMMED_CONFIGS,
    DENSE_WEIGHTS_NAME,
    SAVE_FORMATS,
    SPARSITY_FILE_NAME,
    sha256_file,
)
from .publish import folder_in_place, staged_folder
from .record import check_metadata, library_versions, public_metadata
from .weights import convert_masks, read_weights

logger = logging.getLogger(__name__)


def _check_masks(masks: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Masks as CPU bool tensors, each naming a tensor of the state dict with its shape."""
    missing = [name for name in masks if name not in state_dict]
    if missing:
        raise KeyError(
            f"Masks name tensors that are not in the model's state dict: {missing[:5]}. Masks must be keyed by "
            "`named_parameters()` names of the unwrapped model."
        )
    checked = {}
    for name, mask in masks.items():
        mask = mask.detach().to("cpu", torch.bool)
        if tuple(mask.shape) != tuple(state_dict[name].shape):
            raise ValueError(
                f"Mask for {name!r} has shape {tuple(mask.shape)}, tensor has {tuple(state_dict[name].shape)}"
            )
        checked[name] = mask
    return checked


def _masked_state_dict(state_dict: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict:
    """CPU copies of the tensors, exact ``+0.0`` wherever a mask prunes (a warning if weights were revived)."""
    out: dict[str, torch.Tensor] = {}
    revived = 0
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu")
        mask = masks.get(name)
        if mask is None:
            out[name] = tensor.clone().contiguous()  # no shared storage: safetensors refuses aliased tensors
            continue
        revived += int((tensor[~mask] != 0).sum())
        # torch.where writes +0.0 (w * 0 would keep -0.0 for negative weights): canonical bytes in both formats
        out[name] = torch.where(mask, tensor, torch.zeros((), dtype=tensor.dtype)).contiguous()
    if revived:
        logger.warning(
            "%d weights outside the mask were non-zero in the model; they are saved as zero. Masks are enforced "
            "during training by GlobalMaskCallback; were weights edited after pruning?",
            revived,
        )
    return out


def _nonzero_masks(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without masks: every weight matrix/kernel (dim >= 2) is masked by its non-zero bit pattern."""
    masks = {}
    for name, param in model.named_parameters():
        tensor = state_dict.get(name)
        if tensor is not None and param.dim() >= 2 and tensor.is_floating_point():
            flat = tensor.detach().to("cpu").contiguous()
            # compare raw bits so that -0.0 counts as kept: the round trip stays bit-exact
            int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
            masks[name] = flat.view(int_dtype) != 0
    return masks


def _names_on_disk(to_disk, names: list[str], shapes: Mapping[str, torch.Size]) -> list[str]:
    """Names on disk of the tensors built from `names` (e.g. the parameters, not the buffers)."""
    true = torch.ones((), dtype=torch.bool)
    return list(convert_masks(to_disk, {name: true.expand(shapes[name]) for name in names if name in shapes}, shapes))


def _measure_and_record(
    weights_file: Path,
    save_format: str,
    adapter,
    file_masks: Mapping[str, torch.Tensor],
    file_parameters: list[str],
    masks: Mapping[str, torch.Tensor],
    masks_given: bool,
    enforced: bool,
) -> dict[str, Any]:
    """Re-open what was written and measure from it (never from the in-memory model); the measured part of the
    ``sparsity.json`` record."""
    saved, _, _ = read_weights(weights_file, verify=True, check_record=False)
    for name, mask in file_masks.items():
        if name not in saved or tuple(saved[name].shape) != tuple(mask.shape):
            raise RuntimeError(
                f"{weights_file} does not contain the masked tensor {name!r} {tuple(mask.shape)} (the file holds "
                f"{sorted(saved)[:5]}...); the model's library saved another layout than "
                f"{type(adapter).__name__}.checkpoint_state_dict predicts."
            )
        if enforced and bool((saved[name][~mask] != 0).any()):
            raise RuntimeError(f"{weights_file}: {name!r} is non-zero where the mask prunes it")
    report = measure_sparsity(saved, list(file_masks), file_parameters)
    report["pruned_by_mask"] = int(sum(int((~m).sum()) for m in masks.values())) if masks_given else None
    report["masks_enforced"] = enforced
    if masks_given and not enforced:
        report["nonzero_outside_mask"] = int(sum(int((saved[n][~m] != 0).sum()) for n, m in file_masks.items()))
    del saved
    return {
        "format": save_format,
        "weights_file": weights_file.name,
        "files": {weights_file.name: {"sha256": sha256_file(weights_file), "bytes": weights_file.stat().st_size}},
        "model_family": adapter.name,
        "sparsity": report,
        "mask": {
            "sha256": mask_hash(masks) if masks_given else None,
            # the same hash over the masks keyed by the names on disk (those of the weights file and of
            # `sparsity.layers`): what a reader checks the file against without the model
            "sha256_on_disk": mask_hash(file_masks) if masks_given else None,
            "source": "masks" if masks_given else "non-zero weights",
        },
        "library": library_versions(),
    }


def save_sparse_model(
    model: nn.Module,
    output_dir: str | os.PathLike,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    save_format: str = "dense",
    metadata: Mapping[str, Any] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    enforce_masks: bool = True,
    data_config: Any = None,
    write_extra_files: Callable[[Path], None] | None = None,
    atomic_folder: bool = True,
) -> dict[str, Any]:
    """Save a pruned model with its ``sparsity.json``; returns the ``sparsity.json`` content.

    The folder holds what the model's own library reads (timm: ``config.json`` written by timm's
    ``save_config_for_hf``; transformers: ``save_pretrained``), so ``timm.create_model("local-dir:<folder>",
    pretrained=True)`` or ``AutoModelForImageClassification.from_pretrained(<folder>)`` load the dense format
    without hf_tgprune. Tensors are named as that library names them on disk (transformers 5 renames some
    parameters when saving); ``sparsity.json`` and the bitmask format use the same names, and ``sparsity.json``
    is measured by re-reading the written file.

    Args:
        model: the pruned model (timm, transformers or any ``nn.Module``; wrappers are unwrapped).
        output_dir: folder to write (created if needed). The save is all-or-nothing: the new folder is written and
            verified next to `output_dir` and then swapped in atomically, so that a failure or a kill leaves either
            the complete earlier output or the complete new one (see :mod:`.publish`). Files of an existing
            `output_dir` that the save does not write (a model card, your own files, ``checkpoint-*`` folders) are
            kept; stale weights of the other format are removed; leftovers of an interrupted save are cleaned.
        masks: ``{parameter name: bool tensor}``, True = kept (as from ``hf_tgprune.core.masking.global_masks``).
            Weights are saved as exact zero wherever the mask is False. Without masks, every weight of dim >= 2
            is reported (and, for ``"bitmask"``, encoded) by its non-zero pattern.
        save_format: ``"dense"`` (loads with plain timm/transformers) or ``"bitmask"`` (compact; load with
            :func:`load_sparse`).
        metadata: extra JSON-able fields for ``sparsity.json``, conventionally ``method``, ``hyperparameters``,
            ``teacher``, ``base_model``, ``calibration_size``, ``dataset``, ``metrics`` (e.g.
            ``{"dense": {...}, "pruned": {...}}``), ``target_sparsity``. Model and dataset names are written as Hub
            ids or plain folder names, never as local paths.
        state_dict: the state dict to save instead of ``model.state_dict()`` (e.g. gathered by Accelerate).
        enforce_masks: zero the weights outside the masks in the file (default). False saves the weights as they
            are (masks are only reported; for training checkpoints of methods that keep dense weights under a
            mask); dense format only.
        data_config: the preprocessing the model was trained and evaluated with (a ``hf_tgprune.data.DataConfig``
            or a dict with ``image_size``, ``mean``, ``std``, ``interpolation``). Written where the model's library
            reads it (timm: ``pretrained_cfg`` in ``config.json``; transformers: ``preprocessor_config.json``) and
            recorded in ``sparsity.json``. None keeps the model's own declaration.
        write_extra_files: ``write_extra_files(folder)`` adds files to the new folder before the model's files are
            written (e.g. a processor's ``save_pretrained``), so that they are published with it.
        atomic_folder: False writes into `output_dir` itself, each file atomically but without the swap: for a
            folder that other processes write into at the same time (Trainer checkpoints, where the other ranks
            write their RNG states; a checkpoint counts as complete only once the Trainer writes its
            ``trainer_state.json``).

    Raises:
        KeyError: a mask names no tensor of the state dict.
        ValueError: bad arguments, or a `data_config` the model cannot run at.
        RuntimeError: the written file does not hold every masked tensor, or holds non-zeros where masks prune.
    """
    if save_format not in SAVE_FORMATS:
        raise ValueError(f"save_format must be one of {SAVE_FORMATS}, got {save_format!r}")
    if not enforce_masks and save_format != "dense":
        raise ValueError("enforce_masks=False keeps weights outside the mask, which only save_format='dense' stores")
    metadata = dict(metadata or {})
    check_metadata(metadata)
    preprocessing = None if data_config is None else preprocessing_dict(data_config)
    model = unwrap_model(model)
    adapter = get_adapter(model)
    output_dir = Path(output_dir)

    source = model.state_dict() if state_dict is None else state_dict
    masks_given = masks is not None
    enforced = masks_given and enforce_masks
    if masks_given:
        masks = _check_masks(masks, source)
    tensors = (
        _masked_state_dict(source, masks)
        if enforced
        else {name: tensor.detach().to("cpu").clone().contiguous() for name, tensor in source.items()}
    )
    if not masks_given:
        masks = _nonzero_masks(model, tensors)
    # weight-standardised convolutions computing with the masked kernel: recorded, so that loaders re-attach them
    masked_kernels = kernel_mask_statistics(model)  # {weight name: "kept" / "all"}
    if any(name not in masks for name in masked_kernels):
        raise ValueError(
            f"{[name for name in masked_kernels if name not in masks][:3]} compute with a kernel mask but are not "
            "among the masks being saved; pass the masks the model was pruned with."
        )

    # Names on disk, by the model library's own conversion (identity for timm and plain torch).
    to_disk = lambda named: adapter.checkpoint_state_dict(model, named)  # noqa: E731
    shapes = {name: tensor.shape for name, tensor in tensors.items()}
    file_masks = convert_masks(to_disk, masks, shapes)
    file_parameters = _names_on_disk(to_disk, [name for name, _ in model.named_parameters()], shapes)

    # All-or-nothing: everything is written into a staging folder next to `output_dir`, measured there, and swapped
    # in only when complete (other files of an existing `output_dir` are carried over; the other format's weights
    # file is dropped). A failure or a kill before the swap leaves the earlier output untouched.
    stale = BITMASK_WEIGHTS_NAME if save_format == "dense" else DENSE_WEIGHTS_NAME
    if (output_dir / stale).exists():
        logger.info("Removing stale %s from %s", stale, output_dir)
    publishing = staged_folder if atomic_folder else folder_in_place
    with publishing(output_dir, drop=[stale]) as folder:
        if write_extra_files is not None:
            write_extra_files(folder)
        if save_format == "dense":
            weights_name = DENSE_WEIGHTS_NAME
            adapter.save_weights(model, folder, tensors)
            adapter.save_config(model, folder, preprocessing)
        else:
            weights_name = BITMASK_WEIGHTS_NAME
            adapter.save_config(model, folder, preprocessing)
            encoded, file_metadata = encode_bitmask_state_dict(to_disk(tensors), file_masks)
            with atomic_path(folder / BITMASK_WEIGHTS_NAME) as tmp:
                save_file(encoded, tmp, metadata=file_metadata)
            del encoded
        del tensors
        record = _measure_and_record(
            folder / weights_name, save_format, adapter, file_masks, file_parameters, masks, masks_given, enforced
        )
        for name in CHECKSUMMED_CONFIGS:  # how the model is built and fed: verified on load like the weights
            if (folder / name).is_file():
                record["files"][name] = {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
        if preprocessing is not None:
            record["preprocessing"] = preprocessing
        if masked_kernels:
            record["masked_kernel_layers"] = masked_kernels
        record.update(public_metadata(jsonable(metadata)))
        write_json_atomic(record, folder / SPARSITY_FILE_NAME)
    return jsonable(record)
