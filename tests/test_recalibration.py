import copy

import pytest
import torch
from torch import nn

from hf_tgprune.core.masking import apply_masks, global_masks, prunable_parameters
from hf_tgprune.core.recalibration import batchnorm_layers, recalibrate_batchnorm
from tests.utils import RandomImages, make_model


def _batches(n=24, batch_size=8, seed=0):
    data = RandomImages(n, seed=seed)
    return [{"pixel_values": data.pixel_values[i : i + batch_size]} for i in range(0, n, batch_size)]


def _prune(model, sparsity=0.9):
    params = prunable_parameters(model)
    apply_masks(model, global_masks({n: p.detach().abs() for n, p in params.items()}, sparsity))


def _batch_means_of_first_bn(model, batches):
    """The mean over batches of the first BatchNorm's per-batch input mean, recorded with a forward hook."""
    name, layer = next(iter(batchnorm_layers(model).items()))
    means = []
    handle = layer.register_forward_hook(lambda m, inputs, out: means.append(inputs[0].mean(dim=(0, 2, 3))))
    model.eval()
    with torch.no_grad():
        for batch in batches:
            model(batch["pixel_values"])
    handle.remove()
    return name, torch.stack(means).mean(0)


@pytest.mark.parametrize("name", ["timm_resnet", "hf_resnet"])
def test_recalibration_reestimates_running_stats_and_changes_nothing_else(name):
    model = make_model(name)
    _prune(model)
    model.train()
    batches = _batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momenta = [layer.momentum for layer in batchnorm_layers(model).values()]
    seen = recalibrate_batchnorm(model, batches)
    assert seen == 24
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    assert model.training and [layer.momentum for layer in batchnorm_layers(model).values()] == momenta
    # the first BatchNorm's running mean is the average of its batch means (its input does not depend on any BN)
    layer_name, expected = _batch_means_of_first_bn(model, batches)
    torch.testing.assert_close(batchnorm_layers(model)[layer_name].running_mean, expected, rtol=1e-4, atol=1e-6)


def test_recalibration_restores_accuracy_of_stale_statistics():
    """Stale statistics (from other data) give other eval-mode outputs; recalibration on the data brings them back."""
    model = make_model("timm_resnet")
    batches = _batches()
    recalibrate_batchnorm(model, batches)
    reference = model.eval()(batches[0]["pixel_values"]).detach()
    for layer in batchnorm_layers(model).values():
        layer.running_mean.add_(3.0)
        layer.running_var.mul_(10.0)
    assert not torch.allclose(model(batches[0]["pixel_values"]), reference, atol=1e-3)
    recalibrate_batchnorm(model, batches)
    torch.testing.assert_close(model(batches[0]["pixel_values"]).detach(), reference)


def test_models_without_batchnorm_are_untouched():
    model = make_model("timm_vit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_batchnorm(model, _batches()) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_two_processes_end_with_the_sample_weighted_average():
    model_a, model_b = make_model("timm_resnet"), make_model("timm_resnet")
    shards = [_batches(16, 8, seed=0), _batches(8, 8, seed=1)]
    flats = []

    def record(flat):
        flats.append(flat.clone())
        return flat

    single = []
    for shard in shards:
        m = make_model("timm_resnet")
        recalibrate_batchnorm(m, shard, all_reduce=record)
        single.append(m)
    summed = flats[0] + flats[1]
    for model in (model_a, model_b):
        recalibrate_batchnorm(model, shards[0] if model is model_a else shards[1], all_reduce=lambda flat: summed)
    for name, layer in batchnorm_layers(model_a).items():
        other = batchnorm_layers(model_b)[name]
        assert torch.equal(layer.running_mean, other.running_mean)  # every rank holds the same buffers
        expected = (
            2 * batchnorm_layers(single[0])[name].running_mean + batchnorm_layers(single[1])[name].running_mean
        ) / 3
        torch.testing.assert_close(layer.running_mean, expected, rtol=1e-4, atol=1e-6)


def test_no_images_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="no images"):
        recalibrate_batchnorm(model, [None])


def test_a_single_image_batch_is_skipped_not_a_crash():
    model = make_model("timm_resnet")
    batches = _batches(17, 8)  # 8 + 8 + 1
    assert batches[-1]["pixel_values"].shape[0] == 1
    assert recalibrate_batchnorm(model, batches) == 16


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_global_batch_norm_of_one_process_is_train_mode_batchnorm(momentum, dtype):
    """With a single process the global batch is the local one: outputs, input gradients, weight gradients and running
    statistics equal torch's train-mode BatchNorm; a one-image batch is normalised with the running statistics and
    leaves them unchanged (as recalibration and scoring treat it in one process)."""
    from hf_tgprune.core.recalibration import _global_batch_norm

    torch.manual_seed(0)
    reference = torch.nn.BatchNorm2d(5, momentum=momentum).to(dtype)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    layer = copy.deepcopy(reference)
    for _ in range(2):
        x = torch.randn(6, 5, 4, 3, dtype=dtype) * 3 + 1
        x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected, ours = reference(x_ref), _global_batch_norm(layer, lambda t: t, x_ours)
        torch.testing.assert_close(ours, expected)
        expected.square().sum().backward()
        ours.square().sum().backward()
        torch.testing.assert_close(x_ours.grad, x_ref.grad)
        torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(layer, key), getattr(reference, key))
    before = {key: getattr(layer, key).clone() for key in ("running_mean", "running_var", "num_batches_tracked")}
    one = torch.randn(1, 5, 4, 3, dtype=dtype)
    torch.testing.assert_close(_global_batch_norm(layer, lambda t: t, one), reference.eval()(one))
    for key, value in before.items():
        assert torch.equal(getattr(layer, key), value)


def test_global_batch_norm_keeps_what_a_timm_norm_act_layer_adds():
    """timm's BatchNormAct2d (EfficientNet, RegNet, ...) applies its activation inside its forward: normalising it with
    global-batch statistics keeps that activation, in train mode and for a one-image batch."""
    from timm.layers import BatchNormAct2d

    from hf_tgprune.core.recalibration import _global_batch_norm, after_normalisation

    torch.manual_seed(0)
    reference = BatchNormAct2d(5, act_layer=torch.nn.ReLU, inplace=False)
    with torch.no_grad():
        reference.bias.uniform_(-0.5, 0.5)
    layer = copy.deepcopy(reference)
    post = after_normalisation(layer)
    x = torch.randn(6, 5, 4, 3)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, ours = reference(x_ref), _global_batch_norm(layer, lambda t: t, x_ours, post=post)
    assert (expected == 0).any()  # the activation cut something
    torch.testing.assert_close(ours, expected)
    expected.square().sum().backward()
    ours.square().sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad)
    one = torch.randn(1, 5, 4, 3)
    torch.testing.assert_close(_global_batch_norm(layer, lambda t: t, one, post=post), reference.eval()(one))


def test_a_batchnorm_subclass_with_its_own_forward_is_refused_by_global_batch_statistics():
    from hf_tgprune.core.recalibration import global_batch_statistics

    class Doubled(torch.nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), Doubled(4))
    with pytest.raises(TypeError, match="Doubled overrides BatchNorm's forward.*scoring_bn_mode='eval'"):
        with global_batch_statistics(model):
            pass
    assert all("forward" not in vars(module) for module in model.modules())  # nothing was replaced
