"""The connection between client and server: one gRPC bidirectional stream per session, over mutual TLS.

The client opens the stream (outbound only: it works behind NAT and firewalls); each message of the stream is one
frame of the wire format (`wire.py`: the integer header, then the tensors' bytes). Both ends verify the other's
certificate against the CA of their kit (`credentials.py`); the client also checks that the server's certificate
names the address it dialled, and the server reads the client's name and serial from its certificate (`peer_name`,
`peer_serial`), refusing revoked ones before the session starts. Plaintext is only there when asked for
(`insecure=True`, with a warning).

A frame crosses as chunks of at most `CHUNK_BYTES` (one gRPC message each, a flag byte first: more to come, or the
last), so that gRPC allocates no message over a chunk, whatever the peer announces. The reader joins a frame's chunks
only up to the session's cap (`max_frame_bytes`: the handshake's small cap until the session is admitted, then the
agreed split's largest), so a frame over it is refused before its bytes are held, and it reads no further chunk while
a whole frame waits to be handled: a session holds at most one frame beyond the one being handled. Before admission
a stream therefore costs at most one chunk in gRPC and the handshake cap here; after it, the split's cap twice.

The header is checked again against the frame's length. Every send and receive ends at a timeout (`PeerLost`); a
REFUSE from the peer becomes `Refused`. The server's `Listener` hands out a `Connection` per session; at most
`max_sessions` admitted sessions are open at once, and each certificate may hold at most `pending_per_peer` streams
that have not been admitted (a federation's listener, `one_session_per_peer`, refuses a stream whose certificate
already has a session joining or open). More are refused at once, as busy: the client's gRPC retry tries again for a
few seconds. A TLS handshake must finish within the handshake timeout.
"""

import json
import logging
import queue
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import grpc
import torch

from ..handshake_log import RateLimited
from .handshake import explain, is_transient
from .wire import (
    DEFAULT_MAX_TENSOR_BYTES,
    HEADER_BYTES,
    MAX_TEXT_BYTES,
    PROTOCOL_VERSION,
    Frame,
    Kind,
    PeerLost,
    Refused,
    Traffic,
    WireError,
    foreign_version,
    frame_bytes,
    parse_frame,
    tensor_text,
    text_tensor,
)

logger = logging.getLogger(__name__)

METHOD = "/hfadc.Split/Session"
# A server whose slots are full answers RESOURCE_EXHAUSTED before anything else ("try again"): gRPC's own retry (the
# stream is not committed yet; the HELLO is replayed from its buffer) tries again 4 times, after about 1, 2, 4 and
# 4 s (gRPC's jitter is 20%): 9 to 13 s in all.
JOIN_RETRY = {
    "methodConfig": [{
        "name": [{"service": METHOD.split("/")[1]}],
        "retryPolicy": {
            "maxAttempts": 5, "initialBackoff": "1s", "maxBackoff": "4s", "backoffMultiplier": 2,
            "retryableStatusCodes": ["RESOURCE_EXHAUSTED"],
        },
    }],
}  # fmt: skip
HANDSHAKE_FRAME_BYTES = HEADER_BYTES + MAX_TEXT_BYTES  # a HELLO's settings, a REFUSE's reason
CHUNK_BYTES = 2**18  # the most a gRPC message carries of a frame: 256 KiB moved fastest (see `_chunks`)
MORE, LAST = 0, 1  # a chunk's flag byte
QUEUE_FRAMES = 4  # frames waiting to go out before a send waits (the peer's flow control does the rest)
INCOMING_ITEMS = 2  # a frame come in and not yet taken, and the end of the stream behind it
_CLOSED = object()


def parse_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 hosts in brackets) as (host, port)."""
    host, separator, port = address.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} is not HOST:PORT with a port in 1 .. 65535.")
    return host.strip("[]"), int(port)


def _channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", CHUNK_BYTES + 1),  # a chunk and its flag: gRPC refuses more unread
        ("grpc.max_send_message_length", CHUNK_BYTES + 1),
        ("grpc.keepalive_time_ms", 20_000),  # a dead peer is noticed even while nothing is sent
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class Connection:
    """Frames to and from one peer over a stream: `send` puts a frame out, `recv` takes the next one in.

    `address` names the peer in errors; `timeout` bounds every wait. `max_frame_bytes` caps what `recv` accepts
    (the handshake's small cap until `open_up(cap)` after it); `max_tensor_bytes` caps each tensor.
    """

    def __init__(
        self,
        address: str,
        timeout: timedelta,
        incoming: queue.Queue,
        outgoing: queue.Queue,
        peer_name: str | None = None,
        peer_serial: int | None = None,
        max_frame_bytes: int = HANDSHAKE_FRAME_BYTES,
        max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
        handshake_timeout: timedelta | None = None,
        open_frame_bytes: int | None = None,
    ):
        self.address = address
        self.timeout = timeout
        self.incoming = incoming
        self.outgoing = outgoing
        self.peer_name = peer_name
        self.peer_serial = peer_serial
        self.max_frame_bytes = max_frame_bytes
        self.max_tensor_bytes = max_tensor_bytes
        self.handshake_timeout = handshake_timeout  # the wait for each frame until `open_up` (None: `timeout`)
        self.open_frame_bytes = open_frame_bytes or max_frame_bytes
        self.traffic = Traffic()
        self.closed = False
        self.on_open = None  # the listener's: called once by `open_up`

    def open_up(self) -> None:
        """The handshake is done: frames up to `open_frame_bytes` (the agreed split's largest) are accepted now, and
        waits last the whole timeout."""
        self.max_frame_bytes = self.open_frame_bytes
        self.handshake_timeout = None
        if self.on_open is not None:
            self.on_open()
            self.on_open = None

    def send_bytes(self, data: bytes, what: str = "a frame") -> None:
        """Puts `data` on the stream as one message, waiting at most the timeout for room."""
        if self.closed:
            raise PeerLost(f"the session with {self.address} is closed; cannot send {what}.")
        try:
            self.outgoing.put(data, timeout=self.timeout.total_seconds())
        except queue.Full:
            raise PeerLost(
                f"timed out after {self.timeout.total_seconds():.0f} s: the peer at {self.address} took nothing "
                f"(sending {what})."
            ) from None

    def send(
        self, kind: Kind, tensors: dict[str, torch.Tensor] | None = None, step: int = 0, value: float = 0.0
    ) -> None:
        data, body = frame_bytes(kind, tensors or {}, step, value)
        self.send_bytes(data, kind.name)
        self.traffic.framing_sent += len(data) - body
        self.traffic.payload_sent += body

    def recv_bytes(self, timeout: timedelta | None = None) -> bytes:
        """The next message's bytes, within `timeout` (default: the connection's, or its handshake timeout until
        `open_up`)."""
        timeout = timeout or self.handshake_timeout or self.timeout
        try:
            item = self.incoming.get(timeout=timeout.total_seconds())
        except queue.Empty:
            raise PeerLost(
                f"timed out after {timeout.total_seconds():.0f} s: the peer at {self.address} sent nothing."
            ) from None
        self.incoming.task_done()  # being handled now: the reader may take the next frame in
        if item is _CLOSED:
            self.incoming.put(_CLOSED)  # every later receive sees the end too
            raise PeerLost(f"the peer at {self.address} closed the session.")
        if isinstance(item, Exception):
            self.incoming.put(item)
            raise item
        return item

    def recv(self, *expected: Kind, timeout: timedelta | None = None) -> Frame:
        """The next frame; one of `expected` kinds (a REFUSE raises `Refused`, anything else `WireError`).
        `timeout` bounds the wait for it (default: the connection's)."""
        data = self.recv_bytes(timeout)
        frame = parse_frame(data, self.max_frame_bytes, self.max_tensor_bytes)
        self.traffic.framing_received += HEADER_BYTES
        self.traffic.payload_received += len(data) - HEADER_BYTES
        kind, tensors = frame.kind, frame.tensors
        if kind == Kind.REFUSE and Kind.REFUSE not in expected:
            reason = tensor_text(tensors["reason"]) if "reason" in tensors else "no reason given"
            raise Refused(f"{self.address} refused the session: {reason}")
        if expected and kind not in expected:
            raise WireError(f"expected a {' or '.join(k.name for k in expected)} message; got {kind.name}.")
        return frame

    def refuse(self, reason: str) -> None:
        """Tells the peer why its session ends, if it still listens, and closes the session."""
        try:
            text = reason.encode()[: MAX_TEXT_BYTES - 4].decode(errors="ignore")
            self.send(Kind.REFUSE, {"reason": text_tensor(text)})
        except PeerLost:
            pass
        self.close()

    def interrupt(self, error: Exception) -> None:
        """Makes the `recv` waiting on this connection (or the next one) raise `error` at once: another thread's way
        to end the session (a federation member dropped while its session waits for it)."""
        try:
            self.incoming.put_nowait(error)
        except queue.Full:  # frames are waiting: the session is not blocked in `recv`, and reads them first
            pass

    def close(self) -> None:
        """Ends this end of the stream (frames already sent still go out)."""
        if not self.closed:
            self.closed = True
            try:
                self.outgoing.put(_CLOSED, timeout=self.timeout.total_seconds())
            except queue.Full:
                pass


def _chunks(frame: bytes):
    """`frame` as the gRPC messages that carry it: pieces of at most `CHUNK_BYTES`, each after its flag byte (the
    last one's `LAST`). Measured over mutual TLS on loopback, a 12 MiB frame moved at 414 MiB/s in 1 MiB chunks, 383
    in 256 KiB, 180 in 64 KiB and 162 as one message."""
    view = memoryview(frame)
    for start in range(0, max(len(view), 1), CHUNK_BYTES):
        piece = view[start : start + CHUNK_BYTES]
        yield bytes((LAST if start + CHUNK_BYTES >= len(view) else MORE,)) + piece


def _outgoing_frames(outgoing: queue.Queue, active=lambda: True):
    """A stream's messages: the chunks of each frame from `outgoing` until the connection closes (or `active()`
    turns False)."""
    while True:
        try:
            item = outgoing.get(timeout=1.0)
        except queue.Empty:
            if not active():
                return
            continue
        if item is _CLOSED:
            return
        yield from _chunks(item)


def _read_into(messages, incoming: queue.Queue, describe, closed=lambda: False, cap=lambda: None) -> None:
    """Joins the peer's chunks into frames of at most `cap()` bytes and moves each into `incoming`, one at a time:
    the next chunk is read only once the frame before has been taken (the stream's flow control then stops the
    peer); it gives up once `closed()`. A frame over the cap, or a message that is not a chunk, ends the reading
    with a `WireError` for the session (what came of the frame is dropped at once); at the end, `_CLOSED`, or the
    error `describe(error)` makes of a failed stream."""

    def wait_taken() -> bool:  # the frame before is being handled (or the session is over)
        with incoming.all_tasks_done:
            while incoming.unfinished_tasks:
                if closed():
                    return False
                incoming.all_tasks_done.wait(timeout=1.0)
        return True

    def put(item) -> bool:
        while True:
            try:
                incoming.put(item, timeout=1.0)
                return True
            except queue.Full:
                if closed():
                    return False

    frame = bytearray()
    try:
        for message in messages:
            if not frame and not wait_taken():
                return
            limit = cap()
            if not message or message[0] not in (MORE, LAST):
                version = foreign_version(message)
                put(WireError(
                    f"header field version={version} is not supported: this end speaks version {PROTOCOL_VERSION}."
                    if version is not None else f"a message of {len(message)} bytes is not a chunk of this "
                    "protocol's frames."
                ))  # fmt: skip
                return
            if limit is not None and len(frame) + len(message) - 1 > limit:
                frame = None  # nothing more of it is held
                put(WireError(f"a message of over {limit} bytes is over this session's cap of {limit}."))
                return
            frame += memoryview(message)[1:]
            if message[0] == LAST:
                if not put(frame):
                    return
                frame = bytearray()
    except grpc.RpcError as error:
        put(describe(error))
    except Exception as error:  # noqa: BLE001 - a stream torn down under us: the session ends, nothing else
        put(PeerLost(f"the stream failed: {error}"))
    put(_CLOSED)


def _details(error: grpc.RpcError) -> str:
    """What gRPC says of a failed stream (a server-side error carries no details)."""
    details = getattr(error, "details", None)
    return details() if callable(details) else (str(error) or type(error).__name__)


class Listener:
    """The server's end: a gRPC server on `address` that hands out a `Connection` per client stream.

    `kit` (a `credentials.Kit`) gives the server's certificate and the CA clients must be signed by; None serves
    plaintext (only with `insecure=True`). `revocations` (a `credentials.Revocations`) refuses listed certificates.

    Slots, counted per certificate so that no member can take another's: each certificate may have at most
    `pending_per_peer` streams that are not admitted yet (`Connection.open_up`); with `one_session_per_peer` (a
    federation, where a certificate is one member) a certificate that has a session joining or open gets no second
    one. At most `max_sessions` sessions are admitted at once. Over plaintext there are no certificates: only
    `max_pending` (default: `pending_per_peer` for each of `max_sessions`, and at least 8) bounds the joining
    streams of all peers together, as it does with certificates too.
    """

    def __init__(
        self,
        address: str,
        timeout: timedelta,
        kit=None,
        insecure: bool = False,
        revocations=None,
        max_message_bytes: int = 64 * 2**20,
        max_sessions: int = 8,
        max_pending: int | None = None,
        handshake_timeout: timedelta = timedelta(seconds=10),
        pending_per_peer: int = 2,
        one_session_per_peer: bool = False,
    ):
        parse_address(address)
        if kit is None and not insecure:
            raise ValueError("a server needs credentials (--credentials KITS/server), or --insecure for plaintext.")
        if pending_per_peer < 1:
            raise ValueError(f"pending_per_peer={pending_per_peer} is out of range: it must be >= 1.")
        self.address, self.timeout, self.revocations = address, timeout, revocations
        self.max_message_bytes = max_message_bytes
        self.max_pending = max_pending or max(8, pending_per_peer * max_sessions)
        self.pending_per_peer, self.one_session_per_peer = pending_per_peer, one_session_per_peer
        self.handshake_timeout = min(handshake_timeout, timeout)
        self.accepted: queue.Queue = queue.Queue()
        self.sessions = 0
        self.pending = 0
        self.admitted = 0  # sessions open past `open_up`
        self.pending_by_peer: Counter = Counter()  # a certificate's streams not admitted yet
        self.open_by_peer: Counter = Counter()  # and its streams joining or admitted
        self.max_sessions = max_sessions
        self.lock = threading.Lock()
        self.door_log = RateLimited()  # a peer turned away again and again is logged once every 10 s
        workers = max_sessions + self.max_pending
        options = [
            *_channel_options(),
            ("grpc.server_handshake_timeout_ms", int(self.handshake_timeout.total_seconds() * 1000)),  # TLS, HTTP/2
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),  # the clients' keepalive pings are welcome
            ("grpc.http2.max_ping_strikes", 0),
            ("grpc.so_reuseport", 0),  # a second server on a taken port fails, rather than sharing its clients
        ]
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hf_adc-stream"),
            options=options,
            maximum_concurrent_rpcs=workers,
        )
        handler = grpc.stream_stream_rpc_method_handler(self._stream)
        service, method = METHOD.strip("/").split("/")
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {method: handler})])
        if kit is None:
            logger.warning("Serving PLAINTEXT on %s (--insecure): anyone on the path reads and forges it.", address)
            port = self.server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials(
                [(kit.key_pem, kit.cert_pem)], root_certificates=kit.ca_pem, require_client_auth=True
            )
            port = self.server.add_secure_port(address, credentials)
        if not port:
            raise OSError(f"cannot listen on {address}.")
        self.server.start()

    def _busy(self, name: str | None) -> str | None:
        """Why a new stream of the certificate `name` (None: plaintext) cannot join now, or None if it can (the
        lock held)."""
        if name is not None and self.one_session_per_peer and self.open_by_peer[name]:
            return f"{name} has a session joining or open already; try again once it has ended."
        if name is not None and self.pending_by_peer[name] >= self.pending_per_peer:
            return f"{name} has {self.pending_per_peer} sessions joining already; try again once one is admitted."
        if self.pending >= self.max_pending:
            return "too many sessions are joining; try again."
        if self.admitted >= self.max_sessions:
            return f"the server is busy with its {self.max_sessions} session(s); try again once one has ended."
        return None

    def _stream(self, requests, context):
        """One client stream: checks its certificate, queues its connection for `accept`, then sends its frames."""
        name, serial = _peer_identity(context)
        if self.revocations is not None and self.revocations.refuses(name, serial):
            logger.warning("Refused a revoked certificate (%s, serial %s).", name, serial)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"the certificate of {name} (serial {serial}) is revoked.")
        with self.lock:
            busy = self._busy(name)
            if busy is None:  # the slots are taken at once, under the lock that counted them
                self.pending += 1
                self.sessions += 1
                self.pending_by_peer[name] += 1
                self.open_by_peer[name] += 1
                number = self.sessions
        if busy is not None:
            allowed, held = self.door_log.allow(name or context.peer())
            if allowed:
                more = f" ({held} more held back)" if held else ""
                logger.warning("Refused a stream of %s at the door: %s%s", name or context.peer(), busy, more)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, busy)
        opened = threading.Event()

        def on_open():  # admitted (`open_up`): the joining slot frees, an admitted one is taken
            with self.lock:
                if not opened.is_set():  # not after the stream has ended
                    opened.set()
                    self.pending, self.admitted = self.pending - 1, self.admitted + 1
                    self.pending_by_peer[name] -= 1

        connection = None
        try:  # from here on, whatever happens, the slot this stream holds frees once at its end
            incoming, outgoing = queue.Queue(maxsize=INCOMING_ITEMS), queue.Queue(maxsize=QUEUE_FRAMES)
            peer = f"client of session {number} ({name or context.peer()})"
            connection = Connection(
                peer, self.timeout, incoming, outgoing, name, serial, handshake_timeout=self.handshake_timeout,
                open_frame_bytes=self.max_message_bytes,
            )  # fmt: skip
            connection.on_open = on_open
            reader = threading.Thread(
                target=_read_into,
                args=(requests, incoming, lambda error: PeerLost(f"lost the {peer}: {_details(error)}"),
                      lambda: connection.closed, lambda: connection.max_frame_bytes),
                name=f"hf_adc-read-{number}", daemon=True,
            )  # fmt: skip
            reader.start()
            self.accepted.put((number, connection))
            yield from _outgoing_frames(outgoing, lambda: context.is_active() and not connection.closed)
        finally:
            if connection is not None:
                connection.closed = True
                try:  # never blocks this worker: with frames still queued, the session's reads end at its timeout
                    incoming.put_nowait(_CLOSED)
                except queue.Full:
                    pass
            with self.lock:  # whichever slot the session holds frees, once (a later `open_up` changes nothing)
                if opened.is_set():
                    self.admitted -= 1
                else:
                    opened.set()
                    self.pending -= 1
                    self.pending_by_peer[name] -= 1
                self.open_by_peer[name] -= 1

    def accept(self, deadline: float | None = None) -> tuple[int, Connection] | None:
        """The next client's session number and connection, waiting until `deadline` (a `time.monotonic()` value;
        None: for ever); None at the deadline."""
        while True:
            wait = 1.0 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                return None
            try:
                return self.accepted.get(timeout=min(wait, 1.0))
            except queue.Empty:
                continue

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait(grace + 1)


def _peer_identity(context) -> tuple[str | None, int | None]:
    """The client certificate's common name and serial (None, None over plaintext)."""
    auth = context.auth_context()
    names = auth.get("x509_common_name") or []
    pems = auth.get("x509_pem_cert") or []
    serial = None
    if pems:
        from cryptography import x509

        serial = x509.load_pem_x509_certificate(pems[0]).serial_number
    return (names[0].decode() if names else None), serial


PROBE_METHOD = "/hfadc.Probe/Nothing"  # no server has it: UNIMPLEMENTED means the TLS handshake went through


def _probe(channel, address: str, host: str, kit, timeout: timedelta) -> None:
    """Returns once the server at `address` answers over TLS; tries again while nothing listens there (until
    `timeout`), and fails at once, with the cause (`handshake.explain`), when a TLS handshake is refused."""
    deadline = time.monotonic() + timeout.total_seconds()
    probe = channel.unary_unary(PROBE_METHOD)
    while True:
        left = deadline - time.monotonic()
        try:
            probe(b"", wait_for_ready=False, timeout=max(min(left, 5.0), 0.1))
            return
        except grpc.RpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return  # UNIMPLEMENTED (or any answer): the server is there, past the handshake
            details = _details(error)
            if not is_transient(details) and error.code() == grpc.StatusCode.UNAVAILABLE:
                raise PeerLost(explain(details, address, host, kit)) from None
            if time.monotonic() >= deadline:
                seconds, why = timeout.total_seconds(), explain(details, address, host, kit)
                raise PeerLost(f"cannot reach the server at {address} within {seconds:.0f} s: {why}") from None
        time.sleep(0.2)


def connect(
    address: str,
    timeout: timedelta,
    kit=None,
    insecure: bool = False,
    max_message_bytes: int = 64 * 2**20,
    max_frame_bytes: int | None = None,
    retry_busy: bool = True,
) -> Connection:
    """The client's end: opens a stream to the server at `address` with the client's `kit` (None: plaintext, only
    with `insecure=True`). While nothing answers at `address` it tries again until `timeout`; a refused TLS handshake
    ends it at once, with a `PeerLost` that says which side refused whom and why (`handshake.explain`). A server that
    turns the session away as busy is tried again for a few seconds (`JOIN_RETRY`) unless `retry_busy` is False."""
    host, _ = parse_address(address)
    if kit is None and not insecure:
        raise ValueError("a client needs credentials (--credentials KITS/client-N), or --insecure for plaintext.")
    options = [*_channel_options(), ("grpc.max_reconnect_backoff_ms", 1000)]  # a server that comes up is seen soon
    if retry_busy:
        options += [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(JOIN_RETRY))]
    if kit is None:
        logger.warning("Connecting in PLAINTEXT to %s (--insecure): anyone on the path reads and forges it.", address)
        channel = grpc.insecure_channel(address, options=options)
    else:
        credentials = grpc.ssl_channel_credentials(kit.ca_pem, kit.key_pem, kit.cert_pem)
        channel = grpc.secure_channel(address, credentials, options=options)
    try:
        _probe(channel, address, host, kit, timeout)
    except PeerLost:
        channel.close()
        raise
    incoming, outgoing = queue.Queue(maxsize=INCOMING_ITEMS), queue.Queue(maxsize=QUEUE_FRAMES)
    responses = channel.stream_stream(METHOD)(_outgoing_frames(outgoing))

    def describe(error: grpc.RpcError) -> Exception:
        code = error.code()
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED):
            return Refused(f"the server at {address} refused the session: {_details(error)}")
        return PeerLost(f"lost the peer at the server at {address}: {code.name} {_details(error)}")

    cap = max_frame_bytes or max_message_bytes
    connection = Connection(f"the server at {address}", timeout, incoming, outgoing, host, None, max_frame_bytes=cap)
    threading.Thread(
        target=_read_into, args=(responses, incoming, describe, lambda: connection.closed, lambda: cap),
        name="hf_adc-read",
        daemon=True,
    ).start()
    connection.channel = channel
    return connection
