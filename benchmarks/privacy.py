"""What the server learns, per method: bytes, test accuracy, inversion SSIM / PSNR, label attack, and epsilon.

For each (method, level xi, noise multiplier) the client fine-tunes the checkpoint under a budget of uncompressed
epochs (the fair protocol's byte rule; one learning rate, no grid here) while an `Observer` records what the server
half received in the last training steps. The server then attacks as `hf_adc.privacy` describes: it passes its
auxiliary rows (carved from the training split, never trained on by the client) through the public checkpoint's
client half and the bridge, trains a decoder from that view to the images, and applies it to the recorded steps. Three
attacks are scored on the same steps and the strongest (highest mean SSIM) is reported, with the others beside it
(`attacks`): `learned` (the decoder), `learned_aligned` (the decoder after matching each hidden unit's mean and spread
to the surrogate's: `AlignedInversion`) and `white_box` (a search for images whose surrogate output matches, with a
total-variation prior: `WhiteBoxInversion`).

- `ssim_*` / `psnr_*`: the reconstruction of each training image of the recorded steps (a merged ADC row against
  each member; `*_best_member_mean` the best member per row), next to `baseline_*`, the auxiliary mean image.
- `label_attack_accuracy`: standard split, the server's guess from what crossed (class ids, or ADC's soft labels:
  each member guessed as its cluster's most frequent class); U-shaped (`--label_privacy`), the strongest of three
  attacks on `head_gradients` with two known labels per class (direction scoring, k-means of the directions, norm
  scoring: `label_attacks`), scored on the other samples. `label_majority_baseline` beside it.
- `epsilon`: payload noise's (at `--delta`, `dp-accounting` PLD) where `split_guarantee` proves one: rows of one
  example, a frozen client half (`--freeze_client`; BottleNet++'s encoder still trains) and secret noise (drawn from
  the OS: noise cells are not replayed bit for bit); every epoch counted whole, plus the pictures' batch; else null,
  with `epsilon_reason`. It covers the images: the labels cross in the clear in the standard split.
- `clip_norm`: `--clip_norm`, or the median L2 norm of a row the public checkpoint sends for the auxiliary images
  (public information: no private data chooses it).
- `surrogate`: the server's copy of the client half its attacks run through: `public` (the checkpoint, the default)
  or, with `--surrogate trained`, the client half and the bridge as the run left them (a federation's server holds
  them; BottleNet++'s encoder included).
- `nopeek_weight`: with `--nopeek_weights`, the client trains with NoPeek's distance-correlation penalty (empirical:
  no epsilon).
- `label_dp_epsilon`: with `--label_dp_epsilon` (standard split), the client's training labels are randomized once
  per example before training (`randomize_labels`; the benchmark's seed is fixed, a real client's is secret); the
  label attack is then scored against the true labels, and `label_epsilon` is the library's epsilon for it.

Every finished record is appended to `privacy.jsonl` in the output folder, so an interrupted sweep resumes:

    python benchmarks/privacy.py --preset quick --output-dir docs/results/privacy/quick
    python benchmarks/privacy.py --preset cifar10 --dataset_name ../shared/data/cifar10 \
        --output-dir docs/results/privacy/cifar10

Pictures, redrawn from the folder alone with `--plot-only` (no training):

- `privacy_frontier.png`: the attack's SSIM against the bytes sent per training sample (log), test accuracy as
  colour, one marker per record (method, level, noise, topology);
- `privacy_table.md`: every record as a Markdown table;
- `reconstructions.png`: the same 8 training images (first row) and, one row per record, what the attack made of
  them. After training, the first batch of the training rows crosses once more, through the trained client half and
  the bridge (noise included) in training mode, as any step would; the attack's reconstructions of its first 8
  images are saved per record under `reconstructions/` (uint8 `.npz`, a few kB).
"""

import argparse
import copy
import json
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from accuracy_vs_communication import PRESETS as SWEEP_PRESETS  # benchmarks/ is on the path when run as a script
from accuracy_vs_communication import TensorRows, pretrained_checkpoint
from tqdm.auto import tqdm
from transformers import logging as transformers_logging

import hf_adc
from hf_adc.bridges import config_for_ratio
from hf_adc.data import ImageTransform
from hf_adc.experiment import DataArguments, ModelArguments, default_checkpoint, load_data, load_vit, train_split
from hf_adc.privacy import (
    AlignedInversion,
    LearnedInversion,
    Observer,
    PayloadNoiseConfig,
    WhiteBoxInversion,
    cluster_guess,
    direction_guess,
    label_accuracy,
    norm_guess,
    payload_noise_epsilon,
    randomize_labels,
    randomized_response_epsilon,
    releases_per_example,
    soft_label_guess,
    split_guarantee,
    strongest_inversion,
    surrogate_views,
    to_unit_range,
)


@dataclass
class Preset:
    dataset: str
    classes: str | None
    auxiliary_rows: int
    train_rows: int
    test_rows: int
    batch_size: int
    split_layer: int
    learning_rate: float
    budget_epochs: float
    methods: tuple[str, ...]
    levels: tuple[float, ...]
    noise_multipliers: tuple[float, ...]
    attack_steps: int
    recorded_steps: int
    white_box_steps: int
    # The public checkpoint: the default one (Fashion-MNIST classes 0-4), or that preset of the accuracy sweep
    # pretrained on its other classes, with these rows and epochs (cached by its settings).
    pretraining: str | None = None
    pretrain_rows: int = 0
    pretrain_epochs: float = 0


PRESETS = {
    # Fashion-MNIST at 28 px, the default checkpoint (pretrained on classes 0-4), fine-tuned on 5-9.
    "quick": Preset(
        dataset="fashion_mnist",
        classes="5-9",
        auxiliary_rows=3000,
        train_rows=1000,
        test_rows=1000,
        batch_size=64,
        split_layer=2,
        # The client half must stay near the public checkpoint for the surrogate attack to apply: at 1e-3 (the fair
        # protocol's usual choice) the decoder fell below the mean image; 1e-4 measures the attack where it works.
        learning_rate=1e-4,
        budget_epochs=1,
        methods=("none", "adc", "adc_tokens", "topk", "bottlenet", "quantize", "adc+quantize8"),
        levels=(0.25, 0.1),
        noise_multipliers=(0.0, 0.01, 0.1),
        attack_steps=600,
        recorded_steps=4,
        white_box_steps=200,
    ),  # fmt: skip
    # For tests: give --dataset_name and --model_name_or_path (a tiny ViT and a small image folder).
    "tiny": Preset(
        dataset="",
        classes=None,
        auxiliary_rows=256,
        train_rows=96,
        test_rows=64,
        batch_size=16,
        split_layer=2,
        learning_rate=1e-4,
        budget_epochs=1,
        methods=("none", "adc"),
        levels=(0.25,),
        noise_multipliers=(0.1,),
        attack_steps=20,
        recorded_steps=2,
        white_box_steps=3,
    ),  # fmt: skip
}


# The preset's data settings a run may override (one output folder per data setting: records do not carry them).
DATA_FLAGS = ("classes", "train_rows", "auxiliary_rows", "test_rows", "batch_size")

# CIFAR-10 at 32 px on CPU (give --dataset_name ../shared/data/cifar10): the quick preset's cells at xi = 0.1, on the
# accuracy sweep's 6-layer ViT of width 96 pretrained more briefly (10,000 rows of classes 0-4, 3 epochs: minutes on 2
# cores), fine-tuned on 5-9.
PRESETS["cifar10"] = replace(
    PRESETS["quick"], dataset="", levels=(0.1,), noise_multipliers=(0.0, 0.1), pretraining="cifar10",
    pretrain_rows=10000, pretrain_epochs=3,
)  # fmt: skip


def record_key(record: dict) -> tuple:
    return (
        record["method"], record["level"], record["noise_multiplier"], record["topology"], record["frozen_client"],
        record.get("nopeek_weight", 0.0), record.get("label_dp_epsilon"), record.get("surrogate", "public"),
        record.get("learning_rate"),
    )  # fmt: skip


def record_name(record: dict) -> str:
    """A file name for a record's reconstructions."""
    extra = "-frozen" if record["frozen_client"] else ""
    extra += f"-nopeek{record['nopeek_weight']:g}" if record.get("nopeek_weight") else ""
    extra += "-trained-surrogate" if record.get("surrogate") == "trained" else ""
    extra += f"-lr{record['learning_rate']:g}"
    extra += f"-labeldp{record['label_dp_epsilon']:g}" if record.get("label_dp_epsilon") is not None else ""
    return f"{record['method']}-xi{record['level']}-sigma{record['noise_multiplier']}-{record['topology']}{extra}"


def tensors(dataset, transform) -> tuple[torch.Tensor, torch.Tensor]:
    rows = dataset.with_transform(transform)[:]
    return rows["pixel_values"], torch.as_tensor(rows["labels"])


def public_checkpoint(preset: Preset, dataset: str | None) -> str:
    """The checkpoint the client fine-tunes and the server holds: the preset's pretraining, or the default one."""
    if preset.pretraining is None:
        return default_checkpoint(use_cpu=True)
    pretraining = replace(
        SWEEP_PRESETS[preset.pretraining], pretrain_rows=preset.pretrain_rows, pretrain_epochs=preset.pretrain_epochs
    )
    return pretrained_checkpoint(pretraining, dataset, "cpu")


class PrivacySweep:
    """The data, the checkpoint and the server's surrogate for one preset; `run` measures one cell."""

    def __init__(self, preset: Preset, args: argparse.Namespace):
        self.preset, self.args = preset, args
        self.checkpoint = args.model_name_or_path or public_checkpoint(preset, args.dataset_name)
        data_args = DataArguments(
            dataset_name=args.dataset_name or preset.dataset, classes=preset.classes,
            max_train_samples=preset.auxiliary_rows + preset.train_rows, max_eval_samples=preset.test_rows,
        )  # fmt: skip
        self.dataset = load_data(data_args, seed=0)
        reference, processor = load_vit(ModelArguments(model_name_or_path=self.checkpoint), self.dataset)
        self.processor, self.num_labels = processor, reference.config.num_labels
        transform = ImageTransform(processor)
        rows = self.dataset["train"]
        self.auxiliary = tensors(rows.select(range(preset.auxiliary_rows)), transform)
        self.train = tensors(rows.select(range(preset.auxiliary_rows, len(rows))), transform)
        self.test = TensorRows(*tensors(self.dataset["test"], transform))
        self.surrogate = hf_adc.split_vit(reference, args.split_layer or preset.split_layer).client.eval()
        self.num_tokens = self.surrogate.embeddings.patch_embeddings.num_patches + 1
        with torch.no_grad():
            rows_norms = self.surrogate(self.auxiliary[0][:256]).last_hidden_state.flatten(1).norm(dim=1)
        self.clip_norm = args.clip_norm or float(rows_norms.median())
        self.learning_rate = args.learning_rate or preset.learning_rate

    def compression(self, method: str, level: float, noise: float):
        hidden = self.surrogate.config.hidden_size
        batch = self.preset.batch_size
        inner = None if method == "none" else config_for_ratio(method, level, self.num_tokens, hidden, batch, 0)
        return PayloadNoiseConfig(inner, clip_norm=self.clip_norm, noise_multiplier=noise) if noise else inner

    def true_labels(self, observations) -> torch.Tensor:
        """The true labels of the recorded steps' images (under label DP the split saw randomized ones), found by
        each image's pixels among the training rows."""
        index = {row.numpy().tobytes(): i for i, row in enumerate(self.train[0])}
        pixels = torch.cat([seen.pixel_values for seen in observations])
        return self.train[1][[index[row.numpy().tobytes()] for row in pixels]]

    def run(self, method: str, level: float, noise: float, nopeek_weight: float = 0.0,
            label_dp_epsilon: float | None = None) -> dict:  # fmt: skip
        preset, args = self.preset, self.args
        torch.manual_seed(0)
        model, _ = load_vit(ModelArguments(model_name_or_path=self.checkpoint), self.dataset)
        compression = self.compression(method, level, noise)
        split_layer = args.split_layer or preset.split_layer
        split = hf_adc.split_vit(model, split_layer, compression=compression, label_privacy=args.label_privacy)
        if args.freeze_client:
            split.client.requires_grad_(False)
        training_args = hf_adc.ADCTrainingArguments(
            output_dir=tempfile.mkdtemp(prefix="hf_adc_privacy_"), per_device_train_batch_size=preset.batch_size,
            per_device_eval_batch_size=256, learning_rate=self.learning_rate, budget_epochs=preset.budget_epochs,
            report_to="none", save_strategy="no", logging_steps=50, disable_tqdm=True, seed=0, use_cpu=True,
            dataloader_drop_last=method == "c3sl",
        )  # fmt: skip
        pixel_values, train_labels = self.train
        if label_dp_epsilon is not None:
            train_labels = randomize_labels(train_labels, self.num_labels, label_dp_epsilon, seed=0)
        with Observer(split, max_steps=preset.recorded_steps) as seen:
            _, results = train_split(
                split, training_args, TensorRows(pixel_values, train_labels), self.test,
                nopeek_weight=nopeek_weight or None,
            )  # fmt: skip
        observations = seen.observations

        # The public checkpoint's client half and the bridge's settings, or (--surrogate trained) the client half and
        # the bridge as the run left them (BottleNet++'s encoder included): what a federation's server holds.
        public = args.surrogate == "public"
        surrogate = self.surrogate if public else copy.deepcopy(split.client).eval()
        views, images = surrogate_views(
            surrogate, compression, *self.auxiliary, self.num_labels, preset.batch_size, seed=1,
            bridge=None if public else split.bridge,
        )  # fmt: skip
        learned = LearnedInversion.for_client(surrogate, seed=0)
        learned.fit(views, images, steps=preset.attack_steps)
        mean, std = self.processor.image_mean, self.processor.image_std
        pixel_range = (min((0 - m) / d for m, d in zip(mean, std, strict=True)),
                       max((1 - m) / d for m, d in zip(mean, std, strict=True)))  # fmt: skip
        auxiliary_mean = self.auxiliary[0].mean(0)
        attacks = {
            "learned": learned,
            "learned_aligned": AlignedInversion(learned, [seen.view for seen in observations]),
            "white_box": WhiteBoxInversion(surrogate, auxiliary_mean, pixel_range, compression,
                                           steps=preset.white_box_steps),
        }  # fmt: skip
        strongest, reports = strongest_inversion(attacks, observations, mean, std, auxiliary_mean)
        report = reports[strongest].summary()
        shown_originals, shown = self.shown_reconstructions(split, attacks[strongest])

        labels = self.true_labels(observations)
        if args.label_privacy:
            # One gradient per row the server sent down; each member of a merged row (ADC) gets its row's. Two known
            # labels per class; the attacks are scored on the other samples, and the strongest is reported.
            gradients = torch.cat([seen.head_gradients[seen.members] for seen in observations])
            known = torch.cat([torch.nonzero(labels == c)[:2, 0] for c in range(self.num_labels)])
            unknown = torch.ones(len(labels), dtype=torch.bool).index_fill_(0, known, False)
            label_reports = {
                name: label_accuracy(guess(gradients, known, labels[known], self.num_labels)[unknown], labels[unknown])
                for name, guess in (("direction", direction_guess), ("cluster", cluster_guess), ("norm", norm_guess))
            }  # fmt: skip
        else:
            guesses = torch.cat([soft_label_guess(seen.targets, seen.members) for seen in observations])
            label_reports = {"soft_label": label_accuracy(guesses, labels)}
        label_attack = max(label_reports, key=lambda name: label_reports[name]["accuracy"])
        labels_report = label_reports[label_attack]

        epsilon, reason = None, "no payload noise"
        if isinstance(compression, PayloadNoiseConfig):
            guarantee = split_guarantee(split)
            reason = guarantee.reason
            if guarantee.holds:
                # Every epoch counted whole (full batches only: an upper bound), and one release more for the batch
                # the pictures sent once more.
                steps_per_epoch = len(self.train[1]) // preset.batch_size
                releases = releases_per_example(results["steps"], steps_per_epoch) + 1
                epsilon = payload_noise_epsilon(noise, releases, args.delta)
        record = {
            "method": method, "level": level, "noise_multiplier": noise,
            "clip_norm": self.clip_norm if noise else None,
            "topology": "u-shaped" if args.label_privacy else "standard",
            "frozen_client": bool(args.freeze_client), "surrogate": args.surrogate, "nopeek_weight": nopeek_weight,
            "nopeek_distance_correlation": results.get("nopeek_distance_correlation"),
            "label_dp_epsilon": label_dp_epsilon,
            "label_epsilon": None if label_dp_epsilon is None else randomized_response_epsilon(
                label_dp_epsilon, self.num_labels),
            "attack": strongest, **report,
            "attacks": {name: {key: value for key, value in r.summary().items() if key in ("ssim_mean", "psnr_mean")}
                        for name, r in reports.items()},
            "label_attack": label_attack,
            "label_attacks": {name: report["accuracy"] for name, report in label_reports.items()},
            "label_attack_accuracy": labels_report["accuracy"],
            "label_majority_baseline": labels_report["majority_baseline"],
            "epsilon": epsilon, "delta": args.delta if epsilon is not None else None, "epsilon_reason": reason,
            "test_accuracy": results["test_accuracy"], "bytes": results["total_bytes"], "ratio": results["ratio"],
            "steps": results["steps"],
            "bytes_per_sample": results["total_bytes"] / (results["steps"] * preset.batch_size),
            "learning_rate": self.learning_rate,
        }  # fmt: skip
        folder = args.output_dir / "reconstructions"
        folder.mkdir(exist_ok=True)
        record["reconstructions"] = f"reconstructions/{record_name(record)}.npz"
        path = args.output_dir / record["reconstructions"]
        np.savez_compressed(path, originals=shown_originals, reconstructions=shown)
        return record

    @torch.no_grad()
    def shown_reconstructions(self, split, attack, count: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """The first training batch sent once more through the trained split (training mode: noise, merging), and the
        attack's reconstruction of its first `count` images (each image its row's), as uint8 pixels."""
        pixel_values, labels = (part[: self.preset.batch_size] for part in self.train)
        was_training = split.training
        split.train()
        try:
            with Observer(split, max_steps=1) as seen:
                split(pixel_values, labels=labels)
        finally:
            split.train(was_training)
        step = seen.observations[0]
        mean, std = self.processor.image_mean, self.processor.image_std
        rows = to_unit_range(attack.reconstruct(step.view), mean, std)[step.members[:count]]
        originals = to_unit_range(pixel_values[:count], mean, std)

        def as_uint8(images: torch.Tensor) -> np.ndarray:
            return (images * 255).round().to(torch.uint8).numpy()

        return as_uint8(originals), as_uint8(rows)


def label(record: dict) -> str:
    """A record's name on the pictures."""
    level = "" if record["method"] == "none" else f" xi={record['level']:g}"
    extra = (" U" if record["topology"] == "u-shaped" else "") + (" frozen" if record["frozen_client"] else "")
    return f"{record['method']}{level} s={record['noise_multiplier']:g}{extra}{defence(record, ' ')}"


def defence(record: dict, separator: str = "") -> str:
    """A record's settings beyond method and payload noise (NoPeek, the attack's surrogate, label DP), in a few
    characters."""
    parts = [f"nopeek {record['nopeek_weight']:g}"] if record.get("nopeek_weight") else []
    if record.get("surrogate") == "trained":
        parts.append("attack holds the trained client")
    if record.get("label_dp_epsilon") is not None:
        parts.append(f"label DP {record['label_dp_epsilon']:g}")
    return separator + ", ".join(parts) if parts else ("" if separator else "-")


def epsilon_cell(record: dict) -> str:
    """A record's epsilon, or why none is claimed, in a few words (label DP's, for the labels, after it)."""
    labels = "" if record.get("label_epsilon") is None else f"; labels {record['label_epsilon']:.3g} (delta 0)"
    return payload_epsilon_cell(record) + labels


def payload_epsilon_cell(record: dict) -> str:
    if record["epsilon"] is not None:
        return f"images {record['epsilon']:.3g} (delta {record['delta']:g})"
    reason = record["epsilon_reason"]
    if "k-means" in reason:
        return "none proven: k-means merges across samples"
    if "trains on the private data" in reason:
        return "none proven: the client half trains"
    return "no noise" if reason == "no payload noise" else f"none: {reason}"


def table(records: list[dict]) -> str:
    """The records as a Markdown table, in the order they were run."""
    lines = [
        "| method | xi | topology | client | sigma | other defence | bytes | bytes / sample | test acc "
        "| strongest attack | SSIM mean / p90 | best member | mean image SSIM | PSNR mean / p90 (dB) | mean image PSNR "
        "| label attack / majority | epsilon |",
        "|" + "---|" * 17,
    ]
    for r in records:
        labels = "-" if r["label_attack_accuracy"] is None else (
            f"{r['label_attack_accuracy']:.3f} / {r['label_majority_baseline']:.3f}"
        )  # fmt: skip
        lines.append(
            f"| {r['method']} | {r['level']:g} | {r['topology']} | {'frozen' if r['frozen_client'] else 'trains'} "
            f"| {r['noise_multiplier']:g} | {defence(r)} | {r['bytes']:,} | {r.get('bytes_per_sample', 0):,.0f} "
            f"| {r['test_accuracy']:.3f} | {r.get('attack', 'learned')} | {r['ssim_mean']:.3f} / {r['ssim_p90']:.3f} "
            f"| {r['ssim_best_member_mean']:.3f} | {r['baseline_ssim_mean']:.3f} "
            f"| {r['psnr_mean']:.2f} / {r['psnr_p90']:.2f} | {r['baseline_psnr_mean']:.2f} | {labels} "
            f"| {epsilon_cell(r)} |"
        )
    return "\n".join(lines) + "\n"


def plot(output_dir: Path) -> list[Path]:
    """Draws `privacy_frontier.png` and `reconstructions.png` from `privacy.jsonl` and `reconstructions/` in
    `output_dir`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    records = [json.loads(line) for line in (output_dir / "privacy.jsonl").read_text().splitlines()]
    if not records:
        return []
    written = [output_dir / "privacy_table.md"]
    written[0].write_text(table(records))
    markers = dict(zip(sorted({record["method"] for record in records}), "osD^vP*Xph<>", strict=False))
    figure, axes = plt.subplots(figsize=(8, 5.5))
    accuracies = [record["test_accuracy"] for record in records]
    for record in records:
        bytes_per_sample = record.get("bytes_per_sample") or record["bytes"] / max(record["steps"], 1)
        points = axes.scatter(
            bytes_per_sample, record["ssim_mean"], c=[record["test_accuracy"]], cmap="viridis",
            vmin=min(accuracies), vmax=max(accuracies), marker=markers[record["method"]], s=70, edgecolors="black",
            linewidths=0.5 + 2 * (record["noise_multiplier"] > 0),
        )  # fmt: skip
        axes.annotate(label(record), (bytes_per_sample, record["ssim_mean"]), fontsize=6, xytext=(4, 3),
                      textcoords="offset points")  # fmt: skip
    baseline = sum(record["baseline_ssim_mean"] for record in records) / len(records)
    axes.set_xscale("log")
    axes.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.axhline(baseline, color="grey", linestyle="--", linewidth=1)
    axes.annotate("attack baseline: the auxiliary mean image", (axes.get_xlim()[1], baseline), fontsize=7,
                  color="grey", xytext=(-4, -10), textcoords="offset points", ha="right")  # fmt: skip
    axes.set_xlabel("bytes sent per training sample (both ways, log)")
    axes.set_ylabel("inversion SSIM, mean over images (higher: more leaks)")
    axes.set_title("What the server reconstructs against what the client sends (thick edge: payload noise)")
    figure.colorbar(points, ax=axes, label="test accuracy")
    for method, marker in markers.items():
        axes.scatter([], [], marker=marker, color="white", edgecolors="black", label=method)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    written.append(output_dir / "privacy_frontier.png")
    figure.savefig(written[-1], dpi=110)
    plt.close(figure)

    shown = [record for record in records if (output_dir / record.get("reconstructions", "-")).exists()]
    if shown:
        grids = [np.load(output_dir / record["reconstructions"]) for record in shown]
        originals = grids[0]["originals"]
        columns = originals.shape[0]
        figure, axes = plt.subplots(len(shown) + 1, columns, figsize=(columns * 0.9 + 1.6, (len(shown) + 1) * 0.9),
                                    squeeze=False)  # fmt: skip
        rows = [("original", originals)] + [
            (f"{label(record)}\nSSIM {record['ssim_mean']:.2f}", grid["reconstructions"])
            for record, grid in zip(shown, grids, strict=True)
        ]
        for row, (name, images) in enumerate(rows):
            for column in range(columns):
                image = images[column].transpose(1, 2, 0)
                axes[row, column].imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray",
                                         vmin=0, vmax=255, interpolation="nearest")  # fmt: skip
                axes[row, column].set_xticks([])
                axes[row, column].set_yticks([])
            axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
        figure.tight_layout(pad=0.2)
        written.append(output_dir / "reconstructions.png")
        figure.savefig(written[-1], dpi=72)
        plt.close(figure)
    return written


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--model_name_or_path", help="The public checkpoint (default: the preset's).")
    parser.add_argument("--dataset_name", help="A Hub id or local folder (default: the preset's).")
    parser.add_argument("--split_layer", type=int, help="Default: the preset's.")
    parser.add_argument("--classes", help="Classes to fine-tune on: 5-9, 0,3,7 or 'all' (default: the preset's).")
    parser.add_argument("--train_rows", type=int, help="Rows the client trains on (default: the preset's).")
    parser.add_argument("--auxiliary_rows", type=int, help="Other rows the server holds (default: the preset's).")
    parser.add_argument("--test_rows", type=int, help="Test rows (default: the preset's).")
    parser.add_argument("--batch_size", type=int, help="Training batch (default: the preset's).")
    parser.add_argument("--methods", nargs="+", help="Methods as in config_for_ratio (none, adc, adc+quantize8, ...).")
    parser.add_argument("--levels", type=float, nargs="+", help="Compression levels xi.")
    parser.add_argument("--noise_multipliers", type=float, nargs="+", help="Payload noise sigma (0: no noise).")
    parser.add_argument("--clip_norm", type=float, help="Payload noise C (default: the public median row norm).")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--label_privacy", action="store_true", help="U-shaped split (labels stay on the client).")
    parser.add_argument(
        "--nopeek_weights",
        type=float,
        nargs="+",
        default=[0.0],
        help="NoPeek's distance-correlation weight on the client (0: none; several: one cell each).",
    )
    parser.add_argument(
        "--label_dp_epsilon",
        type=float,
        help="Standard split: randomized response on the training labels at this epsilon, once each.",
    )
    parser.add_argument(
        "--surrogate", choices=("public", "trained"), default="public",
        help="The server's copy of the client half: the public checkpoint's, or the trained one (a federation's).",
    )  # fmt: skip
    parser.add_argument("--freeze_client", action="store_true", help="Do not train the client half (for an epsilon).")
    parser.add_argument("--learning_rate", type=float, help="The client's fine-tuning rate (default: the preset's).")
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results/privacy"))
    parser.add_argument("--plot-only", action="store_true", help="Redraw the pictures from the folder; train nothing.")
    args = parser.parse_args(argv)
    if args.label_dp_epsilon is not None and args.label_privacy:
        parser.error("--label_dp_epsilon randomizes labels the server reads: with --label_privacy none crosses.")
    if args.label_dp_epsilon is not None and not (0 < args.label_dp_epsilon < float("inf")):
        parser.error(f"--label_dp_epsilon={args.label_dp_epsilon} is out of range: it must be a finite number > 0.")
    if any(not (0 <= weight < float("inf")) for weight in args.nopeek_weights):
        parser.error(f"--nopeek_weights={args.nopeek_weights} are out of range: each must be finite and >= 0.")
    if args.plot_only:
        print("\n".join(str(path) for path in plot(args.output_dir)))
        return [json.loads(line) for line in (args.output_dir / "privacy.jsonl").read_text().splitlines()]
    overrides = {name: getattr(args, name) for name in DATA_FLAGS if getattr(args, name) is not None}
    for name, value in overrides.items():
        if name != "classes" and value < (0 if name == "auxiliary_rows" else 1):
            parser.error(f"--{name}={value} is out of range: it must be an integer >= 1.")
    if overrides.get("classes") == "all":
        overrides["classes"] = None
    preset = replace(PRESETS[args.preset], **overrides)
    if preset.auxiliary_rows < preset.batch_size:
        parser.error(f"--auxiliary_rows={preset.auxiliary_rows} is out of range: the attack needs at least one batch "
                     f"of {preset.batch_size}.")  # fmt: skip
    if args.preset == "tiny" and not (args.dataset_name and args.model_name_or_path):
        parser.error("--preset tiny needs --dataset_name and --model_name_or_path.")
    if not (args.dataset_name or preset.dataset):
        parser.error(f"--preset {args.preset} needs --dataset_name (e.g. ../shared/data/cifar10).")
    transformers_logging.set_verbosity_error()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    records_file = args.output_dir / "privacy.jsonl"
    lines = records_file.read_text().splitlines() if records_file.exists() else []
    records = [json.loads(line) for line in lines]
    done = {record_key(record) for record in records}
    sweep = None
    topology = "u-shaped" if args.label_privacy else "standard"
    cells = [
        (method, level, noise, weight)
        for method in args.methods or preset.methods
        for level in ([1.0] if method == "none" else args.levels or preset.levels)
        for noise in args.noise_multipliers or preset.noise_multipliers
        for weight in args.nopeek_weights
    ]
    added = 0
    try:
        for method, level, noise, weight in tqdm(cells, desc="privacy cells", disable=len(cells) < 2):
            key = (method, level, noise, topology, bool(args.freeze_client), weight, args.label_dp_epsilon,
                   args.surrogate, args.learning_rate or preset.learning_rate)  # fmt: skip
            if key in done:
                continue
            sweep = sweep or PrivacySweep(preset, args)
            record = sweep.run(method, level, noise, weight, args.label_dp_epsilon)
            with records_file.open("a") as file:
                file.write(json.dumps(record) + "\n")
            records.append(record)
            done.add(key)
            added += 1
            print(
                f"{label(record)}: ssim {record['ssim_mean']:.3f} ({record['attack']}; mean image "
                f"{record['baseline_ssim_mean']:.3f}), psnr {record['psnr_mean']:.2f} dB, labels "
                f"{record['label_attack_accuracy']:.3f}, epsilon {record['epsilon']}, accuracy "
                f"{record['test_accuracy']:.3f}, {record['bytes']} bytes",
                flush=True,
            )
    finally:  # the pictures once, also for what an interrupted sweep finished
        if added:
            plot(args.output_dir)
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
