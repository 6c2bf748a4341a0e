"""The federation's pure parts, without processes: FedAvg, the round plan, the schedule table, the link's roles."""

import subprocess
import sys

import pytest
import torch

from hf_adc import Link
from hf_adc.distributed.federation import (
    PLAN_BYTES,
    SCHEDULE_NAMES,
    SCHEDULES,
    PlanError,
    Sequential,
    SplitFed,
    fedavg,
    make_schedule,
    plan_rounds,
)
from hf_adc.distributed.federation.plan import plan_from_scalars, plan_scalars


def test_fedavg_weights_each_half_by_its_shard_size():
    halves = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, 0.0, -1.0]), torch.tensor([0.0, 4.0, 8.0])]
    shards = [10, 30, 60]
    expected = (10 * halves[0] + 30 * halves[1] + 60 * halves[2]) / 100
    torch.testing.assert_close(fedavg(halves, shards), expected)
    assert not torch.allclose(fedavg(halves, shards), torch.stack(halves).mean(0))  # unequal: not the plain mean


@pytest.mark.parametrize(
    ("weights", "message"), [([1.0], "one weight per half"), ([-1.0, 2.0], ">= 0"), ([0.0, 0.0], "positive sum")]
)
def test_fedavg_refuses_weights_that_do_not_make_a_mean(weights, message):
    with pytest.raises(ValueError, match=message):
        fedavg([torch.zeros(2), torch.ones(2)], weights)


def plan(**overrides):
    settings = dict(
        schedule="splitfed", num_clients=2, min_clients=1, sync_every=2, final_bytes_per_client=PLAN_BYTES,
        budget_bytes=10_000, max_steps=0,
    )  # fmt: skip
    settings.update(overrides)
    return plan_rounds([100, 120], 50, **settings)


def test_the_plan_takes_as_many_whole_rounds_as_fit_the_budget():
    # A round: both clients' 2 steps (100 + 120 bytes each), and each half up with its count and back down.
    round_bytes = (100 + 120) * 2 + 2 * (2 * 50 + 8)
    final = 2 * PLAN_BYTES
    result = plan()
    assert result.round_bytes == round_bytes
    assert result.rounds == (10_000 - final) // round_bytes
    assert result.rounds * round_bytes + final <= 10_000 < (result.rounds + 1) * round_bytes + final
    assert result.max_steps == result.rounds * 2


def test_the_sequential_final_half_is_in_the_plan():
    per_client = PLAN_BYTES + Sequential().final_bytes(50)
    assert per_client == PLAN_BYTES + 50 + 8
    budget = 2 * per_client + 3 * plan().round_bytes
    assert plan(schedule="sequential", final_bytes_per_client=per_client, budget_bytes=budget).rounds == 3
    assert plan(schedule="sequential", final_bytes_per_client=per_client, budget_bytes=budget - 1).rounds == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"budget_bytes": 500}, "smaller than one round"),
        ({"budget_bytes": None, "max_steps": 3}, "max_steps=3 must be a multiple of sync_every=2"),
        ({"budget_bytes": None, "max_steps": 0}, "no budget and no max_steps"),
        ({"min_clients": 3, "num_clients": 3}, "only 2 of 3 clients joined"),
    ],
)
def test_a_plan_that_cannot_be_made_says_why(overrides, message):
    with pytest.raises(PlanError, match=message):
        plan(**overrides)


def test_max_steps_in_whole_rounds_is_honoured_exactly():
    result = plan(budget_bytes=None, max_steps=6)
    assert (result.rounds, result.max_steps, result.budget_bytes) == (3, 6, None)


def test_the_plan_crosses_the_wire_as_seven_scalars_and_back():
    for original in (plan(), plan(budget_bytes=None, max_steps=4, schedule="sequential")):
        scalars = plan_scalars(original)
        assert scalars.shape == (7,) and scalars.dtype == torch.int64
        assert plan_from_scalars(scalars) == original


def test_every_schedule_has_its_place_in_the_wire_table():
    assert tuple(SCHEDULES) == SCHEDULE_NAMES == ("sequential", "splitfed")
    assert isinstance(make_schedule("splitfed"), SplitFed) and isinstance(make_schedule("sequential"), Sequential)
    with pytest.raises(ValueError, match="schedule='ring' is unknown: choose one of sequential, splitfed"):
        make_schedule("ring")


def test_a_one_process_link_answers_no_to_every_role_the_trainer_asks():
    link = Link()
    assert (link.peer_steps, link.plans_steps, link.trainer_callbacks(None)) == (False, False, [])
    with pytest.raises(NotImplementedError, match="Link has no other end that steps with it"):
        link.optimizer_step(torch.zeros(1), 1.0)
    with pytest.raises(NotImplementedError, match="Link has no other end that plans its steps"):
        link.plan_steps(1, 1, 1)


def test_training_imports_nothing_of_the_distributed_package():
    code = "import sys, hf_adc.training; print(sorted(m for m in sys.modules if m.startswith('hf_adc.distributed')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.strip() == "[]"


def test_one_poisoned_half_among_three_moves_a_robust_rule_no_further_than_an_honest_one():
    from hf_adc.distributed.federation.halves import AGGREGATIONS

    generator = torch.Generator().manual_seed(0)
    honest = [torch.randn(1000, generator=generator) for _ in range(3)]
    poisoned = [honest[0], honest[1], torch.full((1000,), 1e6)]
    shards = [100, 100, 10**9]  # the poisoner also claims a huge shard
    for rule in ("median", "trimmed_mean"):
        aggregate = AGGREGATIONS[rule]
        clean = aggregate(honest, [100, 100, 100])
        moved = (aggregate(poisoned, shards) - clean).abs().max()
        honest_spread = (torch.stack(honest) - clean).abs().max()
        assert moved <= honest_spread, rule
    fedavg_moved = (AGGREGATIONS["fedavg"](poisoned, shards) - AGGREGATIONS["fedavg"](honest, [100] * 3)).abs().max()
    assert fedavg_moved > 1e5  # FedAvg is owned by the poisoner: why the robust rules exist


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    from hf_adc.distributed.federation.halves import trimmed_mean

    halves = [torch.tensor([1.0, 10.0]), torch.tensor([2.0, -50.0]), torch.tensor([100.0, 20.0])]
    torch.testing.assert_close(trimmed_mean(halves, [1, 1, 1]), torch.tensor([2.0, 10.0]))
    with pytest.raises(ValueError, match="trim=2 is out of range for 3 halves: 0 .. 1"):
        trimmed_mean(halves, [1, 1, 1], trim=2)


@pytest.mark.parametrize(
    ("vector", "message"),
    [
        (torch.zeros(4, dtype=torch.float64), "float64 \\(4,\\); this split's is float32 \\(4,\\)"),
        (torch.zeros(5), "\\(5,\\); this split's is float32 \\(4,\\)"),
        (torch.tensor([0.0, float("nan"), 0.0, 0.0]), "NaN or Inf"),
    ],
)
def test_a_half_of_the_wrong_shape_dtype_or_not_finite_is_refused(vector, message):
    from hf_adc.distributed.federation.halves import check_half
    from hf_adc.distributed.wire import WireError

    with pytest.raises(WireError, match=message):
        check_half(vector, 4, client_id=2)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_an_end_whose_results_are_negative_or_not_finite_is_refused_and_nothing_is_recorded(bad):
    from types import SimpleNamespace

    from hf_adc.distributed.federation.client import RESULT_FIELDS
    from hf_adc.distributed.federation.members import Member
    from hf_adc.distributed.federation.session import FederatedSession
    from hf_adc.distributed.wire import Frame, Kind, WireError

    member = Member(client_id=0)
    session = FederatedSession(SimpleNamespace(), member, SimpleNamespace())
    scalars = torch.ones(len(RESULT_FIELDS), dtype=torch.float64)
    scalars[0] = bad
    with pytest.raises(WireError, match="results must be finite and >= 0"):
        session.handlers[Kind.END](Frame(Kind.END, tensors={"scalars": scalars}))
    assert member.results == {} and not member.finished


def _member(**fields):
    from hf_adc.distributed.federation.members import Member

    return Member(client_id=1, **fields)


def test_a_round_that_ends_before_its_steps_and_a_step_beyond_the_plan_are_refused():
    from types import SimpleNamespace

    from hf_adc.distributed.federation.members import Membership
    from hf_adc.distributed.federation.session import FederatedSession
    from hf_adc.distributed.wire import Frame, Kind, Refused, WireError

    federation = SimpleNamespace(sync_every=2, half_values=4, members=Membership(2, 2, round_timeout=1.0))
    with pytest.raises(WireError, match="client 1's SYNC came after 1 optimizer steps; a round is 2"):
        SplitFed(federation).sync(_member(steps_since_sync=1), torch.zeros(4))
    sequential = Sequential(federation)
    sequential.holder = 1
    with pytest.raises(WireError, match="client 1's HANDOFF came after 3 optimizer steps; a round is 2"):
        sequential.turn = 1
        sequential.hand_off(_member(steps_since_sync=3), torch.zeros(4))
    with pytest.raises(WireError, match="final SYNC came after 3 of its 4 steps"):
        sequential.holder = None
        sequential.sync(_member(steps=3, planned_steps=4), None)
    with pytest.raises(WireError, match="took a step outside its turn"):
        sequential.check_step(_member())
    sequential.turn = None  # every live member has taken all its turns: a late TURN is refused, not left waiting
    with pytest.raises(Refused, match="every turn of this federation is taken"):
        sequential.take_turn(_member())
    for member in (_member(steps=4, planned_steps=4), _member(planned_steps=4, steps_since_sync=2)):
        session = FederatedSession(federation, member, SimpleNamespace())
        with pytest.raises(WireError, match="took a step beyond its plan"):
            session.handlers[Kind.STEP](Frame(Kind.STEP, tensors={"norm": torch.ones(3)}, value=1.0))


def test_a_members_update_is_bounded_to_twice_the_rounds_median_whatever_it_sends():
    from hf_adc.distributed.federation.guard import bound_updates

    current = torch.zeros(1000)
    generator = torch.Generator().manual_seed(0)
    honest = [0.01 * torch.randn(1000, generator=generator) for _ in range(2)]
    scales = bound_updates([*honest, torch.full((1000,), 1e30)], current, 2.0)
    assert scales[:2] == [1.0, 1.0]  # honest updates, no larger than twice the median: untouched
    median = sorted(float(h.norm()) for h in honest)[1]  # the lower middle of three distances is the larger honest
    assert scales[2] * 1e30 * 1000**0.5 == pytest.approx(2 * median, rel=1e-5)
    assert bound_updates([honest[0], torch.full((1000,), 1e30)], current, 2.0)[0] == 1.0  # two members: the smaller
    assert bound_updates([torch.full((1000,), 3.0e38)] * 2, current, 2.0) == [1.0, 1.0]  # no overflow: float64
    assert bound_updates([*honest, torch.full((1000,), 1e30)], current, 0.0) == [1.0, 1.0, 1.0]  # 0: no bound
