"""Accuracy vs compute of teacher-guided one-shot pruning and the seed baselines on real CIFAR-10, on a 2-core CPU.

Protocol (also in benchmarks/README.md):

* Data: CIFAR-10 from `../shared/data/cifar10` (`datasets.load_dataset`, columns img/label; 25,000 train,
  1,000 test), held in memory as a uint8 tensor. A seeded 1,000-image **validation** split is carved from train
  (24,000 left for training); the **test** split is used only for the final numbers. Training augmentation:
  random crop (pad 4) + horizontal flip. Nothing is downloaded and no data is written into the repository.
* Models (defined here, plain `torch.nn`, CIFAR-style ResNets with one BasicBlock per stage at 16/8/4 px):
  teacher `width=24` (~0.17M parameters), student `width=12` (~0.04M parameters). Both are trained once with
  cross-entropy (SGD momentum 0.9, nesterov, weight decay 5e-4, one-cycle lr, batch 128) and cached in
  `--cache-dir` (outside the repository); their cost is reported as the shared setup cost.
* Pruning: every method prunes the student's conv weights (classifier head excluded, the library default) to
  exactly `round(s · N)` zeros, s in {90, 95, 98}%. One seed at 90%, `--seeds` seeds (default 2) at 95% and 98%.
  The seed changes the calibration sample, the retraining data order, the random scores and EPSD's initialisation.
* Same retraining budget for the one-shot methods (tgp, snip, magnitude, random): one scoring pass over 1,024
  un-augmented training images (64 per batch), then `--retrain-epochs` epochs over a fixed seeded
  `--retrain-images`-image subset of the training split (SGD lr 0.02, momentum 0.9, no weight decay, cosine,
  batch 128) with the teacher-guided KD loss (`retrain_with_kd=True`, library defaults alpha 0.7, beta 0.5, T 3).
* EPSD starts from a freshly initialised student (no dense training), warms up `--epsd-warmup-steps` steps with
  CE + λ·self-distillation, scores, and trains the same number of epochs with CE + λ·SD (no teacher).
* DG2PF starts from the trained student: `--dg2pf-epochs` epochs of gradual simulated magnitude pruning with self-KD
  from the dense student, then `--retrain-epochs` epochs of pruned fine-tuning with CE.
* IMP starts from the trained student: `--imp-rounds` rounds of global magnitude pruning, one retraining epoch
  per round, the last round followed by `--retrain-epochs` epochs (same KD loss as the one-shot methods).
* Compute: wall time of the pipeline (pruning + retraining, not evaluation) and images through forward and backward
  passes, counted with forward hooks on every network (student, teacher, DG2PF's dense copy, EPSD's second view).
* "after prune": test top-1 right after pruning, before any retraining (one-shot methods and EPSD).

Stages (results are appended to JSON-lines files in `--out`, so an interrupted run resumes):

    python benchmarks/cifar10_cpu.py --stage setup      # data + teacher + dense student (cached)
    python benchmarks/cifar10_cpu.py --stage main       # method x sparsity table
    python benchmarks/cifar10_cpu.py --stage ablation   # what makes teacher guidance pay (lighter: 1 seed)
    python benchmarks/cifar10_cpu.py --stage report     # tables (markdown) + accuracy-vs-sparsity PNG
    python benchmarks/cifar10_cpu.py                    # all of the above
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_utils import PassCounter, append_jsonl, load_jsonl  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
SPARSITIES = (0.90, 0.95, 0.98)
ONE_SHOT = ("tgp", "snip", "magnitude", "random")
METHODS = ONE_SHOT + ("epsd", "dg2pf", "imp")


# --- models -------------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class CifarResNet(nn.Module):
    """Stem 3x3 conv at 32 px, then stages of BasicBlocks at 16/8/4 px (widths w, 2w, 4w), pool, linear head."""

    def __init__(self, width: int = 16, depth: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, cin = [], width
        for cout in (width, 2 * width, 4 * width):
            for d in range(depth):
                blocks.append(BasicBlock(cin, cout, 2 if d == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


# --- data ---------------------------------------------------------------------------------------------------------
def load_cifar10(path: str, cache_dir: Path) -> dict[str, torch.Tensor]:
    cache = cache_dir / "cifar10_uint8.pt"
    if cache.exists():
        return torch.load(cache)
    import datasets
    import numpy as np

    raw = datasets.load_dataset(path)
    out = {}
    for split in ("train", "test"):
        images = np.stack([np.asarray(img.convert("RGB"), dtype=np.uint8) for img in raw[split]["img"]])
        out[f"{split}_x"] = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        out[f"{split}_y"] = torch.tensor(raw[split]["label"], dtype=torch.long)
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


def split_data(data: dict, num_val: int = 1000, seed: int = 0) -> dict:
    perm = torch.randperm(len(data["train_y"]), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:num_val], perm[num_val:]
    return {
        "train": (data["train_x"][train], data["train_y"][train]),
        "val": (data["train_x"][val], data["train_y"][val]),
        "test": (data["test_x"], data["test_y"]),
    }


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    return (images_uint8.float().div_(255) - MEAN) / STD


class TensorImages(Dataset):
    """uint8 images in memory -> {"pixel_values", "labels"}; train augmentation: random crop (pad 4) + flip."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool = False):
        self.labels = labels
        self.augment = augment
        self.images = F.pad(images, (4, 4, 4, 4)) if augment else images

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        if self.augment:
            dx, dy = torch.randint(0, 9, (2,)).tolist()
            image = image[:, dy : dy + 32, dx : dx + 32]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return {"pixel_values": normalize(image), "labels": self.labels[i]}


@torch.no_grad()
def evaluate(model: nn.Module, split, batch_size: int = 500) -> float:
    images, labels = split
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        correct += int((model(normalize(images[i : i + batch_size])).argmax(-1) == labels[i : i + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / len(labels)


# --- counting forward / backward passes ----------------------------------------------------------------------------
# --- dense training (teacher / student) --------------------------------------------------------------------------
def augmented_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Shuffled batches with random crop (pad 4) + flip, built batch-wise (faster than per-item loading)."""
    padded = F.pad(images, (4, 4, 4, 4))
    order = torch.randperm(len(labels), generator=generator)
    for i in range(0, len(order) - batch_size + 1, batch_size):
        index = order[i : i + batch_size]
        offsets = torch.randint(0, 9, (batch_size, 2), generator=generator).tolist()
        batch = torch.stack([padded[j, :, dy : dy + 32, dx : dx + 32] for j, (dy, dx) in zip(index.tolist(), offsets)])
        flip = torch.rand(batch_size, generator=generator) < 0.5
        batch[flip] = batch[flip].flip(-1)
        yield normalize(batch), labels[index]


def train_dense(model, train, epochs: int, lr: float, seed: int, batch_size: int = 128, log=print):
    generator = torch.Generator().manual_seed(seed)
    images, labels = train
    steps = len(labels) // batch_size
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps, pct_start=0.25)
    model.train()
    for epoch in range(epochs):
        start = time.perf_counter()
        for pixel_values, targets in augmented_batches(images, labels, batch_size, generator):
            loss = F.cross_entropy(model(pixel_values), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        log(f"  epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    return model


def setup_models(args, splits, log=print) -> dict:
    """Teacher and dense student, trained once and cached (state dicts + their cost)."""
    cache = Path(args.cache_dir)
    key = f"t{args.teacher_width}e{args.teacher_epochs}_s{args.student_width}e{args.student_epochs}"
    path = cache / f"models_{key}.pt"
    if path.exists():
        return torch.load(path)
    result = {}
    for role, width, epochs, lr in (
        ("teacher", args.teacher_width, args.teacher_epochs, 0.2),
        ("student", args.student_width, args.student_epochs, 0.2),
    ):
        torch.manual_seed(0)
        model = CifarResNet(width)
        counter = PassCounter()
        handle = counter.attach(model)
        log(f"training the dense {role} (width {width}, {epochs} epochs)")
        start = time.perf_counter()
        train_dense(model, splits["train"], epochs, lr, seed=0, log=log)
        seconds = time.perf_counter() - start
        handle.remove()
        result[role] = {
            "state_dict": model.state_dict(),
            "width": width,
            "params": sum(p.numel() for p in model.parameters()),
            "epochs": epochs,
            "seconds": seconds,
            "forward_images": counter.forward,
            "backward_images": counter.backward,
            "val_top1": evaluate(model, splits["val"]),
            "test_top1": evaluate(model, splits["test"]),
        }
        log(f"  {role}: val {result[role]['val_top1']:.2f} test {result[role]['test_top1']:.2f} ({seconds:.0f} s)")
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(result, path)
    return result


def load_model(entry) -> nn.Module:
    model = CifarResNet(entry["width"])
    model.load_state_dict(entry["state_dict"])
    return model.eval()


# --- one pruning run -----------------------------------------------------------------------------------------------
def run_one(args, splits, models, method: str, sparsity: float, seed: int, overrides=None, student=None) -> dict:
    from hf_tgprune import TeacherGuidedPruningConfig, TeacherGuidedPruningTrainer

    overrides = dict(overrides or {})
    torch.manual_seed(seed)
    if method == "epsd":
        student = CifarResNet(args.student_width)  # fresh initialisation (seeded)
    elif student is None:
        student = load_model(models["student"])
    else:
        student = copy.deepcopy(student)
    student.train()
    teacher = load_model(models["teacher"])
    subset = torch.randperm(len(splits["train"][1]), generator=torch.Generator().manual_seed(1234))
    subset = subset[: args.retrain_images]
    train_set = TensorImages(splits["train"][0][subset], splits["train"][1][subset], augment=True)
    calibration = TensorImages(*splits["train"], augment=False)

    epochs = args.retrain_epochs
    extra = {}
    if method == "dg2pf":
        epochs += args.dg2pf_epochs
        extra = dict(pruning_method_args={"gradual_pruning_epochs": args.dg2pf_epochs})
    elif method == "imp":
        epochs += args.imp_rounds - 1
        extra = dict(pruning_method_args={"rounds": args.imp_rounds, "epochs_per_round": 1})
    elif method == "epsd":  # the warm-up steps run before the retraining epochs, in the same Trainer run
        extra = dict(
            pruning_method_args={"warmup_steps": args.epsd_warmup_steps},
            max_steps=args.epsd_warmup_steps + epochs * -(-len(train_set) // 128),
        )
    uses_teacher = method not in ("epsd", "dg2pf")
    config = dict(
        output_dir=str(Path(args.cache_dir) / "trainer"),
        sparsity=sparsity,
        pruning_method=method,
        num_calibration_samples=1024,
        calibration_batch_size=64,
        per_device_train_batch_size=128,
        num_train_epochs=epochs,
        learning_rate=0.02,
        lr_scheduler_type="cosine",
        optim="sgd",
        optim_args="momentum=0.9",
        weight_decay=0.0,
        retrain_with_kd=uses_teacher,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=seed,
        dataloader_num_workers=0,
        **extra,
    )
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
    trainer.prune()
    prune_seconds = time.perf_counter() - start
    counter.enabled = False
    after_prune = evaluate(student, splits["test"]) if method not in ("dg2pf", "imp") else None
    counter.enabled = True
    prune_forward, prune_backward = counter.forward, counter.backward
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    for handle in handles:
        handle.remove()
    masks = trainer.masks
    params = dict(student.named_parameters())
    zeros = sum(int((params[n].detach()[~m] == 0).sum()) for n, m in masks.items())
    pruned = sum(int((~m).sum()) for m in masks.values())
    numel = sum(m.numel() for m in masks.values())
    assert pruned == round(sparsity * numel) and zeros == pruned, (method, pruned, zeros, numel)
    return {
        "method": method,
        "sparsity": sparsity,
        "seed": seed,
        "overrides": {k: v for k, v in overrides.items()},
        "test_top1": evaluate(student, splits["test"]),
        "val_top1": evaluate(student, splits["val"]),
        "after_prune_test_top1": after_prune,
        "prunable_sparsity": pruned / numel,
        "total_sparsity": trainer.pruning_report["total"]["sparsity"],  # after training: every method has pruned
        "prune_seconds": prune_seconds,
        "train_seconds": train_seconds,
        "seconds": prune_seconds + train_seconds,
        "prune_forward_images": prune_forward,
        "prune_backward_images": prune_backward,
        "forward_images": counter.forward,
        "backward_images": counter.backward,
        "epochs": epochs,
    }


def _done(path: Path) -> set:
    return {record["key"] for record in load_jsonl(path)}


def main_runs(args):
    runs = []
    for sparsity in SPARSITIES:
        seeds = [0] if sparsity == 0.90 else list(range(args.seeds))
        for seed in seeds:
            for method in args.methods:
                runs.append((method, sparsity, seed))
    return runs


# --- ablation ------------------------------------------------------------------------------------------------------
ABLATION = {
    # name: (method, config overrides, warm up the student with KD before scoring). Run before layer_density_floor
    # became the default (0.5): the variants pin it to 0.0 unless they vary it, so they rerun as they ran.
    "tgp (no layer guard)": ("tgp", {"layer_density_floor": 0.0}, False),
    "tgp + KD warm-up": ("tgp", {"layer_density_floor": 0.0}, True),
    "snip + KD warm-up": ("snip", {"layer_density_floor": 0.0}, True),
    "magnitude + KD warm-up": ("magnitude", {"layer_density_floor": 0.0}, True),
    "tgp min_layer_density=0.01": ("tgp", {"layer_density_floor": 0.0, "min_layer_density": 0.01}, False),
    "snip min_layer_density=0.01": ("snip", {"layer_density_floor": 0.0, "min_layer_density": 0.01}, False),
    "magnitude min_layer_density=0.01": ("magnitude", {"layer_density_floor": 0.0, "min_layer_density": 0.01}, False),
    "tgp + KD warm-up + min_layer_density=0.01": (
        "tgp",
        {"layer_density_floor": 0.0, "min_layer_density": 0.01},
        True,
    ),
    "tgp layer_density_floor=0.25": ("tgp", {"layer_density_floor": 0.25}, False),
    "tgp layer_density_floor=0.5": ("tgp", {"layer_density_floor": 0.5}, False),
    "tgp layer_density_floor=0.75": ("tgp", {"layer_density_floor": 0.75}, False),
    "snip layer_density_floor=0.5": ("snip", {"layer_density_floor": 0.5}, False),
    "magnitude layer_density_floor=0.5": ("magnitude", {"layer_density_floor": 0.5}, False),
    "tgp T=1": ("tgp", {"layer_density_floor": 0.0, "temperature": 1.0}, False),
    "tgp T=6": ("tgp", {"layer_density_floor": 0.0, "temperature": 6.0}, False),
    "tgp alpha=0.3": ("tgp", {"layer_density_floor": 0.0, "alpha": 0.3}, False),
    "tgp alpha=1.0 (KD only)": ("tgp", {"layer_density_floor": 0.0, "alpha": 1.0}, False),
    "tgp calibration=256": ("tgp", {"layer_density_floor": 0.0, "num_calibration_samples": 256}, False),
    "tgp calibration=4096": ("tgp", {"layer_density_floor": 0.0, "num_calibration_samples": 4096}, False),
    "tgp BN train mode": ("tgp", {"layer_density_floor": 0.0, "scoring_bn_mode": "train"}, False),
    "tgp sum aggregation": ("tgp", {"layer_density_floor": 0.0, "score_aggregation": "sum"}, False),
}


def kd_warmed_student(args, splits, models, log=print):
    """The dense student after `--kd-warmup-epochs` of KD (library loss, teacher frozen) on the retraining subset."""
    path = Path(args.cache_dir) / f"student_kdwarm_e{args.kd_warmup_epochs}_n{args.retrain_images}.pt"
    if path.exists():
        return torch.load(path)
    from hf_tgprune.core.losses import teacher_guided_loss

    student, teacher = load_model(models["student"]), load_model(models["teacher"])
    subset = torch.randperm(len(splits["train"][1]), generator=torch.Generator().manual_seed(1234))
    subset = subset[: args.retrain_images]
    loader = torch.utils.data.DataLoader(
        TensorImages(splits["train"][0][subset], splits["train"][1][subset], augment=True),
        batch_size=128,
        shuffle=True,
    )
    optimizer = torch.optim.SGD(student.parameters(), lr=0.02, momentum=0.9)
    counter = PassCounter()
    handles = [counter.attach(student), counter.attach(teacher)]
    start = time.perf_counter()
    student.train()
    for _ in range(args.kd_warmup_epochs):
        for batch in loader:
            with torch.no_grad():
                teacher_logits = teacher(batch["pixel_values"])
            loss = teacher_guided_loss(student(batch["pixel_values"]), teacher_logits, batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    student.eval()
    for handle in handles:
        handle.remove()
    result = {
        "model": student,
        "seconds": time.perf_counter() - start,
        "forward_images": counter.forward,
        "backward_images": counter.backward,
        "test_top1": evaluate(student, splits["test"]),
        "val_top1": evaluate(student, splits["val"]),
    }
    torch.save(result, path)
    log(f"KD warm-up of the student: val {result['val_top1']:.2f} ({result['seconds']:.0f} s)")
    return result


# --- report --------------------------------------------------------------------------------------------------------
def _fmt(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def report(args) -> str:
    out = Path(args.out)
    records = load_jsonl(out / "main.jsonl")
    setup = json.loads((out / "setup.json").read_text()) if (out / "setup.json").exists() else {}
    lines = []
    if setup:
        lines += [
            "| network | parameters | epochs | wall time (s) | fwd images | bwd images | val top-1 | test top-1 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for role in ("teacher", "student"):
            e = setup[role]
            lines.append(
                f"| {role} (width {e['width']}) | {e['params']:,} | {e['epochs']} | {e['seconds']:.0f} | "
                f"{e['forward_images']:,} | {e['backward_images']:,} | {e['val_top1']:.2f} | {e['test_top1']:.2f} |"
            )
        lines.append("")
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    header = "| method | " + " | ".join(f"{int(s * 100)}% top-1 | {int(s * 100)}% after prune" for s in SPARSITIES)
    lines += [header + " | wall time / run (s) | fwd images / run | bwd images / run |"]
    lines.append("|---|" + "---|---|" * len(SPARSITIES) + "---|---|---|")
    for method in methods:
        rows = [r for r in records if r["method"] == method]
        cells = []
        for s in SPARSITIES:
            at = [r for r in rows if abs(r["sparsity"] - s) < 1e-9]
            cells += [_fmt([r["test_top1"] for r in at]), _fmt([r["after_prune_test_top1"] for r in at])]
        seconds = statistics.mean(r["seconds"] for r in rows)
        fwd = statistics.mean(r["forward_images"] for r in rows)
        bwd = statistics.mean(r["backward_images"] for r in rows)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {seconds:.0f} | {fwd:,.0f} | {bwd:,.0f} |")
    ablation = load_jsonl(out / "ablation.jsonl")
    if ablation:
        lines += ["", "| variant | sparsity | val top-1 | test top-1 | after prune (test) | wall time (s) |"]
        lines.append("|---|---|---|---|---|---|")
        for r in ablation:
            lines.append(
                f"| {r['variant']} | {int(r['sparsity'] * 100)}% | {r['val_top1']:.2f} | {r['test_top1']:.2f} | "
                f"{_fmt([r['after_prune_test_top1']])} | {r['seconds']:.0f} |"
            )
    text = "\n".join(lines) + "\n"
    (out / "tables.md").write_text(text)
    if records:
        plot(records, out / "accuracy_vs_sparsity.png", setup)
    return text


def plot(records, path: Path, setup=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method in METHODS:
        xs, ys, es = [], [], []
        for s in SPARSITIES:
            values = [r["test_top1"] for r in records if r["method"] == method and abs(r["sparsity"] - s) < 1e-9]
            if values:
                xs.append(100 * s)
                ys.append(statistics.mean(values))
                es.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
    for role, style in (("student", ":"), ("teacher", "--")):
        if setup and role in setup:
            ax.axhline(setup[role]["test_top1"], color="gray", linestyle=style, linewidth=1, label=f"dense {role}")
    ax.set_xlabel("sparsity of the prunable weights (%)")
    ax.set_ylabel("CIFAR-10 test top-1 after retraining (%)")
    ax.set_xticks([100 * s for s in SPARSITIES])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("CIFAR-10, small ResNet student pruned on a 2-core CPU budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- main ----------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", default="all", choices=["all", "setup", "main", "ablation", "report"])
    parser.add_argument("--data", default="../shared/data/cifar10")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--cache-dir", default="/tmp/hf_tgprune_cifar10_cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--teacher-width", type=int, default=24)
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--student-width", type=int, default=12)
    parser.add_argument("--student-epochs", type=int, default=3)
    parser.add_argument("--retrain-images", type=int, default=12000)
    parser.add_argument("--retrain-epochs", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--epsd-warmup-steps", type=int, default=50)
    parser.add_argument("--dg2pf-epochs", type=int, default=2)
    parser.add_argument("--imp-rounds", type=int, default=3)
    parser.add_argument("--kd-warmup-epochs", type=int, default=1)
    parser.add_argument("--ablation-sparsities", nargs="+", type=float, default=[0.98, 0.95])
    parser.add_argument("--ablation-variants", nargs="+", default=list(ABLATION))
    parser.add_argument("--smoke", action="store_true", help="tiny everything, to check the script end to end")
    args = parser.parse_args(argv)
    if args.smoke:
        args.cache_dir += "_smoke"
        args.out = str(Path(args.cache_dir) / "results")
        args.teacher_epochs = args.student_epochs = 1
        args.retrain_images, args.epsd_warmup_steps, args.seeds = 256, 2, 1
        args.ablation_sparsities, args.ablation_variants = [0.95], ["tgp (no layer guard)", "tgp + KD warm-up"]
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:7.0f} s] {message}", flush=True)

    if args.stage != "report":
        splits = split_data(load_cifar10(args.data, Path(args.cache_dir)))
        if args.smoke:
            splits["train"] = tuple(t[:1024] for t in splits["train"])
        models = setup_models(args, splits, log)
        info = {role: {k: v for k, v in models[role].items() if k != "state_dict"} for role in ("teacher", "student")}
        info["machine"] = (
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}"
        )
        info["torch"] = torch.__version__
        (out / "setup.json").write_text(json.dumps(info, indent=1))
        log(f"setup: teacher test {info['teacher']['test_top1']:.2f}, student test {info['student']['test_top1']:.2f}")

    if args.stage in ("all", "main"):
        path = out / "main.jsonl"
        done = _done(path)
        for method, sparsity, seed in main_runs(args):
            key = f"{method}|{sparsity}|{seed}"
            if key in done:
                continue
            record = run_one(args, splits, models, method, sparsity, seed)
            record["key"] = key
            append_jsonl(path, record)
            log(
                f"{method:9s} {sparsity:.2f} seed {seed}: test {record['test_top1']:.2f} "
                f"(after prune {record['after_prune_test_top1']}) {record['seconds']:.0f} s"
            )

    if args.stage in ("all", "ablation"):
        path = out / "ablation.jsonl"
        done = _done(path)
        warmed = None
        for sparsity in args.ablation_sparsities:
            for variant in args.ablation_variants:
                key = f"{variant}|{sparsity}"
                if key in done:
                    continue
                method, overrides, warm = ABLATION[variant]
                main = {r["key"]: r for r in load_jsonl(out / "main.jsonl")}.get(f"{method}|{sparsity}|0")
                if not overrides and not warm and main is not None:  # the same run as the main table's seed 0
                    append_jsonl(path, dict(main, key=key, variant=variant, kd_warmup=False))
                    continue
                student = None
                if warm:
                    warmed = warmed or kd_warmed_student(args, splits, models, log)
                    student = warmed["model"]
                record = run_one(args, splits, models, method, sparsity, 0, overrides, student=student)
                record.update(key=key, variant=variant, kd_warmup=warm)
                if warm:
                    record["warmup_seconds"] = warmed["seconds"]
                append_jsonl(path, record)
                log(
                    f"ablation {variant:32s} {sparsity:.2f}: val {record['val_top1']:.2f} test {record['test_top1']:.2f}"
                )

    if args.stage in ("all", "report"):
        print(report(args))
    log("done")


if __name__ == "__main__":
    main()
