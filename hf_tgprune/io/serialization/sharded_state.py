"""``pruning_state_sharded/``: the pruning state of a model sharded by FSDP2, written and read shard by shard.

Every process writes the rows of the masks it holds through `torch.distributed.checkpoint` with its safetensors
storage (`HuggingFaceStorageWriter(save_distributed=True)`: one ``shard-*.safetensors`` file per process, each
header giving the offsets of its rows), and rank 0 writes ``header.json`` (method, settings, target sparsity, the
SHA-256 of the full masks, :func:`hf_tgprune.core.masking.mask_hash`, and the layout of the method's own tensors).
A method's tensors (``method.<kind>.<weight>``, e.g. the summed squared gradients of `gradual`) are laid out like
that weight's mask and written the same way. Reading loads into tensors laid out like the current parameters, so a
checkpoint resumes on another number of processes, or unsharded in one. No mask is ever gathered whole on one
process, and no file is unpickled: safetensors and JSON only.

The folder is written as ``pruning_state_sharded.partial`` and renamed when complete (``header.json`` is written
last); a reader refuses a folder without it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping

import torch

from ...core.dtensor import is_sharded, like, local, on_rank_zero
from ...core.masking import MaskFileError, mask_hash
from ...core.utils import atomic_path
from .pruning_state import FORMAT_VERSION, PruningState

SHARDED_STATE_NAME = "pruning_state_sharded"
HEADER_NAME = "header.json"
_MASK = "mask."
_METHOD = "method."
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        import torch.distributed as dist

        dist.barrier()


def _method_tensor_layout(method_tensors: Mapping[str, torch.Tensor], state: PruningState) -> dict[str, dict]:
    """{key: {"like": mask name, "dtype": name}} of a method's tensors, each keyed `<kind>.<weight name>` and shaped
    like that weight's mask (e.g. `gradual`'s summed squared gradients), so a reader lays it out like the weight."""
    layout = {}
    for key, tensor in method_tensors.items():
        name = key.partition(".")[2]
        dtype = str(tensor.dtype).removeprefix("torch.")
        if name not in state.masks or tuple(tensor.shape) != tuple(state.masks[name].shape) or dtype not in _DTYPES:
            raise ValueError(
                f"pruning_method={state.pruning_method!r} keeps a tensor {key!r} ({dtype}, shape "
                f"{tuple(tensor.shape)}) that is not laid out like a weight's mask, so it cannot be written shard by "
                "shard. Prune the unsharded model with this method."
            )
        layout[key] = {"like": name, "dtype": dtype}
    return layout


def write_sharded_pruning_state(state: PruningState, folder: str | os.PathLike) -> None:
    """Write `state` (masks that are DTensors) into ``folder/pruning_state_sharded``; every process must call it."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter, save

    if state.masks is None or not any(is_sharded(mask) for mask in state.masks.values()):
        raise ValueError("write_sharded_pruning_state writes sharded (DTensor) masks; use write_pruning_state.")
    method_state = dict(state.method_state)
    method_tensors = method_state.pop("tensors", None) or {}
    layout = _method_tensor_layout(method_tensors, state)
    target = os.path.join(folder, SHARDED_STATE_NAME)
    partial = f"{target}.partial"

    def start() -> None:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)

    on_rank_zero(start)
    digest = mask_hash(state.masks)  # collective: every process gathers each layer's mask in turn
    tensors = {f"{_MASK}{name}": mask for name, mask in state.masks.items()}
    tensors.update({f"{_METHOD}{key}": tensor for key, tensor in method_tensors.items()})
    save(tensors, storage_writer=HuggingFaceStorageWriter(partial, save_distributed=True))
    _barrier()

    def publish() -> None:  # the header last, then the folder in place of the previous one
        header = {
            "format_version": FORMAT_VERSION,
            "pruning_method": str(state.pruning_method),
            "pruning_method_args": state.pruning_method_args,
            "target_sparsity": float(state.target_sparsity),
            "method_state": method_state,
            "method_tensors": layout,
            "masks": {name: list(mask.shape) for name, mask in state.masks.items()},
            "mask_sha256": digest,
        }
        with atomic_path(os.path.join(partial, HEADER_NAME)) as tmp, open(tmp, "w") as handle:
            json.dump(header, handle, indent=1, sort_keys=True)
        old = f"{target}.old"
        if os.path.isdir(target):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(partial, target)
        shutil.rmtree(old, ignore_errors=True)

    on_rank_zero(publish)  # a failure there (a full disk) is raised on every process


def read_sharded_pruning_state(folder: str | os.PathLike, params: Mapping[str, torch.Tensor]) -> PruningState:
    """Read ``folder/pruning_state_sharded`` into masks laid out like `params` (DTensors or plain tensors); every
    process must call it.

    Raises:
        MaskFileError: the folder is incomplete or corrupted, names other weights, or its masks do not match the
            hash in its header.
    """
    from torch.distributed.checkpoint import HuggingFaceStorageReader, load

    path = os.path.join(folder, SHARDED_STATE_NAME)
    fix = "Resume from an earlier checkpoint or prune again."
    try:
        with open(os.path.join(path, HEADER_NAME)) as handle:
            header = json.load(handle)
        shapes = {name: tuple(shape) for name, shape in header["masks"].items()}
        layout = {
            key: (str(entry["like"]), _DTYPES[entry["dtype"]])
            for key, entry in dict(header.get("method_tensors", {})).items()
        }
        # each keyed `<kind>.<weight>` after the weight it is laid out like, at most two per weight (what a method
        # keeps: sums or dense weights), so the allocation below stays within the size of the model
        if any(key.partition(".")[2] != like for key, (like, _) in layout.items()) or len(layout) > 2 * len(shapes):
            raise ValueError("method_tensors names tensors that are not laid out like the weights they name")
        state = PruningState(
            pruning_method=str(header["pruning_method"]),
            target_sparsity=float(header["target_sparsity"]),
            pruning_method_args=dict(header["pruning_method_args"]),
            method_state=dict(header["method_state"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise MaskFileError(
            f"Cannot read the sharded pruning state {path!r} ({err}); it is incomplete. {fix}"
        ) from err
    wrong = {n for n in set(shapes) | set(params) if n not in params or shapes.get(n) != tuple(params[n].shape)}
    wrong |= {like for like, _ in layout.values() if like not in shapes}
    if wrong:
        raise MaskFileError(
            f"The sharded pruning state {path!r} holds masks for other weights than this model's (e.g. "
            f"{sorted(wrong)[:3]}). Resume with the model it was written for."
        )
    masks = {}
    for name in shapes:  # on the parameters' devices: the hash gathers them (NCCL moves CUDA tensors only)
        shard = local(params[name])
        masks[name] = like(torch.zeros(shard.shape, dtype=torch.bool, device=shard.device), params[name])
    method_tensors = {}
    for key, (name, dtype) in layout.items():  # each laid out like its weight: no larger than the weight's shard
        shard = local(params[name])
        method_tensors[key] = like(torch.zeros(shard.shape, dtype=dtype, device=shard.device), params[name])
    try:
        load(
            {
                **{f"{_MASK}{name}": mask for name, mask in masks.items()},
                **{f"{_METHOD}{key}": tensor for key, tensor in method_tensors.items()},
            },
            storage_reader=HuggingFaceStorageReader(path),
            no_dist=not _distributed(),  # one process reading a sharded state: the whole masks, from every file
        )
    except Exception as err:  # DCP's and safetensors' own error types
        raise MaskFileError(f"Cannot read the sharded pruning state {path!r} ({err}). {fix}") from err
    if mask_hash(masks) != header["mask_sha256"]:
        raise MaskFileError(
            f"The masks in {path!r} do not match the hash recorded when they were written "
            f"({str(header['mask_sha256'])[:12]}...): a file was modified or corrupted. {fix}"
        )
    state.masks = masks
    if method_tensors:
        state.method_state["tensors"] = method_tensors
    return state
