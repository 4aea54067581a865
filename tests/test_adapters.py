"""Model adapters: heads, labels, data config, names, unwrapping; and the shared helpers of hf_tgprune.core.utils."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from hf_tgprune.core.adapters import (
    ModelAdapter,
    check_same_num_labels,
    classifier_parameter_names,
    data_config,
    get_adapter,
    image_processor,
    model_name,
    register_adapter,
    unwrap_model,
)
from hf_tgprune.core.masking import prunable_parameters
from hf_tgprune.core.utils import atomic_path, is_hub_id, is_local_path, jsonable, public_name, write_json_atomic
from tests.utils import IMAGE_SIZE, make_model


def _timm(name: str, **kwargs):
    import timm

    return timm.create_model(name, num_classes=4, **kwargs)


def _tiny_vit_args():
    return dict(img_size=IMAGE_SIZE, patch_size=8, embed_dim=32, depth=1, num_heads=2)


def _hf(config_cls: str, model_cls: str, **kwargs):
    import transformers

    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(num_labels=4, **kwargs))


HF_VIT_ARGS = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
)
HF_LEVIT_ARGS = dict(image_size=32, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2], depths=[1, 1, 1])

# every head each model declares, by module name
TWO_HEADS = {
    "timm deit distilled": (
        lambda: _timm("deit_tiny_distilled_patch16_224", **_tiny_vit_args()),
        {"head", "head_dist"},
    ),
    "timm levit": (
        lambda: _timm(
            "levit_128s", img_size=32, embed_dim=(16, 24, 32), key_dim=8, num_heads=(1, 2, 2), depth=(1, 1, 1)
        ),
        {"head.linear", "head_dist.linear"},
    ),
    "timm pit distilled": (lambda: _timm("pit_ti_distilled_224", img_size=32), {"head", "head_dist"}),
    "timm efficientformer": (lambda: _timm("efficientformer_l1"), {"head", "head_dist"}),
    "timm swiftformer": (lambda: _timm("swiftformer_xs"), {"head", "head_dist"}),
    "hf DeiTForImageClassificationWithTeacher": (
        lambda: _hf("DeiTConfig", "DeiTForImageClassificationWithTeacher", **HF_VIT_ARGS),
        {"cls_classifier", "distillation_classifier"},
    ),
    "hf LevitForImageClassificationWithTeacher": (
        lambda: _hf("LevitConfig", "LevitForImageClassificationWithTeacher", key_dim=[8, 8, 8], **HF_LEVIT_ARGS),
        {"classifier.linear", "classifier_distill.linear"},
    ),
    "hf SwiftFormerForImageClassification": (
        lambda: _hf(
            "SwiftFormerConfig", "SwiftFormerForImageClassification", depths=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32]
        ),
        {"head", "dist_head"},
    ),
}


@pytest.mark.parametrize("case", sorted(TWO_HEADS))
def test_every_declared_head_is_excluded_from_pruning(case):
    factory, heads = TWO_HEADS[case]
    model = factory()
    head_weights = {f"{head}.weight" for head in heads}
    assert head_weights <= classifier_parameter_names(model)
    prunable = prunable_parameters(model)
    assert not head_weights & prunable.keys()
    assert not any(name.startswith(tuple(f"{h}." for h in heads)) for name in prunable)
    assert prunable  # the backbone is still pruned


@pytest.mark.parametrize("name", ["timm_resnet", "timm_vit", "hf_resnet", "hf_vit"])
def test_single_head_models(name):
    model = make_model(name)
    expected = {"timm_resnet": "fc", "timm_vit": "head", "hf_resnet": "classifier.1", "hf_vit": "classifier"}[name]
    assert classifier_parameter_names(model) == {f"{expected}.weight", f"{expected}.bias"}


def test_timm_model_wrapped_by_transformers_keeps_its_head():
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    config = TimmWrapperConfig.from_dict({"architecture": "test_resnet", "num_classes": 4, "num_labels": 4})
    model = TimmWrapperForImageClassification(config)
    assert classifier_parameter_names(model) == {"timm_model.fc.weight", "timm_model.fc.bias"}


def test_plain_torch_head_is_the_last_linear():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 8), nn.ReLU(), nn.Linear(8, 4))
    assert classifier_parameter_names(model) == {"4.weight", "4.bias"}
    assert get_adapter(model).name == "torch" and get_adapter(model).library_name is None


def test_unwrap_model_looks_through_any_nesting():
    model = make_model("timm_resnet")
    assert unwrap_model(nn.DataParallel(model)) is model
    compiled = torch.compile(model)
    assert unwrap_model(compiled) is model
    assert unwrap_model(nn.DataParallel(compiled)) is model
    assert get_adapter(nn.DataParallel(compiled)).name == "timm"


def test_check_same_num_labels_names_the_fix():
    check_same_num_labels(make_model("timm_resnet"), make_model("hf_resnet"))
    check_same_num_labels(make_model("timm_resnet"), None)
    with pytest.raises(ValueError, match=r"disagree on the number of labels \(10 vs 4\).*num_classes.*num_labels"):
        check_same_num_labels(make_model("timm_resnet"), make_model("hf_resnet", num_labels=10))


def test_data_config_per_family():
    from timm.data import resolve_model_data_config

    timm_model = make_model("timm_vit")
    timm_config, declared = data_config(timm_model), resolve_model_data_config(timm_model)
    assert timm_config.image_size == declared["input_size"][-1] and timm_config.mean == tuple(declared["mean"])
    assert timm_config.interpolation == declared["interpolation"]
    assert data_config(make_model("hf_vit")).image_size == IMAGE_SIZE
    assert data_config(nn.Linear(2, 2)).image_size == 224
    assert image_processor(make_model("timm_resnet"), "anything") is None


def test_model_name_is_never_a_local_path(tmp_path):
    model = make_model("hf_resnet")
    model.config._name_or_path = str(tmp_path / "runs" / "teacher")
    assert model_name(model) == "teacher"
    model.config._name_or_path = "microsoft/resnet-18"
    assert model_name(model) == "microsoft/resnet-18"
    assert model_name(make_model("timm_resnet")) == "test_resnet"
    assert model_name(None) is None


def test_register_adapter_refuses_duplicate_names_and_is_looked_up_by_name():
    class Toy(nn.Module):
        def forward(self, x):
            return x

    class ToyAdapter(ModelAdapter):
        name = "toy-family"

        def matches(self, model):
            return isinstance(model, Toy)

        def num_labels(self, model):
            return 7

    from hf_tgprune.core import adapters

    adapter = register_adapter(ToyAdapter())
    try:
        assert get_adapter(Toy()) is adapter and get_adapter("toy-family") is adapter
        with pytest.raises(ValueError, match="registered already"):
            register_adapter(ToyAdapter())
    finally:
        adapters._ADAPTERS.remove(adapter)
    with pytest.raises(KeyError, match="toy-family"):
        get_adapter("toy-family")


# --- hf_tgprune.core.utils ----------------------------------------------------------------------------------------------
def test_jsonable():
    import enum

    import numpy as np

    class Kind(str, enum.Enum):
        A = "a"

    value = {
        "t": torch.tensor(2.5),
        "v": torch.tensor([1, 2]),
        "n": np.float32(0.5),
        "a": np.arange(2),
        "e": Kind.A,
        "p": __import__("pathlib").Path("x/y"),
        "s": {3},
        "inf": float("inf"),
        1: (None, True),
    }
    assert jsonable(value) == {
        "t": 2.5,
        "v": [1, 2],
        "n": 0.5,
        "a": [0, 1],
        "e": "a",
        "p": os.path.join("x", "y"),
        "s": [3],
        "inf": "inf",
        "1": [None, True],
    }


def test_local_paths_and_public_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "teacher").mkdir(parents=True)
    assert is_local_path("/abs/x") and is_local_path("./x") and is_local_path("~/x") and is_local_path("runs/teacher")
    assert not is_local_path("user/model") and not is_local_path("resnet18")
    assert is_hub_id("user/model") and is_hub_id("resnet18") and not is_hub_id("runs/teacher")
    assert is_hub_id("user/model", namespaced=True) and not is_hub_id("resnet18", namespaced=True)
    assert public_name(str(tmp_path / "runs" / "teacher")) == "teacher"
    assert public_name("runs/teacher") == "teacher"
    assert public_name("../data/cifar10") == "cifar10"
    assert public_name("uoft-cs/cifar10") == "uoft-cs/cifar10" and public_name(None) is None


def test_atomic_writes_leave_no_partial_file(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic({"a": 1}, path)
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        with open(tmp, "w") as handle:
            handle.write("half")
        raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
