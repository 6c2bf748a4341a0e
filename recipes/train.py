"""Fine-tune a split ViT with ADC (or a baseline bridge) under a communication budget.

The main job, with no arguments: fine-tune a small ViT pretrained on Fashion-MNIST classes 0-4 (made once
and cached; the offline stand-in for a Hub checkpoint) on classes 5-9 with ADC at xi = 0.1, under a budget of
one epoch of uncompressed traffic:

    accelerate launch recipes/train.py

Your own checkpoint and data, e.g. DeiT-Tiny on CIFAR-100 as in the paper:

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/train.py \
        --model_name_or_path facebook/deit-tiny-patch16-224 --dataset_name uoft-cs/cifar100 \
        --split_layer 3 --compression adc --xi 0.1 --budget_epochs 10 \
        --per_device_train_batch_size 128 --learning_rate 1e-4 --output_dir outputs/deit-c100-adc

Two CPU processes (DDP over gloo): `--config_file recipes/accelerate_configs/cpu_2proc.yaml`. Every
`TrainingArguments` flag works; `--communication_budget 750MB` or `--budget_epochs E` set the budget.
Outputs in `--output_dir`: `client/`, `server/` (load with `from_pretrained`), the image processor,
`results.json` and `accuracy_vs_bytes.png`.

Client and server as separate processes (the server half never exists here), on one machine:

    accelerate launch recipes/train.py --distributed

or on two (start the server first; same model, split and training arguments on both sides):

    python recipes/serve.py --listen 0.0.0.0:29500 --join_token $TOKEN ...     # on the server host
    accelerate launch recipes/train.py --server SERVER_HOST:29500 --join_token $TOKEN ...   # on the client host

Several clients (each on its own shard; `--schedule sequential` or `splitfed`, see hf_adc.federation):

    python recipes/serve.py --listen 0.0.0.0:29500 --num_clients 3 --schedule splitfed --sync_every 10 ...
    accelerate launch recipes/train.py --server SERVER_HOST:29500 --num_clients 3 --client_id 0 ...  # and 1, 2

or all on one machine (the server and 3 client processes; outputs in output_dir and output_dir/client-i):

    accelerate launch recipes/train.py --distributed --num_clients 3 --schedule splitfed --partition dirichlet
"""

import json
import logging
import multiprocessing
import secrets
import socket
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from transformers import HfArgumentParser

from hf_adc.data import DEFAULT_DATASET
from hf_adc.experiment import (
    DataArguments,
    FederationArguments,
    ModelArguments,
    RemoteArguments,
    SplitArguments,
    default_checkpoint,
    run_server,
    run_split_training,
    summary_text,
    with_defaults,
)
from hf_adc.training import ADCTrainingArguments

TRAINING_DEFAULTS = {
    "output_dir": "outputs/train",
    "per_device_train_batch_size": "64",
    "per_device_eval_batch_size": "128",
    "learning_rate": "6e-4",
    "weight_decay": "0.05",
    "lr_scheduler_type": "cosine",
    "warmup_steps": "0.05",
    "logging_steps": "25",
    "eval_strategy": "steps",
    "eval_steps": "0.2",
    "save_strategy": "no",
    "report_to": "none",
}
MAIN_JOB_DATA = {"classes": "5-9", "max_train_samples": "10000"}
BUDGET_FLAGS = ("communication_budget", "budget_epochs", "max_steps", "num_train_epochs")


def main(argv: list[str]) -> dict:
    defaults = dict(TRAINING_DEFAULTS)
    given = {arg.split("=")[0].removeprefix("--") for arg in argv if arg.startswith("--")}
    if not given & set(BUDGET_FLAGS):
        defaults["budget_epochs"] = "1"
    if not given & {"model_name_or_path", "dataset_name", "classes"}:
        defaults.update(MAIN_JOB_DATA)
    parser = HfArgumentParser(
        (ModelArguments, SplitArguments, DataArguments, ADCTrainingArguments, RemoteArguments, FederationArguments)
    )
    model_args, split_args, data_args, training_args, remote_args, federation_args = parser.parse_args_into_dataclasses(
        with_defaults(argv, defaults)
    )
    if federation_args.num_clients is not None and not remote_args.distributed and federation_args.client_id is None:
        raise ValueError(
            f"--num_clients {federation_args.num_clients}: give this client's --client_id (and --server), or "
            "--distributed to start the server and every client here."
        )
    if remote_args.listen:
        raise ValueError(f"--listen {remote_args.listen} is for recipes/serve.py; the client takes --server.")
    split_args.compression_config(seed=training_args.seed)
    split_args.channel_config()
    if model_args.model_name_or_path is None:
        if data_args.dataset_name == DEFAULT_DATASET:
            if not 1 <= split_args.split_layer < model_args.num_hidden_layers:
                raise ValueError(
                    f"split_layer={split_args.split_layer} is out of range: the default ViT has "
                    f"{model_args.num_hidden_layers} layers, so 1 .. {model_args.num_hidden_layers - 1}."
                )
            model_args.model_name_or_path = default_checkpoint(use_cpu=training_args.use_cpu)
        else:
            warnings.warn(
                "No --model_name_or_path: training a small ViT from a config, from scratch. ADC's batch merging "
                "needs a pretrained backbone (from scratch it stays near chance); pass a checkpoint, or make one "
                "with recipes/pretrain.py.",
                stacklevel=1,
            )
    if remote_args.distributed and federation_args.num_clients is not None:
        return run_federation_here(model_args, split_args, data_args, training_args, remote_args, federation_args)
    server_process = None
    if remote_args.distributed:
        remote_args, server_process = start_local_server(model_args, split_args, training_args, remote_args)
    try:
        results = run_split_training(
            model_args,
            split_args,
            data_args,
            training_args,
            resume_from_checkpoint=training_args.resume_from_checkpoint,
            remote_args=remote_args,
            federation_args=federation_args,
        )
    finally:
        if server_process is not None:
            server_process.join(timeout=remote_args.timeout)
            if server_process.is_alive():
                server_process.terminate()
    if training_args.process_index == 0:
        print(summary_text(results))
    return results


def _serve(*args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s server %(name)s: %(message)s")
    run_server(*args)


def _client(client_id: int, *args) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s client {client_id} %(name)s: %(message)s")
    results = run_split_training(*args)
    print(f"client {client_id}: {summary_text(results)}")


def run_federation_here(model_args, split_args, data_args, training_args, remote_args, federation_args) -> dict:
    """The server and `num_clients` clients as processes on this machine; returns the server's results (per-client
    and total bytes, accuracies) and prints them as a table. `--resume_from_checkpoint OUTPUT_DIR/checkpoint-N`
    (the server's) resumes the whole federation: each client from its own `OUTPUT_DIR/client-i/checkpoint-N`."""
    resume = training_args.resume_from_checkpoint
    if resume and Path(resume).resolve().parent != Path(training_args.output_dir).resolve():
        raise ValueError(
            f"--resume_from_checkpoint {resume}: give the server's checkpoint-N in --output_dir "
            f"{training_args.output_dir}; each client resumes from its client-i/checkpoint-N there."
        )
    remote_args, server = start_local_server(model_args, split_args, training_args, remote_args, federation_args)
    context = multiprocessing.get_context("spawn")
    clients = []
    for client_id in range(federation_args.num_clients):
        # The server holds the final halves and pushes both; the clients push nothing.
        client_output = f"{training_args.output_dir}/client-{client_id}"
        client_resume = f"{client_output}/{Path(resume).name}" if resume else None
        client_training = replace(
            training_args, output_dir=client_output, push_to_hub=False, resume_from_checkpoint=client_resume
        )
        client_federation = replace(federation_args, client_id=client_id)
        args = (model_args, split_args, data_args, client_training, client_resume, remote_args, client_federation)
        clients.append(context.Process(target=_client, args=(client_id, *args), name=f"hf_adc-client-{client_id}"))
        clients[-1].start()
    for process in [*clients, server]:
        process.join(timeout=remote_args.timeout * 4)
        if process.is_alive():
            process.terminate()
    path = Path(training_args.output_dir) / "server_results.json"
    if not path.exists():
        raise RuntimeError(f"the server wrote no {path}: see its log above.")
    results = json.loads(path.read_text())
    print(federation_table(results))
    return results


def federation_table(results: dict) -> str:
    lines = [
        f"{results['schedule']}, {results['num_clients']} clients: {results['detail']}",
        "| client | shard | test accuracy | local accuracy | sent (MB) | of which sync (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for client_id, client in results["clients"].items():
        lines.append(
            f"| {client_id} | {client['shard_size']} | {client.get('test_accuracy', float('nan')):.4f} | "
            f"{client.get('local_accuracy', float('nan')):.4f} | {client.get('total_bytes', 0) / 1e6:.2f} | "
            f"{client.get('sync_bytes', 0) / 1e6:.2f} |"
        )
    total = results["total"]
    lines.append(f"| all | | | | {total['total_bytes'] / 1e6:.2f} | {total['sync_bytes'] / 1e6:.2f} |")
    return "\n".join(lines)


def start_local_server(model_args, split_args, training_args, remote_args, federation_args=None):
    """Starts the server half in a process of its own on 127.0.0.1 (a free port, a fresh join token); returns
    the client's remote arguments pointing at it, and the process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = remote_args.token() or secrets.token_hex(16)
    address = f"127.0.0.1:{port}"
    server_args = replace(remote_args, distributed=False, listen=address, join_token=token)
    process = multiprocessing.get_context("spawn").Process(
        target=_serve, args=(model_args, split_args, training_args, server_args, federation_args), name="hf_adc-server"
    )
    process.start()
    return replace(remote_args, distributed=False, server=address, join_token=token), process


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
