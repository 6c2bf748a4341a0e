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

    python -m hf_adc.distributed.provision --output_dir kits --server_name SERVER_HOST --num_clients 1   # once
    python recipes/serve.py --listen 0.0.0.0:29500 --credentials kits/server ...                    # on the server host
    accelerate launch recipes/train.py --server SERVER_HOST:29500 --credentials kits/client-0 ...   # on the client host

A client of N processes (DDP) trains one split against a server of N ranks (client rank i joins PORT + i):

    accelerate launch --num_processes 2 recipes/serve.py --listen 0.0.0.0:29500 ...                # server host
    accelerate launch --num_processes 2 recipes/train.py --server SERVER_HOST:29500 ...            # client host

Several clients (each on its own shard; `--schedule sequential` or `splitfed`, see hf_adc.distributed.federation):

    python recipes/serve.py --listen 0.0.0.0:29500 --num_clients 3 --schedule splitfed --sync_every 10 ...
    accelerate launch recipes/train.py --server SERVER_HOST:29500 --num_clients 3 --client_id 0 ...  # and 1, 2

or all on one machine (the server and 3 client processes; outputs in output_dir and output_dir/client-i):

    accelerate launch recipes/train.py --distributed --num_clients 3 --schedule splitfed --partition dirichlet
"""

import logging
import sys

from transformers import HfArgumentParser

from hf_adc.distributed.arguments import FederationArguments, RemoteArguments, check_client_arguments
from hf_adc.distributed.launch import run_client, run_federation_here, run_with_local_server
from hf_adc.experiment import (
    TRAIN_RECIPE,
    DataArguments,
    ModelArguments,
    SplitArguments,
    resolve_checkpoint,
    run_recipe,
    summary_text,
    train_from_arguments,
    with_defaults,
)
from hf_adc.training import ADCTrainingArguments


def main(argv: list[str]) -> dict:
    parser = HfArgumentParser(
        (ModelArguments, SplitArguments, DataArguments, ADCTrainingArguments, RemoteArguments, FederationArguments)
    )
    args = parser.parse_args_into_dataclasses(with_defaults(argv, TRAIN_RECIPE))
    model_args, split_args, data_args, training_args, remote_args, federation_args = args
    check_client_arguments(remote_args, federation_args)
    split_args.validate()
    data_args.check_label_dp(split_args.label_privacy)
    resolve_checkpoint(model_args, split_args, data_args, use_cpu=training_args.use_cpu)
    if remote_args.distributed and federation_args.num_clients is not None:
        return run_federation_here(*args)  # prints the federation's table
    if remote_args.distributed:
        results = run_with_local_server(*args)
    elif remote_args.server:
        results = run_client(*args)
    else:
        results = train_from_arguments(model_args, split_args, data_args, training_args)
    if training_args.process_index == 0:
        print(summary_text(results))
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_recipe(main, sys.argv[1:])
