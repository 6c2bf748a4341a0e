"""What the server learns, per method: bytes, test accuracy, inversion SSIM / PSNR, label attack, and epsilon.

For each (method, level xi, noise multiplier) the client fine-tunes the checkpoint under a budget of uncompressed
epochs (the fair protocol's byte rule; one learning rate, no grid here) while an `Observer` records what the server
half received in the last training steps. The server then attacks as `hf_adc.privacy` describes: it passes its
auxiliary rows (carved from the training split, never trained on by the client) through the public checkpoint's
client half and the bridge, trains a decoder from that view to the images, and applies it to the recorded steps.

- `ssim_*` / `psnr_*`: the reconstruction of each training image of the recorded steps (a merged ADC row against
  each member; `*_best_member_mean` the best member per row), next to `baseline_*`, the auxiliary mean image.
- `label_attack_accuracy`: standard split, the server's guess from what crossed (class ids, or ADC's soft labels:
  each member guessed as its cluster's most frequent class); U-shaped (`--label_privacy`), head-gradient direction
  scoring with two known labels per class. `label_majority_baseline` beside it.
- `epsilon`: payload noise's (at `--delta`, `dp-accounting` PLD) where `payload_noise_guarantee` proves one: rows of
  one example and a frozen client half (`--freeze_client`); else null, with `epsilon_reason`.
- `clip_norm`: `--clip_norm`, or the median L2 norm of a row the public checkpoint sends for the auxiliary images
  (public information: no private data chooses it).

Every finished record is appended to `privacy.jsonl` in the output folder, so an interrupted sweep resumes:

    python benchmarks/privacy.py --preset quick --output-dir docs/results/privacy/quick
"""

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import logging as transformers_logging

import hf_adc
from hf_adc.bridges import config_for_ratio
from hf_adc.data import ImageTransform
from hf_adc.experiment import DataArguments, ModelArguments, default_checkpoint, load_data, load_vit, train_split
from hf_adc.privacy import (
    LearnedInversion,
    Observer,
    PayloadNoiseConfig,
    direction_guess,
    label_accuracy,
    payload_noise_epsilon,
    payload_noise_guarantee,
    releases_per_example,
    score_inversion,
    soft_label_guess,
    surrogate_views,
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
        learning_rate=1e-3,
        budget_epochs=1,
        methods=("none", "adc", "adc_tokens", "topk", "bottlenet", "quantize", "adc+quantize8"),
        levels=(0.25, 0.1),
        noise_multipliers=(0.0, 0.01, 0.1),
        attack_steps=600,
        recorded_steps=4,
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
    ),  # fmt: skip
}


def record_key(record: dict) -> tuple:
    return record["method"], record["level"], record["noise_multiplier"], record["topology"], record["frozen_client"]


def tensors(dataset, transform) -> tuple[torch.Tensor, torch.Tensor]:
    rows = dataset.with_transform(transform)[:]
    return rows["pixel_values"], torch.as_tensor(rows["labels"])


class RowsDataset(torch.utils.data.Dataset):
    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor):
        self.pixel_values, self.labels = pixel_values, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


class PrivacySweep:
    """The data, the checkpoint and the server's surrogate for one preset; `run` measures one cell."""

    def __init__(self, preset: Preset, args: argparse.Namespace):
        self.preset, self.args = preset, args
        self.checkpoint = args.model_name_or_path or default_checkpoint(use_cpu=True)
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
        self.test = RowsDataset(*tensors(self.dataset["test"], transform))
        self.surrogate = hf_adc.split_vit(reference, args.split_layer or preset.split_layer).client.eval()
        self.num_tokens = self.surrogate.embeddings.patch_embeddings.num_patches + 1
        with torch.no_grad():
            rows_norms = self.surrogate(self.auxiliary[0][:256]).last_hidden_state.flatten(1).norm(dim=1)
        self.clip_norm = args.clip_norm or float(rows_norms.median())

    def compression(self, method: str, level: float, noise: float):
        hidden = self.surrogate.config.hidden_size
        batch = self.preset.batch_size
        inner = None if method == "none" else config_for_ratio(method, level, self.num_tokens, hidden, batch, 0)
        return PayloadNoiseConfig(inner, clip_norm=self.clip_norm, noise_multiplier=noise) if noise else inner

    def run(self, method: str, level: float, noise: float) -> dict:
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
            per_device_eval_batch_size=256, learning_rate=preset.learning_rate, budget_epochs=preset.budget_epochs,
            report_to="none", save_strategy="no", logging_steps=50, disable_tqdm=True, seed=0, use_cpu=True,
            dataloader_drop_last=method == "c3sl",
        )  # fmt: skip
        with Observer(split, max_steps=preset.recorded_steps) as seen:
            _, results = train_split(split, training_args, RowsDataset(*self.train), self.test)
        observations = seen.observations

        views, images = surrogate_views(
            self.surrogate, compression, *self.auxiliary, self.num_labels, preset.batch_size, seed=1
        )
        attack = LearnedInversion.for_client(self.surrogate, seed=0)
        attack.fit(views, images, steps=preset.attack_steps)
        mean, std = self.processor.image_mean, self.processor.image_std
        report = score_inversion(attack, observations, mean, std, self.auxiliary[0].mean(0)).summary()

        labels = torch.cat([seen.labels for seen in observations])
        if args.label_privacy:
            gradients = torch.cat([seen.head_gradients for seen in observations])
            known = torch.cat([torch.nonzero(labels == c)[:2, 0] for c in range(self.num_labels)])
            guesses = direction_guess(gradients, known, labels[known], self.num_labels)
        else:
            guesses = torch.cat([soft_label_guess(seen.targets, seen.members) for seen in observations])
        labels_report = label_accuracy(guesses, labels)

        epsilon, reason = None, "no payload noise"
        if isinstance(compression, PayloadNoiseConfig):
            trained = [parameter.requires_grad for parameter in split.client.parameters()]
            client_trains = any(trained) or bool(split.bridge.client_modules)
            guarantee = payload_noise_guarantee(compression, client_trains)
            reason = guarantee.reason
            if guarantee.holds:
                steps_per_epoch = len(self.train[1]) // preset.batch_size
                releases = releases_per_example(results["steps"], steps_per_epoch)
                epsilon = payload_noise_epsilon(noise, releases, args.delta)
        return {
            "method": method, "level": level, "noise_multiplier": noise,
            "clip_norm": self.clip_norm if noise else None,
            "topology": "u-shaped" if args.label_privacy else "standard",
            "frozen_client": bool(args.freeze_client), **report,
            "label_attack_accuracy": labels_report["accuracy"],
            "label_majority_baseline": labels_report["majority_baseline"],
            "epsilon": epsilon, "delta": args.delta if epsilon is not None else None, "epsilon_reason": reason,
            "test_accuracy": results["test_accuracy"], "bytes": results["total_bytes"], "ratio": results["ratio"],
            "steps": results["steps"],
        }  # fmt: skip


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--model_name_or_path", help="The public checkpoint (default: the preset's).")
    parser.add_argument("--dataset_name", help="A Hub id or local folder (default: the preset's).")
    parser.add_argument("--split_layer", type=int, help="Default: the preset's.")
    parser.add_argument("--methods", nargs="+", help="Methods as in config_for_ratio (none, adc, adc+quantize8, ...).")
    parser.add_argument("--levels", type=float, nargs="+", help="Compression levels xi.")
    parser.add_argument("--noise_multipliers", type=float, nargs="+", help="Payload noise sigma (0: no noise).")
    parser.add_argument("--clip_norm", type=float, help="Payload noise C (default: the public median row norm).")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--label_privacy", action="store_true", help="U-shaped split (labels stay on the client).")
    parser.add_argument("--freeze_client", action="store_true", help="Do not train the client half (for an epsilon).")
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results/privacy"))
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.preset == "tiny" and not (args.dataset_name and args.model_name_or_path):
        parser.error("--preset tiny needs --dataset_name and --model_name_or_path.")
    transformers_logging.set_verbosity_error()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    records_file = args.output_dir / "privacy.jsonl"
    lines = records_file.read_text().splitlines() if records_file.exists() else []
    records = [json.loads(line) for line in lines]
    done = {record_key(record) for record in records}
    sweep = None
    topology = "u-shaped" if args.label_privacy else "standard"
    for method in args.methods or preset.methods:
        for level in [1.0] if method == "none" else args.levels or preset.levels:
            for noise in args.noise_multipliers or preset.noise_multipliers:
                key = (method, level, noise, topology, bool(args.freeze_client))
                if key in done:
                    continue
                sweep = sweep or PrivacySweep(preset, args)
                record = sweep.run(method, level, noise)
                with records_file.open("a") as file:
                    file.write(json.dumps(record) + "\n")
                records.append(record)
                done.add(key)
                print(
                    f"{method} xi={level} sigma={noise}: ssim {record['ssim_mean']:.3f} (mean image "
                    f"{record['baseline_ssim_mean']:.3f}), psnr {record['psnr_mean']:.2f} dB, labels "
                    f"{record['label_attack_accuracy']:.3f}, epsilon {record['epsilon']}, accuracy "
                    f"{record['test_accuracy']:.3f}, {record['bytes']} bytes",
                    flush=True,
                )
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
