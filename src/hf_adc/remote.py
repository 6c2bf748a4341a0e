"""Split learning across processes: the client's link over the wire, the client-side split, and the server.

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

The global norm is computed as one process computes it (the norm of all per-tensor norms, client's first), so
clipping is identical too.

Every value that crosses is charged: the bridge's tensors as in one process, and the link's own control values
(smoothing, seed, loss, max and global norm as float64 in the message header; the client's norms as float32)
under `control`. Evaluation sends the activations (EVAL) and gets the logits (LOGITS), charged apart in
`link.inference_ledger`. The server keeps its own optimizer and schedule, made from
the same `TrainingArguments` (the handshake checks that both sides agree on them), for the `max_steps` the
client announces (BEGIN), and saves its half when the client checkpoints (SAVE) and at the end (END).
"""

import hmac
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainingArguments, get_scheduler

from .bridges import Bridge
from .link import CommunicationRecord, Link, nbytes, wire_dtype_name
from .split import SERVER_BRIDGE_WEIGHTS_NAME, SplitViTForImageClassification, SplitViTOutput
from .transport import Channel, Kind, PeerLost, Refused, WireError, json_tensor, tensor_json

logger = logging.getLogger(__name__)

SERVER_WEIGHTS_NAME = "server_state.safetensors"
TRAINING_SETTINGS = (
    "learning_rate", "weight_decay", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "optim",
    "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon", "seed",
)  # fmt: skip


def session_settings(split: SplitViTForImageClassification, args: TrainingArguments) -> dict:
    """What client and server must agree on: the split, the compression, the wire, and the optimizer settings."""
    config = (split.client or split.server).config
    return {
        "num_hidden_layers": config.num_hidden_layers,
        "split_layer": config.split_layer,
        "hidden_size": config.hidden_size,
        "num_tokens": (config.image_size // config.patch_size) ** 2 + 1,
        "num_labels": config.num_labels,
        "labels": [config.id2label[i] for i in range(config.num_labels)],
        "compression": config.compression,
        "wire_dtype": wire_dtype_name(split.link.wire_dtype),
        "channel": asdict(split.link.channel) if split.link.channel else None,
        **{name: plain(getattr(args, name)) for name in TRAINING_SETTINGS},
    }


def plain(value):
    """`value` as JSON gives it back (enums as their strings), so that settings compare as they travel."""
    return json.loads(json.dumps(value, default=str))


def checkpoint_every(args: TrainingArguments, max_steps: int) -> int | None:
    """The Trainer's save interval in steps for a run of `max_steps` (None: it saves no checkpoints)."""
    if args.save_strategy != "steps":
        return None
    return math.ceil(max_steps * args.save_steps) if args.save_steps < 1 else int(args.save_steps)


def differing_settings(client: dict, server: dict) -> list[str]:
    """One line per setting on which the two sides disagree."""
    return [
        f"{name}: client {client.get(name)!r}, server {server.get(name)!r}"
        for name in sorted(set(client) | set(server))
        if name not in ("token", "federation") and client.get(name) != server.get(name)
    ]


def drop_modules(bridge: Bridge, names: tuple[str, ...]) -> Bridge:
    """`bridge` without the submodules (dotted names) that run on the other side."""
    for name in names:
        parent, _, child = name.rpartition(".")
        delattr(bridge.get_submodule(parent), child)
    return bridge


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


class RemoteLink(Link):
    """The client's end of a cut that crosses to a server process over `peer` (a `Channel`).

    Like `Link` it casts floating-point tensors to the wire dtype and applies the channel (to what arrives, both
    ways), and charges every tensor in `ledger`; the server half runs in the other process.
    """

    control_bytes = (16, 8)  # up: label smoothing, backward seed; down: the loss (float64 each)
    reply_timeout: timedelta | None = None  # the wait for a reply that may queue behind others (None: the channel's)

    def __init__(self, peer: Channel, channel=None, wire_dtype: str | torch.dtype = "float32"):
        super().__init__(channel, wire_dtype)
        self.peer = peer
        self.num_norms = 0

    @property
    def step_control_bytes(self) -> tuple[int, int]:
        """Up: a float32 norm per client gradient and the float64 max norm; down: the float64 global norm."""
        return 4 * self.num_norms + 8, 8

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
        """The server's logits for (eval-mode) activations; charged in `inference_ledger`."""
        activations = self.send({"activations": hidden_states})["activations"]
        self.peer.send(Kind.EVAL, {"activations": activations})
        logits = self.send(self.peer.recv(Kind.LOGITS, timeout=self.reply_timeout).tensors)["logits"]
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


class SplitServer:
    """The server's side: answers one client session at a time over a `Listener`.

    `build(labels)` makes the split for the class names a client announces (the server keeps the server half and
    the server's part of the bridge, and drops the rest); the session goes on only if `session_settings` of that
    split and `args` equal the client's, and the join token matches. Sessions refused at the handshake (a bad
    header, a wrong token, a mismatched split) leave the server waiting for the next client. `serve` returns once
    a client has trained to the end (END), or when the client training with it is lost (its last checkpoint kept).

    A client that resumes from its `checkpoint-N` makes the server load its own `checkpoint-N` from `output_dir`,
    or from `resume_from` when given (whose step must then be the client's).
    """

    def __init__(
        self,
        build: Callable[[list[str]], SplitViTForImageClassification],
        args: TrainingArguments,
        output_dir: str | Path,
        join_token: str | None = None,
        resume_from: str | Path | None = None,
    ):
        self.build = build
        self.args = args
        self.output_dir = Path(output_dir)
        self.join_token = join_token
        self.resume_from = None if resume_from is None else Path(resume_from)
        if self.resume_from is not None and not self.resume_from.is_dir():
            raise ValueError(f"resume_from_checkpoint={str(resume_from)!r} is not a folder.")
        self.split = None
        self.optimizer = None
        self.scheduler = None
        self.steps = 0

    def serve(self, listener, accept_seconds: float | None = None) -> dict:
        """Serves clients from `listener` until one finishes training or is lost mid-training. `accept_seconds`
        bounds the wait for each next client (None: wait for ever)."""
        while True:
            deadline = None if accept_seconds is None else time.monotonic() + accept_seconds
            try:
                accepted = listener.accept(deadline=deadline)
            except PeerLost as error:
                logger.warning("%s; waiting for the next client.", error)
                continue
            if accepted is None:
                return {"status": "no client", "steps": self.steps}
            session, channel = accepted
            try:
                self._handshake(channel)
            except (WireError, Refused, PeerLost) as error:
                logger.warning("Session %d refused: %s", session, error)
                channel.refuse(str(error))
                continue
            logger.info("Session %d joined.", session)
            try:
                return self._train(channel)
            except Refused as error:
                logger.warning("Session %d refused: %s", session, error)
                channel.refuse(str(error))
                continue
            except (PeerLost, WireError) as error:
                logger.error("Session %d lost: %s. The last checkpoint in %s is kept.", session, error, self.output_dir)
                channel.refuse(str(error))
                traffic = vars(channel.traffic)
                return {"status": "client lost", "error": str(error), "steps": self.steps, "traffic": traffic}

    def _handshake(self, channel: Channel) -> None:
        self._accept_settings(self._hello(channel))
        channel.send(Kind.WELCOME)

    def _hello(self, channel: Channel) -> dict:
        """The client's settings, once its join token checks out."""
        settings = tensor_json(channel.recv(Kind.HELLO).tensors["settings"])
        token = settings.get("token")
        if self.join_token is not None and not hmac.compare_digest(str(token), self.join_token):
            raise Refused("wrong join token.")
        return settings

    def _accept_settings(self, settings: dict) -> None:
        """Refuses settings that differ from this server's; adopts the split the first client's labels describe."""
        if settings.get("federation"):
            raise Refused(
                f"the client expects a federation of {settings['federation'].get('num_clients')} clients; this "
                "server serves one (start it with --num_clients)."
            )
        labels = settings.get("labels")
        if not isinstance(labels, list) or not labels or not all(isinstance(name, str) for name in labels):
            raise Refused(f"the client's labels {labels!r} are not a list of class names.")
        split = self.split if self.split is not None else self.build(labels)
        differences = differing_settings(settings, session_settings(split, self.args))
        if differences:
            raise Refused("the split settings differ: " + "; ".join(differences))
        if self.split is None:
            self._adopt(split)

    def _adopt(self, split: SplitViTForImageClassification) -> None:
        """Keeps the server's side of the split (the server half and its side of the bridge)."""
        split.client = None
        drop_modules(split.bridge, split.bridge.client_modules)
        self.split = split

    def _make_optimizer(self, max_steps: int) -> None:
        model = nn.ModuleDict({"server": self.split.server, "bridge": self.split.bridge})
        decay = set(Trainer.get_decay_parameter_names(None, model))
        named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_class(groups, **optimizer_kwargs)
        self.scheduler = get_scheduler(
            self.args.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=self.args.get_warmup_steps(max_steps),
            num_training_steps=max_steps,
            scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
        )

    def _checkpoint_dir(self, step: int) -> Path:
        return self.output_dir / f"checkpoint-{step}"

    def _save_checkpoint(self, step: int) -> None:
        folder = self._checkpoint_dir(step)
        folder.mkdir(parents=True, exist_ok=True)
        state = {f"server.{k}": v for k, v in self.split.server.state_dict().items()}
        state.update({f"bridge.{k}": v for k, v in self.split.bridge.state_dict().items()})
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, folder / SERVER_WEIGHTS_NAME)
        torch.save(self.optimizer.state_dict(), folder / "server_optimizer.pt")
        torch.save(self.scheduler.state_dict(), folder / "server_scheduler.pt")

    def _resume_folder(self, step: int) -> Path:
        """The server checkpoint to resume from for a client resuming at `step` (0: starting afresh)."""
        if self.resume_from is not None:
            saved = re.fullmatch(r"checkpoint-(\d+)", self.resume_from.name)
            if saved is None or int(saved.group(1)) != step:
                raise Refused(
                    f"the client resumes from step {step}, the server from {self.resume_from}: resume both sides from "
                    "the same step's checkpoint-N."
                )
            return self.resume_from
        return self._checkpoint_dir(step)

    def _load_checkpoint(self, folder: Path) -> None:
        """The server half, its side of the bridge, the optimizer and the schedule saved in `folder`."""
        if not (folder / SERVER_WEIGHTS_NAME).exists():
            raise Refused(f"the server has no checkpoint in {folder}: resume both sides from a step both saved.")
        state = load_file(folder / SERVER_WEIGHTS_NAME)
        self.split.server.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("server.")})
        self.split.bridge.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("bridge.")})
        self.optimizer.load_state_dict(torch.load(folder / "server_optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / "server_scheduler.pt", weights_only=True))

    def _train(self, channel: Channel) -> dict:
        pending = None
        while True:
            message = channel.recv(Kind.BEGIN, Kind.FORWARD, Kind.BACKWARD, Kind.STEP, Kind.EVAL, Kind.SAVE, Kind.END)
            tensors = message.tensors
            if message.kind == Kind.BEGIN:
                max_steps, global_step = tensors["scalars"].tolist()
                self._make_optimizer(max_steps)
                if global_step or self.resume_from is not None:
                    self._load_checkpoint(self._resume_folder(global_step))
                self.steps = global_step
                channel.send(Kind.DONE)
            elif message.kind == Kind.FORWARD:
                pending = self._answer_forward(channel, message)
            elif message.kind == Kind.BACKWARD:
                pending = self._answer_backward(channel, message, pending)
            elif message.kind == Kind.STEP:
                total = self._optimizer_step(tensors["norm"], message.value)
                channel.send(Kind.NORM, value=float(total))
            elif message.kind == Kind.EVAL:
                channel.send(Kind.LOGITS, self._logits(tensors["activations"]))
            elif message.kind == Kind.SAVE:
                self._save_checkpoint(message.step)
                channel.send(Kind.DONE)
            else:
                self._save_final()
                channel.send(Kind.DONE)
                return {"status": "finished", "steps": self.steps, "traffic": vars(channel.traffic)}

    def _answer_forward(self, channel: Channel, message) -> tuple:
        """FORWARD: the server half's loss on what came, sent back (LOSS); returns what BACKWARD needs."""
        wire = {name: tensor.to(self.split.server.device) for name, tensor in message.tensors.items()}
        pending = self._forward(wire, message.value, self.split.server.dtype)
        channel.send(Kind.LOSS, value=float(pending[2].detach()))
        return pending

    def _answer_backward(self, channel: Channel, message, pending: tuple | None) -> None:
        """BACKWARD: back-propagates the client's seed and sends the gradient of what came down (GRADIENT)."""
        if pending is None:
            raise WireError("a BACKWARD message came before any FORWARD.")
        received, context, loss = pending
        loss.backward(torch.tensor(message.value, dtype=loss.dtype, device=loss.device))
        channel.send(Kind.GRADIENT, self.split.link.send(self.split.bridge.pack_gradient(received.grad, context)))

    @torch.no_grad()
    def _logits(self, activations: torch.Tensor) -> dict[str, torch.Tensor]:
        """EVAL: the server half's logits for eval-mode activations, as they go down."""
        split = self.split
        split.server.eval()
        split.bridge.eval()
        hidden_states = activations.to(split.server.device, split.server.dtype)
        return split.link.send({"logits": split.server(split.bridge.decode(hidden_states)).logits})

    def _forward(self, tensors: dict[str, torch.Tensor], smoothing: float, dtype: torch.dtype):
        split = self.split
        split.server.train()
        split.bridge.train()
        labels = tensors.pop("labels")
        if not 0 <= smoothing < 1:
            raise WireError(f"label smoothing {smoothing} is out of range [0, 1).")
        config = split.server.config
        batch = labels.shape[0]
        shape = (batch, (config.image_size // config.patch_size) ** 2 + 1, config.hidden_size)
        try:
            context = split.bridge.receiver_context(tensors, shape, dtype)
            received = split.bridge.unpack(tensors, context).to(dtype).requires_grad_()
        except (KeyError, ValueError, RuntimeError) as error:  # a missing tensor, a shape that does not fit
            raise WireError(f"the activations do not fit the {type(split.bridge).__name__}: {error}") from error
        if labels.is_floating_point():
            targets = labels.float() / labels.float().sum(dim=1, keepdim=True)
        else:
            if int(labels.min()) < 0 or int(labels.max()) >= split.num_labels:
                raise WireError(f"labels out of range [0, {split.num_labels}).")
            targets = F.one_hot(labels, split.num_labels).float()
        targets = targets * (1 - smoothing) + smoothing / split.num_labels
        loss = split.server(split.bridge.decode(received), labels=targets).loss
        return received, context, loss

    def _optimizer_step(self, client_norms: torch.Tensor, max_norm: float) -> torch.Tensor:
        """Clips by the global norm and steps; the norm is the norm of every per-tensor norm in the one-process
        parameter order (client, bridge, server), as `torch.nn.utils.get_total_norm` forms it."""
        order = [*self.split.bridge.parameters(), *self.split.server.parameters()]
        parameters = [p for p in order if p.grad is not None]
        norms = [torch.nn.utils.get_total_norm([p.grad]) for p in parameters]
        total = torch.linalg.vector_norm(torch.stack([*client_norms.to(norms[0].device), *norms]))
        if math.isfinite(max_norm):
            torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
        if torch.isfinite(total):
            self.optimizer.step()
            self.scheduler.step()
            self.steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _save_final(self) -> None:
        """`server/` and the server side of the bridge: next to the client's `client/`, `bridge.safetensors` and
        `split_config.json`, a folder `SplitViTForImageClassification.from_pretrained` loads whole."""
        bridge = self.split.bridge
        self.split.server.save_pretrained(self.output_dir / "server")
        state = {
            name: tensor.detach().contiguous().cpu()
            for name, tensor in bridge.state_dict().items()
            if any(name.startswith(f"{module}.") for module in bridge.server_modules)
        }
        if state:
            save_file(state, self.output_dir / SERVER_BRIDGE_WEIGHTS_NAME)
