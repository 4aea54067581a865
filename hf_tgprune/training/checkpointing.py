"""Trainer integration of sparse saving, model cards and Hub pushes.

`SparseCheckpointMixin` goes before `transformers.Trainer` in the bases of `TeacherGuidedPruningTrainer` and
overrides the Trainer's saving and checkpoint-loading hooks only:

* ``_save`` (every ``save_model()`` output and every checkpoint) writes the folder with
  :func:`hf_tgprune.io.serialization.save_sparse_model`: ``model.safetensors`` that plain timm/transformers load,
  ``config.json`` (+ the preprocessing in ``trainer.sparse_info.data_config``), ``sparsity.json``. A
  ``save_model()`` output is swapped in all-or-nothing (the folder's other files are kept); a checkpoint is written
  in place (the other ranks write their RNG states into it meanwhile) and counts once ``trainer_state.json`` is.
  ``args.save_format="bitmask"`` applies to ``save_model()`` outputs; Trainer checkpoints (``checkpoint-*``) stay
  dense and keep the exact training state, so that ``resume_from_checkpoint`` and ``load_best_model_at_end``
  work; a checkpoint's pruning state (``pruning_state.safetensors``, :meth:`hf_tgprune.Pruner.save_state`) is
  written inside ``_save``, before the Trainer marks the checkpoint complete.
* ``_push_from_checkpoint`` (``hub_strategy`` pushes during training): the Trainer's own version copies the
  checkpoint's weights into ``output_dir`` and uploads whatever is there, which would publish the training state
  without its ``sparsity.json`` (or next to a stale one). Here ``output_dir`` is re-written as a sparse folder from
  the checkpoint, then uploaded (and the checkpoint itself for ``checkpoint`` / ``all_checkpoints``).
* ``_load_from_checkpoint`` / ``_load_best_model`` (resume, ``load_best_model_at_end``) read a checkpoint's weights
  strictly through the model's adapter: the Trainer's own loaders read ``model.safetensors`` with
  ``load_state_dict(strict=False)`` under the names on disk, which in transformers 5 silently skips every renamed
  tensor (ViT, DeiT, BEiT, Dinov2, Swin, ...). The weights are verified against the checkpoint's ``sparsity.json``
  (file size and SHA-256, per-layer counts, mask hash) and its pruning state (:func:`check_checkpoint_masks`)
  before training goes on.
* ``create_model_card`` writes the hf_tgprune card from the folder's ``sparsity.json``; ``init_hf_repo`` and
  ``push_to_hub`` upload through :mod:`hf_tgprune.io.hub`, which uploads exactly the files of the sparse folder and
  turns every failure into one :class:`hf_tgprune.io.hub.HubPushError` naming the fix. Pushes during training log the
  error and training goes on (the checkpoint is on disk); ``push_to_hub()`` raises it. Uploads are synchronous.

What ``sparsity.json`` and the card record besides the measured sparsity (dataset, metrics, the preprocessing used)
goes in ``trainer.sparse_info`` (:class:`SparseModelInfo`) before saving.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, SaveStrategy

from ..core.adapters import model_name, unwrap_model
from ..core.dtensor import full_masks_on_rank_zero, full_state_dict_on_rank_zero, load_full_state_dict, on_rank_zero
from ..io import hub
from ..io.modelcard import InferenceSpeed, inference_record
from ..io.serialization import (
    SPARSITY_FILE_NAME,
    SparseFormatError,
    load_sparse,
    read_model_state_dict,
    read_sparsity_record,
    save_sparse_model,
)
from ..pruning.pruner import Pruner

logger = logging.getLogger(__name__)

# Config fields recorded as the method's hyperparameters (those missing from the args are skipped).
HYPERPARAMETER_FIELDS = (
    "sparsity",
    "pruning_method",
    "pruning_method_args",
    "alpha",
    "beta",
    "temperature",
    "normalize_logits",
    "score_aggregation",
    "ema_momentum",
    "num_calibration_samples",
    "calibration_batch_size",
    "scoring_bn_mode",
    "scoring_epochs",
    "pruning_rounds",
    "layer_allocation",
    "recalibrate_bn",
    "recalibration_samples",
    "sparsity_pattern",
    "prune_include",
    "prune_exclude",
    "mask_standardized_kernels",
    "kernel_mask_statistics",
    "min_layer_density",
    "layer_density_floor",
    "retrain_with_kd",
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "optim",
    "weight_decay",
    "lr_scheduler_type",
    "warmup_steps",
    "seed",
)


@dataclass
class SparseModelInfo:
    """What a saved folder records next to its measured sparsity (``sparsity.json`` and the model card).

    Args:
        dataset: the dataset the model was trained on (a Hub id or a name; a local path is written as its folder
            name).
        base_model: the model that was pruned; default: the student's name (Hub id or timm architecture).
        teacher: the teacher; default: the teacher model's name.
        dense_metrics: evaluation metrics of the dense model before pruning.
        pruned_metrics: evaluation metrics of the pruned model; default: the latest ``eval_*`` metrics logged.
        data_config: the preprocessing the model was trained and evaluated with (``hf_tgprune.data.DataConfig``
            or a dict with ``image_size``, ``mean``, ``std``, ``interpolation``); written into the folder
            (timm ``pretrained_cfg``, transformers ``preprocessor_config.json``) so the model loads with it.
        inference: measured inference speed, dense vs ``export_sparse_inference``
            (:class:`hf_tgprune.io.modelcard.InferenceSpeed`); written to ``sparsity.json`` as ``inference`` and shown
            in the model card's "Inference speed" section.
        extra: more JSON-able fields for ``sparsity.json``.
    """

    dataset: str | None = None
    base_model: str | None = None
    teacher: str | None = None
    dense_metrics: dict[str, float] = field(default_factory=dict)
    pruned_metrics: dict[str, float] = field(default_factory=dict)
    data_config: Any = None
    inference: InferenceSpeed | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def check_checkpoint_masks(folder: str | os.PathLike, model, masks=None) -> None:
    """Refuse a checkpoint whose weights do not belong with its masks (its pruning state, when it has one).

    Its ``sparsity.json`` records the hash of the masks the weights were saved with, and how many weights were
    non-zero where those masks prune (0 for fixed masks, which keep pruned weights at exactly zero). The pruning
    state's masks must have that hash, and `model` (just loaded from the checkpoint) that many non-zero pruned weights.

    Args:
        folder: the checkpoint.
        model: the model its weights were just loaded into (sharded by FSDP2 or not).
        masks: the checkpoint's masks already read and verified (`Pruner.load_state`; sharded ones from
            ``pruning_state_sharded/``, when every process must call this); default: read from its pruning state.

    Raises:
        MaskFileError: the pruning state is unreadable, or its masks belong to other weights.
        SparseFormatError: a pruned weight is non-zero (naming the layers).
    """
    from ..core.dtensor import local
    from ..core.masking import MaskFileError, mask_hash, summed_over_shards
    from ..io.serialization.pruning_state import PRUNING_STATE_NAME, checkpoint_masks

    folder = Path(folder)
    masks = checkpoint_masks(folder) if masks is None else masks
    if masks is None:
        return
    record = read_sparsity_record(folder)
    recorded = (record.get("mask") or {}).get("sha256")
    if recorded is not None and recorded != mask_hash(masks):
        raise MaskFileError(
            f"The pruning state of {folder} does not hold the masks that its weights were saved "
            f"with (their {SPARSITY_FILE_NAME} records the mask hash {recorded[:12]}...): the files come from different "
            "saves. Resume from an earlier checkpoint or prune again."
        )
    params = dict(model.named_parameters())
    names = [name for name in masks if name in params]
    counts = summed_over_shards(  # over every process's rows when sharded
        [int((local(params[n]).detach()[~local(masks[n]).to(local(params[n]).device)] != 0).sum()) for n in names],
        [params[n] for n in names],
    )
    nonzero = {name: int(count) for name, count in zip(names, counts.tolist()) if count}
    allowed = (record.get("sparsity") or {}).get("nonzero_outside_mask") or 0
    if sum(nonzero.values()) != allowed:
        layers = ", ".join(f"{name} ({count})" for name, count in list(nonzero.items())[:5])
        raise SparseFormatError(
            f"{folder / record.get('weights_file', 'model.safetensors')}: {sum(nonzero.values())} weights that "
            f"{PRUNING_STATE_NAME} prunes are non-zero (in {layers or 'no layer'}), but the checkpoint was saved with "
            f"{allowed}: its weights were modified after saving. Resume from an earlier checkpoint."
        )


def _enum_value(value: Any) -> Any:
    return getattr(value, "value", value)


class SparseCheckpointMixin:
    """Sparse saving, model card and Hub push for `TeacherGuidedPruningTrainer` (before `transformers.Trainer` in its
    bases): reads the trainer's `pruner` (masks, method, report) and `args` (a `TeacherGuidedPruningConfig`)."""

    pruner: Pruner

    def __init__(self, *args, **kwargs):
        self.sparse_info = SparseModelInfo()
        self.hub_push_errors: list[hub.HubPushError] = []  # failed pushes during training
        self.hub_model_id: str | None = None  # set by init_hf_repo
        super().__init__(*args, **kwargs)

    # --- what sparsity.json records ------------------------------------------------------------------------------
    def _calibration_size(self) -> int | None:
        """Images the scoring pass and BatchNorm recalibration drew on; None for methods that use none (`gradual`,
        `imp`, `dg2pf` prune by the weights or the training gradients)."""
        pruner = self.pruner
        if not (pruner.method.one_shot or pruner.method.needs_calibration_data()):
            return None
        source = pruner.calibration_dataset if pruner.calibration_dataset is not None else pruner.train_dataset
        limit = self.args.num_calibration_samples
        try:
            size = len(source)
        except TypeError:
            return None
        return min(size, limit) if limit else size

    def _latest_eval_metrics(self) -> dict[str, Any]:
        for entry in reversed(self.state.log_history or []):
            metrics = {k: v for k, v in entry.items() if k.startswith("eval_") and isinstance(v, (int, float))}
            if metrics:
                return metrics
        return {}

    def sparse_record_metadata(self) -> dict[str, Any]:
        """The fields ``sparsity.json`` records next to the measured sparsity (from the args and `sparse_info`)."""
        args, info = self.args, self.sparse_info
        hyperparameters = {name: _enum_value(getattr(args, name)) for name in HYPERPARAMETER_FIELDS}
        # the method's settings with their defaults filled in
        hyperparameters["pruning_method_args"] = self.pruner.method.config.to_dict()
        metrics = {}
        if info.dense_metrics:
            metrics["dense"] = dict(info.dense_metrics)
        pruned = info.pruned_metrics or self._latest_eval_metrics()
        if pruned:
            metrics["pruned"] = dict(pruned)
        metadata = {
            "method": args.pruning_method,
            "one_shot": self.pruner.method.one_shot,
            "target_sparsity": args.sparsity,
            "hyperparameters": hyperparameters,
            "base_model": info.base_model or model_name(self.model),
            "teacher": info.teacher or model_name(self.pruner.teacher),
            "calibration_size": self._calibration_size(),
            "dataset": info.dataset,
            "metrics": metrics,
            "global_step": self.state.global_step,
        }
        report = self.pruner.report or {}
        if "scoring_seconds" in report:
            metadata["scoring_seconds"] = report["scoring_seconds"]
        if report.get("computed_dense_layers"):  # stored sparse, computed dense: say so next to the sparsity
            metadata["computed_dense_layers"] = report["computed_dense_layers"]
        if info.inference is not None:
            metadata["inference"] = inference_record(info.inference)
        metadata.update(info.extra)
        return metadata

    # --- saving -------------------------------------------------------------------------------------------------
    def _write_sparse_folder(
        self, output_dir: str | os.PathLike, state_dict: dict | None, checkpoint: bool, masks: dict | None = None
    ) -> None:
        """One writer of sparse folders: a checkpoint (dense, the exact training state) or an output folder
        (``args.save_format``, pruned weights zeroed). `masks`: the full masks when the pruner's are sharded."""
        processor = self.processing_class
        # written into the new folder before the model's files (an explicit `sparse_info.data_config` overrides it),
        # and published with them, all-or-nothing
        write_processor = None if processor is None else (lambda folder: processor.save_pretrained(folder))
        save_format = "dense" if checkpoint else self.args.save_format
        logger.info("Saving sparse model (%s) to %s", save_format, output_dir)
        save_sparse_model(
            unwrap_model(self.model),
            output_dir,
            self.pruner.masks if masks is None else masks,
            save_format=save_format,
            metadata=self.sparse_record_metadata(),
            state_dict=state_dict,
            # a checkpoint keeps the exact training state (methods may hold dense weights under a mask); the mask
            # callback keeps pruned weights at zero during sparse retraining
            enforce_masks=not checkpoint,
            data_config=self.sparse_info.data_config,
            write_extra_files=write_processor,
            # a checkpoint is written in place: the other ranks write their RNG states into it meanwhile, and it only
            # counts once the Trainer writes trainer_state.json; outputs are swapped in all-or-nothing
            atomic_folder=not checkpoint,
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # accelerate's FSDP plugin: the Trainer writes no model file with a sharded state dict type, and gathers the
        # whole model at once with a full one; the sparse folder is written from the shards one tensor at a time
        if not (self.is_fsdp_enabled and self.pruner.mesh is not None):
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save through `save_sparse_model` (dense checkpoints; ``args.save_format`` for `save_model()` outputs)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        sharded = self.pruner.mesh is not None
        if state_dict is not None and not state_dict and not sharded:  # DeepSpeed's dummy save: the Trainer's
            return super()._save(output_dir, state_dict=state_dict)
        is_checkpoint = Path(output_dir).name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")
        masks = None
        if sharded:  # FSDP2: every process joins the gathers (one tensor at a time onto rank 0); rank 0 writes
            state_dict, masks = full_state_dict_on_rank_zero(self.model), full_masks_on_rank_zero(self.pruner.masks)

            def write():
                os.makedirs(output_dir, exist_ok=True)
                self._write_sparse_folder(output_dir, state_dict, checkpoint=is_checkpoint, masks=masks)

            on_rank_zero(write)  # only rank 0 holds the gathered weights (also with save_on_each_node)
        elif self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            self._write_sparse_folder(output_dir, state_dict, checkpoint=is_checkpoint, masks=masks)
        if is_checkpoint and (self.args.should_save or sharded):  # before trainer_state.json marks it complete
            self.pruner.save_state(output_dir)  # sharded: every process writes its rows of the masks

    # --- loading checkpoints ------------------------------------------------------------------------------------
    def _is_sparse_checkpoint(self, folder: str | None) -> bool:
        """A checkpoint written by `_save` that this process loads itself (not DeepSpeed shards; FSDP2 shards are
        loaded from it, rank 0 reading)."""
        ours = not self.is_deepspeed_enabled and (not self.is_fsdp_enabled or self.pruner.mesh is not None)
        return folder is not None and ours and (Path(folder) / SPARSITY_FILE_NAME).is_file()

    def _load_sparse_checkpoint(self, folder: str, model) -> None:
        """Load a checkpoint's weights strictly, names on disk converted to the model's own (the Trainer reads the
        file with ``load_state_dict(strict=False)``, which silently skips every tensor that transformers 5 renames
        when saving: ViT, DeiT, BEiT, Dinov2, Swin, ...)."""
        logger.info("Loading model weights from %s", folder)
        if self.pruner.mesh is not None:  # FSDP2: rank 0 reads the file, every process receives its rows
            network = unwrap_model(model)
            full = on_rank_zero(lambda: read_model_state_dict(folder, network)) or {}
            load_full_state_dict(network, full)
            del full
            check_checkpoint_masks(folder, network, self.pruner.masks)
            return
        load_sparse(folder, unwrap_model(model), strict=True)  # verified against sparsity.json first
        check_checkpoint_masks(folder, unwrap_model(model))
        if self.pruner.masks is not None:  # the exact masks, not ones rebuilt from the non-zeros of a dense file
            self.pruner.sync_kernel_masks(self.pruner.masks)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self._is_sparse_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_sparse_checkpoint(resume_from_checkpoint, self.model if model is None else model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if not self._is_sparse_checkpoint(best):
            return super()._load_best_model()
        if self._predates_masks(best):
            logger.warning(
                "The best checkpoint %s was saved before the masks reached their final state (pruning_method=%r "
                "prunes during training): keeping the model at the end of training, which has them.",
                best,
                self.pruner.args.pruning_method,
            )
            return
        self._load_sparse_checkpoint(best, self.model)

    def _predates_masks(self, folder: str) -> bool:
        """Whether a checkpoint of a method whose masks change during training holds other masks than the current
        ones (its weights would not belong with them)."""
        from ..core.masking import mask_hash

        if self.pruner.method.one_shot or self.pruner.masks is None:
            return False
        current = mask_hash(self.pruner.masks)  # first, on every process: it gathers sharded masks
        recorded = (read_sparsity_record(Path(folder)).get("mask") or {}).get("sha256")
        return recorded is not None and recorded != current

    # --- model card ---------------------------------------------------------------------------------------------
    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        **kwargs,
    ) -> None:
        """Write ``README.md`` (the hf_tgprune card) into ``output_dir`` from its ``sparsity.json``."""
        if not self.is_world_process_zero():
            return
        output_dir = Path(self.args.output_dir)
        if not (output_dir / SPARSITY_FILE_NAME).is_file():
            return super().create_model_card(
                language=language,
                license=license,
                tags=tags,
                model_name=model_name,
                finetuned_from=finetuned_from,
                tasks=tasks,
                dataset_tags=dataset_tags,
                dataset=dataset,
                dataset_args=dataset_args,
            )
        from ..io.modelcard import create_model_card

        if isinstance(dataset, (list, tuple)):
            dataset = dataset[0] if dataset else None
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        card = create_model_card(
            output_dir,
            repo_id=self.hub_model_id or self.args.hub_model_id,
            model_name=model_name,
            base_model=finetuned_from,
            dataset=dataset,
            license=license,
            tags=tags + list(getattr(self.model, "model_tags", None) or []),
        )
        card.save(output_dir / "README.md")

    # --- Hub ------------------------------------------------------------------------------------------------------
    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create the Hub repo (``exist_ok``); failures are a `HubPushError` naming the fix."""
        if not self.is_world_process_zero():
            return
        self.hub_model_id = hub.create_hub_repo(
            self.args.hub_model_id or Path(self.args.output_dir).absolute().name,
            token=token if token is not None else self.args.hub_token,
            private=private if private is not None else self.args.hub_private_repo,
            folder=self.args.output_dir,
        )
        self.push_in_progress = None

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Save the sparse model to ``output_dir``, write the model card and upload the folder (synchronously).

        Args:
            commit_message: the Hub commit message.
            blocking: ignored (uploads are synchronous).
            token: a write token; default ``args.hub_token`` or the one huggingface_hub finds.
            revision: the branch to push to; default ``args.hub_revision``.
            private: visibility if the repo is created here; default ``args.hub_private_repo``.
            **kwargs: ``model_name``, ``dataset`` (recorded when `sparse_info.dataset` is unset), ``license``,
                ``tags``... for the model card.

        Raises:
            hf_tgprune.io.hub.HubPushError: the push failed; ``output_dir`` is intact and can be pushed later with
                ``hf_tgprune.push_sparse_folder``.
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        dataset = kwargs.get("dataset")
        if dataset and self.sparse_info.dataset is None:
            self.sparse_info.dataset = dataset[0] if isinstance(dataset, (list, tuple)) else dataset
        self.save_model(_internal_call=True)  # first: whatever fails next, the model is in output_dir
        if not self.is_world_process_zero():
            return None
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        model_name = kwargs.pop("model_name", None) or (self.args.hub_model_id or Path(self.args.output_dir).name)
        self.create_model_card(model_name=model_name.split("/")[-1], **kwargs)
        self._finish_current_push()
        return hub.push_sparse_folder(
            self.args.output_dir,
            self.hub_model_id,
            token=token,
            private=private if private is not None else self.args.hub_private_repo,
            commit_message=commit_message,
            revision=revision if revision is not None else self.args.hub_revision,
            create_repo=False,
            write_model_card=False,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Push during training, per ``hub_strategy``: ``output_dir`` re-written as a sparse folder from the
        checkpoint, then the checkpoint itself for ``checkpoint`` / ``all_checkpoints``. A failure is logged and
        training goes on."""
        args = self.args
        if not self.is_world_process_zero() or args.hub_strategy == HubStrategy.END:
            return
        self.callback_handler.on_push_begin(args, self.state, self.control)
        # from the checkpoint's file, not the model: no gathering of sharded weights on this one process
        self._write_sparse_folder(
            args.output_dir, read_model_state_dict(checkpoint_folder, unwrap_model(self.model)), checkpoint=False
        )
        self.create_model_card()
        if args.save_strategy == SaveStrategy.STEPS:
            commit_message = f"Training in progress, step {self.state.global_step}"
        else:
            commit_message = f"Training in progress, epoch {int(self.state.epoch or 0)}"
        uploads = [dict(folder=args.output_dir, commit_message=commit_message)]
        if args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            uploads.append(
                dict(
                    folder=checkpoint_folder,
                    path_in_repo="last-checkpoint"
                    if args.hub_strategy == HubStrategy.CHECKPOINT
                    else Path(checkpoint_folder).name,
                    commit_message=commit_message + ", checkpoint",
                    require_sparse_checkpoint=False,
                )
            )
        try:
            for upload in uploads:
                hub.push_sparse_folder(
                    repo_id=self.hub_model_id,
                    token=args.hub_token,
                    revision=args.hub_revision,
                    create_repo=False,
                    write_model_card=False,
                    **upload,
                )
        except hub.HubPushError as err:
            logger.error("%s Training continues; the checkpoint is saved locally.", err)
            self.hub_push_errors.append(err)
