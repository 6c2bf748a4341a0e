"""Joining client and server: a TCPStore the server hosts, and one two-rank gloo group per client.

The server opens `torch.distributed.TCPStore` at its address (`is_master`, not waiting for any fixed number of
workers). A client connects to the store, takes the next session number from a counter in it, and both ends
build `ProcessGroupGloo(PrefixStore(f"session{n}", store), rank, 2, timeout)`: server rank 0, client rank 1.
There is no fixed world and no `init_process_group`, so clients can come and go while the server keeps running;
every blocking call ends at the group's timeout.
"""

import socket
import time
from datetime import timedelta

import torch.distributed as dist

from .wire import Channel, PeerLost

SESSIONS_KEY = "sessions"


def _group(store, rank: int, timeout: timedelta, local_host: str | None) -> dist.ProcessGroupGloo:
    """A two-rank gloo group whose connections use the interface of `local_host` (gloo would otherwise pick the
    address its host name resolves to, which a private network or namespace may not reach)."""
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    device = dist.ProcessGroupGloo.create_device(hostname=local_host) if local_host else None
    options._devices = [device or dist.ProcessGroupGloo.create_default_device()]
    return dist.ProcessGroupGloo(store, rank, 2, options)


def _local_address_towards(host: str, port: int) -> str:
    """The local address this machine uses to reach `host` (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return probe.getsockname()[0]


def parse_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 hosts in brackets) as (host, port)."""
    host, separator, port = address.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} is not HOST:PORT with a port in 1 .. 65535.")
    return host.strip("[]"), int(port)


class Listener:
    """The server's end: hosts the store and hands out a `Channel` per client session, in joining order."""

    def __init__(self, address: str, timeout: timedelta):
        host, port = parse_address(address)
        self.address = address
        self.timeout = timeout
        self.local_host = None if host in ("0.0.0.0", "::", "") else host
        try:
            self.store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timeout)
        except RuntimeError as error:
            raise OSError(f"cannot listen on {address}: {error}") from error
        self.accepted = 0

    def accept(self, poll_seconds: float = 0.05, deadline: float | None = None) -> tuple[int, Channel] | None:
        """Waits for the next client (until `deadline`, a `time.monotonic()` value, if given) and returns its
        session number and channel; None at the deadline. A client that takes a number but never builds its group
        raises `PeerLost` after the timeout."""
        while self.store.add(SESSIONS_KEY, 0) <= self.accepted:
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(poll_seconds)
        self.accepted += 1
        session = self.accepted
        try:
            group = _group(dist.PrefixStore(f"session{session}", self.store), 0, self.timeout, self.local_host)
        except RuntimeError as error:
            raise PeerLost(f"session {session} never joined its group: {error}") from error
        return session, Channel(group, 0, f"client of session {session}", self.timeout)


def connect(address: str, timeout: timedelta) -> Channel:
    """The client's end: joins the server at `address`; `PeerLost` names the address if it cannot."""
    host, port = parse_address(address)
    try:
        store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        session = store.add(SESSIONS_KEY, 1)
        group = _group(dist.PrefixStore(f"session{session}", store), 1, timeout, _local_address_towards(host, port))
    except RuntimeError as error:
        seconds = timeout.total_seconds()
        raise PeerLost(f"cannot reach the server at {address} (timeout {seconds:.0f} s): {error}") from error
    return Channel(group, 1, f"the server at {address}", timeout)
