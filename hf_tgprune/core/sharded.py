"""One global threshold over scores that are sharded across processes, without gathering them.

`global_masks` selects exactly `round(sparsity · N)` weights by a two-pass radix select over int32 keys. The same
selection runs over shards: every process builds the 65,536-bin histograms of its own shards, the histograms are
summed over processes (`all_reduce`), and every process then knows the threshold. Ties at the threshold are broken
exactly as `global_masks` breaks them over the full tensors (earlier layers, then lower flat index, pruned first):
with each layer split along its first dimension in rank order (FSDP2's `Shard(0)`), a layer's flat index order is
rank order, so one all-reduced table of tie counts per (layer, rank) says how many ties each process prunes. Extra
memory per process: one layer's keys, two histograms and that table; the score vector is never materialised.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping

import torch

from .dtensor import fsdp_mesh, is_sharded, like, local
from .masking import _NUM_BINS, _check_scores, _select_bin, _sortable_keys

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def sharded_global_masks(
    local_scores: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    all_reduce: AllReduce,
    rank: int,
    world_size: int,
    replicated: Collection[str] = (),
    zeros_first: Mapping[str, torch.Tensor] | None = None,
    fill: float = -1.0,
) -> dict[str, torch.Tensor]:
    """The masks of this process's shards that `global_masks` would give over the full scores, bit for bit.

    Args:
        local_scores: this process's shard of every layer's scores, the layers in the same order on every process;
            a layer sharded along dim 0 in rank order (an empty shard is allowed).
        sparsity: the target, in [0, 1): exactly `round(sparsity · N)` weights are pruned over all processes.
        all_reduce: sums a tensor over the processes and returns the sum (e.g. `torch.distributed.all_reduce` in
            place, then the tensor).
        rank: this process's rank.
        world_size: the number of processes.
        replicated: layers that every process holds whole (not sharded), with equal scores everywhere; counted once.
        zeros_first: this process's shards of the weights: where a weight is exactly zero its score counts as
            `fill` (as `prune_zeros_first` does, but one layer at a time, without a copy of the scores).
        fill: the score of a zero weight (below every score of every process).

    Returns:
        bool masks shaped like `local_scores` (True = kept); equal on every process for replicated layers.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if not local_scores:
        raise ValueError("sharded_global_masks needs at least one layer of scores")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    names = list(local_scores)
    device = next(iter(local_scores.values())).device
    # non-finite scores on any process: every process raises (one raising alone would leave the others waiting)
    local_bad = sum(not bool(torch.isfinite(local_scores[name]).all()) for name in names)
    if int(all_reduce(torch.tensor([local_bad], dtype=torch.int64, device=device)).item()):
        _check_scores(local_scores)  # names the layer on the process that holds it
        raise ValueError(
            "Importance scores on another process are not finite (NaN or inf); its error names the layer. The usual "
            "cause is a NaN or inf weight or activation in the model."
        )

    def counted(name: str) -> bool:  # a replicated layer is counted by rank 0 only
        return name not in replicated or rank == 0

    fill_key = int(_sortable_keys(torch.tensor([fill], dtype=torch.float32), True)[0])

    def keys_of(name: str) -> torch.Tensor:  # the flip for negative keys is exact whatever the shard holds
        keys = _sortable_keys(local_scores[name], True)  # a new tensor: filled in place
        if zeros_first is not None:
            keys.masked_fill_(zeros_first[name].detach().reshape(-1).to(keys.device) == 0, fill_key)
        return keys

    local_total = sum(local_scores[n].numel() for n in names if counted(n))
    total = int(all_reduce(torch.tensor([local_total], dtype=torch.int64, device=device)).item())
    target = int(round(sparsity * total))
    if target == 0:
        return {name: torch.ones_like(s, dtype=torch.bool) for name, s in local_scores.items()}

    def summed_histogram(bins_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        histogram = torch.zeros(_NUM_BINS, dtype=torch.int64, device=device)
        for name in names:
            if counted(name):
                histogram += torch.bincount(bins_of(keys_of(name)), minlength=_NUM_BINS).to(device)
        return all_reduce(histogram)

    high_bin, below = _select_bin(summed_histogram(lambda keys: (keys >> 16) + _NUM_BINS // 2), target)
    in_high_bin = high_bin - _NUM_BINS // 2
    low_bin, below_in_bin = _select_bin(
        summed_histogram(lambda keys: keys[(keys >> 16) == in_high_bin] & 0xFFFF), target - below
    )
    threshold = (in_high_bin << 16) | low_bin
    ties_to_prune = target - below - below_in_bin

    # how many keys equal the threshold in each (layer, rank) shard: the tie-break order is layer, then rank
    ties = torch.zeros(len(names), world_size, dtype=torch.int64, device=device)
    for i, name in enumerate(names):
        if counted(name):
            ties[i, rank] = int((keys_of(name) == threshold).sum())
    ties = all_reduce(ties).cpu()
    before = ties.reshape(-1).cumsum(0) - ties.reshape(-1)  # ties earlier in (layer, rank) order

    masks = {}
    for i, name in enumerate(names):
        keys = keys_of(name)
        owner = 0 if name in replicated else rank  # a replicated layer's ties sit at rank 0's place in the order
        slot = i * world_size + owner
        prune_here = max(0, min(int(ties.reshape(-1)[slot]), ties_to_prune - int(before[slot])))
        keep = keys > threshold
        at_threshold = (keys == threshold).nonzero().reshape(-1)
        keep[at_threshold[prune_here:]] = True
        masks[name] = keep.reshape(local_scores[name].shape)
    return masks


def select_sharded_masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    weights: Mapping[str, torch.Tensor] | None = None,
    min_density: float = 0.0,
    allocation: str = "global",
) -> dict[str, torch.Tensor]:
    """`select_masks` for scores that are DTensors sharded as FSDP2 shards their weights: the same masks, bit for
    bit, as DTensors laid out like the scores, computed from local shards and all-reduced histograms only.

    Args:
        scores: DTensor scores (`Shard(0)` on one 1-D device mesh), one per prunable weight, in the same order on
            every process; plain tensors for weights every process holds whole (outside every `fully_shard` unit),
            equal everywhere and counted once.
        sparsity: the target, in [0, 1).
        weights: the (sharded) weights; when given, weights that are already zero are pruned first.
        min_density: must be 0: a per-layer guard would need each layer's top-k across shards.
        allocation: must be `"global"`.
    """
    if allocation != "global":
        raise ValueError(
            f"layer_allocation={allocation!r} is not available for sharded (FSDP2) weights, only 'global' (one "
            "threshold over all layers). Set layer_allocation='global', or prune the unsharded model."
        )
    if min_density > 0:
        raise ValueError(
            f"A per-layer minimum density ({min_density:.4g}, from min_layer_density / layer_density_floor) is not "
            "available for sharded (FSDP2) weights. Set min_layer_density=0 and layer_density_floor=0, or prune the "
            "unsharded model."
        )
    mesh = fsdp_mesh(scores.values())
    if mesh is None:
        raise ValueError("select_sharded_masks needs DTensor scores; use select_masks for plain tensors.")
    replicated = {name for name, score in scores.items() if not is_sharded(score)}  # equal on every process
    local_scores = {name: local(score) for name, score in scores.items()}
    fill, local_weights = -1.0, None
    if weights is not None:  # zero weights first, below the lowest score of every shard (as prune_zeros_first)
        lowest = min((float(s.min()) for s in local_scores.values() if s.numel()), default=math.inf)
        # the lowest score over all shards (max of negatives), on the mesh's device (NCCL reduces CUDA tensors only)
        lowest = torch.tensor([-lowest], dtype=torch.float64, device=mesh.device_type)
        import torch.distributed as dist

        dist.all_reduce(lowest, op=dist.ReduceOp.MAX, group=mesh.get_group())
        fill = min(-1.0, -float(lowest) - 1.0)
        local_weights = {name: local(weights[name]) for name in scores}
    masks = sharded_global_masks(
        local_scores,
        sparsity,
        all_reduce=process_group_all_reduce(mesh.get_group()),
        rank=mesh.get_local_rank(),
        world_size=mesh.size(),
        replicated=replicated,
        zeros_first=local_weights,
        fill=fill,
    )
    return {name: like(mask, scores[name]) for name, mask in masks.items()}


def process_group_all_reduce(group=None) -> AllReduce:
    """`all_reduce` for `sharded_global_masks` over a `torch.distributed` process group (sum, in place)."""
    import torch.distributed as dist

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    return reduce
