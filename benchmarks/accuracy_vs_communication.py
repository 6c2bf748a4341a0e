"""Test accuracy against achieved compression, every method, one byte ledger, one byte budget.

The paper's protocol: each run fine-tunes the same pretrained checkpoint (made once with the pretraining
recipe on other classes, cached, and not charged) until it has sent E epochs' worth of uncompressed
traffic, so a method that sends less trains more steps. Methods x compression levels x seeds:

- `none` (the uncompressed split), `adc` (balanced, T/B = k/n = sqrt(xi));
- ADC's ablations: `adc_tokens` (token selection only, T/B = 1), `adc_batch` (batch merging only, k/n = 1),
  `adc_scratch` (ADC on a randomly initialised ViT: method.md section 7 says it stays near chance);
- the baselines at their nearest setting to each xi: `topk`, `randomtopk`, `bottlenet`, `c3sl`, `quantize`;
- compositions, a reducer then a codec (`adc+quantize8`, `adc+quantize16`, `adc_tokens+quantize8`,
  `topk+quantize8`, `adc+bottlenet0.5`, ...), with `--methods` (any names `config_for_ratio` knows).

Every finished run is appended to `runs.jsonl`, so an interrupted sweep resumes where it stopped. At the
end: `summary.csv`, `table.md` (also printed) and `accuracy_vs_ratio.png`.

    python benchmarks/accuracy_vs_communication.py --preset quick --output-dir docs/results/quick
    python benchmarks/accuracy_vs_communication.py --preset quick --levels 0.05 0.1 --seeds 0 1 2 \
        --methods none adc adc_tokens bottlenet c3sl quantize topk adc+quantize8 adc+quantize16 \
        adc_tokens+quantize8 topk+quantize8 adc+bottlenet0.5 --output-dir docs/results/composed
    python benchmarks/accuracy_vs_communication.py --preset cifar10 --data-path ../shared/data/cifar10
    python benchmarks/accuracy_vs_communication.py --preset deit --checkpoint facebook/deit-tiny-patch16-224 \
        --data-path ../shared/data/cifar10 --device cuda
"""

import argparse
import csv
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import TrainingArguments
from transformers import logging as transformers_logging

import hf_adc
from hf_adc.bridges import COMPOSED_METHODS, LEVEL_METHODS, config_for_ratio
from hf_adc.data import ImageTransform
from hf_adc.experiment import (
    DataArguments,
    ModelArguments,
    cache_dir,
    load_data,
    load_vit,
    run_pretraining,
    train_split,
)

LEVELS = (0.02, 0.05, 0.1, 0.2, 0.5)
METHODS = LEVEL_METHODS


@dataclass
class Preset:
    dataset: str
    pretrain_classes: str
    finetune_classes: str
    pretrain_rows: int
    pretrain_epochs: float
    train_rows: int
    test_rows: int
    budget_epochs: float
    batch_size: int
    learning_rate: float
    split_layer: int
    model: ModelArguments = field(default_factory=ModelArguments)
    seeds: tuple[int, ...] = (0, 1)
    scratch_levels: tuple[float, ...] = (0.1, 0.2)


PRESETS = {
    # Fashion-MNIST at 28 px (50 tokens), a 4-layer ViT of width 64: the whole sweep fits in ~30 min on 2 cores.
    "quick": Preset(
        dataset="fashion_mnist",
        pretrain_classes="0-4",
        finetune_classes="5-9",
        pretrain_rows=15000,
        pretrain_epochs=2,
        train_rows=1000,
        test_rows=1000,
        budget_epochs=1,
        batch_size=64,
        learning_rate=1e-3,
        split_layer=2,
        model=ModelArguments(image_size=28, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=2),
    ),  # fmt: skip
    # CIFAR-10 at 32 px: pretrain on classes 0-4, fine-tune on 5-9 (needs --data-path).
    "cifar10": Preset(
        dataset="",
        pretrain_classes="0-4",
        finetune_classes="5-9",
        pretrain_rows=25000,
        pretrain_epochs=10,
        train_rows=25000,
        test_rows=5000,
        budget_epochs=3,
        batch_size=128,
        learning_rate=5e-4,
        split_layer=2,
        seeds=(0, 1, 2),
    ),  # fmt: skip
    # The paper's setting on a GPU: a given DeiT-Tiny checkpoint at 224 px, split at 3, B = 128, Adam 1e-4.
    "deit": Preset(
        dataset="",
        pretrain_classes="",
        finetune_classes="",
        pretrain_rows=0,
        pretrain_epochs=0,
        train_rows=50000,
        test_rows=10000,
        budget_epochs=10,
        batch_size=128,
        learning_rate=1e-4,
        split_layer=3,
        seeds=(0, 1, 2),
    ),  # fmt: skip
}


class TensorRows(torch.utils.data.Dataset):
    """Rows of preprocessed tensors: what the Trainer's collator stacks, without Arrow in the step loop."""

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor):
        self.pixel_values, self.labels = pixel_values, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def materialize(dataset: Dataset, transform: ImageTransform, image_size: int):
    """Pixel values computed once (no augmentation in the sweep), so that runs time the model, not PIL;
    on the fly instead where they would not fit in a few GB (224 px)."""
    if len(dataset) * 3 * image_size**2 * 4 > 2e9:
        return dataset.with_transform(transform)
    rows = dataset.with_transform(transform)[:]
    return TensorRows(rows["pixel_values"], torch.as_tensor(rows["labels"]))


def pretrained_checkpoint(preset: Preset, data_path: str | None, device: str) -> str:
    """The preset's pretraining on its other classes, cached by its settings."""
    dataset = data_path or preset.dataset
    key = f"bench-{Path(dataset).name}-{preset.pretrain_classes}-{preset.pretrain_rows}-{preset.pretrain_epochs}"
    key += f"-{preset.model.image_size}-{preset.model.hidden_size}-{preset.model.num_hidden_layers}"
    path = cache_dir() / key
    if (path / "config.json").exists():
        return str(path)
    data_args = DataArguments(
        dataset_name=dataset, classes=preset.pretrain_classes, max_train_samples=preset.pretrain_rows,
        max_eval_samples=1000,
    )  # fmt: skip
    training_args = TrainingArguments(
        output_dir=str(path), num_train_epochs=preset.pretrain_epochs, per_device_train_batch_size=64,
        learning_rate=1e-3, weight_decay=0.05, lr_scheduler_type="cosine", warmup_steps=0.05, save_strategy="no",
        report_to="none", remove_unused_columns=False, logging_steps=100, use_cpu=device == "cpu", seed=0,
    )  # fmt: skip
    metrics = run_pretraining(preset.model, data_args, training_args)
    print(f"pretrained checkpoint: accuracy {metrics['eval_accuracy']:.3f} on classes {preset.pretrain_classes}")
    return str(path)


def run_key(run: dict) -> tuple:
    return run["method"], run["level"], run["seed"]


def sweep(
    preset: Preset, checkpoint: str, data_path: str | None, output_dir: Path, device: str, seeds, methods, levels
) -> list:
    runs_file = output_dir / "runs.jsonl"
    done = [json.loads(line) for line in runs_file.read_text().splitlines()] if runs_file.exists() else []
    finished = {run_key(run) for run in done}

    data_args = DataArguments(
        dataset_name=data_path or preset.dataset, classes=preset.finetune_classes or None,
        max_train_samples=preset.train_rows, max_eval_samples=preset.test_rows,
    )  # fmt: skip
    dataset = load_data(data_args, seed=0)
    reference, image_processor = load_vit(ModelArguments(model_name_or_path=checkpoint), dataset)
    image_size = reference.config.image_size
    train = materialize(dataset["train"], ImageTransform(image_processor), image_size)
    test = materialize(dataset["test"], ImageTransform(image_processor), image_size)
    scratch_args = ModelArguments(**{**preset.model.__dict__, "model_name_or_path": None})

    plan = [("none", 1.0)] if "none" in methods else []
    plan += [(method, xi) for xi in levels for method in methods if method not in ("none", "adc_scratch")]
    if "adc_scratch" in methods:
        plan += [("adc_scratch", xi) for xi in preset.scratch_levels]
    trainer_dir = tempfile.mkdtemp(prefix="hf_adc_sweep_")  # the Trainer's output_dir; nothing is saved there
    todo = [(method, xi, seed) for seed in seeds for method, xi in plan if (method, xi, seed) not in finished]
    for method, xi, seed in tqdm(todo, desc="sweep runs"):
        torch.manual_seed(seed)
        if method == "adc_scratch":
            model, _ = load_vit(scratch_args, dataset)
        else:
            model, _ = load_vit(ModelArguments(model_name_or_path=checkpoint), dataset)
        num_tokens = model.vit.embeddings.patch_embeddings.num_patches + 1
        level_method = "adc" if method == "adc_scratch" else method
        compression = (
            None
            if method == "none"
            else config_for_ratio(level_method, xi, num_tokens, model.config.hidden_size, preset.batch_size, seed)
        )
        split = hf_adc.split_vit(model.to(device), preset.split_layer, compression=compression)
        args = hf_adc.ADCTrainingArguments(
            output_dir=trainer_dir, per_device_train_batch_size=preset.batch_size,
            per_device_eval_batch_size=256, learning_rate=preset.learning_rate, weight_decay=0.05,
            lr_scheduler_type="cosine", warmup_steps=0.05, budget_epochs=preset.budget_epochs, save_strategy="no",
            report_to="none", disable_tqdm=True, logging_steps=10**9, seed=seed, use_cpu=device == "cpu",
            dataloader_drop_last=method == "c3sl",
        )  # fmt: skip
        _, results = train_split(split, args, train, test)
        run = {"method": method, "level": xi, "seed": seed, **results}
        with runs_file.open("a") as file:
            file.write(json.dumps(run, default=str) + "\n")
        done.append(run)
    return done


def summarize(runs: list, output_dir: Path) -> str:
    groups: dict[tuple[str, float], list] = {}
    for run in runs:
        groups.setdefault((run["method"], run["level"]), []).append(run)
    rows = []
    for (method, level), members in sorted(groups.items()):
        accuracies = [run["test_accuracy"] for run in members]
        rows.append({
            "method": method, "level": level, "seeds": len(members),
            "achieved_ratio": statistics.mean(run["ratio"] for run in members),
            "accuracy_mean": statistics.mean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "steps": statistics.mean(run["steps"] for run in members),
            "train_seconds": statistics.mean(run["train_seconds"] for run in members),
            "setting": json.dumps({k: v for k, v in (members[0]["compression"] or {}).items() if v is not None}),
        })  # fmt: skip
    with (output_dir / "summary.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    methods = list(dict.fromkeys(["none", *METHODS, "adc_scratch", *(row["method"] for row in rows)]))
    levels = sorted({row["level"] for row in rows if row["method"] != "none"})
    cell = {(row["method"], row["level"]): row for row in rows}
    lines = ["| method | " + " | ".join(f"xi={level}" for level in levels) + " |", "|---" * (len(levels) + 1) + "|"]
    for method in methods:
        entries = []
        for level in levels if method != "none" else [1.0] * len(levels):
            row = cell.get((method, level))
            entries.append(
                f"{row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f} (r={row['achieved_ratio']:.3f})"
                if row
                else "–"
            )
        if method == "none":
            entries = [entries[0]] + [""] * (len(levels) - 1)
        if any(entries):
            lines.append(f"| {method} | " + " | ".join(entries) + " |")
    table = "\n".join(lines)
    (output_dir / "table.md").write_text(
        "Test accuracy (mean ± std over seeds) and achieved ratio r (bytes sent / uncompressed, both ways) "
        "under the same byte budget. `none` is the uncompressed split (r = 1).\n\n" + table + "\n"
    )
    plot(rows, output_dir / "accuracy_vs_ratio.png")
    return table


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    order = ["adc", "adc_tokens", "adc_batch", "adc_scratch", *METHODS[3:], *(row["method"] for row in rows)]
    for method in dict.fromkeys(order):
        points = sorted((row["achieved_ratio"], row["accuracy_mean"], row["accuracy_std"]) for row in rows
                        if row["method"] == method)  # fmt: skip
        if points:
            ratio, mean, std = zip(*points, strict=True)
            style = "-" if method == "adc" else "-." if "+" in method else "--" if method.startswith("adc") else ":"
            axis.errorbar(ratio, mean, yerr=std, marker="o", linestyle=style, capsize=3, label=method)
    baseline = [row for row in rows if row["method"] == "none"]
    if baseline:
        axis.axhline(baseline[0]["accuracy_mean"], color="black", linewidth=1, label="uncompressed split")
    axis.set_xscale("log")
    axis.set_xlabel("achieved compression ratio (bytes sent / uncompressed, both ways)")
    axis.set_ylabel("test accuracy")
    axis.set_title("Accuracy at an equal byte budget")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--data-path", help="Dataset folder (cifar10 and deit presets).")
    parser.add_argument("--checkpoint", help="Starting checkpoint (deit preset; else made and cached).")
    parser.add_argument("--seeds", type=int, nargs="+", help="Override the preset's seeds.")
    parser.add_argument(
        "--methods", nargs="+", default=["none", *METHODS, "adc_scratch"],
        help=f"Methods to run (default: all single methods). Compositions too, e.g. {', '.join(COMPOSED_METHODS)}.",
    )  # fmt: skip
    parser.add_argument("--levels", type=float, nargs="+", default=list(LEVELS), help="Compression levels xi.")
    parser.add_argument("--output-dir", type=Path, help="Default: benchmarks/results/<preset>.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    if args.preset != "quick" and not args.data_path:
        parser.error(f"--preset {args.preset} needs --data-path (e.g. ../shared/data/cifar10).")
    if args.preset == "deit" and not args.checkpoint:
        parser.error("--preset deit needs --checkpoint (e.g. facebook/deit-tiny-patch16-224).")
    output_dir = args.output_dir or Path("benchmarks/results") / args.preset
    output_dir.mkdir(parents=True, exist_ok=True)
    transformers_logging.set_verbosity_error()
    checkpoint = args.checkpoint or pretrained_checkpoint(preset, args.data_path, args.device)
    runs = sweep(
        preset, checkpoint, args.data_path, output_dir, args.device, args.seeds or preset.seeds, args.methods,
        args.levels,
    )
    print(summarize(runs, output_dir))


if __name__ == "__main__":
    main(sys.argv[1:])
