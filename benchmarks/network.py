"""Client and server as separate processes over a real, shaped link: wall-clock, accuracy, and bytes on the wire.

Every run is a server (`recipes/serve.py`) and a client (`accelerate launch recipes/train.py --server`) inside a
private network namespace, talking over its loopback. The loopback is left as it is (64 KiB MTU, no shaping:
the compute-only reference, and the ledger-against-wire check) or shaped with `tc tbf` to each `--rates` Mbit/s
(MTU 1500, as a real link). Each `--rtt` (ms) adds a wide-area link's latency: `tc netem` where the kernel has it,
otherwise the delaying proxy `benchmarks/delay_proxy.py` between client and server (half the round trip each way,
throughput not limited, 127.0.0.1 only). The `lo` counters of `/proc/net/dev` inside the namespace count only the
run's traffic (through the proxy, each byte twice: the wire check is left out there). Needs root (`ip netns`,
`tc`); it says so and stops otherwise.

The task: the main job's pretrained checkpoint fine-tuned on Fashion-MNIST classes 5-9 (`--train-samples`
images) under a budget of one epoch of uncompressed traffic, for the uncompressed split, ADC (xi = 0.1) and the
best baseline of the quick sweep at that ratio (BottleNet++, d'/d = 0.1). Reported: wall-clock per training step
(compute, from the unshaped run, and transfer, the rest), training wall-clock until the uncompressed split's final
accuracy is reached, accuracy against training wall-clock (a plot), and ledger + framing against the wire, each for
the default transport (gRPC with mutual TLS, kits made on the fly) and plaintext gRPC (`--insecure`) side by side.

    sudo python benchmarks/network.py                       # 100 and 10 Mbit/s, writes docs/results/network/
    sudo python benchmarks/network.py --rtt 0 50 100 --rates 100 10 --transports tls --accumulation 1 4
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "uncompressed": ["--compression", "none"],
    "ADC xi=0.1": ["--compression", "adc", "--xi", "0.1"],
    "BottleNet++ 0.1": ["--compression", "bottlenet", "--ratio", "0.1"],
}


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)


class Namespace:
    """A private network namespace with its loopback up; `shape(rate)` sets the link, `wire_bytes()` reads it."""

    def __init__(self, name: str):
        self.name = name
        run(["ip", "netns", "add", name])
        run(self.exec(["ip", "link", "set", "lo", "up"]))

    def exec(self, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    netem = False  # whether the kernel has `tc netem` (else latency comes from the delaying proxy)

    def shape(self, mbit: float | None, rtt_ms: float = 0.0) -> None:
        """The loopback at `mbit` Mbit/s (None: as it is) and, with netem, `rtt_ms` of round trip (each packet
        crosses the loopback once: half the round trip on each)."""
        subprocess.run(self.exec(["tc", "qdisc", "del", "dev", "lo", "root"]), capture_output=True)
        run(self.exec(["ip", "link", "set", "lo", "mtu", "65536" if mbit is None else "1500"]))
        if self.netem and rtt_ms:
            rate = ["rate", f"{mbit}mbit"] if mbit else []
            run(self.exec(["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", f"{rtt_ms / 2}ms", *rate]))
        elif mbit is not None:
            rate = ["rate", f"{mbit}mbit", "burst", "256kb", "latency", "500ms"]
            run(self.exec(["tc", "qdisc", "add", "dev", "lo", "root", "tbf", *rate]))

    def has_netem(self) -> bool:
        """Whether this kernel has `tc netem` (added and removed again on the loopback to find out)."""
        added = subprocess.run(self.exec(["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms"]),
                               capture_output=True)  # fmt: skip
        subprocess.run(self.exec(["tc", "qdisc", "del", "dev", "lo", "root"]), capture_output=True)
        return added.returncode == 0

    def wire_bytes(self) -> int:
        for line in run(self.exec(["cat", "/proc/net/dev"])).stdout.splitlines():
            if line.strip().startswith("lo:"):
                return int(line.split(":")[1].split()[8])  # transmitted bytes (each packet once)
        raise RuntimeError("no lo interface in the namespace")

    def close(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Latency:
    """Half of `rtt_ms` each way between client and server: the delaying proxy on 127.0.0.1 (`address` is what the
    client dials), inside the namespace, for at most an hour."""

    def __init__(self, namespace: Namespace, rtt_ms: float, server_port: int):
        self.port = free_port()
        self.process = subprocess.Popen(
            namespace.exec([sys.executable, str(ROOT / "benchmarks/delay_proxy.py"), "--listen", str(self.port),
                            "--to", str(server_port), "--rtt", str(rtt_ms), "--lifetime", "3600"]),
        )  # fmt: skip
        time.sleep(1.0)  # listening

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)


def one_run(
    namespace: Namespace, method: str, transport: str, args, checkpoint: str, kits: Path, output_dir: Path,
    rtt_ms: float = 0.0, accumulation: int = 1, pipelined: bool = False,
) -> dict:  # fmt: skip
    port = free_port()
    address = f"127.0.0.1:{port}"
    shared = [
        "--model_name_or_path", checkpoint, "--split_layer", "2", "--seed", str(args.seed), *METHODS[method],
        "--gradient_accumulation_steps", str(accumulation), "--per_device_train_batch_size", str(args.batch_size),
    ]  # fmt: skip
    remote = ["--timeout", "600"]
    server_credentials, client_credentials = (
        (["--credentials", str(kits / "server")], ["--credentials", str(kits / "client-0")])
        if transport == "tls" else (["--insecure"], ["--insecure"])
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_ADC_JOIN_TOKEN": "bench"}
    before = namespace.wire_bytes()
    output_dir.mkdir(parents=True)
    server_log = open(output_dir / "server.log", "w")  # a file, not a pipe nobody reads while the client runs
    server = subprocess.Popen(
        namespace.exec([sys.executable, str(ROOT / "recipes/serve.py"), "--listen", address, *shared, *remote,
                        *server_credentials, "--accept_timeout", "120", "--output_dir", str(output_dir)]),
        env=env, stdout=server_log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    data = [
        "--classes", "5-9", "--max_train_samples", str(args.train_samples), "--max_eval_samples",
        str(args.eval_samples), "--budget_epochs", "1", "--eval_steps", str(args.eval_every), "--disable_tqdm", "true",
    ]  # fmt: skip
    latency = Latency(namespace, rtt_ms, port) if rtt_ms and not namespace.netem else None
    dialled = f"127.0.0.1:{latency.port}" if latency else address
    try:
        client = subprocess.run(
            namespace.exec([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                            str(ROOT / "recipes/accelerate_configs/cpu.yaml"), str(ROOT / "recipes/train.py"), *shared,
                            *remote, *client_credentials, "--server", dialled, *data, "--output_dir",
                            str(output_dir), *(["--pipeline_micro_batches", "true"] if pipelined else [])]),
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        server.wait(timeout=300)
    finally:
        if latency:
            latency.close()
    server_log.close()
    if client.returncode or server.returncode:
        log = (output_dir / "server.log").read_text()
        raise RuntimeError(f"{method} failed:\n{client.stderr[-3000:]}\n{log[-3000:]}")
    wire = namespace.wire_bytes() - before
    results = json.loads((output_dir / "results.json").read_text())
    evals, eval_seconds = [], 0.0
    for entry in results["log_history"]:
        if "eval_accuracy" in entry and "wall_seconds" in entry:
            eval_seconds += entry["eval_runtime"]
            evals.append((entry["wall_seconds"] - eval_seconds, entry["eval_accuracy"]))
    train_seconds = results["train_seconds"] - eval_seconds
    traffic = results["transport"]
    return {
        "method": method,
        "transport": transport,
        "rtt_ms": rtt_ms,
        "accumulation": accumulation,
        "pipelined": pipelined,
        "latency_by": "netem" if namespace.netem else "proxy",
        "steps": results["steps"],
        "accuracy": results["test_accuracy"],
        "train_seconds": train_seconds,
        "step_ms": 1e3 * train_seconds / results["steps"],
        "client_peak_mib": results.get("peak_memory_mib"),
        "evals": evals,
        "ledger_bytes": results["total_bytes"] + results["inference_bytes"],
        "payload_bytes": traffic["payload_sent"] + traffic["payload_received"],
        "framing_bytes": traffic["framing_sent"] + traffic["framing_received"],
        "wire_bytes": wire,
    }


def seconds_to_reach(evals: list[tuple[float, float]], accuracy: float) -> float | None:
    return next((seconds for seconds, reached in evals if reached >= accuracy), None)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({row["rate"] for row in rows if row["rate"]}, reverse=True) or [None]
    figure, axes = plt.subplots(1, len(rates), figsize=(5.5 * len(rates), 3.8), squeeze=False)
    for axis, rate in zip(axes[0], rates, strict=True):
        for row in (row for row in rows if row["rate"] == rate):
            axis.plot(*zip(*row["evals"], strict=True), marker="o", label=f"{row['method']} ({row['transport']})")
        axis.set_title(f"link shaped to {rate} Mbit/s" if rate else "link unshaped")
        axis.set_xlabel("training wall-clock (s, evaluations excluded)")
        axis.set_ylabel("test accuracy")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="*", default=[100, 10], help="Link rates in Mbit/s.")
    parser.add_argument("--rtt", type=float, nargs="+", default=[0], help="Round trips added, in ms.")
    parser.add_argument("--accumulation", type=int, nargs="+", default=[1], help="Micro-batches a step.")
    parser.add_argument("--pipeline", action="store_true",
                        help="Also run each step of several micro-batches pipelined (--pipeline_micro_batches).")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--train-samples", type=int, default=3000)
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=float, default=0.2, help="Evaluate every this fraction of the steps.")
    parser.add_argument(
        "--transports", nargs="+", default=["tls", "insecure"], choices=["tls", "insecure"],
        help="gRPC with mutual TLS (the default transport) and plaintext gRPC (--insecure), side by side.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(ROOT / "docs/results/network"))
    args = parser.parse_args()
    if os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")):
        sys.exit("benchmarks/network.py needs root and the `ip` and `tc` tools (a network namespace, a shaped link).")
    if any(not 0 <= rtt <= 10_000 for rtt in args.rtt):
        sys.exit(f"--rtt {args.rtt}: each must be in 0 .. 10000 ms.")

    from hf_adc.experiment import default_checkpoint

    checkpoint = default_checkpoint(use_cpu=True)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    namespace = Namespace(f"hfadc{os.getpid()}")
    namespace.netem = namespace.has_netem()
    scratch = Path(tempfile.mkdtemp(prefix="hf_adc_network_"))  # each run's outputs: read, then deleted
    from hf_adc.distributed.provision import ephemeral_kits

    kits = scratch / "kits"
    ephemeral_kits(kits, 1)
    rows = []
    try:
        settings = [
            (rate, rtt, accumulation, pipelined, method, transport)
            for rate in [None, *args.rates] for rtt in args.rtt for accumulation in args.accumulation
            for pipelined in ([False, True] if args.pipeline and accumulation > 1 else [False])
            for method in args.methods for transport in args.transports
        ]  # fmt: skip
        for rate, rtt, accumulation, pipelined, method, transport in tqdm(settings, desc="runs"):
            namespace.shape(rate, rtt)
            work = scratch / (f"{rate or 'unshaped'}-{rtt:g}ms-{accumulation}{'p' * pipelined}-{method.split()[0]}-"
                              f"{transport}")  # fmt: skip
            row = one_run(namespace, method, transport, args, checkpoint, kits, work, rtt, accumulation, pipelined)
            rows.append({"rate": rate, **row})
            with open(output / "runs.jsonl", "a") as file:
                file.write(json.dumps(rows[-1]) + "\n")
    finally:
        namespace.close()
        shutil.rmtree(scratch, ignore_errors=True)
    print(table(rows, args))
    plot([row for row in rows if row["rtt_ms"] == args.rtt[0] and row["accumulation"] == args.accumulation[0]],
         output / "accuracy_vs_wallclock.png")  # fmt: skip


def table(rows: list[dict], args) -> str:
    """Seconds a step (and what the round trips add over RTT 0), and time to the uncompressed split's accuracy,
    for each link, round trip and number of micro-batches."""
    fields = ("rate", "rtt_ms", "accumulation", "pipelined", "method", "transport")

    def key(row: dict, **changes) -> tuple:
        return tuple({**row, **changes}.get(name, False) for name in fields)  # runs of before --pipeline: False

    by_key = {key(row): row for row in rows}
    lines = [
        f"\n{args.train_samples} training images, batch {args.batch_size}, budget 1 uncompressed epoch, CPU "
        f"({os.cpu_count()} cores)\n",
        "| link | RTT ms | micro-batches | method | transport | steps | s a step | + over RTT 0 (round trips) | "
        "accuracy | s to uncompressed's accuracy | speed-up | ledger + framing / wire | client peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        baseline = by_key.get(key(row, method="uncompressed"))
        zero = by_key.get(key(row, rtt_ms=0))
        target = baseline["accuracy"] if baseline else None
        reference = seconds_to_reach(baseline["evals"], target) if baseline else None
        reached = seconds_to_reach(row["evals"], target) if target is not None else None
        speedup = f"{reference / reached:.1f}x" if reached and reference else "-"
        step = row["step_ms"] / 1e3
        added = "-"
        if zero is not None and row["rtt_ms"]:
            extra = step - zero["step_ms"] / 1e3
            added = f"+{extra:.3f} ({extra / (row['rtt_ms'] / 1e3):.1f})"
        counted = (row["payload_bytes"] + row["framing_bytes"]) / row["wire_bytes"]
        wire = f"{counted:.4f}" if not row["rtt_ms"] or row.get("latency_by") == "netem" else "- (proxy)"
        link = f"{row['rate']:g} Mbit/s" if row["rate"] else "unshaped"
        micro_batches = f"{row['accumulation']}{' pipelined' if row.get('pipelined') else ''}"
        lines.append(
            f"| {link} | {row['rtt_ms']:g} | {micro_batches} | {row['method']} | {row['transport']} | "
            f"{row['steps']} | {step:.3f} | {added} | {row['accuracy']:.4f} | "
            f"{f'{reached:.0f}' if reached else 'not reached'} | {speedup} | {wire} | "
            f"{row.get('client_peak_mib') or float('nan'):.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
