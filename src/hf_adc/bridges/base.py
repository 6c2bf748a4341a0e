"""What every bridge shares: the message it hands to the link, and the encode / wire / decode interface."""

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Message:
    """What the client puts on the link in one training step.

    `hidden_states` (in the wire form its bridge's `pack` gives it) and `labels` cross the cut and are
    charged; `cluster_ids` and `token_indices` are the client's own bookkeeping and never leave it.
    """

    hidden_states: torch.Tensor
    labels: torch.Tensor | None
    cluster_ids: torch.Tensor | None = None
    token_indices: torch.Tensor | None = None


class BridgeConfig:
    """Base of the per-method config dataclasses; `method` names the method on the command line."""

    method: str = "none"

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}


class Bridge(nn.Module):
    """Compression at the cut: `encode` runs on the client, `decode` on the server, `pack` / `unpack` say
    what the activations and gradients look like on the wire.

    A bridge knows what to send, never how it travels: the link counts and carries what `pack` returns.
    In training mode `encode` compresses; in eval mode it hands over every sample and every token.
    """

    needs_cls_attention: bool = False
    # Submodules that run on one side only: across processes, the other side drops them (BottleNet++'s
    # encoder lives on the client, its decoder on the server).
    client_modules: tuple[str, ...] = ()
    server_modules: tuple[str, ...] = ()

    def __init__(self, config: BridgeConfig | None = None):
        super().__init__()
        self.config = config

    def encode(
        self,
        hidden_states: torch.Tensor,
        labels: torch.Tensor | None,
        cls_attention: torch.Tensor | None = None,
    ) -> Message:
        return Message(hidden_states=hidden_states, labels=labels)

    def decode(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def pack(self, activations: torch.Tensor) -> tuple[dict[str, torch.Tensor], Any]:
        """The tensors that carry `activations` up, and what the sender keeps to code the gradient later."""
        return {"activations": activations}, None

    def unpack(self, wire: dict[str, torch.Tensor], context: Any) -> torch.Tensor:
        """The activations the server reads from the wire."""
        return wire["activations"]

    def receiver_context(self, wire: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> Any:
        """What `unpack` and `pack_gradient` need on a receiver that holds only the wire: the context `pack` would
        have kept, rebuilt from the wire and the shape (`(batch, tokens, hidden)`) and dtype of the activations."""
        return None

    def pack_gradient(self, gradient: torch.Tensor, context: Any) -> dict[str, torch.Tensor]:
        """The tensors that carry the gradient of the received activations down."""
        return {"gradients": gradient}

    def unpack_gradient(self, wire: dict[str, torch.Tensor], context: Any) -> torch.Tensor:
        return wire["gradients"]

    def wire_bytes(
        self, batch_size: int, num_tokens: int, hidden_size: int, num_labels: int, element_size: int
    ) -> tuple[int, int]:
        """(uplink, downlink) bytes that one training batch of this shape sends, before it is sent.

        Used to plan a communication budget; the ledger then charges what is really sent.
        """
        raise NotImplementedError

    def label_bytes(self, batch_size: int, num_labels: int, element_size: int) -> int:
        """The part of `wire_bytes`' uplink that carries the labels: one int64 class id per sample unless the
        bridge sends other labels (ADC's soft labels). A U-shaped split sends none of it."""
        return batch_size * 8

    def server_tokens(self, batch_size: int, num_tokens: int) -> tuple[int, int]:
        """(samples, tokens) the server's layers run on in training, once decoded: every sample and token unless
        the bridge merges samples or drops tokens (ADC). What a U-shaped split's server returns has this shape."""
        return batch_size, num_tokens


class SeededBridge(Bridge):
    """A bridge that draws random numbers: a fresh generator per batch from `config.seed` and the number
    of batches seen, which is a buffer saved with the model (so a resumed run draws what it would have)."""

    def __init__(self, config: BridgeConfig):
        super().__init__(config)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def next_generator(self, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device).manual_seed(self.config.seed * 1_000_003 + int(self.calls))
        self.calls += 1
        return generator


class IdentityBridge(Bridge):
    """The uncompressed split: every activation and every class id (int64) crosses the cut as it is."""

    def wire_bytes(self, batch_size, num_tokens, hidden_size, num_labels, element_size):
        activations = batch_size * num_tokens * hidden_size * element_size
        return activations + batch_size * 8, activations
