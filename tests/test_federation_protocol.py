"""A real federation server (`recipes/serve.py --num_clients`) driven over the wire by clients made here with the
public protocol (`connect`, `Kind`, `json_tensor`; HELLO, PLAN, BEGIN, SYNC, END): FedAvg's shard weighting, the
plan's numbers, the settings and resumes it refuses (naming them), and the federations it cannot plan."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import (
    REPLY,
    WireClient,
    client_hello,
    epoch_bytes,
    finish,
    free_address,
    model_args,
    start_server,
    step_bytes,
)

import hf_adc
from hf_adc.distributed import Refused
from hf_adc.distributed.federation import PLAN_BYTES, client_side_tensors, half_vector

LABELS = [str(i) for i in range(5)]  # the digits' classes 0-4


def refusal(address: str, settings: dict, retry_busy: bool = True, **plan) -> str:
    """The server's reason for refusing a client with these settings (at its HELLO, or at its PLAN if given), made
    with the kit of the plan's client (client-1's without a plan: client-0 is the one training)."""
    client = WireClient(address, settings, client_id=plan.get("client_id", 1), retry_busy=retry_busy)
    with pytest.raises(Refused) as refused:
        client.welcome()
        client.send_plan(**plan)
        client.plan()
    return str(refused.value)


def test_splitfed_averages_unequal_shards_by_size_and_refuses_clients_that_differ_naming_the_setting(
    tiny_vit_path, tmp_path
):
    address, output_dir = free_address(), tmp_path / "server"
    federation = ("--compression", "none", "--num_clients", "2", "--max_steps", "2")
    server = start_server(
        address, output_dir, *model_args(tiny_vit_path), *federation, "--schedule", "splitfed", "--sync_every", "1",
        "--round_timeout", "60",
    )  # fmt: skip
    settings, half_bytes = client_hello([*model_args(tiny_vit_path), *federation], LABELS)
    pool = ThreadPoolExecutor(2)
    try:
        first = WireClient(address, settings)
        assert first.welcome() == 60.0  # the round timeout: how long a client may wait on the others
        first.send_plan(0, shard_size=30, step_bytes=step_bytes(), half_bytes=half_bytes, epoch_bytes=epoch_bytes(30))
        first_plan = pool.submit(first.plan)  # answered once both clients have planned

        # While the first client waits for the second, clients that differ from it or from the server are refused.
        def differing(**changes):
            return {**settings, "federation": {**settings["federation"], **changes}}

        assert "num_clients: client 3, server 2" in refusal(address, differing(num_clients=3))
        reason = refusal(address, {**settings, "rank": 0, "ranks": 2})  # a member is one process, not a DDP group
        assert "a federation member runs one process; this client runs 2" in reason
        reason = refusal(address, differing(partition="dirichlet"))
        assert "federation settings differ" in reason and "partition: client 'dirichlet', server 'iid'" in reason
        assert "alpha: client 0.1, server 0.5" in refusal(address, differing(alpha=0.1))
        assert "budget_epochs: client 2.0, server None" in refusal(address, differing(budget_epochs=2.0))
        assert "max_steps: client 4, server 2" in refusal(address, differing(max_steps=4))
        reason = refusal(address, differing(save_strategy="steps", save_steps=2))
        assert "save_steps: client 2, server 500" in reason and "save_strategy: client 'steps', server 'no'" in reason
        plan = {
            "client_id": 1, "shard_size": 90, "step_bytes": step_bytes(), "half_bytes": half_bytes,
            "epoch_bytes": epoch_bytes(90),
        }  # fmt: skip
        reason = refusal(address, settings, **{**plan, "resume_step": 2})
        assert "client 1 resumes from step 2, but this server did not resume the federation" in reason
        assert "--resume_from_checkpoint .../checkpoint-2" in reason
        reason = refusal(address, settings, retry_busy=False, **{**plan, "client_id": 0})
        assert "client-0 has a session joining or open already" in reason  # at the door: one session a member
        understated = refusal(address, settings, **{**plan, "step_bytes": step_bytes() - 1})
        assert f"announces {step_bytes() - 1} bytes a step; this split's is {step_bytes()}" in understated
        assert "this split's is 392400" in refusal(address, settings, **{**plan, "epoch_bytes": 1})
        impostor = WireClient(address, settings, client_id=1)  # member 1's kit, claiming member 0's id
        with pytest.raises(Refused, match=r"client_id=0 disagrees with the client's certificate \(client-1\)"):
            impostor.welcome()
            impostor.send_plan(**{**plan, "client_id": 0})
            impostor.plan()
        assert f"has {half_bytes + 4} bytes; this server's has {half_bytes}" in refusal(
            address, settings, **{**plan, "half_bytes": half_bytes + 4}
        )

        second = WireClient(address, settings, client_id=1)
        second.welcome()
        second.send_plan(**plan)
        plans = [first_plan.result(timeout=REPLY.total_seconds()), second.plan()]
        # max_steps, sync_every, schedule (splitfed), clients, rounds, no budget (-1), and a round's bytes: every
        # client's steps and each half up with its sample count (float64) and back down.
        round_bytes = 2 * step_bytes() * 1 + 2 * (2 * half_bytes + 8)
        for reply in plans:
            assert reply["scalars"].tolist() == [2, 1, 1, 2, 2, -1, round_bytes]
            assert "weights" not in reply  # no averaged half yet
        first.begin(2)
        second.begin(2)
        for client in (first, second):  # a round is one step (sync_every 1): a SYNC comes after it, never before
            client.train_step()

        generator = torch.Generator().manual_seed(0)
        halves = [torch.randn(half_bytes // 4, generator=generator) for _ in range(2)]
        averaged = pool.submit(first.sync, halves[0], 16)
        replies = [second.sync(halves[1], 16), averaged.result(timeout=REPLY.total_seconds())]
        expected = (30 * halves[0] + 90 * halves[1]) / 120
        for reply in replies:
            torch.testing.assert_close(reply, expected, rtol=1e-6, atol=1e-6)
        first.end([1.0, 2.0, 3.0, 4.0, 5.0, 1.0, 0.5, 0.25])
        second.end([10.0, 20.0, 30.0, 40.0, 50.0, 1.0, 0.5, 0.75])
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    log = finish(server)
    assert server.returncode == 0, log[-3000:]
    report = json.loads((output_dir / "server_results.json").read_text())
    assert report["status"] == "finished" and report["dropped"] == [], report
    assert {cid: client["shard_size"] for cid, client in report["clients"].items()} == {"0": 30, "1": 90}
    assert report["clients"]["1"]["reported"]["uplink_bytes"] == 10.0 and report["reported_total"]["sync_bytes"] == 33.0
    assert report["total"]["sync_bytes"] == 4 * half_bytes  # the server's own count: the halves that crossed
    # What each client reported is recorded as reported; beside it, the server's own count of its frames: each sent
    # its HELLO, PLAN, BEGIN, a half and its END up, and got a plan and the average (and replies) down.
    for client in report["clients"].values():
        assert client["counted_uplink_bytes"] > half_bytes and client["counted_downlink_bytes"] > half_bytes
    assert report["total"]["counted_uplink_bytes"] == sum(c["counted_uplink_bytes"] for c in report["clients"].values())
    assert report["sync_transfers"] == 4  # two halves up, the average down twice
    assert log.count("refused") == 12 and "Refused a stream of client-0 at the door" in log, log[-3000:]
    # The server keeps the averaged half as the split's client half.
    saved = hf_adc.SplitViTForImageClassification.from_pretrained(output_dir)
    torch.testing.assert_close(half_vector(client_side_tensors(saved)), expected, rtol=1e-6, atol=1e-6)
    assert PLAN_BYTES == 6 * 8 + 7 * 8  # what each client charges for this PLAN exchange, both ways


def test_a_federation_it_cannot_plan_fails_with_the_reason_in_server_results(tiny_vit_path, tmp_path):
    few = ("--compression", "none", "--num_clients", "3", "--max_steps", "2")
    ragged = ("--compression", "none", "--num_clients", "1", "--max_steps", "3")
    cases = {  # the server's flags, its clients' flags, how many clients come, and why no plan can be made
        "min_clients": (
            (*few, "--min_clients", "3", "--sync_every", "1", "--round_timeout", "3"), few, 2,
            "only 2 of 3 clients joined (min_clients=3).",
        ),
        "max_steps": ((*ragged, "--sync_every", "2"), ragged, 1, "max_steps=3 must be a multiple of sync_every=2."),
    }  # fmt: skip
    servers = {}
    for name, (flags, *_) in cases.items():  # both start at once
        address = free_address()
        servers[name] = address, start_server(address, tmp_path / name, *model_args(tiny_vit_path), *flags)
    for name, (_, client_flags, coming, reason) in cases.items():
        address, server = servers[name]
        settings, half_bytes = client_hello([*model_args(tiny_vit_path), *client_flags], LABELS)
        clients = [WireClient(address, settings, client_id=client_id) for client_id in range(coming)]
        for client_id, client in enumerate(clients):
            client.welcome()
            client.send_plan(
                client_id, shard_size=48, step_bytes=step_bytes(), half_bytes=half_bytes, epoch_bytes=epoch_bytes(48)
            )
        for client in clients:
            with pytest.raises(Refused, match=re.escape(reason)):
                client.plan()
        log = finish(server)
        assert server.returncode == 1 and "server: failed after 0 optimizer steps" in log, log[-3000:]
        report = json.loads((tmp_path / name / "server_results.json").read_text())
        assert (report["status"], report["detail"], report["plan"]) == ("failed", reason, None), report
