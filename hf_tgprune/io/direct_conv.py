"""A compiled direct sparse convolution for CPU inference (`SparseConv2d(conv, "direct")`).

The CSR formulations of `export.py` pay for moving the input: `unfold` builds a patch matrix `kh·kw` times the input,
`shift` copies one shifted window of it per kernel offset. Where the feature maps are large and the channels few (a
ResNet's first stages), that copying costs as much as the dense convolution. The direct kernel moves nothing: for
every image and output channel it keeps the output plane in cache and, for every kept weight `w` at input channel `c`
and offset `(i, j)`, adds `w` times the input plane `c` shifted by `(i, j)` — one contiguous multiply-add over the
plane per kept weight (Park et al., "Faster CNNs with Direct Sparse Convolutions", ICLR 2017). Strides are handled
by splitting the padded input into its `sh·sw` phases first, so that every multiply-add reads contiguous memory.

It is C++ compiled on first use with `torch.utils.cpp_extension.load_inline` (a C++ compiler and `ninja` are needed;
the build is cached in torch's extensions folder, one per CPU instruction set). Where it cannot be built,
`direct_kernel_unavailable()` says why and the export does not offer the formulation. The operator is registered as
`torch.ops.hf_tgprune.direct_conv2d`, so that TorchScript can call it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil

import torch

_SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

// planes: (N, C*sh*sw, Hq, Wq) float32 contiguous, the padded input split into its stride phases;
// crow (O+1), col (nnz) int32 and values (nnz) float32: the CSR weight (O, C*kh*kw).
at::Tensor direct_conv2d(const at::Tensor& planes, const at::Tensor& crow, const at::Tensor& col,
                         const at::Tensor& values, const c10::optional<at::Tensor>& bias, int64_t kh, int64_t kw,
                         int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t out_h, int64_t out_w) {
  TORCH_CHECK(planes.dim() == 4 && planes.is_contiguous() && planes.scalar_type() == at::kFloat,
              "direct_conv2d: planes must be a contiguous float32 (N, P, H, W) tensor");
  TORCH_CHECK(crow.scalar_type() == at::kInt && col.scalar_type() == at::kInt && values.scalar_type() == at::kFloat,
              "direct_conv2d: int32 crow/col and float32 values expected");
  const int64_t N = planes.size(0), P = planes.size(1), Hq = planes.size(2), Wq = planes.size(3);
  const int64_t O = crow.numel() - 1;
  TORCH_CHECK(out_h >= 1 && out_w >= 1 && out_w <= Wq && out_h <= Hq, "direct_conv2d: bad output size");
  auto out = at::empty({N, O, out_h, out_w}, planes.options());
  const float* xp = planes.data_ptr<float>();
  const int32_t* rp = crow.data_ptr<int32_t>();
  const int32_t* cp = col.data_ptr<int32_t>();
  const float* vp = values.data_ptr<float>();
  const float* bp = (bias.has_value() && bias->defined()) ? bias->data_ptr<float>() : nullptr;
  float* yp = out.data_ptr<float>();
  const int64_t plane = Hq * Wq, taps = kh * kw;
  // the output is computed at the planes' row pitch Wq (columns >= out_w are discarded), so that every weight is one
  // contiguous multiply-add of `length` floats; the last row stops at out_w, which keeps every read inside its plane
  const int64_t length = (out_h - 1) * Wq + out_w;
  const bool direct = (Wq == out_w);
  at::parallel_for(0, N * O, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(direct ? 0 : length);
    for (int64_t no = begin; no < end; ++no) {
      const int64_t n = no / O, o = no % O;
      const float* xn = xp + n * P * plane;
      float* acc = direct ? yp + no * out_h * out_w : scratch.data();
      const float b = bp ? bp[o] : 0.f;
      for (int64_t k = 0; k < length; ++k) acc[k] = b;
      for (int32_t j = rp[o]; j < rp[o + 1]; ++j) {
        const int64_t c = cp[j] / taps, r = cp[j] % taps;
        const int64_t ty = (r / kw) * dh, tx = (r % kw) * dw;
        const float* src = xn + ((c * sh + ty % sh) * sw + tx % sw) * plane + (ty / sh) * Wq + tx / sw;
        const float w = vp[j];
#pragma omp simd
        for (int64_t k = 0; k < length; ++k) acc[k] += w * src[k];
      }
      if (!direct) {
        float* dst = yp + no * out_h * out_w;
        for (int64_t y = 0; y < out_h; ++y) std::copy(acc + y * Wq, acc + y * Wq + out_w, dst + y * out_w);
      }
    }
  });
  return out;
}

TORCH_LIBRARY(hf_tgprune, m) {
  m.def("direct_conv2d(Tensor planes, Tensor crow, Tensor col, Tensor values, Tensor? bias, int kh, int kw, int sh, "
        "int sw, int dh, int dw, int out_h, int out_w) -> Tensor");
  m.impl("direct_conv2d", c10::DispatchKey::CPU, TORCH_FN(direct_conv2d));
}
"""


@functools.cache
def _build() -> str | None:
    """Compile and load the kernel once per process; the reason it is unavailable, or None when it loaded."""
    if hasattr(torch.ops.hf_tgprune, "direct_conv2d"):
        return None
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler (c++ / g++) on PATH"
    path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:  # the `ninja` package's binary, when its environment's bin/ is not on PATH
        try:
            import ninja
        except ImportError:
            return "ninja is not installed (pip install ninja)"
        os.environ["PATH"] = os.pathsep.join([path, ninja.BIN_DIR]) if path else ninja.BIN_DIR
    from torch.utils.cpp_extension import load_inline

    capability = torch.backends.cpu.get_cpu_capability().lower()
    digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:12]
    try:
        load_inline(
            name=f"hf_tgprune_direct_conv_{capability}_{digest}",
            cpp_sources=_SOURCE,
            extra_cflags=["-O3", "-march=native", "-fopenmp-simd"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # noqa: BLE001 - any build or load failure means "not available", with its reason
        return f"the kernel did not build: {type(error).__name__}: {str(error).strip().splitlines()[-1][:200]}"
    finally:
        os.environ["PATH"] = path
    return None


def direct_kernel_unavailable() -> str | None:
    """None when `torch.ops.hf_tgprune.direct_conv2d` is loaded (compiling it on first call), else why not."""
    return _build()


def stride_phases(x: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """`x` `(N, C, H, W)` (already padded) as `(N, C·sh·sw, ⌈H/sh⌉, ⌈W/sw⌉)`: channel `c`'s phase `(a, b)` is plane
    `(c·sh + a)·sw + b`, holding `x[..., a::sh, b::sw]` (zero-filled at the end), contiguous float32."""
    sh, sw = stride
    x = x.float()
    if (sh, sw) == (1, 1):
        return x.contiguous()
    n, c, h, w = x.shape
    hq, wq = -(-h // sh), -(-w // sw)
    if (hq * sh, wq * sw) != (h, w):
        x = torch.nn.functional.pad(x, (0, wq * sw - w, 0, hq * sh - h))
    return x.reshape(n, c, hq, sh, wq, sw).permute(0, 1, 3, 5, 2, 4).reshape(n, c * sh * sw, hq, wq).contiguous()
