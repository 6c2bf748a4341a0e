"""The arguments of client and server in separate processes, and of a federation of clients: shared by
`recipes/train.py` (a client) and `recipes/serve.py` (the server)."""

import os
from dataclasses import dataclass, field
from datetime import timedelta

from ..data import PARTITIONS
from ..training import ADCTrainingArguments
from .connect import parse_address
from .federation import FEDERATION_ARGS, SCHEDULES
from .federation.guard import DEFAULT_CLIP_FACTOR
from .federation.halves import AGGREGATIONS
from .settings import plain

JOIN_TOKEN_VARIABLE = "HF_ADC_JOIN_TOKEN"


@dataclass
class RemoteArguments:
    """Client and server in separate processes (see `hf_adc.distributed`)."""

    server: str | None = field(
        default=None, metadata={"help": "HOST:PORT of a server started with recipes/serve.py: train as its client."}
    )
    listen: str | None = field(default=None, metadata={"help": "serve.py: HOST:PORT to listen on for clients."})
    distributed: bool = field(
        default=False,
        metadata={"help": "Start a server process on this machine (127.0.0.1) and train as its client: one command."},
    )
    credentials: str | None = field(
        default=None,
        metadata={
            "help": "This party's kit from `python -m hf_adc.distributed.provision` (ca.pem, cert.pem, key.pem; the "
            "key readable by its owner only): KITS/server for serve.py, KITS/client-N for a client. Both ends "
            "check the other's certificate (mutual TLS); a client's id comes from its certificate."
        },
    )
    insecure: bool = field(
        default=False,
        metadata={"help": "Plaintext, no certificates (a trusted network only: anyone on the path reads everything)."},
    )
    revoked: str | None = field(
        default=None,
        metadata={"help": "serve.py: refused client certificates, a file: a serial (decimal, 0x hex) or name a line."},
    )
    handshake_timeout: float = field(
        default=10.0,
        metadata={"help": "serve.py: seconds a joining client has to finish its handshake (a silent one is dropped)."},
    )
    join_token: str | None = field(
        default=None,
        metadata={
            "help": f"An extra shared secret both sides must give (read from ${JOIN_TOKEN_VARIABLE}; a value on the "
            "command line shows in `ps` to every local user). Certificates are what authenticate."
        },
    )
    timeout: float = field(
        default=300.0, metadata={"help": "Seconds to wait on the peer (a send, a reply, joining) before giving up."}
    )
    accept_timeout: float | None = field(
        default=None,
        metadata={"help": "serve.py: seconds to wait for the next client before stopping (default: no limit)."},
    )

    def __post_init__(self):
        if not self.timeout > 0:
            raise ValueError(f"timeout={self.timeout} is out of range: it must be > 0 seconds.")
        if self.accept_timeout is not None and not self.accept_timeout > 0:
            raise ValueError(f"accept_timeout={self.accept_timeout} is out of range: it must be > 0 seconds.")
        if self.server and self.distributed:
            raise ValueError(f"--server {self.server} joins a running server; --distributed starts one: pick one.")
        if not self.handshake_timeout > 0:
            raise ValueError(f"handshake_timeout={self.handshake_timeout} is out of range: it must be > 0 seconds.")
        if self.credentials and self.insecure:
            raise ValueError(f"--credentials {self.credentials} and --insecure: pick one (TLS, or plaintext).")
        for name in ("server", "listen"):
            if getattr(self, name):
                parse_address(getattr(self, name))

    def kit(self):
        """This party's loaded kit (None with --insecure); refuses to go on without one or the other."""
        if self.insecure:
            return None
        if not self.credentials:
            raise ValueError(
                "no --credentials: give this party's kit (make kits with `python -m hf_adc.distributed.provision "
                "--output_dir KITS --server_name HOST --num_clients N`), or --insecure for plaintext on a trusted "
                "network."
            )
        from .credentials import load_kit

        return load_kit(self.credentials)

    def revocations(self):
        """The refused certificates (None: no --revoked file)."""
        if not self.revoked:
            return None
        from .credentials import load_revocations

        return load_revocations(self.revoked)

    def token(self) -> str | None:
        return self.join_token if self.join_token is not None else os.environ.get(JOIN_TOKEN_VARIABLE)

    def timeout_delta(self) -> timedelta:
        return timedelta(seconds=self.timeout)


SHARE_HEAD_HELP = (
    "Every side, with --label_privacy: average (SplitFed) or hand on (sequential) the client-side heads with the rest "
    "of the client half. Off (the default) each client keeps its own head and the server never holds one: a server "
    "that knows the head can solve the head gradients it receives for the labels."
)


@dataclass
class FederationArguments:
    """Several clients against one server (see `hf_adc.distributed.federation`)."""

    num_clients: int | None = field(
        default=None,
        metadata={"help": "Clients in the federation (serve.py, and every client). Absent: one client, no sync."},
    )
    client_id: int | None = field(default=None, metadata={"help": "Client: this client's id, 0 .. num_clients - 1."})
    schedule: str = field(
        default="splitfed",
        metadata={"help": f"serve.py: {' or '.join(SCHEDULES)} (clients in turn, or in parallel with FedAvg)."},
    )
    sync_every: int = field(
        default=10, metadata={"help": "serve.py: optimizer steps per turn (sequential) or between averagings."}
    )
    partition: str = field(
        default="iid", metadata={"help": f"Client: how the training rows are dealt ({', '.join(PARTITIONS)})."}
    )
    alpha: float = field(default=0.5, metadata={"help": "Client: Dirichlet concentration (--partition dirichlet)."})
    round_timeout: float = field(
        default=120.0, metadata={"help": "serve.py: seconds a round or a turn waits for a client before dropping it."}
    )
    min_clients: int = field(default=1, metadata={"help": "serve.py: fewest live clients the federation goes on with."})
    aggregation: str = field(
        default="fedavg",
        metadata={
            "help": f"serve.py, SplitFed: how a round's halves are averaged: {', '.join(AGGREGATIONS)} (fedavg weighs "
            "by shard size; median and trimmed_mean are coordinate-wise and unweighted, and need --min_clients 3 or "
            "more)."
        },
    )
    clip_updates: float = field(
        default=DEFAULT_CLIP_FACTOR,
        metadata={
            "help": "serve.py, SplitFed: each member's update (its half's distance from the current half) is clipped "
            "to this multiple of the round's median update before averaging, so that no member owns the average "
            "(0: no bound, only between members that trust each other)."
        },
    )

    share_head: bool = field(
        default=False,
        metadata={"help": SHARE_HEAD_HELP},
    )

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r} is unknown: choose one of {', '.join(AGGREGATIONS)}.")
        if self.num_clients is not None and self.num_clients < 1:
            raise ValueError(f"num_clients={self.num_clients} is out of range: it must be >= 1.")
        if self.client_id is not None:
            if self.num_clients is None:
                raise ValueError(f"client_id={self.client_id} needs --num_clients (the same on every client).")
            if not 0 <= self.client_id < self.num_clients:
                raise ValueError(f"client_id={self.client_id} is out of range: 0 .. {self.num_clients - 1}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is unknown: choose one of {', '.join(SCHEDULES)}.")
        if self.partition not in PARTITIONS:
            raise ValueError(f"partition={self.partition!r} is unknown: choose one of {', '.join(PARTITIONS)}.")
        if not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha} is out of range: it must be > 0.")
        if self.sync_every < 1:
            raise ValueError(f"sync_every={self.sync_every} is out of range: it must be >= 1.")
        if not self.round_timeout > 0:
            raise ValueError(f"round_timeout={self.round_timeout} is out of range: it must be > 0 seconds.")
        if self.num_clients is not None and not 1 <= self.min_clients <= self.num_clients:
            raise ValueError(f"min_clients={self.min_clients} is out of range: 1 .. {self.num_clients}.")
        if not self.clip_updates >= 0:
            raise ValueError(f"clip_updates={self.clip_updates} is out of range: it must be >= 0 (0: no bound).")

    def shared_settings(self, training_args: ADCTrainingArguments) -> dict:
        """What every client of one federation must give alike (the server checks)."""
        run = {name: plain(getattr(training_args, name)) for name in FEDERATION_ARGS}  # budget and checkpoints
        return {
            "num_clients": self.num_clients, "partition": self.partition, "alpha": self.alpha,
            "share_head": self.share_head, **run,
        }  # fmt: skip


def check_client_arguments(remote_args: RemoteArguments, federation_args: FederationArguments) -> None:
    """Refuses, before any work, the server's flags and an incomplete federation client on `recipes/train.py`."""
    if federation_args.num_clients is not None and not remote_args.distributed and federation_args.client_id is None:
        raise ValueError(
            f"--num_clients {federation_args.num_clients}: give this client's --client_id (and --server), or "
            "--distributed to start the server and every client here."
        )
    if federation_args.client_id is not None and not (remote_args.server or remote_args.distributed):
        raise ValueError(f"--client_id {federation_args.client_id} joins a federation: give --server HOST:PORT too.")
    if remote_args.listen:
        raise ValueError(f"--listen {remote_args.listen} is for recipes/serve.py; the client takes --server.")


def check_server_arguments(remote_args: RemoteArguments, federation_args: FederationArguments) -> None:
    """Refuses, before any work, a client's flags on `recipes/serve.py`."""
    if federation_args.client_id is not None:
        raise ValueError(f"--client_id {federation_args.client_id} is for a client (recipes/train.py --server).")
    if remote_args.server or remote_args.distributed:
        raise ValueError("serve.py serves clients: give --listen HOST:PORT, not --server or --distributed.")
