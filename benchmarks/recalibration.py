"""How many images BatchNorm recalibration needs: top-1 right after pruning, by `recalibration_samples`.

A one-shot-pruned network's BatchNorm running statistics are re-estimated on `recalibration_samples` calibration
images (`Pruner.recalibrate_batchnorm`). Retraining that follows does not read them (train-mode BatchNorm normalises
with each batch's statistics) and overwrites them as it trains, so their sample size matters for a pruned network used
*before* retraining. This measures that use on the transfer regime's dense student (`transfer.py --stage setup
--roles student-short`; no teacher is needed, the variants here score without one): each variant prunes it once per
sparsity, then its BatchNorm statistics are re-estimated on each of `--samples` images drawn with each of
`--calibration-seeds` (the library's seeded calibration sample: a seed's 512 images are the first half of its 1,024)
and it is evaluated on the test split and on `--test-data`. Records are written run by run and skipped when rerun.

    python benchmarks/recalibration.py --variants magnitude "tgp_fisher rounds=5 train-mode BN no teacher" \\
        --sparsities 0.9 0.95 0.98 --samples 256 512 1024 2048 --test-data ../shared/data/cifar10-val10k
    python benchmarks/recalibration.py --stage report
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import converged  # noqa: E402  (sets up sys.path, offline mode and logging for the library)
import torch  # noqa: E402
import transfer  # noqa: E402
from bench_utils import append_jsonl, load_jsonl  # noqa: E402

RECORDS = "recalibration.jsonl"


def parse_args(argv=None):
    parser = transfer.build_parser()
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98])
    parser.add_argument("--samples", nargs="+", type=int, default=[256, 512, 1024, 2048], help="recalibration images")
    parser.add_argument("--calibration-seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the sample")
    parser.set_defaults(variants=["magnitude", "tgp_fisher rounds=5 train-mode BN no teacher"])
    return transfer.parse_args(argv, parser)


def pruned_student(args, splits, variant: str, sparsity: float):
    """The dense student pruned by `variant` (no recalibration), and its pruner."""
    from hf_tgprune import Pruner, PruningArguments

    method, overrides = converged.variant_settings(variant)
    fields = {field.name for field in dataclasses.fields(PruningArguments)}
    settings = {key: value for key, value in overrides.items() if key in fields}
    student, _ = converged.load_dense(transfer.role_folder(args, f"student-{args.student_budget}"))
    normalize = converged.normalizer_for(student)
    calibration = converged.TensorImages(*splits["train"], normalize, augment=False)
    pruner = Pruner(
        student,
        PruningArguments(sparsity=sparsity, pruning_method=method, recalibrate_bn=False, seed=0, **settings),
        calibration_dataset=calibration,
    )
    pruner.progress = False
    pruner.prune()
    return student, pruner, normalize


def accuracies(model, splits, normalize) -> dict:
    result = {"test_top1": converged.evaluate(model, splits["test"], normalize)}
    if "extra_test" in splits:
        result["extra_test_top1"] = converged.evaluate(model, splits["extra_test"], normalize)
    return result


def run(args, splits) -> None:
    path = Path(args.out) / RECORDS
    path.parent.mkdir(parents=True, exist_ok=True)
    done = {record["key"] for record in load_jsonl(path)}
    if "dense" not in done and converged.parse_shard(args.shard)[0] == 0:  # one process records the dense student
        student, _ = converged.load_dense(transfer.role_folder(args, f"student-{args.student_budget}"))
        accuracy = accuracies(student, splits, converged.normalizer_for(student))
        append_jsonl(path, {"key": "dense", **accuracy, "commit": converged.git_commit()})
    pairs = [(variant, sparsity) for variant in args.variants for sparsity in args.sparsities]
    for variant, sparsity in converged.shard_of(pairs, args.shard):
        keys = {
            (samples, seed): f"{variant}|{sparsity}|{samples}|{seed}"
            for samples in [0, *args.samples]
            for seed in (args.calibration_seeds if samples else [None])
        }
        if all(key in done for key in keys.values()):
            continue
        torch.manual_seed(0)
        student, pruner, normalize = pruned_student(args, splits, variant, sparsity)
        for (samples, seed), key in keys.items():
            if key in done:
                continue
            images = 0
            if samples:  # 0: the dense network's statistics, no recalibration
                # the masks are installed: the settings now only choose the recalibration's images
                pruner.args.recalibration_samples, pruner.args.seed = samples, seed
                images = pruner.recalibrate_batchnorm()
            record = {
                "key": key,
                "variant": variant,
                "sparsity": sparsity,
                "recalibration_samples": samples,
                "calibration_seed": seed,
                "recalibration_images": images,
                **accuracies(student, splits, normalize),
                "commit": converged.git_commit(),
            }
            converged.log(f"{key}: {record}")
            append_jsonl(path, record)


def report(args) -> str:
    """Mean ± std over calibration seeds of top-1 after recalibration, by variant, sparsity and sample size (every
    record of the file, whatever the options of this call)."""
    records = load_jsonl(Path(args.out) / RECORDS)
    dense = next((r for r in records if r["key"] == "dense"), None)
    records = [r for r in records if r["key"] != "dense"]
    samples = sorted({r["recalibration_samples"] for r in records})
    metric = "extra_test_top1" if any("extra_test_top1" in r for r in records) else "test_top1"
    lines = [
        f"Top-1 ({'--test-data' if metric == 'extra_test_top1' else 'test'}) right after pruning, by recalibration "
        "images (0: the dense network's statistics); mean ± std over calibration seeds"
        + ("; test split in brackets." if metric != "test_top1" else "."),
        "",
        "| variant | sparsity | " + " | ".join(str(n) for n in samples) + " |",
        "|---|---|" + "---|" * len(samples),
    ]
    if dense is not None:
        held_out = f"{dense[metric]:.2f} ({dense['test_top1']:.2f} test)" if metric in dense else "—"
        lines.insert(1, f"Dense student: {held_out}.")
    for variant in dict.fromkeys(r["variant"] for r in records):
        for sparsity in sorted({r["sparsity"] for r in records if r["variant"] == variant}):
            cells = []
            for n in samples:
                runs = [
                    r
                    for r in records
                    if r["variant"] == variant and r["sparsity"] == sparsity and r["recalibration_samples"] == n
                ]
                test = f" ({converged._mean_std([r['test_top1'] for r in runs])})" if metric != "test_top1" else ""
                cells.append(f"{converged._mean_std([r.get(metric) for r in runs])}{test}" if runs else "—")
            lines.append(f"| {variant} | {sparsity:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.stage == "report":
        print(report(args))
        return
    splits = converged.load_data(args)
    run(args, splits)
    print(report(args))


if __name__ == "__main__":
    main()
