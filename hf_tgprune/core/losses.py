"""Distillation losses: context-aware KL (CAKLD), the teacher-guided loss of Alim et al. (2025), and EPSD's
self-distillation loss (Chen et al., 2024). DG2PF's self-KD is the teacher-guided loss with beta = 0.

    L = alpha * T^2 * CAKLD(z_s / T, z_t / T) + (1 - alpha) * CE(z_s, y)
    CAKLD(p_s, p_t) = beta * KL(p_s || p_t) + (1 - beta) * KL(p_t || p_s)

All functions return per-sample losses when `reduction="none"`, so callers can sum them over a shard and
normalise by a global sample count (this is how the distributed scoring pass stays exact).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def normalize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-normalise each logit vector: `(z - mean(z)) / (std(z) + eps)` (the paper's logit normalisation)."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)


def softened_log_probs(logits: torch.Tensor, temperature: float, normalize: bool = False) -> torch.Tensor:
    """`log_softmax(z / T)`, with optional z-normalisation applied **before** dividing by T."""
    logits = logits.float()
    if normalize:
        logits = normalize_logits(logits)
    return F.log_softmax(logits / temperature, dim=-1)


def cakld(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 3.0,
    normalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Context-aware KL: `beta * KL(p_s || p_t) + (1 - beta) * KL(p_t || p_s)` on softened logits."""
    log_ps = softened_log_probs(student_logits, temperature, normalize)
    log_pt = softened_log_probs(teacher_logits, temperature, normalize)
    reverse_kl = (log_ps.exp() * (log_ps - log_pt)).sum(dim=-1)  # KL(p_s || p_t)
    forward_kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)  # KL(p_t || p_s)
    return _reduce(beta * reverse_kl + (1.0 - beta) * forward_kl, reduction)


def teacher_guided_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    alpha: float = 0.7,
    beta: float = 0.5,
    temperature: float = 3.0,
    normalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """`alpha * T^2 * CAKLD + (1 - alpha) * CE`; `alpha = 0` is plain cross-entropy and needs no teacher."""
    ce = F.cross_entropy(student_logits.float(), labels, reduction="none")
    if alpha == 0:
        return _reduce(ce, reduction)
    if teacher_logits is None:
        raise ValueError("teacher_guided_loss with alpha > 0 needs teacher_logits")
    kd = cakld(
        student_logits, teacher_logits, beta=beta, temperature=temperature, normalize=normalize, reduction="none"
    )
    return _reduce(alpha * temperature**2 * kd + (1.0 - alpha) * ce, reduction)


def self_distillation_loss(
    logits: torch.Tensor,
    target_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    weight: float = 1.0,
    temperature: float = 4.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """EPSD's `CE(z, y) + λ·T²·KL(softmax(z'/T) ‖ softmax(z/T))`, `z'` the (detached) logits of a second view."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    kd = cakld(logits, target_logits.detach(), beta=0.0, temperature=temperature, reduction="none")
    return _reduce(ce + weight * temperature**2 * kd, reduction)


class NonFiniteLogitsError(ValueError):
    """A model produced NaN or infinite logits; the message names the parameters that hold non-finite values."""


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers of `model` that hold a NaN or an infinity (in `state_dict` order)."""
    return [
        name
        for name, tensor in model.state_dict(keep_vars=True).items()
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def check_finite_logits(logits: torch.Tensor, who: str = "teacher", model: torch.nn.Module | None = None) -> None:
    """Stop with a clear message when `logits` hold a NaN or an infinity (no-op otherwise).

    Args:
        logits: the model's output on a batch.
        who: the model's role in the message (``"teacher"``, ``"student"``).
        model: the model itself: its parameters and buffers holding non-finite values are named.

    Raises:
        NonFiniteLogitsError: naming the non-finite parameters (the usual cause: a corrupted checkpoint or a model
            whose training diverged) or, when every parameter is finite, the inputs.
    """
    if bool(torch.isfinite(logits).all()):
        return
    if model is not None:
        from .adapters import unwrap_model

        model = unwrap_model(model)
    bad = non_finite_parameters(model) if model is not None else []
    if bad:
        cause = (
            f"its parameters {bad[:5]}{' and more' if len(bad) > 5 else ''} hold NaN or inf: the {who} checkpoint is "
            f"corrupted or its training diverged. Load a good {who} (folders saved by hf_tgprune are verified "
            "against their sparsity.json by load_image_classifier)"
        )
    elif model is not None:
        cause = (
            "its parameters are finite, so the inputs or an overflow are: check the batch for NaN/inf pixels, and "
            "mixed precision (fp16 overflows; try bf16 or fp32)"
        )
    else:
        cause = f"check the {who}'s weights (a corrupted checkpoint or a diverged training) and the inputs"
    raise NonFiniteLogitsError(f"The {who} produced logits that are not finite (NaN or inf) on this batch; {cause}.")
