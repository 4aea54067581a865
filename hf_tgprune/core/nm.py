"""N:M semi-structured masks: keep the `n` highest-scoring of every `m` consecutive weights along the input dim.

    masks = nm_masks(scores, n=2, m=4)    # exactly n/m of every layer kept, dict name -> bool tensor (True = kept)
    apply_masks(model, masks)
    assert all(is_nm_sparse(p, 2, 4) for p in prunable_parameters(model).values())

Groups run along the input dimension of the weight as `weight.reshape(out, -1)` lays it out: dim 1 of a Linear
weight `(out, in)`; for a convolution `(out, in, kh, kw)` the flattened `in * kh * kw` axis, so a group of 4 holds
consecutive kernel positions of one input channel (and may span two channels when `kh * kw` is not a multiple of
`m`). This is the layout NVIDIA's 2:4 sparse tensor cores (`torch.sparse.to_sparse_semi_structured`) expect for a
Linear weight. Layers whose flattened input dim is not divisible by `m` have no N:M pattern: `nm_masks` raises a
`ValueError` naming them; `nm_incompatible_layers` lists them up front so that the caller can exclude them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def _check_nm(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or not 0 < n < m:
        raise ValueError(f"N:M sparsity needs integers 0 < n < m, got n={n!r}, m={m!r} (e.g. n=2, m=4 for 2:4).")


def _grouped(tensor: torch.Tensor, m: int, name: str = "tensor") -> torch.Tensor:
    """`tensor` as `(out, in_flat // m, m)`: the N:M groups along the flattened input dim."""
    if tensor.dim() < 2:
        raise ValueError(
            f"N:M sparsity needs a weight of dimension >= 2 (out, in, ...); {name!r} has shape {tuple(tensor.shape)}."
        )
    flat = tensor.reshape(tensor.shape[0], math.prod(tensor.shape[1:]))  # also for zero rows (a shard)
    if flat.shape[1] % m:
        raise ValueError(
            f"Layer {name!r} has input dim {flat.shape[1]} (shape {tuple(tensor.shape)}), not divisible by m={m}, so "
            f"it has no {m}-group pattern. Exclude it (e.g. prune_exclude=[{name!r}]) or use unstructured masks."
        )
    return flat.reshape(flat.shape[0], flat.shape[1] // m, m)


def nm_incompatible_layers(tensors: Mapping[str, torch.Tensor], m: int = 4) -> list[str]:
    """Names of the tensors whose flattened input dim (the product of `shape[1:]`) is not divisible by `m`.

    Args:
        tensors: weights or scores keyed by parameter name.
        m: the group size.
    """
    return [name for name, t in tensors.items() if t.dim() < 2 or math.prod(t.shape[1:]) % m]


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4, name: str = "tensor") -> torch.Tensor:
    """Bool mask (True = kept) keeping the top-`n` scores of every `m` consecutive entries along the input dim.

    Ties are broken deterministically: among equal scores the lower index is kept first. Exactly `n / m` of the
    entries are kept.

    Args:
        scores: one layer's scores, shaped like its weight `(out, in, ...)`.
        n: how many entries to keep per group.
        m: the group size.
        name: the layer's name, used in error messages.
    """
    _check_nm(n, m)
    if not torch.isfinite(scores).all():
        raise ValueError(f"Scores of layer {name!r} are not finite (NaN or inf); N:M masks need finite scores.")
    groups = _grouped(scores.detach().float(), m, name)
    # stable descending sort: equal scores keep their original order, so the lower index wins a tie
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(scores.shape)


def nm_masks(scores: Mapping[str, torch.Tensor], n: int = 2, m: int = 4) -> dict[str, torch.Tensor]:
    """N:M masks for every layer: keep the top-`n` of every `m` consecutive weights along the input dim.

    Each layer keeps exactly `n / m` of its weights (50% for 2:4), whatever the scores; the criterion only decides
    which weights of each group survive. Apply them like any mask (`apply_masks`) and enforce them through
    retraining with `GlobalMaskCallback`.

    Args:
        scores: importance scores keyed by parameter name, each shaped like its weight (from
            `compute_importance_scores`, any method).
        n: how many weights to keep per group (2 for 2:4).
        m: the group size (4 for 2:4).

    Raises:
        ValueError: if `n, m` are not `0 < n < m`, a score is not finite, or a layer's flattened input dim is not
            divisible by `m` (all such layers are named; see `nm_incompatible_layers` to exclude them).
    """
    _check_nm(n, m)
    if not scores:
        raise ValueError("nm_masks needs at least one layer of scores.")
    bad = nm_incompatible_layers(scores, m)
    if bad:
        raise ValueError(
            f"{n}:{m} masks need every layer's input dim (weight.reshape(out, -1).shape[1]) to be divisible by {m}; "
            f"these layers are not: {bad}. Exclude them from pruning (prune_exclude) or use unstructured masks."
        )
    return {name: nm_mask(score, n, m, name) for name, score in scores.items()}


def is_nm_sparse(tensor: torch.Tensor, n: int = 2, m: int = 4, exact: bool = False) -> bool:
    """Whether every group of `m` consecutive entries along the input dim has at most `n` nonzeros.

    Args:
        tensor: a weight `(out, in, ...)` or a bool mask (True = kept); groups as in `nm_masks`.
        n: the most nonzeros allowed per group.
        m: the group size.
        exact: require exactly `n` nonzeros in every group (what `nm_masks` produces) instead of at most `n`
            (what sparse kernels accept: a kept weight may itself be zero).

    Returns:
        False also when the flattened input dim is not divisible by `m` (no N:M pattern exists).
    """
    _check_nm(n, m)
    if tensor.dim() < 2 or math.prod(tensor.shape[1:]) % m:
        return False
    counts = (_grouped(tensor.detach(), m) != 0).sum(dim=-1)
    return bool((counts == n).all()) if exact else bool((counts <= n).all())
