"""Loading what a run trains: the data with its transforms, the ViT (a checkpoint or one from a config) and the split.

Nothing here knows of processes or the wire: a server builds its half with the same `build_split` as a client.
"""

import logging

import torch
from transformers import AutoImageProcessor, BaseImageProcessor, ViTConfig, ViTForImageClassification, set_seed

from ..data import ImageTransform, image_processor_for, load_image_dataset
from ..hub import load_pretrained
from ..split import SplitViTForImageClassification, split_vit
from .arguments import DataArguments, ModelArguments, SplitArguments

logger = logging.getLogger(__name__)


def load_data(data_args: DataArguments, seed: int, label_dp_seed: int | None = None):
    """The `DatasetDict(train, test)` the data arguments describe (see `load_image_dataset`); with
    `label_dp_epsilon`, the training labels randomized once from `label_dp_seed` (the test labels as they are), a
    secret the server must not know (`hf_adc.privacy.label_dp.secret_seed`), never the run's `seed`."""
    dataset = load_image_dataset(
        data_args.dataset_name,
        classes=data_args.class_list(),
        max_train_samples=data_args.max_train_samples,
        max_test_samples=data_args.max_eval_samples,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        seed=seed,
    )
    if data_args.label_dp_epsilon is not None:
        from ..privacy.label_dp import with_randomized_labels

        if label_dp_seed is None:
            raise ValueError("label_dp_epsilon needs a secret label_dp_seed (hf_adc.privacy.label_dp.secret_seed): the "
                             "run's seed is shared with the server, which could redraw every flip.")  # fmt: skip
        num_classes = dataset["train"].features["label"].num_classes
        dataset["train"] = with_randomized_labels(
            dataset["train"], num_classes, data_args.label_dp_epsilon, label_dp_seed
        )
    return dataset


def with_transforms(dataset, image_processor: BaseImageProcessor, augment: bool):
    """`dataset` with its rows turned into `pixel_values` on access (augmented in training with `augment`)."""
    dataset["train"].set_transform(ImageTransform(image_processor, train=augment))
    dataset["test"].set_transform(ImageTransform(image_processor, train=False))
    return dataset


def load_vit(model_args: ModelArguments, dataset) -> tuple[ViTForImageClassification, BaseImageProcessor]:
    """The checkpoint (its head re-initialised when its classes differ from the dataset's) or a ViT from a config,
    and its image processor (the checkpoint's own, or one built to match)."""
    return load_vit_for_labels(model_args, dataset["train"].features["label"].names)


def model_config(model_args: ModelArguments) -> ViTConfig:
    """The config of the ViT the arguments name (its own classes), without loading any weight."""
    if model_args.model_name_or_path is None:
        return model_args.vit_config(1)
    return load_pretrained(ViTConfig, model_args.model_name_or_path)


def load_vit_for_labels(
    model_args: ModelArguments, label_names: list[str]
) -> tuple[ViTForImageClassification, BaseImageProcessor]:
    """`load_vit` for a list of class names (what a server learns from its client, without the data)."""
    labels = {"id2label": dict(enumerate(label_names)), "label2id": {name: i for i, name in enumerate(label_names)}}
    if model_args.model_name_or_path is None:
        config = model_args.vit_config(len(labels["id2label"]))
        config.id2label, config.label2id = labels["id2label"], labels["label2id"]
        model = ViTForImageClassification(config)
        return model, image_processor_for(config)
    path = model_args.model_name_or_path
    old_labels = load_pretrained(ViTConfig, path).id2label
    model = load_pretrained(ViTForImageClassification, path, ignore_mismatched_sizes=True, **labels)
    if {int(k): v for k, v in old_labels.items()} != labels["id2label"]:
        fresh_classifier(model)
        logger.info("The checkpoint's classes differ from the dataset's: the classifier starts afresh.")
    try:
        image_processor = AutoImageProcessor.from_pretrained(path)
    except OSError:
        logger.warning("No image processor next to '%s': building one that matches its config.", path)
        image_processor = image_processor_for(model.config)
    return model, image_processor


def fresh_classifier(model: ViTForImageClassification) -> None:
    """Draws the classifier head anew, as ViT initialises it (truncated normal weights, zero bias).

    `model._init_weights` cannot do it on transformers 5: it skips weights flagged as loaded from a checkpoint.
    """
    weight = model.classifier.weight
    drawn = torch.empty_like(weight, dtype=torch.float32)
    torch.nn.init.trunc_normal_(drawn, std=model.config.initializer_range)
    with torch.no_grad():
        weight.copy_(drawn)
        model.classifier.bias.zero_()


def build_split(
    model_args: ModelArguments, split_args: SplitArguments, label_names: list[str], seed: int
) -> tuple[SplitViTForImageClassification, BaseImageProcessor]:
    """The split ViT the arguments describe, for these classes; seeded, so that a client and a server building it
    apart get the same weights (a fresh head, a bridge's initial weights)."""
    compression = split_args.compression_config(seed=seed)
    channel = split_args.channel_config()
    set_seed(seed)
    model, image_processor = load_vit_for_labels(model_args, label_names)
    split = split_vit(
        model,
        split_args.split_layer,
        compression=compression,
        channel=channel,
        wire_dtype=split_args.wire_dtype,
        label_privacy=split_args.label_privacy,
        head_layers=split_args.head_layers,
    )
    return split, image_processor
