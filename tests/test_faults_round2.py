"""The second round of faults and hostile files (issue 17): nothing lost, nothing executed, nothing mixed. Each test
names the case it covers; every one failed before its fix."""

import json
import os
from pathlib import Path

import pytest
import torch

from hf_tgprune import load_sparse, save_sparse_model
from hf_tgprune.io.hub import check_sparse_folder
from hf_tgprune.io.serialization import DENSE_WEIGHTS_NAME, SPARSITY_FILE_NAME, SparseFormatError
from tests.test_faults import pruned, same_state, state_of


def _saved(tmp_path, save_format="dense"):
    model, masks = pruned()
    save_sparse_model(model, tmp_path / "out", masks, save_format=save_format)
    return tmp_path / "out", model


def _tamper_weights(folder):
    """Change one kept weight in the dense file without touching its record (a corrupted or malicious file)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / DENSE_WEIGHTS_NAME))
    name = next(k for k in state if k.endswith("conv1.weight"))
    state[name] = state[name] + 1.0
    save_file(state, str(folder / DENSE_WEIGHTS_NAME), {"format": "pt"})


@pytest.mark.parametrize(
    "named", ["../../../../etc/passwd", "model.safetensors ", "model.bitmask.safetensors", "sub/model.safetensors"]
)
def test_weights_file_in_the_record_cannot_switch_off_verification(tmp_path, named):
    folder, model = _saved(tmp_path)
    _tamper_weights(folder)
    record = json.loads((folder / SPARSITY_FILE_NAME).read_text())
    record["weights_file"] = named
    (folder / SPARSITY_FILE_NAME).write_text(json.dumps(record))
    with pytest.raises(SparseFormatError, match="names the weights file"):
        load_sparse(folder, model)
    with pytest.raises(SparseFormatError, match="names the weights file"):
        check_sparse_folder(folder)  # push_sparse_folder checks the folder with it before any upload


def test_a_tampered_weights_file_with_an_honest_record_is_still_refused(tmp_path):
    folder, model = _saved(tmp_path)
    _tamper_weights(folder)
    with pytest.raises(SparseFormatError, match="SHA-256"):
        load_sparse(folder, model)


def test_deeply_nested_sparsity_json_is_a_format_error(tmp_path):
    folder, model = _saved(tmp_path)
    (folder / SPARSITY_FILE_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SparseFormatError, match="nests JSON deeper"):
        load_sparse(folder, model)
    assert torch.is_tensor(next(iter(model.state_dict().values())))


def test_a_folder_asking_for_its_own_code_is_refused_without_running_it(tmp_path):
    from hf_tgprune.io.models import ModelLoadError, load_image_classifier

    folder = tmp_path / "remote-code"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    (folder / "config.json").write_text(
        json.dumps({"model_type": "not_a_transformers_type", "auto_map": {"AutoConfig": "modeling.Config"}})
    )
    (folder / "modeling.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(ModelLoadError, match="auto_map"):
        load_image_classifier(str(folder))
    assert not marker.exists()


def test_a_truncated_config_json_is_named_as_truncated(tmp_path):
    from hf_tgprune.io.models import ModelLoadError, load_image_classifier

    folder, _ = _saved(tmp_path)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON.*truncated"):
        load_image_classifier(str(folder))


# --- clear errors instead of deep tracebacks (issue 17, item 14) ------------------------------------------------------
def test_a_string_sparsity_names_the_argument():
    from hf_tgprune import PruningArguments

    with pytest.raises(TypeError, match="sparsity must be a number, got '0.9'"):
        PruningArguments(sparsity="0.9")


def test_frozen_prunable_weights_with_a_gradient_criterion_name_the_layers_and_the_fix():
    from hf_tgprune import Pruner, PruningArguments
    from tests.utils import RandomImages, make_model

    model = make_model("timm_resnet")
    model.layer1.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen.*layer1.*prune_exclude"):
        Pruner(model, PruningArguments(pruning_method="snip"), calibration_dataset=RandomImages(8))
    Pruner(model, PruningArguments(pruning_method="magnitude"), calibration_dataset=RandomImages(8)).prune()


def test_a_bf16_teacher_guides_an_fp32_student(tmp_path):
    from hf_tgprune import Pruner, PruningArguments, TeacherGuidedPruningTrainer
    from tests.utils import RandomImages, make_model, tiny_config

    teacher = make_model("hf_resnet", seed=1).to(torch.bfloat16)
    pruner = Pruner(
        make_model("timm_resnet"),
        PruningArguments(pruning_method="tgp", num_calibration_samples=8, calibration_batch_size=4),
        teacher=teacher,
        calibration_dataset=RandomImages(8),
    )
    assert pruner.prune()["pruned_by_mask"] > 0
    trainer = TeacherGuidedPruningTrainer(
        model=make_model("timm_resnet"),
        teacher_model=teacher,
        args=tiny_config(tmp_path, max_steps=1),
        train_dataset=RandomImages(8),
    )
    trainer.train()
    assert trainer.state.global_step == 1


def test_push_to_hub_that_fails_at_repo_creation_has_saved_the_model_first(tmp_path, monkeypatch):
    """Issue 17, item 4: the error's advice (push the intact output later with push_sparse_folder) is true."""
    import huggingface_hub
    from huggingface_hub import errors

    import hf_tgprune.io.hub as hub
    from hf_tgprune import HubPushError, TeacherGuidedPruningTrainer
    from tests.test_hub import FakeHub
    from tests.utils import RandomImages, make_model, tiny_config

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_local_token")
    offline = FakeHub(tmp_path / "hub-cache", fail={"create_repo": errors.OfflineModeIsEnabled("offline")})
    monkeypatch.setattr(hub, "HfApi", offline)
    args = tiny_config(tmp_path, pruning_method="magnitude", retrain_with_kd=False, max_steps=1, hub_model_id="u/r")
    trainer = TeacherGuidedPruningTrainer(model=make_model("timm_resnet"), args=args, train_dataset=RandomImages(16))
    trainer.train()
    with pytest.raises(HubPushError, match="intact"):
        trainer.push_to_hub()
    check_sparse_folder(args.output_dir)  # complete and verified: push_sparse_folder can upload it later
    online = FakeHub(tmp_path / "hub-cache2")
    monkeypatch.setattr(hub, "HfApi", online)
    hub.push_sparse_folder(args.output_dir, "u/r")
    assert SPARSITY_FILE_NAME in online.uploads()[-1]["files"]


def test_a_student_wrapped_by_torch_prune_is_refused_naming_the_fix(tmp_path):
    """Issue 17, item 13: wrapped layers were silently left out (and saved as weight_orig)."""
    import torch.nn.utils.prune as torch_prune

    from hf_tgprune import TeacherGuidedPruningTrainer
    from tests.utils import RandomImages, make_model, tiny_config

    model = make_model("timm_resnet")
    torch_prune.l1_unstructured(model.layer1[0].conv1, "weight", amount=0.5)
    with pytest.raises(ValueError, match="torch.nn.utils.prune.*layer1.0.conv1.weight.*prune.remove"):
        TeacherGuidedPruningTrainer(
            model=model,
            args=tiny_config(tmp_path, pruning_method="magnitude", retrain_with_kd=False),
            train_dataset=RandomImages(16),
        )
    mask = model.layer1[0].conv1.weight_mask.bool()
    torch_prune.remove(model.layer1[0].conv1, "weight")  # the fix the message names
    trainer = TeacherGuidedPruningTrainer(
        model=model,
        args=tiny_config(tmp_path, pruning_method="magnitude", retrain_with_kd=False),
        train_dataset=RandomImages(16),
        masks={"layer1.0.conv1.weight": mask},
    )
    assert torch.equal(trainer.masks["layer1.0.conv1.weight"], mask)


def test_resuming_a_finished_checkpoint_does_not_train_further(tmp_path):
    """Issue 17, item 12: a run killed after its last checkpoint resumed to step max_steps + 1."""
    from safetensors.torch import load_file

    from hf_tgprune import TeacherGuidedPruningTrainer
    from tests.utils import RandomImages, make_model, tiny_config

    def trainer(seed):
        args = tiny_config(
            tmp_path,
            pruning_method="magnitude",
            retrain_with_kd=False,
            max_steps=2,
            save_strategy="steps",
            save_steps=2,
        )
        return TeacherGuidedPruningTrainer(
            model=make_model("timm_resnet", seed=seed), args=args, train_dataset=RandomImages(16)
        )

    trainer(0).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    saved = load_file(str(checkpoint / DENSE_WEIGHTS_NAME))
    resumed = trainer(3)
    output = resumed.train(resume_from_checkpoint=True)
    assert output.global_step == 2 and resumed.state.global_step == 2
    assert all(torch.equal(saved[k], v) for k, v in resumed.model.state_dict().items() if k in saved)
    assert not (tmp_path / "out" / "checkpoint-3").exists()


_SAVER = """
import sys
import torch
sys.path.insert(0, {root!r})
from hf_tgprune import save_sparse_model
from tests.test_faults import pruned, same_state, state_of
model, masks = pruned(seed={seed})
failures = 0
for _ in range({n}):
    try:
        save_sparse_model(model, {folder!r}, masks)
    except Exception as err:
        failures += 1
        print(type(err).__name__, err, file=sys.stderr)
print(failures)
"""


def test_concurrent_saves_into_one_folder_take_turns(tmp_path):
    """Issue 17, item 5: two processes saving 25 times each into one folder; every save used to be able to delete
    the other's staging folder (21 of 50 failed with FileNotFoundError)."""
    import subprocess
    import sys
    from pathlib import Path

    from hf_tgprune.io.serialization import verify_sparse_folder

    root = str(Path(__file__).resolve().parents[1])
    folder = str(tmp_path / "out")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SAVER.format(root=root, seed=seed, n=25, folder=folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        )
        for seed in (0, 1)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [out.strip().splitlines()[-1] for out, _ in outputs] == ["0", "0"], [err[-2000:] for _, err in outputs]
    verify_sparse_folder(folder)  # the last save is complete
    assert not [p for p in (tmp_path).iterdir() if ".tgp-new" in p.name or ".tgp-old" in p.name]


@pytest.mark.parametrize("save_format", ["dense", "bitmask"])
def test_an_edited_config_json_is_refused(tmp_path, save_format):
    """Issue 17, item 10: editing model_args.act_layer of a verified timm folder loaded silently with other logits."""
    from hf_tgprune.io.models import ModelLoadError, load_image_classifier

    folder, model = _saved(tmp_path, save_format)
    record = json.loads((folder / SPARSITY_FILE_NAME).read_text())
    assert set(record["files"]) >= {"config.json", record["weights_file"]}
    load_image_classifier(str(folder))  # intact: loads
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("model_args", {})["act_layer"] = "gelu"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises((SparseFormatError, ModelLoadError), match="config.json.*SHA-256"):
        load_image_classifier(str(folder))
    with pytest.raises(SparseFormatError, match="config.json.*SHA-256"):
        load_sparse(folder, model)
    with pytest.raises(SparseFormatError, match="config.json.*SHA-256"):
        check_sparse_folder(folder)


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a fresh tmpfs at a path (root only; skipped where mounting is not permitted)."""
    import subprocess

    mounted = []

    def mount(path):
        path.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(path)], capture_output=True).returncode != 0:
            pytest.skip("mounting a tmpfs is not permitted here")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], capture_output=True)


@pytest.mark.parametrize("save_format", ["dense", "bitmask"])
def test_a_mount_inside_the_output_folder_is_never_emptied(tmp_path, tmpfs, save_format):
    """Issue 17, item 1: the swap copied the mounted files, then deleted the old folder, walking into the mount."""
    from hf_tgprune.io.serialization import verify_sparse_folder

    folder, model = _saved(tmp_path)
    data = tmpfs(folder / "data")
    (data / "images.bin").write_bytes(b"user data")
    (data / "sub").mkdir()
    (data / "sub" / "more.txt").write_text("mine")
    model2, masks2 = pruned(seed=1)
    save_sparse_model(model2, folder, masks2, save_format=save_format)
    assert (data / "images.bin").read_bytes() == b"user data" and (data / "sub" / "more.txt").read_text() == "mine"
    assert os.path.ismount(data)
    verify_sparse_folder(folder)
    assert not [p for p in folder.iterdir() if p.name.startswith(".tgp-inplace")]


def test_an_output_folder_that_is_a_mount_point_is_saved_file_by_file(tmp_path, tmpfs):
    """Issue 17, item 6: a Docker volume / PVC as output_dir failed with EBUSY from the folder swap."""
    from hf_tgprune.io.serialization import verify_sparse_folder

    folder = tmpfs(tmp_path / "volume")
    (folder / "notes.txt").write_text("mine")
    for seed, save_format in ((0, "dense"), (1, "bitmask"), (2, "dense")):
        model, masks = pruned(seed=seed)
        save_sparse_model(model, folder, masks, save_format=save_format)
        verify_sparse_folder(folder)
        assert same_state(load_sparse(folder), state_of(model, masks))
    assert (folder / "notes.txt").read_text() == "mine" and os.path.ismount(folder)
    assert not (folder / "model.bitmask.safetensors").exists()  # the other format's stale file is removed


@pytest.mark.parametrize("family", ["timm_resnet", "hf_resnet"])
def test_a_config_describing_a_huge_model_is_refused_before_anything_is_allocated(tmp_path, family, monkeypatch):
    """Issue 17, item 8: a 511-byte edit of config.json made the loader build a ~150 GB model before comparing it
    with the 1.5 MB weights (here without a sparsity.json, so no checksum can catch the edit)."""
    import torch.nn as nn

    from hf_tgprune.io.models import ModelLoadError, load_image_classifier
    from tests.utils import make_model

    model = make_model(family)
    save_sparse_model(model, tmp_path / "out")
    folder = tmp_path / "out"
    (folder / SPARSITY_FILE_NAME).unlink()  # a plain folder: nothing records the config's checksum
    config = json.loads((folder / "config.json").read_text())
    if family == "timm_resnet":
        config["num_classes"] = 30_000_000  # a head of billions of values
    else:
        config["hidden_sizes"] = [4096 * 4] * len(config["hidden_sizes"])
    (folder / "config.json").write_text(json.dumps(config))
    allocated = []
    monkeypatch.setattr(nn.Linear, "reset_parameters", lambda self: allocated.append(self.weight.device.type))
    with pytest.raises(ModelLoadError, match="does not belong with the weights"):
        load_image_classifier(str(folder))
    assert set(allocated) <= {"meta"}  # built on the meta device only


def test_a_full_disk_while_checkpointing_says_so_and_names_the_intact_checkpoint(tmp_path, monkeypatch):
    """Issue 17, item 16: torch's zip writer reported "unexpected pos 424000 vs 423888" on a full disk."""
    from hf_tgprune import TeacherGuidedPruningTrainer
    from tests.utils import RandomImages, make_model, tiny_config

    args = tiny_config(
        tmp_path, pruning_method="magnitude", retrain_with_kd=False, max_steps=4, save_strategy="steps", save_steps=2
    )
    trainer = TeacherGuidedPruningTrainer(model=make_model("timm_resnet"), args=args, train_dataset=RandomImages(16))
    original = trainer._save_optimizer_and_scheduler

    def full_at_the_second(output_dir):
        if output_dir.endswith("checkpoint-4"):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 424000 vs 423888")
        return original(output_dir)

    monkeypatch.setattr(trainer, "_save_optimizer_and_scheduler", full_at_the_second)
    with pytest.raises(OSError, match="disk is full.*newest complete checkpoint is .*checkpoint-2.*resume"):
        trainer.train()


def test_a_folder_whose_parent_is_not_writable_is_saved_file_by_file(tmp_path, monkeypatch):
    """Issue 17, item 6: a writable output folder in a read-only parent (PermissionError on the staging folder)."""
    import hf_tgprune.io.serialization.publish as publish
    from hf_tgprune.io.serialization import verify_sparse_folder

    folder, _ = _saved(tmp_path)
    readonly_parent = folder.parent
    real_access = os.access
    monkeypatch.setattr(
        publish.os, "access", lambda path, mode: False if Path(path) == readonly_parent else real_access(path, mode)
    )
    monkeypatch.setattr(publish.tempfile, "mkdtemp", _refusing_mkdtemp(readonly_parent, publish.tempfile.mkdtemp))
    model, masks = pruned(seed=2)
    save_sparse_model(model, folder, masks)
    verify_sparse_folder(folder)
    assert same_state(load_sparse(folder), state_of(model, masks))


def _refusing_mkdtemp(readonly: Path, mkdtemp):
    def refusing(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == readonly:
            raise PermissionError(13, "Permission denied", str(dir))
        return mkdtemp(*args, dir=dir, **kwargs)

    return refusing
