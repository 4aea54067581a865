"""Masks on the kernel a weight-standardised convolution computes with, so that it is sparse in compute.

A weight-standardised convolution (timm `StdConv2d` / `ScaledStdConv2d`, transformers BiT) convolves with
`(w - mean) / std` (times a gain), which is non-zero where the stored `w` is pruned. Attaching a kernel mask makes it
convolve with `mask * standardise(w)` instead: zero wherever the weight is pruned (the statistics still come from the
whole stored weight, zeros included). The layer's own `forward` runs unchanged; a forward pre-hook enters a
`TorchFunctionMode` that multiplies the weight argument of the layer's `conv2d` call by the mask, and a forward hook
(always called, also when the forward raises) leaves it. The mask is a non-persistent buffer: it follows the module
across devices and stays out of the state dict.

This changes the function the layer computes, so a model trained with it must be loaded through hf_tgprune (which
re-attaches the masks from `sparsity.json`) or exported (`bake_kernel_masks` turns each layer into a plain
`nn.Conv2d` holding the masked kernel); plain timm / transformers loading computes the dense kernel again.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .adapters import unwrap_model

KERNEL_MASK_BUFFER = "kernel_mask"


class _MaskConvKernel(TorchFunctionMode):
    """Multiplies the weight of every `conv2d` call whose weight has the mask's shape by the mask."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            args = list(args)
            if len(args) > 1 and args[1].shape == self.mask.shape:
                args[1] = args[1] * self.mask
            elif "weight" in kwargs and kwargs["weight"].shape == self.mask.shape:
                kwargs["weight"] = kwargs["weight"] * self.mask
        return func(*args, **kwargs)


class _KernelMaskHooks:
    """The pre-hook / hook pair of one module, and the mode it holds while the module's forward runs."""

    def __init__(self, module: nn.Module):
        self.modes: list[_MaskConvKernel] = []
        self.handles = (
            module.register_forward_pre_hook(self.enter),
            module.register_forward_hook(self.leave, always_call=True),
        )

    def enter(self, module, args):
        mode = _MaskConvKernel(getattr(module, KERNEL_MASK_BUFFER))
        mode.__enter__()
        self.modes.append(mode)

    def leave(self, module, args, output):
        if self.modes:
            self.modes.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _owner(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    module_name, _, attribute = name.rpartition(".")
    if attribute != "weight":
        raise ValueError(f"kernel masks apply to convolution weights, got {name!r}")
    return module_name, model.get_submodule(module_name)


def attach_kernel_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[str]:
    """Make the convolutions owning the weights in `masks` compute with `mask * kernel`; masks already attached to
    them are replaced. Returns the weight names, in the order given.

    Args:
        model: the model (a wrapper such as DDP is unwrapped).
        masks: bool tensors (True = kept) keyed by weight name, each of its weight's shape.
    """
    model = unwrap_model(model)
    for name, mask in masks.items():
        _, module = _owner(model, name)
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise ValueError(
                f"kernel mask of {name!r} has shape {tuple(mask.shape)}, its weight {tuple(module.weight.shape)}"
            )
        kept = mask.detach().to(device=module.weight.device, dtype=torch.bool)
        if getattr(module, "_kernel_mask_hooks", None) is None:
            module._kernel_mask_hooks = _KernelMaskHooks(module)
        module.register_buffer(KERNEL_MASK_BUFFER, kept, persistent=False)
    return list(masks)


def detach_kernel_masks(model: nn.Module) -> list[str]:
    """Remove every kernel mask (the layers compute with their whole kernel again); returns the weight names."""
    names = []
    for module_name, module in unwrap_model(model).named_modules():
        hooks = getattr(module, "_kernel_mask_hooks", None)
        if hooks is None:
            continue
        hooks.remove()
        del module._kernel_mask_hooks
        delattr(module, KERNEL_MASK_BUFFER)
        names.append(f"{module_name}.weight" if module_name else "weight")
    return names


def kernel_masked_layers(model: nn.Module) -> list[str]:
    """Weight names of the convolutions that compute with a kernel mask."""
    return [
        f"{module_name}.weight" if module_name else "weight"
        for module_name, module in unwrap_model(model).named_modules()
        if getattr(module, "_kernel_mask_hooks", None) is not None
    ]


class _CaptureConv(TorchFunctionMode):
    """Records the arguments of the first `conv2d` call."""

    def __init__(self):
        super().__init__()
        self.call = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d and self.call is None:
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            self.call = {**dict(zip(names, args)), **kwargs}
        return func(*args, **kwargs)


def bake_kernel_masks(model: nn.Module, example_inputs: tuple) -> list[str]:
    """Replace every kernel-masked convolution by a plain `nn.Conv2d` holding the kernel it computes with
    (`mask * standardise(w)`, fixed: for inference), so that the export can treat it as any sparse convolution.

    The kernel and the convolution's arguments are read from one forward pass on `example_inputs`; a layer that pads
    its input itself (timm's "Same" variants, BiT's dynamic padding) is left as it is. Returns the weight names of the
    replaced layers.
    """
    targets = {
        module_name: module
        for module_name, module in model.named_modules()
        if getattr(module, "_kernel_mask_hooks", None) is not None
    }
    calls, inputs, handles = {}, {}, []
    for module_name, module in targets.items():

        def pre(module, args, module_name=module_name):
            inputs[module_name] = args[0]
            capture = _CaptureConv()
            capture.__enter__()
            calls[module_name] = capture

        def post(module, args, output, module_name=module_name):
            calls[module_name].__exit__(None, None, None)

        # the capture's mode is entered before the kernel mask's and left after it (the outer mode), so the conv2d
        # call reaches it with the masked kernel
        handles.append(module.register_forward_pre_hook(pre, prepend=True))
        handles.append(module.register_forward_hook(post, always_call=True))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    baked = []
    for module_name, module in targets.items():
        call = calls[module_name].call if module_name in calls else None
        if call is None or call["input"] is not inputs[module_name]:
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
