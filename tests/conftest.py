"""Shared fixtures: offline Hub, and tiny randomly initialised ViTs saved and reloaded like a Hub checkpoint."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_home_"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import kill_spawned  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402

NUM_LABELS = 5
# Tests taking the `device` fixture run on every device this machine has: the CPU, and a GPU where present.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(autouse=True)
def _no_spawned_process_survives_a_test():
    """Kills every process group a test (or a fixture it used) spawned through `helpers.spawn`, pass or fail."""
    yield
    kill_spawned()


def tiny_vit_config(**overrides) -> ViTConfig:
    """A 4-layer ViT on 16x16 images: 17 tokens of width 32."""
    fields = dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_labels=NUM_LABELS,
    )
    fields.update(overrides)
    return ViTConfig(**fields)


@pytest.fixture(scope="session")
def tiny_vit_path(tmp_path_factory) -> str:
    """A tiny ViT saved with `save_pretrained`: loading it takes the same path as a Hub id."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_vit")
    ViTForImageClassification(tiny_vit_config()).save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_vit(tiny_vit_path) -> ViTForImageClassification:
    return ViTForImageClassification.from_pretrained(tiny_vit_path)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(12, 3, 16, 16, generator=generator)
    labels = torch.randint(0, NUM_LABELS, (12,), generator=generator)
    return pixel_values, labels


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> str:
    """scikit-learn's 8x8 digits as a `save_to_disk` DatasetDict (train 1500, test 297), 10 classes."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * 255 / 16).astype(np.uint8)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    rows = {"image": list(images), "label": digits.target.tolist()}
    dataset = Dataset.from_dict(rows, features=features)
    splits = DatasetDict({"train": dataset.select(range(1500)), "test": dataset.select(range(1500, len(dataset)))})
    path = tmp_path_factory.mktemp("digits")
    splits.save_to_disk(str(path))
    return str(path)
