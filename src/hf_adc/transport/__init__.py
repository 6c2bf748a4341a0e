"""Moved to `hf_adc.distributed` (`distributed.wire`, `distributed.connect`; `Channel` is now `Connection`, the wire's
`Message` is `Frame`). This package re-exports the old names for one release."""

import warnings

from ..distributed.connect import Connection, Listener, connect, parse_address
from ..distributed.wire import (
    HEADER_BYTES,
    Frame,
    Kind,
    PeerLost,
    Refused,
    Traffic,
    WireError,
    json_tensor,
    tensor_json,
    tensor_text,
    text_tensor,
)

Channel = Connection
Message = Frame

warnings.warn("hf_adc.transport moved to hf_adc.distributed; this alias goes in the next release.",
              DeprecationWarning, stacklevel=2)  # fmt: skip

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
