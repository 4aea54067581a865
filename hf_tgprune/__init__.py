"""hf_tgprune: teacher-guided one-shot unstructured pruning of vision models."""

from .adapters import ModelAdapter, forward_logits, get_adapter, register_adapter
from .callbacks import GlobalMaskCallback
from .checkpointing import SparseCheckpointMixin
from .config import TeacherGuidedPruningConfig
from .data import build_transforms, collate_fn, load_image_dataset, resolve_data_config, set_transforms
from .evaluation import load_metric, make_compute_metrics
from .hub import HubPushError, push_sparse_folder
from .losses import cakld, teacher_guided_loss
from .masking import (
    apply_masks,
    global_masks,
    load_masks,
    mask_hash,
    min_layer_density_for,
    prunable_parameters,
    save_masks,
    sparsity_report,
)
from .methods import MethodConfig, PruningMethod, get_method, register_method
from .modelcard import create_model_card
from .models import load_image_classifier
from .scoring import (
    SCORING_METHODS,
    ScoringMethod,
    ScoringOptions,
    compute_importance_scores,
    register_scoring_method,
)
from .serialization import SparseFormatError, load_sparse, load_sparse_masks, save_sparse_model
from .trainer import TeacherGuidedPruningTrainer

__version__ = "0.1.0"

__all__ = [
    "MethodConfig",
    "PruningMethod",
    "get_method",
    "min_layer_density_for",
    "register_method",
    "build_transforms",
    "collate_fn",
    "load_image_classifier",
    "load_image_dataset",
    "load_metric",
    "make_compute_metrics",
    "resolve_data_config",
    "set_transforms",
    "HubPushError",
    "SparseCheckpointMixin",
    "SparseFormatError",
    "create_model_card",
    "load_sparse",
    "load_sparse_masks",
    "push_sparse_folder",
    "save_sparse_model",
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
