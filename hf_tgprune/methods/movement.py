"""Movement pruning (Sanh, Wolf & Rush, NeurIPS 2020), first order: prune the weights that fine-tuning moved toward zero.

    S(θ) = −Σ_t θ_t · ∂L/∂θ_t        over the optimizer steps t of a fine-tuning run

A weight that grows away from zero during fine-tuning gets a high score, one that shrinks toward zero a low one,
whatever its magnitude; in transfer learning that ranks by what the *target* task did to a weight rather than by
what the source task left in it. The scores are accumulated during the fine-tuning a user runs anyway, so they cost
no extra pass: `MovementScores` is a `TrainerCallback` for a Trainer run and has `accumulate()` for a plain loop
(after `backward()`, before `optimizer.step()`). Then prune with `pruning_method="movement"` and
`prune(scores=movement.scores)`. The scores are signed, so each layer's kept count comes from the global magnitude
ranking by default (`layer_allocation="magnitude"`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from ..core.masking import prunable_parameters
from ..core.scoring import ScoringMethod, register_scoring_method
from .base import PruningMethod, register_method


class MovementScores(TrainerCallback):
    """Accumulates `−θ·∂L/∂θ` of the prunable weights of `model` at every optimizer step (float32, on their devices).

    Args:
        model: the network being fine-tuned (the same object the optimizer updates).
        prune_include: which weights, as in `PruningArguments` (default: `default_prunable_names` except the
            classifier head).
        prune_exclude: weights left out, as in `PruningArguments`.
    """

    def __init__(
        self, model: nn.Module, prune_include: Sequence[str] | None = None, prune_exclude: Sequence[str] | None = None
    ):
        self._params = prunable_parameters(model, prune_include, prune_exclude)
        self.scores = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in self._params.items()}
        self.steps = 0

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add this step's `−θ·g` (call it after the gradients are final, before the optimizer step)."""
        for name, param in self._params.items():
            if param.grad is not None:
                self.scores[name].sub_(param.detach().float() * param.grad.float())
        self.steps += 1

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.accumulate()  # gradients are clipped, accumulated and all-reduced by now: the same on every rank


def _accumulated_elsewhere(weight, grad=None, generator=None):
    raise ValueError(
        "pruning_method='movement' ranks weights by scores accumulated while fine-tuning, not by a scoring pass: "
        "record them with hf_tgprune.methods.movement.MovementScores and pass prune(scores=movement.scores)."
    )


register_scoring_method(
    ScoringMethod(
        "movement",
        _accumulated_elsewhere,
        signed=True,
        description="−Σ_t θ_t·∂L/∂θ_t accumulated over fine-tuning (movement pruning)",
    )
)


@register_method
class Movement(PruningMethod):
    name = "movement"
    criterion = "movement"
    default_allocation = "magnitude"
    description = "movement pruning: −Σ_t θ·g accumulated over fine-tuning (MovementScores), one mask"

    def prune(self, pruner):
        _accumulated_elsewhere(None)
