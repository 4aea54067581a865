"""Inference export of pruned models: sparse kernels where they are measurably faster, and the way back to dense.

CPU (any PyTorch; the compiled `"direct"` convolution kernel also needs a C++ compiler and `ninja`):

    model.eval()
    exported, report = export_sparse_inference(model, example_inputs=torch.randn(1, 3, 224, 224))
    print(report.format_table())         # per layer: shape, density, dense µs, sparse µs, chosen
    logits = exported(images)            # eager inference; equal to model(images) within EXPORT_RTOL, output_tolerance
    dense_again = to_dense(exported)     # plain nn.Linear / nn.Conv2d again: save it with save_sparse_model

Every `nn.Linear` and every `nn.Conv2d` with groups 1 that the example forward pass calls is timed on its own input
shape, dense against sparse versions, and replaced only when a sparse version is at least `min_speedup`
times faster at every requested batch size: `SparseLinear` / `SparseConv1x1` (`y = W_csr @ x^T + b`, tokens, pixels
and images folded into the columns), and for convolutions `SparseConv2d` in the fastest formulation
(`"unfold"`: one matmul over the patch matrix; `"shift"`: one matmul per kernel offset, accumulated; `"direct"`: a
compiled kernel adding each kept weight's shifted input plane into its output plane, `direct_conv.py`, also timed
for 1×1 layers; it needs a C++ compiler and `ninja` and is compiled on first use); Linear layers
are also timed with their input rows in blocks of 64 and 512 (`"csr/64"`, `"csr/512"`: the block stays in cache at
large batch sizes) and with the direct kernel (`"direct"`). Depthwise and
grouped convolutions stay dense (no sparse formulation). Before timing, every eval-mode BatchNorm that directly
follows a convolution is folded into it (`fold_batchnorm`), so that a sparse convolution does not pay for a separate
BatchNorm pass. The choice depends on the machine, the thread count (`torch.get_num_threads()`) and the batch size:
export with the settings you will serve with. Measured figures: `benchmarks/INFERENCE.md`.

The exported model is an inference-only module: sparse weights are buffers and biases frozen parameters. Eager mode
is the supported path. Checked with PyTorch 2.15 on CPU: `torch.jit.script` and `torch.jit.trace` (both deprecated
upstream) run it with the same outputs (tested); `torch.compile` runs it correctly but Dynamo cannot trace sparse
tensors, so it breaks the graph at every sparse layer and runs those eagerly (its speed was not measured); `torch.export`
gave matching outputs in a one-off check (not tested here). `copy.deepcopy` works; `state_dict()` holds CSR tensors
(loadable with `torch.load`, not with safetensors). Save the pruned model itself and export again where you serve:
`to_dense` gives plain layers back, but with the BatchNorms folded into the convolutions (unless `fold_bn=False`),
which is not the architecture the model's library rebuilds.

CUDA (2:4 semi-structured): `export_semi_structured` converts Linear weights that already hold a 2:4 pattern along the
input dim (`hf_tgprune.core.nm.nm_masks`) with `torch.sparse.to_sparse_semi_structured`; it needs a GPU of compute
capability >= 8.0 and fp16/bf16 weights, and raises `SemiStructuredUnavailableError` saying so otherwise.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.kernel_masks import bake_kernel_masks
from ..core.nm import is_nm_sparse
from ..core.utils import match_patterns, replace_submodule
from .direct_conv import direct_kernel_unavailable, stride_phases

# outputs of an exported model match the dense pruned model within these tolerances (torch.testing.assert_close):
# the sparse kernels sum the same products in another order, a float32 rounding difference
EXPORT_RTOL = 1e-4
EXPORT_ATOL = 1e-5

SEMI_STRUCTURED_MIN_CAPABILITY = (8, 0)
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)

# a timer gets the modules to compare and the inputs of one forward pass of the layer (one per call of the layer),
# and returns the seconds each module needs for all of them; injectable for tests
Timer = Callable[[Sequence[nn.Module], Sequence[torch.Tensor], int], list[float]]


# --------------------------------------------------------------------------------------------------------------------
# sparse modules
# --------------------------------------------------------------------------------------------------------------------


def _csr(weight: torch.Tensor) -> torch.Tensor:
    """float32 CSR copy of a 2-D weight: only the nonzeros, with int32 indices (4 + 4 bytes per kept weight).

    Signed zeros are not stored, so a pruned `-0.0` comes back as `+0.0`.
    """
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state": known, and tested here
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = weight.detach().float().to_sparse_csr()
        if csr.values().numel() >= 2**31:
            return csr
        return torch.sparse_csr_tensor(
            csr.crow_indices().int(),
            csr.col_indices().int(),
            csr.values(),
            csr.shape,
            device=csr.device,
            check_invariants=True,
        )


def _bias_parameter(bias: torch.Tensor | None) -> nn.Parameter | None:
    """A frozen copy of the bias. A parameter, not a buffer: a model whose every layer was exported still has
    parameters, which transformers' `model.device` / `model.dtype` read."""
    return None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)


def _csr_matmul(weight: torch.Tensor, bias: torch.Tensor | None, columns: torch.Tensor) -> torch.Tensor:
    """`weight @ columns + bias[:, None]` with a CSR `weight` `(out, in)` and dense `columns` `(in, n)`."""
    if bias is None:
        return torch.mm(weight, columns)
    return torch.addmm(bias.unsqueeze(1), weight, columns)


class _CsrModule(nn.Module):
    """Base of the CSR modules: `copy.deepcopy` works (plain deepcopy cannot copy a CSR tensor's storage)."""

    def __deepcopy__(self, memo):
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key != "_buffers":
                new.__dict__[key] = copy.deepcopy(value, memo)
        new.__dict__["_buffers"] = {
            name: None if buffer is None else memo.setdefault(id(buffer), buffer.clone())
            for name, buffer in self._buffers.items()
        }
        return new


def _filled_module(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """`module` moved to `weight`'s device and dtype, holding exactly `weight` and `bias`."""
    module = module.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
    return module


class _DirectKernel(nn.Module):
    """Calls the compiled direct sparse convolution (`direct_conv.py`); a submodule, so that TorchScript compiles
    the call only in the modules that use it."""

    def forward(
        self, planes: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: list[int]
    ) -> torch.Tensor:
        kh, kw, sh, sw, dh, dw, out_h, out_w = geometry
        return torch.ops.hf_tgprune.direct_conv2d(
            planes, weight.crow_indices(), weight.col_indices(), weight.values(), bias, kh, kw, sh, sw, dh, dw,
            out_h, out_w,
        )  # fmt: skip


class _DirectLinearKernel(nn.Module):
    """Calls the compiled direct sparse Linear kernel (`direct_conv.py`); a submodule, as `_DirectKernel`."""

    def forward(self, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.hf_tgprune.direct_linear(
            rows, weight.crow_indices(), weight.col_indices(), weight.values(), bias
        )


class SparseLinear(_CsrModule):
    """`nn.Linear` for inference with a `torch.sparse_csr` float32 weight: `y = (W_csr @ x^T)^T + b`.

    Every leading dimension of the input (batch, tokens, height, width) is folded into the columns of the sparse
    matmul, so token-major inputs `(B, N, C)` (ViT MLPs) and `(B, H, W, C)` (ConvNeXt MLPs) work. With `row_block`,
    the input rows are multiplied `row_block` at a time: for large batches the operand block then stays in cache
    (`export_sparse_inference` times blocks of 64 and 512 rows against one matmul and keeps the fastest). The output
    is row-major like `nn.Linear`'s (a transposed matmul result would send the next operations, e.g. attention, to
    slower strided paths).
    With `direct=True` the product is computed by the compiled direct kernel (`direct_conv.py`) instead of torch's
    CSR matmul, and the output is row-major.

    Args:
        weight: the dense weight `(out_features, in_features)`; stored as CSR.
        bias: the bias `(out_features,)` or None.
        row_block: input rows per sparse matmul; 0 for all at once.
        direct: use the compiled direct kernel (needs it built: `direct_kernel_unavailable()` is None).
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, row_block: int = 0, direct: bool = False
    ):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear needs a 2-D weight (out, in), got shape {tuple(weight.shape)}")
        if row_block < 0:
            raise ValueError(f"row_block must be >= 0 (0: all rows at once), got {row_block}")
        if direct and direct_kernel_unavailable():
            raise RuntimeError(f"SparseLinear: direct=True is unavailable: {direct_kernel_unavailable()}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.row_block = 0 if direct else int(row_block)
        self.register_buffer("weight", _csr(weight))
        self.bias = _bias_parameter(bias)
        self.direct = _DirectLinearKernel() if direct else None

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> SparseLinear:
        return cls(linear.weight, linear.bias)

    def to_dense_module(self) -> nn.Linear:
        """The equivalent `nn.Linear` (same device; weight and bias values equal)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        return _filled_module(linear, self.weight.to_dense(), self.bias)

    @property
    def density(self) -> float:
        return self.weight.values().numel() / max(1, self.out_features * self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.direct is not None:
            out = self.direct(rows.contiguous(), self.weight, self.bias)
        elif self.row_block <= 0 or rows.shape[0] <= self.row_block:
            out = _csr_matmul(self.weight, self.bias, rows.t()).t().contiguous()
        else:
            out = torch.empty(rows.shape[0], self.out_features, device=rows.device, dtype=rows.dtype)
            for start in range(0, rows.shape[0], self.row_block):
                block = rows[start : start + self.row_block]
                out[start : start + block.shape[0]] = _csr_matmul(self.weight, self.bias, block.t()).t()
        return out.reshape(list(x.shape[:-1]) + [self.out_features])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"density={self.density:.4f}"
            + (f", row_block={self.row_block}" if self.row_block else "")
            + (", direct=True" if self.direct is not None else "")
        )


class SparseConv1x1(_CsrModule):
    """A 1×1 `nn.Conv2d` (groups 1, padding 0, any stride) for inference with a `torch.sparse_csr` float32 weight.

    Computes `W_csr @ X` with the pixels of all images as the columns of `X` `(in, B·H·W)`; batch 1 needs no copy of
    the input. A stride is applied by subsampling the input first (exact for a 1×1 kernel without padding).

    It keeps the attributes of the `nn.Conv2d` it replaces (`in_channels`, `out_channels`, `kernel_size`, `stride`,
    `padding`, `dilation`, `groups`, `padding_mode`), so that a parent module reading them (e.g. the TensorFlow-style
    padding of transformers' MobileNets) works unchanged.

    Args:
        weight: the dense weight `(out, in, 1, 1)`; stored as CSR `(out, in)`.
        bias: the bias `(out,)` or None.
        stride: the convolution's stride `(sh, sw)`.
        dilation: the replaced convolution's dilation (no effect on a 1×1 kernel; kept for parents that read it).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        stride: tuple[int, int] = (1, 1),
        dilation: tuple[int, int] = (1, 1),
    ):
        super().__init__()
        if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1):
            raise ValueError(f"SparseConv1x1 needs a (out, in, 1, 1) weight, got shape {tuple(weight.shape)}")
        self.out_channels, self.in_channels = int(weight.shape[0]), int(weight.shape[1])
        self.stride = (int(stride[0]), int(stride[1]))
        self.kernel_size, self.padding, self.groups, self.padding_mode = (1, 1), (0, 0), 1, "zeros"
        self.dilation = (int(dilation[0]), int(dilation[1]))
        self.register_buffer("weight", _csr(weight.reshape(self.out_channels, self.in_channels)))
        self.bias = _bias_parameter(bias)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d) -> SparseConv1x1:
        reason = conv1x1_ineligibility(conv)
        if reason:
            raise ValueError(f"SparseConv1x1.from_dense: {reason}")
        return cls(conv.weight, conv.bias, stride=conv.stride, dilation=conv.dilation)

    def to_dense_module(self) -> nn.Conv2d:
        """The equivalent `nn.Conv2d` (same device; weight and bias values equal)."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, 1, stride=self.stride, dilation=self.dilation,
            bias=self.bias is not None,
        )  # fmt: skip
        weight = self.weight.to_dense().reshape(self.out_channels, self.in_channels, 1, 1)
        return _filled_module(conv, weight, self.bias)

    @property
    def density(self) -> float:
        return self.weight.values().numel() / max(1, self.out_channels * self.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != (1, 1):
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
        batch, channels, height, width = x.shape
        if batch == 1:
            out = _csr_matmul(self.weight, self.bias, x.reshape(channels, height * width))
            return out.reshape(1, self.out_channels, height, width)
        columns = x.transpose(0, 1).reshape(channels, batch * height * width)
        out = _csr_matmul(self.weight, self.bias, columns)
        return out.reshape(self.out_channels, batch, height, width).transpose(0, 1)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size=(1, 1), stride={self.stride}, "
            f"bias={self.bias is not None}, density={self.density:.4f}"
        )


CONV_FORMULATIONS = ("unfold", "shift", "direct")  # "direct": compiled on first use, offered where it builds
# one sparse matmul over every input row, or blocks of 64 / 512 rows (for large batches, the block stays in cache)
LINEAR_FORMULATIONS = ("csr", "csr/64", "csr/512")


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """`F.pad` amounts (left, right, top, bottom) equal to `conv`'s padding (numbers, "valid" or "same")."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        (top, left) = (total[0] // 2, total[1] // 2)
        return (left, total[1] - left, top, total[0] - top)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


class _KernelTap(_CsrModule):
    """One kernel offset `(i, j)` of a `SparseConv2d` in the shift formulation: the CSR matrix `W[:, :, i, j]`."""

    def __init__(self, i: int, j: int, weight: torch.Tensor):
        super().__init__()
        self.i, self.j = i, j
        self.register_buffer("weight", _csr(weight))


class SparseConv2d(_CsrModule):
    """A `nn.Conv2d` (groups 1, zero padding, any kernel, stride, padding and dilation) for inference with
    `torch.sparse_csr` float32 weights, in one of three formulations:

    * `"unfold"`: one CSR matmul `W (out, in·kh·kw) @ unfold(x)`, the patches of every image side by side;
    * `"shift"`: one CSR matmul per kernel offset `(i, j)` that holds any weight, `W[:, :, i, j] (out, in)` times the
      input shifted by that offset, accumulated (no `in·kh·kw`-row patch matrix; offsets pruned to nothing are
      skipped);
    * `"direct"`: a compiled kernel that adds, per kept weight, the shifted input plane into the output plane
      (`direct_conv.py`; no copy of the input beyond its padding and stride phases). Also offered for 1×1 layers.
      Needs a C++ compiler and `ninja` at first use; `direct_kernel_unavailable()` says why it is not offered.

    `export_sparse_inference` times each against the dense convolution and keeps the fastest. The module keeps the
    attributes of the `nn.Conv2d` it replaces (`in_channels`, `out_channels`, `kernel_size`, `stride`, `padding`,
    `dilation`, `groups`, `padding_mode`).

    Args:
        conv: the (pruned) convolution to replace.
        formulation: `"unfold"`, `"shift"` or `"direct"`.
    """

    __jit_unused_properties__ = ["density"]

    def __init__(self, conv: nn.Conv2d, formulation: str = "unfold"):
        super().__init__()
        reason = conv_ineligibility(conv)
        if reason:
            raise ValueError(f"SparseConv2d: {reason}")
        if formulation not in CONV_FORMULATIONS:
            raise ValueError(f"formulation must be one of {CONV_FORMULATIONS}, got {formulation!r}")
        if formulation == "direct" and direct_kernel_unavailable():
            raise RuntimeError(f'SparseConv2d: formulation "direct" is unavailable: {direct_kernel_unavailable()}')
        self.formulation = formulation
        self.in_channels, self.out_channels = int(conv.in_channels), int(conv.out_channels)
        self.kernel_size = (int(conv.kernel_size[0]), int(conv.kernel_size[1]))
        self.stride = (int(conv.stride[0]), int(conv.stride[1]))
        self.dilation = (int(conv.dilation[0]), int(conv.dilation[1]))
        self.padding, self.groups, self.padding_mode = conv.padding, 1, "zeros"
        self.pad = list(_explicit_padding(conv))
        weight = conv.weight.detach()
        self.bias = _bias_parameter(conv.bias)
        kh, kw = self.kernel_size
        # the whole kernel as one CSR matrix (the unfold formulation's operand; also what a parent reading
        # `.weight.dtype` / `.device` sees), and for the shift formulation one CSR matrix per offset holding a weight
        self.register_buffer("weight", _csr(weight.reshape(self.out_channels, -1)))
        taps = []
        if formulation == "shift":
            taps = [
                _KernelTap(i, j, weight[:, :, i, j]) for i in range(kh) for j in range(kw) if weight[:, :, i, j].any()
            ]
        self.taps = nn.ModuleList(taps)
        self.direct = _DirectKernel() if formulation == "direct" else None

    def to_dense_module(self) -> nn.Conv2d:
        """The equivalent `nn.Conv2d` (same device; weight and bias values equal)."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, bias=self.bias is not None,
        )  # fmt: skip
        weight = self.weight.to_dense().reshape(self.out_channels, self.in_channels, *self.kernel_size)
        return _filled_module(conv, weight, self.bias)

    @property
    def density(self) -> float:
        return self.weight.values().numel() / max(1, self.weight.shape[0] * self.weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad != [0, 0, 0, 0]:
            x = F.pad(x, self.pad)
        batch, channels, height, width = x.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        out_h = (height - dh * (kh - 1) - 1) // sh + 1
        out_w = (width - dw * (kw - 1) - 1) // sw + 1
        if self.direct is not None:
            if channels != self.in_channels:  # the kernel reads the channels its weights name; others must fail
                raise RuntimeError("SparseConv2d: the input's channel count differs from in_channels")
            planes = stride_phases(x, self.stride)
            return self.direct(planes, self.weight, self.bias, [kh, kw, sh, sw, dh, dw, out_h, out_w])
        if self.formulation == "unfold":
            patches = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)  # (B, C·kh·kw, L)
            columns = patches[0] if batch == 1 else patches.transpose(0, 1).reshape(patches.shape[1], -1)
            out = _csr_matmul(self.weight, self.bias, columns)
        else:  # shift: accumulate one product per kernel offset
            out = torch.zeros(self.out_channels, batch * out_h * out_w, device=x.device, dtype=x.dtype)
            bias = self.bias
            if bias is not None:
                out = out + bias.unsqueeze(1)
            for tap in self.taps:
                top, left = tap.i * dh, tap.j * dw
                window = x[:, :, top : top + sh * (out_h - 1) + 1 : sh, left : left + sw * (out_w - 1) + 1 : sw]
                out = torch.addmm(out, tap.weight, window.transpose(0, 1).reshape(channels, -1))
        if batch == 1:
            return out.reshape(1, self.out_channels, out_h, out_w)
        return out.reshape(self.out_channels, batch, out_h, out_w).transpose(0, 1)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
            f"formulation={self.formulation}, density={self.density:.4f}"
        )


class SemiStructuredLinear(nn.Module):
    """`nn.Linear` with a 2:4 semi-structured CUDA weight (`torch.sparse.to_sparse_semi_structured`), fp16/bf16.

    Args:
        weight: the dense 2:4 weight `(out, in)` on a CUDA device of compute capability >= 8.0, fp16 or bf16.
        bias: the bias `(out,)` or None.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.weight = nn.Parameter(to_sparse_semi_structured(weight.detach().contiguous()), requires_grad=False)
        self.bias = _bias_parameter(bias)

    def to_dense_module(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        return _filled_module(linear, self.weight.to_dense(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        return F.linear(rows, self.weight, self.bias).reshape(list(x.shape[:-1]) + [self.out_features])


SPARSE_MODULE_TYPES = (SparseLinear, SparseConv1x1, SparseConv2d, SemiStructuredLinear)


# --------------------------------------------------------------------------------------------------------------------
# which layers
# --------------------------------------------------------------------------------------------------------------------


def conv1x1_ineligibility(conv: nn.Conv2d) -> str | None:
    """Why a `nn.Conv2d` cannot become a `SparseConv1x1` (None if it can)."""
    if tuple(conv.kernel_size) != (1, 1):
        return f"kernel {tuple(conv.kernel_size)} is not 1x1 (no sparse CPU kernel for larger convolutions)"
    if conv.groups != 1:
        return f"groups={conv.groups} (only groups=1)"
    if conv.padding not in ((0, 0), "valid"):
        return f"padding={conv.padding} (only padding 0)"
    return None


def conv_ineligibility(conv: nn.Conv2d) -> str | None:
    """Why a `nn.Conv2d` cannot become a `SparseConv2d` (None if it can)."""
    if conv.groups != 1:
        return f"groups={conv.groups} (depthwise and grouped convolutions stay dense: no sparse formulation)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only zero padding)"
    return None


def _kind(module: nn.Module) -> str | None:
    # exact types: a subclass may override forward (or be read by its parent, as nn.MultiheadAttention does)
    if type(module) is nn.Linear:
        return "linear"
    if type(module) is nn.Conv2d:
        return "conv1x1" if conv1x1_ineligibility(module) is None else "conv"
    return None


def _ineligibility(module: nn.Module) -> str | None:
    if _kind(module) == "conv":
        reason = conv_ineligibility(module)
        if reason:
            return reason
    if module.weight.dtype != torch.float32:
        return f"weight dtype {module.weight.dtype} (CSR export is float32 only)"
    return None


def candidate_layers(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """`nn.Linear` and `nn.Conv2d` submodules of `model` (exact types), by module name, optionally filtered.

    Args:
        model: the model.
        layers: regular expressions matched with `re.search` against module names (e.g. `[r"blocks\\.\\d+\\.mlp"]`);
            None for all.

    Raises:
        ValueError: if a pattern matches no Linear/Conv2d module (the message lists some names).
    """
    # submodules only (name != ""): the model itself cannot be replaced in place
    modules = {name: m for name, m in model.named_modules() if name and _kind(m) is not None}
    if layers is None:
        return modules
    selected = match_patterns(modules, layers, "layers", what="nn.Linear / nn.Conv2d module")
    return {name: m for name, m in modules.items() if name in selected}


def weight_density(module: nn.Module) -> float:
    """Fraction of nonzero entries in `module.weight`."""
    weight = module.weight.detach()
    return int(torch.count_nonzero(weight)) / max(1, weight.numel())


def to_sparse_module(module: nn.Module, formulation: str | None = None) -> nn.Module:
    """The sparse inference module for an `nn.Linear` or an eligible `nn.Conv2d`. `formulation`: for Linear layers
    `"csr"` (default), `"csr/<rows>"` (rows per sparse matmul) or `"direct"`, for 1×1 convolutions `"csr"` (default) or
    `"direct"`, for k×k convolutions `"unfold"` (default), `"shift"` or `"direct"`."""
    kind = _kind(module)
    if kind == "linear":
        block = int(formulation.split("/")[1]) if formulation and formulation.startswith("csr/") else 0
        return SparseLinear(module.weight, module.bias, row_block=block, direct=formulation == "direct")
    if kind == "conv1x1":
        return SparseConv2d(module, "direct") if formulation == "direct" else SparseConv1x1.from_dense(module)
    if kind == "conv":
        return SparseConv2d(module, formulation or CONV_FORMULATIONS[0])
    raise TypeError(f"to_sparse_module takes nn.Linear or nn.Conv2d, got {type(module).__name__}")


def sparse_candidates(module: nn.Module) -> dict[str, nn.Module]:
    """Every sparse formulation of `module` worth timing, by formulation name: the CSR ones, and the compiled
    `"direct"` one where it is available (`direct_kernel_unavailable()`)."""
    direct = {} if direct_kernel_unavailable() else {"direct": to_sparse_module(module, "direct")}
    if _kind(module) == "linear":
        return {name: to_sparse_module(module, name) for name in LINEAR_FORMULATIONS} | direct
    if _kind(module) == "conv":
        return {name: SparseConv2d(module, name) for name in CONV_FORMULATIONS if name != "direct"} | direct
    return {"csr": to_sparse_module(module)} | direct


def sparsify_layers(
    model: nn.Module, names: Sequence[str], formulations: Mapping[str, str] | None = None
) -> nn.Module:
    """Replace exactly the named layers of `model` (in place) by their CSR inference modules; no timing.

    Use it to repeat an export's decision (`report.sparse_layers`, `report.formulations`) without measuring again.

    Args:
        model: the model, changed in place and returned.
        names: module names of `nn.Linear` / eligible `nn.Conv2d` layers.
        formulations: the formulation of each layer (`report.formulations`): `"unfold"`, `"shift"` or `"direct"`
            for convolutions (default `"unfold"`, `"csr"` for 1×1), `"csr"`, `"csr/<rows>"` or `"direct"` for Linear
            layers.
    """
    formulations = dict(formulations or {})
    if not names:
        return model
    modules = dict(model.named_modules())
    for name in names:
        module = modules.get(name)
        if module is None:
            raise KeyError(f"sparsify_layers: the model has no module named {name!r}")
        reason = _ineligibility(module) if _kind(module) else f"{type(module).__name__} is not nn.Linear/nn.Conv2d"
        if reason:
            raise ValueError(f"sparsify_layers: layer {name!r} cannot be exported: {reason}")
        formulation = formulations.get(name)
        replace_submodule(model, name, to_sparse_module(module, None if formulation == "csr" else formulation))
    return model


def is_reparameterizable(model: nn.Module) -> bool:
    """Whether `model` has branches that timm's `reparameterize_model` fuses (RepVGG, MobileOne, FastViT, RepViT...):
    modules with `fuse`, `reparameterize` or `switch_to_deploy`."""
    return any(
        hasattr(module, name) for module in model.modules() for name in ("fuse", "reparameterize", "switch_to_deploy")
    )


def fused_sparsity(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any] | None:
    """The sparsity left after fusing the branches of a reparameterisable model, measured on a fused copy.

    Fusing adds parallel branches (3x3 + 1x1 + identity, BatchNorms) into one kernel, so zeros pruned in one branch
    survive only where every branch is zero; the fused model also has other parameter names. Prune, retrain and save
    the unfused model, and fuse after loading it; this says how sparse the fused one will be.

    Args:
        model: the pruned, unfused model (left untouched).
        masks: masks to apply to the copy first (None: the weights as they are).

    Returns:
        None if nothing in `model` fuses; else the zeros and values of every conv/linear weight of the fused copy and
        their ratio (`sparsity`).
    """
    if not is_reparameterizable(model):
        return None
    from timm.utils.model import reparameterize_model

    fused = copy.deepcopy(model).eval()
    if masks:
        with torch.no_grad():
            parameters = dict(fused.named_parameters())
            for name, mask in masks.items():
                parameters[name].mul_(mask.to(parameters[name].device, parameters[name].dtype))
    fused = reparameterize_model(fused, inplace=True)
    weights = [
        module.weight
        for module in fused.modules()
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and module.weight is not None
    ]
    numel = sum(int(w.numel()) for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return {"zeros": zeros, "numel": numel, "sparsity": zeros / max(1, numel)}


def to_dense(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The way back: every `SparseLinear` / `SemiStructuredLinear` becomes `nn.Linear`, `SparseConv1x1` `nn.Conv2d`.

    The weights are equal to those of the pruned model that was exported (`state_dict` values compare equal with
    `torch.equal`; a pruned `-0.0` comes back as `+0.0`), so the result saves and loads with `save_sparse_model` and
    plain timm/transformers like any pruned model.

    Args:
        model: an exported model.
        inplace: convert `model` itself; by default a deep copy is converted and `model` is left as it is.
    """
    model = model if inplace else copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, SPARSE_MODULE_TYPES):
            replace_submodule(model, name, module.to_dense_module())
    return model


# --------------------------------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------------------------------


def _as_tuple(example_inputs) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def resize_batch(example_inputs, batch_size: int) -> tuple:
    """The example inputs with their leading (batch) dim cycled or cut to `batch_size` (non-tensors unchanged).

    Args:
        example_inputs: a tensor or a tuple of positional arguments of the model.
        batch_size: the batch size wanted.
    """
    if batch_size < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_size}")
    resized = []
    for x in _as_tuple(example_inputs):
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] != batch_size:
            x = x[torch.arange(batch_size, device=x.device) % x.shape[0]]
        resized.append(x)
    return tuple(resized)


@torch.inference_mode()
def capture_input_shapes(model: nn.Module, example_inputs, names: Sequence[str]) -> dict[str, list[tuple]]:
    """Input shapes of the named modules in one forward pass of `example_inputs` (one entry per call).

    Args:
        model: the model (in eval mode).
        example_inputs: a tensor or a tuple of positional arguments.
        names: module names to watch; modules the forward never calls get an empty list.
    """
    shapes: dict[str, list[tuple]] = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = []

    def hook_for(name):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor):
                shapes[name].append(tuple(args[0].shape))

        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_pre_hook(hook_for(name)))
        model(*_as_tuple(example_inputs))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def interleaved_min_seconds(
    modules: Sequence[nn.Module], inputs: Sequence[torch.Tensor], repeats: int = 10
) -> list[float]:
    """Fastest round's seconds for each module on all `inputs`, rounds interleaved (one warm-up round first).

    Interleaving (A, B, A, B, ...) makes slow drifts of the machine hit every module alike, and the minimum over
    rounds is the least disturbed measurement: other processes only ever add time, so on a shared machine it
    estimates a kernel's own cost better than the median (timeit's advice), and a decision flips less often.

    Args:
        modules: the modules to compare (e.g. a dense layer and its sparse version).
        inputs: the inputs of one forward pass of the layer (one per call).
        repeats: timed rounds.
    """
    device = inputs[0].device if inputs else torch.device("cpu")
    samples: list[list[float]] = [[] for _ in modules]
    for round_index in range(repeats + 1):
        for i, module in enumerate(modules):
            _synchronize(device)
            start = time.perf_counter()
            for x in inputs:
                module(x)
            _synchronize(device)
            if round_index:  # round 0 is the warm-up
                samples[i].append(time.perf_counter() - start)
    return [min(s) for s in samples]


def choose_sparse(dense_seconds: Sequence[float], sparse_seconds: Sequence[float], min_speedup: float) -> bool:
    """Sparse only if it is at least `min_speedup` times faster than dense at every measured batch size."""
    return all(d >= min_speedup * s for d, s in zip(dense_seconds, sparse_seconds, strict=True))


# --------------------------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class LayerExport:
    """One layer's export decision. Times are per forward pass of the model (all calls of the layer), in µs."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    density: float
    chosen: str  # "sparse" or "dense"
    reason: str
    input_shapes: dict[int, list[tuple]] = field(default_factory=dict)  # batch size -> shapes of the calls
    dense_us: dict[int, float] = field(default_factory=dict)  # batch size -> µs
    sparse_us: dict[int, float] = field(default_factory=dict)  # of the chosen (or best) formulation
    formulation: str | None = (
        None  # "csr"/"csr/<rows>"/"direct" (Linear), "csr"/"direct" (1×1), "unfold"/"shift"/"direct"
    )
    formulation_us: dict[str, dict[int, float]] = field(default_factory=dict)  # every formulation timed

    @property
    def speedup(self) -> float | None:
        """The smallest dense/sparse time ratio over the batch sizes (None if not measured)."""
        ratios = [self.dense_us[b] / self.sparse_us[b] for b in self.sparse_us if self.sparse_us[b] > 0]
        return min(ratios) if ratios else None


@dataclass
class ExportReport:
    """What `export_sparse_inference` measured and chose, per layer."""

    layers: list[LayerExport]
    batch_sizes: list[int]
    min_speedup: float
    max_density: float
    threads: int
    rtol: float = EXPORT_RTOL
    atol: float = EXPORT_ATOL
    max_abs_error: float | None = None  # of the verification run
    folded_batchnorms: list[tuple[str, str]] = field(default_factory=list)  # (convolution, BatchNorm) pairs folded
    # weight-standardised convolutions trained with a kernel mask, now plain convolutions holding that kernel
    baked_kernel_masks: list[str] = field(default_factory=list)
    # formulations not offered on this machine, with the reason (e.g. "direct" without a C++ compiler)
    unavailable_formulations: dict[str, str] = field(default_factory=dict)

    @property
    def sparse_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.chosen == "sparse"]

    @property
    def formulations(self) -> dict[str, str]:
        """The formulation of every layer made sparse (`sparsify_layers(model, names, formulations)` repeats it)."""
        return {layer.name: layer.formulation for layer in self.layers if layer.chosen == "sparse"}

    def layer_time_us(self, batch_size: int) -> dict[str, float]:
        """Sum of the measured layers' times at `batch_size`: all dense vs as exported (the layer-level gain)."""
        measured = [layer for layer in self.layers if batch_size in layer.dense_us]
        dense = sum(layer.dense_us[batch_size] for layer in measured)
        exported = sum(
            layer.sparse_us[batch_size] if layer.chosen == "sparse" else layer.dense_us[batch_size]
            for layer in measured
        )
        return {"dense_us": dense, "exported_us": exported}

    def as_dict(self) -> dict:
        out = asdict(self)
        for layer, row in zip(self.layers, out["layers"]):
            row["speedup"] = layer.speedup
            for key in ("input_shapes", "dense_us", "sparse_us"):
                row[key] = {str(b): v for b, v in row[key].items()}
            row["formulation_us"] = {f: {str(b): v for b, v in t.items()} for f, t in row["formulation_us"].items()}
        out["sparse_layers"] = self.sparse_layers
        return out

    def format_table(self) -> str:
        """A plain-text table: layer, weight shape, density, dense µs, sparse µs (first batch size), chosen."""
        b = self.batch_sizes[0]
        header = f"{'layer':<40} {'weight':>18} {'density':>8} {'dense µs':>10} {'sparse µs':>10} {'x':>6}  chosen"
        lines = [f"batch size {b} (decision over batch sizes {self.batch_sizes}, {self.threads} thread(s))"]
        lines += [f"formulation {name!r} not offered: {why}" for name, why in self.unavailable_formulations.items()]
        lines.append(header)
        for layer in self.layers:
            dense = f"{layer.dense_us[b]:.0f}" if b in layer.dense_us else "-"
            sparse = f"{layer.sparse_us[b]:.0f}" if b in layer.sparse_us else "-"
            speedup = f"{layer.speedup:.2f}" if layer.speedup is not None else "-"
            shape = "x".join(str(s) for s in layer.weight_shape)
            lines.append(
                f"{layer.name:<40} {shape:>18} {layer.density:>8.4f} {dense:>10} {sparse:>10} {speedup:>6}  "
                f"{layer.chosen}{f' ({layer.formulation})' if layer.chosen == 'sparse' else ''} ({layer.reason})"
            )
        return "\n".join(lines)


def _is_foldable(bn: nn.Module) -> bool:
    """A plain `nn.BatchNorm2d`, or timm's `BatchNormAct2d` (a BatchNorm2d with an activation); other
    normalisations are not folded."""
    return type(bn) is nn.BatchNorm2d or (
        isinstance(bn, nn.BatchNorm2d) and isinstance(getattr(bn, "act", None), nn.Module)
    )


def _batchnorm_replacement(bn: nn.Module) -> nn.Module:
    """What stays of a foldable BatchNorm once folded: nothing, or the dropout and activation of `BatchNormAct2d`."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    return nn.Sequential(getattr(bn, "drop", nn.Identity()), bn.act)


def _fold_pair(model: nn.Module, conv_name: str, bn_name: str) -> Callable[[], None]:
    """Fold one BatchNorm into its convolution (in place); returns the function that undoes it."""
    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    old_weight, old_bias = conv.weight, conv.bias
    scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = old_bias if old_bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        weight = old_weight * scale.reshape(-1, 1, 1, 1).to(old_weight.dtype)
        conv.weight = nn.Parameter(weight, requires_grad=False)
        conv.bias = nn.Parameter(((bias - bn.running_mean) * scale + shift).to(weight.dtype), requires_grad=False)
    replace_submodule(model, bn_name, _batchnorm_replacement(bn))

    def undo() -> None:
        conv.weight, conv.bias = old_weight, old_bias
        replace_submodule(model, bn_name, bn)

    return undo


def fold_batchnorm(model: nn.Module, example_inputs) -> list[tuple[str, str]]:
    """Fold every eval-mode BatchNorm whose input is exactly a convolution's output into that convolution (in place).

    One forward pass of `example_inputs` pairs a `nn.Conv2d` (groups any) with the `nn.BatchNorm2d` (or timm's
    `BatchNormAct2d`) that receives its output tensor unchanged, each called once. The convolution's weight becomes
    `w · γ/√(σ²+ε)` per output channel (a pruned zero stays zero) and its bias `(b − μ)·γ/√(σ²+ε) + β`; the BatchNorm
    is replaced by an identity (by its dropout and activation for `BatchNormAct2d`). The folded model must give the
    outputs of the unfolded one on `example_inputs` (a convolution output also used elsewhere would not): otherwise
    the pairs are tried one by one and only those that keep the outputs are folded.

    Returns:
        the (convolution, BatchNorm) module names folded.
    """
    modules = dict(model.named_modules())
    producers: dict[tuple, tuple[str, int]] = {}
    calls: dict[str, int] = {}
    pairs: dict[str, str] = {}

    def after_conv(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            producers[(output.data_ptr(), tuple(output.shape))] = (name, output._version)

        return hook

    def before_bn(name):
        def hook(module, args):
            calls[name] = calls.get(name, 0) + 1
            if args and isinstance(args[0], torch.Tensor):
                conv, version = producers.get((args[0].data_ptr(), tuple(args[0].shape)), (None, None))
                if conv is not None and args[0]._version == version:  # not changed in place on the way
                    pairs[name] = conv

        return hook

    handles = []
    example = _as_tuple(example_inputs)
    try:
        for name, module in modules.items():
            if type(module) is nn.Conv2d:
                handles.append(module.register_forward_hook(after_conv(name)))
            elif isinstance(module, nn.BatchNorm2d) and not module.training and module.track_running_stats:
                handles.append(module.register_forward_pre_hook(before_bn(name)))
        with torch.no_grad():
            reference = _output_tensors(model(*example))
    finally:
        for handle in handles:
            handle.remove()
    candidates = [
        (conv, bn)
        for bn, conv in pairs.items()
        if _is_foldable(modules[bn]) and calls.get(bn) == 1 and calls.get(conv) == 1
    ]

    def unchanged() -> bool:
        with torch.no_grad():
            outputs = _output_tensors(model(*example))
        return all(torch.allclose(o, r, rtol=EXPORT_RTOL, atol=EXPORT_ATOL) for o, r in zip(outputs, reference))

    undos = [_fold_pair(model, conv, bn) for conv, bn in candidates]
    if not candidates or unchanged():
        return candidates
    for undo in reversed(undos):
        undo()
    folded = []
    for conv, bn in candidates:  # one at a time: keep the folds that keep the outputs
        undo = _fold_pair(model, conv, bn)
        if unchanged():
            folded.append((conv, bn))
        else:
            undo()
    return folded


def _output_tensors(output) -> list[torch.Tensor]:
    """The tensors in a model output: a tensor, or nested tuples/lists/mappings (transformers' ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [tensor for item in output for tensor in _output_tensors(item)]
    return []


def output_tolerance(reference: torch.Tensor, atol: float = EXPORT_ATOL) -> float:
    """The absolute tolerance for an exported model's output: `atol` times the reference's largest magnitude (at
    least `atol`). Sparse kernels sum the same products in another order; the float32 rounding difference that leaves
    is proportional to the size of the activations summed, which an output's smallest entries do not show (a logit
    of 0.5 beside logits of 5,000)."""
    return atol * max(1.0, float(reference.detach().abs().max())) if reference.numel() else atol


@torch.inference_mode()
def max_output_error(model: nn.Module, reference_outputs, example_inputs, rtol=EXPORT_RTOL, atol=EXPORT_ATOL) -> float:
    """Run `model` on `example_inputs`, check its outputs against `reference_outputs`, return the max abs error.

    Raises:
        AssertionError: (from `torch.testing.assert_close`) if an output differs beyond `rtol` and
            `output_tolerance(reference, atol)`.
    """
    outputs = _output_tensors(model(*_as_tuple(example_inputs)))
    references = _output_tensors(reference_outputs)
    if len(outputs) != len(references):
        raise AssertionError(f"the exported model returned {len(outputs)} tensors, the model {len(references)}")
    for output, reference in zip(outputs, references):
        torch.testing.assert_close(output, reference, rtol=rtol, atol=output_tolerance(reference, atol))
    return max((float((o - r).abs().max()) for o, r in zip(outputs, references) if o.numel()), default=0.0)


def _inputs_for(shapes: Sequence[tuple], like: torch.Tensor) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator).to(device=like.device, dtype=like.dtype) for shape in shapes]


def _decide_layer(
    name: str,
    module: nn.Module,
    shapes: Mapping[int, list[tuple]],
    *,
    min_speedup: float,
    max_density: float,
    repeats: int,
    timer: Timer,
) -> LayerExport:
    kind = _kind(module)
    density = weight_density(module)
    row = LayerExport(name, kind, tuple(module.weight.shape), density, "dense", "", dict(shapes))
    reason = _ineligibility(module)
    if reason:
        row.reason = reason
    elif not all(shapes.values()):
        row.reason = "not called by the forward pass"
    elif density > max_density:
        row.reason = f"density {density:.3f} > max_density {max_density}"
    else:
        candidates = sparse_candidates(module)
        row.formulation_us = {name: {} for name in candidates}
        for batch_size, layer_shapes in shapes.items():
            inputs = _inputs_for(layer_shapes, module.weight)
            dense_s, *sparse_s = timer([module, *candidates.values()], inputs, repeats)
            row.dense_us[batch_size] = dense_s * 1e6
            for name, seconds in zip(candidates, sparse_s, strict=True):
                row.formulation_us[name][batch_size] = seconds * 1e6

        def worst_speedup(name: str) -> float:
            times = row.formulation_us[name]
            return min(row.dense_us[b] / times[b] if times[b] > 0 else float("inf") for b in times)

        row.formulation = max(candidates, key=worst_speedup)  # the fastest at its slowest batch size
        row.sparse_us = dict(row.formulation_us[row.formulation])
        if choose_sparse(list(row.dense_us.values()), list(row.sparse_us.values()), min_speedup):
            row.chosen, row.reason = "sparse", f"sparse >= {min_speedup}x faster"
        else:
            row.reason = f"sparse not {min_speedup}x faster"
    return row


def export_sparse_inference(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple,
    *,
    batch_sizes: Sequence[int] | None = None,
    min_speedup: float = 1.1,
    max_density: float = 0.5,
    layers: Sequence[str] | None = None,
    repeats: int = 10,
    timer: Timer | None = None,
    inplace: bool = False,
    verify: bool = True,
    fold_bn: bool = True,
) -> tuple[nn.Module, ExportReport]:
    """Convert a pruned model's Linear and convolution layers to sparse kernels where that is measurably faster.

    Weight-standardised convolutions trained with `mask_standardized_kernels` first become plain `nn.Conv2d` layers
    holding the masked kernel they compute with (`report.baked_kernel_masks`), so they are candidates like any
    convolution. One forward pass per batch size records every candidate layer's real input shape (forward pre-hooks); each
    layer whose density is at most `max_density` is then timed alone on random inputs of those shapes, dense and
    sparse interleaved (`repeats` rounds, fastest round), and converted when sparse is at least `min_speedup` times
    faster at every batch size, in its fastest formulation (`report.formulations`). Other layers, and the rest of
    the model, stay as they are. The first export in a Python process compiles the `"direct"` convolution kernel
    (about a minute; cached on disk afterwards); where that is impossible, `report.unavailable_formulations` says why.

    Args:
        model: the pruned model, in eval mode (`model.eval()`), float32 weights for the layers to convert.
        example_inputs: a tensor (e.g. `torch.randn(1, 3, 224, 224)`) or a tuple of positional arguments for
            `model(...)`, with the batch as leading dim.
        batch_sizes: batch sizes to decide for (the example is cycled/cut along dim 0 to each); a layer is converted
            only if sparse wins at all of them. None: the example's own batch size.
        min_speedup: how much faster (dense time / sparse time) the sparse kernel must be; 1.1 leaves a margin
            for timing noise.
        max_density: layers denser than this are kept dense without timing (sparse CSR never pays there).
        layers: regular expressions (`re.search` on module names) restricting the candidates; None for all.
        repeats: timed rounds per layer and batch size.
        timer: `timer(modules, inputs, repeats) -> [seconds per module]`; default `interleaved_min_seconds`.
        inplace: convert `model` itself; by default a deep copy is converted and `model` stays dense.
        verify: run the exported model on `example_inputs` and check its outputs against the dense model's with
            `torch.testing.assert_close(rtol=EXPORT_RTOL, atol=output_tolerance(reference))` (`EXPORT_ATOL` times the
            output's largest magnitude).
        fold_bn: fold every eval-mode BatchNorm that directly follows a convolution into it first
            (`fold_batchnorm`), so that a sparse convolution does not pay for a separate BatchNorm pass; the folded
            pairs are in `report.folded_batchnorms`.

    Returns:
        `(exported_model, report)`; `report.format_table()` prints the per-layer decisions.
    """
    if model.training:
        raise ValueError("export_sparse_inference exports for inference: call model.eval() first.")
    if min_speedup <= 0:
        raise ValueError(f"min_speedup must be > 0 (1.1 = sparse at least 10% faster), got {min_speedup}")
    if not 0.0 <= max_density <= 1.0:
        raise ValueError(f"max_density must be in [0, 1], got {max_density}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    example = _as_tuple(example_inputs)
    if not example or not isinstance(example[0], torch.Tensor):
        raise ValueError("example_inputs must be a tensor or a tuple of model arguments starting with a tensor.")
    batch_sizes = list(batch_sizes) if batch_sizes else [int(example[0].shape[0])]
    timer = timer or interleaved_min_seconds

    reference = None
    if verify:
        with torch.inference_mode():
            reference = model(*example)
    work = model if inplace else copy.deepcopy(model)
    baked = bake_kernel_masks(work, example)
    folded = fold_batchnorm(work, example) if fold_bn else []
    candidates = candidate_layers(work, layers)
    names = list(candidates)
    shapes = {b: capture_input_shapes(work, resize_batch(example, b), names) for b in batch_sizes}
    rows = [
        _decide_layer(
            name,
            module,
            {b: shapes[b][name] for b in batch_sizes},
            min_speedup=min_speedup,
            max_density=max_density,
            repeats=repeats,
            timer=timer,
        )
        for name, module in candidates.items()
    ]
    report = ExportReport(
        rows,
        batch_sizes,
        min_speedup,
        max_density,
        torch.get_num_threads(),
        folded_batchnorms=folded,
        baked_kernel_masks=baked,
        unavailable_formulations={"direct": direct_kernel_unavailable()} if direct_kernel_unavailable() else {},
    )
    exported = sparsify_layers(work, report.sparse_layers, report.formulations)
    if verify:
        report.max_abs_error = max_output_error(exported, reference, example)
    return exported, report


# --------------------------------------------------------------------------------------------------------------------
# 2:4 semi-structured (CUDA)
# --------------------------------------------------------------------------------------------------------------------


class SemiStructuredUnavailableError(RuntimeError):
    """2:4 semi-structured export needs CUDA, compute capability >= 8.0 and fp16/bf16 weights."""


def semi_structured_requirement_error(
    cuda_available: bool, device: torch.device, capability: tuple[int, int] | None, dtype: torch.dtype
) -> str | None:
    """Why 2:4 semi-structured kernels cannot run for these facts (None if they can). Pure, for testing."""
    need = (
        "2:4 semi-structured export (torch.sparse.to_sparse_semi_structured) needs an NVIDIA GPU of compute "
        f"capability >= {SEMI_STRUCTURED_MIN_CAPABILITY[0]}.{SEMI_STRUCTURED_MIN_CAPABILITY[1]} (Ampere or newer) "
        "and fp16/bf16 weights on it"
    )
    if not cuda_available:
        return f"{need}; torch.cuda.is_available() is False. On CPU use export_sparse_inference (CSR) instead."
    if device.type != "cuda":
        return f"{need}; the model's Linear weights are on {device}. Move it first: model.half().cuda()."
    if capability is None or tuple(capability) < SEMI_STRUCTURED_MIN_CAPABILITY:
        return f"{need}; {device} has compute capability {capability}."
    if dtype not in SEMI_STRUCTURED_DTYPES:
        return f"{need}; the weights are {dtype}. Convert first: model.half() or model.to(torch.bfloat16)."
    return None


def _check_semi_structured(linears: Mapping[str, nn.Linear]) -> None:
    cuda_available = torch.cuda.is_available()
    for module in linears.values():
        device, dtype = module.weight.device, module.weight.dtype
        capability = torch.cuda.get_device_capability(device) if cuda_available and device.type == "cuda" else None
        message = semi_structured_requirement_error(cuda_available, device, capability, dtype)
        if message:
            raise SemiStructuredUnavailableError(message)


def export_semi_structured(
    model: nn.Module, *, layers: Sequence[str] | None = None, inplace: bool = False
) -> tuple[nn.Module, list[dict]]:
    """Convert Linear layers whose weights hold a 2:4 pattern along the input dim to 2:4 semi-structured CUDA kernels.

    A layer is converted when its weight has at most 2 nonzeros in every group of 4 consecutive input weights (as
    `hf_tgprune.core.nm.nm_masks(scores, 2, 4)` + training with the mask produce) and PyTorch accepts its shape
    (cuSPARSELt / CUTLASS minimum sizes, e.g. both dims multiples of 16 / 64); other layers stay dense, with the
    reason in the report. Outputs then match the dense fp16/bf16 model up to half-precision rounding.

    Args:
        model: the pruned model on a CUDA device of compute capability >= 8.0, with fp16 or bf16 weights
            (`model.half().cuda().eval()`).
        layers: regular expressions (`re.search` on module names) restricting the Linear layers; None for all.
        inplace: convert `model` itself; by default a deep copy.

    Returns:
        `(exported_model, report)` with one `{"name", "shape", "chosen", "reason"}` dict per Linear layer.

    Raises:
        SemiStructuredUnavailableError: no CUDA, a weight not on CUDA, compute capability < 8.0, or a dtype other
            than fp16/bf16 (the message names the requirement and the fix).
    """
    linears = {name: m for name, m in candidate_layers(model, layers).items() if _kind(m) == "linear"}
    if not linears:
        raise ValueError("export_semi_structured found no nn.Linear layer to convert (check `layers`).")
    _check_semi_structured(linears)
    model = model if inplace else copy.deepcopy(model)
    modules = dict(model.named_modules())
    report = []
    for name in linears:
        module = modules[name]
        row = {"name": name, "shape": tuple(module.weight.shape), "chosen": "dense"}
        if not is_nm_sparse(module.weight, 2, 4):
            row["reason"] = "weight is not 2:4 sparse along the input dim"
        else:
            try:
                replace_submodule(model, name, SemiStructuredLinear(module.weight, module.bias))
                row.update(chosen="2:4", reason="converted")
            except RuntimeError as error:  # shape / backend constraints of torch's semi-structured kernels
                row["reason"] = f"torch refused: {error}"
        report.append(row)
    return model, report
