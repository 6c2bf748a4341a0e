"""Several clients: test accuracy against total bytes (activations, labels, gradients and client-half sync), for
1, 3 and 5 clients, IID and Dirichlet shards, both schedules, the uncompressed split against ADC and a baseline.

Each run is the one-machine command a user would type (the server and N client processes, real gloo groups):

    python recipes/train.py --distributed --num_clients N --schedule S --partition P --compression C ...

on the default checkpoint (a small ViT pretrained on Fashion-MNIST classes 0-4, cached), fine-tuned on classes
5-9 under one byte budget for the whole federation (sync included). Each finished run is appended to
`runs.jsonl` (the sweep resumes); at the end `table.md` (also printed) and `accuracy_vs_bytes.png`.

    python benchmarks/federation.py --output-dir docs/results/federation
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
METHODS = {
    "none": ["--compression", "none"],
    "adc": ["--compression", "adc", "--xi", "0.1"],
    "bottlenet": ["--compression", "bottlenet", "--ratio", "0.1"],
}


def plan(client_counts, partitions, schedules, methods) -> list[dict]:
    runs = []
    for clients in client_counts:
        for partition in partitions if clients > 1 else ["iid"]:  # one client: one shard, one schedule
            for schedule in schedules if clients > 1 else ["splitfed"]:
                runs += [{"clients": clients, "partition": partition, "schedule": schedule, "method": method}
                         for method in methods]  # fmt: skip
    return runs


def run(config: dict, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="hf_adc_federation_") as output_dir:
        command = [
            sys.executable, str(ROOT / "recipes" / "train.py"), "--distributed",
            "--num_clients", str(config["clients"]), "--schedule", config["schedule"],
            "--partition", config["partition"], "--alpha", str(args.alpha), "--sync_every", str(args.sync_every),
            "--classes", "5-9", "--max_train_samples", str(args.train_rows), "--max_eval_samples", str(args.test_rows),
            "--budget_epochs", str(args.budget_epochs), "--eval_strategy", "no", "--logging_steps", "1000",
            "--disable_tqdm", "true", "--seed", str(args.seed), "--output_dir", output_dir,
            *METHODS[config["method"]],
        ]  # fmt: skip
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=ROOT, timeout=3600)
        path = Path(output_dir) / "server_results.json"
        if done.returncode != 0 or not path.exists():
            raise RuntimeError(f"run {config} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        report = json.loads(path.read_text())
    clients = [client["reported"] for client in report["clients"].values()]  # our own clients: honest
    accuracy = [client["test_accuracy"] for client in clients]
    local = [client["local_accuracy"] for client in clients]
    return {
        **config,
        "test_accuracy": sum(accuracy) / len(accuracy),
        "worst_local_accuracy": min(local),
        "total_bytes": report["reported_total"]["total_bytes"],
        "sync_bytes": report["reported_total"]["sync_bytes"],
        "uncompressed_bytes": report["reported_total"]["uncompressed_bytes"],
        "budget_bytes": report["plan"]["budget_bytes"],
        "rounds": report["plan"]["rounds"],
        "steps_per_client": report["plan"]["max_steps"],
        "dropped": report["dropped"],
        "report": report,
    }


def table(runs: list[dict]) -> str:
    lines = [
        "| clients | partition | schedule | method | test accuracy | worst client (own classes) | rounds x steps | "
        "total MB | of which sync |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in sorted(runs, key=lambda r: (r["clients"], r["partition"], r["schedule"], r["method"])):
        lines.append(
            f"| {entry['clients']} | {entry['partition']} | {entry['schedule']} | {entry['method']} | "
            f"{entry['test_accuracy']:.3f} | {entry['worst_local_accuracy']:.3f} | {entry['rounds']} x "
            f"{entry['steps_per_client'] // max(entry['rounds'], 1)} | {entry['total_bytes'] / 1e6:.1f} | "
            f"{100 * entry['sync_bytes'] / entry['total_bytes']:.0f}% |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    markers = {"none": "s", "adc": "o", "bottlenet": "^"}
    for axis, schedule in zip(axes, ("sequential", "splitfed"), strict=True):
        for entry in runs:
            if entry["schedule"] != schedule and entry["clients"] > 1:
                continue
            color = {1: "black", 3: "tab:blue", 5: "tab:red"}.get(entry["clients"], "gray")
            fill = "full" if entry["partition"] == "iid" else "none"
            axis.plot(entry["total_bytes"] / 1e6, entry["test_accuracy"], marker=markers[entry["method"]],
                      color=color, fillstyle=fill, linestyle="", markersize=8)  # fmt: skip
            axis.annotate(entry["method"], (entry["total_bytes"] / 1e6, entry["test_accuracy"]), fontsize=7)
        axis.set_title(f"{schedule} (black: 1 client, blue: 3, red: 5; hollow: Dirichlet)")
        axis.set_xlabel("total bytes sent, sync included (MB)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy of the final model")
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--partitions", nargs="+", default=["iid", "dirichlet"], choices=["iid", "dirichlet"])
    schedules = ["sequential", "splitfed"]
    parser.add_argument("--schedules", nargs="+", default=schedules, choices=schedules)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--sync-every", type=int, default=5)
    parser.add_argument("--train-rows", type=int, default=1000)
    parser.add_argument("--test-rows", type=int, default=500)
    parser.add_argument("--budget-epochs", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results/federation"))
    args = parser.parse_args(argv)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    runs_file = args.output_dir / "runs.jsonl"
    done = [json.loads(line) for line in runs_file.read_text().splitlines()] if runs_file.exists() else []
    keys = {(r["clients"], r["partition"], r["schedule"], r["method"]) for r in done}
    todo = [c for c in plan(args.clients, args.partitions, args.schedules, args.methods)
            if (c["clients"], c["partition"], c["schedule"], c["method"]) not in keys]  # fmt: skip
    for config in tqdm(todo, desc="federation runs"):
        result = run(config, args)
        with runs_file.open("a") as file:
            file.write(json.dumps(result) + "\n")
        done.append(result)
    text = table(done)
    (args.output_dir / "table.md").write_text(
        f"Fashion-MNIST classes 5-9, {args.train_rows} training rows dealt to the clients, {args.test_rows} test rows; "
        f"budget {args.budget_epochs:g} uncompressed epochs for the whole federation (sync included); "
        f"sync every {args.sync_every} steps; Dirichlet alpha {args.alpha:g}; seed {args.seed}. Test accuracy: the "
        "final model on all test rows (mean over clients; they hold the same model); worst client: the lowest "
        "accuracy weighted by a client's own class frequencies.\n\n" + text + "\n"
    )
    plot(done, args.output_dir / "accuracy_vs_bytes.png")
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
