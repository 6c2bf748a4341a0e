"""The cut itself: what crosses it, how many bytes that is, and the channel it crosses.

In one process the link is autograd-transparent: activations go up through it in the forward pass and
their gradient comes down through it in the backward pass. Every tensor that crosses is charged at
`numel * element_size` in the link's `Ledger`, next to what the uncompressed split would have sent.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from .bridges import Bridge, Message


def nbytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor takes on the wire: its elements times their size."""
    return tensor.numel() * tensor.element_size()


@dataclass
class ChannelConfig:
    """Additive white Gaussian noise on activations (up) and gradients (down).

    `snr_db` is a fixed signal-to-noise ratio in dB, or a `(low, high)` range drawn uniformly per
    transmission. Signal power is the mean square of the tensor sent.
    """

    snr_db: float | tuple[float, float] = field(
        default=20.0, metadata={"help": "SNR in dB, or a (low, high) range drawn uniformly per transmission."}
    )

    def __post_init__(self):
        low, high = self.snr_db if isinstance(self.snr_db, (tuple, list)) else (self.snr_db, self.snr_db)
        if not low <= high:
            raise ValueError(f"snr_db range {self.snr_db} is empty: it must be (low, high) with low <= high.")
        self.snr_db = (float(low), float(high)) if isinstance(self.snr_db, (tuple, list)) else float(low)

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` plus Gaussian noise of power `mean(tensor**2) / 10**(snr/10)`."""
        if isinstance(self.snr_db, tuple):
            low, high = self.snr_db
            snr_db = low + (high - low) * torch.rand((), device=tensor.device)
        else:
            snr_db = torch.tensor(self.snr_db, device=tensor.device)
        noise_power = tensor.detach().float().pow(2).mean() / 10 ** (snr_db / 10)
        return tensor + torch.randn_like(tensor) * noise_power.sqrt().to(tensor.dtype)


@dataclass
class CommunicationRecord:
    """The bytes of one training step, by tensor name. `downlink` is filled in during backward."""

    uplink: dict[str, int] = field(default_factory=dict)
    downlink: dict[str, int] = field(default_factory=dict)
    uncompressed_uplink_bytes: int = 0
    uncompressed_downlink_bytes: int = 0

    @property
    def uplink_bytes(self) -> int:
        return sum(self.uplink.values())

    @property
    def downlink_bytes(self) -> int:
        return sum(self.downlink.values())

    @property
    def achieved_ratio(self) -> float:
        """Bytes that carried the activations up (labels aside) over the uncompressed activations (whose
        gradient is exactly the uncompressed downlink): T*k/(B*n) for ADC."""
        activations = self.uplink_bytes - self.uplink.get("labels", 0)
        return activations / self.uncompressed_downlink_bytes


class Ledger:
    """Running totals of the bytes that crossed the cut, both ways, and what an uncompressed split would
    have sent for the same batches. `ratio` is sent over uncompressed, both directions together."""

    FIELDS = ("uplink_bytes", "downlink_bytes", "uncompressed_uplink_bytes", "uncompressed_downlink_bytes")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.uplink_bytes = 0
        self.downlink_bytes = 0
        self.uncompressed_uplink_bytes = 0
        self.uncompressed_downlink_bytes = 0

    @property
    def total_bytes(self) -> int:
        return self.uplink_bytes + self.downlink_bytes

    @property
    def uncompressed_bytes(self) -> int:
        return self.uncompressed_uplink_bytes + self.uncompressed_downlink_bytes

    @property
    def ratio(self) -> float:
        return self.total_bytes / self.uncompressed_bytes if self.uncompressed_bytes else 1.0

    def state_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.FIELDS}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for name in self.FIELDS:
            setattr(self, name, int(state[name]))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)}" for name in self.FIELDS)
        return f"Ledger({fields}, ratio={self.ratio:.4f})"


class _Cut(torch.autograd.Function):
    """Carries activations up in the bridge's wire form and their gradient down, charging both."""

    @staticmethod
    def forward(ctx, activations, link, bridge, record):
        wire, context = bridge.pack(activations.detach())
        record.uplink.update({name: nbytes(tensor) for name, tensor in wire.items()})
        link.ledger.uplink_bytes += sum(nbytes(tensor) for tensor in wire.values())
        ctx.link, ctx.bridge, ctx.record, ctx.context = link, bridge, record, context
        return link.carry(bridge.unpack(wire, context)).clone()

    @staticmethod
    def backward(ctx, grad):
        wire = ctx.bridge.pack_gradient(grad, ctx.context)
        ctx.record.downlink.update({name: nbytes(tensor) for name, tensor in wire.items()})
        ctx.link.ledger.downlink_bytes += ctx.record.downlink_bytes
        ctx.link.ledger.uncompressed_downlink_bytes += ctx.record.uncompressed_downlink_bytes
        return ctx.link.carry(ctx.bridge.unpack_gradient(wire, ctx.context)), None, None, None


class Link(nn.Module):
    """The cut between client and server in one process: charges what crosses and applies the channel."""

    def __init__(self, channel: ChannelConfig | None = None):
        super().__init__()
        self.channel = channel
        self.ledger = Ledger()

    def carry(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.channel.apply(tensor) if self.channel else tensor

    def transmit(
        self,
        message: Message,
        bridge: Bridge,
        uncompressed_uplink_bytes: int,
        uncompressed_downlink_bytes: int,
    ) -> tuple[torch.Tensor, CommunicationRecord]:
        """Sends `message` up in `bridge`'s wire form; returns the activations the server receives and the
        step's record. The gradient of the returned activations is charged when backward passes the link."""
        record = CommunicationRecord(
            uncompressed_uplink_bytes=uncompressed_uplink_bytes,
            uncompressed_downlink_bytes=uncompressed_downlink_bytes,
        )
        if message.labels is not None:
            record.uplink["labels"] = nbytes(message.labels)
            self.ledger.uplink_bytes += nbytes(message.labels)
        self.ledger.uncompressed_uplink_bytes += uncompressed_uplink_bytes
        return _Cut.apply(message.hidden_states, self, bridge, record), record
