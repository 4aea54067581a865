"""Models as users bring them: heads found by what produces the logits, replacement modules that keep their
attributes, weights outside Linear/Conv, and what does not behave as sparse said out loud."""

import logging

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from hf_tgprune import Pruner, PruningArguments, export_sparse_inference, prunable_parameters
from hf_tgprune.core.adapters import classifier_parameter_names, num_labels
from hf_tgprune.io.export import SparseConv1x1, fused_sparsity
from tests.utils import IMAGE_SIZE, NUM_LABELS, RandomImages, tiny_config


def _pruned(model, sparsity=0.8, **kwargs):
    pruner = Pruner(
        model, PruningArguments(sparsity=sparsity, pruning_method="magnitude", recalibrate_bn=False, **kwargs)
    )
    return pruner, pruner.prune()


# --- 1. replacement modules keep the attributes of the module they replace --------------------------------------------
def test_sparse_conv1x1_keeps_the_attributes_of_the_conv_it_replaces():
    conv = nn.Conv2d(8, 6, 1, stride=2, dilation=3)
    sparse = SparseConv1x1.from_dense(conv)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert tuple(torch.nn.modules.utils._pair(getattr(sparse, name))) == tuple(
            torch.nn.modules.utils._pair(getattr(conv, name))
        ), name
    assert sparse.padding_mode == conv.padding_mode
    back = sparse.to_dense_module()
    assert (back.stride, back.dilation) == (conv.stride, conv.dilation)


def test_exported_transformers_mobilenet_runs_without_verification():
    """transformers' TF-style padding reads `kernel_size`, `stride` and `dilation` of its convolution."""
    import transformers

    config = transformers.MobileNetV1Config(num_labels=4, depth_multiplier=0.25, image_size=32)
    model = transformers.MobileNetV1ForImageClassification(config).eval()
    _pruned(model, 0.9)
    x = torch.randn(2, 3, 32, 32)
    exported, report = export_sparse_inference(model, x, min_speedup=1e-9, max_density=1.0, repeats=1, verify=False)
    assert report.sparse_layers
    with torch.inference_mode():
        torch.testing.assert_close(exported(x).logits, model(x).logits, rtol=1e-4, atol=1e-5)


# --- 2. heads of plain PyTorch models: the layers that produce the logits -------------------------------------------
def test_squeezenet_head_is_its_final_convolution_and_stays_dense(caplog):
    model = torchvision.models.squeezenet1_1(num_classes=7)
    with caplog.at_level(logging.INFO, logger="hf_tgprune.core.adapters"):
        assert classifier_parameter_names(model) == {"classifier.1.weight", "classifier.1.bias"}
    assert num_labels(model) == 7
    assert "classifier.1" in caplog.text
    pruner, _ = _pruned(model)
    assert "classifier.1.weight" not in pruner.masks and bool(model.classifier[1].weight.all())
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(4, 3, 64, 64))
    assert logits.std(dim=0).max() > 0  # not constant: the head still computes


class HeadRegisteredFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 5)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.hidden = nn.Linear(8, 16)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(self.features(x))))


def test_a_head_registered_before_a_hidden_linear_is_the_head():
    model = HeadRegisteredFirst()
    assert classifier_parameter_names(model) == {"head.weight", "head.bias"}
    assert "hidden.weight" in prunable_parameters(model) and "head.weight" not in prunable_parameters(model)


def test_googlenet_auxiliary_classifiers_are_heads_too():
    model = torchvision.models.googlenet(num_classes=7, aux_logits=True, init_weights=False)
    heads = {name.rsplit(".", 1)[0] for name in classifier_parameter_names(model)}
    assert heads == {"fc", "aux1.fc2", "aux2.fc2"}
    assert model.training  # the traced forward pass restored the training flags


# --- 3. weight-standardised convolutions: stored sparse, computed dense --------------------------------------------
def test_weight_standardized_convolutions_are_reported_as_computed_dense(caplog, tmp_path):
    import timm
    from timm.layers import StdConv2d

    model = timm.create_model("resnetv2_18", num_classes=4, conv_layer=StdConv2d, channels=(8, 16, 32, 64), stem_chs=8)
    with caplog.at_level(logging.WARNING, logger="hf_tgprune.pruning.pruner"):
        pruner, report = _pruned(model)
    std_layers = [n for n, m in model.named_modules() if isinstance(m, StdConv2d)]
    assert report["computed_dense_layers"] and {f"{n}.weight" for n in std_layers} >= set(
        report["computed_dense_layers"]
    )
    assert "computed dense" in caplog.text or "kernel they compute with is dense" in caplog.text
    # the claim itself: the kernel the layer convolves with has no zeros where the stored weight is pruned
    name = report["computed_dense_layers"][0]
    conv = model.get_submodule(name.rsplit(".", 1)[0])
    stored = conv.weight.detach()
    computed = F.batch_norm(
        stored.reshape(1, conv.out_channels, -1), None, None, training=True, momentum=0.0, eps=conv.eps
    ).reshape_as(stored)
    assert (stored == 0).any() and not (computed[stored == 0] == 0).any()


def _tiny_bit(conv_layer=None):
    """A small weight-standardised ResNetV2: BiT's own (savable by timm) or resnetv2_18 with `conv_layer`."""
    import timm

    if conv_layer is None:
        return timm.create_model(
            "resnetv2_50x1_bit", num_classes=NUM_LABELS, channels=(128, 128, 128, 128), stem_chs=32
        )
    return timm.create_model(
        "resnetv2_18", num_classes=NUM_LABELS, conv_layer=conv_layer, channels=(8, 16, 32, 64), stem_chs=8
    )


def _computed_kernels(model, x):
    """The weight of every conv2d call of a forward pass, by the module that made it."""
    from torch.overrides import TorchFunctionMode

    kernels, current = {}, []

    class Capture(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.conv2d and current:
                kernels[current[-1]] = args[1].detach().clone()
            return func(*args, **(kwargs or {}))

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: current.append(name), prepend=True))
        handles.append(module.register_forward_hook(lambda m, a, o: current.pop() and None, always_call=True))
    with torch.no_grad(), Capture():
        model.eval()(x)
    for handle in handles:
        handle.remove()
    return kernels


@pytest.mark.parametrize("conv_class", ["StdConv2d", "ScaledStdConv2d", "WeightStandardizedConv2d"])
def test_masked_standardized_kernels_are_zero_where_pruned(conv_class):
    import timm.layers
    import transformers

    if conv_class == "WeightStandardizedConv2d":  # transformers BiT, "SAME" padding computed in forward
        config = transformers.BitConfig(
            num_labels=NUM_LABELS, embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8,
            layer_type="bottleneck", global_padding="SAME",
        )  # fmt: skip
        model = transformers.BitForImageClassification(config)
    else:
        model = _tiny_bit(getattr(timm.layers, conv_class))
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    keys = set(model.state_dict())
    pruner, report = _pruned(model, mask_standardized_kernels=True, layer_density_floor=0.5)
    standardized = [f"{n}.weight" for n, m in model.named_modules() if conv_class in type(m).__name__]
    assert sorted(report["masked_kernel_layers"]) == sorted(n for n in standardized if n in pruner.masks)
    assert report["computed_dense_layers"] == []
    kernels = _computed_kernels(model, x)
    for name in report["masked_kernel_layers"]:
        kernel, mask = kernels[name.rsplit(".", 1)[0]], pruner.masks[name]
        assert (~mask).any() and torch.count_nonzero(kernel[~mask]) == 0, name
        rows = mask.flatten(1).sum(1) >= 2  # a channel keeping one weight standardises it to 0
        assert torch.count_nonzero(kernel[rows][mask[rows]]) == int(mask[rows].sum()), name  # kept: standardised
    assert set(model.state_dict()) == keys  # nothing added to what is saved


@pytest.mark.parametrize("statistics", ["kept", "all"])
def test_masked_kernel_statistics_against_an_independent_computation(statistics):
    """StdConv2d: "kept" convolves with the surviving weights standardised among themselves, "all" with the mask
    times the layer's own standardisation of the whole stored weight."""
    from timm.layers import StdConv2d

    model = _tiny_bit(StdConv2d)
    pruner, report = _pruned(model, mask_standardized_kernels=True, kernel_mask_statistics=statistics)
    name = report["masked_kernel_layers"][1]
    conv, mask = model.get_submodule(name.rsplit(".", 1)[0]), pruner.masks[name]
    kernel = _computed_kernels(model, torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE))[name.rsplit(".", 1)[0]]
    w = conv.weight.detach().double().reshape(conv.out_channels, -1)
    m = mask.reshape(conv.out_channels, -1)
    expected = torch.zeros_like(w)
    for row in range(w.shape[0]):
        if statistics == "kept":
            kept = w[row][m[row]]
            expected[row][m[row]] = (kept - kept.mean()) / (kept.var(unbiased=False) + 1e-6).sqrt()
        else:
            whole = (w[row] - w[row].mean()) / (w[row].var(unbiased=False) + conv.eps).sqrt()
            expected[row] = whole * m[row]
    torch.testing.assert_close(kernel.double().reshape_as(w), expected, rtol=1e-4, atol=1e-4)


def test_without_the_option_the_standardized_kernel_stays_dense():
    from timm.layers import StdConv2d

    model = _tiny_bit(StdConv2d)
    pruner, report = _pruned(model)
    assert report["masked_kernel_layers"] == [] and report["computed_dense_layers"]
    name = report["computed_dense_layers"][0]
    kernel = _computed_kernels(model, torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))[name.rsplit(".", 1)[0]]
    assert torch.count_nonzero(kernel[~pruner.masks[name]]) > 0


def test_masked_kernels_train_save_reload_and_export(tmp_path):
    """Through the trainer: the saved folder records the layers, hf_tgprune's loader reproduces the trained
    logits (plain timm does not: it computes the dense kernel), and the export bakes the masked kernel into plain
    convolutions that are candidates for sparse kernels."""
    import timm
    from timm.layers import StdConv2d

    from hf_tgprune import TeacherGuidedPruningTrainer, load_image_classifier
    from hf_tgprune.io.serialization import read_sparsity_record

    model = _tiny_bit()
    nn.init.normal_(model.head.fc.weight, std=0.1)  # BiT's head starts at zero: logits that would not tell apart
    trainer = TeacherGuidedPruningTrainer(
        model=model,
        args=tiny_config(
            tmp_path, pruning_method="magnitude", sparsity=0.8, layer_density_floor=0.5, max_steps=2,
            mask_standardized_kernels=True, retrain_with_kd=False, recalibrate_bn=False,
        ),
        train_dataset=RandomImages(16),
    )  # fmt: skip
    trainer.train()
    folder = tmp_path / "saved"
    trainer.save_model(str(folder))
    masked = trainer.pruner.report["masked_kernel_layers"]
    assert masked and read_sparsity_record(folder)["masked_kernel_layers"] == dict.fromkeys(masked, "kept")
    model.eval()
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        trained = model(x)
        reloaded = load_image_classifier(str(folder)).eval()
        plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        torch.testing.assert_close(reloaded(x), trained)
        assert not torch.allclose(plain(x), trained, rtol=1e-2, atol=0)

    exported, export_report = export_sparse_inference(reloaded, x, min_speedup=1e9)
    assert sorted(export_report.baked_kernel_masks) == sorted(masked)  # verified against the masked model too
    for name in masked:
        conv = exported.get_submodule(name.rsplit(".", 1)[0])
        assert type(conv) is nn.Conv2d
        assert not conv.weight[~trainer.masks[name]].any()
    assert any(row.name == masked[0].rsplit(".", 1)[0] for row in export_report.layers)  # a sparse candidate now
    assert reloaded.get_submodule(masked[0].rsplit(".", 1)[0]).__class__ is StdConv2d  # the export copied


def test_kernel_masks_of_a_copy_are_its_own():
    import copy

    from timm.layers import StdConv2d

    from hf_tgprune.core.kernel_masks import detach_kernel_masks, kernel_masked_layers

    model = _tiny_bit(StdConv2d)
    _pruned(model, mask_standardized_kernels=True)
    masked = kernel_masked_layers(model)
    twin = copy.deepcopy(model)
    assert detach_kernel_masks(twin) == masked and kernel_masked_layers(twin) == []
    assert kernel_masked_layers(model) == masked
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert not torch.allclose(model.eval()(x), twin.eval()(x), atol=1e-4)  # the copy computes the dense kernel


def test_a_forward_that_raises_leaves_no_masking_behind():
    """The masking mode is left whatever ends the forward (KeyboardInterrupt included): other convolutions of the
    same shape compute as before."""
    from timm.layers import StdConv2d

    from hf_tgprune.core.kernel_masks import attach_kernel_masks

    class Interrupted(StdConv2d):
        def forward(self, x):
            super().forward(x)
            raise KeyboardInterrupt

    layer, other = Interrupted(4, 4, 3), nn.Conv2d(4, 4, 3, bias=False)
    attach_kernel_masks(layer, {"weight": torch.zeros(4, 4, 3, 3, dtype=torch.bool)})
    x = torch.randn(1, 4, 6, 6)
    expected = F.conv2d(x, other.weight)
    with pytest.raises(KeyboardInterrupt):
        layer(x)
    torch.testing.assert_close(other(x), expected)


def test_a_forward_that_does_not_apply_the_mask_once_raises():
    from timm.layers import StdConv2d

    from hf_tgprune.core.kernel_masks import attach_kernel_masks

    class Twice(StdConv2d):  # a forward hf_tgprune does not know: two convolutions with the kernel
        def forward(self, x):
            return super().forward(x) + super().forward(x)

    layer = Twice(4, 4, 3)
    attach_kernel_masks(layer, {"weight": torch.ones(4, 4, 3, 3, dtype=torch.bool)})
    with pytest.raises(RuntimeError, match="applied 2 times.*mask_standardized_kernels=False"):
        layer(torch.randn(1, 4, 6, 6))


def test_kernel_masks_follow_new_masks_and_a_failed_prune_puts_them_back(monkeypatch, tmp_path):
    from hf_tgprune import save_sparse_model
    from hf_tgprune.core.kernel_masks import kernel_masks
    from hf_tgprune.io.serialization import read_sparsity_record

    model = _tiny_bit()
    first, _ = _pruned(model, sparsity=0.5, mask_standardized_kernels=True)
    save_sparse_model(model, tmp_path / "saved", first.masks)  # the Pruner path records them too
    recorded = read_sparsity_record(tmp_path / "saved")["masked_kernel_layers"]
    assert recorded == dict.fromkeys(first.report["masked_kernel_layers"], "kept")
    before = {name: mask.clone() for name, mask in kernel_masks(model).items()}
    # pruned further without the option: the layers that computed with a kernel mask keep doing so, with the new one
    second, report = _pruned(model, sparsity=0.8)
    assert set(report["masked_kernel_layers"]) == set(before) and report["computed_dense_layers"] == []
    assert all(torch.equal(mask, second.masks[name]) for name, mask in kernel_masks(model).items())
    # a prune that fails leaves the kernel masks as they were
    third = Pruner(model, PruningArguments(sparsity=0.9, pruning_method="magnitude", recalibrate_bn=False))
    monkeypatch.setattr(third, "select_masks", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        third.prune()
    assert all(torch.equal(mask, second.masks[name]) for name, mask in kernel_masks(model).items())


def test_masking_kernels_is_refused_for_a_method_that_regrows_pruned_weights():
    with pytest.raises(ValueError, match="mask_standardized_kernels=False"):
        PruningArguments(pruning_method="dg2pf", mask_standardized_kernels=True)


# --- 4. weights outside Linear/Conv ----------------------------------------------------------------------------------
class AttentionAndLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 8, stride=8)
        self.pos = nn.Parameter(torch.randn(1, 16, 16))  # a large matrix outside the prunable set
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.rnn = nn.LSTM(16, 16, batch_first=True, bidirectional=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        tokens = tokens + self.attn(tokens, tokens, tokens, need_weights=False)[0]
        return self.head(self.rnn(tokens)[0].mean(1))


def test_attention_and_recurrent_weights_are_pruned_by_default_and_stay_pruned(tmp_path):
    from hf_tgprune import TeacherGuidedPruningTrainer
    from tests.utils import RandomImages, tiny_config

    model = AttentionAndLSTM()
    names = set(prunable_parameters(model))
    assert {"attn.in_proj_weight", "attn.out_proj.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0_reverse"} <= names
    assert "head.weight" not in names and "pos" not in names
    args = tiny_config(tmp_path, pruning_method="magnitude", retrain_with_kd=False, sparsity=0.8, max_steps=3,
                       learning_rate=0.05, per_device_train_batch_size=4, recalibrate_bn=False)  # fmt: skip
    trainer = TeacherGuidedPruningTrainer(model=model, args=args, train_dataset=RandomImages(12))
    trainer.train()
    params = dict(model.named_parameters())
    for name in ("attn.in_proj_weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0_reverse"):
        mask = trainer.masks[name]
        assert (~mask).any() and not params[name].detach()[~mask].any(), name
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    exported, _ = export_sparse_inference(model, x, min_speedup=1e-9, max_density=1.0, repeats=1)
    with torch.inference_mode():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-4, atol=1e-5)


def test_report_gives_the_prunable_share_and_names_large_unprunable_matrices(caplog):
    model = AttentionAndLSTM()
    with caplog.at_level(logging.INFO, logger="hf_tgprune.pruning.pruner"):
        _, report = _pruned(model, prune_exclude=[r"^rnn\."])
    assert "rnn.weight_ih_l0" in report["unprunable_matrices"] and "pos" in report["unprunable_matrices"]
    assert "of all parameters" in caplog.text and "rnn.weight_ih_l0" in caplog.text


# --- 5. emptied layers -----------------------------------------------------------------------------------------------
def test_a_layer_pruned_to_nothing_is_named_in_a_warning(caplog):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)
    )
    with torch.no_grad():
        model[1].weight.mul_(1e-6)  # the smallest magnitudes: a global threshold empties this layer
    with caplog.at_level(logging.WARNING, logger="hf_tgprune.pruning.pruner"):
        _, report = _pruned(model, 0.5)
    assert report["empty_layers"] == ["1.weight"]
    assert "emptied 1 layer" in caplog.text and "1.weight" in caplog.text


def test_no_empty_layer_no_warning(caplog):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with caplog.at_level(logging.WARNING, logger="hf_tgprune.pruning.pruner"):
        _, report = _pruned(model, 0.5)
    assert report["empty_layers"] == [] and "emptied" not in caplog.text


# --- 6. reparameterisable models -----------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["repvgg_a0", "mobileone_s0"])
def test_reparameterizable_models_report_the_sparsity_left_after_fusing(architecture, caplog):
    import timm

    model = timm.create_model(architecture, num_classes=4)
    with caplog.at_level(logging.WARNING, logger="hf_tgprune.pruning.pruner"):
        pruner, report = _pruned(model)
    fused = report["fused"]
    assert fused == fused_sparsity(model, pruner.masks)
    assert fused["sparsity"] < report["prunable"]["sparsity"]  # summed branches keep fewer zeros
    assert "fuse" in caplog.text
    assert fused_sparsity(nn.Sequential(nn.Linear(2, 2))) is None  # nothing to fuse
