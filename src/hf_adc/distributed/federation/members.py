"""Who is in a federation: the server's view of each client, the checks a joining client must pass, and drops."""

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ...ushape import USplitViTForImageClassification
from ..client import STANDARD_CONTROL_BYTES, USHAPED_CONTROL_BYTES
from ..wire import Refused, Traffic

logger = logging.getLogger(__name__)


@dataclass
class Member:
    """The server's view of one client."""

    client_id: int
    shard_size: int = 0
    step_bytes: int = 0
    half_bytes: int = 0
    epoch_bytes: int = 0
    live: bool = True
    joined: bool = True  # False: a client of a resumed checkpoint, expected back
    resume_step: int = 0  # the step of the client's own checkpoint it resumed from
    finished: bool = False  # sent END
    finished_turns: bool = False  # sequential: took all its turns
    synced_round: int = 0
    results: dict = field(default_factory=dict)  # what the client reported at END (its own ledger)
    steps: int = 0  # optimizer steps it took in this session (STEPs the server answered)
    steps_since_sync: int = 0  # since its last round ended (SYNC, HANDOFF)
    planned_steps: int = 0  # the steps its plan gave it, from its resume step
    counted_uplink_bytes: int = 0  # what the server's connections received from it in ended sessions, framing included
    counted_downlink_bytes: int = 0  # and sent to it
    traffic: Traffic | None = None  # its live session's connection counts
    connection: object = None  # its live session's `Connection` (a drop interrupts the session's wait)
    update_scales: list[float] = field(default_factory=list)  # each SplitFed round: below 1, its update was clipped
    drop_reason: str | None = None  # why it was dropped, the last time it was

    def counted(self) -> tuple[int, int]:
        """(up, down) bytes of every frame the server's connections carried for this member, its live session's
        included: the server's own count, whatever the member reports."""
        live = self.traffic or Traffic()
        return (
            self.counted_uplink_bytes + live.payload_received + live.framing_received,
            self.counted_downlink_bytes + live.payload_sent + live.framing_sent,
        )

    def session_ended(self) -> None:
        """Folds the live session's counts into the ended sessions'."""
        self.counted_uplink_bytes, self.counted_downlink_bytes = self.counted()
        self.traffic = None


MAX_PROCESSES = 1024  # a client's processes (DDP ranks) a step's cost may be announced for
MAX_SHARD_SIZE = 2**31  # rows; a FedAvg weight beyond any real shard is refused at join
SAVED_MEMBER_FIELDS = (
    "client_id", "shard_size", "step_bytes", "half_bytes", "epoch_bytes", "live", "counted_uplink_bytes",
    "counted_downlink_bytes",
)  # fmt: skip


class Membership:
    """The members, the condition every wait on the others goes through, and the drops.

    `on_drop(member)` is called (with the condition held) for each member dropped, so that the schedule can pass
    its turn on. Fewer than `min_clients` live members once `planned` sets `failure`, which ends the federation.
    """

    def __init__(self, num_clients: int, min_clients: int, round_timeout: float, on_drop: Callable = lambda m: None):
        self.num_clients = num_clients
        self.min_clients = min_clients
        self.round_timeout = round_timeout
        self.on_drop = on_drop
        self.condition = threading.Condition()
        self.members: dict[int, Member] = {}
        self.drops: list[int] = []  # every client dropped, in order (a rejoined client stays listed)
        self.rejoined: list[int] = []  # clients that came back afresh after being dropped
        self.failure: str | None = None
        self.planned = False

    def get(self, client_id: int | None) -> Member | None:
        return self.members.get(client_id)

    def live(self) -> list[Member]:
        return [m for m in self.members.values() if m.live]

    def all_done(self) -> bool:
        """Every member finished or was dropped (once training was planned)."""
        return self.planned and all(not m.live or m.finished for m in self.members.values())

    def drop(self, member: Member, reason: str = "it broke the protocol or was lost") -> None:
        """Takes `member` out (once) for `reason`, tells the schedule, and fails the federation below
        `min_clients`."""
        if member.live:
            member.live = False
            member.drop_reason = reason
            self.drops.append(member.client_id)
            logger.warning("Client %d dropped: %s.", member.client_id, reason)
            self.on_drop(member)
            if member.connection is not None:  # its session ends now, freeing its slot for the rejoin
                member.connection.interrupt(
                    Refused(f"client {member.client_id} was dropped from the federation: {reason}.")
                )
        if len(self.live()) < self.min_clients and self.planned:
            self.failure = f"fewer than min_clients={self.min_clients} clients left."
        self.condition.notify_all()

    def drop_laggards(self, lagging: Callable[[Member], bool]) -> None:
        """Drops every live member for which `lagging` holds (it missed a round by `round_timeout`)."""
        for laggard in [m for m in self.live() if lagging(m)]:
            self.drop(laggard, f"it missed the round by {self.round_timeout:.0f} s")

    def admit(
        self,
        client_id: int,
        shard_size: int,
        costs: tuple[int, int, int],
        expected_half_bytes: int,
        resume_step: int,
        resumed_step: int | None,
        federation_round: int,
    ) -> tuple[Member, Member | None]:
        """The member for a client's PLAN (`costs`: step, half and epoch bytes), refused with the reason when its id
        is out of range or taken, it comes after the start without having been a member, its half has another size,
        or it resumes from a step the federation did not (`resumed_step`: the server's, None if it did not resume).
        Returns the member and the one it replaces (a rejoining or resuming client), if any."""
        if not 0 <= client_id < self.num_clients:
            raise Refused(f"client_id={client_id} is out of range: 0 .. {self.num_clients - 1}.")
        existing = self.members.get(client_id)
        if existing is not None and existing.joined and existing.live and not existing.finished:
            raise Refused(f"client {client_id} is already training in this federation.")
        if existing is not None and existing.finished:
            raise Refused(f"client {client_id} has finished its training in this federation.")
        if self.planned and existing is None:
            raise Refused(f"the federation started without client {client_id}; only dropped clients rejoin.")
        step_bytes, half_bytes, epoch_bytes = costs
        if not 1 <= shard_size <= MAX_SHARD_SIZE:
            raise Refused(f"client {client_id}'s shard of {shard_size} rows is out of range: 1 .. {MAX_SHARD_SIZE}.")
        if min(costs) < 0:
            raise Refused(f"client {client_id}'s costs {costs} (step, half, epoch bytes) must be >= 0.")
        if half_bytes != expected_half_bytes:
            raise Refused(f"the client half has {half_bytes} bytes; this server's has {expected_half_bytes}.")
        if resume_step:
            self._check_resume(client_id, existing, shard_size, resume_step, resumed_step)
        elif existing is not None and shard_size != existing.shard_size:
            raise Refused(
                f"client {client_id} rejoins with a shard of {shard_size} rows; it joined with {existing.shard_size} "
                "(a shard is fixed at join)."
            )
        member = Member(client_id, shard_size, step_bytes, half_bytes, epoch_bytes, resume_step=resume_step)
        if existing is not None:
            member.synced_round = federation_round
            member.counted_uplink_bytes, member.counted_downlink_bytes = existing.counted()  # earlier sessions' frames
            if not resume_step:
                self.rejoined.append(client_id)
            how = f"resumed from step {resume_step}" if resume_step else "rejoined"
            logger.info("Client %d %s at round %d.", client_id, how, federation_round)
        self.members[client_id] = member
        self.condition.notify_all()
        return member, existing

    @staticmethod
    def _check_resume(client_id, existing: Member | None, shard_size: int, resume_step: int, resumed_step) -> None:
        """A client resuming from its checkpoint-N needs the server resumed from its own checkpoint-N."""
        if resumed_step is None:
            raise Refused(
                f"client {client_id} resumes from step {resume_step}, but this server did not resume the federation: "
                f"start serve.py with --resume_from_checkpoint .../checkpoint-{resume_step}."
            )
        if resume_step != resumed_step:
            raise Refused(
                f"client {client_id} resumes from step {resume_step}; the federation resumed from step "
                f"{resumed_step}: resume every client from its checkpoint-{resumed_step}."
            )
        if existing is None or existing.joined:
            raise Refused(f"client {client_id} was not in the federation at step {resume_step}, or resumed already.")
        if shard_size != existing.shard_size:
            raise Refused(
                f"client {client_id} has a shard of {shard_size} rows; at step {resume_step} it had "
                f"{existing.shard_size}: resume with the same data, partition and seed."
            )


def certified_client_id(peer_name: str | None, num_clients: int) -> int | None:
    """The client id a certificate names (`client-N`, N < num_clients); None over plaintext. Anything else is
    refused before the session's HELLO can shape any shared state."""
    if peer_name is None:
        return None
    match = re.fullmatch(r"client-(\d{1,9})", peer_name)
    if match is None or int(match.group(1)) >= num_clients:
        raise Refused(
            f"the certificate of {peer_name!r} names no client of this federation (client-0 .. "
            f"client-{num_clients - 1}): provision federation members with --num_clients."
        )
    return int(match.group(1))


def check_plan_costs(split, args, num_client_norms: int, num_server_norms: int, client_id: int, shard_size: int,
                     step_bytes: int, epoch_bytes: int) -> None:  # fmt: skip
    """The costs a PLAN announces, against what the server computes for the agreed split and batch (the plan
    is made from them: a client that understated them would make the federation overspend its budget). An
    epoch is the shard's uncompressed traffic exactly; a step at least one process's full batches with their
    control values and the step's norms both ways (more for a client of several processes, or a ragged batch that
    costs more)."""
    epoch = sum(split.wire_bytes(1, compressed=False)) * shard_size
    if epoch_bytes != epoch:
        raise Refused(
            f"client {client_id} announces {epoch_bytes} bytes for an uncompressed epoch of {shard_size} rows; "
            f"this split's is {epoch}."
        )
    ushaped = isinstance(split, USplitViTForImageClassification)
    up, down = USHAPED_CONTROL_BYTES if ushaped else STANDARD_CONTROL_BYTES
    micro_batch = sum(split.wire_bytes(args.per_device_train_batch_size)) + up + down
    least = micro_batch * args.gradient_accumulation_steps + 4 * num_client_norms + 8 + 4 * num_server_norms
    if not least <= step_bytes <= MAX_PROCESSES * least:
        raise Refused(
            f"client {client_id} announces {step_bytes} bytes a step; this split's is {least} for one process "
            f"(at most {MAX_PROCESSES} processes)."
        )
