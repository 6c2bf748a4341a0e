"""Property-based fuzzing of what parses bytes from the network: random and mutated frames and handshakes only
ever raise the wire's own error (`WireError`), never anything that would crash a server."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_adc.distributed.wire import (
    HEADER_BYTES,
    Kind,
    WireError,
    frame_bytes,
    json_tensor,
    parse_frame,
    tensor_json,
)

CAP = 2**20
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID = [
    frame_bytes(Kind.HELLO, {"settings": json_tensor({"labels": ["a", "b"], "token": "t"})})[0],
    frame_bytes(Kind.FORWARD, {"activations": torch.randn(2, 3, 4), "labels": torch.tensor([0, 1])}, value=0.1)[0],
    frame_bytes(Kind.STEP, {"norm": torch.ones(5)}, value=1.0)[0],
    frame_bytes(Kind.END, {})[0],
]


def parses_or_refuses(data: bytes) -> None:
    try:
        parse_frame(data, CAP)
    except WireError:
        pass


@FUZZ
@given(st.binary(max_size=4 * HEADER_BYTES))
def test_random_bytes_only_raise_the_wire_error(data):
    parses_or_refuses(data)


@FUZZ
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
       st.integers(-64, 64))  # fmt: skip
def test_mutated_frames_only_raise_the_wire_error(frame, flips, cut):
    data = bytearray(frame)
    for position, byte in flips:
        data[position % len(data)] = byte
    data = data[: len(data) + cut] if cut < 0 else data + bytes(cut)
    parses_or_refuses(bytes(data))


@FUZZ
@given(st.sampled_from(VALID[:3]), st.integers(0, HEADER_BYTES // 8 - 1), st.integers(-(2**63), 2**63 - 1))
def test_any_header_field_set_to_any_int64_only_raises_the_wire_error(frame, field, value):
    header = torch.frombuffer(bytearray(frame[:HEADER_BYTES]), dtype=torch.int64).clone()
    header[field] = value
    parses_or_refuses(header.numpy().tobytes() + frame[HEADER_BYTES:])


@FUZZ
@given(st.one_of(st.binary(max_size=512), st.text(max_size=256).map(str.encode),
                 st.integers(1, 50_000).map(lambda depth: b"[" * depth + b"]" * depth)))  # fmt: skip
def test_handshake_settings_from_any_bytes_only_raise_the_wire_error(data):
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    try:
        settings_ = tensor_json(tensor)
    except WireError:
        return
    assert isinstance(settings_, dict)


def test_a_valid_frame_round_trips():
    frame = parse_frame(VALID[1], CAP)
    assert frame.kind == Kind.FORWARD and frame.value == 0.1
    assert frame.tensors["activations"].shape == (2, 3, 4) and frame.tensors["labels"].tolist() == [0, 1]
