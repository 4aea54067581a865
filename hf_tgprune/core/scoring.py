"""Importance scores: the one place where the scoring formulas live.

For the paper's criterion `"tgp"` (the default of this functional pass), every prunable weight θ gets

    L_score = alpha * T^2 * CAKLD(z_s / T, z_t / T) + (1 - alpha) * CE(z_s, y)      (hf_tgprune.core.losses)
    s(θ)    = | θ ⊙ ∂L_score/∂θ |

per calibration batch, aggregated over batches with a bias-corrected EMA (momentum 0.9, divided by
`1 - 0.9^N`) or a plain sum, in float32. `"tgp_fisher"` is the teacher-guided Fisher (OBD) criterion

    s(θ)    = θ² · Σ_b (∂L_score/∂θ on calibration batch b)²

(always summed over batches): near convergence the mean gradient is mostly noise, its second moment is not; it is
scored in 5 rounds unless `PruningArguments.pruning_rounds` says otherwise. `"tgp_taylor"` is the *signed*
second-order change of the teacher-guided loss when a weight is zeroed,

    s(θ)    = Σ_b ( −θ · g_b + ½ · n_b · θ² · g_b² )   ∝   −θ·ḡ + ½·F·θ²

(g_b the mean gradient of calibration batch b of n_b images, so n_b·g_b² estimates the per-image Fisher F): the
weights whose removal raises the loss least are pruned first, whatever their sign. Signed scores are compared inside a
layer (`layer_allocation="magnitude"` by default), since a global ranking of them empties whole layers. Other criteria
are registered next to them (`register_scoring_method`).

The scoring pass takes no optimizer step and never writes `.grad`: gradients come from `torch.autograd.grad`
with respect to the prunable weights only. Every module is in eval mode while scoring (dropout and drop-path off),
except with `bn_mode="train"` the BatchNorm layers, which normalise with the statistics of each calibration batch;
their running statistics and every module's mode are put back afterwards, so no parameter or buffer of the student
changes (`hf_tgprune.core.recalibration.scoring_mode`). Under several processes each rank sums the per-sample losses
of its shard of every calibration batch, gradients and sample counts are all-reduced, and the result equals a single
process seeing the whole batch: the mask does not depend on the number of processes. With BatchNorm in train mode
every BatchNorm layer then normalises with the statistics of the global batch
(`hf_tgprune.core.recalibration.global_batch_statistics`), for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import check_same_num_labels, forward_logits, unwrap_model
from .adapters import teacher_logits as forward_teacher
from .dtensor import fsdp_mesh, is_sharded, like, local, reshard, sum_over_mesh
from .losses import check_finite_logits, teacher_guided_loss
from .masking import prunable_parameters
from .recalibration import global_batch_statistics, scoring_mode
from .registry import Registry


@dataclass(frozen=True)
class ScoringOptions:
    """Hyperparameters of the scoring loss."""

    alpha: float = 0.7
    beta: float = 0.5
    temperature: float = 3.0
    normalize_logits: bool = False
    # weight λ of the self-distillation term of EPSD's CE + λ·L_SD (hf_tgprune.methods.epsd)
    self_distillation_weight: float = 1.0


# batch_loss(model, teacher, batch, options) -> per-sample losses, shape [batch]
BatchLoss = Callable[[nn.Module, nn.Module | None, Mapping[str, torch.Tensor], ScoringOptions], torch.Tensor]
# saliency(weight, gradient_or_None, generator) -> scores shaped like the weight; with `ScoringMethod.uses_batch_size`
# it is also given `batch_size=`, the number of images the gradient is the mean over
Saliency = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class ScoringMethod:
    name: str
    saliency: Saliency
    batch_loss: BatchLoss | None = None  # None: data-free (no calibration pass)
    needs_teacher: bool = False
    description: str = ""
    # how per-batch saliencies are combined when the method prescribes it ("sum" for Fisher); None: the caller's
    aggregation: str | None = None
    # scores can be negative (a change of the loss, not a magnitude): LAMP normalisation does not apply to them
    signed: bool = False
    # the saliency also takes `batch_size=` (images in the batch whose mean gradient it is given)
    uses_batch_size: bool = False

    @property
    def data_free(self) -> bool:
        return self.batch_loss is None


SCORING_METHODS: Registry[ScoringMethod] = Registry("scoring method")


def register_scoring_method(method: ScoringMethod) -> ScoringMethod:
    """Register a scoring criterion under `method.name` (a name can be registered once)."""
    return SCORING_METHODS.register(method.name, method)


def get_scoring_method(name: str) -> ScoringMethod:
    return SCORING_METHODS.get(name)


# --- the teacher's logits, reused across passes over the same images ---------------------------------------------
class TeacherLogitMemo:
    """The teacher's logits on the calibration batches of one scoring pass, reused by later passes over the same
    batches: pruning rounds score the same images with the same frozen teacher, so only the first round needs the
    teacher's forward passes (`Pruner.compute_masks` keeps one across its rounds).

    Batches are matched by their position in the pass and a logit is reused only when the batch's pixel values are
    equal to the ones it was computed on (a calibration set with random transforms gets fresh forwards, so the
    scores are exactly those without the memo). The images of the last pass stay in CPU memory meanwhile
    (`num_calibration_samples` of them). `forwards` counts the batches the teacher actually ran.
    """

    def __init__(self):
        self.entries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # position -> (pixel values, logits)
        self.position = 0
        self.forwards = 0

    def start_pass(self) -> None:
        self.position = 0

    def __call__(self, teacher: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        index, self.position = self.position, self.position + 1
        pixels = pixel_values.detach().to("cpu", copy=True)  # a copy: a caller may refill its buffer in place
        seen, logits = self.entries.get(index, (None, None))
        if (
            seen is not None
            and seen.shape == pixels.shape
            and seen.dtype == pixels.dtype
            and torch.equal(seen, pixels)
        ):
            return logits
        logits = forward_teacher(teacher, pixel_values)
        self.forwards += 1
        self.entries[index] = (pixels, logits)
        return logits


_ACTIVE_MEMO: ContextVar[TeacherLogitMemo | None] = ContextVar("teacher_logit_memo", default=None)


@contextmanager
def reusing_teacher_logits(memo: TeacherLogitMemo | None):
    """Within it, `teacher_guided_batch_loss` takes the teacher's logits from `memo` (None: from the teacher)."""
    if memo is not None:
        memo.start_pass()
    token = _ACTIVE_MEMO.set(memo)
    try:
        yield
    finally:
        _ACTIVE_MEMO.reset(token)


# --- losses and saliencies --------------------------------------------------------------------------------------
def teacher_guided_batch_loss(model, teacher, batch, options: ScoringOptions) -> torch.Tensor:
    logits = forward_logits(model, batch["pixel_values"])
    check_finite_logits(logits, "student", model)  # a NaN weight anywhere makes every score NaN: name it here
    teacher_logits = None
    if options.alpha != 0:
        memo = _ACTIVE_MEMO.get()
        with torch.no_grad():
            teacher_logits = (memo or forward_teacher)(teacher, batch["pixel_values"])
        reshard(teacher)  # FSDP2 keeps a root's weights gathered after a forward without backward
        check_finite_logits(teacher_logits, "teacher", teacher)
    return teacher_guided_loss(
        logits,
        teacher_logits,
        batch["labels"],
        alpha=options.alpha,
        beta=options.beta,
        temperature=options.temperature,
        normalize=options.normalize_logits,
        reduction="none",
    )


def cross_entropy_batch_loss(model, teacher, batch, options: ScoringOptions) -> torch.Tensor:
    logits = forward_logits(model, batch["pixel_values"])
    check_finite_logits(logits, "student", model)
    return torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")


def weight_times_gradient(weight, grad, generator=None) -> torch.Tensor:
    return torch.mul(weight.detach(), grad).abs_()


def gradient_magnitude(weight, grad, generator=None) -> torch.Tensor:
    return grad.abs()


def weight_squared_times_squared_gradient(weight, grad, generator=None) -> torch.Tensor:
    """`θ² · g²`: summed over calibration batches this is the diagonal empirical-Fisher (OBD) saliency."""
    return torch.mul(weight.detach(), grad).square_()


def second_order_loss_change(weight, grad, generator=None, *, batch_size: int) -> torch.Tensor:
    """`−θ·g + ½·n·θ²·g²`: one batch's share of the second-order change of the loss when θ is set to zero (g the
    batch's mean gradient over `batch_size` = n images, so n·g² estimates the per-image Fisher)."""
    product = torch.mul(weight.detach(), grad)
    return product.square().mul_(0.5 * batch_size).sub_(product)


def weight_magnitude(weight, grad=None, generator=None) -> torch.Tensor:
    return weight.detach().float().abs()


def uniform_random(weight, grad=None, generator=None) -> torch.Tensor:
    return torch.rand(weight.shape, generator=generator, dtype=torch.float32).to(weight.device)


register_scoring_method(
    ScoringMethod(
        "tgp",
        weight_times_gradient,
        teacher_guided_batch_loss,
        needs_teacher=True,
        description="|θ·∂L/∂θ| of the teacher-guided loss alpha·T²·CAKLD + (1-alpha)·CE",
    )
)
register_scoring_method(
    ScoringMethod(
        "tgp_fisher",
        weight_squared_times_squared_gradient,
        teacher_guided_batch_loss,
        needs_teacher=True,
        aggregation="sum",
        description="θ²·Σ_b (∂L/∂θ on calibration batch b)² of the teacher-guided loss (Fisher / OBD)",
    )
)
register_scoring_method(
    ScoringMethod(
        "tgp_taylor",
        second_order_loss_change,
        teacher_guided_batch_loss,
        needs_teacher=True,
        aggregation="sum",
        signed=True,
        uses_batch_size=True,
        description="Σ_b (−θ·g_b + ½·n_b·θ²·g_b²): the signed second-order change of the teacher-guided loss",
    )
)
register_scoring_method(
    ScoringMethod("snip", weight_times_gradient, cross_entropy_batch_loss, description="|θ·∂CE/∂θ| (SNIP)")
)
register_scoring_method(
    ScoringMethod(
        "grad",
        gradient_magnitude,
        teacher_guided_batch_loss,
        needs_teacher=True,
        description="|∂L/∂θ| of the teacher-guided loss",
    )
)
register_scoring_method(ScoringMethod("magnitude", weight_magnitude, description="|θ|"))
register_scoring_method(ScoringMethod("random", uniform_random, description="uniform random scores"))


# --- the scoring pass -------------------------------------------------------------------------------------------
def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def compute_importance_scores(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor] | None] | None = None,
    *,
    method: str = "tgp",
    teacher: nn.Module | None = None,
    params: Mapping[str, nn.Parameter] | None = None,
    options: ScoringOptions | None = None,
    aggregation: str = "ema",
    ema_momentum: float = 0.9,
    bn_mode: str = "eval",
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    progress: bool = False,
    total: int | None = None,
    teacher_memo: TeacherLogitMemo | None = None,
) -> dict[str, torch.Tensor]:
    """Score every prunable weight of `model` (float32 tensors keyed like `params`).

    `batches` yields `{"pixel_values", "labels"}` dicts (or `None` for a rank whose shard of a batch is empty);
    `all_reduce` sums a tensor over processes (omit it in a single process). Data-free methods ignore `batches`.
    A method that prescribes its aggregation (`tgp_fisher` sums) overrides `aggregation`. `teacher_memo` reuses the
    teacher's logits of an earlier pass with the same memo over the same images (`TeacherLogitMemo`); a teacher
    sharded by FSDP2 always runs (its forward is collective, and whether a rank's images repeat is its own), and so
    does one that shares weights with the student.
    """
    spec = get_scoring_method(method)
    options = options or ScoringOptions()
    aggregation = spec.aggregation or aggregation
    if aggregation not in ("ema", "sum"):
        raise ValueError(f"score_aggregation must be 'ema' or 'sum', got {aggregation!r}")
    if params is None:
        params = prunable_parameters(model)
    names, sharded_weights = list(params), list(params.values())
    mesh = fsdp_mesh(sharded_weights)  # None unless FSDP2 shards the weights: then every score is a local shard
    weights = [local(w) for w in sharded_weights]
    generator = torch.Generator().manual_seed(seed)
    if spec.data_free:
        return {
            name: like(spec.saliency(w, None, generator), s) for name, w, s in zip(names, weights, sharded_weights)
        }
    if spec.needs_teacher and teacher is None and options.alpha != 0:
        raise ValueError(f"pruning_method={method!r} needs a teacher model; pass `teacher`.")
    check_same_num_labels(model, teacher)
    if batches is None:
        raise ValueError(f"pruning_method={method!r} needs calibration batches.")

    device = weights[0].device
    scores = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in zip(names, weights)}
    student = unwrap_model(model)
    if teacher is not None:
        teacher.eval()
    if teacher_memo is not None and teacher is not None:
        student_parameters = {id(p) for p in student.parameters()}
        if any(is_sharded(p) or id(p) in student_parameters for p in teacher.parameters()):
            teacher_memo = None  # a sharded teacher runs collectively; one sharing the student's weights is pruned
    # train-mode BatchNorm over several processes: normalise with each global batch's statistics, as one process would
    synchronized = bn_mode == "train" and (mesh is not None or (all_reduce is not None and _several_processes()))
    group = mesh.get_group() if mesh is not None else None
    steps = 0
    with scoring_mode(student, bn_mode) as train_mode_layers, reusing_teacher_logits(teacher_memo):
        with global_batch_statistics(student, group) if synchronized else nullcontext():
            for batch in tqdm(batches, total=total, desc="Scoring weights", disable=not progress):
                if mesh is not None:  # FSDP2 has already summed the gradients into this rank's shards
                    grads, count = _sharded_gradients(student, teacher, batch, spec, options, sharded_weights, mesh)
                    count = sum_over_mesh(count.reshape(1), mesh)[0]
                else:
                    grads, count = _shard_gradients(
                        student, teacher, batch, spec, options, weights, device, synchronized, train_mode_layers
                    )
                if mesh is None and all_reduce is not None:
                    flat = all_reduce(torch.cat([g.reshape(-1) for g in grads] + [count.reshape(1)]))
                    count = flat[-1]
                    grads = list(torch.split(flat[:-1], [w.numel() for w in weights]))
                if count.item() == 0:
                    raise ValueError("A calibration batch holds no samples; check the calibration dataset.")
                steps += 1
                grads = [g.view(w.shape) for g, w in zip(grads, weights)]
                torch._foreach_div_(grads, count.item())  # gradient of the mean loss over the global batch
                extra = {"batch_size": int(count.item())} if spec.uses_batch_size else {}
                batch_scores = [spec.saliency(w, g, generator, **extra) for w, g in zip(weights, grads)]
                if aggregation == "ema":  # ema <- m·ema + (1-m)·s, one fused pass per layer
                    torch._foreach_lerp_(list(scores.values()), batch_scores, 1.0 - ema_momentum)
                else:
                    torch._foreach_add_(list(scores.values()), batch_scores)
    if steps == 0:
        raise ValueError("The calibration set is empty: no batch was scored.")
    if aggregation == "ema":
        for score in scores.values():
            score.div_(1.0 - ema_momentum**steps)
    return {name: like(score, s) for (name, score), s in zip(scores.items(), sharded_weights)}


def _several_processes() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _shard_gradients(student, teacher, batch, spec, options, weights, device, synchronized=False, train_mode=()):
    """Gradients of the summed per-sample loss of this rank's shard, and the shard's sample count. `synchronized`:
    BatchNorm takes global-batch statistics, so every rank runs every batch (zero-length for an empty shard).
    `train_mode`: the BatchNorm layers in train mode."""
    if batch is None and synchronized:
        raise ValueError(
            "With scoring_bn_mode='train' over several processes every process must run every calibration batch; "
            "pass zero-length batches for empty shards (hf_tgprune.Pruner does)."
        )
    if batch is None:
        return [torch.zeros(w.shape, dtype=torch.float32, device=device) for w in weights], torch.zeros(
            (), device=device
        )
    batch = _to_device(batch, device)
    if "labels" not in batch:
        raise ValueError("Calibration batches need `labels`; add a labels column to the calibration dataset.")
    # (synchronized, the global batch decides: BatchNorm normalises with running statistics when it has one image)
    single = bool(train_mode) and not synchronized and batch["pixel_values"].shape[0] == 1
    for layer in train_mode if single else ():  # BatchNorm cannot normalise one image: use the running statistics
        layer.training = False
    try:
        losses = spec.batch_loss(student, teacher, batch, options)
    finally:
        for layer in train_mode if single else ():
            layer.training = True
    grads = torch.autograd.grad(losses.sum(), weights, allow_unused=True)
    grads = [torch.zeros_like(w, dtype=torch.float32) if g is None else g.float() for w, g in zip(weights, grads)]
    return grads, torch.tensor(float(losses.numel()), device=device)


def _sharded_gradients(student, teacher, batch, spec, options, weights, mesh):
    """Under FSDP2: this rank's shard of the gradient of the per-sample loss summed over the *global* batch, and the
    number of samples of this rank's part of it.

    FSDP2 computes gradients only through `backward` (its all-gathered weights are not the parameters autograd sees),
    and reduce-scatters them averaged over the processes: the sum is the average times the number of processes. Every
    rank runs the forward and backward (the collectives need all of them), with a zero-length batch when its part of
    the global batch is empty. `.grad` is cleared afterwards.
    """
    if batch is None:
        raise ValueError(
            "Under FSDP2 every process must run every calibration batch; pass zero-length batches for empty shards "
            "(hf_tgprune.Pruner does)."
        )
    batch = _to_device(batch, local(weights[0]).device)
    if "labels" not in batch:
        raise ValueError("Calibration batches need `labels`; add a labels column to the calibration dataset.")
    losses = spec.batch_loss(student, teacher, batch, options)
    student.zero_grad(set_to_none=True)
    losses.sum().backward()
    grads = [
        torch.zeros_like(local(w), dtype=torch.float32)
        if w.grad is None
        else local(w.grad).float().mul_(mesh.size() if is_sharded(w) else 1)
        for w in weights
    ]
    student.zero_grad(set_to_none=True)
    replicated = [g for g, w in zip(grads, weights) if not is_sharded(w)]  # outside FSDP: this rank's part only
    if replicated:
        flat = sum_over_mesh(torch.cat([g.reshape(-1) for g in replicated]), mesh)
        for g, part in zip(replicated, torch.split(flat, [g.numel() for g in replicated])):
            g.copy_(part.view_as(g))
    return grads, torch.tensor(float(losses.numel()), device=grads[0].device)
