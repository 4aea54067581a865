"""Size of the compact `bitmask` checkpoint against the dense fp32 `model.safetensors`, measured side by side.

    python benchmarks/sparse_size.py [--model resnet18] [--num-classes 10] [--sparsity 0.9]

A randomly initialised timm model gets a global magnitude mask (the library's default prunable set: conv/linear
weights except the classifier head); both formats are written by `save_sparse_model` and the file sizes compared.
The floor is sparsity-dependent: (1 - s) of the fp32 values plus 1/32 for the bitmask, plus the tensors that
are not pruned (head, norms, biases) stored as they are: 0.1 + 1/32 = 0.131 at 90% when the rest is negligible.
The bitmask round trip is checked to be bit-exact. Exit status 1 if the ratio of the first row exceeds --max-ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def measure(model_name: str, num_classes: int, sparsity: float, include_head: bool, workdir: Path) -> dict:
    import timm

    from hf_tgprune.core.masking import apply_masks, global_masks, prunable_parameters
    from hf_tgprune.io.serialization import BITMASK_WEIGHTS_NAME, DENSE_WEIGHTS_NAME, load_sparse, save_sparse_model

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=num_classes).eval()
    # include patterns select among all weights of dim >= 2, so this also opts the classifier head in
    params = prunable_parameters(model, include=[r"weight$"] if include_head else None)
    masks = global_masks({n: p.detach().abs() for n, p in params.items()}, sparsity)
    apply_masks(model, masks)

    tag = f"{model_name}-{num_classes}-{int(include_head)}"
    start = time.perf_counter()
    dense = save_sparse_model(model, workdir / f"{tag}-dense", masks)
    dense_seconds = time.perf_counter() - start
    start = time.perf_counter()
    compact = save_sparse_model(model, workdir / f"{tag}-bitmask", masks, save_format="bitmask")
    compact_seconds = time.perf_counter() - start
    start = time.perf_counter()
    restored = load_sparse(workdir / f"{tag}-bitmask")
    load_seconds = time.perf_counter() - start
    reference = load_sparse(workdir / f"{tag}-dense")
    exact = restored.keys() == reference.keys() and all(
        torch.equal(restored[k].reshape(-1).view(torch.uint8), reference[k].reshape(-1).view(torch.uint8))
        for k in reference
    )
    dense_bytes = dense["files"][DENSE_WEIGHTS_NAME]["bytes"]
    compact_bytes = compact["files"][BITMASK_WEIGHTS_NAME]["bytes"]
    total_params = sum(p.numel() for p in model.parameters())
    masked = sum(m.numel() for m in masks.values())
    return {
        "model": model_name,
        "classes": num_classes,
        "head_pruned": include_head,
        "masked_fraction": masked / total_params,
        "prunable_sparsity": dense["sparsity"]["prunable"]["sparsity"],
        "total_sparsity": dense["sparsity"]["total"]["sparsity"],
        "dense_bytes": dense_bytes,
        "bitmask_bytes": compact_bytes,
        "ratio": compact_bytes / dense_bytes,
        "floor": (1 - sparsity + 1 / 32) * masked / total_params + (total_params - masked) / total_params,
        "bit_exact": exact,
        "save_dense_s": dense_seconds,
        "save_bitmask_s": compact_seconds,
        "load_bitmask_s": load_seconds,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--max-ratio", type=float, default=0.14)
    parser.add_argument("--extra", action="store_true", help="also 1000 classes, with and without a pruned head")
    args = parser.parse_args(argv)

    configs = [(args.model, args.num_classes, False)]
    if args.extra:
        configs += [(args.model, 1000, False), (args.model, 1000, True)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, num_classes, include_head in configs:
            rows.append(measure(model_name, num_classes, args.sparsity, include_head, Path(tmp)))

    print(
        f"{'model':<10} {'classes':>7} {'head':>5} {'masked':>7} {'prunable sp':>11} {'dense MB':>9} "
        f"{'bitmask MB':>10} {'ratio':>7} {'floor':>7} {'exact':>6} {'save d/b s':>11} {'load b s':>8}"
    )
    for r in rows:
        print(
            f"{r['model']:<10} {r['classes']:>7} {('yes' if r['head_pruned'] else 'no'):>5} "
            f"{r['masked_fraction']:>7.3f} {r['prunable_sparsity']:>11.4f} {r['dense_bytes'] / 1e6:>9.2f} "
            f"{r['bitmask_bytes'] / 1e6:>10.2f} {r['ratio']:>7.4f} {r['floor']:>7.4f} {str(r['bit_exact']):>6} "
            f"{r['save_dense_s']:>5.2f}/{r['save_bitmask_s']:<5.2f} {r['load_bitmask_s']:>8.2f}"
        )
    first = rows[0]
    ok = first["ratio"] <= args.max_ratio and all(r["bit_exact"] for r in rows)
    print(
        f"bitmask / dense fp32 size at {args.sparsity:.0%} sparsity ({first['model']}, {first['classes']} classes): "
        f"{first['ratio']:.4f} ({'<=' if first['ratio'] <= args.max_ratio else '>'} {args.max_ratio})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
