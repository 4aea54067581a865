"""One-shot methods: one scoring pass with a registered criterion, one mask, fixed through retraining.

Each criterion of `hf_tgprune.core.scoring` that users pick directly is a method here. `Pruner.compute_masks` runs the
scoring pass(es) (`pruning_rounds`), the layer allocation and the layer-collapse guard; retraining uses the
trainer's loss (KD with the teacher, or CE). `dense` is the explicit way to train without pruning (a teacher, or a
KD warm-up of the student) with the same loss and data handling.
"""

from __future__ import annotations

from .base import PruningMethod, register_method


def _one_shot(
    class_name: str, name: str, description: str, default_rounds: int = 1, default_allocation: str = "global"
) -> type[PruningMethod]:
    """A one-shot method ranking weights by the scoring criterion of the same name."""
    attributes = {
        "name": name, "criterion": name, "description": description, "__doc__": description,
        "default_rounds": default_rounds, "default_allocation": default_allocation,
    }  # fmt: skip
    return register_method(type(class_name, (PruningMethod,), attributes))


TGP = _one_shot("TGP", "tgp", "teacher-guided |θ·∂L/∂θ|, L = alpha·T²·CAKLD + (1-alpha)·CE (Alim et al., 2025)")
# 5 rounds: the Fisher scores of a partly pruned network are re-estimated between rounds
TGPFisher = _one_shot(
    "TGPFisher", "tgp_fisher", "teacher-guided Fisher / OBD: θ²·Σ_b (∂L/∂θ on batch b)²", default_rounds=5
)
# signed scores: compared inside each layer, whose kept count comes from the global magnitude ranking
TGPTaylor = _one_shot(
    "TGPTaylor",
    "tgp_taylor",
    "teacher-guided signed second-order change of the loss −θ·ḡ + ½·F·θ², compared inside each layer",
    default_allocation="magnitude",
)
SNIP = _one_shot("SNIP", "snip", "|θ·∂CE/∂θ| (SNIP)")
Grad = _one_shot("Grad", "grad", "|∂L/∂θ| of the teacher-guided loss")
Magnitude = _one_shot("Magnitude", "magnitude", "|θ| (global magnitude pruning)")
Random = _one_shot("Random", "random", "uniform random scores")


@register_method
class Dense(PruningMethod):
    """No pruning: train the model densely (KD with `retrain_with_kd`, else CE); `sparsity` is set to 0."""

    name = "dense"
    criterion = None
    description = "no pruning: dense training with the trainer's loss (a teacher, or a KD warm-up)"

    def prune(self, pruner):
        return None
