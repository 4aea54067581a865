"""Architecture matrix: common timm, transformers, torchvision and plain PyTorch image classifiers go through the
whole life cycle.

For each tiny model (built from a config, nothing downloaded): prune (magnitude, exact count) -> train 2 steps ->
checkpoint -> resume in a fresh trainer (weights and masks restored, one more step) -> ``save_model`` (dense and
bitmask) -> reload with plain timm / transformers / torch (dense) and ``load_sparse`` (bitmask) with identical logits,
every classifier head unpruned and the exact number of pruned weights -> ``export_sparse_inference`` forced on every
replaceable layer, with the exported model's logits equal to the pruned model's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from hf_tgprune import TeacherGuidedPruningTrainer, export_sparse_inference, load_sparse, mask_hash
from hf_tgprune.core.adapters import classifier_parameter_names, get_adapter
from hf_tgprune.io.export import output_tolerance
from hf_tgprune.io.serialization import SPARSITY_FILE_NAME, load_sparse_masks, read_sparsity_record
from tests.utils import IMAGE_SIZE, NUM_LABELS, TINY_HF_VIT, RandomImages, tiny_config

SPARSITY = 0.8
TINY_VIT = dict(img_size=IMAGE_SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2)
HF_VIT = TINY_HF_VIT
HF_LEVIT = dict(
    image_size=IMAGE_SIZE,
    hidden_sizes=[16, 24, 32],
    num_attention_heads=[1, 2, 2],
    depths=[1, 1, 1],
    key_dim=[8, 8, 8],
)

HF_PVT = dict(
    num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3], strides=[4, 2],
    num_attention_heads=[1, 2], mlp_ratios=[2, 2],
)  # fmt: skip
_TOWER = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
HF_TWO_TOWERS = dict(
    vision_config=dict(_TOWER, image_size=IMAGE_SIZE, patch_size=8), text_config=dict(_TOWER, vocab_size=64)
)

# name -> (library, architecture or transformers (config class, model class), constructor arguments)
TIMM_MODELS = {
    "timm/resnet": ("test_resnet", {}),
    "timm/convnext": ("test_convnext", {}),
    "timm/efficientnet": ("test_efficientnet", {}),
    "timm/mobilenetv3": ("mobilenetv3_small_050", {}),
    "timm/regnet": ("regnetx_002", dict(depth=4, w0=8, wa=12.0, wm=1.5, group_size=8, stem_width=8)),
    "timm/vit": ("test_vit", dict(img_size=IMAGE_SIZE)),
    "timm/deit": ("deit_tiny_patch16_224", TINY_VIT),
    "timm/deit_distilled": ("deit_tiny_distilled_patch16_224", TINY_VIT),
    "timm/swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=IMAGE_SIZE, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)),
    ),
    "timm/levit_distilled": (
        "levit_128s",
        dict(img_size=IMAGE_SIZE, embed_dim=(16, 24, 32), key_dim=8, num_heads=(1, 2, 2), depth=(1, 1, 1)),
    ),
    "timm/dinov2_registers": ("vit_small_patch14_reg4_dinov2", TINY_VIT),
    "timm/eva02": ("eva02_tiny_patch14_224", TINY_VIT),
    "timm/maxvit": ("test_maxvit", dict(img_size=IMAGE_SIZE)),
    "timm/pit_distilled": (
        "pit_ti_distilled_224",
        dict(img_size=IMAGE_SIZE, patch_size=4, stride=2, base_dims=[8, 8, 8], heads=[1, 2, 4], depth=[1, 1, 1]),
    ),
    "timm/crossvit": (
        "crossvit_tiny_240",
        dict(
            img_size=IMAGE_SIZE,
            patch_size=[8, 16],
            embed_dim=[16, 32],
            depth=[[1, 1, 0]],
            num_heads=[2, 2],
            mlp_ratio=[2, 2, 1],
        ),
    ),  # fmt: skip
    "timm/xcit": ("xcit_nano_12_p16_224", dict(img_size=IMAGE_SIZE, depth=1, embed_dim=32, num_heads=2)),
    "timm/sequencer_lstm": (
        "sequencer2d_s",
        dict(layers=(1, 1, 1, 1), patch_sizes=(4, 2, 1, 1), embed_dims=(16,) * 4, hidden_sizes=(8,) * 4),
    ),
    "timm/repvgg": ("repvgg_a0", {}),
    "timm/resnetv2_stdconv": ("resnetv2_50x1_bit", {}),
}
HF_MODELS = {
    "hf/resnet": (
        ("ResNetConfig", "ResNetForImageClassification"),
        dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
    ),
    "hf/convnext": (
        ("ConvNextConfig", "ConvNextForImageClassification"),
        dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2),
    ),
    "hf/convnextv2": (
        ("ConvNextV2Config", "ConvNextV2ForImageClassification"),
        dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2),
    ),
    "hf/vit": (("ViTConfig", "ViTForImageClassification"), HF_VIT),
    "hf/deit": (("DeiTConfig", "DeiTForImageClassification"), HF_VIT),
    "hf/deit_with_teacher": (("DeiTConfig", "DeiTForImageClassificationWithTeacher"), HF_VIT),
    "hf/beit": (("BeitConfig", "BeitForImageClassification"), dict(HF_VIT, use_relative_position_bias=True)),
    "hf/dinov2": (("Dinov2Config", "Dinov2ForImageClassification"), dict(HF_VIT, mlp_ratio=2)),
    "hf/dinov2_swiglu": (("Dinov2Config", "Dinov2ForImageClassification"), dict(HF_VIT, use_swiglu_ffn=True)),
    "hf/swin": (
        ("SwinConfig", "SwinForImageClassification"),
        dict(embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, image_size=IMAGE_SIZE, patch_size=4),
    ),
    "hf/mobilevit": (
        ("MobileViTConfig", "MobileViTForImageClassification"),
        dict(
            image_size=IMAGE_SIZE,
            patch_size=2,
            hidden_sizes=[16, 16, 16],
            neck_hidden_sizes=[8, 8, 16, 16, 16, 16, 32],
            num_attention_heads=1,
        ),
    ),
    "hf/efficientnet": (
        ("EfficientNetConfig", "EfficientNetForImageClassification"),
        dict(image_size=IMAGE_SIZE, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128),
    ),
    "hf/regnet": (
        ("RegNetConfig", "RegNetForImageClassification"),
        dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8),
    ),
    "hf/levit": (("LevitConfig", "LevitForImageClassification"), HF_LEVIT),
    "hf/levit_with_teacher": (("LevitConfig", "LevitForImageClassificationWithTeacher"), HF_LEVIT),
    "hf/swiftformer": (
        ("SwiftFormerConfig", "SwiftFormerForImageClassification"),
        dict(depths=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32]),
    ),
    "hf/mobilenet_v1": (
        ("MobileNetV1Config", "MobileNetV1ForImageClassification"),
        dict(depth_multiplier=0.25, image_size=IMAGE_SIZE),
    ),
    "hf/mobilenet_v2": (
        ("MobileNetV2Config", "MobileNetV2ForImageClassification"),
        dict(depth_multiplier=0.25, image_size=IMAGE_SIZE),
    ),
    "hf/swinv2": (
        ("Swinv2Config", "Swinv2ForImageClassification"),
        dict(embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, image_size=IMAGE_SIZE, patch_size=4),
    ),
    "hf/pvt_v2": (("PvtV2Config", "PvtV2ForImageClassification"), dict(HF_PVT, image_size=IMAGE_SIZE)),
    "hf/segformer": (("SegformerConfig", "SegformerForImageClassification"), dict(HF_PVT, decoder_hidden_size=16)),
    "hf/hiera": (
        ("HieraConfig", "HieraForImageClassification"),
        dict(
            image_size=[IMAGE_SIZE, IMAGE_SIZE],
            patch_size=[3, 3],
            patch_stride=[2, 2],
            patch_padding=[1, 1],
            embed_dim=8,
            num_heads=[1, 1],
            depths=[1, 1],
            num_query_pool=1,
            query_stride=[2, 2],
            masked_unit_size=[4, 4],
            masked_unit_attention=[True, False],
        ),
    ),  # fmt: skip
    "hf/clip": (("CLIPConfig", "CLIPForImageClassification"), HF_TWO_TOWERS),
    "hf/siglip": (("SiglipConfig", "SiglipForImageClassification"), HF_TWO_TOWERS),
    "hf/timm_wrapper": (("TimmWrapperConfig", "TimmWrapperForImageClassification"), dict(architecture="test_resnet")),
}
# plain PyTorch classifiers (torchvision's, and torch.nn modules): saved as model.safetensors, rebuilt by their code
TORCH_MODELS = {
    "torch/torchvision_resnet18": lambda: torchvision.models.resnet18(num_classes=NUM_LABELS),
    "torch/torchvision_mobilenet_v3": lambda: torchvision.models.mobilenet_v3_small(num_classes=NUM_LABELS),
    "torch/torchvision_squeezenet": lambda: torchvision.models.squeezenet1_1(num_classes=NUM_LABELS),
    "torch/torchvision_googlenet": lambda: torchvision.models.googlenet(
        num_classes=NUM_LABELS, aux_logits=True, init_weights=False
    ),
    "torch/torchvision_vit": lambda: torchvision.models.VisionTransformer(
        image_size=IMAGE_SIZE,
        patch_size=8,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        num_classes=NUM_LABELS,
    ),  # fmt: skip
    "torch/torchvision_swin": lambda: torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4], num_classes=NUM_LABELS
    ),
}
MODELS = sorted([*TIMM_MODELS, *HF_MODELS, *TORCH_MODELS])


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    if name in TORCH_MODELS:
        return TORCH_MODELS[name]()
    if name in TIMM_MODELS:
        import timm

        architecture, kwargs = TIMM_MODELS[name]
        return timm.create_model(architecture, num_classes=NUM_LABELS, **kwargs)
    import transformers

    (config_class, model_class), kwargs = HF_MODELS[name]
    config = getattr(transformers, config_class)(num_labels=NUM_LABELS, **kwargs)
    return getattr(transformers, model_class)(config)


def load_plain(name: str, folder: Path, weights: bool):
    """The folder loaded the standard way of the model's library (no hf_tgprune); architecture only without
    weights."""
    if name in TORCH_MODELS:  # plain PyTorch: the model's own code, then its state dict
        from safetensors.torch import load_file

        model = TORCH_MODELS[name]()
        if weights:
            model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model
    if name in TIMM_MODELS:
        import timm

        return timm.create_model(f"local-dir:{folder}", pretrained=weights)
    from transformers import AutoConfig, AutoModelForImageClassification

    if weights:
        return AutoModelForImageClassification.from_pretrained(folder)
    return AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(folder))


@torch.no_grad()
def logits(model, x):
    return get_adapter(model).logits(model.eval(), x)


def own_storage(model):
    """Every tensor of `model` in its own allocation. transformers' ``from_pretrained`` keeps the tensors in the
    memory-mapped file, at offsets that are not 64-byte aligned, and some CPU convolution kernels then sum in another
    order (MobileViT differs by ~1e-10): the bytes are the same, the alignment is not a property of the file."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    return model


def make_trainer(name, tmp_path, seed, max_steps):
    args = tiny_config(
        tmp_path,
        pruning_method="magnitude",
        retrain_with_kd=False,
        sparsity=SPARSITY,
        max_steps=max_steps,
        learning_rate=0.01,
        per_device_train_batch_size=4,
        num_calibration_samples=8,
        recalibration_samples=8,
        save_strategy="steps",
        save_steps=2,
    )
    return TeacherGuidedPruningTrainer(model=build(name, seed), args=args, train_dataset=RandomImages(8))


@pytest.mark.parametrize("name", MODELS)
def test_architecture_life_cycle(name, tmp_path):
    # prune -> 2 steps -> checkpoint-2
    first = make_trainer(name, tmp_path, seed=0, max_steps=2)
    first.train()
    masks = first.masks
    heads = classifier_parameter_names(first.model)
    assert heads and not heads & masks.keys(), "a classifier head is pruned"
    prunable = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(SPARSITY * prunable)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / SPARSITY_FILE_NAME).is_file() and (checkpoint / "pruning_state.safetensors").is_file()
    trained = {k: v.detach().clone() for k, v in first.model.state_dict().items()}

    # resume in a fresh trainer with another initialisation: weights and masks come from the checkpoint
    resumed = make_trainer(name, tmp_path, seed=1, max_steps=3)
    seen = {}

    class Snapshot(__import__("transformers").TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    resumed.add_callback(Snapshot())
    resumed.train(resume_from_checkpoint=True)
    assert seen.keys() == trained.keys() and all(torch.equal(seen[k], trained[k]) for k in trained)
    assert resumed.state.global_step == 3 and mask_hash(resumed.masks) == mask_hash(masks)
    params = dict(resumed.model.named_parameters())
    assert all(not params[n].detach()[~m].any() for n, m in masks.items())

    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    expected = logits(resumed.model, x)
    head_weights = {n: params[n].detach().clone() for n in heads}
    saved_state = {k: v.detach().clone() for k, v in resumed.model.state_dict().items()}
    for save_format in ("dense", "bitmask"):
        folder = tmp_path / save_format
        resumed.args.save_format = save_format
        resumed.save_model(str(folder))
        record = read_sparsity_record(folder)
        assert record["sparsity"]["pruned_by_mask"] == round(SPARSITY * prunable)
        assert record["mask"]["sha256"] == mask_hash(masks)
        if save_format == "dense":
            reloaded = load_plain(name, folder, weights=True)
        else:
            reloaded = load_sparse(folder, load_plain(name, folder, weights=False))
        state = reloaded.state_dict()
        assert state.keys() == saved_state.keys() and all(torch.equal(state[k], saved_state[k]) for k in state)
        assert torch.equal(logits(own_storage(reloaded), x), expected), f"{save_format}: logits differ"
        assert all(torch.equal(state[n].detach(), w) and bool(w.all()) for n, w in head_weights.items())
        restored = load_sparse_masks(folder, model=reloaded)
        assert restored.keys() == masks.keys()
        assert sum(int((~m).sum()) for m in restored.values()) >= round(SPARSITY * prunable)
        if save_format == "bitmask":  # the exact masks
            assert mask_hash(restored) == mask_hash(masks)

    # every layer the export can replace is replaced (min_speedup ~ 0): a parent reading its attributes still works
    model = resumed.model.eval()
    exported, report = export_sparse_inference(model, x, min_speedup=1e-9, max_density=1.0, repeats=1)
    assert [layer.name for layer in report.layers if layer.reason.startswith("sparse not")] == []
    torch.testing.assert_close(logits(exported, x), expected, rtol=1e-4, atol=output_tolerance(expected))
