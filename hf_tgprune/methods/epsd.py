"""EPSD: early pruning with self-distillation (Chen et al., AAAI 2024, arXiv 2402.00084) — a seed baseline.

A freshly initialised student trains `warmup_steps` optimizer steps with `CE + λ·L_SD` through the Trainer itself
(its optimizer, scheduler, mixed precision and accumulation), is then scored once with
`|θ·∂(CE + λ·L_SD)/∂θ|`, pruned to the target with one global mask, and trains on with the same loss. No separate
teacher. `L_SD = T²·KL(p_view2 ‖ p)`: self-distillation from the network's own softened prediction on a second view
of the batch (the horizontally flipped images, detached) **(choice)**. The warm-up steps are part of the training
budget (`num_train_epochs` / `max_steps`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback

from ..core.adapters import forward_logits
from ..core.losses import self_distillation_loss
from ..core.scoring import ScoringMethod, ScoringOptions, register_scoring_method, weight_times_gradient
from .base import MethodConfig, PruningMethod, register_method


@dataclass
class EPSDConfig(MethodConfig):
    warmup_steps: int = field(
        default=100,
        metadata={"help": "Optimizer steps of the fresh network (CE + λ·self-distillation) before scoring."},
    )
    self_distillation_weight: float = field(
        default=1.0, metadata={"help": "Weight λ of the self-distillation term in CE + λ·L_SD (scoring and training)."}
    )
    temperature: float = field(default=4.0, metadata={"help": "Temperature T of the self-distillation term (> 0)."})

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError(f"epsd warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.self_distillation_weight < 0:
            raise ValueError(f"epsd self_distillation_weight must be >= 0, got {self.self_distillation_weight}")
        if self.temperature <= 0:
            raise ValueError(f"epsd temperature must be > 0, got {self.temperature}")


def second_view(pixel_values: torch.Tensor) -> torch.Tensor:
    """The second view of EPSD's self-distillation: the horizontally flipped images."""
    return torch.flip(pixel_values, dims=[-1])


def epsd_logits_and_loss(model, batch, *, weight: float, temperature: float, reduction: str = "mean"):
    """The network's logits and EPSD's `CE + λ·T²·KL(p_view2 ‖ p)`, the second view's prediction detached."""
    pixel_values = batch["pixel_values"]
    logits = forward_logits(model, pixel_values)
    with torch.no_grad():
        target = forward_logits(model, second_view(pixel_values))
    loss = self_distillation_loss(
        logits, target, batch["labels"], weight=weight, temperature=temperature, reduction=reduction
    )
    return logits, loss


def epsd_batch_loss(model, teacher, batch, options: ScoringOptions) -> torch.Tensor:
    """Per-sample EPSD scoring loss (`teacher` is unused: the network distils from itself)."""
    return epsd_logits_and_loss(
        model, batch, weight=options.self_distillation_weight, temperature=options.temperature, reduction="none"
    )[1]


register_scoring_method(
    ScoringMethod(
        "epsd",
        weight_times_gradient,
        epsd_batch_loss,
        description="|θ·∂(CE + λ·L_SD)/∂θ|, L_SD self-distillation from the flipped view (EPSD)",
    )
)


class _PruneAfterWarmup(TrainerCallback):
    """Scores and prunes once, at the end of optimizer step `warmup_steps` (unless the pruner already has masks,
    e.g. when resuming after the warm-up)."""

    def __init__(self, method: EPSD, pruner):
        self.method = method
        self.pruner = pruner

    def on_step_end(self, args, state, control, **kwargs):
        if self.pruner.masks is None and state.global_step >= self.method.config.warmup_steps:
            self.method.prune_now(self.pruner, started=True)


@register_method
class EPSD(PruningMethod):
    name = "epsd"
    criterion = "epsd"
    config_class = EPSDConfig
    own_loss = True
    one_shot = False
    description = "EPSD: early pruning of a fresh network scored and trained with self-distillation"

    def prune(self, pruner):
        if self.config.warmup_steps == 0:
            return self._masks(pruner)
        return None  # pruned by the callback after the warm-up steps

    def _masks(self, pruner):
        options = ScoringOptions(
            temperature=self.config.temperature, self_distillation_weight=self.config.self_distillation_weight
        )
        return pruner.select_masks(pruner.compute_scores(method=self.criterion, options=options))

    def prune_now(self, pruner, started: bool) -> None:
        pruner.install(self._masks(pruner), started=started)
        pruner.report["warmup_steps"] = self.config.warmup_steps

    def callbacks(self, pruner):
        return [] if self.config.warmup_steps == 0 else [_PruneAfterWarmup(self, pruner)]

    def compute_loss(self, pruner, model, inputs):
        logits, loss = epsd_logits_and_loss(
            model, inputs, weight=self.config.self_distillation_weight, temperature=self.config.temperature
        )
        return loss, logits
