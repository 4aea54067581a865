"""``pruning_state.safetensors``: everything a checkpoint needs to continue pruning, in one file.

One writer (:func:`write_pruning_state`) and one reader (:func:`read_pruning_state`). The file holds the masks
(``mask.<parameter>``, bool) and the method's tensors (``method.<key>``, e.g. DG2PF's dense weights under the mask);
its safetensors header holds the method, its settings, the target sparsity, the method's JSON state and the
SHA-256 of the masks (:func:`hf_tgprune.core.masking.mask_hash`). The reader recomputes the hash and refuses a file
whose masks do not match it, so a truncated, edited or swapped file is an error, never other masks. safetensors
only: reading never unpickles or executes anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ...core.masking import MaskFileError, mask_hash
from ...core.utils import atomic_path

PRUNING_STATE_NAME = "pruning_state.safetensors"
FORMAT_VERSION = "2"
_MASK, _METHOD = "mask.", "method."


@dataclass
class PruningState:
    """The content of a pruning-state file."""

    pruning_method: str
    target_sparsity: float
    masks: dict[str, torch.Tensor] | None = None
    pruning_method_args: dict[str, Any] = field(default_factory=dict)
    method_state: dict[str, Any] = field(default_factory=dict)  # JSON-able values, tensors under "tensors"

    @property
    def mask_sha256(self) -> str | None:
        return None if self.masks is None else mask_hash(self.masks)


def write_pruning_state(state: PruningState, path: str | os.PathLike) -> None:
    """Write `state` atomically (a temporary file in the same folder, then a rename)."""
    from safetensors.torch import save_file

    method_state = dict(state.method_state)
    tensors = {
        f"{_METHOD}{k}": v.detach().cpu().contiguous() for k, v in (method_state.pop("tensors", None) or {}).items()
    }
    if state.masks is not None:
        tensors.update({f"{_MASK}{k}": m.detach().to("cpu", torch.bool).contiguous() for k, m in state.masks.items()})
    header = {
        "format_version": FORMAT_VERSION,
        "pruning_method": str(state.pruning_method),
        "pruning_method_args": json.dumps(state.pruning_method_args, sort_keys=True),
        "target_sparsity": repr(float(state.target_sparsity)),
        "method_state": json.dumps(method_state, sort_keys=True),
        "has_masks": "1" if state.masks is not None else "0",
        "mask_sha256": state.mask_sha256 or "",
    }
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, header)


def read_pruning_state(path: str | os.PathLike) -> PruningState:
    """Read and verify a file written by :func:`write_pruning_state`.

    Raises:
        MaskFileError: the file is truncated or corrupted, or its masks do not match the hash in its header.
    """
    from safetensors import safe_open

    path = str(path)
    fix = "Resume from an earlier checkpoint or prune again."
    try:
        with safe_open(path, framework="pt") as handle:
            header = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        method_state = json.loads(header["method_state"])
        state = PruningState(
            pruning_method=header["pruning_method"],
            target_sparsity=float(header["target_sparsity"]),
            pruning_method_args=json.loads(header["pruning_method_args"]),
            method_state=method_state if isinstance(method_state, dict) else {},
        )
        has_masks = header["has_masks"] == "1"
    except Exception as err:  # safetensors' own error types, a missing or garbled header field
        raise MaskFileError(
            f"Cannot read the pruning state {path!r} ({err}); it is truncated or corrupted. {fix}"
        ) from err
    if has_masks:
        state.masks = {k[len(_MASK) :]: t.to(torch.bool) for k, t in tensors.items() if k.startswith(_MASK)}
        if state.mask_sha256 != header.get("mask_sha256"):
            raise MaskFileError(
                f"The masks in {path!r} do not match the hash recorded when they were written "
                f"({header.get('mask_sha256', '')[:12]}...): the file was modified or corrupted. {fix}"
            )
    method_tensors = {k[len(_METHOD) :]: t for k, t in tensors.items() if k.startswith(_METHOD)}
    if method_tensors:
        state.method_state["tensors"] = method_tensors
    return state


def checkpoint_masks(folder: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The verified masks of a checkpoint folder (None when it has no pruning state or no masks)."""
    path = os.path.join(folder, PRUNING_STATE_NAME)
    return read_pruning_state(path).masks if os.path.isfile(path) else None
