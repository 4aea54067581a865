"""The recipe's arguments (model, data, run) beside `TeacherGuidedPruningConfig`, their parser and the cross-argument
checks that run before any training."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..data import available_augmentations
from ..io.models import has_trained_weights
from ..methods import build_method
from ..pruning.config import TeacherGuidedPruningConfig
from .utils import PruningParser, RecipeError, check_sparsities, expand_config_args


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="resnet18",
        metadata={
            "help": "Student: a timm name (resnet18, hf-hub:timm/...), a transformers model id, or a saved folder."
        },
    )
    teacher_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A TRAINED teacher (saved folder, e.g. <output_dir>/teacher of an earlier run, or a Hub "
            "checkpoint); it must predict the dataset's classes. Without it the recipe trains a teacher."
        },
    )
    teacher_architecture: str | None = field(
        default=None,
        metadata={"help": "Architecture of the teacher to train when there is none (default: the student's)."},
    )
    pretrained: bool = field(
        default=False,
        metadata={"help": "Start the student (and a trained-from-scratch teacher) from pretrained weights."},
    )
    teacher_epochs: float = field(
        default=3.0, metadata={"help": "Epochs to train the teacher when no --teacher_name_or_path is given."}
    )
    teacher_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of teacher training (default: --learning_rate)."}
    )
    student_warmup_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Epochs of KD training of the dense student before scoring (the authors fine-tune the student "
            "first). Default: 0 for a student with trained weights (a saved folder, a Hub checkpoint, --pretrained), "
            "else --teacher_epochs, so that a trained network is pruned."
        },
    )


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="uoft-cs/cifar10",
        metadata={
            "help": "Hub dataset id or local folder (e.g. ../shared/data/cifar10, uoft-cs/cifar100, an "
            "imagefolder tree root/<split>/<class>/<image>)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_dir: str | None = field(default=None, metadata={"help": "data_dir for load_dataset (e.g. imagefolder)."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: detected)."})
    label_column: str | None = field(
        default=None, metadata={"help": "Label column (default: detected; CIFAR-100 -> fine_label)."}
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on (validation is carved from it)."})
    test_split: str | None = field(
        default=None, metadata={"help": "Split for the final report (default: test, else validation)."}
    )
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Percent of the train split held out for validation (0: none)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training images."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many validation and test images."}
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Input resolution (224 for the paper's protocol). Default: the dataset's own for small images "
            "(CIFAR: 32), else the model's."
        },
    )
    augmentation: str = field(
        default="cifar", metadata={"help": f"Training augmentation: one of {available_augmentations()}."}
    )


@dataclass
class RecipeArguments:
    sparsities: list[float] | None = field(
        default=None,
        metadata={
            "help": "Sweep, e.g. --sparsities 0.9 0.95 0.98: one retrained model each, from one shared scoring pass when "
            "a one-shot method scores in one round (magnitude, tgp, snip; not tgp_fisher's 5 rounds, nor the default "
            "gradual, which prunes during each retraining)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an existing, non-empty --output_dir."}
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "Stop sparse retraining after this many epochs without validation improvement."},
    )
    plots: bool = field(default=True, metadata={"help": "Write PNG plots next to results.json."})
    export_sparse_inference: bool = field(
        default=False,
        metadata={
            "help": "Before saving each sparsity's model, export it with hf_tgprune.export_sparse_inference (sparse "
            "CPU kernels for the Linear and convolution layers where they are measured faster) and measure dense vs "
            "exported latency end to end on this machine's CPU, on eval images; the figures go into the run's entry "
            "of results.json and into the saved model's sparsity.json and model card."
        },
    )
    inference_batch_sizes: list[int] | None = field(
        default=None,
        metadata={"help": "Batch sizes for --export_sparse_inference, each exported and measured (default: 1 32)."},
    )
    inference_repeats: int = field(
        default=10,
        metadata={"help": "Timed rounds (dense and exported interleaved, median) for --export_sparse_inference."},
    )


DEFAULT_INFERENCE_BATCH_SIZES = [1, 32]

# Recipe defaults that differ from TrainingArguments' (the authors' SGD; evaluate every epoch).
RECIPE_DEFAULTS = {
    "output_dir": "outputs/prune_cifar",
    "learning_rate": 0.01,
    "optim": "sgd",
    "optim_args": "momentum=0.9",
    "weight_decay": 0.0,
    "per_device_train_batch_size": 128,
    "per_device_eval_batch_size": 256,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "logging_steps": 50,
    "report_to": "none",
    "dataloader_pin_memory": torch.cuda.is_available(),
    "ddp_find_unused_parameters": False,  # classifiers use every parameter; the check costs a graph traversal
}


def parse_arguments(
    argv: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataArguments, RecipeArguments, TeacherGuidedPruningConfig]:
    """The recipe's four argument dataclasses from `argv` (default `sys.argv[1:]`; YAML/JSON config files allowed),
    with the recipe's defaults (`RECIPE_DEFAULTS`)."""
    parser = PruningParser((ModelArguments, DataArguments, RecipeArguments, TeacherGuidedPruningConfig))
    parser.set_defaults(**RECIPE_DEFAULTS)
    argv = expand_config_args(sys.argv[1:] if argv is None else argv)
    model_args, data_args, recipe_args, args = parser.parse_args_and_config(argv)
    recipe_args.sparsity_given = any(a == "--sparsity" or a.startswith("--sparsity=") for a in argv)
    return model_args, data_args, recipe_args, args


def validate_arguments(model_args, data_args, recipe_args, args) -> list[float]:
    """Cross-argument checks before any training (and the default of `--student_warmup_epochs`); returns the
    sparsities to run. Raises `RecipeError` naming the argument and the fix."""
    if model_args.student_warmup_epochs is None:
        trained = has_trained_weights(model_args.model_name_or_path, model_args.pretrained)
        model_args.student_warmup_epochs = 0.0 if trained else model_args.teacher_epochs
    sparsities = check_sparsities(args.sparsity, recipe_args.sparsities, getattr(recipe_args, "sparsity_given", False))
    if (args.fp16 or args.bf16) and args.use_cpu:
        raise RecipeError("--fp16/--bf16 need a GPU; this run is on the CPU. Drop the flag (CPU runs use float32).")
    if args.per_device_train_batch_size < 1 or args.calibration_batch_size < 1:
        raise RecipeError("--per_device_train_batch_size and --calibration_batch_size must be >= 1.")
    method = build_method(args.pruning_method, args.pruning_method_args)  # validated by the config already
    if model_args.teacher_name_or_path is None and method.needs_teacher(args) and model_args.teacher_epochs <= 0:
        raise RecipeError(
            "No trained teacher: pass --teacher_name_or_path <trained model>, or --teacher_epochs > 0 to train one "
            "(or prune and retrain without one: --alpha 0, the cross-entropy alone)."
        )
    if data_args.augmentation not in available_augmentations():
        raise RecipeError(
            f"--augmentation must be one of {available_augmentations()}; got {data_args.augmentation!r}."
        )
    if recipe_args.inference_batch_sizes is not None and not recipe_args.export_sparse_inference:
        raise RecipeError(
            "--inference_batch_sizes is used only with --export_sparse_inference: add --export_sparse_inference True "
            "or drop --inference_batch_sizes."
        )
    if recipe_args.export_sparse_inference:
        batch_sizes = recipe_args.inference_batch_sizes or DEFAULT_INFERENCE_BATCH_SIZES
        if not batch_sizes or min(batch_sizes) < 1:
            raise RecipeError(f"--inference_batch_sizes must be >= 1 (e.g. 1 32); got {batch_sizes}.")
        if recipe_args.inference_repeats < 1:
            raise RecipeError(f"--inference_repeats must be >= 1; got {recipe_args.inference_repeats}.")
        recipe_args.inference_batch_sizes = sorted(set(batch_sizes))
    if recipe_args.early_stopping_patience is not None and data_args.validation_split_percentage == 0:
        raise RecipeError("--early_stopping_patience needs a validation split (--validation_split_percentage > 0).")
    if args.push_to_hub:
        import huggingface_hub

        if huggingface_hub.constants.HF_HUB_OFFLINE:
            raise RecipeError(
                "--push_to_hub needs the network, but HF_HUB_OFFLINE is set; unset it or drop --push_to_hub."
            )
        if not args.hub_token and huggingface_hub.get_token() is None:
            raise RecipeError(
                "--push_to_hub needs a Hugging Face write token: run `hf auth login`, set HF_TOKEN or pass "
                "--hub_token (or drop --push_to_hub)."
            )
    return sparsities
