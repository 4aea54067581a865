"""Masks: which weights are prunable, one global threshold, applying masks, measuring sparsity.

This is the functional core every pruning method calls (in the spirit of `torch.nn.utils.prune`):

    params = prunable_parameters(model)
    masks = global_masks(scores, sparsity=0.95)   # exactly round(0.95 * N) weights pruned
    apply_masks(model, masks)
    report = sparsity_report(model, masks)

Masks are bool tensors shaped like their parameter, **True = kept**, keyed by parameter name.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .adapters import classifier_parameter_names, unwrap_model
from .dtensor import is_sharded, local, mesh_of, sum_over_mesh
from .utils import match_patterns

PRUNABLE_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NUM_BINS = 1 << 16
# class names of convolutions that standardise their stored weight in `forward` (timm's StdConv2d / ScaledStdConv2d
# and their "Same" variants, transformers' BiT): a zero stored weight is not a zero in the kernel they compute with
STANDARDIZED_CONV_CLASSES = frozenset({
    "StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame", "WeightStandardizedConv2d",
    "BitWeightStandardizedConv2d",
})  # fmt: skip
# share of all parameters above which a matrix that is not pruned is named in the report
LARGE_MATRIX_SHARE = 0.01


def default_prunable_names(model: nn.Module) -> set[str]:
    """The weights pruned by default: conv and linear weights, `nn.MultiheadAttention`'s input projections and the
    weight matrices of `nn.LSTM` / `nn.GRU` / `nn.RNN` (the masks are enforced on any parameter; the sparse inference
    export leaves the latter two dense)."""
    names = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, PRUNABLE_MODULE_TYPES) and getattr(module, "weight", None) is not None:
            names.add(f"{prefix}weight")
        elif isinstance(module, nn.MultiheadAttention):
            names |= {
                prefix + name
                for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
                if getattr(module, name, None) is not None
            }
        elif isinstance(module, nn.RNNBase):
            names |= {
                prefix + name for name, _ in module.named_parameters(recurse=False) if name.startswith("weight_")
            }
    return names


def standardized_weight_layers(model: nn.Module, names: Iterable[str]) -> list[str]:
    """The parameters among `names` that a weight-standardised convolution holds: stored sparse, computed dense
    (the kernel it convolves with is `(w - mean) / std`, non-zero where `w` is pruned)."""
    model = unwrap_model(model)
    owners = {
        f"{module_name}.weight" if module_name else "weight": type(module).__name__
        for module_name, module in model.named_modules()
    }
    return [name for name in names if owners.get(name) in STANDARDIZED_CONV_CLASSES]


def empty_layers(masks: Mapping[str, torch.Tensor]) -> list[str]:
    """Layers whose mask keeps no weight (the layer outputs only its bias from then on)."""
    kept = _summed_counts(masks.values(), lambda mask: mask.sum())
    return [name for name, count in zip(masks, kept.tolist()) if count == 0]


def _summed_counts(tensors: Iterable[torch.Tensor], count) -> torch.Tensor:
    """`count(local shard)` of every tensor as one int64 tensor, summed over the processes that shard them (one
    all-reduce for all of them; a `DTensor` reduced to a number directly would give its local part only)."""
    tensors = list(tensors)
    return summed_over_shards([int(count(local(t))) for t in tensors], tensors)


def summed_over_shards(counts: Sequence[int], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """This process's `counts` (one per tensor of `tensors`) summed over the processes that shard those tensors, as
    an int64 CPU tensor; a tensor every process holds whole (replicated next to sharded ones) is counted once."""
    mesh = mesh_of(tensors)
    if mesh is None:
        return torch.tensor(list(counts), dtype=torch.int64)
    first = mesh.get_local_rank() == 0
    counted = [c if is_sharded(t) or first else 0 for c, t in zip(counts, tensors)]
    # on the mesh's device: NCCL reduces CUDA tensors only
    return sum_over_mesh(torch.tensor(counted, dtype=torch.int64, device=mesh.device_type), mesh).cpu()


def large_unprunable_matrices(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Weight matrices (dim >= 2) that are not pruned and hold at least `LARGE_MATRIX_SHARE` of all parameters
    (e.g. embeddings, heads, weights outside the default prunable set): name -> number of values."""
    params = dict(unwrap_model(model).named_parameters())
    total = sum(p.numel() for p in params.values())
    return {
        name: p.numel()
        for name, p in params.items()
        if p.dim() >= 2 and name not in masks and p.numel() >= LARGE_MATRIX_SHARE * total
    }


def _matching(names: Iterable[str], patterns: list[str] | None, argument: str) -> set[str]:
    return match_patterns(names, patterns, argument, what="prunable parameter")


def prunable_parameters(
    model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
) -> dict[str, nn.Parameter]:
    """Parameters to prune, in `named_parameters()` order.

    By default (`default_prunable_names`): the weights of convolutions and linear layers, the input projections of
    `nn.MultiheadAttention` and the weight matrices of recurrent layers, except the classifier head. `include`
    patterns select among all weight tensors of dimension >= 2 (so the head can be opted in); `exclude` patterns
    remove parameters. Biases and normalisation parameters are never pruned.
    """
    model = unwrap_model(model)
    candidates = {name: p for name, p in model.named_parameters() if p.dim() >= 2}
    if include:
        selected = _matching(candidates, include, "prune_include")
    else:
        selected = (default_prunable_names(model) & candidates.keys()) - classifier_parameter_names(model)
    ordered = [name for name in candidates if name in selected]
    selected -= _matching(ordered, exclude, "prune_exclude")
    params = {name: p for name, p in candidates.items() if name in selected}
    if not params:
        raise ValueError(
            f"No prunable parameters in {type(model).__name__} (include={include}, exclude={exclude}). "
            "Pass `prune_include` patterns that select conv/linear weights."
        )
    return params


def _sortable_keys(scores: torch.Tensor, has_negatives: bool) -> torch.Tensor:
    """int32 keys ordered like the float32 scores (IEEE-754 bit trick; negatives flipped).

    Non-negative scores (the usual |θ·g|) are a free view: their bit patterns already sort like the values.
    """
    keys = scores.detach().float().contiguous().view(torch.int32).reshape(-1)
    return torch.where(keys < 0, keys ^ 0x7FFFFFFF, keys) if has_negatives else keys


def _select_bin(histogram: torch.Tensor, rank: int) -> tuple[int, int]:
    """Bin holding the `rank`-th smallest key (1-based) and how many keys lie in lower bins."""
    cumulative = torch.cumsum(histogram, 0)
    index = int(torch.searchsorted(cumulative, torch.tensor(rank, dtype=cumulative.dtype)))
    below = int(cumulative[index - 1]) if index > 0 else 0
    return index, below


def _check_scores(scores: Mapping[str, torch.Tensor]) -> None:
    bad = [name for name, score in scores.items() if not bool(torch.isfinite(score).all())]
    if bad:
        more = f" and {len(bad) - 1} more layer(s)" if len(bad) > 1 else ""
        raise ValueError(
            f"Importance scores of layer {bad[0]!r}{more} are not finite (NaN or inf). The usual cause is a NaN or "
            "inf weight in the student or the teacher, in any layer: it makes the loss and every gradient upstream "
            "of it non-finite, so the layers named here need not hold it. Find it with "
            "hf_tgprune.core.losses.non_finite_parameters(model); it means a corrupted checkpoint or a diverged "
            "training. If every weight is finite, the loss overflowed: lower the temperature or enable "
            "normalize_logits."
        )


def global_masks(
    scores: Mapping[str, torch.Tensor], sparsity: float, min_density: float = 0.0
) -> dict[str, torch.Tensor]:
    """One global threshold: prune exactly `round(sparsity * N)` lowest-scoring weights over all layers.

    Ties at the threshold are broken deterministically (earlier layers, then lower flat index, are pruned
    first), so the count is exact. `min_density` keeps at least `ceil(min_density * numel)` of each layer's
    highest-scoring weights (a layer-collapse guard). Runs as a two-pass radix select over int32 keys, layer by
    layer, so the extra memory is one layer's keys plus two 65,536-bin histograms.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if not 0.0 <= min_density <= 1.0:
        raise ValueError(f"min_density must be in [0, 1], got {min_density}")
    if not scores:
        raise ValueError("global_masks needs at least one layer of scores")
    _check_scores(scores)
    total = sum(s.numel() for s in scores.values())
    target = int(round(sparsity * total))
    if target == 0:
        return {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}

    protected: dict[str, torch.Tensor] = {}
    if min_density > 0:
        for name, score in scores.items():
            keep = math.ceil(min_density * score.numel())
            if keep:
                protected[name] = torch.topk(score.detach().float().reshape(-1), keep, sorted=False).indices
        prunable = total - sum(idx.numel() for idx in protected.values())
        if target > prunable:
            raise ValueError(
                f"sparsity={sparsity} cannot be reached with min_layer_density={min_density}: only {prunable} of "
                f"{total} weights may be pruned. Lower min_layer_density or sparsity."
            )

    has_negatives = {name: bool(torch.signbit(score).any()) for name, score in scores.items()}

    def keys_of(name: str) -> torch.Tensor:
        keys = _sortable_keys(scores[name], has_negatives[name])
        if name in protected:
            keys = keys.clone()
            keys[protected[name]] = torch.iinfo(torch.int32).max
        return keys

    # pass 1: histogram of the high 16 bits
    histogram = None
    for name in scores:
        high = (keys_of(name) >> 16) + (_NUM_BINS // 2)
        counts = torch.bincount(high, minlength=_NUM_BINS)
        histogram = counts if histogram is None else histogram + counts.to(histogram.device)
    high_bin, below = _select_bin(histogram, target)
    # pass 2: histogram of the low 16 bits inside that bin
    histogram = None
    for name in scores:
        keys = keys_of(name)
        low = keys[(keys >> 16) == high_bin - _NUM_BINS // 2] & 0xFFFF
        counts = torch.bincount(low, minlength=_NUM_BINS)
        histogram = counts if histogram is None else histogram + counts.to(histogram.device)
    low_bin, below_in_bin = _select_bin(histogram, target - below)
    threshold = ((high_bin - _NUM_BINS // 2) << 16) | low_bin
    ties_to_prune = target - below - below_in_bin

    masks = {}
    for name, score in scores.items():
        keys = keys_of(name)
        keep = keys > threshold
        if ties_to_prune:
            ties = (keys == threshold).nonzero().reshape(-1)
            keep[ties[ties_to_prune:]] = True
            ties_to_prune -= min(ties_to_prune, ties.numel())
        else:
            keep |= keys == threshold
        masks[name] = keep.reshape(score.shape)
    return masks


LAYER_ALLOCATIONS = ("global", "lamp", "magnitude", "lamp_magnitude")


def lamp_normalize(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAMP (Lee et al., ICLR 2021) for any non-negative criterion: `s_u² / Σ_{v in layer, s_v >= s_u} s_v²`.

    Each layer's largest score becomes 1, so one global ranking of the normalised scores cannot empty a layer and
    spreads the pruning over layers by how concentrated their scores are. Ties are ordered by flat index.
    """
    out = {}
    for name, score in scores.items():
        squared = score.detach().float().reshape(-1).square()
        ordered, order = torch.sort(squared, stable=True)
        suffix = ordered.flip(0).cumsum(0).flip(0)  # Σ of the scores at or above each position
        normalised = torch.empty_like(squared)
        normalised[order] = torch.where(suffix > 0, ordered / suffix, torch.zeros_like(ordered))
        out[name] = normalised.reshape(score.shape)
    return out


def prune_zeros_first(
    scores: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Scores with every weight that is already exactly zero moved below all others (to -1, or below the lowest score
    of every layer when a signed criterion gives scores under -1).

    A student that is already sparse (or a mask being tightened) then loses its zeros first, and the weights that
    still carry a value are ranked among themselves; the pruned count stays exact.
    """
    lowest = min((float(score.min()) for score in scores.values() if score.numel()), default=0.0)
    fill = min(-1.0, lowest - 1.0)
    out = {}
    for name, score in scores.items():
        zero = weights[name].detach().to(score.device) == 0
        out[name] = torch.where(zero, torch.full_like(score, fill), score) if bool(zero.any()) else score
    return out


def masks_from_counts(scores: Mapping[str, torch.Tensor], kept: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Per layer, keep the `kept[name]` highest-scoring weights (ties: the lower flat index is kept)."""
    masks = {}
    for name, score in scores.items():
        keys = _sortable_keys(score, bool(torch.signbit(score).any()))
        order = torch.sort(keys, descending=True, stable=True).indices
        keep = torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)
        keep[order[: int(kept[name])]] = True
        masks[name] = keep.reshape(score.shape)
    return masks


def select_masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    min_density: float = 0.0,
    allocation: str = "global",
    weights: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Masks at exactly `round(sparsity · N)` pruned weights, with a choice of how layers share the pruning.

    Args:
        scores: criterion scores per prunable weight (higher = more important).
        sparsity: target fraction of pruned weights, in [0, 1).
        min_density: per-layer minimum density (layer-collapse guard), see `global_masks`.
        allocation: `"global"` ranks the scores of all layers together (the paper); `"lamp"` ranks their LAMP
            normalisation (`lamp_normalize`); `"magnitude"` / `"lamp_magnitude"` take each layer's kept count from
            the global ranking of `|θ|` (or of its LAMP normalisation) and choose *which* weights to keep inside
            each layer by `scores` (decoupled allocation; needs `weights`).
        weights: the current weights; when given, weights that are already zero are pruned first.
    """
    if allocation not in LAYER_ALLOCATIONS:
        raise ValueError(f"layer_allocation must be one of {LAYER_ALLOCATIONS}, got {allocation!r}")
    if allocation in ("magnitude", "lamp_magnitude"):
        if weights is None:
            raise ValueError(f"layer_allocation={allocation!r} needs the weights to rank by magnitude")
        by_magnitude = {name: weights[name].detach().float().abs() for name in scores}
        if allocation == "lamp_magnitude":
            by_magnitude = lamp_normalize(by_magnitude)
        counts = global_masks(prune_zeros_first(by_magnitude, weights), sparsity, min_density)
        kept = {name: int(mask.sum()) for name, mask in counts.items()}
        return masks_from_counts(prune_zeros_first(scores, weights), kept)
    if allocation == "lamp":
        scores = lamp_normalize(scores)
    if weights is not None:
        scores = prune_zeros_first(scores, weights)
    return global_masks(scores, sparsity, min_density)


def min_layer_density_for(sparsity: float, min_layer_density: float = 0.0, layer_density_floor: float = 0.0) -> float:
    """The per-layer minimum density `global_masks` should use: `max(min_layer_density, floor · (1 - sparsity))`.

    `layer_density_floor` is a layer-collapse guard relative to the target: with floor 0.5 at 98% sparsity every
    pruned layer keeps at least 1% of its weights (half the global density), so the target is always reachable.
    """
    if not 0.0 <= layer_density_floor < 1.0:
        raise ValueError(f"layer_density_floor must be in [0, 1), got {layer_density_floor}")
    return max(min_layer_density, layer_density_floor * (1.0 - sparsity))


def as_bool_masks(masks: Mapping[str, torch.Tensor], argument: str = "masks") -> dict[str, torch.Tensor]:
    """Masks as bool tensors (True = kept): bool masks as they are; float or integer masks holding only 0 and 1
    (as ``torch.nn.utils.prune`` stores its ``weight_mask`` buffers) converted. The one place where masks from
    outside the library are accepted.

    Args:
        masks: ``{parameter name: tensor}``.
        argument: the argument's name in error messages.

    Raises:
        TypeError: `masks` is not a mapping of tensors.
        ValueError: a mask holds values other than 0 and 1 (e.g. scores, or a soft mask).
    """
    if not isinstance(masks, Mapping):
        raise TypeError(f"`{argument}` must be a dict of parameter name -> bool tensor, got {type(masks).__name__}")
    converted = {}
    for name, mask in masks.items():
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"`{argument}[{name!r}]` must be a tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool and is_sharded(mask):
            raise TypeError(f"`{argument}[{name!r}]` is a sharded {mask.dtype} mask: sharded masks must be bool.")
        if mask.dtype != torch.bool:
            if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
                odd = mask[(mask != 0) & (mask != 1)].reshape(-1)[:3].tolist()
                raise ValueError(
                    f"`{argument}[{name!r}]` ({mask.dtype}) holds values other than 0 and 1 (e.g. {odd}); masks are "
                    "True/1 = kept, False/0 = pruned. Threshold scores first (hf_tgprune.global_masks)."
                )
            mask = mask != 0
        converted[name] = mask
    return converted


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero the pruned weights in place (parameters stay plain `nn.Parameter`s); returns the masks as bool tensors.

    Masks may be bool, or float / integer 0/1 tensors (converted by :func:`as_bool_masks`).
    """
    masks = as_bool_masks(masks)
    params = dict(unwrap_model(model).named_parameters())
    missing = [name for name in masks if name not in params]
    if missing:
        raise KeyError(f"Masks name parameters the model does not have: {missing[:5]}")
    for name, mask in masks.items():
        param = params[name]
        if mask.shape != param.shape:
            raise ValueError(f"Mask for {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(param.shape)}")
        param.mul_(mask.to(param.device))
    return masks


def _counts(numels: Iterable[int], zeros: Iterable[int]) -> dict[str, float]:
    numel, zero = sum(numels), sum(zeros)
    return {"numel": numel, "zeros": zero, "sparsity": zero / numel if numel else 0.0}


@torch.no_grad()
def measure_sparsity(
    tensors: Mapping[str, torch.Tensor], layer_names: Iterable[str], parameter_names: Iterable[str]
) -> dict:
    """Per-layer, prunable-set and all-parameter sparsity of named tensors (zeros counted in the tensors; sharded
    tensors counted over every shard)."""
    layer_names = list(layer_names)
    parameter_names = [name for name in parameter_names if name in tensors]
    names = list(dict.fromkeys(parameter_names + layer_names))
    zeros = dict(zip(names, _summed_counts([tensors[n] for n in names], lambda t: (t == 0).sum()).tolist()))
    return {
        "layers": {name: _counts([tensors[name].numel()], [zeros[name]]) for name in layer_names},
        "prunable": _counts((tensors[n].numel() for n in layer_names), (zeros[n] for n in layer_names)),
        "total": _counts((tensors[n].numel() for n in parameter_names), (zeros[n] for n in parameter_names)),
    }


def sparsity_report(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict:
    """Sparsity measured from the weights: per masked layer, over the prunable set, and over all parameters."""
    params = dict(unwrap_model(model).named_parameters())
    return {
        **measure_sparsity(params, masks, params),
        "pruned_by_mask": int(_summed_counts(masks.values(), lambda mask: (~mask).sum()).sum()),
    }


def mask_hash(masks: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the masks (sorted names, shapes and packed bits): equal masks, equal hash. Sharded masks are
    hashed as the full masks they form (gathered one layer at a time; every process gets the hash)."""
    digest = hashlib.sha256()
    for name in sorted(masks):
        mask = masks[name]
        mask = (mask.full_tensor() if is_sharded(mask) else mask).detach().to("cpu", torch.bool)
        digest.update(f"{name}:{tuple(mask.shape)};".encode())
        digest.update(np.packbits(mask.reshape(-1).numpy()).tobytes())
    return digest.hexdigest()


MASKS_NAME = "masks.safetensors"


class MaskFileError(ValueError):
    """A masks file that cannot be read or does not match the hash recorded when it was written."""


def save_masks(masks: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None):
    """Write masks atomically (a temporary file, then a rename) with their `mask_hash` in the header."""
    from safetensors.torch import save_file

    from .utils import atomic_path

    header = {"mask_sha256": mask_hash(masks), **dict(metadata or {})}
    with atomic_path(path) as tmp:
        save_file({name: m.detach().to("cpu", torch.bool).contiguous() for name, m in masks.items()}, tmp, header)


def read_masks_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata `save_masks` wrote (empty for files written without it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for truncated or garbled headers
        raise MaskFileError(
            f"Cannot read the masks file {str(path)!r} ({err}); it is truncated or corrupted. Resume from an "
            "earlier checkpoint or prune again."
        ) from err


def load_masks(path: str | os.PathLike, verify: bool = True) -> dict[str, torch.Tensor]:
    """Read masks written by `save_masks`; with `verify`, refuse a file whose content does not match its hash."""
    from safetensors.torch import load_file

    metadata = read_masks_metadata(path)
    try:
        masks = {name: m.to(torch.bool) for name, m in load_file(str(path)).items()}
    except Exception as err:
        raise MaskFileError(
            f"Cannot read the masks file {str(path)!r} ({err}); it is truncated or corrupted. Resume from an "
            "earlier checkpoint or prune again."
        ) from err
    expected = metadata.get("mask_sha256")
    if verify and expected is not None and mask_hash(masks) != expected:
        raise MaskFileError(
            f"The masks in {str(path)!r} do not match the hash recorded when they were written ({expected[:12]}...): "
            "the file was modified or corrupted. Resume from an earlier checkpoint or prune again."
        )
    return masks
