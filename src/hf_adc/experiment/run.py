"""One fine-tuning run of a split ViT through a bridge, under a communication budget, in one process.

Its steps (`pushed_model_id`, `prepare_run`, `train_split`, `report_run`) are public because a client whose server
half lives in another process (`hf_adc.distributed.launch.run_client`) runs the same steps around its own: this
module knows nothing of processes, so the dependency goes one way.
"""

import contextlib
import logging
import resource
import time
from dataclasses import asdict

import torch
from datasets import DatasetDict
from transformers import BaseImageProcessor

from ..privacy.payload_noise import PayloadNoiseConfig
from ..split import SplitViTForImageClassification
from ..training import ADCTrainer, ADCTrainingArguments
from .arguments import DataArguments, ModelArguments, SplitArguments
from .models import build_split, load_data, with_transforms
from .report import write_results

logger = logging.getLogger(__name__)


def train_split(
    split: SplitViTForImageClassification,
    training_args: ADCTrainingArguments,
    train_dataset,
    eval_dataset,
    resume_from_checkpoint: str | bool | None = None,
    nopeek_weight: float | None = None,
) -> tuple[ADCTrainer, dict]:
    """Trains `split` with `ADCTrainer` (budget and all; NoPeek's penalty on the client with `nopeek_weight`),
    evaluates it, and returns the trainer and the results: accuracy, bytes both ways (summed over ranks), the
    uncompressed equivalent, ratio, budget, steps, time."""
    trainer = ADCTrainer(model=split, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset)
    nopeek = None
    if nopeek_weight is not None:
        from ..privacy.nopeek import NoPeek

        nopeek = NoPeek(split, nopeek_weight)
    start = time.perf_counter()
    with nopeek or contextlib.nullcontext():
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
        "peak_memory_mib": peak_memory_mib(training_args.device),
        "compression": split.client.config.compression,
        "topology": split.split_settings().get("topology", "standard"),
        "head_layers": split.split_settings().get("head_layers"),
        "log_history": trainer.state.log_history,
    }
    if isinstance(split.bridge.config, PayloadNoiseConfig):
        from ..privacy.accounting import split_guarantee  # dp-accounting: loaded only for a run that needs it

        guarantee = split_guarantee(split)  # whether an epsilon may be claimed for this run, and why (not)
        results["payload_noise_guarantee"] = {"holds": guarantee.holds, "reason": guarantee.reason}
    if nopeek is not None:  # the distance correlation of the last training batches, without the weight
        results["nopeek_distance_correlation"] = sum(nopeek.penalties[-8:]) / max(len(nopeek.penalties[-8:]), 1)
    return trainer, results


def peak_memory_mib(device) -> float:
    """This process's peak memory in MiB: the GPU's allocations on CUDA, else the resident set (`ru_maxrss`), which
    is what holding several micro-batches' graphs at once (`pipeline_micro_batches`) costs."""
    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pushed_model_id(training_args: ADCTrainingArguments) -> str | None:
    """The id the halves are pushed under at the end (None without `push_to_hub`), checked before any work; the
    Trainer itself must push nothing (it would push the wrapper), so `push_to_hub` is turned off on
    `training_args`."""
    if not training_args.push_to_hub:
        return None
    if not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id: the halves go to <id>-client and <id>-server.")
    training_args.push_to_hub = False
    return training_args.hub_model_id


def prepare_run(
    model_args: ModelArguments,
    split_args: SplitArguments,
    data_args: DataArguments,
    training_args: ADCTrainingArguments,
) -> tuple[DatasetDict, SplitViTForImageClassification, BaseImageProcessor]:
    """The data (without the image transforms, so that its labels can still be read as a column), the split and its
    image processor."""
    data_args.check_label_dp(split_args.label_privacy)
    label_dp_seed = None
    if data_args.label_dp_epsilon is not None:
        from ..privacy.label_dp import secret_seed

        label_dp_seed = secret_seed(training_args.output_dir)  # the client's own, kept with its outputs
    dataset = load_data(data_args, training_args.seed, label_dp_seed)
    split, image_processor = build_split(
        model_args, split_args, dataset["train"].features["label"].names, training_args.seed
    )
    return dataset, split, image_processor


def report_run(
    split: SplitViTForImageClassification,
    image_processor: BaseImageProcessor,
    trainer: ADCTrainer,
    results: dict,
    model_args: ModelArguments,
    split_args: SplitArguments,
    data_args: DataArguments,
    training_args: ADCTrainingArguments,
) -> None:
    """Records the run's arguments in `results`; the main process writes `results.json`, the halves it holds, the
    image processor and `accuracy_vs_bytes.png` into `output_dir`."""
    results["args"] = {
        "model": asdict(model_args),
        "split": asdict(split_args),
        "data": asdict(data_args),
        "training": training_args.to_dict(),
    }
    if trainer.is_world_process_zero():
        write_results(split, image_processor, trainer.state.log_history, results, training_args.output_dir)


def run_split_training(
    model_args: ModelArguments,
    split_args: SplitArguments,
    data_args: DataArguments,
    training_args: ADCTrainingArguments,
    resume_from_checkpoint: str | bool | None = None,
) -> dict:
    """Fine-tunes a split ViT through the chosen bridge; writes `client/`, `server/`, the image processor,
    `results.json` and `accuracy_vs_bytes.png` into `output_dir`, and returns the results.

    With `push_to_hub`, the halves (not the Trainer's wrapper) go to `<hub_model_id>-client` and
    `<hub_model_id>-server` at the end, from the main process only.
    """
    hub_model_id = pushed_model_id(training_args)
    dataset, split, image_processor = prepare_run(model_args, split_args, data_args, training_args)
    dataset = with_transforms(dataset, image_processor, data_args.augment)
    trainer, results = train_split(
        split, training_args, dataset["train"], dataset["test"], resume_from_checkpoint, split_args.nopeek_weight
    )
    report_run(split, image_processor, trainer, results, model_args, split_args, data_args, training_args)
    if hub_model_id and trainer.is_world_process_zero():
        results["hub_urls"] = split.push_to_hub(
            f"{hub_model_id}-client",
            f"{hub_model_id}-server",
            image_processor=image_processor,
            dataset=data_args.dataset_name,
            private=training_args.hub_private_repo,
            token=training_args.hub_token,
        )
    return results


def train_from_arguments(model_args, split_args, data_args, training_args):
    """`run_split_training` with the arguments as the recipe parses them (the checkpoint to resume from is
    `training_args.resume_from_checkpoint`)."""
    return run_split_training(
        model_args, split_args, data_args, training_args, resume_from_checkpoint=training_args.resume_from_checkpoint
    )


def release_process_group(finished: bool = True) -> None:
    """Destroys this process's torch.distributed group, if it has one (a recipe's last step on every rank); once
    every rank has `finished`, after a barrier, so that no rank leaves while another still talks to it. A gloo group
    left to the interpreter's exit, or a rank that exits while the others still use their pairs with it, can abort
    the process (`terminate called without an active exception`), and the launcher then fails the whole run. A rank
    that did not finish (an error) skips the barrier: the others learn of it from their own collectives."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if finished:
        try:
            dist.barrier()
        except (RuntimeError, ValueError) as error:  # another rank is gone: nothing to wait for
            logger.warning("Ranks did not meet at the end (%s); leaving the group.", error)
    dist.destroy_process_group()


def run_recipe(main, argv: list[str]):
    """`main(argv)` as a recipe's last act on every rank: the process group released after it (every rank meeting
    first when it finished, see `release_process_group`)."""
    finished = False
    try:
        result = main(argv)
        finished = True
        return result
    finally:
        release_process_group(finished)
