"""The wire format between a client and the server: a fixed integer header, then the tensors it announces. No pickle.

Every message is one int64 header of `HEADER_LENGTH` fields, then (if it carries any) one body holding its
tensors' bytes end to end in header order, over a `Connection` (`connect.py`). The header
says:

    magic, protocol version, message kind, step, number of tensors, a float64 value (the bits),
    then for each of up to MAX_TENSORS slots: name id, dtype id, rank, and MAX_RANK dimensions

The value carries a message's one scalar (a loss, a label smoothing, a row count, a max norm), so that a message is one
send: every send also costs bytes below the transport (TCP/IP headers and acknowledgements, HTTP/2 frames and TLS
records), and the fewer sends, the closer the bytes counted here come to the bytes on the wire.

Names and dtypes are ids in fixed tables, so no string or object is ever decoded from the peer beyond the
JSON of the join handshake (plain data, size-capped). The receiver checks every field against its limits
(known kind, name, dtype; rank; a cap on each tensor's bytes) before it allocates anything, and refuses a
bad header with a `WireError` naming the field. Strings (the handshake's settings, a refusal's reason) travel
as UTF-8 bytes in a uint8 tensor.

The transport (`connect.py`) carries each frame as one gRPC message over mutual TLS.
"""

import json
import math
from dataclasses import dataclass, field
from enum import IntEnum

import torch

PROTOCOL_VERSION = 5  # 5: one round trip per micro-batch (the gradient comes back with the loss)
MAGIC = 0x48464144  # "HFAD"
MAX_TENSORS = 8
MAX_RANK = 4
SLOT = 3 + MAX_RANK
FIXED = 6
HEADER_LENGTH = FIXED + MAX_TENSORS * SLOT
HEADER_BYTES = HEADER_LENGTH * 8
DEFAULT_MAX_TENSOR_BYTES = 2**30
MAX_TEXT_BYTES = 2**16

NAMES = (
    "activations", "gradients", "labels", "values", "indices", "codes", "minimum", "step",
    "gradient_codes", "gradient_minimum", "gradient_step", "loss", "seed", "norm", "logits",
    "settings", "reason", "scalars", "shape", "weights", "head_activations", "head_gradients",
)  # fmt: skip
DTYPES = (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8, torch.int32, torch.int64,
    torch.bool,
)  # fmt: skip


class Kind(IntEnum):
    """What a message is. Client to server: HELLO, BEGIN, FORWARD, STEP, EVAL, SAVE, END; server to client: WELCOME,
    REFUSE, GRADIENT, LOGITS, DONE. A training micro-batch is one round trip: FORWARD (the activations, the labels,
    the agreed backward seed) is answered by GRADIENT (the loss, the gradient of what came, and with the step's last
    micro-batch the server's gradient norms); STEP (the client's norms) has no answer. Several clients
    (`hf_adc.distributed.federation`) also exchange PLAN (the client's shard and step cost; the server's schedule
    back), SYNC (a client half up; the average back), TURN (a request; the current client half back) and HANDOFF (a
    client half up). A U-shaped split (`label_privacy`) answers FORWARD and EVAL with HEAD (what the client's head
    needs), and its client sends HEAD_BACKWARD (the head's gradient), answered by GRADIENT. The ids of kinds that
    version 4 had and 5 dropped (4's LOSS, BACKWARD, NORM: 6, 7, 10) are not reused."""

    HELLO = 1
    WELCOME = 2
    REFUSE = 3
    BEGIN = 4
    FORWARD = 5
    GRADIENT = 8
    STEP = 9
    EVAL = 11
    LOGITS = 12
    SAVE = 13
    END = 14
    DONE = 15
    PLAN = 16
    SYNC = 17
    TURN = 18
    HANDOFF = 19
    HEAD = 20
    HEAD_BACKWARD = 21


class WireError(ValueError):
    """A message that breaks the protocol: a header field out of its limits, or an unexpected kind."""


class PeerLost(ConnectionError):
    """The peer died, hung past the timeout, or closed the connection."""


class Refused(ConnectionError):
    """The peer refused this session (wrong token, mismatched split, a bad message), with its reason."""


@dataclass
class Frame:
    """One message on the wire: its kind, a step, its named tensors and one float64 value."""

    kind: Kind
    step: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    value: float = 0.0


@dataclass
class Traffic:
    """Bytes this end sent and received: tensor payload and header framing."""

    payload_sent: int = 0
    payload_received: int = 0
    framing_sent: int = 0
    framing_received: int = 0

    @property
    def payload(self) -> int:
        return self.payload_sent + self.payload_received

    @property
    def framing(self) -> int:
        return self.framing_sent + self.framing_received


def text_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)


def tensor_text(tensor: torch.Tensor) -> str:
    if tensor.dtype != torch.uint8 or tensor.dim() != 1 or tensor.numel() > MAX_TEXT_BYTES:
        raise WireError(
            f"a text field must be at most {MAX_TEXT_BYTES} uint8 bytes; got {tensor.dtype} {tuple(tensor.shape)}."
        )
    try:
        return bytes(tensor.tolist()).decode()
    except UnicodeDecodeError as error:
        raise WireError(f"a text field is not UTF-8: {error}.") from error


def json_tensor(data: dict) -> torch.Tensor:
    return text_tensor(json.dumps(data, sort_keys=True))


def _no_constant(name: str):
    raise ValueError(f"{name} is not a plain setting")


def tensor_json(tensor: torch.Tensor) -> dict:
    try:
        data = json.loads(tensor_text(tensor), parse_constant=_no_constant)
    except RecursionError:
        raise WireError("the settings nest too deeply to be plain settings.") from None
    except ValueError as error:  # not JSON, NaN / Infinity, an integer of thousands of digits
        raise WireError(f"the settings are not plain JSON: {str(error)[:200]}.") from error
    if not isinstance(data, dict):
        raise WireError(f"the settings must be a JSON object; got {type(data).__name__}.")
    return data


def encode_header(kind: Kind, step: int, tensors: dict[str, torch.Tensor], value: float = 0.0) -> torch.Tensor:
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"a message carries at most {MAX_TENSORS} tensors; got {len(tensors)}.")
    header = torch.zeros(HEADER_LENGTH, dtype=torch.int64)
    header[:5] = torch.tensor([MAGIC, PROTOCOL_VERSION, int(kind), step, len(tensors)])
    header[5:6] = torch.tensor([value], dtype=torch.float64).view(torch.int64)
    for slot, (name, tensor) in enumerate(tensors.items()):
        if name not in NAMES:
            raise ValueError(f"tensor name {name!r} is not in the wire's name table {NAMES}.")
        if tensor.dtype not in DTYPES or tensor.dim() > MAX_RANK:
            raise ValueError(f"tensor {name!r} ({tensor.dtype}, rank {tensor.dim()}) cannot cross the wire.")
        start = FIXED + slot * SLOT
        header[start : start + 3] = torch.tensor([NAMES.index(name), DTYPES.index(tensor.dtype), tensor.dim()])
        header[start + 3 : start + 3 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    return header


def decode_header(header: torch.Tensor, max_tensor_bytes: int) -> tuple[Kind, int, float, list]:
    """Checks every field of `header` before anything is allocated; returns kind, step, value, tensor specs."""
    values = header.tolist()
    value = float(header[5:6].view(torch.float64))
    magic, version, kind, step, count = values[:5]
    if magic != MAGIC:
        raise WireError(f"header field magic={magic:#x} is not {MAGIC:#x}: the peer does not speak this protocol.")
    if version != PROTOCOL_VERSION:
        raise WireError(f"header field version={version} is not supported: this end speaks version {PROTOCOL_VERSION}.")
    if kind not in Kind._value2member_map_:
        raise WireError(f"header field kind={kind} is unknown: valid kinds are {[int(k) for k in Kind]}.")
    if step < 0:
        raise WireError(f"header field step={step} is out of range: it must be >= 0.")
    if not 0 <= count <= MAX_TENSORS:
        raise WireError(f"header field count={count} is out of range: 0 .. {MAX_TENSORS} tensors.")
    specs = []
    for slot in range(count):
        name_id, dtype_id, rank, *dims = values[FIXED + slot * SLOT : FIXED + (slot + 1) * SLOT]
        if not 0 <= name_id < len(NAMES):
            raise WireError(f"header field name={name_id} (tensor {slot}) is unknown: 0 .. {len(NAMES) - 1}.")
        if not 0 <= dtype_id < len(DTYPES):
            raise WireError(f"header field dtype={dtype_id} (tensor {slot}) is unknown: 0 .. {len(DTYPES) - 1}.")
        if not 0 <= rank <= MAX_RANK:
            raise WireError(f"header field rank={rank} (tensor {slot}) is out of range: 0 .. {MAX_RANK}.")
        shape = tuple(dims[:rank])
        if any(size < 0 for size in shape):
            raise WireError(f"header field shape={shape} (tensor {slot}) has a negative size.")
        dtype = DTYPES[dtype_id]
        size = math.prod(shape) * dtype.itemsize
        if size > max_tensor_bytes:
            raise WireError(
                f"header field shape={shape} (tensor {slot}, {dtype}) is {size} bytes, over the cap of "
                f"{max_tensor_bytes} bytes per tensor."
            )
        specs.append((NAMES[name_id], dtype, shape))
    return Kind(kind), step, value, specs


def foreign_version(data: bytes) -> int | None:
    """The protocol version announced by a message that starts with this protocol's magic (a peer of another version
    whose messages are not chunks of ours), or None."""
    if len(data) >= 16 and int.from_bytes(data[:8], "little", signed=True) == MAGIC:
        return int.from_bytes(data[8:16], "little", signed=True)
    return None


def frame_bytes(kind: Kind, tensors: dict[str, torch.Tensor], step: int = 0, value: float = 0.0) -> tuple[bytes, int]:
    """A frame as it goes on the stream: the header, then the tensors' bytes end to end; and the body's length."""
    tensors = {name: tensor.detach().cpu() for name, tensor in tensors.items()}
    header = encode_header(kind, step, tensors, value)
    pieces = [tensor.reshape(-1).contiguous().view(torch.uint8) for tensor in tensors.values() if tensor.numel()]
    body = torch.cat(pieces).numpy().tobytes() if pieces else b""
    return header.numpy().tobytes() + body, len(body)


def parse_frame(data: bytes, max_frame_bytes: int, max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES) -> Frame:
    """The frame in `data`, every header field checked against its limits and the header against the message's
    length before any tensor is made; anything else is a `WireError`."""
    if len(data) > max_frame_bytes:
        raise WireError(f"a message of {len(data)} bytes is over this session's cap of {max_frame_bytes}.")
    if len(data) < HEADER_BYTES:
        raise WireError(f"a message of {len(data)} bytes is shorter than the {HEADER_BYTES}-byte header.")
    header = torch.frombuffer(bytearray(data[:HEADER_BYTES]), dtype=torch.int64)
    kind, step, value, specs = decode_header(header, max_tensor_bytes)
    sizes = [math.prod(shape) * dtype.itemsize for _, dtype, shape in specs]
    if HEADER_BYTES + sum(sizes) != len(data):
        raise WireError(
            f"the header announces {sum(sizes)} bytes of tensors; the message carries {len(data) - HEADER_BYTES}."
        )
    body = torch.frombuffer(bytearray(data[HEADER_BYTES:]), dtype=torch.uint8) if sum(sizes) else None
    tensors, offset = {}, 0
    for (name, dtype, shape), size in zip(specs, sizes, strict=True):
        if name in tensors:
            raise WireError(f"the header names tensor {name!r} twice.")
        tensors[name] = body[offset : offset + size].clone().view(dtype).reshape(shape) if size else (
            torch.empty(shape, dtype=dtype)
        )  # fmt: skip
        offset += size
    return Frame(kind, step, tensors, value)
