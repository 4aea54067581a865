"""Every GPU check of the library in one script, sized for at most 8 minutes of device time.

    python benchmarks/gpu_check.py --out gpu_check.json          # on a machine with an NVIDIA GPU

1. Sparse retraining in bf16 and fp16 (`TeacherGuidedPruningTrainer`, `bf16=True` / `fp16=True`, a timm ResNet-18 at
   90% magnitude sparsity): after every step the pruned weights and every weight-shaped optimizer state are exactly
   zero, including the fp16 steps that the GradScaler skips (an inf is injected into a gradient to force one).
2. The mask of one scoring pass (`tgp_fisher`) under bf16 autocast against fp32: the share of equal mask entries
   (asked: >= 0.99).
3. 2:4 semi-structured kernels (`export_semi_structured`) on ViT-B/16 and ConvNeXt-T in bf16 at batch 1, 32 and 256:
   dense vs 2:4 latency end to end and per converted layer (median of CUDA-synchronised rounds).
4. CSR on CUDA (`SparseLinear`) against a dense Linear at 98% sparsity, batch 1, for ViT-B/16's layer shapes.
5. FSDP2 on one GPU (one process: `fully_shard` still applies): the masks of `tgp_fisher` (5 rounds) on a sharded
   timm ResNet-18 with a sharded ResNet-34 teacher against the same pruning unsharded (asked: equal), then masked
   AdamW steps on the sharded student (asked: no pruned weight revived). `check_fsdp2("cpu")` runs it on CPU with gloo.

6. accelerate's FSDP2 plugin (`recipes/accelerate_configs/fsdp2.yaml`, one process): `tests/scripts/fsdp_trainer.py`
   launched with it gives the trainer unsharded models, which it shards before pruning; prune, train, checkpoint,
   resume (asked: the model sharded at construction, no pruned weight revived, the same masks after resuming).

Every figure is recorded with the GPU's name, the driver's CUDA version and torch's. Without a CUDA device the script
stops at once with exit code 2 and says so (tested on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def gpu_description() -> dict:
    properties = torch.cuda.get_device_properties(0)
    return {
        "gpu": properties.name,
        "capability": list(torch.cuda.get_device_capability(0)),
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
    }


def cuda_median_ms(module, x: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of `module(x)` over CUDA-synchronised rounds."""
    for _ in range(warmup):
        module(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        module(x)
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


# --- 1. mixed-precision retraining keeps the masks ---------------------------------------------------------------------
def check_mixed_precision_training(precision: str, steps: int = 6) -> dict:
    import timm
    from transformers import TrainerCallback

    from hf_tgprune import TeacherGuidedPruningConfig, TeacherGuidedPruningTrainer

    data = [{"pixel_values": torch.randn(3, 64, 64), "labels": i % 10} for i in range(64)]
    violations, scales = [], []

    class Check(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if precision == "fp16" and state.global_step == 2:  # an overflow: the GradScaler skips this step
                next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("inf"))

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            params = dict(model.named_parameters())
            for name, mask in trainer.masks.items():
                pruned = ~mask.to(params[name].device)
                if params[name].detach()[pruned].any():
                    violations.append(f"step {state.global_step}: weight {name}")
                for key, value in optimizer.state.get(params[name], {}).items():
                    if torch.is_tensor(value) and value.shape == mask.shape and value[pruned].any():
                        violations.append(f"step {state.global_step}: {key} of {name}")
            scaler = getattr(trainer.accelerator, "scaler", None)
            if scaler is not None:
                scales.append(float(scaler.get_scale()))

    with tempfile.TemporaryDirectory() as out:
        args = TeacherGuidedPruningConfig(
            output_dir=out, sparsity=0.9, pruning_method="magnitude", max_steps=steps, per_device_train_batch_size=16,
            learning_rate=0.05, optim="adamw_torch", report_to="none", save_strategy="no", retrain_with_kd=False,
            num_calibration_samples=32, recalibration_samples=32, **{precision: True},
        )  # fmt: skip
        trainer = TeacherGuidedPruningTrainer(
            model=timm.create_model("resnet18", num_classes=10), args=args, train_dataset=data, callbacks=[Check()]
        )
        trainer.train()
    return {
        "precision": precision,
        "steps": steps,
        "violations": violations[:10],
        "ok": not violations,
        "grad_scaler_scales": scales,
        # a skipped step halves the scale: the injected overflow was handled by the GradScaler
        "scaler_skipped_a_step": precision == "fp16" and any(b < a for a, b in zip(scales, scales[1:])),
    }


# --- 2. scoring under autocast ---------------------------------------------------------------------------------------
def check_autocast_scoring() -> dict:
    import timm

    from hf_tgprune import compute_importance_scores, global_masks

    torch.manual_seed(0)
    student = timm.create_model("resnet18", num_classes=10).cuda().eval()
    teacher = timm.create_model("resnet34", num_classes=10).cuda().eval()
    batches = [
        {
            "pixel_values": torch.randn(32, 3, 64, 64, device="cuda"),
            "labels": torch.randint(0, 10, (32,), device="cuda"),
        }
        for _ in range(4)
    ]
    fp32 = compute_importance_scores(student, batches, method="tgp_fisher", teacher=teacher)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = compute_importance_scores(student, batches, method="tgp_fisher", teacher=teacher)
    masks_fp32, masks_bf16 = global_masks(fp32, 0.9), global_masks(bf16, 0.9)
    equal = sum(int((masks_fp32[n] == masks_bf16[n]).sum()) for n in masks_fp32)
    total = sum(m.numel() for m in masks_fp32.values())
    return {"agreement": equal / total, "ok": equal / total >= 0.99}


# --- 3. 2:4 semi-structured ---------------------------------------------------------------------------------------
def check_semi_structured(name: str, batch_sizes=(1, 32, 256)) -> dict:
    import timm

    from hf_tgprune import apply_masks, export_semi_structured, nm_masks, prunable_parameters

    model = timm.create_model(name, num_classes=1000).eval()
    scores = {n: p.detach().abs() for n, p in prunable_parameters(model).items() if p.dim() == 2}
    apply_masks(model, nm_masks(scores, 2, 4))
    model = model.to("cuda", torch.bfloat16)
    exported, report = export_semi_structured(model)
    converted = [row["name"] for row in report if row["chosen"] == "2:4"]
    rows = []
    with torch.inference_mode():
        for batch in batch_sizes:
            x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
            dense_ms = cuda_median_ms(model, x)
            sparse_ms = cuda_median_ms(exported, x)
            error = float((model(x).float() - exported(x).float()).abs().max())
            rows.append({"batch_size": batch, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                         "speedup": dense_ms / sparse_ms, "max_abs_error": error})  # fmt: skip
        layers = []
        dense_modules, sparse_modules = dict(model.named_modules()), dict(exported.named_modules())
        for layer in converted[:6]:
            inputs = torch.randn(32 * 197, dense_modules[layer].in_features, device="cuda", dtype=torch.bfloat16)
            d = cuda_median_ms(dense_modules[layer], inputs)
            s = cuda_median_ms(sparse_modules[layer], inputs)
            layers.append(
                {"layer": layer, "rows": int(inputs.shape[0]), "dense_ms": d, "sparse_ms": s, "speedup": d / s}
            )
    return {"model": name, "converted": len(converted), "linear_layers": len(report), "end_to_end": rows,
            "per_layer": layers}  # fmt: skip


# --- 4. CSR on CUDA ---------------------------------------------------------------------------------------------------
def check_csr_cuda(sparsity: float = 0.98) -> dict:
    from hf_tgprune.io.export import SparseLinear

    rows = []
    with torch.inference_mode():
        for in_features, out_features in ((768, 2304), (768, 3072), (3072, 768)):
            linear = torch.nn.Linear(in_features, out_features).cuda()
            with torch.no_grad():
                linear.weight.mul_((torch.rand_like(linear.weight) >= sparsity).float())
            sparse = SparseLinear.from_dense(linear)
            x = torch.randn(1, 197, in_features, device="cuda")
            d, s = cuda_median_ms(linear, x), cuda_median_ms(sparse, x)
            rows.append({"shape": [out_features, in_features], "tokens": 197, "dense_ms": d, "sparse_ms": s,
                         "speedup": d / s})  # fmt: skip
    return {"sparsity": sparsity, "layers": rows}


def check_fsdp2(device: str = "cuda", sparsity: float = 0.9, steps: int = 3, size: int = 64, images: int = 96) -> dict:
    """Prune a sharded student as the unsharded one (`tgp_fisher`), then train it masked; one process."""
    import copy

    import timm
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from hf_tgprune import Pruner, PruningArguments
    from hf_tgprune.core.dtensor import local

    started_group = not dist.is_initialized()
    if started_group:
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29581", "RANK": "0", "WORLD_SIZE": "1"}.items():
            os.environ.setdefault(key, value)
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    try:
        torch.manual_seed(0)
        student = timm.create_model("resnet18", num_classes=10).to(device)
        teacher = timm.create_model("resnet34", num_classes=10).to(device)
        generator = torch.Generator().manual_seed(1)
        images = [
            {"pixel_values": torch.randn(3, size, size, generator=generator), "labels": i % 10} for i in range(images)
        ]
        settings = PruningArguments(
            sparsity=sparsity, pruning_method="tgp_fisher", num_calibration_samples=len(images),
            calibration_batch_size=32, recalibration_samples=len(images),
        )  # fmt: skip
        hashes, start = {}, time.perf_counter()
        for sharded in (False, True):
            pupil, guide = copy.deepcopy(student), copy.deepcopy(teacher)
            if sharded:
                for model in (pupil, guide):
                    for block in [*model.layer1, *model.layer2, *model.layer3, *model.layer4]:
                        fully_shard(block)
                    fully_shard(model)
            pruner = Pruner(pupil, settings, teacher=guide, calibration_dataset=images)
            pruner.progress = False
            hashes[sharded] = pruner.prune()["mask_sha256"]
        optimizer = torch.optim.AdamW(pupil.parameters(), lr=1e-3, weight_decay=0.1)
        pruner.mask_callback.start(pupil, optimizer)
        batch = torch.stack([image["pixel_values"] for image in images[:32]]).to(device)
        for _ in range(steps):
            pupil(batch).logsumexp(-1).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            pruner.mask_callback.enforce(optimizer)
        params = dict(pupil.named_parameters())
        revived = sum(int((local(params[n]).detach()[~local(m)] != 0).sum()) for n, m in pruner.masks.items())
        return {
            "masks_equal": hashes[True] == hashes[False],
            "revived_after_training": revived,
            "sharded": type(next(iter(pruner.masks.values()))).__name__,
            "seconds": time.perf_counter() - start,
        }
    finally:
        if started_group:
            dist.destroy_process_group()


def check_accelerate_fsdp2(timeout: int = 300) -> dict:
    """`tests/scripts/fsdp_trainer.py` under `accelerate launch --config_file recipes/accelerate_configs/fsdp2.yaml`
    with one process; returns its record."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(root / "recipes" / "accelerate_configs" / "fsdp2.yaml"), "--num_processes", "1",
            str(root / "tests" / "scripts" / "fsdp_trainer.py"), out,
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(root))
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            return {"error": result.stderr[-2000:]}
        record = json.loads((Path(out) / "rank0.json").read_text())
    record["ok"] = bool(
        record["sharded_at_init"]
        and record["revived"] == 0
        and record["resume_trained_revived"] == 0
        and record["resume_trained_hash"] == record["mask_hash"]
    )
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["training", "autocast", "semi", "csr", "fsdp2", "accelerate_fsdp2"]
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check.py: error: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine.",
              file=sys.stderr)  # fmt: skip
        return 2
    start = time.perf_counter()
    results = {"device": gpu_description()}
    print(f"device: {results['device']}", flush=True)
    checks = {
        "training": lambda: [check_mixed_precision_training(p) for p in ("bf16", "fp16")],
        "autocast": check_autocast_scoring,
        "semi": lambda: [check_semi_structured(m) for m in ("vit_base_patch16_224", "convnext_tiny")],
        "csr": check_csr_cuda,
        "fsdp2": check_fsdp2,
        "accelerate_fsdp2": check_accelerate_fsdp2,
    }
    for name, check in checks.items():
        if name in args.skip:
            continue
        section = time.perf_counter()
        try:
            results[name] = check()
        except Exception as error:  # one failing check must not hide the others' figures
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        results[name + "_seconds"] = time.perf_counter() - section
        print(f"{name} ({results[name + '_seconds']:.0f} s): {json.dumps(results[name], default=str)}", flush=True)
    results["wall_s"] = time.perf_counter() - start
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
