"""hf_tgprune.data: loading, column detection, splits, calibration samples and transforms, on tiny data."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_tgprune.data import (
    DataConfig,
    DataError,
    available_augmentations,
    build_transforms,
    collate_fn,
    detect_columns,
    label_mappings,
    label_names,
    limit_samples,
    load_image_dataset,
    native_image_size,
    resolve_data_config,
    resolve_splits,
    sample_calibration,
    set_transforms,
    split_train_validation,
)

CIFAR10 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10"


def _images(n, size=8, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    arrays = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    return [Image.fromarray(a.squeeze(-1) if channels == 1 else a, mode=mode) for a in arrays]


def _cifar100_like(n=40, seed=0):
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(names=[f"fine{i}" for i in range(4)]),
            "coarse_label": datasets.ClassLabel(names=["a", "b"]),
        }
    )
    labels = [i % 4 for i in range(n)]
    data = {"img": _images(n, seed=seed), "fine_label": labels, "coarse_label": [x % 2 for x in labels]}
    return datasets.Dataset.from_dict(data, features=features)


def _write_parquet_dataset(root: Path, splits: dict) -> Path:
    (root / "data").mkdir(parents=True)
    for split, dataset in splits.items():
        dataset.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def _write_imagefolder(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    for split, classes in layout.items():
        for class_name, count in classes.items():
            folder = root / split / class_name
            folder.mkdir(parents=True)
            for i, image in enumerate(_images(count, seed=hash((split, class_name)) % 1000)):
                image.save(folder / f"{i}.png")
    return root


# --- loading and columns ---------------------------------------------------------------------------------------
def test_detects_cifar100_fine_label():
    assert detect_columns(_cifar100_like().features) == ("img", "fine_label")
    assert detect_columns(_cifar100_like().features, label_column="coarse_label") == ("img", "coarse_label")


def test_detects_columns_by_type_then_name():
    features = datasets.Features({"photo_bytes": datasets.Image(), "y": datasets.ClassLabel(num_classes=3)})
    assert detect_columns(features) == ("photo_bytes", "y")
    untyped = datasets.Features({"image": datasets.Value("string"), "target": datasets.Value("int64")})
    assert detect_columns(untyped) == ("image", "target")


def test_unknown_and_undetectable_columns_name_the_available_ones():
    features = _cifar100_like().features
    with pytest.raises(
        DataError, match=r"--label_column 'label' is not a column.*\['img', 'fine_label', 'coarse_label'\]"
    ):
        detect_columns(features, label_column="label")
    with pytest.raises(DataError, match=r"--image_column 'image'.*available columns"):
        detect_columns(features, image_column="image")
    odd = datasets.Features({"pixels": datasets.Value("string"), "y": datasets.Value("int64")})
    with pytest.raises(DataError, match=r"Could not find the image column; available columns: \['pixels', 'y'\]"):
        detect_columns(odd)


def test_load_local_parquet_folder_renames_columns(tmp_path):
    root = _write_parquet_dataset(tmp_path / "c100", {"train": _cifar100_like(40), "test": _cifar100_like(12, 1)})
    loaded = load_image_dataset(str(root))
    assert set(loaded) == {"train", "test"}
    assert loaded["train"].column_names == ["image", "label"]
    assert len(loaded["train"]) == 40 and len(loaded["test"]) == 12
    assert label_names(loaded) == ["fine0", "fine1", "fine2", "fine3"]
    assert loaded["train"][5]["label"] == 1
    id2label, label2id = label_mappings(loaded["train"])
    assert id2label[2] == "fine2" and label2id["fine2"] == 2
    with pytest.raises(DataError, match="available columns"):
        load_image_dataset(str(root), label_column="nope")


def test_load_imagefolder(tmp_path):
    root = _write_imagefolder(tmp_path / "imgs", {"train": {"cat": 3, "dog": 4}, "test": {"cat": 1, "dog": 2}})
    loaded = load_image_dataset(str(root))
    assert len(loaded["train"]) == 7 and len(loaded["test"]) == 3
    assert label_names(loaded) == ["cat", "dog"]
    assert isinstance(loaded["train"][0]["image"], Image.Image)
    same = load_image_dataset("imagefolder", data_dir=str(root))
    assert len(same["train"]) == 7


def test_string_and_integer_labels_become_class_labels(tmp_path):
    strings = datasets.Dataset.from_dict({"image": _images(6), "class": ["b", "a", "c", "a", "b", "c"]})
    loaded = load_image_dataset(str(_write_parquet_dataset(tmp_path / "s", {"train": strings})))
    assert label_names(loaded) == ["a", "b", "c"]
    assert loaded["train"]["label"][:2] == [1, 0]
    ints = datasets.Dataset.from_dict({"img": _images(5), "target": [0, 4, 1, 2, 0]})
    loaded = load_image_dataset(str(_write_parquet_dataset(tmp_path / "i", {"train": ints})))
    assert label_names(loaded) == ["0", "1", "2", "3", "4"]


def test_missing_local_folder():
    with pytest.raises(DataError, match="no such file or folder"):
        load_image_dataset("./definitely/not/here")


def test_offline_hub_id_says_to_pass_a_local_folder(tmp_path):
    code = textwrap.dedent(
        """
        from hf_tgprune.data import DataError, load_image_dataset
        try:
            load_image_dataset("uoft-cs/cifar10")
        except DataError as error:
            print("ERROR:", error)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERROR:" in out.stdout, out.stderr
    assert "offline mode is on" in out.stdout and "Pass a local folder" in out.stdout


# --- splits and samples ----------------------------------------------------------------------------------------
def _toy(n=100, classes=5):
    features = datasets.Features({"image": datasets.Value("int64"), "label": datasets.ClassLabel(num_classes=classes)})
    return datasets.Dataset.from_dict({"image": list(range(n)), "label": [i % classes for i in range(n)]}, features)


def test_split_train_validation_is_deterministic_disjoint_and_stratified():
    train, validation = split_train_validation(_toy(), 20, seed=3)
    again_train, again_validation = split_train_validation(_toy(), 20, seed=3)
    assert len(train) == 80 and len(validation) == 20
    assert train["image"][:] == again_train["image"][:] and validation["image"][:] == again_validation["image"][:]
    assert not set(train["image"]) & set(validation["image"])
    assert np.bincount(validation["label"]).tolist() == [4, 4, 4, 4, 4]
    _, other = split_train_validation(_toy(), 20, seed=4)
    assert set(other["image"]) != set(validation["image"])
    assert split_train_validation(_toy(), 0)[1] is None
    for bad in (-1, 100, 150):
        with pytest.raises(DataError, match="validation_split_percentage"):
            split_train_validation(_toy(), bad)


def test_resolve_splits():
    dataset_dict = datasets.DatasetDict({"train": _toy(100), "test": _toy(10)})
    splits = resolve_splits(dataset_dict, validation_split_percentage=10, seed=0)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (90, 10, 10)
    only_train = resolve_splits(datasets.DatasetDict({"train": _toy(100)}), validation_split_percentage=10)
    assert (len(only_train.train), len(only_train.validation), len(only_train.test)) == (80, 10, 10)
    ids = [set(only_train.train["image"]), set(only_train.validation["image"]), set(only_train.test["image"])]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    with pytest.raises(DataError, match=r"available: \['train', 'test'\]"):
        resolve_splits(dataset_dict, test_split="holdout")
    with pytest.raises(DataError, match="No 'training' split"):
        resolve_splits(dataset_dict, train_split="training")


def test_sample_calibration_is_deterministic_and_from_train_only():
    splits = resolve_splits(datasets.DatasetDict({"train": _toy(200), "test": _toy(20)}), 10, seed=0)
    calibration = sample_calibration(splits.train, 32, seed=7)
    assert len(calibration) == 32
    assert calibration["image"][:] == sample_calibration(splits.train, 32, seed=7)["image"][:]
    assert calibration["image"][:] != sample_calibration(splits.train, 32, seed=8)["image"][:]
    assert set(calibration["image"]) <= set(splits.train["image"])
    assert not set(calibration["image"]) & set(splits.validation["image"])
    assert len(sample_calibration(splits.train, 10_000)) == len(splits.train)
    with pytest.raises(DataError, match="num_calibration_samples"):
        sample_calibration(splits.train, 0)


def test_recipe_and_trainer_draw_the_same_calibration_images(tmp_path):
    """The recipe samples calibration images with `sample_calibration`; a trainer given only the training part
    samples them itself: the same seed gives the same images in the same order."""
    from hf_tgprune import TeacherGuidedPruningTrainer
    from tests.utils import make_model, tiny_config

    def loader_images(trainer):
        return torch.cat([batch["pixel_values"] for batch in trainer.pruner.calibration_batches()])

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=4)})
    raw = datasets.Dataset.from_dict({"image": _images(200), "label": [i % 4 for i in range(200)]}, features)
    train = set_transforms(raw, build_transforms(DataConfig(image_size=8), "none")[1])
    settings = dict(pruning_method="snip", retrain_with_kd=False, num_calibration_samples=24, seed=3)
    recipe_way = TeacherGuidedPruningTrainer(
        model=make_model("timm_resnet"),
        args=tiny_config(tmp_path / "a", **settings),
        data_collator=collate_fn,
        train_dataset=train,
        calibration_dataset=sample_calibration(train, 24, seed=3),
    )
    api_way = TeacherGuidedPruningTrainer(
        model=make_model("timm_resnet"),
        args=tiny_config(tmp_path / "b", **settings),
        data_collator=collate_fn,
        train_dataset=train,
    )
    assert torch.equal(loader_images(recipe_way), loader_images(api_way))


def test_limit_samples():
    assert limit_samples(_toy(), None) is not None and len(limit_samples(_toy(), None)) == 100
    assert limit_samples(_toy(), 5)["image"][:] == [0, 1, 2, 3, 4]
    shuffled = limit_samples(_toy(), 5, seed=0)["image"][:]
    assert len(shuffled) == 5 and shuffled == limit_samples(_toy(), 5, seed=0)["image"][:]


# --- data config and transforms --------------------------------------------------------------------------------
def test_data_config_timm():
    import timm

    model = timm.create_model("resnet18", num_classes=10)
    config = resolve_data_config(model)
    assert config.image_size == 224 and config.interpolation == "bicubic"
    assert config.mean == pytest.approx((0.485, 0.456, 0.406))
    assert resolve_data_config(model, native_size=32).image_size == 32  # small images stay native
    assert resolve_data_config(model, native_size=500).image_size == 224  # large ones go to the model's size
    assert resolve_data_config(model, native_size=32, image_size=224).image_size == 224  # 224-px protocol
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=64, depth=1)
    assert resolve_data_config(vit).mean == pytest.approx((0.5, 0.5, 0.5))


def test_native_size_only_for_models_that_run_at_it():
    import timm
    from transformers import ViTConfig, ViTForImageClassification

    resnet = timm.create_model("test_resnet", num_classes=3)
    fixed_vit = timm.create_model("vit_tiny_patch16_224", num_classes=3, depth=1)
    assert resolve_data_config(resnet, native_size=32).image_size == 32
    assert resolve_data_config(fixed_vit, native_size=32).image_size == 224  # a fixed-size ViT keeps its size
    assert resolve_data_config(resnet, native_size=32, also_fit=[fixed_vit]).image_size == 224  # fits the teacher
    assert resolve_data_config(fixed_vit, native_size=32, image_size=64).image_size == 64  # explicit wins
    hf_vit = ViTForImageClassification(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=64,
                  patch_size=16, num_labels=3)
    )  # fmt: skip
    hf_vit.train()
    assert resolve_data_config(hf_vit, native_size=32).image_size == 64
    assert hf_vit.training  # probing leaves the mode as it was
    dynamic_vit = timm.create_model("test_vit", num_classes=3)  # dynamic image size
    assert resolve_data_config(dynamic_vit, native_size=32).image_size == 32


def test_data_config_transformers_with_and_without_processor():
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    model = ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    )
    assert resolve_data_config(model) == DataConfig(image_size=224)
    processor = ViTImageProcessor(size={"height": 96, "width": 96}, image_mean=[0.1, 0.2, 0.3], resample=3)
    config = resolve_data_config(model, image_processor=processor)
    assert config == DataConfig(image_size=96, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5), interpolation="bicubic")


def test_data_config_plain_torch_model():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    assert resolve_data_config(model, native_size=2) == DataConfig(image_size=2)


def test_transforms_shapes_augmentation_and_grayscale():
    config = DataConfig(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    train, evaluation = build_transforms(config)
    image = _images(1, size=16)[0]
    assert evaluation(image).shape == (3, 16, 16)
    assert torch.equal(evaluation(image), evaluation(image))
    torch.manual_seed(0)
    assert any(not torch.equal(train(image), evaluation(image)) for _ in range(10))
    expected = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert torch.allclose(evaluation(image), expected, atol=1e-5)
    assert evaluation(_images(1, size=40, mode="L")[0]).shape == (3, 16, 16)
    assert evaluation(_images(1, size=8, mode="RGBA")[0]).shape == (3, 16, 16)
    for name in available_augmentations():
        assert build_transforms(config, name)[0](image).shape == (3, 16, 16)
    with pytest.raises(DataError, match="Unknown augmentation"):
        build_transforms(config, "mixup")


def test_with_transform_and_collate_make_trainer_batches():
    from transformers import default_data_collator

    dataset = load_image_dataset_from(_cifar100_like(10))
    assert native_image_size(dataset) == 8
    _, evaluation = build_transforms(DataConfig(image_size=8))
    transformed = set_transforms(dataset, evaluation)
    example = transformed[3]
    assert set(example) == {"pixel_values", "labels"} and example["labels"] == 3
    loader = torch.utils.data.DataLoader(transformed, batch_size=4, collate_fn=collate_fn)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 8, 8) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].tolist() == [0, 1, 2, 3] and batch["labels"].dtype == torch.long
    default = default_data_collator([transformed[i] for i in range(4)])
    assert torch.equal(default["pixel_values"], batch["pixel_values"]) and torch.equal(
        default["labels"], batch["labels"]
    )


def load_image_dataset_from(dataset):
    """The renaming load_image_dataset does, on an in-memory dataset."""
    image, label = detect_columns(dataset.features)
    return dataset.select_columns([image, label]).rename_columns({image: "image", label: "label"})


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10.is_dir(), reason="../shared/data/cifar10 not present")
def test_local_cifar10_end_to_end():
    import timm

    loaded = load_image_dataset(str(CIFAR10))
    assert (len(loaded["train"]), len(loaded["test"])) == (25_000, 1_000)
    assert label_names(loaded)[:2] == ["airplane", "automobile"]
    splits = resolve_splits(loaded, validation_split_percentage=10, seed=42)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (22_500, 2_500, 1_000)
    assert np.bincount(splits.validation["label"]).min() >= 240  # stratified: ~250 per class
    calibration = sample_calibration(splits.train, 256, seed=42)
    config = resolve_data_config(
        timm.create_model("resnet18", num_classes=10), native_size=native_image_size(calibration)
    )
    assert config.image_size == 32
    train_transform, _ = build_transforms(config)
    batch = collate_fn([set_transforms(calibration, train_transform)[i] for i in range(8)])
    assert batch["pixel_values"].shape == (8, 3, 32, 32)


def test_augmentation_and_dataset_preset_registries_refuse_duplicate_names():
    from hf_tgprune.data import register_augmentation, register_dataset_preset

    with pytest.raises(ValueError, match="augmentation named 'cifar' is already registered"):
        register_augmentation("cifar")(lambda config: [])
    with pytest.raises(ValueError, match="dataset preset named 'uoft-cs/cifar10' is already registered"):
        register_dataset_preset("uoft-cs/cifar10", "img", "label")


# --- collation of other example layouts; partly labelled data; a single-image last batch --------------------------------
def test_collate_accepts_tuples_and_label_keys():
    pixels = [torch.zeros(3, 4, 4), torch.ones(3, 4, 4)]
    from_tuples = collate_fn([(pixels[0], 1), (pixels[1], torch.tensor(2))])
    from_dicts = collate_fn([{"pixel_values": pixels[0], "label": 1}, {"pixel_values": pixels[1], "labels": 2}])
    for batch in (from_tuples, from_dicts):
        assert batch["pixel_values"].shape == (2, 3, 4, 4) and batch["labels"].tolist() == [1, 2]
        assert batch["labels"].dtype == torch.long
    assert "labels" not in collate_fn([(pixels[0],), {"pixel_values": pixels[1], "labels": None}])


def test_collate_refuses_partly_labelled_batches_and_untransformed_images():
    pixels = torch.zeros(3, 4, 4)
    with pytest.raises(ValueError, match=r"Partly labelled data: examples \[1\]"):
        collate_fn([{"pixel_values": pixels, "labels": 0}, {"pixel_values": pixels}])
    with pytest.raises(TypeError, match="apply a transform"):
        collate_fn([(Image.new("RGB", (4, 4)), 0)])
    with pytest.raises(ValueError, match="labels are class indices"):
        collate_fn([(pixels, "cat")])


def test_check_labelled_sees_nulls_in_datasets_and_lists():
    from hf_tgprune.data.collate import check_labelled

    dataset = datasets.Dataset.from_dict({"pixel_values": [[0.0]] * 4, "label": [0, None, 1, None]})
    with pytest.raises(ValueError, match="`train_dataset` is partly labelled: 2 of its 4 examples"):
        check_labelled(dataset, "train_dataset")
    check_labelled(dataset.select([0, 2]))
    with pytest.raises(ValueError, match="1 of its 2 examples"):
        check_labelled(dataset.select([0, 1]))
    with pytest.raises(ValueError, match="partly labelled"):
        check_labelled([(torch.zeros(3), 0), (torch.zeros(3),)])


def test_single_example_last_batch():
    from hf_tgprune.data.collate import batchnorm_needs_drop_last, single_example_last_batch

    assert single_example_last_batch(33, 8) and not single_example_last_batch(32, 8)
    assert not single_example_last_batch(33, 8, num_processes=2)  # accelerate completes the last batches
    assert not single_example_last_batch(5, 1)
    with_bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    assert batchnorm_needs_drop_last(with_bn, list(range(33)), 8)
    assert not batchnorm_needs_drop_last(torch.nn.Conv2d(3, 4, 1), list(range(33)), 8)
