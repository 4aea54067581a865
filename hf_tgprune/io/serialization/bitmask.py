"""The ``bitmask`` format: per masked weight a packed bitmask and the kept values, in one safetensors file.

``<name>::bitmask`` (uint8, ``(rows, ceil(cols / 8))``, little bit order, the weight viewed as ``(out, -1)``) and
``<name>::values`` (the kept entries in row-major order, original dtype); every other tensor is stored unchanged.
A JSON header in the safetensors metadata records every tensor's shape, dtype, kind and the SHA-256 of its decoded
bytes, so a corrupted or truncated file is a :class:`SparseFormatError`, never a silently wrong model.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .formats import SparseFormatError, sha256_tensor

BITMASK_FORMAT = "hf_tgprune.bitmask"
BITMASK_FORMAT_VERSION = 1
HEADER_KEY = "hf_tgprune.header"


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
        entry["sha256"] = sha256_tensor(tensor)
        entries[name] = entry
    header = {"format": BITMASK_FORMAT, "version": BITMASK_FORMAT_VERSION, "tensors": entries}
    header["header_sha256"] = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    metadata = {"format": "pt", HEADER_KEY: json.dumps(header, sort_keys=True)}
    return tensors, metadata


def read_bitmask_header(handle) -> dict[str, Any] | None:
    metadata = handle.metadata() or {}
    raw = metadata.get(HEADER_KEY)
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
    if version not in BITMASK_DECODERS:
        raise SparseFormatError(
            f"Sparse format version {version!r} is not supported by this hf_tgprune (knows {sorted(BITMASK_DECODERS)});"
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
        if verify and sha256_tensor(tensor) != entry.get("sha256"):
            raise SparseFormatError(
                f"{path}: checksum mismatch for {name!r}: the decoded tensor differs from the one that was saved; "
                "the file is corrupted. Re-download or re-save it."
            )
        state_dict[name] = tensor
    return state_dict, masks


# A fixed registry: the format version in the header selects one of these built-in decoders, nothing else.
BITMASK_DECODERS = {1: _decode_bitmask_v1}


def decode_bitmask(
    handle, header: dict[str, Any], path: str, *, verify: bool = True, return_masks: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state dict, masks) of an open bitmask file whose header :func:`read_bitmask_header` returned.

    Args:
        verify: check the SHA-256 of every decoded tensor against the header.
        return_masks: also return the masks of the masked tensors (True = kept); otherwise the masks are empty.
    """
    return BITMASK_DECODERS[header["version"]](handle, header, path, verify, return_masks)
