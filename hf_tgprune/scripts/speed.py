"""Dense vs sparse-exported CPU latency of a pruned model, measured side by side (`--export_sparse_inference`)."""

from __future__ import annotations

import copy
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.masking import apply_masks
from ..io.export import export_sparse_inference, resize_batch
from ..io.modelcard import InferenceLatency, InferenceSpeed


def cpu_name() -> str:
    """The CPU's model name (`/proc/cpuinfo` on Linux, else `platform.processor()`), e.g. "AMD EPYC 7B13"."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def median_latencies_ms(models: Sequence[Any], inputs: Any, repeats: int) -> list[float]:
    """Median milliseconds per forward pass of each model on `inputs` (a tensor), in interleaved rounds.

    One untimed warm-up round, then `repeats` rounds in which every model runs once; the order of the models
    alternates from round to round, so that slow drifts of a shared machine hit them alike.
    """
    samples: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for round_index in range(repeats + 1):
            order = list(range(len(models)))
            if round_index % 2:
                order.reverse()
            for i in order:
                start = time.perf_counter()
                models[i](inputs)
                if round_index:  # round 0 is the warm-up
                    samples[i].append(1e3 * (time.perf_counter() - start))
    return [statistics.median(s) for s in samples]


def measure_inference_speed(
    model: torch.nn.Module,
    examples: torch.Tensor,
    batch_sizes: Sequence[int],
    repeats: int,
    masks: Mapping[str, Any] | None = None,
) -> InferenceSpeed:
    """End-to-end latency of a pruned model on the CPU: as it is (dense kernels) vs exported with
    `hf_tgprune.export_sparse_inference`, exported and measured separately at each batch size. Where the export
    converts no layer it is the dense model itself: only the dense model is timed and the speed-up is 1.

    Args:
        model: the pruned model (any device; a float32 CPU copy in eval mode is measured, `model` is untouched).
        examples: a batch of eval images `(n, 3, H, W)`; cut or cycled to each batch size.
        batch_sizes: batch sizes to export for and measure.
        repeats: timed rounds of the export's per-layer timing and of the end-to-end comparison.
        masks: the pruning masks, applied to the copy (the weights `save_model` writes); None: `model` as it is.

    Returns:
        a `hf_tgprune.io.modelcard.InferenceSpeed` (device, threads, per batch size: dense ms, sparse ms, layers).
    """
    model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    if masks:
        with torch.no_grad():
            apply_masks(model, masks)
    examples = examples.to(device="cpu", dtype=torch.float32)
    latencies = []
    for batch_size in batch_sizes:
        (inputs,) = resize_batch(examples, batch_size)
        exported, report = export_sparse_inference(model, inputs, repeats=repeats)
        if report.sparse_layers:
            dense_ms, sparse_ms = median_latencies_ms([model, exported], inputs, repeats)
        else:  # nothing converted: the export runs exactly the dense model, and any measured difference is noise
            (dense_ms,) = median_latencies_ms([model], inputs, repeats)
            sparse_ms = dense_ms
        latencies.append(
            InferenceLatency(
                batch_size=int(batch_size),
                dense_ms=dense_ms,
                sparse_ms=sparse_ms,
                layers_converted=len(report.sparse_layers),
                layers_candidate=len(report.layers),
                max_abs_error=report.max_abs_error,
            )
        )
    return InferenceSpeed(
        device=f"CPU: {cpu_name()}",
        threads=torch.get_num_threads(),
        latencies=latencies,
        input_shape=[int(s) for s in examples.shape[1:]],
        repeats=repeats,
        torch_version=torch.__version__,
    )
