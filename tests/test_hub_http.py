"""The Hub round trip over real HTTP: the unmodified huggingface_hub client pushes to `tests/hub_server.LocalHub`
(127.0.0.1, ``HF_HUB_DISABLE_XET=1`` so uploads take the LFS path), and fresh processes load the pushed repos by id
with plain timm, plain transformers (model and pipeline) and ``hf_tgprune.load_sparse``.

In this process the client's endpoint and offline switch are patched in `huggingface_hub.constants` (they are read
from the environment at import); the loading processes get them as environment variables. The client's retry waits
(`huggingface_hub.utils._http`) are recorded instead of slept, so the fault tests see every retry in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download, snapshot_download
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from huggingface_hub.utils import _http
from safetensors.torch import load_file, save_file

from hf_tgprune import TeacherGuidedPruningTrainer
from hf_tgprune.core.masking import mask_hash
from hf_tgprune.io.hub import HubPushError, check_sparse_folder, push_sparse_folder, sparse_folder_files
from hf_tgprune.io.modelcard import CARD_TAGS
from hf_tgprune.io.serialization import (
    BITMASK_WEIGHTS_NAME,
    DENSE_WEIGHTS_NAME,
    SPARSITY_FILE_NAME,
    load_sparse,
    load_sparse_masks,
    read_sparsity_record,
    save_sparse_model,
)
from hf_tgprune.io.serialization.pruning_state import checkpoint_masks
from tests import test_recipe
from tests.hub_server import TOKEN, LocalHub
from tests.test_serialization import assert_bit_identical, expected_state, logits_of, pruned_model
from tests.utils import IMAGE_SIZE, NUM_LABELS, RandomImages, make_model, tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]
tiny_cifar = test_recipe.tiny_cifar  # the recipe tests' CIFAR-layout dataset fixture
DATA_CONFIG = {"image_size": IMAGE_SIZE, "mean": (0.5,) * 3, "std": (0.25,) * 3, "interpolation": "bilinear"}


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A running `LocalHub`; this process's huggingface_hub talks to it (online, LFS uploads, no retry sleeps)."""
    hub = LocalHub(tmp_path / "hub").start()
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # every call below names its token
    hub.retry_waits = []
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=hub.retry_waits.append))
    yield hub
    hub.stop()


def manifest(folder: Path, names=None) -> dict[str, str]:
    names = sparse_folder_files(folder, ignore_patterns=()) if names is None else names
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names}


def unhandled(hub: LocalHub) -> list[str]:
    return [request for name, request in hub.requests if name == "unhandled"]


# --- fresh processes that load by repo id ---------------------------------------------------------------------------
# Each job loads `repo` (at `revision`) one way and writes the logits on a fixed input. "timm", "transformers" and
# "pipeline" never import hf_tgprune (`sys.modules["hf_tgprune"] = None`); "card" runs the python block of the
# uploaded README's "How to load" section as it stands (the bitmask snippet imports hf_tgprune).
LOADER = textwrap.dedent(
    """
    import json, re, sys
    jobs = json.loads(sys.argv[1])
    if not any(job["kind"] == "card" for job in jobs):
        sys.modules["hf_tgprune"] = None
    import torch
    from safetensors.torch import load_file, save_file
    torch.set_num_threads(int(sys.argv[3]))
    x = load_file(sys.argv[2])["x"]
    for job in jobs:
        repo, kind = job["repo"], job["kind"]
        if kind == "timm":
            import timm
            model = timm.create_model(f"hf-hub:{repo}", pretrained=True)
        elif kind == "transformers":
            from transformers import AutoModelForImageClassification
            model = AutoModelForImageClassification.from_pretrained(repo, revision=job.get("revision"))
        elif kind == "pipeline":
            from PIL import Image
            from transformers import pipeline
            classify = pipeline("image-classification", model=repo)
            images = [Image.open(path) for path in job["images"]]
            json.dump(classify(images, top_k=job["top_k"]), open(job["out"] + ".json", "w"))
            model = classify.model
        else:
            from huggingface_hub import hf_hub_download
            card = open(hf_hub_download(repo, "README.md")).read()
            code = re.search(r"## How to load.*?```python\\n(.*?)```", card, re.S).group(1)
            scope = {}
            exec(code, scope)
            model = scope["model"]
        model.eval()
        with torch.no_grad():
            out = model(x)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file({"logits": logits.contiguous()}, job["out"] + ".logits.safetensors")
        save_file(state, job["out"] + ".state.safetensors")
    if sys.modules.get("hf_tgprune", None) is None:
        assert not any(m.startswith("hf_tgprune.") for m, v in sys.modules.items() if v is not None)
        print("loaded-without-hf_tgprune")
    print("load-ok")
    """
)


def load_in_fresh_process(hub: LocalHub, jobs: list[dict], x: torch.Tensor, workdir: Path) -> list[dict]:
    """Run LOADER against `hub` with an explicit environment: online, its endpoint, an empty cache, the token."""
    workdir.mkdir(parents=True, exist_ok=True)
    save_file({"x": x.contiguous()}, str(workdir / "input.safetensors"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "PYTHONPATH"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(workdir / "hf-home"),
        HF_TOKEN=TOKEN,
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=str(REPO_ROOT),  # the "card" jobs import this checkout's hf_tgprune
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LOADER,
            json.dumps(jobs),
            str(workdir / "input.safetensors"),
            str(torch.get_num_threads()),
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "load-ok" in result.stdout, result.stderr[-4000:]
    if not any(job["kind"] == "card" for job in jobs):
        assert "loaded-without-hf_tgprune" in result.stdout
    return [
        {
            "logits": load_file(job["out"] + ".logits.safetensors")["logits"],
            "state": load_file(job["out"] + ".state.safetensors"),
            "pipeline": json.loads(Path(job["out"] + ".json").read_text()) if job["kind"] == "pipeline" else None,
        }
        for job in jobs
    ]


def push_trainer(tmp_path: Path, family: str, repo_id: str, **overrides) -> TeacherGuidedPruningTrainer:
    """A tiny student pruned and trained 2 steps, then `trainer.push_to_hub()` (its card knows the metrics)."""
    args = tiny_config(
        tmp_path / family,
        **{
            "pruning_method": "magnitude",
            "retrain_with_kd": False,
            "sparsity": 0.8,
            "max_steps": 2,
            "learning_rate": 0.01,
            "push_to_hub": True,
            "hub_model_id": repo_id,
            "hub_token": TOKEN,
            **overrides,
        },
    )
    trainer = TeacherGuidedPruningTrainer(model=make_model(family), args=args, train_dataset=RandomImages(16))
    trainer.sparse_info.dataset = "cifar10"
    trainer.sparse_info.base_model = "timm/resnet18.a1_in1k" if family.startswith("timm") else None
    trainer.sparse_info.dense_metrics = {"eval_accuracy": 0.5}
    trainer.sparse_info.pruned_metrics = {"eval_accuracy": 0.375, "eval_top5_accuracy": 1.0}
    trainer.sparse_info.data_config = DATA_CONFIG
    trainer.train()
    trainer.push_to_hub()
    trainer.model.eval()
    return trainer


def assert_repo_is_the_folder(hub: LocalHub, repo_id: str, folder: Path, revision: str = "main") -> None:
    """The repo at `revision` holds exactly the files a push of `folder` uploads, byte for byte."""
    uploaded = sparse_folder_files(folder)
    assert manifest(hub.folder(repo_id, revision)) == manifest(folder, uploaded)


# --- round trips ----------------------------------------------------------------------------------------------------
def test_trainer_push_to_hub_dense_loads_by_repo_id_in_plain_timm_and_transformers(local_hub, tmp_path):
    timm_trainer = push_trainer(tmp_path, "timm_resnet", "user/timm-dense")
    hf_trainer = push_trainer(tmp_path, "hf_resnet", "user/hf-dense")
    for trainer, repo_id in ((timm_trainer, "user/timm-dense"), (hf_trainer, "user/hf-dense")):
        out = Path(trainer.args.output_dir)
        commits = local_hub.commits(repo_id)
        assert [c.message for c in commits] == ["End of training"]  # one push, one commit
        assert_repo_is_the_folder(local_hub, repo_id, out)
        assert HfApi(token=TOKEN).model_info(repo_id).sha == commits[0].oid
        remote = local_hub.folder(repo_id)
        check_sparse_folder(remote)  # sparsity.json's sizes and SHA-256 match the weights that arrived
        assert read_sparsity_record(remote)["mask"]["sha256"] == mask_hash(trainer.masks)
    assert (Path(hf_trainer.args.output_dir) / "preprocessor_config.json").is_file()

    # pixel images for the pipeline, and the scores the local model gives them through the same processor
    from PIL import Image
    from transformers import AutoImageProcessor

    rng = np.random.default_rng(0)
    images = [tmp_path / f"image{i}.png" for i in range(2)]
    for path in images:
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    processor = AutoImageProcessor.from_pretrained(hf_trainer.args.output_dir)
    from transformers.pipelines.image_classification import softmax

    local_scores = [  # as the pipeline computes them: one image at a time, numpy's softmax
        softmax(logits_of(hf_trainer.model, processor(Image.open(p), return_tensors="pt")["pixel_values"])[0].numpy())
        for p in images
    ]

    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    work = tmp_path / "load"
    jobs = [
        {"kind": "timm", "repo": "user/timm-dense", "out": str(work / "timm")},
        {"kind": "transformers", "repo": "user/timm-dense", "out": str(work / "timm-via-transformers")},
        {"kind": "transformers", "repo": "user/hf-dense", "out": str(work / "hf")},
        {
            "kind": "pipeline",
            "repo": "user/hf-dense",
            "out": str(work / "pipeline"),
            "images": [str(p) for p in images],
            "top_k": NUM_LABELS,
        },
    ]
    timm_out, timm_via_hf, hf_out, pipeline_out = load_in_fresh_process(local_hub, jobs, x, work)
    assert torch.equal(timm_out["logits"], logits_of(timm_trainer.model, x))
    assert torch.equal(timm_via_hf["logits"], logits_of(timm_trainer.model, x))  # TimmWrapperForImageClassification
    assert torch.equal(hf_out["logits"], logits_of(hf_trainer.model, x))
    assert torch.equal(pipeline_out["logits"], logits_of(hf_trainer.model, x))
    for trainer, out in ((timm_trainer, timm_out), (hf_trainer, hf_out)):
        for name, mask in trainer.masks.items():  # zeros exactly where the masks prune
            assert not out["state"][name][~mask].any()
    id2label = hf_trainer.model.config.id2label
    for predictions, scores in zip(pipeline_out["pipeline"], local_scores):
        assert {p["label"]: p["score"] for p in predictions} == {id2label[i]: float(s) for i, s in enumerate(scores)}
    assert unhandled(local_hub) == []


def test_bitmask_push_loads_with_the_card_snippet_and_load_sparse(local_hub, tmp_path):
    trainers = {
        repo_id: push_trainer(tmp_path, family, repo_id, save_format="bitmask")
        for family, repo_id in (("timm_resnet", "user/timm-bitmask"), ("hf_resnet", "user/hf-bitmask"))
    }
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    jobs = [
        {"kind": "card", "repo": repo_id, "out": str(tmp_path / "load" / repo_id.replace("/", "--"))}
        for repo_id in trainers
    ]
    outputs = load_in_fresh_process(local_hub, jobs, x, tmp_path / "load")
    for (repo_id, trainer), out in zip(trainers.items(), outputs):
        assert BITMASK_WEIGHTS_NAME in sparse_folder_files(local_hub.folder(repo_id))
        assert DENSE_WEIGHTS_NAME not in sparse_folder_files(local_hub.folder(repo_id))
        assert_repo_is_the_folder(local_hub, repo_id, Path(trainer.args.output_dir))
        assert torch.equal(out["logits"], logits_of(trainer.model, x))
        # the whole snapshot, downloaded by the client, verified against its sparsity.json and loaded bit-exactly
        snapshot = Path(snapshot_download(repo_id, cache_dir=tmp_path / "cache", token=TOKEN))
        check_sparse_folder(snapshot)
        family = "timm_resnet" if repo_id.startswith("user/timm") else "hf_resnet"
        fresh = load_sparse(snapshot, model=make_model(family, seed=7).eval())
        assert torch.equal(logits_of(fresh, x), logits_of(trainer.model, x))
        assert all(torch.equal(mask, trainer.masks[name]) for name, mask in load_sparse_masks(snapshot).items())
    assert unhandled(local_hub) == []


def test_each_push_is_one_commit_and_older_revisions_stay_downloadable(local_hub, tmp_path):
    api = HfApi(token=TOKEN)
    folders, shas = [], []
    for seed in (0, 1):
        model, masks = pruned_model("timm_resnet", seed=seed)
        folder = tmp_path / f"v{seed}"
        save_sparse_model(model, folder, masks, metadata={"dataset": "cifar10"})
        shas.append(push_sparse_folder(folder, "user/revisions", token=TOKEN).oid)
        folders.append(folder)
    assert [c.oid for c in local_hub.commits("user/revisions")] == shas and len(set(shas)) == 2
    assert api.model_info("user/revisions").sha == shas[1]
    assert api.model_info("user/revisions", revision=shas[0]).sha == shas[0]
    assert sorted(api.list_repo_files("user/revisions")) == sorted(sparse_folder_files(folders[1]))
    for sha, folder in zip(shas, folders):  # each revision serves the weights of its push
        path = hf_hub_download(
            "user/revisions", DENSE_WEIGHTS_NAME, revision=sha, cache_dir=tmp_path / "c", token=TOKEN
        )
        assert Path(path).read_bytes() == (folder / DENSE_WEIGHTS_NAME).read_bytes()
    latest = hf_hub_download("user/revisions", SPARSITY_FILE_NAME, cache_dir=tmp_path / "c", token=TOKEN)
    assert Path(latest).read_bytes() == (folders[1] / SPARSITY_FILE_NAME).read_bytes()
    assert Path(latest).parent.name == shas[1]  # main resolved to the last commit

    # pushing the same folder again changes nothing: the client skips the empty commit
    assert push_sparse_folder(folders[1], "user/revisions", token=TOKEN).oid == shas[1]
    assert len(local_hub.commits("user/revisions")) == 2
    assert unhandled(local_hub) == []


def test_pushed_model_card_metadata_is_what_the_hub_validates(local_hub, tmp_path):
    trainer = push_trainer(tmp_path, "timm_resnet", "user/card")
    assert local_hub.calls("validate_yaml") >= 1  # the client had the card's YAML validated before committing
    card = ModelCard.load(hf_hub_download("user/card", "README.md", cache_dir=tmp_path / "c", token=TOKEN))
    data = card.data
    assert data.library_name == "timm" and data.pipeline_tag == "image-classification"
    assert data.base_model == "timm/resnet18.a1_in1k" and data.datasets == ["cifar10"]
    assert set(CARD_TAGS) | {"timm"} <= set(data.tags)
    record = json.loads((Path(trainer.args.output_dir) / SPARSITY_FILE_NAME).read_text())
    results = {r.metric_name: (r.metric_type, r.metric_value, r.dataset_type) for r in data.eval_results}
    assert results == {
        "Top-1 accuracy (pruned)": ("accuracy", record["metrics"]["pruned"]["eval_accuracy"], "cifar10"),
        "Top-5 accuracy (pruned)": ("top-5-accuracy", 1.0, "cifar10"),
        "Top-1 accuracy (dense, before pruning)": ("accuracy", record["metrics"]["dense"]["eval_accuracy"], "cifar10"),
    }
    assert all(r.task_type == "image-classification" for r in data.eval_results)
    # the model-index round-trips through huggingface_hub's own parser and writer
    model_index = data.to_dict()["model-index"]
    name, parsed = model_index_to_eval_results(model_index)
    assert name == "card" and eval_results_to_model_index(name, parsed) == model_index

    # a local base model is no Hub id: left out of the metadata (the Hub rejects it), and no metrics, no model-index
    model, masks = pruned_model("hf_resnet")
    folder = tmp_path / "plain"
    save_sparse_model(model, folder, masks, metadata={"base_model": str(tmp_path / "my-resnet")})
    push_sparse_folder(folder, "user/plain", token=TOKEN)
    plain = ModelCard.load(local_hub.folder("user/plain") / "README.md").data
    assert plain.base_model is None and plain.eval_results is None and plain.library_name == "transformers"


def test_checkpoint_pushes_resume_from_the_hub(local_hub, tmp_path):
    overrides = dict(save_strategy="steps", save_steps=1, hub_strategy="checkpoint", max_steps=2)
    trainer = push_trainer(tmp_path / "a", "timm_resnet", "user/ckpt", **overrides)
    messages = [c.message for c in local_hub.commits("user/ckpt")]
    assert messages == [
        "Training in progress, step 1",
        "Training in progress, step 1, checkpoint",
        "Training in progress, step 2",
        "Training in progress, step 2, checkpoint",
    ]  # push_to_hub() at the end uploads the same files as step 2's push: the client makes no empty commit
    assert trainer.hub_push_errors == []
    local_checkpoint = Path(trainer.args.output_dir) / "checkpoint-2"
    pushed = Path(snapshot_download("user/ckpt", allow_patterns=["last-checkpoint/*"], local_dir=tmp_path / "dl"))
    pushed = pushed / "last-checkpoint"
    assert manifest(pushed) == manifest(local_checkpoint, sparse_folder_files(local_checkpoint))
    assert mask_hash(checkpoint_masks(pushed)) == mask_hash(trainer.masks)

    def resume(folder: Path, where: str) -> TeacherGuidedPruningTrainer:
        args = tiny_config(
            tmp_path / where,
            pruning_method="magnitude",
            retrain_with_kd=False,
            sparsity=0.8,
            max_steps=4,
            learning_rate=0.01,
            save_strategy="no",
        )
        resumed = TeacherGuidedPruningTrainer(
            model=make_model("timm_resnet"), args=args, train_dataset=RandomImages(16)
        )
        resumed.train(resume_from_checkpoint=str(folder))
        return resumed

    from_hub, from_disk = resume(pushed, "from-hub"), resume(local_checkpoint, "from-disk")
    assert from_hub.state.global_step == 4
    assert mask_hash(from_hub.masks) == mask_hash(trainer.masks)
    assert_bit_identical(from_hub.model.state_dict(), from_disk.model.state_dict())
    assert unhandled(local_hub) == []


def test_listing_and_ranged_download_endpoints(local_hub, tmp_path):
    """The endpoints the round trips above do not reach on their own, through the same client: tree listing of a
    folder, paths-info, file_exists, and a resumed (``Range``) download."""
    folder = tmp_path / "out"
    model, masks = pruned_model("timm_resnet")
    save_sparse_model(model, folder, masks)
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("hello\n")
    push_sparse_folder(folder, "user/listing", token=TOKEN)
    api = HfApi(token=TOKEN)
    top = {entry.path: type(entry).__name__ for entry in api.list_repo_tree("user/listing")}
    assert top["extra"] == "RepoFolder" and top[DENSE_WEIGHTS_NAME] == "RepoFile" and "extra/notes.txt" not in top
    weights, notes = api.get_paths_info("user/listing", [DENSE_WEIGHTS_NAME, "extra/notes.txt", "missing.txt"])
    data = (folder / DENSE_WEIGHTS_NAME).read_bytes()
    assert weights.lfs.sha256 == hashlib.sha256(data).hexdigest() and weights.size == len(data)
    assert notes.lfs is None and notes.size == 6
    assert api.file_exists("user/listing", "extra/notes.txt") and not api.file_exists("user/listing", "nope.txt")
    url = huggingface_hub.hf_hub_url("user/listing", DENSE_WEIGHTS_NAME)
    response = _http.get_session().get(url, headers={"Range": "bytes=100-"})
    assert response.status_code == 206 and response.content == data[100:]
    assert response.headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
    assert unhandled(local_hub) == []


# --- faults ---------------------------------------------------------------------------------------------------------
FAULTS = {
    "401_on_commit": ("commit", 401, "unauthorized", "hf auth login"),
    "403_on_lfs_batch": ("lfs_batch", 403, "forbidden", "write access"),
    "404_on_preupload": ("preupload", 404, "not_found", "user-or-org/name"),
    "413_on_lfs_upload": ("lfs_upload", 413, "too_large", "size limit"),
    "500_on_commit": ("commit", 500, "http_error", "retry"),
    "500_on_lfs_upload": ("lfs_upload", 500, "http_error", "retry"),
    "dropped_lfs_upload": ("lfs_upload", None, "network", "network"),
}


@pytest.mark.parametrize("case", sorted(FAULTS))
def test_failed_push_over_http_is_one_clear_error_commits_nothing_and_retries(case, local_hub, tmp_path):
    endpoint, status, reason, hint = FAULTS[case]
    first, first_masks = pruned_model("timm_resnet", seed=0)
    save_sparse_model(first, tmp_path / "v1", first_masks)
    push_sparse_folder(tmp_path / "v1", "user/faults", token=TOKEN)
    before_commits = local_hub.commits("user/faults")

    model, masks = pruned_model("timm_resnet", seed=1)
    folder = tmp_path / "v2"
    save_sparse_model(model, folder, masks)
    before = manifest(folder)
    uploads_before = local_hub.calls("lfs_upload")
    local_hub.fail(endpoint, status, drop=status is None)
    with pytest.raises(HubPushError) as info:
        push_sparse_folder(folder, "user/faults", token=TOKEN)
    message = str(info.value)
    assert info.value.reason == reason, message
    assert hint.lower() in message.lower() and "intact" in message and "push_sparse_folder" in message
    if reason == "http_error":
        assert "HTTP 500" in message
    if endpoint == "lfs_upload" and status in (500, None):  # the client retried 5 times (waits recorded) first
        assert local_hub.calls("lfs_upload") - uploads_before == 6 and len(local_hub.retry_waits) == 5

    # nothing half-committed: the repo is as the first push left it
    assert local_hub.commits("user/faults") == before_commits
    assert_repo_is_the_folder(local_hub, "user/faults", tmp_path / "v1")
    # the local output is intact and complete (the card written before the upload is the only new file)
    after = manifest(folder)
    assert {k: after[k] for k in before} == before and set(after) - set(before) <= {"README.md"}
    check_sparse_folder(folder)
    assert_bit_identical(load_sparse(folder), expected_state(model, masks))

    local_hub.clear_faults()
    commit = push_sparse_folder(folder, "user/faults", token=TOKEN)
    assert [c.oid for c in local_hub.commits("user/faults")] == [c.oid for c in before_commits] + [commit.oid]
    assert_repo_is_the_folder(local_hub, "user/faults", folder)
    assert unhandled(local_hub) == []


def test_a_transient_lfs_failure_is_retried_by_the_client_into_one_commit(local_hub, tmp_path):
    model, masks = pruned_model("timm_resnet")
    save_sparse_model(model, tmp_path / "out", masks)
    local_hub.fail("lfs_upload", drop=True, times=1)
    push_sparse_folder(tmp_path / "out", "user/transient", token=TOKEN)
    assert local_hub.calls("lfs_upload") == 2 and len(local_hub.retry_waits) == 1
    assert len(local_hub.commits("user/transient")) == 1
    assert_repo_is_the_folder(local_hub, "user/transient", tmp_path / "out")


def test_a_rejected_token_is_named_before_anything_is_written(local_hub, tmp_path):
    model, masks = pruned_model("timm_resnet")
    save_sparse_model(model, tmp_path / "out", masks)
    with pytest.raises(HubPushError, match="hf auth login") as info:
        push_sparse_folder(tmp_path / "out", "user/wrong-token", token="hf_not_the_token")
    assert info.value.reason == "unauthorized"
    assert local_hub.commits("user/wrong-token") == [] and local_hub.calls("commit") == 0
    assert HfApi(token=TOKEN).whoami()["name"] == "user"


# --- the recipe -----------------------------------------------------------------------------------------------------
def test_recipe_push_to_hub_round_trip(local_hub, tiny_cifar, tmp_path, monkeypatch):
    """`recipes/prune_cifar.py --push_to_hub` (in this process, tiny data): the pruned run lands on the Hub as one
    commit with the recipe's measured accuracies in the card's model-index, and loads with plain timm."""
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: TOKEN)
    out = tmp_path / "run"
    args = test_recipe._common_args(tiny_cifar, out) + [
        "--model_name_or_path",
        "test_resnet",
        "--max_train_samples",
        "64",
    ]
    args += ["--teacher_epochs", "0", "--pruning_method", "magnitude", "--retrain_with_kd", "False"]
    args += ["--push_to_hub", "True", "--hub_model_id", "user/recipe", "--hub_token", TOKEN, "--sparsity", "0.8"]
    test_recipe._recipe_module().main(args)
    results = json.loads((out / "results.json").read_text())
    (run,) = results["runs"]
    assert run["hub_repo"] == "user/recipe"
    assert len(local_hub.commits("user/recipe")) == 1
    assert_repo_is_the_folder(local_hub, "user/recipe", Path(run["model_dir"]))
    card = ModelCard.load(local_hub.folder("user/recipe") / "README.md").data
    top1 = {r.metric_name: r.metric_value for r in card.eval_results if r.metric_type == "accuracy"}
    assert top1 == {
        "Top-1 accuracy (pruned)": run["after_retraining"]["accuracy"],
        "Top-1 accuracy (dense, before pruning)": results["dense_student"]["test"]["accuracy"],
    }
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    (loaded,) = load_in_fresh_process(
        local_hub,
        [{"kind": "timm", "repo": "user/recipe", "out": str(tmp_path / "load" / "timm")}],
        x,
        tmp_path / "load",
    )
    import timm

    local = timm.create_model(f"local-dir:{run['model_dir']}", pretrained=True).eval()
    assert torch.equal(loaded["logits"], logits_of(local, x))
    assert unhandled(local_hub) == []
