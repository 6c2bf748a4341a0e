"""One fine-tuning run of a split ViT through a bridge, under a communication budget.

In one process by default; with `remote_args.server` the server half lives in another process and this one
trains the client half through the wire (`hf_adc.distributed.launch`, imported only then).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from ..data import partition_indices
from ..split import SplitViTForImageClassification
from ..training import ADCTrainer, ADCTrainingArguments
from .arguments import DataArguments, ModelArguments, SplitArguments
from .models import build_split, load_data, with_transforms
from .report import write_results

if TYPE_CHECKING:
    from ..distributed.arguments import FederationArguments, RemoteArguments


def train_split(
    split: SplitViTForImageClassification,
    training_args: ADCTrainingArguments,
    train_dataset,
    eval_dataset,
    resume_from_checkpoint: str | bool | None = None,
) -> tuple[ADCTrainer, dict]:
    """Trains `split` with `ADCTrainer` (budget and all), evaluates it, and returns the trainer and the results:
    accuracy, bytes both ways (summed over ranks), the uncompressed equivalent, ratio, budget, steps, time."""
    trainer = ADCTrainer(model=split, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    train_seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    spent = trainer.sync_communication()
    results = {
        "test_accuracy": metrics["eval_accuracy"],
        "test_top5_accuracy": metrics.get("eval_top5_accuracy"),
        "uplink_bytes": spent["uplink_bytes"],
        "downlink_bytes": spent["downlink_bytes"],
        "sync_bytes": spent["sync_bytes"],
        "total_bytes": spent["total_bytes"],
        "uncompressed_bytes": spent["uncompressed_bytes"],
        "ratio": spent["total_bytes"] / spent["uncompressed_bytes"] if spent["uncompressed_bytes"] else 1.0,
        "inference_bytes": split.link.inference_ledger.total_bytes,
        "budget_bytes": trainer.budget_bytes,
        "budget_exhausted": trainer.budget_exhausted,
        "steps": trainer.state.global_step,
        "world_size": training_args.world_size,
        "train_seconds": train_seconds,
        "compression": split.client.config.compression,
        "topology": split.split_settings().get("topology", "standard"),
        "head_layers": split.split_settings().get("head_layers"),
        "log_history": trainer.state.log_history,
    }
    return trainer, results


def _hub_model_id(training_args: ADCTrainingArguments, federated: bool) -> str | None:
    """The id the halves are pushed under at the end; the Trainer itself must push nothing (it would push the
    wrapper), so `push_to_hub` is turned off on `training_args`."""
    if federated and training_args.push_to_hub:
        raise ValueError("--push_to_hub on a federation's client: the server holds the final halves and pushes both "
                         "(give --push_to_hub --hub_model_id to serve.py).")  # fmt: skip
    if not training_args.push_to_hub:
        return None
    if not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id: the halves go to <id>-client and <id>-server.")
    training_args.push_to_hub = False
    return training_args.hub_model_id


def run_split_training(
    model_args: ModelArguments,
    split_args: SplitArguments,
    data_args: DataArguments,
    training_args: ADCTrainingArguments,
    resume_from_checkpoint: str | bool | None = None,
    remote_args: RemoteArguments | None = None,
    federation_args: FederationArguments | None = None,
) -> dict:
    """Fine-tunes a split ViT through the chosen bridge; writes `client/`, `server/`, the image processor,
    `results.json` and `accuracy_vs_bytes.png` into `output_dir`, and returns the results.

    With `push_to_hub`, the halves (not the Trainer's wrapper) go to `<hub_model_id>-client` and
    `<hub_model_id>-server` at the end, from the main process only.

    With `remote_args.server`, the server half lives in a server process (`recipes/serve.py`): this process
    trains the client half through the wire, writes and pushes the client's side only, and `results` gain the
    transport's byte counts (tensor payload and header framing, both ways). With `federation_args.client_id`
    too, this process is one client of a federation: it trains on its shard of the training rows, keeps its half
    in step with the others' (sync bytes charged), and `results["federation"]` gives its plan, shard and the
    accuracy on test rows weighted like its shard's classes (`local_accuracy`).
    """
    federated = federation_args is not None and federation_args.client_id is not None
    remote = remote_args is not None and bool(remote_args.server)
    hub_model_id = _hub_model_id(training_args, federated)
    if federated and not remote:
        raise ValueError(f"--client_id {federation_args.client_id} joins a federation: give --server HOST:PORT too.")
    dataset = load_data(data_args, training_args.seed)
    split, image_processor = build_split(
        model_args, split_args, dataset["train"].features["label"].names, training_args.seed
    )
    shard_labels = None
    if federated:
        shards = partition_indices(
            list(dataset["train"]["label"]), federation_args.num_clients, federation_args.partition,
            federation_args.alpha, training_args.seed,
        )  # fmt: skip
        dataset["train"] = dataset["train"].select(shards[federation_args.client_id])
        shard_labels = list(dataset["train"]["label"])
    if remote:
        from ..distributed.launch import remote_split

        split = remote_split(split, training_args, remote_args, federation_args)
    dataset = with_transforms(dataset, image_processor, data_args.augment)
    trainer, results = train_split(split, training_args, dataset["train"], dataset["test"], resume_from_checkpoint)
    if remote:
        from ..distributed.launch import finish_remote

        finish_remote(split, trainer, results, remote_args, federation_args, shard_labels, dataset)
    results["args"] = {
        "model": asdict(model_args),
        "split": asdict(split_args),
        "data": asdict(data_args),
        "training": training_args.to_dict(),
    }
    if trainer.is_world_process_zero():
        write_results(split, image_processor, trainer.state.log_history, results, training_args.output_dir)
        if hub_model_id and remote:
            results["hub_urls"] = {"client": str(split.client.push_to_hub(f"{hub_model_id}-client"))}
        elif hub_model_id:
            results["hub_urls"] = split.push_to_hub(
                f"{hub_model_id}-client",
                f"{hub_model_id}-server",
                image_processor=image_processor,
                dataset=data_args.dataset_name,
                private=training_args.hub_private_repo,
                token=training_args.hub_token,
            )
    return results


def train_from_arguments(model_args, split_args, data_args, training_args, remote_args=None, federation_args=None):
    """`run_split_training` with the arguments as the recipe parses them (the checkpoint to resume from is
    `training_args.resume_from_checkpoint`)."""
    return run_split_training(
        model_args,
        split_args,
        data_args,
        training_args,
        resume_from_checkpoint=training_args.resume_from_checkpoint,
        remote_args=remote_args,
        federation_args=federation_args,
    )
