"""`Pruner`: the one owner of the pruning state, usable without a Trainer (functional core, plain PyTorch loop)."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_tgprune import GlobalMaskCallback, Pruner, PruningArguments, TeacherGuidedPruningTrainer, mask_hash
from hf_tgprune.core.masking import MaskFileError, prunable_parameters
from hf_tgprune.io.serialization.pruning_state import PRUNING_STATE_NAME, PruningState, read_pruning_state
from hf_tgprune.methods import METHODS, PruningMethod, register_method
from tests.utils import RandomImages, make_model, tiny_config

SETTINGS = dict(sparsity=0.8, num_calibration_samples=16, calibration_batch_size=8, seed=0)


def _pruner(method="tgp", seed=0, **overrides):
    args = PruningArguments(**{**SETTINGS, "pruning_method": method, **overrides})
    teacher = make_model("hf_resnet", seed=1)
    return Pruner(make_model("timm_resnet", seed=seed), args, teacher=teacher, calibration_dataset=RandomImages(16))


@pytest.mark.parametrize("method", ["tgp", "tgp_fisher", "magnitude"])
def test_pruner_without_a_trainer_gives_the_trainers_masks(tmp_path, method):
    pruner = _pruner(method)
    report = pruner.prune()
    n = report["prunable"]["numel"]
    assert report["pruned_by_mask"] == round(0.8 * n)
    params = dict(pruner.model.named_parameters())
    assert all(int(params[name][~mask].count_nonzero()) == 0 for name, mask in pruner.masks.items())
    trainer = TeacherGuidedPruningTrainer(
        model=make_model("timm_resnet"),
        teacher_model=make_model("hf_resnet", seed=1),
        args=tiny_config(tmp_path, pruning_method=method, sparsity=0.8),
        calibration_dataset=RandomImages(16),
    )
    trainer.prune()
    assert trainer.pruner.masks is trainer.masks  # one holder: the trainer reads its pruner's masks
    assert mask_hash(trainer.masks) == mask_hash(pruner.masks) == report["mask_sha256"]


def test_plain_pytorch_loop_keeps_pruned_weights_and_momentum_zero():
    pruner = _pruner("magnitude")
    pruner.prune()
    model = pruner.model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    enforcer = pruner.mask_callback
    enforcer.start(model, optimizer)
    data = RandomImages(16)
    for step in range(3):
        batch = {
            k: torch.stack([data[i][k] for i in range(step * 4, step * 4 + 4)]) for k in ("pixel_values", "labels")
        }
        loss = torch.nn.functional.cross_entropy(model(batch["pixel_values"]), batch["labels"])
        loss.backward()
        params = dict(model.named_parameters())
        assert all(int(params[n].grad[~m].count_nonzero()) == 0 for n, m in pruner.masks.items())  # hooks
        optimizer.step()
        optimizer.zero_grad()
        enforcer.enforce(optimizer)
    params = dict(model.named_parameters())
    for name, mask in pruner.masks.items():
        assert int(params[name][~mask].count_nonzero()) == 0
        assert int(optimizer.state[params[name]]["momentum_buffer"][~mask].count_nonzero()) == 0


@pytest.mark.parametrize("method", ["gradual", "imp", "dg2pf"])
def test_plain_loop_refuses_methods_whose_masks_change_at_trainer_events(method):
    # their schedules advance in Trainer callbacks: a plain loop would train the model without ever pruning it
    pruner = _pruner(method)
    pruner.prune()
    model = pruner.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match=rf"pruning_method='{method}'.*TeacherGuidedPruningTrainer.*one-shot"):
        pruner.mask_callback.start(model, optimizer)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("method", ["gradual", "imp", "dg2pf", "epsd"])
def test_given_masks_with_a_method_that_selects_its_own_are_refused_naming_the_fix(method):
    # such a method would re-select the masks during training: the given ones would not be the ones trained
    model = make_model("timm_resnet")
    masks = {name: torch.rand_like(p) > 0.5 for name, p in prunable_parameters(model).items()}
    with pytest.raises(ValueError, match=rf"pruning_method='{method}'.*one-shot pruning_method"):
        Pruner(model, PruningArguments(sparsity=0.5, pruning_method=method), masks=masks)
    pruner = Pruner(model, PruningArguments(sparsity=0.5, pruning_method="magnitude"), masks=masks)
    assert mask_hash(pruner.masks) == mask_hash(masks)


def test_mask_callback_reads_the_pruners_masks_instead_of_a_copy():
    pruner = _pruner("magnitude")
    pruner.prune()
    callback = pruner.mask_callback
    assert isinstance(callback, GlobalMaskCallback) and callback.masks is pruner.masks
    fewer = {name: torch.ones_like(mask) for name, mask in pruner.masks.items()}
    pruner.set_masks(fewer)
    assert callback.masks is pruner.masks and mask_hash(callback.masks) == mask_hash(fewer)
    assert pruner.report["pruned_by_mask"] == 0  # the report follows the masks


def test_state_round_trip_in_one_file(tmp_path):
    pruner = _pruner("tgp")
    pruner.prune()
    pruner.save_state(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [PRUNING_STATE_NAME]
    with safe_open(str(tmp_path / PRUNING_STATE_NAME), framework="pt") as handle:
        header = handle.metadata()
    assert header["mask_sha256"] == mask_hash(pruner.masks) and float(header["target_sparsity"]) == 0.8
    resumed = _pruner("tgp", seed=5)
    resumed.load_state(tmp_path)
    assert resumed.pruned and mask_hash(resumed.masks) == mask_hash(pruner.masks)
    params = dict(resumed.model.named_parameters())
    assert all(int(params[n][~m].count_nonzero()) == 0 for n, m in resumed.masks.items())  # installed


def test_method_tensors_and_json_state_survive_the_file(tmp_path):
    masks = {"a": torch.tensor([True, False]), "b": torch.ones(2, 3, dtype=torch.bool)}
    state = PruningState(
        pruning_method="dg2pf",
        target_sparsity=0.5,
        masks=masks,
        pruning_method_args={"gradual_pruning_epochs": 2},
        method_state={"applied": [0, 1], "finished": False, "tensors": {"dense.a": torch.arange(4.0)}},
    )
    from hf_tgprune.io.serialization.pruning_state import write_pruning_state

    write_pruning_state(state, tmp_path / "s.safetensors")
    back = read_pruning_state(tmp_path / "s.safetensors")
    assert back.pruning_method == "dg2pf" and back.target_sparsity == 0.5
    assert back.pruning_method_args == {"gradual_pruning_epochs": 2}
    assert back.method_state["applied"] == [0, 1] and back.method_state["finished"] is False
    assert torch.equal(back.method_state["tensors"]["dense.a"], torch.arange(4.0))
    assert mask_hash(back.masks) == mask_hash(masks)
    tensors = load_file(str(tmp_path / "s.safetensors"))
    tensors["mask.a"] = torch.tensor([True, True])  # edited, header kept
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as handle:
        header = handle.metadata()
    save_file(tensors, str(tmp_path / "s.safetensors"), header)
    with pytest.raises(MaskFileError, match="do not match the hash"):
        read_pruning_state(tmp_path / "s.safetensors")


def test_load_state_refuses_another_target_and_a_missing_file(tmp_path):
    pruner = _pruner("tgp")
    pruner.prune()
    pruner.save_state(tmp_path)
    with pytest.raises(ValueError, match="trained at sparsity=0.8, but this run asks for sparsity=0.9"):
        _pruner("tgp", sparsity=0.9).load_state(tmp_path)
    with pytest.raises(MaskFileError, match="has no pruning_state.safetensors"):
        _pruner("tgp").load_state(tmp_path / "elsewhere")


def test_methods_receive_the_pruner():
    seen = []

    class Spy(PruningMethod):
        name = "spy_receives_pruner"
        criterion = "magnitude"

        def prune(self, pruner):
            seen.append(pruner)
            return pruner.compute_masks()

    if Spy.name not in METHODS:
        register_method(Spy)
    pruner = _pruner("spy_receives_pruner")
    pruner.prune()
    assert seen == [pruner] and pruner.masks is not None


def test_bad_settings_are_refused_before_any_work():
    with pytest.raises(ValueError, match="pruning_method='tgp' scores with a teacher"):
        Pruner(make_model("timm_resnet"), PruningArguments(pruning_method="tgp"), calibration_dataset=RandomImages(4))
    with pytest.raises(ValueError, match="calibration set is empty"):
        Pruner(make_model("timm_resnet"), PruningArguments(pruning_method="snip"), calibration_dataset=RandomImages(0))


def test_magnitude_rounds_without_recalibration_need_no_calibration_images():
    """Data-free rounds read no images (nor BatchNorm statistics between rounds): with recalibrate_bn=False even
    no calibration data at all is fine, and the rounds reach the exact count."""
    args = PruningArguments(pruning_method="magnitude", pruning_rounds=3, recalibrate_bn=False, sparsity=0.9)
    pruner = Pruner(make_model("timm_resnet"), args)
    report = pruner.prune()
    assert report["pruned_by_mask"] == round(0.9 * report["prunable"]["numel"])
    assert report["bn_recalibration_images"] == 0


def test_single_image_batches_are_refused_before_the_model_is_touched(tmp_path):
    model = make_model("timm_resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="calibration_batch_size=1.*recalibrate_bn=False"):
        TeacherGuidedPruningTrainer(
            model=model,
            args=tiny_config(tmp_path, pruning_method="magnitude", calibration_batch_size=1, retrain_with_kd=False),
            train_dataset=RandomImages(16),
        )
    with pytest.raises(ValueError, match="has 1 example"):
        Pruner(model, PruningArguments(pruning_method="magnitude"), calibration_dataset=RandomImages(1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_failed_prune_leaves_the_model_exactly_as_it_was(monkeypatch):
    pruner = _pruner("tgp_fisher", pruning_rounds=2, scoring_bn_mode="eval")  # eval mode: recalibrated between rounds
    before = {k: v.clone() for k, v in pruner.model.state_dict().items()}
    calls = []
    original = pruner.recalibrate_batchnorm

    def fail_on_the_final_recalibration():
        calls.append(1)
        if len(calls) == 2:  # after the rounds' recalibration and the installed mask: the worst moment
            raise RuntimeError("out of memory")
        return original()

    monkeypatch.setattr(pruner, "recalibrate_batchnorm", fail_on_the_final_recalibration)
    with pytest.raises(RuntimeError, match="out of memory"):
        pruner.prune()
    assert all(torch.equal(before[k], v) for k, v in pruner.model.state_dict().items())  # weights and BN buffers
    assert pruner.masks is None and pruner.report is None and not pruner.pruned
    monkeypatch.setattr(pruner, "recalibrate_batchnorm", original)
    assert pruner.prune()["pruned_by_mask"] == round(0.8 * pruner.report["prunable"]["numel"])  # and it can retry


@pytest.mark.parametrize("method", ["tgp", "tgp_fisher"])
def test_scoring_and_recalibration_leave_the_global_rng_as_they_found_it(method):
    """Issue 17, item 11: a shared scoring pass drew from the global RNG, so a resumed sweep (which scores at another
    point) retrained with other data orders."""
    pruner = _pruner(method)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    pruner.compute_scores()
    pruner.recalibrate_batchnorm()
    assert torch.equal(torch.rand(3), expected)
