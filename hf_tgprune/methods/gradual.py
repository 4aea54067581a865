"""Gradual pruning during retraining: the sparsity rises in steps while the network trains, instead of one-shot before.
The default method of `TeacherGuidedPruningConfig`.

The sparsity follows the cubic schedule of Zhu & Gupta (2018), `s_k = s·(1 − (1 − k/n)³)` at update k = 1..n, the n
updates evenly spaced over the first `end_fraction` of the training steps; the rest of training retrains the final
mask. Each update keeps the weights with the highest scores (the settings' `layer_allocation` and layer guard; pruned
weights stay pruned) by one of two criteria:

- `"fisher"` (default): `θ² · Σ_t g_t²`, the optimal-brain-damage / empirical-Fisher score of `tgp_fisher`, with the
  squared gradients summed over the optimizer steps since the previous update. The gradients are those of the
  training loss — the teacher-guided KD loss `alpha·T²·CAKLD + (1-alpha)·CE` when retraining with a teacher, the
  cross-entropy otherwise — so the scores cost no pass of their own and every image the pipeline sees trains the
  network.
- `"magnitude"`: `|θ|` (gradual magnitude pruning).

Training starts from the dense model, so there is no accuracy collapse to recover from at once, and no BatchNorm
recalibration is needed (training updates the running statistics).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.callbacks import GradualMaskCallback
from .base import MethodConfig, ScheduledPruningMethod, keep_all, register_method

CRITERIA = ("fisher", "magnitude")


@dataclass
class GradualConfig(MethodConfig):
    criterion: str = field(
        default="fisher",
        metadata={
            "help": "Score of each update: 'fisher' (θ²·Σ_t g_t², the squared gradients of the training loss summed "
            "since the previous update) or 'magnitude' (|θ|)."
        },
    )
    pruning_steps: int = field(
        default=10, metadata={"help": "Number n of mask updates (the k-th prunes to sparsity·(1-(1-k/n)³))."}
    )
    end_fraction: float = field(
        default=0.3,
        metadata={
            "help": "Fraction of the training steps over which the updates are spread, in (0, 1]; the last update "
            "reaches the target there and the remaining steps retrain the final mask."
        },
    )

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise ValueError(f"gradual criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.pruning_steps < 1:
            raise ValueError(f"gradual pruning_steps must be >= 1, got {self.pruning_steps}")
        if not 0.0 < self.end_fraction <= 1.0:
            raise ValueError(f"gradual end_fraction must be in (0, 1], got {self.end_fraction}")


def cubic_schedule(sparsity: float, updates: int, end_step: int) -> dict[int, float]:
    """{optimizer step: sparsity} of `updates` mask updates at steps `round(k·end_step/updates)`, k = 1..updates, each
    at `sparsity·(1 − (1 − k/updates)³)`; the last one is exactly `sparsity` at `end_step`.

    Raises:
        ValueError: fewer than `updates` steps until `end_step` (two updates would fall on one step).
    """
    if end_step < updates:
        raise ValueError(
            f"pruning_method='gradual' spreads pruning_steps={updates} mask updates over {end_step} training step(s): "
            "train for more steps, raise end_fraction, or lower pruning_steps (pruning_method_args), or prune before "
            "training with a one-shot pruning_method (e.g. 'tgp_fisher')."
        )
    events = {round(k * end_step / updates): sparsity * (1.0 - (1.0 - k / updates) ** 3) for k in range(1, updates)}
    events[end_step] = sparsity
    return events


def gradual_scores(weights, fisher=None) -> dict[str, torch.Tensor]:
    """`θ²·F` with the summed squared gradients `fisher`, or `|θ|` without them (float32)."""
    if fisher is None:
        return {name: weight.detach().float().abs() for name, weight in weights.items()}
    return {name: weight.detach().float().square() * fisher[name] for name, weight in weights.items()}


@register_method
class Gradual(ScheduledPruningMethod):
    name = "gradual"
    criterion = None  # no scoring pass: the scores come from training
    config_class = GradualConfig
    shardable = True  # GradualMaskCallback sums squared gradients on local shards; one global selection per update
    description = "gradual pruning during retraining: cubic schedule, Fisher of the training loss (or magnitude)"

    def prune(self, pruner):
        return keep_all(pruner)

    def schedule(self, sparsity: float, max_steps: int) -> dict[int, float]:
        """{optimizer step: sparsity} of the updates of a run of `max_steps` steps (ValueError if too short)."""
        return cubic_schedule(sparsity, self.config.pruning_steps, round(self.config.end_fraction * max_steps))

    def final_mask_step(self, sparsity: float, max_steps: int) -> int:
        return max(self.schedule(sparsity, max_steps))

    def check_steps(self, max_steps: int) -> None:
        self.schedule(1.0, max_steps)

    def mask_callback(self, pruner):
        sparsity = pruner.args.sparsity
        self.callback = GradualMaskCallback(
            pruner,
            lambda max_steps: self.schedule(sparsity, max_steps),
            pruner.select_masks,
            gradual_scores,
            sparsity,
            accumulate=self.config.criterion == "fisher",
        )
        return self.callback
