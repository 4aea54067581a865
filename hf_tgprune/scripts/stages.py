"""The stages of the end-to-end recipe (`recipes/prune_cifar.py`), each resumable from the run's `results.json`:
data and models, teacher, dense student, and the sparsity sweep (one scoring pass shared by every sparsity of a
one-shot method in one round; per sparsity prune, evaluate, retrain, evaluate, save, push)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from accelerate import PartialState
from transformers import EarlyStoppingCallback

from ..core.adapters import image_processor, unwrap_model
from ..core.masking import prunable_parameters, sparsity_report
from ..data import (
    DataConfig,
    DataError,
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
from ..io.models import has_trained_weights, load_image_classifier
from ..methods import build_method
from ..training.evaluation import make_compute_metrics
from ..training.trainer import TeacherGuidedPruningTrainer, planned_optimizer_steps
from .speed import measure_inference_speed
from .utils import (
    RESULTS_NAME,
    RecipeError,
    StageTimer,
    check_output_dir,
    check_same_arguments,
    compact_sparsity,
    format_summary,
    hub_repo_for,
    read_json,
    run_dirname,
    stage_args,
    strip_prefix,
    write_json,
)

logger = logging.getLogger(__name__)


class RecipeRun:
    """One run's `results.json` (what finished is reused on resume) and stage timings; rank 0 writes it atomically.

    Opening checks `output_dir` (empty, `overwrite`, or the run to `resume` with the same result-determining
    arguments) before anything is written, and waits until every rank has checked it.
    """

    def __init__(self, output_dir: str, arguments: dict, *, resume: bool, overwrite: bool, state: PartialState):
        check_output_dir(output_dir, overwrite, resume)
        self.path = os.path.join(output_dir, RESULTS_NAME)
        self.results: dict[str, Any] = read_json(self.path) if resume else {}
        if resume:  # the arguments that determine a result must be the interrupted run's
            check_same_arguments(self.results.get("arguments"), arguments)
        self.output_dir, self.resume, self.state, self.timer = output_dir, resume, state, StageTimer()
        self.results.update(command=sys.argv, arguments=arguments, world_size=state.num_processes)
        for key, empty in (("teacher", None), ("runs", []), ("in_progress", {})):
            self.results.setdefault(key, empty)
        state.wait_for_everyone()  # every rank has checked output_dir before rank 0 writes into it

    def measure(self, stage: str):
        return self.timer.measure(stage)

    def save(self) -> None:
        self.results["stage_seconds"] = {**self.results.get("stage_seconds", {}), **self.timer.seconds}
        if self.state.is_main_process:
            write_json(self.path, self.results)


@dataclass
class RecipeData:
    """The recipe's datasets with their transforms, and what the saved folders record about them."""

    name: str
    train: Any
    validation: Any | None
    test: Any
    calibration: Any
    data_config: DataConfig
    id2label: dict[int, str]
    label2id: dict[str, int]


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


def load_data_and_models(run: RecipeRun, model_args, data_args, args):
    """(student, teacher or None, whether the teacher is trained, RecipeData); every bad path, label, pattern or
    column fails here, before any training."""
    splits = load_data(data_args, args)
    id2label, label2id = label_mappings(splits.train)
    teacher_dir = os.path.join(run.output_dir, "teacher")
    student, teacher, teacher_is_trained = load_models(
        model_args, args, len(id2label), id2label, label2id, teacher_dir, run.resume
    )
    try:  # --prune_include / --prune_exclude patterns must match the student's weights, and a method's schedule
        # must fit the retraining: say so before the teacher and dense stages train
        prunable_parameters(student, args.prune_include, args.prune_exclude)
        build_method(args.pruning_method, args.pruning_method_args).check_steps(
            planned_optimizer_steps(args, len(splits.train))
        )
    except ValueError as error:
        raise RecipeError(str(error)) from error
    # the student's resolution and normalisation (its image processor, if its library has one); the teacher sees the
    # same batches, so it must run on them
    data_config = resolve_data_config(
        student, image_processor(student, model_args.model_name_or_path), image_size=data_args.image_size,
        native_size=native_image_size(splits.train), also_fit=[teacher] if teacher is not None else [],
    )  # fmt: skip
    train_transform, eval_transform = build_transforms(data_config, data_args.augmentation)
    # calibration: from the training part only, deterministic (the trainer's own sampler), no augmentation
    calibration = sample_calibration(splits.train, args.num_calibration_samples, seed=args.seed)
    data = RecipeData(
        name=data_args.dataset_name,
        train=set_transforms(splits.train, train_transform),
        validation=None if splits.validation is None else set_transforms(splits.validation, eval_transform),
        test=set_transforms(splits.test, eval_transform),
        calibration=set_transforms(calibration, eval_transform),
        data_config=data_config,
        id2label=id2label,
        label2id=label2id,
    )
    run.results.update(
        device=str(args.device), data_config=dataclasses.asdict(data_config),
        dataset={"name": data.name, "num_labels": len(id2label), "train": len(data.train),
                 "validation": len(data.validation) if data.validation is not None else 0, "test": len(data.test),
                 "calibration": len(data.calibration)},
    )  # fmt: skip
    return student, teacher, teacher_is_trained, data


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


def record_data(trainer, data: RecipeData, **fields) -> None:
    """What the saved folder and its model card record about the run (`trainer.sparse_info`)."""
    trainer.sparse_info.dataset = data.name
    trainer.sparse_info.data_config = data.data_config
    for key, value in fields.items():
        setattr(trainer.sparse_info, key, value)


def has_checkpoint(folder: str) -> bool:
    return os.path.isdir(folder) and any(name.startswith("checkpoint-") for name in os.listdir(folder))


def teacher_stage(run: RecipeRun, teacher, teacher_is_trained: bool, model_args, args, data: RecipeData) -> None:
    """Train the teacher unless it is trained (saved in `<output_dir>/teacher`), evaluate it once, freeze it."""
    teacher_dir = os.path.join(run.output_dir, "teacher")
    teacher_args = dense_args(args, teacher_dir, model_args.teacher_epochs, model_args.teacher_learning_rate,
                              has_validation=data.validation is not None)  # fmt: skip
    trainer = make_trainer(teacher, teacher_args, train=data.train, validation=data.validation)
    if not teacher_is_trained:
        with run.measure("teacher_training"):
            trainer.train()
        record_data(trainer, data)
        trainer.save_model(teacher_dir)
        logger.info("Saved the trained teacher to %s (reuse it with --teacher_name_or_path)", teacher_dir)
    if run.results["teacher"] is None:
        with run.measure("teacher_evaluation"):
            run.results["teacher"] = {
                "source": model_args.teacher_name_or_path or teacher_dir,
                "trained_here": model_args.teacher_name_or_path is None,
                "test": evaluate(trainer, data.test),
            }
    teacher.eval().requires_grad_(False)
    run.save()


def dense_student_stage(run: RecipeRun, student, teacher, model_args, args, data: RecipeData) -> None:
    """Warm the student up with KD for `--student_warmup_epochs` (saved in `<output_dir>/dense-student`, reloaded
    on resume) unless it has trained weights; evaluate the dense student once."""
    warmup_dir = os.path.join(run.output_dir, "dense-student")
    trained = has_trained_weights(model_args.model_name_or_path, model_args.pretrained)
    warm_args = dense_args(args, warmup_dir, model_args.student_warmup_epochs, with_kd=teacher is not None,
                           has_validation=data.validation is not None)  # fmt: skip
    if model_args.student_warmup_epochs > 0 and run.resume and "dense_student" in run.results:
        warmed = load_image_classifier(warmup_dir, len(data.id2label), id2label=data.id2label, label2id=data.label2id)
        student.load_state_dict(warmed.state_dict())
        trained = True
    trainer = make_trainer(student, warm_args, teacher=teacher, train=data.train, validation=data.validation)
    if model_args.student_warmup_epochs > 0 and not trained:
        with run.measure("student_warmup"):
            trainer.train()
        trained = True
        record_data(trainer, data)
        trainer.save_model(warmup_dir)
    if not trained:
        logger.warning(
            "The student starts from random weights and gets no warm-up: pass --pretrained, a trained "
            "--model_name_or_path, or --student_warmup_epochs > 0 to prune a trained network."
        )
    if "dense_student" not in run.results:
        with run.measure("dense_student_evaluation"):
            run.results["dense_student"] = {"trained": trained, "test": evaluate(trainer, data.test)}
    run.save()


class EarlyStoppingOnFinalMasks(EarlyStoppingCallback):
    """`EarlyStoppingCallback` that counts only evaluations from optimizer step `start_step` on, against the best
    metric since then: a method that prunes during training (`gradual`) evaluates a denser model before its final
    masks, whose accuracy the sparse model would otherwise have to beat, stopping it `patience` evaluations after its
    schedule ends (or, stopped before, leaving the final masks untrained)."""

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float = 0.0, start_step: int = 0):
        super().__init__(early_stopping_patience, early_stopping_threshold)
        self.start_step = start_step
        self.best_metric = None  # the best since start_step (restored from a checkpoint's callback state)

    def check_metric_value(self, args, state, control, metric_value):
        if state.global_step < self.start_step:
            return
        best = self.best_metric
        better = best is not None and (metric_value > best if args.greater_is_better else metric_value < best)
        if best is None or (better and abs(metric_value - best) > self.early_stopping_threshold):
            self.best_metric, self.early_stopping_patience_counter = metric_value, 0
        else:
            self.early_stopping_patience_counter += 1

    def state(self) -> dict:
        state = super().state()
        state["args"]["start_step"] = self.start_step
        state["attributes"]["best_metric"] = self.best_metric
        return state


def early_stopping(patience: int, args, num_train: int, sparsity: float) -> EarlyStoppingCallback:
    """Early stopping of a retraining run; with `gradual`, counted from the step its last mask update runs at."""
    method = build_method(args.pruning_method, args.pruning_method_args)
    start_step = method.final_mask_step(sparsity, planned_optimizer_steps(args, num_train))
    if start_step == 0:
        return EarlyStoppingCallback(early_stopping_patience=patience)
    return EarlyStoppingOnFinalMasks(early_stopping_patience=patience, start_step=start_step)


def sparsity_sweep(run: RecipeRun, student, teacher, sparsities, model_args, recipe_args, args, data) -> None:
    """Per sparsity, a copy of the dense student is pruned, evaluated, retrained, evaluated, saved in
    `<output_dir>/sparsity-<s>` and pushed; one scoring pass is shared by every sparsity when the method scores in
    one round. Finished sparsities are reused on resume; a half-done retraining continues from its checkpoint."""
    run.results["pruning"] = {"method": args.pruning_method, "sparsities": sparsities}
    dense_state = copy.deepcopy(student)  # every sparsity starts from the same dense student
    scores = None
    finished = {entry["sparsity"] for entry in run.results["runs"]}
    for sparsity in sparsities:
        if sparsity in finished:
            logger.info("Sparsity %s: finished in the interrupted run, reused.", sparsity)
            continue
        tag = run_dirname(sparsity)
        run_dir = os.path.join(run.output_dir, tag)
        patience = recipe_args.early_stopping_patience
        callbacks = [] if patience is None else [early_stopping(patience, args, len(data.train), sparsity)]
        trainer = make_trainer(
            copy.deepcopy(dense_state), retrain_args(args, run_dir, sparsity, patience, data.validation is not None),
            teacher=teacher, train=data.train, validation=data.validation, calibration=data.calibration,
            callbacks=callbacks,
        )  # fmt: skip
        entry = run.results["in_progress"].get(tag) or {"sparsity": sparsity, "model_dir": run_dir}
        # a results.json from an older version marks a pruned run by its "after_pruning" accuracy only
        pruned = entry.get("pruned", "after_pruning" in entry)
        resume_run = run.resume and has_checkpoint(run_dir) and pruned
        if not resume_run:
            shared = trainer.pruner.shares_scores()  # a one-shot method in one round: one scoring pass for all
            if shared and scores is None:
                with run.measure("scoring"):
                    scores = trainer.compute_scores()
            with run.measure(f"{tag}/prune"):
                trainer.prune(scores=scores if shared else None)
            if trainer.pruner.method.one_shot:  # the others prune during training: this model is not yet pruned
                with run.measure(f"{tag}/eval_after_pruning"):
                    entry["after_pruning"] = evaluate(trainer, data.test)
            entry["pruned"] = True
            run.results["in_progress"][tag] = entry
            run.save()
        if args.num_train_epochs > 0 or args.max_steps > 0:
            with run.measure(f"{tag}/retraining"):
                trainer.train(resume_from_checkpoint=True if resume_run else None)
            with run.measure(f"{tag}/eval_after_retraining"):
                entry["after_retraining"] = evaluate(trainer, data.test)
        report = sparsity_report(trainer.model, trainer.masks)
        entry.update(mask_sha256=trainer.pruning_report["mask_sha256"], sparsity_report=compact_sparsity(report))
        if recipe_args.export_sparse_inference and run.state.is_main_process:
            # measured before saving, so that the saved sparsity.json (and the card built from it) holds the figures
            with run.measure(f"{tag}/inference_speed"):
                examples = collate_fn([data.test[i] for i in range(min(max(recipe_args.inference_batch_sizes),
                                                                        len(data.test)))])["pixel_values"]  # fmt: skip
                speed = measure_inference_speed(
                    unwrap_model(trainer.model), examples, recipe_args.inference_batch_sizes,
                    recipe_args.inference_repeats, masks=trainer.masks,
                )  # fmt: skip
            trainer.sparse_info.inference = speed
            entry["inference"] = speed.as_dict()
        with run.measure(f"{tag}/save"):
            record_data(trainer, data, teacher=(run.results.get("teacher") or {}).get("source"),
                        base_model=model_args.model_name_or_path, dense_metrics=run.results["dense_student"]["test"],
                        pruned_metrics=entry.get("after_retraining") or entry.get("after_pruning"))  # fmt: skip
            trainer.save_model(run_dir)
            if args.push_to_hub:
                trainer.args.hub_model_id = hub_repo_for(args.hub_model_id, run.output_dir, sparsity,
                                                         len(sparsities) > 1)  # fmt: skip
                trainer.push_to_hub()
                entry["hub_repo"] = trainer.args.hub_model_id
        run.results["runs"].append(entry)
        run.results["in_progress"].pop(tag, None)
        run.save()
        del trainer


def report_stage(run: RecipeRun, plots: bool) -> dict:
    """Sort the runs, draw the PNG plots (rank 0), write results.json and print the summary table."""
    results = run.results
    results["runs"].sort(key=lambda entry: entry["sparsity"])
    if run.state.is_main_process and plots:
        from .plots import plot_accuracy_vs_sparsity, plot_layer_sparsity

        layers = {entry["sparsity"]: entry["sparsity_report"]["layers"] for entry in results["runs"]}
        plot_layer_sparsity(layers, os.path.join(run.output_dir, "layer_sparsity.png"))
        if len(results["runs"]) > 1 or results["runs"][0].get("after_retraining"):
            plot_accuracy_vs_sparsity(
                results["runs"], os.path.join(run.output_dir, "accuracy_vs_sparsity.png"),
                dense=results["dense_student"]["test"].get("accuracy"),
                teacher=(results.get("teacher") or {}).get("test", {}).get("accuracy"),
            )  # fmt: skip
    run.save()
    if run.state.is_main_process:
        print(format_summary(results))
        print(f"results: {run.path}  (total {run.timer.total:.0f} s)")
    run.state.wait_for_everyone()
    return results
