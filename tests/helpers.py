"""What the tests share: the recipes' command lines, spawning processes that always get killed, bounded waits, and
the one-process tests' small datasets and training arguments.

Every process a test starts goes through `spawn`, in a session (and process group) of its own, and is registered:
the autouse fixture in conftest kills every registered group when the test ends, passed or failed, so that no
server, client or `accelerate launch` worker (which outlives a kill of its launcher alone) survives a test.
Subprocesses import the tree under test (`PYTHONPATH=<ROOT>/src`).
"""

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

from hf_adc.distributed import Kind, connect
from hf_adc.distributed.wire import json_tensor

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "accelerate_configs"
TIMEOUT = "20"
ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}

_SPAWNED: list[subprocess.Popen] = []
_KITS: Path | None = None


def spawn(command: list[str], **env: str) -> subprocess.Popen:
    """Starts `command` in a session of its own with its output in a file (a pipe nobody reads while waiting could
    fill and block it), registered so that its whole process group is killed at the end of the test."""
    with tempfile.NamedTemporaryFile("w", prefix="hf_adc_", suffix=".log", delete=False) as log:
        process = subprocess.Popen(
            command, env={**os.environ, **ENV, **env}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
    process.log_path = Path(log.name)
    _SPAWNED.append(process)
    return process


def kill_spawned() -> None:
    """Kills the process group of every process `spawn` started (its children too, even once it has exited)."""
    while _SPAWNED:
        process = _SPAWNED.pop()
        signal_group(process, signal.SIGKILL)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


atexit.register(kill_spawned)  # a fixture that failed mid-way leaves no process behind either


def signal_group(process: subprocess.Popen, signum: int) -> None:
    """Sends `signum` to the process and its children (each spawned process leads a session of its own)."""
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def wait_output(process: subprocess.Popen, timeout: float) -> str:
    """The process's output once it has exited; kills its group and fails if it runs past `timeout` seconds."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_group(process, signal.SIGKILL)
        process.wait(timeout=30)
        raise AssertionError(
            f"{process.args[1:3]} did not stop within {timeout} s:\n" + process.log_path.read_text()[-3000:]
        ) from None
    return process.log_path.read_text()


def finish(server: subprocess.Popen, timeout: float = 60) -> str:
    return wait_output(server, timeout)


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting {seconds} s for {what}")
        time.sleep(0.05)


def free_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def launch_command(script: str, args: list[str], config: str = "cpu.yaml") -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
        str(ROOT / "recipes" / script), *args,
    ]  # fmt: skip


def launch(script: str, args: list[str], config: str = "cpu.yaml", timeout: int = 300, **env) -> subprocess.Popen:
    """Runs `accelerate launch recipes/<script> args` to the end (at most `timeout` seconds); the process comes
    back with `returncode`, and its output as both `stdout` and `stderr`."""
    env.setdefault("HF_ADC_JOIN_TOKEN", "secret")
    process = spawn(launch_command(script, with_credentials(args), config), **env)
    process.stdout = process.stderr = wait_output(process, timeout)
    return process


def tiny_run_args(checkpoint: str, data: str, output_dir, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", checkpoint, "--dataset_name", data, "--classes", "0-4",
        "--max_train_samples", "128", "--max_eval_samples", "64", "--per_device_train_batch_size", "16",
        "--output_dir", str(output_dir), "--logging_steps", "5", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def train_here(args: list[str]) -> dict:
    """`recipes/train.py args` run in this process, on one thread as the spawned recipes run (`OMP_NUM_THREADS=1`):
    the one-process reference, without the seconds a process takes to start and import."""
    import torch

    sys.path.insert(0, str(ROOT / "recipes"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        import train

        return train.main(args)
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(ROOT / "recipes"))


def client_split(args: list[str], labels: list[str]):
    """The split a `recipes/train.py args` client whose data has these class names builds, with its training and
    federation arguments."""
    from transformers import HfArgumentParser

    from hf_adc.experiment import (
        TRAIN_RECIPE,
        DataArguments,
        FederationArguments,
        ModelArguments,
        RemoteArguments,
        SplitArguments,
        build_split,
        with_defaults,
    )
    from hf_adc.training import ADCTrainingArguments

    parser = HfArgumentParser(
        (ModelArguments, SplitArguments, DataArguments, ADCTrainingArguments, RemoteArguments, FederationArguments)
    )
    model, split_args, _, training, _, federation = parser.parse_args_into_dataclasses(
        with_defaults(args, TRAIN_RECIPE)
    )
    split, _ = build_split(model, split_args, labels, training.seed)
    return split, training, federation


def client_hello(args: list[str], labels: list[str]) -> tuple[dict, int]:
    """What a `recipes/train.py args` client whose data has these class names says in its HELLO (the settings of
    its split and training arguments and, with `--num_clients`, its federation block, as `remote_split`
    builds them), and the bytes of its client half (what a federation's PLAN announces)."""
    from hf_adc.distributed.federation import client_side_tensors
    from hf_adc.distributed.settings import session_settings

    split, training, federation = client_split(args, labels)
    settings = session_settings(split, training)
    if federation.num_clients is not None:
        settings["federation"] = federation.shared_settings(training)
    return settings, sum(tensor.numel() for tensor in client_side_tensors(split)) * 4


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


def kits() -> Path:
    """A CA and kits for a server and clients `client-0` .. `client-5`, made once per test process (mutual TLS is
    the path every multi-process test takes)."""
    global _KITS
    if _KITS is None:
        from hf_adc.distributed.provision import ephemeral_kits

        _KITS = Path(tempfile.mkdtemp(prefix="hf_adc_test_kits_")) / "kits"
        ephemeral_kits(_KITS, 6)
    return _KITS


def client_kit(client_id: int = 0):
    """Client `client_id`'s loaded kit (for clients the tests drive by hand)."""
    from hf_adc.distributed.credentials import load_kit

    return load_kit(kits() / f"client-{client_id}")


def with_credentials(args: list[str]) -> list[str]:
    """`args` with this party's `--credentials` added: the server's kit for `--listen`, `client-N`'s (its
    `--client_id`, else 0) for `--server`; unless they give credentials, `--insecure` or `--distributed`."""
    if {"--credentials", "--insecure", "--distributed"} & set(args):
        return args
    if "--listen" in args:
        return [*args, "--credentials", str(kits() / "server")]
    if "--server" in args:
        client_id = args[args.index("--client_id") + 1] if "--client_id" in args else "0"
        return [*args, "--credentials", str(kits() / f"client-{client_id}")]
    return args


def start_server(address: str, output_dir, *args: str, token: str = "secret") -> subprocess.Popen:
    """`recipes/serve.py` on `address` with the server's kit; the join token comes from the environment, as the
    README tells users to give it."""
    command = [
        sys.executable, str(ROOT / "recipes" / "serve.py"), "--listen", address,
        "--timeout", TIMEOUT, "--accept_timeout", "60", "--output_dir", str(output_dir), *args,
    ]  # fmt: skip
    return spawn(with_credentials(command), HF_ADC_JOIN_TOKEN=token)


def start_client(address: str, checkpoint: str, digits: str, output_dir, *extra: str) -> subprocess.Popen:
    """`accelerate launch recipes/train.py --server address` on the tiny model and data."""
    args = [
        *model_args(checkpoint), *data_args(digits, output_dir), "--server", address, "--timeout", TIMEOUT, *extra,
    ]  # fmt: skip
    return spawn(launch_command("train.py", with_credentials(args)), HF_ADC_JOIN_TOKEN="secret")


def tensor_dataset(num_rows: int, seed: int = 0):
    """`num_rows` random 16x16 images with labels in 0 .. 4, as a torch-formatted `datasets.Dataset`."""
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    rows = {
        "pixel_values": torch.randn(num_rows, 3, 16, 16, generator=generator).numpy(),
        "labels": torch.randint(0, 5, (num_rows,), generator=generator).numpy(),
    }
    return Dataset.from_dict(rows).with_format("torch")


def make_args(output_dir, **overrides):
    """`ADCTrainingArguments` for a short CPU run in `output_dir` (batch 8, lr 1e-3, no saving, seed 0)."""
    import hf_adc

    fields = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, learning_rate=1e-3, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, use_cpu=True,
    )  # fmt: skip
    fields.update(overrides)
    return hf_adc.ADCTrainingArguments(**fields)


REPLY = timedelta(seconds=90)  # a reply that may wait on the other clients of a federation (round timeouts below it)
RESULTS = 8  # END's float64 scalars: up, down, sync, total and uncompressed bytes, steps, accuracy, local accuracy


class WireClient:
    """One client session, message by message."""

    def __init__(self, address: str, settings: dict, token: str = "secret", client_id: int = 0,
                 retry_busy: bool = True):  # fmt: skip
        self.channel = connect(address, timedelta(seconds=float(TIMEOUT)), client_kit(client_id), retry_busy=retry_busy)
        self.channel.send(Kind.HELLO, {"settings": json_tensor({**settings, "token": token})})

    def welcome(self) -> float:
        return self.channel.recv(Kind.WELCOME).value

    def send_plan(self, client_id: int, shard_size: int, step_bytes: int, half_bytes: int, epoch_bytes: int,
                  resume_step: int = 0) -> None:  # fmt: skip
        scalars = torch.tensor([client_id, shard_size, step_bytes, half_bytes, epoch_bytes, resume_step])
        self.channel.send(Kind.PLAN, {"scalars": scalars})

    def plan(self) -> dict[str, torch.Tensor]:
        return self.channel.recv(Kind.PLAN, timeout=REPLY).tensors

    def begin(self, max_steps: int) -> None:
        self.channel.send(Kind.BEGIN, {"scalars": torch.tensor([max_steps, 0])})
        self.channel.recv(Kind.DONE)

    def train_step(self, micro_batches: int = 1, pause: float = 0.0) -> torch.Tensor:
        """One optimizer step of the uncompressed tiny split (batch 16) in `micro_batches`: a FORWARD each (answered
        with the loss and the gradient, and the server's norms with the last), then STEP (no answer), each message
        sent `pause` seconds after the last; the server's norms."""
        generator = torch.Generator().manual_seed(7)
        activations = torch.randn(16, 17, 32, generator=generator)
        seed = torch.tensor(1.0 / micro_batches, dtype=torch.float64)
        for micro_batch in range(micro_batches):
            if micro_batch:
                time.sleep(pause)
            tensors = {"activations": activations, "labels": torch.arange(16) % 5, "seed": seed}
            self.channel.send(Kind.FORWARD, tensors, step=micro_batches)
            reply = self.channel.recv(Kind.GRADIENT, timeout=REPLY)
        time.sleep(pause)
        self.channel.send(Kind.STEP, {"norm": torch.ones(36)}, value=1.0)
        return reply.tensors["norm"]

    def sync(self, half: torch.Tensor, samples: int) -> torch.Tensor:
        self.channel.send(Kind.SYNC, {"weights": half}, value=float(samples))
        return self.channel.recv(Kind.SYNC, timeout=REPLY).tensors["weights"]

    def end(self, results: list[float]) -> None:
        self.channel.send(Kind.END, {"scalars": torch.tensor(results, dtype=torch.float64)})
        self.channel.recv(Kind.DONE)


def step_bytes(half_norms: int = 36, batch: int = 16, server_norms: int = 36) -> int:
    """What one optimizer step of the tiny split (17 tokens of width 32, float32, no compression) costs one process:
    activations and int64 labels up and the gradient down, the link's control values (16 up and 8 down a
    micro-batch; a float32 norm per client tensor and the max norm up, a float32 norm per server tensor down, per
    step)."""
    activations = batch * 17 * 32 * 4
    return (activations + batch * 8) + activations + 16 + 8 + 4 * half_norms + 8 + 4 * server_norms


def epoch_bytes(rows: int) -> int:
    """The uncompressed traffic of `rows` samples: a sample's activations both ways and its int64 label."""
    return rows * (2 * 17 * 32 * 4 + 8)


def run_drivers(plan: list[dict], plan_path: Path, config: str, during=None) -> dict:
    """Every case of `plan` (see tests/pairs_driver.py) by one server group and one client group of `config`'s
    processes, each started once; `during()` runs while they do. Returns their logs, exit codes and end time."""
    import json

    plan_path.write_text(json.dumps(plan))
    groups = {}
    for role in ("server", "client"):
        with socket.socket() as probe:  # the group's own rendezvous port
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
            "--main_process_port", str(port), str(ROOT / "tests" / "pairs_driver.py"), role, str(plan_path),
        ]  # fmt: skip
        groups[role] = spawn(command, HF_ADC_JOIN_TOKEN="secret")
    if during is not None:
        during()
    client_log = wait_output(groups["client"], 900)
    server_log = wait_output(groups["server"], 60)
    return {"client_log": client_log, "server_log": server_log, "client": groups["client"].returncode,
            "server": groups["server"].returncode, "ended": time.time()}  # fmt: skip


def pair_case(name: str, shared: list[str], digits: str, root: Path, address: str, *both: str,
              client_only: tuple[str, ...] = ()) -> dict:  # fmt: skip
    """A driver case: a client and a server on `shared` settings (and `both`), into `root/name/split`."""
    output_dir = root / name / "split"
    return {
        "name": name,
        "client": with_credentials([*shared, *data_args(digits, output_dir), "--server", address, "--timeout",
                                    TIMEOUT, *both, *client_only]),
        "server": with_credentials([*shared, "--listen", address, "--timeout", TIMEOUT, "--accept_timeout", "120",
                                    "--output_dir", str(output_dir), *both]),
    }  # fmt: skip
