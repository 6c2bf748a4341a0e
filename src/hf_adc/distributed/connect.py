"""The connection between client and server, and how the two ends join: a TCPStore the server hosts, and one
two-rank gloo group per client.

The server opens `torch.distributed.TCPStore` at its address (`is_master`, not waiting for any fixed number of
workers). A client connects to the store, takes the next session number from a counter in it, and both ends
build `ProcessGroupGloo(PrefixStore(f"session{n}", store), rank, 2, timeout)`: server rank 0, client rank 1.
There is no fixed world and no `init_process_group`, so clients can come and go while the server keeps running;
every blocking call ends at the group's timeout.
"""

import math
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .wire import (
    DEFAULT_MAX_TENSOR_BYTES,
    HEADER_BYTES,
    HEADER_LENGTH,
    MAX_TEXT_BYTES,
    Frame,
    Kind,
    PeerLost,
    Refused,
    Traffic,
    WireError,
    decode_header,
    encode_header,
    tensor_text,
    text_tensor,
)

SESSIONS_KEY = "sessions"


class Connection:
    """Frames to and from one peer over a two-rank point-to-point group (this end `rank`, the peer the other).

    `address` names the peer in errors. Any failure of the group (the peer died, closed, or did not answer within
    the group's timeout) becomes `PeerLost`; a header out of limits becomes `WireError`; a REFUSE from the peer
    becomes `Refused`.
    """

    def __init__(self, group, rank: int, address: str, timeout: timedelta, max_tensor_bytes=DEFAULT_MAX_TENSOR_BYTES):
        self.group = group
        self.peer = 1 - rank
        self.address = address
        self.timeout = timeout
        self.max_tensor_bytes = max_tensor_bytes
        self.traffic = Traffic()

    def _wait(self, start, what: str, timeout: timedelta | None = None) -> None:
        """Runs `start()` (a send or a receive of the group) to completion within `timeout` (default: the
        channel's), or raises `PeerLost`."""
        timeout = timeout or self.timeout
        try:
            start().wait(timeout)
        except RuntimeError as error:
            raise PeerLost(
                f"lost the peer at {self.address} while {what} (timeout {timeout.total_seconds():.0f} s): {error}"
            ) from error

    def send(
        self, kind: Kind, tensors: dict[str, torch.Tensor] | None = None, step: int = 0, value: float = 0.0
    ) -> None:
        tensors = {name: tensor.detach().cpu() for name, tensor in (tensors or {}).items()}
        header = encode_header(kind, step, tensors, value)
        self._wait(lambda: self.group.send([header], self.peer, 0), f"sending {kind.name}")
        self.traffic.framing_sent += HEADER_BYTES
        pieces = [tensor.reshape(-1).contiguous().view(torch.uint8) for tensor in tensors.values() if tensor.numel()]
        if pieces:
            body = torch.cat(pieces)
            self._wait(lambda: self.group.send([body], self.peer, 0), f"sending {kind.name}'s tensors")
            self.traffic.payload_sent += body.numel()

    def recv(self, *expected: Kind, timeout: timedelta | None = None) -> Frame:
        """The next message; one of `expected` kinds (a REFUSE raises `Refused`, anything else `WireError`).
        `timeout` bounds the wait for it (default: the channel's)."""
        header = torch.empty(HEADER_LENGTH, dtype=torch.int64)
        self._wait(lambda: self.group.recv([header], self.peer, 0), "waiting for a message", timeout)
        self.traffic.framing_received += HEADER_BYTES
        kind, step, value, specs = decode_header(header, self.max_tensor_bytes)
        sizes = [math.prod(shape) * dtype.itemsize for _, dtype, shape in specs]
        body = torch.empty(sum(sizes), dtype=torch.uint8)
        if body.numel():
            self._wait(lambda: self.group.recv([body], self.peer, 0), f"receiving {kind.name}'s tensors")
            self.traffic.payload_received += body.numel()
        tensors, offset = {}, 0
        for (name, dtype, shape), size in zip(specs, sizes, strict=True):
            tensors[name] = body[offset : offset + size].clone().view(dtype).reshape(shape)
            offset += size
        if kind == Kind.REFUSE and Kind.REFUSE not in expected:
            reason = tensor_text(tensors["reason"]) if "reason" in tensors else "no reason given"
            raise Refused(f"{self.address} refused the session: {reason}")
        if expected and kind not in expected:
            raise WireError(f"expected a {' or '.join(k.name for k in expected)} message; got {kind.name}.")
        return Frame(kind, step, tensors, value)

    def refuse(self, reason: str) -> None:
        """Tells the peer why its session ends, if it still listens."""
        try:
            self.send(Kind.REFUSE, {"reason": text_tensor(reason[:MAX_TEXT_BYTES])})
        except PeerLost:
            pass


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
    """The server's end: hosts the store and hands out a `Connection` per client session, in joining order."""

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

    def accept(self, poll_seconds: float = 0.05, deadline: float | None = None) -> tuple[int, Connection] | None:
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
        return session, Connection(group, 0, f"client of session {session}", self.timeout)


def connect(address: str, timeout: timedelta) -> Connection:
    """The client's end: joins the server at `address`; `PeerLost` names the address if it cannot."""
    host, port = parse_address(address)
    try:
        store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        session = store.add(SESSIONS_KEY, 1)
        group = _group(dist.PrefixStore(f"session{session}", store), 1, timeout, _local_address_towards(host, port))
    except RuntimeError as error:
        seconds = timeout.total_seconds()
        raise PeerLost(f"cannot reach the server at {address} (timeout {seconds:.0f} s): {error}") from error
    return Connection(group, 1, f"the server at {address}", timeout)
