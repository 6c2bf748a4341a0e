"""The client's end of a split whose server half runs in another process: its link and its split model.

One training micro-batch is one round trip, and an optimizer step adds none, so that the two processes compute
exactly what one process does at the floor of exact synchronous training (protocol version 5):

    client                                              server
    FORWARD  bridge's wire tensors, labels; smoothing;  -> unpack, decode, server half, loss; backward at once
             the agreed seed (1 / k micro-batches,          from the seed (checked), keeps the server half's
             times the loss scale under fp16); k            gradients
             the loss; the gradient in the bridge's     <- GRADIENT
             wire form; after the step's last
             micro-batch, the server's gradient norms
    and per optimizer step, with no reply:
    STEP     the norm of each client gradient, max norm -> the same global norm, clip, optimizer and schedule step
                                                           (before the next FORWARD is read)

The client forms the global norm as one process does (the norm of all per-tensor norms, client's first, then the
server's, then a U-shaped split's head), from the same float32 norms as the server, so clipping is identical. If the
Trainer's backward asks for a seed other than the agreed one (a loss reweighted after the model), the client raises
before any gradient is applied: the server back-propagated the agreed seed.

A U-shaped split (`label_privacy`, `RemoteUSplitViT`) keeps the labels, the head and the loss here, so its
micro-batch needs the head's gradient before the server's backward: two round trips, and none per step:

    FORWARD  bridge's wire tensors, no labels; rows; k  -> unpack, decode, the middle
             the head's input                           <- HEAD (head_activations)
    HEAD_BACKWARD the head's gradient of it              -> backward through the middle
             the gradient in the bridge's wire form     <- GRADIENT (and the server's norms after the last)

Every value that crosses is charged: the bridge's tensors as in one process, and the link's own control values
(smoothing, seed, loss, max norm as float64; the norms as float32) under `control`. Evaluation sends the activations
(EVAL) and gets the logits (LOGITS), charged apart in `link.inference_ledger`. The server keeps its own optimizer
and schedule, made from the same `TrainingArguments` (the handshake checks that both sides agree on them), for the
`max_steps` the client announces (BEGIN), and saves its half when the client checkpoints (SAVE) and at the end (END).
"""

import math
from collections import deque
from datetime import timedelta

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from ..bridges import Bridge
from ..link import CommunicationRecord, Link, nbytes
from ..split import SplitViTForImageClassification, SplitViTOutput
from ..ushape import USplitViTForImageClassification
from .connect import Connection
from .server_half import global_norm, server_side_parameters
from .settings import drop_modules
from .wire import Kind, WireError, json_tensor


class SeedMismatch(RuntimeError):
    """The Trainer's backward asked for a seed other than the one the server back-propagated."""


def _check_seed(asked: float, agreed: float) -> None:
    if not math.isclose(asked, agreed, rel_tol=1e-6):
        raise SeedMismatch(
            f"the backward asks for a seed of {asked}; the server back-propagated the agreed {agreed} (1 / the "
            "step's micro-batches, times the loss scale under fp16) in the same round trip as the forward. A loss "
            "reweighted after the model (a custom compute_loss, loss weights) cannot cross in one round trip: keep "
            "the model's loss as the Trainer scales it, or weight the samples in the data."
        )


class _Reply:
    """A FORWARD's answer, once it has come: the gradient of what went up, in the bridge's wire form."""

    def __init__(self, record: CommunicationRecord, loss: torch.Tensor | None = None):
        self.record, self.loss, self.gradient = record, loss, None


class _RemoteLoss(torch.autograd.Function):
    """The server's loss as a function of what the client sent; its gradient came with the loss (GRADIENT), for the
    agreed seed, which backward checks."""

    @staticmethod
    def forward(ctx, activations, bridge, context, reply, seed, loss):
        ctx.bridge, ctx.context, ctx.reply, ctx.seed = bridge, context, reply, seed
        ctx.device, ctx.dtype = activations.device, activations.dtype
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        _check_seed(float(grad_loss), ctx.seed)
        if ctx.reply.gradient is None:
            raise RuntimeError("a backward before its FORWARD's reply was read (RemoteLink.receive_reply).")
        gradient = ctx.bridge.unpack_gradient(ctx.reply.gradient, ctx.context).to(ctx.device, ctx.dtype)
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
        last = link.micro_batch == link.step_micro_batches
        wire = link.receive_gradient(dict(link.peer.recv(Kind.GRADIENT).tensors), last)
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
        self.num_norms = 0  # the client's gradient norms a STEP carries (its trainable tensors)
        self.num_head_norms = 0  # the last of them: a U-shaped split's head
        self.num_server_norms = 0  # the server's, which come down with the step's last gradient
        self.seed, self.step_micro_batches = 1.0, 1  # the agreed backward seed, and the step's micro-batches
        self.micro_batch = 0  # micro-batches of this step sent so far
        self.server_norms: torch.Tensor | None = None
        self.defer_replies = False  # pipelined: FORWARDs go out and their replies are read later (`receive_reply`)
        self.awaited: deque[_Reply] = deque()  # FORWARDs whose replies are still to be read, oldest first

    @property
    def pipelines(self) -> bool:
        """The standard split's FORWARDs may run ahead of their replies; a U-shaped split's need the head's
        gradient first."""
        return not self.ushaped

    def backward_seed(self, seed: float, micro_batches: int) -> None:
        """What the next micro-batch's backward seed will be and how many micro-batches its step has (the Trainer's:
        1 / k, times its loss scale): the server back-propagates that seed as soon as the forward comes."""
        if not 1 <= micro_batches <= 2**31 or not math.isfinite(seed) or seed <= 0:
            raise ValueError(f"backward seed {seed} for {micro_batches} micro-batches: a positive seed and 1 .. 2**31.")
        self.seed, self.step_micro_batches = seed, micro_batches

    @property
    def control_bytes(self) -> tuple[int, int]:
        """Per micro-batch, by topology: `STANDARD_CONTROL_BYTES` or `USHAPED_CONTROL_BYTES`."""
        return USHAPED_CONTROL_BYTES if self.ushaped else STANDARD_CONTROL_BYTES

    @property
    def step_control_bytes(self) -> tuple[int, int]:
        """Up: a float32 norm per client gradient and the float64 max norm; down: a float32 norm per server
        gradient (with the step's last micro-batch)."""
        return 4 * self.num_norms + 8, 4 * self.num_server_norms

    def _next_micro_batch(self) -> int:
        """Counts the micro-batch about to go up; returns the step's micro-batch count, as FORWARD announces it."""
        self.micro_batch += 1
        if self.micro_batch > self.step_micro_batches:
            raise RuntimeError(
                f"micro-batch {self.micro_batch} of a step of {self.step_micro_batches}: call optimizer_step (the "
                "Trainer does) or announce the step's micro-batches with backward_seed."
            )
        return self.step_micro_batches

    def receive_gradient(self, tensors: dict[str, torch.Tensor], last: bool) -> dict[str, torch.Tensor]:
        """A GRADIENT's wire tensors through the channel, the server's norms taken out after the step's `last`
        micro-batch (float32, one per server gradient) and charged as step control."""
        norms = tensors.pop("norm", None)
        if last != (norms is not None):
            when = "did not come with" if last else "came before"
            raise WireError(f"the server's gradient norms {when} the step's last micro-batch.")
        if norms is not None:
            if norms.dtype != torch.float32 or norms.shape != (self.num_server_norms,):
                raise WireError(f"the server's norms must be {self.num_server_norms} float32; got {norms.dtype} "
                                f"{tuple(norms.shape)}.")  # fmt: skip
            self.server_norms = norms
            self.ledger.downlink_bytes += nbytes(norms)
            self.ledger.uncompressed_downlink_bytes += nbytes(norms)
        return self.send(tensors)

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
        """Sends `message` up with the agreed seed; returns the server's loss (whose backward applies the gradient
        that comes with it) and the record. Unless `defer_replies`, the reply is read at once; otherwise
        `receive_reply` reads it (and sets the loss's value) before its backward."""
        uncompressed = self.activation_bytes(activations_numel)
        record = CommunicationRecord(
            uncompressed_uplink_bytes=uncompressed + nbytes(labels) + self.control_bytes[0],
            uncompressed_downlink_bytes=uncompressed + self.control_bytes[1],
        )
        micro_batches, seed = self._next_micro_batch(), self.seed
        wire, context = bridge.pack(message.hidden_states.detach())
        wire = self.send(wire)
        sent_labels = message.labels.to(self.wire_dtype) if message.labels.is_floating_point() else message.labels
        tensors = {**wire, "labels": sent_labels, "seed": torch.tensor(seed, dtype=torch.float64)}
        self.peer.send(Kind.FORWARD, tensors, step=micro_batches, value=label_smoothing)
        record.uplink.update({name: nbytes(tensor) for name, tensor in wire.items()})
        record.uplink.update(labels=nbytes(sent_labels), control=self.control_bytes[0])
        self.ledger.uplink_bytes += record.uplink_bytes
        self.ledger.uncompressed_uplink_bytes += record.uncompressed_uplink_bytes
        reply = _Reply(record)
        placeholder = torch.zeros((), dtype=torch.float32, device=message.hidden_states.device)
        reply.loss = _RemoteLoss.apply(message.hidden_states, bridge, context, reply, seed, placeholder)
        self.awaited.append(reply)
        if not self.defer_replies:
            self.receive_reply()
        return reply.loss, record

    def receive_reply(self) -> None:
        """Reads the oldest FORWARD's reply (GRADIENT): the loss's value, the gradient for its backward, and the
        server's norms after the step's last micro-batch; charges what came."""
        reply = self.awaited.popleft()
        frame = self.peer.recv(Kind.GRADIENT, timeout=self.reply_timeout)
        last = self.micro_batch == self.step_micro_batches and not self.awaited
        reply.gradient = self.receive_gradient(dict(frame.tensors), last)
        record = reply.record
        record.downlink.update({name: nbytes(tensor) for name, tensor in reply.gradient.items()})
        record.downlink["control"] = self.control_bytes[1]
        self.ledger.downlink_bytes += record.downlink_bytes
        self.ledger.uncompressed_downlink_bytes += record.uncompressed_downlink_bytes
        with torch.no_grad():
            reply.loss.fill_(frame.value)

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
        micro_batches = self._next_micro_batch()
        wire, context = bridge.pack(message.hidden_states.detach())
        wire = self.send(wire)
        self.peer.send(Kind.FORWARD, wire, step=micro_batches, value=float(message.labels.shape[0]))
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
        """The global norm, formed here from the client's norms (in parameter order; `num_norms` of them) and the
        server's (which came with the step's last gradient), as the server forms it; sends the client's norms up
        (STEP, no reply: the server clips by the same norm and steps before it reads the next FORWARD)."""
        if client_norms.numel() != self.num_norms:
            raise ValueError(
                f"expected {self.num_norms} gradient norms, one per client parameter; got {client_norms.numel()}."
            )
        if self.server_norms is None or self.micro_batch != self.step_micro_batches:
            raise RuntimeError(
                f"an optimizer step after {self.micro_batch} of its {self.step_micro_batches} micro-batches: the "
                "server's gradient norms come with the last."
            )
        total = global_norm(client_norms.detach(), self.server_norms, self.num_head_norms)
        self.peer.send(Kind.STEP, {"norm": client_norms.detach().float()}, value=max_norm)
        self.server_norms, self.micro_batch = None, 0
        up = self.step_control_bytes[0]
        self.ledger.uplink_bytes += up
        self.ledger.uncompressed_uplink_bytes += up
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
        link.num_server_norms = sum(1 for p in server_side_parameters(split) if p.requires_grad)
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
        link.num_server_norms = sum(1 for p in server_side_parameters(split) if p.requires_grad)
        bridge = drop_modules(split.bridge, split.bridge.server_modules)
        super().__init__(split.client, None, split.head, bridge, link)
        link.ushaped = True
        link.num_norms = sum(1 for parameter in self.parameters() if parameter.requires_grad)
        link.num_head_norms = sum(1 for parameter in self.head.parameters() if parameter.requires_grad)

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
