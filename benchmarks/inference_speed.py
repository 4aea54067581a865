"""Dense vs sparse-exported inference on CPU: end-to-end latency and memory, side by side in one run.

    python benchmarks/inference_speed.py                      # every default model at 95/98%, batch 1 and 32, 1 and 2 threads
    python benchmarks/inference_speed.py --quick              # smoke run (95%, batch 1, 1 thread)
    python benchmarks/inference_speed.py --models resnet50 --sparsities 0.95 --batch-sizes 1 --threads 1

Each timm model is built with random weights (nothing downloaded) at 224 px, or at the size after a colon
(`resnet18:32`: a ResNet-18 at CIFAR's 32 px). The masks are global magnitude masks of the stated sparsity
(`--method` for another criterion scored on a few random images; `--layer-density-floor` for the layer-collapse
guard, default off as in the library). Each pruned model is exported with `export_sparse_inference` for each batch
size and thread count (the per-layer choice, k×k formulation included, is measured at that batch size and thread
count; BatchNorms are folded into their convolutions) and checked against the dense model (`EXPORT_RTOL` /
`EXPORT_ATOL`).

Per row, beside the measured end-to-end ratio: "folded" is the model with BatchNorm folded and every layer dense (what
folding alone gives); the physical reference is the FLOP ratio of the converted layers (1 / their pooled density) and
the share of the dense model's time those layers take (from the export's own layer timings), and "limit" is the
end-to-end speed-up those two allow (Amdahl: 1 / (1 − share + share / FLOP ratio)).

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

DEFAULT_MODELS = [
    "vit_small_patch16_224", "convnext_tiny", "resnet50", "resnet18:32", "efficientnet_b0", "mobilenetv3_large_100",
]  # fmt: skip
IMAGE_SIZE = 224
# (model, sparsity, batch size, threads, end-to-end speed-up asked for)
GOALS = [
    ("resnet50", 0.95, 1, 1, 2.5),
    ("resnet50", 0.98, 1, 1, 3.5),
    ("resnet18:32", 0.98, 1, 1, 1.5),
    ("vit_small_patch16_224", 0.95, 32, 1, 1.5),
    ("vit_small_patch16_224", 0.95, 1, 1, 2.5),
]


def model_and_size(spec: str) -> tuple[str, int]:
    """`"resnet18:32"` -> ("resnet18", 32); `"resnet50"` -> ("resnet50", 224)."""
    name, _, size = spec.partition(":")
    return name, int(size) if size else IMAGE_SIZE


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


def scored_model(spec: str, method: str, calibration_images: int, seed: int = 0):
    """A random-weight timm model (eval mode, BatchNorm statistics of a few random batches) and its importance
    scores (`magnitude`: |θ|; other methods: one pass over random labelled images)."""
    import timm

    from hf_tgprune import compute_importance_scores

    name, size = model_and_size(spec)
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10 if size <= 64 else 1000)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # running statistics that are not the identity, so that BatchNorm folding is exercised
        for _ in range(2):
            model(torch.randn(4, 3, size, size, generator=generator))
    model.eval()
    batch = {
        "pixel_values": torch.randn(calibration_images, 3, size, size, generator=generator),
        "labels": torch.randint(0, 10 if size <= 64 else 1000, (calibration_images,), generator=generator),
    }
    scores = compute_importance_scores(model, [batch], method=method)
    return model, scores


def pruned_copy(
    model: torch.nn.Module, scores: dict, sparsity: float, layer_density_floor: float = 0.0
) -> tuple[torch.nn.Module, float]:
    """A copy of `model` with a global mask at `sparsity` applied; and the measured prunable sparsity."""
    from hf_tgprune import apply_masks, global_masks, sparsity_report
    from hf_tgprune.core.masking import min_layer_density_for

    masks = global_masks(scores, sparsity, min_density=min_layer_density_for(sparsity, 0.0, layer_density_floor))
    pruned = copy.deepcopy(model)
    apply_masks(pruned, masks)
    return pruned, sparsity_report(pruned, masks)["prunable"]["sparsity"]


# ---------------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def time_share(model: torch.nn.Module, x: torch.Tensor, names: list[str], repeats: int) -> float:
    """Share of `model`'s forward time spent inside the named (leaf) modules, timed in place with forward hooks
    (median over `repeats` passes after one warm-up): where the time of the converted layers really goes."""
    modules = dict(model.named_modules())
    inside = [0.0]
    started: dict[str, float] = {}
    handles = []
    for name in names:
        module = modules[name]
        handles.append(
            module.register_forward_pre_hook(lambda m, a, n=name: started.__setitem__(n, time.perf_counter()))
        )
        handles.append(
            module.register_forward_hook(
                lambda m, a, o, n=name: inside.__setitem__(0, inside[0] + time.perf_counter() - started[n])
            )
        )
    shares = []
    try:
        for round_index in range(repeats + 1):
            inside[0] = 0.0
            start = time.perf_counter()
            model(x)
            if round_index:
                shares.append(inside[0] / (time.perf_counter() - start))
    finally:
        for handle in handles:
            handle.remove()
    return statistics.median(shares) if shares else 0.0


def export_repeats_for(batch_size: int, export_repeats: int) -> int:
    """Layer-timing rounds: `export_repeats` for small batches, 1 for batches > 8 (long, stable calls; keeps it short)."""
    return export_repeats if batch_size <= 8 else 1


def bench_model(spec: str, args) -> list[dict]:
    from hf_tgprune.io.export import export_sparse_inference

    name, size = model_and_size(spec)
    start = time.perf_counter()
    base, scores = scored_model(spec, args.method, args.calibration_images)
    pruned = {s: pruned_copy(base, scores, s, args.layer_density_floor) for s in args.sparsities}
    del base, scores
    print(f"[{spec}] scored and pruned in {time.perf_counter() - start:.1f} s", flush=True)
    dense = pruned[args.sparsities[0]][0]
    dense_weights = weight_bytes(dense)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch_size in args.batch_sizes:
            x = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(1))
            # BatchNorm folded, every layer dense: what folding alone gives
            folded, _ = export_sparse_inference(dense, x[:1], min_speedup=1e9, max_density=0.0, repeats=1)
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
                    f"[{spec}] {threads} thread(s), batch {batch_size}, {sparsity:.0%}: exported "
                    f"{len(reports[sparsity].sparse_layers)} layers in {time.perf_counter() - start:.1f} s",
                    flush=True,
                )
            variants = {"dense": dense, "folded": folded, **{f"sparse@{s}": exported[s] for s in args.sparsities}}
            latency = interleaved_latency_ms(variants, x, args.repeats)
            peaks = {key: forward_peak_bytes(model, x) for key, model in variants.items()}
            for sparsity in args.sparsities:
                report = reports[sparsity]
                key = f"sparse@{sparsity}"
                measured = [layer for layer in report.layers if layer.dense_us]
                converted = [layer for layer in measured if layer.chosen == "sparse"]
                density = pooled_density(converted)
                # the share of the (BatchNorm-folded) dense model's time in the layers the export converted
                share = time_share(folded, x, [layer.name for layer in converted], args.repeats)
                flop_ratio = None if not density else 1 / density
                limit = None if flop_ratio is None else 1 / ((1 - min(share, 1.0)) + min(share, 1.0) / flop_ratio)
                formulations = [layer.formulation for layer in converted]
                rows.append(
                    {
                        "model": spec,
                        "sparsity": sparsity,
                        "prunable_sparsity": pruned[sparsity][1],
                        "batch_size": batch_size,
                        "threads": threads,
                        "dense_ms": latency["dense"],
                        "folded_ms": latency["folded"],
                        "sparse_ms": latency[key],
                        "speedup": latency["dense"] / latency[key],
                        "sparse_layers": len(report.sparse_layers),
                        "kxk_layers": {f: formulations.count(f) for f in ("unfold", "shift", "direct")},
                        "timed_layers": len(measured),
                        "timed_layers_density": pooled_density(measured),
                        "candidate_layers": len(report.layers),
                        "flop_ratio": flop_ratio,
                        "converted_dense_share": share,
                        "limit": limit,
                        "folded_batchnorms": len(report.folded_batchnorms),
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
            del exported, reports, variants, folded
    return rows


def pooled_density(layers) -> float | None:
    """Nonzero fraction over the weights of the given layers together (the layers the export timed)."""
    sizes = [math.prod(layer.weight_shape) for layer in layers]
    return sum(layer.density * n for layer, n in zip(layers, sizes)) / sum(sizes) if sizes else None


HEADER = (
    f"{'model':<24} {'sparsity':>8} {'thr':>3} {'batch':>5} {'dense ms':>10} {'folded ms':>10} {'sparse ms':>10} "
    f"{'speed-up':>8} {'limit':>6} {'FLOP x':>7} {'share':>6} {'sparse/timed/all (unfold,shift,direct)':>38} "
    f"{'weights MB d/s':>15} {'fwd peak MB d/s':>16}"
)


def _mb(value) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def format_row(row: dict) -> str:
    kxk = row["kxk_layers"]
    layers = f"{row['sparse_layers']}/{row['timed_layers']}/{row['candidate_layers']} ({kxk['unfold']},{kxk['shift']},{kxk.get('direct', 0)})"
    weights = f"{row['dense_weights_mb']:.1f}/{row['sparse_weights_mb']:.1f}"
    peaks = f"{_mb(row['dense_forward_peak_mb'])}/{_mb(row['sparse_forward_peak_mb'])}"
    limit = "-" if row["limit"] is None else f"{row['limit']:.2f}x"
    flops = "-" if row["flop_ratio"] is None else f"{row['flop_ratio']:.1f}x"
    return (
        f"{row['model']:<24} {row['sparsity']:>8.0%} {row['threads']:>3} {row['batch_size']:>5} "
        f"{row['dense_ms']:>10.1f} {row['folded_ms']:>10.1f} {row['sparse_ms']:>10.1f} {row['speedup']:>7.2f}x "
        f"{limit:>6} {flops:>7} {row['converted_dense_share']:>6.2f} {layers:>31} {weights:>15} {peaks:>16}"
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
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.95, 0.98])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch thread counts, each measured")
    parser.add_argument("--repeats", type=int, default=3, help="timed end-to-end rounds (after one warm-up round)")
    parser.add_argument(
        "--export-repeats", type=int, default=5, help="layer-timing rounds of the export at batch sizes <= 8 (else 1)"
    )
    parser.add_argument("--min-speedup", type=float, default=1.1, help="export_sparse_inference's min_speedup")
    parser.add_argument("--method", default="magnitude", help="criterion of the masks (magnitude, snip, ...)")
    parser.add_argument("--layer-density-floor", type=float, default=0.0, help="the layer-collapse guard (0: off)")
    parser.add_argument("--calibration-images", type=int, default=4, help="random images of the scoring pass")
    parser.add_argument("--layer-details", action="store_true", help="store every layer's export report in --out")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="smoke run: 95%% only, batch 1, 1 thread, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.sparsities, args.batch_sizes, args.repeats, args.export_repeats = [0.95], [1], 2, 2
        args.threads = [1]
        args.calibration_images = 2
    if any(not 0 <= s < 1 for s in args.sparsities):
        parser.error(f"--sparsities must lie in [0, 1), got {args.sparsities}")
    if any(b < 1 for b in args.batch_sizes) or args.repeats < 1 or args.export_repeats < 1 or min(args.threads) < 1:
        parser.error("--batch-sizes, --threads, --repeats and --export-repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
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
    note = " (--quick: 2 rounds, a smoke run, not the measurement)" if args.quick else ""
    for model, sparsity, batch_size, threads, wanted in GOALS:
        row = next(
            (r for r in rows if (r["model"], r["sparsity"], r["batch_size"], r["threads"]) == (model, sparsity, batch_size, threads)),
            None,
        )  # fmt: skip
        if row is not None:
            met = "met" if row["speedup"] >= wanted else "NOT met"
            print(
                f"goal >= {wanted}x: {model} at {sparsity:.0%}, batch {batch_size}, {threads} thread(s): "
                f"{row['speedup']:.2f}x, {met}{note}"
            )
    slower = [r for r in rows if r["speedup"] < 1.0]
    print(f"rows where the export is slower than dense: {len(slower)} of {len(rows)}")
    wall = time.perf_counter() - start
    print(f"wall time {wall:.0f} s")
    if args.out:
        info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "machine": info, "wall_s": wall, "results": rows}, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
