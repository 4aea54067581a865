"""`TeacherGuidedPruningTrainer`: one scoring pass, one global mask, sparse retraining with KD.

The trainer composes a `hf_tgprune.Pruner` (`trainer.pruner`: the settings, the method, the masks, the report and
the checkpoint's pruning state) and overrides only the Trainer hooks it needs: `train` (prune first, or restore the
pruning state when resuming), `compute_loss` (distillation) and `get_train_dataloader` (no single-image BatchNorm
batch); saving, checkpoint loading and Hub pushes are `SparseCheckpointMixin`'s (`hf_tgprune.training.checkpointing`).
"""

from __future__ import annotations

import errno
import logging
import math
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, has_length

from ..core.adapters import forward_logits
from ..core.adapters import teacher_logits as forward_teacher
from ..core.losses import check_finite_logits, teacher_guided_loss
from ..core.scoring import ScoringOptions
from ..data.collate import batchnorm_needs_drop_last, collate_fn
from ..io.serialization.pruning_state import PRUNING_STATE_NAME
from ..io.serialization.sharded_state import SHARDED_STATE_NAME
from ..pruning.config import TeacherGuidedPruningConfig
from ..pruning.pruner import Pruner
from .checkpointing import SparseCheckpointMixin

logger = logging.getLogger(__name__)


def planned_optimizer_steps(args, num_examples: int) -> int:
    """The optimizer steps of training `args` on `num_examples` examples, counted as the Trainer counts them:
    `max_steps` if set, else the epochs times ⌈batches per process / gradient_accumulation_steps⌉, with
    ⌈⌈num_examples / per_device_train_batch_size⌉ / world_size⌉ batches per process (⌊·⌋ with
    `dataloader_drop_last`). The trainer may drop one single-image batch per epoch, so this is at most one step per
    epoch more than the run takes."""
    if args.max_steps > 0:
        return args.max_steps
    rounding = math.floor if args.dataloader_drop_last else math.ceil
    batches = math.ceil(rounding(num_examples / args.per_device_train_batch_size) / args.world_size)
    per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def _disk_full(error: BaseException) -> bool:
    """Whether a write failed for want of space (torch reports it as a position mismatch of its zip writer)."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    text = str(error)
    return "No space left on device" in text or "unexpected pos" in text


class TeacherGuidedPruningTrainer(SparseCheckpointMixin, Trainer):
    """A `transformers.Trainer` that prunes the student guided by a frozen teacher and retrains it sparsely with
    knowledge distillation: by default (`pruning_method="gradual"`) during that retraining, by the Fisher of the
    teacher-guided loss; with a one-shot method (`"tgp_fisher"`, `"magnitude"`, ...) once, before it.

    The one-shot method of [Teacher-Guided One-Shot Pruning via Context-Aware Knowledge
    Distillation](https://huggingface.co/papers/2511.16653) (Alim et al., IEEE BigData 2025); the seed baselines EPSD,
    DG2PF and IMP run through the same trainer (`pruning_method`).

    Example:
        >>> trainer = TeacherGuidedPruningTrainer(model=student, teacher_model=teacher, args=config,
        ...                                       train_dataset=train, eval_dataset=val)
        >>> trainer.train()            # prunes as it trains (gradual); one-shot methods prune first
        >>> report = trainer.pruner.report

    `masks=` installs given masks instead of scoring (e.g. masks from an earlier run), with a one-shot
    `pruning_method` (any: the masks are kept as given). To train without pruning
    (a teacher, or a KD warm-up of the student) with the same loss and data handling, use `pruning_method="dense"`.
    The pruning method (`args.pruning_method`, `hf_tgprune.methods`) is `trainer.method`.
    """

    _tag_names = ["hf_tgprune", "pruning", "knowledge-distillation"]
    _paper = {"title": "Teacher-Guided One-Shot Pruning via Context-Aware Knowledge Distillation", "id": "2511.16653"}

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
        data_collator = data_collator if data_collator is not None else collate_fn  # also (x, y) tuples
        # validates everything before the Trainer is set up (and installs given masks)
        self.pruner = Pruner(
            model,
            args,
            teacher=teacher_model,
            calibration_dataset=calibration_dataset,
            train_dataset=train_dataset,
            masks=masks,
            collate_fn=data_collator,
        )
        if train_dataset is not None and has_length(train_dataset):  # a schedule too short for the run, before it
            self.pruner.method.check_steps(planned_optimizer_steps(args, len(train_dataset)))
        if teacher_model is None and self.pruner.method.needs_teacher(args):
            raise ValueError(
                "retrain_with_kd=True needs a `teacher_model`; pass one, or set alpha=0 to prune and retrain without a "
                "teacher (cross-entropy only), or retrain_with_kd=False."
            )
        if self.pruner.mesh is not None:
            # sharded with fully_shard before the Trainer: the Trainer's path for models sharded at load time places
            # and wraps nothing (no DDP around DTensors, no second sharding) and saves from every process
            model.is_distributed_loading_by_transformers = True
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
        if self.is_fsdp_enabled and self.pruner.mesh is None:
            self._shard_with_accelerate(model, teacher_model)
        if teacher_model is not None:
            self.teacher_model = (
                teacher_model
                if self.is_fsdp_enabled
                else self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
            )
        accelerator = self.accelerator
        pruner = self.pruner
        pruner.teacher = self.teacher_model
        if pruner.mesh is None:  # a sharded model's pruner reduces over the shards' own mesh
            pruner.rank, pruner.world_size = accelerator.process_index, accelerator.num_processes
            pruner.all_reduce = (lambda t: accelerator.reduce(t, "sum")) if accelerator.num_processes > 1 else None
        pruner.num_workers, pruner.pin_memory = args.dataloader_num_workers, args.dataloader_pin_memory
        pruner.progress = self.is_world_process_zero() and not args.disable_tqdm
        self._mask_callbacks_added = False
        self._add_mask_callbacks()

    def _shard_with_accelerate(self, model: nn.Module, teacher_model: nn.Module | None) -> None:
        """accelerate's FSDP plugin (`fsdp_version: 2`) shards the model when training starts, after pruning; shard
        the student (and the teacher) here instead, with the plugin's own settings, so that scoring, thresholding and
        masks work on local shards from the start (the Trainer leaves a model that is already sharded as it is)."""
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        if not self.accelerator.is_fsdp2:
            raise ValueError(
                "hf_tgprune prunes models sharded with FSDP2; accelerate's FSDP plugin is configured with "
                "fsdp_version 1. Set fsdp_version: 2 in the accelerate config (or fsdp_config={'version': 2})."
            )
        for network in (model, teacher_model):
            if network is None:
                continue
            # accelerate asks a transformers model for its input embeddings (to keep tied weights tied), which vision
            # models do not have: they raise NotImplementedError
            try:
                network.get_input_embeddings()
                no_embeddings = False
            except NotImplementedError:
                network.get_input_embeddings, no_embeddings = (lambda: None), True
            except AttributeError:
                no_embeddings = False
            fsdp2_prepare_model(self.accelerator, network)
            if no_embeddings:
                del network.get_input_embeddings
        self.pruner.follow_sharding()

    # --- the pruning state (owned by `self.pruner`) -----------------------------------------------------------------
    @property
    def method(self):
        """The pruning method (`args.pruning_method`, `hf_tgprune.methods`)."""
        return self.pruner.method

    @property
    def masks(self) -> dict[str, torch.Tensor] | None:
        """The masks now enforced (bool, True = kept), or None before pruning."""
        return self.pruner.masks

    @property
    def pruning_report(self) -> dict | None:
        """The pruning report (`Pruner.report`), or None before pruning."""
        return self.pruner.report

    def _add_mask_callbacks(self) -> None:
        """Add the pruner's mask callback (and the method's callbacks) once there is something to enforce: masks that
        prune, or a method that prunes during training."""
        pruner = self.pruner
        prunes = pruner.masks is not None and pruner.report["pruned_by_mask"] > 0  # counted over every shard
        if self._mask_callbacks_added or not (prunes or not pruner.method.one_shot):
            return
        self.add_callback(pruner.mask_callback)
        for callback in pruner.method.callbacks(pruner):
            self.add_callback(callback)
        self._mask_callbacks_added = True

    def prune(self, scores: Mapping[str, torch.Tensor] | None = None) -> dict | None:
        """Prune the student (`Pruner.prune`) and enforce its masks during training; returns the pruning report.

        Args:
            scores: importance scores already computed by `compute_scores()` on these same (dense) weights, so that one
                scoring pass serves several sparsities (one-shot methods with `pruning_rounds=1` only).
        """
        report = self.pruner.prune(scores)
        self._add_mask_callbacks()
        return report

    def compute_scores(
        self, method: str | None = None, options: ScoringOptions | None = None
    ) -> dict[str, torch.Tensor]:
        """The scoring pass (`Pruner.compute_scores`): float32 scores per prunable weight, all-reduced across ranks."""
        return self.pruner.compute_scores(method, options)

    def recalibrate_batchnorm(self) -> int:
        """Re-estimate BatchNorm running statistics (`Pruner.recalibrate_batchnorm`); returns the images forwarded."""
        return self.pruner.recalibrate_batchnorm()

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
            complete = os.path.isfile(os.path.join(folder, "trainer_state.json"))
            pruning_state = os.path.isfile(os.path.join(folder, PRUNING_STATE_NAME)) or os.path.isdir(
                os.path.join(folder, SHARDED_STATE_NAME)  # written shard by shard (FSDP2)
            )
            if complete and pruning_state:
                return folder
            logger.warning("Skipping the incomplete checkpoint %s (interrupted while it was written).", folder)
        raise ValueError(f"No complete checkpoint to resume from in output_dir={self.args.output_dir!r}.")

    def _finished_state(self, checkpoint: str) -> TrainerState | None:
        """The checkpoint's trainer state when it already holds this run's last step (resuming would train past
        `max_steps`), else None."""
        state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        if self.args.max_steps > 0:
            done = state.global_step >= self.args.max_steps
        else:
            done = state.num_train_epochs == self.args.num_train_epochs and 0 < state.max_steps <= state.global_step
        return state if done else None

    # --- Trainer hooks ----------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Prune first (the pruning must precede the optimizer and the training loop), or restore the checkpoint's
        pruning state when resuming; then train sparsely."""
        if resume_from_checkpoint:
            checkpoint = self._checkpoint_to_resume(resume_from_checkpoint)
            self.pruner.load_state(checkpoint)
            self._add_mask_callbacks()
            finished = self._finished_state(checkpoint)
            if finished is not None:  # a run killed after its last checkpoint: nothing left to train
                logger.info(
                    "%s finished this run's training (step %d): not training further.",
                    checkpoint,
                    finished.global_step,
                )
                self._load_from_checkpoint(checkpoint)
                self.state = finished
                loss = next((e["train_loss"] for e in reversed(finished.log_history) if "train_loss" in e), 0.0)
                return TrainOutput(finished.global_step, loss, {})
            resume_from_checkpoint = checkpoint
        else:
            self.prune()
        try:
            return super().train(
                resume_from_checkpoint=resume_from_checkpoint,
                trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval,
                **kwargs,
            )
        except (OSError, RuntimeError) as error:
            if not _disk_full(error):
                raise
            try:
                intact = f"the newest complete checkpoint is {self._checkpoint_to_resume(True)}"
            except ValueError:
                intact = "no complete checkpoint was written yet"
            raise OSError(
                errno.ENOSPC,
                f"The disk is full: a checkpoint in {self.args.output_dir} could not be written ({error}); {intact}. "
                "Free some space (or lower save_total_limit) and train again with resume_from_checkpoint=True.",
            ) from error

    def get_train_dataloader(self) -> DataLoader:
        """The Trainer's training loader, dropping an epoch's last batch when it would be a single image fed to a
        BatchNorm student (which cannot train on it); `dataloader_drop_last` would drop evaluation examples too."""
        args = self.args
        if args.dataloader_drop_last or not batchnorm_needs_drop_last(
            self.model, self.train_dataset, self._train_batch_size, args.world_size
        ):
            return super().get_train_dataloader()
        logger.warning(
            "train_dataset has %d examples: with a batch size of %d every epoch would end with a batch of one "
            "image, which BatchNorm cannot train on; that batch is dropped (dataloader_drop_last for training).",
            len(self.train_dataset),
            self._train_batch_size,
        )
        args.dataloader_drop_last = True
        try:
            return super().get_train_dataloader()
        finally:
            args.dataloader_drop_last = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The distillation loss `alpha·T²·CAKLD + (1-alpha)·CE` against the frozen teacher when `retrain_with_kd`,
        plain CE otherwise, or the method's own loss (EPSD, DG2PF)."""
        own = self.method.compute_loss(self.pruner, model, inputs)
        if own is not None:
            loss, logits = own
            return (loss, {"logits": logits}) if return_outputs else loss
        pixel_values, labels = inputs["pixel_values"], inputs["labels"]
        logits = forward_logits(model, pixel_values)
        args = self.args
        if args.retrain_with_kd and self.teacher_model is not None:
            with torch.no_grad():
                teacher_logits = forward_teacher(self.teacher_model, pixel_values)
            check_finite_logits(teacher_logits, "teacher", self.teacher_model)
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
