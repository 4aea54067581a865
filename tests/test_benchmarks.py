"""benchmarks/converged.py: the run plan, sharding, resumability, --test-data and the report (tiny models and data)."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import converged  # noqa: E402


def _tiny_cifar(root: Path, train_per_class: int = 12, test_per_class: int = 3) -> Path:
    """A CIFAR-10-like folder in the Hub layout (`img`/`label`, train/test parquet files)."""
    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    (root / "data").mkdir(parents=True)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = [c for c in range(10) for _ in range(per_class)]
        images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in labels]
        dataset = datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)
        dataset.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def test_plan_is_seed_major_with_one_seed_at_90():
    args = converged.parse_args(["--stage", "main", "--variants", "tgp", "magnitude", "--seeds", "3"])
    runs = converged.planned_runs(args)
    assert [(s, seed) for _, s, seed, _ in runs[:6]] == [
        (0.9, 0),
        (0.9, 0),
        (0.95, 0),
        (0.95, 0),
        (0.98, 0),
        (0.98, 0),
    ]
    assert [r for r in runs if r[1] == 0.9] == [("tgp", 0.9, 0, 2), ("magnitude", 0.9, 0, 2)]
    assert len(runs) == 2 * (1 + 2 * 3) and len(set(runs)) == len(runs)


def test_long_stage_is_seed_major_at_98():
    args = converged.parse_args(["--stage", "long", "--long-seeds", "2"])
    runs = converged.planned_runs(args)
    assert runs == [(v, 0.98, seed, 10) for seed in (0, 1) for v in converged.LONG_VARIANTS]


def test_shards_partition_the_plan():
    args = converged.parse_args(["--stage", "main"])
    runs = converged.planned_runs(args)
    shards = [converged.shard_of(runs, f"{i}/3") for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(runs)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("shard", ["2/2", "1", "a/b", "1/0"])
def test_bad_shard_is_refused_naming_the_argument(shard, capsys):
    with pytest.raises(SystemExit):
        converged.parse_args(["--shard", shard])
    assert "--shard must be I/N" in capsys.readouterr().err


def _smoke_command(data: Path, cache: Path, stage: str, *extra: str) -> list[str]:
    """`converged.py --smoke` on the tiny data with a tiny timm ResNet as teacher and student, at 90%."""
    return [
        sys.executable, str(ROOT / "benchmarks" / "converged.py"), "--smoke", "--stage", stage, "--data", str(data),
        "--cache-dir", str(cache), "--teacher", "test_resnet", "--student", "test_resnet", "--val-images", "20",
        "--batch-size", "16", "--ablation-sparsities", "0.9", *extra,
    ]  # fmt: skip


def test_smoke_runs_end_to_end_resumes_and_reports(tmp_path):
    data = _tiny_cifar(tmp_path / "cifar")
    cache = tmp_path / "cache"
    command = _smoke_command(
        data, cache, "ablation", "--test-data", str(data), "--variants", "magnitude", "tgp_fisher"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    runs_file = Path(str(cache) + "_smoke") / "results" / "runs.jsonl"
    records = [json.loads(line) for line in runs_file.read_text().splitlines()]
    assert [r["variant"] for r in records] == ["magnitude", "tgp_fisher"]
    for record in records:
        assert record["prunable_sparsity"] == pytest.approx(0.9, abs=1e-3)
        assert 0.0 <= record["extra_test_top1"] <= 100.0  # --test-data evaluated every final model
        assert (Path(record["saved_model"]) / "sparsity.json").exists()  # saved outside the repository
        assert record["teacher"] == "test_resnet" and "after_prune_recal_test_top1" in record
        assert record["config"]["layer_allocation"] == "global"  # the effective settings, defaults included
        assert record["config"]["pruning_rounds"] == 1  # a variant names its rounds, whatever the method's default
    setup = json.loads((runs_file.parent / "setup.json").read_text())
    for role in ("teacher", "student"):  # the weights each run used, as the setup fingerprints them
        weights = Path(setup[f"{role}_dir"]) / "model.safetensors"
        assert setup["dense_sha256"][role] == hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
        assert all(r["dense_sha256"][role] == setup["dense_sha256"][role] for r in records)

    dense = sorted(Path(str(cache) + "_smoke").glob("dense-*/training.json"))
    assert len(dense) == 2
    before = runs_file.read_text(), [p.stat().st_mtime_ns for p in dense]
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (runs_file.read_text(), [p.stat().st_mtime_ns for p in dense]) == before  # nothing is recomputed

    report = subprocess.run(
        command[:2] + ["--smoke", "--stage", "report", "--cache-dir", str(cache)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert "| magnitude |" in report.stdout and "| tgp_fisher |" in report.stdout


def _run_killed_after_its_checkpoint_and_resumed(tmp_path, stage: str, *extra: str):
    """Run a checkpointed stage of the smoke benchmark once, then again as if killed after its last checkpoint and
    before its record was written; returns the first run's stdout, the cache folder and both records."""
    data = _tiny_cifar(tmp_path / "cifar")
    cache = tmp_path / "cache"
    command = _smoke_command(data, cache, stage, "--retrain-images", "40", *extra)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    smoke = Path(str(cache) + "_smoke")
    runs_file = smoke / "results" / "runs.jsonl"
    (record,) = [json.loads(line) for line in runs_file.read_text().splitlines()]
    checkpoints = list((smoke / f"trainer-{stage}").glob("*/*/*/checkpoint-*/trainer_state.json"))
    assert len(checkpoints) == 1  # checkpointed every epoch, the newest kept
    prints = json.loads((runs_file.parent / "setup.json").read_text())["dense_sha256"]  # a folder per dense pair
    assert checkpoints[0].parents[2].name == f"{prints['teacher']}-{prints['student']}"
    runs_file.write_text("")
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    (resumed,) = [json.loads(line) for line in runs_file.read_text().splitlines()]
    assert record["resumed"] is False and resumed["resumed"] is True
    assert resumed["prunable_sparsity"] == record["prunable_sparsity"]
    assert resumed["test_top1"] == record["test_top1"]  # the checkpoint's model, not a retrained one
    return first.stdout, smoke, record, resumed


def test_scratch_stage_gives_epsd_the_dense_students_budget_and_resumes_from_its_checkpoint(tmp_path):
    stdout, smoke, record, _ = _run_killed_after_its_checkpoint_and_resumed(tmp_path, "scratch")
    student = json.loads(next(smoke.glob("dense-student-*/training.json")).read_text())
    assert record["variant"] == "epsd" and record["retrain_epochs"] == student["epochs"]
    trained_on = int(re.search(r"data: (\d+) train", stdout).group(1))
    assert record["train_images"] == trained_on > 40  # every training image, not the 40 of --retrain-images
    assert record["learning_rate"] == 0.1 and record["config"]["max_grad_norm"] == 0.0
    assert record["prunable_sparsity"] == pytest.approx(0.9, abs=1e-3)


def test_long_stage_checkpoints_every_epoch_and_resumes_without_pruning_again(tmp_path):
    _, _, record, resumed = _run_killed_after_its_checkpoint_and_resumed(tmp_path, "long", "--variants", "tgp_fisher")
    assert record["prunable_sparsity"] == pytest.approx(0.98, abs=1e-3) and record["prune_backward_images"] > 0
    assert resumed["prune_backward_images"] == 0  # the checkpoint's masks: no second scoring pass
    assert "after_prune_recal_test_top1" in record and "after_prune_recal_test_top1" not in resumed


def _write_setup(folder: Path) -> None:
    setup = {
        "machine": "m",
        "torch": "t",
        **{
            role: {
                "architecture": arch,
                "parameters": 1,
                "epochs": 1,
                "plateaued": True,
                "seconds": 1,
                "val_top1": 1,
                "test_top1": 1,
            }
            for role, arch in (("teacher", "resnet50d"), ("student", "resnet18"))
        },
    }
    setup["student_dir"] = "/cache/dense-student-resnet18-e15"
    setup["dense_sha256"] = {"teacher": "t1", "student": "s1"}
    (folder / "setup.json").write_text(json.dumps(setup))


def test_report_leaves_out_runs_from_another_teacher_or_student(tmp_path):
    _write_setup(tmp_path)
    base = {"sparsity": 0.95, "seed": 0, "retrain_epochs": 2, "val_top1": 80.0, "test_top1": 80.0, "seconds": 1}
    base.update(forward_images=1, backward_images=1)
    records = [
        {**base, "key": "a", "variant": "tgp", "teacher": "resnet34d", "test_top1": 11.0},
        {**base, "key": "b", "variant": "magnitude", "teacher": "resnet50d", "test_top1": 22.0},
        {**base, "key": "c", "variant": "dg2pf", "teacher": None, "test_top1": 33.0},
        {**base, "key": "d", "variant": "snip", "student": "dense-student-resnet18-e30", "test_top1": 44.0},
        {**base, "key": "e", "variant": "epsd", "teacher": None, "student": "resnet18", "test_top1": 55.0},
        {**base, "key": "f", "variant": "imp", "student": "dense-student-resnet18-e15", "test_top1": 66.0},
        # the same networks fine-tuned again (another fingerprint), and this setup's own (or none recorded)
        {
            **base,
            "key": "g",
            "variant": "snip",
            "dense_sha256": {"teacher": "t2", "student": "s1"},
            "test_top1": 71.25,
        },
        {**base, "key": "h", "variant": "tgp", "dense_sha256": {"teacher": "t1", "student": "s2"}, "test_top1": 72.25},
        {**base, "key": "i", "variant": "tgp", "dense_sha256": {"teacher": "t1", "student": "s1"}, "test_top1": 78.5},
        {
            **base,
            "key": "j",
            "variant": "tgp_fisher",
            "dense_sha256": {"teacher": None, "student": "s1"},
            "test_top1": 88.5,
        },
    ]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = converged.report(converged.parse_args(["--stage", "report", "--out", str(tmp_path)]))
    assert "Left out (4)" in text and all(v not in text for v in ("11.00", "44.00", "71.25", "72.25"))
    assert all(v in text for v in ("22.00", "33.00", "55.00", "66.00", "78.50", "88.50"))


def test_goal_check_pairs_seeds_and_compares_compute_with_imp():
    def record(variant, sparsity, seed, top1, images=100, seconds=10.0):
        return {
            "variant": variant,
            "sparsity": sparsity,
            "seed": seed,
            "retrain_epochs": 2,
            "test_top1": top1,
            "forward_images": images,
            "backward_images": images,
            "seconds": seconds,
            "overrides": {},
            "config": {"layer_density_floor": 0.0},
        }

    records = []
    for seed in range(3):
        records += [record("magnitude", 0.95, seed, 70.0), record("magnitude", 0.98, seed, 60.0)]
        records += [record("tgp", 0.95, seed, 71.5 + seed * 0.1), record("tgp", 0.98, seed, [62.0, 59.5, 63.0][seed])]
        records += [record("imp", s, seed, 71.0, images=1000, seconds=100.0) for s in (0.95, 0.98)]
    records.append({**record("tgp lamp", 0.95, 0, 90.0), "config": {"layer_density_floor": 0.5}})
    lines = converged.goal_check(records, ["magnitude", "tgp", "tgp lamp", "imp"], epochs=2)
    (row,) = [line for line in lines if line.startswith("| tgp |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1].startswith("+1.60") and cells[2] == "yes (n=3)"  # every seed gains, mean >= 1
    assert cells[3].startswith("+1.50") and cells[4] == "no (n=3)"  # mean >= 1 but one seed loses
    assert cells[5] == "— / +0.60 / -9.50" and cells[6] == "0.10; 0.10"
    assert not any(line.startswith("| tgp lamp |") for line in lines)  # another layer guard: not comparable


def test_long_table_averages_seeds_and_pairs_them_with_magnitude(tmp_path):
    _write_setup(tmp_path)
    setup = json.loads((tmp_path / "setup.json").read_text())
    setup["student"]["extra_test_top1"] = 75.0  # the dense student on the held-out set
    (tmp_path / "setup.json").write_text(json.dumps(setup))
    base = {"sparsity": 0.98, "retrain_epochs": 10, "seconds": 1, "forward_images": 1, "backward_images": 1}
    records = [
        {
            **base,
            "key": f"{v}{seed}",
            "variant": v,
            "seed": seed,
            "val_top1": 70.0 + seed,
            "test_top1": top1,
            "extra_test_top1": top1 - 1.0,
        }  # fmt: skip
        for v, tops in (("magnitude", (70.0, 71.0, 72.0)), ("tgp", (71.0, 71.5, 71.0)))
        for seed, top1 in enumerate(tops)
    ]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = converged.report(converged.parse_args(["--stage", "report", "--out", str(tmp_path)]))
    (row,) = [line for line in text.splitlines() if line.startswith("| tgp | 0.98 | 10 |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    held_out = ["70.17 ± 0.29", "-4.83"]  # mean held-out top-1, and its distance to the dense student's 75.0
    assert cells[3:] == ["3", "71.00 ± 1.00", "71.17 ± 0.29", "71.00, 71.50, 71.00", *held_out, "+0.17"]


def test_saved_models_of_other_stages_pairs_or_runs_never_collide(tmp_path):
    def info(student):
        return {"teacher": {"architecture": "resnet50d"}, "student_dir": f"/cache/dense-student-{student}-e15"}

    main = converged.parse_args(["--stage", "main", "--cache-dir", str(tmp_path)])
    ablation = converged.parse_args(["--stage", "ablation", "--cache-dir", str(tmp_path), "--out", "x/ablation"])
    folders = [
        converged.model_dir(main, info("resnet18"), "tgp|0.98|0|e2"),
        converged.model_dir(main, info("resnet10t"), "tgp|0.98|0|e2"),
        converged.model_dir(ablation, info("resnet18"), "tgp|0.98|0|e2"),
        converged.model_dir(main, info("resnet18"), "tgp|0.98|1|e2"),
    ]
    assert len(set(folders)) == len(folders)
    assert all(folder.is_relative_to(tmp_path / "models") for folder in folders)


def test_heldout_table_pairs_seeds_on_the_test_data_set(tmp_path):
    """Decisions are read on `--test-data` (e.g. 10,000 held-out images): its mean, the paired Δ against magnitude,
    and the 1,000-image split beside it."""
    _write_setup(tmp_path)
    base = {"retrain_epochs": 2, "seconds": 1, "forward_images": 1, "backward_images": 1, "val_top1": 1.0}
    records = []
    for seed in range(2):
        for variant, held, test in (("magnitude", (60.0, 62.0), 50.0), ("tgp", (61.0, 64.0), 55.0)):
            records.append(
                {**base, "key": f"{variant}{seed}", "variant": variant, "sparsity": 0.98, "seed": seed,
                 "extra_test_top1": held[seed], "test_top1": test}
            )  # fmt: skip
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = converged.report(converged.parse_args(["--stage", "report", "--out", str(tmp_path)]))
    (row,) = [line for line in text.splitlines() if line.startswith("| tgp | — | — | — | — |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == "**62.50 ± 2.12** (n=2)" and cells[6] == "+1.50 (+1.0, +2.0)"
    assert cells[7] == "— / — / 55.00 ± 0.00"
    assert converged.heldout_table([{**r, "extra_test_top1": None} for r in records][:0], ["tgp"], 2) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path on a machine without CUDA")
def test_gpu_check_stops_at_once_without_cuda():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "no CUDA device" in result.stderr and result.stdout == ""


def test_gpu_check_fsdp2_step_runs_on_cpu_with_gloo():
    """The GPU check's FSDP2 step, on CPU: the sharded student's masks equal the unsharded ones, none revived."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    result = gpu_check.check_fsdp2("cpu", steps=2, size=32, images=40)
    assert result["masks_equal"] and result["revived_after_training"] == 0 and result["sharded"] == "DTensor"


def test_standardized_kernels_benchmark_masks_the_computed_kernel_and_resumes(tmp_path):
    data = _tiny_cifar(tmp_path / "cifar")
    cache = tmp_path / "cache"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "standardized_kernels.py"),
        "--smoke",
        "--data",
        str(data),
        "--test-data",
        str(data),
        "--cache-dir",
        str(cache),
        "--val-images",
        "20",
        "--batch-size",
        "16",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = Path(str(cache) + "_smoke") / "results" / "runs.jsonl"
    records = {r["variant"]: r for r in map(json.loads, runs.read_text().splitlines())}
    for statistics in ("kept", "all"):
        masked = records[f"masked kernels, {statistics} statistics"]
        assert masked["computed_nonzero_at_pruned"] == 0.0 and masked["masked_kernel_layers"] > 0
    assert records["computed dense"]["computed_nonzero_at_pruned"] > 0.5
    assert records["computed dense"]["masked_kernel_layers"] == 0
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(runs.read_text().splitlines()) == 3  # finished runs are not repeated
    assert "| 0.9 | masked kernels, kept statistics | 0 | 0.0% |" in again.stdout
