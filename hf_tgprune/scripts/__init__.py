"""What the example scripts (`recipes/`) are made of, reusable in your own: argument dataclasses and a parser that
reads YAML/JSON config files, the checks that run before any training, and the resumable stages of the recipe."""

from .arguments import (
    RECIPE_DEFAULTS,
    DataArguments,
    ModelArguments,
    RecipeArguments,
    parse_arguments,
    validate_arguments,
)
from .speed import measure_inference_speed
from .stages import (
    RecipeData,
    RecipeRun,
    dense_student_stage,
    load_data_and_models,
    make_trainer,
    report_stage,
    sparsity_sweep,
    teacher_stage,
)
from .utils import PruningParser, RecipeError, result_arguments, resume_requested

__all__ = [
    "RECIPE_DEFAULTS",
    "DataArguments",
    "ModelArguments",
    "PruningParser",
    "RecipeArguments",
    "RecipeData",
    "RecipeError",
    "RecipeRun",
    "dense_student_stage",
    "load_data_and_models",
    "make_trainer",
    "measure_inference_speed",
    "parse_arguments",
    "report_stage",
    "result_arguments",
    "resume_requested",
    "sparsity_sweep",
    "teacher_stage",
    "validate_arguments",
]
