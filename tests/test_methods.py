"""Pruning methods (hf_tgprune.methods): the registry, method settings, and the seed baselines EPSD, DG2PF, IMP."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from hf_tgprune import TeacherGuidedPruningTrainer, compute_importance_scores
from hf_tgprune.core.callbacks import ScheduledMaskCallback
from hf_tgprune.core.masking import prunable_parameters
from hf_tgprune.core.scoring import ScoringOptions
from hf_tgprune.methods import METHODS, PruningMethod, build_method, register_method
from hf_tgprune.methods.imp import imp_sparsities
from tests.utils import RandomImages, make_model, tiny_config


def _config(tmp_path, **overrides):
    defaults = dict(sparsity=0.9, num_train_epochs=1, learning_rate=0.05, optim="sgd", optim_args="momentum=0.9")
    return tiny_config(tmp_path, **{**defaults, **overrides})


def _trainer(tmp_path, teacher=False, **overrides):
    return TeacherGuidedPruningTrainer(
        model=make_model("timm_resnet", seed=0),
        teacher_model=make_model("hf_resnet", seed=1) if teacher else None,
        args=_config(tmp_path, **overrides),
        train_dataset=RandomImages(32),  # 4 steps per epoch
    )


def _num_pruned(masks):
    return sum(int((~m).sum()) for m in masks.values())


def _assert_final_state(trainer):
    """Exact sparsity, pruned weights and their optimizer state exactly zero."""
    n = sum(m.numel() for m in trainer.masks.values())
    assert _num_pruned(trainer.masks) == round(trainer.args.sparsity * n)
    params = dict(trainer.model.named_parameters())
    for name, mask in trainer.masks.items():
        assert torch.count_nonzero(params[name].detach()[~mask]) == 0, name
        for value in trainer.optimizer.state.get(params[name], {}).values():
            if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                assert torch.count_nonzero(value[~mask]) == 0, name


class _Spy(TrainerCallback):
    def __init__(self, **events):
        for event, fn in events.items():
            setattr(self, event, fn)


@pytest.mark.parametrize(
    "method", ["tgp", "tgp_fisher", "snip", "grad", "magnitude", "random", "epsd", "dg2pf", "imp", "gradual", "dense"]
)
def test_config_accepts_every_registered_method(tmp_path, method):
    assert _config(tmp_path, pruning_method=method).pruning_method == method
    assert method in METHODS


def test_registry_refuses_a_duplicate_name():
    class Again(PruningMethod):
        name = "tgp"
        criterion = "tgp"

    with pytest.raises(ValueError, match="pruning_method named 'tgp' is already registered"):
        register_method(Again)


def test_method_settings_from_dict_json_or_key_value_string(tmp_path):
    for args in (
        {"rounds": 3, "epochs_per_round": 2},
        '{"rounds": 3, "epochs_per_round": 2}',
        "rounds=3,epochs_per_round=2",
    ):
        method = build_method("imp", args)
        assert method.config.rounds == 3 and method.config.epochs_per_round == 2
    assert build_method("imp", "rounds=None").config.rounds is None
    with pytest.raises(ValueError, match=r"\['warmup_steps'\] are not settings of pruning_method='imp'"):
        _config(tmp_path, pruning_method="imp", pruning_method_args={"warmup_steps": 3})
    with pytest.raises(ValueError, match="are not settings of pruning_method='tgp'; its settings are none"):
        _config(tmp_path, pruning_method="tgp", pruning_method_args="rounds=2")


def test_dense_method_trains_without_pruning(tmp_path):
    trainer = _trainer(tmp_path, teacher=True, pruning_method="dense", max_steps=2)
    assert trainer.args.sparsity == 0.0
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert trainer.prune() is None and trainer.masks is None
    trainer.train()
    assert trainer.masks is None and trainer.state.global_step == 2
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


@pytest.mark.parametrize(
    "method,kd,expected",
    [
        ("tgp", False, True),
        ("snip", False, False),
        ("snip", True, True),
        ("epsd", True, False),
        ("dg2pf", True, False),
        ("imp", False, False),
        ("imp", True, True),
    ],
)
def test_needs_teacher(tmp_path, method, kd, expected):
    assert build_method(method).needs_teacher(_config(tmp_path, pruning_method=method, retrain_with_kd=kd)) is expected


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(pruning_method="dg2pf", pruning_method_args={"gradual_pruning_epochs": 0}), "gradual_pruning_epochs"),
        (dict(pruning_method="imp", pruning_method_args={"rounds": 0}), "imp rounds"),
        (dict(pruning_method="imp", pruning_method_args={"prune_fraction": 1.0}), "prune_fraction"),
        (dict(pruning_method="dg2pf", pruning_method_args={"self_kd_alpha": 1.5}), "self_kd_alpha"),
        (dict(pruning_method="epsd", pruning_method_args={"warmup_steps": -1}), "warmup_steps"),
        (dict(pruning_method="imp", pruning_method_args="rounds"), "key=value"),
    ],
)
def test_bad_method_settings(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **overrides)


# --- EPSD -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("aggregation", ["ema", "sum"])
def test_epsd_scores_match_autograd(aggregation):
    model = make_model("timm_resnet", seed=0)
    data = RandomImages(12)
    batches = [{"pixel_values": data.pixel_values[i : i + 4], "labels": data.labels[i : i + 4]} for i in (0, 4, 8)]
    lam, temperature = 0.7, 2.5
    options = ScoringOptions(temperature=temperature, self_distillation_weight=lam)
    scores = compute_importance_scores(model, batches, method="epsd", options=options, aggregation=aggregation)

    params = prunable_parameters(model)
    expected = {name: torch.zeros_like(p) for name, p in params.items()}
    model.eval()
    for batch in batches:
        x, y = batch["pixel_values"], batch["labels"]
        logits = model(x)
        with torch.no_grad():
            target = model(torch.flip(x, dims=[3]))
        kl = F.kl_div(
            F.log_softmax(logits / temperature, -1), F.softmax(target / temperature, -1), reduction="none"
        ).sum(-1)
        loss = (F.cross_entropy(logits, y, reduction="none") + lam * temperature**2 * kl).mean()
        grads = torch.autograd.grad(loss, list(params.values()))
        for (name, p), g in zip(params.items(), grads):
            batch_score = (p.detach() * g).abs()
            if aggregation == "ema":
                expected[name].mul_(0.9).add_(0.1 * batch_score)
            else:
                expected[name].add_(batch_score)
    if aggregation == "ema":
        expected = {name: s / (1 - 0.9**3) for name, s in expected.items()}
    for name in params:
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-4, atol=1e-8)


def test_epsd_warms_up_through_the_trainer_then_prunes_and_trains_without_teacher(tmp_path):
    """The warm-up steps are the Trainer's own steps (its optimizer: AdamW here); pruning happens after step 3."""
    trainer = _trainer(
        tmp_path, pruning_method="epsd", pruning_method_args={"warmup_steps": 3}, sparsity=0.95, optim="adamw_torch"
    )
    assert trainer.teacher_model is None
    assert trainer.prune() is None and trainer.masks is None  # nothing pruned before the warm-up
    pruned_at = []

    def step_end(args, state, control, **kwargs):
        pruned_at.append(trainer.masks is not None)

    trainer.add_callback(_Spy(on_step_end=step_end))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 3])}
    trainer.model.eval()
    ce = F.cross_entropy(trainer.model(batch["pixel_values"]), batch["labels"])
    assert trainer.compute_loss(trainer.model, batch) > ce  # CE + λ·SD
    trainer.train()
    # EPSD's callback (added by prune(), before the spy) prunes at the end of step 3
    assert pruned_at == [False, False, True, True]
    report = trainer.pruning_report
    assert report["warmup_steps"] == 3 and report["method"] == "epsd"
    assert report["pruned_by_mask"] == round(0.95 * report["prunable"]["numel"])
    params = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n][m], params[n].detach()[m]) for n, m in trainer.masks.items())
    assert any("exp_avg" in s for s in trainer.optimizer.state.values())  # the warm-up used the Trainer's AdamW
    _assert_final_state(trainer)


# --- DG2PF ------------------------------------------------------------------------------------------------------
def test_dg2pf_weights_recover_during_schedule_not_after(tmp_path):
    trainer = _trainer(
        tmp_path, pruning_method="dg2pf", pruning_method_args={"gradual_pruning_epochs": 2}, num_train_epochs=4
    )
    report = trainer.prune()
    assert report["pruned_by_mask"] == 0 and not report["schedule_finished"]
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ScheduledMaskCallback))
    n = sum(m.numel() for m in trainer.masks.values())
    seen = {"pruned": [], "revived": None, "dense_moved": False, "finetune_nonzero": 0, "finetune_steps": 0}
    params = dict(trainer.model.named_parameters())
    name = next(iter(trainer.masks))

    def epoch_begin(args, state, control, **kwargs):
        epoch = int(round(state.epoch))
        seen["pruned"].append(_num_pruned(callback.masks))
        if epoch == 1:  # the weight pushed up at the end of epoch 0 was pruned then, and is kept now
            assert callback.masks[name].view(-1)[seen["revived"]]
            assert params[name].view(-1)[seen["revived"]] == 1e3

    def step_end(args, state, control, **kwargs):
        mask = callback.masks[name]
        if callback.simulating:
            # the forward sees masked weights; the dense copy keeps training every weight
            assert torch.count_nonzero(params[name].detach()[~mask]) == 0
            seen["dense_moved"] |= bool((callback.dense[name][~mask] != seen["dense_before"][~mask]).any())
            seen["dense_before"] = callback.dense[name].clone()
        else:
            seen["finetune_steps"] += 1
            seen["finetune_nonzero"] += sum(
                int(torch.count_nonzero(params[k].detach()[~m])) for k, m in callback.masks.items()
            )

    def epoch_end(args, state, control, **kwargs):
        if int(round(state.epoch)) == 1 and seen["revived"] is None:
            index = int((~callback.masks[name]).view(-1).nonzero()[0])
            callback.dense[name].view(-1)[index] = 1e3
            seen["revived"] = index

    def train_begin(args, state, control, **kwargs):
        seen["dense_before"] = callback.dense[name].clone()

    trainer.add_callback(
        _Spy(on_train_begin=train_begin, on_epoch_begin=epoch_begin, on_step_end=step_end, on_epoch_end=epoch_end)
    )
    trainer.train()
    # linear schedule: s/2 at epoch 1, s at epoch 2; then fixed at s
    assert seen["pruned"][:2] == [round(0.45 * n), round(0.9 * n)]
    assert seen["dense_moved"], "pruned weights must keep training during the schedule"
    assert seen["finetune_steps"] == 8 and seen["finetune_nonzero"] == 0
    assert callback.finished and trainer.pruning_report["schedule_finished"]
    _assert_final_state(trainer)


def test_dg2pf_loss_is_self_kd_then_ce(tmp_path):
    trainer = _trainer(tmp_path, pruning_method="dg2pf", pruning_method_args={"gradual_pruning_epochs": 1})
    trainer.prune()
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 3])}
    model = trainer.model.eval()  # the dense copy is in eval mode: same BatchNorm statistics
    ce = F.cross_entropy(model(batch["pixel_values"]), batch["labels"])
    kd = trainer.compute_loss(model, batch)
    # before pruning the student equals its dense copy: KL = 0, loss = (1 - alpha) * CE
    torch.testing.assert_close(kd, 0.25 * ce)
    next(c for c in trainer.callback_handler.callbacks if isinstance(c, ScheduledMaskCallback)).finished = True
    torch.testing.assert_close(trainer.compute_loss(model, batch), ce)


def test_schedule_cut_short_still_reaches_exact_sparsity(tmp_path):
    trainer = _trainer(
        tmp_path,
        pruning_method="dg2pf",
        pruning_method_args="gradual_pruning_epochs=5",
        num_train_epochs=1,
        sparsity=0.8,
    )
    trainer.train()
    _assert_final_state(trainer)
    assert trainer.pruning_report["schedule_finished"]


# --- IMP --------------------------------------------------------------------------------------------------------
def test_imp_sparsities():
    levels = imp_sparsities(0.9, fraction=0.15)
    assert len(levels) == 15 and levels[-1] == 0.9
    assert levels[0] == pytest.approx(0.15) and levels[1] == pytest.approx(1 - 0.85**2)
    assert imp_sparsities(0.5, rounds=2) == pytest.approx([1 - 0.5**0.5, 0.5])
    assert imp_sparsities(0.5, rounds=1) == [0.5]


def test_imp_reaches_target_after_k_rounds(tmp_path):
    trainer = _trainer(
        tmp_path,
        teacher=True,
        pruning_method="imp",
        pruning_method_args={"rounds": 3},
        num_train_epochs=4,
        sparsity=0.9,
    )
    report = trainer.prune()
    n = report["prunable"]["numel"]
    levels = imp_sparsities(0.9, rounds=3)
    assert report["pruned_by_mask"] == round(levels[0] * n) and levels[0] == pytest.approx(1 - 0.1 ** (1 / 3))
    history = [dict(trainer.masks)]

    def epoch_begin(args, state, control, **kwargs):
        history.append(dict(trainer.masks))

    trainer.add_callback(_Spy(on_epoch_begin=epoch_begin))
    trainer.train()
    counts = [_num_pruned(m) for m in history]
    assert counts == [round(levels[0] * n), round(levels[0] * n), round(levels[1] * n), round(0.9 * n), round(0.9 * n)]
    for earlier, later in zip(history, history[1:]):  # a pruned weight stays pruned
        assert all(not bool((later[k] & ~earlier[k]).any()) for k in earlier)
    _assert_final_state(trainer)


# --- layer-collapse guard relative to the target (chosen by the CIFAR-10 ablation, benchmarks/RESULTS.md) ------------
def test_min_layer_density_for():
    from hf_tgprune.core.masking import min_layer_density_for

    assert min_layer_density_for(0.98, 0.0, 0.5) == pytest.approx(0.01)
    assert min_layer_density_for(0.98, 0.05, 0.5) == 0.05
    assert min_layer_density_for(0.9, 0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="layer_density_floor"):
        min_layer_density_for(0.9, 0.0, 1.0)


@pytest.mark.parametrize("method", ["magnitude", "imp"])
def test_layer_density_floor_keeps_every_layer_alive(tmp_path, method):
    trainer = _trainer(
        tmp_path,
        teacher=True,
        pruning_method=method,
        sparsity=0.98,
        layer_density_floor=0.5,
        pruning_method_args={"rounds": 2} if method == "imp" else None,
    )
    assert trainer.args.effective_min_layer_density == pytest.approx(0.01)
    trainer.train() if method == "imp" else trainer.prune()
    n = sum(m.numel() for m in trainer.masks.values())
    assert _num_pruned(trainer.masks) == round(0.98 * n)
    for name, mask in trainer.masks.items():
        assert int(mask.sum()) >= math.ceil(0.01 * mask.numel()), name


# --- interrupted schedules resume exactly ---------------------------------------------------------------------------
def _final(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, dict(trainer.masks)


@pytest.mark.parametrize(
    "method,method_args,checkpoint",
    [
        ("imp", {"rounds": 3}, "checkpoint-6"),  # inside epoch 1, after its pruning round
        ("dg2pf", {"gradual_pruning_epochs": 2}, "checkpoint-2"),  # inside the simulated (gradual) phase
        ("dg2pf", {"gradual_pruning_epochs": 1}, "checkpoint-6"),  # inside pruned fine-tuning
        ("epsd", {"warmup_steps": 3}, "checkpoint-2"),  # inside the warm-up, before pruning
    ],
)
def test_interrupted_method_resumes_to_the_same_masks_and_weights(tmp_path, method, method_args, checkpoint):
    settings = dict(
        teacher=method == "imp",
        pruning_method=method,
        pruning_method_args=method_args,
        num_train_epochs=3,
        save_strategy="steps",
        save_steps=2,
    )
    full = _trainer(tmp_path / "full", **settings)
    full.train()
    weights, masks = _final(full)
    resumed = _trainer(tmp_path / "full", **settings)  # a fresh trainer with the same (dense) model
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / checkpoint))
    resumed_weights, resumed_masks = _final(resumed)
    assert {k: torch.equal(v, resumed_masks[k]) for k, v in masks.items()} == {k: True for k in masks}
    for name, value in weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=1e-5, atol=1e-6, msg=name)
    _assert_final_state(resumed)


def test_dg2pf_resume_refuses_another_dense_model(tmp_path):
    settings = dict(pruning_method="dg2pf", num_train_epochs=1, save_strategy="steps", save_steps=2)
    _trainer(tmp_path, **settings).train()
    other = TeacherGuidedPruningTrainer(
        model=make_model("timm_resnet", seed=5), args=_config(tmp_path, **settings), train_dataset=RandomImages(32)
    )
    with pytest.raises(ValueError, match="resume with the same dense model"):
        other.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


def test_resume_refuses_another_method_when_either_prunes_on_a_schedule(tmp_path):
    _trainer(tmp_path, teacher=True, pruning_method="imp", max_steps=2, save_strategy="steps", save_steps=2).train()
    with pytest.raises(ValueError, match="pruning_method='imp' run, but this run uses pruning_method='magnitude'"):
        _trainer(tmp_path, teacher=True, pruning_method="magnitude", max_steps=4).train(resume_from_checkpoint=True)
