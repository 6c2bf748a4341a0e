"""The cut itself: what crosses it, how many bytes that is, and the channel it crosses.

In one process the link is autograd-transparent: activations go up through it in the forward pass and
their gradient comes down through it in the backward pass. Every floating-point tensor crosses in the link's
wire dtype (float32 by default, whatever the model computes in); integer tensors (class ids, indices, codes)
cross as they are. Every tensor that crosses is charged at `numel * element_size` in the link's `Ledger`,
next to what the uncompressed split, sending in the same wire dtype, would have sent.

A U-shaped split (labels that stay on the client) crosses twice: `transmit_activations` sends the bridge's
activations up without labels, and `transmit_head` brings what the server's last layer returns down to the
client's head, its gradient going back up.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from .bridges import Bridge, Message

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def nbytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor takes on the wire: its elements times their size."""
    return tensor.numel() * tensor.element_size()


def resolve_wire_dtype(name: str | torch.dtype) -> torch.dtype:
    """The floating-point dtype named `name` (`"float32"`, `"bfloat16"`, `"float16"`, or the torch dtype)."""
    dtype = WIRE_DTYPES.get(name) if isinstance(name, str) else name
    if dtype not in WIRE_DTYPES.values():
        raise ValueError(f"wire_dtype={name!r} is not supported: choose one of {', '.join(WIRE_DTYPES)}.")
    return dtype


def wire_dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, known in WIRE_DTYPES.items() if known == dtype)


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
        """`tensor` plus Gaussian noise of power `mean(tensor**2) / 10**(snr/10)`: the power of what is sent."""
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
        gradient is exactly the uncompressed downlink): T*k/(B*n) for ADC. In a U-shaped split, once backward has
        run: everything sent up (both cuts) over what the uncompressed U-shaped split sends each way."""
        activations = self.uplink_bytes - self.uplink.get("labels", 0)
        return activations / self.uncompressed_downlink_bytes


class Ledger:
    """Running totals of the bytes that crossed the cut, both ways, and what an uncompressed split would
    have sent for the same batches. `ratio` is sent over uncompressed, both directions together.

    With several clients, `sync_bytes` counts the client halves sent to and from the server to keep them in
    step (both ways); the uncompressed split would send them too, so they count on both sides of the ratio.
    """

    FIELDS = (
        "uplink_bytes", "downlink_bytes", "uncompressed_uplink_bytes", "uncompressed_downlink_bytes", "sync_bytes",
    )  # fmt: skip

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        for name in self.FIELDS:
            setattr(self, name, 0)

    @property
    def total_bytes(self) -> int:
        return self.uplink_bytes + self.downlink_bytes + self.sync_bytes

    @property
    def uncompressed_bytes(self) -> int:
        return self.uncompressed_uplink_bytes + self.uncompressed_downlink_bytes + self.sync_bytes

    @property
    def ratio(self) -> float:
        return self.total_bytes / self.uncompressed_bytes if self.uncompressed_bytes else 1.0

    def state_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.FIELDS}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for name in self.FIELDS:
            setattr(self, name, int(state.get(name, 0)))  # checkpoints from before sync_bytes lack it

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)}" for name in self.FIELDS)
        return f"Ledger({fields}, ratio={self.ratio:.4f})"


class _Cut(torch.autograd.Function):
    """Carries activations up in the bridge's wire form and their gradient down, charging both."""

    @staticmethod
    def forward(ctx, activations, link, bridge, record, uncompressed_gradient_bytes):
        wire, context = bridge.pack(activations.detach())
        wire = link.send(wire)
        record.uplink.update({name: nbytes(tensor) for name, tensor in wire.items()})
        link.ledger.uplink_bytes += sum(nbytes(tensor) for tensor in wire.values())
        ctx.link, ctx.bridge, ctx.record, ctx.context = link, bridge, record, context
        ctx.dtype, ctx.uncompressed = activations.dtype, uncompressed_gradient_bytes
        return bridge.unpack(wire, context).to(activations.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad):
        wire = ctx.link.send(ctx.bridge.pack_gradient(grad, ctx.context))
        ctx.record.downlink.update({name: nbytes(tensor) for name, tensor in wire.items()})
        ctx.link.ledger.downlink_bytes += sum(nbytes(tensor) for tensor in wire.values())
        ctx.link.ledger.uncompressed_downlink_bytes += ctx.uncompressed
        return ctx.bridge.unpack_gradient(wire, ctx.context).to(ctx.dtype), None, None, None, None


class _HeadCut(torch.autograd.Function):
    """The second cut of a U-shaped split: carries what the server returns down to the client's head, and the
    head's gradient of it back up, both in the wire dtype, charging both as `head_activations` / `head_gradients`
    next to what the uncompressed U-shaped split would send (`uncompressed_bytes` each way)."""

    @staticmethod
    def forward(ctx, returned, link, record, uncompressed_bytes):
        wire = link.send({"head_activations": returned.detach()})
        record.downlink["head_activations"] = nbytes(wire["head_activations"])
        link.ledger.downlink_bytes += nbytes(wire["head_activations"])
        link.ledger.uncompressed_downlink_bytes += uncompressed_bytes
        ctx.link, ctx.record, ctx.dtype, ctx.uncompressed = link, record, returned.dtype, uncompressed_bytes
        return wire["head_activations"].to(returned.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad):
        wire = ctx.link.send({"head_gradients": grad})
        ctx.record.uplink["head_gradients"] = nbytes(wire["head_gradients"])
        ctx.link.ledger.uplink_bytes += nbytes(wire["head_gradients"])
        ctx.link.ledger.uncompressed_uplink_bytes += ctx.uncompressed
        return wire["head_gradients"].to(ctx.dtype), None, None, None


class Link(nn.Module):
    """The cut between client and server in one process: charges what crosses and applies the channel.

    `ledger` counts training traffic (what a communication budget is spent on); `inference_ledger` counts
    split inference (`client_payload` / `server_logits`), kept apart so that it never eats into a budget.
    """

    # (up, down) bytes of the link's own control values per micro-batch and per optimizer step: none in one
    # process; across processes, the loss, its backward seed, gradient norms (`hf_adc.distributed.RemoteLink`).
    control_bytes: tuple[int, int] = (0, 0)
    step_control_bytes: tuple[int, int] = (0, 0)

    # What the Trainer asks of its link (`ADCTrainer`); a link in one process answers no to each. A link whose
    # other end runs elsewhere says yes where it must and implements the method that goes with it.
    peer_steps: bool = False  # the other end holds parameters that step with ours: clipping spans both ends
    plans_steps: bool = False  # the other end fixes how many optimizer steps this end takes (a federation)
    pipelines: bool = False  # a step's forwards may go out before their replies are read (`receive_reply`)

    def backward_seed(self, seed: float, micro_batches: int) -> None:
        """The Trainer says what the next training micro-batch's backward seed will be, and how many micro-batches its
        optimizer step has. One process needs neither (autograd gives the seed); a link whose other end
        back-propagates as soon as the forward comes does."""

    def trainer_callbacks(self, args) -> list:
        """`TrainerCallback`s that drive the other end (training begins, a checkpoint, a sync); none here."""
        return []

    def optimizer_step(self, client_norms: torch.Tensor, max_norm: float) -> torch.Tensor:
        """With `peer_steps`: sends the norm of each of this end's gradients; the other end clips by the global
        norm (`max_norm`; inf: no clipping) and steps. Returns the global norm."""
        raise NotImplementedError(f"{type(self).__name__} has no other end that steps with it (peer_steps=False).")

    def plan_steps(self, shard_size: int, step_bytes: int, epoch_bytes: int, resume_step: int = 0) -> int:
        """With `plans_steps`: announces this end's shard, step cost, epoch cost and resumed step; returns the
        number of optimizer steps the other end planned for it."""
        raise NotImplementedError(f"{type(self).__name__} has no other end that plans its steps (plans_steps=False).")

    def __init__(self, channel: ChannelConfig | None = None, wire_dtype: str | torch.dtype = "float32"):
        super().__init__()
        self.channel = channel
        self.wire_dtype = resolve_wire_dtype(wire_dtype)
        self.ledger = Ledger()
        self.inference_ledger = Ledger()

    def send(self, wire: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors as they arrive: floating-point ones in the wire dtype and through the channel (signal
        power from what is sent); integer ones (indices, codes) exact."""
        return {
            name: self._send_values(tensor) if tensor.is_floating_point() else tensor for name, tensor in wire.items()
        }

    def cast(self, wire: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors as a sender puts them on a real wire: floating-point ones in the wire dtype, without the
        channel: across processes the client's end applies it, both ways (`send`), so that what crosses is noised
        once, as in one process."""
        dtype = self.wire_dtype
        return {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in wire.items()}

    def _send_values(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.wire_dtype)
        return self.channel.apply(tensor) if self.channel else tensor

    def activation_bytes(self, numel: int) -> int:
        """Bytes of `numel` activation values in the wire dtype."""
        return numel * self.wire_dtype.itemsize

    def transmit(
        self, message: Message, bridge: Bridge, activations_numel: int, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, CommunicationRecord]:
        """Sends `message` up in `bridge`'s wire form; returns the activations and labels the server receives
        and the step's record. `activations_numel` and `labels` are the client's uncompressed activations' size
        and class ids, for what an uncompressed split would have sent. The gradient of the returned
        activations is charged when backward passes the link. Labels cross in the wire dtype (soft labels) or
        as class ids, without channel noise."""
        uncompressed = self.activation_bytes(activations_numel)
        record = CommunicationRecord(
            uncompressed_uplink_bytes=uncompressed + nbytes(labels), uncompressed_downlink_bytes=uncompressed
        )
        sent_labels = message.labels.to(self.wire_dtype) if message.labels.is_floating_point() else message.labels
        record.uplink["labels"] = nbytes(sent_labels)
        self.ledger.uplink_bytes += nbytes(sent_labels)
        self.ledger.uncompressed_uplink_bytes += record.uncompressed_uplink_bytes
        return _Cut.apply(message.hidden_states, self, bridge, record, uncompressed), sent_labels, record

    def transmit_activations(
        self, message: Message, bridge: Bridge, activations_numel: int
    ) -> tuple[torch.Tensor, CommunicationRecord]:
        """The first cut of a U-shaped split: as `transmit`, but only the activations cross (`message.labels`
        stays with the client, and the uncompressed split it is measured against sends no labels either)."""
        uncompressed = self.activation_bytes(activations_numel)
        record = CommunicationRecord(uncompressed_uplink_bytes=uncompressed, uncompressed_downlink_bytes=uncompressed)
        self.ledger.uncompressed_uplink_bytes += uncompressed
        return _Cut.apply(message.hidden_states, self, bridge, record, uncompressed), record

    def transmit_head(
        self, returned: torch.Tensor, record: CommunicationRecord, uncompressed_numel: int
    ) -> torch.Tensor:
        """The second cut of a U-shaped split: `returned` (what the server's last layer hands the client's head)
        comes down as `head_activations`, its gradient goes back up as `head_gradients` in backward, both charged
        in `record` and the ledger. `uncompressed_numel` is the size of what the uncompressed U-shaped split would
        return (the CLS row, or every token, of every sample)."""
        uncompressed = self.activation_bytes(uncompressed_numel)
        record.uncompressed_uplink_bytes += uncompressed
        record.uncompressed_downlink_bytes += uncompressed
        return _HeadCut.apply(returned, self, record, uncompressed)
