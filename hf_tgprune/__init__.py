"""hf_tgprune: teacher-guided unstructured pruning of vision models, during a short KD retraining or one-shot before it.

The names below are what a user needs; everything else stays importable from its module (`hf_tgprune.data`,
`hf_tgprune.core.adapters`, `hf_tgprune.io.serialization`, ...).
"""

from importlib.metadata import PackageNotFoundError, version

from .core.adapters import ModelAdapter, register_adapter
from .core.callbacks import GlobalMaskCallback
from .core.losses import cakld, teacher_guided_loss
from .core.masking import (
    apply_masks,
    global_masks,
    load_masks,
    mask_hash,
    prunable_parameters,
    save_masks,
    select_masks,
    sparsity_report,
)
from .core.nm import nm_masks
from .core.recalibration import recalibrate_batchnorm
from .core.scoring import ScoringMethod, ScoringOptions, compute_importance_scores, register_scoring_method
from .io.export import export_semi_structured, export_sparse_inference, to_dense
from .io.hub import HubPushError, push_sparse_folder
from .io.models import load_image_classifier
from .io.serialization import SparseFormatError, load_sparse, load_sparse_masks, save_sparse_model
from .methods import MethodConfig, PruningMethod, get_method, register_method
from .pruning.config import PruningArguments, TeacherGuidedPruningConfig
from .pruning.pruner import Pruner
from .training.checkpointing import SparseModelInfo
from .training.trainer import TeacherGuidedPruningTrainer

try:
    __version__ = version("hf_tgprune")
except PackageNotFoundError:  # a source checkout that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    # training
    "TeacherGuidedPruningConfig",
    "TeacherGuidedPruningTrainer",
    "GlobalMaskCallback",
    # pruning without a Trainer
    "Pruner",
    "PruningArguments",
    # the functional core
    "compute_importance_scores",
    "ScoringOptions",
    "global_masks",
    "select_masks",
    "nm_masks",
    "apply_masks",
    "recalibrate_batchnorm",
    "prunable_parameters",
    "sparsity_report",
    "mask_hash",
    "save_masks",
    "load_masks",
    "cakld",
    "teacher_guided_loss",
    # extending: methods, criteria, model families
    "PruningMethod",
    "MethodConfig",
    "register_method",
    "get_method",
    "ScoringMethod",
    "register_scoring_method",
    "ModelAdapter",
    "register_adapter",
    # models, saving, sharing, inference
    "load_image_classifier",
    "SparseModelInfo",
    "save_sparse_model",
    "load_sparse",
    "load_sparse_masks",
    "SparseFormatError",
    "push_sparse_folder",
    "HubPushError",
    "export_sparse_inference",
    "export_semi_structured",
    "to_dense",
]
