"""Client and server as real separate processes (`recipes/serve.py`, `accelerate launch recipes/train.py
--server`): the same training as one process, and every fault ends within its timeout."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_recipes import ROOT, launch

import hf_adc
from hf_adc.transport import Kind, PeerLost, Refused, connect, json_tensor
from hf_adc.transport.wire import HEADER_LENGTH, MAGIC, PROTOCOL_VERSION, encode_header

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
    return subprocess.Popen(
        command, env={**os.environ, **ENV}, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(server: subprocess.Popen, timeout: float = 60) -> str:
    try:
        output, _ = server.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        output, _ = server.communicate()
        raise AssertionError("the server did not stop:\n" + output[-3000:]) from None
    return output


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for name in ("client/model.safetensors", "server/model.safetensors", "bridge.safetensors", "server_bridge.safetensors"):
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
    ],
    ids=["none", "adc", "adc-accumulation", "bottlenet-accumulation"],
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
