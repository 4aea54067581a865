"""Trainer integration of sparse saving, model cards and Hub pushes.

`SparseCheckpointMixin` goes before `transformers.Trainer` in the bases of `TeacherGuidedPruningTrainer`:

* ``_save`` writes every ``save_model()`` output and every checkpoint with
  :func:`hf_tgprune.serialization.save_sparse_model` (``model.safetensors`` that plain timm/transformers load,
  ``config.json``, ``sparsity.json``). ``args.save_format="bitmask"`` applies to ``save_model()`` outputs;
  Trainer checkpoints (``checkpoint-*``) stay dense so that ``resume_from_checkpoint`` and
  ``load_best_model_at_end`` keep working.
* ``create_model_card`` writes the hf_tgprune card (``README.md``) from the folder's ``sparsity.json``.
* ``push_to_hub`` saves, writes the card and uploads ``output_dir`` through :mod:`hf_tgprune.hub`;
  ``_push_from_checkpoint`` pushes during training according to ``hub_strategy`` (``end``, ``every_save``,
  ``checkpoint`` -> ``last-checkpoint/``, ``all_checkpoints`` -> ``checkpoint-N/``). Every failure is a
  :class:`hf_tgprune.hub.HubPushError`; pushes during training log the error and training goes on (the
  checkpoint is already on disk), ``push_to_hub()`` raises it. Uploads are synchronous.

Extra fields for ``sparsity.json`` and the card (``dataset``, ``base_model``, ``teacher``, ``dense_metrics``, ...)
go in ``trainer.sparse_metadata`` (a dict) before saving.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, SaveStrategy

from . import hub
from .adapters import get_adapter, unwrap_model
from .serialization import (
    DENSE_WEIGHTS_NAME,
    SPARSITY_FILE_NAME,
    load_sparse,
    save_sparse_model,
)

logger = logging.getLogger(__name__)

# Config fields recorded as the method's hyperparameters (those missing from the args are skipped).
HYPERPARAMETER_FIELDS = (
    "sparsity",
    "pruning_method",
    "alpha",
    "beta",
    "temperature",
    "normalize_logits",
    "score_aggregation",
    "ema_momentum",
    "num_calibration_samples",
    "calibration_batch_size",
    "scoring_bn_mode",
    "prune_include",
    "prune_exclude",
    "min_layer_density",
    "layer_density_floor",
    "retrain_with_kd",
    "epsd_warmup_steps",
    "self_distillation_weight",
    "self_kd_alpha",
    "self_kd_temperature",
    "gradual_pruning_epochs",
    "imp_rounds",
    "imp_prune_fraction",
    "imp_epochs_per_round",
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


def model_name_or_path(model) -> str | None:
    """A name for a model in the card: transformers' ``name_or_path``, or timm's architecture."""
    if model is None:
        return None
    model = unwrap_model(model)
    family = get_adapter(model).name
    if family == "transformers":
        return getattr(model.config, "_name_or_path", None) or type(model).__name__
    if family == "timm":
        return model.pretrained_cfg.get("architecture") or type(model).__name__
    return type(model).__name__


class SparseCheckpointMixin:
    """Sparse saving, model card and Hub push for `transformers.Trainer` subclasses that hold ``self.masks``."""

    # --- metadata -----------------------------------------------------------------------------------------------
    @property
    def sparse_metadata(self) -> dict[str, Any]:
        """User-supplied fields for ``sparsity.json`` and the model card; they override the collected ones."""
        if getattr(self, "_sparse_metadata", None) is None:
            self._sparse_metadata = {}
        return self._sparse_metadata

    def _calibration_size(self) -> int | None:
        source = getattr(self, "calibration_dataset", None)
        if source is None:
            source = getattr(self, "train_dataset", None)
        limit = getattr(self.args, "num_calibration_samples", None)
        try:
            size = len(source)
        except TypeError:
            return None
        return min(size, limit) if limit else size

    def _latest_eval_metrics(self) -> dict[str, Any]:
        for entry in reversed(getattr(self.state, "log_history", []) or []):
            metrics = {k: v for k, v in entry.items() if k.startswith("eval_") and isinstance(v, (int, float))}
            if metrics:
                return metrics
        return {}

    def build_sparse_metadata(self) -> dict[str, Any]:
        """What ``sparsity.json`` records next to the measured sparsity."""
        args = self.args
        hyperparameters = {name: getattr(args, name) for name in HYPERPARAMETER_FIELDS if hasattr(args, name)}
        if "optim" in hyperparameters:
            hyperparameters["optim"] = str(getattr(hyperparameters["optim"], "value", hyperparameters["optim"]))
        if "lr_scheduler_type" in hyperparameters:
            value = hyperparameters["lr_scheduler_type"]
            hyperparameters["lr_scheduler_type"] = str(getattr(value, "value", value))
        report = getattr(self, "pruning_report", None) or {}
        extra = dict(self.sparse_metadata)
        dense_metrics = extra.pop("dense_metrics", None)
        pruned_metrics = extra.pop("pruned_metrics", None) or self._latest_eval_metrics()
        metrics = extra.pop("metrics", None) or {}
        metrics = {**({"dense": dense_metrics} if dense_metrics else {}), **metrics}
        if pruned_metrics:
            metrics.setdefault("pruned", pruned_metrics)
        metadata = {
            "method": getattr(args, "pruning_method", None),
            "target_sparsity": getattr(args, "sparsity", None),
            "hyperparameters": hyperparameters,
            "base_model": model_name_or_path(self.model),
            "teacher": model_name_or_path(getattr(self, "teacher_model", None)),
            "calibration_size": self._calibration_size(),
            "dataset": None,
            "metrics": metrics,
            "global_step": getattr(self.state, "global_step", None),
        }
        if "scoring_seconds" in report:
            metadata["scoring_seconds"] = report["scoring_seconds"]
        metadata.update(extra)
        return metadata

    # --- saving -------------------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save through `save_sparse_model` (dense by default; ``args.save_format`` for `save_model()` outputs)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is not None and not state_dict:  # DeepSpeed's dummy save: leave it to the Trainer
            return super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        is_checkpoint = Path(output_dir).name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")
        save_format = "dense" if is_checkpoint else getattr(self.args, "save_format", "dense")
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        logger.info("Saving sparse model (%s) to %s", save_format, output_dir)
        save_sparse_model(
            model,
            output_dir,
            getattr(self, "masks", None),
            save_format=save_format,
            metadata=self.build_sparse_metadata(),
            state_dict=state_dict,
            # a checkpoint keeps the exact training state (schedules may hold dense weights under a mask);
            # the mask callback already keeps pruned weights at zero during sparse retraining
            enforce_masks=not is_checkpoint,
        )
        if is_checkpoint and hasattr(self, "save_pruning_state"):
            self.save_pruning_state(output_dir)  # part of the checkpoint before trainer_state.json marks it complete
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

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
        from .modelcard import create_model_card

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
        if isinstance(dataset, (list, tuple)):
            dataset = dataset[0] if dataset else None
        if isinstance(tags, str):
            tags = [tags]
        card = create_model_card(
            output_dir,
            repo_id=getattr(self, "hub_model_id", None) or self.args.hub_model_id,
            model_name=model_name,
            base_model=finetuned_from,
            dataset=dataset,
            license=license,
            tags=list(tags or []) + list(getattr(self.model, "model_tags", None) or []),
        )
        card.save(output_dir / "README.md")

    # --- Hub ------------------------------------------------------------------------------------------------------
    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create the Hub repo (``exist_ok``); failures are a `HubPushError` naming the fix."""
        if not self.is_world_process_zero():
            return
        repo_name = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        self.hub_model_id = hub.create_hub_repo(
            repo_name,
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

        Raises:
            hf_tgprune.hub.HubPushError: the push failed; ``output_dir`` is intact and can be pushed later with
                ``hf_tgprune.push_sparse_folder``.
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if kwargs.get("dataset") and "dataset" not in self.sparse_metadata:
            dataset = kwargs["dataset"]
            self.sparse_metadata["dataset"] = dataset[0] if isinstance(dataset, (list, tuple)) else dataset
        if getattr(self, "hub_model_id", None) is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        model_name = (
            kwargs.pop("model_name", None)
            or ((self.args.hub_model_id or Path(self.args.output_dir).name).split("/")[-1])
        )
        self.create_model_card(model_name=model_name, **kwargs)
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

    def _refresh_output_dir_from(self, checkpoint_folder: str) -> None:
        """Write the checkpoint's model into ``output_dir`` (``args.save_format``, masks enforced), no gathering."""
        output_dir = Path(self.args.output_dir)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_sparse_model(
            model,
            output_dir,
            getattr(self, "masks", None),
            save_format=getattr(self.args, "save_format", "dense"),
            metadata=self.build_sparse_metadata(),
            state_dict=load_sparse(Path(checkpoint_folder) / DENSE_WEIGHTS_NAME),
        )
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Push during training, per ``hub_strategy``; a failure is logged and training goes on."""
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self._refresh_output_dir_from(checkpoint_folder)
        self.create_model_card()
        if self.args.save_strategy == SaveStrategy.STEPS:
            commit_message = f"Training in progress, step {self.state.global_step}"
        else:
            commit_message = f"Training in progress, epoch {int(self.state.epoch or 0)}"
        try:
            hub.push_sparse_folder(
                self.args.output_dir,
                self.hub_model_id,
                token=self.args.hub_token,
                commit_message=commit_message,
                revision=self.args.hub_revision,
                create_repo=False,
                write_model_card=False,
            )
            if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
                path_in_repo = (
                    "last-checkpoint"
                    if self.args.hub_strategy == HubStrategy.CHECKPOINT
                    else Path(checkpoint_folder).name
                )
                hub.push_sparse_folder(
                    checkpoint_folder,
                    self.hub_model_id,
                    token=self.args.hub_token,
                    commit_message=commit_message + ", checkpoint",
                    revision=self.args.hub_revision,
                    path_in_repo=path_in_repo,
                    create_repo=False,
                    write_model_card=False,
                    require_sparse_checkpoint=False,
                )
        except hub.HubPushError as err:
            logger.error("%s Training continues; the checkpoint is saved locally.", err)
            self.hub_push_errors.append(err)

    @property
    def hub_push_errors(self) -> list:
        """Failed pushes during training (each a `HubPushError`)."""
        if getattr(self, "_hub_push_errors", None) is None:
            self._hub_push_errors = []
        return self._hub_push_errors
