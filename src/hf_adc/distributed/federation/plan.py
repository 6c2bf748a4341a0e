"""The round plan: how many rounds every client trains so that all their steps and every half sent fit the budget.

A pure function of the members' costs and the server's settings (`plan_rounds`), and the PLAN message's scalars.
"""

from dataclasses import dataclass

import torch

SCHEDULE_NAMES = ("sequential", "splitfed")  # the wire's table: PLAN carries the index
PLAN_BYTES = 6 * 8 + 7 * 8  # the PLAN scalars, up and down (int64)


class PlanError(ValueError):
    """A plan that cannot be made; the federation ends with this reason."""


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


def plan_rounds(
    step_bytes: list[int],
    half_bytes: int,
    *,
    schedule: str,
    num_clients: int,
    min_clients: int,
    sync_every: int,
    final_bytes_per_client: int,
    budget_bytes: int | None,
    max_steps: int,
) -> FederationPlan:
    """Rounds R such that every client's R * sync_every steps and every half crossing fit `budget_bytes`; without
    a budget, `max_steps` (a whole number of rounds) per client. `step_bytes` has one entry per client that joined;
    `final_bytes_per_client` is what each client sends and receives after the last round (its PLAN, and the final
    half under the sequential schedule). Raises `PlanError` with the reason when no plan can be made."""
    joined = len(step_bytes)
    # A round: every client's steps, and each half up with its sample or step count (float64) and back down.
    round_bytes = sum(step_bytes) * sync_every + joined * (2 * half_bytes + 8)
    final_bytes = joined * final_bytes_per_client
    if joined < min_clients:
        raise PlanError(f"only {joined} of {num_clients} clients joined (min_clients={min_clients}).")
    if budget_bytes is not None:
        rounds = (budget_bytes - final_bytes) // round_bytes
        if rounds < 1:
            raise PlanError(
                f"the budget of {budget_bytes} bytes is smaller than one round ({round_bytes + final_bytes} bytes: "
                f"{joined} clients x {sync_every} steps, and their halves both ways)."
            )
    elif max_steps > 0:
        rounds = max_steps // sync_every
        if rounds < 1 or max_steps % sync_every:
            raise PlanError(f"max_steps={max_steps} must be a multiple of sync_every={sync_every}.")
    else:
        raise PlanError(
            "the server has no budget and no max_steps: give --budget_epochs, --communication_budget or --max_steps."
        )
    return FederationPlan(rounds * sync_every, sync_every, schedule, num_clients, rounds, budget_bytes, round_bytes)


def plan_scalars(plan: FederationPlan) -> torch.Tensor:
    """The PLAN reply's 7 int64 scalars (a budget of None as -1)."""
    budget = plan.budget_bytes if plan.budget_bytes is not None else -1
    return torch.tensor([
        plan.max_steps, plan.sync_every, SCHEDULE_NAMES.index(plan.schedule), plan.num_clients, plan.rounds, budget,
        plan.round_bytes,
    ])  # fmt: skip


def plan_from_scalars(scalars: torch.Tensor) -> FederationPlan:
    """The plan a PLAN reply carries."""
    max_steps, sync_every, schedule, num_clients, rounds, budget, round_bytes = scalars.tolist()
    budget = budget if budget >= 0 else None
    return FederationPlan(max_steps, sync_every, SCHEDULE_NAMES[schedule], num_clients, rounds, budget, round_bytes)
