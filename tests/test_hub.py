"""Model card and Hub push, tested up to the `huggingface_hub.HfApi` boundary (the Hub is unreachable here).

`FakeHub` replaces `HfApi` in `hf_tgprune.io.hub`: `upload_folder` applies huggingface_hub's own file filter to the
folder and copies what it would upload into a local Hub cache snapshot, from which plain timm
(`hf-hub:<repo_id>`) and plain transformers (`from_pretrained(<repo_id>)`) then load the model offline.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub import errors
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects

import hf_tgprune.io.hub as hub
from hf_tgprune import TeacherGuidedPruningTrainer
from hf_tgprune.core.masking import mask_hash
from hf_tgprune.io.hub import HubPushError, push_sparse_folder
from hf_tgprune.io.modelcard import SPEED_NOTE, create_model_card
from hf_tgprune.io.serialization import (
    BITMASK_WEIGHTS_NAME,
    DENSE_WEIGHTS_NAME,
    SPARSITY_FILE_NAME,
    load_sparse,
    load_sparse_masks,
    save_sparse_model,
)
from hf_tgprune.io.serialization.pruning_state import checkpoint_masks
from tests.test_serialization import (
    assert_bit_identical,
    expected_state,
    logits_of,
    pruned_model,
    run_plain_loaders,
)
from tests.utils import IMAGE_SIZE, RandomImages, make_model, tiny_config

COMMIT = "0" * 40


class FakeHub:
    """Records create_repo/upload_folder calls and keeps each repo as a snapshot in a local Hub cache."""

    def __init__(self, cache: Path, fail: dict | None = None):
        self.cache = cache
        self.fail = dict(fail or {})
        self.calls: list[tuple[str, dict]] = []
        self.tokens: list[str | None] = []

    def __call__(self, token=None):  # stands in for the HfApi class
        self.tokens.append(token)
        return self

    def snapshot(self, repo_id: str) -> Path:
        repo = self.cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(COMMIT)
        return repo / "snapshots" / COMMIT

    def _maybe_fail(self, method: str) -> None:
        error = self.fail.get(method)
        if error is not None:
            raise error

    def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None, **kwargs):
        self.calls.append(("create_repo", dict(repo_id=repo_id, private=private, exist_ok=exist_ok)))
        self._maybe_fail("create_repo")
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(
        self, *, repo_id, folder_path, path_in_repo=None, allow_patterns=None, ignore_patterns=None, **kw
    ):
        folder = Path(folder_path)
        listing = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        ignore = list(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS
        files = list(filter_repo_objects(listing, allow_patterns=allow_patterns, ignore_patterns=ignore))
        self.calls.append(("upload_folder", dict(repo_id=repo_id, path_in_repo=path_in_repo, files=files, **kw)))
        self._maybe_fail("upload_folder")
        target = self.snapshot(repo_id) / (path_in_repo or "")
        for name in files:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, target / name)
        return SimpleNamespace(oid=COMMIT, commit_url=f"https://huggingface.co/{repo_id}/commit/{COMMIT}")

    def uploads(self) -> list[dict]:
        return [kwargs for name, kwargs in self.calls if name == "upload_folder"]


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hub-cache")
    monkeypatch.setattr(hub, "HfApi", fake)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_local_token")
    return fake


def manifest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def add_junk(folder: Path) -> None:
    """Files a push must leave out."""
    (folder / ".hidden").write_text("x")
    (folder / "_scratch.json").write_text("{}")
    (folder / "weights.tmp").write_text("x")
    (folder / "checkpoint-3").mkdir()
    (folder / "checkpoint-3" / DENSE_WEIGHTS_NAME).write_bytes(b"not a model")


# --- push: exactly the files that reload into the identical sparse model -----------------------------------------
def test_pushed_files_reload_with_plain_timm_and_transformers(fake_hub, tmp_path):
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    models = {}
    for family, repo_id in (("timm_resnet", "user/pruned-timm"), ("hf_resnet", "user/pruned-hf")):
        model, masks = pruned_model(family)
        folder = tmp_path / family
        save_sparse_model(model, folder, masks, metadata={"method": "magnitude", "dataset": "cifar10"})
        add_junk(folder)
        before = manifest(folder)
        push_sparse_folder(folder, repo_id, token="hf_explicit", private=True)
        models[repo_id] = (model, masks, folder, before)

    assert fake_hub.tokens == ["hf_explicit", "hf_explicit"]
    assert [c for c in fake_hub.calls if c[0] == "create_repo"][0][1] == dict(
        repo_id="user/pruned-timm", private=True, exist_ok=True
    )
    for repo_id, (_model, _masks, folder, before) in models.items():
        upload = next(u for u in fake_hub.uploads() if u["repo_id"] == repo_id)
        expected = {"README.md", "config.json", DENSE_WEIGHTS_NAME, SPARSITY_FILE_NAME}
        assert set(upload["files"]) == expected
        remote = fake_hub.snapshot(repo_id)
        assert manifest(remote) == {k: v for k, v in manifest(folder).items() if k in expected}
        assert {k: v for k, v in manifest(folder).items() if k in before} == before  # local files untouched

    jobs = [
        {"loader": "timm", "name": "hf-hub:user/pruned-timm", "out": str(tmp_path / "timm-hub")},
        {"loader": "transformers", "name": "user/pruned-hf", "out": str(tmp_path / "hf-hub")},
    ]
    timm_out, hf_out = run_plain_loaders(jobs, x, tmp_path, extra_env={"HF_HUB_CACHE": str(fake_hub.cache)})
    timm_model, timm_masks = models["user/pruned-timm"][:2]
    hf_model, hf_masks = models["user/pruned-hf"][:2]
    assert torch.equal(timm_out["logits"], logits_of(timm_model, x))
    assert torch.equal(hf_out["logits"], logits_of(hf_model, x))
    for out, model, masks in ((timm_out, timm_model, timm_masks), (hf_out, hf_model, hf_masks)):
        for name, mask in masks.items():
            assert torch.equal(out["state"][name] == 0, model.state_dict()[name] == 0)
            assert not out["state"][name][~mask].any()


def test_pushed_bitmask_folder_reloads_bit_exactly(fake_hub, tmp_path):
    model, masks = pruned_model("timm_resnet")
    save_sparse_model(model, tmp_path / "out", masks, save_format="bitmask")
    push_sparse_folder(tmp_path / "out", "user/compact")
    remote = fake_hub.snapshot("user/compact")
    assert set(fake_hub.uploads()[0]["files"]) == {
        "README.md",
        "config.json",
        BITMASK_WEIGHTS_NAME,
        SPARSITY_FILE_NAME,
    }
    fresh = make_model("timm_resnet", seed=9).eval()
    load_sparse(remote, model=fresh)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(logits_of(fresh, x), logits_of(model, x))
    restored = load_sparse_masks(remote)
    assert all(torch.equal(restored[n], masks[n]) for n in masks)
    assert "load_sparse" in (remote / "README.md").read_text()


# --- failures: one clear error, local output intact -----------------------------------------------------------------
def _http_error(status: int, cls=errors.HfHubHTTPError):
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return cls(f"{status} Client Error", response=httpx2.Response(status, request=request))


FAILURES = {
    "unauthorized": ("create_repo", _http_error(401), "hf auth login"),
    "forbidden": ("create_repo", _http_error(403), "write access"),
    "not_found": ("create_repo", _http_error(404), "user-or-org/name"),
    "not_found_on_upload": ("upload_folder", _http_error(404, errors.RepositoryNotFoundError), "user-or-org/name"),
    "offline": ("create_repo", errors.OfflineModeIsEnabled("offline mode is enabled"), "HF_HUB_OFFLINE"),
    "network": ("upload_folder", httpx2.ConnectError("connection refused"), "network"),
    "timeout": ("upload_folder", TimeoutError("timed out"), "network"),
    "server": ("upload_folder", _http_error(503), "retry"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_push_failures_are_one_clear_error_and_keep_the_folder(case, tmp_path, monkeypatch):
    method, error, hint = FAILURES[case]
    fake = FakeHub(tmp_path / "hub-cache", fail={method: error})
    monkeypatch.setattr(hub, "HfApi", fake)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_local_token")
    model, masks = pruned_model("timm_resnet")
    folder = tmp_path / "out"
    save_sparse_model(model, folder, masks)
    before = manifest(folder)
    with pytest.raises(HubPushError) as info:
        push_sparse_folder(folder, "user/repo")
    message = str(info.value)
    expected_reason = {"not_found_on_upload": "not_found", "timeout": "network", "server": "http_error"}.get(
        case, case
    )
    assert info.value.reason == expected_reason
    assert hint.lower() in message.lower() and "intact" in message and "user/repo" in message
    assert info.value.__cause__ is error
    after = manifest(folder)
    assert {k: after[k] for k in before} == before  # nothing changed or removed (a README.md may have been added)
    assert_bit_identical(load_sparse(folder), expected_state(model, masks))


def test_no_token_fails_before_any_request(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hub-cache")
    monkeypatch.setattr(hub, "HfApi", fake)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    model, masks = pruned_model("timm_resnet")
    save_sparse_model(model, tmp_path / "out", masks)
    with pytest.raises(HubPushError, match="HF_TOKEN") as info:
        push_sparse_folder(tmp_path / "out", "user/repo")
    assert info.value.reason == "no_token" and fake.calls == []
    assert not (tmp_path / "out" / "README.md").exists()  # nothing was written either


def test_real_hfapi_in_offline_mode_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_local_token")
    model, masks = pruned_model("timm_resnet")
    save_sparse_model(model, tmp_path / "out", masks)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE") as info:
        push_sparse_folder(tmp_path / "out", "user/repo", token="hf_fake")
    assert info.value.reason == "offline"


def test_corrupted_or_missing_checkpoint_is_never_uploaded(fake_hub, tmp_path):
    model, masks = pruned_model("timm_resnet")
    folder = tmp_path / "out"
    save_sparse_model(model, folder, masks)
    weights = folder / DENSE_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-7] + b"garbage")
    with pytest.raises(HubPushError, match="not a complete sparse checkpoint") as info:
        push_sparse_folder(folder, "user/repo")
    assert info.value.reason == "invalid_checkpoint" and fake_hub.calls == []
    with pytest.raises(HubPushError, match="does not exist"):
        push_sparse_folder(tmp_path / "nowhere", "user/repo")


# --- model card ------------------------------------------------------------------------------------------------------
def test_model_card_contents(tmp_path):
    model, masks = pruned_model("timm_resnet")
    record = save_sparse_model(
        model,
        tmp_path,
        masks,
        metadata={
            "method": "tgp",
            "base_model": "timm/resnet18.a1_in1k",
            "teacher": "timm/resnet50.a1_in1k",
            "dataset": "cifar10",
            "calibration_size": 1024,
            "hyperparameters": {"alpha": 0.7, "beta": 0.5, "temperature": 3.0, "learning_rate": 5e-5},
            "metrics": {"dense": {"eval_accuracy": 0.9592}, "pruned": {"eval_accuracy": 0.9468}},
        },
    )
    card = create_model_card(tmp_path, repo_id="user/resnet18-tgp")
    text = card.content
    assert set(card.data.tags) >= {"pruning", "sparse", "knowledge-distillation", "hf_tgprune"}
    assert card.data.base_model == "timm/resnet18.a1_in1k"
    assert card.data.library_name == "timm" and card.data.pipeline_tag == "image-classification"
    assert SPEED_NOTE in text and "does not speed up dense kernels" in text
    assert 'timm.create_model("hf-hub:user/resnet18-tgp", pretrained=True)' in text
    assert 'AutoModelForImageClassification.from_pretrained("user/resnet18-tgp")' in text
    assert "timm/resnet50.a1_in1k" in text and "cifar10" in text and "1024" in text
    assert "| `learning_rate` | 5e-05 |" in text and "| `alpha` | 0.7 |" in text
    assert "| eval_accuracy | 0.9592 | 0.9468 | -0.0124 |" in text
    for name, counts in record["sparsity"]["layers"].items():
        assert f"| `{name}` | {counts['numel']:,} | {counts['zeros']:,} |" in text
    assert record["mask"]["sha256"] in text

    # a local path is no Hub id: shown as its folder name (never the path), left out of the metadata the Hub validates
    card = create_model_card(record, base_model=str(tmp_path), model_family="transformers")
    assert card.data.base_model is None and tmp_path.name in card.content and str(tmp_path) not in card.content
    assert "AutoModelForImageClassification.from_pretrained" in card.content
    assert "hf-hub:" not in card.content

    # the preprocessing the model was trained with, and how to load it the standard way
    preprocessing = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"}
    card = create_model_card({**record, "preprocessing": preprocessing}, model_family="transformers")
    assert "| Preprocessing | 32×32 px" in card.content and "AutoImageProcessor.from_pretrained" in card.content
    assert "resolve_model_data_config" in create_model_card(record).content
    # a family this process does not know: the plain PyTorch snippet
    assert "build the architecture yourself" in create_model_card(record, model_family="unknown").content


def test_model_card_says_how_the_weights_were_pruned(tmp_path):
    model, masks = pruned_model("timm_resnet")
    record = save_sparse_model(model, tmp_path, masks, metadata={"method": "tgp_fisher"})
    assert "by one-shot unstructured pruning with `tgp_fisher`" in create_model_card(record).content
    during = {**record, "method": "gradual", "one_shot": False}
    assert "by unstructured pruning during training with `gradual`" in create_model_card(during).content
    semi = {**record, "hyperparameters": {"sparsity_pattern": "2:4"}}
    assert "by one-shot 2:4 semi-structured pruning" in create_model_card(semi).content


# --- trainer integration ---------------------------------------------------------------------------------------------
def _trainer_args(tmp_path, **overrides):
    defaults = dict(pruning_method="magnitude", retrain_with_kd=False, sparsity=0.8, max_steps=2, learning_rate=0.01)
    return tiny_config(tmp_path, **{**defaults, **overrides})


def test_trainer_save_model_writes_sparse_folders(tmp_path):
    import timm

    args = _trainer_args(tmp_path, save_strategy="steps", save_steps=2)
    trainer = TeacherGuidedPruningTrainer(model=make_model("timm_resnet"), args=args, train_dataset=RandomImages(16))
    trainer.sparse_info.dataset = "random-images"
    trainer.sparse_info.dense_metrics = {"eval_accuracy": 0.5}
    trainer.sparse_info.data_config = {"image_size": IMAGE_SIZE, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    trainer.train()
    trainer.save_model()
    out = Path(args.output_dir)
    record = json.loads((out / SPARSITY_FILE_NAME).read_text())
    from timm.data import resolve_model_data_config

    for folder in (out, out / "checkpoint-2"):  # outputs and checkpoints declare the preprocessing used
        declared = resolve_model_data_config(timm.create_model(f"local-dir:{folder}", pretrained=False))
        assert declared["input_size"] == (3, IMAGE_SIZE, IMAGE_SIZE) and tuple(declared["std"]) == (0.25,) * 3
    assert record["mask"]["sha256"] == trainer.pruning_report["mask_sha256"]
    assert record["method"] == "magnitude" and record["dataset"] == "random-images"
    assert record["metrics"]["dense"] == {"eval_accuracy": 0.5} and record["hyperparameters"]["sparsity"] == 0.8
    assert record["calibration_size"] == 16 and record["global_step"] == 2
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert torch.equal(logits_of(reloaded, x), logits_of(trainer.model.eval(), x))
    assert (out / "checkpoint-2" / SPARSITY_FILE_NAME).is_file() and (
        out / "checkpoint-2" / DENSE_WEIGHTS_NAME
    ).is_file()

    trainer.args.save_format = "bitmask"
    trainer.save_model(str(tmp_path / "compact"))
    fresh = load_sparse(tmp_path / "compact", model=make_model("timm_resnet", seed=3).eval())
    assert torch.equal(logits_of(fresh, x), logits_of(trainer.model, x))
    assert all(torch.equal(m, trainer.masks[n]) for n, m in load_sparse_masks(tmp_path / "compact").items())


def test_trainer_push_to_hub_with_checkpoint_strategy(fake_hub, tmp_path):
    args = _trainer_args(
        tmp_path,
        save_strategy="steps",
        save_steps=1,
        push_to_hub=True,
        hub_model_id="user/tgp-test",
        hub_strategy="checkpoint",
        hub_token="hf_trainer",
        save_format="bitmask",
    )
    trainer = TeacherGuidedPruningTrainer(model=make_model("timm_resnet"), args=args, train_dataset=RandomImages(16))
    assert fake_hub.calls[0] == ("create_repo", dict(repo_id="user/tgp-test", private=None, exist_ok=True))
    trainer.train()
    uploads = fake_hub.uploads()
    assert [u["path_in_repo"] for u in uploads] == [None, "last-checkpoint", None, "last-checkpoint"]
    checkpoint_files = set(uploads[-1]["files"])
    assert {"pruning_state.safetensors", DENSE_WEIGHTS_NAME, SPARSITY_FILE_NAME, "optimizer.pt"} <= checkpoint_files
    assert trainer.hub_push_errors == []

    trainer.push_to_hub(dataset="random-images")
    final = fake_hub.uploads()[-1]
    assert set(final["files"]) == {"README.md", "config.json", BITMASK_WEIGHTS_NAME, SPARSITY_FILE_NAME}
    assert final["commit_message"] == "End of training" and set(fake_hub.tokens) == {"hf_trainer"}
    remote = fake_hub.snapshot("user/tgp-test")
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    fresh = load_sparse(remote, model=make_model("timm_resnet", seed=4).eval())
    assert torch.equal(logits_of(fresh, x), logits_of(trainer.model.eval(), x))
    # the pushed last checkpoint is a resumable one: its masks are the trainer's masks
    pushed_masks = checkpoint_masks(remote / "last-checkpoint")
    assert mask_hash(pushed_masks) == mask_hash(trainer.masks)
    readme = (remote / "README.md").read_text()
    assert "random-images" in readme and "hf_tgprune" in readme


def test_trainer_push_failures(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubPushError, match="no Hugging Face token"):  # before any work starts
        TeacherGuidedPruningTrainer(
            model=make_model("timm_resnet"),
            args=_trainer_args(tmp_path, push_to_hub=True, hub_model_id="user/x"),
            train_dataset=RandomImages(16),
        )

    fake = FakeHub(tmp_path / "hub-cache", fail={"upload_folder": _http_error(503)})
    monkeypatch.setattr(hub, "HfApi", fake)
    args = _trainer_args(
        tmp_path, push_to_hub=True, hub_model_id="user/x", hub_token="hf_t", save_strategy="steps", save_steps=1
    )
    trainer = TeacherGuidedPruningTrainer(model=make_model("timm_resnet"), args=args, train_dataset=RandomImages(16))
    trainer.train()  # checkpoint pushes fail: logged, training goes on
    assert len(trainer.hub_push_errors) == 2 and trainer.state.global_step == 2
    out = Path(args.output_dir)
    assert (out / "checkpoint-2" / "pruning_state.safetensors").is_file()
    with pytest.raises(HubPushError, match="HTTP 503"):
        trainer.push_to_hub()
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    fresh = load_sparse(out, model=make_model("timm_resnet", seed=4).eval())
    assert torch.equal(logits_of(fresh, x), logits_of(trainer.model.eval(), x))


# --- inference speed in the card (issue 12) --------------------------------------------------------------------------
def _speed():
    from hf_tgprune.io.modelcard import InferenceLatency, InferenceSpeed

    return InferenceSpeed(
        device="CPU: Test CPU 9000",
        threads=1,
        latencies=[
            InferenceLatency(batch_size=1, dense_ms=178.9, sparse_ms=64.7, layers_converted=47, layers_candidate=50),
            InferenceLatency(
                batch_size=32, dense_ms=4700.5, sparse_ms=4030.6, layers_converted=43, layers_candidate=50
            ),
        ],
        input_shape=[3, 224, 224],
        repeats=15,
        torch_version="2.15.0",
    )


def test_model_card_inference_speed_section_only_with_figures(tmp_path):
    from hf_tgprune.io.modelcard import InferenceSpeed

    model, masks = pruned_model("timm_resnet")
    record = save_sparse_model(model, tmp_path, masks, metadata={"method": "tgp"})
    plain = create_model_card(record).content
    assert "Inference speed" not in plain and "export_sparse_inference" not in plain

    speed = _speed()
    for given in (speed, speed.as_dict(), None):  # typed, as sparsity.json holds it, or read from the record
        source = {**record, "inference": speed.as_dict()} if given is None else record
        text = create_model_card(source, inference=given).content
        assert "## Inference speed" in text and "**CPU: Test CPU 9000** (1 torch thread(s), PyTorch 2.15.0" in text
        assert "| 1 | 178.9 | 64.7 | 2.77× | 47 of 50 |" in text
        assert "| 32 | 4700 | 4031 | 1.17× | 43 of 50 |" in text
        assert (
            "**2.77× at batch size 1, 1.17× at batch size 32** as fast as the dense model on CPU: Test CPU 9000"
            in text
        )
        assert "median of 15 interleaved runs" in text and "torch.randn(1, 3, 224, 224)" in text
        assert SPEED_NOTE in text  # plain timm/transformers loading still runs dense
    assert InferenceSpeed.from_dict(speed.as_dict()) == speed
    with pytest.raises(ValueError, match="inference figures need device, threads and latencies"):
        create_model_card(record, inference={"device": "CPU"})
    with pytest.raises(ValueError, match="hold no latency"):
        create_model_card(record, inference={**speed.as_dict(), "latencies": []})


def test_trainer_records_inference_speed_in_sparsity_json_and_card(tmp_path):
    args = _trainer_args(tmp_path)
    trainer = TeacherGuidedPruningTrainer(model=make_model("timm_resnet"), args=args, train_dataset=RandomImages(16))
    trainer.prune()
    trainer.save_model(str(tmp_path / "without"))
    assert "inference" not in json.loads((tmp_path / "without" / SPARSITY_FILE_NAME).read_text())

    trainer.sparse_info.inference = _speed()
    trainer.save_model(str(tmp_path / "with"))
    record = json.loads((tmp_path / "with" / SPARSITY_FILE_NAME).read_text())
    assert record["inference"] == _speed().as_dict() and record["inference"]["latencies"][0]["speedup"] > 2.7
    assert "| 1 | 178.9 | 64.7 | 2.77× | 47 of 50 |" in create_model_card(tmp_path / "with").content

    trainer.sparse_info.inference = "2.8x faster"
    with pytest.raises(TypeError, match="SparseModelInfo.inference takes a hf_tgprune.io.modelcard.InferenceSpeed"):
        trainer.save_model(str(tmp_path / "bad"))


def test_a_folder_whose_sparsity_json_lost_its_files_entry_is_never_uploaded(fake_hub, tmp_path):
    model, masks = pruned_model("timm_resnet")
    folder = tmp_path / "out"
    save_sparse_model(model, folder, masks)
    record = json.loads((folder / SPARSITY_FILE_NAME).read_text())
    record["files"] = {}
    (folder / SPARSITY_FILE_NAME).write_text(json.dumps(record))
    with pytest.raises(HubPushError, match="no SHA-256 entry for model.safetensors") as info:
        push_sparse_folder(folder, "user/repo")
    assert info.value.reason == "invalid_checkpoint" and fake_hub.calls == []


def test_trainer_save_model_into_its_output_dir_keeps_checkpoints_and_the_card(tmp_path):
    """save_model() swaps in a complete new folder: checkpoints, logs and the card already there survive."""
    args = _trainer_args(tmp_path, save_strategy="steps", save_steps=2)
    trainer = TeacherGuidedPruningTrainer(model=make_model("timm_resnet"), args=args, train_dataset=RandomImages(16))
    trainer.train()
    out = Path(args.output_dir)
    trainer.save_model()
    (out / "README.md").write_text("my card\n")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    trainer.args.save_format = "bitmask"
    trainer.save_model()
    after = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert set(after) == set(before) - {DENSE_WEIGHTS_NAME} | {BITMASK_WEIGHTS_NAME}
    assert (out / "README.md").read_text() == "my card\n"
    resumed = TeacherGuidedPruningTrainer(
        model=make_model("timm_resnet"), args=_trainer_args(tmp_path, max_steps=4), train_dataset=RandomImages(16)
    )
    resumed.train(resume_from_checkpoint=True)  # the carried-over checkpoint is intact
    assert resumed.state.global_step == 4
