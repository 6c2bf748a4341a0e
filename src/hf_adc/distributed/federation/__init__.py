"""Several clients, one server: sequential split learning and SplitFed over the wire of `hf_adc.distributed`.

Each client trains on its own shard (`hf_adc.data.partition_indices`) through a `FederatedLink`, a `RemoteLink`
that also keeps its client half in step with the others'; the server (`FederatedServer`) runs one thread per
client session around the one server half. The schedule is the server's (`--schedule`, `schedules.py`):

- `sequential` (vanilla split learning): the clients take turns of `sync_every` optimizer steps in client-id
  order; a turn starts with the current client half coming down from the server (TURN) and ends with it going
  back up (HANDOFF). At the end every client receives the final half.
- `splitfed`: the clients train at once; the server takes their steps in arrival order, one whole optimizer
  step (its micro-batches, then STEP) at a time. Every `sync_every` steps each client sends its half up (SYNC),
  and all get back the average weighted by shard size (FedAvg).

Before training each client sends PLAN (its client id, shard size, step cost and half size); once all
`num_clients` have (or `round_timeout` passed with at least `min_clients`), the server fixes the number of rounds
R so that all clients' steps plus every half sent, both ways, fit the budget (`plan.py`), and tells every client
its `max_steps` = R * sync_every. A client half crosses as one float32 vector; each crossing is charged to the
client's ledger as `sync` (the sample count and round number that travel with it are `control`).

Faults: a client that dies, hangs past the timeout, or misses a round by more than `round_timeout` is dropped;
the others go on (its sequential turn is skipped), waiting on the server for their timeout plus `round_timeout`.
A restarted client with the same id rejoins and receives the current client half with its plan. Fewer than
`min_clients` left ends the federation. At the end of each round whose step is a save step the server writes a
checkpoint from which the whole federation resumes (each client from its own checkpoint of that step). The server
writes the averaged client half (`client/`) next to its own (`server/`), so the output folder loads as one split
model; a U-shaped split's (`--label_privacy`) too when its heads are shared (`--share_head`), else each client
keeps its own `head/`.

The parts: `halves.py` (the half as a vector, FedAvg), `plan.py` (the round plan), `members.py` (joins, drops),
`schedules.py`, `checkpoint.py`, `client.py` (the client's link and callback) and `server.py` (the wiring).
"""

from .checkpoint import CLIENT_HALF_NAME, FEDERATION_STATE_NAME
from .client import RESULT_FIELDS, FederatedLink, FederationCallback, result_scalars
from .halves import client_side_tensors, fedavg, half_vector, load_half_vector
from .members import Member, Membership
from .plan import PLAN_BYTES, SCHEDULE_NAMES, FederationPlan, PlanError, plan_rounds
from .schedules import SCHEDULES, Schedule, Sequential, SplitFed, make_schedule
from .server import FEDERATION_ARGS, FederatedServer

__all__ = [
    "CLIENT_HALF_NAME",
    "FEDERATION_ARGS",
    "FEDERATION_STATE_NAME",
    "PLAN_BYTES",
    "RESULT_FIELDS",
    "SCHEDULES",
    "SCHEDULE_NAMES",
    "FederatedLink",
    "FederatedServer",
    "FederationCallback",
    "FederationPlan",
    "Member",
    "Membership",
    "PlanError",
    "Schedule",
    "Sequential",
    "SplitFed",
    "client_side_tensors",
    "fedavg",
    "half_vector",
    "load_half_vector",
    "make_schedule",
    "plan_rounds",
    "result_scalars",
]
