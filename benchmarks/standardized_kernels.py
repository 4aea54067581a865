"""What `mask_standardized_kernels` costs in accuracy, on one weight-standardised model (issue 18 item 3).

A weight-standardised convolution computes with `(w - mean) / std`, dense even where `w` is pruned. Pruned as usual
("computed dense"), the model keeps every kernel entry in compute; with `mask_standardized_kernels=True` ("masked
kernels") the kernel is masked, so the model is as sparse in compute as on disk, with the statistics of the surviving
weights (`kernel_mask_statistics="kept"`) or of the whole stored weight (`"all"`). This benchmark
prunes the same dense BiT-style network (timm `resnetv2_50x1_bit` layout, narrower: `--channels`, GroupNorm and
`StdConv2d` throughout, trained from scratch on CIFAR-10 at 32 px, cached) both ways with global `magnitude` masks
and the same cross-entropy retraining, and reports top-1 on `--test-data` (the held-out images) and the test split,
plus the share of pruned positions that are non-zero in the computed kernels.

    python benchmarks/standardized_kernels.py --test-data ../shared/data/cifar10-val10k

Every run appends one JSON line to `--out`/runs.jsonl (resumable); dense training checkpoints every epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import converged  # noqa: E402
import torch  # noqa: E402
from bench_utils import load_jsonl  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

# variant -> (mask_standardized_kernels, kernel_mask_statistics)
VARIANTS = {
    "computed dense": (False, "kept"),
    "masked kernels, kept statistics": (True, "kept"),
    "masked kernels, all statistics": (True, "all"),
}


def build(args):
    import timm

    return timm.create_model(
        "resnetv2_50x1_bit", num_classes=10, channels=tuple(args.channels), stem_chs=args.channels[0] // 4
    )


def dense_model(args, splits) -> tuple[torch.nn.Module, dict]:
    from safetensors.torch import load_file

    schedule = converged.DenseSchedule(
        epochs=args.dense_epochs, lr=args.dense_lr, weight_decay=5e-4, batch_size=args.batch_size, to_plateau=False
    )
    name = "bit-" + "-".join(map(str, args.channels))
    folder = Path(args.cache_dir) / f"dense-{name}-e{args.dense_epochs}"
    torch.manual_seed(0)
    converged.fit_dense(folder, "dense", name, lambda: build(args), splits, schedule)
    model = build(args)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model, json.loads((folder / "training.json").read_text())


def dense_share_at_pruned(model, masks, example) -> float:
    """Share of pruned positions whose entry in the kernel the layer computes with is non-zero."""
    kernels, current = {}, []

    class Capture(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.conv2d and current:
                kernels[current[-1]] = args[1].detach()
            return func(*args, **(kwargs or {}))

    handles = []
    for name in masks:
        module = model.get_submodule(name.rsplit(".", 1)[0])
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: current.append(name), prepend=True))
        handles.append(module.register_forward_hook(lambda m, a, o: current.pop() and None, always_call=True))
    with torch.no_grad(), Capture():
        model.eval()(example)
    for handle in handles:
        handle.remove()
    pruned = sum(int((~mask).sum()) for mask in masks.values())
    nonzero = sum(int(kernels[name][~mask].count_nonzero()) for name, mask in masks.items() if name in kernels)
    return nonzero / max(1, pruned)


def run_one(args, splits, variant: str, seed: int) -> dict:
    from hf_tgprune import TeacherGuidedPruningConfig, TeacherGuidedPruningTrainer

    torch.manual_seed(seed)
    model, _ = dense_model(args, splits)
    normalize = converged.normalizer_for(model)
    subset = torch.randperm(len(splits["train"][1]), generator=torch.Generator().manual_seed(1234))
    subset = subset[: args.retrain_images]
    train_set = converged.TensorImages(splits["train"][0][subset], splits["train"][1][subset], normalize, augment=True)
    config = TeacherGuidedPruningConfig(
        output_dir=str(Path(args.cache_dir) / "trainer"),
        pruning_method="magnitude",
        sparsity=args.sparsity,
        mask_standardized_kernels=VARIANTS[variant][0],
        kernel_mask_statistics=VARIANTS[variant][1],
        retrain_with_kd=False,
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.retrain_epochs,
        learning_rate=args.retrain_lr,
        lr_scheduler_type="cosine",
        optim="sgd",
        optim_args="momentum=0.9",
        weight_decay=0.0,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=seed,
    )  # the library's max_grad_norm (0: no clipping)
    trainer = TeacherGuidedPruningTrainer(model=model, args=config, train_dataset=train_set)
    start = time.perf_counter()
    trainer.prune()
    example = normalize(splits["val"][0][:8])
    record = {
        "variant": variant,
        "seed": seed,
        "sparsity": args.sparsity,
        "after_prune_val_top1": converged.evaluate(model, splits["val"], normalize),
        "computed_nonzero_at_pruned": dense_share_at_pruned(model, trainer.masks, example),
    }
    trainer.train()
    record.update(
        val_top1=converged.evaluate(model, splits["val"], normalize),
        test_top1=converged.evaluate(model, splits["test"], normalize),
        extra_test_top1=converged.evaluate(model, splits["extra_test"], normalize) if "extra_test" in splits else None,
        masked_kernel_layers=len(trainer.pruning_report["masked_kernel_layers"]),
        computed_dense_layers=len(trainer.pruning_report["computed_dense_layers"]),
        seconds=time.perf_counter() - start,
        commit=args.commit,
        max_grad_norm=config.max_grad_norm,
    )
    return record


def table(records, dense: dict) -> str:
    lines = [
        "| sparsity | variant | seed | pruned positions non-zero in compute | after prune (val) | val | test (1k) | "
        "held-out |",
        "|---|---|---|---|---|---|---|---|",
        f"| 0 | dense | — | — | — | {dense['val_top1']:.2f} | {dense['test_top1']:.2f} | "
        f"{dense.get('extra_test_top1') or float('nan'):.2f} |",
    ]
    for r in sorted(records, key=lambda r: (r["sparsity"], r["seed"], list(VARIANTS).index(r["variant"]))):
        lines.append(
            f"| {r['sparsity']} | {r['variant']} | {r['seed']} | {100 * r['computed_nonzero_at_pruned']:.1f}% | "
            f"{r['after_prune_val_top1']:.2f} | {r['val_top1']:.2f} | {r['test_top1']:.2f} | "
            f"{r['extra_test_top1'] if r['extra_test_top1'] is not None else float('nan'):.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/cifar10")
    parser.add_argument("--test-data", default=None, help="another folder in the same layout (the held-out set)")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--out", default="benchmarks/results/standardized-kernels")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/hf_tgprune_bench/standardized"))
    parser.add_argument("--channels", type=int, nargs=4, default=[128, 256, 512, 1024])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--dense-lr", type=float, default=0.05)
    parser.add_argument("--retrain-epochs", type=int, default=2)
    parser.add_argument("--retrain-lr", type=float, default=0.01)
    parser.add_argument("--retrain-images", type=int, default=12000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--val-images", type=int, default=2500)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny everything, to check the script end to end")
    args = parser.parse_args(argv)
    args.image_size = None
    args.commit = converged.git_commit()  # the code this process runs
    if args.smoke:
        args.cache_dir += "_smoke"
        args.out = str(Path(args.cache_dir) / "results")
        args.channels, args.dense_epochs, args.retrain_epochs, args.retrain_images = [128] * 4, 1, 1, 256
    torch.set_num_threads(args.threads)
    splits = converged.load_data(args)
    if args.smoke:
        splits = {name: (x[:512], y[:512]) for name, (x, y) in splits.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.jsonl"
    records = load_jsonl(runs_path)
    done = {(r["variant"], r["seed"], r["sparsity"]) for r in records}
    _, dense = dense_model(args, splits)
    for seed in range(args.seeds):
        for variant in VARIANTS:
            if (variant, seed, args.sparsity) in done:
                continue
            record = run_one(args, splits, variant, seed)
            converged.log(f"{variant} seed {seed}: {record}")
            with runs_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            records.append(record)
    text = table(records, dense)
    converged.atomic_write_text(out / "tables.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
