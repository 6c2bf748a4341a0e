"""The gRPC transport with mutual TLS, in one process on 127.0.0.1: who may connect, what a session is bounded by,
and that nothing a stranger sends takes the listener down. One listener serves every probe of a test."""

import dataclasses
import socket
import threading
import time
from datetime import timedelta

import grpc
import pytest
import torch

from hf_adc.distributed.connect import CHUNK_BYTES, HANDSHAKE_FRAME_BYTES, LAST, METHOD, Listener, connect
from hf_adc.distributed.provision import Revocations, ephemeral_kits, load_kit, provision
from hf_adc.distributed.wire import HEADER_BYTES, Kind, PeerLost, Refused, WireError

TIMEOUT = timedelta(seconds=5)


def free_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    root = tmp_path_factory.mktemp("kits")
    ours = {name: load_kit(path) for name, path in ephemeral_kits(root / "ours", 3).items()}
    theirs = {name: load_kit(path) for name, path in ephemeral_kits(root / "theirs", 1).items()}
    return ours, theirs


@pytest.fixture(scope="module")
def served(kits):
    ours, _ = kits
    address = free_address()
    revoked = Revocations(names=frozenset({"client-2"}))
    listener = Listener(
        address, TIMEOUT, kit=ours["server"], revocations=revoked, max_message_bytes=2**20, max_sessions=2,
        max_pending=2, handshake_timeout=timedelta(seconds=1),
    )  # fmt: skip
    yield address, listener
    listener.stop()


def accept(listener, seconds: float = 5):
    accepted = listener.accept(deadline=time.monotonic() + seconds)
    assert accepted is not None, "no session reached the listener"
    return accepted[1]


def test_a_client_of_our_ca_talks_both_ways_and_is_named_by_its_certificate(kits, served):
    ours, _ = kits
    address, listener = served
    client = connect(address, TIMEOUT, ours["client-0"], max_message_bytes=2**20)
    client.send(Kind.HELLO, {"settings": torch.arange(5, dtype=torch.uint8)}, value=0.5)
    server_end = accept(listener)
    frame = server_end.recv(Kind.HELLO)
    assert server_end.peer_name == "client-0" and server_end.peer_serial == ours["client-0"].serial
    assert frame.value == 0.5 and frame.tensors["settings"].tolist() == [0, 1, 2, 3, 4]
    server_end.send(Kind.WELCOME, value=2.0)
    assert client.recv(Kind.WELCOME).value == 2.0
    assert client.traffic.payload_sent == 5 and client.traffic.framing_sent == HEADER_BYTES
    client.close()
    with pytest.raises(PeerLost, match="closed the session"):
        server_end.recv()
    server_end.close()


@pytest.mark.parametrize("who", ["another CA", "no certificate"])
def test_a_client_without_a_certificate_of_our_ca_is_told_why_at_once(kits, served, who):
    ours, theirs = kits
    address, listener = served
    kwargs = {"kit": theirs["client-0"]} if who == "another CA" else {"insecure": True}
    expected = {  # a kit from another CA: the client cannot trust our server's certificate, and says so
        "another CA": r"this client refused the server's certificate at .*: it is not signed by this kit's CA",
        "no certificate": r"cannot reach the server at .* over plaintext: .*Socket closed",
    }[who]
    start = time.monotonic()
    with pytest.raises(PeerLost, match=expected):
        connect(address, timedelta(seconds=60), **kwargs)
    assert time.monotonic() - start < 5  # not the whole timeout
    assert listener.accept(deadline=time.monotonic() + 0.5) is None  # nothing reached the sessions


def test_a_client_certificate_the_server_does_not_trust_is_named_as_refused_by_the_server(kits, served):
    """A kit whose CA file is the consortium's but whose certificate another CA signed (what `load_kit` would have
    refused): the client trusts the server, the server refuses the client, and the client says so."""
    ours, theirs = kits
    address, listener = served
    mixed = dataclasses.replace(theirs["client-0"], ca_pem=ours["client-0"].ca_pem)
    start = time.monotonic()
    with pytest.raises(PeerLost, match=r"the server at .* refused this client's certificate \(client-0\)"):
        connect(address, timedelta(seconds=60), mixed)
    assert time.monotonic() - start < 5
    assert listener.accept(deadline=time.monotonic() + 0.5) is None


def test_a_server_certificate_for_another_host_is_named(kits, tmp_path):
    ours, _ = kits
    kit = {n: load_kit(p) for n, p in provision(tmp_path / "elsewhere", ["other.example"], ["client-0"]).items()}
    address = free_address()
    elsewhere = Listener(address, TIMEOUT, kit=kit["server"], max_message_bytes=2**20)
    try:
        with pytest.raises(PeerLost, match=r"it does not name 127.0.0.1, the host this client dialled"):
            connect(address, timedelta(seconds=60), kit["client-0"])
    finally:
        elsewhere.stop()


def test_a_server_not_up_yet_is_waited_for_and_a_server_never_up_is_a_timeout(kits):
    ours, _ = kits
    address = free_address()
    with pytest.raises(PeerLost, match=r"cannot reach the server at .* within 1 s: nothing answers .*refused"):
        connect(address, timedelta(seconds=1), ours["client-0"])
    late = []
    starter = threading.Timer(1.5, lambda: late.append(Listener(address, TIMEOUT, kit=ours["server"])))
    starter.start()
    try:
        client = connect(address, timedelta(seconds=30), ours["client-0"])
        assert late, "connected before the server was up"
        client.close()
    finally:
        starter.join()
        for listener in late:
            listener.stop()


def test_a_server_of_another_ca_is_refused_by_the_client(kits):
    ours, theirs = kits
    address = free_address()
    impostor = Listener(address, TIMEOUT, kit=theirs["server"], max_message_bytes=2**20)
    try:
        with pytest.raises(PeerLost, match="this client refused the server's certificate .* not signed by this kit's"):
            connect(address, timedelta(seconds=2), ours["client-0"])
        assert impostor.accept(deadline=time.monotonic() + 0.5) is None
    finally:
        impostor.stop()


def test_a_revoked_certificate_is_refused_before_any_session(kits, served):
    ours, _ = kits
    address, listener = served
    client = connect(address, TIMEOUT, ours["client-2"])
    client.send(Kind.HELLO)
    with pytest.raises(Refused, match="client-2 .* is revoked"):
        client.recv(Kind.WELCOME)
    assert listener.accept(deadline=time.monotonic() + 0.5) is None


def test_junk_on_the_port_leaves_the_listener_serving(kits, served):
    ours, _ = kits
    address, listener = served
    host, port = address.split(":")
    for junk in (b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)) * 256):
        with socket.create_connection((host, int(port)), timeout=2) as raw:
            raw.sendall(junk)
    test_a_client_of_our_ca_talks_both_ways_and_is_named_by_its_certificate(kits, served)


def test_a_message_over_a_chunk_ends_only_its_own_stream_before_grpc_buffers_it(kits, served):
    ours, _ = kits
    address, listener = served
    kit = ours["client-0"]
    credentials = grpc.ssl_channel_credentials(kit.ca_pem, kit.key_pem, kit.cert_pem)
    with grpc.secure_channel(address, credentials, options=[("grpc.max_send_message_length", 2**22)]) as channel:
        responses = channel.stream_stream(METHOD)(iter([bytes([LAST]) + b"\x00" * (2 * CHUNK_BYTES)]))
        with pytest.raises(grpc.RpcError) as refused:
            next(responses)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in refused.value.details()
    accepted = listener.accept(deadline=time.monotonic() + 0.5)
    if accepted is not None:  # the stream may have begun before its message was refused: it is over already
        with pytest.raises(PeerLost):
            accepted[1].recv()
        accepted[1].close()
    test_a_client_of_our_ca_talks_both_ways_and_is_named_by_its_certificate(kits, served)


def test_a_frame_over_the_handshake_cap_or_with_a_lying_header_is_a_wire_error(kits, served):
    ours, _ = kits
    address, listener = served
    client = connect(address, TIMEOUT, ours["client-0"], max_message_bytes=2**20)
    client.send(Kind.HELLO, {"settings": torch.zeros(2**20 - HEADER_BYTES, dtype=torch.uint8)})  # 4 chunks
    server_end = accept(listener)
    with pytest.raises(WireError, match=f"over this session's cap of {HANDSHAKE_FRAME_BYTES}"):
        server_end.recv()
    server_end.refuse("too big")
    with pytest.raises(Refused, match="too big"):
        client.recv(Kind.WELCOME)
    client = connect(address, TIMEOUT, ours["client-0"], max_message_bytes=2**20)
    client.send_bytes(b"\x00" * 10)
    server_end = accept(listener)
    with pytest.raises(WireError, match="shorter than the"):
        server_end.recv()
    server_end.close()


def test_a_client_turned_away_by_full_slots_is_let_in_by_grpcs_retry_once_one_frees(kits, served):
    """The many clients of a federation that start at once: past `max_pending` joining sessions, then past
    `max_sessions` admitted ones, the server answers "try again" before anything else, and the client's channel tries
    again (gRPC's retry policy: after about 1, 2, 4 and 4 s)."""
    ours, _ = kits
    address, listener = served
    silent = [connect(address, TIMEOUT, ours["client-0"]) for _ in range(2)]  # max_pending = 2
    ends = [accept(listener), accept(listener)]
    late = connect(address, TIMEOUT, ours["client-1"])
    late.send(Kind.HELLO, value=3.0)
    sessions_while_busy = []

    def free_slots_then_answer():
        time.sleep(0.3)
        for end in ends:  # both admitted: the joining slots are free, the max_sessions = 2 are taken
            end.open_up()
        time.sleep(1.0)
        sessions_while_busy.append(listener.sessions)  # the late client was turned away as busy meanwhile
        ends[0].close()  # one session ends: its slot frees
        server_end = accept(listener, seconds=15)
        assert server_end.recv(Kind.HELLO).value == 3.0
        server_end.send(Kind.WELCOME, value=1.0)
        ends.append(server_end)

    answering = threading.Thread(target=free_slots_then_answer)
    answering.start()
    assert late.recv(Kind.WELCOME, timeout=timedelta(seconds=20)).value == 1.0
    answering.join(timeout=20)
    assert sessions_while_busy == [listener.sessions - 1]
    for end in [*ends, late, *silent]:
        end.close()
    deadline = time.monotonic() + 5
    while (listener.pending or listener.admitted) and time.monotonic() < deadline:  # as the next test expects it
        time.sleep(0.05)
    assert listener.pending == listener.admitted == 0


def test_a_silent_peer_costs_one_slot_for_the_handshake_timeout_and_no_more(kits, served):
    ours, _ = kits
    address, listener = served
    silent = [connect(address, TIMEOUT, ours["client-0"]) for _ in range(2)]  # max_pending = 2
    ends = [accept(listener), accept(listener)]
    extra = connect(address, TIMEOUT, ours["client-1"], retry_busy=False)  # the retry has its own test
    extra.send(Kind.HELLO)
    with pytest.raises(Refused, match="too many sessions are joining"):
        extra.recv(Kind.WELCOME)
    start = time.monotonic()
    for end in ends:
        with pytest.raises(PeerLost, match="timed out after 1 s: the peer at .* sent nothing"):
            end.recv(Kind.HELLO)
        end.close()
    assert time.monotonic() - start < 4
    deadline = time.monotonic() + 5
    while listener.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert listener.pending == 0
    del silent
    test_a_client_of_our_ca_talks_both_ways_and_is_named_by_its_certificate(kits, served)


def test_a_session_holds_at_most_one_frame_beyond_the_one_being_handled(kits, served):
    ours, _ = kits
    address, listener = served
    client = connect(address, TIMEOUT, ours["client-0"], max_message_bytes=2**22)
    server_end = accept(listener)
    server_end.open_frame_bytes = 2**22
    server_end.open_up()
    for value in range(4):  # four frames of 1 MiB (4 chunks each), none taken yet
        client.send(Kind.FORWARD, {"activations": torch.zeros(2**18)}, value=float(value))
    time.sleep(1.0)
    assert server_end.incoming.qsize() == 1  # the reader waits for it to be taken before reading the next chunk
    assert [server_end.recv(Kind.FORWARD).value for _ in range(4)] == [0.0, 1.0, 2.0, 3.0]
    client.close()
    server_end.close()


def test_one_certificate_cannot_take_another_ones_joining_slots(kits):
    ours, _ = kits
    address = free_address()
    listener = Listener(address, TIMEOUT, kit=ours["server"], max_sessions=1, handshake_timeout=timedelta(seconds=5))
    try:
        held = [connect(address, TIMEOUT, ours["client-1"], retry_busy=False) for _ in range(2)]
        ends = [accept(listener), accept(listener)]
        extra = connect(address, TIMEOUT, ours["client-1"], retry_busy=False)
        with pytest.raises(Refused, match="client-1 has 2 sessions joining already"):
            extra.recv()
        honest = connect(address, TIMEOUT, ours["client-0"], retry_busy=False)
        honest.send(Kind.HELLO, value=1.0)
        assert accept(listener).recv(Kind.HELLO).value == 1.0  # its own slot was free
        for end in [*ends, *held, honest]:
            end.close()
    finally:
        listener.stop()


def test_a_peer_of_the_old_protocol_is_refused_by_its_version_number(kits, served):
    """Version 4 sent each frame as one message, no chunk flag: the server names the version it got."""
    from hf_adc.distributed.wire import PROTOCOL_VERSION, frame_bytes

    ours, _ = kits
    address, listener = served
    old = bytearray(frame_bytes(Kind.HELLO, {"settings": torch.zeros(4, dtype=torch.uint8)})[0])
    old[8:16] = (4).to_bytes(8, "little")
    kit = ours["client-0"]
    credentials = grpc.ssl_channel_credentials(kit.ca_pem, kit.key_pem, kit.cert_pem)
    with grpc.secure_channel(address, credentials) as channel:
        responses = channel.stream_stream(METHOD)(iter([bytes(old)]))
        server_end = accept(listener)
        with pytest.raises(WireError, match=f"header field version=4 is not supported: this end speaks version "
                                            f"{PROTOCOL_VERSION}"):  # fmt: skip
            server_end.recv(Kind.HELLO)
        server_end.close()
        for _ in responses:
            pass
