"""One test per defect found under real training setups (bf16, several GPUs, custom data): each failed before
its fix."""

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
from conftest import NUM_LABELS, tiny_vit_config
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from helpers import make_args, tensor_dataset
from test_link import _Wiretap
from transformers import ViTForImageClassification

import hf_adc
from hf_adc.bridges import config_for_ratio
from hf_adc.bridges.packing import pack_bits, unpack_bits
from hf_adc.experiment import ModelArguments, load_vit
from hf_adc.training import classification_metrics

METHODS = [None, *(config_for_ratio(m, 0.25, 17, 32, 12) for m in ("adc", "topk", "randomtopk", "bottlenet", "c3sl"))]
METHODS.append(hf_adc.QuantizationConfig(bits=6))


def _name(config) -> str:
    return "none" if config is None else config.method


@pytest.mark.parametrize("wire_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("compression", METHODS, ids=_name)
def test_under_bf16_autocast_every_method_sends_the_wire_dtype_it_planned(tiny_vit, batch, compression, wire_dtype):
    pixel_values, labels = batch
    split = hf_adc.split_vit(tiny_vit, 2, compression=compression, wire_dtype=wire_dtype).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = split(pixel_values, labels=labels)
    output.loss.backward()
    assert split.wire_bytes(12) == (split.ledger.uplink_bytes, split.ledger.downlink_bytes)
    element = torch.finfo(getattr(torch, wire_dtype)).bits // 8
    assert split.ledger.uncompressed_downlink_bytes == 12 * 17 * 32 * element
    if compression is not None and compression.method == "adc":
        torch.testing.assert_close(output.targets.sum(dim=1), torch.ones(output.targets.shape[0]))


def test_adc_merges_in_float32_whatever_autocast_computes_in(tiny_vit, batch):
    pixel_values, labels = batch
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.ADCConfig(xi=0.25)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        client = split.client(pixel_values, output_cls_attention=True)
        message = split.bridge.encode(client.last_hidden_state, labels, client.cls_attention)
    assert message.hidden_states.dtype == torch.float32 and message.labels.dtype == torch.float32
    torch.testing.assert_close(message.labels.sum(dim=1), torch.ones(message.labels.shape[0]))


@pytest.mark.parametrize(
    "compression", [None, hf_adc.ADCConfig(xi=0.25), hf_adc.BottleNetConfig(ratio=0.25)], ids=_name
)
def test_a_budgeted_bf16_run_spends_its_budget(tiny_vit, tmp_path, compression):
    split = hf_adc.split_vit(tiny_vit, 2, compression=compression)
    args = make_args(tmp_path, bf16=True, budget_epochs=1.0)
    trainer = hf_adc.ADCTrainer(model=split, args=args, train_dataset=tensor_dataset(32))
    trainer.train()
    assert trainer.budget_exhausted
    assert trainer.budget_bytes - trainer.step_bytes < split.ledger.total_bytes <= trainer.budget_bytes
    step_ratio = sum(split.wire_bytes(8)) / sum(split.wire_bytes(8, compressed=False))
    assert split.ledger.ratio == pytest.approx(step_ratio)


def test_a_bad_wire_dtype_is_refused():
    with pytest.raises(ValueError, match=r"wire_dtype='int8' is not supported: choose one of float32, bfloat16"):
        hf_adc.Link(wire_dtype="int8")


def _checkpoint_with_classes(path, names) -> str:
    config = tiny_vit_config(num_labels=len(names), id2label=dict(enumerate(names)))
    ViTForImageClassification(config).save_pretrained(path)
    return str(path)


def _dataset_with_classes(names) -> DatasetDict:
    features = Features({"image": Image(), "label": ClassLabel(names=list(names))})
    rows = {"image": [np.zeros((16, 16), dtype=np.uint8)] * 2, "label": [0, 1]}
    split = Dataset.from_dict(rows, features=features)
    return DatasetDict({"train": split, "test": split})


def test_a_checkpoint_with_other_classes_gets_a_really_fresh_head(tmp_path):
    names = [f"old{i}" for i in range(NUM_LABELS)]
    checkpoint = _checkpoint_with_classes(tmp_path / "vit", names)
    saved = ViTForImageClassification.from_pretrained(checkpoint).classifier.weight
    torch.manual_seed(0)
    model_args = ModelArguments(model_name_or_path=checkpoint)
    fresh, _ = load_vit(model_args, _dataset_with_classes(["new0", "new1", *names[2:]]))
    kept, _ = load_vit(model_args, _dataset_with_classes(names))
    assert not torch.allclose(fresh.classifier.weight, saved)
    assert torch.count_nonzero(fresh.classifier.bias) == 0
    assert float(fresh.classifier.weight.detach().std()) == pytest.approx(0.02, rel=0.5)
    torch.testing.assert_close(kept.classifier.weight, saved)


def test_string_labels_are_encoded_once_over_all_splits_in_natural_order(tmp_path):
    features = Features({"image": Image(), "label": Value("string")})
    image = np.zeros((8, 8), dtype=np.uint8)
    train = Dataset.from_dict({"image": [image] * 4, "label": ["2", "10", "1", "2"]}, features=features)
    test = Dataset.from_dict({"image": [image] * 2, "label": ["10", "2"]}, features=features)
    DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "data"))
    dataset = hf_adc.load_image_dataset(str(tmp_path / "data"))
    names = ["1", "2", "10"]
    assert dataset["train"].features["label"].names == names == dataset["test"].features["label"].names
    decode = dataset["train"].features["label"].int2str
    assert sorted(decode(dataset["train"]["label"])) == sorted(["2", "10", "1", "2"])
    assert sorted(decode(dataset["test"]["label"])) == ["10", "2"]


@pytest.mark.parametrize("compression", [hf_adc.TopKConfig(rate=0.1), hf_adc.RandomTopKConfig(rate=0.1)], ids=_name)
def test_the_channel_noises_only_what_was_sent(tiny_vit, batch, compression):
    pixel_values, labels = batch
    torch.manual_seed(0)
    channel = hf_adc.ChannelConfig(snr_db=10.0)
    split = hf_adc.split_vit(tiny_vit, 2, compression=compression, channel=channel).train()
    sent = {}
    split.client.register_forward_hook(lambda module, args, out: sent.update(up=out.last_hidden_state))
    tap = _Wiretap(split)
    output = split(pixel_values, labels=labels)
    sent["up"].retain_grad()
    output.loss.backward()
    kept = split.bridge.kept(17 * 32)
    received = tap.received.detach().reshape(12, -1)
    assert (torch.count_nonzero(received, dim=1) == kept).all()
    assert (torch.count_nonzero(sent["up"].grad.reshape(12, -1), dim=1) == kept).all()
    positions = received != 0
    clean = sent["up"].detach().reshape(12, -1)[positions]
    noise = (received[positions] - clean).pow(2).mean()
    assert float(10 * torch.log10(clean.pow(2).mean() / noise)) == pytest.approx(10.0, abs=0.5)


def test_c3sl_trains_a_bf16_model(tiny_vit, batch):
    pixel_values, labels = batch
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.C3SLConfig(R=2)).to(torch.bfloat16).train()
    output = split(pixel_values, labels=labels)
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert split.client.embeddings.cls_token.grad is not None


def test_several_gpus_in_one_process_are_refused_with_the_launch_command(tiny_vit, tmp_path, monkeypatch):
    args = make_args(tmp_path)
    monkeypatch.setattr(type(args), "n_gpu", property(lambda self: 4))
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.ADCConfig(xi=0.25))
    with pytest.raises(ValueError, match=r"sees 4 GPUs.*accelerate launch --multi_gpu --num_processes 4"):
        hf_adc.ADCTrainer(model=split, args=args, train_dataset=tensor_dataset(16))


def test_a_ragged_last_batch_never_takes_the_run_over_its_budget(tiny_vit, tmp_path):
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.ADCConfig(xi=0.05))
    full, ragged = sum(split.wire_bytes(12)), sum(split.wire_bytes(11))
    assert ragged > full  # rounding of T and k: 11 samples send more than 12
    budget = full + ragged - 1
    args = make_args(tmp_path, per_device_train_batch_size=12, communication_budget=str(budget), max_steps=2)
    trainer = hf_adc.ADCTrainer(model=split, args=args, train_dataset=tensor_dataset(23))
    trainer.train()
    assert split.ledger.total_bytes == full <= budget
    assert trainer.budget_exhausted and trainer.state.global_step == 1


def test_activation_checkpointing_gives_the_same_gradients(tiny_vit_path, batch):
    pixel_values, labels = batch
    gradients = []
    for checkpointing in (False, True):
        vit = ViTForImageClassification.from_pretrained(tiny_vit_path)
        split = hf_adc.split_vit(vit, 2, compression=hf_adc.ADCConfig(xi=0.25)).train()
        if checkpointing:
            split.activation_checkpointing_enable()
        split(pixel_values, labels=labels).loss.backward()
        gradients.append([parameter.grad for parameter in split.parameters()])
    for plain, recomputed in zip(*gradients, strict=True):
        torch.testing.assert_close(plain, recomputed)


def test_trainer_runs_with_gradient_checkpointing_and_label_smoothing(tiny_vit, tmp_path):
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.ADCConfig(xi=0.25))
    args = make_args(tmp_path, max_steps=2, gradient_checkpointing=True, label_smoothing_factor=0.1)
    trainer = hf_adc.ADCTrainer(model=split, args=args, train_dataset=tensor_dataset(16))
    trainer.train()
    assert trainer.state.global_step == 2 and np.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_label_smoothing_smooths_the_soft_targets(tiny_vit, batch):
    pixel_values, labels = batch
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.ADCConfig(xi=0.25)).train()
    output = split(pixel_values, labels=labels, label_smoothing=0.2)
    hard = torch.nn.functional.one_hot(labels, NUM_LABELS).float()
    sizes = torch.bincount(output.cluster_ids).float()[:, None]
    merged = torch.zeros_like(output.targets).index_add_(0, output.cluster_ids, hard) / sizes
    torch.testing.assert_close(output.targets, 0.8 * merged + 0.2 / NUM_LABELS)
    expected = -(output.targets * output.logits.float().log_softmax(dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(output.loss, expected)
    with pytest.raises(ValueError, match=r"label_smoothing=1.0 is out of range: it must lie in \[0, 1\)"):
        split(pixel_values, labels=labels, label_smoothing=1.0)


def _pack_reference(codes: list[int], bits: int) -> bytes:
    stream = "".join(format(code, f"0{bits}b")[::-1] for code in codes)
    stream += "0" * (-len(stream) % 8)
    return bytes(int(stream[i : i + 8][::-1], 2) for i in range(0, len(stream), 8))


@pytest.mark.parametrize("bits", [1, 3, 7, 8, 11, 16, 31, 32])
@pytest.mark.parametrize("count", [1, 8, 13])
def test_bit_packing_matches_a_bit_by_bit_reference(bits, count):
    generator = torch.Generator().manual_seed(bits * 100 + count)
    codes = torch.randint(0, 2 ** min(bits, 62), (count,), generator=generator, dtype=torch.int64)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert bytes(packed.tolist()) == _pack_reference(codes.tolist(), bits)
    assert torch.equal(unpack_bits(packed, bits, count), codes)


def _hung_server() -> tuple[socket.socket, int]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    return server, server.getsockname()[1]


def _unreachable_hub_env(port: int, home) -> dict[str, str]:
    """An environment whose Hub endpoint never answers (online mode, an empty cache); hf_adc imports as here."""
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(home), "PATH": "/usr/bin:/bin"}
    return env | ({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {})


def _failure_against_a_hung_hub(tmp_path, call: str) -> tuple[float, str]:
    """How long `call` (run in a fresh interpreter, the Hub pointed at a server that never answers) takes to
    raise its ValueError, and the error's message."""
    server, port = _hung_server()
    script = textwrap.dedent(
        f"""
        import time, hf_adc
        start = time.perf_counter()
        try:
            {call}
        except ValueError as error:
            print(f"{{time.perf_counter() - start:.1f}}|{{error}}")
        """
    )
    env = _unreachable_hub_env(port, tmp_path)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    server.close()
    seconds, _, message = result.stdout.strip().partition("|")
    assert seconds and float(seconds) < 10 and time.perf_counter() - start < 30, result.stderr[-2000:]
    return float(seconds), message


def test_an_unreachable_hub_fails_within_seconds_with_one_clear_message(tmp_path):
    _, message = _failure_against_a_hung_hub(tmp_path, 'hf_adc.split_vit("nobody/some-vit", split_layer=1)')
    assert "did not answer within 5 s and the local cache does not hold it" in message


def test_an_unknown_dataset_with_an_unreachable_hub_fails_within_seconds_with_one_clear_message(tmp_path):
    _, message = _failure_against_a_hung_hub(tmp_path, 'hf_adc.load_image_dataset("nobody/some-dataset")')
    assert "Could not load dataset 'nobody/some-dataset'" in message
    assert "did not answer within 5 s and the local cache does not hold it" in message


def test_classification_metrics_come_from_the_shipped_evaluate_module():
    from transformers import EvalPrediction

    logits = np.array([[0.1, 0.9, 0, 0, 0, 0, 0], [0.9, 0.1, 0, 0, 0, 0, 0.5], [0, 0, 0, 0, 0, 0, 1.0]])
    labels = np.array([1, 6, 5])
    metrics = classification_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert metrics == {"accuracy": pytest.approx(1 / 3), "top5_accuracy": pytest.approx(2 / 3)}
    five = classification_metrics(EvalPrediction(predictions=logits[:, :5], label_ids=np.array([1, 0, 4])))
    assert five == {"accuracy": pytest.approx(2 / 3)}
