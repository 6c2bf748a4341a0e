"""A member turned hostile, and strangers, against one real server (`recipes/serve.py`): every malformed handshake
and every hostile message ends only its own session, with the reason; then an honest client trains to the end on
the same server. Checkpoint files are whole or absent, even when the disk fills mid-write."""

import json
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
import torch
from helpers import (
    ROOT,
    TIMEOUT,
    client_hello,
    client_kit,
    data_args,
    finish,
    free_address,
    launch,
    model_args,
    start_server,
)

from hf_adc.distributed import Kind, Refused, connect
from hf_adc.distributed.wire import json_tensor, text_tensor

LABELS = [str(i) for i in range(5)]
BATCH, TOKENS, WIDTH = 16, 17, 32  # the tiny ViT's cut: 16 px images in 4 px patches, and a CLS token


def session(address: str, settings: dict | None = None, begin: bool = True):
    """A member's session (client-0's kit) past its handshake and BEGIN, ready for hostile messages."""
    connection = connect(address, timedelta(seconds=float(TIMEOUT)), client_kit())
    if settings is not None:
        connection.send(Kind.HELLO, {"settings": json_tensor({**settings, "token": "secret"})})
        connection.recv(Kind.WELCOME)
        if begin:
            connection.send(Kind.BEGIN, {"scalars": torch.tensor([3, 0])})
            connection.recv(Kind.DONE)
    return connection


def refused(connection, *frames) -> str:
    """The server's reason for ending the session after `frames` (kind, tensors, value) are sent."""
    for kind, tensors, value in frames:
        connection.send(kind, tensors, value=value)
    try:
        while True:
            connection.recv(timeout=timedelta(seconds=30))
    except Refused as error:
        return str(error)


def forward(**overrides):
    tensors = {"activations": torch.randn(BATCH, TOKENS, WIDTH), "labels": torch.arange(BATCH) % 5}
    tensors.update(overrides)
    return Kind.FORWARD, {k: v for k, v in tensors.items() if v is not None}, 0.0


def test_no_hostile_session_takes_the_server_down_and_an_honest_client_then_trains(
    tiny_vit_path, digits_dir, tmp_path
):
    address, output_dir = free_address(), tmp_path / "run"
    shared = [*model_args(tiny_vit_path), "--compression", "none", "--max_grad_norm", "1.0"]
    revoked = tmp_path / "revoked.txt"
    revoked.write_text(f"# left the consortium\nclient-3\n{client_kit(4).serial:#x}\n")
    server = start_server(
        address, output_dir, *shared, "--max_steps", "3", "--handshake_timeout", "2", "--revoked", str(revoked)
    )
    settings, _ = client_hello(shared, LABELS)
    for member in (3, 4):  # revoked by name, and by serial: refused before any session starts
        connection = connect(address, timedelta(seconds=float(TIMEOUT)), client_kit(member))
        assert "is revoked" in refused(connection, (Kind.HELLO, {"settings": json_tensor(settings)}, 0.0))
    handshakes = {  # before the handshake is done: strangers' and broken HELLOs
        "must carry the settings": [(Kind.HELLO, {}, 0.0)],
        "nest too deeply": [(Kind.HELLO, {"settings": text_tensor("[" * 30000 + "]" * 30000)}, 0.0)],
        "wrong join token": [(Kind.HELLO, {"settings": json_tensor({**settings, "token": "gü€ss"})}, 0.0)],
        "settings name no labels": [(Kind.HELLO, {"settings": json_tensor({"token": "secret"})}, 0.0)],
        "expected a HELLO message; got FORWARD": [forward()],
        "not plain JSON": [(Kind.HELLO, {"settings": text_tensor('{"labels": NaN, "token": "secret"}')}, 0.0)],
        "expects a federation": [(Kind.HELLO, {"settings": json_tensor({**settings, "token": "secret",
                                                                        "federation": 1})}, 0.0)],
    }  # fmt: skip
    for expected, frames in handshakes.items():
        assert expected in refused(session(address), *frames), expected
    raw = session(address)
    raw.send_bytes(b"\x00" * 10)  # half a header
    assert "shorter than the" in refused(raw)
    silent = session(address)
    assert "sent nothing" in refused(silent)  # dropped at the 2 s handshake timeout
    step = (Kind.STEP, {"norm": torch.ones(36)}, 1.0)
    hostile = {  # a member holding a kit, after its handshake
        "STEP message is out of place": [step],
        "must carry the labels": [forward(labels=None)],
        "soft labels must be (T, 5)": [forward(labels=torch.full((BATCH, 7), 0.1))],
        "labels out of range [0, 5)": [forward(labels=torch.full((BATCH,), 9))],
        "activations that came hold NaN": [forward(activations=torch.full((BATCH, TOKENS, WIDTH), float("nan")))],
        "do not fit 16 labels and 17 tokens": [forward(activations=torch.randn(BATCH, 40, WIDTH))],
        "EVAL message is out of place here: expected BACKWARD": [
            forward(), (Kind.EVAL, {"activations": torch.randn(2, TOKENS, WIDTH)}, 0.0)
        ],
        "backward seed 4.0 is not 1 / k": [forward(), (Kind.BACKWARD, {}, 4.0)],
        "a gradient norm is negative": [
            forward(), (Kind.BACKWARD, {}, 1.0), (Kind.STEP, {"norm": -torch.ones(36)}, 1.0)
        ],
        "a STEP message must carry 'norm'": [forward(), (Kind.BACKWARD, {}, 1.0), (Kind.STEP, {}, 1.0)],
        "a step of over 1 micro-batches": [forward(), (Kind.BACKWARD, {}, 1.0), forward()],
        "clipping norm inf is not the agreed max_grad_norm 1.0": [
            forward(), (Kind.BACKWARD, {}, 1.0), (Kind.STEP, {"norm": torch.ones(36)}, float("inf"))
        ],
        "EVAL activations of (2, 40, 32) do not fit 17 x 32": [
            (Kind.EVAL, {"activations": torch.randn(2, 40, WIDTH)}, 0.0)
        ],
        "clipping norm -1.0 is not the agreed max_grad_norm 1.0": [
            forward(), (Kind.BACKWARD, {}, 1.0), (Kind.STEP, {"norm": torch.ones(36)}, -1.0)
        ],
    }  # fmt: skip
    for expected, frames in hostile.items():
        reason = refused(session(address, settings), *frames)
        assert expected in reason, (expected, reason)
    client = launch(
        "train.py",
        [*shared, *data_args(digits_dir, output_dir), "--max_steps", "3", "--server", address, "--timeout", TIMEOUT],
    )  # fmt: skip
    server_log = finish(server)
    assert client.returncode == 0, client.stdout[-3000:] + server_log[-3000:]
    assert "finished after 3 optimizer steps" in server_log
    results = json.loads((output_dir / "server_results.json").read_text())
    assert results["status"] == "finished" and results["steps"] == 3


def test_a_checkpoint_file_is_whole_or_absent_when_the_disk_fills(tmp_path):
    """Under a file size limit (RLIMIT_FSIZE, as a full disk), a checkpoint write fails with an error naming the
    file, leaves the previous version whole, and leaves no partial file behind."""
    script = textwrap.dedent(f"""
        import resource, torch
        from pathlib import Path
        from safetensors.torch import load_file, save_file
        from hf_adc.distributed.files import CheckpointError, write_atomically
        path = Path({str(tmp_path)!r}) / "checkpoint-1" / "server_state.safetensors"
        write_atomically(path, lambda p: save_file({{"w": torch.ones(10)}}, p))
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            write_atomically(path, lambda p: save_file({{"w": torch.zeros(100_000)}}, p))
        except CheckpointError as error:
            print("refused:", error)
        print("intact:", load_file(path)["w"].tolist() == [1.0] * 10)
        print("left:", sorted(p.name for p in path.parent.iterdir()))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"refused: could not write {tmp_path}/checkpoint-1/server_state.safetensors" in done.stdout, done.stdout
    assert "the previous version, if any, is intact" in done.stdout
    assert "intact: True" in done.stdout and "left: ['server_state.safetensors']" in done.stdout, done.stdout


def test_a_client_id_other_than_its_certificates_is_refused_before_connecting(tmp_path):
    from helpers import kits

    from hf_adc.distributed.arguments import FederationArguments, RemoteArguments
    from hf_adc.distributed.launch import remote_split

    remote = RemoteArguments(server="127.0.0.1:9", credentials=str(kits() / "client-0"))
    with pytest.raises(ValueError, match=r"--client_id 1 disagrees with this client's certificate \(client-0\)"):
        remote_split(None, None, remote, FederationArguments(num_clients=2, client_id=1))


def test_a_disk_that_fills_during_a_checkpoint_ends_the_run_with_the_file_named_and_the_last_one_whole(
    tiny_vit_path, tmp_path
):
    import resource

    from safetensors.torch import load_file

    address, output_dir = free_address(), tmp_path / "run"
    shared = [*model_args(tiny_vit_path), "--compression", "none", "--max_grad_norm", "1.0"]
    server = start_server(address, output_dir, *shared, "--max_steps", "3")
    settings, _ = client_hello(shared, LABELS)
    connection = session(address, settings)

    def step_and_save(step: int) -> None:
        connection.send(*forward()[:2])
        connection.recv(Kind.LOSS)
        connection.send(Kind.BACKWARD, value=1.0)
        connection.recv(Kind.GRADIENT)
        connection.send(Kind.STEP, {"norm": torch.ones(36)}, value=1.0)
        connection.recv(Kind.NORM)
        connection.send(Kind.SAVE, step=step)
        connection.recv(Kind.DONE)

    step_and_save(1)
    first = output_dir / "checkpoint-1"
    weights = (first / "server_state.safetensors").stat().st_size
    limit = weights // 2  # the disk is full from now on: no checkpoint fits, the server's log still does
    assert limit > 16384
    resource.prlimit(server.pid, resource.RLIMIT_FSIZE, (limit, limit))
    try:
        step_and_save(2)
    except Refused as error:
        reason = str(error)
    else:
        raise AssertionError("the server acknowledged a checkpoint it could not write")
    assert f"could not write {output_dir}/checkpoint-2/server_" in reason, reason
    assert "previous version, if any, is intact" in reason
    log = finish(server)
    assert server.returncode == 1 and "server: failed after 2 optimizer steps" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert sorted(p.name for p in first.iterdir()) == [
        "server_optimizer.pt", "server_scheduler.pt", "server_state.safetensors"
    ]  # fmt: skip
    assert load_file(first / "server_state.safetensors") and torch.load(first / "server_optimizer.pt")
    leftovers = list((output_dir / "checkpoint-2").iterdir()) if (output_dir / "checkpoint-2").exists() else []
    assert all(path.name in ("server_optimizer.pt", "server_scheduler.pt") for path in leftovers), leftovers
    assert not (output_dir / "checkpoint-2" / "server_state.safetensors").exists()  # so it is no checkpoint
