"""Sparse checkpoints: save a pruned model so that it loads anywhere, and load it back bit-exactly.

Two on-disk formats, both safetensors only (loading never unpickles or executes anything):

* ``"dense"`` (default): the layout the model's own library reads, so the checkpoint loads with
  **plain** timm or transformers, hf_tgprune not installed:

  - timm: ``config.json`` written by timm's own ``save_config_for_hf`` (``architecture``, ``num_classes``,
    ``model_args``, ``pretrained_cfg``) + ``model.safetensors``; load with
    ``timm.create_model("local-dir:<folder>", pretrained=True)`` or, once pushed,
    ``timm.create_model("hf-hub:<repo_id>", pretrained=True)``.
  - transformers: ``save_pretrained`` (``config.json`` + ``model.safetensors``); load with
    ``AutoModelForImageClassification.from_pretrained(<folder or repo_id>)``.
  - any other ``nn.Module``: ``model.safetensors`` (its state dict).

  Pruned weights are written as exact ``+0.0`` wherever the mask is False.

* ``"bitmask"``: one ``model.bitmask.safetensors`` holding, per masked weight, a packed bitmask (the weight
  viewed as ``(out, -1)``, 1 bit per weight, rows padded to whole bytes) and the kept values in row-major
  order; unmasked tensors are stored as they are. A JSON header in the safetensors metadata records every
  tensor's shape, dtype, kind and the SHA-256 of its decoded bytes, so a corrupted or truncated file is a
  :class:`SparseFormatError`, never a silently wrong model. Read it with :func:`load_sparse`. The folder also
  holds the model's ``config.json`` (so the architecture can be rebuilt by the user's own library).

Both formats get a ``sparsity.json`` whose per-layer and total sparsity are measured by re-reading the
written file, plus the mask hash, the method and hyperparameters, teacher, calibration size, dataset,
metrics and library versions passed as ``metadata``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .adapters import get_adapter, unwrap_model
from .masking import mask_hash, measure_sparsity

logger = logging.getLogger(__name__)

DENSE_WEIGHTS_NAME = "model.safetensors"
BITMASK_WEIGHTS_NAME = "model.bitmask.safetensors"
SPARSITY_FILE_NAME = "sparsity.json"
CONFIG_NAME = "config.json"
SAVE_FORMATS = ("dense", "bitmask")

BITMASK_FORMAT = "hf_tgprune.bitmask"
BITMASK_FORMAT_VERSION = 1
_HEADER_KEY = "hf_tgprune.header"
_RESERVED_METADATA_KEYS = frozenset({"format", "weights_file", "files", "sparsity", "mask", "library"})


class SparseFormatError(ValueError):
    """A sparse checkpoint is corrupted, truncated, inconsistent or in an unknown format."""


# --- small helpers ---------------------------------------------------------------------------------------------
def _tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The raw little-endian bytes of a tensor (no copy for contiguous CPU tensors)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return flat.view(torch.uint8).numpy()


def _sha256_tensor(tensor: torch.Tensor) -> str:
    return hashlib.sha256(_tensor_bytes(tensor)).hexdigest()


def _sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# A fixed table: dtype names in a header are looked up here, never resolved as attributes.
_DTYPES = {
    _dtype_name(dtype): dtype
    for dtype in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _DTYPES[_name] = getattr(torch, _name)


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = _DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise SparseFormatError(f"Unknown dtype {name!r} in the sparse checkpoint header.")
    return dtype


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """How a masked tensor is viewed for the bitmask: (out, -1) for conv/linear weights, (1, n) otherwise."""
    numel = math.prod(shape)
    if len(shape) >= 2:
        return shape[0], numel // shape[0] if shape[0] else 0
    return 1, numel


def _jsonable(value: Any) -> Any:
    """Make metadata JSON-serialisable (tensors, numpy scalars, paths, tuples, sets); fall back to str()."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _library_versions() -> dict[str, str]:
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


def _publish(tmp: str, path: Path) -> None:
    """Give a finished temporary file the usual permissions (mkstemp makes it 0600) and move it in place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file via a temporary file + rename, so a crash never leaves a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        _publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _atomic_write_text(text: str, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        _publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --- the bitmask codec -----------------------------------------------------------------------------------------
def encode_bitmask_state_dict(
    state_dict: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Encode a (masked) state dict into the tensors and metadata of a ``model.bitmask.safetensors`` file.

    Masked tensors become ``<name>::bitmask`` (uint8, ``(rows, ceil(cols / 8))``, little bit order) and
    ``<name>::values`` (the kept entries, original dtype); every other tensor is stored unchanged.
    """
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        entry: dict[str, Any] = {"shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype)}
        mask = masks.get(name)
        if mask is None:
            entry.update(kind="dense", key=name)
            tensors[name] = tensor
        else:
            mask = mask.detach().to("cpu", torch.bool)
            if tuple(mask.shape) != tuple(tensor.shape):
                raise ValueError(f"Mask for {name!r} has shape {tuple(mask.shape)}, tensor has {tuple(tensor.shape)}")
            rows, cols = _rows_cols(tuple(tensor.shape))
            packed = np.packbits(mask.reshape(rows, cols).numpy(), axis=1, bitorder="little")
            values = tensor.reshape(-1)[mask.reshape(-1)].clone()
            entry.update(
                kind="bitmask",
                rows=rows,
                cols=cols,
                nnz=int(values.numel()),
                bitmask_key=f"{name}::bitmask",
                values_key=f"{name}::values",
            )
            tensors[entry["bitmask_key"]] = torch.from_numpy(np.ascontiguousarray(packed))
            tensors[entry["values_key"]] = values
        entry["sha256"] = _sha256_tensor(tensor)
        entries[name] = entry
    header = {"format": BITMASK_FORMAT, "version": BITMASK_FORMAT_VERSION, "tensors": entries}
    header["header_sha256"] = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    metadata = {"format": "pt", _HEADER_KEY: json.dumps(header, sort_keys=True)}
    return tensors, metadata


def _read_header(handle) -> dict[str, Any] | None:
    metadata = handle.metadata() or {}
    raw = metadata.get(_HEADER_KEY)
    if raw is None:
        return None
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as err:
        raise SparseFormatError(f"The hf_tgprune header is not valid JSON ({err}); the file is corrupted.") from err
    if not isinstance(header, dict) or header.get("format") != BITMASK_FORMAT:
        raise SparseFormatError(
            f"Unknown sparse format {header.get('format') if isinstance(header, dict) else None!r}."
        )
    version = header.get("version")
    if version not in _BITMASK_DECODERS:
        raise SparseFormatError(
            f"Sparse format version {version!r} is not supported by this hf_tgprune (knows {sorted(_BITMASK_DECODERS)});"
            " upgrade hf_tgprune."
        )
    entries = header.get("tensors")
    if not isinstance(entries, dict):
        raise SparseFormatError("The hf_tgprune header has no tensor table; the file is corrupted.")
    expected = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    if header.get("header_sha256") != expected:
        raise SparseFormatError("The hf_tgprune header checksum does not match; the file is corrupted.")
    return header


def _get(handle, key: str, path: str) -> torch.Tensor:
    if key not in handle.keys():
        raise SparseFormatError(f"{path}: tensor {key!r} listed in the header is missing; the file is corrupted.")
    return handle.get_tensor(key)


def _decode_bitmask_v1(
    handle, header: dict[str, Any], path: str, verify: bool, return_masks: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    state_dict: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for name, entry in header["tensors"].items():
        try:
            shape = tuple(int(s) for s in entry["shape"])
            dtype = _dtype_from_name(entry["dtype"])
            kind = entry["kind"]
        except (KeyError, TypeError, ValueError) as err:
            raise SparseFormatError(f"{path}: header entry for {name!r} is malformed ({err}).") from err
        numel = math.prod(shape)
        if kind == "dense":
            tensor = _get(handle, entry.get("key", name), path)
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise SparseFormatError(
                    f"{path}: {name!r} is stored as {tuple(tensor.shape)} {tensor.dtype}, header says {shape} {dtype}."
                )
        elif kind == "bitmask":
            rows, cols, nnz = int(entry["rows"]), int(entry["cols"]), int(entry["nnz"])
            if rows * cols != numel or (rows, cols) != _rows_cols(shape):
                raise SparseFormatError(
                    f"{path}: bitmask view {rows}x{cols} of {name!r} does not match shape {shape}."
                )
            packed = _get(handle, entry["bitmask_key"], path)
            values = _get(handle, entry["values_key"], path)
            if packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, (cols + 7) // 8):
                raise SparseFormatError(
                    f"{path}: bitmask of {name!r} is {tuple(packed.shape)} {packed.dtype}, "
                    f"expected ({rows}, {(cols + 7) // 8}) uint8; the file is corrupted or truncated."
                )
            if values.dtype != dtype or tuple(values.shape) != (nnz,):
                raise SparseFormatError(
                    f"{path}: values of {name!r} are {tuple(values.shape)} {values.dtype}, expected ({nnz},) {dtype}."
                )
            bits = np.unpackbits(packed.numpy(), axis=1, bitorder="little")
            if bits[:, cols:].any():
                raise SparseFormatError(
                    f"{path}: padding bits of the bitmask of {name!r} are set; the file is corrupted."
                )
            mask = torch.from_numpy(np.ascontiguousarray(bits[:, :cols])).to(torch.bool).reshape(-1)
            if int(mask.sum()) != nnz:
                raise SparseFormatError(
                    f"{path}: the bitmask of {name!r} keeps {int(mask.sum())} weights but {nnz} values are stored; "
                    "the file is corrupted."
                )
            tensor = torch.zeros(numel, dtype=dtype)
            tensor[mask] = values
            tensor = tensor.reshape(shape)
            if return_masks:
                masks[name] = mask.reshape(shape)
        else:
            raise SparseFormatError(f"{path}: unknown tensor kind {kind!r} for {name!r}.")
        if verify and _sha256_tensor(tensor) != entry.get("sha256"):
            raise SparseFormatError(
                f"{path}: checksum mismatch for {name!r}: the decoded tensor differs from the one that was saved; "
                "the file is corrupted. Re-download or re-save it."
            )
        state_dict[name] = tensor
    return state_dict, masks


# A fixed registry: the format version in the header selects one of these built-in decoders, nothing else.
_BITMASK_DECODERS = {1: _decode_bitmask_v1}


# --- reading ---------------------------------------------------------------------------------------------------
def _resolve_weights_file(path: str | os.PathLike) -> Path:
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


def _verify_against_sparsity_json(weights_file: Path) -> None:
    """If a sparsity.json next to the file records its SHA-256, check it (catches corrupted dense files)."""
    record = weights_file.parent / SPARSITY_FILE_NAME
    if not record.is_file():
        return
    try:
        files = json.loads(record.read_text(encoding="utf-8")).get("files", {})
    except (json.JSONDecodeError, AttributeError):
        logger.warning("Ignoring unreadable %s next to %s", record, weights_file)
        return
    expected = files.get(weights_file.name, {}).get("sha256") if isinstance(files, dict) else None
    if expected and _sha256_file(weights_file) != expected:
        raise SparseFormatError(
            f"{weights_file}: SHA-256 differs from the one recorded in {record.name}; the file is corrupted or was "
            "modified after saving. Re-download or re-save it."
        )


def _read_weights(
    path: str | os.PathLike, *, verify: bool = True, return_masks: bool = False, check_record: bool = True
):
    weights_file = _resolve_weights_file(path)
    if verify and check_record:
        _verify_against_sparsity_json(weights_file)
    try:
        with safe_open(weights_file, framework="pt", device="cpu") as handle:
            header = _read_header(handle)
            if header is None:  # a plain dense safetensors file
                state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
                masks = {}
            else:
                decoder = _BITMASK_DECODERS[header["version"]]
                state_dict, masks = decoder(handle, header, str(weights_file), verify, return_masks)
    except SafetensorError as err:
        raise SparseFormatError(
            f"{weights_file} is not a readable safetensors file ({err}); it is truncated or corrupted. "
            "Re-download or re-save it."
        ) from err
    except (OSError, RuntimeError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise SparseFormatError(f"Could not read {weights_file} ({err}); it is truncated or corrupted.") from err
    return state_dict, masks, weights_file


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
        model: when given, the weights are loaded into it (``load_state_dict``, ``strict``) and the model is
            returned; otherwise the state dict is returned. The architecture is always the caller's choice: no
            class or loader is ever picked from a string in the checkpoint.
        verify: check the per-tensor SHA-256 of the bitmask format and, when a ``sparsity.json`` sits next to
            the file, the file's SHA-256 recorded there.

    Raises:
        SparseFormatError: the file is corrupted, truncated, inconsistent or of an unknown format version.
    """
    state_dict, _, _ = _read_weights(path, verify=verify)
    if model is None:
        return state_dict
    unwrap_model(model).load_state_dict(state_dict, strict=strict)
    return model


def load_sparse_masks(path: str | os.PathLike, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """The masks of a saved sparse checkpoint (True = kept).

    Exact for the bitmask format. For the dense format the masks are not stored; they are rebuilt from the
    layers listed in ``sparsity.json`` as "non-zero" (a kept weight that is exactly zero reads as pruned).
    """
    state_dict, masks, weights_file = _read_weights(path, verify=verify, return_masks=True)
    if masks:
        return masks
    record = weights_file.parent / SPARSITY_FILE_NAME
    if not record.is_file():
        raise FileNotFoundError(f"No masks stored in {weights_file} and no {SPARSITY_FILE_NAME} next to it.")
    layers = json.loads(record.read_text(encoding="utf-8"))["sparsity"]["layers"]
    return {name: state_dict[name] != 0 for name in layers}


# --- measuring -------------------------------------------------------------------------------------------------
def _masked_state_dict(
    model: nn.Module, masks: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    source = model.state_dict() if state_dict is None else state_dict
    missing = [name for name in masks if name not in source]
    if missing:
        raise KeyError(
            f"Masks name tensors that are not in the model's state dict: {missing[:5]}. Masks must be keyed by "
            "`named_parameters()` names of the unwrapped model."
        )
    out: dict[str, torch.Tensor] = {}
    revived = 0
    for name, tensor in source.items():
        tensor = tensor.detach().to("cpu")
        mask = masks.get(name)
        if mask is None:
            out[name] = tensor.clone().contiguous()  # no shared storage: safetensors refuses aliased tensors
            continue
        mask = mask.detach().to("cpu", torch.bool)
        if tuple(mask.shape) != tuple(tensor.shape):
            raise ValueError(f"Mask for {name!r} has shape {tuple(mask.shape)}, tensor has {tuple(tensor.shape)}")
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


def _default_masks(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without masks: treat every weight matrix/kernel (dim >= 2) as masked by its non-zero bit pattern."""
    masks = {}
    for name, param in model.named_parameters():
        tensor = state_dict.get(name)
        if tensor is not None and param.dim() >= 2 and tensor.is_floating_point():
            flat = tensor.detach().to("cpu").contiguous()
            # compare raw bits so that -0.0 counts as kept: the round trip stays bit-exact
            int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
            masks[name] = flat.view(int_dtype) != 0
    return masks


def _write_config(model: nn.Module, family: str, output_dir: Path) -> None:
    if family == "timm":
        config_path = output_dir / CONFIG_NAME
        try:  # timm's own writer of the hf-hub `config.json` (what `push_to_hf_hub` / `save_for_hf` use)
            from timm.models._hub import save_config_for_hf
        except ImportError:  # pragma: no cover - older/newer timm: take the config.json that save_for_hf writes
            from timm.models import save_for_hf

            with tempfile.TemporaryDirectory() as tmp:
                save_for_hf(model, tmp)
                shutil.copyfile(Path(tmp) / CONFIG_NAME, config_path)
        else:
            save_config_for_hf(model, str(config_path))
        config = json.loads(config_path.read_text(encoding="utf-8"))
        model_args = config.get("model_args") or {}
        if model_args.get("num_classes") == config.get("num_classes"):
            # Redundant with the top-level `num_classes` (which timm reads); transformers' TimmWrapper passes
            # num_classes itself and fails on the duplicate, so drop it: the folder then loads with both.
            del model_args["num_classes"]
            _atomic_write_text(json.dumps(config, indent=2) + "\n", config_path)
    elif family == "transformers":
        import copy

        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.save_pretrained(output_dir)


def save_sparse_model(
    model: nn.Module,
    output_dir: str | os.PathLike,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    save_format: str = "dense",
    metadata: Mapping[str, Any] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    enforce_masks: bool = True,
) -> dict[str, Any]:
    """Save a pruned model with its ``sparsity.json``; returns the ``sparsity.json`` content.

    Args:
        model: the pruned model (timm, transformers or any ``nn.Module``; wrappers are unwrapped).
        output_dir: folder to write (created if needed). Stale weights of the other format are removed.
        masks: ``{parameter name: bool tensor}``, True = kept (as from ``hf_tgprune.masking.global_masks``).
            Weights are saved as exact zero wherever the mask is False. Without masks, every weight of dim >= 2
            is reported (and, for ``"bitmask"``, encoded) by its non-zero pattern.
        save_format: ``"dense"`` (loads with plain timm/transformers) or ``"bitmask"`` (compact; load with
            :func:`load_sparse`).
        metadata: extra JSON-able fields for ``sparsity.json``, conventionally ``method``, ``hyperparameters``,
            ``teacher``, ``base_model``, ``calibration_size``, ``dataset``, ``metrics`` (e.g.
            ``{"dense": {...}, "pruned": {...}}``), ``target_sparsity``.
        state_dict: the state dict to save instead of ``model.state_dict()`` (e.g. gathered by Accelerate).
        enforce_masks: zero the weights outside the masks in the file (default). False saves the weights as they
            are (masks are only reported; for training checkpoints of schedules that keep dense weights under a
            mask); dense format only.
    """
    if save_format not in SAVE_FORMATS:
        raise ValueError(f"save_format must be one of {SAVE_FORMATS}, got {save_format!r}")
    if not enforce_masks and save_format != "dense":
        raise ValueError("enforce_masks=False keeps weights outside the mask, which only save_format='dense' stores")
    metadata = dict(metadata or {})
    clash = _RESERVED_METADATA_KEYS & metadata.keys()
    if clash:
        raise ValueError(f"metadata keys {sorted(clash)} are reserved for values measured by save_sparse_model")
    model = unwrap_model(model)
    family = get_adapter(model).name
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    masks_given = masks is not None
    enforced = masks_given and enforce_masks
    if enforced:
        tensors = _masked_state_dict(model, masks, state_dict)
    else:
        source = model.state_dict() if state_dict is None else state_dict
        tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in source.items()}
    if masks_given:
        masks = {name: m.detach().to("cpu", torch.bool) for name, m in masks.items()}
        for name, mask in masks.items():
            if name not in tensors or tuple(tensors[name].shape) != tuple(mask.shape):
                raise KeyError(f"Mask {name!r} {tuple(mask.shape)} matches no tensor of the model's state dict")
    else:
        masks = _default_masks(model, tensors)

    weights_name = DENSE_WEIGHTS_NAME if save_format == "dense" else BITMASK_WEIGHTS_NAME
    stale = BITMASK_WEIGHTS_NAME if save_format == "dense" else DENSE_WEIGHTS_NAME
    if (output_dir / stale).exists():
        logger.info("Removing stale %s from %s", stale, output_dir)
        (output_dir / stale).unlink()

    if save_format == "dense":
        if family == "transformers":
            model.save_pretrained(output_dir, state_dict=tensors)
            if not (output_dir / DENSE_WEIGHTS_NAME).is_file():
                raise RuntimeError(
                    f"save_pretrained did not write a single {DENSE_WEIGHTS_NAME} in {output_dir} (sharded?); "
                    "sparse checkpoints expect one weights file."
                )
        else:
            _write_config(model, family, output_dir)
            _atomic_save_file(tensors, output_dir / DENSE_WEIGHTS_NAME, metadata={"format": "pt"})
    else:
        _write_config(model, family, output_dir)
        encoded, file_metadata = encode_bitmask_state_dict(tensors, masks)
        _atomic_save_file(encoded, output_dir / BITMASK_WEIGHTS_NAME, metadata=file_metadata)
    del tensors

    # Re-open what was written and measure from it (never from the in-memory model).
    weights_file = output_dir / weights_name
    saved, _, _ = _read_weights(weights_file, verify=True, check_record=False)
    for name, mask in masks.items():
        if masks_given and name not in saved:
            raise RuntimeError(f"{weights_file} does not contain the masked tensor {name!r}")
        if enforced and bool((saved[name][~mask] != 0).any()):
            raise RuntimeError(f"{weights_file}: {name!r} is non-zero where the mask prunes it")
    parameter_names = [name for name, _ in model.named_parameters()]
    report = measure_sparsity(saved, [name for name in masks if name in saved], parameter_names)
    report["pruned_by_mask"] = int(sum(int((~m).sum()) for m in masks.values())) if masks_given else None
    report["masks_enforced"] = enforced
    if masks_given and not enforced:
        report["nonzero_outside_mask"] = int(sum(int((saved[n][~m] != 0).sum()) for n, m in masks.items()))
    del saved

    files = {weights_name: {"sha256": _sha256_file(weights_file), "bytes": weights_file.stat().st_size}}
    record: dict[str, Any] = {
        "format": save_format,
        "weights_file": weights_name,
        "files": files,
        "model_family": family,
        "sparsity": report,
        "mask": {
            "sha256": mask_hash(masks) if masks_given else None,
            "source": "masks" if masks_given else "non-zero weights",
        },
        "library": _library_versions(),
    }
    record.update(_jsonable(metadata))
    _atomic_write_text(
        json.dumps(_jsonable(record), indent=2, sort_keys=False) + "\n", output_dir / SPARSITY_FILE_NAME
    )
    return record


def read_sparsity_record(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``sparsity.json`` of a saved folder."""
    path = Path(folder) / SPARSITY_FILE_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{folder} has no {SPARSITY_FILE_NAME}; was it written by save_sparse_model?"
        ) from None
    except json.JSONDecodeError as err:
        raise SparseFormatError(f"{path} is not valid JSON ({err})") from err
