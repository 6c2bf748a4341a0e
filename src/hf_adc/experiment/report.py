"""What a run leaves behind: the split saved with its traffic recorded, `results.json`, the accuracy-against-bytes
plot, and the lines printed for a human (one run, or a federation's table)."""

import json
from pathlib import Path

from transformers import BaseImageProcessor

from ..split import SplitViTForImageClassification


def save_split(
    split: SplitViTForImageClassification, image_processor: BaseImageProcessor, output_dir: str, results: dict
) -> None:
    """Saves the split model (halves as normal checkpoints in `client/`, `server/`, plus the bridge), with
    the training's communication summary recorded in both halves' configs."""
    summary = {key: results[key] for key in ("uplink_bytes", "downlink_bytes", "uncompressed_bytes", "ratio", "steps")}
    summary["test_accuracy"] = results["test_accuracy"]
    for half in (split.client, split.server):
        if half is not None:
            half.config.communication = summary
    split.save_pretrained(output_dir)
    image_processor.save_pretrained(Path(output_dir) / "client")
    image_processor.save_pretrained(output_dir)


def write_results(
    split: SplitViTForImageClassification,
    image_processor: BaseImageProcessor,
    log_history: list[dict],
    results: dict,
    output_dir: str,
) -> None:
    """`save_split`, then `results.json` and `accuracy_vs_bytes.png` next to the halves."""
    save_split(split, image_processor, output_dir, results)
    (Path(output_dir) / "results.json").write_text(json.dumps(results, indent=2, default=str))
    plot_accuracy_against_bytes(log_history, results, Path(output_dir) / "accuracy_vs_bytes.png")


def plot_accuracy_against_bytes(log_history: list[dict], results: dict, path: Path) -> None:
    """Test accuracy at each evaluation against the bytes sent so far, with the budget as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(entry["total_bytes"] / 1e6, entry["eval_accuracy"]) for entry in log_history if "eval_accuracy" in entry]
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    axis.plot(*zip(*points, strict=True), marker="o", label=results["compression"]["method"])
    if results["budget_bytes"]:
        axis.axvline(results["budget_bytes"] / 1e6, color="grey", linestyle="--", label="budget")
    axis.set_xlabel("cumulative MB sent across the cut (both ways)")
    axis.set_ylabel("test accuracy")
    axis.set_title(f"{results['compression']['method']}, achieved ratio {results['ratio']:.3f}")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def summary_text(results: dict) -> str:
    """A few lines for a human at the end of a run."""
    mb = {key: results[key] / 1e6 for key in ("total_bytes", "uplink_bytes", "downlink_bytes", "uncompressed_bytes")}
    lines = [
        f"test accuracy {results['test_accuracy']:.4f} after {results['steps']} steps in "
        f"{results['train_seconds']:.0f} s",
        f"sent {mb['total_bytes']:.1f} MB across the cut (up {mb['uplink_bytes']:.1f} MB, down "
        f"{mb['downlink_bytes']:.1f} MB); an uncompressed split would have sent {mb['uncompressed_bytes']:.1f} MB "
        f"for the same steps (ratio {results['ratio']:.4f})",
    ]
    if results["budget_bytes"]:
        spent = results["total_bytes"] / results["budget_bytes"]
        lines.append(f"budget {results['budget_bytes'] / 1e6:.1f} MB, {100 * spent:.1f}% spent")
    return "\n".join(lines)


def federation_table(results: dict) -> str:
    """A federation server's results (`server_results.json`) as a table: each client's shard, accuracies, bytes."""
    lines = [
        f"{results['schedule']}, {results['num_clients']} clients: {results['detail']}",
        "| client | shard | test accuracy | local accuracy | sent (MB) | of which sync (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for client_id, client in results["clients"].items():
        reported = client["reported"]
        lines.append(
            f"| {client_id} | {client['shard_size']} | {reported.get('test_accuracy', float('nan')):.4f} | "
            f"{reported.get('local_accuracy', float('nan')):.4f} | {reported.get('total_bytes', 0) / 1e6:.2f} | "
            f"{reported.get('sync_bytes', 0) / 1e6:.2f} |"
        )
    total = results["reported_total"]
    lines.append(f"| all | | | | {total['total_bytes'] / 1e6:.2f} | {total['sync_bytes'] / 1e6:.2f} |")
    lines.append("(accuracies and bytes as each client reported them; the server's own count is in `total`)")
    return "\n".join(lines)
