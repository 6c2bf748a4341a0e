"""How the clients of a federation share the one server half and keep their client halves in step.

A schedule is one class with one small interface, used from both ends: the federated server calls its server-side
methods (with `federation`'s lock, `condition`, held where they touch shared state) to answer SYNC, TURN and
HANDOFF; a client's `FederationCallback` calls its client-side methods from the Trainer. A new schedule is a new
class registered in `SCHEDULES` (and in the wire's `SCHEDULE_NAMES`), not new branches.

The server-side methods read and write the federation's shared state: `members` (a `Membership`), `half` (the
current client half, None before the first sync), `half_values` (its size), `aggregate` (the averaging rule),
`round`, `sync_transfers`, and call `round_done()` when a round every live client took part in is over (the
federation checkpoints there).
"""

import logging
import time
from typing import ClassVar

from ..wire import Refused, WireError
from .halves import check_half
from .plan import SCHEDULE_NAMES

logger = logging.getLogger(__name__)


class Schedule:
    """The interface; see the module docstring. `federation` is None on a client."""

    name: ClassVar[str]
    sends_half_on_sync: ClassVar[bool]  # a client's SYNC carries its half up

    def __init__(self, federation=None):
        self.federation = federation

    # -- planning and checkpoints --------------------------------------------------------------------------

    def final_bytes(self, half_bytes: int) -> int:
        """Bytes each client's half costs after the last round (beyond the rounds' own)."""
        return 0

    def start(self, client_ids: list[int]) -> None:
        """Training begins with these clients (or resumes with `state` restored)."""

    def state(self) -> dict:
        """What a federation checkpoint records of the schedule."""
        return {"turn": None}

    def restore(self, state: dict) -> None:
        """Takes back what `state` gave."""

    # -- server side ---------------------------------------------------------------------------------------

    def sync(self, member, weights) -> dict:
        """Answers a client's SYNC (its half, or None): waits for the round, returns the reply's tensors."""
        raise NotImplementedError

    def take_turn(self, member) -> dict:
        """Answers TURN."""
        raise WireError(f"the {self.name} schedule has no turns: TURN is out of place.")

    def hand_off(self, member, weights) -> None:
        """Answers HANDOFF."""
        raise WireError(f"the {self.name} schedule has no turns: HANDOFF is out of place.")

    def dropped(self, member) -> None:
        """A member was dropped (the federation's condition is held)."""

    def check_step(self, member) -> None:
        """Refuses a member's optimizer step the schedule does not allow it now."""

    def _end_round(self, member, what: str) -> None:
        """A member's round ends (`what`: its SYNC or HANDOFF) after exactly its `sync_every` steps, else the
        session is refused: a half that no round of training made is never averaged in or handed on."""
        every = self.federation.sync_every
        if member.steps_since_sync != every:
            raise WireError(
                f"client {member.client_id}'s {what} came after {member.steps_since_sync} optimizer steps; a round is "
                f"{every}."
            )
        member.steps_since_sync = 0

    def _current_half(self, transfers: int) -> dict:
        """The tail of every sync: the federation's failure, or the current half for the reply (counting
        `transfers` halves crossed)."""
        federation = self.federation
        if federation.members.failure:
            raise Refused(federation.members.failure)
        if federation.half is None:
            return {}
        federation.sync_transfers += transfers
        return {"weights": federation.half}

    # -- client side ---------------------------------------------------------------------------------------

    def client_step_begin(self, link) -> None:
        """Before each optimizer step of a client."""

    def client_round_end(self, link, step: int, samples: int) -> None:
        """After the client's last step of a round (`samples` it trained on in it)."""
        raise NotImplementedError

    def client_train_end(self, link) -> None:
        """After the client's last step."""


class SplitFed(Schedule):
    """The clients train at once; the server takes their optimizer steps in arrival order, and every `sync_every`
    steps each sends its half up (SYNC) and all get back the average weighted by shard size (FedAvg)."""

    name = "splitfed"
    sends_half_on_sync = True

    def __init__(self, federation=None):
        super().__init__(federation)
        self.round_halves: dict = {}

    def sync(self, member, weights) -> dict:
        federation = self.federation
        members = federation.members
        if weights is None:
            raise WireError("a SplitFed SYNC must carry the client half.")
        self._end_round(member, "SYNC")
        target = member.synced_round + 1
        self.round_halves[member.client_id] = check_half(weights, federation.half_values, member.client_id)
        member.synced_round = target
        members.condition.notify_all()
        deadline = time.monotonic() + members.round_timeout
        while federation.round < target and not members.failure:
            waiting = [m for m in members.live() if m.synced_round < target and not m.finished]
            if not waiting:
                self._average(target)
                break
            if not members.condition.wait(timeout=max(deadline - time.monotonic(), 0)):
                members.drop_laggards(lambda m: m.synced_round < target and not m.finished)
        if not member.live:  # its own half was charged with breaking the average, or it lagged
            raise Refused(f"client {member.client_id} was dropped from the federation: {member.drop_reason}.")
        return self._current_half(0)  # counted with the average, before its checkpoint

    def _average(self, round_number: int) -> None:
        """The round's average (`federation.guard`: each update bounded, a half that breaks the client half charged
        to its member, who is dropped)."""
        federation, members = self.federation, self.federation.members
        sent = [m for m in members.live() if m.client_id in self.round_halves]
        halves = {m.client_id: self.round_halves[m.client_id] for m in sent}
        current = federation.current_half()
        guarded = federation.guard.average(current, halves, {m.client_id: m.shard_size for m in sent},
                                           federation.aggregate)  # fmt: skip
        federation.half = guarded.half
        for member in sent:
            member.update_scales.append(guarded.scales[member.client_id])
        self.round_halves.clear()
        federation.sync_transfers += 2 * len(sent)  # each half up, and the average back down
        for client_id in guarded.charged:
            members.drop(members.get(client_id), "its half makes the client half's activations NaN or Inf")
        federation.round = round_number
        federation.round_done()
        federation.members.condition.notify_all()

    def client_round_end(self, link, step: int, samples: int) -> None:
        link.sync(samples=samples)


class Sequential(Schedule):
    """Vanilla split learning: the clients take turns of `sync_every` optimizer steps in client-id order; a turn
    starts with the current client half coming down (TURN) and ends with it going back up (HANDOFF). At the end
    every client receives the final half (SYNC)."""

    name = "sequential"
    sends_half_on_sync = False

    def __init__(self, federation=None):
        super().__init__(federation)
        self.turn: int | None = None
        self.holder: int | None = None  # the client that took the turn (TURN) and has not handed it off
        self.turn_started = 0.0
        self.in_turn = False  # a client's: it holds its turn

    def final_bytes(self, half_bytes: int) -> int:
        return half_bytes + 8  # the final half down, with its sample count up

    def start(self, client_ids: list[int]) -> None:
        self.turn = min(client_ids)
        self.turn_started = time.monotonic()

    def state(self) -> dict:
        return {"turn": self.turn}

    def restore(self, state: dict) -> None:
        self.turn = state["turn"]
        self.turn_started = time.monotonic()

    def sync(self, member, weights) -> dict:
        """The end: once a member has taken every step of its plan, it waits for the others' last turns (each turn
        on the clock that `take_turn` keeps: a holder that takes over the round timeout is dropped, the others go
        on) and gets the final half."""
        members = self.federation.members
        if member.steps != member.planned_steps or self.holder == member.client_id:
            raise WireError(
                f"client {member.client_id}'s final SYNC came after {member.steps} of its {member.planned_steps} "
                "steps (or inside its turn): a client syncs once its turns are over."
            )
        member.finished_turns = True
        if self.turn == member.client_id:
            self._advance()
        while not all(m.finished_turns for m in members.live()) and not members.failure:
            if not members.condition.wait(timeout=1.0):
                self._drop_a_stalled_holder()
        members.condition.notify_all()
        return self._current_half(1 + (weights is not None))

    def _drop_a_stalled_holder(self) -> None:
        """Drops the member whose turn it is if the turn has lasted over the round timeout."""
        members = self.federation.members
        holder = members.get(self.turn)
        if holder is not None and holder.live and time.monotonic() - self.turn_started > members.round_timeout:
            members.drop(holder, f"it held its turn over {members.round_timeout:.0f} s")

    def take_turn(self, member) -> dict:
        federation = self.federation
        members = federation.members
        if self.holder == member.client_id:
            raise WireError(f"client {member.client_id} asked for the turn it holds (a turn ends with HANDOFF).")
        while self.turn != member.client_id and not members.failure:
            if self.turn is None:
                raise Refused(f"every turn of this federation is taken: client {member.client_id} has none left.")
            if not members.condition.wait(timeout=1.0):
                self._drop_a_stalled_holder()
        if members.failure:
            raise Refused(members.failure)
        self.turn_started = time.monotonic()
        self.holder = member.client_id
        if federation.half is None:
            return {}
        federation.sync_transfers += 1
        return {"weights": federation.half}

    def hand_off(self, member, weights) -> None:
        federation = self.federation
        if self.turn != member.client_id or self.holder != member.client_id:
            raise WireError(f"client {member.client_id} handed off outside its turn.")
        self._end_round(member, "HANDOFF")
        self.holder = None
        federation.half = check_half(weights, federation.half_values, member.client_id).clone()
        federation.sync_transfers += 1
        round_number = federation.round
        self._advance()
        if federation.round > round_number:
            federation.round_done()

    def check_step(self, member) -> None:
        if self.holder != member.client_id:
            raise WireError(f"client {member.client_id} took a step outside its turn (a turn starts with TURN).")

    def dropped(self, member) -> None:
        if self.holder == member.client_id:
            self.holder = None
        if self.turn == member.client_id:
            self._advance()

    def _advance(self) -> None:
        """The next live client (in id order, cyclically) that still has turns to take."""
        federation = self.federation
        candidates = sorted(m.client_id for m in federation.members.live() if not m.finished_turns)
        after = [cid for cid in candidates if cid > (self.turn if self.turn is not None else -1)]
        if not after:
            federation.round += 1  # every live client has had its turn of this round
        self.turn = (after or candidates or [None])[0]
        self.turn_started = time.monotonic()
        federation.members.condition.notify_all()

    def client_step_begin(self, link) -> None:
        if not self.in_turn:
            link.take_turn()
            self.in_turn = True

    def client_round_end(self, link, step: int, samples: int) -> None:
        link.hand_off(step)
        self.in_turn = False

    def client_train_end(self, link) -> None:
        link.sync(samples=0)


SCHEDULES: dict[str, type[Schedule]] = {schedule.name: schedule for schedule in (Sequential, SplitFed)}
assert tuple(SCHEDULES) == SCHEDULE_NAMES, "every schedule needs its place in the wire's SCHEDULE_NAMES"


def make_schedule(name: str, federation=None) -> Schedule:
    """The schedule called `name`, for a federated server (`federation`) or a client (None)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r} is unknown: choose one of {', '.join(SCHEDULES)}.")
    return SCHEDULES[name](federation)
