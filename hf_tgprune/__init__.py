"""hf_tgprune: teacher-guided one-shot unstructured pruning of vision models."""

from .adapters import ModelAdapter, forward_logits, get_adapter, register_adapter
from .callbacks import GlobalMaskCallback
from .config import TeacherGuidedPruningConfig
from .losses import cakld, teacher_guided_loss
from .masking import (
    apply_masks,
    global_masks,
    load_masks,
    mask_hash,
    prunable_parameters,
    save_masks,
    sparsity_report,
)
from .scoring import (
    SCORING_METHODS,
    ScoringMethod,
    ScoringOptions,
    compute_importance_scores,
    register_scoring_method,
)
from .trainer import TeacherGuidedPruningTrainer

__version__ = "0.1.0"

__all__ = [
    "GlobalMaskCallback",
    "ModelAdapter",
    "SCORING_METHODS",
    "ScoringMethod",
    "ScoringOptions",
    "TeacherGuidedPruningConfig",
    "TeacherGuidedPruningTrainer",
    "apply_masks",
    "cakld",
    "compute_importance_scores",
    "forward_logits",
    "get_adapter",
    "global_masks",
    "load_masks",
    "mask_hash",
    "prunable_parameters",
    "register_adapter",
    "register_scoring_method",
    "save_masks",
    "sparsity_report",
    "teacher_guided_loss",
]
