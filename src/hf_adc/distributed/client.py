"""The client's end of a split whose server half runs in another process: its link and its split model.

One training micro-batch is two round trips, so that the two processes compute exactly what one process does:

    client                                              server
    FORWARD  bridge's wire tensors, labels; smoothing   -> unpack, decode, server half, loss
             the loss                                   <- LOSS
    BACKWARD the seed autograd gives the loss            -> backward from that seed (1 / accumulation steps,
             (the Trainer's scaling, exactly)                times a loss scale under fp16), keeps the
             the gradient in the bridge's wire form     <- GRADIENT   server half's gradients
    and per optimizer step:
    STEP     the norm of each client gradient, max norm -> global norm, clip, optimizer and schedule step
             the global norm (the client clips by it)   <- NORM

A U-shaped split (`label_privacy`, `RemoteUSplitViT`) keeps the labels, the head and the loss here:

    FORWARD  bridge's wire tensors, no labels; rows     -> unpack, decode, the middle
             the head's input                           <- HEAD (head_activations)
    HEAD_BACKWARD the head's gradient of it              -> backward through the middle
             the gradient in the bridge's wire form     <- GRADIENT

The global norm is computed as one process computes it (the norm of all per-tensor norms, client's first), so
clipping is identical too.

Every value that crosses is charged: the bridge's tensors as in one process, and the link's own control values
(smoothing, seed, loss, max and global norm as float64 in the message header; the client's norms as float32)
under `control`. Evaluation sends the activations (EVAL) and gets the logits (LOGITS), charged apart in
`link.inference_ledger`. The server keeps its own optimizer and schedule, made from the same `TrainingArguments`
(the handshake checks that both sides agree on them), for the `max_steps` the client announces (BEGIN), and saves
its half when the client checkpoints (SAVE) and at the end (END).
"""

from datetime import timedelta

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from ..bridges import Bridge
from ..link import CommunicationRecord, Link, nbytes
from ..split import SplitViTForImageClassification, SplitViTOutput
from ..ushape import USplitViTForImageClassification
from .connect import Connection
from .settings import drop_modules
from .wire import Kind, WireError, json_tensor


class _RemoteLoss(torch.autograd.Function):
    """The server's loss as a function of what the client sent: backward asks the server for the gradient."""

    @staticmethod
    def forward(ctx, activations, link, bridge, context, record, loss):
        ctx.link, ctx.bridge, ctx.context, ctx.record = link, bridge, context, record
        ctx.device, ctx.dtype = activations.device, activations.dtype
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        link = ctx.link
        link.peer.send(Kind.BACKWARD, value=float(grad_loss))
        wire = link.send(link.peer.recv(Kind.GRADIENT).tensors)
        ctx.record.downlink.update({name: nbytes(tensor) for name, tensor in wire.items()})
        ctx.record.downlink["control"] = link.control_bytes[1]
        link.ledger.downlink_bytes += ctx.record.downlink_bytes
        link.ledger.uncompressed_downlink_bytes += ctx.record.uncompressed_downlink_bytes
        gradient = ctx.bridge.unpack_gradient(wire, ctx.context).to(ctx.device, ctx.dtype)
        return gradient, None, None, None, None, None


class _RemoteMiddle(torch.autograd.Function):
    """A U-shaped split's server middle as a function of what the client sent: forward is what came down
    (`head_activations`); backward sends the head's gradient of it up (HEAD_BACKWARD) and brings the gradient of
    the cut down through the bridge (GRADIENT)."""

    @staticmethod
    def forward(ctx, activations, link, bridge, context, record, returned, uncompressed_gradient_bytes):
        ctx.link, ctx.bridge, ctx.context, ctx.record = link, bridge, context, record
        ctx.device, ctx.dtype, ctx.uncompressed = activations.device, activations.dtype, uncompressed_gradient_bytes
        return returned.clone()

    @staticmethod
    def backward(ctx, grad_returned):
        link, record = ctx.link, ctx.record
        sent = link.send({"head_gradients": grad_returned.detach()})
        link.peer.send(Kind.HEAD_BACKWARD, sent)
        record.uplink["head_gradients"] = nbytes(sent["head_gradients"])
        link.ledger.uplink_bytes += record.uplink["head_gradients"]
        wire = link.send(link.peer.recv(Kind.GRADIENT).tensors)
        record.downlink.update({name: nbytes(tensor) for name, tensor in wire.items()})
        link.ledger.downlink_bytes += sum(nbytes(tensor) for tensor in wire.values())
        link.ledger.uncompressed_downlink_bytes += ctx.uncompressed
        gradient = ctx.bridge.unpack_gradient(wire, ctx.context).to(ctx.device, ctx.dtype)
        return gradient, None, None, None, None, None, None


# (up, down) control bytes per micro-batch: label smoothing and the backward seed up, the loss down (float64 each);
# a U-shaped split's: the row count of what FORWARD carries up (float64), nothing down (the client has the loss).
STANDARD_CONTROL_BYTES = (16, 8)
USHAPED_CONTROL_BYTES = (8, 0)


class RemoteLink(Link):
    """The client's end of a cut that crosses to a server process over `peer` (a `Connection`).

    Like `Link` it casts floating-point tensors to the wire dtype and applies the channel (to what arrives, both
    ways), and charges every tensor in `ledger`; the server half runs in the other process.
    """

    ushaped = False  # a U-shaped split's link (`RemoteUSplitViT` sets it): no labels, no loss, a head round trip
    peer_steps = True  # the server's half steps with ours: clipping spans both ends (`optimizer_step`)
    reply_timeout: timedelta | None = None  # the wait for a reply that may queue behind others (None: the channel's)

    def __init__(self, peer: Connection, channel=None, wire_dtype: str | torch.dtype = "float32"):
        super().__init__(channel, wire_dtype)
        self.peer = peer
        self.num_norms = 0

    @property
    def control_bytes(self) -> tuple[int, int]:
        """Per micro-batch, by topology: `STANDARD_CONTROL_BYTES` or `USHAPED_CONTROL_BYTES`."""
        return USHAPED_CONTROL_BYTES if self.ushaped else STANDARD_CONTROL_BYTES

    @property
    def step_control_bytes(self) -> tuple[int, int]:
        """Up: a float32 norm per client gradient and the float64 max norm; down: the float64 global norm."""
        return 4 * self.num_norms + 8, 8

    def trainer_callbacks(self, args) -> list[TrainerCallback]:
        """Tells the server where training starts and when to checkpoint (`PeerCallback`)."""
        return [PeerCallback(self)]

    def join(self, settings: dict, token: str | None) -> float:
        """The handshake: sends the settings and the join token; raises `Refused` with the server's reason. Returns
        the WELCOME's value (a federation's round timeout)."""
        self.peer.send(Kind.HELLO, {"settings": json_tensor({**settings, "token": token})})
        return self.peer.recv(Kind.WELCOME).value

    def begin(self, max_steps: int, global_step: int) -> None:
        """Tells the server the schedule's length and the step training starts from (a resumed checkpoint's)."""
        self.peer.send(Kind.BEGIN, {"scalars": torch.tensor([max_steps, global_step])})
        self.peer.recv(Kind.DONE)

    def train_step(
        self, message, bridge: Bridge, activations_numel: int, labels: torch.Tensor, label_smoothing: float
    ) -> tuple[torch.Tensor, CommunicationRecord]:
        """Sends `message` up; returns the server's loss (its backward fetches the gradient) and the record."""
        uncompressed = self.activation_bytes(activations_numel)
        record = CommunicationRecord(
            uncompressed_uplink_bytes=uncompressed + nbytes(labels) + self.control_bytes[0],
            uncompressed_downlink_bytes=uncompressed + self.control_bytes[1],
        )
        wire, context = bridge.pack(message.hidden_states.detach())
        wire = self.send(wire)
        sent_labels = message.labels.to(self.wire_dtype) if message.labels.is_floating_point() else message.labels
        self.peer.send(Kind.FORWARD, {**wire, "labels": sent_labels}, value=label_smoothing)
        record.uplink.update({name: nbytes(tensor) for name, tensor in wire.items()})
        record.uplink.update(labels=nbytes(sent_labels), control=self.control_bytes[0])
        self.ledger.uplink_bytes += record.uplink_bytes
        self.ledger.uncompressed_uplink_bytes += record.uncompressed_uplink_bytes
        device = message.hidden_states.device
        reply = self.peer.recv(Kind.LOSS, timeout=self.reply_timeout)
        loss = torch.tensor(reply.value, dtype=torch.float32, device=device)
        return _RemoteLoss.apply(message.hidden_states, self, bridge, context, record, loss), record

    def head_step(
        self, message, bridge: Bridge, activations_numel: int, head_numel: int
    ) -> tuple[torch.Tensor, CommunicationRecord]:
        """A U-shaped split's forward across the two cuts: sends `message`'s activations up (no labels), returns
        what came down for the head (`head_activations`, whose backward sends its gradient up and brings the cut's
        gradient down) and the record. `activations_numel` and `head_numel` size the uncompressed U-shaped split's
        two cuts, as `Link.transmit_activations` and `Link.transmit_head` count them."""
        uncompressed, head = self.activation_bytes(activations_numel), self.activation_bytes(head_numel)
        control_up, _ = self.control_bytes
        record = CommunicationRecord(
            uncompressed_uplink_bytes=uncompressed + head + control_up, uncompressed_downlink_bytes=uncompressed + head
        )
        wire, context = bridge.pack(message.hidden_states.detach())
        wire = self.send(wire)
        self.peer.send(Kind.FORWARD, wire, value=float(message.labels.shape[0]))
        record.uplink.update({name: nbytes(tensor) for name, tensor in wire.items()})
        record.uplink["control"] = control_up
        self.ledger.uplink_bytes += record.uplink_bytes
        self.ledger.uncompressed_uplink_bytes += record.uncompressed_uplink_bytes
        returned = self.send(self.peer.recv(Kind.HEAD, timeout=self.reply_timeout).tensors)
        if set(returned) != {"head_activations"}:
            raise WireError(f"a HEAD must carry head_activations only; got {sorted(returned)}.")
        returned = returned["head_activations"]
        record.downlink["head_activations"] = nbytes(returned)
        self.ledger.downlink_bytes += nbytes(returned)
        self.ledger.uncompressed_downlink_bytes += head
        device = message.hidden_states.device
        returned = returned.to(device)
        output = _RemoteMiddle.apply(message.hidden_states, self, bridge, context, record, returned, uncompressed)
        return output, record

    def optimizer_step(self, client_norms: torch.Tensor, max_norm: float) -> torch.Tensor:
        """Sends the norm of each client gradient (in parameter order; `num_norms` of them); the server clips by
        the global norm and steps. Returns that norm."""
        if client_norms.numel() != self.num_norms:
            raise ValueError(
                f"expected {self.num_norms} gradient norms, one per client parameter; got {client_norms.numel()}."
            )
        self.peer.send(Kind.STEP, {"norm": client_norms.detach().float()}, value=max_norm)
        total = torch.tensor(self.peer.recv(Kind.NORM).value, dtype=torch.float32)
        up, down = self.step_control_bytes
        self.ledger.uplink_bytes += up
        self.ledger.downlink_bytes += down
        self.ledger.uncompressed_uplink_bytes += up
        self.ledger.uncompressed_downlink_bytes += down
        return total

    def evaluate(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The server's logits for (eval-mode) activations (a U-shaped split's: its head's input); charged in
        `inference_ledger`."""
        activations = self.send({"activations": hidden_states})["activations"]
        self.peer.send(Kind.EVAL, {"activations": activations})
        kind, name = (Kind.HEAD, "head_activations") if self.ushaped else (Kind.LOGITS, "logits")
        reply = self.send(self.peer.recv(kind, timeout=self.reply_timeout).tensors)
        if name not in reply:
            raise WireError(f"a {kind.name} must carry {name}.")
        logits = reply[name]
        for ledger_field, size in (("uplink_bytes", nbytes(activations)), ("downlink_bytes", nbytes(logits))):
            setattr(self.inference_ledger, ledger_field, getattr(self.inference_ledger, ledger_field) + size)
            uncompressed = f"uncompressed_{ledger_field}"
            setattr(self.inference_ledger, uncompressed, getattr(self.inference_ledger, uncompressed) + size)
        return logits.to(hidden_states.device)

    def checkpoint(self, global_step: int) -> None:
        """Asks the server to save its half, optimizer and schedule as of `global_step`."""
        self.peer.send(Kind.SAVE, step=global_step)
        self.peer.recv(Kind.DONE)

    def finish(self) -> None:
        """Ends the session: the server saves its final half and stops."""
        self.peer.send(Kind.END)
        self.peer.recv(Kind.DONE)
        self.peer.close()


class PeerCallback(TrainerCallback):
    """Tells the server where training starts (the schedule's length, a resumed step) and when to checkpoint, so
    both sides save the same steps. The server saves first (at the end of the step, before the Trainer writes and
    rotates its own checkpoints): a server that cannot write its checkpoint stops the client before the client
    writes or deletes anything, so both keep their last common step."""

    def __init__(self, link: RemoteLink):
        self.link = link

    def on_train_begin(self, args, state, control, **kwargs):
        self.link.begin(state.max_steps, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.link.checkpoint(state.global_step)


class RemoteSplitViT(SplitViTForImageClassification):
    """The client's side of a split whose server half runs in another process, reached through a `RemoteLink`.

    It holds the client half and the client's part of the bridge; `forward` is that of the one-process split
    (training returns the server's loss, with the gradient coming back in backward; eval returns the server's
    logits), so `ADCTrainer` trains it unchanged. `save_pretrained` writes the client's side only.
    """

    def __init__(self, split: SplitViTForImageClassification, link: RemoteLink):
        bridge = drop_modules(split.bridge, split.bridge.server_modules)
        super().__init__(split.client, None, bridge, link)
        link.num_norms = sum(1 for parameter in self.parameters() if parameter.requires_grad)

    def forward(self, pixel_values, labels=None, interpolate_pos_encoding=False, label_smoothing=0.0):
        hidden_states, message = self._client_side(pixel_values, labels, interpolate_pos_encoding, label_smoothing)
        if not self.training:
            logits = self.link.evaluate(message.hidden_states)
            loss = None if labels is None else F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
            return SplitViTOutput(loss=loss, logits=logits)
        if labels is None:
            raise ValueError("A training step needs labels: the server computes the loss. Call .eval() to infer.")
        loss, record = self.link.train_step(message, self.bridge, hidden_states.numel(), labels, label_smoothing)
        return SplitViTOutput(
            loss=loss, cluster_ids=message.cluster_ids, token_indices=message.token_indices, communication=record
        )


class RemoteUSplitViT(USplitViTForImageClassification):
    """The client's side of a U-shaped split (`label_privacy`) whose middle runs in another process: the bottom, the
    client's part of the bridge and the head. Forward sends the activations (no labels), takes back what the head
    needs (HEAD), and computes the targets, the logits and the loss here; eval the same, with no compression.
    `save_pretrained` writes the client's parts (`client/`, `head/`); the server writes `server/`."""

    def __init__(self, split: USplitViTForImageClassification, link: RemoteLink):
        bridge = drop_modules(split.bridge, split.bridge.server_modules)
        super().__init__(split.client, None, split.head, bridge, link)
        link.ushaped = True
        link.num_norms = sum(1 for parameter in self.parameters() if parameter.requires_grad)

    def forward(self, pixel_values, labels=None, interpolate_pos_encoding=False, label_smoothing=0.0):
        hidden_states, message = self._client_side(pixel_values, labels, interpolate_pos_encoding, label_smoothing)
        if not self.training:
            logits = self.head(self.link.evaluate(message.hidden_states).to(self.head.dtype)).logits
            loss = None if labels is None else F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
            return SplitViTOutput(loss=loss, logits=logits)
        if labels is None:
            raise ValueError("A training step needs labels: the client's head computes the loss. Call .eval() to infer")
        targets = self._targets(message.labels, label_smoothing)  # the client's own, never sent
        batch_size, num_tokens, hidden_size = hidden_states.shape
        head_numel = batch_size * self.head_tokens(num_tokens) * hidden_size
        returned, record = self.link.head_step(message, self.bridge, hidden_states.numel(), head_numel)
        rows, tokens = message.labels.shape[0], self.head_tokens(num_tokens)
        if (
            returned.dim() != 3
            or returned.shape[0] != rows
            or returned.shape[2] != hidden_size
            or not (
                1 <= returned.shape[1] <= tokens
                and returned.is_floating_point()
                and bool(torch.isfinite(returned).all())
            )
        ):
            raise WireError(f"the server's head_activations of {returned.dtype} {tuple(returned.shape)} are not "
                            f"finite floats of ({rows}, 1 .. {tokens}, {hidden_size}).")  # fmt: skip
        return self._head_output(returned, targets, message, record)


def remote_model(split: SplitViTForImageClassification, link: RemoteLink) -> RemoteSplitViT | RemoteUSplitViT:
    """The client's side of `split` over `link`, for either topology."""
    if isinstance(split, USplitViTForImageClassification):
        return RemoteUSplitViT(split, link)
    return RemoteSplitViT(split, link)
