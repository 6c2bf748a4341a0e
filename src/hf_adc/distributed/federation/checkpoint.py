"""A federation's checkpoint: next to the server half's own files (`ServerHalf.save_checkpoint`), the current client
half and the federation's state (plan, round, members, schedule), written last so that a checkpoint with it is
whole."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..files import read_checked, write_atomically

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
    theirs = {**state["federation_settings"], **{name: state[name] for name in ("schedule", "num_clients")}}
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
