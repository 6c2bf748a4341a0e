"""load_image_dataset: every source, column detection, class and row narrowing, and the image transform."""

import random

import numpy as np
import pytest
from conftest import tiny_vit_config
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_from_disk
from PIL import Image as PILImage

import hf_adc
from hf_adc.data import FASHION_MNIST_CLASSES, ImageTransform, image_processor_for


def _write_imagefolder(root, classes=("cat", "dog"), per_class=4):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                array = rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)
                PILImage.fromarray(array).save(folder / f"{i}.png")


def test_imagefolder_is_read_with_its_classes(tmp_path):
    _write_imagefolder(tmp_path)
    dataset = hf_adc.load_image_dataset(str(tmp_path))
    assert set(dataset) == {"train", "test"}
    assert dataset["train"].column_names == ["image", "label"]
    assert dataset["train"].features["label"].names == ["cat", "dog"]
    assert len(dataset["train"]) == 8


def test_parquet_folder_with_other_column_names_is_standardised(digits_dir, tmp_path):
    source = load_from_disk(digits_dir)
    for split in ("train", "test"):
        renamed = source[split].rename_columns({"image": "img", "label": "fine_label"})
        (tmp_path / "data").mkdir(exist_ok=True)
        renamed.to_parquet(str(tmp_path / "data" / f"{split}-00000.parquet"))
    dataset = hf_adc.load_image_dataset(str(tmp_path))
    assert dataset["train"].column_names == ["image", "label"]
    assert len(dataset["train"]) == 1500 and len(dataset["test"]) == 297


def test_classes_are_narrowed_and_relabelled_with_names_kept(digits_dir):
    dataset = hf_adc.load_image_dataset(digits_dir, classes=[7, "3"], max_train_samples=50, seed=1)
    assert dataset["train"].features["label"].names == ["7", "3"]
    assert set(dataset["train"]["label"]) == {0, 1}
    assert len(dataset["train"]) == 50
    full = load_from_disk(digits_dir)["test"]
    assert len(dataset["test"]) == sum(label in (3, 7) for label in full["label"])


def test_a_single_split_gets_a_seeded_test_split(tmp_path):
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    rows = {"image": [np.zeros((4, 4), dtype=np.uint8)] * 20, "label": [0, 1] * 10}
    DatasetDict({"train": Dataset.from_dict(rows, features=features)}).save_to_disk(str(tmp_path))
    first = hf_adc.load_image_dataset(str(tmp_path), test_size=0.25, seed=3)
    second = hf_adc.load_image_dataset(str(tmp_path), test_size=0.25, seed=3)
    assert len(first["test"]) == 5 and first["test"]["label"] == second["test"]["label"]


def test_embedded_fashion_mnist_is_read_from_the_debian_files():
    dataset = hf_adc.load_image_dataset("fashion_mnist", classes=["Sandal", "Bag"], max_test_samples=10)
    assert dataset["train"].features["label"].names == ["Sandal", "Bag"]
    assert len(dataset["train"]) == 12000 and len(dataset["test"]) == 10
    assert FASHION_MNIST_CLASSES[5] == "Sandal"


def test_dataset_without_a_label_column_raises(tmp_path):
    features = Features({"image": Image()})
    Dataset.from_dict({"image": [np.zeros((4, 4), dtype=np.uint8)] * 4}, features=features).save_to_disk(str(tmp_path))
    with pytest.raises(ValueError, match=r"No label column found .*columns \['image'\]"):
        hf_adc.load_image_dataset(str(tmp_path))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": [42]}, r"class 42 is not in the dataset"),
        ({"classes": ["zebra"]}, r"class 'zebra' is not in the dataset"),
        ({"max_train_samples": 0}, r"max_train_samples=0 is out of range"),
    ],
)
def test_bad_narrowing_raises(digits_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        hf_adc.load_image_dataset(digits_dir, **kwargs)


def test_missing_local_path_raises():
    with pytest.raises(FileNotFoundError, match="dataset path './no/such/folder' does not exist"):
        hf_adc.load_image_dataset("./no/such/folder")


def test_transform_makes_rgb_pixel_values_at_the_model_size_and_augments_when_asked(digits_dir):
    rows = load_from_disk(digits_dir)["train"][:6]
    processor = image_processor_for(tiny_vit_config())
    plain = ImageTransform(processor)(rows)
    assert plain["pixel_values"].shape == (6, 3, 16, 16)
    assert plain["labels"] == rows["label"]
    assert -1.0 <= plain["pixel_values"].min() and plain["pixel_values"].max() <= 1.0
    random.seed(0)
    augmented = ImageTransform(processor, train=True)(rows)
    assert augmented["pixel_values"].shape == (6, 3, 16, 16)
    assert not np.allclose(augmented["pixel_values"].numpy(), plain["pixel_values"].numpy())
