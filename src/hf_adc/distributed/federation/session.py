"""One client's session with the federated server: a table from message kind to handler, around the server half
that every client's optimizer step takes alone (`StepLock`)."""

import threading
import time
from collections import deque
from datetime import timedelta

import torch

from ..server import (
    Session,
    answer_eval,
    answer_forward,
    answer_head_backward,
    begin_scalars,
    required,
)
from ..server_half import ServerHalf
from ..wire import Frame, Kind, PeerLost, Refused, WireError
from .client import RESULT_FIELDS
from .members import Member

LEASE_MARGIN = 2.0  # seconds a waiter allows beyond the leases ahead of it: a holder past its lease is dropped first


class StepLock:
    """The server half, held by one session for a whole optimizer step, the sessions served in the order they asked.

    A step must fit in its lease: `lease` seconds from the moment its holder takes the half (its first FORWARD) to
    its STEP; `remaining()` is what is left of it, and bounds each of the holder's waits. A waiter waits at most one
    lease for each session ahead of it (the holder included) and `LEASE_MARGIN` more, so that a holder that overruns
    its lease is always dropped before an honest waiter gives up.
    """

    def __init__(self, lease: float):
        self.lease = lease
        self.condition = threading.Condition()
        self.owner: int | None = None  # the session number holding it
        self.deadline = 0.0  # when the holder's lease ends (`time.monotonic()`)
        self.line: deque[int] = deque()  # the sessions waiting, first come first served

    def take(self, session: int) -> None:
        """Takes the half for `session`'s step (at once if it holds it), or raises `PeerLost` past its wait."""
        with self.condition:
            if self.owner == session:
                return
            self.line.append(session)
            ahead = len(self.line) - 1 + (self.owner is not None)
            limit = ahead * self.lease + LEASE_MARGIN
            give_up = time.monotonic() + limit
            while self.owner is not None or self.line[0] != session:
                left = give_up - time.monotonic()
                if left <= 0:
                    self.line.remove(session)
                    self.condition.notify_all()
                    raise PeerLost(f"session {session} waited over {limit:.0f} s for the server half.")
                self.condition.wait(timeout=left)
            self.line.popleft()
            self.owner, self.deadline = session, time.monotonic() + self.lease

    def remaining(self) -> float:
        """Seconds left of the holder's lease."""
        return max(self.deadline - time.monotonic(), 0.0)

    def give_back(self) -> None:
        with self.condition:
            self.owner = None
            self.condition.notify_all()


class FederatedSession:
    """Answers one member's messages until it ends its session (END) or breaks it (an error, raised).

    `federation` gives the server half (`server_half`), the `step_lock`, the `members` and the `schedule`.
    """

    def __init__(self, federation, member: Member, session: Session):
        self.federation = federation
        self.member = member
        self.session = session
        self.handlers = {
            Kind.BEGIN: self._begin,
            Kind.FORWARD: self._forward,
            Kind.HEAD_BACKWARD: lambda frame: answer_head_backward(self.server_half, self.session, frame),
            Kind.STEP: self._step,
            Kind.EVAL: self._eval,
            Kind.SAVE: lambda frame: self.session.reply(Kind.DONE),  # the server saves at the ends of rounds
            Kind.SYNC: self._sync,
            Kind.TURN: self._turn,
            Kind.HANDOFF: self._hand_off,
            Kind.END: self._end,
        }

    @property
    def server_half(self) -> ServerHalf:
        return self.federation.server_half

    def run(self) -> None:
        """Answers the member's messages; while it holds the server half, each wait ends with its step's lease (a
        `PeerLost` that drops it: its whole step, not each message, must fit in the lease)."""
        step_lock = self.federation.step_lock
        while True:
            holding = step_lock.owner == self.session.number
            lease_left = timedelta(seconds=max(step_lock.remaining(), 0.001))
            by_lease = holding and lease_left <= self.session.connection.timeout
            try:
                frame = self.session.connection.recv(*self.handlers, timeout=lease_left if by_lease else None)
            except PeerLost as error:
                if not by_lease:
                    raise
                raise PeerLost(
                    f"client {self.member.client_id} held the server half past its lease of {step_lock.lease:.0f} s "
                    f"for one optimizer step ({error})"
                ) from error
            if not self.member.live:
                raise Refused(f"client {self.member.client_id} was dropped from the federation.")
            self.session.advance(frame)
            if self.handlers[frame.kind](frame):
                return

    def _begin(self, frame: Frame) -> None:
        start, planned = begin_scalars(frame)[1], self.member.resume_step
        if start != planned:
            raise Refused(f"client {self.member.client_id} begins at step {start}; it planned {planned}.")
        self.session.reply(Kind.DONE)

    def _check_step(self) -> None:
        """Refuses a step (at its first FORWARD, before the server half is taken, and at STEP) beyond the member's
        plan or round, or that its schedule does not allow it now (outside a sequential turn)."""
        member = self.member
        if member.steps >= member.planned_steps or member.steps_since_sync >= self.federation.sync_every:
            raise WireError(
                f"client {member.client_id} took a step beyond its plan ({member.planned_steps} steps, "
                f"{self.federation.sync_every} a round); it ends a round before its next step."
            )
        with self.federation.members.condition:
            self.federation.schedule.check_step(member)

    def _forward(self, frame: Frame) -> None:
        self._check_step()
        self.federation.step_lock.take(self.session.number)
        answer_forward(self.server_half, self.session, frame)

    def _step(self, frame: Frame) -> None:
        member = self.member
        self._check_step()
        step_lock = self.federation.step_lock
        step_lock.take(self.session.number)
        if not member.live:  # dropped meanwhile (its turn's clock ran out): its step is not applied (see `_drop`)
            raise Refused(f"client {member.client_id} was dropped from the federation.")
        self.server_half.optimizer_step(required(frame, "norm"), frame.value)  # no reply: the client has the norm
        step_lock.give_back()
        member.steps += 1
        member.steps_since_sync += 1

    def _eval(self, frame: Frame) -> None:
        step_lock = self.federation.step_lock
        step_lock.take(self.session.number)  # between steps only (the session's phase), so it holds no step
        try:
            answer_eval(self.server_half, self.session, frame)
        finally:
            step_lock.give_back()

    def _sync(self, frame: Frame) -> None:
        with self.federation.members.condition:
            reply = self.federation.schedule.sync(self.member, frame.tensors.get("weights"))
        self.session.reply(Kind.SYNC, reply)

    def _turn(self, frame: Frame) -> None:
        with self.federation.members.condition:
            reply = self.federation.schedule.take_turn(self.member)
        self.session.reply(Kind.TURN, reply)

    def _hand_off(self, frame: Frame) -> None:
        with self.federation.members.condition:
            self.federation.schedule.hand_off(self.member, required(frame, "weights"))
        self.session.reply(Kind.DONE)

    def _end(self, frame: Frame) -> bool:
        scalars = required(frame, "scalars")
        if scalars.dtype != torch.float64 or scalars.shape != (len(RESULT_FIELDS),):
            raise WireError(f"an END must carry {len(RESULT_FIELDS)} float64 results.")
        accuracies = scalars[[RESULT_FIELDS.index("test_accuracy"), RESULT_FIELDS.index("local_accuracy")]]
        if not bool(torch.isfinite(scalars).all()) or bool((scalars < 0).any()) or bool((accuracies > 1).any()):
            raise WireError(f"an END's results must be finite and >= 0, accuracies <= 1; got {scalars.tolist()}.")
        self.member.results = dict(zip(RESULT_FIELDS, scalars.tolist(), strict=True))
        with self.federation.members.condition:
            self.member.finished = True
            self.federation.members.condition.notify_all()
        self.session.reply(Kind.DONE)
        return True
