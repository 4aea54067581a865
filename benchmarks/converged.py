"""Pruning quality on *converged* timm classifiers, CIFAR-10, on a 2-core CPU (issue 8's benchmark regime).

Stages (every stage is resumable: dense training checkpoints every epoch, pruning runs append one JSON line
each to `--out`, so a killed benchmark continues where it stopped and nothing finished is recomputed):

    python benchmarks/converged.py --stage setup      # dense teacher + student trained to a plateau (cached)
    python benchmarks/converged.py --stage main       # methods x {90, 95, 98}% table
    python benchmarks/converged.py --stage ablation   # techniques one at a time
    python benchmarks/converged.py --stage scratch    # EPSD with the dense student's from-scratch budget
    python benchmarks/converged.py --stage report     # markdown tables from the JSON lines

Protocol:

* Data: `--data` (default `../shared/data/cifar10`, the Hub layout of `uoft-cs/cifar10`: `img`/`label`,
  train/test), held in memory as uint8. A seeded, stratified 2,500-image validation split is carved from train
  (22,500 left); the test split is only used for the reported numbers. `--test-data PATH` evaluates every final
  model on another folder in the same layout too. Standard CIFAR augmentation (random crop with 4-px padding,
  horizontal flip); images are normalised with the timm model's own mean/std, 32 px.
* Models: timm `resnet50d` teacher and `resnet18` student (`--teacher` / `--student`; a 30- and a 15-epoch
  schedule, `--dense-epochs` / `--student-epochs`, so that the teacher is >= 3 points better), from random
  initialisation (no weights can be downloaded), trained with cross-entropy, SGD (momentum 0.9, nesterov,
  weight decay 5e-4), batch 128, 1 warm-up epoch then a cosine schedule over `--dense-epochs`, until the
  validation accuracy plateaus: less than 0.5 point gained over the last 5 epochs (otherwise up to 3 more
  5-epoch cosine cycles at a tenth of the learning rate are added). The trained models are saved with
  `timm.models.save_for_hf` in `--cache-dir` (outside the repository) and reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the library of this checkout, installed or not
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_utils import PassCounter, append_jsonl, load_jsonl  # noqa: E402
from torch import nn  # noqa: E402

PLATEAU_EPOCHS = 5
PLATEAU_GAIN = 0.5
MOVEMENT_FILE = "movement.safetensors"  # movement scores accumulated over a dense model's (fine-)tuning


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # shards write setup.json at the same time
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --- data ---------------------------------------------------------------------------------------------------------
def load_split_uint8(path: str, split: str, cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A split of an image-classification folder in the Hub layout as (uint8 N×3×H×W images, int64 labels)."""
    key = hashlib.sha256(f"{Path(path).resolve()}|{split}".encode()).hexdigest()[:16]
    cache = cache_dir / f"data_{key}.pt"
    if cache.exists():
        data = torch.load(cache)
        return data["x"], data["y"]
    import datasets
    import numpy as np

    raw = datasets.load_dataset(path, split=split)
    image_col = "img" if "img" in raw.column_names else "image"
    label_col = "label" if "label" in raw.column_names else "labels"
    images = np.stack([np.asarray(img.convert("RGB"), dtype=np.uint8) for img in raw[image_col]])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(raw[label_col], dtype=torch.long)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"x": x, "y": y}, cache)
    return x, y


def stratified_split(labels: torch.Tensor, num_val: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per_class = num_val // len(classes)
    val = []
    for c in classes:
        index = (labels == c).nonzero().reshape(-1)
        val.append(index[torch.randperm(len(index), generator=generator)[:per_class]])
    val = torch.cat(val).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().reshape(-1), val


def resized(split: tuple[torch.Tensor, torch.Tensor], size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images resized (bilinear) to `size` × `size`; unchanged when `size` is None or already theirs."""
    images, labels = split
    if size is None or images.shape[-1] == size:
        return images, labels
    out = torch.empty(len(images), images.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, len(images), 1000):  # in chunks: a float copy of the whole set would not be small
        chunk = F.interpolate(images[i : i + 1000].float(), size=(size, size), mode="bilinear", align_corners=False)
        out[i : i + 1000] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out, labels


def load_data(args) -> dict:
    cache = Path(args.cache_dir)
    x, y = load_split_uint8(args.data, "train", cache)
    train, val = stratified_split(y, args.val_images)
    splits = {
        "train": (x[train], y[train]),
        "val": (x[val], y[val]),
        "test": load_split_uint8(args.data, "test", cache),
    }
    if args.test_data:
        splits["extra_test"] = load_split_uint8(args.test_data, args.test_split, cache)
    return {name: resized(split, args.image_size) for name, split in splits.items()}


class Normalizer:
    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return (images_uint8.float().div_(255) - self.mean) / self.std


def normalizer_for(model: nn.Module) -> Normalizer:
    import timm

    config = timm.data.resolve_model_data_config(model)
    return Normalizer(config["mean"], config["std"])


def augmented_batches(
    images, labels, batch_size: int, generator: torch.Generator, drop_last: bool = True, pad: int = 4
):
    """Shuffled uint8 batches with random crop (zero padding `pad`) + horizontal flip."""
    size = images.shape[-1]
    padded = F.pad(images, (pad, pad, pad, pad))
    order = torch.randperm(len(labels), generator=generator)
    stop = len(order) - batch_size + 1 if drop_last else len(order)
    for i in range(0, stop, batch_size):
        index = order[i : i + batch_size]
        offsets = torch.randint(0, 2 * pad + 1, (len(index), 2), generator=generator).tolist()
        batch = torch.stack(
            [padded[j, :, dy : dy + size, dx : dx + size] for j, (dy, dx) in zip(index.tolist(), offsets)]
        )
        flip = torch.rand(len(index), generator=generator) < 0.5
        batch[flip] = batch[flip].flip(-1)
        yield batch, labels[index]


@torch.no_grad()
def evaluate(model: nn.Module, split, normalize: Normalizer, batch_size: int = 500) -> float:
    images, labels = split
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        logits = model(normalize(images[i : i + batch_size]))
        correct += int((logits.argmax(-1) == labels[i : i + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / len(labels)


# --- dense training to a plateau ------------------------------------------------------------------------------------
def plateaued(history: list[float]) -> bool:
    """Less than PLATEAU_GAIN points gained by the last PLATEAU_EPOCHS epochs over the best before them."""
    if len(history) <= PLATEAU_EPOCHS:
        return False
    return max(history[-PLATEAU_EPOCHS:]) - max(history[:-PLATEAU_EPOCHS]) < PLATEAU_GAIN


def lr_at(step: int, phases: list[tuple[int, float]], steps_per_epoch: int, warmup_steps: int | None = None) -> float:
    """Learning rate at `step`: phase 0 = a linear warm-up (`warmup_steps`, default one epoch) then cosine; later
    phases are cosine cycles."""
    for index, (epochs, peak) in enumerate(phases):
        total = epochs * steps_per_epoch
        if step < total:
            warmup = (steps_per_epoch if warmup_steps is None else warmup_steps) if index == 0 else 0
            if step < warmup:
                return peak * (step + 1) / warmup
            return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        step -= total
    return 0.0


@dataclasses.dataclass
class DenseSchedule:
    """How a dense network is trained (or fine-tuned): SGD (momentum 0.9, nesterov), warm-up then cosine."""

    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    warmup_steps: int | None = None  # None: one epoch
    max_grad_norm: float | None = None  # None / 0: no gradient clipping
    to_plateau: bool = True  # extend by cosine cycles at lr / 10 until the validation accuracy plateaus
    max_extensions: int = 3
    pad: int = 4  # random-crop padding (pixels)
    movement: bool = False  # accumulate movement scores (−Σ θ·g, hf_tgprune MovementScores) into movement.safetensors


def train_dense(args, role: str, architecture: str, splits) -> Path:
    """Train `architecture` from scratch until validation accuracy plateaus; checkpoint every epoch (resumable)."""
    import timm

    epochs = args.student_epochs if role == "student" and args.student_epochs else args.dense_epochs
    folder = Path(args.cache_dir) / f"dense-{role}-{architecture}-e{epochs}"
    schedule = DenseSchedule(
        epochs=epochs,
        lr=args.dense_lr,
        weight_decay=args.dense_weight_decay,
        batch_size=args.batch_size,
        max_extensions=args.max_extensions,
        pad=args.crop_padding,
    )
    torch.manual_seed(0)
    return fit_dense(
        folder, role, architecture, lambda: timm.create_model(architecture, num_classes=10), splits, schedule
    )


def fit_dense(folder: Path, role: str, architecture: str, build, splits, schedule: DenseSchedule) -> Path:
    """Train `build()` with `schedule` (to a plateau unless told otherwise) into `folder`, checkpointing every epoch so
    that a killed run resumes where it stopped; the finished model is saved with `timm.models.save_for_hf` beside
    `training.json` (its record: epochs, validation history, wall time, accuracies). Returns `folder`."""
    from timm.models import save_for_hf

    record_path = folder / "training.json"
    if record_path.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / "state.pt"
    model = build()
    normalize = normalizer_for(model)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=schedule.lr, momentum=0.9, nesterov=True, weight_decay=schedule.weight_decay
    )
    generator = torch.Generator().manual_seed(0)
    train_x, train_y = splits["train"]
    steps_per_epoch = len(train_y) // schedule.batch_size
    state = {"epoch": 0, "step": 0, "val": [], "seconds": 0.0, "phases": [(schedule.epochs, schedule.lr)]}
    state["clipped_steps"] = 0
    movement = None
    if schedule.movement:
        from hf_tgprune.methods.movement import MovementScores

        movement = MovementScores(model)
    if state_path.exists():
        saved = torch.load(state_path, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        state = saved["state"]
        if movement is not None:
            movement.scores, movement.steps = saved["movement"], state["step"]
        log(f"{role} {architecture}: resuming after epoch {state['epoch']}")
    log(f"{role} {architecture}: {sum(p.numel() for p in model.parameters()):,} parameters")
    clip = schedule.max_grad_norm or None
    while True:
        planned = sum(epochs for epochs, _ in state["phases"])
        if state["epoch"] >= planned:
            if not schedule.to_plateau or plateaued(state["val"]) or len(state["phases"]) > schedule.max_extensions:
                break
            state["phases"].append((PLATEAU_EPOCHS, schedule.lr * 0.1))
            log(f"{role}: not yet at a plateau ({state['val'][-6:]}); {PLATEAU_EPOCHS} more epochs")
            continue
        start = time.perf_counter()
        model.train()
        total_loss = 0.0
        batches = augmented_batches(train_x, train_y, schedule.batch_size, generator, pad=schedule.pad)
        for images, labels in batches:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state["step"], state["phases"], steps_per_epoch, schedule.warmup_steps)
            loss = F.cross_entropy(model(normalize(images)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:  # as TrainingArguments.max_grad_norm does: rescale when the norm is larger
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                state["clipped_steps"] += int(norm > clip)
            if movement is not None:
                movement.accumulate()
            optimizer.step()
            state["step"] += 1
            total_loss += loss.item()
        state["epoch"] += 1
        state["val"].append(evaluate(model, splits["val"], normalize))
        state["seconds"] += time.perf_counter() - start
        atomic_torch_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "state": state,
                "movement": None if movement is None else movement.scores,
            },
            state_path,
        )
        log(
            f"{role} epoch {state['epoch']}/{planned}: loss {total_loss / steps_per_epoch:.3f} "
            f"val {state['val'][-1]:.2f} ({state['seconds']:.0f} s so far)"
        )
    model.eval()
    save_for_hf(model, str(folder), safe_serialization=True)
    if movement is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in movement.scores.items()}, str(folder / MOVEMENT_FILE))
    record = {
        "role": role,
        "architecture": architecture,
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": state["epoch"],
        "plateaued": plateaued(state["val"]),
        "val_history": state["val"],
        "seconds": state["seconds"],
        "train_images_per_epoch": steps_per_epoch * schedule.batch_size,
        "schedule": dataclasses.asdict(schedule),
        "steps": state["step"],
        "clipped_steps": state.get("clipped_steps", 0),
        "val_top1": state["val"][-1],
        "test_top1": evaluate(model, splits["test"], normalize),
    }
    if "extra_test" in splits:
        record["extra_test_top1"] = evaluate(model, splits["extra_test"], normalize)
    atomic_write_text(record_path, json.dumps(record, indent=1))
    state_path.unlink()
    log(
        f"{role} {architecture}: val {record['val_top1']:.2f} test {record['test_top1']:.2f}, {record['epochs']} epochs"
    )
    return folder


def load_dense(folder: Path) -> tuple[nn.Module, dict]:
    import timm

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    return model, json.loads((folder / "training.json").read_text())


def git_commit() -> str | None:
    """The checkout's commit (with "+dirty" when it has uncommitted changes outside `benchmarks/results/`, which the
    benchmarks themselves write), recorded with every run."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(status, cwd=root, capture_output=True)
    except OSError:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None


def dense_fingerprints(info: dict) -> dict:
    """The first 16 hex digits of the SHA-256 of each dense role's weights file: a teacher or student fine-tuned again
    with the same command (on another machine, another torch) gets another fingerprint, so that the report can keep
    its runs apart from those of the setup it shows."""
    prints = {}
    for role in ("teacher", "student"):
        digest = hashlib.sha256()
        with open(Path(info[f"{role}_dir"]) / "model.safetensors", "rb") as weights:
            for block in iter(lambda: weights.read(1 << 20), b""):
                digest.update(block)
        prints[role] = digest.hexdigest()[:16]
    return prints


def machine_description(args) -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}"


def setup(args, splits) -> dict | None:
    """Train (or reuse) the dense teacher and student; with `--roles`, only those (e.g. one per process)."""
    folders = {}
    for role, architecture in (("teacher", args.teacher), ("student", args.student)):
        if role in args.roles:
            folders[role] = train_dense(args, role, architecture, splits)
    if len(folders) < 2:
        return None
    teacher, student = folders["teacher"], folders["student"]
    info = {
        "teacher": json.loads((teacher / "training.json").read_text()),
        "student": json.loads((student / "training.json").read_text()),
        "teacher_dir": str(teacher),
        "student_dir": str(student),
        "machine": machine_description(args),
        "torch": torch.__version__,
        "commit": git_commit(),
    }
    gap = info["teacher"]["val_top1"] - info["student"]["val_top1"]
    log(
        f"setup done: teacher val {info['teacher']['val_top1']:.2f}, student val {info['student']['val_top1']:.2f} "
        f"(gap {gap:.2f})"
    )
    if gap < 3.0:
        log("WARNING: the teacher is less than 3 points better than the student; choose a larger --teacher")
    return info


# --- one pruning run -----------------------------------------------------------------------------------------------
class TensorImages(torch.utils.data.Dataset):
    """uint8 images in memory -> {"pixel_values", "labels"}; with `augment`: random crop (zero padding `pad`) + flip."""

    def __init__(self, images, labels, normalize: Normalizer, augment: bool = False, pad: int = 4):
        self.labels = labels
        self.normalize = normalize
        self.augment = augment
        self.pad = pad
        self.size = images.shape[-1]
        self.images = F.pad(images, (pad, pad, pad, pad)) if augment else images

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        if self.augment:
            dx, dy = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            image = image[:, dy : dy + self.size, dx : dx + self.size]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return {"pixel_values": self.normalize(image[None])[0], "labels": self.labels[i]}


# Variants: name -> (pruning_method, config overrides). One scoring round and eval-mode BatchNorm while scoring unless
# named; library defaults otherwise (at the commit that ran them).
VARIANTS = {
    "magnitude": ("magnitude", {}),
    "snip": ("snip", {}),
    "tgp": ("tgp", {}),
    "tgp_fisher": ("tgp_fisher", {}),
    "tgp rounds=5": ("tgp", {"pruning_rounds": 5}),
    "tgp lamp": ("tgp", {"layer_allocation": "lamp", "layer_density_floor": 0.0}),
    "tgp authors' scoring": (
        "tgp",
        {"scoring_bn_mode": "train", "scoring_epochs": 3, "calibration_batch_size": 128},
    ),
    "epsd": ("epsd", {}),
    "dg2pf": ("dg2pf", {}),
    "imp": ("imp", {}),
    # ablation-only variants
    "tgp no BN recalibration": ("tgp", {"recalibrate_bn": False}),
    "tgp CE retraining": ("tgp", {"retrain_with_kd": False}),
    "magnitude CE retraining": ("magnitude", {"retrain_with_kd": False}),
    "tgp no layer guard": ("tgp", {"layer_density_floor": 0.0}),
    "magnitude no layer guard": ("magnitude", {"layer_density_floor": 0.0}),
    "snip no layer guard": ("snip", {"layer_density_floor": 0.0}),
    "tgp_fisher no layer guard": ("tgp_fisher", {"layer_density_floor": 0.0}),
    "tgp rounds=5 no layer guard": ("tgp", {"layer_density_floor": 0.0, "pruning_rounds": 5}),
    "tgp_fisher rounds=5 no layer guard": ("tgp_fisher", {"layer_density_floor": 0.0, "pruning_rounds": 5}),
    "magnitude lamp": ("magnitude", {"layer_allocation": "lamp", "layer_density_floor": 0.0}),
    "snip lamp": ("snip", {"layer_allocation": "lamp", "layer_density_floor": 0.0}),
    "tgp magnitude allocation": ("tgp", {"layer_allocation": "magnitude"}),
    "tgp lamp_magnitude allocation": ("tgp", {"layer_allocation": "lamp_magnitude", "layer_density_floor": 0.0}),
    "tgp_fisher lamp": ("tgp_fisher", {"layer_allocation": "lamp", "layer_density_floor": 0.0}),
    "tgp_fisher lamp_magnitude allocation": (
        "tgp_fisher",
        {"layer_allocation": "lamp_magnitude", "layer_density_floor": 0.0},
    ),
    "tgp_fisher rounds=5": ("tgp_fisher", {"pruning_rounds": 5}),
    "tgp lamp rounds=5": ("tgp", {"layer_allocation": "lamp", "layer_density_floor": 0.0, "pruning_rounds": 5}),
    # screening of the scoring sample for the best teacher-guided configuration
    "tgp_fisher rounds=5 batch 8": ("tgp_fisher", {"pruning_rounds": 5, "calibration_batch_size": 8}),
    "tgp_fisher rounds=5 4096 images": ("tgp_fisher", {"pruning_rounds": 5, "num_calibration_samples": 4096}),
    "tgp_fisher rounds=20": ("tgp_fisher", {"pruning_rounds": 20}),
    "tgp_fisher rounds=5 magnitude allocation": ("tgp_fisher", {"pruning_rounds": 5, "layer_allocation": "magnitude"}),
    "tgp_fisher train-mode BN": ("tgp_fisher", {"scoring_bn_mode": "train"}),
    "tgp_fisher rounds=5 train-mode BN": ("tgp_fisher", {"pruning_rounds": 5, "scoring_bn_mode": "train"}),
    # the one-shot default (tgp_fisher) scoring on half the calibration images: a third of IMP's images in transfer
    "tgp_fisher rounds=5 train-mode BN 512 images": (
        "tgp_fisher",
        {"pruning_rounds": 5, "scoring_bn_mode": "train", "num_calibration_samples": 512},
    ),
    # one round fewer: with the teacher's logits reused across rounds, under a third of IMP's images in transfer
    "tgp_fisher rounds=4 train-mode BN": ("tgp_fisher", {"pruning_rounds": 4, "scoring_bn_mode": "train"}),
    # what a user without a teacher gets: the Fisher of the cross-entropy (alpha=0) and CE retraining
    "tgp_fisher rounds=5 no teacher": (
        "tgp_fisher",
        {"pruning_rounds": 5, "alpha": 0.0, "retrain_with_kd": False},
    ),
    # the library's default scoring (train-mode BatchNorm) without a teacher: prunes with no teacher at hand
    "tgp_fisher rounds=5 train-mode BN no teacher": (
        "tgp_fisher",
        {"pruning_rounds": 5, "scoring_bn_mode": "train", "alpha": 0.0, "retrain_with_kd": False},
    ),
    # signed criteria, compared inside each layer (magnitude allocation, their default)
    "tgp_taylor": ("tgp_taylor", {}),
    "movement": ("movement", {}),
    # tgp_fisher with another retraining learning rate (the benchmarks' --retrain-lr, the recipe's: 0.01)
    **{
        f"tgp_fisher rounds=5 train-mode BN lr={lr:g}": (
            "tgp_fisher",
            {"pruning_rounds": 5, "scoring_bn_mode": "train", "learning_rate": lr},
        )
        for lr in (0.003, 0.03, 0.1)
    },
    **{f"magnitude lr={lr:g}": ("magnitude", {"learning_rate": lr}) for lr in (0.03, 0.1)},
    # gradual pruning during the KD retraining (cubic schedule, 10 updates unless named), Fisher of the training loss
    # unless named; "gradual" spreads the updates over half of training, the others say over how much
    "gradual": ("gradual", {"pruning_method_args": {"end_fraction": 0.5}}),
    "gradual end=0.75": ("gradual", {"pruning_method_args": {"end_fraction": 0.75}}),
    "gradual end=0.3": ("gradual", {"pruning_method_args": {"end_fraction": 0.3}}),
    "gradual magnitude": ("gradual", {"pruning_method_args": {"criterion": "magnitude"}}),
    "gradual end=0.15": ("gradual", {"pruning_method_args": {"end_fraction": 0.15}}),
    "gradual end=0.3 lr=0.03": ("gradual", {"pruning_method_args": {"end_fraction": 0.3}, "learning_rate": 0.03}),
    # the same images in twice the optimizer steps (compute counted in images is unchanged)
    "gradual end=0.3 batch=32": (
        "gradual",
        {"pruning_method_args": {"end_fraction": 0.3}, "per_device_train_batch_size": 32},
    ),
    # retraining with TrainingArguments' default gradient clipping, against a run without it (transfer.py)
    "magnitude clip=1": ("magnitude", {"max_grad_norm": 1.0}),
    "tgp_fisher rounds=5 clip=1": ("tgp_fisher", {"pruning_rounds": 5, "max_grad_norm": 1.0}),
}
MAIN_VARIANTS = [
    "magnitude", "tgp", "tgp_fisher", "tgp rounds=5", "imp", "snip", "dg2pf", "tgp_fisher rounds=5", "epsd",
    "tgp lamp", "tgp authors' scoring",
]  # fmt: skip
ABLATION_VARIANTS = [
    "tgp", "magnitude", "snip", "tgp no BN recalibration", "tgp CE retraining", "magnitude CE retraining",
    "tgp no layer guard", "tgp lamp", "magnitude lamp", "snip lamp", "tgp magnitude allocation",
    "tgp lamp_magnitude allocation", "tgp_fisher", "tgp_fisher lamp", "tgp_fisher lamp_magnitude allocation",
    "tgp rounds=5", "tgp_fisher rounds=5", "tgp lamp rounds=5", "tgp authors' scoring",
]  # fmt: skip
# the one-shot default, the reference, the paper's criterion
LONG_VARIANTS = ["tgp_fisher rounds=5", "magnitude", "tgp"]
SPARSITIES = (0.90, 0.95, 0.98)
RECORDED_FIELDS = (
    "layer_density_floor", "min_layer_density", "layer_allocation", "pruning_rounds", "num_calibration_samples",
    "calibration_batch_size", "scoring_epochs", "scoring_bn_mode", "retrain_with_kd", "alpha", "temperature",
    "max_grad_norm", "recalibration_samples", "learning_rate",
)  # fmt: skip


def variant_settings(variant: str) -> tuple[str, dict]:
    """(pruning_method, config overrides) of a variant. A variant names its rounds (the library default is per method)
    and its BatchNorm mode while scoring (eval unless named "train-mode BN"), so that a name means what it measured
    whatever the library's defaults become."""
    method, overrides = VARIANTS[variant]
    return method, {"pruning_rounds": 1, "scoring_bn_mode": "eval", **overrides}


def run_one(args, splits, info, variant: str, sparsity: float, seed: int, retrain_epochs: int) -> dict:
    """Prune the converged student with `variant`, retrain it, evaluate it, save it; returns the run's record."""
    import timm

    from hf_tgprune import TeacherGuidedPruningConfig, TeacherGuidedPruningTrainer

    method, overrides = variant_settings(variant)
    scratch = args.stage == "scratch"  # the dense student's own budget: every training image, its lr and decay
    torch.manual_seed(seed)
    teacher, _ = load_dense(Path(info["teacher_dir"]))
    if method == "epsd":  # EPSD prunes early: a freshly initialised student, no dense training
        student = timm.create_model(info["student"]["architecture"], num_classes=10)
    else:
        student, _ = load_dense(Path(info["student_dir"]))
    student.train()
    normalize = normalizer_for(student)
    subset = torch.randperm(len(splits["train"][1]), generator=torch.Generator().manual_seed(1234))
    subset = subset if scratch else subset[: args.retrain_images]
    train_set = TensorImages(
        splits["train"][0][subset], splits["train"][1][subset], normalize, augment=True, pad=args.crop_padding
    )
    calibration = TensorImages(*splits["train"], normalize, augment=False)
    epochs, extra = retrain_epochs, {}
    if method == "dg2pf":
        epochs += args.dg2pf_epochs
        extra = dict(pruning_method_args={"gradual_pruning_epochs": args.dg2pf_epochs})
    elif method == "imp":
        epochs += args.imp_rounds - 1
        extra = dict(pruning_method_args={"rounds": args.imp_rounds, "epochs_per_round": 1})
    elif method == "epsd":  # the warm-up steps run before the retraining epochs, in the same Trainer run
        steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
        extra = dict(
            pruning_method_args={"warmup_steps": args.epsd_warmup_steps},
            max_steps=args.epsd_warmup_steps + retrain_epochs * steps_per_epoch,
        )
    uses_teacher = method not in ("epsd", "dg2pf")
    recalibrate = overrides.pop("recalibrate_bn", True)
    key = f"{variant}|{sparsity}|{seed}|e{retrain_epochs}"
    output_dir = Path(args.cache_dir) / "trainer"
    # hours of training: checkpointed every epoch, and resumed from the newest checkpoint
    checkpointed = scratch or args.stage == "long"
    if checkpointed:
        # one folder per results folder and dense weights: never resumed from a checkpoint of other networks
        weights = "-".join(info["dense_sha256"][role] for role in ("teacher", "student"))
        output_dir = output_dir.with_name(f"trainer-{args.stage}") / Path(args.out).name / weights
        output_dir = output_dir / model_dir(args, info, key).name
        extra.update(save_strategy="epoch", save_total_limit=1)
    if scratch:
        extra.update(
            warmup_steps=math.ceil(len(train_set) / args.batch_size),  # one epoch, as the dense schedule
            weight_decay=args.dense_weight_decay,
            optim_args="momentum=0.9,nesterov=True",
            max_grad_norm=0.0,  # the dense schedule does not clip
        )
    resume = checkpointed and any(output_dir.glob("checkpoint-*/trainer_state.json"))
    config = dict(
        output_dir=str(output_dir),
        sparsity=sparsity,
        pruning_method=method,
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=epochs,
        learning_rate=args.dense_lr if scratch else args.retrain_lr,
        lr_scheduler_type="cosine",
        optim="sgd",
        optim_args="momentum=0.9",
        weight_decay=0.0,
        retrain_with_kd=uses_teacher,
        recalibrate_bn=False,  # done below, so that accuracy right after pruning is read with and without it
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=seed,
        dataloader_num_workers=0,
        max_grad_norm=args.max_grad_norm,
    )
    config.update(extra)
    config.update(overrides)
    trainer = TeacherGuidedPruningTrainer(
        model=student,
        teacher_model=teacher if uses_teacher else None,
        args=TeacherGuidedPruningConfig(**config),
        train_dataset=train_set,
        calibration_dataset=calibration,
    )
    counter = PassCounter()
    handles = [counter.attach(student)] + ([counter.attach(teacher)] if uses_teacher else [])
    start = time.perf_counter()
    scores = None
    if method == "movement":  # accumulated over the student's own fine-tuning (no scoring pass)
        from safetensors.torch import load_file

        scores = load_file(str(Path(info["student_dir"]) / MOVEMENT_FILE))
    if not resume:  # a resumed run takes its masks from the checkpoint
        trainer.prune(scores=scores)
    # the others prune during training: no single "right after pruning" point (nor for a run resumed after it)
    one_shot = trainer.method.one_shot and not resume
    after = {}
    if one_shot:
        counter.enabled = False
        after["after_prune_val_top1"] = evaluate(student, splits["val"], normalize)
        after["after_prune_test_top1"] = evaluate(student, splits["test"], normalize)
        counter.enabled = True
    if recalibrate and one_shot:
        trainer.recalibrate_batchnorm()
        counter.enabled = False
        after["after_prune_recal_val_top1"] = evaluate(student, splits["val"], normalize)
        after["after_prune_recal_test_top1"] = evaluate(student, splits["test"], normalize)
        counter.enabled = True
    prune_seconds = time.perf_counter() - start
    prune_forward, prune_backward = counter.forward, counter.backward
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume else None)
    train_seconds = time.perf_counter() - start
    for handle in handles:
        handle.remove()
    masks = trainer.masks
    params = dict(student.named_parameters())
    zeros = sum(int((params[n].detach()[~m] == 0).sum()) for n, m in masks.items())
    pruned = sum(int((~m).sum()) for m in masks.values())
    numel = sum(m.numel() for m in masks.values())
    assert pruned == round(sparsity * numel) and zeros == pruned, (variant, pruned, zeros, numel)
    saved = model_dir(args, info, key)
    trainer.save_model(str(saved))
    record = {
        "key": key,
        "variant": variant,
        "method": method,
        "overrides": overrides,
        "recalibrate_bn": recalibrate,
        "sparsity": sparsity,
        "seed": seed,
        "retrain_epochs": retrain_epochs,
        "epochs": epochs,
        "val_top1": evaluate(student, splits["val"], normalize),
        "test_top1": evaluate(student, splits["test"], normalize),
        **after,
        "prunable_sparsity": pruned / numel,
        "total_sparsity": trainer.pruning_report["total"]["sparsity"],
        "prune_seconds": prune_seconds,
        "train_seconds": train_seconds,
        "seconds": prune_seconds + train_seconds,
        "prune_forward_images": prune_forward,
        "prune_backward_images": prune_backward,
        "forward_images": counter.forward,
        "backward_images": counter.backward,
        "saved_model": str(saved),
        "config": {k: getattr(trainer.args, k) for k in RECORDED_FIELDS},  # effective, defaults included
        "commit": info.get("commit"),
        "dense_sha256": {
            "teacher": info["dense_sha256"]["teacher"] if uses_teacher else None,
            "student": None if method == "epsd" else info["dense_sha256"]["student"],
        },
        "teacher": info["teacher"]["architecture"] if uses_teacher else None,
        "student": info["student"]["architecture"] if method == "epsd" else Path(info["student_dir"]).name,
    }
    if checkpointed:  # a resumed run's times and image counts cover its last part only
        record["resumed"] = bool(resume)
    record["train_images"] = len(train_set)  # retraining images per epoch (every training image for scratch)
    if scratch:
        record["learning_rate"] = args.dense_lr
    if "extra_test" in splits:
        record["extra_test_top1"] = evaluate(student, splits["extra_test"], normalize)
    return record


def model_dir(args, info, key: str) -> Path:
    """Where a run's final model is saved: one folder per results folder, teacher/student pair and run key, so that
    runs of another stage, pair or `--out` never overwrite it."""
    pair = f"{info['teacher']['architecture']}-{Path(info['student_dir']).name}"
    name = key.replace("|", "_").replace(" ", "-").replace("'", "")
    return Path(args.cache_dir) / "models" / Path(args.out).name / pair / name


def planned_runs(args) -> list[tuple[str, float, int, int]]:
    """(variant, sparsity, seed, retrain epochs) of the stage, in the order they run."""
    if args.stage == "ablation":
        return [(v, s, 0, args.retrain_epochs) for s in args.ablation_sparsities for v in args.variants]
    if args.stage == "scratch":  # as long as the dense student trained (`run_stage` sets `scratch_epochs`)
        return [(v, s, 0, args.scratch_epochs) for s in args.ablation_sparsities for v in args.variants]
    if args.stage == "long":  # seed by seed as well
        return [(v, 0.98, seed, args.long_epochs) for seed in range(args.long_seeds) for v in args.variants]
    runs = []  # seed by seed, so that a stage stopped early leaves whole tables of the first seeds
    for seed in range(args.seeds):
        for sparsity in SPARSITIES if seed == 0 else SPARSITIES[1:]:  # one seed at 90%
            runs += [(v, sparsity, seed, args.retrain_epochs) for v in args.variants]
    return runs


def parse_shard(shard: str) -> tuple[int, int]:
    """`"I/N"` -> (I, N) with 0 <= I < N; ValueError otherwise."""
    index, count = (int(part) for part in shard.split("/"))
    if not 0 <= index < count:
        raise ValueError(shard)
    return index, count


def shard_of(runs: list, shard: str) -> list:
    """Runs `i::n` of the plan for `--shard i/n` (n processes run disjoint shards into the same `runs.jsonl`)."""
    index, count = parse_shard(shard)
    return runs[index::count]


def run_stage(args, splits, info) -> None:
    out = Path(args.out)
    path = out / "runs.jsonl"
    done = {r["key"] for r in load_jsonl(path)}
    args.scratch_epochs = info["student"]["epochs"]
    for variant, sparsity, seed, epochs in shard_of(planned_runs(args), args.shard):
        key = f"{variant}|{sparsity}|{seed}|e{epochs}"
        if key in done:
            continue
        record = run_one(args, splits, info, variant, sparsity, seed, epochs)
        append_jsonl(path, record)
        log(
            f"{variant:36s} {sparsity:.2f} seed {seed} e{epochs}: val {record['val_top1']:.2f} "
            f"test {record['test_top1']:.2f} (after prune {record.get('after_prune_test_top1')}, recal "
            f"{record.get('after_prune_recal_test_top1')}) {record['seconds']:.0f} s"
        )


# --- main ----------------------------------------------------------------------------------------------------------
def build_parser(description: str) -> argparse.ArgumentParser:
    """The benchmark's options (other regimes, e.g. `transfer.py`, change their defaults and add their own)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--stage", default="setup", choices=["setup", "main", "ablation", "long", "scratch", "report"])
    parser.add_argument(
        "--variants", nargs="+", default=None, help=f"default: the stage's list; any of {list(VARIANTS)}"
    )
    parser.add_argument("--ablation-sparsities", nargs="+", type=float, default=[0.95, 0.98])
    parser.add_argument("--seeds", type=int, default=3, help="seeds at 95%% and 98%% (one at 90%%)")
    parser.add_argument("--retrain-images", type=int, default=12000)
    parser.add_argument("--retrain-epochs", type=int, default=2)
    parser.add_argument("--long-epochs", type=int, default=10)
    parser.add_argument("--long-seeds", type=int, default=3, help="seeds of --stage long (at 98%%)")
    parser.add_argument("--retrain-lr", type=float, default=0.01)
    parser.add_argument("--epsd-warmup-steps", type=int, default=100)
    parser.add_argument("--dg2pf-epochs", type=int, default=2)
    parser.add_argument("--imp-rounds", type=int, default=6)
    parser.add_argument("--smoke", action="store_true", help="tiny everything, to check the script end to end")
    parser.add_argument("--data", default="../shared/data/cifar10", help="dataset folder (Hub layout) to train on")
    parser.add_argument("--test-data", default=None, help="another dataset folder in the same layout to test on")
    parser.add_argument("--test-split", default="test", help="split of --test-data to evaluate")
    parser.add_argument("--out", default="benchmarks/results/converged")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/hf_tgprune_bench/converged"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--shard",
        default="0/1",
        help="I/N: run every N-th planned run starting at I, to split a stage over N processes (one per core)",
    )
    parser.add_argument("--teacher", default="resnet50d")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--val-images", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dense-epochs", type=int, default=30, help="length of the dense cosine schedule")
    parser.add_argument(
        "--student-epochs",
        type=int,
        default=15,
        help="the student's own schedule length (0: --dense-epochs); shorter, so that it plateaus >= 3 points "
        "below the teacher at 32 px",
    )
    parser.add_argument("--dense-lr", type=float, default=0.1)
    parser.add_argument("--dense-weight-decay", type=float, default=5e-4)
    parser.add_argument("--max-extensions", type=int, default=3)
    parser.add_argument(
        "--roles", nargs="+", default=["teacher", "student"], help="train only these dense models (e.g. in parallel)"
    )
    parser.add_argument("--image-size", type=int, default=None, help="resize every image to this size (default: 32)")
    parser.add_argument("--crop-padding", type=int, default=4, help="random-crop padding of training images (pixels)")
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        default=1.0,
        help="gradient clipping of the pruned model's retraining (TrainingArguments.max_grad_norm; 0: none)",
    )
    return parser


def parse_args(argv=None):
    return finish_args(build_parser(__doc__.split("\n")[0]), argv)


def finish_args(parser: argparse.ArgumentParser, argv=None, stage_variants=None) -> argparse.Namespace:
    """Parse and check `argv`; `stage_variants` maps a stage to its default variants (else this regime's lists);
    `--smoke` shrinks everything."""
    args = parser.parse_args(argv)
    if args.variants is None:
        stage_variants = stage_variants or {
            "ablation": ABLATION_VARIANTS,
            "long": LONG_VARIANTS,
            "main": MAIN_VARIANTS,
            "scratch": ["epsd"],
        }
        args.variants = stage_variants.get(args.stage, stage_variants["main"])
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown --variants {unknown}; choose from {list(VARIANTS)}")
    try:
        parse_shard(args.shard)
    except ValueError:
        parser.error(f"--shard must be I/N with 0 <= I < N (e.g. 0/2 and 1/2 for two processes), got {args.shard!r}")
    if args.smoke:
        args.cache_dir += "_smoke"
        args.out = str(Path(args.cache_dir) / "results")
        args.dense_epochs, args.student_epochs, args.max_extensions, args.seeds = 1, 0, 0, 1
        args.retrain_images = min(args.retrain_images, 256)
        args.epsd_warmup_steps, args.imp_rounds, args.long_epochs, args.long_seeds = 2, 2, 1, 1
    return args


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.2f} ± {std:.2f}"


def _runs(records, variant, sparsity, epochs, seed=None):
    return [
        r
        for r in records
        if r["variant"] == variant
        and abs(r["sparsity"] - sparsity) < 1e-9
        and r["retrain_epochs"] == epochs
        and (seed is None or r["seed"] == seed)
    ]


def _mean(values) -> float:
    return sum(values) / len(values)


def _paired_deltas(records, variant, sparsity, epochs, reference="magnitude", key="test_top1") -> list[float]:
    """Top-1 (`key`) of `variant` minus `reference`, seed by seed (seeds both ran, with `key`), in seed order."""
    ours = {r["seed"]: r[key] for r in _runs(records, variant, sparsity, epochs) if key in r}
    base = {r["seed"]: r[key] for r in _runs(records, reference, sparsity, epochs) if key in r}
    return [ours[seed] - base[seed] for seed in sorted(ours.keys() & base.keys())]


def heldout_table(records, variants, epochs) -> list[str]:
    """Top-1 on the `--test-data` set (what decisions are made on) after retraining, with the paired Δ against
    `magnitude`, and the 1,000-image test split beside it; empty when no record has a held-out figure."""
    key = "extra_test_top1"
    if not any(key in r for r in records):
        return []
    lines = [
        f"Held-out top-1 (%) on the `--test-data` set after {epochs} retraining epochs (mean ± std over seeds; Δ "
        "against `magnitude`, mean of the per-seed differences, with the per-seed values), and the 1,000-image test "
        "split beside it:",
        "",
        "| method | "
        + " | ".join(f"{int(round(s * 100))}% held-out | Δ magnitude" for s in SPARSITIES)
        + " | 1k test 90 / 95 / 98% |",
        "|---|" + "---|---|" * len(SPARSITIES) + "---|",
    ]
    for variant in variants:
        cells = []
        for sparsity in SPARSITIES:
            runs = [r for r in _runs(records, variant, sparsity, epochs) if key in r]
            deltas = _paired_deltas(records, variant, sparsity, epochs, key=key) if variant != "magnitude" else []
            delta = f"{_mean(deltas):+.2f} ({', '.join(f'{d:+.1f}' for d in deltas)})" if deltas else "—"
            cells += [f"**{_mean_std([r[key] for r in runs])}** (n={len(runs)})" if runs else "—", delta]
        test = " / ".join(_mean_std([r["test_top1"] for r in _runs(records, variant, s, epochs)]) for s in SPARSITIES)
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {test} |")
    return lines + [""]


def goal_check(records, variants, epochs) -> list[str]:
    """Issue 8's goal, per teacher-guided variant: Δ test top-1 against `magnitude` (paired by seed; met when the mean
    is >= 1 point and every seed gains) at 95/98%, and accuracy and compute (images through forward + backward passes,
    wall time) against `imp`."""

    def floor(variant):  # the effective guard (records before `config` was recorded: the override, if any)
        runs = [r for r in records if r["variant"] == variant]
        return {
            r.get("config", {}).get("layer_density_floor", r.get("overrides", {}).get("layer_density_floor"))
            for r in runs
        }

    if "magnitude" not in variants:
        return []
    # compared with `magnitude` only under the same layer guard: the guard alone moves accuracy by 2-3 points
    magnitude_floor = floor("magnitude")
    guided = [
        v
        for v in variants
        if VARIANTS[v][0] in ("tgp", "tgp_fisher")
        and VARIANTS[v][1].get("retrain_with_kd", True)
        and floor(v) == magnitude_floor
    ]
    if not guided:
        return []
    lines = [
        "Goal check (test top-1, paired by seed): Δ against `magnitude` with the same KD retraining (met: mean >= 1 "
        "point and every seed better), and against `imp` with the compute ratio (forward + backward images; wall time).",
        "",
        "| variant | 95% Δ magnitude (per seed) | met | 98% Δ magnitude (per seed) | met | Δ imp 90/95/98% | "
        "compute / imp (images; wall) |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in guided:
        cells = []
        for sparsity in (0.95, 0.98):
            deltas = _paired_deltas(records, variant, sparsity, epochs)
            if not deltas:
                cells += ["—", "—"]
                continue
            per_seed = ", ".join(f"{d:+.1f}" for d in deltas)
            met = "yes" if _mean(deltas) >= 1.0 and min(deltas) > 0 else "no"
            met = met if len(deltas) > 1 else "one seed"
            cells += [f"{_mean(deltas):+.2f} ({per_seed})", f"{met} (n={len(deltas)})"]
        imp_cells, ratio = [], "—"
        for sparsity in SPARSITIES:
            ours = [r["test_top1"] for r in _runs(records, variant, sparsity, epochs)]
            imp = [r["test_top1"] for r in _runs(records, "imp", sparsity, epochs)]
            imp_cells.append(f"{_mean(ours) - _mean(imp):+.2f}" if ours and imp else "—")
        ours_runs = [r for r in records if r["variant"] == variant and r["retrain_epochs"] == epochs]
        imp_runs = [r for r in records if r["variant"] == "imp" and r["retrain_epochs"] == epochs]
        if ours_runs and imp_runs:
            images = _mean([r["forward_images"] + r["backward_images"] for r in ours_runs]) / _mean(
                [r["forward_images"] + r["backward_images"] for r in imp_runs]
            )
            wall = _mean([r["seconds"] for r in ours_runs]) / _mean([r["seconds"] for r in imp_runs])
            ratio = f"{images:.2f}; {wall:.2f}"
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {' / '.join(imp_cells)} | {ratio} |")
    return lines + [""]


def report(args) -> str:
    """Markdown tables from `runs.jsonl` and `setup.json` (printed and written to `tables.md` in `--out`)."""
    out = Path(args.out)
    records = load_jsonl(out / "runs.jsonl")
    lines = []
    setup_file = out / "setup.json"
    if setup_file.exists():
        setup_info = json.loads(setup_file.read_text())
        lines += [
            f"Machine: {setup_info['machine']}, torch {setup_info['torch']}.",
            "",
            "| network | parameters | epochs (plateau reached) | wall time (s) | val top-1 | test top-1 |",
            "|---|---|---|---|---|---|",
        ]
        for role in ("teacher", "student"):
            e = setup_info[role]
            lines.append(
                f"| {role}: timm `{e['architecture']}` | {e['parameters']:,} | {e['epochs']} ({e['plateaued']}) | "
                f"{e['seconds']:.0f} | {e['val_top1']:.2f} | {e['test_top1']:.2f} |"
            )
        lines.append("")
        teacher = setup_info["teacher"]["architecture"]
        students = (setup_info["student"]["architecture"], Path(setup_info["student_dir"]).name)
        prints = setup_info.get("dense_sha256", {})

        def belongs(r):
            same = r.get("teacher") in (None, teacher) and r.get("student", students[0]) in students
            recorded = r.get("dense_sha256") or {}  # records written before fingerprints were kept have none
            return same and all(v is None or prints.get(k, v) == v for k, v in recorded.items())

        stale = [r["key"] for r in records if not belongs(r)]
        if stale:  # a record distilled from another teacher or pruned from another student is not of this table
            lines += [
                f"Left out ({len(stale)}): runs with another teacher or dense student than this setup's (another "
                "network, or the same one fine-tuned again: `dense_sha256`).",
                "",
            ]
            records = [r for r in records if belongs(r)]
    epochs = args.retrain_epochs
    variants = [v for v in VARIANTS if any(r["variant"] == v and r["retrain_epochs"] == epochs for r in records)]
    header = "| method | " + " | ".join(
        f"{int(round(s * 100))}%: after prune / + BN recal / retrained" for s in SPARSITIES
    )
    lines += [
        f"Test top-1 (%) with {epochs} retraining epochs (mean ± std over seeds; n = seeds), right after pruning "
        "(BatchNorm statistics of the dense model), after BatchNorm recalibration, and after retraining; compute per "
        "run (pruning + retraining, evaluation excluded).",
        "",
        header + " | n | wall time (s) | fwd images | bwd images |",
        "|---|" + "---|" * len(SPARSITIES) + "---|---|---|---|",
    ]
    for variant in variants:
        cells, rows = [], []
        for sparsity in SPARSITIES:
            runs = _runs(records, variant, sparsity, epochs)
            rows += runs
            cells.append(
                f"{_mean_std([r.get('after_prune_test_top1') for r in runs])} / "
                f"{_mean_std([r.get('after_prune_recal_test_top1') for r in runs])} / "
                f"**{_mean_std([r['test_top1'] for r in runs])}**"
            )
        counts = "/".join(str(len(_runs(records, variant, s, epochs))) for s in SPARSITIES)
        seconds = sum(r["seconds"] for r in rows) / len(rows)
        fwd = sum(r["forward_images"] for r in rows) / len(rows)
        bwd = sum(r["backward_images"] for r in rows) / len(rows)
        lines.append(
            f"| {variant} | " + " | ".join(cells) + f" | {counts} | {seconds:.0f} | {fwd:,.0f} | {bwd:,.0f} |"
        )
    lines.append("")
    lines += heldout_table(records, variants, epochs)
    # ablation: seed 0, validation split, against tgp
    ablation_sparsities = sorted({r["sparsity"] for r in records if r["seed"] == 0 and r["sparsity"] > 0.9})
    if ablation_sparsities:
        lines += [
            "Seed 0, validation top-1 (%) after retraining, Δ against `tgp` with the same seed:",
            "",
            "| variant | " + " | ".join(f"{int(round(s * 100))}% val | Δ | test" for s in ablation_sparsities) + " |",
            "|---|" + "---|---|---|" * len(ablation_sparsities),
        ]
        for variant in variants:
            cells = []
            for sparsity in ablation_sparsities:
                run = _runs(records, variant, sparsity, epochs, seed=0)
                base = _runs(records, "tgp", sparsity, epochs, seed=0)
                if not run:
                    cells.append("— | — | —")
                    continue
                delta = f"{run[0]['val_top1'] - base[0]['val_top1']:+.2f}" if base else "—"
                cells.append(f"{run[0]['val_top1']:.2f} | {delta} | {run[0]['test_top1']:.2f}")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += goal_check(records, variants, epochs)
    long_runs = [r for r in records if r["retrain_epochs"] != epochs]
    if long_runs:
        dense = setup_info["student"].get("extra_test_top1") if setup_file.exists() else None
        lines += [
            "Longer training (`--stage long`: retraining; `--stage scratch`: EPSD from initialisation with the dense "
            "student's budget); mean ± std over seeds, test top-1 per seed, held-out top-1 on the `--test-data` set "
            "and its distance to the dense student's, and Δ test against `magnitude` paired by seed:",
            "",
            "| variant | sparsity | training epochs | seeds | val top-1 | test top-1 | test per seed | held-out | "
            "Δ dense student (held-out) | Δ magnitude |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        groups = dict.fromkeys((r["variant"], r["sparsity"], r["retrain_epochs"]) for r in long_runs)
        for variant, sparsity, long_epochs in groups:
            runs = sorted(_runs(long_runs, variant, sparsity, long_epochs), key=lambda r: r["seed"])
            deltas = _paired_deltas(long_runs, variant, sparsity, long_epochs)
            delta = f"{_mean(deltas):+.2f}" if deltas and variant != "magnitude" else "—"
            per_seed = ", ".join(format(r["test_top1"], ".2f") for r in runs)
            held_out = [r["extra_test_top1"] for r in runs if "extra_test_top1" in r]
            below = f"{_mean(held_out) - dense:+.2f}" if held_out and dense is not None else "—"
            lines.append(
                f"| {variant} | {sparsity} | {long_epochs} | {len(runs)} | {_mean_std([r['val_top1'] for r in runs])} | "
                f"{_mean_std([r['test_top1'] for r in runs])} | {per_seed} | {_mean_std(held_out)} | {below} | {delta} |"
            )
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tables.md", text)
    return text


def main(argv=None, parse=parse_args, setup=setup):
    """Run `--stage`; other regimes pass their own argument parser and dense setup."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.stage == "report":
        print(report(args))
        return
    splits = load_data(args)
    if args.smoke:
        splits["train"] = tuple(t[:1024] for t in splits["train"])
    log(f"data: {len(splits['train'][1])} train / {len(splits['val'][1])} val / {len(splits['test'][1])} test")
    info = setup(args, splits)
    if info is None:
        return
    info["dense_sha256"] = dense_fingerprints(info)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "setup.json", json.dumps(info, indent=1))
    if args.stage != "setup":
        run_stage(args, splits, info)


if __name__ == "__main__":
    main()
