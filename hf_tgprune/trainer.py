"""`TeacherGuidedPruningTrainer`: one scoring pass, one global mask, sparse retraining with KD.

The trainer composes the library's modules and overrides only the hooks it needs:
`compute_loss` (distillation), `train` (prune first / restore masks on resume). Scoring lives in
`hf_tgprune.scoring`, masks in `hf_tgprune.masking`, enforcement in `hf_tgprune.callbacks`.
"""

from __future__ import annotations

import json
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

from .adapters import check_same_num_labels, forward_logits
from .callbacks import GlobalMaskCallback
from .checkpointing import SparseCheckpointMixin
from .config import TeacherGuidedPruningConfig, parse_nm_pattern
from .data.collate import batchnorm_needs_drop_last, check_labelled, collate_fn
from .data.splits import deterministic_sample
from .losses import check_finite_logits, teacher_guided_loss
from .masking import (
    MASKS_NAME,
    MaskFileError,
    apply_masks,
    as_bool_masks,
    load_masks,
    mask_hash,
    min_layer_density_for,
    prunable_parameters,
    prune_zeros_first,
    read_masks_metadata,
    save_masks,
    select_masks,
    sparsity_report,
)
from .methods import build_method, get_method
from .methods.imp import imp_sparsities
from .nm import nm_incompatible_layers, nm_masks
from .recalibration import batchnorm_layers, recalibrate_batchnorm
from .scoring import ScoringOptions, compute_importance_scores, get_scoring_method
from .utils import atomic_path, write_json_atomic

logger = logging.getLogger(__name__)

PRUNING_STATE_NAME = "pruning_state.json"
PRUNING_STATE_TENSORS = "pruning_state.safetensors"


def read_json(path: str):
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path!r} is truncated or corrupted ({err}); resume from an earlier checkpoint.") from err


def save_tensors_atomic(tensors: Mapping[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as err:  # safetensors' own error types for truncated files
        raise ValueError(f"{path!r} is truncated or corrupted ({err}); resume from an earlier checkpoint.") from err


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

    The method of [Teacher-Guided One-Shot Pruning via Context-Aware Knowledge
    Distillation](https://huggingface.co/papers/2511.16653) (Alim et al., IEEE BigData 2025); the seed baselines EPSD,
    DG2PF and IMP run through the same trainer (`pruning_method`).

    Example:
        >>> trainer = TeacherGuidedPruningTrainer(model=student, teacher_model=teacher, args=config,
        ...                                       train_dataset=train, eval_dataset=val)
        >>> report = trainer.prune()   # optional: train() prunes first
        >>> trainer.train()

    `masks=` installs given masks instead of scoring (e.g. masks from an earlier run). To train without pruning
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
        if masks is not None and not masks:
            raise ValueError(
                "masks={} no longer means dense training: pass pruning_method='dense' in the config instead."
            )
        method = build_method(args.pruning_method, args.pruning_method_args)
        self._validate_inputs(model, teacher_model, args, method, train_dataset, calibration_dataset, masks is None)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator if data_collator is not None else collate_fn,  # also (x, y) tuples
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
        self.method = method
        self.masks: dict[str, torch.Tensor] | None = None
        self.pruning_report: dict | None = None
        self._pruned = False
        if masks is not None:
            self.install_masks(as_bool_masks(masks))  # float/int 0/1 masks (torch.nn.utils.prune) become bool
            self._pruned = True

    # --- validation ---------------------------------------------------------------------------------------------
    @staticmethod
    def _validate_inputs(model, teacher, args, method, train_dataset, calibration_dataset, prunes=True) -> None:
        prunable_parameters(model, args.prune_include, args.prune_exclude)  # raises on patterns that match nothing
        if teacher is None and method.scoring_needs_teacher(args):
            raise ValueError(
                f"pruning_method={args.pruning_method!r} scores with a teacher: pass `teacher_model`, or choose a "
                "teacher-free method such as 'snip', 'magnitude' or 'random'."
            )
        if teacher is None and method.needs_teacher(args):
            raise ValueError("retrain_with_kd=True needs a `teacher_model`; pass one or set retrain_with_kd=False.")
        check_same_num_labels(model, teacher)
        scoring = method.needs_calibration_data()
        recalibration = (  # a data-free criterion (the default magnitude) still recalibrates BatchNorm on images
            prunes  # given masks are installed as they are
            and args.recalibrate_bn
            and method.one_shot
            and method.criterion is not None
            and args.sparsity > 0
            and bool(batchnorm_layers(model))
        )
        if not (scoring or recalibration):
            return
        source, argument = (
            (calibration_dataset, "calibration_dataset")
            if calibration_dataset is not None
            else (train_dataset, "train_dataset")
        )
        if source is None or len(source) == 0:
            fix = "" if scoring else ", or set recalibrate_bn=False to keep the dense model's BatchNorm statistics"
            raise ValueError(
                f"The calibration set is empty ({argument} has no examples). Pass a non-empty `calibration_dataset` "
                f"or `train_dataset`{fix}."
            )
        if not scoring:
            return  # recalibration only forwards images: no labels needed
        example = source[0]
        if isinstance(example, Mapping) and "labels" not in example and "label" not in example:
            raise ValueError(
                f"Calibration examples from `{argument}` have no labels (keys: {sorted(example)}); every example "
                "needs a `labels` (or `label`) entry next to `pixel_values`."
            )
        check_labelled(source, argument)  # partly labelled data, where cheap to see (else collate_fn, per batch)

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

        `method` / `options` override the method's criterion and the options built from the config (EPSD uses it).
        """
        args = self.args
        method_name = method or self.method.criterion
        if method_name is None:
            raise ValueError(f"pruning_method={args.pruning_method!r} scores no weights.")
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

    def prunable_parameters(self) -> dict[str, nn.Parameter]:
        """The weights this run prunes (`prune_include` / `prune_exclude`, default: conv/linear except the head)."""
        return prunable_parameters(self.model, self.args.prune_include, self.args.prune_exclude)

    def min_layer_density(self, sparsity: float) -> float:
        """Per-layer minimum density at `sparsity` (the layer-collapse guard of the config)."""
        return min_layer_density_for(sparsity, self.args.min_layer_density, self.args.layer_density_floor)

    def select_masks(self, scores: Mapping[str, torch.Tensor], sparsity: float | None = None) -> dict:
        """Masks from scores at `sparsity` (default `args.sparsity`): the config's layer allocation and guard,
        already-zero weights first, exactly `round(sparsity·N)` pruned."""
        sparsity = self.args.sparsity if sparsity is None else sparsity
        if self.args.sparsity_pattern != "unstructured":
            return self._nm_masks(scores)
        return select_masks(
            scores,
            sparsity,
            min_density=self.min_layer_density(sparsity),
            allocation=self.args.layer_allocation,
            weights=self.prunable_parameters(),
        )

    def _nm_masks(self, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n, m = parse_nm_pattern(self.args.sparsity_pattern)
        weights = self.prunable_parameters()
        dense = set(nm_incompatible_layers(weights, m))
        if dense:
            logger.warning(
                "sparsity_pattern=%r: %d layer(s) whose input size is not a multiple of %d stay dense: %s",
                self.args.sparsity_pattern, len(dense), m, sorted(dense),
            )  # fmt: skip
        ranked = prune_zeros_first({k: v for k, v in scores.items() if k not in dense}, weights)
        masks = nm_masks(ranked, n, m)
        masks.update({name: torch.ones_like(scores[name], dtype=torch.bool) for name in dense})
        return {name: masks[name] for name in scores}

    def compute_masks(self) -> dict[str, torch.Tensor]:
        """Masks at `sparsity` from `pruning_rounds` scoring passes of the method's criterion (one-shot when 1).

        Round r of k scores the current (already partly pruned) weights, prunes to `1 - (1 - sparsity)^(r/k)` and,
        before the next round, applies the mask and recalibrates BatchNorm. Weights that are already zero are pruned
        first, so the masks are nested and the final count is exact. The masks do not depend on `recalibrate_bn`:
        with `recalibrate_bn=False` the statistics the rounds re-estimated are put back afterwards, so that pruning
        leaves them as they were.
        """
        args = self.args
        levels = imp_sparsities(args.sparsity, args.pruning_rounds) if args.sparsity > 0 else [0.0]
        layers = list(batchnorm_layers(self.model).values()) if len(levels) > 1 and not args.recalibrate_bn else []
        saved = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in layers]
        masks = None
        for index, level in enumerate(levels):
            if masks is not None:
                apply_masks(self.model, masks)
                self.recalibrate_batchnorm()
            scores = self.compute_scores(method=self.method.criterion)
            masks = self.select_masks(scores, level)
            del scores
            if len(levels) > 1:
                logger.info("Pruning round %d/%d: sparsity %.4f", index + 1, len(levels), level)
        for layer, state in zip(layers, saved):
            layer.load_state_dict(state)
        return masks

    def prune(self, scores: Mapping[str, torch.Tensor] | None = None) -> dict | None:
        """Prune with `args.pruning_method` (`trainer.method`) and install the mask callback; returns the report.

        One-shot methods score once (or `pruning_rounds` times), apply one mask and recalibrate BatchNorm
        (`recalibrate_bn`). Methods that prune during training (`epsd`, `dg2pf`, `imp`) install their initial masks
        (if any) and callbacks here. Calling it again returns the same report.

        Args:
            scores: importance scores already computed by `compute_scores()` on these same (dense) weights. One-shot
                scores do not depend on the target, so one scoring pass can serve several sparsities (one trainer
                per sparsity, each on a copy of the dense model). One-shot methods with `pruning_rounds=1` only.
        """
        if self._pruned:
            return self.pruning_report
        if scores is not None and not (self.method.one_shot and self.args.pruning_rounds == 1):
            raise ValueError(
                "prune(scores=...) reuses one scoring pass, which only one-shot methods with pruning_rounds=1 can "
                f"do (pruning_method={self.args.pruning_method!r}, pruning_rounds={self.args.pruning_rounds}). Call "
                "prune() without scores."
            )
        self._pruned = True
        start = time.perf_counter()
        masks = self.select_masks(scores) if scores is not None else self.method.prune(self)
        for callback in self.method.callbacks(self):
            self.add_callback(callback)
        if masks is None:
            return self.pruning_report
        self.install_masks(masks)
        seconds = time.perf_counter() - start
        if self.method.one_shot:
            recalibrated = self.recalibrate_batchnorm() if self.args.recalibrate_bn else 0
            self.pruning_report.update(
                scoring_seconds=seconds,
                pruning_rounds=self.args.pruning_rounds,
                layer_allocation=self.args.layer_allocation,
                bn_recalibration_images=recalibrated,
            )
        else:
            self.pruning_report["pruning_seconds"] = seconds
        return self.pruning_report

    def install_masks(self, masks: Mapping[str, torch.Tensor], started: bool = False) -> None:
        """Zero the pruned weights and enforce `masks` from now on (replacing any earlier mask callback).

        Args:
            masks: bool tensors keyed by parameter name, True = kept.
            started: True when called during training (e.g. a method that prunes after a warm-up): the callback
                starts masking gradients and optimizer state at once instead of at `on_train_begin`.
        """
        masks = dict(masks)
        apply_masks(self.model, masks)
        self.masks = masks
        for callback in list(self.callback_handler.callbacks):
            if isinstance(callback, GlobalMaskCallback):
                self.callback_handler.remove_callback(callback)
        callback = self.method.mask_callback(self, masks)
        if callback is None and any(not bool(mask.all()) for mask in masks.values()):
            callback = GlobalMaskCallback(masks)
        if callback is not None:
            self.add_callback(callback)
            if started:
                callback.start(self.model, self.optimizer)
        self.masks_changed(masks, finished=getattr(callback, "finished", None))

    def masks_changed(self, masks: Mapping[str, torch.Tensor], finished: bool | None) -> None:
        """Record new masks (called by mask callbacks whose masks change during training) and update the report.

        Args:
            masks: the masks now enforced.
            finished: whether the method's schedule is complete (None for methods without a schedule).
        """
        self.masks = dict(masks)
        report = sparsity_report(self.model, masks)
        report.update(
            method=self.args.pruning_method,
            target_sparsity=self.args.sparsity,
            mask_sha256=mask_hash(masks),
        )
        if finished is not None:
            report["schedule_finished"] = finished
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
        """Write what resuming needs into a checkpoint folder: the one writer of `masks.safetensors`.

        Called while the checkpoint's model is saved (before the Trainer writes `trainer_state.json`, which marks a
        checkpoint complete). Writes the masks (with their hash), the method's state (`pruning_state.safetensors`
        for tensors, e.g. DG2PF's dense weights under the mask) and, last, `pruning_state.json` with the method,
        its settings, the target sparsity and the mask hash; every file is written atomically.
        """
        if not self.args.should_save:
            return
        state = dict(self.method.state_dict())
        tensors = state.pop("tensors", None) or {}
        record = {
            "format_version": 1,
            "pruning_method": self.args.pruning_method,
            "pruning_method_args": self.method.config.to_dict(),
            "target_sparsity": float(self.args.sparsity),
            "mask_sha256": None,
            "method_state": state,
            "method_tensors": sorted(tensors),
        }
        if self.masks is not None:
            record["mask_sha256"] = mask_hash(self.masks)
            save_masks(
                self.masks,
                os.path.join(checkpoint_dir, MASKS_NAME),
                {"target_sparsity": repr(float(self.args.sparsity)), "pruning_method": str(self.args.pruning_method)},
            )
        if tensors:
            save_tensors_atomic(tensors, os.path.join(checkpoint_dir, PRUNING_STATE_TENSORS))
        write_json_atomic(record, os.path.join(checkpoint_dir, PRUNING_STATE_NAME))

    def load_pruning_state(self, checkpoint_dir: str) -> None:
        """Restore and verify what `save_pruning_state` wrote, and let the method continue from it.

        Refuses (with a message naming the fix) a checkpoint of another method or target sparsity, masks whose
        content does not match their recorded hash, and truncated files.
        """
        record_file = os.path.join(checkpoint_dir, PRUNING_STATE_NAME)
        mask_file = os.path.join(checkpoint_dir, MASKS_NAME)
        if os.path.isfile(record_file):
            record = read_json(record_file)
        elif os.path.isfile(mask_file):  # written by hf_tgprune 0.1: fixed masks only
            recorded = read_masks_metadata(mask_file).get("target_sparsity")
            record = {"pruning_method": self.args.pruning_method, "method_state": {}, "method_tensors": []}
            record["target_sparsity"] = float(recorded) if recorded is not None else self.args.sparsity
        else:
            raise ValueError(
                f"{checkpoint_dir!r} has no {MASKS_NAME} or {PRUNING_STATE_NAME}: it was not written by "
                "TeacherGuidedPruningTrainer, so its masks cannot be restored. Resume from one of its own checkpoints."
            )
        if record["pruning_method"] != self.args.pruning_method and not (
            self.method.one_shot and get_method(record["pruning_method"]).one_shot
        ):  # one-shot masks are fixed, whichever criterion made them; a schedule's state belongs to its method
            raise ValueError(
                f"{checkpoint_dir!r} was written by a pruning_method={record['pruning_method']!r} run, but this run "
                f"uses pruning_method={self.args.pruning_method!r}. Resume with the checkpoint's method, or start a "
                "new run in another output_dir."
            )
        if abs(float(record["target_sparsity"]) - self.args.sparsity) > 1e-12:
            raise ValueError(
                f"{checkpoint_dir!r} was trained at sparsity={float(record['target_sparsity'])}, but this run asks for "
                f"sparsity={self.args.sparsity}. Resume with the checkpoint's sparsity, or start a new run in another "
                "output_dir."
            )
        masks = None
        if os.path.isfile(mask_file):
            masks = load_masks(mask_file)
            if record.get("mask_sha256") not in (None, mask_hash(masks)):
                raise MaskFileError(
                    f"The masks in {mask_file!r} are not the ones this checkpoint recorded in {PRUNING_STATE_NAME} "
                    "(the file was replaced). Resume from an earlier checkpoint or prune again."
                )
        elif record.get("mask_sha256") is not None:
            raise MaskFileError(f"{checkpoint_dir!r} recorded masks but {MASKS_NAME} is missing; resume from another.")
        state = dict(record.get("method_state") or {})
        if record.get("method_tensors"):
            state["tensors"] = load_tensors(os.path.join(checkpoint_dir, PRUNING_STATE_TENSORS))
        self.method.load_state_dict(state)
        self.method.resume(self, masks)
        self._pruned = True

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
                if os.path.isfile(os.path.join(folder, PRUNING_STATE_NAME)) or os.path.isfile(
                    os.path.join(folder, MASKS_NAME)
                ):
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
        else:
            self.prune()
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def get_train_dataloader(self) -> DataLoader:
        """The Trainer's training loader; it drops an epoch's last batch when that batch would be a single image
        fed to a BatchNorm student (which cannot train on it). Evaluation loaders keep every example."""
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
        """`alpha·T²·CAKLD + (1-alpha)·CE` against the frozen teacher when `retrain_with_kd`, plain CE otherwise."""
        own = self.method.compute_loss(self, model, inputs)
        if own is not None:
            loss, logits = own
            return (loss, {"logits": logits}) if return_outputs else loss
        pixel_values, labels = inputs["pixel_values"], inputs["labels"]
        logits = forward_logits(model, pixel_values)
        args = self.args
        if args.retrain_with_kd and self.teacher_model is not None:
            with torch.no_grad():
                teacher_logits = forward_logits(self.teacher_model, pixel_values)
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
