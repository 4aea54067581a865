"""`TeacherGuidedPruningConfig`: the training arguments of `TeacherGuidedPruningTrainer` (TRL style)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import ClassVar

import torch
from transformers import TrainingArguments

logger = logging.getLogger(__name__)


def _launched_without_accelerator() -> bool:
    """True under a multi-process launcher (WORLD_SIZE > 1) on a machine with no CUDA/XPU device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return not torch.cuda.is_available() and not has_xpu


def parse_nm_pattern(pattern: str) -> tuple[int, int]:
    """`"2:4"` -> `(2, 4)`; a clear error for anything else."""
    n, sep, m = str(pattern).partition(":")
    if not sep or not n.strip().isdigit() or not m.strip().isdigit() or not 0 < int(n) < int(m):
        raise ValueError(
            f"sparsity_pattern must be 'unstructured' or 'N:M' with integers 0 < N < M (e.g. '2:4'), got {pattern!r}"
        )
    return int(n), int(m)


@dataclass
class PruningArguments:
    r"""
    Settings of one pruning run, without any training settings: what `hf_tgprune.Pruner` needs (a plain PyTorch
    loop or the functional core), and the pruning half of [`TeacherGuidedPruningConfig`]. The loss follows the
    authors (alpha 0.7, beta 0.5, T 3). Left unset, `pruning_method` is the one-shot teacher-guided Fisher criterion
    `"tgp_fisher"` in 5 rounds here (`alpha=0`: the Fisher of the cross-entropy alone, without a teacher): a
    `Pruner` alone prunes before training, without the Trainer's steps that a schedule needs.
    [`TeacherGuidedPruningConfig`] defaults to `"gradual"` instead.
    """

    # `pruning_method` when left unset (None) with unstructured sparsity; an N:M pattern takes "tgp_fisher"
    default_pruning_method: ClassVar[str] = "tgp_fisher"

    sparsity: float = field(
        default=0.9,
        metadata={
            "help": "Fraction of the prunable weights to zero, in [0, 1). Exactly round(sparsity * N) are pruned."
        },
    )
    pruning_method: str | None = field(
        default=None,
        metadata={
            "help": "Pruning method (hf_tgprune.methods). None (default): 'gradual' under TeacherGuidedPruningConfig "
            "(the trainer), 'tgp_fisher' under PruningArguments (a Pruner alone) and for an N:M sparsity_pattern. "
            "'gradual': pruning in steps during retraining, by the Fisher of the training loss (the teacher-guided KD "
            "loss); one-shot 'tgp_fisher' (teacher-guided Fisher / OBD θ²·Σ_b g_b², in 5 rounds; with alpha=0 the "
            "Fisher of the cross-entropy, no teacher), 'magnitude' (global |θ|), 'tgp' (the paper's teacher-guided "
            "|θ·∂L/∂θ|), 'tgp_taylor' (teacher-guided signed second-order change of the loss −θ·ḡ + ½·F·θ²), "
            "'movement' (−Σ_t θ·g accumulated over fine-tuning, hf_tgprune.methods.movement.MovementScores), 'snip' "
            "(|θ·∂CE/∂θ|), 'grad' (|∂L/∂θ|), 'random'; the seed baselines 'epsd', 'dg2pf', 'imp'; or 'dense' to "
            "train without pruning."
        },
    )
    pruning_method_args: dict | str | None = field(
        default=None,
        metadata={
            "help": "Settings of the chosen pruning_method, as a dict, a JSON object or 'key=value,key=value': "
            "epsd: warmup_steps (100), self_distillation_weight (1.0), temperature (4.0); dg2pf: "
            "gradual_pruning_epochs (5), self_kd_alpha (0.75), self_kd_temperature (4.0); imp: rounds (None), "
            "prune_fraction (0.15), epochs_per_round (1); gradual: criterion ('fisher'), pruning_steps (10), "
            "end_fraction (0.3)."
        },
    )
    alpha: float = field(
        default=0.7, metadata={"help": "Weight of the distillation term: alpha·T²·CAKLD + (1-alpha)·CE, in [0, 1]."}
    )
    beta: float = field(
        default=0.5, metadata={"help": "CAKLD mix: beta·KL(p_s‖p_t) + (1-beta)·KL(p_t‖p_s), in [0, 1]."}
    )
    temperature: float = field(default=3.0, metadata={"help": "Softmax temperature T of the distillation term (> 0)."})
    normalize_logits: bool = field(
        default=False,
        metadata={"help": "Z-normalise each logit vector before dividing by T (the paper's option; off by default)."},
    )
    score_aggregation: str = field(
        default="ema",
        metadata={"help": "How per-batch scores are combined: 'ema' (bias-corrected, as the authors) or 'sum'."},
    )
    ema_momentum: float = field(default=0.9, metadata={"help": "Momentum of the EMA score aggregation, in [0, 1)."})
    num_calibration_samples: int = field(
        default=1024,
        metadata={
            "help": "Calibration images: a deterministic sample (seeded by `seed`) of the training set when no "
            "calibration dataset is given, or at most this many of the given calibration dataset."
        },
    )
    calibration_batch_size: int = field(
        default=64,
        metadata={
            "help": "Global batch size of the scoring pass, split across processes, so the mask does not "
            "depend on the number of processes."
        },
    )
    scoring_bn_mode: str = field(
        default="train",
        metadata={
            "help": "BatchNorm mode while scoring: 'train' (the statistics of each calibration batch, as in the "
            "authors' code; over several processes, of each global batch, so the masks do not depend on the process "
            "count) or 'eval' (running statistics). Dropout and drop-path are off and the running statistics are "
            "left as they were in both modes."
        },
    )
    scoring_epochs: int = field(
        default=0,
        metadata={
            "help": "0: score on `num_calibration_samples` un-augmented images. > 0: the authors' regime, score over "
            "this many whole epochs of `train_dataset` (with its transforms, reshuffled each epoch by `seed`); "
            "with calibration_batch_size=128 (and the default scoring_bn_mode='train') it matches their code."
        },
    )
    pruning_rounds: int | None = field(
        default=None,
        metadata={
            "help": "Iterative one-shot: k rounds of score -> prune to 1-(1-sparsity)^(r/k) -> rescore, on the same "
            "calibration data and without weight updates; costs k passes of the student (forward and backward) and "
            "one of the teacher (its logits are reused: the images and the teacher do not change), and a BatchNorm "
            "recalibration between rounds when the scoring reads the running statistics (scoring_bn_mode='eval', or "
            "a calibration batch of one image). The final count is exact. 1 = one-shot. None (default): the method's "
            "own `default_rounds` (5 for 'tgp_fisher', 1 for every other method and for an N:M sparsity_pattern)."
        },
    )
    layer_allocation: str | None = field(
        default=None,
        metadata={
            "help": "How layers share the pruning: 'global' (one ranking of the criterion's scores), 'lamp' (one "
            "ranking of their LAMP normalisation s²/Σ_{larger in layer} s²), 'magnitude' or 'lamp_magnitude' (each "
            "layer's kept count from the global ranking of |θ| or of its LAMP normalisation, the weights kept "
            "inside the layer chosen by the criterion). None (default): the method's own `default_allocation` "
            "('magnitude' for the signed criteria 'tgp_taylor' and 'movement', 'global' for every other method and "
            "for an N:M sparsity_pattern)."
        },
    )
    sparsity_pattern: str = field(
        default="unstructured",
        metadata={
            "help": "'unstructured' (any weight, exactly round(sparsity·N) pruned) or 'N:M' semi-structured, e.g. "
            "'2:4': in every prunable layer keep the N highest-scoring of every M consecutive input weights (exactly "
            "N/M per layer, the layout NVIDIA sparse tensor cores run, see hf_tgprune.io.export.export_semi_structured). "
            "With N:M, `sparsity` becomes 1 - N/M and layers whose input size is not a multiple of M stay dense."
        },
    )
    recalibrate_bn: bool = field(
        default=True,
        metadata={
            "help": "After masking, reset and re-estimate BatchNorm running statistics with forward passes over "
            "`recalibration_samples` calibration images (no gradients, no weight change), before evaluation and "
            "retraining. No effect on models without BatchNorm."
        },
    )
    recalibration_samples: int = field(
        default=512,
        metadata={
            "help": "Images for BatchNorm recalibration, drawn un-augmented with the seed of the scoring images (a "
            "subset of them when `num_calibration_samples` is at least as large). The final recalibration serves a "
            "pruned network evaluated or used before retraining; retraining does not read its statistics (train-mode "
            "BatchNorm normalises each batch with its own) and overwrites them as it trains, so they do not change the "
            "retrained weights. Rounds that recalibrate between them (`scoring_bn_mode='eval'`) use this count too, "
            "and there it changes the masks."
        },
    )
    prune_include: list[str] | None = field(
        default=None,
        metadata={
            "help": "Regular expressions (re.search) selecting the weights to prune among all weight tensors of "
            "dimension >= 2. Default: conv and linear weights, nn.MultiheadAttention input projections and LSTM/GRU/RNN "
            "weight matrices, except the classifier head."
        },
    )
    prune_exclude: list[str] | None = field(
        default=None, metadata={"help": "Regular expressions (re.search) of weights never to prune."}
    )
    mask_standardized_kernels: bool = field(
        default=False,
        metadata={
            "help": "Weight-standardised convolutions (timm StdConv2d / ScaledStdConv2d, transformers BiT) compute "
            "with (w - mean) / std, which is dense even where w is pruned. True multiplies that kernel by the mask "
            "(sparse in compute, and exportable as a sparse convolution); it changes the function, so the saved "
            "folder must be loaded with hf_tgprune (load_image_classifier / load_sparse re-attach the masks). "
            "False (default): these layers are stored sparse but computed dense, and plain timm / transformers "
            "loading reproduces the model."
        },
    )
    kernel_mask_statistics: str = field(
        default="kept",
        metadata={
            "help": "With mask_standardized_kernels: 'kept' standardises each output channel over its surviving "
            "weights (then masks, at the layer's own scale); 'all' keeps the layer's statistics over the whole stored "
            "weight, pruned zeros included, and masks the result."
        },
    )
    min_layer_density: float = field(
        default=0.0,
        metadata={"help": "Layer-collapse guard: every pruned layer keeps at least this fraction of its weights."},
    )
    layer_density_floor: float = field(
        default=0.0,
        metadata={
            "help": "Layer-collapse guard relative to the target: every pruned layer keeps at least "
            "layer_density_floor·(1 - sparsity) of its weights (combined with min_layer_density by max), in [0, 1); "
            "0 (default) disables it: the plain global threshold of the paper. 0.5 keeps at least 0.01 of every layer "
            "at sparsity 0.98."
        },
    )
    retrain_with_kd: bool = field(
        default=True,
        metadata={"help": "Retrain with alpha·T²·CAKLD + (1-alpha)·CE against the frozen teacher; CE only if False."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of the calibration sample, the scoring pass and training."})

    @property
    def effective_min_layer_density(self) -> float:
        """Per-layer minimum density at `sparsity`: max(min_layer_density, layer_density_floor·(1 - sparsity))."""
        from ..core.masking import min_layer_density_for

        return min_layer_density_for(self.sparsity, self.min_layer_density, self.layer_density_floor)

    def __post_init__(self):
        self.validate_pruning_arguments()

    def validate_pruning_arguments(self) -> None:
        """Check every pruning setting (a clear error naming the argument) and resolve `pruning_rounds`."""
        from ..methods import build_method, get_method

        for name in ("sparsity", "alpha", "beta", "temperature", "min_layer_density", "layer_density_floor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}); e.g. {name}=0.9.")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(
                f"sparsity must be in [0, 1) (0 keeps every weight), got {self.sparsity}. "
                "Pass e.g. --sparsity 0.95 for 95% sparsity."
            )
        defaulted = self.pruning_method is None
        if defaulted:  # gradual has no N:M schedule: a pattern takes the one-shot default
            self.pruning_method = (
                self.default_pruning_method if self.sparsity_pattern == "unstructured" else "tgp_fisher"
            )
        build_method(self.pruning_method, self.pruning_method_args)  # unknown method or settings: a clear error
        method = get_method(self.pruning_method)
        if self.pruning_method == "dense":
            self.sparsity = 0.0
        for name in ("alpha", "beta"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.score_aggregation not in ("ema", "sum"):
            raise ValueError(f"score_aggregation must be 'ema' or 'sum', got {self.score_aggregation!r}")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1), got {self.ema_momentum}")
        if self.scoring_bn_mode not in ("eval", "train"):
            raise ValueError(f"scoring_bn_mode must be 'eval' or 'train', got {self.scoring_bn_mode!r}")
        if self.scoring_epochs < 0:
            raise ValueError(
                f"scoring_epochs must be >= 0 (0 scores on num_calibration_samples), got {self.scoring_epochs}"
            )
        if self.kernel_mask_statistics not in ("kept", "all"):
            raise ValueError(f"kernel_mask_statistics must be 'kept' or 'all', got {self.kernel_mask_statistics!r}")
        if self.mask_standardized_kernels and method.regrows:
            raise ValueError(
                f"mask_standardized_kernels=True masks the kernel that weight-standardised convolutions compute with, "
                f"which cuts the gradient that pruning_method={self.pruning_method!r} gives pruned weights to regrow. "
                "Set mask_standardized_kernels=False, or use another method."
            )
        if self.pruning_rounds is None:
            self.pruning_rounds = method.default_rounds if self.sparsity_pattern == "unstructured" else 1
        if self.pruning_rounds < 1:
            raise ValueError(f"pruning_rounds must be >= 1 (1 = one-shot), got {self.pruning_rounds}")
        if self.pruning_rounds > 1 and not method.one_shot:
            raise ValueError(
                f"pruning_rounds={self.pruning_rounds} applies to one-shot methods; pruning_method="
                f"{self.pruning_method!r}{' (the default, left unset)' if defaulted else ''} prunes during training "
                "on a schedule of its own. Set pruning_rounds=1, or pruning_method='tgp_fisher' for one-shot scoring "
                "rounds."
            )
        from ..core.masking import LAYER_ALLOCATIONS
        from ..core.scoring import get_scoring_method

        if self.layer_allocation is None:
            self.layer_allocation = method.default_allocation if self.sparsity_pattern == "unstructured" else "global"
        if self.layer_allocation not in LAYER_ALLOCATIONS:
            raise ValueError(f"layer_allocation must be one of {LAYER_ALLOCATIONS}, got {self.layer_allocation!r}")
        if self.layer_allocation == "lamp" and method.criterion and get_scoring_method(method.criterion).signed:
            raise ValueError(
                f"layer_allocation='lamp' normalises non-negative scores, but pruning_method={self.pruning_method!r} "
                "gives signed ones (a change of the loss). Use layer_allocation='magnitude' or 'lamp_magnitude'."
            )
        if self.sparsity_pattern != "unstructured":
            n, m = parse_nm_pattern(self.sparsity_pattern)
            if self.pruning_rounds > 1 or self.layer_allocation != "global" or not method.one_shot:
                raise ValueError(
                    f"sparsity_pattern={self.sparsity_pattern!r} fixes the density of every layer: use it with a "
                    "one-shot pruning_method, pruning_rounds=1 and layer_allocation='global'."
                )
            if abs(self.sparsity - (1 - n / m)) > 1e-12:
                logger.warning(
                    "sparsity_pattern=%r prunes exactly %s of every group of %d: sparsity=%s is replaced by %s.",
                    self.sparsity_pattern, m - n, m, self.sparsity, 1 - n / m,
                )  # fmt: skip
                self.sparsity = 1 - n / m
        if self.recalibration_samples < 1:
            raise ValueError(f"recalibration_samples must be >= 1, got {self.recalibration_samples}")
        if self.num_calibration_samples < 1:
            raise ValueError(f"num_calibration_samples must be >= 1, got {self.num_calibration_samples}")
        if self.calibration_batch_size < 1:
            raise ValueError(f"calibration_batch_size must be >= 1, got {self.calibration_batch_size}")
        if not 0.0 <= self.min_layer_density <= 1.0:
            raise ValueError(f"min_layer_density must be in [0, 1], got {self.min_layer_density}")
        if not 0.0 <= self.layer_density_floor < 1.0:
            raise ValueError(f"layer_density_floor must be in [0, 1), got {self.layer_density_floor}")
        if self.sparsity > 1.0 - self.min_layer_density + 1e-12:
            raise ValueError(
                f"sparsity={self.sparsity} cannot be reached with min_layer_density={self.min_layer_density}: every "
                f"layer keeps at least {self.min_layer_density} of its weights, so at most "
                f"{1.0 - self.min_layer_density:.6g} can be pruned. Lower min_layer_density or sparsity."
            )


@dataclass
class TeacherGuidedPruningConfig(TrainingArguments, PruningArguments):
    r"""
    Configuration for [`TeacherGuidedPruningTrainer`]: everything of [`~transformers.TrainingArguments`] plus the
    pruning settings of [`PruningArguments`] and how outputs are saved.

    Left unset, `pruning_method` is `"gradual"`: the sparsity rises in 10 steps over the first 30% of the retraining,
    each update keeping the weights of highest θ²·Σ_t g_t², the squared gradients of the training loss (the
    teacher-guided KD loss, or the cross-entropy with `alpha=0`) summed since the previous update. It needs at least
    32 optimizer steps with its default settings (`pruning_method_args`); an N:M `sparsity_pattern` takes the
    one-shot `"tgp_fisher"`. Any one-shot method (`"tgp_fisher"`, `"magnitude"`, ...) prunes before training instead.
    """

    default_pruning_method: ClassVar[str] = "gradual"

    save_format: str = field(
        default="dense",
        metadata={
            "help": "Format of `save_model()` / `push_to_hub()` outputs: 'dense' (config.json + model.safetensors that "
            "plain timm and transformers load) or 'bitmask' (compact model.bitmask.safetensors, about 0.13x the dense "
            "size at sparsity 0.9, read with hf_tgprune.load_sparse). Trainer checkpoints are always dense."
        },
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Kept False: vision batches are built by the collator, not by the model's signature."},
    )
    max_grad_norm: float = field(
        default=0.0,
        metadata={
            "help": "Gradient clipping; 0 (default): none, as the authors. TrainingArguments' own default, 1.0, "
            "shrinks nearly every step of the KD loss (T² scales its gradients) and of SGD fine-tuning of a pretrained "
            "model, which costs accuracy (measured in benchmarks/RESULTS.md §5)."
        },
    )

    @cached_property
    def _setup_devices(self) -> torch.device:
        """TrainingArguments' device setup, with `ddp_timeout` honoured on CPU (gloo) too.

        transformers passes `ddp_timeout` to the process group only for accelerator backends; on CPU the group kept
        its 30-minute default, so a frozen rank blocked the others that long. Initialising accelerate's shared state
        first with the timeout makes every collective (the scoring all-reduce, DDP) fail within `ddp_timeout`.
        """
        from accelerate import PartialState

        use_cpu = self.use_cpu or os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
        if use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and PartialState._shared_state == {}:
            PartialState(cpu=True, backend=self.ddp_backend, timeout=timedelta(seconds=self.ddp_timeout))
        return TrainingArguments._setup_devices.func(self)

    def __post_init__(self):
        self.validate_pruning_arguments()
        if self.save_format not in ("dense", "bitmask"):
            raise ValueError(f"save_format must be 'dense' or 'bitmask', got {self.save_format!r}")
        if self.label_names is None:
            self.label_names = ["labels"]
        if not self.use_cpu and _launched_without_accelerator():
            # `accelerate launch --multi_gpu` / torchrun on a machine without GPUs: run the processes on CPU (gloo)
            self.use_cpu = True
        TrainingArguments.__post_init__(self)
