"""The recipes through `accelerate launch` (one and two real processes), their outputs, and their errors."""

import json
import sys
import time

import pytest
import torch
from helpers import ROOT, launch, tiny_run_args
from transformers import AutoImageProcessor, AutoModel

import hf_adc
from hf_adc.data import ImageTransform

PER_SAMPLE_UNCOMPRESSED = 2 * 17 * 32 * 4 + 8


def test_train_recipe_runs_end_to_end_and_its_outputs_load_back(tiny_vit_path, digits_dir, tmp_path):
    output_dir = tmp_path / "run"
    done = launch("train.py", tiny_run_args(tiny_vit_path, digits_dir, output_dir, "--xi", "0.25"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "an uncompressed split would have sent" in done.stdout

    results = json.loads((output_dir / "results.json").read_text())
    for key in ("test_accuracy", "uplink_bytes", "downlink_bytes", "uncompressed_bytes", "ratio", "budget_bytes",
                "steps", "train_seconds", "args"):  # fmt: skip
        assert key in results, key
    assert results["budget_bytes"] == 128 * PER_SAMPLE_UNCOMPRESSED
    total = results["uplink_bytes"] + results["downlink_bytes"]
    assert total == results["total_bytes"] <= results["budget_bytes"]
    assert results["ratio"] == pytest.approx(total / results["uncompressed_bytes"])
    assert results["steps"] > 128 // 16  # ADC at ~0.25 trains several epochs on one epoch of bytes
    assert (output_dir / "accuracy_vs_bytes.png").stat().st_size > 0

    client = AutoModel.from_pretrained(output_dir / "client")
    server = AutoModel.from_pretrained(output_dir / "server")
    assert isinstance(client, hf_adc.ViTClientModel) and isinstance(server, hf_adc.ViTServerModel)
    assert client.config.compression["xi"] == 0.25
    assert client.config.communication["uplink_bytes"] == results["uplink_bytes"]
    processor = AutoImageProcessor.from_pretrained(output_dir / "client")
    test = hf_adc.load_image_dataset(digits_dir, classes=[0, 1, 2, 3, 4], max_test_samples=64, seed=42)["test"]
    batch = ImageTransform(processor)(test[:])
    with torch.no_grad():
        logits = server(client(batch["pixel_values"]).last_hidden_state).logits
    accuracy = (logits.argmax(-1) == torch.tensor(batch["labels"])).float().mean().item()
    assert accuracy == pytest.approx(results["test_accuracy"])


def test_two_processes_split_the_data_and_sum_their_bytes(tiny_vit_path, digits_dir, tmp_path):
    output_dir = tmp_path / "ddp"
    args = tiny_run_args(tiny_vit_path, digits_dir, output_dir, "--compression", "none", "--num_train_epochs", "1")
    done = launch("train.py", args, config="cpu_2proc.yaml")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((output_dir / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["steps"] == 128 // (16 * 2)  # each rank saw half of the 128 rows
    assert results["uplink_bytes"] == results["uncompressed_bytes"] - results["downlink_bytes"]
    assert results["uplink_bytes"] + results["downlink_bytes"] == 128 * PER_SAMPLE_UNCOMPRESSED  # both ranks summed


def test_pretrain_recipe_saves_a_checkpoint_the_train_recipe_can_start_from(digits_dir, tmp_path):
    done = launch(
        "pretrain.py",
        ["--dataset_name", digits_dir, "--classes", "5-9", "--max_train_samples", "64", "--max_eval_samples", "32",
         "--num_train_epochs", "1", "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2",
         "--image_size", "16", "--output_dir", str(tmp_path / "pretrained"), "--disable_tqdm", "true"],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    model = AutoModel.from_pretrained(tmp_path / "pretrained")
    assert model.config.id2label == {0: "5", 1: "6", 2: "7", 3: "8", 4: "9"}
    assert (tmp_path / "pretrained" / "preprocessor_config.json").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--compression", "zip"], "compression='zip' is unknown: choose one of"),
        (["--split_layer", "9"], "split_layer=9 is out of range"),
        (["--budget_epochs", "0"], "budget_epochs=0.0 is out of range"),
        (["--communication_budget", "0"], "communication_budget='0' is out of range"),
        (["--compression", "none", "--xi", "0.1"], "xi do not apply to --compression none"),
        (["--compression", "topk", "--bits", "4"], "bits do not apply to --compression topk"),
        (["--channel", "awgn"], "--channel awgn needs --snr_db"),
        (["--distributed", "--num_clients", "2", "--resume_from_checkpoint", "/elsewhere/checkpoint-2"],
         "give the server's checkpoint-N in --output_dir"),
    ],
)
def test_bad_recipe_arguments_fail_before_training(tiny_vit_path, digits_dir, tmp_path, extra, message):
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import train
    finally:
        sys.path.pop(0)
    with pytest.raises(ValueError, match=message):
        train.main(tiny_run_args(tiny_vit_path, digits_dir, tmp_path / "bad", *extra))
    assert not (tmp_path / "bad" / "results.json").exists()


def test_unknown_dataset_or_model_offline_fails_within_seconds(tiny_vit_path, digits_dir, tmp_path):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="Could not load dataset 'nobody/no-such-dataset'"):
        hf_adc.load_image_dataset("nobody/no-such-dataset")
    from hf_adc.experiment import ModelArguments, load_vit

    dataset = hf_adc.load_image_dataset(digits_dir, max_train_samples=8, max_test_samples=8)
    with pytest.raises(ValueError, match="Could not load model 'nobody/no-such-model'"):
        load_vit(ModelArguments(model_name_or_path="nobody/no-such-model"), dataset)
    assert time.perf_counter() - start < 10
