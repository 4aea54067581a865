"""BatchNorm recalibration: re-estimate running statistics after masking, without gradients or weight changes.

Pruning changes what every convolution outputs, so the running mean/variance a BatchNorm layer learned for the dense
weights no longer match: a one-shot-pruned network evaluated right away is often at chance. Resetting the running
statistics and re-estimating them with forward passes over a few hundred images (BatchNorm in train mode, every
other module in eval mode, `momentum=None` so the estimate is the plain average over batches) fixes that before
evaluation and before retraining. No parameter changes; only BatchNorm buffers do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from .adapters import forward_logits, unwrap_model
from .dtensor import mesh_of, reshard


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """The BatchNorm layers of `model` that track running statistics, by module name."""
    return {
        name: module
        for name, module in unwrap_model(model).named_modules()
        if isinstance(module, _BatchNorm) and module.track_running_stats
    }


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor] | None],
    *,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
    total: int | None = None,
) -> int:
    """Reset and re-estimate the running statistics of every BatchNorm layer of `model`.

    Args:
        model: the (pruned) network; wrappers (DDP, `torch.compile`) are stripped.
        batches: dicts with `pixel_values` (labels are not needed), or `None` for a rank whose shard is empty;
            batches of a single image are skipped (BatchNorm cannot take statistics of one image).
        all_reduce: sums a tensor over processes; when given, every rank ends with the sample-weighted average of
            all ranks' statistics, so all ranks hold the same buffers.
        progress: show a progress bar.
        total: number of batches, for the progress bar.

    A model sharded by FSDP2 is recalibrated with the statistics of each *global* batch instead: every BatchNorm layer
    normalises with, and accumulates, the mean and variance of all processes' parts of the batch (summed over the
    mesh, two small all-reduces per layer and batch), as one process seeing the whole batch would; so the statistics
    do not depend on the number of processes. Every rank then needs every batch (zero-length for an empty shard).

    Returns:
        The number of images this process forwarded (0 when the model has no BatchNorm layer).
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    network = unwrap_model(model)
    reshard(network)
    modes = {module: module.training for module in network.modules()}
    momenta = {layer: layer.momentum for layer in layers.values()}
    device = next(network.parameters()).device
    mesh = mesh_of(network.parameters())
    seen = 0
    synchronized = global_batch_statistics(network, mesh.get_group()) if mesh is not None else nullcontext()
    try:
        network.eval()
        for layer in layers.values():
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average over the recalibration batches
            layer.train()
        with synchronized:  # FSDP2: the statistics of each global batch
            for batch in tqdm(batches, total=total, desc="Recalibrating BatchNorm", disable=not progress):
                if mesh is not None and batch is None:
                    raise ValueError(
                        "Under FSDP2 every process must run every recalibration batch; pass zero-length batches for "
                        "empty shards (hf_tgprune.Pruner does)."
                    )
                if mesh is None and (batch is None or len(batch["pixel_values"]) < 2):  # no statistics of one image
                    continue
                pixel_values = batch["pixel_values"].to(device)
                forward_logits(network, pixel_values)
                seen += pixel_values.shape[0]
        if mesh is not None:
            if all(int(layer.num_batches_tracked) == 0 for layer in layers.values()):
                raise ValueError("BatchNorm recalibration got no batch of >= 2 images; pass more calibration images.")
        elif all_reduce is not None:
            _average_over_processes(layers, seen, all_reduce)
        elif seen == 0:
            raise ValueError("BatchNorm recalibration got no images; pass a non-empty calibration set.")
    finally:
        for module, training in modes.items():
            module.train(training)
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        reshard(network)  # FSDP2 keeps a root's weights gathered after a forward without backward
    return seen


@contextmanager
def scoring_mode(model: nn.Module, bn_mode: str = "eval") -> Iterator[list[_BatchNorm]]:
    """Within the context every module of `model` is in eval mode, except with `bn_mode="train"` the BatchNorm layers
    that track running statistics, which normalise with the statistics of each batch without updating their running
    statistics (yielded, so a caller can put them back to eval mode for a batch they cannot normalise: they then use
    the running statistics). Dropout and drop-path stay off in both modes, so a scoring pass is deterministic and does
    not depend on how a batch is split over processes. On exit every module's mode is as it was, and the running
    statistics were never written: scoring changes nothing in the model."""
    if bn_mode not in ("eval", "train"):
        raise ValueError(f"scoring_bn_mode must be 'eval' or 'train', got {bn_mode!r}")
    modules = list(unwrap_model(model).modules())
    modes = [module.training for module in modules]
    layers = list(batchnorm_layers(model).values()) if bn_mode == "train" else []
    for module in modules:
        module.training = False
    for layer in layers:
        layer.training, layer.track_running_stats = True, False
    try:
        yield layers
    finally:
        for module, mode in zip(modules, modes):
            module.training = mode
        for layer in layers:
            layer.track_running_stats = True


@contextmanager
def global_batch_statistics(model: nn.Module, group=None) -> Iterator[None]:
    """Within the context, every BatchNorm layer of `model` in train mode normalises with the mean and variance of the
    *global* batch (the parts of all processes of `group`, summed with a differentiable all-reduce, so gradients flow
    through them as in one process seeing the whole batch) and, if it tracks running statistics (not while scoring),
    updates them with these. Layers in eval mode are unchanged. Every process must run every forward (a zero-length
    batch for an empty part). What a layer's own forward adds after normalising (timm's norm-act layers: dropout and
    activation) is kept; a BatchNorm subclass whose forward is unknown is refused on entry."""

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        return _SumOverProcesses.apply(tensor, group)

    layers = [module for module in unwrap_model(model).modules() if isinstance(module, _BatchNorm)]
    after = [after_normalisation(layer) for layer in layers]  # refuses an unknown layer before any forward
    for layer, post in zip(layers, after):
        layer.forward = partial(_global_batch_norm, layer, reduce, post=post)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


class _SumOverProcesses(torch.autograd.Function):
    """`all_reduce` (sum) that gradients flow through: every process's output is the sum of all inputs, so the
    gradient of an input is the sum of all processes' output gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group=None) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def after_normalisation(layer: _BatchNorm) -> Callable[[torch.Tensor], torch.Tensor]:
    """What `layer`'s own forward applies to the normalised tensor: nothing for torch's BatchNorm classes, the dropout
    then activation of timm's norm-act layers (`BatchNormAct2d`, `SyncBatchNormAct`). Any other BatchNorm subclass
    that overrides `forward` is refused: normalising it with global-batch statistics would skip what it adds."""
    cls = type(layer)
    if cls.forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward):
        return _identity
    if cls.__module__.startswith("timm.") and cls.__name__ in ("BatchNormAct2d", "SyncBatchNormAct"):
        steps = [getattr(layer, name, None) for name in ("drop", "act")]
        steps = [step for step in steps if isinstance(step, nn.Module)]

        def post(x: torch.Tensor) -> torch.Tensor:
            for step in steps:
                x = step(x)
            return x

        return post
    raise TypeError(
        f"{cls.__module__}.{cls.__name__} overrides BatchNorm's forward, so hf_tgprune cannot normalise it with the "
        "statistics of the global batch (train-mode scoring over several processes, BatchNorm recalibration of an "
        "FSDP2-sharded model) without skipping what it adds. Score with scoring_bn_mode='eval' (and, for an FSDP2 "
        "model, set recalibrate_bn=False), or use torch's BatchNorm followed by its own activation module."
    )


def _global_batch_norm(layer: _BatchNorm, all_reduce, x: torch.Tensor, post=_identity) -> torch.Tensor:
    """Train-mode BatchNorm over the global batch whose part `x` this process holds: normalise with the mean and
    (biased) variance of every process's part, and, if it tracks them, update the running statistics with them
    (variance unbiased; a cumulative average for `momentum=None`, as BatchNorm does), then apply `post` (what the
    layer's own forward adds after normalising, `after_normalisation`). A global batch of one image is normalised
    with the running statistics and leaves them unchanged, as one process does (recalibration skips it; scoring runs it
    in eval mode)."""
    if not layer.training and layer.running_mean is not None:
        return type(layer).forward(layer, x)
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    values = x.to(torch.promote_types(x.dtype, torch.float32))
    sizes = torch.tensor([x.shape[0], x.numel() / channels], dtype=values.dtype, device=x.device)
    first = all_reduce(torch.cat([values.sum(dims), sizes]))
    images, count = int(first[-2].detach()), float(first[-1].detach())
    if images < 2 and layer.running_mean is not None:
        return post(
            nn.functional.batch_norm(
                x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps
            )
        )
    if count < 2:
        raise ValueError(
            f"BatchNorm needs more than 1 value per channel when training; the global batch has {count:g}."
        )
    mean = first[:channels] / count
    shape = [1, channels] + [1] * (x.dim() - 2)
    centred = values - mean.view(shape)
    var = all_reduce(centred.square().sum(dims)) / count
    if layer.track_running_stats:
        with torch.no_grad():
            layer.num_batches_tracked += 1
            step = 1.0 / float(layer.num_batches_tracked) if layer.momentum is None else layer.momentum
            layer.running_mean.add_((mean.detach() - layer.running_mean) * step)
            layer.running_var.add_((var.detach() * (count / (count - 1)) - layer.running_var) * step)
    out = centred * torch.rsqrt(var + layer.eps).view(shape)
    if layer.affine:
        out = out * layer.weight.view(shape) + layer.bias.view(shape)
    return post(out.to(x.dtype))


def _average_over_processes(layers: Mapping[str, _BatchNorm], seen: int, all_reduce) -> None:
    stats = [buffer for layer in layers.values() for buffer in (layer.running_mean, layer.running_var)]
    flat = torch.cat(
        [s.reshape(-1).float() * seen for s in stats] + [torch.tensor([float(seen)], device=stats[0].device)]
    )
    flat = all_reduce(flat)
    count = float(flat[-1])
    if count == 0:
        raise ValueError("BatchNorm recalibration got no images on any process; pass a non-empty calibration set.")
    offset = 0
    for buffer in stats:
        numel = buffer.numel()
        buffer.copy_((flat[offset : offset + numel] / count).view_as(buffer))
        offset += numel
