"""Members holding valid kits, turned hostile against a real federation server (`recipes/serve.py --num_clients`):
they cannot take another member's joining slot, own the average without lying, or get an honest member dropped for
their own slowness; each attack is followed by an honest member that trains to the end on the same server, and what
the model records is what the server measured."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import (
    REPLY,
    RESULTS,
    WireClient,
    client_hello,
    client_split,
    epoch_bytes,
    finish,
    free_address,
    model_args,
    start_server,
    step_bytes,
)

import hf_adc
from hf_adc.distributed import Refused
from hf_adc.distributed.federation import client_side_tensors, half_vector

LABELS = [str(i) for i in range(5)]
SHARD = 48


def federation_server(tmp_path, tiny_vit_path, *flags: str):
    """A SplitFed server for two members (a round is one step, two rounds), the members' HELLO settings, and the
    client half every member starts from."""
    federation = ("--compression", "none", "--num_clients", "2", "--max_steps", "2", *flags)
    address, output_dir = free_address(), tmp_path / "server"
    server = start_server(
        address, output_dir, *model_args(tiny_vit_path), *federation, "--schedule", "splitfed", "--sync_every", "1",
    )  # fmt: skip
    args = [*model_args(tiny_vit_path), *[f for f in federation if f not in ("--clip_updates", "0")]]
    settings, half_bytes = client_hello(args, LABELS)
    split, _, _ = client_split(args, LABELS)
    return address, server, output_dir, settings, half_bytes, half_vector(client_side_tensors(split))


def join(members: dict[int, WireClient], half_bytes: int, micro_batches: int = 1) -> None:
    """Every member's WELCOME, PLAN (answered once all have planned) and BEGIN."""
    for client_id, member in members.items():
        member.welcome()
        member.send_plan(client_id, shard_size=SHARD, step_bytes=step_bytes() * micro_batches, half_bytes=half_bytes,
                         epoch_bytes=epoch_bytes(SHARD))  # fmt: skip
    with ThreadPoolExecutor(len(members)) as pool:
        for plan in [pool.submit(member.plan) for member in members.values()]:
            plan.result(timeout=REPLY.total_seconds())
    for member in members.values():
        member.begin(2)


def ended(member: WireClient, test_accuracy: float) -> None:
    """END with results of 1 byte each way, 2 steps and `test_accuracy`."""
    member.end([1.0, 1.0, 0.0, 2.0, 4.0, 2.0, test_accuracy, test_accuracy][:RESULTS])


def ended_without_the_hostile_member(honest: WireClient, server, output_dir) -> dict:
    """The honest member's END, the server's exit, and its results: `degraded`, without client 1, client 0 finished."""
    ended(honest, 0.5)
    log = finish(server)
    assert server.returncode == 0, log[-3000:]
    report = json.loads((output_dir / "server_results.json").read_text())
    assert report["status"] == "degraded" and report["dropped"] == [1], report
    assert report["clients"]["0"]["finished"] and report["clients"]["0"]["drop_reason"] is None
    return report


def test_a_member_cannot_take_another_members_slot_nor_own_the_average_nor_forge_the_models_record(
    tiny_vit_path, tmp_path
):
    address, server, output_dir, settings, half_bytes, start = federation_server(
        tmp_path, tiny_vit_path, "--round_timeout", "60"
    )
    hostile = WireClient(address, settings, client_id=1)
    for _ in range(5):  # as many silent streams as it likes: each turned away at once, by name
        with pytest.raises(Refused, match="client-1 has a session joining or open already"):
            WireClient(address, settings, client_id=1, retry_busy=False).welcome()
    honest = WireClient(address, settings, client_id=0)  # its own slot is free
    join({0: honest, 1: hostile}, half_bytes)
    generator = torch.Generator().manual_seed(0)
    with ThreadPoolExecutor(1) as pool:
        for _ in range(2):
            honest.train_step()
            hostile.train_step()
            mine = start + 1e-3 * torch.randn(start.shape, generator=generator)
            averaged = pool.submit(honest.sync, mine, SHARD)
            hostile.sync(torch.full_like(start, 1e30), SHARD)  # finite, the right shape, an honest shard size
            average = averaged.result(timeout=REPLY.total_seconds())
            assert bool(torch.isfinite(average).all())
            # The hostile update was clipped to twice the honest one: the average moved at most 1.5 times as far.
            moved, honest_move = (average - start).norm(), (mine - start).norm()
            assert moved <= 1.5 * honest_move * 1.001, (moved, honest_move)
            start = average
    ended(honest, 0.5)
    ended(hostile, 1.0)  # a forged accuracy
    log = finish(server)
    assert server.returncode == 0, log[-3000:]
    assert "Client 1's update was clipped" in log and "Client 0's update was clipped" not in log, log[-3000:]
    report = json.loads((output_dir / "server_results.json").read_text())
    assert report["status"] == "finished" and report["dropped"] == [], report
    assert report["clients"]["1"]["clipped_rounds"] == 2 and report["clients"]["0"]["clipped_rounds"] == 0
    assert report["clients"]["1"]["reported"]["test_accuracy"] == 1.0  # kept, as what the member said
    saved = hf_adc.SplitViTForImageClassification.from_pretrained(output_dir)
    assert bool(torch.isfinite(half_vector(client_side_tensors(saved))).all())
    for part in (saved.client, saved.server):
        assert "test_accuracy" not in part.config.communication and "ratio" not in part.config.communication
        assert part.config.communication["counted_by"] == "server"
        assert part.config.client_reported["test_accuracy"] in (0.5, 1.0)  # a member's word, under its own key


def test_a_half_that_breaks_the_client_half_is_charged_to_its_sender_not_to_the_member_who_receives_it(
    tiny_vit_path, tmp_path
):
    address, server, output_dir, settings, half_bytes, start = federation_server(
        tmp_path, tiny_vit_path, "--round_timeout", "60", "--clip_updates", "0"  # no bound: only the charge holds
    )
    honest, hostile = WireClient(address, settings, client_id=0), WireClient(address, settings, client_id=1)
    join({0: honest, 1: hostile}, half_bytes)
    honest.train_step()
    hostile.train_step()
    with ThreadPoolExecutor(1) as pool:
        averaged = pool.submit(honest.sync, start, SHARD)
        with pytest.raises(Refused, match="client 1 was dropped .* its half makes the client half's activations NaN"):
            hostile.sync(torch.full_like(start, 1e30), SHARD)
        average = averaged.result(timeout=REPLY.total_seconds())
    torch.testing.assert_close(average, start)  # the average of the sound halves: the honest one alone
    honest.train_step()  # its next FORWARD is accepted: nothing broken reached it
    honest.sync(start, SHARD)
    report = ended_without_the_hostile_member(honest, server, output_dir)
    assert "activations NaN or Inf" in report["clients"]["1"]["drop_reason"]


@pytest.mark.parametrize("micro_batches", [1, 2, 4])
def test_a_holder_slower_than_its_lease_is_dropped_and_the_honest_waiter_trains_on(
    tiny_vit_path, tmp_path, micro_batches
):
    """Each message of the holder's step comes 0.9 of a lease after the last, so each alone is in time; the step is
    not, and the holder is the one dropped, never the member waiting for the server half. (A step of one micro-batch
    is a FORWARD and a STEP: its holder waits 1.2 leases before its STEP.)"""
    lease = 3.0
    pause = (0.9 if micro_batches > 1 else 1.2) * lease
    address, server, output_dir, settings, half_bytes, start = federation_server(
        tmp_path, tiny_vit_path, "--round_timeout", str(lease), "--gradient_accumulation_steps", str(micro_batches)
    )
    honest, hostile = WireClient(address, settings, client_id=0), WireClient(address, settings, client_id=1)
    join({0: honest, 1: hostile}, half_bytes, micro_batches)
    with ThreadPoolExecutor(1) as pool:
        def slow_step() -> None:
            hostile.train_step(micro_batches, pause)
            hostile.channel.recv(timeout=REPLY)  # STEP has no answer: what comes is the refusal

        slow = pool.submit(slow_step)
        time.sleep(0.5)  # the hostile member holds the server half now
        honest.train_step(micro_batches)  # waits for it, within its own limit
        with pytest.raises(Refused, match="client 1 .*held the server half past its lease of 3 s"):
            slow.result(timeout=REPLY.total_seconds())
    honest.sync(start, SHARD)
    honest.train_step(micro_batches)
    honest.sync(start, SHARD)
    report = ended_without_the_hostile_member(honest, server, output_dir)
    assert report["clients"]["0"]["steps"] == 2
