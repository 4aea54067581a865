"""recipes/prune_cifar.py end to end (2 CPU processes under accelerate) and its bad-input errors."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_tgprune.scripts import parse_arguments, stages, validate_arguments
from hf_tgprune.scripts.utils import format_summary

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "prune_cifar.py"
NUM_CLASSES = 4


def _synthetic_split(n: int, seed: int, size: int = 32) -> datasets.Dataset:
    """CIFAR-layout images (`img`, `label`) whose class is the bright quadrant: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % NUM_CLASSES).tolist()
    images = []
    half = size // 2
    for label in labels:
        pixels = rng.integers(0, 100, size=(size, size, 3), dtype=np.uint8)
        row, col = divmod(label, 2)
        pixels[row * half : (row + 1) * half, col * half : (col + 1) * half] += 150
        images.append(Image.fromarray(pixels))
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=["tl", "tr", "bl", "br"])}
    )
    return datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_cifar")
    (root / "plain_text").mkdir()
    _synthetic_split(320, seed=0).to_parquet(str(root / "plain_text" / "train-00000-of-00001.parquet"))
    _synthetic_split(80, seed=1).to_parquet(str(root / "plain_text" / "test-00000-of-00001.parquet"))
    return root


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return result


def _common_args(dataset: Path, output_dir: Path) -> list[str]:
    return [
        "--dataset_name", str(dataset),
        "--output_dir", str(output_dir),
        "--pruning_method", "tgp",  # one teacher-guided scoring pass (the library default, tgp_fisher, scores in 5 rounds)
        "--max_train_samples", "256",
        "--max_eval_samples", "64",
        "--validation_split_percentage", "10",
        "--num_calibration_samples", "48",
        "--calibration_batch_size", "16",
        "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "32",
        "--teacher_epochs", "1",
        "--num_train_epochs", "1",
        "--learning_rate", "0.05",
        "--logging_steps", "5",
        "--disable_tqdm", "True",
        "--seed", "0",
    ]  # fmt: skip


def _count_zeros(state_dict, names):
    return sum(int((state_dict[name] == 0).sum()) for name in names), sum(state_dict[name].numel() for name in names)


@pytest.mark.slow
def test_recipe_two_processes_end_to_end(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    _run(
        [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29547",
            str(RECIPE),
            *_common_args(tiny_cifar, out),
            "--model_name_or_path", "test_resnet",
            "--teacher_architecture", "test_vit",
            "--student_warmup_epochs", "1",
            "--sparsities", "0.5", "0.9",
        ]
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["dataset"] | {"name": None} == {
        "name": None, "num_labels": 4, "train": 256, "validation": 32, "test": 64, "calibration": 48,
    }  # fmt: skip
    for entry in (results["teacher"]["test"], results["dense_student"]["test"]):
        assert 0 <= entry["accuracy"] <= 1 and entry["top5_accuracy"] == 1.0  # 4 classes: top-5 is trivial
    assert results["teacher"]["trained_here"] and results["dense_student"]["trained"]
    assert [run["sparsity"] for run in results["runs"]] == [0.5, 0.9]
    for stage in ("load", "teacher_training", "student_warmup", "scoring", "sparsity-0.9/retraining"):
        assert results["stage_seconds"][stage] > 0, stage
    for run in results["runs"]:
        for stage in ("after_pruning", "after_retraining"):
            assert 0 <= run[stage]["accuracy"] <= 1
        report = run["sparsity_report"]
        target = round(run["sparsity"] * report["prunable"]["numel"])
        assert report["prunable"]["zeros"] >= target
        # the saved model loads with plain timm and is exactly as sparse as the mask says
        import timm

        model = timm.create_model(f"local-dir:{run['model_dir']}", pretrained=True)
        zeros, numel = _count_zeros(model.state_dict(), list(report["layers"]))
        assert numel == report["prunable"]["numel"] and zeros >= target
        record = json.loads((Path(run["model_dir"]) / "sparsity.json").read_text())
        assert record["mask"]["sha256"] == run["mask_sha256"]
        assert record["sparsity"]["prunable"]["zeros"] >= target
        assert record["metrics"]["pruned"]["accuracy"] == run["after_retraining"]["accuracy"]
    # both sparsities come from one scoring pass, so the 50% model's pruned weights are pruned at 90% too
    half = timm.create_model(f"local-dir:{out / 'sparsity-0.5'}", pretrained=True).state_dict()
    most = timm.create_model(f"local-dir:{out / 'sparsity-0.9'}", pretrained=True).state_dict()
    for name in results["runs"][0]["sparsity_report"]["layers"]:
        assert bool(((half[name] == 0) <= (most[name] == 0)).all()), name
    assert timm.create_model(f"local-dir:{out / 'teacher'}", pretrained=True).num_classes == NUM_CLASSES
    assert (out / "dense-student" / "model.safetensors").is_file()
    for name in ("layer_sparsity.png", "accuracy_vs_sparsity.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_recipe_yaml_config_transformers_student_and_trained_teacher(tiny_cifar, tmp_path):
    """One process, settings from a YAML file (+ an override), a transformers student, a saved teacher."""
    from transformers import ResNetConfig, ResNetForImageClassification

    from hf_tgprune.io.serialization import save_sparse_model

    student_dir = tmp_path / "hf_student"
    config = ResNetConfig(num_labels=NUM_CLASSES, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    ResNetForImageClassification(config).save_pretrained(student_dir)
    import timm

    teacher_dir = tmp_path / "teacher"
    save_sparse_model(timm.create_model("test_resnet", num_classes=NUM_CLASSES), teacher_dir)
    out = tmp_path / "run"
    args = _common_args(tiny_cifar, out)
    yaml_lines = [f"{key[2:]}: {value}" for key, value in zip(args[::2], args[1::2])]
    yaml_lines += [f"model_name_or_path: {student_dir}", f"teacher_name_or_path: {teacher_dir}", "sparsity: 0.8"]
    config_file = tmp_path / "recipe.yaml"
    config_file.write_text("\n".join(yaml_lines) + "\n")
    _run([sys.executable, str(RECIPE), "--config", str(config_file), "--sparsity", "0.75", "--save_format", "dense"])
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 1 and "teacher_training" not in results["stage_seconds"]
    assert results["teacher"]["trained_here"] is False and results["teacher"]["source"] == str(teacher_dir)
    (run,) = results["runs"]
    assert run["sparsity"] == 0.75
    model = ResNetForImageClassification.from_pretrained(run["model_dir"])
    zeros, numel = _count_zeros(model.state_dict(), list(run["sparsity_report"]["layers"]))
    assert zeros >= round(0.75 * numel)
    assert (out / "layer_sparsity.png").is_file() and (out / "accuracy_vs_sparsity.png").is_file()


# --- bad input: clear errors before any training -----------------------------------------------------------------
def _recipe_module():
    spec = importlib.util.spec_from_file_location("prune_cifar_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe():
    return _recipe_module()


def _bad_run(recipe, tiny_cifar, out, *extra):
    args = _common_args(tiny_cifar, out) + ["--model_name_or_path", "test_resnet", *extra]
    return recipe.main(args)


def test_unknown_column(recipe, tiny_cifar, tmp_path):
    from hf_tgprune.data import DataError

    with pytest.raises(DataError, match=r"--label_column 'fine_label'.*\['img', 'label'\]"):
        _bad_run(recipe, tiny_cifar, tmp_path / "out", "--label_column", "fine_label")
    assert not (tmp_path / "out" / "results.json").exists()


def test_missing_teacher_path(recipe, tiny_cifar, tmp_path):
    from hf_tgprune.io.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="no such file or folder"):
        _bad_run(recipe, tiny_cifar, tmp_path / "out", "--teacher_name_or_path", str(tmp_path / "nope"))


def test_teacher_label_count_mismatch(recipe, tiny_cifar, tmp_path):
    import timm

    from hf_tgprune.io.models import ModelLoadError
    from hf_tgprune.io.serialization import save_sparse_model

    save_sparse_model(timm.create_model("test_resnet", num_classes=10), tmp_path / "teacher10")
    with pytest.raises(ModelLoadError, match="predicts 10 classes but the dataset has 4"):
        _bad_run(recipe, tiny_cifar, tmp_path / "out", "--teacher_name_or_path", str(tmp_path / "teacher10"))
    assert not (tmp_path / "out" / "results.json").exists()


def test_teacher_name_that_is_not_trained(recipe, tiny_cifar, tmp_path):
    from hf_tgprune.scripts import RecipeError

    with pytest.raises(RecipeError, match="architecture name, not a trained model"):
        _bad_run(recipe, tiny_cifar, tmp_path / "out", "--teacher_name_or_path", "test_resnet")


def test_non_empty_output_dir(recipe, tiny_cifar, tmp_path):
    from hf_tgprune.scripts import RecipeError

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    with pytest.raises(RecipeError, match="--overwrite_output_dir"):
        _bad_run(recipe, tiny_cifar, out)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sparsities", "0.5", "1.0"], r"--sparsities: every value must be in \[0, 1\)"),
        (["--sparsity", "1.5"], r"sparsity must be in \[0, 1\)"),
        (["--teacher_epochs", "0"], "No trained teacher"),
        (["--augmentation", "mixup"], "--augmentation must be one of"),
        (["--sparsity", "0.5", "--sparsities", "0.5", "0.8"], "were both given"),
        (
            ["--prune_exclude", "no_such_layer"],
            "`prune_exclude` pattern 'no_such_layer' matches no prunable parameter",
        ),
        (["--sparsities", "0.9", "0.90000001"], "duplicates"),
        (["--fp16", "True", "--use_cpu", "True"], "fp16"),
        (["--per_device_train_batch_size", "0"], "batch_size"),
        (["--resume_from_checkpoint", "/no/such/run"], "resumes a whole run"),
        (["--resume_from_checkpoint", "True"], "holds no results.json"),
    ],
)
def test_bad_arguments(recipe, tiny_cifar, tmp_path, extra, message):
    from hf_tgprune.scripts import RecipeError

    with pytest.raises(RecipeError, match=message):
        _bad_run(recipe, tiny_cifar, tmp_path / "out", *extra)


@pytest.mark.parametrize("epochs", ["1", "0"])
def test_gradual_schedule_longer_than_the_retraining_is_refused_before_any_stage(recipe, tiny_cifar, tmp_path, epochs):
    from hf_tgprune.scripts import RecipeError

    out = tmp_path / "out"
    with pytest.raises(
        RecipeError, match=r"pruning_steps=10 mask updates over \d+ training step.*lower pruning_steps"
    ):
        _bad_run(recipe, tiny_cifar, out, "--pruning_method", "gradual", "--num_train_epochs", epochs)
    assert not (out / "teacher").exists()


def test_push_to_hub_needs_network_and_token(recipe, tiny_cifar, tmp_path, monkeypatch):
    import huggingface_hub

    from hf_tgprune.scripts import RecipeError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RecipeError, match="HF_HUB_OFFLINE is set"):
        _bad_run(recipe, tiny_cifar, tmp_path / "out", "--push_to_hub", "True")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(RecipeError, match="write token"):
        _bad_run(recipe, tiny_cifar, tmp_path / "out", "--push_to_hub", "True")
    assert not (tmp_path / "out").exists()


def test_offline_hub_dataset_error_from_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(RECIPE), "--dataset_name", "uoft-cs/cifar10", "--output_dir", str(tmp_path / "o")],
        env=_env() | {"HF_HOME": str(tmp_path / "hf")},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert "prune_cifar.py: error:" in result.stderr and "Pass a local folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_every_argument():
    result = subprocess.run(
        [sys.executable, str(RECIPE), "--help"], env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in (
        "--sparsities",
        "--pruning_method_args",
        "--recalibrate_bn",
        "--layer_density_floor",
        "--learning_rate",
    ):
        assert flag in result.stdout


def test_every_config_help_string_formats_with_argparse():
    """A bare % in a help string crashes `--help` (argparse formats help strings with %)."""
    from transformers import HfArgumentParser

    from hf_tgprune import TeacherGuidedPruningConfig

    assert "--pruning_method" in HfArgumentParser(TeacherGuidedPruningConfig).format_help()


@pytest.mark.slow
def test_sweep_reuses_one_scoring_pass(recipe, tiny_cifar, tmp_path, monkeypatch):
    """`--sparsities` scores once and masks nested sparsities from the same scores (in-process, tiny)."""
    from hf_tgprune.training import trainer as trainer_module

    calls = []
    original = trainer_module.TeacherGuidedPruningTrainer.compute_scores

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(trainer_module.TeacherGuidedPruningTrainer, "compute_scores", counting)
    results = _bad_run(
        recipe, tiny_cifar, tmp_path / "out",
        "--pruning_method", "snip", "--retrain_with_kd", "False", "--num_train_epochs", "0",
        "--sparsities", "0.3", "0.6", "0.9", "--plots", "False", "--report_to", "none", "--student_warmup_epochs", "0",
    )  # fmt: skip
    assert len(calls) == 1
    assert results["teacher"] is None
    assert [run["sparsity"] for run in results["runs"]] == [0.3, 0.6, 0.9]
    assert all("after_retraining" not in run for run in results["runs"])
    zeros = [run["sparsity_report"]["prunable"]["zeros"] for run in results["runs"]]
    numel = results["runs"][0]["sparsity_report"]["prunable"]["numel"]
    assert zeros == sorted(zeros) and zeros[-1] >= round(0.9 * numel)


def test_default_warmup_trains_an_untrained_student(recipe, tiny_cifar, tmp_path):
    import timm

    from hf_tgprune.io.serialization import save_sparse_model

    def warmup(*extra):
        model_args, data_args, recipe_args, args = parse_arguments(
            _common_args(tiny_cifar, tmp_path / "o") + ["--teacher_epochs", "2", *extra]
        )
        validate_arguments(model_args, data_args, recipe_args, args)
        return model_args.student_warmup_epochs

    save_sparse_model(timm.create_model("test_resnet", num_classes=NUM_CLASSES), tmp_path / "trained")
    assert warmup("--model_name_or_path", "test_resnet") == 2.0  # random weights: warm up like the teacher
    assert warmup("--model_name_or_path", str(tmp_path / "trained")) == 0.0  # trained weights: prune as is
    assert warmup("--model_name_or_path", "test_resnet", "--student_warmup_epochs", "0.5") == 0.5


@pytest.mark.slow
@pytest.mark.parametrize("method,method_args", [("imp", "rounds=2"), ("gradual", "pruning_steps=2,end_fraction=1")])
def test_pruning_schedule_runs_through_the_recipe(recipe, tiny_cifar, tmp_path, method, method_args):
    """A non-one-shot method (IMP, gradual) prunes during each run's own training; the final sparsity is exact."""
    results = _bad_run(
        recipe, tiny_cifar, tmp_path / "out",
        "--pruning_method", method, "--retrain_with_kd", "False", "--student_warmup_epochs", "0",
        "--sparsity", "0.8", "--pruning_method_args", method_args, "--plots", "False",
    )  # fmt: skip
    assert "scoring" not in results["stage_seconds"] and results["teacher"] is None
    (run,) = results["runs"]
    prunable = run["sparsity_report"]["prunable"]
    assert prunable["zeros"] >= round(0.8 * prunable["numel"]) and "after_retraining" in run
    # the model before its training is not the pruned one: no "after pruning" accuracy is reported for it
    assert "after_pruning" not in run and "after pruning" not in format_summary(results)


class _Interrupted(Exception):
    pass


@pytest.mark.slow
def test_interrupted_recipe_resumes_stage_by_stage_to_the_same_result(recipe, tiny_cifar, tmp_path, monkeypatch):
    """Killed inside the second sparsity's retraining: the resumed run reuses the teacher, the dense student, the
    finished sparsity and the checkpoint, and ends with the masks, weights and accuracies of an uninterrupted run."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    args = _common_args(tiny_cifar, tmp_path / "x") + ["--model_name_or_path", "test_resnet", "--plots", "False"]
    args += ["--sparsities", "0.5", "0.8", "--num_train_epochs", "2", "--save_strategy", "epoch"]
    args += ["--student_warmup_epochs", "1"]

    def run(out, *extra):
        return recipe.main([*args, "--output_dir", str(out), *extra])

    reference = run(tmp_path / "reference")

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if args.output_dir.endswith("sparsity-0.8") and state.global_step > state.max_steps // 2:
                raise _Interrupted  # after the epoch-1 checkpoint of the second sparsity

    original = stages.make_trainer
    calls = {"trainers": 0, "scoring": 0, "train": 0}

    def interrupting(*a, **kw):
        calls["trainers"] += 1
        return original(*a, callbacks=[*kw.pop("callbacks", []), Stop()], **kw)

    monkeypatch.setattr(stages, "make_trainer", interrupting)
    with pytest.raises(_Interrupted):
        run(tmp_path / "resumed")
    partial = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert [r["sparsity"] for r in partial["runs"]] == [0.5] and "sparsity-0.8" in partial["in_progress"]

    def counting(*a, **kw):
        trainer = original(*a, **kw)
        for name in ("compute_scores", "train"):
            method = getattr(trainer, name)

            def wrapped(*args_, _method=method, _name=name, **kwargs_):
                calls["scoring" if _name == "compute_scores" else "train"] += 1
                return _method(*args_, **kwargs_)

            setattr(trainer, name, wrapped)
        return trainer

    monkeypatch.setattr(stages, "make_trainer", counting)
    resumed = run(tmp_path / "resumed", "--resume_from_checkpoint", "True")
    assert calls["scoring"] == 0  # the scoring pass, the teacher and the warm-up were not run again
    assert calls["train"] == 1  # only the interrupted retraining, from its checkpoint
    assert [r["sparsity"] for r in resumed["runs"]] == [0.5, 0.8] and not resumed["in_progress"]
    for ours, theirs in zip(resumed["runs"], reference["runs"]):
        assert ours["mask_sha256"] == theirs["mask_sha256"]
        assert ours["after_retraining"]["accuracy"] == pytest.approx(theirs["after_retraining"]["accuracy"])
        ours_w = load_file(str(tmp_path / "resumed" / run_dir_name(ours) / "model.safetensors"))
        theirs_w = load_file(str(tmp_path / "reference" / run_dir_name(theirs) / "model.safetensors"))
        for name, tensor in theirs_w.items():
            torch.testing.assert_close(ours_w[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def run_dir_name(run) -> str:
    return Path(run["model_dir"]).name


# --- inference export (issue 12) and plug-and-play loading of the saved outputs (issue 10) --------------------------
def _test_images(tiny_cifar: Path, count: int):
    """The recipe's test images as a user has them: PIL images and labels of the dataset's test split, the first
    `count` (the recipe's `--max_eval_samples` keeps the first ones)."""
    split = datasets.Dataset.from_parquet(str(tiny_cifar / "plain_text" / "test-00000-of-00001.parquet"))
    split = split.select(range(count))
    return list(split["img"]), list(split["label"])


def _recipe_logits(run_dir: str, data_config: dict, images) -> torch.Tensor:
    """Logits with the preprocessing the recipe evaluated with (its eval transform; `data_config` as results.json
    records it), for comparison."""
    from hf_tgprune import load_image_classifier
    from hf_tgprune.core.adapters import get_adapter
    from hf_tgprune.data import DataConfig, build_transforms

    config = DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()})
    _, transform = build_transforms(config)
    model = load_image_classifier(run_dir, NUM_CLASSES).eval()
    with torch.no_grad():
        return get_adapter(model).logits(model, torch.stack([transform(image) for image in images]))


@pytest.mark.slow
def test_recipe_export_sparse_inference_and_plug_and_play_timm(recipe, tiny_cifar, tmp_path):
    """--export_sparse_inference: dense vs exported latency in results.json, sparsity.json and the card; the saved timm
    model, evaluated the standard timm way on the test images, gives the accuracy results.json reports."""
    import timm
    from timm.data import create_transform, resolve_model_data_config

    from hf_tgprune.io.modelcard import InferenceSpeed, create_model_card

    out = tmp_path / "out"
    # 48 px (the images are 32 px): the standard preprocessing must resize like the recipe's; 9 steps of AdamW give
    # an accuracy between chance and 100%, so that a different preprocessing would show
    recipe.main(
        _common_args(tiny_cifar, out) + [
            "--model_name_or_path", "test_vit", "--pruning_method", "snip", "--retrain_with_kd", "False",
            "--student_warmup_epochs", "0", "--sparsity", "0.8", "--plots", "False", "--image_size", "48",
            "--augmentation", "none", "--optim", "adamw_torch", "--learning_rate", "0.003", "--max_steps", "9",
            "--export_sparse_inference", "True", "--inference_batch_sizes", "4", "1", "--inference_repeats", "2",
        ]
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    (run,) = results["runs"]
    figures = run["inference"]
    assert figures["threads"] == torch.get_num_threads() and figures["device"].startswith("CPU: ")
    assert figures["input_shape"] == [3, 48, 48] and figures["repeats"] == 2
    assert [row["batch_size"] for row in figures["latencies"]] == [1, 4]
    for row in figures["latencies"]:
        assert row["dense_ms"] > 0 and row["sparse_ms"] > 0  # recorded, not asserted: speed is the machine's
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["sparse_ms"])
        assert 0 <= row["layers_converted"] <= row["layers_candidate"] and row["layers_candidate"] >= 8
        assert row["max_abs_error"] is not None and row["max_abs_error"] < 1e-3
    assert results["stage_seconds"]["sparsity-0.8/inference_speed"] > 0
    # the saved folder records the same figures, and its card states the speed-up and the machine
    record = json.loads((Path(run["model_dir"]) / "sparsity.json").read_text())
    assert record["inference"] == figures
    text = create_model_card(run["model_dir"], repo_id="user/vit-sparse").content
    assert "## Inference speed" in text and figures["device"] in text
    speed = InferenceSpeed.from_dict(figures)
    for latency in speed.latencies:
        assert (
            f"| {latency.batch_size} | {latency.dense_ms:.4g} | {latency.sparse_ms:.4g} | {latency.speedup:.2f}×"
            in text
        )
        assert f"{latency.speedup:.2f}× at batch size {latency.batch_size}" in text

    # plug and play: plain timm with the preprocessing the folder declares (not test_vit's own 0.95 crop)
    images, labels = _test_images(tiny_cifar, results["dataset"]["test"])
    model = timm.create_model(f"local-dir:{run['model_dir']}", pretrained=True).eval()
    data_config = resolve_model_data_config(model)
    assert data_config["input_size"] == (3, 48, 48) and data_config["crop_pct"] == 1.0  # test_vit's own: 160, 0.95

    def standard_logits(config):
        transform = create_transform(**config, is_training=False)
        with torch.no_grad():
            return model(torch.stack([transform(image.convert("RGB")) for image in images]))

    logits = standard_logits(data_config)
    accuracy = float((logits.argmax(-1) == torch.tensor(labels)).float().mean())
    assert 0.25 < run["after_retraining"]["accuracy"] < 1.0  # between chance and perfect: preprocessing matters
    assert accuracy == run["after_retraining"]["accuracy"]
    torch.testing.assert_close(logits, _recipe_logits(run["model_dir"], results["data_config"], images))
    # the comparison has teeth: timm's usual center crop (0.875) gives other logits
    assert not torch.allclose(standard_logits({**data_config, "crop_pct": 0.875}), logits, atol=1e-3)


@pytest.mark.slow
def test_recipe_plug_and_play_transformers_without_inference_export(recipe, tiny_cifar, tmp_path):
    """A transformers student's saved output, evaluated with AutoModelForImageClassification + AutoImageProcessor
    on the test images, gives the accuracy in results.json; without --export_sparse_inference nothing is measured."""
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageClassification,
        ResNetConfig,
        ResNetForImageClassification,
    )

    from hf_tgprune.io.modelcard import create_model_card

    student_dir = tmp_path / "hf_student"
    config = ResNetConfig(num_labels=NUM_CLASSES, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    torch.manual_seed(0)
    ResNetForImageClassification(config).save_pretrained(student_dir)
    out = tmp_path / "out"
    recipe.main(
        _common_args(tiny_cifar, out) + [
            "--model_name_or_path", str(student_dir), "--pruning_method", "snip", "--retrain_with_kd", "False",
            "--sparsity", "0.7", "--plots", "False", "--image_size", "48",
        ]
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    (run,) = results["runs"]
    assert "inference" not in run and not any(stage.endswith("inference_speed") for stage in results["stage_seconds"])
    record = json.loads((Path(run["model_dir"]) / "sparsity.json").read_text())
    assert "inference" not in record
    text = create_model_card(run["model_dir"]).content
    assert "Inference speed" not in text and "export_sparse_inference" not in text

    images, labels = _test_images(tiny_cifar, results["dataset"]["test"])
    processor = AutoImageProcessor.from_pretrained(run["model_dir"])
    assert processor.crop_size == {"height": 48, "width": 48}
    model = AutoModelForImageClassification.from_pretrained(run["model_dir"]).eval()
    with torch.no_grad():
        logits = model(**processor(images=images, return_tensors="pt")).logits
    accuracy = float((logits.argmax(-1) == torch.tensor(labels)).float().mean())
    assert accuracy == run["after_retraining"]["accuracy"]
    torch.testing.assert_close(logits, _recipe_logits(run["model_dir"], results["data_config"], images))


def test_inference_arguments_need_the_flag_and_valid_values(recipe, tiny_cifar, tmp_path):
    from hf_tgprune.scripts import RecipeError

    with pytest.raises(RecipeError, match="add --export_sparse_inference True"):
        _bad_run(recipe, tiny_cifar, tmp_path / "out", "--inference_batch_sizes", "1")
    with pytest.raises(RecipeError, match="--inference_batch_sizes must be >= 1"):
        _bad_run(
            recipe, tiny_cifar, tmp_path / "out", "--export_sparse_inference", "True", "--inference_batch_sizes", "0"
        )
    with pytest.raises(RecipeError, match="--inference_repeats must be >= 1"):
        _bad_run(recipe, tiny_cifar, tmp_path / "out", "--export_sparse_inference", "True", "--inference_repeats", "0")
    assert not (tmp_path / "out").exists()


def test_measure_inference_speed_records_the_export_and_leaves_the_model_alone():
    """A dense (unpruned) model: the export converts nothing, so the speed-up is exactly 1 (not timing noise); the
    masks are applied to the measured copy only."""
    from hf_tgprune.scripts import measure_inference_speed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, NUM_CLASSES))
    before = model[1].weight.detach().clone()
    masks = {"1.weight": torch.ones_like(before, dtype=torch.bool)}
    masks["1.weight"][:, ::2] = False  # density 0.5 = max_density: timed
    speed = measure_inference_speed(model.train(), torch.randn(3, 3, 8, 8), [1, 5], repeats=1, masks=masks)
    assert torch.equal(model[1].weight, before) and model.training  # the caller's model is untouched
    assert [latency.batch_size for latency in speed.latencies] == [1, 5]
    assert speed.input_shape == [3, 8, 8] and speed.threads == torch.get_num_threads() and speed.repeats == 1
    for latency in speed.latencies:
        assert latency.layers_candidate == 1 and latency.dense_ms > 0
        if latency.layers_converted == 0:
            assert latency.sparse_ms == latency.dense_ms and latency.speedup == 1.0
    dense = measure_inference_speed(model, torch.randn(2, 3, 8, 8), [1], repeats=1)  # density 1: never converted
    (latency,) = dense.latencies
    assert latency.layers_converted == 0 and latency.speedup == 1.0 and latency.max_abs_error == 0.0


def test_resume_with_other_arguments_is_refused_listing_them(recipe, tiny_cifar, tmp_path):
    """Issue 17, item 2: run B resumed run A's folder with another student, method and seed and mixed the two."""
    from hf_tgprune.scripts import RecipeError

    out = tmp_path / "out"
    args = [*_common_args(tiny_cifar, out), "--model_name_or_path", "test_resnet", "--plots", "False"]
    args += ["--sparsities", "0.5", "--num_train_epochs", "0", "--teacher_epochs", "0", "--retrain_with_kd", "False"]
    args += ["--pruning_method", "magnitude"]
    first = recipe.main(args)
    before = (out / "results.json").read_text()
    other = [*args, "--resume_from_checkpoint", "True", "--seed", "1", "--pruning_method", "snip"]
    other += ["--sparsities", "0.5", "0.8", "--model_name_or_path", "test_vit"]
    with pytest.raises(RecipeError, match="--model_name_or_path 'test_resnet' -> 'test_vit'.*--seed 0 -> 1"):
        recipe.main(other)
    assert (out / "results.json").read_text() == before and not (out / "sparsity-0.8").exists()
    assert first["runs"][0]["sparsity"] == 0.5


def _dataset_folder(root: Path, labels: list[int]) -> Path:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in labels]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    (root / "data").mkdir(parents=True)
    for split in ("train", "test"):
        datasets.Dataset.from_dict({"img": images, "label": labels}, features=features).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet")
        )
    return root


@pytest.mark.parametrize("case", ["label -1", "label >= classes", "empty folder", "csv file"])
def test_bad_data_is_a_clear_error_before_any_folder_or_training(recipe, tmp_path, case):
    """Issue 17, item 15: labels -1 or >= num_labels, an empty dataset folder, a CSV path."""
    from hf_tgprune.data import DataError

    if case == "label -1":
        dataset, message = _dataset_folder(tmp_path / "d", [0, 1, 2, -1] * 8), "outside \\[0, 3\\).*-1"
    elif case == "label >= classes":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = _dataset_folder(tmp_path / "d", [0, 1] * 16)
        features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
        datasets.load_dataset(str(path), split="train").cast(features).to_parquet(str(tmp_path / "ok.parquet"))
        table = pq.read_table(tmp_path / "ok.parquet")  # a ClassLabel of 2 names whose data holds a 5 (another tool)
        labels = table.column("label").to_pylist()
        labels[3] = 5
        table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int64()))
        (tmp_path / "e" / "data").mkdir(parents=True)
        for split in ("train", "test"):
            pq.write_table(table, tmp_path / "e" / "data" / f"{split}-00000-of-00001.parquet")
        dataset, message = tmp_path / "e", "outside \\[0, 2\\).*5"
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        dataset, message = tmp_path / "empty", "empty folder"
    else:
        (tmp_path / "labels.csv").write_text("image,label\nx.png,0\n")
        dataset, message = tmp_path / "labels.csv", "image column"
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        recipe.main([*_common_args(dataset, out), "--model_name_or_path", "test_resnet"])
    assert not out.exists()


def test_a_sweep_killed_when_the_second_prune_starts_resumes_to_the_same_weights(
    recipe, tiny_cifar, tmp_path, monkeypatch
):
    """Issue 17, item 11: killed as `prune` starts for the second sparsity of a teacher-guided sweep, the resumed run
    scores again (no shared scores in memory) and must still retrain exactly as the uninterrupted run did."""
    from safetensors.torch import load_file

    args = _common_args(tiny_cifar, tmp_path / "x") + ["--model_name_or_path", "test_resnet", "--plots", "False"]
    args += ["--sparsities", "0.5", "0.8", "--pruning_method", "tgp"]

    def run(out, *extra):
        return recipe.main([*args, "--output_dir", str(out), *extra])

    reference = run(tmp_path / "reference")
    original = stages.make_trainer

    def interrupting(*a, **kw):
        trainer = original(*a, **kw)
        if trainer.args.output_dir.endswith("sparsity-0.8"):

            def killed(*_, **__):
                raise _Interrupted

            trainer.prune = killed
        return trainer

    monkeypatch.setattr(stages, "make_trainer", interrupting)
    with pytest.raises(_Interrupted):
        run(tmp_path / "resumed")
    monkeypatch.setattr(stages, "make_trainer", original)
    resumed = run(tmp_path / "resumed", "--resume_from_checkpoint", "True")
    for ours, theirs in zip(resumed["runs"], reference["runs"]):
        assert ours["mask_sha256"] == theirs["mask_sha256"]
        ours_w = load_file(str(tmp_path / "resumed" / run_dir_name(ours) / "model.safetensors"))
        theirs_w = load_file(str(tmp_path / "reference" / run_dir_name(theirs) / "model.safetensors"))
        assert all(torch.equal(ours_w[name], tensor) for name, tensor in theirs_w.items()), ours["sparsity"]


def test_a_run_killed_after_its_last_checkpoint_resumes_without_training_further(
    recipe, tiny_cifar, tmp_path, monkeypatch
):
    """Issue 17, item 12: killed during save_model after the last checkpoint, the resumed run trained one step past
    --max_steps and recorded other weights."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    args = _common_args(tiny_cifar, out) + ["--model_name_or_path", "test_resnet", "--plots", "False"]
    args += ["--sparsities", "0.5", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]
    original = stages.make_trainer

    def interrupting(*a, **kw):
        trainer = original(*a, **kw)
        if trainer.args.output_dir.endswith("sparsity-0.5"):
            save = trainer.save_model

            def killed(*a, _internal_call=False, **kw):
                if _internal_call:  # the Trainer's own checkpoints are written
                    return save(*a, _internal_call=True, **kw)
                raise _Interrupted  # the final save of the finished run is not

            trainer.save_model = killed
        return trainer

    monkeypatch.setattr(stages, "make_trainer", interrupting)
    with pytest.raises(_Interrupted):
        recipe.main(args)
    last = load_file(str(out / "sparsity-0.5" / "checkpoint-4" / "model.safetensors"))
    monkeypatch.setattr(stages, "make_trainer", original)
    recipe.main([*args, "--resume_from_checkpoint", "True"])
    record = json.loads((out / "sparsity-0.5" / "sparsity.json").read_text())
    assert record["global_step"] == 4
    saved = load_file(str(out / "sparsity-0.5" / "model.safetensors"))
    assert all(torch.equal(saved[name], tensor) for name, tensor in last.items())


def test_recipe_does_not_clip_gradients_unless_asked(tiny_cifar, tmp_path):
    """The recipe's SGD follows the authors (no clipping); TrainingArguments' 1.0 stays one argument away."""
    *_, args = parse_arguments(_common_args(tiny_cifar, tmp_path / "o"))
    assert args.max_grad_norm == 0.0
    *_, clipped = parse_arguments(_common_args(tiny_cifar, tmp_path / "o") + ["--max_grad_norm", "1.0"])
    assert clipped.max_grad_norm == 1.0
