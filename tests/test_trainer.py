import copy

import pytest
import torch
import torch.nn.functional as F

from hf_tgprune import GlobalMaskCallback, TeacherGuidedPruningTrainer, mask_hash
from tests.utils import RandomImages, make_model, tiny_config


def _config(tmp_path, **overrides):
    return tiny_config(tmp_path, **{"sparsity": 0.9, "max_steps": 4, "learning_rate": 0.05, **overrides})


def _trainer(tmp_path, student="timm_resnet", teacher="hf_resnet", **overrides):
    return TeacherGuidedPruningTrainer(
        model=make_model(student, seed=0),
        teacher_model=make_model(teacher, seed=1) if teacher else None,
        args=_config(tmp_path, **overrides),
        train_dataset=RandomImages(32),
        eval_dataset=RandomImages(16, seed=1),
    )


def _assert_pruned_weights_and_state_are_zero(model, optimizer, masks):
    params = dict(model.named_parameters())
    state = optimizer.state
    for name, mask in masks.items():
        param = params[name]
        assert torch.count_nonzero(param[~mask]) == 0, name
        for value in state[param].values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                assert torch.count_nonzero(value[~mask]) == 0, name


@pytest.mark.parametrize(
    "student,teacher", [("timm_resnet", "hf_resnet"), ("hf_resnet", "timm_resnet"), ("hf_vit", "timm_vit")]
)
def test_prune_exact_sparsity_and_frozen_teacher(tmp_path, student, teacher):
    trainer = _trainer(tmp_path, student, teacher, sparsity=0.95)
    report = trainer.prune()
    n = report["prunable"]["numel"]
    assert sum(int((~m).sum()) for m in trainer.masks.values()) == round(0.95 * n)
    assert report["pruned_by_mask"] == round(0.95 * n)
    assert report["prunable"]["zeros"] >= round(0.95 * n)
    assert report["total"]["numel"] > n and report["total"]["sparsity"] < report["prunable"]["sparsity"]
    assert set(report["layers"]) == set(trainer.masks)
    assert not trainer.teacher_model.training
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())
    assert trainer.prune() is report  # one scoring pass only


@pytest.mark.parametrize(
    "optim,extra",
    [
        ("sgd", dict(optim_args="momentum=0.9", weight_decay=0.1)),
        ("adamw_torch", dict(weight_decay=0.1)),
        ("sgd", dict(optim_args="momentum=0.9", weight_decay=0.1, gradient_accumulation_steps=2, max_grad_norm=0.1)),
        ("adamw_torch", dict(gradient_accumulation_steps=2, max_grad_norm=0.5)),
    ],
)
def test_no_reactivation(tmp_path, optim, extra):
    trainer = _trainer(tmp_path, optim=optim, **extra)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    _assert_pruned_weights_and_state_are_zero(trainer.model, trainer.optimizer, trainer.masks)
    params = dict(trainer.model.named_parameters())
    # training happened: kept weights moved
    assert any(not torch.equal(before[n][m], params[n].detach()[m]) for n, m in trainer.masks.items())
    if optim == "sgd":
        assert any("momentum_buffer" in s for s in trainer.optimizer.state.values())


def test_gradients_seen_by_clipping_are_masked(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.prune()
    seen = {}

    class Spy(GlobalMaskCallback.__mro__[1]):  # a plain TrainerCallback
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            params = dict(model.named_parameters())
            seen.update({n: params[n].grad.clone() for n in trainer.masks})

    trainer.add_callback(Spy())
    trainer.train()
    assert seen and all(torch.count_nonzero(seen[n][~m]) == 0 for n, m in trainer.masks.items())


def test_resume_restores_masks(tmp_path):
    trainer = _trainer(tmp_path, save_strategy="steps", save_steps=2, max_steps=2)
    trainer.train()
    original = mask_hash(trainer.masks)
    # a fresh trainer with a differently initialised student resumes from the checkpoint
    resumed = _trainer(tmp_path, save_strategy="steps", save_steps=2, max_steps=4, pruning_method="random")
    resumed.train(resume_from_checkpoint=True)
    assert mask_hash(resumed.masks) == original
    assert resumed.state.global_step == 4
    _assert_pruned_weights_and_state_are_zero(resumed.model, resumed.optimizer, resumed.masks)


def _two_checkpoints(tmp_path, **overrides):
    trainer = _trainer(tmp_path, save_strategy="steps", save_steps=2, max_steps=4, **overrides)
    trainer.train()
    return trainer, tmp_path / "out" / "checkpoint-2", tmp_path / "out" / "checkpoint-4"


def test_masks_are_written_with_the_checkpoint_before_it_counts_as_complete(tmp_path, monkeypatch):
    """Masks are saved with the model (inside `_save`), before the optimizer state and trainer_state.json."""
    from hf_tgprune.io.serialization.pruning_state import PRUNING_STATE_NAME

    order = []
    trainer = _trainer(tmp_path, save_strategy="steps", save_steps=2, max_steps=2)
    original = trainer._save_optimizer_and_scheduler

    def spy(output_dir):
        order.append(("masks present", (tmp_path / "out" / "checkpoint-2" / PRUNING_STATE_NAME).is_file()))
        return original(output_dir)

    monkeypatch.setattr(trainer, "_save_optimizer_and_scheduler", spy)
    trainer.train()
    assert order == [("masks present", True)]


def test_resume_true_skips_an_incomplete_newest_checkpoint(tmp_path):
    """A kill while checkpoint-4 was written (no trainer_state.json yet): resume picks checkpoint-2."""
    trainer, second, newest = _two_checkpoints(tmp_path)
    (newest / "trainer_state.json").unlink()
    resumed = _trainer(tmp_path, save_strategy="no", max_steps=4)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4 and mask_hash(resumed.masks) == mask_hash(trainer.masks)


def test_resume_refuses_modified_masks(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from hf_tgprune.core.masking import MaskFileError
    from hf_tgprune.io.serialization.pruning_state import PRUNING_STATE_NAME

    _, _, newest = _two_checkpoints(tmp_path)
    path = newest / PRUNING_STATE_NAME
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.startswith("mask."))
    tensors[name].view(-1)[0] = ~tensors[name].view(-1)[0]  # one flipped bit, header kept
    save_file(tensors, str(path), metadata)
    with pytest.raises(MaskFileError, match="do not match the hash"):
        _trainer(tmp_path, max_steps=6).train(resume_from_checkpoint=str(newest))


def test_resume_refuses_truncated_masks_naming_the_file(tmp_path):
    from hf_tgprune.core.masking import MaskFileError
    from hf_tgprune.io.serialization.pruning_state import PRUNING_STATE_NAME

    _, _, newest = _two_checkpoints(tmp_path)
    path = newest / PRUNING_STATE_NAME
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(MaskFileError, match="pruning_state.safetensors.*truncated or corrupted"):
        _trainer(tmp_path, max_steps=6).train(resume_from_checkpoint=str(newest))


def test_resume_refuses_another_target_sparsity(tmp_path):
    _, _, newest = _two_checkpoints(tmp_path)
    with pytest.raises(ValueError, match="trained at sparsity=0.9, but this run asks for sparsity=0.95"):
        _trainer(tmp_path, max_steps=6, sparsity=0.95).train(resume_from_checkpoint=str(newest))


def test_resume_from_foreign_checkpoint_is_an_error(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ValueError, match="pruning_state.safetensors"):
        _trainer(tmp_path).train(resume_from_checkpoint=str(tmp_path / "ckpt"))


def test_compute_loss_kd_and_ce(tmp_path):
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 3])}
    ce_trainer = _trainer(tmp_path, retrain_with_kd=False)
    ce = ce_trainer.compute_loss(ce_trainer.model, batch)
    torch.testing.assert_close(ce, F.cross_entropy(ce_trainer.model(batch["pixel_values"]), batch["labels"]))
    kd_trainer = _trainer(tmp_path, retrain_with_kd=True, alpha=1.0)
    kd = kd_trainer.compute_loss(kd_trainer.model, batch)
    assert not torch.allclose(kd, ce)


def test_sparsity_zero_is_a_no_op(tmp_path):
    trainer = _trainer(tmp_path, sparsity=0.0)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    report = trainer.prune()
    assert report["pruned_by_mask"] == 0
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert not any(isinstance(c, GlobalMaskCallback) for c in trainer.callback_handler.callbacks)


def test_weights_stay_plain_parameters(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train()
    model = trainer.model
    assert not any("orig" in k or "mask" in k for k in model.state_dict())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    clone = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), clone.eval()
    torch.testing.assert_close(clone(x), model(x))


def test_evaluate_reports_loss_and_metrics(tmp_path):
    def accuracy(pred):
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    trainer = TeacherGuidedPruningTrainer(
        model=make_model("timm_resnet"),
        teacher_model=make_model("hf_resnet", seed=1),
        args=_config(tmp_path),
        train_dataset=RandomImages(16),
        eval_dataset=RandomImages(16, seed=1),
        compute_metrics=accuracy,
    )
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and 0.0 <= metrics["eval_accuracy"] <= 1.0


# --- bad input: clear errors before any work starts --------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(sparsity=1.0), "sparsity must be in \\[0, 1\\)"),
        (dict(sparsity=-0.5), "sparsity"),
        (dict(pruning_method="obd"), "Unknown pruning_method"),
        (dict(alpha=2.0), "alpha"),
        (dict(score_aggregation="mean"), "score_aggregation"),
        (dict(pruning_rounds=0), "pruning_rounds must be >= 1"),
        (dict(pruning_rounds=3, pruning_method="imp"), "pruning_rounds=3 applies to one-shot methods"),
        # scoring rounds asked of the default, gradual: the message says it was the default and names tgp_fisher
        (dict(pruning_rounds=3, pruning_method=None), r"'gradual' \(the default, left unset\).*'tgp_fisher'"),
        (dict(layer_allocation="uniform"), "layer_allocation must be one of"),
        (dict(scoring_epochs=-1), "scoring_epochs must be >= 0"),
        (dict(recalibration_samples=0), "recalibration_samples must be >= 1"),
        (dict(sparsity=0.98, min_layer_density=0.05), "cannot be reached with min_layer_density=0.05"),
    ],
)
def test_bad_config(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **overrides)


def test_bad_trainer_inputs(tmp_path):
    args = _config(tmp_path)
    student = make_model("timm_resnet")
    teacher = make_model("hf_resnet", seed=1)
    with pytest.raises(ValueError, match="calibration set is empty"):
        TeacherGuidedPruningTrainer(student, teacher, args, train_dataset=RandomImages(8), calibration_dataset=[])
    with pytest.raises(ValueError, match="no labels"):
        TeacherGuidedPruningTrainer(student, teacher, args, train_dataset=RandomImages(8, labels=False))


def test_default_magnitude_needs_images_for_batchnorm_recalibration(tmp_path):
    """The default criterion is data-free, but recalibrating BatchNorm is not: an early error names both fixes."""
    student, teacher = make_model("timm_resnet"), make_model("hf_resnet", seed=1)
    args = _config(tmp_path, pruning_method="magnitude")
    with pytest.raises(ValueError, match="calibration set is empty.*recalibrate_bn=False"):
        TeacherGuidedPruningTrainer(student, teacher, args)
    quiet = _config(tmp_path, pruning_method="magnitude", recalibrate_bn=False)
    assert TeacherGuidedPruningTrainer(student, teacher, quiet).prune()["bn_recalibration_images"] == 0
    unlabelled = TeacherGuidedPruningTrainer(student, teacher, args, train_dataset=RandomImages(16, labels=False))
    assert unlabelled.prune()["bn_recalibration_images"] == 16
    with pytest.raises(ValueError, match="number of labels"):
        TeacherGuidedPruningTrainer(
            student, make_model("hf_resnet", num_labels=7), args, train_dataset=RandomImages(8)
        )
    with pytest.raises(ValueError, match="prune_include"):
        TeacherGuidedPruningTrainer(
            student, teacher, _config(tmp_path, prune_include=["nope"]), train_dataset=RandomImages(8)
        )
    with pytest.raises(ValueError, match="No prunable parameters"):
        TeacherGuidedPruningTrainer(
            student, teacher, _config(tmp_path, prune_exclude=["."]), train_dataset=RandomImages(8)
        )
    with pytest.raises(ValueError, match="teacher_model"):
        TeacherGuidedPruningTrainer(
            student, None, _config(tmp_path, retrain_with_kd=False), train_dataset=RandomImages(8)
        )
    with pytest.raises(ValueError, match="retrain_with_kd"):
        TeacherGuidedPruningTrainer(
            student, None, _config(tmp_path, pruning_method="snip"), train_dataset=RandomImages(8)
        )


def test_non_finite_scores_name_the_layer(tmp_path):
    trainer = _trainer(tmp_path)
    first = next(iter(dict(trainer.model.named_parameters())))
    with torch.no_grad():
        dict(trainer.model.named_parameters())[first].view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        trainer.prune()
    assert trainer.masks is None


def test_empty_masks_point_to_the_dense_method(tmp_path):
    with pytest.raises(ValueError, match="pruning_method='dense'"):
        TeacherGuidedPruningTrainer(
            model=make_model("timm_resnet"), args=_config(tmp_path, retrain_with_kd=False), masks={}
        )


def test_dense_method_trains_densely(tmp_path):
    trainer = TeacherGuidedPruningTrainer(
        model=make_model("timm_resnet"),
        teacher_model=make_model("hf_resnet", seed=1),
        args=_config(tmp_path, pruning_method="dense"),
        train_dataset=RandomImages(16),
    )
    trainer.train()
    assert trainer.masks is None and trainer.pruning_report is None
    assert not any(isinstance(c, GlobalMaskCallback) for c in trainer.callback_handler.callbacks)
    assert sum(int((p == 0).sum()) for p in trainer.model.parameters()) < 0.01 * sum(
        p.numel() for p in trainer.model.parameters()
    )


def test_torch_compile_keeps_masks(tmp_path):
    """Dynamo + AOTAutograd trace the masked student (plain parameters, grad hooks); pruned weights stay zero."""
    trainer = _trainer(tmp_path, optim="sgd", optim_args="momentum=0.9", max_steps=2)
    trainer.prune()
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, GlobalMaskCallback))
    model = trainer.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=model, optimizer=optimizer)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(4, 3, 32, 32)
    for _ in range(2):
        compiled(x).logsumexp(-1).mean().backward()
        optimizer.step()
        callback.on_optimizer_step(trainer.args, trainer.state, trainer.control, optimizer=optimizer)
        optimizer.zero_grad()
    callback.on_train_end(trainer.args, trainer.state, trainer.control)
    _assert_pruned_weights_and_state_are_zero(model, optimizer, trainer.masks)
    model.eval()
    torch.testing.assert_close(compiled(x), model(x))


# --- issue 8 techniques through the trainer ------------------------------------------------------------------------
@pytest.mark.parametrize("rounds,bn_mode", [(1, "train"), (3, "train"), (3, "eval")])  # eval: recalibrated between
def test_prune_recalibrates_batchnorm_unless_disabled(tmp_path, rounds, bn_mode):
    """recalibrate_bn=False leaves the BatchNorm buffers untouched, also after rounds that recalibrated between them."""
    running = {}
    for flag in (True, False):
        trainer = _trainer(
            tmp_path / str(flag),
            recalibrate_bn=flag,
            recalibration_samples=24,
            pruning_rounds=rounds,
            scoring_bn_mode=bn_mode,
        )
        names = ("running_mean", "running_var", "num_batches_tracked")
        before = {k: v.clone() for k, v in trainer.model.state_dict().items() if k.endswith(names)}
        report = trainer.prune()
        assert report["bn_recalibration_images"] == (24 if flag else 0)
        after = trainer.model.state_dict()
        running[flag] = any(not torch.equal(before[k], after[k]) for k in before)
    assert running == {True: True, False: False}


@pytest.mark.parametrize(
    "overrides,method,rounds,bn_mode",
    [
        # the trainer's default: pruning during retraining, the method that loses least across both measured regimes
        ({}, "gradual", 1, "train"),
        ({"sparsity_pattern": "2:4"}, "tgp_fisher", 1, "train"),  # N:M left to the default: one-shot, one round
        ({"pruning_method": "tgp_fisher"}, "tgp_fisher", 5, "train"),  # the one-shot default scores in 5 rounds
        ({"pruning_method": "magnitude"}, "magnitude", 1, "train"),  # global magnitude is one option away
        ({"pruning_method": "tgp"}, "tgp", 1, "train"),  # the paper's criterion is one option away
        ({"pruning_method": "imp"}, "imp", 1, "train"),  # methods with a schedule of their own score once
        ({"pruning_method": "tgp_fisher", "sparsity_pattern": "2:4"}, "tgp_fisher", 1, "train"),  # N:M: no rounds
        ({"pruning_method": "tgp", "pruning_rounds": 3}, "tgp", 3, "train"),
        ({"pruning_method": "tgp_fisher", "pruning_rounds": 2, "scoring_bn_mode": "eval"}, "tgp_fisher", 2, "eval"),
    ],
)
def test_default_method_rounds_and_batchnorm_mode(tmp_path, overrides, method, rounds, bn_mode):
    from hf_tgprune import TeacherGuidedPruningConfig

    args = TeacherGuidedPruningConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **overrides)
    assert (args.pruning_method, args.pruning_rounds, args.scoring_bn_mode) == (method, rounds, bn_mode)


@pytest.mark.parametrize(
    "method,bn_mode,expected",
    [
        # eval-mode scoring reads the running statistics: re-estimated between rounds (2) and after the final mask (1)
        ("tgp", "eval", 3),
        ("tgp_fisher", "eval", 3),
        # train-mode scoring normalises with each batch's statistics, magnitude reads no image: only the final one
        ("tgp", "train", 1),
        ("tgp_fisher", "train", 1),
        ("magnitude", "eval", 1),
    ],
)
def test_iterative_rounds_exact_count_and_k_scoring_passes(tmp_path, method, bn_mode, expected, monkeypatch):
    trainer = _trainer(tmp_path, pruning_method=method, pruning_rounds=3, sparsity=0.95, scoring_bn_mode=bn_mode)
    calls = []
    pruner = trainer.pruner
    original = pruner.compute_scores
    monkeypatch.setattr(pruner, "compute_scores", lambda *a, **k: calls.append(1) or original(*a, **k))
    recalibrations = []
    original_recal = pruner.recalibrate_batchnorm
    monkeypatch.setattr(pruner, "recalibrate_batchnorm", lambda: recalibrations.append(1) or original_recal())
    report = trainer.prune()
    assert len(calls) == 3  # one scoring pass per round
    assert len(recalibrations) == expected
    n = report["prunable"]["numel"]
    assert report["pruned_by_mask"] == round(0.95 * n)
    assert report["pruning_rounds"] == 3


@pytest.mark.parametrize("samples,expected", [(32, 1), (17, 3)])  # 17 images: batches of 16 and of 1
def test_train_mode_rounds_recalibrate_only_for_a_one_image_batch(tmp_path, samples, expected, monkeypatch):
    """With train-mode BatchNorm scoring the rounds skip the recalibration between them (each batch normalises with
    its own statistics) and give the masks that recalibrating would give; a one-image batch normalises with the
    running statistics, so then the rounds recalibrate, and skipping would change the masks."""
    from hf_tgprune.pruning.pruner import Pruner

    def masks(name, bn_mode="train", reads=None):
        if reads is not None:
            monkeypatch.setattr(Pruner, "scoring_reads_running_statistics", lambda self: reads)
        settings = dict(
            pruning_method="tgp_fisher", pruning_rounds=3, sparsity=0.95, scoring_bn_mode=bn_mode,
            num_calibration_samples=samples, calibration_batch_size=16,
        )  # fmt: skip
        report = _trainer(tmp_path / name, **settings).prune()
        monkeypatch.undo()
        return report["mask_sha256"]

    calls = []
    original = Pruner.recalibrate_batchnorm
    monkeypatch.setattr(Pruner, "recalibrate_batchnorm", lambda self: calls.append(1) or original(self))
    chosen = masks("chosen")
    assert len(calls) == expected
    assert chosen == masks("recalibrated", reads=True)
    # the check can fail: skipping where scoring reads the statistics changes this network's masks
    assert masks("eval skipped", "eval", reads=False) != masks("eval", "eval")
    if expected > 1:
        assert masks("skipped", reads=False) != chosen


def test_round_masks_do_not_depend_on_recalibrate_bn(tmp_path):
    """Rounds scoring with eval-mode BatchNorm recalibrate between them whatever recalibrate_bn says; it only decides
    whether the final statistics are kept."""
    settings = dict(sparsity=0.95, pruning_method="tgp_fisher", scoring_bn_mode="eval")
    reports = [_trainer(tmp_path / str(flag), recalibrate_bn=flag, **settings).prune() for flag in (True, False)]
    assert reports[0]["pruning_rounds"] == 5 and reports[0]["mask_sha256"] == reports[1]["mask_sha256"]


def test_iterative_rounds_rescore_the_pruned_network(tmp_path):
    """Round 2 scores the network with round 1's mask applied, so 2 rounds differ from one-shot for tgp."""
    # the untrained tiny network's scores keep or empty whole layers but one; with eval-mode BatchNorm at 95% round 2
    # cuts that layer differently (at 90%, or with train-mode BatchNorm, it happens to pick the same weights)
    settings = dict(sparsity=0.95, pruning_method="tgp", scoring_bn_mode="eval")
    one = _trainer(tmp_path / "a", pruning_rounds=1, **settings).prune()
    two = _trainer(tmp_path / "b", pruning_rounds=2, **settings).prune()
    assert one["pruned_by_mask"] == two["pruned_by_mask"]
    assert one["mask_sha256"] != two["mask_sha256"]


@pytest.mark.parametrize("allocation", ["lamp", "magnitude", "lamp_magnitude"])
def test_layer_allocation_through_the_trainer(tmp_path, allocation):
    report = _trainer(tmp_path, layer_allocation=allocation, sparsity=0.98, layer_density_floor=0.0).prune()
    assert report["pruned_by_mask"] == round(0.98 * report["prunable"]["numel"])
    assert report["layer_allocation"] == allocation


def test_scoring_epochs_score_over_whole_epochs_of_the_training_set(tmp_path):
    trainer = _trainer(tmp_path, scoring_epochs=2, calibration_batch_size=8)
    loader = trainer.pruner.calibration_batches(epochs=2)
    seen = [int(b["pixel_values"].shape[0]) for b in loader]
    assert sum(seen) == 2 * len(trainer.train_dataset)  # 2 epochs of the 32 training images, not 16 samples
    first_epoch = torch.cat([b["labels"] for b in list(trainer.pruner.calibration_batches(epochs=2))[:4]])
    assert sorted(first_epoch.tolist()) == sorted(trainer.train_dataset.labels.tolist())
    assert trainer.prune()["pruned_by_mask"] > 0


# --- N:M semi-structured pattern (issue 12) ---------------------------------------------------------------------------
@pytest.mark.parametrize("student", ["timm_resnet", "hf_vit"])
def test_two_four_pattern_exact_per_layer_and_kept_through_training(tmp_path, student):
    from hf_tgprune.core.nm import is_nm_sparse, nm_incompatible_layers

    trainer = _trainer(
        tmp_path, student, "timm_resnet", sparsity_pattern="2:4", optim="sgd", optim_args="momentum=0.9"
    )
    assert trainer.args.sparsity == 0.5
    trainer.prune()
    params = trainer.pruner.prunable_parameters()
    dense = set(nm_incompatible_layers(params, 4))
    assert set(trainer.masks) == set(params) and len(dense) < len(params)
    trainer.train()
    for name, weight in params.items():
        if name in dense:  # input size not a multiple of 4 (e.g. a 3-channel 3x3 stem): left dense
            assert bool(trainer.masks[name].all()), name
        else:
            assert is_nm_sparse(weight.detach(), 2, 4, exact=True), name
            assert int(trainer.masks[name].sum()) == weight.numel() // 2


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(sparsity_pattern="4:2"), "0 < N < M"),
        (dict(sparsity_pattern="2-4"), "'N:M'"),
        (dict(sparsity_pattern="2:4", pruning_rounds=2), "one-shot pruning_method, pruning_rounds=1"),
        (dict(sparsity_pattern="2:4", pruning_method="imp"), "one-shot pruning_method"),
    ],
)
def test_bad_sparsity_pattern(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **overrides)


def test_alpha_zero_prunes_and_retrains_without_a_teacher(tmp_path):
    """With tgp_fisher (and gradual, the default), alpha=0 scores with the cross-entropy's Fisher and retrains with
    CE: no teacher."""
    from hf_tgprune import TeacherGuidedPruningConfig, TeacherGuidedPruningTrainer

    def config(**overrides):
        return TeacherGuidedPruningConfig(
            output_dir=str(tmp_path), report_to="none", use_cpu=True, sparsity=0.8, num_calibration_samples=16,
            calibration_batch_size=8, recalibration_samples=16, disable_tqdm=True, save_strategy="no",
            **{"max_steps": 1, "per_device_train_batch_size": 8, **overrides},
        )  # fmt: skip

    for method in ("tgp_fisher", None):  # None: the default, gradual (which needs 32 steps)
        with pytest.raises(ValueError, match="set alpha=0"):
            TeacherGuidedPruningTrainer(
                model=make_model("timm_resnet"), args=config(pruning_method=method, max_steps=32),
                train_dataset=RandomImages(16),
            )  # fmt: skip
    trainer = TeacherGuidedPruningTrainer(
        model=make_model("timm_resnet"), args=config(alpha=0.0, pruning_method="tgp_fisher"),
        train_dataset=RandomImages(16),
    )  # fmt: skip
    assert trainer.pruner.method.criterion == "tgp_fisher" and trainer.pruner.args.pruning_rounds == 5
    report = trainer.prune()
    assert report["prunable"]["sparsity"] == pytest.approx(0.8, abs=1e-4)
    trainer.train()
    # the default prunes during training: 32 steps (the fewest its 10 updates fit in) of 2 images
    args = config(alpha=0.0, max_steps=32, per_device_train_batch_size=2)
    trainer = TeacherGuidedPruningTrainer(model=make_model("timm_resnet"), args=args, train_dataset=RandomImages(16))
    assert trainer.pruner.args.pruning_method == "gradual"
    trainer.train()
    assert trainer.pruner.report["prunable"]["sparsity"] == pytest.approx(0.8, abs=1e-4)
    with pytest.raises(ValueError, match="one-shot pruning_method"):  # too short for the default: the fix named
        TeacherGuidedPruningTrainer(
            model=make_model("timm_resnet"), args=config(alpha=0.0, max_steps=31), train_dataset=RandomImages(16)
        )


def test_library_does_not_clip_gradients_unless_asked(tmp_path):
    """TrainingArguments' max_grad_norm=1.0 shrinks nearly every KD step; the library's config does not clip."""
    from hf_tgprune import TeacherGuidedPruningConfig

    assert TeacherGuidedPruningConfig(output_dir=str(tmp_path), report_to="none").max_grad_norm == 0.0
    clipped = TeacherGuidedPruningConfig(output_dir=str(tmp_path), report_to="none", max_grad_norm=1.0)
    assert clipped.max_grad_norm == 1.0


def test_pruning_rounds_run_the_teacher_once_and_keep_the_masks(tmp_path, monkeypatch):
    """Rounds score the same calibration images with the frozen teacher: its logits come from the first round
    (`TeacherLogitMemo`), and the masks are those of rounds that run the teacher every time."""
    from hf_tgprune.pruning import pruner as pruner_module

    def prune(name, **overrides):
        settings = dict(pruning_method="tgp_fisher", pruning_rounds=3, sparsity=0.95, calibration_batch_size=8)
        trainer = _trainer(tmp_path / name, **settings, **overrides)
        forwards = []
        trainer.teacher_model.register_forward_hook(lambda *_: forwards.append(1))
        batches = len(trainer.pruner.calibration_batches(epochs=trainer.pruner.args.scoring_epochs))
        return trainer.prune()["mask_sha256"], len(forwards), batches

    memorised, forwards, batches = prune("memo")
    assert batches > 1 and forwards == batches  # one pass over the calibration images
    # scoring over whole training epochs (reshuffled each round, no image seen twice) keeps no memo
    assert prune("epochs", scoring_epochs=1)[1:] == (3 * 32 // 8, 32 // 8)
    monkeypatch.setattr(pruner_module, "TeacherLogitMemo", lambda: None)
    assert prune("no memo") == (memorised, 3 * batches, batches)


class _NoisyImages(RandomImages):
    """Training images with noise drawn from the global random generator (as random augmentations draw theirs)."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        return {**item, "pixel_values": item["pixel_values"] + 0.1 * torch.randn_like(item["pixel_values"])}


@pytest.mark.parametrize("overrides", [{}, {"pruning_method": "tgp_fisher", "pruning_rounds": None}])  # None: 5 rounds
def test_retraining_does_not_read_the_recalibrated_batchnorm_statistics(tmp_path, overrides):
    """Train-mode BatchNorm normalises every training batch with its own statistics, and the recalibration leaves the
    global random state as it found it: the retrained weights are the same whatever the final recalibration (8 or 24
    images, or none), and training overwrites the running statistics it started from (each step keeps
    (1 - momentum) of them)."""
    from hf_tgprune.core.recalibration import batchnorm_layers

    steps, runs = 4, {}
    for samples in (8, 24, 0):
        settings = dict(recalibrate_bn=samples > 0, recalibration_samples=samples or 8, **overrides)
        trainer = TeacherGuidedPruningTrainer(
            model=make_model("timm_resnet", seed=0),
            teacher_model=make_model("hf_resnet", seed=1),
            args=_config(tmp_path / str(samples), max_steps=steps, **settings),
            train_dataset=_NoisyImages(32),
        )
        report = trainer.prune()
        assert report["bn_recalibration_images"] == samples
        layers = batchnorm_layers(trainer.model)
        assert layers and all(layer.momentum is not None for layer in layers.values())
        before = {name: layer.running_mean.clone() for name, layer in layers.items()}
        pruned = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
        trainer.train()
        after = {name: layer.running_mean.clone() for name, layer in layers.items()}
        parameters = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
        assert any(not torch.equal(parameters[name], pruned[name]) for name in pruned)  # it trained
        momenta = {name: layer.momentum for name, layer in layers.items()}
        runs[samples] = report["mask_sha256"], before, after, parameters, momenta
    masks8, before8, after8, parameters8, momenta = runs[8]
    for samples in (24, 0):
        masks, before, after, parameters, _ = runs[samples]
        assert masks == masks8
        assert parameters.keys() == parameters8.keys()
        assert all(torch.equal(parameters[name], parameters8[name]) for name in parameters8)
        assert any(not torch.equal(before[name], before8[name]) for name in before8)  # they did start apart
        for name, momentum in momenta.items():
            decay = (1 - momentum) ** steps
            torch.testing.assert_close(after[name] - after8[name], decay * (before[name] - before8[name]))
