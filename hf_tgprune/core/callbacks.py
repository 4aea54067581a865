"""`GlobalMaskCallback`: the only place masks are enforced during training.

- gradients of pruned weights are masked in place as soon as each backward accumulates them (a post-accumulate
  gradient hook per masked parameter), so DDP's all-reduce, gradient clipping and the optimizer only ever see
  masked gradients;
- after every optimizer step the weights and every optimizer state tensor shaped like a weight (SGD momentum,
  Adam moments, ...) are multiplied by the mask, so weight decay or stale momentum cannot revive a weight.

No forward hooks and no `weight_orig` re-parametrisation: weights stay plain parameters, so `state_dict`,
`deepcopy`, `torch.compile` and `from_pretrained` keep working. The callbacks hold no masks of their own: they read
them from their source, a `hf_tgprune.Pruner` (the one owner of the masks) or, used on their own, the mapping they
were given.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Protocol

import torch
from transformers import TrainerCallback

from .adapters import unwrap_model
from .dtensor import is_sharded, local, mesh_of, reshard, shard_like, sum_over_mesh

logger = logging.getLogger(__name__)


def _warn_unfinished(target: float, unit: str) -> None:
    logger.warning(
        "Training ended before the pruning schedule did: masks completed at the target sparsity %.4f now, without "
        "retraining. Train for more %s.",
        target,
        unit,
    )


class _GradientMask:
    """Post-accumulate-grad hook: multiply `param.grad` by the 0/1 mask in place."""

    def __init__(self, multiplier: torch.Tensor):
        self.multiplier = multiplier

    def __call__(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            param.grad.mul_(self.multiplier)


class MaskSource(Protocol):
    """Where a mask callback reads its masks (`hf_tgprune.Pruner` is one)."""

    masks: dict[str, torch.Tensor] | None

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None: ...

    def log_report(self) -> None: ...


class FixedMasks:
    """The mask source of a callback used on its own: the masks it was given."""

    def __init__(self, masks: Mapping[str, torch.Tensor]):
        self.masks = dict(masks)

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        self.masks = dict(masks)

    def log_report(self) -> None:
        pass


class GlobalMaskCallback(TrainerCallback):
    """Keeps pruned weights at exactly zero through training.

    Args:
        masks: a `hf_tgprune.Pruner` (its current masks are enforced, whatever they become) or a mapping of bool
            masks keyed by parameter name (True = kept).
    """

    finished: bool | None = None  # whether a schedule is complete; None: fixed masks, no schedule
    # masks that change at Trainer events (steps, epochs): `start()` outside a Trainer's training is refused
    trainer_driven: bool = False

    def __init__(self, masks: MaskSource | Mapping[str, torch.Tensor]):
        self.source: MaskSource = FixedMasks(masks) if isinstance(masks, Mapping) else masks
        self._params: list[torch.nn.Parameter] = []
        self._multipliers: list[torch.Tensor] = []
        self._hooks: list = []
        self._model = None
        self._optimizer = None
        self._training = False  # between the Trainer's on_train_begin and on_train_end

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return self.source.masks or {}

    def bind(self, model: torch.nn.Module) -> None:
        """Resolve the masked parameters of `model` (wrapped or not), with 0/1 multipliers on their devices."""
        params = dict(unwrap_model(model).named_parameters())
        missing = [name for name in self.masks if name not in params]
        if missing:
            raise KeyError(f"GlobalMaskCallback: the model has no parameters named {missing[:5]}")
        self._params = [params[name] for name in self.masks]
        # 0/1 multipliers in the parameter dtype: an in-place multiply by them is several times faster than by bool
        self._multipliers = [mask.to(p.device, p.dtype) for p, mask in zip(self._params, self.masks.values())]

    @torch.no_grad()
    def enforce(self, optimizer=None) -> None:
        """Zero pruned weights and every weight-shaped optimizer state tensor (momentum, Adam moments, ...)."""
        if not self._params:
            return
        torch._foreach_mul_(self._params, self._multipliers)
        state = getattr(optimizer, "state", None) or {}
        tensors, multipliers = [], []
        for param, multiplier in zip(self._params, self._multipliers):
            for value in state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    tensors.append(value)
                    multipliers.append(multiplier if value.dtype == multiplier.dtype else multiplier.to(value.dtype))
        if tensors:
            torch._foreach_mul_(tensors, multipliers)

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def start(self, model, optimizer=None) -> None:
        """Bind to `model`, zero pruned weights and optimizer state, and mask gradients from now on."""
        if self.trainer_driven and not self._training:
            method = getattr(getattr(self.source, "args", None), "pruning_method", None)
            raise RuntimeError(
                f"pruning_method={method!r} changes its masks during training, at the Trainer's steps or epochs, "
                "so a plain PyTorch loop would leave the model as it is (dense for 'gradual'). Train with "
                "TeacherGuidedPruningTrainer, or use a one-shot pruning_method (e.g. 'tgp_fisher' or 'magnitude') "
                "with the Pruner in a plain loop."
            )
        self._model, self._optimizer = model, optimizer
        self.bind(model)
        self.enforce(optimizer)
        self._remove_hooks()
        for param, multiplier in zip(self._params, self._multipliers):
            if param.requires_grad:
                # runs right after each backward accumulates into .grad (before DDP's all-reduce, clipping and
                # the optimizer), masking in place
                self._hooks.append(param.register_post_accumulate_grad_hook(_GradientMask(multiplier)))

    def restart(self) -> None:
        """Enforce the source's current masks at once when training is under way (masks installed mid-training)."""
        if self._model is not None:
            self.start(self._model, self._optimizer)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._training = True
        self.start(model, optimizer)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.enforce(optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hooks()
        self._model = self._optimizer = None
        self._training = False


class ScheduledMaskCallback(GlobalMaskCallback):
    """A `GlobalMaskCallback` whose masks change at epoch boundaries (gradual and iterative schedules).

    Args:
        masks: the mask source (a `hf_tgprune.Pruner`, or the masks training starts with); every new set of masks
            is recorded there.
        events: epoch index (0-based, applied at its beginning) -> sparsity to prune to.
        mask_fn: `mask_fn(weights, masks, sparsity)` returns new masks from the current (dense) weights.
        target: the final sparsity.
        simulated_until: with E, epochs < E use *simulated* pruning: the model's weights are masked outside the
            optimizer step, gradients reach every weight and the optimizer updates a dense copy (restored right
            before each step), so pruned weights can recover; at the beginning of epoch E the masks are recomputed
            at `target` from the dense weights and fixed (hard masks, as in `GlobalMaskCallback`).

    `state_dict()` / `load_state_dict()` hold what a checkpoint needs to resume the schedule exactly: the events
    already applied, whether the schedule finished, and (while simulating) the dense weights under the mask.
    """

    trainer_driven = True

    def __init__(self, masks, events, mask_fn, target, *, simulated_until=None):
        super().__init__(masks)
        self.events = dict(events)
        self.mask_fn = mask_fn
        self.target = target
        self.simulated_until = simulated_until
        self.simulating = simulated_until is not None and simulated_until > 0
        self.finished = not self.events and not self.simulating
        self.applied: set[int] = set()
        self.dense: dict[str, torch.Tensor] | None = None
        self._named: dict[str, torch.nn.Parameter] = {}

    # --- resumable state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"applied": sorted(self.applied), "finished": self.finished, "simulating": self.simulating}
        if self.dense is not None:
            state["tensors"] = {f"dense.{name}": weight.detach().cpu() for name, weight in self.dense.items()}
        return state

    def load_state_dict(self, state: Mapping) -> None:
        self.applied = set(state.get("applied", []))
        self.finished = bool(state.get("finished", False))
        self.simulating = bool(state.get("simulating", self.simulating))
        tensors = state.get("tensors") or {}
        dense = {name[len("dense.") :]: t for name, t in tensors.items() if name.startswith("dense.")}
        self.dense = dense or None

    # --- mask changes -------------------------------------------------------------------------------------------
    def _switch(self, masks, model, optimizer) -> None:
        """Switch to new hard masks: pruned weights, their gradients and optimizer state are zeroed from now on."""
        self.source.set_masks(masks)
        self.start(model, optimizer)

    def _weights(self) -> dict[str, torch.Tensor]:
        return self.dense if self.dense is not None else {name: self._named[name] for name in self.masks}

    def _notify(self) -> None:
        self.source.log_report()

    @torch.no_grad()
    def _set_simulated(self, masks) -> None:
        self.source.set_masks({name: mask.to(self._named[name].device) for name, mask in masks.items()})
        if self.dense is None:
            self.dense = {name: self._named[name].detach().clone() for name in self.masks}
        self.dense = {name: weight.to(self._named[name].device) for name, weight in self.dense.items()}
        for name, mask in self.masks.items():
            self._named[name].copy_(self.dense[name] * mask)

    @torch.no_grad()
    def _finalize(self, model, optimizer, hooks: bool) -> None:
        masks = self.mask_fn(self._weights(), self.masks, self.target)
        if self.dense is not None:
            for name, weight in self.dense.items():
                self._named[name].copy_(weight)
            self.dense = None
        self.simulating = False
        self.finished = True
        if hooks:
            self._switch(masks, model, optimizer)
        else:
            self.source.set_masks(masks)
            self.bind(model)
            self.enforce(optimizer)
        self._notify()

    # --- Trainer events -----------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._training = True  # the simulated path calls start() later, from on_epoch_begin
        self._named = dict(unwrap_model(model).named_parameters())
        if self.simulating:
            self.bind(model)
            self._set_simulated(self.masks)
        else:
            super().on_train_begin(args, state, control, model=model, optimizer=optimizer, **kwargs)

    def on_epoch_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.finished:
            return
        # the epoch that begins (state.epoch is fractional when resuming inside an epoch)
        epoch = math.floor((state.epoch or 0) + 1e-6)
        if epoch in self.applied:  # resumed inside an epoch whose event already ran
            return
        if self.simulated_until is not None and epoch >= self.simulated_until:
            self.applied.add(epoch)
            self._finalize(model, optimizer, hooks=True)
        elif epoch in self.events:
            self.applied.add(epoch)
            masks = self.mask_fn(self._weights(), self.masks, self.events[epoch])
            if self.simulating:
                self._set_simulated(masks)
            else:
                self._switch(masks, model, optimizer)
            self.finished = self.simulated_until is None and epoch >= max(self.events)
            self._notify()

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
            _warn_unfinished(self.target, "epochs")
            self._finalize(model, optimizer, hooks=False)
        super().on_train_end(args, state, control, model=model, optimizer=optimizer, **kwargs)


def _laid_out_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor shaped like `param`, or already its shard) on `param`'s device and, for a weight
    sharded by FSDP2, as a DTensor holding this process's rows."""
    if is_sharded(value) or is_sharded(param):
        return shard_like(value, param)
    return value.to(param.device)


class GradualMaskCallback(GlobalMaskCallback):
    """A `GlobalMaskCallback` whose sparsity rises in steps during training (hard masks: a pruned weight stays pruned).

    Args:
        masks: the mask source (a `hf_tgprune.Pruner`); every new set of masks is recorded there.
        schedule: `schedule(max_steps)` returns {optimizer step: sparsity}, the mask updates of a run of `max_steps`
            steps (the last one at the target); it may raise ValueError when the run is too short for it.
        select: `select(scores, sparsity)` returns masks pruning exactly `round(sparsity·N)` weights, the weights that
            are already zero first (`Pruner.select_masks`), so the masks are nested.
        score_fn: `score_fn(weights, fisher)` returns the scores of each update from the current weights and, with
            `accumulate`, the summed squared gradients since the previous update (None otherwise).
        target: the final sparsity.
        accumulate: sum `grad²` of every masked weight at each optimizer step — after clipping and the all-reduce of
            several processes, so every process holds the same sums (under FSDP2, the rows of its own shards) — and
            reset the sums at each update: the empirical Fisher of the training loss, with no pass of its own.

    An update runs at the end of its optimizer step, before that step's checkpoint is written. `state_dict()` /
    `load_state_dict()` hold the updates applied, whether the schedule finished, and the sums, so a resumed run
    continues exactly.
    """

    trainer_driven = True

    def __init__(self, masks, schedule, select, score_fn, target, *, accumulate: bool):
        super().__init__(masks)
        self.schedule = schedule
        self.select = select
        self.score_fn = score_fn
        self.target = target
        self.accumulate = accumulate
        self.events: dict[int, float] = {}
        self.applied: set[int] = set()
        self.finished = False
        self.fisher: dict[str, torch.Tensor] | None = None
        self._named: dict[str, torch.nn.Parameter] = {}

    def state_dict(self) -> dict:
        state = {"applied": sorted(self.applied), "finished": self.finished}
        if self.fisher is not None:  # sums of sharded weights stay DTensors: each process writes its own rows
            state["tensors"] = {
                f"fisher.{name}": value if is_sharded(value) else value.detach().cpu()
                for name, value in self.fisher.items()
            }
        return state

    def load_state_dict(self, state: Mapping) -> None:
        self.applied = {int(step) for step in state.get("applied", [])}
        self.finished = bool(state.get("finished", False))
        tensors = state.get("tensors") or {}
        fisher = {name[len("fisher.") :]: t for name, t in tensors.items() if name.startswith("fisher.")}
        self.fisher = fisher or None

    def _reset_fisher(self) -> None:
        self.fisher = {name: torch.zeros_like(self._named[name], dtype=torch.float32) for name in self.masks}

    @torch.no_grad()
    def _update(self, sparsity: float, model, optimizer) -> None:
        weights = {name: self._named[name] for name in self.masks}
        masks = self.select(self.score_fn(weights, self.fisher if self.accumulate else None), sparsity)
        self.source.set_masks(masks)
        self.start(model, optimizer)
        self.source.log_report()
        if self.finished:
            self.fisher = None
        elif self.accumulate:
            self._reset_fisher()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.events = self.schedule(state.max_steps)
        reshard(unwrap_model(model))  # FSDP2: the sharded parameters (the optimizer's), not gathered copies
        self._named = dict(unwrap_model(model).named_parameters())
        super().on_train_begin(args, state, control, model=model, optimizer=optimizer, **kwargs)
        if self.accumulate and not self.finished:
            if self.fisher is None:
                self._reset_fisher()
            else:  # restored from a checkpoint (whole, or this process's rows), laid out like the weights
                self.fisher = {name: _laid_out_like(value, self._named[name]) for name, value in self.fisher.items()}

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.accumulate or self.finished:
            return
        sums, grads = [], []
        for name, total in self.fisher.items():
            grad = self._named[name].grad
            if grad is not None:  # this process's rows (FSDP2 has reduce-scattered the gradient over the processes)
                sums.append(local(total))
                grads.append(local(grad).float())
        # a step whose gradients overflowed (fp16 loss scaling) is skipped by the optimizer: skip it here as well.
        # Counted over every process of a sharded model, so all of them skip or add together.
        overflow = int(bool(grads) and not bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()))
        mesh = mesh_of(self.fisher.values())
        if mesh is not None:
            overflow = int(sum_over_mesh(torch.tensor([overflow], device=mesh.device_type), mesh).item())
        if sums and not overflow:
            torch._foreach_addcmul_(sums, grads, grads)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        if self.finished or step not in self.events or step in self.applied:
            return
        self.applied.add(step)
        self.finished = step >= max(self.events)  # before the update, whose report records it
        self._update(self.events[step], model, optimizer)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.finished:
            _warn_unfinished(self.target, "steps")
            self.finished = True
            self._update(self.target, model, optimizer)
        super().on_train_end(args, state, control, model=model, optimizer=optimizer, **kwargs)
