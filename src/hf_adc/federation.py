"""Several clients, one server: sequential split learning and SplitFed over the wire of `hf_adc.remote`.

Each client trains on its own shard (`hf_adc.data.partition_indices`) through a `FederatedLink`, a
`RemoteLink` that also keeps its client half in step with the others'; the server (`FederatedServer`) runs one
thread per client session around the one server half. The schedule is the server's (`--schedule`):

- `sequential` (vanilla split learning): the clients take turns of `sync_every` optimizer steps in client-id
  order; a turn starts with the current client half coming down from the server (TURN) and ends with it going
  back up (HANDOFF). At the end every client receives the final half.
- `splitfed`: the clients train at once; the server takes their steps in arrival order, one whole optimizer
  step (its micro-batches, then STEP) at a time. Every `sync_every` steps each client sends its half up (SYNC),
  and all get back the average weighted by shard size (FedAvg).

Before training each client sends PLAN (its client id, shard size, step cost and half size); once all
`num_clients` have (or `round_timeout` passed with at least `min_clients`), the server fixes the number of rounds
R so that all clients' steps plus every half sent, both ways, fit the budget, and tells every client its
`max_steps` = R * sync_every. A client half crosses as one float32 vector; each crossing is charged to the
client's ledger as `sync` (the sample count and round number that travel with it are `control`).

Faults: a client that dies, hangs past the timeout, or misses a round by more than `round_timeout` is dropped;
the others go on (its sequential turn is skipped), waiting on the server for their timeout plus `round_timeout`.
A restarted client with the same id rejoins and receives the current client half with its plan. Fewer than
`min_clients` left ends the federation. At the end of each round whose step is a save step the server writes a
checkpoint from which the whole federation resumes (each client from its own checkpoint of that step). The server
writes the averaged client half (`client/`) next to its own (`server/`), so the output folder loads as one split
model.
"""

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from .link import nbytes
from .remote import RemoteLink, SplitServer, checkpoint_every, differing_settings, plain
from .transport import Channel, Kind, PeerLost, Refused, WireError

logger = logging.getLogger(__name__)

SCHEDULES = ("sequential", "splitfed")
PLAN_BYTES = 6 * 8 + 7 * 8  # the PLAN scalars, up and down (int64)
FEDERATION_STATE_NAME = "federation.json"
CLIENT_HALF_NAME = "client_half.safetensors"


def client_side_tensors(split) -> list[torch.Tensor]:
    """The client's trainable side in a fixed order: the client half's floating-point state, then the client-side
    modules of the bridge (BottleNet++'s encoder). The same order on the client and on the server."""
    tensors = [tensor for tensor in split.client.state_dict(keep_vars=True).values() if tensor.is_floating_point()]
    prefixes = tuple(f"{module}." for module in split.bridge.client_modules)
    bridge = split.bridge.state_dict(keep_vars=True)
    names = [name for name in sorted(bridge) if name.startswith(prefixes) and bridge[name].is_floating_point()]
    return tensors + [bridge[name] for name in names]


def half_vector(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors as one float32 vector (what crosses when halves are synchronised)."""
    return torch.cat([tensor.detach().float().reshape(-1).cpu() for tensor in tensors])


@torch.no_grad()
def load_half_vector(tensors: list[torch.Tensor], vector: torch.Tensor) -> None:
    """Copies `vector` into the tensors in place (the optimizer keeps its references)."""
    total = sum(tensor.numel() for tensor in tensors)
    if vector.shape != (total,):
        raise WireError(f"a client half of {tuple(vector.shape)} values came; this split's has {total}.")
    offset = 0
    for tensor in tensors:
        tensor.copy_(vector[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


@dataclass
class FederationPlan:
    """What the server tells each client before training."""

    max_steps: int
    sync_every: int
    schedule: str
    num_clients: int
    rounds: int
    budget_bytes: int | None
    round_bytes: int  # the most one round can send: every client's steps and halves


class FederatedLink(RemoteLink):
    """A client's `RemoteLink` that also synchronises its client half with the other clients' through the server.

    A reply that waits on the other clients (the plan, a round's average, a turn, the server half taken by another
    client's step) is awaited for the channel's timeout plus the server's round timeout (it comes with WELCOME): by
    then the server has dropped the client everyone waited for, and answered."""

    def __init__(self, peer: Channel, client_id: int, channel=None, wire_dtype="float32"):
        super().__init__(peer, channel, wire_dtype)
        self.client_id = client_id
        self.tensors: list[torch.Tensor] = []
        self.plan_: FederationPlan | None = None

    def join(self, settings: dict, token: str | None) -> float:
        round_timeout = super().join(settings, token)
        self.reply_timeout = self.peer.timeout + timedelta(seconds=round_timeout)
        return round_timeout

    def attach(self, split) -> None:
        self.tensors = client_side_tensors(split)

    @property
    def half_bytes(self) -> int:
        return sum(tensor.numel() for tensor in self.tensors) * 4

    @property
    def sync_transfers(self) -> int:
        """Client halves sent or received so far (a resumed checkpoint's included: they are in the ledger)."""
        return self.ledger.sync_bytes // self.half_bytes if self.half_bytes else 0

    def _charge_sync(self, up: bool, down: bool, value: bool = True) -> None:
        """Each half that crossed under `sync`; the value sent with it (samples, steps: float64) under control."""
        self.ledger.sync_bytes += (int(up) + int(down)) * self.half_bytes
        self.ledger.uplink_bytes += 8 * value
        self.ledger.uncompressed_uplink_bytes += 8 * value

    def _receive_half(self, message) -> bool:
        if "weights" not in message.tensors:
            return False
        load_half_vector(self.tensors, message.tensors["weights"])
        return True

    def plan(self, shard_size: int, step_bytes: int, epoch_bytes: int, resume_step: int = 0) -> FederationPlan:
        """Announces this client's shard, costs, and the step of the checkpoint it resumes from (0: none); returns
        the server's plan, and loads the current client half if one comes with it (a client that rejoins afresh)."""
        scalars = torch.tensor([self.client_id, shard_size, step_bytes, self.half_bytes, epoch_bytes, resume_step])
        self.peer.send(Kind.PLAN, {"scalars": scalars})
        message = self.peer.recv(Kind.PLAN, timeout=self.reply_timeout)
        max_steps, sync_every, schedule, num_clients, rounds, budget, round_bytes = message.tensors["scalars"].tolist()
        self.ledger.uplink_bytes += nbytes(scalars)
        self.ledger.uncompressed_uplink_bytes += nbytes(scalars)
        self.ledger.downlink_bytes += nbytes(message.tensors["scalars"])
        self.ledger.uncompressed_downlink_bytes += nbytes(message.tensors["scalars"])
        if self._receive_half(message):
            self.ledger.sync_bytes += self.half_bytes
        budget = budget if budget >= 0 else None
        self.plan_ = FederationPlan(
            max_steps, sync_every, SCHEDULES[schedule], num_clients, rounds, budget, round_bytes
        )
        return self.plan_

    def sync(self, samples: int) -> None:
        """SplitFed: sends this half, loads the federation's average. Sequential (at the end): loads the final half."""
        sequential = self.plan_.schedule == "sequential"
        tensors = {} if sequential else {"weights": half_vector(self.tensors)}
        self.peer.send(Kind.SYNC, tensors, value=float(samples))
        received = self._receive_half(self.peer.recv(Kind.SYNC, timeout=self.reply_timeout))
        self._charge_sync(up=not sequential, down=received)

    def finish(self, results: dict | None = None) -> None:
        """Ends the session, reporting this client's bytes and accuracy to the server."""
        self.peer.send(Kind.END, {"scalars": result_scalars(results or {})})
        self.peer.recv(Kind.DONE)

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
    """Drives a `FederatedLink` from the Trainer: turns (sequential) or averaging (SplitFed) every `sync_every`
    optimizer steps, and the final half at the end."""

    def __init__(self, link: FederatedLink, batch_size: int):
        self.link = link
        self.batch_size = batch_size
        self.in_turn = False

    def on_step_begin(self, args, state, control, **kwargs):
        if self.link.plan_.schedule == "sequential" and not self.in_turn:
            self.link.take_turn()
            self.in_turn = True

    def on_step_end(self, args, state, control, **kwargs):
        plan = self.link.plan_
        if state.global_step % plan.sync_every and state.global_step < state.max_steps:
            return
        if plan.schedule == "sequential":
            self.link.hand_off(state.global_step)
            self.in_turn = False
        else:
            self.link.sync(samples=plan.sync_every * self.batch_size)

    def on_train_end(self, args, state, control, **kwargs):
        if self.link.plan_.schedule == "sequential":
            self.link.sync(samples=0)


@dataclass
class _Member:
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
    results: dict = field(default_factory=dict)


class FederatedServer(SplitServer):
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
    ):
        super().__init__(build, args, output_dir, join_token, resume_from)
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
        self.num_clients, self.schedule, self.sync_every = num_clients, schedule, sync_every
        self.round_timeout, self.min_clients = round_timeout, min_clients
        self.condition = threading.Condition()
        self.step_lock = threading.Lock()  # one client's optimizer step (micro-batches and STEP) at a time
        self.members: dict[int, _Member] = {}
        self.plan: FederationPlan | None = None
        self.client_tensors: list[torch.Tensor] = []
        self.half: torch.Tensor | None = None  # the current client half (None until the first sync)
        self.round = 0
        self.round_halves: dict[int, torch.Tensor] = {}
        self.turn: int | None = None
        self.turn_started = 0.0
        self.failure: str | None = None
        self.sync_transfers = 0
        self.federation_settings: dict | None = None
        self.server_max_steps = 0  # the server's schedule: every client's steps
        self.drops: list[int] = []  # every client dropped, in order (a rejoined client stays listed)
        self.rejoined: list[int] = []  # clients that came back afresh after being dropped
        self._step_owner: int | None = None
        self.resumed_state = None if self.resume_from is None else self._read_checkpoint(self.resume_from)
        self.resumed_step = None if self.resumed_state is None else self.resumed_state["step"]
        self.resumed_at: float | None = None
        if self.resumed_state is not None:
            self.federation_settings = self.resumed_state["federation_settings"]

    # -- sessions ---------------------------------------------------------------------------------------------

    def serve(self, listener, accept_seconds: float | None = None) -> dict:
        """Accepts sessions until every client has finished or been dropped (or none came in `accept_seconds`)."""
        threads, started = [], time.monotonic()
        while True:
            with self.condition:
                if self.resumed_at is not None and time.monotonic() - self.resumed_at > self.round_timeout:
                    self._drop_laggards(lambda m: not m.joined)  # a resumed checkpoint's client that never came
                if self.plan is not None and all(not m.live or m.finished for m in self.members.values()):
                    break
                if self.failure:
                    break
            try:
                accepted = listener.accept(deadline=time.monotonic() + 1.0)  # then look again whether it is over
            except PeerLost as error:
                logger.warning("%s; waiting for the next client.", error)
                continue
            if accepted is None:
                if accept_seconds is not None and not self.members and time.monotonic() - started > accept_seconds:
                    return {"status": "no client", "steps": self.steps}
                continue
            thread = threading.Thread(target=self._session, args=accepted, name=f"session-{accepted[0]}", daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join(timeout=self.round_timeout)
        if self.half is not None:
            load_half_vector(self.client_tensors, self.half)
        self._save_final()
        return self.results()

    def results(self) -> dict:
        members = {member.client_id: member for member in self.members.values()}
        clients = {
            str(cid): {"live": m.live, "finished": m.finished, "shard_size": m.shard_size, **m.results}
            for cid, m in sorted(members.items())
        }
        totals = {
            key: sum(client.get(key, 0) for client in clients.values())
            for key in ("uplink_bytes", "downlink_bytes", "sync_bytes", "total_bytes", "uncompressed_bytes")
        }
        dropped = [cid for cid, m in sorted(members.items()) if not m.live]
        status = self.failure or ("finished" if not dropped else "finished without " + ", ".join(map(str, dropped)))
        return {
            "status": "finished" if not self.failure else "failed",
            "detail": status,
            "schedule": self.schedule,
            "num_clients": self.num_clients,
            "sync_every": self.sync_every,
            "plan": vars(self.plan) if self.plan else None,
            "steps": self.steps,
            "dropped": dropped,
            "drops": self.drops,
            "rejoined": self.rejoined,
            "clients": clients,
            "total": totals,
            "half_bytes": sum(t.numel() for t in self.client_tensors) * 4,
            "sync_transfers": self.sync_transfers,
            "resumed_from": self.resumed_step,
        }

    def _adopt(self, split) -> None:
        """Keeps the client half too: the server averages it and saves it next to its own (and restores a resumed
        checkpoint into both)."""
        self.split = split
        self.client_tensors = client_side_tensors(split)
        if self.resumed_state is not None:
            self._resume(self.resumed_state)

    # -- checkpoints ------------------------------------------------------------------------------------------

    def _read_checkpoint(self, folder: Path) -> dict:
        """A federation checkpoint's state, once its settings are this server's."""
        path = folder / FEDERATION_STATE_NAME
        if not path.is_file():
            raise ValueError(
                f"resume_from_checkpoint={str(folder)!r} is not a federation checkpoint: it has no "
                f"{FEDERATION_STATE_NAME} (the server writes one at the end of each round whose step is a save step)."
            )
        state = json.loads(path.read_text())
        ours = {"schedule": self.schedule, "num_clients": self.num_clients, "sync_every": self.sync_every}
        ours.update({name: plain(getattr(self.args, name)) for name in FEDERATION_ARGS})
        theirs = {**state["federation_settings"], **{name: state[name] for name in ("schedule", "num_clients")}}
        theirs["sync_every"] = state["sync_every"]
        differences = [
            f"{name}: checkpoint {theirs.get(name)!r}, server {value!r}"
            for name, value in ours.items()
            if theirs.get(name) != value
        ]
        if differences:
            raise ValueError(f"the federation checkpoint {folder} has other settings: {'; '.join(differences)}")
        return state

    def _resume(self, state: dict) -> None:
        """The federation as the checkpoint left it at a round's end: plan, round, the client half, the server half
        with its optimizer and schedule. Its clients are expected back, as live members that have not joined."""
        self.plan = FederationPlan(**state["plan"])
        self.round, self.steps, self.turn = state["round"], state["steps"], state["turn"]
        self.sync_transfers = state["sync_transfers"]
        self.half = load_file(self.resume_from / CLIENT_HALF_NAME)["weights"]
        expected = sum(tensor.numel() for tensor in self.client_tensors)
        if self.half.shape != (expected,):
            raise Refused(f"the checkpoint's client half has {self.half.numel()} values; this split's has {expected}.")
        self.members = {m["client_id"]: _Member(**m, joined=False) for m in state["members"]}
        self.server_max_steps = state["server_max_steps"]
        self._make_optimizer(self.server_max_steps)
        self._load_checkpoint(self.resume_from)
        self.turn_started = self.resumed_at = time.monotonic()
        logger.info("Resumed the federation at step %d (round %d).", self.resumed_step, self.round)

    def _round_done(self) -> None:
        """A round every live client completed: a checkpoint if its step is a save step (as the clients save)."""
        step, every = self.round * self.sync_every, checkpoint_every(self.args, self.plan.max_steps)
        if every is None or (step % every and step < self.plan.max_steps):
            return
        self._save_checkpoint(step)
        folder = self._checkpoint_dir(step)
        save_file({"weights": self.half.contiguous()}, folder / CLIENT_HALF_NAME)
        members = [{name: getattr(m, name) for name in SAVED_MEMBER_FIELDS} for m in self.members.values()]
        state = {
            "step": step, "round": self.round, "steps": self.steps, "turn": self.turn, "plan": asdict(self.plan),
            "schedule": self.schedule, "num_clients": self.num_clients, "sync_every": self.sync_every,
            "sync_transfers": self.sync_transfers, "server_max_steps": self.server_max_steps, "members": members,
            "federation_settings": self.federation_settings,
        }  # fmt: skip
        (folder / FEDERATION_STATE_NAME).write_text(json.dumps(state, indent=2))  # last: the checkpoint is whole

    def _accept_settings(self, settings: dict) -> None:
        """The split settings as for one client, and the federation's: the same number of clients, and the same
        partition and budget for every client (the first to join sets them)."""
        federation = settings.pop("federation", None)
        if not federation:
            raise Refused(f"this server runs a federation of {self.num_clients} clients: join with --client_id.")
        if federation.get("num_clients") != self.num_clients:
            raise Refused(f"num_clients: client {federation.get('num_clients')!r}, server {self.num_clients}.")
        shared = {key: value for key, value in federation.items() if key != "client_id"}
        if self.federation_settings is None:
            self.federation_settings = {**shared, **{name: plain(getattr(self.args, name)) for name in FEDERATION_ARGS}}
        differences = differing_settings(shared, self.federation_settings)
        if differences:
            raise Refused("the federation settings differ from the first client's: " + "; ".join(differences))
        super()._accept_settings(settings)

    def _session(self, session: int, channel: Channel) -> None:
        member = None
        try:
            member = self._join(channel)
            logger.info("Session %d: client %d joined.", session, member.client_id)
            self._run(channel, member)
        except (WireError, Refused, PeerLost) as error:
            if member is None:
                logger.warning("Session %d refused: %s", session, error)
            else:
                logger.warning("Client %d dropped: %s", member.client_id, error)
                self._drop(member)
            channel.refuse(str(error))

    def _join(self, channel: Channel) -> _Member:
        settings = self._hello(channel)
        with self.condition:
            self._accept_settings(settings)
        channel.send(Kind.WELCOME, value=self.round_timeout)  # how long the client may wait on the others
        scalars = channel.recv(Kind.PLAN).tensors.get("scalars")
        if scalars is None or scalars.shape != (6,) or scalars.dtype != torch.int64:
            raise WireError("a PLAN must carry 6 int64 scalars (id, shard size, step, half, epoch bytes, resume step).")
        client_id, shard_size, step_bytes, half_bytes, epoch_bytes, resume_step = scalars.tolist()
        with self.condition:
            if not 0 <= client_id < self.num_clients:
                raise Refused(f"client_id={client_id} is out of range: 0 .. {self.num_clients - 1}.")
            existing = self.members.get(client_id)
            if existing is not None and existing.joined and existing.live and not existing.finished:
                raise Refused(f"client {client_id} is already training in this federation.")
            if self.plan is not None and existing is None:
                raise Refused(f"the federation started without client {client_id}; only dropped clients rejoin.")
            expected = sum(t.numel() for t in self.client_tensors) * 4
            if half_bytes != expected:
                raise Refused(f"the client half has {half_bytes} bytes; this server's has {expected}.")
            if resume_step:
                self._check_resume(client_id, existing, shard_size, resume_step)
            member = _Member(client_id, shard_size, step_bytes, half_bytes, epoch_bytes, resume_step=resume_step)
            if existing is not None:
                member.synced_round = self.round
                if not resume_step:
                    self.rejoined.append(client_id)
                logger.info("Client %d %s at round %d.", client_id,
                            f"resumed from step {resume_step}" if resume_step else "rejoined", self.round)  # fmt: skip
            self.members[client_id] = member
            self.condition.notify_all()
            deadline = time.monotonic() + self.round_timeout
            while self.plan is None and len(self.members) < self.num_clients:
                if not self.condition.wait(timeout=max(deadline - time.monotonic(), 0)):
                    break
            if self.plan is None:
                self._make_plan()
            plan = self.plan
            if existing is not None and not resume_step:  # a client rejoining afresh trains the rounds that are left
                plan = replace(plan, max_steps=max(plan.rounds - self.round, 1) * self.sync_every)
            scalars = [plan.max_steps, plan.sync_every, SCHEDULES.index(plan.schedule), plan.num_clients, plan.rounds]
            budget = plan.budget_bytes if plan.budget_bytes is not None else -1
            tensors = {"scalars": torch.tensor([*scalars, budget, plan.round_bytes])}
            if self.half is not None and not resume_step:  # a resumed client's checkpoint holds the half already
                tensors["weights"] = self.half
                self.sync_transfers += 1
        channel.send(Kind.PLAN, tensors)
        return member

    def _check_resume(self, client_id: int, existing: _Member | None, shard_size: int, resume_step: int) -> None:
        """A client resuming from its checkpoint-N needs the server resumed from its own checkpoint-N."""
        if self.resumed_step is None:
            raise Refused(
                f"client {client_id} resumes from step {resume_step}, but this server did not resume the federation: "
                f"start serve.py with --resume_from_checkpoint .../checkpoint-{resume_step}."
            )
        if resume_step != self.resumed_step:
            raise Refused(
                f"client {client_id} resumes from step {resume_step}; the federation resumed from step "
                f"{self.resumed_step}: resume every client from its checkpoint-{self.resumed_step}."
            )
        if existing is None or existing.joined:
            raise Refused(f"client {client_id} was not in the federation at step {resume_step}, or resumed already.")
        if shard_size != existing.shard_size:
            raise Refused(
                f"client {client_id} has a shard of {shard_size} rows; at step {resume_step} it had "
                f"{existing.shard_size}: resume with the same data, partition and seed."
            )

    def _make_plan(self) -> None:
        """Rounds R such that every client's R * sync_every steps and every half crossing fit the budget. A plan
        that cannot be made ends the federation (every waiting client is refused with the reason)."""
        live = list(self.members.values())
        half = live[0].half_bytes
        # A round: every client's steps, and each half up with its sample or step count (float64) and back down.
        round_bytes = sum(m.step_bytes for m in live) * self.sync_every + len(live) * (2 * half + 8)
        final_bytes = len(live) * (PLAN_BYTES + (half + 8 if self.schedule == "sequential" else 0))
        budget_bytes = self.args.budget_bytes(sum(m.epoch_bytes for m in live)) if self.args.has_budget else None
        rounds, problem = 0, None
        if len(live) < self.min_clients:
            problem = f"only {len(live)} of {self.num_clients} clients joined (min_clients={self.min_clients})."
        elif budget_bytes is not None:
            rounds = (budget_bytes - final_bytes) // round_bytes
            if rounds < 1:
                problem = (
                    f"the budget of {budget_bytes} bytes is smaller than one round ({round_bytes + final_bytes} bytes: "
                    f"{len(live)} clients x {self.sync_every} steps, and their halves both ways)."
                )
        elif self.args.max_steps > 0:
            rounds = self.args.max_steps // self.sync_every
            if rounds < 1 or self.args.max_steps % self.sync_every:
                problem = f"max_steps={self.args.max_steps} must be a multiple of sync_every={self.sync_every}."
        else:
            problem = "the server has no budget and no max_steps: give --budget_epochs, --communication_budget or "
            problem += "--max_steps."
        if problem:
            self.failure = problem
            raise Refused(problem)
        steps = rounds * self.sync_every
        self.plan = FederationPlan(
            steps, self.sync_every, self.schedule, self.num_clients, rounds, budget_bytes, round_bytes
        )
        self.server_max_steps = rounds * self.sync_every * len(live)
        self._make_optimizer(self.server_max_steps)
        self.turn = min(m.client_id for m in live)
        self.turn_started = time.monotonic()
        logger.info("Federation plan: %s", self.plan)

    def _drop(self, member: _Member) -> None:
        """Takes a lost client out: frees the server half if it was mid-step (its partial gradients discarded),
        passes its turn on, and ends the federation if fewer than `min_clients` are left."""
        with self.condition:
            if self._step_owner == member.client_id:
                self.optimizer.zero_grad(set_to_none=True)
                self._step_owner = None
                self.step_lock.release()
            if member.live:
                member.live = False
                self.drops.append(member.client_id)
                if self.turn == member.client_id:
                    self._advance_turn()
                if len(self._live()) < self.min_clients and self.plan is not None:
                    self.failure = f"fewer than min_clients={self.min_clients} clients left."
            self.condition.notify_all()

    # -- the message loop -------------------------------------------------------------------------------------

    def _run(self, channel: Channel, member: _Member) -> None:
        pending = None
        kinds = (Kind.BEGIN, Kind.FORWARD, Kind.BACKWARD, Kind.STEP, Kind.EVAL, Kind.SAVE, Kind.END)
        while True:
            message = channel.recv(*kinds, Kind.SYNC, Kind.TURN, Kind.HANDOFF)
            if not member.live:
                raise Refused(f"client {member.client_id} was dropped from the federation.")
            tensors = message.tensors
            if message.kind == Kind.BEGIN:
                start = int(tensors["scalars"][1])
                if start != member.resume_step:
                    raise Refused(f"client {member.client_id} begins at step {start}; it planned {member.resume_step}.")
                channel.send(Kind.DONE)
            elif message.kind == Kind.FORWARD:
                self._own_step(member)
                pending = self._answer_forward(channel, message)
            elif message.kind == Kind.BACKWARD:
                pending = self._answer_backward(channel, message, pending)
            elif message.kind == Kind.STEP:
                self._own_step(member)
                total = self._optimizer_step(tensors["norm"], message.value)
                self._step_owner = None
                self.step_lock.release()
                channel.send(Kind.NORM, value=float(total))
            elif message.kind == Kind.EVAL:
                with self.step_lock:
                    logits = self._logits(tensors["activations"])
                channel.send(Kind.LOGITS, logits)
            elif message.kind == Kind.SAVE:  # the server checkpoints at the ends of rounds (`_round_done`)
                channel.send(Kind.DONE)
            elif message.kind == Kind.SYNC:
                channel.send(Kind.SYNC, self._sync(member, tensors.get("weights")))
            elif message.kind == Kind.TURN:
                channel.send(Kind.TURN, self._wait_for_turn(member))
            elif message.kind == Kind.HANDOFF:
                self._hand_off(member, tensors["weights"])
                channel.send(Kind.DONE)
            else:
                member.results = {
                    name: value for name, value in zip(RESULT_FIELDS, tensors["scalars"].tolist(), strict=True)
                }
                with self.condition:
                    member.finished = True
                    self.condition.notify_all()
                channel.send(Kind.DONE)
                return

    def _own_step(self, member: _Member) -> None:
        """Takes the server half for `member`'s optimizer step, waiting while another client's step runs."""
        if self._step_owner == member.client_id:
            return
        if not self.step_lock.acquire(timeout=self.round_timeout):
            raise PeerLost(f"client {member.client_id} waited over {self.round_timeout} s for the server half.")
        self._step_owner = member.client_id

    def _live(self) -> list[_Member]:
        return [m for m in self.members.values() if m.live]

    def _sync(self, member: _Member, weights: torch.Tensor | None) -> dict:
        """SplitFed: a round's barrier and weighted average. Sequential: the final half once every client is done."""
        with self.condition:
            if self.schedule == "sequential":
                member.finished_turns = True
                if self.turn == member.client_id:
                    self._advance_turn()
                deadline = time.monotonic() + self.round_timeout
                while not all(m.finished_turns for m in self._live()) and not self.failure:
                    if not self.condition.wait(timeout=max(deadline - time.monotonic(), 0)):
                        self._drop_laggards(lambda m: not m.finished_turns)
                self.condition.notify_all()
            else:
                if weights is None:
                    raise WireError("a SplitFed SYNC must carry the client half.")
                target = member.synced_round + 1
                self.round_halves[member.client_id] = weights.float()
                member.synced_round = target
                self.condition.notify_all()
                deadline = time.monotonic() + self.round_timeout
                while self.round < target and not self.failure:
                    waiting = [m for m in self._live() if m.synced_round < target and not m.finished]
                    if not waiting:
                        self._average(target)
                        break
                    if not self.condition.wait(timeout=max(deadline - time.monotonic(), 0)):
                        self._drop_laggards(lambda m: m.synced_round < target)
            if self.failure:
                raise Refused(self.failure)
            if self.half is None:
                return {}
            self.sync_transfers += 1 + (weights is not None)
            return {"weights": self.half}

    def _average(self, round_number: int) -> None:
        """FedAvg over the clients that sent this round, weighted by shard size."""
        members = [m for m in self._live() if m.client_id in self.round_halves]
        weights = torch.tensor([float(m.shard_size) for m in members])
        stacked = torch.stack([self.round_halves[m.client_id] for m in members])
        self.half = (weights / weights.sum()) @ stacked
        self.round_halves.clear()
        self.round = round_number
        self._round_done()
        self.condition.notify_all()

    def _drop_laggards(self, lagging) -> None:
        for laggard in [m for m in self._live() if lagging(m)]:
            logger.warning("Client %d missed the round by %.0f s: dropped.", laggard.client_id, self.round_timeout)
            laggard.live = False
            self.drops.append(laggard.client_id)
            if self.turn == laggard.client_id:
                self._advance_turn()
        if len(self._live()) < self.min_clients:
            self.failure = f"fewer than min_clients={self.min_clients} clients left."

    def _wait_for_turn(self, member: _Member) -> dict:
        with self.condition:
            while self.turn != member.client_id and not self.failure:
                holder = self.members.get(self.turn)
                if self.condition.wait(timeout=1.0) or holder is None:
                    continue
                if time.monotonic() - self.turn_started > self.round_timeout and holder.live:
                    logger.warning("Client %d held its turn over %.0f s: dropped.", holder.client_id,
                                   self.round_timeout)  # fmt: skip
                    holder.live = False
                    self.drops.append(holder.client_id)
                    self._advance_turn()
            if self.failure:
                raise Refused(self.failure)
            self.turn_started = time.monotonic()
            if self.half is None:
                return {}
            self.sync_transfers += 1
            return {"weights": self.half}

    def _hand_off(self, member: _Member, weights: torch.Tensor) -> None:
        with self.condition:
            if self.turn != member.client_id:
                raise WireError(f"client {member.client_id} handed off outside its turn.")
            self.half = weights.float().clone()
            self.sync_transfers += 1
            round_number = self.round
            self._advance_turn()
            if self.round > round_number:
                self._round_done()

    def _advance_turn(self) -> None:
        """The next live client (in id order, cyclically) that still has turns to take."""
        candidates = sorted(m.client_id for m in self._live() if not m.finished_turns)
        after = [cid for cid in candidates if cid > (self.turn if self.turn is not None else -1)]
        if not after:
            self.round += 1  # every live client has had its turn of this round
        self.turn = (after or candidates or [None])[0]
        self.turn_started = time.monotonic()
        self.condition.notify_all()

    def _save_final(self) -> None:
        """The whole split (`client/` is the final averaged or handed-off client half, `server/` the server's), each
        half's config recording the federation: schedule, clients, and the bytes every client and the sync sent."""
        if self.split is None:
            return
        results = self.results()
        record = {key: results[key] for key in ("schedule", "num_clients", "sync_every", "dropped", "total")}
        total = results["total"]
        communication = {
            "uplink_bytes": total["uplink_bytes"],
            "downlink_bytes": total["downlink_bytes"],
            "sync_bytes": total["sync_bytes"],
            "uncompressed_bytes": total["uncompressed_bytes"],
            "ratio": total["total_bytes"] / total["uncompressed_bytes"] if total["uncompressed_bytes"] else 1.0,
            "steps": self.steps,
            "test_accuracy": next((c["test_accuracy"] for c in results["clients"].values() if c.get("finished")), None),
        }
        for half in (self.split.client, self.split.server):
            half.config.federation = record
            half.config.communication = communication
        self.split.save_pretrained(self.output_dir)


SAVED_MEMBER_FIELDS = ("client_id", "shard_size", "step_bytes", "half_bytes", "epoch_bytes", "live")
FEDERATION_ARGS = ("communication_budget", "budget_epochs", "max_steps", "save_strategy", "save_steps")
RESULT_FIELDS = (
    "uplink_bytes", "downlink_bytes", "sync_bytes", "total_bytes", "uncompressed_bytes", "steps", "test_accuracy",
    "local_accuracy",
)  # fmt: skip


def result_scalars(results: dict) -> torch.Tensor:
    """A client's results as the END message's scalars (float64)."""
    return torch.tensor([float(results.get(name) or 0.0) for name in RESULT_FIELDS], dtype=torch.float64)
