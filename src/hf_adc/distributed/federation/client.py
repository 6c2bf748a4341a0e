"""A client of a federation: its link keeps its client half in step with the others' through the server, and a
Trainer callback runs the schedule's client side (turns, or averaging every `sync_every` steps)."""

from datetime import timedelta

import torch
from transformers import TrainerCallback

from ...link import nbytes
from ..client import RemoteLink
from ..connect import Connection
from ..wire import Kind
from .halves import client_side_tensors, half_size, half_vector, load_half_vector
from .plan import FederationPlan, plan_from_scalars
from .schedules import Schedule, make_schedule

RESULT_FIELDS = (
    "uplink_bytes", "downlink_bytes", "sync_bytes", "total_bytes", "uncompressed_bytes", "steps", "test_accuracy",
    "local_accuracy",
)  # fmt: skip


def result_scalars(results: dict) -> torch.Tensor:
    """A client's results as the END message's scalars (float64)."""
    return torch.tensor([float(results.get(name) or 0.0) for name in RESULT_FIELDS], dtype=torch.float64)


class FederatedLink(RemoteLink):
    """A client's `RemoteLink` that also synchronises its client half with the other clients' through the server.

    The server plans this client's steps (`plans_steps`): `plan_steps` sends PLAN and keeps the reply in `plan`. A
    reply that waits on the other clients (the plan, a round's average, a turn, the server half taken by another
    client's step) is awaited for the connection's timeout plus the server's round timeout (it comes with WELCOME):
    by then the server has dropped the client everyone waited for, and answered."""

    plans_steps = True

    def __init__(self, peer: Connection, client_id: int, channel=None, wire_dtype="float32"):
        super().__init__(peer, channel, wire_dtype)
        self.client_id = client_id
        self.tensors: list[torch.Tensor] = []
        self.plan: FederationPlan | None = None
        self.schedule: Schedule | None = None

    def join(self, settings: dict, token: str | None) -> float:
        round_timeout = super().join(settings, token)
        self.reply_timeout = self.peer.timeout + timedelta(seconds=round_timeout)
        return round_timeout

    def attach(self, split, with_head: bool = False) -> None:
        """The client half this link synchronises: `split`'s client side (and its head, `with_head`)."""
        self.tensors = client_side_tensors(split, with_head)

    def trainer_callbacks(self, args) -> list[TrainerCallback]:
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
        return [*super().trainer_callbacks(args), FederationCallback(self, batch)]

    @property
    def half_bytes(self) -> int:
        return half_size(self.tensors) * 4

    @property
    def sync_transfers(self) -> int:
        """Client halves sent or received so far (a resumed checkpoint's included: they are in the ledger)."""
        return self.ledger.sync_bytes // self.half_bytes if self.half_bytes else 0

    def _charge_sync(self, up: bool, down: bool, value: bool = True) -> None:
        """Each half that crossed under `sync`; the value sent with it (samples, steps: float64) under control."""
        self.ledger.sync_bytes += (int(up) + int(down)) * self.half_bytes
        self.ledger.uplink_bytes += 8 * value
        self.ledger.uncompressed_uplink_bytes += 8 * value

    def _receive_half(self, frame) -> bool:
        if "weights" not in frame.tensors:
            return False
        load_half_vector(self.tensors, frame.tensors["weights"])
        return True

    def plan_steps(self, shard_size: int, step_bytes: int, epoch_bytes: int, resume_step: int = 0) -> int:
        """Announces this client's shard, costs, and the step of the checkpoint it resumes from (0: none); keeps the
        server's plan in `plan` and returns its steps, and loads the current client half if one comes with it (a
        client that rejoins afresh)."""
        scalars = torch.tensor([self.client_id, shard_size, step_bytes, self.half_bytes, epoch_bytes, resume_step])
        self.peer.send(Kind.PLAN, {"scalars": scalars})
        frame = self.peer.recv(Kind.PLAN, timeout=self.reply_timeout)
        for direction, tensor in (("uplink", scalars), ("downlink", frame.tensors["scalars"])):
            for field in (f"{direction}_bytes", f"uncompressed_{direction}_bytes"):
                setattr(self.ledger, field, getattr(self.ledger, field) + nbytes(tensor))
        if self._receive_half(frame):
            self.ledger.sync_bytes += self.half_bytes
        self.plan = plan_from_scalars(frame.tensors["scalars"])
        self.schedule = make_schedule(self.plan.schedule)
        return self.plan.max_steps

    def sync(self, samples: int) -> None:
        """Sends this half if the schedule does (SplitFed) and loads the half that comes back (the federation's
        average; under the sequential schedule, at the end, the final half)."""
        tensors = {"weights": half_vector(self.tensors)} if self.schedule.sends_half_on_sync else {}
        self.peer.send(Kind.SYNC, tensors, value=float(samples))
        received = self._receive_half(self.peer.recv(Kind.SYNC, timeout=self.reply_timeout))
        self._charge_sync(up=bool(tensors), down=received)

    def finish(self, results: dict | None = None) -> None:
        """Ends the session, reporting this client's bytes and accuracy to the server."""
        self.peer.send(Kind.END, {"scalars": result_scalars(results or {})})
        self.peer.recv(Kind.DONE)
        self.peer.close()

    def take_turn(self) -> None:
        """Sequential: waits for this client's turn; loads the current half (none before the first hand-off)."""
        self.peer.send(Kind.TURN)
        received = self._receive_half(self.peer.recv(Kind.TURN, timeout=self.reply_timeout))
        self._charge_sync(up=False, down=received, value=False)

    def hand_off(self, steps: int) -> None:
        """Sequential: sends this half up at the end of a turn."""
        self.peer.send(Kind.HANDOFF, {"weights": half_vector(self.tensors)}, value=float(steps))
        self.peer.recv(Kind.DONE)
        self._charge_sync(up=True, down=False)


class FederationCallback(TrainerCallback):
    """Runs the schedule's client side from the Trainer: before each step, after every `sync_every` optimizer steps
    (and the last), and at the end."""

    def __init__(self, link: FederatedLink, batch_size: int):
        self.link = link
        self.batch_size = batch_size

    def on_step_begin(self, args, state, control, **kwargs):
        self.link.schedule.client_step_begin(self.link)

    def on_step_end(self, args, state, control, **kwargs):
        plan = self.link.plan
        if state.global_step % plan.sync_every and state.global_step < state.max_steps:
            return
        self.link.schedule.client_round_end(self.link, state.global_step, plan.sync_every * self.batch_size)

    def on_train_end(self, args, state, control, **kwargs):
        self.link.schedule.client_train_end(self.link)
