"""`TeacherGuidedPruningTrainer`: one scoring pass, one global mask, sparse retraining with KD.

The trainer composes the library's modules and overrides only the hooks it needs:
`compute_loss` (distillation), `train` (prune first / restore masks on resume). Scoring lives in
`hf_tgprune.scoring`, masks in `hf_tgprune.masking`, enforcement in `hf_tgprune.callbacks`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapters import forward_logits, num_labels
from .callbacks import GlobalMaskCallback
from .checkpointing import SparseCheckpointMixin
from .config import TeacherGuidedPruningConfig
from .losses import teacher_guided_loss
from .masking import (
    MASKS_NAME,
    apply_masks,
    load_masks,
    mask_hash,
    min_layer_density_for,
    prunable_parameters,
    read_masks_metadata,
    save_masks,
    select_masks,
    sparsity_report,
)
from .recalibration import batchnorm_layers, recalibrate_batchnorm
from .schedules import get_pruning_schedule, imp_sparsities, resolve_scoring_method
from .scoring import ScoringOptions, compute_importance_scores, get_scoring_method

logger = logging.getLogger(__name__)


def deterministic_sample(dataset: Dataset, num_samples: int, seed: int) -> Dataset:
    """`num_samples` examples of `dataset` drawn by a seeded permutation (the whole set if it is smaller)."""
    if len(dataset) <= num_samples:
        return dataset
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_samples].tolist()
    return dataset.select(indices) if hasattr(dataset, "select") else Subset(dataset, indices)


def shard_bounds(batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous slice `[start, stop)` of a global batch that `rank` processes."""
    return rank * batch_size // world_size, (rank + 1) * batch_size // world_size


class _ShardedBatches:
    """Global calibration batches in a fixed order; this rank loads its slice of each (None when it is empty)."""

    def __init__(self, dataset, global_batch_size, rank, world_size, collate_fn, num_workers=0, pin_memory=False):
        n = len(dataset)
        self.global_batches = [list(range(i, min(i + global_batch_size, n))) for i in range(0, n, global_batch_size)]
        self.shards = []
        for indices in self.global_batches:
            start, stop = shard_bounds(len(indices), rank, world_size)
            self.shards.append(indices[start:stop])
        self.loader = DataLoader(
            dataset,
            batch_sampler=[shard for shard in self.shards if shard],
            collate_fn=collate_fn,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )

    def __len__(self):
        return len(self.global_batches)

    def __iter__(self):
        loaded = iter(self.loader)
        for shard in self.shards:
            yield next(loaded) if shard else None


class TeacherGuidedPruningTrainer(SparseCheckpointMixin, Trainer):
    """A `transformers.Trainer` that prunes the student once, guided by a frozen teacher, then retrains it sparsely.

    Example:
        >>> trainer = TeacherGuidedPruningTrainer(model=student, teacher_model=teacher, args=config,
        ...                                       train_dataset=train, eval_dataset=val)
        >>> report = trainer.prune()   # optional: train() prunes first
        >>> trainer.train()

    `masks=` installs given masks instead of scoring (e.g. masks from an earlier run); `masks={}` trains densely
    (a teacher, or a KD warm-up of the student) with the same loss and data handling.
    """

    _tag_names = ["hf_tgprune", "pruning", "knowledge-distillation"]

    def __init__(
        self,
        model: nn.Module,
        teacher_model: nn.Module | None = None,
        args: TeacherGuidedPruningConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict | None = None,
        calibration_dataset: Dataset | None = None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
        masks: Mapping[str, torch.Tensor] | None = None,
    ):
        if args is None:
            args = TeacherGuidedPruningConfig(output_dir=f"{type(model).__name__}-tgp")
        if not isinstance(args, TeacherGuidedPruningConfig):
            raise TypeError(
                f"args must be a TeacherGuidedPruningConfig (it extends TrainingArguments), got {type(args).__name__}"
            )
        self._validate_inputs(model, teacher_model, args, train_dataset, calibration_dataset)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        # compute_loss returns a per-batch mean: let the Trainer scale it for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.teacher_model = None
        if teacher_model is not None:
            teacher_model.eval().requires_grad_(False)
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        self.calibration_dataset = calibration_dataset
        # set by a pruning schedule (hf_tgprune.schedules) that trains with its own loss
        self.schedule_loss = None
        self.masks: dict[str, torch.Tensor] | None = None
        self.pruning_report: dict | None = None
        if masks is not None:
            self._install_masks(dict(masks))

    # --- validation ---------------------------------------------------------------------------------------------
    @staticmethod
    def _validate_inputs(model, teacher, args, train_dataset, calibration_dataset) -> None:
        schedule = get_pruning_schedule(args.pruning_method)
        method = resolve_scoring_method(args.pruning_method)
        prunable_parameters(model, args.prune_include, args.prune_exclude)  # raises on patterns that match nothing
        if teacher is None and method.needs_teacher and args.alpha > 0:
            raise ValueError(
                f"pruning_method={args.pruning_method!r} scores with a teacher: pass `teacher_model`, or choose a "
                "teacher-free method such as 'snip', 'magnitude' or 'random'."
            )
        if teacher is None and args.retrain_with_kd and not (schedule and schedule.own_loss):
            raise ValueError("retrain_with_kd=True needs a `teacher_model`; pass one or set retrain_with_kd=False.")
        if teacher is not None:
            student_labels, teacher_labels = num_labels(model), num_labels(teacher)
            if student_labels != teacher_labels:
                raise ValueError(
                    f"Teacher and student disagree on the number of labels ({teacher_labels} vs {student_labels}); "
                    "build both with the dataset's number of classes (timm `num_classes`, transformers `num_labels`)."
                )
        if method.data_free:
            return
        source, argument = (
            (calibration_dataset, "calibration_dataset")
            if calibration_dataset is not None
            else (train_dataset, "train_dataset")
        )
        if source is None or len(source) == 0:
            raise ValueError(
                f"The calibration set is empty ({argument} has no examples). Pass a non-empty `calibration_dataset` "
                "or `train_dataset`."
            )
        example = source[0]
        if isinstance(example, Mapping) and "labels" not in example and "label" not in example:
            raise ValueError(
                f"Calibration examples from `{argument}` have no labels (keys: {sorted(example)}); every example "
                "needs a `labels` (or `label`) entry next to `pixel_values`."
            )

    # --- pruning ------------------------------------------------------------------------------------------------
    def get_calibration_dataloader(self, num_samples: int | None = None, epochs: int = 0) -> _ShardedBatches:
        """Calibration batches, split across ranks.

        Args:
            num_samples: images drawn (seeded by `seed`) from `calibration_dataset`, or from `train_dataset` when
                there is none; default `num_calibration_samples`.
            epochs: > 0 instead runs over this many whole epochs of `train_dataset`, reshuffled every epoch (the
                authors' scoring regime, `scoring_epochs`).
        """
        if epochs > 0:
            generator = torch.Generator().manual_seed(self.args.seed)
            n = len(self.train_dataset)
            order = torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)]).tolist()
            dataset = Subset(self.train_dataset, order)
        else:
            source = self.calibration_dataset if self.calibration_dataset is not None else self.train_dataset
            dataset = deterministic_sample(source, num_samples or self.args.num_calibration_samples, self.args.seed)
        return _ShardedBatches(
            dataset,
            self.args.calibration_batch_size,
            self.accelerator.process_index,
            self.accelerator.num_processes,
            self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )

    def compute_scores(
        self, method: str | None = None, options: ScoringOptions | None = None
    ) -> dict[str, torch.Tensor]:
        """Run the scoring pass (all-reduced across processes) and return float32 scores per prunable weight.

        `method` / `options` override `args.pruning_method` and the options built from the config (schedules use it).
        """
        args = self.args
        method_name = method or args.pruning_method
        method = get_scoring_method(method_name)
        batches = None if method.data_free else self.get_calibration_dataloader(epochs=args.scoring_epochs)
        return compute_importance_scores(
            self.model,
            batches,
            method=method_name,
            teacher=self.teacher_model,
            params=prunable_parameters(self.model, args.prune_include, args.prune_exclude),
            options=options or ScoringOptions(args.alpha, args.beta, args.temperature, args.normalize_logits),
            aggregation=args.score_aggregation,
            ema_momentum=args.ema_momentum,
            bn_mode=args.scoring_bn_mode,
            all_reduce=self._all_reduce_sum(),
            seed=args.seed,
            progress=self.is_world_process_zero() and not args.disable_tqdm,
            total=None if batches is None else len(batches),
        )

    def _all_reduce_sum(self):
        return (lambda t: self.accelerator.reduce(t, "sum")) if self.accelerator.num_processes > 1 else None

    def recalibrate_batchnorm(self) -> int:
        """Re-estimate BatchNorm running statistics on `recalibration_samples` calibration images (see
        `hf_tgprune.recalibration`); returns the number of images this process forwarded (0 without BatchNorm)."""
        if not batchnorm_layers(self.model):
            return 0
        batches = self.get_calibration_dataloader(num_samples=self.args.recalibration_samples)
        return recalibrate_batchnorm(
            self.model,
            batches,
            all_reduce=self._all_reduce_sum(),
            progress=self.is_world_process_zero() and not self.args.disable_tqdm,
            total=len(batches),
        )

    def compute_masks(self) -> dict[str, torch.Tensor]:
        """Masks at `sparsity` from `pruning_rounds` scoring passes (one-shot when 1).

        Round r of k scores the current (already partly pruned) weights, prunes to `1 - (1 - sparsity)^(r/k)` and,
        before the next round, applies the mask and recalibrates BatchNorm. Weights that are already zero are pruned
        first, so the masks are nested and the final count is exact.
        """
        args = self.args
        params = prunable_parameters(self.model, args.prune_include, args.prune_exclude)
        levels = imp_sparsities(args.sparsity, args.pruning_rounds) if args.sparsity > 0 else [0.0]
        masks = None
        for index, level in enumerate(levels):
            if masks is not None:
                apply_masks(self.model, masks)
                self.recalibrate_batchnorm()
            scores = self.compute_scores()
            masks = select_masks(
                scores,
                level,
                min_density=min_layer_density_for(level, args.min_layer_density, args.layer_density_floor),
                allocation=args.layer_allocation,
                weights=params,
            )
            del scores
            if len(levels) > 1:
                logger.info("Pruning round %d/%d: sparsity %.4f", index + 1, len(levels), level)
        return masks

    def prune(self) -> dict:
        """Score once, apply one global mask, install the mask callback; returns the sparsity report.

        When `pruning_method` names a registered pruning schedule (`hf_tgprune.schedules`: 'epsd', 'dg2pf', 'imp'),
        the schedule's `setup` runs instead: it prunes (now or during training), installs its own mask callback and
        possibly its own loss, and returns the report.
        """
        if self.masks is not None:
            return self.pruning_report
        schedule = get_pruning_schedule(self.args.pruning_method)
        if schedule is not None:
            start = time.perf_counter()
            report = schedule.setup(self)
            report["pruning_seconds"] = time.perf_counter() - start
            self.pruning_report = report
            return report
        start = time.perf_counter()
        masks = self.compute_masks()
        scoring_seconds = time.perf_counter() - start
        self._install_masks(masks)
        recalibrated = self.recalibrate_batchnorm() if self.args.recalibrate_bn else 0
        self.pruning_report.update(
            scoring_seconds=scoring_seconds,
            pruning_rounds=self.args.pruning_rounds,
            layer_allocation=self.args.layer_allocation,
            bn_recalibration_images=recalibrated,
        )
        return self.pruning_report

    def _install_masks(self, masks: dict[str, torch.Tensor]) -> None:
        apply_masks(self.model, masks)
        self.masks = masks
        for callback in list(self.callback_handler.callbacks):
            if isinstance(callback, GlobalMaskCallback):
                self.callback_handler.remove_callback(callback)
        if any(not bool(mask.all()) for mask in masks.values()):
            self.add_callback(GlobalMaskCallback(masks))
        if not masks:  # `masks={}`: dense training (e.g. a teacher or a warm-up), nothing pruned, nothing to report
            self.pruning_report = None
            return
        report = sparsity_report(self.model, masks)
        report.update(
            method=self.args.pruning_method,
            target_sparsity=self.args.sparsity,
            mask_sha256=mask_hash(masks),
        )
        self.pruning_report = report
        logger.info(
            "Pruned %s: %.4f sparsity over prunable weights, %.4f over all parameters (mask %s)",
            report["method"],
            report["prunable"]["sparsity"],
            report["total"]["sparsity"],
            report["mask_sha256"][:12],
        )

    # --- checkpoint state ---------------------------------------------------------------------------------------
    def save_pruning_state(self, checkpoint_dir: str) -> None:
        """Write the masks into a checkpoint folder (the one writer of `masks.safetensors`).

        Called while the checkpoint's model is saved, so a checkpoint never counts as written (its
        `trainer_state.json` comes later) without its masks. The file carries the mask hash and the target sparsity
        that resume verifies.
        """
        if self.masks is None or not self.args.should_save:
            return
        save_masks(
            self.masks,
            os.path.join(checkpoint_dir, MASKS_NAME),
            {"target_sparsity": repr(float(self.args.sparsity)), "pruning_method": str(self.args.pruning_method)},
        )

    def load_pruning_state(self, checkpoint_dir: str) -> None:
        """Restore and verify the masks of a checkpoint written by `save_pruning_state`."""
        mask_file = os.path.join(checkpoint_dir, MASKS_NAME)
        if not os.path.isfile(mask_file):
            raise ValueError(
                f"{checkpoint_dir!r} has no {MASKS_NAME}: it was not written by TeacherGuidedPruningTrainer, so its "
                "masks cannot be restored. Resume from one of its own checkpoints."
            )
        recorded = read_masks_metadata(mask_file).get("target_sparsity")
        if recorded is not None and abs(float(recorded) - self.args.sparsity) > 1e-12:
            raise ValueError(
                f"{checkpoint_dir!r} was trained at sparsity={float(recorded)}, but this run asks for sparsity="
                f"{self.args.sparsity}. Resume with the checkpoint's sparsity, or start a new run in another "
                "output_dir."
            )
        self._install_masks(load_masks(mask_file))

    def _checkpoint_to_resume(self, resume_from_checkpoint: str | bool) -> str:
        """The checkpoint folder to resume from: the given one, or for `True` the newest *complete* checkpoint of
        `output_dir` (its `trainer_state.json` written, so its model, masks and optimizer state are there)."""
        if resume_from_checkpoint is not True:
            if not os.path.isdir(resume_from_checkpoint):
                raise ValueError(f"resume_from_checkpoint={resume_from_checkpoint!r} is not a folder.")
            return resume_from_checkpoint
        folders = []
        if os.path.isdir(self.args.output_dir):
            for name in os.listdir(self.args.output_dir):
                step = name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
                if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and step.isdigit():
                    folders.append((int(step), os.path.join(self.args.output_dir, name)))
        for _step, folder in sorted(folders, reverse=True):
            if os.path.isfile(os.path.join(folder, "trainer_state.json")):
                if os.path.isfile(os.path.join(folder, MASKS_NAME)):
                    return folder
            logger.warning("Skipping the incomplete checkpoint %s (interrupted while it was written).", folder)
        raise ValueError(f"No complete checkpoint to resume from in output_dir={self.args.output_dir!r}.")

    # --- training -----------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Prune first if needed (or restore the checkpoint's masks when resuming), then train sparsely."""
        if resume_from_checkpoint:
            checkpoint = self._checkpoint_to_resume(resume_from_checkpoint)
            self.load_pruning_state(checkpoint)
            resume_from_checkpoint = checkpoint
        elif self.masks is None:
            self.prune()
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`alpha·T²·CAKLD + (1-alpha)·CE` against the frozen teacher when `retrain_with_kd`, plain CE otherwise."""
        if self.schedule_loss is not None:
            return self.schedule_loss(self, model, inputs, return_outputs)
        pixel_values, labels = inputs["pixel_values"], inputs["labels"]
        logits = forward_logits(model, pixel_values)
        args = self.args
        if args.retrain_with_kd and self.teacher_model is not None:
            with torch.no_grad():
                teacher_logits = forward_logits(self.teacher_model, pixel_values)
            loss = teacher_guided_loss(
                logits,
                teacher_logits,
                labels,
                alpha=args.alpha,
                beta=args.beta,
                temperature=args.temperature,
                normalize=args.normalize_logits,
            )
        else:
            loss = F.cross_entropy(logits.float(), labels)
        return (loss, {"logits": logits}) if return_outputs else loss
