"""The U-shaped split (`label_privacy=True`): the same training as the standard split, every byte of both cuts
charged under its own name, no label-derived tensor crossing, and its three parts saved, loaded, merged and pushed."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import NUM_LABELS
from helpers import ENV, make_args, tensor_dataset
from hub_server import LocalHub
from transformers import AutoModel, ViTForImageClassification

import hf_adc
from hf_adc.bridges import config_for_ratio

METHODS = {
    "none": None,
    "adc": hf_adc.ADCConfig(xi=0.25),
    "bottlenet": hf_adc.BottleNetConfig(ratio=0.5),
    "c3sl": hf_adc.C3SLConfig(R=2),
    "adc+quantize8": config_for_ratio("adc+quantize8", 0.1, num_tokens=17, hidden_size=32, batch_size=12),
    "topk": hf_adc.TopKConfig(rate=0.2),
    "quantize": hf_adc.QuantizationConfig(bits=8),
}


def _splits(vit, compression, head_layers=0):
    """A standard split and a U-shaped one of two copies of `vit`, with the same bridge weights."""
    standard = hf_adc.split_vit(copy.deepcopy(vit), 2, compression=compression).train()
    ushaped = hf_adc.split_vit(
        copy.deepcopy(vit), 2, compression=compression, label_privacy=True, head_layers=head_layers
    ).train()
    ushaped.bridge.load_state_dict(standard.bridge.state_dict())
    return standard, ushaped


def _gradients(split) -> list[torch.Tensor]:
    """Every parameter's gradient in the order of the unsplit model (embeddings, layers, layernorm, classifier),
    then the bridge's: the two topologies hold the same parameters in different parts."""
    ushaped = isinstance(split, hf_adc.USplitViTForImageClassification)
    top = split.head if ushaped else split.server
    layers = [*split.client.layers, *split.server.layers, *(split.head.layers if ushaped else [])]
    modules = [split.client.embeddings, *layers, top.layernorm, top.classifier, split.bridge]
    gradients = [parameter.grad for module in modules for parameter in module.parameters()]
    assert len(gradients) == len(list(split.parameters())) and all(grad is not None for grad in gradients)
    return gradients


# Every method with the CLS row returned; head layers on the client with the uncompressed split, ADC and C3-SL.
CASES = [(method, 0) for method in METHODS] + [(method, 1) for method in ("none", "adc", "c3sl")]


@pytest.mark.parametrize(("method", "head_layers"), CASES)
def test_ushaped_split_trains_exactly_as_the_standard_split(tiny_vit, batch, method, head_layers):
    pixel_values, labels = batch
    standard, ushaped = _splits(tiny_vit, METHODS[method], head_layers)
    expected = standard(pixel_values, labels=labels)
    expected.loss.backward()
    output = ushaped(pixel_values, labels=labels)
    output.loss.backward()

    torch.testing.assert_close(output.loss, expected.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(output.logits, expected.logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(output.targets, expected.targets)
    for expected_grad, grad in zip(_gradients(standard), _gradients(ushaped), strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)
    assert "labels" not in output.communication.uplink and "labels" in expected.communication.uplink


def test_evaluation_is_uncompressed_free_and_its_logits_are_computed_on_the_client(tiny_vit, batch):
    pixel_values, labels = batch
    expected = copy.deepcopy(tiny_vit).eval()(pixel_values=pixel_values, labels=labels)
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.ADCConfig(xi=0.1), label_privacy=True).eval()
    with torch.no_grad():
        output = split(pixel_values, labels=labels)
    torch.testing.assert_close(output.logits, expected.logits)
    torch.testing.assert_close(output.loss, expected.loss)
    assert split.ledger.total_bytes == 0
    assert split.head.classifier is tiny_vit.classifier and not hasattr(split.server, "classifier")

    payload = split.client_payload(pixel_values)
    features = split.server_features(payload)
    assert features.shape == (12, 1, 32)
    torch.testing.assert_close(split.client_logits(features), expected.logits)
    assert split.link.inference_ledger.downlink_bytes == 12 * 32 * 4 and split.ledger.total_bytes == 0


def _crossings(split, pixel_values, labels) -> tuple[list, list]:
    """Every tensor the link sends in one training step, (name, tensor) in order: forward ones, backward ones."""
    sent, send = [], split.link.send

    def recording(wire):
        arrived = send(wire)
        sent.extend((name, tensor.detach().clone()) for name, tensor in arrived.items())
        return arrived

    split.link.send = recording
    output = split(pixel_values, labels=labels)
    forward = list(sent)
    output.loss.backward()
    return forward, sent[len(forward) :]


@pytest.mark.parametrize("method", ["none", "adc", "c3sl", "adc+quantize8", "bottlenet"])
def test_no_tensor_that_crosses_in_forward_depends_on_the_labels(tiny_vit, batch, method):
    pixel_values, labels = batch
    other_labels = (labels + 1 + torch.arange(12) % (NUM_LABELS - 1)) % NUM_LABELS
    assert (other_labels != labels).all()
    torch.manual_seed(0)
    split = hf_adc.split_vit(tiny_vit, 2, compression=METHODS[method], label_privacy=True).train()
    twin = copy.deepcopy(split)  # the same weights, the same bridge seed and call count
    forward, backward = _crossings(split, pixel_values, labels)
    other_forward, other_backward = _crossings(twin, pixel_values, other_labels)

    names = [name for name, _ in forward + backward]
    assert "labels" not in names and not any("label" in name for name in names)
    assert [name for name, _ in forward][-1] == "head_activations"
    assert [name for name, _ in backward][0] == "head_gradients"
    assert [name for name, _ in forward] == [name for name, _ in other_forward]
    for (name, tensor), (_, other) in zip(forward, other_forward, strict=True):
        assert torch.equal(tensor, other), f"{name} changed with the labels alone"
    # The test can see a dependence: the gradients do change with the labels (they are computed from them).
    assert not torch.equal(backward[0][1], other_backward[0][1])


def test_ledger_names_and_bytes_checked_by_hand_for_adc(tiny_vit, batch):
    # ADC at xi = 0.25 on 12 samples of 17 tokens x 32: T = 6 clusters of k = round(0.25 * 12 * 17 / 6) = 8 tokens.
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.ADCConfig(xi=0.25), label_privacy=True).train()
    output = split(*batch)
    output.loss.backward()
    record = output.communication
    assert record.uplink == {"activations": 6 * 8 * 32 * 4, "head_gradients": 6 * 32 * 4}  # 6144 + 768
    assert record.downlink == {"head_activations": 6 * 32 * 4, "gradients": 6 * 8 * 32 * 4}
    # The uncompressed U-shaped split: 12 x 17 x 32 float32 each way at the first cut, 12 CLS rows at the second.
    uncompressed = 12 * 17 * 32 * 4 + 12 * 32 * 4
    assert record.uncompressed_uplink_bytes == record.uncompressed_downlink_bytes == uncompressed == 27648
    ledger = split.ledger
    assert (ledger.uplink_bytes, ledger.downlink_bytes) == (6912, 6912) == split.wire_bytes(12)
    assert (ledger.uncompressed_uplink_bytes, ledger.uncompressed_downlink_bytes) == (27648, 27648)
    assert ledger.ratio == record.achieved_ratio == 0.25
    assert split.wire_bytes(1, compressed=False) == (17 * 32 * 4 + 32 * 4,) * 2


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_charges_what_it_planned(tiny_vit, batch, method):
    split = hf_adc.split_vit(tiny_vit, 2, compression=METHODS[method], label_privacy=True).train()
    split(*batch).loss.backward()
    assert split.wire_bytes(12) == (split.ledger.uplink_bytes, split.ledger.downlink_bytes)


def test_saved_parts_load_alone_and_merge_back_into_the_unsplit_model(tiny_vit, batch, tmp_path):
    pixel_values, labels = batch
    split = hf_adc.split_vit(
        tiny_vit, 1, compression=hf_adc.ADCConfig(xi=0.25), label_privacy=True, head_layers=1
    ).train()
    optimizer = torch.optim.AdamW(split.parameters(), lr=1e-2)
    split(pixel_values, labels=labels).loss.backward()
    optimizer.step()
    split.eval()
    with torch.no_grad():
        expected = tiny_vit.eval()(pixel_values=pixel_values).logits  # the split shares (and trained) its modules
        torch.testing.assert_close(split(pixel_values).logits, expected)
    split.save_pretrained(tmp_path)

    settings = json.loads((tmp_path / "split_config.json").read_text())
    assert settings["topology"] == "u-shaped" and settings["head_layers"] == 1
    parts = {name: AutoModel.from_pretrained(tmp_path / name) for name in ("client", "server", "head")}
    classes = [hf_adc.ViTBottomModel, hf_adc.ViTMiddleModel, hf_adc.ViTHeadModel]
    assert [type(part) for part in parts.values()] == classes
    assert [len(part.layers) for part in parts.values()] == [1, 2, 1]
    for part in parts.values():
        assert (part.config.split_layer, part.config.head_layers) == (1, 1)
        assert part.config.compression["method"] == "adc"

    reloaded = hf_adc.SplitViTForImageClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded) is hf_adc.USplitViTForImageClassification
    merged = hf_adc.merge_ushaped(reloaded.client, reloaded.server, reloaded.head)
    assert type(merged) is ViTForImageClassification
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, expected)
        torch.testing.assert_close(merged(pixel_values=pixel_values).logits, expected)


def test_unsupported_settings_are_refused_naming_the_value(tiny_vit, batch, tmp_path):
    with pytest.raises(ValueError, match=r"head_layers=3 is out of range.*0 \.\. 1 layers"):
        hf_adc.split_vit(tiny_vit, 2, label_privacy=True, head_layers=3)
    with pytest.raises(ValueError, match="head_layers=1 keeps layers in a client-side head.*label_privacy=True"):
        hf_adc.split_vit(tiny_vit, 2, head_layers=1)
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.BottleNetConfig(ratio=0.5), label_privacy=True)
    with pytest.raises(TypeError, match="server holds no classifier.*client_logits"):
        split.server_logits(split.client_payload(batch[0]))
    with pytest.raises(ValueError, match="BottleNet\\+\\+ split has a learned bottleneck"):
        hf_adc.merge_ushaped(split.client, split.server, split.head)
    with pytest.raises(TypeError, match="head must be a ViTHeadModel; got ViTMiddleModel"):
        hf_adc.merge_ushaped(split.client, split.server, split.server)
    hf_adc.split_vit(tiny_vit, 2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="topology 'standard'"):
        hf_adc.USplitViTForImageClassification.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a 'vit_adc_client' checkpoint, not a 'vit_adc_bottom' one"):
        hf_adc.ViTBottomModel.from_pretrained(tmp_path / "client")


def test_adc_trainer_trains_the_ushaped_split_within_a_budget_of_both_cuts(tiny_vit, tmp_path):
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.ADCConfig(xi=0.25), label_privacy=True)
    step_bytes = sum(split.wire_bytes(8))
    assert step_bytes == 2 * (4 * 8 * 32 * 4 + 4 * 32 * 4)  # T = 4 clusters, k = round(8.5) = 8 tokens
    args = make_args(tmp_path, communication_budget=str(int(3.5 * step_bytes)), eval_strategy="no")
    trainer = hf_adc.ADCTrainer(
        model=split, args=args, train_dataset=tensor_dataset(64), eval_dataset=tensor_dataset(16, seed=1)
    )
    before = split.head.classifier.weight.detach().clone()
    trainer.train()
    assert trainer.state.global_step == 3 and trainer.budget_exhausted
    assert split.ledger.total_bytes == 3 * step_bytes
    assert not torch.equal(before, split.head.classifier.weight)
    metrics = trainer.evaluate()
    assert 0 <= metrics["eval_accuracy"] <= 1 and split.ledger.total_bytes == 3 * step_bytes


PUSH_AND_LOAD = """
import json, sys, torch
import hf_adc
from transformers import AutoModel

split = hf_adc.SplitViTForImageClassification.from_pretrained(sys.argv[1])
split.push_to_hub("me/u-client", "me/u-server", "me/u-head", dataset="digits", private=True)
report = {}
for role in ("client", "server", "head"):
    part = AutoModel.from_pretrained(f"me/u-{role}")
    local = split.parts()[role]
    same = all(torch.equal(part.state_dict()[k], v) for k, v in local.state_dict().items())
    report[role] = [type(part).__name__, same]
print(json.dumps(report))
"""


def test_push_sends_each_part_to_its_own_repo_and_loads_back(tiny_vit, tmp_path):
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.ADCConfig(xi=0.25), label_privacy=True)
    split.save_pretrained(tmp_path / "split")
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
        assert {"me/u-client", "me/u-server", "me/u-head"} <= set(hub.repos)
        card = hub.repos["me/u-head"]["README.md"].decode()
    assert "u-shaped-split" in card and "labels and the loss never leave it" in card
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {
        "client": ["ViTBottomModel", True], "server": ["ViTMiddleModel", True], "head": ["ViTHeadModel", True]
    }  # fmt: skip


@pytest.mark.parametrize("head_layers", [0, 1])
def test_activation_checkpointing_keeps_the_gradients(tiny_vit, batch, head_layers):
    pixel_values, labels = batch
    plain, checkpointed = (
        hf_adc.split_vit(copy.deepcopy(tiny_vit), 1, label_privacy=True, head_layers=head_layers).train()
        for _ in range(2)
    )
    checkpointed.activation_checkpointing_enable()
    for split in (plain, checkpointed):
        split(pixel_values, labels=labels).loss.backward()
    for expected, grad in zip(_gradients(plain), _gradients(checkpointed), strict=True):
        torch.testing.assert_close(grad, expected)
    checkpointed.activation_checkpointing_disable()


@pytest.mark.parametrize(("label_privacy", "num_clients"), [(False, 2), (True, None)])
def test_sharing_heads_outside_a_u_shaped_federation_is_refused_naming_both(label_privacy, num_clients):
    from hf_adc.distributed.arguments import FederationArguments
    from hf_adc.distributed.launch import _check_share_head

    arguments = FederationArguments(num_clients=num_clients, share_head=True)
    with pytest.raises(ValueError, match=f"label_privacy={label_privacy}, num_clients={num_clients}"):
        _check_share_head(label_privacy, arguments)
