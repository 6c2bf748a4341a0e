"""Test accuracy against achieved compression under one byte budget: the fair protocol.

Each run fine-tunes the same pretrained checkpoint (made once on other classes, cached, not charged) until it has
sent E epochs' worth of uncompressed traffic, so a method that sends less trains more steps. For each cell
(method, ratio xi, budget E):

1. the learning-rate grid is run at the first seed and scored on a validation split carved from the training
   rows (never trained on, never the test split); the best validation accuracy picks the learning rate;
2. the other seeds run at the chosen rate; the table reports test accuracy over all seeds at that rate (the
   first seed's test accuracy comes from its selection run, chosen without looking at it).

Methods: `none` (the uncompressed split); ADC by its split exponent a (T/B = xi**a, k/n = xi**(1 - a)):
`adc_tokens` (a = 0, token selection alone), `adc_a0.25`, `adc` (a = 0.5, balanced), `adc_a0.75`, and
`adc_batch` / `adc_scratch` (batch merging alone / a randomly initialised ViT); the baselines `topk`,
`randomtopk`, `bottlenet`, `c3sl`, `quantize` at their nearest setting to xi; compositions, a reducer then a codec
(`adc+quantize8`, `adc_tokens+quantize8`, `adc+quantize16`, ...).

Every finished run is appended to `runs.jsonl`, so an interrupted sweep resumes where it stopped, and sweeps with
other methods or budgets can add to the same folder. At the end: `summary.csv`, `table.md` (tables per budget and
an advice table, also printed) and `accuracy_vs_ratio.png`. The committed results came from:

    python benchmarks/accuracy_vs_communication.py --preset quick --budgets 1 --output-dir docs/results/quick
    python benchmarks/accuracy_vs_communication.py --preset quick --budgets 5 --levels 0.1 \
        --output-dir docs/results/quick \
        --methods none adc_tokens adc_a0.25 adc adc_a0.75 bottlenet adc+quantize8 adc_tokens+quantize8
    python benchmarks/accuracy_vs_communication.py --preset cifar10 --data-path ../shared/data/cifar10 \
        --output-dir docs/results/cifar10 --methods none adc_tokens adc_a0.25 adc bottlenet c3sl adc+quantize8 \
        adc_tokens+quantize8 adc_a0.75

the labels kept on the client (U-shaped splits) against the standard split, one after the other:

    python benchmarks/accuracy_vs_communication.py --preset quick --budgets 5 --levels 0.1 \
        --methods none adc adc+quantize8 --output-dir docs/results/ushape/standard
    python benchmarks/accuracy_vs_communication.py --preset quick --budgets 5 --levels 0.1 \
        --methods none adc adc+quantize8 --output-dir docs/results/ushape/u-shaped --label-privacy

and on a GPU, from a DeiT-Tiny checkpoint:

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
from hf_adc.bridges import COMPOSED_METHODS, config_for_ratio
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

SPLIT_RULES = {0.0: "adc_tokens", 0.25: "adc_a0.25", 0.5: "adc", 0.75: "adc_a0.75"}  # ADC's split exponent a
METHODS = ("none", "adc_tokens", "adc_a0.25", "adc", "adc_a0.75", "topk", "randomtopk", "bottlenet", "c3sl",
           "quantize", "adc+quantize8", "adc_tokens+quantize8", "adc+quantize16")  # fmt: skip


@dataclass
class Preset:
    dataset: str
    pretrain_classes: str
    finetune_classes: str
    pretrain_rows: int
    pretrain_epochs: float
    train_rows: int
    val_rows: int
    test_rows: int
    batch_size: int
    split_layer: int
    learning_rates: tuple[float, ...]
    budgets: tuple[float, ...] = (1, 5)
    levels: tuple[float, ...] = (0.05, 0.1)
    methods: tuple[str, ...] = METHODS
    model: ModelArguments = field(default_factory=ModelArguments)
    seeds: tuple[int, ...] = (0, 1, 2)
    scratch_levels: tuple[float, ...] = (0.1,)


PRESETS = {
    # Fashion-MNIST at 28 px (50 tokens), a 4-layer ViT of width 64.
    "quick": Preset(
        dataset="fashion_mnist",
        pretrain_classes="0-4",
        finetune_classes="5-9",
        pretrain_rows=15000,
        pretrain_epochs=2,
        train_rows=1000,
        val_rows=500,
        test_rows=2000,
        batch_size=64,
        split_layer=2,
        learning_rates=(3e-4, 1e-3, 3e-3),
        model=ModelArguments(image_size=28, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=2),
    ),  # fmt: skip
    # CIFAR-10 at 32 px (65 tokens), a 6-layer ViT of width 96 pretrained on classes 0-4, fine-tuned on 5-9.
    "cifar10": Preset(
        dataset="",
        pretrain_classes="0-4",
        finetune_classes="5-9",
        pretrain_rows=25000,
        pretrain_epochs=8,
        train_rows=2000,
        val_rows=500,
        test_rows=2000,
        batch_size=64,
        split_layer=2,
        learning_rates=(3e-4, 1e-3),
        budgets=(1,),
        model=ModelArguments(image_size=32, patch_size=4, hidden_size=96, num_hidden_layers=6, num_attention_heads=3),
    ),  # fmt: skip
    # The paper's setting on a GPU: a DeiT-Tiny-shaped checkpoint at 224 px, split at 3, B = 128.
    "deit": Preset(
        dataset="",
        pretrain_classes="",
        finetune_classes="",
        pretrain_rows=0,
        pretrain_epochs=0,
        train_rows=50000,
        val_rows=5000,
        test_rows=10000,
        batch_size=128,
        split_layer=3,
        learning_rates=(3e-5, 1e-4, 3e-4),
        budgets=(10,),
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
    return run["method"], run["level"], run["budget"], run["learning_rate"], run["seed"]


def cell_runs(runs: list, method: str, level: float, budget: float) -> list:
    return [run for run in runs if (run["method"], run["level"], run["budget"]) == (method, level, budget)]


def chosen_learning_rate(runs: list, selection_seed: int) -> float | None:
    """The grid's learning rate with the best validation accuracy at the selection seed (ties: the smaller)."""
    candidates = [run for run in runs if run["seed"] == selection_seed]
    if not candidates:
        return None
    return max(candidates, key=lambda run: (run["val_accuracy"], -run["learning_rate"]))["learning_rate"]


class Sweep:
    """The protocol's runs for one preset: data, model and a runner that appends each finished run to the file."""

    def __init__(self, preset: Preset, checkpoint: str, data_path: str | None, output_dir: Path, device: str,
                 label_privacy: bool = False):  # fmt: skip
        self.preset, self.checkpoint, self.device = preset, checkpoint, device
        self.label_privacy, self.topology = label_privacy, "u-shaped" if label_privacy else "standard"
        self.runs_file = output_dir / "runs.jsonl"
        lines = self.runs_file.read_text().splitlines() if self.runs_file.exists() else []
        self.runs = [json.loads(line) for line in lines]
        others = {run.get("topology", "standard") for run in self.runs} - {self.topology}
        if others:
            raise ValueError(
                f"{self.runs_file} holds {', '.join(sorted(others))} runs; this sweep is {self.topology}: give each "
                "topology its own --output-dir."
            )
        data_args = DataArguments(
            dataset_name=data_path or preset.dataset, classes=preset.finetune_classes or None,
            max_train_samples=preset.train_rows + preset.val_rows, max_eval_samples=preset.test_rows,
        )  # fmt: skip
        self.dataset = load_data(data_args, seed=0)
        reference, image_processor = load_vit(ModelArguments(model_name_or_path=checkpoint), self.dataset)
        image_size, transform = reference.config.image_size, ImageTransform(image_processor)
        # The validation rows are carved from the training split (after its seeded shuffle) and never trained on.
        rows = self.dataset["train"]
        self.train = materialize(rows.select(range(preset.train_rows)), transform, image_size)
        self.val = materialize(rows.select(range(preset.train_rows, len(rows))), transform, image_size)
        self.test = materialize(self.dataset["test"], transform, image_size)
        self.trainer_dir = tempfile.mkdtemp(prefix="hf_adc_sweep_")  # the Trainer's output_dir; nothing saved there

    def run(self, method: str, level: float, budget: float, learning_rate: float, seed: int) -> dict:
        preset = self.preset
        torch.manual_seed(seed)
        if method == "adc_scratch":
            model, _ = load_vit(ModelArguments(**{**preset.model.__dict__, "model_name_or_path": None}), self.dataset)
        else:
            model, _ = load_vit(ModelArguments(model_name_or_path=self.checkpoint), self.dataset)
        num_tokens = model.vit.embeddings.patch_embeddings.num_patches + 1
        level_method = "adc" if method == "adc_scratch" else method
        compression = (
            None
            if method == "none"
            else config_for_ratio(level_method, level, num_tokens, model.config.hidden_size, preset.batch_size, seed)
        )
        split = hf_adc.split_vit(
            model.to(self.device), preset.split_layer, compression=compression, label_privacy=self.label_privacy
        )
        args = hf_adc.ADCTrainingArguments(
            output_dir=self.trainer_dir, per_device_train_batch_size=preset.batch_size,
            per_device_eval_batch_size=256, learning_rate=learning_rate, weight_decay=0.05,
            lr_scheduler_type="cosine", warmup_steps=0.05, budget_epochs=budget, save_strategy="no",
            report_to="none", disable_tqdm=True, logging_steps=10**9, seed=seed, use_cpu=self.device == "cpu",
            dataloader_drop_last=method == "c3sl",
        )  # fmt: skip
        trainer, results = train_split(split, args, self.train, self.test)
        val_accuracy = trainer.evaluate(eval_dataset=self.val, metric_key_prefix="val")["val_accuracy"]
        results.pop("log_history")
        run = {
            "method": method, "level": level, "budget": budget, "learning_rate": learning_rate, "seed": seed,
            "val_accuracy": val_accuracy, "topology": self.topology, **results,
        }  # fmt: skip
        with self.runs_file.open("a") as file:
            file.write(json.dumps(run, default=str) + "\n")
        self.runs.append(run)
        return run


def sweep(sweep: Sweep, cells: list, grid: list[float], seeds: list[int]) -> list:
    """Per cell (method, level, budget): the grid at the first seed, scored on validation; then the other seeds at
    the chosen learning rate. Runs already in the file are not repeated, so an interrupted sweep resumes."""
    finished = {run_key(run) for run in sweep.runs}
    progress = tqdm(total=len(cells) * (len(grid) + len(seeds) - 1), desc="sweep runs")
    for method, level, budget in cells:
        for learning_rate in grid:
            if (method, level, budget, learning_rate, seeds[0]) not in finished:
                sweep.run(method, level, budget, learning_rate, seeds[0])
            progress.update()
        chosen = chosen_learning_rate(cell_runs(sweep.runs, method, level, budget), seeds[0])
        for seed in seeds[1:]:
            if (method, level, budget, chosen, seed) not in finished:
                sweep.run(method, level, budget, chosen, seed)
            progress.update()
    progress.close()
    return sweep.runs


def summarize_cells(runs: list) -> list:
    """One row per (method, level, budget): test accuracy over the seeds at the learning rate chosen on
    validation, and every grid point's validation accuracy."""
    rows = []
    for method, level, budget in dict.fromkeys((run["method"], run["level"], run["budget"]) for run in runs):
        members = cell_runs(runs, method, level, budget)
        selection_seed = min(run["seed"] for run in members)
        chosen = chosen_learning_rate(members, selection_seed)
        final = [run for run in members if run["learning_rate"] == chosen]
        accuracies = [run["test_accuracy"] for run in final]
        grid = sorted((run["learning_rate"], run["val_accuracy"]) for run in members if run["seed"] == selection_seed)
        rows.append({
            "method": method, "level": level, "budget": budget, "learning_rate": chosen, "seeds": len(final),
            "accuracy_mean": statistics.mean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "achieved_ratio": statistics.mean(run["ratio"] for run in final),
            "steps": statistics.mean(run["steps"] for run in final),
            "train_seconds": statistics.mean(run["train_seconds"] for run in final),
            "val_by_learning_rate": " ".join(f"{lr:g}:{accuracy:.3f}" for lr, accuracy in grid),
            "setting": json.dumps({k: v for k, v in (final[0]["compression"] or {}).items() if v is not None}),
        })  # fmt: skip
    return rows


def beats(a: dict, b: dict) -> bool:
    """Whether row a's mean exceeds row b's by more than the seeds' spread (the two stds summed)."""
    return a["accuracy_mean"] - b["accuracy_mean"] > a["accuracy_std"] + b["accuracy_std"]


def advice(rows: list) -> str:
    """Per budget and level: the best method, the runner-up and whether the lead exceeds the spread; the best ADC
    split exponent; the best composition against the best single method."""
    lines = [
        "| budget (uncompressed epochs) | xi | best | runner-up | lead beyond spread | best ADC split (a) |"
        " best composition vs best single |",
        "|---|---|---|---|---|---|---|",
    ]
    cell = {(row["method"], row["level"], row["budget"]): row for row in rows}
    for budget in sorted({row["budget"] for row in rows}):
        for level in sorted({row["level"] for row in rows if row["method"] != "none"}):
            ranked = sorted(
                (row for row in rows if (row["level"], row["budget"]) == (level, budget) and row["seeds"] > 1),
                key=lambda row: -row["accuracy_mean"],
            )
            if len(ranked) < 2:
                continue
            best, second = ranked[0], ranked[1]
            adc = [(a, cell.get((name, level, budget))) for a, name in SPLIT_RULES.items()]
            adc = sorted(((a, row) for a, row in adc if row), key=lambda item: -item[1]["accuracy_mean"])
            split_rule = "–"
            if adc:
                a, row = adc[0]
                clear = len(adc) > 1 and beats(row, adc[1][1])
                split_rule = f"{a:g} ({row['accuracy_mean']:.3f}{', clear' if clear else ', within spread'})"
            composed = [row for row in ranked if "+" in row["method"]]
            single = [row for row in ranked if "+" not in row["method"]]
            versus = "–"
            if composed and single:
                c, s = composed[0], single[0]
                verdict = "beats" if beats(c, s) else "loses to" if beats(s, c) else "ties"
                versus = f"{c['method']} {c['accuracy_mean']:.3f} {verdict} {s['method']} {s['accuracy_mean']:.3f}"
            lines.append(
                f"| {budget:g} | {level:g} | {best['method']} {format_cell(best)} | {second['method']} "
                f"{format_cell(second)} | {'yes' if beats(best, second) else 'no'} | {split_rule} | {versus} |"
            )
    return "\n".join(lines)


def format_cell(row: dict) -> str:
    return f"{row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f}"


def summarize(runs: list, output_dir: Path) -> str:
    rows = summarize_cells(runs)
    with (output_dir / "summary.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    methods = list(dict.fromkeys(["none", *METHODS, *SPLIT_RULES.values(), *(row["method"] for row in rows)]))
    levels = sorted({row["level"] for row in rows if row["method"] != "none"})
    cell = {(row["method"], row["level"], row["budget"]): row for row in rows}
    tables = []
    for budget in sorted({row["budget"] for row in rows}):
        lines = [
            f"Budget: {budget:g} epoch(s) of uncompressed traffic.\n",
            "| method | " + " | ".join(f"xi={level:g}" for level in levels) + " |",
            "|---" * (len(levels) + 1) + "|",
        ]
        for method in methods:
            entries = []
            for level in levels if method != "none" else [1.0]:
                row = cell.get((method, level, budget))
                entries.append(
                    f"{format_cell(row)} (r={row['achieved_ratio']:.3f}, lr={row['learning_rate']:g}, n={row['seeds']})"
                    if row
                    else "–"
                )
            if any(entry != "–" for entry in entries):
                lines.append(f"| {method} | " + " | ".join(entries + [""] * (len(levels) - len(entries))) + " |")
        tables.append("\n".join(lines))
    text = (
        "Test accuracy (mean ± std over n seeds) at the learning rate chosen on validation (lr), and achieved ratio "
        "r (bytes sent / uncompressed, both ways), under one byte budget. `none` is the uncompressed split.\n\n"
        + "\n\n".join(tables)
        + "\n\n## Advice\n\n"
        + advice(rows)
        + "\n"
    )
    (output_dir / "table.md").write_text(text)
    plot(rows, output_dir / "accuracy_vs_ratio.png")
    return text


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({row["budget"] for row in rows})
    methods = list(dict.fromkeys(row["method"] for row in rows if row["method"] != "none"))
    colors = {method: plt.get_cmap("tab20")(index % 20) for index, method in enumerate(methods)}  # one per method
    figure, axes = plt.subplots(1, len(budgets), figsize=(7.5 * len(budgets), 4.8), squeeze=False)
    for axis, budget in zip(axes[0], budgets, strict=True):
        members = [row for row in rows if row["budget"] == budget]
        for method in dict.fromkeys(row["method"] for row in members if row["method"] != "none"):
            points = sorted((row["achieved_ratio"], row["accuracy_mean"], row["accuracy_std"]) for row in members
                            if row["method"] == method)  # fmt: skip
            ratio, mean, std = zip(*points, strict=True)
            style = "-" if method == "adc" else "-." if "+" in method else "--" if method.startswith("adc") else ":"
            axis.errorbar(ratio, mean, yerr=std, marker="o", linestyle=style, capsize=3, label=method,
                          color=colors[method])  # fmt: skip
        baseline = [row for row in members if row["method"] == "none"]
        if baseline:
            axis.axhline(baseline[0]["accuracy_mean"], color="black", linewidth=1, label="uncompressed split")
        axis.set_xscale("log")
        axis.set_xlabel("achieved compression ratio (bytes sent / uncompressed, both ways)")
        axis.set_ylabel("test accuracy (mean ± std over seeds)")
        axis.set_title(f"Equal byte budget: {budget:g} uncompressed epoch(s)")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--data-path", help="Dataset folder (cifar10 and deit presets).")
    parser.add_argument("--checkpoint", help="Starting checkpoint (deit preset; else made and cached).")
    parser.add_argument("--seeds", type=int, nargs="+", help="Seeds (the first also selects the learning rate).")
    parser.add_argument(
        "--methods", nargs="+",
        help="Methods (default: the preset's). Any name config_for_ratio knows: "
        f"{', '.join(METHODS)}, adc_a<exponent>, adc_batch, adc_scratch, {', '.join(COMPOSED_METHODS)}.",
    )  # fmt: skip
    parser.add_argument("--levels", type=float, nargs="+", help="Compression levels xi (default: the preset's).")
    parser.add_argument("--budgets", type=float, nargs="+", help="Byte budgets in uncompressed epochs.")
    parser.add_argument("--learning-rates", type=float, nargs="+", help="The grid chosen from on validation.")
    parser.add_argument("--output-dir", type=Path, help="Default: benchmarks/results/<preset>.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--label-privacy", action="store_true",
        help="U-shaped splits (the labels and the head stay on the client; both cuts charged): its own --output-dir.",
    )  # fmt: skip
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    if args.preset != "quick" and not args.data_path:
        parser.error(f"--preset {args.preset} needs --data-path (e.g. ../shared/data/cifar10).")
    if args.preset == "deit" and not args.checkpoint:
        parser.error("--preset deit needs --checkpoint (e.g. facebook/deit-tiny-patch16-224).")
    seeds = args.seeds or list(preset.seeds)
    levels, budgets = args.levels or preset.levels, args.budgets or preset.budgets
    for name, values in (("levels", levels), ("budgets", budgets), ("learning-rates", args.learning_rates or [1])):
        if any(value <= 0 for value in values):
            parser.error(f"--{name} {values}: every value must be > 0.")
    output_dir = args.output_dir or Path("benchmarks/results") / args.preset
    output_dir.mkdir(parents=True, exist_ok=True)
    transformers_logging.set_verbosity_error()
    checkpoint = args.checkpoint or pretrained_checkpoint(preset, args.data_path, args.device)
    methods = args.methods or preset.methods
    cells = []
    for budget in budgets:
        cells += [("none", 1.0, budget)] if "none" in methods else []
        cells += [(method, xi, budget) for xi in levels for method in methods if method not in ("none", "adc_scratch")]
        cells += [("adc_scratch", xi, budget) for xi in preset.scratch_levels] if "adc_scratch" in methods else []
    runner = Sweep(preset, checkpoint, args.data_path, output_dir, args.device, args.label_privacy)
    runs = sweep(runner, cells, list(args.learning_rates or preset.learning_rates), seeds)
    print(summarize(runs, output_dir))


if __name__ == "__main__":
    main(sys.argv[1:])
