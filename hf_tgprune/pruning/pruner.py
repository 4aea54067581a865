"""`Pruner`: the pruning state of one model, with one owner.

A `Pruner` holds the pruning settings (`PruningArguments`), the method (`hf_tgprune.methods`), the one current mask
set, the pruning report, and writes and reads the state a checkpoint needs (`pruning_state.safetensors`). Methods
receive the `Pruner`; the mask callback reads the masks from it; `TeacherGuidedPruningTrainer` composes one. With a
one-shot method it needs no Trainer:

    pruner = Pruner(student, PruningArguments(sparsity=0.9), teacher=teacher, calibration_dataset=images)
    pruner.prune()                                      # score, select, install, recalibrate BatchNorm
    enforcer = pruner.mask_callback
    enforcer.start(student, optimizer)                  # gradients of pruned weights are masked from now on
    for batch in loader:
        loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
        enforcer.enforce(optimizer)                      # pruned weights and their optimizer state stay zero

Methods whose masks change at the Trainer's steps or epochs (`gradual`, `imp`, `dg2pf`) refuse `enforcer.start`
outside a Trainer's training.

What methods may use: `model`, `teacher`, `args`, `masks`, `report`, `prunable_parameters()`,
`min_layer_density(sparsity)`, `compute_scores()`, `select_masks()`, `compute_masks()`, `install()`,
`set_masks()`, `recalibrate_batchnorm()`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..core.adapters import check_same_num_labels
from ..core.callbacks import GlobalMaskCallback
from ..core.dtensor import fsdp_mesh, like, local, reshard, shard_like
from ..core.kernel_masks import (
    attach_kernel_masks,
    detach_kernel_masks,
    kernel_mask_statistics,
    kernel_masked_layers,
    kernel_masks,
    sync_kernel_masks,
)
from ..core.masking import (
    MaskFileError,
    apply_masks,
    as_bool_masks,
    empty_layers,
    large_unprunable_matrices,
    mask_hash,
    min_layer_density_for,
    prunable_parameters,
    prune_zeros_first,
    select_masks,
    sparsity_report,
    standardized_weight_layers,
)
from ..core.nm import nm_incompatible_layers, nm_masks
from ..core.recalibration import batchnorm_layers, recalibrate_batchnorm
from ..core.scoring import ScoringOptions, TeacherLogitMemo, compute_importance_scores, get_scoring_method
from ..core.sharded import process_group_all_reduce, select_sharded_masks
from ..data.collate import check_labelled, collate_fn
from ..data.splits import deterministic_sample
from ..io.export import fused_sparsity
from ..io.serialization.pruning_state import PRUNING_STATE_NAME, PruningState, read_pruning_state, write_pruning_state
from ..io.serialization.sharded_state import (
    SHARDED_STATE_NAME,
    read_sharded_pruning_state,
    write_sharded_pruning_state,
)
from ..methods import PruningMethod, build_method, get_method
from ..methods.imp import imp_sparsities
from .config import PruningArguments, parse_nm_pattern

logger = logging.getLogger(__name__)


def shard_bounds(batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous slice `[start, stop)` of a global batch that `rank` processes."""
    return rank * batch_size // world_size, (rank + 1) * batch_size // world_size


class ShardedBatches:
    """Global calibration batches in a fixed order; this rank loads its slice of each (None when it is empty, or a
    zero-length batch with `zero_length_empty`: a model sharded by FSDP2 needs every rank in every forward)."""

    def __init__(
        self,
        dataset,
        global_batch_size,
        rank,
        world_size,
        collate_fn,
        num_workers=0,
        pin_memory=False,
        zero_length_empty=False,
    ):
        n = len(dataset)
        self.global_batches = [list(range(i, min(i + global_batch_size, n))) for i in range(0, n, global_batch_size)]
        self.shards = []
        for indices in self.global_batches:
            start, stop = shard_bounds(len(indices), rank, world_size)
            self.shards.append(indices[start:stop])
        self.zero_length_empty = zero_length_empty
        # an empty shard loads one image of its global batch, cut to zero length (its shapes and dtypes)
        loaded = [shard or indices[:1] for shard, indices in zip(self.shards, self.global_batches)]
        self.loader = DataLoader(
            dataset,
            batch_sampler=loaded if zero_length_empty else [shard for shard in self.shards if shard],
            collate_fn=collate_fn,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )

    def __len__(self):
        return len(self.global_batches)

    def __iter__(self):
        loaded = iter(self.loader)
        for shard in self.shards:
            if shard:
                yield next(loaded)
            elif self.zero_length_empty:
                yield {k: v[:0] if isinstance(v, torch.Tensor) else v for k, v in next(loaded).items()}
            else:
                yield None


def scores_through_batchnorm(model: nn.Module, method: PruningMethod) -> bool:
    """Whether `method`'s criterion forwards images through BatchNorm layers of `model` (a data-dependent criterion
    and a model with BatchNorm), so that its scoring may read their running statistics."""
    criterion = method.criterion
    return criterion is not None and not get_scoring_method(criterion).data_free and bool(batchnorm_layers(model))


def validate_inputs(model, teacher, args, method, train_dataset, calibration_dataset, prunes=True) -> None:
    """Refuse, before any work, what pruning `model` with `method` cannot run on (each error names the fix)."""
    wrapped = sorted(
        f"{module_name}.{parameter[: -len('_orig')]}" if module_name else parameter[: -len("_orig")]
        for module_name, module in model.named_modules()
        for parameter, _ in module.named_parameters(recurse=False)
        if parameter.endswith("_orig") and hasattr(module, parameter[: -len("_orig")] + "_mask")
    )
    if wrapped:
        raise ValueError(
            f"{len(wrapped)} weight(s) are re-parametrised by torch.nn.utils.prune (weight_orig / weight_mask), e.g. "
            f"{wrapped[:3]}: hf_tgprune keeps plain weights. Call torch.nn.utils.prune.remove(module, 'weight') on "
            "each first, and pass their masks as `masks=` (bool or 0/1) to keep them."
        )
    params = prunable_parameters(model, args.prune_include, args.prune_exclude)  # raises on patterns matching nothing
    frozen = [name for name, param in params.items() if not param.requires_grad]
    criterion = get_scoring_method(method.criterion) if method.criterion else None
    if frozen and prunes and criterion is not None and not criterion.data_free:
        raise ValueError(
            f"pruning_method={args.pruning_method!r} scores weights by their gradients, but {len(frozen)} prunable "
            f"weight(s) are frozen (requires_grad=False), e.g. {frozen[:3]}. Unfreeze them for pruning, leave them out "
            "with prune_exclude, or choose a data-free method such as 'magnitude'."
        )
    if teacher is None and method.scoring_needs_teacher(args):
        raise ValueError(
            f"pruning_method={args.pruning_method!r} scores with a teacher: pass `teacher_model`, set alpha=0 to score "
            "without one (the gradients of the cross-entropy alone), or choose a teacher-free method such as "
            "'magnitude' or 'snip'."
        )
    check_same_num_labels(model, teacher)
    scoring = method.needs_calibration_data()
    recalibration = (  # a data-free criterion (magnitude) still recalibrates BatchNorm on images
        prunes  # given masks are installed as they are
        and args.recalibrate_bn
        and method.one_shot
        and method.criterion is not None
        and args.sparsity > 0
        and bool(batchnorm_layers(model))
    )
    # rounds recalibrate between them only for a criterion that reads images (see Pruner.compute_masks)
    rounds = prunes and method.one_shot and args.pruning_rounds > 1 and scores_through_batchnorm(model, method)
    if not (scoring or recalibration or rounds):
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
    if (recalibration or rounds) and min(args.calibration_batch_size, len(source), args.recalibration_samples) < 2:
        raise ValueError(
            "BatchNorm recalibration needs batches of at least 2 images (BatchNorm has no statistics of one image), "
            f"but calibration_batch_size={args.calibration_batch_size}, recalibration_samples="
            f"{args.recalibration_samples} and {argument} has {len(source)} example(s). Raise them to >= 2, or set "
            "recalibrate_bn=False (and pruning_rounds=1) to keep the dense model's BatchNorm statistics."
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


def check_shardable(args: PruningArguments, method: PruningMethod) -> None:
    """Refuse, before any work, settings that pruning weights sharded by FSDP2 cannot honour exactly."""
    if not (method.one_shot or method.shardable):
        raise ValueError(
            f"pruning_method={args.pruning_method!r} changes its masks during training in a way that is not "
            "available for weights sharded by FSDP2. Use 'gradual' or a one-shot method ('magnitude', 'tgp', "
            "'tgp_fisher', 'snip', ...)."
        )
    if args.sparsity_pattern == "unstructured" and args.layer_allocation != "global":
        raise ValueError(
            f"layer_allocation={args.layer_allocation!r} is not available for weights sharded by FSDP2, only "
            "'global'. Set layer_allocation='global' (a signed criterion such as 'tgp_taylor' needs the unsharded "
            "model)."
        )
    if args.min_layer_density > 0 or args.layer_density_floor > 0:
        raise ValueError(
            "min_layer_density / layer_density_floor (a per-layer minimum density) are not available for weights "
            "sharded by FSDP2. Set both to 0."
        )
    if args.mask_standardized_kernels:
        raise ValueError(
            "mask_standardized_kernels=True is not available for weights sharded by FSDP2 (the kernel is gathered "
            "in forward, its mask is a local shard). Set mask_standardized_kernels=False."
        )


class Pruner:
    """Prunes one model and owns its pruning state.

    Args:
        model: the student (a timm / transformers classifier or any `nn.Module` that returns logits).
        args: the pruning settings; `TeacherGuidedPruningConfig` is one too.
        teacher: the frozen teacher of teacher-guided criteria (eval mode, no gradients).
        calibration_dataset: examples (`{"pixel_values", "labels"}` or `(image, label)`) to score and recalibrate
            BatchNorm on; default: a seeded sample of `train_dataset`.
        train_dataset: the training set (calibration fallback, and `scoring_epochs`).
        masks: given masks to install instead of pruning (bool, or 0/1 as `torch.nn.utils.prune` writes them).
        collate_fn: turns a list of examples into a batch.

    Settable after construction (the trainer does, once its accelerator exists): `teacher`, `collate_fn`, `rank`,
    `world_size`, `all_reduce` (sums a tensor over processes), `num_workers`, `pin_memory`, `progress`. A model whose
    weights FSDP2 shards (`fully_shard`) is detected here (`mesh`): scores and masks are then local shards, and rank,
    world size and reductions come from the shards' device mesh.
    """

    def __init__(
        self,
        model: nn.Module,
        args: PruningArguments | None = None,
        *,
        teacher: nn.Module | None = None,
        calibration_dataset: Dataset | None = None,
        train_dataset: Dataset | None = None,
        masks: Mapping[str, torch.Tensor] | None = None,
        collate_fn: Callable = collate_fn,
    ):
        self.args = args if args is not None else PruningArguments()
        self.method: PruningMethod = build_method(self.args.pruning_method, self.args.pruning_method_args)
        if masks is not None and not masks:
            raise ValueError("masks={} is not a mask set: pass pruning_method='dense' to train without pruning.")
        if masks is not None and not self.method.one_shot:
            raise ValueError(
                f"masks= installs fixed masks, but pruning_method={self.args.pruning_method!r} selects its own masks "
                "during training (the default of TeacherGuidedPruningConfig is 'gradual'). To retrain with the given "
                "masks, set a one-shot pruning_method, e.g. pruning_method='magnitude' (given masks are then kept "
                "as they are)."
            )
        validate_inputs(
            model, teacher, self.args, self.method, train_dataset, calibration_dataset, prunes=masks is None
        )
        self.model = model
        self.teacher = teacher
        self.calibration_dataset = calibration_dataset
        self.train_dataset = train_dataset
        self.collate_fn = collate_fn
        self.rank, self.world_size, self.all_reduce = 0, 1, None
        self.mesh = None
        self.masks: dict[str, torch.Tensor] | None = None
        self._report: dict | None = None
        self.follow_sharding()
        self.num_workers, self.pin_memory, self.progress = 0, False, True
        self.pruned = False
        # the one callback that enforces the masks (or the method's schedule) during training
        self.mask_callback: GlobalMaskCallback = self.method.mask_callback(self) or GlobalMaskCallback(self)
        if masks is not None:
            params = self.prunable_parameters()
            self.install(
                {name: shard_like(mask, params.get(name, mask)) for name, mask in as_bool_masks(masks).items()}
            )
            self.pruned = True

    def follow_sharding(self) -> None:
        """Adopt FSDP2 sharding of the model's weights (`fully_shard`, here or by accelerate after this pruner was
        built): scores and masks become local shards laid out like the weights (`hf_tgprune.core.dtensor`), and rank,
        world size and reductions come from the shards' device mesh. Masks already held (given, or from a pruning
        before the sharding) are cut to this process's rows. Nothing changes for a model that is not sharded.

        Raises:
            ValueError: settings that pruning sharded weights cannot honour (`check_shardable`).
        """
        if self.mesh is not None:
            return
        params = self.prunable_parameters()
        mesh = fsdp_mesh(params.values())
        if mesh is None:
            return
        check_shardable(self.args, self.method)
        self.mesh = mesh
        self.rank, self.world_size = mesh.get_local_rank(), mesh.size()
        self.all_reduce = process_group_all_reduce(mesh.get_group())
        if self.masks is not None:
            self.masks = {name: shard_like(mask, params[name]) for name, mask in self.masks.items()}
            self._report = None

    # --- the report -------------------------------------------------------------------------------------------------
    @property
    def report(self) -> dict | None:
        """Measured sparsity of the current masks (prunable and total, per layer), the method, the target and the mask
        hash; extra fields a run adds (e.g. `scoring_seconds`) stay until the masks change. None before pruning."""
        if self.masks is None:
            return None
        if self._report is None:
            report = sparsity_report(self.model, self.masks)
            report.update(
                method=self.args.pruning_method, target_sparsity=self.args.sparsity, mask_sha256=mask_hash(self.masks)
            )
            if self.mask_callback.finished is not None:
                report["schedule_finished"] = self.mask_callback.finished
            report["empty_layers"] = empty_layers(self.masks)
            masked_kernels = set(kernel_masked_layers(self.model))
            standardized = standardized_weight_layers(self.model, self.masks)
            report["computed_dense_layers"] = [name for name in standardized if name not in masked_kernels]
            report["masked_kernel_layers"] = [name for name in standardized if name in masked_kernels]
            report["unprunable_matrices"] = large_unprunable_matrices(self.model, self.masks)
            # None unless something in the model fuses (a sharded model is not copied to fuse it)
            fused = None if self.mesh is not None else fused_sparsity(self.model, self.masks)
            if fused is not None:
                report["fused"] = fused
            self._report = report
        return self._report

    def log_report(self) -> None:
        """Log the sparsity, how much of the model is prunable, and warn about what will not behave as sparse."""
        report = self.report
        prunable, total = report["prunable"]["numel"], report["total"]["numel"]
        if report.get("schedule_finished") is False:  # e.g. gradual before train(): the schedule prunes from there
            logger.info(
                "%s prunes during training: %.4f sparsity over prunable weights now, %.4f once its schedule ends "
                "(mask %s)",
                report["method"],
                report["prunable"]["sparsity"],
                report["target_sparsity"],
                report["mask_sha256"][:12],
            )
        else:
            logger.info(
                "Pruned %s: %.4f sparsity over prunable weights, %.4f over all parameters (mask %s); the prunable "
                "weights are %.1f%% of all parameters",
                report["method"],
                report["prunable"]["sparsity"],
                report["total"]["sparsity"],
                report["mask_sha256"][:12],
                100 * prunable / max(1, total),
            )
        if report["unprunable_matrices"]:
            listed = ", ".join(
                f"{name} ({100 * numel / max(1, total):.1f}%)" for name, numel in report["unprunable_matrices"].items()
            )
            logger.info("Weight matrices not pruned (prune_include opts them in): %s", listed)
        if report["empty_layers"]:
            logger.warning(
                "Pruning emptied %d layer(s): %s. They output only their bias from now on; lower the sparsity, set "
                "min_layer_density or layer_density_floor, or exclude them with prune_exclude.",
                len(report["empty_layers"]),
                report["empty_layers"],
            )
        if "fused" in report:
            logger.warning(
                "%s has branches that fuse for inference (timm reparameterize_model): fused, it is %.4f sparse (zeros "
                "pruned in one branch survive only where every branch is zero). Save the unfused model and fuse after "
                "loading it.",
                type(self.model).__name__,
                report["fused"]["sparsity"],
            )
        if report["computed_dense_layers"]:
            logger.warning(
                "%d pruned layer(s) are weight-standardised convolutions (e.g. %s): their stored weights are sparse, "
                "but they standardise them in forward, so the kernel they compute with is dense (non-zero where "
                "pruned). The saved file is smaller; the model is not sparse in compute. Set "
                "mask_standardized_kernels=True to mask the computed kernel, or exclude them with prune_exclude to "
                "keep them dense.",
                len(report["computed_dense_layers"]),
                report["computed_dense_layers"][0],
            )
        if report["masked_kernel_layers"]:
            logger.info(
                "%d weight-standardised convolution(s) compute with the masked kernel (mask_standardized_kernels): "
                "sparse in compute. Load the saved folder with hf_tgprune (load_image_classifier / load_sparse) or "
                "export it; plain timm / transformers loading computes the dense kernel again.",
                len(report["masked_kernel_layers"]),
            )

    # --- building blocks ----------------------------------------------------------------------------------------
    def prunable_parameters(self) -> dict[str, nn.Parameter]:
        """The weights this run prunes (`prune_include` / `prune_exclude`; default: `default_prunable_names` but the head)."""
        reshard(self.model)  # FSDP2: the sharded parameters, even after a forward (e.g. finding the head)
        return prunable_parameters(self.model, self.args.prune_include, self.args.prune_exclude)

    def min_layer_density(self, sparsity: float) -> float:
        """Per-layer minimum density at `sparsity` (the layer-collapse guard of the settings)."""
        return min_layer_density_for(sparsity, self.args.min_layer_density, self.args.layer_density_floor)

    def calibration_batches(self, num_samples: int | None = None, epochs: int = 0) -> ShardedBatches:
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
        return ShardedBatches(
            dataset,
            self.args.calibration_batch_size,
            self.rank,
            self.world_size,
            self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # every rank runs every batch when a collective runs inside the forward (FSDP2, global BatchNorm statistics)
            zero_length_empty=self.mesh is not None or (self.world_size > 1 and self.args.scoring_bn_mode == "train"),
        )

    def compute_scores(
        self,
        method: str | None = None,
        options: ScoringOptions | None = None,
        teacher_memo: TeacherLogitMemo | None = None,
    ) -> dict:
        """Run the scoring pass (all-reduced across processes) and return float32 scores per prunable weight.

        `method` / `options` override the method's criterion and the options built from the settings (EPSD uses it);
        `teacher_memo` reuses the teacher's logits of an earlier pass over the same images (pruning rounds do).
        """
        args = self.args
        name = method or self.method.criterion
        if name is None:
            raise ValueError(f"pruning_method={args.pruning_method!r} scores no weights.")
        batches = None if get_scoring_method(name).data_free else self.calibration_batches(epochs=args.scoring_epochs)
        # the pass leaves the global RNG as it found it (a DataLoader draws its seed from it): training that follows
        # is the same whether scores were computed here or taken from an earlier pass (a sweep, a resumed run)
        with torch.random.fork_rng(devices=[]):
            return compute_importance_scores(
                self.model,
                batches,
                method=name,
                teacher=self.teacher,
                params=self.prunable_parameters(),
                options=options or ScoringOptions(args.alpha, args.beta, args.temperature, args.normalize_logits),
                aggregation=args.score_aggregation,
                ema_momentum=args.ema_momentum,
                bn_mode=args.scoring_bn_mode,
                all_reduce=self.all_reduce,
                seed=args.seed,
                progress=self.progress,
                total=None if batches is None else len(batches),
                teacher_memo=teacher_memo,
            )

    def recalibrate_batchnorm(self) -> int:
        """Re-estimate BatchNorm running statistics on `recalibration_samples` calibration images (see
        `hf_tgprune.core.recalibration`); returns the number of images this process forwarded (0 without BatchNorm)."""
        if not batchnorm_layers(self.model):
            return 0
        batches = self.calibration_batches(num_samples=self.args.recalibration_samples)
        with torch.random.fork_rng(devices=[]):  # leaves the global RNG as it found it, as the scoring pass does
            return recalibrate_batchnorm(
                self.model, batches, all_reduce=self.all_reduce, progress=self.progress, total=len(batches)
            )

    def select_masks(self, scores: Mapping[str, torch.Tensor], sparsity: float | None = None) -> dict:
        """Masks from scores at `sparsity` (default `args.sparsity`): the settings' layer allocation and guard,
        already-zero weights first, exactly `round(sparsity·N)` pruned (or the N:M pattern)."""
        sparsity = self.args.sparsity if sparsity is None else sparsity
        if self.args.sparsity_pattern != "unstructured":
            return self._nm_masks(scores)
        if self.mesh is not None:
            return select_sharded_masks(
                scores,
                sparsity,
                weights=self.prunable_parameters(),
                min_density=self.min_layer_density(sparsity),
                allocation=self.args.layer_allocation,
            )
        return select_masks(
            scores,
            sparsity,
            min_density=self.min_layer_density(sparsity),
            allocation=self.args.layer_allocation,
            weights=self.prunable_parameters(),
        )

    def _nm_masks(self, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n, m = parse_nm_pattern(self.args.sparsity_pattern)
        sharded = self.prunable_parameters()
        # every group of M lies in one row, and FSDP2 shards whole rows: N:M works shard by shard
        weights = {name: local(weight) for name, weight in sharded.items()}
        scores = {name: local(score) for name, score in scores.items()}
        dense = set(nm_incompatible_layers(sharded, m))  # by the full shapes
        if dense:
            logger.warning(
                "sparsity_pattern=%r: %d layer(s) whose input size is not a multiple of %d stay dense: %s",
                self.args.sparsity_pattern, len(dense), m, sorted(dense),
            )  # fmt: skip
        ranked = prune_zeros_first({k: v for k, v in scores.items() if k not in dense}, weights)
        masks = nm_masks(ranked, n, m)
        masks.update({name: torch.ones_like(scores[name], dtype=torch.bool) for name in dense})
        return {name: like(masks[name], sharded[name]) for name in scores}

    def compute_masks(self) -> dict[str, torch.Tensor]:
        """Masks at `sparsity` from `pruning_rounds` scoring passes of the method's criterion (one-shot when 1).

        Round r of k scores the current (already partly pruned) weights, prunes to `1 - (1 - sparsity)^(r/k)` and,
        before the next round, applies the mask and, when the next scoring pass reads them
        (`scoring_reads_running_statistics`), recalibrates the BatchNorm running statistics. The teacher is frozen and
        every round scores the same calibration images, so its logits come from the first round (`TeacherLogitMemo`;
        a round whose images differ, through random transforms, runs the teacher again). Weights that are already zero
        are pruned first, so the masks are nested and the final count is exact. The masks do not depend on
        `recalibrate_bn`: with `recalibrate_bn=False` the statistics the rounds re-estimated are put back afterwards.
        """
        args = self.args
        levels = imp_sparsities(args.sparsity, args.pruning_rounds) if args.sparsity > 0 else [0.0]
        recalibrate = len(levels) > 1 and self.scoring_reads_running_statistics()
        layers = list(batchnorm_layers(self.model).values()) if recalibrate and not args.recalibrate_bn else []
        saved = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in layers]
        masks = None
        # rounds over whole reshuffled training epochs (scoring_epochs > 0) never see an image twice: no memo
        memo = TeacherLogitMemo() if len(levels) > 1 and args.scoring_epochs == 0 else None
        for index, level in enumerate(levels):
            if masks is not None:
                apply_masks(self.model, masks)
                self.sync_kernel_masks(masks)  # the next round scores the function that will be trained
                if recalibrate:
                    self.recalibrate_batchnorm()
            scores = self.compute_scores(method=self.method.criterion, teacher_memo=memo)
            masks = self.select_masks(scores, level)
            del scores
            if len(levels) > 1:
                logger.info("Pruning round %d/%d: sparsity %.4f", index + 1, len(levels), level)
        for layer, state in zip(layers, saved):
            layer.load_state_dict(state)
        return masks

    def scoring_reads_running_statistics(self) -> bool:
        """Whether a scoring pass of the method's criterion normalises with the BatchNorm running statistics, which
        pruning rounds must then re-estimate after each mask. It does with `scoring_bn_mode="eval"`; with "train" it
        does only for a calibration batch of one image (BatchNorm cannot normalise one image alone). Data-free
        criteria and models without BatchNorm read none, so their rounds skip the recalibration: the masks are the
        same and each round saves `recalibration_samples` forward passes."""
        if not scores_through_batchnorm(self.model, self.method):
            return False
        if self.args.scoring_bn_mode == "eval":
            return True
        batches = self.calibration_batches(epochs=self.args.scoring_epochs)
        return any(len(indices) == 1 for indices in batches.global_batches)

    # --- pruning ------------------------------------------------------------------------------------------------
    def prune(self, scores: Mapping[str, torch.Tensor] | None = None) -> dict | None:
        """Prune with the method and return the report; calling it again returns the same report.

        One-shot methods score once (or `pruning_rounds` times), install one mask and recalibrate BatchNorm
        (`recalibrate_bn`). Methods that prune during training (`epsd`, `dg2pf`, `imp`, `gradual`) install their
        initial masks (if any) here; their callbacks (`method.callbacks(pruner)`) do the rest.

        Args:
            scores: importance scores already computed by `compute_scores()` on these same (dense) weights. One-shot
                scores do not depend on the target, so one scoring pass can serve several sparsities (one pruner
                per sparsity, each on a copy of the dense model). One-shot methods with `pruning_rounds=1` only.
        """
        if self.pruned:
            return self.report
        if scores is not None and not self.shares_scores():
            raise ValueError(
                "prune(scores=...) reuses one scoring pass, which only one-shot methods with pruning_rounds=1 can "
                f"do (pruning_method={self.args.pruning_method!r}, pruning_rounds={self.args.pruning_rounds}). Call "
                "prune() without scores."
            )
        start = time.perf_counter()
        # transactional: on any error the model's parameters and buffers are put back exactly as they were
        before = {name: tensor.detach().to("cpu", copy=True) for name, tensor in self.model.state_dict().items()}
        kernel_masks_before = {name: mask.clone() for name, mask in kernel_masks(self.model).items()}
        kernel_statistics_before = kernel_mask_statistics(self.model)
        try:
            masks = self.select_masks(scores) if scores is not None else self.method.prune(self)
            if masks is not None:
                self.install(masks)
            seconds = time.perf_counter() - start
            recalibrate = masks is not None and self.method.one_shot and self.args.recalibrate_bn
            recalibrated = self.recalibrate_batchnorm() if recalibrate else 0
        except BaseException:
            with torch.no_grad():
                for name, tensor in self.model.state_dict().items():
                    tensor.copy_(before[name])
            self.masks, self._report = None, None
            detach_kernel_masks(self.model)
            attach_kernel_masks(self.model, kernel_masks_before, kernel_statistics_before)
            raise
        del before
        self.pruned = True
        if masks is None:
            return self.report
        if self.method.one_shot:
            self.report.update(
                scoring_seconds=seconds,
                pruning_rounds=self.args.pruning_rounds,
                layer_allocation=self.args.layer_allocation,
                bn_recalibration_images=recalibrated,
            )
        else:
            self.report["pruning_seconds"] = seconds
        return self.report

    def shares_scores(self) -> bool:
        """Whether one scoring pass can serve several sparsities: a one-shot method in one round."""
        return self.method.one_shot and self.args.pruning_rounds == 1

    def install(self, masks: Mapping[str, torch.Tensor], started: bool = False) -> None:
        """Zero the pruned weights and enforce `masks` from now on.

        Args:
            masks: bool tensors keyed by parameter name, True = kept.
            started: True when called during training (e.g. a method that prunes after a warm-up): gradients and
                optimizer state are masked from now on instead of from the start of training.
        """
        masks = dict(masks)
        apply_masks(self.model, masks)
        self.set_masks(masks)
        if started:
            self.mask_callback.restart()
        self.log_report()

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Record new masks without touching the weights (schedules that apply them their own way); with
        `mask_standardized_kernels`, weight-standardised convolutions compute with the masked kernel from now on."""
        self.masks = dict(masks)
        self._report = None
        self.sync_kernel_masks(self.masks)

    def sync_kernel_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Weight-standardised convolutions compute with the masked kernel (`mask_standardized_kernels`, or a model
        that already did, e.g. loaded from a folder trained so); the others with their whole kernel."""
        standardized = standardized_weight_layers(self.model, masks) if self.args.mask_standardized_kernels else []
        sync_kernel_masks(self.model, masks, standardized, self.args.kernel_mask_statistics)

    # --- checkpoint state ---------------------------------------------------------------------------------------
    def state(self) -> PruningState:
        """What a checkpoint needs to continue: the masks, the method and its settings, its state, the target."""
        return PruningState(
            pruning_method=self.args.pruning_method,
            target_sparsity=float(self.args.sparsity),
            masks=self.masks,
            pruning_method_args=self.method.config.to_dict(),
            method_state=dict(self.method.state_dict()),
        )

    def save_state(self, folder: str | os.PathLike) -> None:
        """Write `pruning_state.safetensors` into `folder` (created if needed; the file is written atomically).

        A model sharded by FSDP2 writes `pruning_state_sharded/` instead, each process its own rows of the masks
        (`hf_tgprune.io.serialization.sharded_state`); every process must call it then.
        """
        os.makedirs(folder, exist_ok=True)
        if self.mesh is not None and self.masks is not None:
            write_sharded_pruning_state(self.state(), folder)
        else:
            write_pruning_state(self.state(), os.path.join(folder, PRUNING_STATE_NAME))

    def load_state(self, folder: str | os.PathLike) -> None:
        """Restore and verify what `save_state` wrote, and let the method continue from it.

        Refuses (with a message naming the fix) a checkpoint of another method or target sparsity, masks whose
        content does not match their recorded hash, and truncated files.
        """
        path = os.path.join(folder, PRUNING_STATE_NAME)
        if os.path.isdir(os.path.join(folder, SHARDED_STATE_NAME)):  # written sharded: read shard by shard
            state = read_sharded_pruning_state(folder, self.prunable_parameters())
        elif os.path.isfile(path):
            state = read_pruning_state(path)
            if self.mesh is not None and state.masks is not None:  # an unsharded checkpoint resumed under FSDP2
                params = self.prunable_parameters()
                state.masks = {name: shard_like(mask, params[name]) for name, mask in state.masks.items()}
        else:
            raise MaskFileError(
                f"{str(folder)!r} has no {PRUNING_STATE_NAME}: it was not written by hf_tgprune, so its masks cannot "
                "be restored. Resume from one of its own checkpoints."
            )
        if state.pruning_method != self.args.pruning_method and not (
            self.method.one_shot and get_method(state.pruning_method).one_shot
        ):  # one-shot masks are fixed, whichever criterion made them; a schedule's state belongs to its method
            raise ValueError(
                f"{str(folder)!r} was written by a pruning_method={state.pruning_method!r} run, but this run uses "
                f"pruning_method={self.args.pruning_method!r}. Resume with the checkpoint's method, or start a new "
                "run in another output_dir."
            )
        if abs(state.target_sparsity - self.args.sparsity) > 1e-12:
            raise ValueError(
                f"{str(folder)!r} was trained at sparsity={state.target_sparsity}, but this run asks for "
                f"sparsity={self.args.sparsity}. Resume with the checkpoint's sparsity, or start a new run in another "
                "output_dir."
            )
        settings = self.method.config.to_dict()
        if not self.method.one_shot and state.pruning_method_args != settings:
            raise ValueError(
                f"{str(folder)!r} was written with pruning_method_args={state.pruning_method_args}, but this run has "
                f"{settings}: the schedule would continue differently from the one that made its masks. Resume with "
                "the checkpoint's pruning_method_args, or start a new run in another output_dir."
            )
        self.method.load_state_dict(state.method_state)
        self.method.resume(self, state.masks)
        self.pruned = True
