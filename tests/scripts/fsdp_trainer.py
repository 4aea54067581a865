"""Prune + train + save a tiny timm student through `TeacherGuidedPruningTrainer`; under several processes the student
and the teacher are sharded with FSDP2's `fully_shard` first. Each process writes its record. Used by test_fsdp.py.

python tests/scripts/fsdp_trainer.py OUT_DIR                                                   # one process
accelerate launch --multi_gpu --num_processes 2 tests/scripts/fsdp_trainer.py OUT_DIR          # two, sharded

With accelerate's FSDP2 plugin (`accelerate launch --config_file recipes/accelerate_configs/fsdp2.yaml`) the models
are given unsharded and the trainer shards them. accelerate enables its FSDP plugin on GPUs only; on a CPU this
script turns it on after accelerate has set up (the one thing it patches), so that the Trainer's FSDP code paths run
with gloo exactly as they do with NCCL.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402

from hf_tgprune import TeacherGuidedPruningConfig, TeacherGuidedPruningTrainer, mask_hash  # noqa: E402
from hf_tgprune.core.dtensor import full_state_dict_on_rank_zero, is_sharded, local  # noqa: E402
from hf_tgprune.io.serialization import read_model_state_dict  # noqa: E402
from tests.utils import RandomImages, make_model  # noqa: E402


def emulate_accelerate_fsdp_on_cpu():
    """accelerate keeps its FSDP plugin for GPU processes only; give the CPU processes the plugin that the launcher's
    FSDP_* variables describe."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    setup = Accelerator.__init__

    def init(self, *args, **kwargs):
        setup(self, *args, **kwargs)
        if self.state.distributed_type == DistributedType.MULTI_CPU:
            self.state.distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = FullyShardedDataParallelPlugin()

    Accelerator.__init__ = init


def models(sharded):
    student, teacher = make_model("timm_resnet", seed=0), make_model("hf_resnet", seed=1)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for model in (student, teacher):
            fully_shard(model)
    return student, teacher


def train_gradual(out_dir):
    """`gradual` under the FSDP2 plugin: masks updated at steps 2 and 4 of 5 from squared gradients summed on the
    shards, a checkpoint at step 3 between them, and the Trainer's resume from it finishing on the same masks."""
    args = TeacherGuidedPruningConfig(
        output_dir=os.path.join(out_dir, "gradual"),
        sparsity=0.9,
        pruning_method="gradual",
        pruning_method_args="pruning_steps=2,end_fraction=0.8",
        per_device_train_batch_size=4,
        max_steps=5,
        learning_rate=0.01,
        report_to="none",
        disable_tqdm=True,
        save_strategy="steps",
        save_steps=3,
        seed=0,
    )
    runs = {}
    for name, resume in (("gradual", None), ("gradual_resumed", os.path.join(args.output_dir, "checkpoint-3"))):
        student, teacher = models(False)
        trainer = TeacherGuidedPruningTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=RandomImages(48)
        )
        trainer.train(resume_from_checkpoint=resume)
        runs[f"{name}_hash"] = mask_hash(trainer.masks)
        runs[f"{name}_sparsity"] = trainer.pruner.report["prunable"]["sparsity"]
    with open(os.path.join(args.output_dir, "checkpoint-3", "pruning_state_sharded", "header.json")) as f:
        runs["gradual_checkpoint_tensors"] = sorted(json.load(f)["method_tensors"])
    return runs


def main(out_dir):
    plugin = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if plugin and not torch.cuda.is_available():
        emulate_accelerate_fsdp_on_cpu()
    args = TeacherGuidedPruningConfig(
        output_dir=os.path.join(out_dir, "trainer"),
        sparsity=0.9,
        pruning_method="tgp_fisher",  # 5 rounds with BatchNorm recalibration between them
        num_calibration_samples=20,  # 8 + 8 + 4
        calibration_batch_size=8,
        per_device_train_batch_size=4,
        max_steps=3,
        optim="adamw_torch",
        weight_decay=0.01,
        learning_rate=0.01,
        report_to="none",
        disable_tqdm=True,
        save_strategy="steps",
        save_steps=2,  # checkpoint-2, loaded below
        # the Trainer keeps no optimizer state for models sharded before it (it refuses to checkpoint them otherwise);
        # under accelerate's FSDP plugin it saves it per process
        save_only_model=not plugin,
        seed=0,
    )
    state = PartialState()  # set up by the arguments: the gloo process group under accelerate launch
    sharded = state.num_processes > 1
    student, teacher = models(sharded and not plugin)  # the plugin's trainer shards them itself
    trainer = TeacherGuidedPruningTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=RandomImages(48)
    )
    report = trainer.prune()
    pruned_hash = mask_hash(trainer.masks)
    trainer.train()
    params = dict(trainer.model.named_parameters())
    revived = sum(int(torch.count_nonzero(local(params[n])[~local(m)])) for n, m in trainer.masks.items())
    trainer.save_model(os.path.join(out_dir, "final"))
    # a fresh (sharded) model loads checkpoint-2: its masks (shard by shard) and its weights (rank 0 reads, every
    # process receives its rows), as load_best_model_at_end does
    checkpoint = os.path.join(args.output_dir, "checkpoint-2")
    student, teacher = models(sharded and not plugin)
    resumed = TeacherGuidedPruningTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=RandomImages(48)
    )
    sharded_at_init = all(is_sharded(p) for p in student.parameters()) and all(
        is_sharded(p) for p in teacher.parameters()
    )
    resumed.pruner.load_state(checkpoint)
    resumed._load_from_checkpoint(checkpoint)
    params = dict(resumed.model.named_parameters())
    resumed_revived = sum(int(torch.count_nonzero(local(params[n])[~local(m)])) for n, m in resumed.masks.items())
    on_disk = read_model_state_dict(checkpoint, resumed.model)
    loaded = full_state_dict_on_rank_zero(resumed.model) if sharded else resumed.model.state_dict()
    loaded_exactly = state.process_index != 0 or all(torch.equal(loaded[k], on_disk[k]) for k in on_disk)
    record = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "sharded": all(is_sharded(m) for m in trainer.masks.values()),
        "mask_hash": pruned_hash,
        "mask_hash_after_training": mask_hash(trainer.masks),
        "revived": revived,
        "prunable_sparsity": report["prunable"]["sparsity"],
        "resumed_hash": mask_hash(resumed.masks),
        "loaded_exactly": loaded_exactly,
        "resumed_revived": resumed_revived,
        "checkpoint_files": sorted(os.listdir(os.path.join(args.output_dir, "checkpoint-2"))),
        "sharded_at_init": sharded_at_init,
    }
    if plugin:  # the Trainer's own resume: weights and masks from the sparse checkpoint, optimizer state per process
        resumed.train(resume_from_checkpoint=checkpoint)
        params = dict(resumed.model.named_parameters())
        record["resume_trained_steps"] = resumed.state.global_step
        record["resume_trained_hash"] = mask_hash(resumed.masks)
        record["resume_trained_revived"] = sum(
            int(torch.count_nonzero(local(params[n])[~local(m)])) for n, m in resumed.masks.items()
        )
    if plugin:
        record.update(train_gradual(out_dir))
    with open(os.path.join(out_dir, f"rank{record['rank']}.json"), "w") as f:
        json.dump(record, f)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
