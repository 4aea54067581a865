"""`GlobalMaskCallback`: the only place masks are enforced during training.

- gradients of pruned weights are masked in place as soon as each backward accumulates them (a post-accumulate
  gradient hook per masked parameter), so DDP's all-reduce, gradient clipping and the optimizer only ever see
  masked gradients;
- after every optimizer step the weights and every optimizer state tensor shaped like a weight (SGD momentum,
  Adam moments, ...) are multiplied by the mask, so weight decay or stale momentum cannot revive a weight.

No forward hooks and no `weight_orig` re-parametrisation: weights stay plain parameters, so `state_dict`,
`deepcopy`, `torch.compile` and `from_pretrained` keep working. The trainer writes the masks into every checkpoint
(`masks.safetensors`, as part of saving the model) so that `resume_from_checkpoint` restores them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import TrainerCallback

from .adapters import unwrap_model


class _GradientMask:
    """Post-accumulate-grad hook: multiply `param.grad` by the 0/1 mask in place."""

    def __init__(self, multiplier: torch.Tensor):
        self.multiplier = multiplier

    def __call__(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            param.grad.mul_(self.multiplier)


class GlobalMaskCallback(TrainerCallback):
    """Keeps pruned weights at exactly zero through training."""

    def __init__(self, masks: Mapping[str, torch.Tensor]):
        self.masks = dict(masks)
        self._params: list[torch.nn.Parameter] = []
        self._multipliers: list[torch.Tensor] = []
        self._hooks: list = []

    def bind(self, model: torch.nn.Module) -> None:
        """Resolve the masked parameters of `model` (wrapped or not) and move the masks to their devices."""
        params = dict(unwrap_model(model).named_parameters())
        missing = [name for name in self.masks if name not in params]
        if missing:
            raise KeyError(f"GlobalMaskCallback: the model has no parameters named {missing[:5]}")
        self.masks = {name: mask.to(params[name].device) for name, mask in self.masks.items()}
        self._params = [params[name] for name in self.masks]
        # 0/1 multipliers in the parameter dtype: an in-place multiply by them is several times faster than by bool
        self._multipliers = [mask.to(p.dtype) for p, mask in zip(self._params, self.masks.values())]

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

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.bind(model)
        self.enforce(optimizer)
        self._remove_hooks()
        for param, multiplier in zip(self._params, self._multipliers):
            if param.requires_grad:
                # runs right after each backward accumulates into .grad (before DDP's all-reduce, clipping and
                # the optimizer), masking in place
                self._hooks.append(param.register_post_accumulate_grad_hook(_GradientMask(multiplier)))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.enforce(optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hooks()
