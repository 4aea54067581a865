"""Sparse inference export (hf_tgprune.io.export): outputs, per-layer choice, the way back, the 2:4 CUDA error path.

The layer timings are injected (fake timers) so that every choice is deterministic; nothing here asserts on time.
"""

import copy

import pytest
import torch
from torch import nn

from hf_tgprune.core.masking import apply_masks, global_masks, prunable_parameters
from hf_tgprune.io.export import (
    EXPORT_ATOL,
    EXPORT_RTOL,
    SemiStructuredUnavailableError,
    SparseConv1x1,
    SparseLinear,
    choose_sparse,
    export_semi_structured,
    export_sparse_inference,
    interleaved_min_seconds,
    max_output_error,
    semi_structured_requirement_error,
    sparsify_layers,
    to_dense,
)

# one torch thread inside these tests only: the setting is process-wide
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sparse_wins(modules, inputs, repeats):
    """Fake timer: the sparse module (second) always takes half the dense time."""
    return [1.0, 0.5]


def sparse_loses(modules, inputs, repeats):
    return [1.0, 2.0]


def tiny_vit(seed=0):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4)


class OneByOneNet(nn.Module):
    """ResNet-like: 3x3 stem, 1x1 convs (with and without bias, stride 1 and 2), a 3x3 conv, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.reduce = nn.Conv2d(16, 32, 1, bias=False)
        self.down = nn.Conv2d(32, 32, 1, stride=2)
        self.conv3x3 = nn.Conv2d(32, 32, 3, padding=1)
        self.expand = nn.Conv2d(32, 64, 1)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.reduce(x))
        x = torch.relu(self.conv3x3(self.down(x)))
        x = self.expand(x)
        return self.head(x.mean(dim=(2, 3)))


def tiny_convnext(seed=0):
    """ConvNeXt with 1x1-conv MLPs (conv_mlp=True) and its token-major (B, H, W, C) Linear MLPs (conv_mlp=False)."""
    from timm.models.convnext import ConvNeXt

    torch.manual_seed(seed)
    return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 16, 32), num_classes=4, conv_mlp=seed % 2 == 1)


def pruned(model, sparsity=0.9, include_head=False):
    """`model` in eval mode, pruned by magnitude relative to each layer's largest weight (about `sparsity` per layer).

    Pruned negative weights become -0.0.
    """
    model.eval()
    params = prunable_parameters(model, include=[r"weight$"] if include_head else None)
    scores = {name: p.detach().abs() / p.detach().abs().max() for name, p in params.items()}
    masks = global_masks(scores, sparsity)
    apply_masks(model, masks)
    return model


def images(batch, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def assert_matches(exported, dense, x):
    with torch.inference_mode():
        torch.testing.assert_close(exported(x), dense(x), rtol=EXPORT_RTOL, atol=EXPORT_ATOL)


def sparse_module_names(model):
    return [name for name, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv1x1))]


@pytest.mark.parametrize("example_batch", [1, 3])
def test_vit_export_matches_dense_token_major(example_batch):
    model = pruned(tiny_vit(), include_head=True)
    exported, report = export_sparse_inference(model, images(example_batch), timer=sparse_wins)
    linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    assert sorted(report.sparse_layers) == sorted(linears) == sorted(sparse_module_names(exported))
    assert isinstance(exported.blocks[0].mlp.fc1, SparseLinear)  # (B, N, C) token-major input
    assert type(model.blocks[0].mlp.fc1) is nn.Linear  # the original is left dense
    for batch in (1, 5):
        assert_matches(exported, model, images(batch, seed=batch))
    assert report.max_abs_error is not None and report.max_abs_error <= 1e-4


def test_transformers_vit_export_matches_dense():
    from tests.utils import make_hf_vit

    model = pruned(make_hf_vit(), include_head=True)  # attention reshapes with .view(), output is a ModelOutput
    exported, report = export_sparse_inference(model, images(2), timer=sparse_wins)
    assert len(report.sparse_layers) == 13 and report.max_abs_error is not None
    with torch.inference_mode():
        x = images(3)
        torch.testing.assert_close(exported(x).logits, model(x).logits, rtol=EXPORT_RTOL, atol=EXPORT_ATOL)


@pytest.mark.parametrize("seed", [0, 1], ids=["linear_mlp", "conv_mlp"])
def test_convnext_export_matches_dense(seed):
    model = pruned(tiny_convnext(seed))
    exported, report = export_sparse_inference(model, images(2), timer=sparse_wins)
    kinds = {layer.kind for layer in report.layers if layer.chosen == "sparse"}
    assert kinds == ({"conv1x1"} if seed == 1 else {"linear"})  # (B, H, W, C) Linears or 1x1 convs
    assert all(layer.chosen == "dense" for layer in report.layers if "conv_dw" in layer.name)  # 7x7 depthwise
    for batch in (1, 4):
        assert_matches(exported, model, images(batch, seed=batch))


def test_conv1x1_export_matches_dense_and_skips_other_convs():
    model = pruned(OneByOneNet(), include_head=True)
    exported, report = export_sparse_inference(model, images(1), timer=sparse_wins)
    assert sorted(report.sparse_layers) == ["down", "expand", "head", "reduce"]
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert "not 1x1" in reasons["stem"] and "not 1x1" in reasons["conv3x3"]
    assert exported.down.stride == (2, 2)
    for batch in (1, 3):
        assert_matches(exported, model, images(batch, seed=batch))
    # channels_last input (a strided layout the 1x1 kernel must reshape correctly)
    assert_matches(exported, model, images(2).to(memory_format=torch.channels_last))


def test_falls_back_to_dense_when_sparse_is_slower():
    model = pruned(tiny_vit())
    exported, report = export_sparse_inference(model, images(1), timer=sparse_loses)
    assert report.sparse_layers == [] and sparse_module_names(exported) == []
    measured = [layer for layer in report.layers if layer.dense_us]
    assert measured and all(layer.reason.startswith("sparse not") and layer.speedup == 0.5 for layer in measured)


def test_choice_per_layer_from_the_timer():
    model = pruned(tiny_vit())

    def fc1_wins(modules, inputs, repeats):  # sparse only faster for the MLP expansion (out = 4 in)
        dense, sparse = modules
        return [1.0, 0.5 if dense.out_features == 4 * dense.in_features else 1.0]

    exported, report = export_sparse_inference(model, images(1), timer=fc1_wins)
    assert report.sparse_layers == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert sparse_module_names(exported) == report.sparse_layers
    assert_matches(exported, model, images(2))


def test_min_speedup_and_every_batch_size_must_win():
    assert choose_sparse([1.0], [0.5], 1.1)
    assert not choose_sparse([1.0], [0.95], 1.1)  # 1.05x is inside the noise margin
    assert not choose_sparse([1.0, 1.0], [0.5, 1.2], 1.1)  # loses at the second batch size
    model = pruned(tiny_vit())

    def wins_for_small_batches(modules, inputs, repeats):  # a (B, N, C) input: sparse wins for B <= 2 only
        return [1.0, 0.5 if inputs[0].shape[0] <= 2 else 2.0]

    _, small = export_sparse_inference(model, images(1), batch_sizes=[1, 2], timer=wins_for_small_batches)
    _, mixed = export_sparse_inference(model, images(1), batch_sizes=[1, 8], timer=wins_for_small_batches)
    assert small.sparse_layers and not mixed.sparse_layers
    layer = next(layer for layer in mixed.layers if layer.name == "blocks.0.mlp.fc1")
    assert layer.input_shapes[8][0][0] == 8 and set(layer.dense_us) == {1, 8}


def test_dense_layers_skip_timing_and_report():
    model = pruned(tiny_vit())  # the head is not pruned: density 1
    calls = []

    def counting(modules, inputs, repeats):
        calls.append(modules[0])
        return [1.0, 0.5]

    exported, report = export_sparse_inference(model, images(1), timer=counting, repeats=3)
    head = next(layer for layer in report.layers if layer.name == "head")
    assert head.chosen == "dense" and "max_density" in head.reason and model.head not in calls
    assert len(calls) == len(report.sparse_layers) == 8
    table = report.format_table()
    assert "blocks.0.mlp.fc1" in table and "sparse" in table
    row = report.as_dict()["layers"][1]
    assert row["name"] == "blocks.0.attn.qkv" and row["speedup"] == 2.0 and row["dense_us"] == {"1": 1e6}


def test_to_dense_round_trip_is_exact():
    for model in (pruned(tiny_vit(), include_head=True), pruned(OneByOneNet(), include_head=True)):
        original = {k: v.clone() for k, v in model.state_dict().items()}
        exported, report = export_sparse_inference(model, images(2), timer=sparse_wins)
        assert report.sparse_layers
        back = to_dense(exported)
        assert not sparse_module_names(back) and sparse_module_names(exported)  # not in place by default
        state = back.state_dict()
        assert state.keys() == original.keys()
        for key, value in original.items():
            assert state[key].layout == torch.strided and state[key].dtype == value.dtype
            assert torch.equal(state[key], value), key
        assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
        fresh = copy.deepcopy(model)
        fresh.load_state_dict(state)  # loads into the plain architecture
        assert_matches(back, model, images(3))


def test_exported_model_deepcopies_and_sparsify_layers_repeats_a_decision():
    model = pruned(tiny_vit())
    exported, report = export_sparse_inference(model, images(1), timer=sparse_wins, inplace=True)
    assert exported is model and report.sparse_layers
    clone = copy.deepcopy(exported)
    assert sparse_module_names(clone) == report.sparse_layers
    assert clone.blocks[0].mlp.fc1.weight is not exported.blocks[0].mlp.fc1.weight
    again = sparsify_layers(to_dense(exported), report.sparse_layers)
    assert sparse_module_names(again) == report.sparse_layers
    with pytest.raises(ValueError, match="patch_embed.proj"):
        sparsify_layers(to_dense(exported), ["patch_embed.proj"])


def test_sparse_modules_edge_cases():
    torch.manual_seed(0)
    linear = nn.Linear(8, 6, bias=False)
    with torch.no_grad():
        linear.weight.zero_()  # a fully pruned layer: 0 stored values
    sparse = SparseLinear.from_dense(linear)
    x = torch.randn(2, 3, 4, 8).transpose(1, 2)  # non-contiguous, two leading dims
    torch.testing.assert_close(sparse(x), linear(x))
    assert sparse.density == 0.0 and "density=0.0000" in repr(sparse)
    with pytest.raises(ValueError, match="groups"):
        SparseConv1x1.from_dense(nn.Conv2d(4, 4, 1, groups=2))


def test_scripted_and_traced_exported_model_run():
    model = pruned(tiny_vit())
    exported, _ = export_sparse_inference(model, images(1), timer=sparse_wins)
    x = images(2)
    with torch.inference_mode():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(exported)(x), expected, rtol=EXPORT_RTOL, atol=EXPORT_ATOL)
        traced = torch.jit.trace(exported, x, check_trace=False)
        torch.testing.assert_close(traced(x), expected, rtol=EXPORT_RTOL, atol=EXPORT_ATOL)


def test_verification_catches_a_wrong_export():
    model = pruned(tiny_vit())
    exported, _ = export_sparse_inference(model, images(1), timer=sparse_wins)
    with torch.no_grad():
        exported.blocks[0].mlp.fc2.weight.values().mul_(1.01)  # corrupt the stored weights
    with torch.inference_mode():
        reference = model(images(1))
    with pytest.raises(AssertionError):
        max_output_error(exported, reference, images(1))


def test_bad_arguments_raise_clearly():
    model = pruned(tiny_vit())
    with pytest.raises(ValueError, match="no nn.Linear"):
        export_sparse_inference(model, images(1), layers=[r"^nothing$"], timer=sparse_wins)
    with pytest.raises(ValueError, match="min_speedup"):
        export_sparse_inference(model, images(1), min_speedup=0, timer=sparse_wins)
    model.train()
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        export_sparse_inference(model, images(1), timer=sparse_wins)


def test_layers_patterns_restrict_the_candidates():
    model = pruned(tiny_vit())
    exported, report = export_sparse_inference(model, images(1), layers=[r"mlp\.fc2$"], timer=sparse_wins)
    assert report.sparse_layers == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    assert [layer.name for layer in report.layers] == report.sparse_layers


def test_default_timer_returns_one_time_per_module():
    linear = nn.Linear(8, 8)
    seconds = interleaved_min_seconds([linear, SparseLinear.from_dense(linear)], [torch.randn(4, 8)], repeats=2)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path on a machine without CUDA")
def test_semi_structured_export_raises_clearly_without_cuda():
    model = tiny_vit().eval()
    with pytest.raises(SemiStructuredUnavailableError, match=r"compute capability >= 8\.0.*is_available\(\) is False"):
        export_semi_structured(model)


def test_semi_structured_requirements():
    cuda = torch.device("cuda", 0)
    assert "is_available() is False" in semi_structured_requirement_error(False, cuda, None, torch.float16)
    assert "model.half().cuda()" in semi_structured_requirement_error(True, torch.device("cpu"), None, torch.float16)
    assert "capability (7, 5)" in semi_structured_requirement_error(True, cuda, (7, 5), torch.float16)
    assert "model.half()" in semi_structured_requirement_error(True, cuda, (8, 0), torch.float32)
    assert semi_structured_requirement_error(True, cuda, (8, 0), torch.bfloat16) is None
    assert semi_structured_requirement_error(True, cuda, (9, 0), torch.float16) is None
