"""Memory of pruning a model sharded by FSDP2 (issue 20): per-process peak against the gathered score vector.

    python benchmarks/sharded_prune.py --processes 2 --layers 16 --width 8192     # 1.07B parameters, CPU, gloo

A synthetic stack of `--layers` Linear(`--width`, `--width`) layers is built on the meta device, sharded with
`fully_shard` (one FSDP unit per layer and the root) and materialised shard by shard (`to_empty`, then each process
fills only its own rows), so no process ever holds the whole model. `hf_tgprune.Pruner` then prunes it to
`--sparsity` with `magnitude` (data-free: the same scores and threshold memory as any criterion, without forward
passes). A sampling thread reads each process's resident memory every 5 ms; the script prints, per process, the
memory of its shard of the weights, the peak *above* it while scoring and while thresholding, and the size of the
full float32 score vector that a gathering implementation (one process holding every score) needs on top of the
weights, with the ratio. It checks that exactly round(sparsity * N) weights were pruned.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the library of this checkout, installed or not

GIB = 2**30


class PeakMemory:
    """Samples this process's resident set size (/proc/self/statm) in a thread; `peak()` since the last `reset()`."""

    def __init__(self, interval: float = 0.005):
        self.interval, self._peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self.rss())
            time.sleep(self.interval)

    def reset(self) -> int:
        self._peak = current = self.rss()
        return current

    def peak(self) -> int:
        time.sleep(2 * self.interval)
        return max(self._peak, self.rss())

    def stop(self):
        self._stop.set()


def worker(rank: int, args, init_file: str, out_file: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from hf_tgprune import Pruner, PruningArguments
    from hf_tgprune.core.dtensor import local

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.processes)
    memory = PeakMemory()
    with torch.device("meta"):
        model = nn.Sequential(*(nn.Linear(args.width, args.width, bias=False) for _ in range(args.layers)))
        model.append(nn.Linear(args.width, 10))  # the head, kept dense
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")  # allocates this process's rows only
    generator = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for param in model.parameters():
            local(param).normal_(generator=generator)
    weights = memory.reset()
    total = sum(p.numel() for p in model.parameters())
    # the head (the last Linear, found by hf_tgprune with a warning that it could not run the model on an image) stays
    # dense
    pruner = Pruner(model, PruningArguments(sparsity=args.sparsity, pruning_method="magnitude"))
    pruner.progress = False
    start = time.perf_counter()
    scores = pruner.compute_scores()
    scoring_peak = memory.peak() - weights
    scoring_seconds = time.perf_counter() - start
    held = memory.reset()  # weights + scores
    start = time.perf_counter()
    masks = pruner.select_masks(scores)
    threshold_peak = memory.peak() - held
    threshold_seconds = time.perf_counter() - start
    del scores
    pruned = sum(int((~local(mask)).sum()) for mask in masks.values())
    counts = torch.tensor([pruned, sum(local(m).numel() for m in masks.values())], dtype=torch.int64)
    dist.all_reduce(counts)
    memory.stop()
    record = {
        "rank": rank,
        "processes": args.processes,
        "parameters": total,
        "prunable": int(counts[1]),
        "pruned": int(counts[0]),
        "exact": int(counts[0]) == round(args.sparsity * int(counts[1])),
        "local_weights_gib": sum(local(p).numel() * 4 for p in model.parameters()) / GIB,
        "scoring_peak_extra_gib": scoring_peak / GIB,
        "threshold_peak_extra_gib": threshold_peak / GIB,
        "local_scores_gib": sum(local(m).numel() * 4 for m in masks.values()) / GIB,
        "full_score_vector_gib": int(counts[1]) * 4 / GIB,
        "scoring_seconds": scoring_seconds,
        "threshold_seconds": threshold_seconds,
    }
    with open(f"{out_file}.{rank}", "w") as handle:
        json.dump(record, handle)
    dist.destroy_process_group()


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--json", help="also write the per-process records to this file")
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "record")
        mp.spawn(worker, args=(args, os.path.join(tmp, "init"), out), nprocs=args.processes)
        records = [json.load(open(f"{out}.{rank}")) for rank in range(args.processes)]
    first = records[0]
    print(
        f"{first['parameters']:,} parameters ({first['prunable']:,} prunable) on {args.processes} processes, "
        f"sparsity {args.sparsity}: {first['pruned']:,} pruned (exact: {first['exact']})"
    )
    print("| rank | shard of the weights (GiB) | peak extra while scoring | peak extra while thresholding | "
          "its scores (GiB) | full score vector (GiB) | full vector / peak extra | scoring s | threshold s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        extra = max(r["scoring_peak_extra_gib"], r["threshold_peak_extra_gib"])
        print(
            f"| {r['rank']} | {r['local_weights_gib']:.2f} | {r['scoring_peak_extra_gib']:.2f} | "
            f"{r['threshold_peak_extra_gib']:.2f} | {r['local_scores_gib']:.2f} | {r['full_score_vector_gib']:.2f} | "
            f"{r['full_score_vector_gib'] / max(extra, 1e-9):.2f}x | {r['scoring_seconds']:.1f} | "
            f"{r['threshold_seconds']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
