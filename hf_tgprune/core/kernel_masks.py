"""Masks on the kernel a weight-standardised convolution computes with, so that it is sparse in compute.

A weight-standardised convolution (timm `StdConv2d` / `ScaledStdConv2d`, transformers BiT) convolves with
`(w - mean) / std` (times a gain), which is non-zero where the stored `w` is pruned. Attaching a kernel mask makes it
convolve with `mask * standardise(w)` instead: zero wherever the weight is pruned (the statistics still come from the
whole stored weight, zeros included). The layer's own `forward` runs unchanged inside a `TorchFunctionMode` that
multiplies the weight argument of its `conv2d` call by the mask (a `with` block in an instance-level `forward`, so the
mode is left whatever happens in the forward); a forward that does not apply the mask exactly once raises. The mask
is a non-persistent buffer: it follows the module across devices and stays out of the state dict.

This changes the function the layer computes, so a model trained with it must be loaded through hf_tgprune (which
re-attaches the masks from `sparsity.json`) or exported (`bake_kernel_masks` turns each layer into a plain
`nn.Conv2d` holding the masked kernel); plain timm / transformers loading computes the dense kernel again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .adapters import unwrap_model

KERNEL_MASK_BUFFER = "kernel_mask"


class _MaskConvKernel(TorchFunctionMode):
    """Multiplies the weight of every `conv2d` call whose weight has the mask's shape by the mask, and counts them."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask
        self.applied = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            args = list(args)
            if len(args) > 1 and args[1].shape == self.mask.shape:
                args[1], self.applied = args[1] * self.mask, self.applied + 1
            elif "weight" in kwargs and kwargs["weight"].shape == self.mask.shape:
                kwargs["weight"], self.applied = kwargs["weight"] * self.mask, self.applied + 1
        return func(*args, **kwargs)


class _MaskedForward:
    """The instance-level `forward` of a kernel-masked convolution: its class's forward under `_MaskConvKernel`.
    A plain object (not a bound method), so that copies and pickles of the module keep it, bound to themselves."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.capture: _CaptureConv | None = None  # set by `bake_kernel_masks` for one forward

    def __call__(self, *args, **kwargs):
        module = self.module
        mode = _MaskConvKernel(getattr(module, KERNEL_MASK_BUFFER))
        capture = self.capture if self.capture is not None else contextlib.nullcontext()
        with capture, mode:  # the capture outside: the conv2d call reaches it with the masked kernel
            output = type(module).forward(module, *args, **kwargs)
        if self.capture is not None:
            self.capture.module_input = args[0] if args else None
        if mode.applied != 1:
            raise RuntimeError(
                f"The kernel mask of a {type(module).__name__} was applied {mode.applied} times in one forward "
                "(expected once: one conv2d call with a kernel of the weight's shape), so this layer does not compute "
                "what was trained. Its forward is not one hf_tgprune knows; prune it with "
                "mask_standardized_kernels=False."
            )
        return output


def _is_kernel_masked(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), _MaskedForward)


def _owner(model: nn.Module, name: str) -> nn.Module:
    module_name, _, attribute = name.rpartition(".")
    if attribute != "weight":
        raise ValueError(f"kernel masks apply to convolution weights, got {name!r}")
    return model.get_submodule(module_name)


def attach_kernel_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[str]:
    """Make the convolutions owning the weights in `masks` compute with `mask * kernel`; masks already attached to
    them are replaced. Returns the weight names, in the order given.

    Args:
        model: the model (a wrapper such as DDP is unwrapped).
        masks: bool tensors (True = kept) keyed by weight name, each of its weight's shape.
    """
    model = unwrap_model(model)
    for name, mask in masks.items():
        module = _owner(model, name)
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise ValueError(
                f"kernel mask of {name!r} has shape {tuple(mask.shape)}, its weight {tuple(module.weight.shape)}"
            )
        with torch.inference_mode(False):  # a normal tensor even when attached under inference_mode
            kept = mask.detach().to(device=module.weight.device, dtype=torch.bool).clone()
        module.register_buffer(KERNEL_MASK_BUFFER, kept, persistent=False)
        if not _is_kernel_masked(module):
            module.forward = _MaskedForward(module)
    return list(masks)


def detach_kernel_masks(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Remove the kernel masks of `names` (None: all), so that those layers compute with their whole kernel again;
    returns the weight names whose masks were removed."""
    model = unwrap_model(model)
    names = kernel_masked_layers(model) if names is None else list(names)
    removed = []
    for name in names:
        module = _owner(model, name)
        if _is_kernel_masked(module):
            del module.forward
            delattr(module, KERNEL_MASK_BUFFER)
            removed.append(name)
    return removed


def kernel_masked_layers(model: nn.Module) -> list[str]:
    """Weight names of the convolutions that compute with a kernel mask."""
    return [
        f"{module_name}.weight" if module_name else "weight"
        for module_name, module in unwrap_model(model).named_modules()
        if _is_kernel_masked(module)
    ]


def kernel_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The attached kernel masks by weight name (the buffers themselves)."""
    model = unwrap_model(model)
    return {name: getattr(_owner(model, name), KERNEL_MASK_BUFFER) for name in kernel_masked_layers(model)}


def sync_kernel_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], standardized: Iterable[str]) -> list[str]:
    """Make the kernel masks follow new weight masks: the `standardized` layers among `masks`, and every layer that
    already computes with a kernel mask and is still in `masks`, get their new mask; layers that leave `masks` compute
    with their whole kernel again. Returns the kernel-masked weight names."""
    attached = set(kernel_masked_layers(model))
    detach_kernel_masks(model, sorted(attached - set(masks)))
    targets = [name for name in masks if name in attached or name in set(standardized)]
    return attach_kernel_masks(model, {name: masks[name] for name in targets})


class _CaptureConv(TorchFunctionMode):
    """Records the arguments of the first `conv2d` call (and, set by the caller, the layer's own input)."""

    def __init__(self):
        super().__init__()
        self.call = None
        self.module_input = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d and self.call is None:
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            self.call = {**dict(zip(names, args)), **kwargs}
        return func(*args, **kwargs)


def bake_kernel_masks(model: nn.Module, example_inputs: tuple) -> list[str]:
    """Replace every kernel-masked convolution by a plain `nn.Conv2d` holding the kernel it computes with
    (`mask * standardise(w)`, fixed: for inference), so that the export can treat it as any sparse convolution.

    The kernel and the convolution's arguments are read from one forward pass on `example_inputs`. A layer whose
    convolution does not receive the layer's own input (it padded it first: timm's "Same" variants, BiT's dynamic
    padding where it pads at this input size) is left as it is. Returns the weight names of the replaced layers.
    """
    targets = {name: module for name, module in model.named_modules() if _is_kernel_masked(module)}
    for module in targets.values():
        module.forward.capture = _CaptureConv()
    try:
        with torch.no_grad():
            model(*example_inputs)
        captures = {name: module.forward.capture for name, module in targets.items()}
    finally:
        for module in targets.values():
            module.forward.capture = None
    baked = []
    for module_name, module in targets.items():
        call = captures[module_name].call
        if call is None or call["input"] is not captures[module_name].module_input:
            continue  # not run, or padded before the convolution: keep the layer
        conv = nn.Conv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=call.get("stride", 1),
            padding=call.get("padding", 0),
            dilation=call.get("dilation", 1),
            groups=call.get("groups", 1),
            bias=call.get("bias") is not None,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(call["weight"])
            if conv.bias is not None:
                conv.bias.copy_(call["bias"])
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, conv)
        baked.append(f"{module_name}.weight")
    return baked
