"""Core speed benchmark (issue 2): ratios measured side by side in one run.

1. Scoring pass vs. the work it cannot avoid: student forward+backward plus teacher forward on the same batches
   (target: ratio <= 1.15).
2. A sparse retraining step (GlobalMaskCallback active, 90% sparsity) vs. a dense step of the same trainer
   (target: ratio <= 1.03).
3. The global threshold (`global_masks`) over 300M float32 scores: wall time (target < 10 s) and peak extra
   memory (RSS high-water mark above the scores themselves), measured in a fresh subprocess.

    python benchmarks/core_speed.py            # defaults: timm resnet18 student, resnet34 teacher, 64 px
    python benchmarks/core_speed.py --quick    # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_tgprune import (  # noqa: E402
    ScoringOptions,
    TeacherGuidedPruningConfig,
    TeacherGuidedPruningTrainer,
    compute_importance_scores,
    global_masks,
)
from hf_tgprune.core.losses import teacher_guided_loss  # noqa: E402


class TensorImages(torch.utils.data.Dataset):
    def __init__(self, n, size, num_classes, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, num_classes, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def bench_scoring(student, teacher, batches, repeats):
    options = ScoringOptions()

    def reference():
        student.eval()
        for batch in batches:
            logits = student(batch["pixel_values"])
            with torch.no_grad():
                teacher_logits = teacher(batch["pixel_values"])
            loss = teacher_guided_loss(logits, teacher_logits, batch["labels"])
            loss.backward()
            student.zero_grad(set_to_none=True)

    def scoring():
        compute_importance_scores(student, batches, teacher=teacher, options=options)

    times = {"reference": [], "scoring": []}
    reference()  # warm-up
    for _ in range(repeats):  # interleaved so that machine noise hits both alike
        for name, fn in (("reference", reference), ("scoring", scoring)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    # the minimum over interleaved repeats: the least disturbed run of each (timeit's advice on a shared machine)
    ref, sc = min(times["reference"]), min(times["scoring"])
    return {"reference_s": ref, "scoring_s": sc, "ratio": sc / ref, "repeats": repeats}


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def _step_times(student_fn, teacher, data, sparsity, steps, batch_size, out_dir):
    args = TeacherGuidedPruningConfig(
        output_dir=out_dir,
        sparsity=sparsity,
        pruning_method="magnitude",
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        optim="sgd",
        optim_args="momentum=0.9",
        learning_rate=0.01,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_drop_last=True,
    )
    timer = StepTimer()
    trainer = TeacherGuidedPruningTrainer(
        model=student_fn(), teacher_model=teacher, args=args, train_dataset=data, callbacks=[timer]
    )
    trainer.train()
    return timer.times[2:]  # drop warm-up steps


def bench_training_step(student_fn, teacher, data, steps, batch_size, repeats):
    sparse, dense = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):  # interleaved
            dense += _step_times(student_fn, teacher, data, 0.0, steps, batch_size, tmp)
            sparse += _step_times(student_fn, teacher, data, 0.9, steps, batch_size, tmp)
    d, s = statistics.median(dense), statistics.median(sparse)
    return {"dense_step_s": d, "sparse_step_s": s, "ratio": s / d, "steps_each": len(dense)}


def _maxrss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def threshold_child(total, layers):
    torch.manual_seed(0)
    per_layer = total // layers
    scores = {f"layer{i}.weight": torch.rand(per_layer) for i in range(layers)}
    baseline = _maxrss_bytes()
    start = time.perf_counter()
    masks = global_masks(scores, 0.9)
    elapsed = time.perf_counter() - start
    peak = _maxrss_bytes()
    mask_bytes = sum(m.numel() * m.element_size() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    print(
        json.dumps(
            {
                "num_scores": per_layer * layers,
                "seconds": elapsed,
                "scores_bytes": per_layer * layers * 4,
                "peak_extra_bytes": peak - baseline,
                "of_which_masks_bytes": mask_bytes,
                "exact": pruned == round(0.9 * per_layer * layers),
            }
        )
    )


def bench_threshold(total, layers):
    out = subprocess.run(
        [sys.executable, __file__, "--threshold-child", str(total), str(layers)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threshold-child", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--num-scores", type=int, default=300_000_000)
    args = parser.parse_args()
    if args.threshold_child:
        threshold_child(*args.threshold_child)
        return
    torch.manual_seed(0)
    size, batch_size, n_batches, repeats = (32, 16, 2, 2) if args.quick else (64, 32, 4, 5)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")

    student_fn = lambda: timm.create_model("resnet18", num_classes=10)  # noqa: E731
    teacher = timm.create_model("resnet34", num_classes=10).eval().requires_grad_(False)
    data = TensorImages(batch_size * n_batches, size, 10)
    batches = [
        {"pixel_values": data.x[i : i + batch_size], "labels": data.y[i : i + batch_size]}
        for i in range(0, len(data), batch_size)
    ]
    scoring = bench_scoring(student_fn(), teacher, batches, repeats)
    print(
        f"[scoring] {n_batches} batches of {batch_size}x3x{size}x{size}, resnet18 student / resnet34 teacher: "
        f"scoring {scoring['scoring_s']:.3f}s vs student fwd+bwd + teacher fwd {scoring['reference_s']:.3f}s "
        f"-> ratio {scoring['ratio']:.3f} (target <= 1.15; best of {scoring['repeats']} interleaved repeats)"
    )
    step = bench_training_step(student_fn, teacher, data, 6 if args.quick else 10, batch_size, repeats)
    print(
        f"[train step] sparse (90%, GlobalMaskCallback) {step['sparse_step_s']:.3f}s vs dense "
        f"{step['dense_step_s']:.3f}s (median of {step['steps_each']} steps each) -> ratio {step['ratio']:.3f} "
        "(target <= 1.03)"
    )
    total = 3_000_000 if args.quick else args.num_scores
    thr = bench_threshold(total, 6)
    print(
        f"[threshold] global_masks over {thr['num_scores']:,} scores: {thr['seconds']:.2f}s (target < 10 s), "
        f"peak extra memory {thr['peak_extra_bytes'] / 2**30:.2f} GiB above the {thr['scores_bytes'] / 2**30:.2f} GiB "
        f"of scores (of which {thr['of_which_masks_bytes'] / 2**30:.2f} GiB are the returned bool masks); "
        f"exact count: {thr['exact']}"
    )


if __name__ == "__main__":
    main()
