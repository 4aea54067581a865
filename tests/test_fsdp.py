"""Pruning a model sharded by FSDP2 (`fully_shard`, gloo on CPU): the masks, BatchNorm statistics and checkpoints
equal those of one process over the same data, for 2 and 4 processes, without gathering scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timm.layers import BatchNormAct2d
from torch import nn

from hf_tgprune import Pruner, PruningArguments
from hf_tgprune.core.masking import MaskFileError, mask_hash
from hf_tgprune.core.recalibration import batchnorm_layers
from hf_tgprune.core.sharded import process_group_all_reduce

CASES = {  # name -> pruning settings; sparsity 0.8 throughout
    "magnitude": {"pruning_method": "magnitude"},
    "tgp": {"pruning_method": "tgp", "pruning_rounds": 1},
    # 5 rounds scoring with the running statistics, so BatchNorm is recalibrated between them
    "tgp_fisher": {"pruning_method": "tgp_fisher", "scoring_bn_mode": "eval"},
    "tgp_fisher 2:4": {"pruning_method": "tgp_fisher", "sparsity_pattern": "2:4"},
    # BatchNorm in train mode while scoring (the default): each global batch's statistics (the parts of every process)
    "tgp_fisher train-mode BN": {"pruning_method": "tgp_fisher", "pruning_rounds": 2, "scoring_bn_mode": "train"},
    "tgp eval-mode BN": {"pruning_method": "tgp", "scoring_bn_mode": "eval"},  # running statistics
}


class Net(nn.Module):
    """Channel counts that 4 processes shard unevenly (6 rows: 2/2/2/0; 3 rows: 1/1/1/0)."""

    def __init__(self, width: int = 6, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 12, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(12)  # timm's norm-act layer: its ReLU is inside its forward
        self.conv3 = nn.Conv2d(12, 3, 1)
        self.fc = nn.Linear(3 * 4 * 4, 8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        x = nn.functional.adaptive_avg_pool2d(self.conv3(x), 4).flatten(1)
        return self.head(torch.relu(self.fc(x)))


def models():
    torch.manual_seed(0)
    student, teacher = Net(), Net(width=8)
    for module in (student, teacher):  # BatchNorm statistics that differ from the defaults
        for layer in batchnorm_layers(module).values():
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
    return student, teacher


def dataset(n: int = 22):
    generator = torch.Generator().manual_seed(1)
    return [{"pixel_values": torch.randn(3, 8, 8, generator=generator), "labels": int(i % 5)} for i in range(n)]


def arguments(case: str) -> PruningArguments:
    # scoring on 18 images in batches of 8: the last global batch has 2, so 4 processes get 0/1/0/1 of it (zero-length
    # batches on two ranks); recalibration on 16 images: 8 + 8
    return PruningArguments(
        sparsity=0.8, num_calibration_samples=18, calibration_batch_size=8, recalibration_samples=16, **CASES[case]
    )


def prune(student, teacher, case: str) -> tuple[str, dict, dict]:
    pruner = Pruner(student, arguments(case), teacher=teacher, calibration_dataset=dataset())
    pruner.progress = False
    report = pruner.prune()
    stats = {
        f"{name}.{key}": getattr(layer, key).detach().clone()
        for name, layer in batchnorm_layers(student).items()
        for key in ("running_mean", "running_var")
    }
    return report["mask_sha256"], {k: report[k]["sparsity"] for k in ("prunable", "total")}, stats


def _sharded_worker(rank, world_size, init_file, results, checkpoint):
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        out = {}
        for case in CASES:
            student, teacher = models()
            fully_shard(student)
            fully_shard(teacher)
            out[case] = prune(student, teacher, case)
        # not sharded, data-parallel as under DDP: train-mode BatchNorm scoring with global-batch statistics
        student, teacher = models()
        pruner = Pruner(student, arguments("tgp_fisher train-mode BN"), teacher=teacher, calibration_dataset=dataset())
        pruner.rank, pruner.world_size, pruner.all_reduce = rank, world_size, process_group_all_reduce()
        pruner.progress = False
        out["data-parallel train-mode BN"] = pruner.prune()["mask_sha256"]
        # only two layers sharded: the other weights are replicated, scored on every process and counted once
        student, teacher = models()
        fully_shard(student.conv2)
        fully_shard(student.fc)
        out["partly sharded"] = prune(student, teacher, "tgp_fisher")
        # train with the masks: pruned weights, gradients and Adam states stay exactly zero on every shard
        student, teacher = models()
        fully_shard(student)
        pruner = Pruner(student, arguments("magnitude"), teacher=teacher, calibration_dataset=dataset())
        pruner.progress = False
        pruner.prune()
        optimizer = torch.optim.AdamW(student.parameters(), lr=0.1, weight_decay=0.1)
        pruner.mask_callback.start(student, optimizer)
        batch = torch.stack([example["pixel_values"] for example in dataset()])
        for _ in range(3):
            student(batch).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            pruner.mask_callback.enforce(optimizer)
        params = dict(student.named_parameters())
        revived = 0
        for name, mask in pruner.masks.items():
            tensors = [params[name], *(v for v in optimizer.state[params[name]].values() if v.shape == mask.shape)]
            revived += sum(int((t.to_local()[~mask.to_local()] != 0).sum()) for t in tensors)
        out["revived"] = revived
        out["trained_hash"] = pruner.report["mask_sha256"]
        if checkpoint is not None:
            if checkpoint["mode"] == "save":
                pruner.save_state(checkpoint["folder"])
            out["saved_hash"] = mask_hash(pruner.masks)
        results[rank] = out
    finally:
        dist.destroy_process_group()


def _loading_worker(rank, world_size, init_file, results, folder):
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        student, _ = models()
        fully_shard(student)
        pruner = Pruner(student, arguments("magnitude"), calibration_dataset=dataset())
        pruner.load_state(folder)
        results[rank] = {"hash": mask_hash(pruner.masks), "local": type(next(iter(pruner.masks.values()))).__name__}
    finally:
        dist.destroy_process_group()


def run(worker, world_size, tmp_path, *args):
    results = mp.Manager().dict()
    mp.spawn(worker, args=(world_size, str(tmp_path / f"init-{world_size}"), results, *args), nprocs=world_size)
    return dict(results)


@pytest.fixture(scope="module")
def single_process():
    out = {}
    for case in CASES:
        student, teacher = models()
        out[case] = prune(student, teacher, case)
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_pruning_equals_one_process(world_size, tmp_path, single_process):
    folder = tmp_path / "checkpoint"
    checkpoint = {"mode": "save", "folder": str(folder)} if world_size == 2 else None
    results = run(_sharded_worker, world_size, tmp_path, checkpoint)
    for case, (digest, sparsity, stats) in single_process.items():
        for rank in range(world_size):
            sharded_digest, sharded_sparsity, sharded_stats = results[rank][case]
            assert sharded_digest == digest, (case, rank)  # the same masks, bit for bit
            assert sharded_sparsity == sparsity
            for key, value in stats.items():  # BatchNorm statistics of the global batches
                torch.testing.assert_close(sharded_stats[key], value, rtol=1e-5, atol=1e-6, msg=f"{case} {key}")
    assert all(results[rank]["partly sharded"][0] == single_process["tgp_fisher"][0] for rank in range(world_size))
    train_mode = single_process["tgp_fisher train-mode BN"][0]
    assert all(results[rank]["data-parallel train-mode BN"] == train_mode for rank in range(world_size))
    assert all(results[rank]["revived"] == 0 for rank in range(world_size))
    assert results[0]["trained_hash"] == single_process["magnitude"][0]
    if checkpoint is None:
        return
    # the sharded checkpoint: one safetensors file per process, resumed on 4 processes and in one
    files = sorted(p.name for p in (folder / "pruning_state_sharded").iterdir())
    assert files == ["header.json", *sorted(f for f in files if f.startswith("shard-"))] and len(files) == 3
    (tmp_path / "load4").mkdir()
    loaded = run(_loading_worker, 4, tmp_path / "load4", str(folder))
    assert {r["hash"] for r in loaded.values()} == {results[0]["saved_hash"]}
    assert {r["local"] for r in loaded.values()} == {"DTensor"}
    student, _ = models()
    pruner = Pruner(student, arguments("magnitude"), calibration_dataset=dataset())
    pruner.load_state(folder)
    assert mask_hash(pruner.masks) == results[0]["saved_hash"]
    assert pruner.report["prunable"]["sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_settings_sharded_weights_cannot_honour_are_refused_before_pruning(tmp_path):
    results = run(_refusal_worker, 2, tmp_path)
    assert results[0] == results[1]
    assert "layer_allocation='global'" in results[0]["lamp"]
    assert "min_layer_density" in results[0]["floor"]
    assert "one-shot" in results[0]["dg2pf"]
    assert "layer_allocation='global'" in results[0]["gradual lamp"]
    assert "mask_standardized_kernels=False" in results[0]["kernels"]


def _refusal_worker(rank, world_size, init_file, results):
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        student, teacher = models()
        fully_shard(student)
        out = {}
        for name, settings in {
            "lamp": {"pruning_method": "magnitude", "layer_allocation": "lamp"},
            "floor": {"pruning_method": "magnitude", "layer_density_floor": 0.5},
            "dg2pf": {"pruning_method": "dg2pf"},
            "gradual lamp": {"pruning_method": "gradual", "layer_allocation": "lamp"},
            "kernels": {"pruning_method": "magnitude", "mask_standardized_kernels": True},
        }.items():
            try:
                Pruner(student, PruningArguments(sparsity=0.8, **settings), teacher=teacher, train_dataset=dataset())
            except ValueError as err:
                out[name] = str(err)
        results[rank] = out
    finally:
        dist.destroy_process_group()


TRAINER_SCRIPT = Path(__file__).parent / "scripts" / "fsdp_trainer.py"


def _launch(cmd, out):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(__file__).parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


@pytest.mark.slow
def test_trainer_prunes_trains_and_saves_a_model_sharded_with_fully_shard(tmp_path):
    single = _launch([sys.executable, str(TRAINER_SCRIPT), str(tmp_path / "single")], tmp_path / "single")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29547"]  # fmt: skip
    multi = _launch([*launch, str(TRAINER_SCRIPT), str(tmp_path / "multi")], tmp_path / "multi")
    assert [r["rank"] for r in multi] == [0, 1] and all(r["sharded"] for r in multi) and not single[0]["sharded"]
    # the trainer's masks over the shards are the single process's, and stay so through training
    assert (
        {r["mask_hash"] for r in multi} == {r["mask_hash_after_training"] for r in multi} == {single[0]["mask_hash"]}
    )
    assert all(r["revived"] == 0 for r in multi)
    # checkpoint-2 holds the masks shard by shard; a fresh sharded model loads it: the same masks, the weights
    # bit for bit, no pruned weight revived
    assert all("pruning_state_sharded" in r["checkpoint_files"] for r in multi)
    assert "pruning_state.safetensors" in single[0]["checkpoint_files"]
    assert {r["resumed_hash"] for r in multi + single} == {single[0]["mask_hash"]}
    assert all(r["loaded_exactly"] and r["resumed_revived"] == 0 for r in multi + single)
    # save_model gathered the weights onto rank 0 and wrote the usual folder: it loads, and is as sparse as the mask
    from hf_tgprune import load_sparse
    from tests.utils import make_model

    # accelerate's FSDP2 plugin (recipes/accelerate_configs/fsdp2.yaml): unsharded models given, the trainer shards
    # them when it is built; the same masks, checkpoints with the optimizer state per process, and the Trainer's own
    # resume continues from them
    config = Path(__file__).parents[1] / "recipes" / "accelerate_configs" / "fsdp2.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
              "--main_process_port", "29548"]  # fmt: skip
    plugin = _launch([*launch, str(TRAINER_SCRIPT), str(tmp_path / "plugin")], tmp_path / "plugin")
    assert [r["rank"] for r in plugin] == [0, 1] and all(r["sharded_at_init"] and r["sharded"] for r in plugin)
    assert {r[key] for r in plugin for key in ("mask_hash", "mask_hash_after_training", "resumed_hash")} == {
        single[0]["mask_hash"]
    }
    assert all(r["revived"] == 0 and r["loaded_exactly"] and r["resumed_revived"] == 0 for r in plugin)
    assert all({"pruning_state_sharded", "optimizer_0"} <= set(r["checkpoint_files"]) for r in plugin)
    assert all(r["resume_trained_steps"] == 3 and r["resume_trained_revived"] == 0 for r in plugin)
    assert {r["resume_trained_hash"] for r in plugin} == {single[0]["mask_hash"]}
    # gradual under the plugin: pruned to the target during training, its summed squared gradients in the sharded
    # checkpoint, and the Trainer's resume from that checkpoint ends on the uninterrupted run's masks
    assert all(r["gradual_sparsity"] == pytest.approx(0.9, abs=1e-4) for r in plugin)
    assert {r["gradual_resumed_hash"] for r in plugin} == {r["gradual_hash"] for r in plugin} and len(
        {r["gradual_hash"] for r in plugin}
    ) == 1
    assert all(
        r["gradual_checkpoint_tensors"] and r["gradual_checkpoint_tensors"][0].startswith("fisher.") for r in plugin
    )
    for run in ("single", "multi", "plugin"):
        folder = tmp_path / run / "final"
        record = json.loads((folder / "sparsity.json").read_text())["sparsity"]
        assert record["prunable"]["sparsity"] == pytest.approx(0.9, abs=1e-4) and record["masks_enforced"]
        model = load_sparse(str(folder), make_model("timm_resnet", seed=5))  # verified against sparsity.json
        zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n in record["layers"])
        assert zeros == record["prunable"]["zeros"] >= round(0.9 * record["prunable"]["numel"])


# gradual: 3 mask updates (steps 2, 4, 6 of 8), a checkpoint written at step 3 between two updates
GRADUAL = {"pruning_method": "gradual", "pruning_method_args": {"pruning_steps": 3, "end_fraction": 0.75}}
GRADUAL_STEPS, GRADUAL_SAVE_AT = 8, 3


def train_gradual(student, folder: str | None) -> dict:
    """Drive `gradual`'s mask callback by hand as the Trainer does, with the same batch on every process (so the
    gradients, reduce-scattered by FSDP2, equal one process's): mask hashes after each update, the summed squared
    gradients and masks saved at step `GRADUAL_SAVE_AT`, and the final masks of a run resumed from that checkpoint."""
    from transformers import TrainerControl, TrainerState

    from hf_tgprune.core.dtensor import is_sharded

    def gathered(tensors):
        return {name: (t.full_tensor() if is_sharded(t) else t).detach().cpu().clone() for name, t in tensors.items()}

    args = PruningArguments(sparsity=0.8, **GRADUAL)
    data = dataset(16)
    batch = torch.stack([example["pixel_values"] for example in data])
    labels = torch.tensor([example["labels"] for example in data])
    pruner = Pruner(student, args, train_dataset=data)
    pruner.progress = False
    pruner.prune()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    state, control = TrainerState(max_steps=GRADUAL_STEPS), TrainerControl()
    callback = pruner.mask_callback
    callback.on_train_begin(None, state, control, model=student, optimizer=optimizer)
    out = {"hashes": [], "sharded_fisher": is_sharded(next(iter(callback.fisher.values())))}
    for step in range(1, GRADUAL_STEPS + 1):
        nn.functional.cross_entropy(student(batch), labels).backward()
        callback.on_pre_optimizer_step(None, state, control)
        optimizer.step()
        callback.on_optimizer_step(None, state, control, optimizer=optimizer)
        optimizer.zero_grad()
        state.global_step = step
        callback.on_step_end(None, state, control, model=student, optimizer=optimizer)
        out["hashes"].append(pruner.report["mask_sha256"])
        if step == GRADUAL_SAVE_AT:
            out["fisher"] = gathered(callback.fisher)
            if folder is not None:
                pruner.save_state(folder)
                # resume on the same weights and optimizer from the checkpoint: a new pruner continues the schedule
                callback._remove_hooks()
                pruner = Pruner(student, args, train_dataset=data)
                pruner.load_state(folder)
                callback = pruner.mask_callback
                callback.on_train_begin(None, state, control, model=student, optimizer=optimizer)
                out["resumed_fisher"] = gathered(callback.fisher)
    callback.on_train_end(None, state, control, model=student, optimizer=optimizer)
    out["finished"] = pruner.report["schedule_finished"]
    return out


def _gradual_worker(rank, world_size, init_file, results, folder, unsharded_folder):
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainerControl, TrainerState

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        student, _ = models()
        fully_shard(student)
        out = train_gradual(student, folder)
        # a checkpoint written by one process, resumed sharded: the sums become this process's rows
        student, _ = models()
        fully_shard(student)
        pruner = Pruner(student, PruningArguments(sparsity=0.8, **GRADUAL), train_dataset=dataset())
        pruner.load_state(unsharded_folder)
        state = TrainerState(max_steps=GRADUAL_STEPS, global_step=GRADUAL_SAVE_AT)
        pruner.mask_callback.on_train_begin(None, state, TrainerControl(), model=student)
        out["from_unsharded"] = {name: t.full_tensor() for name, t in pruner.mask_callback.fisher.items()}
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_gradual_on_sharded_weights_equals_one_process_and_resumes(tmp_path):
    student, _ = models()
    single = train_gradual(student, str(tmp_path / "unsharded"))
    folder = tmp_path / "gradual"
    sharded = run(_gradual_worker, 2, tmp_path, str(folder), str(tmp_path / "unsharded"))
    assert len(set(single["hashes"])) == 4 and single["finished"]  # dense, then three updates
    for rank in range(2):
        out = sharded[rank]
        assert out["sharded_fisher"] and out["finished"]
        assert out["hashes"] == single["hashes"]  # every update's masks, bit for bit, through the resume
        for name, value in single["fisher"].items():
            torch.testing.assert_close(out["fisher"][name], value, rtol=1e-6, atol=1e-9)
            assert torch.equal(out["resumed_fisher"][name], out["fisher"][name])
            assert torch.equal(out["from_unsharded"][name], single["fisher"][name])
    header = json.loads((folder / "pruning_state_sharded" / "header.json").read_text())
    assert set(header["method_tensors"]) == {f"fisher.{name}" for name in single["fisher"]}
    # the sharded checkpoint read by one process: the whole sums
    student, _ = models()
    pruner = Pruner(student, PruningArguments(sparsity=0.8, **GRADUAL), train_dataset=dataset())
    pruner.load_state(folder)
    fisher = pruner.method.callback.fisher
    assert all(torch.equal(fisher[name], value) for name, value in sharded[0]["fisher"].items())
    # a header naming a tensor type the reader does not allocate is refused, naming the fix
    header["method_tensors"][next(iter(header["method_tensors"]))]["dtype"] = "int64"
    (folder / "pruning_state_sharded" / "header.json").write_text(json.dumps(header))
    with pytest.raises(MaskFileError, match="earlier checkpoint"):
        Pruner(models()[0], PruningArguments(sparsity=0.8, **GRADUAL), train_dataset=dataset()).load_state(folder)
    # and one naming another weight than the one it would be laid out like, or not a mapping at all
    for layout in ({"fisher.conv1.weight": {"like": "fc.weight", "dtype": "float32"}}, ["fisher.fc.weight"]):
        header["method_tensors"] = layout
        (folder / "pruning_state_sharded" / "header.json").write_text(json.dumps(header))
        with pytest.raises(MaskFileError, match="earlier checkpoint"):
            Pruner(models()[0], PruningArguments(sparsity=0.8, **GRADUAL), train_dataset=dataset()).load_state(folder)


def test_a_method_tensor_not_shaped_like_a_mask_is_refused_before_writing_shards():
    from hf_tgprune.io.serialization.pruning_state import PruningState
    from hf_tgprune.io.serialization.sharded_state import _method_tensor_layout

    masks = {"fc.weight": torch.ones(8, 48, dtype=torch.bool)}
    state = PruningState(pruning_method="gradual", target_sparsity=0.8, masks=masks)
    assert _method_tensor_layout({"fisher.fc.weight": torch.zeros(8, 48)}, state) == {
        "fisher.fc.weight": {"like": "fc.weight", "dtype": "float32"}
    }
    for key, tensor in {"fisher.fc.weight": torch.zeros(48, 8), "fisher.head.weight": torch.zeros(8, 48)}.items():
        with pytest.raises(ValueError, match="Prune the unsharded model"):
            _method_tensor_layout({key: tensor}, state)
