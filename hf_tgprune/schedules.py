"""Pruning schedules that are not one-shot: the seed baselines of METHOD §2-§4, as registered additions on the core.

`TeacherGuidedPruningTrainer.prune()` consults this registry first: when `args.pruning_method` names a registered
`PruningSchedule`, its `setup(trainer)` runs instead of the one-shot path (one scoring pass, one global mask). A
schedule reuses the shared core — `compute_importance_scores` (a registered `ScoringMethod`), `global_masks`,
`GlobalMaskCallback` — installs its own mask callback and, optionally, its own training loss
(`trainer.schedule_loss`), and returns the pruning report.

Registered here:

- ``epsd`` (METHOD §2, EPSD): a freshly initialised student trains `epsd_warmup_steps` steps with
  `CE + λ·L_SD`, is scored once with the registered `"epsd"` ScoringMethod `|θ·∂(CE + λ·L_SD)/∂θ|`, pruned to the
  target with one global mask, and trained on with the same loss. `L_SD = T²·KL(p_view2 ‖ p)`: self-distillation
  from the network's own softened prediction on a second view of the batch (the horizontally flipped images,
  detached) **(choice)**; `λ = self_distillation_weight`, `T = self_kd_temperature`. No separate teacher.
- ``dg2pf`` (METHOD §3, DG2PF): gradual global magnitude pruning over `gradual_pruning_epochs` = s_e epochs
  (epoch i = 1..s_e runs at sparsity `s·i/s_e`) with *simulated* pruning — every batch runs with the masked weights,
  gradients reach every weight, and the optimizer updates a dense copy, so pruned weights can recover — and self-KD
  from a frozen copy of the unpruned network, `α·T²·KL(p_dense ‖ p) + (1−α)·CE` (`self_kd_alpha` 0.75,
  `self_kd_temperature` 4). At the start of epoch s_e + 1 the masks are recomputed from the dense weights at the
  target sparsity and fixed; the remaining epochs are pruned fine-tuning with cross-entropy only.
- ``imp`` (METHOD §4, iterative magnitude pruning): k rounds of "prune a fraction of the remaining weights by
  global magnitude, then retrain `imp_epochs_per_round` epochs" (fine-tuning, no weight rewinding). The first
  round prunes in `prune()`; the retraining loss is the trainer's (KD or CE, `retrain_with_kd`).

Every schedule ends at exactly `round(sparsity · N_prunable)` pruned weights, also when training stops before the
schedule is complete (the masks are then completed at the target in `on_train_end`, with a warning).

Limitation: `train(resume_from_checkpoint=...)` restores the masks saved in the checkpoint as fixed masks; a schedule
interrupted mid-way (DG2PF's dense copy, IMP's remaining rounds, EPSD's loss) does not resume.

Add a schedule with `register_pruning_schedule(PruningSchedule(name, setup, scoring_method=...))`.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .adapters import forward_logits, unwrap_model
from .callbacks import GlobalMaskCallback
from .losses import self_distillation_loss, teacher_guided_loss
from .masking import apply_masks, global_masks, mask_hash, prunable_parameters, sparsity_report
from .scoring import (
    ScoringMethod,
    ScoringOptions,
    get_scoring_method,
    register_scoring_method,
    weight_times_gradient,
)

logger = logging.getLogger(__name__)


# --- registry ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PruningSchedule:
    """A non-one-shot pruning pipeline selectable by `pruning_method`.

    `setup(trainer)` is called by `trainer.prune()`; it prunes (now and/or through callbacks during training),
    sets `trainer.masks` and returns the report. `scoring_method` names the registered `ScoringMethod` the
    schedule ranks weights with (input validation uses it); `own_loss=True` when the schedule sets
    `trainer.schedule_loss` and therefore needs no teacher for retraining.
    """

    name: str
    setup: Callable[[Any], dict]
    scoring_method: str
    own_loss: bool = False
    description: str = ""


PRUNING_SCHEDULES: dict[str, PruningSchedule] = {}


def register_pruning_schedule(schedule: PruningSchedule) -> PruningSchedule:
    PRUNING_SCHEDULES[schedule.name] = schedule
    return schedule


def get_pruning_schedule(name: str) -> PruningSchedule | None:
    """The schedule registered under `name`, or None for a one-shot scoring method."""
    return PRUNING_SCHEDULES.get(name)


def resolve_scoring_method(pruning_method: str) -> ScoringMethod:
    """The `ScoringMethod` a `pruning_method` (one-shot criterion or registered schedule) ranks weights with."""
    schedule = get_pruning_schedule(pruning_method)
    return get_scoring_method(schedule.scoring_method if schedule else pruning_method)


def needs_teacher(args) -> bool:
    """Whether `args` (a `TeacherGuidedPruningConfig`) need a teacher: for scoring or for KD retraining."""
    schedule = get_pruning_schedule(args.pruning_method)
    method = resolve_scoring_method(args.pruning_method)
    own_loss = schedule is not None and schedule.own_loss
    return (method.needs_teacher and args.alpha > 0) or (args.retrain_with_kd and not own_loss)


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
    """Per-sample EPSD scoring loss (the `teacher` argument is unused: the network distils from itself)."""
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


# --- shared helpers ---------------------------------------------------------------------------------------------
def _report(trainer, masks: Mapping[str, torch.Tensor], **extra) -> dict:
    report = sparsity_report(trainer.model, masks)
    report.update(
        method=trainer.args.pruning_method,
        target_sparsity=trainer.args.sparsity,
        mask_sha256=mask_hash(masks),
        **extra,
    )
    return report


def _prunable(trainer) -> dict[str, torch.nn.Parameter]:
    return prunable_parameters(trainer.model, trainer.args.prune_include, trainer.args.prune_exclude)


def _remove_mask_callbacks(trainer) -> None:
    for callback in list(trainer.callback_handler.callbacks):
        if isinstance(callback, GlobalMaskCallback):
            trainer.callback_handler.remove_callback(callback)


def magnitude_masks(weights: Mapping[str, torch.Tensor], sparsity: float, min_density: float = 0.0, previous=None):
    """Global magnitude masks; with `previous` masks, already-pruned weights stay pruned (IMP)."""
    scores = {}
    for name, weight in weights.items():
        score = weight.detach().float().abs()
        if previous is not None:
            score = torch.where(previous[name].to(score.device), score, torch.full_like(score, -1.0))
        scores[name] = score
    return global_masks(scores, sparsity, min_density)


class ScheduledMaskCallback(GlobalMaskCallback):
    """A `GlobalMaskCallback` whose masks change at epoch boundaries (DG2PF, IMP).

    `events` maps an epoch index (0-based, applied at its beginning) to a sparsity; `mask_fn(weights, masks,
    sparsity)` returns the new masks from the current (dense) weights. With `simulated_until=E`, epochs < E use
    *simulated* pruning: the model's weights are masked outside the optimizer step, gradients reach every weight,
    and the optimizer updates a dense copy (restored right before each step), so pruned weights can recover; at the
    beginning of epoch E the masks are recomputed at `target` from the dense weights and fixed (hard masks:
    gradients, weights and optimizer state masked, as in `GlobalMaskCallback`). `on_change(masks, final)` is told
    about every new set of masks.
    """

    def __init__(
        self,
        masks: Mapping[str, torch.Tensor],
        events: Mapping[int, float],
        mask_fn: Callable,
        target: float,
        *,
        simulated_until: int | None = None,
        on_change: Callable | None = None,
    ):
        super().__init__(masks)
        self.events = dict(events)
        self.mask_fn = mask_fn
        self.target = target
        self.simulated_until = simulated_until
        self.on_change = on_change
        self.simulating = simulated_until is not None and simulated_until > 0
        self.finished = False
        self.dense: dict[str, torch.Tensor] | None = None
        self._named: dict[str, torch.nn.Parameter] = {}

    def update_masks(self, masks, args, state, control, model=None, optimizer=None) -> None:
        """Switch to new hard masks: pruned weights, their gradients and optimizer state are zeroed from now on."""
        self.masks = dict(masks)
        super().on_train_begin(args, state, control, model=model, optimizer=optimizer)

    def _weights(self) -> dict[str, torch.Tensor]:
        if self.dense is not None:
            return self.dense
        return {name: self._named[name] for name in self.masks}

    def _notify(self, final: bool) -> None:
        if self.on_change is not None:
            self.on_change(self.masks, final)

    @torch.no_grad()
    def _set_simulated(self, masks) -> None:
        self.masks = {name: mask.to(self._named[name].device) for name, mask in masks.items()}
        if self.dense is None:
            self.dense = {name: self._named[name].detach().clone() for name in self.masks}
        for name, mask in self.masks.items():
            self._named[name].copy_(self.dense[name] * mask)

    @torch.no_grad()
    def _finalize(self, args, state, control, model, optimizer, hooks: bool) -> None:
        masks = self.mask_fn(self._weights(), self.masks, self.target)
        if self.dense is not None:
            for name, weight in self.dense.items():
                self._named[name].copy_(weight)
            self.dense = None
        self.simulating = False
        self.finished = True
        if hooks:
            self.update_masks(masks, args, state, control, model=model, optimizer=optimizer)
        else:
            self.masks = dict(masks)
            self.bind(model)
            self.enforce(optimizer)
        self._notify(final=True)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._named = dict(unwrap_model(model).named_parameters())
        if self.simulating:
            self.bind(model)
            self._set_simulated(self.masks)
        else:
            super().on_train_begin(args, state, control, model=model, optimizer=optimizer, **kwargs)

    def on_epoch_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.finished:
            return
        epoch = int(round(state.epoch or 0))
        if self.simulated_until is not None and epoch >= self.simulated_until:
            self._finalize(args, state, control, model, optimizer, hooks=True)
        elif epoch in self.events:
            masks = self.mask_fn(self._weights(), self.masks, self.events[epoch])
            if self.simulating:
                self._set_simulated(masks)
            else:
                self.update_masks(masks, args, state, control, model=model, optimizer=optimizer)
            self.finished = self.simulated_until is None and epoch >= max(self.events)
            self._notify(final=self.finished)

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.simulating:  # the optimizer updates the dense weights with the gradients of the masked forward
            for name, weight in self.dense.items():
                self._named[name].copy_(weight)

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.simulating:
            for name, mask in self.masks.items():
                param = self._named[name]
                self.dense[name].copy_(param)
                param.mul_(mask)
        else:
            super().on_optimizer_step(args, state, control, optimizer=optimizer, **kwargs)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.finished:
            logger.warning(
                "Training ended before the pruning schedule did: masks completed at the target sparsity %.4f now, "
                "without retraining. Train for more epochs.",
                self.target,
            )
            self._finalize(args, state, control, model, optimizer, hooks=False)
        super().on_train_end(args, state, control, model=model, optimizer=optimizer, **kwargs)


def _track_masks(trainer, **extra) -> Callable:
    def on_change(masks, final):
        trainer.masks = dict(masks)
        report = _report(trainer, masks, **extra)
        report["schedule_finished"] = final
        trainer.pruning_report = report

    return on_change


# --- EPSD -------------------------------------------------------------------------------------------------------
def _epsd_loss(trainer, model, inputs, return_outputs=False):
    args = trainer.args
    logits, loss = epsd_logits_and_loss(
        model, inputs, weight=args.self_distillation_weight, temperature=args.self_kd_temperature
    )
    return (loss, {"logits": logits}) if return_outputs else loss


def _warm_up(trainer, steps: int, loss_fn) -> int:
    """`steps` SGD steps (lr `learning_rate`, momentum 0.9) of `loss_fn` on the training set; returns the count."""
    if steps == 0:
        return 0
    args, model = trainer.args, trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.learning_rate, momentum=0.9, weight_decay=args.weight_decay)
    loader = trainer.get_train_dataloader()
    was_training = model.training
    model.train()
    done = 0
    try:
        while done < steps:
            for batch in loader:
                loss = loss_fn(trainer, model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if trainer.accelerator.num_processes > 1:
                    for p in params:
                        if p.grad is not None:
                            p.grad = trainer.accelerator.reduce(p.grad, "mean")
                optimizer.step()
                done += 1
                if done >= steps:
                    break
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return done


def setup_epsd(trainer) -> dict:
    args = trainer.args
    warmup = _warm_up(trainer, args.epsd_warmup_steps, _epsd_loss)
    options = ScoringOptions(
        temperature=args.self_kd_temperature, self_distillation_weight=args.self_distillation_weight
    )
    scores = trainer.compute_scores(method="epsd", options=options)
    masks = global_masks(scores, args.sparsity, args.effective_min_layer_density)
    del scores
    trainer._install_masks(masks)
    trainer.schedule_loss = _epsd_loss
    trainer.pruning_report["warmup_steps"] = warmup
    return trainer.pruning_report


# --- DG2PF ------------------------------------------------------------------------------------------------------
def setup_dg2pf(trainer) -> dict:
    args = trainer.args
    params = _prunable(trainer)
    dense_teacher = copy.deepcopy(unwrap_model(trainer.model)).eval().requires_grad_(False)
    epochs = args.gradual_pruning_epochs
    events = {i: args.sparsity * (i + 1) / epochs for i in range(epochs)}

    def mask_fn(weights, masks, sparsity):
        return magnitude_masks(weights, sparsity, args.effective_min_layer_density)

    masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in params.items()}
    callback = ScheduledMaskCallback(
        masks,
        events,
        mask_fn,
        args.sparsity,
        simulated_until=epochs,
        on_change=_track_masks(trainer, gradual_pruning_epochs=epochs),
    )

    def loss(trainer, model, inputs, return_outputs=False):
        logits = forward_logits(model, inputs["pixel_values"])
        if callback.finished:  # pruned fine-tuning: cross-entropy only
            value = F.cross_entropy(logits.float(), inputs["labels"])
        else:
            with torch.no_grad():
                teacher_logits = forward_logits(dense_teacher, inputs["pixel_values"])
            # Hinton KD alpha·T²·KL(p_dense ‖ p) + (1-alpha)·CE: the teacher-guided loss with beta = 0
            value = teacher_guided_loss(
                logits,
                teacher_logits,
                inputs["labels"],
                alpha=args.self_kd_alpha,
                beta=0.0,
                temperature=args.self_kd_temperature,
            )
        return (value, {"logits": logits}) if return_outputs else value

    _remove_mask_callbacks(trainer)
    trainer.add_callback(callback)
    trainer.schedule_loss = loss
    trainer.dense_teacher = dense_teacher
    trainer.masks = masks
    report = _report(trainer, masks, gradual_pruning_epochs=epochs, schedule_finished=False)
    return report


# --- IMP --------------------------------------------------------------------------------------------------------
def imp_sparsities(sparsity: float, rounds: int | None = None, fraction: float = 0.15) -> list[float]:
    """Sparsity after each IMP round; the last one is exactly `sparsity`.

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


def setup_imp(trainer) -> dict:
    args = trainer.args
    params = _prunable(trainer)
    levels = imp_sparsities(args.sparsity, args.imp_rounds, args.imp_prune_fraction)

    def mask_fn(weights, masks, sparsity):
        return magnitude_masks(weights, sparsity, args.effective_min_layer_density, previous=masks)

    masks = magnitude_masks(params, levels[0], args.effective_min_layer_density)
    apply_masks(trainer.model, masks)
    events = {r * args.imp_epochs_per_round: level for r, level in enumerate(levels) if r > 0}
    callback = ScheduledMaskCallback(
        masks, events, mask_fn, args.sparsity, on_change=_track_masks(trainer, imp_sparsities=levels)
    )
    callback.finished = not events
    _remove_mask_callbacks(trainer)
    trainer.add_callback(callback)
    trainer.masks = masks
    return _report(trainer, masks, imp_sparsities=levels, schedule_finished=callback.finished)


register_pruning_schedule(
    PruningSchedule(
        "epsd",
        setup_epsd,
        scoring_method="epsd",
        own_loss=True,
        description="EPSD: early pruning of a fresh network scored and trained with self-distillation",
    )
)
register_pruning_schedule(
    PruningSchedule(
        "dg2pf",
        setup_dg2pf,
        scoring_method="magnitude",
        own_loss=True,
        description="DG2PF: gradual simulated magnitude pruning with self-KD, then pruned fine-tuning (CE)",
    )
)
register_pruning_schedule(
    PruningSchedule(
        "imp",
        setup_imp,
        scoring_method="magnitude",
        description="Iterative magnitude pruning: k rounds of prune-a-fraction (global) and retrain",
    )
)
