"""Rank 1 freezes before the scoring all-reduce; rank 0 must fail within `ddp_timeout` (used by test_distributed.py).

accelerate launch --multi_gpu --num_processes 2 tests/scripts/frozen_rank.py OUT_DIR TIMEOUT_SECONDS
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from hf_tgprune import TeacherGuidedPruningConfig, TeacherGuidedPruningTrainer  # noqa: E402
from tests.utils import RandomImages, make_model  # noqa: E402


def main(out_dir, timeout):
    args = TeacherGuidedPruningConfig(
        output_dir=out_dir,
        pruning_method="snip",
        retrain_with_kd=False,
        num_calibration_samples=8,
        calibration_batch_size=4,
        ddp_timeout=int(timeout),
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = TeacherGuidedPruningTrainer(model=make_model("timm_resnet"), args=args, train_dataset=RandomImages(8))
    if trainer.accelerator.process_index == 1:
        time.sleep(600)  # frozen
    trainer.prune()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
