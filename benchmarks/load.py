"""Load: 1, 4 and 16 clients against one SplitFed server, as real processes over mutual TLS on loopback.

Every run is one server (`recipes/serve.py --num_clients N --schedule splitfed`) and N clients
(`recipes/train.py --server ... --client_id i`), each with its own kit (made on the fly), on a tiny randomly
initialised ViT (4 layers of width 32 on 16x16 images) and scikit-learn's digits, ADC at xi = 0.25, batch 16, a
round every 5 steps. Each client trains the same number of steps on its own shard, so the server's work grows with
N. Reported per N: the server's peak resident memory (VmHWM of its process, which includes the imports), its
memory per session, the clients' mean and worst step time (training seconds / steps: the queue behind the other
clients' steps included, since the server takes one optimizer step at a time), and the server's throughput (every
client's steps / the longest client's training seconds).

    python benchmarks/load.py --output-dir docs/results/load

On this kind of machine (2 cores) N client processes share the cores with the server, so step time past a few
clients measures the cores as much as the server; run it on a machine with more cores for the server's own curve.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
SHARED = [
    "--split_layer", "2", "--per_device_train_batch_size", "16", "--learning_rate", "1e-3", "--seed", "0",
    "--compression", "adc", "--xi", "0.25", "--schedule", "splitfed", "--sync_every", "5",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_model_and_data(folder: Path) -> tuple[str, str]:
    """A tiny ViT saved like a Hub checkpoint and the digits as a `save_to_disk` dataset (train 1500, test 297)."""
    import numpy as np
    import torch
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from sklearn.datasets import load_digits
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                       image_size=16, patch_size=4, num_labels=10)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folder / "vit")
    digits = load_digits()
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    rows = {"image": list((digits.images * 255 / 16).astype(np.uint8)), "label": digits.target.tolist()}
    dataset = Dataset.from_dict(rows, features=features)
    DatasetDict({"train": dataset.select(range(1500)), "test": dataset.select(range(1500, len(dataset)))}).save_to_disk(
        str(folder / "digits")
    )
    return str(folder / "vit"), str(folder / "digits")


def peak_memory_mib(pid: int) -> float | None:
    """The process's peak resident set (VmHWM) so far, in MiB; None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def one_run(clients: int, args, checkpoint: str, data: str, kits: Path, output_dir: Path) -> dict:
    address = f"127.0.0.1:{free_port()}"
    common = ["--model_name_or_path", checkpoint, *SHARED, "--num_clients", str(clients), "--max_steps",
              str(args.steps), "--timeout", "600"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_ADC_JOIN_TOKEN": "bench"}
    output_dir.mkdir(parents=True)
    server_log = open(output_dir / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "recipes/serve.py"), "--listen", address, *common, "--credentials",
         str(kits / "server"), "--round_timeout", "600", "--accept_timeout", "300", "--output_dir",
         str(output_dir / "server")],
        env=env, stdout=server_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    rows = args.rows_per_client * clients
    client_logs, processes = [], []
    for i in range(clients):
        client_logs.append(open(output_dir / f"client-{i}.log", "w"))
        processes.append(subprocess.Popen(
            [sys.executable, str(ROOT / "recipes/train.py"), *common, "--server", address, "--client_id", str(i),
             "--credentials", str(kits / f"client-{i}"), "--dataset_name", data, "--max_train_samples", str(rows),
             "--max_eval_samples", "48", "--eval_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "true",
             "--output_dir", str(output_dir / f"client-{i}")],
            env=env, stdout=client_logs[-1], stderr=subprocess.STDOUT,
        ))  # fmt: skip
    peak, started = 0.0, time.monotonic()
    while server.poll() is None:
        memory = peak_memory_mib(server.pid)
        peak = max(peak, memory or 0.0)
        if time.monotonic() - started > args.timeout:
            server.kill()
            for process in processes:
                process.kill()
            raise RuntimeError(f"{clients} clients: no end after {args.timeout} s; see {output_dir}")
        time.sleep(0.2)
    for process in processes:
        process.wait(timeout=120)
    for log in (server_log, *client_logs):
        log.close()
    failed = [i for i, process in enumerate(processes) if process.returncode] + ([-1] if server.returncode else [])
    if failed:
        log = (output_dir / "server.log").read_text()[-3000:]
        raise RuntimeError(f"{clients} clients: processes {failed} failed (-1: the server):\n{log}")
    results = [json.loads((output_dir / f"client-{i}" / "results.json").read_text()) for i in range(clients)]
    step_ms = [1e3 * result["train_seconds"] / result["steps"] for result in results]
    report = json.loads((output_dir / "server" / "server_results.json").read_text())
    return {
        "clients": clients,
        "steps_per_client": results[0]["steps"],
        "server_peak_mib": peak,
        "step_ms_mean": sum(step_ms) / clients,
        "step_ms_worst": max(step_ms),
        "server_steps_per_s": sum(r["steps"] for r in results) / max(r["train_seconds"] for r in results),
        "total_bytes": report["reported_total"]["total_bytes"],
        "status": report["status"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=20, help="Optimizer steps every client takes.")
    parser.add_argument("--rows-per-client", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds one run may take.")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "docs/results/load")
    args = parser.parse_args()
    if any(count < 1 for count in args.clients) or args.steps < 1 or args.rows_per_client < 16:
        parser.error(f"--clients {args.clients} (each >= 1), --steps {args.steps} (>= 1), --rows-per-client "
                     f"{args.rows_per_client} (>= 16, one batch) are out of range.")  # fmt: skip
    from hf_adc.distributed.provision import ephemeral_kits

    scratch = Path(tempfile.mkdtemp(prefix="hf_adc_load_"))
    checkpoint, data = tiny_model_and_data(scratch)
    ephemeral_kits(scratch / "kits", max(args.clients))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for clients in tqdm(args.clients, desc="runs"):
        rows.append(one_run(clients, args, checkpoint, data, scratch / "kits", scratch / f"run-{clients}"))
        with open(args.output_dir / "runs.jsonl", "a") as file:
            file.write(json.dumps(rows[-1]) + "\n")
    base = rows[0]
    lines = [
        f"SplitFed, ADC xi = 0.25, tiny ViT, {args.steps} steps per client, batch 16, mutual TLS on loopback, "
        f"{os.cpu_count()} cores shared by the server and every client.\n",
        "| clients | server peak MiB | MiB per extra client | step ms (mean) | step ms (worst) | server steps/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        extra = row["clients"] - base["clients"]
        per_client = f"{(row['server_peak_mib'] - base['server_peak_mib']) / extra:.1f}" if extra else "-"
        lines.append(
            f"| {row['clients']} | {row['server_peak_mib']:.0f} | {per_client} | {row['step_ms_mean']:.0f} | "
            f"{row['step_ms_worst']:.0f} | {row['server_steps_per_s']:.1f} |"
        )
    table = "\n".join(lines) + "\n"
    (args.output_dir / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
