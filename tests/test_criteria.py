"""Signed criteria (`tgp_taylor`, `movement`): the method-default layer allocation, zeros first below signed scores,
movement scores accumulated over fine-tuning (Trainer and plain loop), and their errors."""

import pytest
import torch

from hf_tgprune import Pruner, PruningArguments, TeacherGuidedPruningTrainer
from hf_tgprune.core.masking import prunable_parameters, prune_zeros_first, select_masks
from hf_tgprune.methods.movement import MovementScores
from tests.utils import RandomImages, make_model, tiny_config


def test_signed_methods_default_to_magnitude_allocation_and_refuse_lamp():
    assert PruningArguments(pruning_method="tgp_taylor").layer_allocation == "magnitude"
    assert PruningArguments(pruning_method="movement").layer_allocation == "magnitude"
    assert PruningArguments(pruning_method="tgp").layer_allocation == "global"
    assert PruningArguments(pruning_method="tgp_taylor", layer_allocation="global").layer_allocation == "global"
    with pytest.raises(ValueError, match="layer_allocation='lamp' normalises non-negative scores"):
        PruningArguments(pruning_method="tgp_taylor", layer_allocation="lamp")


def test_zeros_go_below_every_signed_score():
    scores = {"a": torch.tensor([-5.0, 2.0, -0.5]), "b": torch.tensor([-7.0, 1.0])}
    weights = {"a": torch.tensor([1.0, 0.0, 1.0]), "b": torch.tensor([1.0, 1.0])}
    ranked = prune_zeros_first(scores, weights)
    assert float(ranked["a"][1]) < -7.0  # the zero weight is pruned before the most negative score of any layer
    masks = select_masks(scores, 1 / 5, weights=weights)
    assert masks["a"].tolist() == [True, False, True] and masks["b"].all()


def test_tgp_taylor_keeps_each_layers_magnitude_count(tmp_path):
    pruner = Pruner(
        make_model("timm_resnet"),
        PruningArguments(pruning_method="tgp_taylor", sparsity=0.9, num_calibration_samples=16, seed=0),
        teacher=make_model("hf_resnet", seed=1),
        calibration_dataset=RandomImages(16),
    )
    weights = {n: p.detach().clone() for n, p in pruner.prunable_parameters().items()}
    report = pruner.prune()
    by_magnitude = select_masks({n: w.abs() for n, w in weights.items()}, 0.9)
    assert {n: int(m.sum()) for n, m in pruner.masks.items()} == {n: int(m.sum()) for n, m in by_magnitude.items()}
    assert report["pruned_by_mask"] == round(0.9 * report["prunable"]["numel"])
    assert report["layer_allocation"] == "magnitude"


def test_movement_scores_accumulate_minus_weight_times_gradient_in_a_plain_loop():
    model = make_model("timm_resnet")
    movement = MovementScores(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    params = prunable_parameters(model)
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    data = RandomImages(8)
    for step in range(2):
        x, y = data.pixel_values[step * 4 : step * 4 + 4], data.labels[step * 4 : step * 4 + 4]
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for n, p in params.items():
            expected[n] -= p.detach() * p.grad
        movement.accumulate()
        optimizer.step()
        optimizer.zero_grad()
    assert movement.steps == 2
    for n in params:
        torch.testing.assert_close(movement.scores[n], expected[n])


def test_movement_through_the_trainer_then_prune_with_its_scores(tmp_path):
    model = make_model("timm_resnet")
    movement = MovementScores(model)
    finetune = TeacherGuidedPruningTrainer(
        model=model,
        args=tiny_config(tmp_path / "ft", pruning_method="dense", retrain_with_kd=False, max_steps=3),
        train_dataset=RandomImages(24),
        callbacks=[movement],
    )
    finetune.train()
    assert movement.steps == 3 and any(bool(s.ne(0).any()) for s in movement.scores.values())
    trainer = TeacherGuidedPruningTrainer(
        model=model,
        args=tiny_config(tmp_path, pruning_method="movement", sparsity=0.8, retrain_with_kd=False),
        train_dataset=RandomImages(24),
    )
    with pytest.raises(ValueError, match="prune\\(scores=movement.scores\\)"):
        trainer.prune()
    report = trainer.prune(scores=movement.scores)
    assert report["pruned_by_mask"] == round(0.8 * report["prunable"]["numel"])
    # inside each layer the lowest movement scores are pruned
    for name, mask in trainer.masks.items():
        if (~mask).any() and mask.any():
            assert float(movement.scores[name][~mask].max()) <= float(movement.scores[name][mask].min())
