"""Client and server as real separate processes (`recipes/serve.py`, `accelerate launch recipes/train.py
--server`): the same training as one process, and every fault ends within its timeout."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_recipes import ROOT, launch, tiny_run_args

import hf_adc
from hf_adc.transport import Kind, PeerLost, Refused, connect, json_tensor
from hf_adc.transport.wire import FIXED, PROTOCOL_VERSION, encode_header

TIMEOUT = "20"
ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def free_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def model_args(checkpoint: str, *extra: str) -> list[str]:
    """What both sides must agree on: model, split, compression, optimizer and schedule."""
    return [
        "--model_name_or_path", checkpoint, "--split_layer", "2", "--per_device_train_batch_size", "16",
        "--learning_rate", "1e-3", "--seed", "3", *extra,
    ]  # fmt: skip


def data_args(data: str, output_dir) -> list[str]:
    return [
        "--dataset_name", data, "--classes", "0-4", "--max_train_samples", "96", "--max_eval_samples", "48",
        "--output_dir", str(output_dir), "--logging_steps", "1", "--disable_tqdm", "true",
        "--eval_strategy", "no",
    ]  # fmt: skip


def start_server(address: str, output_dir, *args: str, token: str = "secret") -> subprocess.Popen:
    command = [
        sys.executable, str(ROOT / "recipes" / "serve.py"), "--listen", address, "--join_token", token,
        "--timeout", TIMEOUT, "--accept_timeout", "60", "--output_dir", str(output_dir), *args,
    ]  # fmt: skip
    return spawn(command, start_new_session=True)


def spawn(command: list[str], **kwargs) -> subprocess.Popen:
    """Starts `command` with its output in a file (a pipe nobody reads while waiting could fill and block it)."""
    with tempfile.NamedTemporaryFile("w", prefix="hf_adc_", suffix=".log", delete=False) as log:
        process = subprocess.Popen(
            command, env={**os.environ, **ENV}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, **kwargs
        )
    process.log_path = Path(log.name)
    return process


def wait_output(process: subprocess.Popen, timeout: float) -> str:
    process.wait(timeout=timeout)
    return process.log_path.read_text()


def finish(server: subprocess.Popen, timeout: float = 60) -> str:
    try:
        return wait_output(server, timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        raise AssertionError("the server did not stop:\n" + wait_output(server, 30)[-3000:]) from None


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    weights = {}
    files = ("client/model.safetensors", "server/model.safetensors", "bridge.safetensors", "server_bridge.safetensors")
    for name in files:
        if (folder / name).exists():
            weights.update({f"{name.split('/')[0]}:{key}": value for key, value in load_file(folder / name).items()})
    return {key.replace("server_bridge", "bridge"): value for key, value in weights.items() if "calls" not in key}


@pytest.mark.parametrize(
    "extra",
    [
        ("--compression", "none"),
        ("--compression", "adc", "--xi", "0.25"),
        ("--compression", "adc", "--xi", "0.25", "--gradient_accumulation_steps", "2"),
        ("--compression", "bottlenet", "--ratio", "0.25", "--gradient_accumulation_steps", "2"),
        ("--compression", "topk", "--rate", "0.1"),
        ("--compression", "quantize", "--bits", "4"),
        ("--compression", "adc+quantize", "--xi", "0.4", "--bits", "8"),
        ("--compression", "topk+quantize", "--rate", "0.2", "--bits", "8"),
        ("--compression", "adc+bottlenet", "--xi", "0.4", "--ratio", "0.5"),
    ],
    ids=["none", "adc", "adc-accumulation", "bottlenet-accumulation", "topk", "quantize", "adc+quantize8",
         "topk+quantize8", "adc+bottlenet"],  # fmt: skip
)
def test_two_processes_train_exactly_like_one(tiny_vit_path, digits_dir, tmp_path, extra):
    shared = model_args(tiny_vit_path, *extra, "--max_steps", "20")
    alone = launch("train.py", [*shared, *data_args(digits_dir, tmp_path / "alone")])
    assert alone.returncode == 0, alone.stderr[-3000:]

    address = free_address()
    server = start_server(address, tmp_path / "split", *shared)
    client = launch(
        "train.py",
        [*shared, *data_args(digits_dir, tmp_path / "split"), "--server", address, "--join_token", "secret",
         "--timeout", TIMEOUT],
    )  # fmt: skip
    server_log = finish(server)
    assert client.returncode == 0, client.stderr[-3000:] + server_log[-3000:]
    assert server.returncode == 0, server_log[-3000:]

    one = json.loads((tmp_path / "alone" / "results.json").read_text())
    two = json.loads((tmp_path / "split" / "results.json").read_text())
    losses = [[entry["loss"] for entry in run["log_history"] if "loss" in entry] for run in (one, two)]
    assert len(losses[0]) == 20
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
    assert two["test_accuracy"] == one["test_accuracy"]
    expected, actual = _weights(tmp_path / "alone"), _weights(tmp_path / "split")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=key)
    transport = two["transport"]
    assert transport["payload_sent"] + transport["payload_received"] >= two["total_bytes"]
    assert hf_adc.SplitViTForImageClassification.from_pretrained(tmp_path / "split").server is not None


def _latest_checkpoint_both_saved(folder: Path) -> Path | None:
    saved = [
        path for path in folder.glob("checkpoint-*")
        if (path / "trainer_state.json").exists() and (path / "server_state.safetensors").exists()
    ]  # fmt: skip
    return max(saved, key=lambda path: int(path.name.split("-")[1]), default=None)


def _client(address: str, checkpoint: str, digits_dir: str, output_dir: Path, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "recipes" / "accelerate_configs" / "cpu.yaml"), str(ROOT / "recipes" / "train.py"),
        *model_args(checkpoint), *data_args(digits_dir, output_dir), "--server", address, "--join_token", "secret",
        "--timeout", TIMEOUT, *extra,
    ]  # fmt: skip
    return spawn(command, start_new_session=True)


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


LONG_RUN = ("--max_steps", "400", "--save_strategy", "steps", "--save_steps", "10")


def _training_pair(address, checkpoint, digits_dir, output_dir, *extra) -> tuple[subprocess.Popen, subprocess.Popen]:
    """A server and a client on a long run, returned once both sides have saved a checkpoint."""
    server = start_server(address, output_dir, *model_args(checkpoint), *LONG_RUN, *extra)
    client = _client(address, checkpoint, digits_dir, output_dir, *LONG_RUN, *extra)
    _wait_for(lambda: _latest_checkpoint_both_saved(output_dir) is not None, 120, "a checkpoint both sides saved")
    return server, client


def _signal(process: subprocess.Popen, signum: int) -> None:
    """Sends `signum` to the process and its children (each test process runs in a session of its own)."""
    os.killpg(process.pid, signum)


def test_a_killed_client_is_noticed_and_both_sides_resume_from_the_last_step_both_saved(
    tiny_vit_path, digits_dir, tmp_path
):
    address, output_dir = free_address(), tmp_path / "run"
    server, client = _training_pair(address, tiny_vit_path, digits_dir, output_dir)
    _signal(client, signal.SIGKILL)
    killed = time.monotonic()
    server_log = finish(server, timeout=float(TIMEOUT) + 30)
    assert time.monotonic() - killed < float(TIMEOUT) + 10
    assert server.returncode == 0 and "lost" in server_log, server_log[-3000:]
    checkpoint = _latest_checkpoint_both_saved(output_dir)
    step = int(checkpoint.name.split("-")[1])
    saved_ledger = json.loads((checkpoint / "ledger.json").read_text())["ledger"]

    server = start_server(address, output_dir, *model_args(tiny_vit_path), *LONG_RUN)
    resume = ("--resume_from_checkpoint", str(checkpoint))
    client = _client(address, tiny_vit_path, digits_dir, output_dir, *LONG_RUN, *resume)
    client_log = wait_output(client, 300)
    server_log = finish(server)
    assert client.returncode == 0, client_log[-3000:] + server_log[-3000:]
    resumed = json.loads((output_dir / "results.json").read_text())
    assert resumed["steps"] == 400
    per_step = (resumed["total_bytes"] - saved_ledger["total_bytes"]) / (400 - step)
    assert per_step == pytest.approx(saved_ledger["total_bytes"] / step)
    assert "optimizer steps" in server_log and "finished after 400" in server_log, server_log[-2000:]


def test_a_killed_server_stops_the_client_with_the_address_and_keeps_its_checkpoints(
    tiny_vit_path, digits_dir, tmp_path
):
    address, output_dir = free_address(), tmp_path / "run"
    server, client = _training_pair(address, tiny_vit_path, digits_dir, output_dir)
    _signal(server, signal.SIGKILL)
    killed = time.monotonic()
    client_log = wait_output(client, float(TIMEOUT) + 60)
    finish(server)
    assert time.monotonic() - killed < float(TIMEOUT) + 30
    assert client.returncode != 0
    assert f"lost the peer at the server at {address}" in client_log, client_log[-3000:]
    assert _latest_checkpoint_both_saved(output_dir) is not None


@pytest.mark.parametrize("hung", ["client", "server"])
def test_a_hung_peer_ends_at_the_timeout(tiny_vit_path, digits_dir, tmp_path, hung):
    address, output_dir = free_address(), tmp_path / "run"
    server, client = _training_pair(address, tiny_vit_path, digits_dir, output_dir, "--timeout", "5")
    stopped, waiting = (server, client) if hung == "server" else (client, server)
    _signal(stopped, signal.SIGSTOP)
    start = time.monotonic()
    try:
        output = wait_output(waiting, 60)
    finally:
        for process in (client, server):
            if process.poll() is None:
                _signal(process, signal.SIGKILL)
            process.wait(timeout=30)
    assert time.monotonic() - start < 5 + 30
    assert "Timed out" in output or "timed out" in output.lower(), output[-3000:]


def _header(**fields) -> torch.Tensor:
    header = encode_header(Kind.HELLO, 0, {"settings": torch.zeros(4, dtype=torch.uint8)})
    slots = {"magic": 0, "version": 1, "kind": 2, "step": 3, "count": 4}
    slots.update(name=FIXED, dtype=FIXED + 1, rank=FIXED + 2, dim0=FIXED + 3)
    for name, value in fields.items():
        header[slots[name]] = value
    return header


BAD_HEADERS = [
    ({"magic": 123}, "header field magic=0x7b"),
    ({"version": PROTOCOL_VERSION + 98}, f"header field version={PROTOCOL_VERSION + 98}"),
    ({"kind": 77}, "header field kind=77 is unknown"),
    ({"step": -1}, "header field step=-1"),
    ({"count": 9}, "header field count=9"),
    ({"name": 999}, "header field name=999"),
    ({"dtype": 99}, "header field dtype=99"),
    ({"rank": 7}, "header field rank=7"),
    ({"dim0": -4}, "negative size"),
    ({"rank": 2, "dim0": 2**20, "dtype": 0}, "over the cap"),
]


def _refusal(address: str, send) -> str:
    """What the server answers to `send(channel)`; every send and receive ends at the channel's timeout."""
    timeout = timedelta(seconds=float(TIMEOUT))
    channel = connect(address, timeout)
    send(channel)
    with pytest.raises(Refused) as refused:
        channel.recv(Kind.WELCOME, timeout=timeout)
    return str(refused.value)


def test_bad_headers_tokens_and_splits_are_refused_and_the_server_then_serves_a_good_client(
    tiny_vit_path, digits_dir, tmp_path
):
    address, output_dir = free_address(), tmp_path / "run"
    server = start_server(address, output_dir, *model_args(tiny_vit_path), "--max_steps", "3")
    try:
        for fields, expected in BAD_HEADERS:
            header = _header(**fields)
            if fields.get("rank") == 2:
                header[FIXED + 4] = 2**20
            reason = _refusal(address, lambda channel, header=header: channel.group.send([header], 0, 0).wait(
                timedelta(seconds=float(TIMEOUT))
            ))
            assert expected in reason, (fields, reason)
        names = [str(i) for i in range(5)]
        wrong_token = {"labels": names, "token": "guess"}
        reason = _refusal(address, lambda channel: channel.send(Kind.HELLO, {"settings": json_tensor(wrong_token)}))
        assert "wrong join token" in reason
        other_split = {"labels": names, "token": "secret", "split_layer": 3}
        reason = _refusal(address, lambda channel: channel.send(Kind.HELLO, {"settings": json_tensor(other_split)}))
        assert "split_layer: client 3, server 2" in reason
        reason = _refusal(address, lambda channel: channel.send(Kind.FORWARD))
        assert "expected a HELLO message; got FORWARD" in reason
    except BaseException:
        server.kill()
        raise
    client = launch(
        "train.py",
        [*model_args(tiny_vit_path), *data_args(digits_dir, output_dir), "--max_steps", "3", "--server", address,
         "--join_token", "secret", "--timeout", TIMEOUT],
    )  # fmt: skip
    server_log = finish(server)
    assert client.returncode == 0, client.stderr[-3000:] + server_log[-3000:]
    assert "finished after 3 optimizer steps" in server_log
    assert server_log.count("refused") == len(BAD_HEADERS) + 3


def test_an_unreachable_server_is_named_in_the_error():
    address = free_address()
    start = time.monotonic()
    with pytest.raises(PeerLost, match=f"cannot reach the server at {address}"):
        connect(address, timedelta(seconds=2))
    assert time.monotonic() - start < 15


def test_the_readme_one_machine_command_runs_end_to_end(tiny_vit_path, digits_dir, tmp_path):
    output_dir = tmp_path / "run"
    done = launch("train.py", [*tiny_run_args(tiny_vit_path, digits_dir, output_dir, "--xi", "0.25"), "--distributed"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "an uncompressed split would have sent" in done.stdout
    results = json.loads((output_dir / "results.json").read_text())
    assert results["transport"]["framing_sent"] > 0 and results["total_bytes"] <= results["budget_bytes"]
    split = hf_adc.SplitViTForImageClassification.from_pretrained(output_dir)
    assert split.client is not None and split.server is not None
