"""What keeping the labels on the client costs per training step: the standard split against the U-shaped one
(`label_privacy=True`), side by side in one run, for the uncompressed split, ADC and `adc+quantize8` at xi = 0.1.

The shapes are the quick scale's (a 4-layer ViT of width 64 on 28 px Fashion-MNIST-sized inputs, 50 tokens, the cut
after layer 2, B = 64). Both topologies compute the same losses and gradients (tests/test_ushape.py), so at equal
steps they train alike; what differs is the bytes of a step (the ledger, measured, both cuts) and its time (one
process, the median of `--steps` timed steps after one warm-up). A byte budget buys `standard / U-shaped` as many
steps with the labels kept home.

    python benchmarks/ushape_cost.py --output-dir docs/results/ushape
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification

import hf_adc
from hf_adc.bridges.levels import config_for_ratio

METHODS = ("none", "adc", "adc+quantize8")
BATCH, TOKENS, WIDTH, LABELS = 64, 50, 64, 10


def vit(seed: int) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=WIDTH, num_hidden_layers=4,
                       num_attention_heads=2, intermediate_size=4 * WIDTH, num_labels=LABELS)  # fmt: skip
    return ViTForImageClassification(config)


def measure(method: str, label_privacy: bool, xi: float, steps: int) -> dict:
    compression = None if method == "none" else config_for_ratio(method, xi, TOKENS, WIDTH, BATCH)
    split = hf_adc.split_vit(vit(0), 2, compression=compression, label_privacy=label_privacy).train()
    optimizer = torch.optim.AdamW(split.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(BATCH, 1, 28, 28, generator=generator)
    labels = torch.randint(0, LABELS, (BATCH,), generator=generator)
    seconds = []
    for _ in range(steps + 1):
        split.ledger.reset()
        start = time.perf_counter()
        output = split(pixels, labels=labels)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - start)
    record = output.communication
    return {
        "method": method,
        "topology": "u-shaped" if label_privacy else "standard",
        "uplink": dict(record.uplink),
        "downlink": dict(record.downlink),
        "step_bytes": split.ledger.total_bytes,
        "ratio": split.ledger.ratio,
        "step_ms": 1000 * statistics.median(seconds[1:]),
        "loss": output.loss.item(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--xi", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output-dir", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    measure("none", False, args.xi, 3)  # warms the process up (allocator, kernels) before anything is timed
    rows = [measure(method, private, args.xi, args.steps) for method in METHODS for private in (False, True)]
    lines = [
        f"B = {BATCH}, {TOKENS} tokens x {WIDTH}, cut after layer 2 of 4, xi = {args.xi}, float32 wire, CPU, 1 thread",
        "",
        "| method | topology | bytes per step (both cuts) | of which labels | of which head round trip | ratio | "
        "step ms | steps a budget buys, against standard |",
        "|---|---|---|---|---|---|---|---|",
    ]
    standard = {row["method"]: row for row in rows if row["topology"] == "standard"}
    for row in rows:
        labels = row["uplink"].get("labels", 0)
        head = row["uplink"].get("head_gradients", 0) + row["downlink"].get("head_activations", 0)
        relative = standard[row["method"]]["step_bytes"] / row["step_bytes"]
        lines.append(
            f"| {row['method']} | {row['topology']} | {row['step_bytes']:,} | {labels:,} | {head:,} | "
            f"{row['ratio']:.4f} | {row['step_ms']:.1f} | {relative:.3f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.output_dir:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "table.md").write_text(text + "\n")
        (args.output_dir / "runs.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
