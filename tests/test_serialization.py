"""Sparse checkpoints: dense files that plain timm/transformers load, the compact bitmask format, sparsity.json."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_tgprune.core.masking import apply_masks, global_masks, mask_hash, prunable_parameters, sparsity_report
from hf_tgprune.io.serialization import (
    BITMASK_WEIGHTS_NAME,
    DENSE_WEIGHTS_NAME,
    SPARSITY_FILE_NAME,
    SparseFormatError,
    load_sparse,
    load_sparse_masks,
    save_sparse_model,
)
from tests.utils import IMAGE_SIZE, make_model

FAMILIES = ["timm_resnet", "hf_resnet"]


def pruned_model(name: str, sparsity: float = 0.9, seed: int = 0):
    """A tiny model with a global magnitude mask applied; returns (model, masks)."""
    model = make_model(name, seed=seed).eval()
    params = prunable_parameters(model)
    masks = global_masks({n: p.detach().abs() for n, p in params.items()}, sparsity)
    apply_masks(model, masks)
    return model, masks


def logits_of(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert raw_bytes(a[key]) == raw_bytes(b[key]), key


# A loader that never imports hf_tgprune: `sys.modules["hf_tgprune"] = None` makes any import of it fail, as if the
# package were not installed. Each job loads a folder with plain timm or plain transformers, runs the logits on a
# fixed input and writes them with the loaded state dict.
PLAIN_LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_tgprune"] = None
    import torch
    from safetensors.torch import load_file, save_file
    torch.set_num_threads(int(sys.argv[3]))  # the caller's thread count: same reduction order, bit-equal logits
    jobs = json.loads(sys.argv[1])
    x = load_file(sys.argv[2])["x"]
    for job in jobs:
        if job["loader"] == "timm":
            import timm
            model = timm.create_model(job["name"], pretrained=True)
        else:
            from transformers import AutoModelForImageClassification
            model = AutoModelForImageClassification.from_pretrained(job["name"])
        model.eval()
        with torch.no_grad():
            out = model(x)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file({"logits": logits.contiguous()}, job["out"] + ".logits.safetensors")
        save_file(state, job["out"] + ".state.safetensors")
    assert not any(m == "hf_tgprune" or m.startswith("hf_tgprune.") for m, v in sys.modules.items() if v is not None)
    print("plain-load-ok")
    """
)


def run_plain_loaders(jobs: list[dict], x: torch.Tensor, workdir: Path, extra_env: dict | None = None) -> list[dict]:
    """Run PLAIN_LOADER in a fresh interpreter (no hf_tgprune); returns [{"logits", "state"}] per job."""
    save_file({"x": x.contiguous()}, str(workdir / "input.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(extra_env or {}))
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PLAIN_LOADER,
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
    assert result.returncode == 0 and "plain-load-ok" in result.stdout, result.stderr[-4000:]
    return [
        {
            "logits": load_file(job["out"] + ".logits.safetensors")["logits"],
            "state": load_file(job["out"] + ".state.safetensors"),
        }
        for job in jobs
    ]


def expected_state(model, masks) -> dict:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, mask in masks.items():
        state[name] = torch.where(mask, state[name], torch.zeros((), dtype=state[name].dtype))
    return state


# --- dense: plain timm / plain transformers ------------------------------------------------------------------------
def test_dense_loads_with_plain_timm_and_transformers_without_hf_tgprune(tmp_path):
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    timm_model, timm_masks = pruned_model("timm_resnet")
    hf_model, hf_masks = pruned_model("hf_resnet")
    save_sparse_model(timm_model, tmp_path / "timm", timm_masks)
    save_sparse_model(hf_model, tmp_path / "hf", hf_masks)

    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 4 and "pretrained_cfg" in config

    jobs = [
        {"loader": "timm", "name": f"local-dir:{tmp_path / 'timm'}", "out": str(tmp_path / "a")},
        # transformers reads timm folders through TimmWrapper
        {"loader": "transformers", "name": str(tmp_path / "timm"), "out": str(tmp_path / "b")},
        {"loader": "transformers", "name": str(tmp_path / "hf"), "out": str(tmp_path / "c")},
    ]
    timm_plain, timm_via_hf, hf_plain = run_plain_loaders(jobs, x, tmp_path)

    assert torch.equal(timm_plain["logits"], logits_of(timm_model, x))
    assert torch.equal(timm_via_hf["logits"], logits_of(timm_model, x))
    assert torch.equal(hf_plain["logits"], logits_of(hf_model, x))
    assert_bit_identical(timm_plain["state"], expected_state(timm_model, timm_masks))
    assert_bit_identical(hf_plain["state"], expected_state(hf_model, hf_masks))
    # zeros exactly where the mask prunes, and nowhere else among the kept weights of this model
    for name, mask in timm_masks.items():
        weight = timm_plain["state"][name]
        assert torch.equal(weight == 0, ~mask | (timm_model.state_dict()[name] == 0))


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_pruned_entries_are_positive_zero(family, tmp_path):
    model, masks = pruned_model(family)
    with torch.no_grad():  # mul by the mask leaves -0.0 for negative weights; the file must hold +0.0
        for name, p in model.named_parameters():
            if name in masks:
                p.copy_(torch.where(masks[name], p, torch.full_like(p, -0.0)))
    save_sparse_model(model, tmp_path, masks)
    saved = load_file(tmp_path / DENSE_WEIGHTS_NAME)
    for name, mask in masks.items():
        assert not torch.signbit(saved[name][~mask]).any()


# --- bitmask -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_bitmask_round_trip_is_bit_exact(family, tmp_path):
    model, masks = pruned_model(family)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    save_sparse_model(model, tmp_path / "dense", masks)
    record = save_sparse_model(model, tmp_path / "bitmask", masks, save_format="bitmask")
    assert not (tmp_path / "bitmask" / DENSE_WEIGHTS_NAME).exists()
    assert record["weights_file"] == BITMASK_WEIGHTS_NAME

    dense = load_sparse(tmp_path / "dense")
    compact = load_sparse(tmp_path / "bitmask")
    assert_bit_identical(compact, dense)
    assert_bit_identical(compact, expected_state(model, masks))

    fresh = make_model(family, seed=123).eval()
    assert not torch.equal(logits_of(fresh, x), logits_of(model, x))
    assert load_sparse(tmp_path / "bitmask", model=fresh) is fresh
    assert torch.equal(logits_of(fresh, x), logits_of(model, x))

    restored = load_sparse_masks(tmp_path / "bitmask")
    assert restored.keys() == masks.keys()
    assert all(torch.equal(restored[n], masks[n]) for n in masks)
    assert mask_hash(restored) == record["mask"]["sha256"] == mask_hash(masks)


def test_bitmask_rebuilds_architecture_from_saved_config(tmp_path):
    import timm
    from transformers import AutoConfig, AutoModelForImageClassification

    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    timm_model, timm_masks = pruned_model("timm_resnet")
    save_sparse_model(timm_model, tmp_path / "t", timm_masks, save_format="bitmask")
    rebuilt = load_sparse(tmp_path / "t", timm.create_model(f"local-dir:{tmp_path / 't'}", pretrained=False))
    assert torch.equal(logits_of(rebuilt.eval(), x), logits_of(timm_model, x))

    hf_model, hf_masks = pruned_model("hf_resnet")
    save_sparse_model(hf_model, tmp_path / "h", hf_masks, save_format="bitmask")
    skeleton = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(tmp_path / "h"))
    rebuilt = load_sparse(tmp_path / "h", skeleton)
    assert torch.equal(logits_of(rebuilt.eval(), x), logits_of(hf_model, x))


def test_bitmask_without_masks_and_other_dtypes_is_bit_exact(tmp_path):
    model = make_model("timm_resnet").eval().to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_((torch.rand_like(p.float()) > 0.7).to(p.dtype))  # includes -0.0 entries
    save_sparse_model(model, tmp_path, None, save_format="bitmask")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    assert_bit_identical(load_sparse(tmp_path), state)


def test_bitmask_size_at_90_percent(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    params = prunable_parameters(model)
    masks = global_masks({n: p.detach().abs() for n, p in params.items()}, 0.9)
    apply_masks(model, masks)
    dense = save_sparse_model(model, tmp_path / "d", masks)["files"][DENSE_WEIGHTS_NAME]["bytes"]
    compact = save_sparse_model(model, tmp_path / "b", masks, save_format="bitmask")["files"][BITMASK_WEIGHTS_NAME]
    assert compact["bytes"] / dense <= 0.14


def test_save_format_switch_removes_stale_weights(tmp_path):
    model, masks = pruned_model("timm_resnet")
    save_sparse_model(model, tmp_path, masks, save_format="bitmask")
    save_sparse_model(model, tmp_path, masks)
    assert (tmp_path / DENSE_WEIGHTS_NAME).exists() and not (tmp_path / BITMASK_WEIGHTS_NAME).exists()
    assert_bit_identical(load_sparse(tmp_path), expected_state(model, masks))


# --- sparsity.json ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("save_format", ["dense", "bitmask"])
def test_sparsity_json_equals_measured_sparsity(family, save_format, tmp_path):
    model, masks = pruned_model(family, sparsity=0.8)
    metadata = {
        "method": "magnitude",
        "hyperparameters": {"sparsity": 0.8, "alpha": 0.7},
        "teacher": "timm/resnet50.a1_in1k",
        "calibration_size": 128,
        "dataset": "cifar10",
        "metrics": {"dense": {"accuracy": 0.91}, "pruned": {"accuracy": 0.9}},
    }
    save_sparse_model(model, tmp_path, masks, save_format=save_format, metadata=metadata)
    record = json.loads((tmp_path / SPARSITY_FILE_NAME).read_text())

    # independent count from the file on disk
    state = load_sparse(tmp_path)
    for name, counts in record["sparsity"]["layers"].items():
        assert counts["numel"] == state[name].numel()
        assert counts["zeros"] == int((state[name] == 0).sum())
        assert counts["sparsity"] == pytest.approx(counts["zeros"] / counts["numel"])
    params = [n for n, _ in model.named_parameters()]
    assert record["sparsity"]["total"]["numel"] == sum(state[n].numel() for n in params)
    assert record["sparsity"]["total"]["zeros"] == sum(int((state[n] == 0).sum()) for n in params)
    # and it agrees with the library's in-memory report
    report = sparsity_report(model, masks)
    assert record["sparsity"]["layers"].keys() == report["layers"].keys()
    for saved, measured in [
        *zip(record["sparsity"]["layers"].values(), report["layers"].values()),
        (record["sparsity"]["prunable"], report["prunable"]),
        (record["sparsity"]["total"], report["total"]),
    ]:
        assert (saved["numel"], saved["zeros"]) == (measured["numel"], measured["zeros"])
        assert saved["sparsity"] == pytest.approx(measured["sparsity"])
    assert record["sparsity"]["pruned_by_mask"] == report["pruned_by_mask"]

    assert record["mask"]["sha256"] == mask_hash(masks)
    assert record["format"] == save_format
    for key, value in metadata.items():
        assert record[key] == value
    assert {"hf_tgprune", "torch", "safetensors"} <= set(record["library"])
    weights = tmp_path / record["weights_file"]
    assert record["files"][weights.name]["bytes"] == weights.stat().st_size


def test_weights_outside_the_mask_are_saved_as_zero_with_a_warning(tmp_path, caplog):
    model, masks = pruned_model("timm_resnet")
    name = next(iter(masks))
    with torch.no_grad():
        dict(model.named_parameters())[name].add_(1.0)  # revive pruned weights in memory
    with caplog.at_level("WARNING", logger="hf_tgprune.io.serialization"):
        record = save_sparse_model(model, tmp_path, masks)
    assert "outside the mask were non-zero" in caplog.text
    assert record["sparsity"]["layers"][name]["zeros"] >= int((~masks[name]).sum())
    assert not load_file(tmp_path / DENSE_WEIGHTS_NAME)[name][~masks[name]].any()


def test_enforce_masks_false_keeps_the_training_state(tmp_path):
    model, masks = pruned_model("timm_resnet")
    name = next(iter(masks))
    with torch.no_grad():
        dict(model.named_parameters())[name].add_(1.0)  # e.g. dense weights kept under a mask by a schedule
    record = save_sparse_model(model, tmp_path, masks, enforce_masks=False)
    assert_bit_identical(load_sparse(tmp_path), {k: v.detach() for k, v in model.state_dict().items()})
    assert record["sparsity"]["masks_enforced"] is False
    assert record["sparsity"]["nonzero_outside_mask"] == int((~masks[name]).sum())
    assert record["mask"]["sha256"] == mask_hash(masks)
    with pytest.raises(ValueError, match="dense"):
        save_sparse_model(model, tmp_path, masks, enforce_masks=False, save_format="bitmask")


def test_bad_arguments(tmp_path):
    model, masks = pruned_model("timm_resnet")
    with pytest.raises(ValueError, match="save_format"):
        save_sparse_model(model, tmp_path, masks, save_format="csr")
    with pytest.raises(ValueError, match="reserved"):
        save_sparse_model(model, tmp_path, masks, metadata={"sparsity": 0.5})
    with pytest.raises(KeyError, match="not in the model's state dict"):
        save_sparse_model(model, tmp_path, {"nope.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(FileNotFoundError):
        load_sparse(tmp_path / "missing")


# --- corrupted / truncated files -----------------------------------------------------------------------------------
def _tensor_span(path: Path, key: str) -> tuple[int, int]:
    """Byte range of one tensor's data inside a safetensors file."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    start, stop = header[key]["data_offsets"]
    return 8 + header_len + start, 8 + header_len + stop


def _flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x5A
    path.write_bytes(bytes(raw))


@pytest.fixture
def bitmask_folder(tmp_path):
    model, masks = pruned_model("timm_resnet")
    save_sparse_model(model, tmp_path, masks, save_format="bitmask")
    return tmp_path, model, masks


def _alone(folder: Path) -> Path:
    """A copy of the bitmask file without sparsity.json next to it: only the file's own checks apply."""
    alone = folder / "alone"
    alone.mkdir()
    target = alone / BITMASK_WEIGHTS_NAME
    target.write_bytes((folder / BITMASK_WEIGHTS_NAME).read_bytes())
    return target


@pytest.mark.parametrize("part", ["values", "bitmask"])
def test_corrupted_bitmask_payload_is_a_clear_error(bitmask_folder, part):
    folder, model, masks = bitmask_folder
    name = sorted(masks)[len(masks) // 2]
    for path in (folder / BITMASK_WEIGHTS_NAME, _alone(folder)):
        start, stop = _tensor_span(path, f"{name}::{part}")
        _flip_byte(path, (start + stop) // 2)
    target = make_model("timm_resnet", seed=5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(SparseFormatError, match="corrupted"):
        load_sparse(folder / "alone", model=target)  # no sparsity.json: the checksums inside the file catch it
    with pytest.raises(SparseFormatError, match="SHA-256"):
        load_sparse(folder, model=target)  # with sparsity.json: the file's recorded SHA-256 catches it first
    assert_bit_identical(target.state_dict(), before)  # the model was not touched


def test_corrupted_dense_tensor_payload_in_bitmask_file(bitmask_folder):
    folder, _, masks = bitmask_folder
    path = _alone(folder)
    dense_key = next(k for k in load_file(path) if "::" not in k and k.endswith("running_var"))
    start, stop = _tensor_span(path, dense_key)
    _flip_byte(path, start)
    with pytest.raises(SparseFormatError, match="checksum mismatch"):
        load_sparse(path)


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999])
def test_truncated_bitmask_file_is_a_clear_error(bitmask_folder, keep):
    folder, _, _ = bitmask_folder
    path = _alone(folder)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(SparseFormatError, match="truncated|corrupted"):
        load_sparse(path)


def test_tampered_header_and_unknown_version_are_clear_errors(bitmask_folder):
    folder, _, _ = bitmask_folder
    path = _alone(folder)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    header = json.loads(metadata["hf_tgprune.header"])

    wrong_shape = json.loads(json.dumps(header))
    first = next(iter(wrong_shape["tensors"]))
    wrong_shape["tensors"][first]["shape"][0] += 1
    save_file(tensors, path, metadata={**metadata, "hf_tgprune.header": json.dumps(wrong_shape)})
    with pytest.raises(SparseFormatError, match="header checksum"):
        load_sparse(path)

    odd_dtype = json.loads(json.dumps(header))
    odd_dtype["tensors"][first]["dtype"] = "Tensor"  # names are looked up in a fixed table, never as attributes
    odd_dtype["header_sha256"] = hashlib.sha256(json.dumps(odd_dtype["tensors"], sort_keys=True).encode()).hexdigest()
    save_file(tensors, path, metadata={**metadata, "hf_tgprune.header": json.dumps(odd_dtype)})
    with pytest.raises(SparseFormatError, match="Unknown dtype 'Tensor'"):
        load_sparse(path)

    future = dict(header, version=99)
    save_file(tensors, path, metadata={**metadata, "hf_tgprune.header": json.dumps(future)})
    with pytest.raises(SparseFormatError, match="version 99"):
        load_sparse(path)

    missing = {k: v for k, v in tensors.items() if not k.endswith("::values")}
    save_file(missing, path, metadata=metadata)
    with pytest.raises(SparseFormatError, match="missing"):
        load_sparse(path)


def test_corrupted_dense_file_is_caught_by_the_recorded_checksum(tmp_path):
    model, masks = pruned_model("hf_resnet")
    save_sparse_model(model, tmp_path, masks)
    path = tmp_path / DENSE_WEIGHTS_NAME
    name = next(iter(masks))
    start, stop = _tensor_span(path, name)
    _flip_byte(path, stop - 1)
    with pytest.raises(SparseFormatError, match="SHA-256"):
        load_sparse(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SparseFormatError):
        load_sparse(path, verify=False)


# --- names on disk: transformers 5 renames (and fuses) parameters when saving ----------------------------------------
def make_hf_dinov2_swiglu(num_labels: int = 4, seed: int = 0):
    """Dinov2 with SwiGLU: `mlp.gate_proj` and `mlp.up_proj` in memory are one fused `mlp.weights_in` on disk."""
    from transformers import Dinov2Config, Dinov2ForImageClassification

    torch.manual_seed(seed)
    config = Dinov2Config(
        num_labels=num_labels,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
        use_swiglu_ffn=True,
    )
    return Dinov2ForImageClassification(config)


def renamed_model(name: str):
    return make_hf_dinov2_swiglu() if name == "hf_dinov2_swiglu" else make_model(name)


@pytest.mark.parametrize("name", ["hf_vit", "hf_dinov2_swiglu"])
@pytest.mark.parametrize("save_format", ["dense", "bitmask"])
def test_renamed_transformers_parameters_save_and_reload(name, save_format, tmp_path):
    from transformers import AutoModelForImageClassification

    model = renamed_model(name).eval()
    params = prunable_parameters(model)
    masks = global_masks({n: p.detach().abs() for n, p in params.items()}, 0.9)
    apply_masks(model, masks)
    record = save_sparse_model(model, tmp_path, masks, save_format=save_format)
    on_disk = load_sparse(tmp_path)
    assert set(record["sparsity"]["layers"]) <= set(on_disk)  # named as in the file
    assert not set(masks) <= set(on_disk)  # ... which are not the in-memory names
    report = sparsity_report(model, masks)
    for key in ("prunable", "total"):
        assert (record["sparsity"][key]["numel"], record["sparsity"][key]["zeros"]) == (
            report[key]["numel"],
            report[key]["zeros"],
        )
    assert record["sparsity"]["pruned_by_mask"] == round(0.9 * report["prunable"]["numel"])

    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    if save_format == "dense":  # plain transformers reads the file
        plain = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
        assert torch.equal(logits_of(plain, x), logits_of(model, x))
    fresh = load_sparse(tmp_path, renamed_model(name).__class__(model.config).eval())
    assert torch.equal(logits_of(fresh, x), logits_of(model, x))
    restored = load_sparse_masks(tmp_path, model=model)
    if save_format == "bitmask":  # exact masks, keyed like trainer.masks
        assert mask_hash(restored) == record["mask"]["sha256"] == mask_hash(masks)
    else:
        assert set(restored) == set(masks)


def test_without_masks_every_weight_matrix_is_reported(tmp_path):
    """masks=None on a renamed model: every tensor of dim >= 2 is measured from the file, none dropped."""
    model, masks = pruned_model("hf_vit")
    record = save_sparse_model(model, tmp_path, None)
    on_disk = load_sparse(tmp_path)
    matrices = {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert len(record["sparsity"]["layers"]) == len(matrices)
    assert set(record["sparsity"]["layers"]) <= set(on_disk)
    zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n in matrices)
    assert record["sparsity"]["prunable"]["zeros"] == zeros
    assert record["sparsity"]["prunable"]["numel"] == sum(
        p.numel() for n, p in model.named_parameters() if n in matrices
    )


# --- the saved folder describes its preprocessing --------------------------------------------------------------------
DATA_CONFIG = {
    "image_size": IMAGE_SIZE,
    "mean": (0.25, 0.5, 0.75),
    "std": (0.5, 0.25, 0.125),
    "interpolation": "bicubic",
}


def _images():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return [
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
        for h, w in ((IMAGE_SIZE, IMAGE_SIZE), (40, 48))
    ]


def _expected(image):
    """The eval transform of hf_tgprune.data for DATA_CONFIG: resize the shorter side, center crop, normalise."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(IMAGE_SIZE, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(IMAGE_SIZE),
            T.ToTensor(),
            T.Normalize(DATA_CONFIG["mean"], DATA_CONFIG["std"]),
        ]
    )(image)


@pytest.mark.parametrize("save_format", ["dense", "bitmask"])
def test_timm_folder_loads_with_its_training_preprocessing(save_format, tmp_path):
    import timm
    from timm.data import create_transform, resolve_model_data_config

    model, masks = pruned_model("timm_resnet")
    assert model.pretrained_cfg["input_size"][-1] != IMAGE_SIZE  # the architecture's own default is another size
    record = save_sparse_model(model, tmp_path, masks, save_format=save_format, data_config=DATA_CONFIG)
    assert record["preprocessing"] == {**DATA_CONFIG, "mean": [0.25, 0.5, 0.75], "std": [0.5, 0.25, 0.125]}
    reloaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=save_format == "dense")
    config = resolve_model_data_config(reloaded)
    assert config["input_size"] == (3, IMAGE_SIZE, IMAGE_SIZE) and config["crop_pct"] == 1.0
    assert resolve_model_data_config(reloaded, use_test_size=True)["input_size"] == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert tuple(config["mean"]) == DATA_CONFIG["mean"] and config["interpolation"] == "bicubic"
    transform = create_transform(**config, is_training=False)
    for image in _images():
        assert torch.allclose(transform(image), _expected(image), atol=1e-6)


def test_transformers_folder_loads_with_its_training_preprocessing(tmp_path):
    from transformers import AutoImageProcessor

    model, masks = pruned_model("hf_resnet")
    save_sparse_model(model, tmp_path, masks, data_config=DATA_CONFIG)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    for image in _images():
        pixels = processor(image, return_tensors="pt")["pixel_values"][0]
        assert pixels.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert torch.allclose(pixels, _expected(image), atol=0.1 if image.size != (IMAGE_SIZE,) * 2 else 1e-5)


def test_data_config_the_model_cannot_run_at_is_a_clear_error(tmp_path):
    import timm

    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="data_config does not fit"):
        save_sparse_model(model, tmp_path, None, data_config={**DATA_CONFIG, "image_size": 64})
    with pytest.raises(ValueError, match="data_config lacks"):
        save_sparse_model(model, tmp_path, None, data_config={"image_size": 32})


# --- no local paths in what is published -------------------------------------------------------------------------------
def test_sparsity_json_and_card_carry_no_local_paths(tmp_path, monkeypatch):
    from hf_tgprune.io.modelcard import create_model_card

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "cifar10").mkdir(parents=True)
    model, masks = pruned_model("timm_resnet")
    metadata = {
        "teacher": str(tmp_path / "runs" / "teacher"),
        "base_model": "~/models/resnet",
        "dataset": "data/cifar10",
        "extra": {"output_dir": str(tmp_path / "out")},
    }
    record = save_sparse_model(model, tmp_path / "out", masks, metadata=metadata)
    assert (record["teacher"], record["base_model"], record["dataset"]) == ("teacher", "resnet", "cifar10")
    assert record["extra"] == {"output_dir": "out"}
    text = (tmp_path / "out" / SPARSITY_FILE_NAME).read_text() + create_model_card(tmp_path / "out").content
    assert str(tmp_path) not in text and "~/" not in text


# --- sparsity.json is cross-checked with its weights file ------------------------------------------------------------
def _edit(folder: Path, edit) -> None:
    record = json.loads((folder / SPARSITY_FILE_NAME).read_text())
    edit(record)
    (folder / SPARSITY_FILE_NAME).write_text(json.dumps(record))


RECORD_EDITS = {
    "a layer's zeros": (
        lambda r: r["sparsity"]["layers"][next(iter(r["sparsity"]["layers"]))].update(zeros=0),
        "zeros",
    ),
    "a layer removed": (lambda r: r["sparsity"]["layers"].popitem(), "layer|prunable"),
    "a layer added": (lambda r: r["sparsity"]["layers"].update({"nope.weight": {"numel": 1, "zeros": 0}}), "nope"),
    "the mask hash": (lambda r: r["mask"].update(sha256="1" * 64, sha256_on_disk="1" * 64), "mask hash"),
    "the files entry": (lambda r: r.pop("files"), "no `files` table"),
    "the format": (lambda r: r.update(format="dense" if r["format"] == "bitmask" else "bitmask"), "format"),
    "everything": (lambda r: r.clear(), "no `files` table"),
    "the layer table only": (lambda r: r["sparsity"].pop("layers"), "no `sparsity.layers` table"),
}


@pytest.mark.parametrize("edit", list(RECORD_EDITS))
@pytest.mark.parametrize("save_format", ["dense", "bitmask"])
def test_an_edited_sparsity_json_is_refused(tmp_path, save_format, edit):
    model, masks = pruned_model("timm_resnet")
    record = save_sparse_model(model, tmp_path, masks, save_format=save_format)
    assert record["mask"]["sha256_on_disk"] == record["mask"]["sha256"]  # timm: same names on disk
    change, message = RECORD_EDITS[edit]
    _edit(tmp_path, change)
    for load in (load_sparse, load_sparse_masks):
        with pytest.raises(SparseFormatError, match=f"sparsity.json.*({message})"):
            load(tmp_path)
    load_sparse(tmp_path, verify=False)  # verification can be skipped explicitly


@pytest.mark.parametrize("content", ["", '{"format": "dense", "spar', "[1, 2]"])
def test_a_truncated_or_garbled_sparsity_json_is_a_clear_error(tmp_path, content):
    model, masks = pruned_model("timm_resnet")
    save_sparse_model(model, tmp_path, masks)
    (tmp_path / SPARSITY_FILE_NAME).write_text(content)
    with pytest.raises(SparseFormatError, match=r"sparsity.json( is not valid JSON.*truncated|: holds a JSON list)"):
        load_sparse(tmp_path)


def test_renamed_transformers_masks_are_checked_on_disk(tmp_path):
    model = renamed_model("hf_dinov2_swiglu")
    params = prunable_parameters(model)
    masks = global_masks({n: p.detach().abs() for n, p in params.items()}, 0.8)
    apply_masks(model, masks)
    record = save_sparse_model(model, tmp_path, masks, save_format="bitmask")
    assert record["mask"]["sha256"] == mask_hash(masks)
    assert mask_hash(load_sparse_masks(tmp_path)) == record["mask"]["sha256_on_disk"]
    assert mask_hash(load_sparse_masks(tmp_path, model)) == record["mask"]["sha256"]
