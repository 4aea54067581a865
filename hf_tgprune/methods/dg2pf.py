"""DG2PF: distilled gradual pruning with pruned fine-tuning (Fontana et al., IEEE TAI 2024) — a seed baseline.

Gradual global magnitude pruning over `gradual_pruning_epochs` = s_e epochs (epoch i = 1..s_e runs at sparsity
`s·i/s_e`) with *simulated* pruning — every batch runs with the masked weights, gradients reach every weight, and
the optimizer updates a dense copy, so pruned weights can recover — and self-KD from a frozen copy of the unpruned
network, `α·T²·KL(p_dense ‖ p) + (1−α)·CE` (α 0.75, T 4 as in the authors' code). At the start of epoch s_e + 1 the
masks are recomputed from the dense weights at the target and fixed; the remaining epochs are pruned fine-tuning
with cross-entropy only. A checkpoint holds the dense weights under the mask, so an interrupted run resumes exactly
(the frozen dense network is copied again from the model the trainer was given, which must be the same).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.adapters import forward_logits, unwrap_model
from ..core.losses import teacher_guided_loss
from .base import MethodConfig, ScheduledPruningMethod, keep_all, register_method
from .imp import magnitude_masks


@dataclass
class DG2PFConfig(MethodConfig):
    gradual_pruning_epochs: int = field(
        default=5,
        metadata={
            "help": "Epochs s_e of the gradual schedule (epoch i prunes to sparsity·i/s_e, simulated pruning); "
            "the remaining epochs are pruned fine-tuning with fixed masks and CE."
        },
    )
    self_kd_alpha: float = field(
        default=0.75, metadata={"help": "alpha of the self-KD loss alpha·T²·KL(p_dense‖p) + (1-alpha)·CE, in [0, 1]."}
    )
    self_kd_temperature: float = field(default=4.0, metadata={"help": "Temperature of the self-KD loss (> 0)."})

    def __post_init__(self):
        if self.gradual_pruning_epochs < 1:
            raise ValueError(f"dg2pf gradual_pruning_epochs must be >= 1, got {self.gradual_pruning_epochs}")
        if not 0.0 <= self.self_kd_alpha <= 1.0:
            raise ValueError(f"dg2pf self_kd_alpha must be in [0, 1], got {self.self_kd_alpha}")
        if self.self_kd_temperature <= 0:
            raise ValueError(f"dg2pf self_kd_temperature must be > 0, got {self.self_kd_temperature}")


def _fingerprint(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(unwrap_model(model).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@register_method
class DG2PF(ScheduledPruningMethod):
    name = "dg2pf"
    criterion = "magnitude"
    config_class = DG2PFConfig
    own_loss = True
    regrows = True  # simulated pruning: gradients reach pruned weights
    description = "DG2PF: gradual simulated magnitude pruning with self-KD, then pruned fine-tuning (CE)"

    def __init__(self, config=None):
        super().__init__(config)
        self.dense_teacher = None
        self.dense_sha256: str | None = None
        self._expected_sha256: str | None = None  # recorded by the checkpoint being resumed

    def _freeze_dense(self, pruner) -> None:
        self.dense_teacher = copy.deepcopy(unwrap_model(pruner.model)).eval().requires_grad_(False)
        self.dense_sha256 = _fingerprint(self.dense_teacher)

    def prune(self, pruner):
        self._freeze_dense(pruner)
        return keep_all(pruner)

    def mask_callback(self, pruner):
        epochs = self.config.gradual_pruning_epochs
        sparsity = pruner.args.sparsity
        events = {i: sparsity * (i + 1) / epochs for i in range(epochs)}

        def mask_fn(weights, masks, level):
            return magnitude_masks(weights, level, pruner.min_layer_density(level))

        return self.schedule_callback(pruner, events, mask_fn, simulated_until=epochs)

    def state_dict(self):
        return {"dense_sha256": self.dense_sha256, **super().state_dict()}

    def load_state_dict(self, state):
        self._expected_sha256 = state.get("dense_sha256")
        super().load_state_dict(state)

    def resume(self, pruner, masks):
        self._freeze_dense(pruner)
        expected = self._expected_sha256
        if expected is not None and expected != self.dense_sha256:
            raise ValueError(
                "DG2PF distils from the unpruned network: resume with the same dense model the interrupted run was "
                "given (its weights differ from the ones recorded in the checkpoint)."
            )
        pruner.install(masks)

    def compute_loss(self, pruner, model, inputs):
        logits = forward_logits(model, inputs["pixel_values"])
        if self.callback is not None and self.callback.finished:  # pruned fine-tuning: cross-entropy only
            return F.cross_entropy(logits.float(), inputs["labels"]), logits
        with torch.no_grad():
            teacher_logits = forward_logits(self.dense_teacher, inputs["pixel_values"])
        # Hinton KD alpha·T²·KL(p_dense ‖ p) + (1-alpha)·CE: the teacher-guided loss with beta = 0
        loss = teacher_guided_loss(
            logits,
            teacher_logits,
            inputs["labels"],
            alpha=self.config.self_kd_alpha,
            beta=0.0,
            temperature=self.config.self_kd_temperature,
        )
        return loss, logits
