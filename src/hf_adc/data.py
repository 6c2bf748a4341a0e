"""Image classification data: from the Hub, a local folder or the embedded Fashion-MNIST, to `pixel_values`.

`load_image_dataset` returns a `DatasetDict` with `train` and `test` splits and exactly two columns,
`image` (an `Image` feature) and `label` (a `ClassLabel`), whatever the source called them.
`ImageTransform` turns a batch of those rows into `pixel_values` through the model's image processor, with
optional training augmentation (random resized crop, horizontal flip) in plain PIL.
"""

import gzip
import math
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset, load_from_disk
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from PIL import Image as PILImage
from transformers import BaseImageProcessor, ViTConfig, ViTImageProcessorPil

from .hub import HUB_PROBE_SECONDS, hub_reachable

DEFAULT_DATASET = "fashion_mnist"
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class", "target")


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as file:
        return np.frombuffer(file.read(), dtype=np.uint8, offset=offset)


def _fashion_mnist_from_debian() -> DatasetDict:
    features = Features({"image": Image(), "label": ClassLabel(names=FASHION_MNIST_CLASSES)})
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz", 8)
        splits[split] = Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)
    return DatasetDict(splits)


def _load_fashion_mnist() -> DatasetDict:
    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        return _fashion_mnist_from_debian()
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True", "YES", "yes"):
        try:
            return _load_hub_dataset(FASHION_MNIST_HUB_ID)
        except Exception as error:  # any failure to reach the Hub ends in the same advice
            raise FileNotFoundError(_FASHION_MNIST_ADVICE + f" (the Hub copy failed too: {error})") from error
    raise FileNotFoundError(_FASHION_MNIST_ADVICE)


_FASHION_MNIST_ADVICE = (
    f"The default dataset Fashion-MNIST was not found in {FASHION_MNIST_DIR}. Install it with "
    "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or go online to use the Hub copy "
    f"'{FASHION_MNIST_HUB_ID}', or pass --dataset_name with a Hub id or a local folder."
)


def _load_source(name_or_path: str) -> DatasetDict:
    if name_or_path in (DEFAULT_DATASET, FASHION_MNIST_HUB_ID):
        return _load_fashion_mnist()
    path = Path(name_or_path)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = load_from_disk(str(path))
        else:
            loaded = load_dataset(str(path))  # a parquet folder or an imagefolder, detected by datasets
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    if path.suffix or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"dataset path '{name_or_path}' does not exist.")
    return _load_hub_dataset(name_or_path)


def _load_hub_dataset(hub_id: str) -> DatasetDict:
    """A Hub dataset, with one clear error instead of long retries: as for models (`hub.load_pretrained`), the Hub
    is first probed for a few seconds, and when it does not answer the files come from the local Hub cache or the
    load fails at once saying so (datasets alone retries for half a minute)."""
    if not constants.HF_HUB_OFFLINE and not hub_reachable():
        try:
            snapshot = snapshot_download(hub_id, repo_type="dataset", local_files_only=True)
        except (LocalEntryNotFoundError, OSError, ValueError) as error:
            raise ValueError(
                f"Could not load dataset '{hub_id}': the Hub at {constants.ENDPOINT} did not answer within "
                f"{HUB_PROBE_SECONDS:.0f} s and the local cache does not hold it. Pass a local imagefolder / parquet "
                f"/ save_to_disk folder or '{DEFAULT_DATASET}', or load it once while online (HF_HUB_OFFLINE=1 then "
                "reads the cache)."
            ) from error
    else:
        snapshot = hub_id
    try:
        return load_dataset(snapshot)
    except Exception as error:  # offline, unknown id, gated: one clear message with the cause
        raise ValueError(
            f"Could not load dataset '{hub_id}' from the Hub ({type(error).__name__}: {error}). Pass a Hub id "
            f"reachable from here, a local imagefolder / parquet / save_to_disk folder, or '{DEFAULT_DATASET}'."
        ) from error


def _natural_key(value) -> tuple:
    """Sorts names with their numbers as numbers: 'class2' before 'class10', 2 before 10."""
    return tuple(int(part) if index % 2 else part for index, part in enumerate(re.split(r"(\d+)", str(value))))


def _standard_columns(split: Dataset, image_column: str | None, label_column: str | None) -> Dataset:
    """`split` with just its image and label columns, named `image` and `label` (the label not yet encoded)."""
    features = split.features
    if image_column is None:
        image_column = next((name for name, feature in features.items() if isinstance(feature, Image)), None)
    if label_column is None:
        label_column = next((name for name, feature in features.items() if isinstance(feature, ClassLabel)), None)
        label_column = label_column or next((name for name in LABEL_COLUMN_NAMES if name in features), None)
    for role, column in (("image", image_column), ("label", label_column)):
        if column is None or column not in features:
            raise ValueError(
                f"No {role} column found (asked for {column!r}); the dataset has columns {list(features)}. "
                f"Name it with --{role}_column."
            )
    split = split.select_columns([image_column, label_column])
    renames = {image_column: "image", label_column: "label"}
    return split.rename_columns({old: new for old, new in renames.items() if old != new})


def _encode_labels(dataset: DatasetDict) -> DatasetDict:
    """Labels that are not a `ClassLabel` become one, encoded once over the union of all splits in natural order
    (numbers as numbers), so that a class missing from one split shifts no label in another."""
    if all(isinstance(split.features["label"], ClassLabel) for split in dataset.values()):
        return dataset
    namers = {
        name: split.features["label"].int2str if isinstance(split.features["label"], ClassLabel) else str
        for name, split in dataset.items()
    }
    values = {namers[name](value) for name, split in dataset.items() for value in split.unique("label")}
    names = sorted(values, key=_natural_key)
    ids = {name: index for index, name in enumerate(names)}
    encoded = {}
    for name, split in dataset.items():
        features = split.features.copy()
        features["label"] = ClassLabel(names=names)
        to_name = namers[name]
        encoded[name] = split.map(
            lambda labels, to_name=to_name: {"label": [ids[to_name(label)] for label in labels]},
            input_columns="label",
            batched=True,
            features=features,
        )
    return DatasetDict(encoded)


def _narrow_classes(split: Dataset, classes: Sequence[int | str]) -> Dataset:
    names = split.features["label"].names
    ids = []
    for entry in classes:
        class_id = names.index(entry) if isinstance(entry, str) and entry in names else entry
        if isinstance(class_id, str) and class_id.isdigit():
            class_id = int(class_id)
        if not isinstance(class_id, int) or not 0 <= class_id < len(names):
            raise ValueError(
                f"class {entry!r} is not in the dataset: use a name of {names} or an id in [0, {len(names)})."
            )
        ids.append(class_id)
    if len(set(ids)) != len(ids):
        raise ValueError(f"classes {list(classes)} repeat a class.")
    relabel = {old: new for new, old in enumerate(ids)}
    kept = split.filter(lambda labels: [label in relabel for label in labels], input_columns="label", batched=True)
    features = kept.features.copy()
    features["label"] = ClassLabel(names=[names[i] for i in ids])
    return kept.map(
        lambda labels: {"label": [relabel[label] for label in labels]},
        input_columns="label",
        batched=True,
        features=features,
    )


def load_image_dataset(
    name_or_path: str = DEFAULT_DATASET,
    *,
    classes: Sequence[int | str] | None = None,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    test_size: float = 0.1,
    seed: int = 0,
) -> DatasetDict:
    """Loads an image classification dataset as `DatasetDict(train, test)` with columns `image` and `label`.

    `name_or_path` is a Hub id, a local imagefolder, parquet or `save_to_disk` folder, or `"fashion_mnist"`
    (the embedded default: the Debian `dataset-fashion-mnist` files when present, else the Hub copy when
    online). Columns are found by type (`Image`, `ClassLabel`) unless named. `classes` keeps those classes
    (ids or names), relabelled 0..k-1 in the order given with their names kept; `max_*_samples` keep that
    many rows after a seeded shuffle. A source without a test split gets one of `test_size` (seeded).
    """
    for name, value in (("max_train_samples", max_train_samples), ("max_test_samples", max_test_samples)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} is out of range: it must be >= 1 (or None for all rows).")
    dataset = _load_source(name_or_path)
    if "test" not in dataset:
        held_out = "validation" if "validation" in dataset else None
        if held_out is None:
            dataset = dataset["train"].train_test_split(test_size=test_size, seed=seed)
        else:
            dataset = DatasetDict({"train": dataset["train"], "test": dataset[held_out]})
    columns = {split: _standard_columns(dataset[split], image_column, label_column) for split in ("train", "test")}
    dataset = _encode_labels(DatasetDict(columns))
    if classes is not None:
        dataset = DatasetDict({split: _narrow_classes(rows, classes) for split, rows in dataset.items()})
    for split, limit in (("train", max_train_samples), ("test", max_test_samples)):
        rows = dataset[split].shuffle(seed=seed)
        dataset[split] = rows.select(range(min(limit, len(rows)))) if limit is not None else rows
    return dataset


PARTITIONS = ("iid", "dirichlet")


def partition_indices(
    labels: Sequence[int], num_clients: int, partition: str = "iid", alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """Disjoint shards of row indices covering all rows, one per client, determined by the labels, the number of
    clients, the partition and the seed alone (so each client computes its own shard without seeing another's
    rows).

    `iid`: a seeded permutation cut into near-equal parts. `dirichlet`: each class's rows are dealt to the clients
    in proportions drawn from Dirichlet(alpha) (smaller alpha, more skew), redrawn until every client has a row.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients} is out of range: it must be >= 1.")
    if partition not in PARTITIONS:
        raise ValueError(f"partition={partition!r} is unknown: choose one of {', '.join(PARTITIONS)}.")
    if partition == "dirichlet" and not alpha > 0:
        raise ValueError(f"alpha={alpha} is out of range: the Dirichlet concentration must be > 0.")
    labels = np.asarray(labels)
    if len(labels) < num_clients:
        raise ValueError(f"{len(labels)} rows cannot give each of num_clients={num_clients} clients a row.")
    generator = np.random.default_rng(seed)
    if partition == "iid":
        return [np.sort(part) for part in np.array_split(generator.permutation(len(labels)), num_clients)]
    for _ in range(1000):
        shards = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            rows = generator.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(generator.dirichlet(np.full(num_clients, alpha)))[:-1] * len(rows)).astype(int)
            for shard, part in zip(shards, np.split(rows, cuts), strict=True):
                shard.extend(part.tolist())
        if all(shards):
            return [np.sort(np.asarray(shard, dtype=np.int64)) for shard in shards]
    raise ValueError(
        f"Dirichlet(alpha={alpha}) left a client without rows in 1000 draws of {len(labels)} rows over "
        f"{num_clients} clients: raise alpha or use fewer clients."
    )


def image_processor_for(config: ViTConfig) -> BaseImageProcessor:
    """An image processor matching a ViT built from a config: RGB, resized to its image size, scaled to [-1, 1]."""
    size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
    return ViTImageProcessorPil(
        size={"height": size[0], "width": size[1]},
        do_convert_rgb=True,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )


class ImageTransform:
    """For `Dataset.set_transform`: a batch of rows (`image`, `label`) to `pixel_values` and `labels`.

    With `train=True` each image first gets a random resized crop (area `crop_scale`, aspect ratio 3/4..4/3)
    and a horizontal flip with probability 1/2, drawn from Python's `random` (seeded by the Trainer).
    """

    def __init__(self, image_processor: BaseImageProcessor, train: bool = False, crop_scale=(0.6, 1.0)):
        self.image_processor = image_processor
        self.train = train
        self.crop_scale = crop_scale

    def _augment(self, image: PILImage.Image) -> PILImage.Image:
        width, height = image.size
        for _ in range(10):
            area = width * height * random.uniform(*self.crop_scale)
            aspect = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
            crop_width, crop_height = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                left, top = random.randint(0, width - crop_width), random.randint(0, height - crop_height)
                image = image.crop((left, top, left + crop_width, top + crop_height))
                break
        return image.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT) if random.random() < 0.5 else image

    def __call__(self, batch: dict) -> dict:
        images = [image.convert("RGB") for image in batch["image"]]
        if self.train:
            images = [self._augment(image) for image in images]
        pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": batch["label"]}
