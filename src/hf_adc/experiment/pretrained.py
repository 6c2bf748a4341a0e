"""The default checkpoint: the offline stand-in for a Hub checkpoint (a small ViT pretrained centrally on
Fashion-MNIST classes 0-4), made once by `run_pretraining` and cached; and the recipes' rule for when to use it."""

import hashlib
import json
import logging
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed

from ..data import DEFAULT_DATASET
from ..training import classification_metrics
from .arguments import DataArguments, ModelArguments, SplitArguments
from .models import load_data, load_vit, with_transforms

logger = logging.getLogger(__name__)

# The offline stand-in for a Hub checkpoint: a small ViT trained centrally on Fashion-MNIST classes 0-4.
DEFAULT_PRETRAINING = {
    "dataset_name": DEFAULT_DATASET,
    "classes": "0-4",
    "max_train_samples": 15000,
    "max_eval_samples": 2000,
    "augment": False,
    "num_train_epochs": 3,
    "per_device_train_batch_size": 64,
    "learning_rate": 1e-3,
    "weight_decay": 0.05,
    "warmup_steps": 0.05,
    "lr_scheduler_type": "cosine",
    "seed": 0,
}


def cache_dir() -> Path:
    """Where hf_adc caches made checkpoints: `$HF_ADC_CACHE`, else `$HF_HOME/hf_adc`."""
    if "HF_ADC_CACHE" in os.environ:
        return Path(os.environ["HF_ADC_CACHE"])
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "hf_adc"


def run_pretraining(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    """Central training of a ViT (no split); saves model and image processor in `output_dir`."""
    if training_args.remove_unused_columns:
        raise ValueError(
            "remove_unused_columns=True drops the image column that the transform turns into pixel_values: "
            "pass --remove_unused_columns false."
        )
    dataset = load_data(data_args, training_args.seed)
    set_seed(training_args.seed)
    model, image_processor = load_vit(model_args, dataset)
    dataset = with_transforms(dataset, image_processor, data_args.augment)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"],
        compute_metrics=classification_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        image_processor.save_pretrained(training_args.output_dir)
    return metrics


def default_checkpoint(use_cpu: bool = False) -> str:
    """The cached small ViT pretrained on Fashion-MNIST classes 0-4, made on first use (a few minutes).

    Under a multi-process launch every process takes part in the pretraining (`use_cpu=True` for DDP on CPUs).
    """
    recipe = {**DEFAULT_PRETRAINING, "model": asdict(ModelArguments())}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    path = cache_dir() / f"vit-small-fashion-mnist-0-4-{key}"
    if (path / "config.json").exists():
        return str(path)
    logger.warning("Pretraining the default checkpoint once (Fashion-MNIST classes 0-4); cached in %s.", path)
    protocol = dict(DEFAULT_PRETRAINING)
    data_args = DataArguments(
        dataset_name=protocol.pop("dataset_name"),
        classes=protocol.pop("classes"),
        max_train_samples=protocol.pop("max_train_samples"),
        max_eval_samples=protocol.pop("max_eval_samples"),
        augment=protocol.pop("augment"),
    )
    staging = path.parent / f".staging-{key}"
    training_args = TrainingArguments(
        output_dir=str(staging),
        save_strategy="no",
        report_to="none",
        logging_steps=50,
        remove_unused_columns=False,
        use_cpu=use_cpu,
        **protocol,
    )
    metrics = run_pretraining(ModelArguments(), data_args, training_args)
    if training_args.process_index == 0:
        logger.warning("Default checkpoint: accuracy %.3f on held-out classes 0-4.", metrics["eval_accuracy"])
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, path)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return str(path)


def resolve_checkpoint(
    model_args: ModelArguments,
    split_args: SplitArguments | None = None,
    data_args: DataArguments | None = None,
    use_cpu: bool = False,
) -> None:
    """Fills in `model_args.model_name_or_path` where the recipes default it.

    Without data arguments (a server) or with the default data, no model means the default checkpoint (for a
    client, its split layer is checked against it first: making it takes minutes); with other data it stays a ViT
    from a config, trained from scratch, with a warning.
    """
    if model_args.model_name_or_path is not None:
        return
    if data_args is not None and data_args.dataset_name != DEFAULT_DATASET:
        warnings.warn(
            "No --model_name_or_path: training a small ViT from a config, from scratch. ADC's batch merging "
            "needs a pretrained backbone (from scratch it stays near chance); pass a checkpoint, or make one "
            "with recipes/pretrain.py.",
            stacklevel=2,
        )
        return
    if data_args is not None and not 1 <= split_args.split_layer < model_args.num_hidden_layers:
        raise ValueError(
            f"split_layer={split_args.split_layer} is out of range: the default ViT has "
            f"{model_args.num_hidden_layers} layers, so 1 .. {model_args.num_hidden_layers - 1}."
        )
    model_args.model_name_or_path = default_checkpoint(use_cpu=use_cpu)
