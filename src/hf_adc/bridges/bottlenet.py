"""BottleNet++-style learned bottleneck: a per-token encoder d -> d' on the client, a decoder back on the server.

Both are trained jointly with the model. The decoder's output has no activation (it feeds the residual
stream). The bottleneck is part of the architecture, so it also runs in eval mode.
"""

import math
from dataclasses import dataclass, field

from torch import nn

from .base import Bridge, BridgeConfig, Message


@dataclass
class BottleNetConfig(BridgeConfig):
    """A learned per-token bottleneck of width d' = round(ratio * d)."""

    method = "bottlenet"

    ratio: float = field(default=0.25, metadata={"help": "Bottleneck width over hidden width, d'/d in (0, 1]."})

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio={self.ratio} is out of range: it must lie in (0, 1].")

    def width(self, hidden_size: int) -> int:
        return max(round(self.ratio * hidden_size), 1)


def bottlenet_for_ratio(
    xi: float, num_tokens: int, hidden_size: int, batch_size: int, seed: int = 0
) -> BottleNetConfig:
    return BottleNetConfig(ratio=xi)


class BottleNetBridge(Bridge):
    """encoder (client): Linear(d, d) - GELU - Linear(d, d'); decoder (server): Linear(d', d) - GELU - Linear(d, d)."""

    client_modules = ("encoder",)
    server_modules = ("decoder",)

    def __init__(self, config: BottleNetConfig, hidden_size: int):
        super().__init__(config)
        width = config.width(hidden_size)
        self.encoder = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, width))
        self.decoder = nn.Sequential(nn.Linear(width, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def encode(self, hidden_states, labels, cls_attention=None):
        return Message(hidden_states=self.encoder(hidden_states), labels=labels)

    def decode(self, hidden_states):
        return self.decoder(hidden_states)

    def coded_bytes(self, shape: tuple[int, ...], element_size: int) -> tuple[int, int]:
        """(up, down) bytes of tokens of `shape` (last dimension the hidden width) once encoded, and their gradient."""
        coded = math.prod(shape[:-1]) * self.config.width(shape[-1]) * element_size
        return coded, coded

    def wire_bytes(self, batch_size, num_tokens, hidden_size, num_labels, element_size):
        up, down = self.coded_bytes((batch_size, num_tokens, hidden_size), element_size)
        return up + batch_size * 8, down
