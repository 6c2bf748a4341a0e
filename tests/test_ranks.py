"""Two processes on each side of one split (gloo on CPU): a client of two ranks against a server of two ranks trains
exactly as the local two-process DDP split; ranks that do not fit are refused by both sides, naming both counts; a
rank that dies ends the whole run, and both sides resume from their last common checkpoint."""

import json
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import (
    TIMEOUT,
    WireClient,
    client_hello,
    data_args,
    free_address,
    launch_command,
    model_args,
    pair_case,
    run_drivers,
    signal_group,
    spawn,
    start_server,
    wait_output,
    with_credentials,
)
from safetensors.torch import load_file

from hf_adc.distributed import Refused
from hf_adc.distributed.launch import _free_ports
from hf_adc.distributed.ranks import rank_address

STEPS, RANKS, ROWS_PER_RANK, BATCH = 4, 2, 96 // 2, 16
METHODS = {
    "none": ("--compression", "none"),
    "adc": ("--compression", "adc", "--xi", "0.25"),
    "bottlenet": ("--compression", "bottlenet", "--ratio", "0.25"),
}
CASES = [(method, accumulation, False) for method in METHODS for accumulation in (1, 2)] + [("adc", 1, True)]
# Trainable tensors (see test_remote): the client's embeddings and two layers, BottleNet++'s encoder, a U-shaped
# split's head; the server's two layers, final norm and classifier, BottleNet++'s decoder.
CLIENT_TENSORS, ENCODER_TENSORS, HEAD_TENSORS = 4 + 2 * 16, 4, 4
SERVER_TENSORS, DECODER_TENSORS = 2 * 16 + 4, 4


def _case_name(method: str, accumulation: int, ushaped: bool) -> str:
    return f"{method}{'-accumulation' if accumulation > 1 else ''}{'-ushaped' if ushaped else ''}"


RESUMABLE = ("--compression", "adc", "--xi", "0.25", "--max_steps", "8", "--save_strategy", "steps", "--save_steps",
             "4", "--ddp_timeout", "60")  # fmt: skip
DEATH = 6  # the server rank dies after this optimizer step: checkpoint-4 is the last both sides saved


@pytest.fixture(scope="module")
def two_rank_runs(tiny_vit_path, digits_dir, tmp_path_factory):
    """Every case trained by the local two-process DDP split and by a client of two processes against a server of
    two ranks (one start of each group for all cases, `pairs_driver.py`); first, the client of two processes
    against a server of one; last, a run whose server rank 1 dies, and the uninterrupted run to resume it against.
    Returns the folder and the logs."""
    root = tmp_path_factory.mktemp("ranks")
    single = free_address()
    single_server = start_server(single, root / "single", *model_args(tiny_vit_path, "--max_steps", str(STEPS)))
    refused = [*model_args(tiny_vit_path, "--max_steps", str(STEPS)), *data_args(digits_dir, root / "refused"),
               "--server", single, "--timeout", TIMEOUT]  # fmt: skip
    plan = [{"name": "refused", "refused": with_credentials(refused), "record": str(root / "refused.json")}]
    for case in CASES:
        method, accumulation, ushaped = case
        name = _case_name(*case)
        shared = model_args(
            tiny_vit_path, *METHODS[method], "--gradient_accumulation_steps", str(accumulation),
            "--max_steps", str(STEPS), "--ddp_timeout", "60", *(("--label_privacy",) if ushaped else ()),
        )  # fmt: skip
        plan.append(pair_case(name, shared, digits_dir, root, f"127.0.0.1:{_free_ports(RANKS)}"))
        plan[-1]["local"] = [*shared, *data_args(digits_dir, root / name / "local")]
    # `--distributed` from a client of two processes: one server, of two ranks, started by client rank 0.
    adc = model_args(tiny_vit_path, *METHODS["adc"], "--max_steps", str(STEPS), "--ddp_timeout", "60")
    plan.append({"name": "distributed", "client": [*adc, *data_args(digits_dir, root / "distributed"),
                                                   "--distributed", "--timeout", TIMEOUT]})  # fmt: skip
    resumable = model_args(tiny_vit_path, *RESUMABLE)
    plan.append(pair_case("uninterrupted", resumable, digits_dir, root, f"127.0.0.1:{_free_ports(RANKS)}"))
    plan.append(pair_case("interrupted", resumable, digits_dir, root, f"127.0.0.1:{_free_ports(RANKS)}"))
    plan[-1]["die"] = {"rank": 1, "step": DEATH, "record": str(root / "died")}
    runs = run_drivers(plan, root / "plan.json", "cpu_2proc.yaml")
    signal_group(single_server, signal.SIGKILL)  # it refused the client and waits for the next
    single_server.wait(timeout=30)
    return {"root": root, "single_log": single_server.log_path.read_text(), **runs}


def test_a_client_of_two_processes_against_a_server_of_one_is_refused_by_both_naming_both(two_rank_runs):
    errors = json.loads((two_rank_runs["root"] / "refused.json").read_text())
    assert len(errors) == RANKS
    assert "Refused" in errors[0] and "the client runs 2 process(es) and this server 1" in errors[0], errors
    assert "RankFailed: client rank 0 failed" in errors[1] and "this server 1" in errors[1], errors
    assert "the client runs 2 process(es) and this server 1" in two_rank_runs["single_log"]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for name in ("client", "server", "head"):
        if (folder / name / "model.safetensors").exists():
            weights.update({f"{name}:{k}": v for k, v in load_file(folder / name / "model.safetensors").items()})
    for name in ("bridge.safetensors", "server_bridge.safetensors"):
        if (folder / name).exists():
            weights.update({f"bridge:{k}": v for k, v in load_file(folder / name).items() if "calls" not in k})
    return weights


def _micro_batches(accumulation: int, per_epoch: int = ROWS_PER_RANK // BATCH) -> int:
    """One rank's micro-batches in `STEPS` steps: each epoch is steps of `accumulation`, and a ragged last one."""
    ragged = per_epoch % accumulation
    windows = [accumulation] * (per_epoch // accumulation) + ([ragged] if ragged else [])
    return sum(windows[step % len(windows)] for step in range(STEPS))


@pytest.mark.parametrize(("method", "accumulation", "ushaped"), CASES, ids=[_case_name(*case) for case in CASES])
def test_two_ranks_a_side_train_one_split_exactly_like_the_local_ddp_split(two_rank_runs, method, accumulation,
                                                                          ushaped):  # fmt: skip
    folder = two_rank_runs["root"] / _case_name(method, accumulation, ushaped)
    assert (folder / "split" / "results.json").exists(), two_rank_runs["client_log"][-4000:]
    local = json.loads((folder / "local" / "results.json").read_text())
    split = json.loads((folder / "split" / "results.json").read_text())
    assert local["world_size"] == split["world_size"] == RANKS
    losses = [[entry["loss"] for entry in run["log_history"] if "loss" in entry] for run in (local, split)]
    assert len(losses[0]) == STEPS
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
    assert split["test_accuracy"] == local["test_accuracy"]
    expected, actual = _weights(folder / "local"), _weights(folder / "split")
    assert expected.keys() == actual.keys() and any(key.startswith("server:") for key in actual)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=key)

    # The ledger, summed over the ranks: the local split's, plus each rank's control values (per micro-batch the
    # smoothing and seed up and the loss down, or a U-shaped split's row count up; per step the norms both ways).
    bottlenet = method == "bottlenet"
    norms = CLIENT_TENSORS + ENCODER_TENSORS * bottlenet + HEAD_TENSORS * ushaped
    server_norms = SERVER_TENSORS - 4 * ushaped + DECODER_TENSORS * bottlenet  # the head's norm and classifier
    micro_batches = _micro_batches(accumulation)
    control_up = RANKS * ((8 if ushaped else 16) * micro_batches + STEPS * (4 * norms + 8))
    control_down = RANKS * ((0 if ushaped else 8) * micro_batches + STEPS * 4 * server_norms)
    assert split["uplink_bytes"] == local["uplink_bytes"] + control_up
    assert split["downlink_bytes"] == local["downlink_bytes"] + control_down

    # One server: its two ranks stepped together, rank 0 wrote the results with every rank's traffic in them.
    server = json.loads((folder / "split" / "server_results.json").read_text())
    assert server["status"] == "finished" and server["steps"] == STEPS
    assert len(server["rank_traffic"]) == RANKS
    assert server["traffic"]["payload_received"] == sum(rank["payload_received"] for rank in server["rank_traffic"])
    assert server["traffic"]["payload_received"] == split["transport"]["payload_sent"]
    assert server["traffic"]["payload_sent"] == split["transport"]["payload_received"]


def test_distributed_from_a_client_of_two_processes_starts_one_server_of_two_ranks(two_rank_runs):
    root = two_rank_runs["root"]
    assert (root / "distributed" / "results.json").exists(), two_rank_runs["client_log"][-4000:]
    server = json.loads((root / "distributed" / "server_results.json").read_text())
    assert server["status"] == "finished" and len(server["rank_traffic"]) == RANKS
    assert two_rank_runs["client_log"].count("Serving the server half on") == RANKS  # one server, two ranks
    expected, actual = _weights(root / "adc" / "local"), _weights(root / "distributed")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=key)


def _probe(address: str, settings: dict, client_id: int = 0) -> WireClient:
    return WireClient(address, settings, client_id=client_id, retry_busy=False)


def test_a_dead_server_rank_ends_the_whole_run_and_both_sides_resume_exactly_from_their_last_common_checkpoint(
    two_rank_runs, tiny_vit_path, digits_dir
):
    root = two_rank_runs["root"]
    # The death (server rank 1, abruptly, after step 6) ended both groups, each within the timeout.
    assert two_rank_runs["server"] != 0 and two_rank_runs["client"] != 0
    assert two_rank_runs["ended"] - float((root / "died").read_text()) < float(TIMEOUT)
    folder = root / "interrupted" / "split"
    assert (folder / "checkpoint-4" / "trainer_state.json").exists()
    assert (folder / "checkpoint-4" / "server_state.safetensors").exists()
    assert not (folder / "results.json").exists()
    ended = folder / "server_results.json"  # rank 0 may write why it ended before its launcher stops it
    assert not ended.exists() or json.loads(ended.read_text())["status"] in ("failed", "client lost")

    # Resumed, with the same two ranks a side: first, sessions that do not fit this server are refused.
    address = f"127.0.0.1:{_free_ports(RANKS)}"
    resume = ("--resume_from_checkpoint", str(folder / "checkpoint-4"))
    plan = [pair_case("interrupted", model_args(tiny_vit_path, *RESUMABLE), digits_dir, root, address, *resume)]
    plan[0]["wait_for"] = str(root / "probed")
    refusals = []

    def probe() -> None:
        rank_one = rank_address(address, 1)
        settings, _ = client_hello(plan[0]["client"], [str(label) for label in range(5)])
        for where, claim, message in [
            (address, {}, "the client runs 1 process(es) and this server 2"),
            (address, {"rank": 5, "ranks": 2}, "the client claims rank 5, outside 0 .. 1"),
            (address, {"rank": 1, "ranks": 2}, "client rank 1 reached server rank 0"),
            (rank_one, {"rank": 0, "ranks": 2}, "client rank 0 reached server rank 1"),
        ]:
            with pytest.raises(Refused, match=re.escape(message)):
                _probe(where, {**settings, **claim}).welcome()
            refusals.append(message)
        # All ranks of one client are one party: one rank each with client-0's and client-1's kit is refused at
        # BEGIN, by both server ranks; a second session of one rank is turned away while the first is open.
        first = _probe(address, {**settings, "rank": 0, "ranks": 2})
        first.welcome()
        with pytest.raises(Refused, match="busy"):
            _probe(address, {**settings, "rank": 0, "ranks": 2}).welcome()
        other = _probe(rank_one, {**settings, "rank": 1, "ranks": 2}, client_id=1)
        other.welcome()
        with ThreadPoolExecutor(2) as pool:
            begins = [pool.submit(session.begin, 8) for session in (first, other)]
            for begun in begins:
                with pytest.raises(Refused, match=r"differ in certificate identity.*client-0.*client-1"):
                    begun.result(timeout=60)
        refusals.append("identity")
        (root / "probed").touch()

    runs = run_drivers(plan, root / "resume.json", "cpu_2proc.yaml", during=probe)
    assert len(refusals) == 5
    assert runs["client"] == 0 and runs["server"] == 0, runs["client_log"][-4000:] + runs["server_log"][-3000:]
    resumed = json.loads((folder / "results.json").read_text())
    uninterrupted = json.loads((root / "uninterrupted" / "split" / "results.json").read_text())
    losses = [[entry["loss"] for entry in run["log_history"] if "loss" in entry] for run in (uninterrupted, resumed)]
    assert resumed["steps"] == 8 and losses[1] == pytest.approx(losses[0], abs=1e-6)  # the first 4 from the checkpoint
    expected, actual = _weights(root / "uninterrupted" / "split"), _weights(folder)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=key)
    assert json.loads((folder / "server_results.json").read_text())["status"] == "finished"


def test_a_server_rank_still_waiting_for_its_client_stops_when_another_ranks_serving_ends(tiny_vit_path, tmp_path):
    """`accelerate launch --num_processes 2 recipes/serve.py`: client rank 0 joins and vanishes before rank 1 came;
    server rank 0 ends (its client is lost), and rank 1, still waiting for its client, ends too, long before its
    accept timeout, instead of holding a half of a server that can no longer train."""
    address = f"127.0.0.1:{_free_ports(RANKS)}"
    args = [*model_args(tiny_vit_path, "--max_steps", str(STEPS), "--ddp_timeout", "60"), "--listen", address,
            "--timeout", TIMEOUT, "--accept_timeout", "300", "--output_dir", str(tmp_path / "server")]  # fmt: skip
    server = spawn(launch_command("serve.py", with_credentials(args), "cpu_2proc.yaml"), HF_ADC_JOIN_TOKEN="secret")
    settings, _ = client_hello(args, [str(label) for label in range(5)])
    first = _probe(address, {**settings, "rank": 0, "ranks": 2})
    first.welcome()
    first.channel.close()  # gone before its rank 1 joined
    started = time.monotonic()
    log = wait_output(server, 60)
    assert time.monotonic() - started < 30, log[-3000:]
    assert "another server rank has ended its serving (rank 0: client lost)" in log, log[-3000:]


def test_a_federation_server_refuses_to_start_as_several_ranks(tiny_vit_path, tmp_path):
    from types import SimpleNamespace

    from hf_adc.distributed.arguments import FederationArguments, RemoteArguments
    from hf_adc.distributed.launch import run_server
    from hf_adc.experiment import ModelArguments, SplitArguments

    training = SimpleNamespace(world_size=2, process_index=0, push_to_hub=False, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="--num_clients 3 with 2 server processes: a federation is served by one"):
        run_server(
            ModelArguments(model_name_or_path=tiny_vit_path), SplitArguments(), training,
            RemoteArguments(listen=free_address(), insecure=True), FederationArguments(num_clients=3),
        )  # fmt: skip
