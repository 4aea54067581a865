"""Parameters sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`): the few helpers the rest of `core` needs.

Under FSDP2 every parameter is a `DTensor` whose local shard is a contiguous block of rows (`Shard(0)` on a 1-D
device mesh, rank 0 first; shards may be uneven or empty). hf_tgprune keeps scores and masks of such a parameter as
DTensors with the same layout: each process holds the rows of its own shard only, and elementwise work (masking a
weight, its gradient or its optimizer state) runs on local shards without communication. What needs every shard
(counts, the global threshold, a hash) reduces small tensors over the mesh's process group instead of gathering.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

try:  # torch.distributed is optional in some builds; without it nothing is ever sharded
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = Shard = None


def is_sharded(tensor) -> bool:
    """Whether `tensor` is a DTensor (a parameter, score or mask sharded across processes)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (sharing its storage); any other tensor as it is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def like(local_tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`local_tensor` (this process's shard) as a DTensor laid out like `reference`; unchanged if `reference` is not
    sharded."""
    if not is_sharded(reference):
        return local_tensor
    return DTensor.from_local(
        local_tensor, reference.device_mesh, reference.placements, shape=reference.shape, stride=reference.stride()
    )


def fsdp_mesh(tensors: Iterable[torch.Tensor]):
    """The device mesh that shards `tensors` as FSDP2 does (`Shard(0)` on one 1-D mesh), or None if none is sharded.
    Tensors that are not DTensors (parameters outside every `fully_shard` unit) are replicated: every process holds
    them whole and equal.

    Raises:
        ValueError: a layout other than FSDP2's (HSDP's 2-D mesh, tensor parallelism's `Shard(1)` / `Replicate`), or
            two different meshes.
    """
    sharded = [t for t in tensors if is_sharded(t)]
    if not sharded:
        return None
    mesh = sharded[0].device_mesh
    for tensor in sharded:
        if tensor.device_mesh != mesh or mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),):
            raise ValueError(
                f"A prunable weight is laid out as {tuple(tensor.placements)} on {tensor.device_mesh}: hf_tgprune "
                "prunes parameters sharded as FSDP2's fully_shard shards them (Shard(0) on one 1-D mesh). Use "
                "fully_shard without a 2-D (HSDP) mesh or tensor parallelism while pruning."
            )
    return mesh


def sum_over_mesh(tensor: torch.Tensor, mesh) -> torch.Tensor:
    """Sum `tensor` over the processes of `mesh` in place and return it (unchanged when `mesh` is None)."""
    if mesh is not None:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=mesh.get_group())
    return tensor


def mesh_of(tensors: Iterable[torch.Tensor]):
    """The device mesh of the first sharded tensor among `tensors` (None if none is sharded); no checks."""
    return next((t.device_mesh for t in tensors if is_sharded(t)), None)


def shard_like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """This process's rows of the full tensor `full`, as a DTensor laid out like `reference` (sliced locally, no
    communication); `full` itself when `reference` is not sharded."""
    if not is_sharded(reference) or is_sharded(full):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        full.to(local(reference).device), reference.device_mesh, reference.placements, src_data_rank=None
    )


def reshard(module: torch.nn.Module | None) -> None:
    """Put every FSDP2 module of `module` back in its sharded state. FSDP2 keeps the root's parameters gathered after
    a forward that no backward followed (it expects one); a forward run only to inspect, score with a teacher or
    recalibrate BatchNorm would otherwise leave whole weights on every process."""
    if module is None:
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for child in module.modules():
        if isinstance(child, FSDPModule):
            child.reshard()


def full_state_dict_on_rank_zero(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of a model sharded by FSDP2 on rank 0 (CPU tensors, gathered one at a time, so rank 0
    holds the model once in CPU memory and no process holds it on its device); empty on the other ranks. Every process
    must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_masks_on_rank_zero(masks) -> dict[str, torch.Tensor] | None:
    """Sharded masks as full CPU bool tensors on rank 0 (one layer gathered at a time), None on the other ranks; every
    process must call it. Masks that are not sharded are returned as they are."""
    if masks is None:
        return None
    import torch.distributed as dist

    rank_zero = not dist.is_initialized() or dist.get_rank() == 0
    full = {}
    for name, mask in masks.items():
        gathered = mask.full_tensor() if is_sharded(mask) else mask
        if rank_zero:
            full[name] = gathered.to("cpu")
    return full if rank_zero else None


def load_full_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a full state dict that rank 0 holds (an empty dict on the other ranks) into a model sharded by FSDP2:
    every process receives its own rows, broadcast from rank 0 one tensor at a time. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(
        model, state_dict, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    )


def on_rank_zero(fn):
    """Run `fn()` on rank 0 only and make its failure every process's: the others would otherwise wait forever in the
    next collective. Returns `fn()`'s result on rank 0 (and in a single process), None elsewhere."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except BaseException as err:  # re-raised below, after the other processes have heard of it
            error = err
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    failed = torch.tensor([0 if error is None else 1], device=device)
    dist.broadcast(failed, src=0)
    if error is not None:
        raise error
    if int(failed):
        raise RuntimeError(
            "Rank 0 failed in a step only it runs (writing or reading a file); its error is in its log."
        )
    return result
