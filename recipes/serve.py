"""Serve the server half of a split ViT to a client that trains it with `recipes/train.py --server HOST:PORT`.

The server holds the server half (and the server side of the bridge: BottleNet++'s decoder), its own optimizer
and learning-rate schedule, answers evaluation requests, and saves its half into `--output_dir` (`server/`, and
its state in `checkpoint-N/` whenever the client checkpoints). It takes the same model, split, compression and
training arguments as `recipes/train.py` (the same defaults too); the client's handshake must agree with them,
and give the join token, or it is refused:

    python recipes/serve.py --listen 0.0.0.0:29500 --join_token $TOKEN \\
        --model_name_or_path facebook/deit-tiny-patch16-224 --split_layer 3 --compression adc --xi 0.1 \\
        --learning_rate 1e-4 --output_dir outputs/deit-server

The transport (torch.distributed gloo) is not encrypted: use it on a trusted network, a VPN or an SSH tunnel.
It exits once a client has trained to the end (or was lost mid-training, keeping the last checkpoint), or when
no client came within `--accept_timeout` seconds.

With `--num_clients N` it serves a federation (hf_adc.federation): N clients, each started with `--server`,
`--num_clients N` and its `--client_id`; `--schedule sequential|splitfed`, `--sync_every K` steps per turn or
between averagings, `--round_timeout` seconds before a missing client is dropped, `--min_clients` to go on with.
The byte budget (`--budget_epochs`, default 1, or `--communication_budget`) covers all clients and the sync. It
writes the whole split (the averaged client half too) and `server_results.json` with every client's bytes and
accuracy.
"""

import logging
import sys

from train import BUDGET_FLAGS, TRAINING_DEFAULTS  # recipes/ is on the path when run as a script
from transformers import HfArgumentParser

from hf_adc.experiment import (
    FederationArguments,
    ModelArguments,
    RemoteArguments,
    SplitArguments,
    default_checkpoint,
    run_server,
    with_defaults,
)
from hf_adc.training import ADCTrainingArguments


def main(argv: list[str]) -> dict:
    parser = HfArgumentParser(
        (ModelArguments, SplitArguments, ADCTrainingArguments, RemoteArguments, FederationArguments)
    )
    defaults = {**TRAINING_DEFAULTS, "output_dir": "outputs/serve"}
    given = {arg.split("=")[0].removeprefix("--") for arg in argv if arg.startswith("--")}
    if "--num_clients" in argv and not given & set(BUDGET_FLAGS):
        defaults["budget_epochs"] = "1"  # a federation's budget is the server's plan: the same default as train.py
    model_args, split_args, training_args, remote_args, federation_args = parser.parse_args_into_dataclasses(
        with_defaults(argv, defaults)
    )
    if federation_args.client_id is not None:
        raise ValueError(f"--client_id {federation_args.client_id} is for a client (recipes/train.py --server).")
    if remote_args.server or remote_args.distributed:
        raise ValueError("serve.py serves clients: give --listen HOST:PORT, not --server or --distributed.")
    if model_args.model_name_or_path is None:
        model_args.model_name_or_path = default_checkpoint(use_cpu=training_args.use_cpu)
    results = run_server(model_args, split_args, training_args, remote_args, federation_args)
    print(f"server: {results['status']} after {results['steps']} optimizer steps")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s server %(name)s: %(message)s")
    main(sys.argv[1:])
