"""Starting the processes of a split across machines: the server (`run_server`), a client (`run_client`: the
one-process run's steps from `hf_adc.experiment.run` around `remote_split` and `finish_remote`), and the one-machine
commands that start a server process (and client processes) here (`run_with_local_server`, `run_federation_here`).

This module builds on `hf_adc.experiment`, never the other way round: a one-process run knows nothing of the wire."""

import json
import logging
import math
import multiprocessing
import os
import secrets
import socket
import tempfile
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch

from ..data import partition_indices
from ..experiment.arguments import DataArguments, ModelArguments, SplitArguments
from ..experiment.models import build_split, load_data, model_config, with_transforms
from ..experiment.report import federation_table, summary_text
from ..experiment.run import prepare_run, pushed_model_id, release_process_group, report_run, train_split
from ..hub import push_parts
from ..split import SplitViTForImageClassification
from ..training import ADCTrainer, ADCTrainingArguments
from ..ushape import USplitViTForImageClassification
from .arguments import JOIN_TOKEN_VARIABLE, FederationArguments, RemoteArguments
from .client import RemoteLink, RemoteSplitViT, remote_model
from .connect import Listener, connect
from .federation import FederatedLink, FederatedServer
from .files import CheckpointError, write_atomically
from .provision import ephemeral_kits
from .ranks import ServerRanks, from_rank_zero, join_in_rank_order, rank_address
from .server import SplitServer
from .settings import message_cap, session_settings

logger = logging.getLogger(__name__)


def _federated(federation_args: FederationArguments | None) -> bool:
    return federation_args is not None and federation_args.client_id is not None


def _check_share_head(label_privacy: bool, federation_args: FederationArguments | None) -> None:
    """`--share_head` needs a federation of U-shaped splits; refused before any work otherwise."""
    if federation_args is None or not federation_args.share_head:
        return
    if not label_privacy or federation_args.num_clients is None:
        raise ValueError(
            "--share_head averages the client-side heads of a federation (--num_clients) of U-shaped splits "
            f"(--label_privacy); got label_privacy={label_privacy}, num_clients={federation_args.num_clients}."
        )


def remote_split(
    split: SplitViTForImageClassification,
    training_args: ADCTrainingArguments,
    remote_args: RemoteArguments,
    federation_args: FederationArguments | None = None,
) -> RemoteSplitViT:
    """`split`'s client side, joined to the server at `remote_args.server` (as client `client_id` of a federation
    when `federation_args` names one): the handshake sends the settings the server must agree with. A client of
    several processes joins a server of as many ranks: rank i at the server's port + i, rank 0 first
    (`join_in_rank_order`)."""
    _check_share_head(isinstance(split, USplitViTForImageClassification), federation_args)
    kit = remote_args.kit()
    if _federated(federation_args) and kit is not None and kit.name != f"client-{federation_args.client_id}":
        raise ValueError(
            f"--client_id {federation_args.client_id} disagrees with this client's certificate ({kit.name}): a "
            "federation client's id comes from its kit (client-N)."
        )
    rank, ranks = training_args.process_index, training_args.world_size
    if _federated(federation_args) and ranks > 1:
        raise ValueError(f"a federation member (--client_id {federation_args.client_id}) runs one process; this "
                         f"client runs {ranks}. Several processes train one split against a server of as many ranks, "
                         "without --num_clients.")  # fmt: skip
    batch = max(training_args.per_device_train_batch_size, training_args.per_device_eval_batch_size)
    cap = message_cap((split.client or split.server).config, batch)

    def join() -> RemoteSplitViT:
        address = rank_address(remote_args.server, rank)
        peer = connect(address, remote_args.timeout_delta(), kit, remote_args.insecure, cap)
        if _federated(federation_args):
            link = FederatedLink(peer, federation_args.client_id, split.link.channel, split.link.wire_dtype)
        else:
            link = RemoteLink(peer, split.link.channel, split.link.wire_dtype)
        remote = remote_model(split, link)
        settings = {**session_settings(remote, training_args), "rank": rank, "ranks": ranks}
        if _federated(federation_args):
            settings["federation"] = federation_args.shared_settings(training_args)
            link.attach(remote, with_head=federation_args.share_head)
        link.join(settings, remote_args.token())
        return remote

    return join_in_rank_order(join, rank, ranks)


def finish_remote(
    split: RemoteSplitViT,
    trainer: ADCTrainer,
    results: dict,
    remote_args: RemoteArguments,
    federation_args: FederationArguments | None,
    shard_labels: list[int] | None,
    dataset,
) -> None:
    """Ends the session with the server and adds to `results` the transport's byte counts (and, for a federation's
    client, its plan, shard and `local_accuracy`)."""
    if _federated(federation_args):
        results["federation"] = _federation_results(trainer, split.link, federation_args, shard_labels, dataset)
        results["local_accuracy"] = results["federation"]["local_accuracy"]
        split.link.finish(results)
    else:
        split.link.finish()
    traffic = vars(split.link.peer.traffic)
    if trainer.args.world_size > 1:  # every rank's stream, summed: what crossed between the two sides
        each = [None] * trainer.args.world_size
        torch.distributed.all_gather_object(each, traffic)
        traffic = {name: sum(rank[name] for rank in each) for name in traffic}
        results["transport_ranks"] = each
    results["transport"] = {**traffic, "server": remote_args.server}


def _federation_results(trainer: ADCTrainer, link: FederatedLink, federation_args, shard_labels, dataset) -> dict:
    """The client's plan and shard, and its test accuracy per class weighted by its shard's class frequencies."""
    num_labels = len(dataset["train"].features["label"].names)
    prediction = trainer.predict(dataset["test"])
    predicted = torch.as_tensor(prediction.predictions).argmax(-1)
    truth = torch.as_tensor(prediction.label_ids)
    correct = torch.zeros(num_labels).index_add_(0, truth, (predicted == truth).float())
    per_class = correct / torch.bincount(truth, minlength=num_labels).clamp(min=1)
    shard = torch.bincount(torch.as_tensor(shard_labels), minlength=num_labels).float()
    return {
        "client_id": federation_args.client_id,
        "partition": federation_args.partition,
        "alpha": federation_args.alpha,
        "shard_size": len(shard_labels),
        "shard_classes": shard.long().tolist(),
        "plan": vars(link.plan),
        "sync_bytes": link.ledger.sync_bytes,
        "sync_transfers": link.sync_transfers,
        "half_bytes": link.half_bytes,
        "per_class_accuracy": per_class.tolist(),
        "local_accuracy": float(per_class @ (shard / shard.sum())),
    }


def client_shard(dataset, data_args: DataArguments, federation_args: FederationArguments, seed: int):
    """`dataset` with its training rows cut to this federation client's shard, and the shard's true labels. Every
    client draws the same partition from the true labels; under label DP its own are randomized from a secret of its
    own, so they are read again as they are (same rows, same order) for the partition alone."""
    labels = dataset["train"]["label"]
    if data_args.label_dp_epsilon is not None:
        labels = load_data(replace(data_args, label_dp_epsilon=None), seed)["train"]["label"]
    shards = partition_indices(
        list(labels), federation_args.num_clients, federation_args.partition, federation_args.alpha, seed
    )
    shard = shards[federation_args.client_id]
    dataset["train"] = dataset["train"].select(shard)
    return dataset, [labels[index] for index in shard]


def run_client(
    model_args: ModelArguments,
    split_args: SplitArguments,
    data_args: DataArguments,
    training_args: ADCTrainingArguments,
    remote_args: RemoteArguments,
    federation_args: FederationArguments | None = None,
) -> dict:
    """`run_split_training` as the client of the server at `remote_args.server` (the server half lives there):
    trains the client half through the wire, resuming from `training_args.resume_from_checkpoint`, writes and pushes
    the client's side only, and `results` gain the transport's byte counts (tensor payload and header framing, both
    ways). With `federation_args.client_id` too, this process is one client of a federation: it trains on its shard
    of the training rows, keeps its half in step with the others' (sync bytes charged), and `results["federation"]`
    gives its plan, shard and the accuracy on test rows weighted like its shard's classes (`local_accuracy`)."""
    federated = _federated(federation_args)
    if federated and training_args.push_to_hub:
        raise ValueError("--push_to_hub on a federation's client: the server holds the final halves and pushes both "
                         "(give --push_to_hub --hub_model_id to serve.py).")  # fmt: skip
    hub_model_id = pushed_model_id(training_args)
    dataset, split, image_processor = prepare_run(model_args, split_args, data_args, training_args)
    shard_labels = None
    if federated:
        dataset, shard_labels = client_shard(dataset, data_args, federation_args, training_args.seed)
    split = remote_split(split, training_args, remote_args, federation_args)
    dataset = with_transforms(dataset, image_processor, data_args.augment)
    trainer, results = train_split(
        split, training_args, dataset["train"], dataset["test"], training_args.resume_from_checkpoint,
        split_args.nopeek_weight,
    )  # fmt: skip
    finish_remote(split, trainer, results, remote_args, federation_args, shard_labels, dataset)
    report_run(split, image_processor, trainer, results, model_args, split_args, data_args, training_args)
    if hub_model_id and trainer.is_world_process_zero():
        results["hub_urls"] = {"client": str(split.client.push_to_hub(f"{hub_model_id}-client"))}
    return results


def run_server(
    model_args: ModelArguments,
    split_args: SplitArguments,
    training_args: ADCTrainingArguments,
    remote_args: RemoteArguments,
    federation_args: FederationArguments | None = None,
) -> dict:
    """Serves the server half at `remote_args.listen` until a client has trained to the end (or is lost), then
    writes `server/` (and the bridge's server-side weights) and `server_results.json` into `output_dir`, and with
    `push_to_hub` pushes the server half to `<hub_model_id>-server`.

    Started as N ranks (`accelerate launch --num_processes N`, or torchrun), it serves one client of N processes:
    rank r listens at the port + r, the ranks average the server half's gradients every step, and rank 0 writes the
    files (`hf_adc.distributed.ranks`)."""
    if not remote_args.listen:
        raise ValueError("serve.py needs --listen HOST:PORT (e.g. 0.0.0.0:29500 to accept other machines).")
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id: the server half goes to <id>-server.")
    split_args.validate()
    if split_args.nopeek_weight is not None:
        raise ValueError(
            f"--nopeek_weight {split_args.nopeek_weight} on the server: NoPeek is the client's defence (its penalty "
            "reaches only the client half); give it to train.py."
        )
    _check_share_head(split_args.label_privacy, federation_args)
    if training_args.world_size > 1 and federation_args is not None and federation_args.num_clients is not None:
        raise ValueError(
            f"--num_clients {federation_args.num_clients} with {training_args.world_size} server processes: a "
            "federation is served by one process (several ranks serve one client of as many)."
        )
    ranks = ServerRanks.of(training_args)
    listen = rank_address(remote_args.listen, ranks.rank)

    def build(labels):
        return build_split(model_args, split_args, labels, training_args.seed)[0].to(training_args.device)

    if federation_args is not None and federation_args.num_clients is not None:
        server = FederatedServer(
            build, training_args, training_args.output_dir, federation_args.num_clients, federation_args.schedule,
            federation_args.sync_every, federation_args.round_timeout, federation_args.min_clients,
            join_token=remote_args.token(), resume_from=training_args.resume_from_checkpoint,
            aggregation=federation_args.aggregation, share_head=federation_args.share_head,
            clip_updates=federation_args.clip_updates,
        )  # fmt: skip
    else:
        server = SplitServer(
            build, training_args, training_args.output_dir, join_token=remote_args.token(),
            resume_from=training_args.resume_from_checkpoint, ranks=ranks,
        )  # fmt: skip
    if remote_args.insecure and remote_args.token() is None:
        logger.warning("Plaintext and no join token ($%s): any client that reaches this address can join.",
                       JOIN_TOKEN_VARIABLE)  # fmt: skip
    batch = max(training_args.per_device_train_batch_size, training_args.per_device_eval_batch_size)
    sessions = 1 if federation_args is None or federation_args.num_clients is None else federation_args.num_clients
    listener = Listener(
        listen, remote_args.timeout_delta(), kit=remote_args.kit(), insecure=remote_args.insecure,
        revocations=remote_args.revocations(), max_message_bytes=message_cap(model_config(model_args), batch),
        max_sessions=sessions, handshake_timeout=timedelta(seconds=remote_args.handshake_timeout),
        one_session_per_peer=isinstance(server, FederatedServer),  # a federation member is one session at a time
    )  # fmt: skip
    logger.warning("Serving the server half on %s (%s%s).", listen, "PLAINTEXT" if remote_args.insecure else
                   "mutual TLS", f", rank {ranks.rank} of {ranks.size}" if ranks.size > 1 else "")  # fmt: skip
    try:
        results = server.serve(listener, accept_seconds=remote_args.accept_timeout)
    finally:
        listener.stop()
    if not ranks.main:  # rank 0 writes the results (every rank's traffic in them) and pushes
        return results
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        text = json.dumps(results, indent=2)
        write_atomically(output_dir / "server_results.json", lambda path: path.write_text(text))
    except CheckpointError as error:  # a full disk: the results still reach the log and the caller
        logger.error("%s", error)
    if results["status"] in ("finished", "degraded") and training_args.push_to_hub:
        if isinstance(server, FederatedServer):  # the server holds every part (the client's averaged)
            parts = [name for name, part in server.split.parts().items() if part is not None]
            results["hub_urls"] = push_parts(
                server.split, {name: f"{training_args.hub_model_id}-{name}" for name in parts},
                private=training_args.hub_private_repo, token=training_args.hub_token,
            )  # fmt: skip
        else:
            results["hub_url"] = str(server.split.server.push_to_hub(f"{training_args.hub_model_id}-server"))
    return results


def _serve(*args) -> None:
    """A server process's entry point (spawned: it imports this module afresh)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s server %(name)s: %(message)s")
    run_server(*args)


def _serve_rank(rank: int, size: int, group_port: int, *args) -> None:
    """Server rank `rank` of `size`'s entry point (spawned): its own process group on 127.0.0.1:`group_port`, as
    `accelerate launch` would start it; accelerate forms the group as the arguments take their device."""
    for name in [name for name in os.environ if name.startswith("TORCHELASTIC_")]:
        del os.environ[name]  # the client's launcher's: its agent's store is not this group's
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(group_port))  # fmt: skip
    model_args, split_args, training_args, remote_args, federation_args = args
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s server rank {rank} %(name)s: %(message)s")
    # Fresh arguments: the client's carry its own process group; the server's collectives wait `--timeout` at most.
    training_args = replace(training_args, ddp_timeout=math.ceil(remote_args.timeout))
    status = "failed"
    try:
        status = run_server(model_args, split_args, training_args, remote_args, federation_args)["status"]
    finally:
        release_process_group(status == "finished")


def _client(client_id: int, *args) -> None:
    """A federation client process's entry point."""
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s client {client_id} %(name)s: %(message)s")
    results = run_client(*args)
    print(f"client {client_id}: {summary_text(results)}")


def _free_ports(count: int, attempts: int = 50) -> int:
    """The first of `count` consecutive free TCP ports on 127.0.0.1 (as free as a probe can tell)."""
    for _ in range(attempts):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65536:
            continue
        try:
            for port in range(base + 1, base + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise OSError(f"found no {count} consecutive free ports on 127.0.0.1 in {attempts} attempts.")


def start_local_server(
    model_args: ModelArguments,
    split_args: SplitArguments,
    training_args: ADCTrainingArguments,
    remote_args: RemoteArguments,
    federation_args: FederationArguments | None = None,
    ranks: int = 1,
) -> tuple[RemoteArguments, list[multiprocessing.Process]]:
    """Starts the server half on 127.0.0.1 (free ports, a fresh join token, and unless `--insecure` a CA with a kit
    for the server and one per client, made on the fly in a private folder): one process, or for a client of
    `ranks` processes a server of as many ranks, with their own process group. Returns the client's remote
    arguments pointing at it (client 0's kit, which every rank of one client presents), and the processes."""
    if remote_args.credentials:
        raise ValueError(
            f"--credentials {remote_args.credentials} with --distributed: the one-machine command makes its own "
            "kits; give --credentials to serve.py and each client when they run apart."
        )
    port = _free_ports(ranks)
    token = remote_args.token() or secrets.token_hex(16)
    address = f"127.0.0.1:{port}"
    credentials = None
    if not remote_args.insecure:
        num_clients = federation_args.num_clients if federation_args and federation_args.num_clients else 1
        kits = ephemeral_kits(Path(tempfile.mkdtemp(prefix="hf_adc_kits_")) / "kits", num_clients)
        credentials = {name: str(path) for name, path in kits.items()}
    server_args = replace(
        remote_args, distributed=False, listen=address, join_token=token,
        credentials=credentials and credentials["server"],
    )  # fmt: skip
    context = multiprocessing.get_context("spawn")
    args = (model_args, split_args, training_args, server_args, federation_args)
    if ranks == 1:
        processes = [context.Process(target=_serve, args=args, name="hf_adc-server")]
    else:
        group_port = _free_ports(1)
        processes = [
            context.Process(target=_serve_rank, args=(rank, ranks, group_port, *args), name=f"hf_adc-server-{rank}")
            for rank in range(ranks)
        ]  # fmt: skip
    for process in processes:
        process.start()
    client_args = replace(
        remote_args, distributed=False, server=address, join_token=token,
        credentials=credentials and credentials["client-0"],
    )  # fmt: skip
    client_args.kits = credentials  # every client's kit, for `run_federation_here`
    return client_args, processes


def run_with_local_server(
    model_args: ModelArguments,
    split_args: SplitArguments,
    data_args: DataArguments,
    training_args: ADCTrainingArguments,
    remote_args: RemoteArguments,
    federation_args: FederationArguments | None = None,
) -> dict:
    """`run_client` of a server started here (`--distributed`); returns the client's results once the server has
    stopped (or been stopped, `timeout` seconds after the client). A client of N processes starts one server, of N
    ranks, from its rank 0."""
    rank, ranks = training_args.process_index, training_args.world_size
    remote_args, servers = from_rank_zero(lambda: start_local_server(
        model_args, split_args, training_args, remote_args, ranks=ranks
    ), rank, ranks)  # fmt: skip
    try:
        return run_client(model_args, split_args, data_args, training_args, remote_args, federation_args)
    finally:
        for process in servers or []:
            process.join(timeout=remote_args.timeout)
            if process.is_alive():
                process.terminate()


def run_federation_here(
    model_args: ModelArguments,
    split_args: SplitArguments,
    data_args: DataArguments,
    training_args: ADCTrainingArguments,
    remote_args: RemoteArguments,
    federation_args: FederationArguments,
) -> dict:
    """The server and `num_clients` clients as processes on this machine; returns the server's results (per-client
    and total bytes, accuracies) and prints them as a table. `--resume_from_checkpoint OUTPUT_DIR/checkpoint-N`
    (the server's) resumes the whole federation: each client from its own `OUTPUT_DIR/client-i/checkpoint-N`."""
    resume = training_args.resume_from_checkpoint
    if resume and Path(resume).resolve().parent != Path(training_args.output_dir).resolve():
        raise ValueError(
            f"--resume_from_checkpoint {resume}: give the server's checkpoint-N in --output_dir "
            f"{training_args.output_dir}; each client resumes from its client-i/checkpoint-N there."
        )
    remote_args, (server,) = start_local_server(model_args, split_args, training_args, remote_args, federation_args)
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
        kits = remote_args.kits
        client_remote = replace(remote_args, credentials=kits and kits[f"client-{client_id}"])
        args = (model_args, split_args, data_args, client_training, client_remote, client_federation)
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
