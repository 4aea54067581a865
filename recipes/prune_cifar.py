#!/usr/bin/env python
"""Teacher-guided pruning of an image classifier, end to end, with `hf_tgprune`.

    accelerate launch recipes/prune_cifar.py --dataset_name ../shared/data/cifar10 --model_name_or_path resnet18 \
        --sparsities 0.9 0.95 --output_dir outputs/resnet18-tgp

Stages (each timed in results.json, each reused by `--resume_from_checkpoint True` once finished):
  1. teacher       load a trained teacher (--teacher_name_or_path), or train one and save it in <output_dir>/teacher;
  2. student       load the student; optional KD warm-up (--student_warmup_epochs) saved in <output_dir>/dense-student;
  3. scoring       one-shot methods only: tgp_fisher (train-mode BatchNorm) scores each sparsity in its own 5 rounds
                   in its prune step; one scoring round (magnitude, tgp, snip) is one pass
                   (`trainer.compute_scores()`), shared by every sparsity. The default, gradual, scores from the
                   retraining's gradients in stage 4;
  4. per sparsity  a copy of the dense student is retrained with KD and pruned: by gradual during that retraining,
                   or by a one-shot method before it (`trainer.prune(scores=...)`, then evaluated); evaluated and
                   saved in <output_dir>/sparsity-<s> (`trainer.save_model`, `trainer.push_to_hub`);
                   with --export_sparse_inference, its dense vs sparse-exported CPU latency is measured first and
                   recorded in results.json, sparsity.json and the model card;
  5. report        results.json and PNG plots.

Arguments: see --help. Everything can also come from a YAML/JSON file (`prune_cifar.py config.yaml`, or
`--config config.yaml` followed by overrides). The argument classes, the parser and the stages live in
`hf_tgprune.scripts`, to be reused by scripts of your own.
"""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # a source checkout, uninstalled

from accelerate import PartialState  # noqa: E402
from transformers import set_seed  # noqa: E402

from hf_tgprune.data import DataError  # noqa: E402
from hf_tgprune.io.models import ModelLoadError  # noqa: E402
from hf_tgprune.scripts import (  # noqa: E402
    RecipeError,
    RecipeRun,
    dense_student_stage,
    load_data_and_models,
    parse_arguments,
    report_stage,
    result_arguments,
    resume_requested,
    sparsity_sweep,
    teacher_stage,
    validate_arguments,
)


def main(argv=None) -> dict:
    model_args, data_args, recipe_args, args = parse_arguments(argv)
    state = PartialState()
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if state.is_main_process else logging.WARNING,
    )

    # everything that can be wrong fails here, before any training
    resume = resume_requested(args.resume_from_checkpoint, args.output_dir)
    sparsities = validate_arguments(model_args, data_args, recipe_args, args)
    run = RecipeRun(
        args.output_dir,
        result_arguments(model_args, data_args, recipe_args, args),
        resume=resume,
        overwrite=recipe_args.overwrite_output_dir,
        state=state,
    )
    set_seed(args.seed)
    with run.measure("load"):
        student, teacher, teacher_is_trained, data = load_data_and_models(run, model_args, data_args, args)

    if teacher is not None:
        teacher_stage(run, teacher, teacher_is_trained, model_args, args, data)
    dense_student_stage(run, student, teacher, model_args, args, data)
    sparsity_sweep(run, student, teacher, sparsities, model_args, recipe_args, args, data)
    return report_stage(run, plots=recipe_args.plots)


if __name__ == "__main__":
    try:
        main()
    except (RecipeError, DataError, ModelLoadError) as error:
        sys.exit(f"prune_cifar.py: error: {error}")
