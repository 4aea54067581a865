"""Sparse inference export (hf_tgprune.io.export): outputs, per-layer choice, the way back, the 2:4 CUDA error path.

The layer timings are injected (fake timers) so that every choice is deterministic; nothing here asserts on time.
"""

import copy
import importlib.util
import os
import shutil

import pytest
import torch
from torch import nn

from hf_tgprune.core.masking import apply_masks, global_masks, prunable_parameters
from hf_tgprune.io.direct_conv import direct_kernel_unavailable
from hf_tgprune.io.export import (
    EXPORT_ATOL,
    EXPORT_RTOL,
    SemiStructuredUnavailableError,
    SparseConv1x1,
    SparseConv2d,
    SparseLinear,
    choose_sparse,
    export_semi_structured,
    export_sparse_inference,
    interleaved_min_seconds,
    max_output_error,
    output_tolerance,
    semi_structured_requirement_error,
    sparse_candidates,
    sparsify_layers,
    to_dense,
    to_sparse_module,
)

# one torch thread inside these tests only: the setting is process-wide
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sparse_wins(modules, inputs, repeats):
    """Fake timer: every sparse formulation (after the dense module) takes half the dense time."""
    return [1.0] + [0.5] * (len(modules) - 1)


def sparse_loses(modules, inputs, repeats):
    return [1.0] + [2.0] * (len(modules) - 1)


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
    return [name for name, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv1x1, SparseConv2d))]


@pytest.mark.parametrize("example_batch", [1, 3])
def test_vit_export_matches_dense_token_major(example_batch):
    model = pruned(tiny_vit(), include_head=True)
    exported, report = export_sparse_inference(model, images(example_batch), timer=sparse_wins)
    linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    # every Linear layer and the patch embedding (a k×k convolution with stride k)
    expected = sorted([*linears, "patch_embed.proj"])
    assert sorted(report.sparse_layers) == expected == sorted(sparse_module_names(exported))
    assert isinstance(exported.blocks[0].mlp.fc1, SparseLinear)  # (B, N, C) token-major input
    assert type(model.blocks[0].mlp.fc1) is nn.Linear  # the original is left dense
    for batch in (1, 5):
        assert_matches(exported, model, images(batch, seed=batch))
    assert report.max_abs_error is not None and report.max_abs_error <= 1e-4


def test_transformers_vit_export_matches_dense():
    from tests.utils import make_hf_vit

    model = pruned(make_hf_vit(), include_head=True)  # attention reshapes with .view(), output is a ModelOutput
    exported, report = export_sparse_inference(model, images(2), timer=sparse_wins)
    assert len(report.sparse_layers) == 14 and report.max_abs_error is not None  # 13 Linear + the patch projection
    with torch.inference_mode():
        x = images(3)
        torch.testing.assert_close(exported(x).logits, model(x).logits, rtol=EXPORT_RTOL, atol=EXPORT_ATOL)


@pytest.mark.parametrize("seed", [0, 1], ids=["linear_mlp", "conv_mlp"])
def test_convnext_export_matches_dense(seed):
    model = pruned(tiny_convnext(seed))
    exported, report = export_sparse_inference(model, images(2), timer=sparse_wins)
    kinds = {layer.kind for layer in report.layers if layer.chosen == "sparse"}
    # (B, H, W, C) Linears or 1x1 convs, and the k×k stem and downsampling convolutions
    assert kinds == ({"conv1x1", "conv"} if seed == 1 else {"linear", "conv"})
    depthwise = [layer for layer in report.layers if "conv_dw" in layer.name]  # 7x7 depthwise stay dense
    assert depthwise and all(layer.chosen == "dense" and "groups" in layer.reason for layer in depthwise)
    for batch in (1, 4):
        assert_matches(exported, model, images(batch, seed=batch))


def test_conv_export_matches_dense_for_1x1_and_kxk_convolutions():
    model = pruned(OneByOneNet(), include_head=True)
    exported, report = export_sparse_inference(model, images(1), timer=sparse_wins)
    assert sorted(report.sparse_layers) == ["conv3x3", "down", "expand", "head", "reduce", "stem"]
    kinds = {layer.name: layer.kind for layer in report.layers}
    assert kinds["stem"] == kinds["conv3x3"] == "conv" and kinds["down"] == "conv1x1"
    assert isinstance(exported.conv3x3, SparseConv2d) and exported.conv3x3.padding == (1, 1)
    assert report.formulations["conv3x3"] in ("unfold", "shift") and report.formulations["head"] == "csr"
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
        dense, *sparse = modules
        wins = getattr(dense, "out_features", 0) == 4 * getattr(dense, "in_features", -1)
        return [1.0] + [0.5 if wins else 1.0] * len(sparse)

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
        return [1.0] + [0.5 if inputs[0].shape[0] <= 2 else 2.0] * (len(modules) - 1)

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
        return [1.0] + [0.5] * (len(modules) - 1)

    exported, report = export_sparse_inference(model, images(1), timer=counting, repeats=3)
    head = next(layer for layer in report.layers if layer.name == "head")
    assert head.chosen == "dense" and "max_density" in head.reason and model.head not in calls
    assert len(calls) == len(report.sparse_layers) == 9  # 8 Linear + the patch embedding
    table = report.format_table()
    assert "blocks.0.mlp.fc1" in table and "sparse" in table
    row = report.as_dict()["layers"][1]
    assert row["name"] == "blocks.0.attn.qkv" and row["speedup"] == 2.0 and row["dense_us"] == {"1": 1e6}


def test_to_dense_round_trip_is_exact():
    for model in (pruned(tiny_vit(), include_head=True), pruned(OneByOneNet(), include_head=True)):
        original = {k: v.clone() for k, v in model.state_dict().items()}
        exported, report = export_sparse_inference(model, images(2), timer=sparse_wins, fold_bn=False)
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
    with pytest.raises(ValueError, match="blocks.0.norm1"):
        sparsify_layers(to_dense(exported), ["blocks.0.norm1"])


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


def test_verification_tolerance_scales_with_the_output_magnitude():
    class Fixed(nn.Module):
        def __init__(self, values):
            super().__init__()
            self.register_buffer("values", torch.tensor(values))

        def forward(self, x):
            return self.values

    reference = torch.tensor([5000.0, 0.5])
    assert (
        output_tolerance(reference) == pytest.approx(EXPORT_ATOL * 5000)
        and output_tolerance(reference[1:]) == EXPORT_ATOL
    )
    assert max_output_error(Fixed([5000.0, 0.5002]), reference, torch.zeros(1)) == pytest.approx(2e-4, rel=1e-3)
    with pytest.raises(AssertionError):  # beyond EXPORT_ATOL times the largest magnitude
        max_output_error(Fixed([5000.0, 0.6]), reference, torch.zeros(1))
    with pytest.raises(AssertionError):  # a small output keeps the absolute tolerance
        max_output_error(Fixed([0.5, 0.5002]), torch.tensor([0.5, 0.5]), torch.zeros(1))


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


# --- k×k convolutions and BatchNorm folding ---------------------------------------------------------------------------
CONV_CASES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, padding=2, dilation=2),
    dict(kernel_size=(3, 5), padding=(1, 2), stride=(2, 1)),
    dict(kernel_size=4, padding="same"),  # asymmetric padding
    dict(kernel_size=3, padding="valid", bias=False),
    dict(kernel_size=1, padding=1),  # a 1x1 convolution with padding is not a SparseConv1x1
    dict(kernel_size=7, stride=4),
]


@pytest.mark.parametrize("formulation", ["unfold", "shift", "direct"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sparse_conv2d_matches_the_convolution(case, formulation, request):
    if formulation == "direct":
        request.getfixturevalue("direct_kernel")
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, **case)
    with torch.no_grad():
        conv.weight.mul_((torch.rand_like(conv.weight) > 0.85).float())
    sparse = SparseConv2d(conv, formulation)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(sparse, name) == getattr(conv, name), name
    for batch in (1, 3):
        x = torch.randn(batch, 6, 15, 12)
        with torch.inference_mode():
            torch.testing.assert_close(sparse(x), conv(x), rtol=EXPORT_RTOL, atol=EXPORT_ATOL)
            channels_last = x.to(memory_format=torch.channels_last)
            torch.testing.assert_close(sparse(channels_last), conv(channels_last), rtol=EXPORT_RTOL, atol=EXPORT_ATOL)
    back = sparse.to_dense_module()
    assert torch.equal(back.weight.detach().abs(), conv.weight.detach().abs())
    assert copy.deepcopy(sparse).density == sparse.density > 0


def test_shift_formulation_skips_empty_offsets_and_a_fully_pruned_conv_gives_its_bias():
    conv = nn.Conv2d(4, 5, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 1, 1] = torch.randn(5, 4)  # only the centre tap holds weights
    assert [(tap.i, tap.j) for tap in SparseConv2d(conv, "shift").taps] == [(1, 1)]
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        conv.weight.zero_()
    empty = SparseConv2d(conv, "shift")
    with torch.inference_mode():
        torch.testing.assert_close(empty(x), conv(x))


@pytest.fixture
def direct_kernel():
    """Tests of the compiled direct kernel; skipped (with the reason) where it cannot be built."""
    reason = direct_kernel_unavailable()
    if reason:
        pytest.skip(f"the direct convolution kernel is unavailable here: {reason}")


def test_direct_kernel_builds_where_a_compiler_and_ninja_exist():
    if importlib.util.find_spec("ninja") is None and shutil.which("ninja") is None:
        assert direct_kernel_unavailable() == "ninja is not installed (pip install ninja)"
    elif shutil.which("c++") or shutil.which("g++"):  # the test extras install ninja: the kernel builds in CI
        path = os.environ.get("PATH")
        assert direct_kernel_unavailable() is None
        assert hasattr(torch.ops.hf_tgprune, "direct_conv2d") and os.environ.get("PATH") == path
    else:
        assert "no C++ compiler" in direct_kernel_unavailable()


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
def test_direct_formulation_of_1x1_convolutions_and_empty_output_channels(stride, batch, direct_kernel):
    torch.manual_seed(stride)
    conv = nn.Conv2d(16, 12, 1, stride=stride)
    with torch.no_grad():
        conv.weight.mul_((torch.rand_like(conv.weight) > 0.9).float())
        conv.weight[:3] = 0  # output channels without any weight give their bias
    candidates = sparse_candidates(conv)
    assert set(candidates) == {"csr", "direct"} and isinstance(candidates["direct"], SparseConv2d)
    x = torch.randn(batch, 16, 9, 7)
    with torch.inference_mode():
        out = candidates["direct"](x)
        torch.testing.assert_close(out, conv(x), rtol=EXPORT_RTOL, atol=EXPORT_ATOL)
        torch.testing.assert_close(out[:, :3], conv.bias[:3, None, None].expand(batch, 3, *out.shape[2:]))
    assert isinstance(to_sparse_module(conv, "direct"), SparseConv2d)
    assert isinstance(to_sparse_module(conv), SparseConv1x1)


@pytest.mark.parametrize("shape", [(5, 16), (2, 7, 16), (2, 3, 4, 16), (1, 197, 16)])
def test_direct_formulation_of_linear_layers_matches_token_major_inputs(shape, direct_kernel):
    torch.manual_seed(len(shape))
    linear = nn.Linear(16, 24)
    with torch.no_grad():
        linear.weight.mul_((torch.rand_like(linear.weight) > 0.9).float())
    candidates = sparse_candidates(linear)
    assert set(candidates) == {"csr", "csr/64", "csr/512", "direct"}
    direct = candidates["direct"]
    assert isinstance(direct, SparseLinear) and direct.direct is not None and "direct=True" in repr(direct)
    x = torch.randn(*shape)
    with torch.inference_mode():
        torch.testing.assert_close(direct(x), linear(x), rtol=EXPORT_RTOL, atol=EXPORT_ATOL)
    assert torch.equal(direct.to_dense_module().weight, linear.weight.detach())


def test_direct_kernels_split_work_over_threads_exactly(direct_kernel):
    torch.manual_seed(3)
    linear = nn.Linear(40, 150)  # several feature blocks, the last one partial
    conv = nn.Conv2d(8, 130, 3, stride=2, padding=1)
    with torch.no_grad():
        linear.weight.mul_((torch.rand_like(linear.weight) > 0.8).float())
        conv.weight.mul_((torch.rand_like(conv.weight) > 0.8).float())
    sparse_linear, sparse_conv = SparseLinear(linear.weight, linear.bias, direct=True), SparseConv2d(conv, "direct")
    tokens, images_ = torch.randn(3, 70, 40), torch.randn(2, 8, 21, 19)
    threads = torch.get_num_threads()
    try:
        outputs = []
        for count in (1, 2):
            torch.set_num_threads(count)
            with torch.inference_mode():
                outputs.append((sparse_linear(tokens), sparse_conv(images_)))
    finally:
        torch.set_num_threads(threads)
    with torch.inference_mode():
        torch.testing.assert_close(outputs[0][0], linear(tokens), rtol=EXPORT_RTOL, atol=EXPORT_ATOL)
        torch.testing.assert_close(outputs[0][1], conv(images_), rtol=EXPORT_RTOL, atol=EXPORT_ATOL)
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


def test_direct_ops_refuse_malformed_arguments_before_reading_memory(direct_kernel):
    conv, linear = torch.ops.hf_tgprune.direct_conv2d, torch.ops.hf_tgprune.direct_linear
    planes, rows = torch.ones(1, 1, 4, 4), torch.ones(3, 2)
    crow, col, values = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([4], dtype=torch.int32), torch.ones(1)
    geometry = [3, 3, 1, 1, 1, 1, 2, 2]
    assert conv(planes, crow, col, values, None, *geometry).shape == (1, 1, 2, 2)  # the well-formed call
    bad_conv = {
        "output size does not fit": (planes, crow, col, values, None, 3, 3, 1, 1, 1, 1, 4, 4),
        "must be >= 1": (planes, crow, col, values, None, 3, 3, 0, 1, 1, 1, 2, 2),
        "crow must start at 0": (planes, torch.tensor([0, 1000], dtype=torch.int32), col, values, None, *geometry),
        "as many as col": (planes, crow, col, torch.ones(0), None, *geometry),
        "column index out of range": (planes, crow, torch.tensor([-5], dtype=torch.int32), values, None, *geometry),
        "bias must be": (planes, crow, col, values, torch.ones(3), *geometry),
        "float32": (planes.double(), crow, col, values, None, *geometry),
    }
    for message, arguments in bad_conv.items():
        with pytest.raises(RuntimeError, match=message):
            conv(*arguments)
    two = torch.tensor([0, 1, 1], dtype=torch.int32)
    assert linear(rows, two, torch.tensor([1], dtype=torch.int32), values, None).shape == (3, 2)
    with pytest.raises(RuntimeError, match="column index out of range"):
        linear(rows, two, torch.tensor([2], dtype=torch.int32), values, None)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        linear(rows, torch.tensor([0, 2, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32), values, None)
    sparse = SparseConv2d(nn.Conv2d(3, 4, 3), "direct")
    with pytest.raises(RuntimeError, match="channel count"):
        sparse(torch.randn(1, 5, 8, 8))
    with pytest.raises(RuntimeError, match="float32"):
        sparse(torch.randn(1, 3, 8, 8, dtype=torch.float64))


def test_direct_formulation_is_chosen_scripted_and_repeated(direct_kernel):
    model = pruned(OneByOneNet(), include_head=True)

    def direct_wins(modules, inputs, repeats):
        return [1.0] + [0.2 if getattr(m, "formulation", None) == "direct" else 0.5 for m in modules[1:]]

    exported, report = export_sparse_inference(model, images(1), timer=direct_wins, fold_bn=False)
    convs = [layer.name for layer in report.layers if layer.kind in ("conv", "conv1x1") and layer.chosen == "sparse"]
    assert convs and all(report.formulations[name] == "direct" for name in convs)
    assert report.formulations["head"] == "csr" and report.unavailable_formulations == {}
    assert "sparse (direct)" in report.format_table()
    for batch in (1, 3):
        assert_matches(exported, model, images(batch, seed=batch))
    assert_matches(torch.jit.script(exported), model, images(2))
    assert_matches(copy.deepcopy(exported), model, images(2))
    again = sparsify_layers(to_dense(exported), report.sparse_layers, report.formulations)
    assert all(dict(again.named_modules())[name].formulation == "direct" for name in convs)
    assert_matches(again, model, images(2))


def test_without_the_direct_kernel_the_export_says_why_and_uses_the_others(monkeypatch):
    import hf_tgprune.io.export as export

    monkeypatch.setattr(export, "direct_kernel_unavailable", lambda: "no C++ compiler (c++ / g++) on PATH")
    conv = nn.Conv2d(4, 4, 3, padding=1)
    assert set(sparse_candidates(conv)) == {"unfold", "shift"}
    assert set(sparse_candidates(nn.Conv2d(4, 4, 1))) == {"csr"}
    assert set(sparse_candidates(nn.Linear(4, 4))) == {"csr", "csr/64", "csr/512"}
    with pytest.raises(RuntimeError, match="direct.*unavailable.*no C\\+\\+ compiler"):
        SparseConv2d(conv, "direct")
    with pytest.raises(RuntimeError, match="direct=True is unavailable.*no C\\+\\+ compiler"):
        SparseLinear(torch.randn(4, 4), direct=True)
    model = pruned(OneByOneNet(), include_head=True)
    exported, report = export_sparse_inference(model, images(1), timer=sparse_wins, fold_bn=False)
    assert report.unavailable_formulations == {"direct": "no C++ compiler (c++ / g++) on PATH"}
    assert "formulation 'direct' not offered: no C++ compiler" in report.format_table()
    assert "direct" not in report.formulations.values()
    assert_matches(exported, model, images(2))


def test_depthwise_and_grouped_convolutions_stay_dense_with_the_reason():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 3, groups=2))
    model = pruned(model, include_head=True)
    exported, report = export_sparse_inference(model, images(1), timer=sparse_wins)
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert report.sparse_layers == ["0"]
    assert "groups=8" in reasons["1"] and "groups=2" in reasons["2"] and "stay dense" in reasons["1"]


def test_formulation_is_chosen_per_layer_and_repeated_by_sparsify_layers():
    model = pruned(OneByOneNet(), include_head=True)

    def shift_wins_for_the_stem(modules, inputs, repeats):  # dense, then every formulation
        if not isinstance(modules[1], SparseConv2d):
            return [1.0] + [0.5] * (len(modules) - 1)
        stem = modules[0].in_channels == 3
        times = {"unfold": 0.8, "shift": 0.4, "direct": 0.9} if stem else {"unfold": 0.4, "shift": 0.8, "direct": 0.9}
        return [1.0] + [times[m.formulation] for m in modules[1:]]

    exported, report = export_sparse_inference(model, images(1), timer=shift_wins_for_the_stem, fold_bn=False)
    assert report.formulations["stem"] == "shift" and report.formulations["conv3x3"] == "unfold"
    assert exported.stem.formulation == "shift" and exported.conv3x3.formulation == "unfold"
    stem = next(layer for layer in report.layers if layer.name == "stem")
    assert {f: stem.formulation_us[f] for f in ("unfold", "shift")} == {"unfold": {1: 0.8e6}, "shift": {1: 0.4e6}}
    assert stem.speedup == 2.5
    assert "sparse (shift)" in report.format_table()
    again = sparsify_layers(to_dense(exported), report.sparse_layers, report.formulations)
    assert again.stem.formulation == "shift"
    assert_matches(again, model, images(2))
    scripted = torch.jit.script(exported)  # both formulations script
    assert_matches(scripted, model, images(2))


def test_batchnorm_is_folded_into_the_preceding_convolution():
    model = pruned(OneByOneNet(), include_head=True)
    with torch.no_grad():  # statistics that are not the identity
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 1.5)
    pruned_positions = model.stem.weight.detach() == 0
    exported, report = export_sparse_inference(model, images(2), timer=sparse_loses)  # folding alone
    assert report.folded_batchnorms == [("stem", "bn")] and isinstance(exported.bn, nn.Identity)
    assert isinstance(model.bn, nn.BatchNorm2d)  # the model itself is left as it was
    assert (exported.stem.weight.detach()[pruned_positions] == 0).all()  # pruned weights stay zero
    for batch in (1, 3):
        assert_matches(exported, model, images(batch, seed=batch))
    _, unfolded = export_sparse_inference(model, images(2), timer=sparse_loses, fold_bn=False)
    assert unfolded.folded_batchnorms == []


def test_batchnorm_act_of_timm_keeps_its_activation_when_folded():
    import timm

    model = pruned(timm.create_model("test_resnet", num_classes=4))
    exported, report = export_sparse_inference(model, images(2), timer=sparse_wins)
    assert report.folded_batchnorms and report.max_abs_error is not None
    for batch in (1, 3):
        assert_matches(exported, model, images(batch, seed=batch))


class SharedConvOutput(nn.Module):
    """The convolution's output feeds the BatchNorm and a residual: folding it would change the residual."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.other = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn2(self.other(self.bn(y) + y))


def test_a_convolution_output_used_elsewhere_is_not_folded():
    model = SharedConvOutput().eval()
    with torch.no_grad():
        for bn in (model.bn, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    exported, report = export_sparse_inference(model, images(2), timer=sparse_loses)
    assert report.folded_batchnorms == [("other", "bn2")]
    assert_matches(exported, model, images(3))


@pytest.mark.parametrize("row_block", [1, 5, 64])
def test_sparse_linear_in_row_blocks_matches_dense(row_block):
    torch.manual_seed(0)
    linear = nn.Linear(12, 7)
    with torch.no_grad():
        linear.weight.mul_((torch.rand_like(linear.weight) > 0.8).float())
    blocked = SparseLinear(linear.weight, linear.bias, row_block=row_block)
    x = torch.randn(3, 11, 12)  # 33 rows: blocks of 1, 5 (a short last block) and one block of 64
    with torch.inference_mode():
        torch.testing.assert_close(blocked(x), linear(x), rtol=EXPORT_RTOL, atol=EXPORT_ATOL)
    assert blocked(x).is_contiguous() or row_block >= 33
    with pytest.raises(ValueError, match="row_block"):
        SparseLinear(linear.weight, row_block=-1)


def test_linear_row_blocks_are_a_formulation_chosen_by_the_timer():
    model = pruned(tiny_vit())

    def blocks_of_64_win(modules, inputs, repeats):  # dense, csr, csr/64, csr/512 (and direct) for Linear layers
        if isinstance(modules[1], SparseLinear):
            return [1.0, 0.9, 0.4, 0.8] + [0.9] * (len(modules) - 4)
        return [1.0] + [2.0] * (len(modules) - 1)

    exported, report = export_sparse_inference(model, images(2), timer=blocks_of_64_win)
    assert report.sparse_layers and set(report.formulations.values()) == {"csr/64"}
    assert exported.blocks[0].mlp.fc1.row_block == 64
    again = sparsify_layers(to_dense(exported), report.sparse_layers, report.formulations)
    assert again.blocks[0].mlp.fc1.row_block == 64
    assert_matches(exported, model, images(3))
    assert_matches(torch.jit.script(exported), model, images(3))
