"""Masks on the kernel a weight-standardised convolution computes with, so that it is sparse in compute.

A weight-standardised convolution (timm `StdConv2d` / `ScaledStdConv2d`, transformers BiT) convolves with
`(w - mean) / std` (times a gain), which is non-zero where the stored `w` is pruned. Attaching a kernel mask makes it
convolve with a masked kernel instead, zero wherever the weight is pruned: by default standardised over the surviving
weights (`"kept"` statistics), or `mask * standardise(w)` with the statistics of the whole stored weight, zeros
included (`"all"`). The layer's own `forward` runs unchanged inside a `TorchFunctionMode` that
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
from .utils import replace_submodule

KERNEL_MASK_BUFFER = "kernel_mask"


KERNEL_MASK_STATISTICS = ("kept", "all")
_EPS = 1e-6


def masked_kernel(kernel: torch.Tensor, mask: torch.Tensor, statistics: str) -> torch.Tensor:
    """The kernel a kernel-masked convolution computes with, from the standardised kernel it would compute with.

    `"all"`: `mask * kernel`, the layer's own statistics over the whole stored weight (pruned zeros included).
    `"kept"`: standardised again over the kept entries of each output channel, then masked, at the scale the layer's
    kernel had (its standard deviation over all entries: 1, or the gain of a scaled standardisation). Standardising is
    affine per channel, so this equals standardising the surviving weights alone.
    """
    if statistics == "all":
        return kernel * mask
    dims = tuple(range(1, kernel.dim()))
    kept = mask.to(kernel.dtype)
    count = kept.sum(dim=dims, keepdim=True).clamp_min(1)
    mean = (kernel * kept).sum(dim=dims, keepdim=True) / count
    centred = (kernel - mean) * kept
    std = (centred.square().sum(dim=dims, keepdim=True) / count + _EPS).sqrt()
    return centred / std * kernel.std(dim=dims, keepdim=True, unbiased=False)


class _MaskConvKernel(TorchFunctionMode):
    """Replaces the weight of every `conv2d` call whose weight has the mask's shape by its masked kernel, and counts
    them."""

    def __init__(self, mask: torch.Tensor, statistics: str):
        super().__init__()
        self.mask = mask
        self.statistics = statistics
        self.applied = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            args = list(args)
            if len(args) > 1 and args[1].shape == self.mask.shape:
                args[1], self.applied = masked_kernel(args[1], self.mask, self.statistics), self.applied + 1
            elif "weight" in kwargs and kwargs["weight"].shape == self.mask.shape:
                kwargs["weight"] = masked_kernel(kwargs["weight"], self.mask, self.statistics)
                self.applied += 1
        return func(*args, **kwargs)


class _MaskedForward:
    """The instance-level `forward` of a kernel-masked convolution: its class's forward under `_MaskConvKernel`.
    A plain object (not a bound method), so that copies and pickles of the module keep it, bound to themselves."""

    def __init__(self, module: nn.Module, statistics: str):
        self.module = module
        self.statistics = statistics
        self.capture: _CaptureConv | None = None  # set by `bake_kernel_masks` for one forward

    def __call__(self, *args, **kwargs):
        module = self.module
        mode = _MaskConvKernel(getattr(module, KERNEL_MASK_BUFFER), self.statistics)
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


def attach_kernel_masks(
    model: nn.Module, masks: Mapping[str, torch.Tensor], statistics: str | Mapping[str, str] = "kept"
) -> list[str]:
    """Make the convolutions owning the weights in `masks` compute with their masked kernel (`masked_kernel`); masks
    already attached to them are replaced. Returns the weight names, in the order given.

    Args:
        model: the model (a wrapper such as DDP is unwrapped).
        masks: bool tensors (True = kept) keyed by weight name, each of its weight's shape.
        statistics: `"kept"` or `"all"` (see `masked_kernel`), or one of them per weight name.
    """
    model = unwrap_model(model)
    for name, mask in masks.items():
        chosen = statistics if isinstance(statistics, str) else statistics[name]
        if chosen not in KERNEL_MASK_STATISTICS:
            raise ValueError(f"kernel mask statistics must be one of {KERNEL_MASK_STATISTICS}, got {chosen!r}")
        module = _owner(model, name)
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise ValueError(
                f"kernel mask of {name!r} has shape {tuple(mask.shape)}, its weight {tuple(module.weight.shape)}"
            )
        with torch.inference_mode(False):  # a normal tensor even when attached under inference_mode
            kept = mask.detach().to(device=module.weight.device, dtype=torch.bool).clone()
        module.register_buffer(KERNEL_MASK_BUFFER, kept, persistent=False)
        if _is_kernel_masked(module):
            module.forward.statistics = chosen
        else:
            module.forward = _MaskedForward(module, chosen)
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


def kernel_mask_statistics(model: nn.Module) -> dict[str, str]:
    """The statistics (`"kept"` / `"all"`) of every kernel-masked convolution, by weight name."""
    model = unwrap_model(model)
    return {name: _owner(model, name).forward.statistics for name in kernel_masked_layers(model)}


def sync_kernel_masks(
    model: nn.Module, masks: Mapping[str, torch.Tensor], standardized: Iterable[str], statistics: str = "kept"
) -> list[str]:
    """Make the kernel masks follow new weight masks: the `standardized` layers among `masks` (with `statistics`), and
    every layer that already computes with a kernel mask and is still in `masks` (with its own statistics), get their
    new mask; layers that leave `masks` compute with their whole kernel again. Returns the kernel-masked names."""
    existing = kernel_mask_statistics(model)
    detach_kernel_masks(model, sorted(set(existing) - set(masks)))
    standardized = set(standardized)
    chosen = {name: existing.get(name, statistics) for name in masks if name in existing or name in standardized}
    return attach_kernel_masks(model, {name: masks[name] for name in chosen}, chosen)


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
    (fixed: for inference), so that the export can treat it as any sparse convolution.

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
        replace_submodule(model, module_name, conv)
        baked.append(f"{module_name}.weight")
    return baked
