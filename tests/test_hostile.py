"""A member turned hostile, and strangers, against one real server (`recipes/serve.py`): every malformed handshake
and every hostile message ends only its own session, with the reason; then an honest client trains to the end on
the same server. Checkpoint files are whole or absent, even when the disk fills mid-write."""

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
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

from hf_adc.distributed import Kind, PeerLost, Refused, connect
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
    """The server's reason for ending the session after `frames` (kind, tensors, value[, step]) are sent."""
    for kind, tensors, value, *step in frames:
        connection.send(kind, tensors, step=step[0] if step else 0, value=value)
    try:
        while True:
            connection.recv(timeout=timedelta(seconds=30))
    except Refused as error:
        return str(error)


def forward(micro_batches: int = 1, **overrides):
    """A FORWARD of the tiny split's batch, of a step of `micro_batches`, with the agreed seed unless overridden."""
    tensors = {
        "activations": torch.randn(BATCH, TOKENS, WIDTH), "labels": torch.arange(BATCH) % 5,
        "seed": torch.tensor(1.0 / micro_batches, dtype=torch.float64),
    }  # fmt: skip
    tensors.update(overrides)
    return Kind.FORWARD, {k: v for k, v in tensors.items() if v is not None}, 0.0, micro_batches


def test_no_hostile_session_or_stranger_takes_the_server_down_and_an_honest_client_then_trains(
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
        "EVAL message is out of place here: expected STEP": [
            forward(), (Kind.EVAL, {"activations": torch.randn(2, TOKENS, WIDTH)}, 0.0)
        ],
        "backward seed 4.0 is not 1 / 1": [forward(seed=torch.tensor(4.0, dtype=torch.float64))],
        "FORWARD's seed must be one float64": [forward(seed=torch.ones(2))],
        "must carry 'seed'": [forward(seed=None)],
        "a gradient norm is negative": [forward(), (Kind.STEP, {"norm": -torch.ones(36)}, 1.0)],
        "a STEP message must carry 'norm'": [forward(), (Kind.STEP, {}, 1.0)],
        "a step of 2 micro-batches is out of range: 1 .. 1": [forward(micro_batches=2)],
        "FORWARD message is out of place here: expected STEP": [forward(), forward()],
        "clipping norm inf is not the agreed max_grad_norm 1.0": [
            forward(), (Kind.STEP, {"norm": torch.ones(36)}, float("inf"))
        ],
        "EVAL activations of (2, 40, 32) do not fit 17 x 32": [
            (Kind.EVAL, {"activations": torch.randn(2, 40, WIDTH)}, 0.0)
        ],
        "clipping norm -1.0 is not the agreed max_grad_norm 1.0": [
            forward(), (Kind.STEP, {"norm": torch.ones(36)}, -1.0)
        ],
    }  # fmt: skip
    for expected, frames in hostile.items():
        reason = refused(session(address, settings), *frames)
        assert expected in reason, (expected, reason)
    strangers_are_told_why(address, tmp_path)
    frames_before_admission_are_not_held(address, server.pid)
    with Hog(address) as hog:  # client-1 holds its own two joining slots all along; client-0 joins and trains
        client = launch(
            "train.py",
            [*shared, *data_args(digits_dir, output_dir), "--max_steps", "3", "--server", address, "--timeout",
             TIMEOUT],
        )  # fmt: skip
    server_log = finish(server)
    assert client.returncode == 0, client.stdout[-3000:] + server_log[-3000:]
    assert "finished after 3 optimizer steps" in server_log
    assert any("client-1 has 2 sessions joining already" in reason for reason in hog.turned_away), hog.turned_away
    for reason in ("its certificate is not signed by this server's CA", "its certificate has expired"):
        assert re.search(rf"Refused a TLS handshake from ipv4:127\.0\.0\.1:\d+: {reason}", server_log), reason
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
        kind, tensors, _, micro_batches = forward()
        connection.send(kind, tensors, step=micro_batches)
        connection.recv(Kind.GRADIENT)
        connection.send(Kind.STEP, {"norm": torch.ones(36)}, value=1.0)  # no answer
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


def vm_rss(pid: int) -> int:
    """The resident memory of process `pid`, in bytes (its /proc status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def expired_kit(kit, ca_folder: Path):
    """`kit` with its certificate re-signed by the CA in `ca_folder`, expired since yesterday."""
    ca_key = serialization.load_pem_private_key((ca_folder / "ca-key.pem").read_bytes(), password=None)
    current = x509.load_pem_x509_certificate(kit.cert_pem)
    now = datetime.now(timezone.utc)
    expired = (
        x509.CertificateBuilder().subject_name(current.subject).issuer_name(current.issuer)
        .public_key(current.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=2)).not_valid_after(now - timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    return dataclasses.replace(kit, cert_pem=expired.public_bytes(serialization.Encoding.PEM))


def strangers_are_told_why(address: str, tmp_path: Path) -> None:
    """Strangers are told at once which side refused whom and why (the server logs each refused handshake)."""
    from helpers import kits

    from hf_adc.distributed.provision import ephemeral_kits, load_kit

    theirs = {n: load_kit(p) for n, p in ephemeral_kits(tmp_path / "theirs", 1).items()}
    ours = client_kit(1)
    mixed = dataclasses.replace(theirs["client-0"], ca_pem=ours.ca_pem)  # trusts our server; our server not it
    strangers = {
        "this client refused the server's certificate at .*: it is not signed by this kit's CA": theirs["client-0"],
        r"the server at .* refused this client's certificate \(client-0\)": mixed,
        r"the server at .* refused this client's certificate \(client-1\)": expired_kit(ours, kits() / "ca"),
    }  # fmt: skip
    for expected, kit in strangers.items():
        start = time.monotonic()
        with pytest.raises(PeerLost, match=expected):
            connect(address, timedelta(seconds=60), kit)
        assert time.monotonic() - start < 10, expected


def frames_before_admission_are_not_held(address: str, pid: int) -> None:
    """6 joining streams of 3 members push 12 MiB frames 3 times each. Each frame is refused at its first chunk over
    the handshake's cap: the server holds at most a chunk and the cap for each stream."""
    from hf_adc.distributed.connect import CHUNK_BYTES, HANDSHAKE_FRAME_BYTES

    before, peak, pushing = vm_rss(pid), [0], threading.Event()

    def sample() -> None:
        while pushing.is_set():
            peak[0] = max(peak[0], vm_rss(pid))
            time.sleep(0.02)

    def push(client_id: int) -> list[str]:
        reasons = []
        for _ in range(3):
            connection = connect(address, timedelta(seconds=60), client_kit(client_id))
            try:
                connection.send_bytes(bytes(12 * 2**20))
                connection.recv(timeout=timedelta(seconds=30))
            except (Refused, PeerLost) as error:
                reasons.append(str(error))
        return reasons

    pushing.set()
    sampler = threading.Thread(target=sample)
    sampler.start()
    with ThreadPoolExecutor(6) as pool:
        reasons = [reason for pushed in pool.map(push, [1, 1, 2, 2, 5, 5]) for reason in pushed]
    pushing.clear()
    sampler.join()
    grown, bound = peak[0] - before, 6 * (CHUNK_BYTES + HANDSHAKE_FRAME_BYTES) + 32 * 2**20
    print(f"server VmRSS {before / 2**20:.0f} MiB before, {peak[0] / 2**20:.0f} MiB at peak: +{grown / 2**20:.1f} MiB "
          f"for 18 frames of 12 MiB before admission (bound {bound / 2**20:.1f} MiB)")  # fmt: skip
    assert grown < bound, (grown, bound)
    assert len(reasons) == 18 and all("over this session's cap of" in r for r in reasons), reasons


class Hog:
    """A member (client-1) holding as many silent streams as it likes, reopening each as the handshake timeout
    closes it; `turned_away` collects the reasons it is given."""

    def __init__(self, address: str, streams: int = 6):
        self.address, self.stop, self.turned_away = address, threading.Event(), []
        self.threads = [threading.Thread(target=self._hold) for _ in range(streams)]

    def _hold(self) -> None:
        while not self.stop.is_set():
            try:
                connection = connect(self.address, timedelta(seconds=5), client_kit(1), retry_busy=False)
                connection.recv(timeout=timedelta(seconds=10))
            except (Refused, PeerLost) as error:
                self.turned_away.append(str(error))
                time.sleep(0.5)
            else:
                connection.close()

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        time.sleep(1.0)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
