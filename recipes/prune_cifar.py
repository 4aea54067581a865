#!/usr/bin/env python
"""Teacher-guided one-shot pruning of an image classifier, end to end, with `hf_tgprune`.

    accelerate launch recipes/prune_cifar.py --dataset_name ../shared/data/cifar10 --model_name_or_path resnet18 \
        --sparsities 0.9 0.95 --output_dir outputs/resnet18-tgp

Stages (each timed in results.json, each reused by `--resume_from_checkpoint True` once finished):
  1. teacher       load a trained teacher (--teacher_name_or_path), or train one and save it in <output_dir>/teacher;
  2. student       load the student; optional KD warm-up (--student_warmup_epochs) saved in <output_dir>/dense-student;
  3. scoring       one scoring pass (`trainer.compute_scores()`), shared by every sparsity of a one-shot method
                   with one scoring round (the default magnitude, tgp, snip); with several rounds
                   (--pruning_method tgp_fisher scores in 5) each sparsity is scored in its own rounds, in its prune
                   step;
  4. per sparsity  a copy of the dense student is pruned (`trainer.prune(scores=...)`), evaluated, retrained,
                   evaluated and saved in <output_dir>/sparsity-<s> (`trainer.save_model`, `trainer.push_to_hub`);
                   with --export_sparse_inference, its dense vs sparse-exported CPU latency is measured first and
                   recorded in results.json, sparsity.json and the model card;
  5. report        results.json and PNG plots.

Arguments: see --help. Everything can also come from a YAML/JSON file (`prune_cifar.py config.yaml`, or
`--config config.yaml` followed by overrides).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field

# The recipe's own helpers (recipe_utils, plots) live next to it; from a source checkout without `pip install -e .`
# the library is one folder up.
sys.path[1:1] = [
    os.path.dirname(os.path.abspath(__file__)),
    os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."),
]

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from recipe_utils import (  # noqa: E402
    RESULTS_NAME,
    RecipeError,
    StageTimer,
    check_output_dir,
    check_same_arguments,
    check_sparsities,
    compact_sparsity,
    format_summary,
    hub_repo_for,
    measure_inference_speed,
    parse_recipe_args,
    read_json,
    result_arguments,
    resume_requested,
    run_dirname,
    stage_args,
    strip_prefix,
    write_json,
)
from transformers import EarlyStoppingCallback, HfArgumentParser, set_seed  # noqa: E402

from hf_tgprune import (  # noqa: E402
    TeacherGuidedPruningConfig,
    TeacherGuidedPruningTrainer,
    prunable_parameters,
    sparsity_report,
)
from hf_tgprune.adapters import image_processor, unwrap_model  # noqa: E402
from hf_tgprune.data import (  # noqa: E402
    DataError,
    available_augmentations,
    build_transforms,
    collate_fn,
    label_mappings,
    label_names,
    limit_samples,
    load_image_dataset,
    native_image_size,
    resolve_data_config,
    resolve_splits,
    sample_calibration,
    set_transforms,
)
from hf_tgprune.evaluation import make_compute_metrics  # noqa: E402
from hf_tgprune.methods import build_method  # noqa: E402
from hf_tgprune.models import ModelLoadError, has_trained_weights, load_image_classifier  # noqa: E402

logger = logging.getLogger("prune_cifar")


# ------------------------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------------------------
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
            "the method scores in one round (all but tgp_fisher by default)."
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
            "CPU kernels for the Linear / 1x1-conv layers where they are measured faster) and measure dense vs "
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


def parse_arguments(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, RecipeArguments, TeacherGuidedPruningConfig))
    parser.set_defaults(**RECIPE_DEFAULTS)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        model_args, data_args, recipe_args, args = parse_recipe_args(parser, argv)
    except ValueError as error:  # validation in the dataclasses' __post_init__ (e.g. --sparsity 1.5)
        raise RecipeError(str(error)) from error
    recipe_args.sparsity_given = any(a == "--sparsity" or a.startswith("--sparsity=") for a in argv)
    return model_args, data_args, recipe_args, args


# ------------------------------------------------------------------------------------------------------------------
# Checks that run before any training
# ------------------------------------------------------------------------------------------------------------------
def validate(model_args, data_args, recipe_args, args) -> list[float]:
    """Cross-argument checks (and the default of --student_warmup_epochs); returns the sparsities to run."""
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
            "(or retrain without one: --retrain_with_kd False with a teacher-free --pruning_method such as the default "
            "magnitude or snip)."
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


def load_data(data_args, args):
    with args.main_process_first(desc="loading the dataset"):
        raw = load_image_dataset(
            data_args.dataset_name, data_args.dataset_config_name, image_column=data_args.image_column,
            label_column=data_args.label_column, data_dir=data_args.data_dir,
        )  # fmt: skip
    splits = resolve_splits(
        raw, data_args.validation_split_percentage, seed=args.seed, train_split=data_args.train_split,
        test_split=data_args.test_split,
    )  # fmt: skip
    names = label_names(splits.train)
    if label_names(splits.test) != names:
        raise DataError(
            f"The test split's classes {label_names(splits.test)[:10]} differ from the train split's {names[:10]}."
        )
    splits.train = limit_samples(splits.train, data_args.max_train_samples, seed=args.seed)
    if splits.validation is not None:
        splits.validation = limit_samples(splits.validation, data_args.max_eval_samples)
    splits.test = limit_samples(splits.test, data_args.max_eval_samples)
    return splits


def load_models(model_args, args, num_labels, id2label, label2id, teacher_dir, resume):
    """(student, teacher or None, whether the teacher is trained). Fails before training on a bad path or label
    mismatch; on resume, a teacher this recipe trained and saved is reloaded from `teacher_dir`."""
    labels = dict(id2label=id2label, label2id=label2id)
    student = load_image_classifier(
        model_args.model_name_or_path, num_labels, pretrained=model_args.pretrained, **labels
    )
    if not build_method(args.pruning_method, args.pruning_method_args).needs_teacher(args) and (
        model_args.teacher_name_or_path is None
    ):
        return student, None, False
    if model_args.teacher_name_or_path is not None:
        if not has_trained_weights(model_args.teacher_name_or_path, pretrained=False):
            raise RecipeError(
                f"--teacher_name_or_path {model_args.teacher_name_or_path!r} is an architecture name, not a trained "
                "model. Pass a saved folder or Hub checkpoint, or use --teacher_architecture to train one."
            )
        teacher = load_image_classifier(model_args.teacher_name_or_path, num_labels, strict_num_labels=True, **labels)
        return student, teacher, True
    if resume and os.path.isfile(os.path.join(teacher_dir, "sparsity.json")):
        return student, load_image_classifier(teacher_dir, num_labels, strict_num_labels=True, **labels), True
    architecture = model_args.teacher_architecture or model_args.model_name_or_path
    return student, load_image_classifier(architecture, num_labels, pretrained=model_args.pretrained, **labels), False


# ------------------------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------------------------
def make_trainer(model, args, *, teacher=None, train=None, validation=None, calibration=None, **kw):
    return TeacherGuidedPruningTrainer(
        model=model, teacher_model=teacher, args=args, data_collator=collate_fn, train_dataset=train,
        eval_dataset=validation, calibration_dataset=calibration, compute_metrics=make_compute_metrics(), **kw,
    )  # fmt: skip


def evaluate(trainer, dataset) -> dict[str, float]:
    metrics = strip_prefix(trainer.evaluate(eval_dataset=dataset, metric_key_prefix="test"), "test")
    return {k: v for k, v in metrics.items() if k in ("accuracy", "top5_accuracy", "loss")}


def dense_args(args, output_dir, epochs, learning_rate=None, with_kd=False, has_validation=True):
    """Config of a dense (unpruned) training stage: `pruning_method="dense"`, CE or KD."""
    return stage_args(
        args, output_dir, num_train_epochs=epochs, learning_rate=learning_rate or args.learning_rate,
        retrain_with_kd=with_kd, pruning_method="dense", pruning_method_args=None, pruning_rounds=1,
        sparsity_pattern="unstructured", prune_include=None, prune_exclude=None,
        eval_strategy=args.eval_strategy if has_validation else "no", load_best_model_at_end=False,
    )  # fmt: skip


def retrain_args(args, output_dir, sparsity, patience, has_validation):
    changes = {"sparsity": sparsity}
    if not has_validation:
        changes.update(eval_strategy="no", load_best_model_at_end=False)
    if patience is not None:
        changes.update(
            eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="accuracy",
            greater_is_better=True, save_total_limit=2,
        )  # fmt: skip
    return stage_args(args, output_dir, **changes)


def inference_speed(trainer, dataset, batch_sizes, repeats):
    """Dense vs `export_sparse_inference` latency of the trainer's pruned model (the weights `save_model` writes),
    on the first images of `dataset` (CPU, this process's torch threads)."""
    examples = collate_fn([dataset[i] for i in range(min(max(batch_sizes), len(dataset)))])["pixel_values"]
    return measure_inference_speed(unwrap_model(trainer.model), examples, batch_sizes, repeats, masks=trainer.masks)


def has_checkpoint(folder: str) -> bool:
    return os.path.isdir(folder) and any(name.startswith("checkpoint-") for name in os.listdir(folder))


def main(argv=None) -> dict:
    model_args, data_args, recipe_args, args = parse_arguments(argv)
    state = PartialState()
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if state.is_main_process else logging.WARNING,
    )
    timer = StageTimer()
    out = args.output_dir

    # ---- checks and data: everything that can be wrong fails here, before any training -------------------------
    resume = resume_requested(args.resume_from_checkpoint, out)
    sparsities = validate(model_args, data_args, recipe_args, args)
    check_output_dir(out, recipe_args.overwrite_output_dir, resume)
    arguments = result_arguments(model_args, data_args, recipe_args, args)
    if resume:  # the arguments that determine a result must be the interrupted run's
        check_same_arguments(read_json(os.path.join(out, RESULTS_NAME)).get("arguments"), arguments)
    state.wait_for_everyone()  # every rank has checked output_dir before rank 0 writes into it
    set_seed(args.seed)
    teacher_dir, warmup_dir = os.path.join(out, "teacher"), os.path.join(out, "dense-student")
    with timer.measure("load"):
        splits = load_data(data_args, args)
        id2label, label2id = label_mappings(splits.train)
        num_labels = len(id2label)
        student, teacher, teacher_is_trained = load_models(
            model_args, args, num_labels, id2label, label2id, teacher_dir, resume
        )
        try:  # --prune_include / --prune_exclude patterns must match the student's weights: say so before training
            prunable_parameters(student, args.prune_include, args.prune_exclude)
        except ValueError as error:
            raise RecipeError(str(error)) from error
        # the student's resolution and normalisation (its image processor, if its library has one); the teacher sees
        # the same batches, so it must run on them
        data_config = resolve_data_config(
            student, image_processor(student, model_args.model_name_or_path), image_size=data_args.image_size,
            native_size=native_image_size(splits.train), also_fit=[teacher] if teacher is not None else [],
        )  # fmt: skip
        train_transform, eval_transform = build_transforms(data_config, data_args.augmentation)
        train_ds = set_transforms(splits.train, train_transform)
        validation_ds = None if splits.validation is None else set_transforms(splits.validation, eval_transform)
        test_ds = set_transforms(splits.test, eval_transform)
        # calibration: from the training part only, deterministic (the trainer's own sampler), no augmentation
        calibration_ds = set_transforms(
            sample_calibration(splits.train, args.num_calibration_samples, seed=args.seed), eval_transform
        )
    has_validation = validation_ds is not None
    results = read_json(os.path.join(out, RESULTS_NAME)) if resume else {}
    results.update(
        command=sys.argv, arguments=arguments, world_size=state.num_processes, device=str(args.device),
        dataset={"name": data_args.dataset_name, "num_labels": num_labels, "train": len(train_ds),
                 "validation": len(validation_ds) if has_validation else 0, "test": len(test_ds),
                 "calibration": len(calibration_ds)},
        data_config=dataclasses.asdict(data_config), pruning={"method": args.pruning_method, "sparsities": sparsities},
    )  # fmt: skip
    results.setdefault("teacher", None)
    results.setdefault("runs", [])
    results.setdefault("in_progress", {})

    def save_results():
        results["stage_seconds"] = {**results.get("stage_seconds", {}), **timer.seconds}
        if state.is_main_process:
            write_json(os.path.join(out, RESULTS_NAME), results)

    def info(trainer, **fields):  # what the saved folder and its card record
        trainer.sparse_info.dataset = data_args.dataset_name
        trainer.sparse_info.data_config = data_config
        for key, value in fields.items():
            setattr(trainer.sparse_info, key, value)

    # ---- 1. teacher ---------------------------------------------------------------------------------------------
    if teacher is not None:
        teacher_args = dense_args(args, teacher_dir, model_args.teacher_epochs, model_args.teacher_learning_rate,
                                  has_validation=has_validation)  # fmt: skip
        teacher_trainer = make_trainer(teacher, teacher_args, train=train_ds, validation=validation_ds)
        if not teacher_is_trained:
            with timer.measure("teacher_training"):
                teacher_trainer.train()
            info(teacher_trainer)
            teacher_trainer.save_model(teacher_dir)
            logger.info("Saved the trained teacher to %s (reuse it with --teacher_name_or_path)", teacher_dir)
        if results["teacher"] is None:
            with timer.measure("teacher_evaluation"):
                results["teacher"] = {
                    "source": model_args.teacher_name_or_path or teacher_dir,
                    "trained_here": model_args.teacher_name_or_path is None,
                    "test": evaluate(teacher_trainer, test_ds),
                }
        teacher.eval().requires_grad_(False)
        save_results()

    # ---- 2. dense student (optional KD warm-up) ---------------------------------------------------------------
    student_trained = has_trained_weights(model_args.model_name_or_path, model_args.pretrained)
    warm_args = dense_args(args, warmup_dir, model_args.student_warmup_epochs, with_kd=teacher is not None,
                           has_validation=has_validation)  # fmt: skip
    if model_args.student_warmup_epochs > 0 and resume and "dense_student" in results:
        warmed = load_image_classifier(warmup_dir, num_labels, id2label=id2label, label2id=label2id)
        student.load_state_dict(warmed.state_dict())
        student_trained = True
    dense_trainer = make_trainer(student, warm_args, teacher=teacher, train=train_ds, validation=validation_ds)
    if model_args.student_warmup_epochs > 0 and not student_trained:
        with timer.measure("student_warmup"):
            dense_trainer.train()
        student_trained = True
        info(dense_trainer)
        dense_trainer.save_model(warmup_dir)
    if not student_trained:
        logger.warning(
            "The student starts from random weights and gets no warm-up: pass --pretrained, a trained "
            "--model_name_or_path, or --student_warmup_epochs > 0 to prune a trained network."
        )
    if "dense_student" not in results:
        with timer.measure("dense_student_evaluation"):
            results["dense_student"] = {"trained": student_trained, "test": evaluate(dense_trainer, test_ds)}
    save_results()
    dense_state = copy.deepcopy(student)  # every sparsity starts from the same dense student

    # ---- 3 + 4. one scoring pass shared by the sparsities (one round); per sparsity: prune, evaluate, retrain, save
    scores = None
    finished = {run["sparsity"] for run in results["runs"]}
    for sparsity in sparsities:
        if sparsity in finished:
            logger.info("Sparsity %s: finished in the interrupted run, reused.", sparsity)
            continue
        tag = run_dirname(sparsity)
        run_dir = os.path.join(out, tag)
        callbacks = []
        if recipe_args.early_stopping_patience is not None:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe_args.early_stopping_patience))
        trainer = make_trainer(
            copy.deepcopy(dense_state), retrain_args(args, run_dir, sparsity, recipe_args.early_stopping_patience,
                                                     has_validation),
            teacher=teacher, train=train_ds, validation=validation_ds, calibration=calibration_ds, callbacks=callbacks,
        )  # fmt: skip
        run = results["in_progress"].get(tag) or {"sparsity": sparsity, "model_dir": run_dir}
        resume_run = resume and has_checkpoint(run_dir) and "after_pruning" in run
        if not resume_run:
            shared = trainer.pruner.shares_scores()  # a one-shot method in one round: one scoring pass for all
            if shared and scores is None:
                with timer.measure("scoring"):
                    scores = trainer.compute_scores()
            with timer.measure(f"{tag}/prune"):
                trainer.prune(scores=scores if shared else None)
            with timer.measure(f"{tag}/eval_after_pruning"):
                run["after_pruning"] = evaluate(trainer, test_ds)
            results["in_progress"][tag] = run
            save_results()
        if args.num_train_epochs > 0 or args.max_steps > 0:
            with timer.measure(f"{tag}/retraining"):
                trainer.train(resume_from_checkpoint=True if resume_run else None)
            with timer.measure(f"{tag}/eval_after_retraining"):
                run["after_retraining"] = evaluate(trainer, test_ds)
        report = sparsity_report(trainer.model, trainer.masks)
        run.update(mask_sha256=trainer.pruning_report["mask_sha256"], sparsity_report=compact_sparsity(report))
        if recipe_args.export_sparse_inference and state.is_main_process:
            # measured before saving, so that the saved sparsity.json (and the card built from it) holds the figures
            with timer.measure(f"{tag}/inference_speed"):
                speed = inference_speed(trainer, test_ds, recipe_args.inference_batch_sizes,
                                        recipe_args.inference_repeats)  # fmt: skip
            trainer.sparse_info.inference = speed
            run["inference"] = speed.as_dict()
        with timer.measure(f"{tag}/save"):
            info(trainer, teacher=(results.get("teacher") or {}).get("source"), base_model=model_args.model_name_or_path,
                 dense_metrics=results["dense_student"]["test"],
                 pruned_metrics=run.get("after_retraining") or run["after_pruning"])  # fmt: skip
            trainer.save_model(run_dir)
            if args.push_to_hub:
                trainer.args.hub_model_id = hub_repo_for(args.hub_model_id, out, sparsity, len(sparsities) > 1)
                trainer.push_to_hub()
                run["hub_repo"] = trainer.args.hub_model_id
        results["runs"].append(run)
        results["in_progress"].pop(tag, None)
        save_results()
        del trainer

    # ---- 5. report ------------------------------------------------------------------------------------------------
    results["runs"].sort(key=lambda run: run["sparsity"])
    if state.is_main_process and recipe_args.plots:
        from plots import plot_accuracy_vs_sparsity, plot_layer_sparsity

        layers = {run["sparsity"]: run["sparsity_report"]["layers"] for run in results["runs"]}
        plot_layer_sparsity(layers, os.path.join(out, "layer_sparsity.png"))
        if len(results["runs"]) > 1 or results["runs"][0].get("after_retraining"):
            plot_accuracy_vs_sparsity(
                results["runs"], os.path.join(out, "accuracy_vs_sparsity.png"),
                dense=results["dense_student"]["test"].get("accuracy"),
                teacher=(results.get("teacher") or {}).get("test", {}).get("accuracy"),
            )  # fmt: skip
    save_results()
    if state.is_main_process:
        print(format_summary(results))
        print(f"results: {os.path.join(out, RESULTS_NAME)}  (total {timer.total:.0f} s)")
    state.wait_for_everyone()
    return results


if __name__ == "__main__":
    try:
        main()
    except (RecipeError, DataError, ModelLoadError) as error:
        sys.exit(f"prune_cifar.py: error: {error}")
