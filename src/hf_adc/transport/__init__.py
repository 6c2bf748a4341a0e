"""Client and server in separate processes: the wire format and how the two ends join."""

from .connect import Listener, connect, parse_address
from .wire import (
    HEADER_BYTES,
    Channel,
    Kind,
    Message,
    PeerLost,
    Refused,
    Traffic,
    WireError,
    json_tensor,
    tensor_json,
    tensor_text,
    text_tensor,
)

__all__ = [
    "HEADER_BYTES",
    "Channel",
    "Kind",
    "Listener",
    "Message",
    "PeerLost",
    "Refused",
    "Traffic",
    "WireError",
    "connect",
    "json_tensor",
    "parse_address",
    "tensor_json",
    "tensor_text",
    "text_tensor",
]
