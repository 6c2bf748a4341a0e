"""A federation's checkpoint: next to the server half's own files (`ServerHalf.save_checkpoint`), the current client
half and the federation's state (plan, round, members, schedule), written last so that a checkpoint with it is
whole; and the federation put back as a checkpoint left it."""

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..files import read_checked, write_atomically
from ..wire import Refused
from .halves import half_size
from .members import SAVED_MEMBER_FIELDS, Member
from .plan import FederationPlan

FEDERATION_STATE_NAME = "federation.json"
CLIENT_HALF_NAME = "client_half.safetensors"


def write_federation_state(folder: Path, half: torch.Tensor, state: dict) -> None:
    """The client half, then the state (last: the checkpoint is whole once it exists), each written atomically."""
    write_atomically(folder / CLIENT_HALF_NAME, lambda path: save_file({"weights": half.contiguous()}, path))
    write_atomically(folder / FEDERATION_STATE_NAME, lambda path: path.write_text(json.dumps(state, indent=2)))


def read_federation_state(folder: Path, settings: dict) -> dict:
    """The state of the federation checkpoint in `folder`, once its settings are `settings` (the server's schedule,
    number of clients, round length, budget and checkpoint arguments); a `ValueError` names every difference."""
    path = folder / FEDERATION_STATE_NAME
    if not path.is_file():
        raise ValueError(
            f"resume_from_checkpoint={str(folder)!r} is not a federation checkpoint: it has no "
            f"{FEDERATION_STATE_NAME} (the server writes one at the end of each round whose step is a save step)."
        )
    state = read_checked(path, lambda path: json.loads(path.read_text()))
    theirs = {"share_head": False, **state["federation_settings"]}  # a checkpoint from before heads could be shared
    theirs.update({name: state[name] for name in ("schedule", "num_clients")})
    theirs["sync_every"] = state["sync_every"]
    differences = [
        f"{name}: checkpoint {theirs.get(name)!r}, server {value!r}"
        for name, value in settings.items()
        if theirs.get(name) != value
    ]
    if differences:
        raise ValueError(f"the federation checkpoint {folder} has other settings: {'; '.join(differences)}")
    return state


def read_client_half(folder: Path) -> torch.Tensor:
    return read_checked(folder / CLIENT_HALF_NAME, lambda path: load_file(path)["weights"])


def save_federation_checkpoint(federation, folder: Path, step: int) -> None:
    """`checkpoint-N` of a `FederatedServer` at the end of the round of step N: its server half, then the client
    half and the state."""
    federation.server_half.save_checkpoint(folder)
    members = []
    for member in federation.members.members.values():
        fields = {name: getattr(member, name) for name in SAVED_MEMBER_FIELDS}
        fields["counted_uplink_bytes"], fields["counted_downlink_bytes"] = member.counted()  # the live session's too
        members.append(fields)
    state = {
        "step": step, "round": federation.round, "steps": federation.steps, **federation.schedule.state(),
        "plan": asdict(federation.plan), "schedule": federation.schedule.name, "num_clients": federation.num_clients,
        "sync_every": federation.sync_every, "sync_transfers": federation.sync_transfers,
        "server_max_steps": federation.server_max_steps, "members": members,
        "federation_settings": federation.federation_settings,
    }  # fmt: skip
    write_federation_state(folder, federation.half, state)


def resume_federation(federation, state: dict) -> None:
    """The federation as the checkpoint in `federation.resume_from` left it at a round's end: plan, round, the client
    half, the server half with its optimizer and schedule. Its clients are expected back, as live members that have
    not joined. A file missing or not whole raises `CheckpointError` naming it."""
    folder = federation.resume_from
    federation.plan = FederationPlan(**state["plan"])
    federation.members.planned = True
    federation.round, federation.sync_transfers = state["round"], state["sync_transfers"]
    federation.schedule.restore(state)
    federation.half = read_client_half(folder)
    expected, saved = half_size(federation.client_tensors), federation.half.numel()
    if federation.half.shape != (expected,):
        raise Refused(f"the checkpoint's client half has {saved} values; this split's has {expected}.")
    federation.members.members = {m["client_id"]: Member(**m, joined=False) for m in state["members"]}
    federation.server_max_steps = state["server_max_steps"]
    federation.server_half.make_optimizer(federation.server_max_steps)
    federation.server_half.load_checkpoint(folder)
    federation.server_half.steps = state["steps"]
