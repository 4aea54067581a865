"""Gradual pruning during retraining (`pruning_method="gradual"`): the schedule, the Fisher of the training loss, the
masks at each update, and resuming an interrupted schedule."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from hf_tgprune import TeacherGuidedPruningTrainer
from hf_tgprune.core.adapters import forward_logits
from hf_tgprune.core.losses import teacher_guided_loss
from hf_tgprune.io.modelcard import create_model_card
from hf_tgprune.methods import build_method
from hf_tgprune.methods.gradual import cubic_schedule
from hf_tgprune.training.trainer import planned_optimizer_steps
from tests.test_methods import _assert_final_state, _config, _num_pruned, _Spy
from tests.utils import RandomImages, make_model


def _trainer(tmp_path, teacher=False, images=32, train_dataset=None, **overrides):
    settings = dict(pruning_method="gradual", retrain_with_kd=teacher, **overrides)
    return TeacherGuidedPruningTrainer(
        model=make_model("timm_resnet", seed=0),
        teacher_model=make_model("hf_resnet", seed=1) if teacher else None,
        args=_config(tmp_path, **settings),
        train_dataset=train_dataset if train_dataset is not None else RandomImages(images),
    )


def test_cubic_schedule_steps_and_levels():
    events = cubic_schedule(0.9, 3, 6)
    assert list(events) == [2, 4, 6]
    assert events[2] == pytest.approx(0.9 * (1 - (2 / 3) ** 3))
    assert events[4] == pytest.approx(0.9 * (1 - (1 / 3) ** 3))
    assert events[6] == 0.9
    assert cubic_schedule(0.5, 1, 7) == {7: 0.5}
    with pytest.raises(ValueError, match="pruning_steps=4 mask updates over 3 training step"):
        cubic_schedule(0.9, 4, 3)


@pytest.mark.parametrize(
    "method_args,field",
    [
        ({"criterion": "snip"}, "criterion"),
        ({"pruning_steps": 0}, "pruning_steps"),
        ({"end_fraction": 0}, "end_fraction"),
    ],
)
def test_gradual_settings_are_validated(tmp_path, method_args, field):
    with pytest.raises(ValueError, match=f"gradual {field}"):
        _config(tmp_path, pruning_method="gradual", pruning_method_args=method_args)


def test_gradual_needs_a_teacher_only_to_retrain_with_kd(tmp_path):
    method = build_method("gradual")
    assert method.needs_teacher(_config(tmp_path, pruning_method="gradual", retrain_with_kd=True))
    assert not method.needs_teacher(_config(tmp_path, pruning_method="gradual", retrain_with_kd=False))
    assert not method.needs_calibration_data()


@pytest.mark.parametrize("criterion", ["fisher", "magnitude"])
def test_sparsity_rises_at_the_scheduled_steps_and_pruned_weights_stay_pruned(tmp_path, criterion):
    # 2 epochs of 4 steps; 3 updates over the first 6 steps: at steps 2, 4 and 6
    trainer = _trainer(
        tmp_path,
        num_train_epochs=2,
        pruning_method_args={"criterion": criterion, "pruning_steps": 3, "end_fraction": 0.75},
    )
    pruned_at, masks_at = {}, {}

    def record(args, state, control, **kwargs):
        pruned_at[state.global_step] = _num_pruned(trainer.masks)
        masks_at[state.global_step] = {name: mask.clone() for name, mask in trainer.masks.items()}

    trainer.add_callback(_Spy(on_step_end=record))
    assert trainer.prune()["pruned_by_mask"] == 0  # training starts dense
    trainer.train()
    n = sum(m.numel() for m in trainer.masks.values())
    levels = cubic_schedule(0.9, 3, 6)
    expected = {step: round(levels[max([e for e in levels if e <= step], default=0)] * n) if step >= 2 else 0
                for step in range(1, 9)}  # fmt: skip
    assert pruned_at == expected
    for step in range(2, 9):  # nested: a pruned weight is never kept again
        for name, mask in masks_at[step].items():
            assert not (mask & ~masks_at[step - 1][name]).any(), (step, name)
    _assert_final_state(trainer)
    assert trainer.pruning_report["schedule_finished"] is True


@pytest.mark.parametrize("teacher", [False, True])
def test_fisher_scores_are_the_summed_squared_gradients_of_the_training_loss(tmp_path, teacher):
    # one batch of all 8 images per step and lr=0: every step's gradient is that of the dense model on the same batch,
    # so the first update (step 2) ranks by θ²·2·g² with g computed independently here
    trainer = _trainer(
        tmp_path,
        teacher=teacher,
        images=8,
        learning_rate=0.0,
        optim_args="momentum=0.0",
        max_steps=4,
        pruning_method_args={"pruning_steps": 2, "end_fraction": 1.0},
    )
    model = trainer.model
    data = RandomImages(8)
    model.train()
    logits = forward_logits(model, data.pixel_values)
    if teacher:
        with torch.no_grad():
            teacher_logits = forward_logits(trainer.teacher_model.eval(), data.pixel_values)
        args = trainer.args
        loss = teacher_guided_loss(
            logits, teacher_logits, data.labels, alpha=args.alpha, beta=args.beta, temperature=args.temperature
        )
    else:
        loss = F.cross_entropy(logits, data.labels)
    params = dict(model.named_parameters())
    names = list(trainer.pruner.prunable_parameters())
    grads = dict(zip(names, torch.autograd.grad(loss, [params[name] for name in names])))
    expected = {name: params[name].detach().square() * 2 * grads[name].square() for name in names}

    callback = trainer.method.callback
    seen = []
    score_fn = callback.score_fn
    callback.score_fn = lambda weights, fisher: seen.append(score_fn(weights, fisher)) or seen[-1]
    masks_at = {}

    sums_after_update = []

    def record(args, state, control, **kwargs):
        masks_at.setdefault(state.global_step, {name: mask.clone() for name, mask in trainer.masks.items()})
        if state.global_step == 2:  # the update of this step has run: the sums start again from zero
            sums_after_update.append(sum(float(total.abs().sum()) for total in callback.fisher.values()))

    trainer.add_callback(_Spy(on_step_end=record))
    trainer.train()
    assert len(seen) == 2
    for name in names:  # the trainer's batch comes in another order: sums differ in their last bits
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(seen[0][name], expected[name], rtol=1e-3, atol=1e-4 * scale + 1e-30, msg=name)
    assert sum(float(fisher.sum()) > 0 for fisher in expected.values()) >= 5  # a test of more than zeros
    # the update keeps the highest scores (global allocation, the layer guard, exact count)
    first = trainer.pruner.select_masks(seen[0], cubic_schedule(0.9, 2, 4)[2])
    assert all(torch.equal(mask, masks_at[2][name]) for name, mask in first.items())
    assert sums_after_update == [0.0]
    assert _num_pruned(first) == round(0.9 * (1 - 0.5**3) * sum(m.numel() for m in first.values()))


def test_training_stopped_early_completes_the_masks_at_the_target(tmp_path, caplog):
    trainer = _trainer(tmp_path, num_train_epochs=2, pruning_method_args={"pruning_steps": 3, "end_fraction": 1.0})

    def stop(args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= 1

    trainer.add_callback(_Spy(on_step_end=stop))
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert trainer.state.global_step == 1
    assert "Training ended before the pruning schedule did" in caplog.text
    _assert_final_state(trainer)
    assert trainer.pruning_report["schedule_finished"] is True


@pytest.mark.parametrize("length", [dict(max_steps=3), dict(num_train_epochs=1)])  # 3 steps; 4 steps (32 images)
def test_too_short_a_run_is_refused_when_the_trainer_is_built(tmp_path, length):
    with pytest.raises(ValueError, match="pruning_steps=5 mask updates over [34] training step.*lower pruning_steps"):
        _trainer(tmp_path, pruning_method_args={"pruning_steps": 5, "end_fraction": 1.0}, **length)


class _Stream(torch.utils.data.IterableDataset):
    """Training examples without a length: the run's steps are known only when training starts."""

    def __init__(self, n):
        self.images = RandomImages(n)

    def __iter__(self):
        return (self.images[i] for i in range(len(self.images)))


def test_too_short_a_run_without_a_dataset_length_is_refused_before_the_first_step(tmp_path):
    trainer = _trainer(
        tmp_path, train_dataset=_Stream(32), max_steps=3, pruning_method_args={"pruning_steps": 4, "end_fraction": 1.0}
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match="lower pruning_steps"):
        trainer.train()
    assert all(torch.equal(before[name], p) for name, p in trainer.model.named_parameters())


@pytest.mark.parametrize(
    "images,settings",
    [
        (32, dict(num_train_epochs=2)),
        (30, dict(num_train_epochs=1, gradient_accumulation_steps=3)),  # 4 batches, the last 6 images
        (30, dict(num_train_epochs=2.5, dataloader_drop_last=True)),
        (40, dict(num_train_epochs=3, per_device_train_batch_size=16, gradient_accumulation_steps=2)),
        (32, dict(max_steps=7)),
    ],
)
def test_planned_optimizer_steps_count_as_the_trainer_counts(tmp_path, images, settings):
    trainer = TeacherGuidedPruningTrainer(
        model=make_model("timm_resnet", seed=0),
        args=_config(tmp_path, pruning_method="dense", retrain_with_kd=False, **settings),
        train_dataset=RandomImages(images),
    )
    max_steps = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]
    assert planned_optimizer_steps(trainer.args, images) == max_steps


def test_interrupted_gradual_schedule_resumes_to_the_same_masks_and_weights(tmp_path):
    # 3 epochs of 4 steps; updates at steps 3 and 6; checkpoint-4 holds one step of summed squared gradients
    settings = dict(
        teacher=True,
        num_train_epochs=3,
        save_strategy="steps",
        save_steps=2,
        pruning_method_args={"pruning_steps": 2, "end_fraction": 0.5},
    )
    full = _trainer(tmp_path / "full", **settings)
    full.train()
    weights = {k: v.detach().clone() for k, v in full.model.state_dict().items()}
    masks = dict(full.masks)
    resumed = _trainer(tmp_path / "full", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-4"))
    assert all(torch.equal(mask, resumed.masks[name]) for name, mask in masks.items())
    state = resumed.model.state_dict()
    for name, value in weights.items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    _assert_final_state(resumed)


def test_a_step_with_overflowed_gradients_adds_nothing_to_the_sums(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1, pruning_method_args={"pruning_steps": 1, "end_fraction": 1.0})
    trainer.prune()
    callback = trainer.method.callback
    params = dict(trainer.model.named_parameters())
    callback._named = params
    callback._reset_fisher()
    name = next(iter(callback.fisher))
    for other in callback.fisher:
        params[other].grad = torch.ones_like(params[other])
    callback.on_pre_optimizer_step(None, None, None)
    assert float(callback.fisher[name].sum()) == params[name].numel()
    params[name].grad[0].view(-1)[0] = float("inf")  # fp16 loss scaling overflowed: the optimizer skips this step
    callback.on_pre_optimizer_step(None, None, None)
    assert all(float(total.sum()) == total.numel() for total in callback.fisher.values())


def test_resume_refuses_other_schedule_settings(tmp_path):
    settings = dict(num_train_epochs=1, save_strategy="steps", save_steps=2)
    _trainer(tmp_path, pruning_method_args={"pruning_steps": 2, "end_fraction": 1.0}, **settings).train()
    other = _trainer(tmp_path, pruning_method_args={"pruning_steps": 3, "end_fraction": 1.0}, **settings)
    with pytest.raises(ValueError, match="was written with pruning_method_args=.*Resume with the checkpoint's"):
        other.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


def test_best_checkpoint_from_before_the_final_masks_is_not_loaded(tmp_path, caplog):
    # the first evaluation scores best: its checkpoint (step 2) predates the final masks (step 6)
    scores = iter(range(100, 0, -1))
    trainer = TeacherGuidedPruningTrainer(
        model=make_model("timm_resnet", seed=0),
        args=_config(
            tmp_path,
            pruning_method="gradual",
            retrain_with_kd=False,
            num_train_epochs=2,
            pruning_method_args={"pruning_steps": 3, "end_fraction": 0.75},
            eval_strategy="steps",
            eval_steps=2,
            save_strategy="steps",
            save_steps=2,
            load_best_model_at_end=True,
            metric_for_best_model="score",
            greater_is_better=True,
        ),
        train_dataset=RandomImages(32),
        eval_dataset=RandomImages(8),
        compute_metrics=lambda prediction: {"score": next(scores)},
    )
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert "was saved before the masks reached their final state" in caplog.text
    _assert_final_state(trainer)


def test_saved_record_and_card_say_pruned_during_training_without_calibration_images(tmp_path):
    trainer = _trainer(tmp_path, max_steps=4, pruning_method_args={"pruning_steps": 2, "end_fraction": 1.0})
    trainer.train()
    trainer.save_model()
    record = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert record["method"] == "gradual" and record["one_shot"] is False
    assert record["calibration_size"] is None  # gradual scores by the training gradients: no calibration images
    text = create_model_card(tmp_path / "out").content
    assert "by unstructured pruning during training with `gradual`" in text and "Calibration samples" not in text


def test_prune_before_training_says_the_schedule_prunes_during_training(tmp_path, caplog):
    trainer = _trainer(tmp_path, pruning_method_args="pruning_steps=2,end_fraction=1", max_steps=4)
    with caplog.at_level(logging.INFO, logger="hf_tgprune"):
        report = trainer.prune()
    assert report["prunable"]["sparsity"] == 0 and report["schedule_finished"] is False
    assert "gradual prunes during training: 0.0000 sparsity over prunable weights now, 0.9000 once" in caplog.text
    assert "Pruned gradual" not in caplog.text
