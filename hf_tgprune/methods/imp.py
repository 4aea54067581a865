"""IMP: iterative magnitude pruning — the compute the one-shot method is meant to save (a seed baseline).

k rounds of "prune a fraction of the remaining weights by global magnitude, then retrain `epochs_per_round`
epochs" (fine-tuning, no weight rewinding). The first round prunes in `prune()`; retraining uses the trainer's loss
(KD or CE, `retrain_with_kd`). A checkpoint records the rounds already applied, so an interrupted run resumes at
the round it was in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..core.masking import global_masks
from .base import MethodConfig, ScheduledPruningMethod, register_method


@dataclass
class IMPConfig(MethodConfig):
    rounds: int | None = field(
        default=None,
        metadata={
            "help": "Number of prune-and-retrain rounds k; each prunes 1-(1-sparsity)^(1/k) of the remaining "
            "weights. None: as many rounds of `prune_fraction` as the target needs."
        },
    )
    prune_fraction: float = field(
        default=0.15, metadata={"help": "Fraction of the remaining weights pruned per round when `rounds` is None."}
    )
    epochs_per_round: int = field(default=1, metadata={"help": "Retraining epochs between two pruning rounds."})

    def __post_init__(self):
        if self.rounds is not None and self.rounds < 1:
            raise ValueError(f"imp rounds must be >= 1 or None, got {self.rounds}")
        if not 0.0 < self.prune_fraction < 1.0:
            raise ValueError(f"imp prune_fraction must be in (0, 1), got {self.prune_fraction}")
        if self.epochs_per_round < 1:
            raise ValueError(f"imp epochs_per_round must be >= 1, got {self.epochs_per_round}")


def imp_sparsities(sparsity: float, rounds: int | None = None, fraction: float = 0.15) -> list[float]:
    """Sparsity after each round; the last one is exactly `sparsity`.

    With `rounds` k every round prunes `1 - (1 - sparsity)^(1/k)` of the remaining weights; otherwise rounds of
    `fraction` of the remaining weights, as many as the target needs (the last one clipped).
    """
    if sparsity <= 0:
        return [0.0]
    if rounds is None:
        rounds = max(1, math.ceil(math.log(1.0 - sparsity) / math.log(1.0 - fraction) - 1e-9))
        levels = [min(sparsity, 1.0 - (1.0 - fraction) ** r) for r in range(1, rounds + 1)]
    else:
        levels = [1.0 - (1.0 - sparsity) ** (r / rounds) for r in range(1, rounds + 1)]
    levels[-1] = sparsity
    return levels


def magnitude_masks(weights: Mapping[str, torch.Tensor], sparsity: float, min_density: float = 0.0, previous=None):
    """Global magnitude masks; with `previous` masks, already-pruned weights stay pruned."""
    scores = {}
    for name, weight in weights.items():
        score = weight.detach().float().abs()
        if previous is not None:
            score = torch.where(previous[name].to(score.device), score, torch.full_like(score, -1.0))
        scores[name] = score
    return global_masks(scores, sparsity, min_density)


@register_method
class IMP(ScheduledPruningMethod):
    name = "imp"
    criterion = "magnitude"
    config_class = IMPConfig
    description = "iterative magnitude pruning: k rounds of prune-a-fraction (global) and retrain"

    def levels(self, sparsity: float) -> list[float]:
        return imp_sparsities(sparsity, self.config.rounds, self.config.prune_fraction)

    def prune(self, pruner):
        level = self.levels(pruner.args.sparsity)[0]
        return magnitude_masks(pruner.prunable_parameters(), level, pruner.min_layer_density(level))

    def mask_callback(self, pruner):
        levels = self.levels(pruner.args.sparsity)
        events = {r * self.config.epochs_per_round: level for r, level in enumerate(levels) if r > 0}

        def mask_fn(weights, masks, level):
            return magnitude_masks(weights, level, pruner.min_layer_density(level), previous=masks)

        return self.schedule_callback(pruner, events, mask_fn)
