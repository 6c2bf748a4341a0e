"""Several clients against one server, as real processes: both schedules end to end, sync bytes charged exactly,
SplitFed with one client equal to the one-client run, a killed client dropped, disjoint reproducible shards."""

import json
import signal

import numpy as np
import pytest
import torch
from helpers import (
    data_args,
    finish,
    free_address,
    launch,
    model_args,
    signal_group,
    start_server,
    train_here,
    wait_for,
    wait_output,
)
from helpers import start_client as start_remote_client
from hub_server import LocalHub
from safetensors.torch import load_file
from transformers import ViTForImageClassification

import hf_adc
from hf_adc.data import partition_indices
from hf_adc.distributed.federation import PLAN_BYTES


def start_client(address: str, checkpoint: str, digits: str, output_dir, client_id: int, *extra: str):
    return start_remote_client(address, checkpoint, digits, output_dir, "--client_id", str(client_id), *extra)


def federation(tmp_path, checkpoint, digits, schedule, num_clients, steps, *extra, client_extra=(), server_extra=()):
    """Starts a server and `num_clients` clients; returns the server, the clients and the output folder."""
    address, output_dir = free_address(), tmp_path / schedule
    shared = ("--num_clients", str(num_clients), "--max_steps", str(steps), *extra)
    server = start_server(
        address, output_dir / "server", *model_args(checkpoint), *shared, "--schedule", schedule, "--sync_every", "2",
        "--round_timeout", "30", *server_extra,
    )  # fmt: skip
    clients = [
        start_client(address, checkpoint, digits, output_dir / f"client-{i}", i, *shared, *client_extra)
        for i in range(num_clients)
    ]
    return server, clients, output_dir


def finish_all(server, clients) -> tuple[str, list[str]]:
    logs = [wait_output(client, 300) for client in clients]
    server_log = finish(server, timeout=120)
    return server_log, logs


CHECKPOINTED = ("--save_strategy", "steps", "--save_steps", "2")


def three_clients(tmp_path, checkpoint, digits, schedule):
    """Three clients for 4 steps (2 rounds), every side checkpointing at steps 2 and 4; returns the output folder."""
    server, clients, output_dir = federation(tmp_path, checkpoint, digits, schedule, 3, 4, *CHECKPOINTED)
    server_log, logs = finish_all(server, clients)
    for client, log in zip(clients, logs, strict=True):
        assert client.returncode == 0, log[-3000:] + server_log[-3000:]
    assert server.returncode == 0, server_log[-3000:]
    return output_dir


@pytest.fixture(scope="module")
def sequential_run(tiny_vit_path, digits_dir, tmp_path_factory):
    return three_clients(tmp_path_factory.mktemp("sequential"), tiny_vit_path, digits_dir, "sequential")


@pytest.mark.parametrize("schedule", ["sequential", "splitfed"])
def test_three_clients_train_and_sync_bytes_are_the_half_times_its_transfers(request, tiny_vit_path, digits_dir,
                                                                             tmp_path, schedule):  # fmt: skip
    if schedule == "sequential":
        output_dir = request.getfixturevalue("sequential_run")
    else:
        output_dir = three_clients(tmp_path, tiny_vit_path, digits_dir, schedule)
    report = json.loads((output_dir / "server" / "server_results.json").read_text())
    assert report["status"] == "finished" and report["dropped"] == [], report
    assert report["plan"]["max_steps"] == 4 and report["plan"]["rounds"] == 2
    half = report["half_bytes"]
    per_client = []
    saved = json.loads((output_dir / "server" / "checkpoint-2" / "federation.json").read_text())
    assert saved["step"] == 2 and saved["round"] == 1 and saved["schedule"] == schedule
    for i in range(3):
        results = json.loads((output_dir / f"client-{i}" / "results.json").read_text())
        assert results["steps"] == 4
        federation_record = results["federation"]
        assert federation_record["half_bytes"] == half
        # SplitFed: each of 2 rounds sends the half up and gets the average back. Sequential: each of 2 turns gets
        # the current half (except the very first turn: the checkpoint itself) and hands it back, and at the end
        # every client gets the final half.
        expected = 2 * 2 if schedule == "splitfed" else 2 * 2 - (i == 0) + 1
        assert federation_record["sync_transfers"] == expected
        assert federation_record["sync_bytes"] == half * expected
        assert report["clients"][str(i)]["reported"]["sync_bytes"] == half * expected
        # The server's own count of its connections' frames covers everything the client reported (and framing).
        counted = report["clients"][str(i)]
        assert counted["counted_uplink_bytes"] + counted["counted_downlink_bytes"] >= results["total_bytes"] > 0
        assert counted["counted_uplink_bytes"] >= results["uplink_bytes"]
        per_client.append(results)
    assert report["reported_total"]["sync_bytes"] == sum(r["federation"]["sync_bytes"] for r in per_client)
    assert report["reported_total"]["total_bytes"] == sum(r["total_bytes"] for r in per_client)
    assert report["total"]["sync_bytes"] == report["reported_total"]["sync_bytes"]  # the server's own count agrees

    # Every client ends with the same client half, which the server saved with its own as one split model.
    final = load_file(output_dir / "server" / "client" / "model.safetensors")
    for i in range(3):
        mine = load_file(output_dir / f"client-{i}" / "client" / "model.safetensors")
        for name, tensor in final.items():
            torch.testing.assert_close(mine[name], tensor, atol=0, rtol=0, msg=name)
    split = hf_adc.SplitViTForImageClassification.from_pretrained(output_dir / "server")
    assert split.client.config.federation["schedule"] == schedule
    assert split.server.config.federation["num_clients"] == 3
    accuracies = {results["test_accuracy"] for results in per_client}
    assert len(accuracies) == 1, "the clients evaluated different final models"


@pytest.mark.parametrize("schedule", ["splitfed", "sequential"])
def test_the_budget_covers_every_client_and_the_sync(tiny_vit_path, digits_dir, tmp_path, schedule):
    server, clients, output_dir = federation(
        tmp_path, tiny_vit_path, digits_dir, schedule, 2, 0, "--compression", "adc", "--xi", "0.25",
        "--budget_epochs", "3",
    )  # fmt: skip
    server_log, logs = finish_all(server, clients)
    for client, log in zip(clients, logs, strict=True):
        assert client.returncode == 0, log[-3000:] + server_log[-3000:]
    report = json.loads((output_dir / "server" / "server_results.json").read_text())
    plan, total, half = report["plan"], report["reported_total"]["total_bytes"], report["half_bytes"]
    assert plan["rounds"] >= 2
    for i in range(2):
        assert json.loads((output_dir / f"client-{i}" / "results.json").read_text())["steps"] == plan["rounds"] * 2
    # What the plan counts: its rounds, each client's plan exchange and (sequential) the final half each gets with
    # its step count (float64). Whole batches (48 rows a shard, batch 16): every round sends what the plan counted
    # (sequential: but the very first turn, which starts from the client's own half), so the budget is spent to
    # within one round, and never exceeded.
    final = 2 * (PLAN_BYTES + (half + 8 if schedule == "sequential" else 0))
    planned = plan["rounds"] * plan["round_bytes"] + final
    assert total == planned - (half if schedule == "sequential" else 0)
    assert total <= planned <= plan["budget_bytes"] < planned + plan["round_bytes"]


ONE_CLIENT = ("--compression", "adc", "--xi", "0.25", "--max_steps", "6", "--num_clients", "1")
EVERY_THIRD_STEP = ("--save_strategy", "steps", "--save_steps", "3")


def one_client_splitfed(output_dir, checkpoint, digits, *extra) -> None:
    """One client in SplitFed, averaging every step, checkpointing at steps 3 and 6 (`output_dir`/server, /client)."""
    address = free_address()
    server = start_server(address, output_dir / "server", *model_args(checkpoint), *ONE_CLIENT, *EVERY_THIRD_STEP,
                          "--sync_every", "1", *extra)  # fmt: skip
    client = start_client(address, checkpoint, digits, output_dir / "client", 0, *ONE_CLIENT, *EVERY_THIRD_STEP,
                          *extra)  # fmt: skip
    client_log = wait_output(client, 300)
    server_log = finish(server)
    assert client.returncode == 0, client_log[-3000:] + server_log[-3000:]
    assert server.returncode == 0, server_log[-3000:]


@pytest.fixture(scope="module")
def one_client_run(tiny_vit_path, digits_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("one_client")
    one_client_splitfed(output_dir, tiny_vit_path, digits_dir)
    return output_dir


def test_splitfed_with_one_client_averaging_every_step_equals_the_one_client_run(tiny_vit_path, digits_dir, tmp_path,
                                                                                one_client_run):  # fmt: skip
    train_here([*model_args(tiny_vit_path, *ONE_CLIENT[:-2]), *data_args(digits_dir, tmp_path / "alone")])
    one = json.loads((tmp_path / "alone" / "results.json").read_text())
    fed = json.loads((one_client_run / "client" / "results.json").read_text())
    losses = [[entry["loss"] for entry in run["log_history"] if "loss" in entry] for run in (one, fed)]
    assert len(losses[0]) == 6
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
    assert fed["test_accuracy"] == one["test_accuracy"]
    assert fed["federation"]["sync_transfers"] == 12
    expected = load_file(tmp_path / "alone" / "client" / "model.safetensors")
    actual = load_file(one_client_run / "server" / "client" / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_a_ushaped_splitfed_client_averaging_every_step_trains_exactly_like_one_process(tiny_vit_path, digits_dir,
                                                                                      tmp_path):  # fmt: skip
    """With --share_head the head is part of the client half: it crosses in every sync (charged) and comes back as
    the average."""
    one_client_splitfed(tmp_path / "fed", tiny_vit_path, digits_dir, "--label_privacy", "--share_head")
    alone = [*model_args(tiny_vit_path, *ONE_CLIENT[:-2], "--label_privacy"), *data_args(digits_dir, tmp_path / "1")]
    train_here(alone)
    one = json.loads((tmp_path / "1" / "results.json").read_text())
    fed = json.loads((tmp_path / "fed" / "client" / "results.json").read_text())
    losses = [[entry["loss"] for entry in run["log_history"] if "loss" in entry] for run in (one, fed)]
    assert len(losses[0]) == 6 and losses[1] == pytest.approx(losses[0], abs=1e-6)
    assert fed["test_accuracy"] == one["test_accuracy"] and fed["topology"] == "u-shaped"
    split = hf_adc.split_vit(ViTForImageClassification.from_pretrained(tiny_vit_path), 2, label_privacy=True)
    values = sum(t.numel() for part in (split.client, split.head) for t in part.state_dict().values())
    assert fed["federation"]["half_bytes"] == 4 * values
    assert fed["federation"]["sync_transfers"] == 12 and fed["sync_bytes"] == 12 * 4 * values
    for part in ("client", "head"):
        expected = load_file(tmp_path / "1" / part / "model.safetensors")
        for saved in (tmp_path / "fed" / "server", tmp_path / "fed" / "client"):
            actual = load_file(saved / part / "model.safetensors")
            for name, tensor in expected.items():
                torch.testing.assert_close(actual[name], tensor, atol=1e-6, rtol=0, msg=f"{saved}: {part}: {name}")
    merged = hf_adc.USplitViTForImageClassification.from_pretrained(tmp_path / "fed" / "server")
    assert merged.head.config.federation["num_clients"] == 1


@pytest.fixture(scope="module")
def resumed_one_client_run(tiny_vit_path, digits_dir, tmp_path_factory, one_client_run) -> tuple:
    """`one_client_run` as if everything had stopped after step 3: both sides resume from their checkpoint-3."""
    whole, resumed = one_client_run, tmp_path_factory.mktemp("resumed_one_client")
    address = free_address()
    server = start_server(
        address, resumed / "server", *model_args(tiny_vit_path), *ONE_CLIENT, *EVERY_THIRD_STEP, "--sync_every", "1",
        "--resume_from_checkpoint", str(whole / "server" / "checkpoint-3"),
    )  # fmt: skip
    client = start_client(address, tiny_vit_path, digits_dir, resumed / "client", 0, *ONE_CLIENT, *EVERY_THIRD_STEP,
                          "--resume_from_checkpoint", str(whole / "client" / "checkpoint-3"))  # fmt: skip
    client_log = wait_output(client, 300)
    server_log = finish(server)
    assert client.returncode == 0, client_log[-3000:] + server_log[-3000:]
    return resumed, server_log


def test_a_splitfed_federation_resumes_from_the_servers_checkpoint_as_if_never_stopped(
    one_client_run, resumed_one_client_run
):
    """One client: with several, the server takes their steps in arrival order, so no two runs are alike."""
    whole, (resumed, server_log) = one_client_run, resumed_one_client_run
    assert "Resumed the federation at step 3 (round 3)" in server_log, server_log[-3000:]
    report = json.loads((resumed / "server" / "server_results.json").read_text())
    assert report["status"] == "finished" and report["resumed_from"] == 3, report
    for half in ("client", "server"):
        expected = load_file(whole / "server" / half / "model.safetensors")
        actual = load_file(resumed / "server" / half / "model.safetensors")
        for name, tensor in expected.items():
            torch.testing.assert_close(actual[name], tensor, atol=1e-6, rtol=0, msg=f"{half}: {name}")
    one, two = (json.loads((run / "client" / "results.json").read_text()) for run in (whole, resumed))
    assert two["steps"] == 6
    losses = [[entry["loss"] for entry in run["log_history"] if "loss" in entry] for run in (one, two)]
    assert len(losses[0]) == 6 and losses[1] == pytest.approx(losses[0], abs=1e-6)
    # The same bytes, plus the resumed session's one more plan exchange; every half both ways, every round.
    assert two["total_bytes"] == one["total_bytes"] + PLAN_BYTES
    assert two["sync_bytes"] == one["sync_bytes"] == 12 * one["federation"]["half_bytes"]
    assert two["federation"]["sync_transfers"] == one["federation"]["sync_transfers"] == 12
    assert two["test_accuracy"] == one["test_accuracy"]


def test_a_resumed_splitfed_federation_reports_every_half_the_server_sent(one_client_run, resumed_one_client_run):
    whole, (resumed, _) = one_client_run, resumed_one_client_run
    uninterrupted = json.loads((whole / "server" / "server_results.json").read_text())
    report = json.loads((resumed / "server" / "server_results.json").read_text())
    assert uninterrupted["sync_transfers"] == 12  # six rounds, a half up and the average down in each
    assert report["sync_transfers"] == 12


def test_a_killed_client_is_dropped_the_others_go_on_and_it_rejoins_with_the_current_half(tiny_vit_path, digits_dir,
                                                                                         tmp_path):  # fmt: skip
    patient = ("--timeout", "120", "--save_strategy", "no")  # the others wait, stopped, while client 2 restarts
    server, clients, output_dir = federation(
        tmp_path, tiny_vit_path, digits_dir, "splitfed", 3, 60, server_extra=(*patient, "--round_timeout", "120"),
        client_extra=patient,
    )  # fmt: skip
    address = next(arg for arg in server.args if arg.startswith("127.0.0.1:"))
    # Past the first round (its third step logged), so that the federation has an averaged half to hand out.
    wait_for(lambda: clients[2].log_path.read_text().count("'loss'") >= 3, 180, "client 2's third logged step")
    signal_group(clients[2], signal.SIGKILL)
    wait_for(lambda: "Client 2 dropped" in server.log_path.read_text(), 30, "the server dropping client 2")
    # The other two go on; they are stopped (and so wait) while client 2 restarts, so that it rejoins mid-way.
    for client in clients[:2]:
        signal_group(client, signal.SIGSTOP)
    # Meanwhile, with client 2's kit (free now: one session a member), a client with a wrong token and one with
    # another split are refused, and disturb nothing.
    strangers = [
        start_client(address, tiny_vit_path, digits_dir, tmp_path / "wrong-token", 2, "--num_clients", "3",
                     "--max_steps", "60", "--join_token", "guess"),
        start_client(address, tiny_vit_path, digits_dir, tmp_path / "other-split", 2, "--num_clients", "3",
                     "--max_steps", "60", "--split_layer", "1"),
    ]  # fmt: skip
    stranger_logs = [wait_output(stranger, 120) for stranger in strangers]
    again = start_client(address, tiny_vit_path, digits_dir, output_dir / "client-2", 2, "--num_clients", "3",
                         "--max_steps", "60", *patient)  # fmt: skip
    wait_for(lambda: "Client 2 rejoined at round" in server.log_path.read_text(), 120, "client 2 rejoining")
    for client in clients[:2]:
        signal_group(client, signal.SIGCONT)
    server_log, logs = finish_all(server, [*clients[:2], again])
    for client, log in zip([*clients[:2], again], logs, strict=True):
        assert client.returncode == 0, log[-3000:] + server_log[-3000:]
    for stranger, log, reason in zip(strangers, stranger_logs, ("wrong join token", "split settings differ"),
                                     strict=True):  # fmt: skip
        assert stranger.returncode != 0 and reason in log, log[-2000:]

    report = json.loads((output_dir / "server" / "server_results.json").read_text())
    assert report["status"] == "finished" and report["drops"] == [2] and report["rejoined"] == [2], report
    assert report["dropped"] == [], report
    for i in range(2):
        assert json.loads((output_dir / f"client-{i}" / "results.json").read_text())["steps"] == 60
    rounds_left = 30 - int(server_log.split("Client 2 rejoined at round ")[1].split(".")[0])
    rejoined = json.loads((output_dir / "client-2" / "results.json").read_text())
    assert rejoined["steps"] == rejoined["federation"]["plan"]["max_steps"] == 2 * rounds_left
    # The current half came with the plan, then each round sent it up and got the average back.
    assert rejoined["federation"]["sync_transfers"] == 1 + 2 * rounds_left
    final = load_file(output_dir / "server" / "client" / "model.safetensors")
    for i in range(3):
        mine = load_file(output_dir / f"client-{i}" / "client" / "model.safetensors")
        for name, tensor in final.items():
            torch.testing.assert_close(mine[name], tensor, atol=0, rtol=0, msg=name)


def test_a_hung_client_is_dropped_at_the_timeout_and_the_others_finish(tiny_vit_path, digits_dir, tmp_path):
    server, clients, output_dir = federation(
        tmp_path, tiny_vit_path, digits_dir, "splitfed", 3, 40, client_extra=("--save_strategy", "no")
    )
    try:
        wait_for(lambda: "'loss'" in clients[1].log_path.read_text(), 180, "client 1's first logged step")
        signal_group(clients[1], signal.SIGSTOP)
        server_log, logs = finish_all(server, [clients[0], clients[2]])
    finally:
        signal_group(clients[1], signal.SIGKILL)
    for client, log in zip([clients[0], clients[2]], logs, strict=True):
        assert client.returncode == 0, log[-3000:] + server_log[-3000:]
    report = json.loads((output_dir / "server" / "server_results.json").read_text())
    assert report["dropped"] == [1] and report["drops"] == [1] and report["status"] == "degraded", report
    # Its session's wait ends at --timeout (20 s), or the round's at --round_timeout (30 s), whichever comes first.
    assert "Client 1 dropped" in server_log or "Client 1 missed the round" in server_log, server_log[-3000:]
    for i in (0, 2):
        assert json.loads((output_dir / f"client-{i}" / "results.json").read_text())["steps"] == 40


def test_the_federation_resumes_from_the_servers_checkpoint_as_if_never_stopped(
    tiny_vit_path, digits_dir, tmp_path, sequential_run
):
    whole = sequential_run
    # As if everything had stopped after step 2: the server resumes from its checkpoint-2...
    address, resumed = free_address(), tmp_path / "resumed"
    shared = ("--num_clients", "3", "--max_steps", "4", *CHECKPOINTED)
    server = start_server(
        address, resumed / "server", *model_args(tiny_vit_path), *shared, "--schedule", "sequential", "--sync_every",
        "2", "--round_timeout", "30", "--resume_from_checkpoint", str(whole / "server" / "checkpoint-2"),
    )  # fmt: skip
    # ...a client resuming from another step is refused, and the federation waits for the right one...
    wrong = start_client(address, tiny_vit_path, digits_dir, tmp_path / "wrong", 0, *shared,
                         "--resume_from_checkpoint", str(whole / "client-0" / "checkpoint-4"))  # fmt: skip
    log = wait_output(wrong, 300)
    assert wrong.returncode != 0 and "resume every client from its checkpoint-2" in log, log[-3000:]
    # ...and every client resumes from its own checkpoint-2.
    clients = [
        start_client(address, tiny_vit_path, digits_dir, resumed / f"client-{i}", i, *shared,
                     "--resume_from_checkpoint", str(whole / f"client-{i}" / "checkpoint-2"))
        for i in range(3)
    ]  # fmt: skip
    server_log, logs = finish_all(server, clients)
    for client, log in zip(clients, logs, strict=True):
        assert client.returncode == 0, log[-3000:] + server_log[-3000:]
    assert "Resumed the federation at step 2 (round 1)" in server_log, server_log[-3000:]
    report = json.loads((resumed / "server" / "server_results.json").read_text())
    assert report["status"] == "finished" and report["resumed_from"] == 2, report
    uninterrupted = json.loads((whole / "server" / "server_results.json").read_text())
    assert report["sync_transfers"] == uninterrupted["sync_transfers"]
    for half in ("client", "server"):
        expected = load_file(whole / "server" / half / "model.safetensors")
        actual = load_file(resumed / "server" / half / "model.safetensors")
        for name, tensor in expected.items():
            torch.testing.assert_close(actual[name], tensor, atol=1e-6, rtol=0, msg=f"{half}: {name}")
    for i in range(3):
        one, two = (json.loads((run / f"client-{i}" / "results.json").read_text()) for run in (whole, resumed))
        assert two["steps"] == 4
        losses = [[entry["loss"] for entry in run["log_history"] if "loss" in entry] for run in (one, two)]
        assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], abs=1e-6)
        # The same bytes, plus the resumed session's one more plan exchange.
        assert two["total_bytes"] == one["total_bytes"] + PLAN_BYTES
        assert two["sync_bytes"] == one["sync_bytes"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"save_strategy": "epoch"}, r"save_strategy='epoch': a federation checkpoints at the end of rounds"),
        ({"save_strategy": "steps", "save_steps": 5}, r"save_steps=5 is out of range: .* multiple of sync_every=2"),
        ({"resume_from_checkpoint": "."}, r"resume_from_checkpoint='\.' is not a federation checkpoint"),
        ({"aggregation": "median", "min_clients": 2}, r"aggregation='median' with min_clients=2: with fewer than 3"),
        ({"aggregation": "trimmed_mean"}, r"aggregation='trimmed_mean' with min_clients=1: .* --min_clients 3"),
        ({"clip_updates": -1.0}, r"clip_updates=-1.0 is out of range: it must be >= 0"),
    ],
)
def test_settings_a_federation_cannot_honour_are_refused(kwargs, message, tmp_path):
    from hf_adc.distributed.federation import FederatedServer

    resume = kwargs.pop("resume_from_checkpoint", None)
    federation = {key: kwargs.pop(key) for key in ("aggregation", "min_clients", "clip_updates") if key in kwargs}
    args = hf_adc.ADCTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)
    with pytest.raises(ValueError, match=message):
        FederatedServer(None, args, tmp_path, num_clients=3, sync_every=2, resume_from=resume, **federation)


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_shards_are_disjoint_cover_the_rows_and_follow_the_seed(partition):
    labels = np.random.default_rng(0).integers(0, 10, size=997)
    shards = partition_indices(labels, 5, partition, alpha=0.5, seed=3)
    joined = np.concatenate(shards)
    assert len(joined) == len(labels) and set(joined.tolist()) == set(range(len(labels)))
    again = partition_indices(labels, 5, partition, alpha=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))
    other = partition_indices(labels, 5, partition, alpha=0.5, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other, strict=True))


def test_dirichlet_shards_are_skewed_and_iid_shards_are_not():
    labels = np.repeat(np.arange(10), 100)
    spread = {}
    for partition in ("iid", "dirichlet"):
        shards = partition_indices(labels, 4, partition, alpha=0.1, seed=0)
        shares = np.stack([np.bincount(labels[shard], minlength=10) / len(shard) for shard in shards])
        spread[partition] = np.abs(shares - 0.1).sum(axis=1).mean()
    assert spread["iid"] < 0.3 < spread["dirichlet"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0}, r"num_clients=0 is out of range"),
        ({"partition": "shards"}, r"partition='shards' is unknown"),
        ({"partition": "dirichlet", "alpha": 0.0}, r"alpha=0.0 is out of range"),
        ({"num_clients": 2000}, r"cannot give each of num_clients=2000"),
    ],
)
def test_bad_partitions_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        partition_indices(np.zeros(1000, dtype=int), **{"num_clients": 3, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"client_id": 3, "num_clients": 3}, r"client_id=3 is out of range: 0 \.\. 2"),
        ({"client_id": 0}, r"client_id=0 needs --num_clients"),
        ({"schedule": "gossip"}, r"schedule='gossip' is unknown"),
        ({"num_clients": 3, "min_clients": 4}, r"min_clients=4 is out of range: 1 \.\. 3"),
        ({"sync_every": 0}, r"sync_every=0 is out of range"),
    ],
)
def test_bad_federation_arguments_are_refused(kwargs, message):
    from hf_adc.experiment import FederationArguments

    with pytest.raises(ValueError, match=message):
        FederationArguments(**kwargs)


def test_model_cards_record_the_federation_and_keep_a_members_word_apart(tiny_vit):
    from hf_adc.hub import model_card

    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.ADCConfig(xi=0.25))
    total = {"sync_bytes": 4_000_000, "total_bytes": 10_000_000}
    split.server.config.federation = {"schedule": "splitfed", "num_clients": 3, "sync_every": 5, "dropped": [2],
                                      "total": total, "status": "degraded"}  # fmt: skip
    split.server.config.communication = {
        "uplink_bytes": 6_000_000, "downlink_bytes": 4_000_000, "steps": 5, "counted_by": "server"
    }  # fmt: skip
    split.server.config.client_reported = {"test_accuracy": 0.9, "ratio": 0.25}
    text = str(model_card(split.server, "server", "me/run-server"))
    assert "trained by 3 clients on their own shards, schedule `splitfed`" in text
    assert "4.0 MB\n  of the 10.0 MB sent, as the server counted it); clients dropped: 2" in text
    assert "the run is\n  degraded" in text
    assert "test accuracy reported by a member of the federation (not measured by the server): 0.9000" in text
    assert "0.2500" not in text and "test accuracy (uncompressed evaluation)" not in text  # no member's word as ours


def test_a_federation_client_refuses_to_push_before_any_work(tmp_path):
    from hf_adc import experiment
    from hf_adc.distributed.launch import run_client

    training = hf_adc.ADCTrainingArguments(
        output_dir=str(tmp_path), push_to_hub=True, hub_model_id="me/run", use_cpu=True, report_to="none"
    )
    with pytest.raises(ValueError, match="the server holds the final halves and pushes both"):
        run_client(
            experiment.ModelArguments(), experiment.SplitArguments(), experiment.DataArguments(), training,
            experiment.RemoteArguments(server="127.0.0.1:1"),
            experiment.FederationArguments(num_clients=2, client_id=0),
        )  # fmt: skip


@pytest.mark.parametrize(("topology", "schedule"), [("standard", "sequential"), ("u-shaped", "splitfed")])
def test_the_one_machine_command_starts_the_server_and_every_client_and_pushes_every_part(
    tiny_vit_path, digits_dir, tmp_path, topology, schedule
):
    ushaped = ("--label_privacy",) if topology == "u-shaped" else ()  # the heads stay with their clients
    with LocalHub() as hub:
        done = launch(
            "train.py",
            [*model_args(tiny_vit_path), *data_args(digits_dir, tmp_path / "run"), "--distributed", "--num_clients",
             "2", "--schedule", schedule, "--sync_every", "2", "--max_steps", "4", "--partition", "dirichlet",
             "--push_to_hub", "--hub_model_id", "me/fed", *ushaped],
            HF_ENDPOINT=hub.endpoint, HF_TOKEN="hf_test_token", HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0",
            HF_HOME=str(tmp_path / "hf_home"),
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert set(hub.repos) == {"me/fed-client", "me/fed-server"}  # no head: the server never held one
        card = hub.repos["me/fed-server"]["README.md"].decode()
    assert f"{schedule}, 2 clients: finished" in done.stdout
    assert f"trained by 2 clients on their own shards, schedule `{schedule}`" in card
    report = json.loads((tmp_path / "run" / "server_results.json").read_text())
    assert report["dropped"] == [] and set(report["clients"]) == {"0", "1"}
    final = load_file(tmp_path / "run" / "client" / "model.safetensors")
    for i in range(2):
        results = json.loads((tmp_path / "run" / f"client-{i}" / "results.json").read_text())
        assert results["steps"] == 4 and results["topology"] == topology
        mine = load_file(tmp_path / "run" / f"client-{i}" / "client" / "model.safetensors")
        for name, tensor in final.items():
            torch.testing.assert_close(mine[name], tensor, atol=0, rtol=0, msg=f"client {i}: {name}")
    if ushaped:  # each client's own head, trained on its own shard alone; none on the server, none in the sync
        assert not (tmp_path / "run" / "head").exists()
        heads = [load_file(tmp_path / "run" / f"client-{i}" / "head" / "model.safetensors") for i in range(2)]
        assert any(not torch.equal(heads[0][name], heads[1][name]) for name in heads[0])
        split = hf_adc.split_vit(ViTForImageClassification.from_pretrained(tiny_vit_path), 2, label_privacy=True)
        assert report["half_bytes"] == 4 * sum(t.numel() for t in split.client.state_dict().values())
