"""Pure helpers of `hf_tgprune.scripts`: config files, output-folder guard, model loading, results and plots."""

import json

import pytest
import torch

from hf_tgprune.io.models import ModelLoadError, has_trained_weights, load_image_classifier, model_source
from hf_tgprune.scripts.plots import plot_accuracy_vs_sparsity, plot_layer_sparsity
from hf_tgprune.scripts.utils import (
    RecipeError,
    StageTimer,
    check_output_dir,
    expand_config_args,
    format_summary,
    hub_repo_for,
    run_dirname,
    stage_args,
    strip_prefix,
    write_json,
)


# --- config files ----------------------------------------------------------------------------------------------
def test_single_yaml_file_and_overrides(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("model_name_or_path: resnet18\nsparsities: [0.9, 0.95]\npretrained: true\nmax_steps: 3\n")
    assert expand_config_args([str(config)]) == [
        "--model_name_or_path", "resnet18", "--sparsities", "0.9", "0.95", "--pretrained", "True", "--max_steps", "3",
    ]  # fmt: skip
    argv = expand_config_args(["--config", str(config), "--max_steps", "5"])
    assert argv[-2:] == ["--max_steps", "5"] and argv[:2] == ["--model_name_or_path", "resnet18"]
    assert expand_config_args(["--max_steps", "5"]) == ["--max_steps", "5"]


def test_json_config_file_parses_with_hf_argument_parser(tmp_path):
    from hf_tgprune import TeacherGuidedPruningConfig
    from hf_tgprune.scripts import PruningParser

    config = tmp_path / "recipe.json"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "sparsity": 0.8, "alpha": 0.5}))
    (args,) = PruningParser(TeacherGuidedPruningConfig).parse_args_and_config([str(config), "--alpha", "0.25"])
    assert (args.sparsity, args.alpha, args.output_dir) == (0.8, 0.25, str(tmp_path / "out"))


def test_bad_config_files(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        expand_config_args([str(tmp_path / "missing.yaml")])
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="mapping"):
        expand_config_args([str(listing)])
    with pytest.raises(RecipeError, match="--config needs"):
        expand_config_args(["--config"])


# --- output folder, names, stage configs -------------------------------------------------------------------------
def test_check_output_dir(tmp_path):
    check_output_dir(str(tmp_path / "new"), overwrite=False)
    check_output_dir(str(tmp_path), overwrite=False)  # exists but empty
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(RecipeError, match="--overwrite_output_dir"):
        check_output_dir(str(tmp_path), overwrite=False)
    check_output_dir(str(tmp_path), overwrite=True)
    with pytest.raises(RecipeError, match="not a folder"):
        check_output_dir(str(tmp_path / "results.json"), overwrite=True)


def test_names():
    assert run_dirname(0.9) == "sparsity-0.9" and run_dirname(0.9508) == "sparsity-0.9508"
    assert hub_repo_for("me/r18", "out", 0.95, sweep=False) == "me/r18"
    assert hub_repo_for("me/r18", "out", 0.95, sweep=True) == "me/r18-sparsity-95"
    assert hub_repo_for(None, "/x/run-1", 0.9, sweep=False) == "run-1"


def test_stage_args_copies_and_never_pushes(tmp_path):
    from hf_tgprune import TeacherGuidedPruningConfig

    args = TeacherGuidedPruningConfig(output_dir=str(tmp_path), push_to_hub=True, hub_model_id="me/x", sparsity=0.9)
    stage = stage_args(args, tmp_path / "teacher", sparsity=0.0, num_train_epochs=2)
    assert stage.output_dir == str(tmp_path / "teacher") and stage.sparsity == 0.0 and stage.num_train_epochs == 2
    assert stage.push_to_hub is False and args.push_to_hub is True and args.sparsity == 0.9


def test_timer_metrics_and_json(tmp_path):
    timer = StageTimer()
    with timer.measure("a"):
        pass
    with timer.measure("a"):
        pass
    assert list(timer.seconds) == ["a"] and timer.seconds["a"] >= 0 and timer.total >= timer.seconds["a"]
    metrics = {"test_accuracy": 0.5, "test_top5_accuracy": 0.9, "test_runtime": 1, "epoch": 2.0, "note": "x"}
    assert strip_prefix(metrics, "test") == {"accuracy": 0.5, "top5_accuracy": 0.9, "runtime": 1.0, "epoch": 2.0}
    write_json(tmp_path / "sub" / "r.json", {"t": torch.tensor(1.5), "xs": (1, 2)})
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {"t": 1.5, "xs": [1, 2]}


def _results():
    layers = {"conv1.weight": {"numel": 100, "zeros": 50, "sparsity": 0.5}, "fc.weight": {"numel": 10, "zeros": 9}}
    layers["fc.weight"]["sparsity"] = 0.9
    report = {
        "prunable": {"numel": 110, "zeros": 59, "sparsity": 59 / 110},
        "total": {"numel": 200, "zeros": 59, "sparsity": 0.295},
        "layers": layers,
    }
    return {
        "teacher": {"test": {"accuracy": 0.8, "top5_accuracy": 0.99}},
        "dense_student": {"test": {"accuracy": 0.7, "top5_accuracy": 0.95}},
        "runs": [
            {"sparsity": 0.5, "after_pruning": {"accuracy": 0.6}, "after_retraining": {"accuracy": 0.69},
             "sparsity_report": report},
            {"sparsity": 0.9, "after_pruning": {"accuracy": 0.1}, "after_retraining": {"accuracy": 0.5},
             "sparsity_report": report},
        ],
    }  # fmt: skip


def test_format_summary():
    text = format_summary(_results())
    assert "teacher" in text and " 80.00" in text and "90% after retraining" in text and "53.64% / 29.50%" in text


def test_plots(tmp_path):
    results = _results()
    layers = {run["sparsity"]: run["sparsity_report"]["layers"] for run in results["runs"]}
    for path in (
        plot_layer_sparsity(layers, tmp_path / "layers.png"),
        plot_accuracy_vs_sparsity(results["runs"], tmp_path / "acc.png", dense=0.7, teacher=0.8),
    ):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="No layer reports"):
        plot_layer_sparsity({}, tmp_path / "none.png")


# --- model loading -------------------------------------------------------------------------------------------------
def test_load_timm_name_and_saved_folder(tmp_path):
    from hf_tgprune.io.serialization import save_sparse_model

    model = load_image_classifier("test_resnet", 7)
    assert model.num_classes == 7 and model_source("test_resnet").name == "timm"
    assert not has_trained_weights("test_resnet", pretrained=False)
    save_sparse_model(model, tmp_path / "saved")
    assert model_source(str(tmp_path / "saved")).name == "timm-folder"
    assert has_trained_weights(str(tmp_path / "saved"), pretrained=False)
    again = load_image_classifier(str(tmp_path / "saved"), 7, strict_num_labels=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ModelLoadError, match="predicts 7 classes but the dataset has 3"):
        load_image_classifier(str(tmp_path / "saved"), 3, strict_num_labels=True)
    assert load_image_classifier(str(tmp_path / "saved"), 3).num_classes == 3  # a student gets a new head


def test_load_transformers_folder(tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_labels=4, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    ResNetForImageClassification(config).save_pretrained(tmp_path / "hf")
    assert model_source(str(tmp_path / "hf")).name == "transformers-folder"
    id2label = {i: f"c{i}" for i in range(4)}
    model = load_image_classifier(str(tmp_path / "hf"), 4, id2label=id2label, strict_num_labels=True)
    assert model.config.num_labels == 4
    assert load_image_classifier(str(tmp_path / "hf"), 6).config.num_labels == 6


def test_model_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_image_classifier(str(tmp_path / "missing_teacher"), 10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_image_classifier(str(tmp_path / "empty"), 10)
    with pytest.raises(ModelLoadError, match="offline"):  # tests run with HF_HUB_OFFLINE=1
        load_image_classifier("not-a-timm-model-name", 10)


def test_resume_refuses_arguments_that_determine_a_result_and_lists_them():
    """Issue 17, item 2: a resumed run with another model, method and seed mixed two runs in one results.json."""
    import pytest

    from hf_tgprune.scripts.utils import RecipeError, check_same_arguments

    previous = {"model_name_or_path": "a", "pruning_method": "tgp", "seed": 0, "logging_steps": 5, "sparsities": [0.5]}
    same_result = {**previous, "logging_steps": 50, "sparsities": [0.5, 0.8]}  # neutral: logging, the sweep's list
    check_same_arguments(previous, same_result)
    check_same_arguments(None, previous)  # a results.json written before arguments were recorded
    other = {**previous, "model_name_or_path": "b", "pruning_method": "magnitude", "seed": 1}
    with pytest.raises(RecipeError) as info:
        check_same_arguments(previous, other)
    message = str(info.value)
    for fragment in ("--model_name_or_path 'a' -> 'b'", "--pruning_method 'tgp' -> 'magnitude'", "--seed 0 -> 1"):
        assert fragment in message
    assert "logging_steps" not in message and "another --output_dir" in message


def test_result_arguments_are_json_and_cover_every_argument_class():
    from hf_tgprune import TeacherGuidedPruningConfig
    from hf_tgprune.scripts.utils import result_arguments

    config = TeacherGuidedPruningConfig(output_dir="x", report_to="none", sparsity=0.8)
    values = result_arguments(config)
    assert values["sparsity"] == 0.8 and values["pruning_method"] == "gradual" and values["seed"] == 42


def test_early_stopping_with_gradual_counts_only_the_final_masks(tmp_path):
    from transformers import EarlyStoppingCallback, TrainerControl, TrainerState

    from hf_tgprune import TeacherGuidedPruningConfig
    from hf_tgprune.scripts.stages import EarlyStoppingOnFinalMasks, early_stopping

    def config(**overrides):
        return TeacherGuidedPruningConfig(
            output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=10,
            num_train_epochs=10, metric_for_best_model="accuracy", greater_is_better=True, **overrides,
        )  # fmt: skip

    # 100 images, batches of 10, 10 epochs: 100 steps; gradual's last update at round(0.3 * 100) = 30
    callback = early_stopping(2, config(), 100, 0.9)
    assert isinstance(callback, EarlyStoppingOnFinalMasks) and callback.start_step == 30
    assert type(early_stopping(2, config(pruning_method="magnitude"), 100, 0.9)) is EarlyStoppingCallback
    args, state, control = config(), TrainerState(), TrainerControl()
    # the denser models before the final masks score higher; they neither count nor set the bar
    for step, accuracy in [(10, 0.9), (20, 0.8), (30, 0.5), (40, 0.6), (50, 0.55), (60, 0.58)]:
        state.global_step = step
        callback.on_evaluate(args, state, control, metrics={"eval_accuracy": accuracy})
        assert control.should_training_stop == (step == 60), step
    assert callback.best_metric == 0.6
    # the checkpoint's callback state rebuilds it as the Trainer does on resume
    saved = callback.state()
    restored = EarlyStoppingOnFinalMasks(**saved["args"])
    for key, value in saved["attributes"].items():
        setattr(restored, key, value)
    assert (restored.start_step, restored.best_metric, restored.early_stopping_patience_counter) == (30, 0.6, 2)
