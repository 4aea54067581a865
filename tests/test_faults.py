"""Fault injection: a kill or a failure at each point of a save, a corrupted file of each kind, bad inputs.

A kill is simulated by copying the whole folder tree at the instant of the injected fault (what a SIGKILL leaves on
disk) and then raising; the copy is what the next run finds. Everything runs on tiny models in well under a minute.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import struct
from pathlib import Path

import pytest
import torch
import transformers.trainer as transformers_trainer
from safetensors.torch import load_file, save_file
from transformers import TrainerState

import hf_tgprune.core.adapters as adapters
import hf_tgprune.io.serialization.save as save_module
import hf_tgprune.pruning.pruner as pruner_module
from hf_tgprune import TeacherGuidedPruningTrainer, load_sparse, load_sparse_masks, mask_hash, save_sparse_model
from hf_tgprune.core.losses import NonFiniteLogitsError, check_finite_logits
from hf_tgprune.core.masking import MaskFileError, apply_masks, global_masks, prunable_parameters
from hf_tgprune.io.models import ModelLoadError, load_image_classifier
from hf_tgprune.io.serialization import (
    BITMASK_WEIGHTS_NAME,
    DENSE_WEIGHTS_NAME,
    SPARSITY_FILE_NAME,
    SparseFormatError,
    publish,
    verify_sparse_folder,
)
from hf_tgprune.io.serialization.pruning_state import PRUNING_STATE_NAME
from tests.utils import RandomImages, make_model, tiny_config


class Killed(Exception):
    """The injected fault."""


def pruned(seed: int = 0, name: str = "timm_resnet", sparsity: float = 0.9):
    model = make_model(name, seed=seed).eval()
    scores = {n: p.detach().abs() for n, p in prunable_parameters(model).items()}
    masks = global_masks(scores, sparsity)
    apply_masks(model, masks)
    return model, masks


def state_of(model, masks) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, mask in masks.items():
        state[name] = torch.where(mask, state[name], torch.zeros((), dtype=state[name].dtype))
    return state


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


USER_FILES = {"README.md": "# my card\n", "notes.txt": "mine\n", "logs/run.txt": "step 1\n"}


def add_user_files(folder: Path) -> None:
    for name, text in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def assert_user_files(folder: Path) -> None:
    for name, text in USER_FILES.items():
        assert (folder / name).read_text() == text, name


def assert_no_leftovers(folder: Path) -> None:
    assert publish.leftovers(folder) == []
    assert not [name for name in (p.name for p in folder.iterdir()) if publish.is_atomic_write_leftover(name)]
    assert not (folder / publish.COMPLETE_MARKER).exists()


# --- a save_model into an existing folder: all-or-nothing ------------------------------------------------------------
# (module attribute patched, the state the path must hold at that instant)
SAVE_POINTS = {
    "extra files": (None, "old"),
    "weights file": ({"dense": (adapters, "save_file"), "bitmask": (save_module, "save_file")}, "old"),
    "config.json": ((adapters.TimmAdapter, "save_config"), "old"),
    "re-reading the weights": ((save_module, "read_weights"), "old"),
    "sparsity.json": ((save_module, "write_json_atomic"), "old"),
    "carrying files over": ((publish, "_carry"), "old"),
    "swap": ((publish, "_exchange"), "old"),
    "deleting the old folder": ((publish, "_discard"), "new"),
}


@pytest.mark.parametrize("point", list(SAVE_POINTS))
@pytest.mark.parametrize("save_format", ["dense", "bitmask"])
def test_a_kill_while_saving_into_an_existing_folder_keeps_a_complete_model(tmp_path, monkeypatch, point, save_format):
    target = tmp_path / "run" / "out"
    old_model, old_masks = pruned(seed=0)
    new_model, new_masks = pruned(seed=1)
    save_sparse_model(old_model, target, old_masks, save_format=save_format)
    add_user_files(target)
    (target / ".sparsity.json.k3j4h5g6.tmp").write_text('{"trunc')  # an atomic write interrupted earlier
    expected = {"old": state_of(old_model, old_masks), "new": state_of(new_model, new_masks)}
    image = tmp_path / "image"  # the disk as a kill at this point leaves it

    def at_fault(*args, **kwargs):
        shutil.copytree(tmp_path / "run", image, symlinks=True)
        assert same_state(load_sparse(target), expected[SAVE_POINTS[point][1]])  # complete, verified
        assert_user_files(target)
        raise Killed(point)

    extra = None
    patched = SAVE_POINTS[point][0]
    if patched is None:
        extra = at_fault
    else:
        monkeypatch.setattr(*(patched[save_format] if isinstance(patched, dict) else patched), at_fault)
    with pytest.raises(Killed):
        save_sparse_model(new_model, target, new_masks, save_format=save_format, write_extra_files=extra)
    assert image.is_dir()
    monkeypatch.undo()
    assert same_state(load_sparse(target), expected[SAVE_POINTS[point][1]])
    assert_user_files(target)

    # the next run saves into the folder the kill left: leftovers are cleaned, the user's files survive
    restarted = image / "out"
    save_sparse_model(new_model, restarted, new_masks, save_format=save_format)
    assert same_state(load_sparse(restarted), expected["new"])
    assert_user_files(restarted)
    assert_no_leftovers(restarted)


def test_without_an_atomic_exchange_a_kill_between_the_two_renames_is_repaired(tmp_path, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is missing, the old folder is renamed aside, then the new one in."""
    target = tmp_path / "run" / "out"
    old_model, old_masks = pruned(seed=0)
    new_model, new_masks = pruned(seed=1)
    save_sparse_model(old_model, target, old_masks)
    add_user_files(target)

    def no_exchange(a, b):
        raise OSError(errno.ENOSYS, "no renameat2")

    monkeypatch.setattr(publish, "_exchange", no_exchange)
    save_sparse_model(new_model, target, new_masks)  # the fallback works
    assert same_state(load_sparse(target), state_of(new_model, new_masks))
    assert_user_files(target)
    assert_no_leftovers(target)

    calls = []
    rename = publish._rename

    def killed_after_setting_aside(source, destination):
        calls.append(source)
        if len(calls) == 2:  # the old folder is aside, the new one not yet in place
            shutil.copytree(tmp_path / "run", tmp_path / "image", symlinks=True)
            raise Killed("between the renames")
        rename(source, destination)

    monkeypatch.setattr(publish, "_rename", killed_after_setting_aside)
    with pytest.raises(Killed):
        save_sparse_model(old_model, target, old_masks)
    monkeypatch.setattr(publish, "_rename", rename)
    assert same_state(load_sparse(target), state_of(new_model, new_masks))  # a failure rolls back

    restarted = tmp_path / "image" / "out"
    assert not restarted.exists()  # what the kill left: the complete new folder next to the path
    save_sparse_model(new_model, restarted, new_masks)
    assert same_state(load_sparse(restarted), state_of(new_model, new_masks))
    assert_user_files(restarted)
    assert_no_leftovers(restarted)


def test_a_failed_save_into_a_new_folder_leaves_nothing(tmp_path, monkeypatch):
    model, masks = pruned()

    def fail(*args, **kwargs):
        raise Killed("weights")

    monkeypatch.setattr(adapters, "save_file", fail)
    with pytest.raises(Killed):
        save_sparse_model(model, tmp_path / "new", masks)
    assert list(tmp_path.iterdir()) == []


def test_saving_into_the_working_directory(tmp_path, monkeypatch):
    model, masks = pruned()
    save_sparse_model(model, tmp_path / "out", masks)
    monkeypatch.chdir(tmp_path / "out")
    save_sparse_model(model, ".", masks, save_format="bitmask")
    assert Path(".").resolve() == (tmp_path / "out").resolve() and Path(BITMASK_WEIGHTS_NAME).is_file()
    assert same_state(load_sparse("."), state_of(model, masks))


# --- a kill at each point of a checkpoint save ----------------------------------------------------------------------
CHECKPOINT_POINTS = {
    # point: (patched object, attribute, the checkpoint that resume must pick)
    "model weights": (adapters, "save_file", 2),
    "sparsity.json": (save_module, "write_json_atomic", 2),
    "pruning_state.safetensors": (pruner_module, "write_pruning_state", 2),
    "optimizer": (None, "_save_optimizer_and_scheduler", 2),
    "rng state": (None, "_save_rng_state", 2),
    "trainer_state.json": (TrainerState, "save_to_json", 2),
    "rotating old checkpoints": (transformers_trainer, "rotate_checkpoints", 4),
}


def _trainer(tmp_path, output=None, **overrides):
    args = {"sparsity": 0.9, "max_steps": 4, "learning_rate": 0.05, "save_strategy": "no", **overrides}
    config = tiny_config(tmp_path, **args)
    if output is not None:
        config.output_dir = str(output)
    return TeacherGuidedPruningTrainer(
        model=make_model("timm_resnet", seed=0),
        teacher_model=make_model("hf_resnet", seed=1),
        args=config,
        train_dataset=RandomImages(32),
    )


def test_a_kill_at_each_point_of_a_checkpoint_save_resumes_from_a_complete_checkpoint(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, save_strategy="steps", save_steps=2, save_total_limit=1)
    output = Path(trainer.args.output_dir)
    images = {}

    def spy(point, original):
        def wrapped(*args, **kwargs):
            if trainer.state.global_step == 4 and point not in images:  # while checkpoint-4 is written
                images[point] = tmp_path / "images" / point.replace(" ", "-")
                shutil.copytree(output, images[point], symlinks=True)
            return original(*args, **kwargs)

        return wrapped

    for point, (owner, attribute, _) in CHECKPOINT_POINTS.items():
        owner = trainer if owner is None else owner
        monkeypatch.setattr(owner, attribute, spy(point, getattr(owner, attribute)))
    trainer.train()
    monkeypatch.undo()
    assert set(images) == set(CHECKPOINT_POINTS)
    final_masks = mask_hash(trainer.masks)

    for point, (_, _, expected_step) in CHECKPOINT_POINTS.items():
        resumed = _trainer(tmp_path, output=images[point], max_steps=6)
        checkpoint = resumed._checkpoint_to_resume(True)
        assert Path(checkpoint).name == f"checkpoint-{expected_step}", point
        resumed.train(resume_from_checkpoint=True)
        assert resumed.state.global_step == 6, point
        assert mask_hash(resumed.masks) == final_masks, point
        params = dict(resumed.model.named_parameters())
        assert all(torch.count_nonzero(params[n][~m]) == 0 for n, m in resumed.masks.items()), point


def test_a_checkpoint_is_written_in_place_beside_the_other_ranks_files(tmp_path, monkeypatch):
    """Other ranks write their RNG states into a checkpoint while process 0 saves the model: nothing is swapped."""
    trainer = _trainer(tmp_path, save_strategy="steps", save_steps=2, max_steps=2)
    checkpoint = Path(trainer.args.output_dir) / "checkpoint-2"
    write_record = save_module.write_json_atomic

    def another_rank_meanwhile(*args, **kwargs):
        (checkpoint / "rng_state_1.pth").write_bytes(b"rank 1")
        return write_record(*args, **kwargs)

    monkeypatch.setattr(save_module, "write_json_atomic", another_rank_meanwhile)
    trainer.train()
    assert (checkpoint / "rng_state_1.pth").read_bytes() == b"rank 1"
    assert publish.leftovers(checkpoint) == []


# --- a corrupted file of each kind in a checkpoint ------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory):
    """A run with checkpoint-2 (and, for swapping, another run's checkpoint at the same sparsity)."""
    root = tmp_path_factory.mktemp("checkpoints")
    _trainer(root / "a", save_strategy="steps", save_steps=2, max_steps=2).train()
    _trainer(root / "b", save_strategy="steps", save_steps=2, max_steps=2, pruning_method="random").train()
    return root


def _checkpoint(checkpoint_run, tmp_path) -> Path:
    shutil.copytree(checkpoint_run / "a" / "out", tmp_path / "out")
    return tmp_path / "out" / "checkpoint-2"


def _tensor_span(path: Path, key: str) -> tuple[int, int]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    start, stop = json.loads(raw[8 : 8 + length])[key]["data_offsets"]
    return 8 + length + start, 8 + length + stop


def _flip_bit(path: Path, offset: int, bit: int = 6) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


def _edit_record(folder: Path, edit) -> None:
    record = json.loads((folder / SPARSITY_FILE_NAME).read_text())
    edit(record)
    (folder / SPARSITY_FILE_NAME).write_text(json.dumps(record))


def _flip_a_kept_weight(folder: Path) -> None:
    path = folder / DENSE_WEIGHTS_NAME
    start, stop = _tensor_span(path, "layer1.0.conv1.weight")
    _flip_bit(path, stop - 1)  # an exponent bit of the last weight of the layer


def _truncate(name: str):
    def corrupt(folder: Path) -> None:
        path = folder / name
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])

    return corrupt


def _revive_a_pruned_weight_and_resave(folder: Path) -> None:
    """Another tool re-saved the checkpoint's weights (with a consistent sparsity.json) after reviving a weight."""
    model = load_sparse(folder, make_model("timm_resnet", seed=3))
    masks = pruner_module.read_pruning_state(folder / PRUNING_STATE_NAME).masks
    name = next(name for name, mask in masks.items() if not mask.all())
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[(~masks[name]).view(-1).nonzero()[0]] = 0.5
    save_sparse_model(model, folder, None)


def _swap_in_another_runs(checkpoint_run, names):
    def corrupt(folder: Path) -> None:
        other = checkpoint_run / "b" / "out" / "checkpoint-2"
        for name in names:
            shutil.copy(other / name, folder / name)

    return corrupt


def _flip_a_mask_bit(folder: Path) -> None:
    from safetensors import safe_open

    path = folder / PRUNING_STATE_NAME
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.startswith("mask."))
    tensors[name].view(-1)[0] = ~tensors[name].view(-1)[0]
    save_file(tensors, str(path), metadata)


CHECKPOINT_CORRUPTIONS = {
    "flipped bit in model.safetensors": (_flip_a_kept_weight, SparseFormatError, "model.safetensors: SHA-256"),
    "truncated model.safetensors": (_truncate(DENSE_WEIGHTS_NAME), SparseFormatError, "bytes.*truncated"),
    "pruned weight non-zero": (
        _revive_a_pruned_weight_and_resave,
        SparseFormatError,
        "pruning_state.safetensors prunes",
    ),
    "flipped bit in pruning_state.safetensors": (_flip_a_mask_bit, MaskFileError, "do not match the hash"),
    "truncated pruning_state.safetensors": (
        _truncate(PRUNING_STATE_NAME),
        MaskFileError,
        "pruning_state.safetensors.*truncated",
    ),
    "another run's pruning_state.safetensors": ((PRUNING_STATE_NAME,), MaskFileError, "different saves"),
    "truncated sparsity.json": (_truncate(SPARSITY_FILE_NAME), SparseFormatError, "sparsity.json is not valid JSON"),
    "layer removed from sparsity.json": (
        lambda f: _edit_record(f, lambda r: r["sparsity"]["layers"].pop("layer1.0.conv1.weight")),
        SparseFormatError,
        "sparsity.json: records .* over the prunable weights",
    ),
    "mask hash edited in sparsity.json": (
        lambda f: _edit_record(f, lambda r: r["mask"].update(sha256="0" * 64)),
        SparseFormatError,
        "sparsity.json: records two different mask hashes",
    ),
    "both mask hashes edited in sparsity.json": (
        lambda f: _edit_record(f, lambda r: r["mask"].update(sha256="0" * 64, sha256_on_disk="0" * 64)),
        SparseFormatError,
        "sparsity.json: records the mask hash 000000000000..., but the masks of the file differ",
    ),
    "files entry removed from sparsity.json": (
        lambda f: _edit_record(f, lambda r: r["files"].clear()),
        SparseFormatError,
        "no SHA-256 entry for model.safetensors",
    ),
}


@pytest.mark.parametrize("corruption", list(CHECKPOINT_CORRUPTIONS))
def test_resume_refuses_a_corrupted_checkpoint_naming_the_file(checkpoint_run, tmp_path, corruption):
    checkpoint = _checkpoint(checkpoint_run, tmp_path)
    corrupt, error, message = CHECKPOINT_CORRUPTIONS[corruption]
    (_swap_in_another_runs(checkpoint_run, corrupt) if isinstance(corrupt, tuple) else corrupt)(checkpoint)
    resumed = _trainer(tmp_path, output=tmp_path / "out", max_steps=4)
    with pytest.raises(error, match=message):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 0  # refused before any training step


def test_the_intact_checkpoint_resumes(checkpoint_run, tmp_path):
    checkpoint = _checkpoint(checkpoint_run, tmp_path)
    resumed = _trainer(tmp_path, output=tmp_path / "out", max_steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4


# --- saved folders and teachers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("save_format", ["dense", "bitmask"])
def test_a_corrupted_teacher_folder_is_refused_naming_the_file(tmp_path, save_format):
    model, masks = pruned(name="hf_resnet")
    save_sparse_model(model, tmp_path / "teacher", masks, save_format=save_format)
    loaded = load_image_classifier(str(tmp_path / "teacher"))  # a bitmask folder loads too
    assert same_state({k: v for k, v in loaded.state_dict().items()}, state_of(model, masks))
    weights = tmp_path / "teacher" / (DENSE_WEIGHTS_NAME if save_format == "dense" else BITMASK_WEIGHTS_NAME)
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 1 << 6  # one flipped bit
    weights.write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match=f"{weights.name}: SHA-256 differs"):
        load_image_classifier(str(tmp_path / "teacher"), 4)


@pytest.mark.parametrize("family", ["timm_resnet", "hf_resnet"])
def test_a_truncated_teacher_without_sparsity_json_is_a_clear_error(tmp_path, family):
    model, masks = pruned(name=family)
    save_sparse_model(model, tmp_path / "teacher", masks)
    (tmp_path / "teacher" / SPARSITY_FILE_NAME).unlink()  # as timm save_for_hf / save_pretrained write it
    _truncate(DENSE_WEIGHTS_NAME)(tmp_path / "teacher")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors is not a readable safetensors file.*truncated"):
        load_image_classifier(str(tmp_path / "teacher"))


def test_load_sparse_masks_refuses_a_shortened_layer_list(tmp_path):
    model, masks = pruned()
    save_sparse_model(model, tmp_path / "m", masks)
    assert load_sparse_masks(tmp_path / "m").keys() == masks.keys()
    _edit_record(tmp_path / "m", lambda r: [r["sparsity"]["layers"].pop(n) for n in list(masks)[:4]])
    with pytest.raises(SparseFormatError, match="sparsity.json"):
        load_sparse_masks(tmp_path / "m")
    with pytest.raises(SparseFormatError, match="sparsity.json"):
        verify_sparse_folder(tmp_path / "m")


# --- non-finite teachers and students ---------------------------------------------------------------------------------
def _poison(model, name: str) -> None:
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[0] = float("nan")


def test_check_finite_logits_names_the_parameters():
    model = make_model("timm_resnet")
    check_finite_logits(torch.zeros(2, 4), "teacher", model)
    _poison(model, "layer2.0.bn1.weight")
    with pytest.raises(NonFiniteLogitsError, match=r"teacher .*\['layer2.0.bn1.weight'\].*corrupted"):
        check_finite_logits(torch.full((2, 4), float("nan")), "teacher", model)
    with pytest.raises(NonFiniteLogitsError, match="inputs"):
        check_finite_logits(torch.full((2, 4), float("inf")), "student", make_model("timm_resnet"))


@pytest.mark.parametrize("where", ["scoring pass", "distillation loss"])
def test_a_non_finite_teacher_stops_the_run(tmp_path, where):
    method = {"scoring pass": "tgp", "distillation loss": "magnitude"}[where]
    trainer = _trainer(tmp_path, pruning_method=method, max_steps=1)
    _poison(trainer.teacher_model, "resnet.encoder.stages.1.layers.0.layer.0.normalization.weight")
    with pytest.raises(NonFiniteLogitsError, match=r"teacher .*normalization\.weight.*corrupted"):
        trainer.train()


def test_a_nan_student_weight_is_named_in_the_scoring_pass(tmp_path):
    trainer = _trainer(tmp_path)
    _poison(trainer.model, "layer2.0.conv2.weight")  # every score upstream of it turns NaN too
    with pytest.raises(NonFiniteLogitsError, match=r"student .*\['layer2.0.conv2.weight'\]"):
        trainer.prune()
    assert trainer.masks is None


# --- the last training batch of one image with BatchNorm ------------------------------------------------------------
def test_a_single_image_last_batch_is_dropped_for_a_batchnorm_student(tmp_path, caplog):
    trainer = TeacherGuidedPruningTrainer(
        model=make_model("timm_resnet"),
        args=tiny_config(tmp_path, pruning_method="magnitude", retrain_with_kd=False, num_train_epochs=1),
        train_dataset=RandomImages(33),  # 4 batches of 8, then one of 1
        calibration_dataset=RandomImages(16),
        eval_dataset=RandomImages(33),
    )
    with caplog.at_level(logging.WARNING, logger="hf_tgprune.training.trainer"):
        trainer.train()
    assert "batch of one image" in caplog.text
    assert trainer.state.global_step == 4
    assert trainer.args.dataloader_drop_last is False  # evaluation keeps every image
    assert len(trainer.get_eval_dataloader()) == 5


# --- API inputs ---------------------------------------------------------------------------------------------------------
def _as_tuples(dataset):
    return [(dataset[i]["pixel_values"], int(dataset[i]["labels"])) for i in range(len(dataset))]


def test_tuple_datasets_train_and_evaluate(tmp_path):
    trainer = TeacherGuidedPruningTrainer(
        model=make_model("timm_resnet"),
        teacher_model=make_model("hf_resnet", seed=1),
        args=tiny_config(tmp_path, sparsity=0.9, max_steps=2),
        train_dataset=_as_tuples(RandomImages(32)),
        eval_dataset=_as_tuples(RandomImages(16, seed=1)),
    )
    trainer.train()
    assert trainer.state.global_step == 2 and "eval_loss" in trainer.evaluate()


def test_partly_labelled_calibration_data_is_refused_before_any_work(tmp_path):
    data = _as_tuples(RandomImages(16))
    data[5] = (data[5][0],)  # one example without a label
    with pytest.raises(ValueError, match="`train_dataset` is partly labelled: 1 of its 16 examples"):
        TeacherGuidedPruningTrainer(
            model=make_model("timm_resnet"),
            teacher_model=make_model("hf_resnet", seed=1),
            args=tiny_config(tmp_path, sparsity=0.9),
            train_dataset=data,
        )

    class PartlyLabelled(torch.utils.data.Dataset):  # no cheap look at the labels: the batch that holds one says so
        def __len__(self):
            return 16

        def __getitem__(self, i):
            item = RandomImages(16)[i]
            return {"pixel_values": item["pixel_values"]} if i == 5 else item

    trainer = TeacherGuidedPruningTrainer(
        model=make_model("timm_resnet"),
        teacher_model=make_model("hf_resnet", seed=1),
        args=tiny_config(tmp_path, sparsity=0.9),
        train_dataset=PartlyLabelled(),
    )
    with pytest.raises(ValueError, match="Partly labelled data"):
        trainer.prune()
    assert trainer.masks is None


def test_float_masks_from_torch_prune_are_installed_as_bool(tmp_path):
    model, masks = pruned()
    float_masks = {name: mask.float() for name, mask in masks.items()}  # torch.nn.utils.prune's weight_mask
    trainer = TeacherGuidedPruningTrainer(
        model=make_model("timm_resnet", seed=0),
        args=tiny_config(tmp_path, sparsity=0.9, max_steps=1, retrain_with_kd=False, pruning_method="magnitude"),
        train_dataset=RandomImages(16),
        masks=float_masks,
    )
    assert all(mask.dtype == torch.bool for mask in trainer.masks.values())
    assert mask_hash(trainer.masks) == mask_hash(masks)
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert all(torch.count_nonzero(params[n][~m]) == 0 for n, m in trainer.masks.items())
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        TeacherGuidedPruningTrainer(
            model=make_model("timm_resnet"),
            args=tiny_config(tmp_path, retrain_with_kd=False, pruning_method="magnitude"),
            masks={name: mask.float() * 0.5 for name, mask in masks.items()},
        )
