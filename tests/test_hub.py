"""Pushing both halves over real HTTP to a Hub served on 127.0.0.1, and loading them back by repo id."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ENV
from hub_server import LocalHub

import hf_adc
from hf_adc.data import image_processor_for

PUSH_AND_LOAD = """
import json, sys, torch
import hf_adc
from huggingface_hub import ModelCard
from transformers import AutoImageProcessor, AutoModel

split = hf_adc.SplitViTForImageClassification.from_pretrained(sys.argv[1])
processor = AutoImageProcessor.from_pretrained(sys.argv[1] + "/client")
split.push_to_hub("me/tiny-client", "me/tiny-server", image_processor=processor, dataset="digits")
report = {}
for role, repo_id in (("client", "me/tiny-client"), ("server", "me/tiny-server")):
    half = AutoModel.from_pretrained(repo_id)
    local = getattr(split, role)
    report[role] = {
        "class": type(half).__name__,
        "same_weights": all(torch.equal(half.state_dict()[k], v) for k, v in local.state_dict().items()),
        "same_config": half.config.to_dict() | {"_name_or_path": ""} == local.config.to_dict() | {"_name_or_path": ""},
        "card": ModelCard.load(repo_id).data.to_dict(),
    }
size = AutoImageProcessor.from_pretrained("me/tiny-client").size
report["processor_size"] = [size.height, size.width]
print(json.dumps(report, default=str))
"""


COMPOSED = hf_adc.ComposedConfig(hf_adc.ADCConfig(xi=0.4), hf_adc.QuantizationConfig(bits=8))


@pytest.mark.parametrize(("compression", "tag"), [(hf_adc.ADCConfig(xi=0.25), "adc"), (COMPOSED, "adc+quantize")])
def test_push_both_halves_and_load_them_back_by_repo_id(tiny_vit, batch, tmp_path, compression, tag):
    split = hf_adc.split_vit(tiny_vit, 2, compression=compression).train()
    split(*batch).loss.backward()
    split.client.config.communication = split.server.config.communication = {
        "uplink_bytes": split.ledger.uplink_bytes, "downlink_bytes": split.ledger.downlink_bytes,
        "uncompressed_bytes": split.ledger.uncompressed_bytes, "ratio": split.ledger.ratio, "test_accuracy": 0.5,
    }  # fmt: skip
    split.save_pretrained(tmp_path / "split")
    image_processor_for(tiny_vit.config).save_pretrained(tmp_path / "split" / "client")

    with LocalHub() as hub:
        environment = {
            **os.environ, **ENV, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_test_token", "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf_home"),
        }  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-c", PUSH_AND_LOAD, str(tmp_path / "split")],
            capture_output=True, text=True, env=environment, timeout=180,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert {"me/tiny-client", "me/tiny-server"} <= set(hub.repos)
        assert any(request.startswith("POST /api/models/me/tiny-client/commit/") for request in hub.requests_seen)
        assert "preprocessor_config.json" in hub.repos["me/tiny-client"]
        assert "split_config.json" in hub.repos["me/tiny-server"]

    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["client"]["class"] == "ViTClientModel" and report["server"]["class"] == "ViTServerModel"
    for role in ("client", "server"):
        assert report[role]["same_weights"] and report[role]["same_config"], role
        card = report[role]["card"]
        assert "split-learning" in card["tags"] and tag in card["tags"]
        assert card["datasets"] == ["digits"]
        assert card["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.5
    assert report["processor_size"] == [16, 16]


@pytest.mark.parametrize(("client_repo", "server_repo"), [("", "me/server"), ("me/client", None), ("me/x", "me/x")])
def test_pushing_without_two_repo_ids_raises_before_any_upload(tiny_vit, client_repo, server_repo):
    split = hf_adc.split_vit(tiny_vit, 2)
    with pytest.raises(ValueError, match="repo id|two repos"):
        split.push_to_hub(client_repo, server_repo)


def test_model_card_parses_and_carries_the_split(tiny_vit):
    from huggingface_hub import ModelCard

    from hf_adc.hub import model_card

    split = hf_adc.split_vit(tiny_vit, 3, compression=hf_adc.ADCConfig(xi=0.1))
    split.server.config.communication = {
        "uplink_bytes": 10**6, "downlink_bytes": 10**6, "uncompressed_bytes": 2 * 10**7, "ratio": 0.1,
        "test_accuracy": 0.9,
    }  # fmt: skip
    card = ModelCard(str(model_card(split.server, "server", "me/server", dataset="fashion_mnist")))
    assert card.data.eval_results[0].metric_value == 0.9
    assert "cut after encoder layer 3" in card.text
    assert "18.0 MB saved" in card.text
    assert {"split-learning", "split-server", "adc"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "image-classification"


def test_train_recipe_pushes_the_halves_from_the_main_process(tiny_vit_path, digits_dir, tmp_path):
    from helpers import ROOT, spawn, tiny_run_args, wait_output

    with LocalHub() as hub:
        args = tiny_run_args(tiny_vit_path, digits_dir, tmp_path / "run", "--push_to_hub", "--hub_model_id", "me/run")
        process = spawn(
            [sys.executable, str(ROOT / "recipes" / "train.py"), *args], HF_ENDPOINT=hub.endpoint,
            HF_TOKEN="hf_test_token", HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"),
        )  # fmt: skip
        log = wait_output(process, 300)
        assert process.returncode == 0, log[-3000:]
        assert {"me/run-client", "me/run-server"} == set(hub.repos)
        assert "README.md" in hub.repos["me/run-client"] and "model.safetensors" in hub.repos["me/run-server"]


def test_train_recipe_push_without_a_repo_id_fails_before_training(tiny_vit_path, digits_dir, tmp_path):
    from helpers import tiny_run_args

    from hf_adc.experiment import DataArguments, ModelArguments, SplitArguments, run_split_training

    parser_args = tiny_run_args(tiny_vit_path, digits_dir, tmp_path / "run", "--push_to_hub")
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ModelArguments, SplitArguments, DataArguments, hf_adc.ADCTrainingArguments))
    model_args, split_args, data_args, training_args = parser.parse_args_into_dataclasses(
        [*parser_args, "--report_to", "none"]
    )
    with pytest.raises(ValueError, match="--push_to_hub needs --hub_model_id"):
        run_split_training(model_args, split_args, data_args, training_args)
    assert not (tmp_path / "run").exists()
