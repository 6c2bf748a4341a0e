"""The federated server: one thread per client session around one server half, wired from small parts.

`Membership` (who is in, joins, drops), a `Schedule` (SplitFed or sequential: SYNC, TURN, HANDOFF), the round plan
(`plan_rounds`), FedAvg (`fedavg`), the checkpoint files (`checkpoint.py`), the results (`results.py`), each
client's `FederatedSession` (its messages; the FORWARD / BACKWARD / EVAL answers are the single-client server's) and
the `ServerHalf` (the compute, the optimizer, the half's files) are composed here.
"""

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..files import CheckpointError
from ..server import Session, check_split_settings, read_hello
from ..server_half import ServerHalf
from ..settings import checkpoint_every, differing_settings, plain
from ..wire import Kind, PeerLost, Refused, WireError
from .checkpoint import read_federation_state, resume_federation, save_federation_checkpoint
from .guard import DEFAULT_CLIP_FACTOR, AverageGuard
from .halves import AGGREGATIONS, client_side_tensors, half_size, half_vector, load_half_vector
from .members import Member, Membership, certified_client_id, check_plan_costs
from .plan import PLAN_BYTES, FederationPlan, PlanError, plan_rounds, plan_scalars
from .results import federation_results, save_federation
from .schedules import SCHEDULES, make_schedule
from .session import FederatedSession, StepLock

logger = logging.getLogger(__name__)

FEDERATION_ARGS = ("communication_budget", "budget_epochs", "max_steps", "save_strategy", "save_steps")


def check_federation_settings(args, schedule: str, num_clients: int, min_clients: int, sync_every: int,
                              round_timeout: float) -> None:  # fmt: skip
    """Refuses, naming the value and its range, settings a federation cannot honour."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is unknown: choose one of {', '.join(SCHEDULES)}.")
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients} is out of range: it must be >= 1.")
    if not 1 <= min_clients <= num_clients:
        raise ValueError(f"min_clients={min_clients} is out of range: 1 .. num_clients ({num_clients}).")
    if sync_every < 1:
        raise ValueError(f"sync_every={sync_every} is out of range: it must be >= 1 step.")
    if not round_timeout > 0:
        raise ValueError(f"round_timeout={round_timeout} is out of range: it must be > 0 seconds.")
    if args.save_strategy not in ("no", "steps"):
        raise ValueError(
            f"save_strategy={plain(args.save_strategy)!r}: a federation checkpoints at the end of rounds, so give "
            "'steps' (save_steps a multiple of sync_every) or 'no'."
        )
    if args.save_strategy == "steps" and (args.save_steps < 1 or args.save_steps % sync_every):
        raise ValueError(
            f"save_steps={args.save_steps} is out of range: a federation checkpoints at the end of rounds, so it "
            f"must be a whole multiple of sync_every={sync_every} steps."
        )


ROBUST_AGGREGATIONS = ("median", "trimmed_mean")  # they need an honest majority of at least 3 live members


def check_aggregation(aggregation: str, schedule: str, min_clients: int, clip_updates: float) -> None:
    """Refuses, naming the setting and its range, an averaging a federation cannot honour."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} is unknown: choose one of {', '.join(AGGREGATIONS)}.")
    if aggregation != "fedavg" and schedule != "splitfed":
        raise ValueError(
            f"aggregation={aggregation!r} averages a SplitFed round; the {schedule} schedule hands one half on "
            "and averages nothing: use --schedule splitfed, or aggregation fedavg."
        )
    if aggregation in ROBUST_AGGREGATIONS and min_clients < 3:
        raise ValueError(
            f"aggregation={aggregation!r} with min_clients={min_clients}: with fewer than 3 live members one member "
            "owns the median or the trimmed mean; give --min_clients 3 or more (the federation then ends once fewer "
            "are left), or use fedavg, whose updates are bounded (--clip_updates)."
        )
    if not clip_updates >= 0:
        raise ValueError(f"clip_updates={clip_updates} is out of range: it must be >= 0 (0: no bound).")


class FederatedServer:
    """The server for `num_clients` clients on `schedule`; one thread per session, one server half.

    `sync_every` optimizer steps make a turn (sequential) or an averaging round (SplitFed); a round or a turn waits
    at most `round_timeout` seconds for a client before dropping it; fewer than `min_clients` ends the federation.
    The plan's byte budget is `args`' (`communication_budget`, or `budget_epochs` of uncompressed traffic over all
    the clients' shards); without one, `args.max_steps` steps per client.

    Checkpoints: with `args.save_strategy="steps"` the server writes `checkpoint-N` at the end of every round whose
    step N is a multiple of `save_steps` (which must be a multiple of `sync_every`), as the clients do: the server
    half, its optimizer and schedule, the current client half, the plan and the round. `resume_from` (such a
    folder) restores it; its clients resume from their own `checkpoint-N` (announced in PLAN), and the rounds wait
    for them as for any client (`round_timeout`).

    A U-shaped split's heads stay with their clients unless `share_head` (then they are part of the client half).

    `aggregation` averages a SplitFed round's halves: `fedavg` (weighted by shard size), or `median` /
    `trimmed_mean` (coordinate-wise, unweighted: one member's half, however large its claimed shard, moves the
    result no further than an honest member's; they cost one sort of the clients' halves per round, and need
    `min_clients` >= 3). Whatever the rule, each member's update is first bounded to `clip_updates` times the
    round's median update, and a half that breaks the client half is charged to its sender (`guard.py`).
    """

    def __init__(
        self,
        build,
        args,
        output_dir,
        num_clients: int,
        schedule: str = "splitfed",
        sync_every: int = 10,
        round_timeout: float = 120.0,
        min_clients: int = 1,
        join_token: str | None = None,
        resume_from: str | Path | None = None,
        aggregation: str = "fedavg",
        share_head: bool = False,
        clip_updates: float = DEFAULT_CLIP_FACTOR,
    ):
        check_federation_settings(args, schedule, num_clients, min_clients, sync_every, round_timeout)
        check_aggregation(aggregation, schedule, min_clients, clip_updates)
        self.aggregation, self.aggregate, self.clip_updates = aggregation, AGGREGATIONS[aggregation], clip_updates
        self.guard: AverageGuard | None = None  # made with the server half
        self.share_head = share_head
        self.build, self.args, self.output_dir, self.join_token = build, args, Path(output_dir), join_token
        self.resume_from = None if resume_from is None else Path(resume_from)
        if self.resume_from is not None and not self.resume_from.is_dir():
            raise ValueError(f"resume_from_checkpoint={str(resume_from)!r} is not a folder.")
        self.num_clients, self.sync_every = num_clients, sync_every
        self.schedule = make_schedule(schedule, self)
        self.members = Membership(num_clients, min_clients, round_timeout, on_drop=self.schedule.dropped)
        self.step_lock = StepLock(round_timeout)  # one client's optimizer step (micro-batches and STEP) at a time
        self.server_half: ServerHalf | None = None
        self.plan: FederationPlan | None = None
        self.client_tensors: list[torch.Tensor] = []
        self.half: torch.Tensor | None = None  # the current client half (None until the first sync)
        self.round = 0
        self.sync_transfers = 0
        self.federation_settings: dict | None = None
        self.server_max_steps = 0  # the server's schedule: every client's steps
        settings = {"schedule": schedule, "num_clients": num_clients, "sync_every": sync_every}
        settings["share_head"] = share_head
        settings.update({name: plain(getattr(args, name)) for name in FEDERATION_ARGS})
        self.resumed_state = None if self.resume_from is None else read_federation_state(self.resume_from, settings)
        self.resumed_step = None if self.resumed_state is None else self.resumed_state["step"]
        self.resumed_at: float | None = None
        if self.resumed_state is not None:
            self.federation_settings = {"share_head": False, **self.resumed_state["federation_settings"]}

    @property
    def split(self):
        """The whole split this server holds (both halves: the client's is the federation's current one)."""
        return None if self.server_half is None else self.server_half.split

    def current_half(self) -> torch.Tensor:
        """The client half as it stands: the last average or hand-off, or before any the server's own copy."""
        return self.half if self.half is not None else half_vector(self.client_tensors)

    @property
    def half_values(self) -> int:
        """Values in the client half vector of this split."""
        return half_size(self.client_tensors)

    @property
    def steps(self) -> int:
        return 0 if self.server_half is None else self.server_half.steps

    # -- sessions ---------------------------------------------------------------------------------------------

    def serve(self, listener, accept_seconds: float | None = None) -> dict:
        """Accepts sessions until every client has finished or been dropped (or none came in `accept_seconds`)."""
        threads, started, members = [], time.monotonic(), self.members
        while True:
            with members.condition:
                if self.resumed_at is not None and time.monotonic() - self.resumed_at > members.round_timeout:
                    members.drop_laggards(lambda m: not m.joined)  # a resumed checkpoint's client that never came
                if members.all_done() or members.failure:
                    break
            try:
                accepted = listener.accept(deadline=time.monotonic() + 1.0)  # then look again whether it is over
            except PeerLost as error:
                logger.warning("%s; waiting for the next client.", error)
                continue
            if accepted is None:
                if accept_seconds is not None and not members.members and time.monotonic() - started > accept_seconds:
                    return {"status": "no client", "steps": self.steps}
                continue
            session = Session(*accepted, micro_batches=self.args.gradient_accumulation_steps)
            thread = threading.Thread(target=self._session, args=(session,), name=f"session-{session.number}")
            thread.daemon = True
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join(timeout=members.round_timeout)
        if self.half is not None:
            load_half_vector(self.client_tensors, self.half)
        self._save_final()
        return self.results()

    def _session(self, session: Session) -> None:
        member = None
        try:
            member = self._join(session)
            logger.info("Session %d: client %d joined.", session.number, member.client_id)
            session.ushaped = self.server_half.ushaped
            FederatedSession(self, member, session).run()
            session.connection.close()
        except Exception as error:  # noqa: BLE001 - whatever a session does wrong ends that session, never the server
            member = member or session.member  # admitted, then lost before its plan went out
            if not isinstance(error, (WireError, Refused, PeerLost)):
                logger.exception("Session %d broke the server's expectations", session.number)
                error = WireError(f"the server could not handle this session's message ({type(error).__name__}).")
            if member is None:
                logger.warning("Session %d refused: %s", session.number, error)
            self._drop(member, session, str(error))
            session.connection.refuse(str(error))
        finally:
            if member is not None:
                with self.members.condition:
                    member.session_ended()

    def _drop(self, member: Member | None, session: Session, reason: str) -> None:
        """Takes a lost session out: frees the server half if it was mid-step (its partial gradients discarded), and
        drops its member for `reason`."""
        with self.members.condition:
            if self.step_lock.owner == session.number:
                self.server_half.discard_gradients()
                self.step_lock.give_back()
            if member is not None:
                self.members.drop(member, reason)

    def _join(self, session: Session) -> Member:
        """HELLO (the settings), WELCOME, PLAN: admits the client, waits for the others (or `round_timeout`), and
        answers with the plan (and the current client half for a client rejoining afresh)."""
        connection, members = session.connection, self.members
        certified = certified_client_id(connection.peer_name, self.num_clients)  # before anything it says counts
        settings = read_hello(connection, self.join_token)
        with members.condition:
            self._accept_settings(settings)
        connection.send(Kind.WELCOME, value=members.round_timeout)  # how long the client may wait on the others
        scalars = connection.recv(Kind.PLAN).tensors.get("scalars")
        if scalars is None or scalars.shape != (6,) or scalars.dtype != torch.int64:
            raise WireError("a PLAN must carry 6 int64 scalars (id, shard size, step, half, epoch bytes, resume step).")
        client_id, shard_size, step_bytes, half_bytes, epoch_bytes, resume_step = scalars.tolist()
        if certified is not None and client_id != certified:
            raise Refused(
                f"client_id={client_id} disagrees with the client's certificate ({connection.peer_name}): a client's "
                "id is the one its kit was made for (client-N)."
            )
        check_plan_costs(self.split, self.args, self.server_half.num_client_norms, self.server_half.num_server_norms,
                         client_id, shard_size, step_bytes, epoch_bytes)  # fmt: skip
        with members.condition:
            if self.plan is not None and self.round >= self.plan.rounds and not resume_step:
                raise Refused(f"client {client_id} comes after the federation's last round: nothing is left to train.")
            member, existing = members.admit(
                client_id, shard_size, (step_bytes, half_bytes, epoch_bytes), half_size(self.client_tensors) * 4,
                resume_step, self.resumed_step, self.round,
            )  # fmt: skip
            session.member, member.traffic = member, connection.traffic  # the server's own count of its frames
            member.connection = connection
            connection.open_up()  # admitted: its joining slot is free for the next client while it waits for the plan
            deadline = time.monotonic() + members.round_timeout
            while self.plan is None and len(members.members) < self.num_clients:
                if not members.condition.wait(timeout=max(deadline - time.monotonic(), 0)):
                    break
            if self.plan is None:
                self._make_plan()
            plan = self.plan
            if existing is not None and not resume_step:  # a client rejoining afresh trains the rounds that are left
                plan = replace(plan, max_steps=max(plan.rounds - self.round, 1) * self.sync_every)
            member.planned_steps = plan.max_steps - resume_step
            tensors = {"scalars": plan_scalars(plan)}
            if self.half is not None and not resume_step:  # a resumed client's checkpoint holds the half already
                tensors["weights"] = self.half
                self.sync_transfers += 1
        connection.send(Kind.PLAN, tensors)
        return member

    def _accept_settings(self, settings: dict) -> None:
        """The federation's settings (the same number of clients, and the same partition and budget for every
        client: the first to join sets them), then the split's, as for one client."""
        federation = settings.pop("federation", None)
        if not isinstance(federation, dict) or not federation:
            raise Refused(f"this server runs a federation of {self.num_clients} clients: join with --client_id.")
        if federation.get("num_clients") != self.num_clients:
            raise Refused(f"num_clients: client {federation.get('num_clients')!r}, server {self.num_clients}.")
        if settings.get("ranks", 1) != 1:
            raise Refused(f"a federation member runs one process; this client runs {settings.get('ranks')!r} "
                          "(several processes train one split against a server of as many ranks, without "
                          "--num_clients).")  # fmt: skip
        shared = {key: value for key, value in federation.items() if key != "client_id"}
        if self.federation_settings is None:
            server = {name: plain(getattr(self.args, name)) for name in FEDERATION_ARGS}
            self.federation_settings = {**shared, **server, "share_head": self.share_head}
        differences = differing_settings(shared, self.federation_settings)
        if differences:
            raise Refused("the federation settings differ from the first client's: " + "; ".join(differences))
        split = check_split_settings(settings, self.args, self.build, self.server_half)
        if self.server_half is None:
            self._adopt(split)

    def _adopt(self, split) -> None:
        """Keeps the client half too: the server averages it and saves it next to its own (and restores a resumed
        checkpoint into both)."""
        self.server_half = ServerHalf(split, self.args, keep_client=True)
        self.client_tensors = client_side_tensors(split, with_head=self.share_head)
        self.guard = AverageGuard(split.client, self.client_tensors, self.clip_updates)
        if getattr(split, "head", None) is not None and not self.share_head:
            split.head = None  # each client keeps its own: the server never holds a head
        if self.resumed_state is not None:
            try:
                self._resume(self.resumed_state)
            except CheckpointError as error:
                self.members.failure = f"the federation cannot resume: {error}"
                raise Refused(self.members.failure) from error

    def _make_plan(self) -> None:
        """The plan for the clients that joined; one that cannot be made ends the federation (every waiting client
        is refused with the reason)."""
        live = list(self.members.members.values())
        half_bytes = live[0].half_bytes
        try:
            self.plan = plan_rounds(
                [m.step_bytes for m in live], half_bytes, schedule=self.schedule.name, num_clients=self.num_clients,
                min_clients=self.members.min_clients, sync_every=self.sync_every,
                final_bytes_per_client=PLAN_BYTES + self.schedule.final_bytes(half_bytes),
                budget_bytes=self.args.budget_bytes(sum(m.epoch_bytes for m in live)) if self.args.has_budget else None,
                max_steps=self.args.max_steps,
            )  # fmt: skip
        except PlanError as error:
            self.members.failure = str(error)
            raise Refused(str(error)) from error
        self.members.planned = True
        self.server_max_steps = self.plan.rounds * self.sync_every * len(live)
        self.server_half.make_optimizer(self.server_max_steps)
        self.schedule.start([m.client_id for m in live])
        logger.info("Federation plan: %s", self.plan)

    # -- checkpoints and results ------------------------------------------------------------------------------

    def _checkpoint_dir(self, step: int) -> Path:
        return self.output_dir / f"checkpoint-{step}"

    def round_done(self) -> None:
        """A round every live client completed: a checkpoint if its step is a save step (as the clients save)."""
        step, every = self.round * self.sync_every, checkpoint_every(self.args, self.plan.max_steps)
        if every is None or (step % every and step < self.plan.max_steps):
            return
        folder = self._checkpoint_dir(step)
        try:
            save_federation_checkpoint(self, folder, step)
        except CheckpointError as error:
            logger.error("%s", error)
            self.members.failure = f"the server cannot write its checkpoint: {error}"
            raise Refused(self.members.failure) from error

    def _resume(self, state: dict) -> None:
        resume_federation(self, state)
        self.resumed_at = time.monotonic()
        logger.info("Resumed the federation at step %d (round %d).", self.resumed_step, self.round)

    def results(self) -> dict:
        """Every client's bytes and accuracy, the totals, the plan, drops and rejoins (`server_results.json`)."""
        return federation_results(self)

    def _save_final(self) -> None:
        """The whole split, each half's config recording the federation (`save_federation`)."""
        if self.split is not None:
            save_federation(self.split, self.results(), self.output_dir)
