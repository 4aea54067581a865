"""Prune + train a tiny student; each process writes its mask and weight hashes. Used by test_distributed.py.

python tests/scripts/distributed_prune.py OUT_DIR                                      # one process
accelerate launch --multi_gpu --num_processes 2 tests/scripts/distributed_prune.py OUT_DIR
"""

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

from hf_tgprune import TeacherGuidedPruningConfig, TeacherGuidedPruningTrainer, mask_hash  # noqa: E402
from tests.utils import RandomImages, make_model  # noqa: E402


def weights_hash(model):
    """Hash of the parameters (BatchNorm running statistics are per-rank buffers under DDP)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(out_dir):
    args = TeacherGuidedPruningConfig(
        output_dir=os.path.join(out_dir, "trainer"),
        sparsity=0.9,
        pruning_method="tgp_fisher",  # 5 scoring rounds with BatchNorm recalibration between them, across processes
        num_calibration_samples=20,  # 8 + 8 + 4: the last global batch is split unevenly too
        calibration_batch_size=8,
        per_device_train_batch_size=4,
        max_steps=3,
        optim="sgd",
        optim_args="momentum=0.9",
        weight_decay=0.01,
        learning_rate=0.05,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
    )
    trainer = TeacherGuidedPruningTrainer(
        model=make_model("timm_resnet", seed=0),
        teacher_model=make_model("hf_resnet", seed=1),
        args=args,
        train_dataset=RandomImages(48),
    )
    report = trainer.prune()
    pruned_mask_hash = mask_hash(trainer.masks)
    trainer.train()
    params = dict(trainer.model.named_parameters())
    zeros_ok = all(torch.count_nonzero(params[n][~m]) == 0 for n, m in trainer.masks.items())
    record = {
        "rank": trainer.accelerator.process_index,
        "world_size": trainer.accelerator.num_processes,
        "mask_hash": pruned_mask_hash,
        "mask_hash_after_training": mask_hash(trainer.masks),
        "weights_hash": weights_hash(trainer.model),
        "pruned_weights_zero": bool(zeros_ok),
        "prunable_sparsity": report["prunable"]["sparsity"],
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank{record['rank']}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1])
