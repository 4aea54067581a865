"""Two CPU processes (gloo) under `accelerate launch --multi_gpu`: same masks everywhere, equal to one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "distributed_prune.py"


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(__file__).parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(cmd, out):
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


@pytest.mark.slow
def test_two_processes_share_the_single_process_mask(tmp_path):
    single = _run([sys.executable, str(SCRIPT), str(tmp_path / "single")], tmp_path / "single")
    multi = _run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "29533",
            str(SCRIPT),
            str(tmp_path / "multi"),
        ],
        tmp_path / "multi",
    )
    assert len(single) == 1 and single[0]["world_size"] == 1
    assert [r["rank"] for r in multi] == [0, 1] and all(r["world_size"] == 2 for r in multi)
    # both ranks hold the identical mask, equal to the single-process mask over the same calibration data
    assert multi[0]["mask_hash"] == multi[1]["mask_hash"] == single[0]["mask_hash"]
    assert multi[0]["mask_hash_after_training"] == multi[0]["mask_hash"]
    # after DDP training both ranks' weights are identical and sparse
    assert multi[0]["weights_hash"] == multi[1]["weights_hash"]
    assert all(r["pruned_weights_zero"] for r in multi + single)
    assert abs(multi[0]["prunable_sparsity"] - 0.9) < 1e-4


@pytest.mark.slow
def test_a_frozen_rank_fails_the_job_within_ddp_timeout(tmp_path):
    """On CPU (gloo) too: a rank that stops answering fails the others within `ddp_timeout`, not 30 minutes."""
    import time

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29561"]
    start = time.monotonic()
    result = subprocess.run(
        cmd + [str(SCRIPT.parent / "frozen_rank.py"), str(tmp_path / "out"), "15"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 150, f"the job took {elapsed:.0f} s to fail with ddp_timeout=15"
