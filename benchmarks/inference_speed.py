"""Dense vs sparse-exported inference on CPU (issue 12): end-to-end latency and memory, side by side in one run.

    python benchmarks/inference_speed.py                      # ViT-S, ConvNeXt-T, ResNet-50 at 90/95/98%, batch 1 and 32
    python benchmarks/inference_speed.py --quick              # 1-minute smoke run (95%, batch 1)
    OMP_NUM_THREADS=1 python benchmarks/inference_speed.py --threads 1 --models vit_small_patch16_224 \\
        --sparsities 0.95 --batch-sizes 1 --repeats 15       # the issue's goal: >= 2x for ViT-S at 95%, batch 1

Each timm model is built with random weights at 224 px (nothing downloaded). The masks come from one real scoring
pass (`compute_importance_scores`, SNIP by default, on a few random images with random labels) and one global
threshold per sparsity with the layer-collapse guard `layer_density_floor=0.5` (the library default when INFERENCE.md was measured). Each pruned
model is exported with `export_sparse_inference` for each batch size (the per-layer choice is measured at that batch
size, with the `--threads` used for inference) and checked against the dense model (`EXPORT_RTOL` / `EXPORT_ATOL`).

Latency: one warm-up round, then `--repeats` interleaved rounds (dense, sparse@90, sparse@95, ... in turn, so that
machine noise hits every variant alike); medians. "dense" is the pruned model at the first sparsity run with dense
kernels (dense kernels take the same time whatever the values), the ratio is dense / sparse.

Memory, two numbers per variant:
- weights MB: exact bytes of all parameters and buffers (CSR layers: values + int32 column indices + row pointers);
- forward peak MB: the peak extra resident memory of one forward pass: the process's RSS high-water mark (VmHWM,
  reset through /proc/self/clear_refs just before) minus the RSS before the pass, after `gc.collect()` and glibc
  `malloc_trim(0)`. tracemalloc is not used because it does not see PyTorch's allocator, and `resource.ru_maxrss`
  cannot be reset within a process. Linux only; elsewhere the column reads n/a. Allocator caching makes this an
  estimate to a few MB.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

DEFAULT_MODELS = ["vit_small_patch16_224", "convnext_tiny", "resnet50"]
IMAGE_SIZE = 224
GOAL = ("vit_small_patch16_224", 0.95, 1, 2.0)  # model, sparsity, batch size, end-to-end speed-up asked for


# ---------------------------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------------------------


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers; a CSR tensor counts its values and index tensors."""
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.layout == torch.sparse_csr:
            parts = (tensor.values(), tensor.crow_indices(), tensor.col_indices())
        else:
            parts = (tensor,)
        total += sum(p.numel() * p.element_size() for p in parts)
    return total


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def forward_peak_bytes(model: torch.nn.Module, x: torch.Tensor) -> int | None:
    """Peak RSS above the RSS before one forward pass (None where /proc/self/clear_refs is unavailable)."""
    gc.collect()
    _malloc_trim()
    before = _status_bytes("VmRSS:") if sys.platform.startswith("linux") else 0
    if not sys.platform.startswith("linux") or not _reset_peak_rss():
        return None
    with torch.inference_mode():
        model(x)
    return max(0, _status_bytes("VmHWM:") - before)


# ---------------------------------------------------------------------------------------------------------------------
# latency
# ---------------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def interleaved_latency_ms(variants: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median milliseconds per forward of each variant over `repeats` interleaved rounds (after one warm-up round)."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(repeats + 1):
        for name, model in variants.items():
            start = time.perf_counter()
            model(x)
            if round_index:
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


# ---------------------------------------------------------------------------------------------------------------------
# models and masks
# ---------------------------------------------------------------------------------------------------------------------


def scored_model(name: str, method: str, calibration_images: int, seed: int = 0):
    """A random-weight timm model (eval mode) and its importance scores from one pass over random labelled images."""
    import timm

    from hf_tgprune import compute_importance_scores

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
    generator = torch.Generator().manual_seed(seed)
    batch = {
        "pixel_values": torch.randn(calibration_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
        "labels": torch.randint(0, 1000, (calibration_images,), generator=generator),
    }
    scores = compute_importance_scores(model, [batch], method=method)
    return model, scores


def pruned_copy(model: torch.nn.Module, scores: dict, sparsity: float) -> tuple[torch.nn.Module, float]:
    """A copy of `model` with a global mask at `sparsity` applied; and the measured prunable sparsity."""
    from hf_tgprune import apply_masks, global_masks, sparsity_report
    from hf_tgprune.core.masking import min_layer_density_for

    masks = global_masks(scores, sparsity, min_density=min_layer_density_for(sparsity, 0.0, 0.5))
    pruned = copy.deepcopy(model)
    apply_masks(pruned, masks)
    return pruned, sparsity_report(pruned, masks)["prunable"]["sparsity"]


# ---------------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------------


def export_repeats_for(batch_size: int, export_repeats: int) -> int:
    """Layer-timing rounds: `export_repeats` for small batches, 1 for batches > 8 (long, stable calls; keeps it short)."""
    return export_repeats if batch_size <= 8 else 1


def bench_model(name: str, args) -> list[dict]:
    from hf_tgprune.io.export import export_sparse_inference

    start = time.perf_counter()
    base, scores = scored_model(name, args.method, args.calibration_images)
    pruned = {s: pruned_copy(base, scores, s) for s in args.sparsities}
    del base, scores
    print(f"[{name}] scored and pruned in {time.perf_counter() - start:.1f} s", flush=True)
    dense = pruned[args.sparsities[0]][0]
    dense_weights = weight_bytes(dense)
    rows = []
    for batch_size in args.batch_sizes:
        x = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
        exported, reports = {}, {}
        for sparsity, (model, _) in pruned.items():
            start = time.perf_counter()
            exported[sparsity], reports[sparsity] = export_sparse_inference(
                model,
                x[:1],
                batch_sizes=[batch_size],
                min_speedup=args.min_speedup,
                repeats=export_repeats_for(batch_size, args.export_repeats),
            )
            print(
                f"[{name}] batch {batch_size}, {sparsity:.0%}: exported {len(reports[sparsity].sparse_layers)} "
                f"layers in {time.perf_counter() - start:.1f} s",
                flush=True,
            )
        variants = {"dense": dense, **{f"sparse@{s}": exported[s] for s in args.sparsities}}
        latency = interleaved_latency_ms(variants, x, args.repeats)
        peaks = {key: forward_peak_bytes(model, x) for key, model in variants.items()}
        for sparsity in args.sparsities:
            report = reports[sparsity]
            key = f"sparse@{sparsity}"
            measured = [layer for layer in report.layers if layer.dense_us]
            rows.append(
                {
                    "model": name,
                    "sparsity": sparsity,
                    "prunable_sparsity": pruned[sparsity][1],
                    "batch_size": batch_size,
                    "dense_ms": latency["dense"],
                    "sparse_ms": latency[key],
                    "speedup": latency["dense"] / latency[key],
                    "sparse_layers": len(report.sparse_layers),
                    "timed_layers": len(measured),
                    "timed_layers_density": pooled_density(measured),
                    "candidate_layers": len(report.layers),
                    "layer_time_us": report.layer_time_us(batch_size),
                    "dense_weights_mb": dense_weights / 2**20,
                    "sparse_weights_mb": weight_bytes(exported[sparsity]) / 2**20,
                    "dense_forward_peak_mb": None if peaks["dense"] is None else peaks["dense"] / 2**20,
                    "sparse_forward_peak_mb": None if peaks[key] is None else peaks[key] / 2**20,
                    "max_abs_error": report.max_abs_error,
                    "export": report.as_dict() if args.layer_details else None,
                }
            )
            print(format_row(rows[-1]), flush=True)
        del exported, reports, variants
    return rows


def pooled_density(layers) -> float | None:
    """Nonzero fraction over the weights of the given layers together (the layers the export timed)."""
    sizes = [math.prod(layer.weight_shape) for layer in layers]
    return sum(layer.density * n for layer, n in zip(layers, sizes)) / sum(sizes) if sizes else None


HEADER = (
    f"{'model':<24} {'sparsity':>8} {'batch':>5} {'dense ms':>10} {'sparse ms':>10} {'speed-up':>8} "
    f"{'sparse/timed/all layers':>23} {'timed density':>13} {'weights MB d/s':>15} {'fwd peak MB d/s':>16}"
)


def _mb(value) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def format_row(row: dict) -> str:
    layers = f"{row['sparse_layers']}/{row['timed_layers']}/{row['candidate_layers']}"
    weights = f"{row['dense_weights_mb']:.1f}/{row['sparse_weights_mb']:.1f}"
    peaks = f"{_mb(row['dense_forward_peak_mb'])}/{_mb(row['sparse_forward_peak_mb'])}"
    density = "-" if row["timed_layers_density"] is None else f"{row['timed_layers_density']:.3f}"
    return (
        f"{row['model']:<24} {row['sparsity']:>8.0%} {row['batch_size']:>5} {row['dense_ms']:>10.1f} "
        f"{row['sparse_ms']:>10.1f} {row['speedup']:>7.2f}x {layers:>23} {density:>13} {weights:>15} {peaks:>16}"
    )


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="timm model names")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--repeats", type=int, default=3, help="timed end-to-end rounds (after one warm-up round)")
    parser.add_argument(
        "--export-repeats", type=int, default=5, help="layer-timing rounds of the export at batch sizes <= 8 (else 1)"
    )
    parser.add_argument("--min-speedup", type=float, default=1.1, help="export_sparse_inference's min_speedup")
    parser.add_argument("--method", default="snip", help="scoring method for the masks (snip, magnitude, ...)")
    parser.add_argument("--calibration-images", type=int, default=4, help="random images of the scoring pass")
    parser.add_argument("--layer-details", action="store_true", help="store every layer's export report in --out")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="smoke run: 95%% only, batch 1, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.sparsities, args.batch_sizes, args.repeats, args.export_repeats = [0.95], [1], 2, 2
        args.calibration_images = 2
    if any(not 0 <= s < 1 for s in args.sparsities):
        parser.error(f"--sparsities must lie in [0, 1), got {args.sparsities}")
    if any(b < 1 for b in args.batch_sizes) or args.repeats < 1 or args.export_repeats < 1:
        parser.error("--batch-sizes, --repeats and --export-repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    info = machine()
    print(f"machine: {info}", flush=True)
    rows = []
    for name in args.models:
        rows.extend(bench_model(name, args))
    print()
    print(HEADER)
    for row in rows:
        print(format_row(row))
    goal = [r for r in rows if (r["model"], r["sparsity"], r["batch_size"]) == GOAL[:3]]
    if goal:
        met = "MET" if goal[0]["speedup"] >= GOAL[3] else "NOT MET"
        note = " (--quick: 2 rounds, a smoke run, not the measurement)" if args.quick else ""
        print(f"goal (>= {GOAL[3]}x end-to-end, {GOAL[0]} at {GOAL[1]:.0%}, batch {GOAL[2]}): {met}{note}")
    wall = time.perf_counter() - start
    print(f"wall time {wall:.0f} s, {torch.get_num_threads()} thread(s)")
    if args.out:
        info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "machine": info, "wall_s": wall, "results": rows}, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
