"""Serve the server half of a split ViT to a client that trains it with `recipes/train.py --server HOST:PORT`.

The server holds the server half (and the server side of the bridge: BottleNet++'s decoder), its own optimizer
and learning-rate schedule, answers evaluation requests, and saves its half into `--output_dir` (`server/`, and
its state in `checkpoint-N/` whenever the client checkpoints). It takes the same model, split, compression and
training arguments as `recipes/train.py` (the same defaults too); the client's handshake must agree with them,
and give the join token, or it is refused:

    python recipes/serve.py --listen 0.0.0.0:29500 --credentials kits/server \\
        --model_name_or_path facebook/deit-tiny-patch16-224 --split_layer 3 --compression adc --xi 0.1 \\
        --learning_rate 1e-4 --output_dir outputs/deit-server

The transport is gRPC with mutual TLS: `--credentials` is the server's kit from `python -m hf_adc.distributed.provision`
(`--revoked FILE` refuses listed client certificates; `--insecure` is plaintext, for a trusted network only).
It exits once a client has trained to the end (or was lost mid-training, keeping the last checkpoint), or when
no client came within `--accept_timeout` seconds.

Started as N ranks it serves one client of N processes (`accelerate launch --num_processes N recipes/train.py
--server HOST:PORT`): `accelerate launch --num_processes N recipes/serve.py --listen HOST:PORT ...`, rank r at
PORT + r; the ranks average the server half's gradients every step, rank 0 writes the files (hf_adc.distributed.ranks).

With `--num_clients N` it serves a federation (hf_adc.distributed.federation): N clients, each started with `--server`,
`--num_clients N` and its `--client_id`; `--schedule sequential|splitfed`, `--sync_every K` steps per turn or
between averagings, `--round_timeout` seconds before a missing client is dropped, `--min_clients` to go on with.
The byte budget (`--budget_epochs`, default 1, or `--communication_budget`) covers all clients and the sync. It
writes the whole split (the averaged client half too) and `server_results.json` with every client's bytes and
accuracy.
"""

import logging
import sys

from hf_adc.handshake_log import log_refused_handshakes

if __name__ == "__main__":
    log_refused_handshakes()  # before gRPC is imported: each refused TLS handshake is logged, with its peer

from transformers import HfArgumentParser  # noqa: E402

from hf_adc.distributed.arguments import FederationArguments, RemoteArguments, check_server_arguments  # noqa: E402
from hf_adc.distributed.launch import run_server  # noqa: E402
from hf_adc.experiment import (  # noqa: E402
    SERVE_RECIPE,
    ModelArguments,
    SplitArguments,
    release_process_group,
    resolve_checkpoint,
    with_defaults,
)
from hf_adc.training import ADCTrainingArguments  # noqa: E402


def main(argv: list[str]) -> dict:
    parser = HfArgumentParser(
        (ModelArguments, SplitArguments, ADCTrainingArguments, RemoteArguments, FederationArguments)
    )
    args = parser.parse_args_into_dataclasses(with_defaults(argv, SERVE_RECIPE))
    model_args, split_args, training_args, remote_args, federation_args = args
    check_server_arguments(remote_args, federation_args)
    resolve_checkpoint(model_args, use_cpu=training_args.use_cpu)
    results = run_server(*args)
    print(f"server: {results['status']} after {results['steps']} optimizer steps")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s server %(name)s: %(message)s")
    status = "failed"
    try:
        status = main(sys.argv[1:])["status"]
    finally:
        release_process_group(status == "finished")
    sys.exit(1 if status == "failed" else 0)
