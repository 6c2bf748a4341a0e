"""ADCTrainer: budget stop, resume, gradient accumulation, and the arguments' errors."""

import copy
import json

import pytest
import torch
from helpers import make_args, tensor_dataset
from transformers import ViTForImageClassification

import hf_adc
from hf_adc.training import parse_size

PER_SAMPLE_UNCOMPRESSED = 2 * 17 * 32 * 4 + 8  # activations up and down at 17 tokens x 32 wide, plus an int64 label


def test_budget_stops_before_it_is_exceeded_and_reports_what_was_spent(tiny_vit, tmp_path):
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.ADCConfig(xi=0.25))
    step_bytes = sum(split.wire_bytes(8))
    args = make_args(tmp_path, communication_budget=str(int(3.5 * step_bytes)))
    trainer = hf_adc.ADCTrainer(model=split, args=args, train_dataset=tensor_dataset(64))
    trainer.train()
    spent = split.ledger.total_bytes
    assert trainer.state.global_step == 3
    assert trainer.budget_exhausted
    assert spent == 3 * step_bytes <= trainer.budget_bytes < spent + step_bytes
    logged = [entry for entry in trainer.state.log_history if "total_bytes" in entry][-1]
    assert logged["total_bytes"] == spent
    assert logged["budget_spent"] == pytest.approx(spent / trainer.budget_bytes)


def test_budget_epochs_counts_uncompressed_epochs_and_runs_past_the_epoch_cap(tiny_vit, tmp_path):
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.ADCConfig(xi=0.25))
    args = make_args(tmp_path, budget_epochs=1.0, num_train_epochs=1)
    trainer = hf_adc.ADCTrainer(model=split, args=args, train_dataset=tensor_dataset(32))
    assert trainer.budget_bytes == 32 * PER_SAMPLE_UNCOMPRESSED
    trainer.train()
    assert trainer.state.global_step > 4  # one epoch is 4 steps; ADC at ~0.25 fits about four times as many
    assert trainer.budget_bytes - trainer.step_bytes < split.ledger.total_bytes <= trainer.budget_bytes


def test_budget_smaller_than_one_step_is_an_error_before_training(tiny_vit, tmp_path):
    split = hf_adc.split_vit(tiny_vit, 2)
    with pytest.raises(ValueError, match=r"budget of 1000 bytes is smaller than one training step \(34880 bytes"):
        hf_adc.ADCTrainer(
            model=split, args=make_args(tmp_path, communication_budget="1KB"), train_dataset=tensor_dataset(16)
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"communication_budget": "0"}, r"communication_budget='0' is out of range: it must be > 0"),
        ({"budget_epochs": 0.0}, r"budget_epochs=0.0 is out of range: it must be > 0"),
        ({"communication_budget": "12 parsecs"}, r"communication_budget='12 parsecs' is not a size"),
        ({"communication_budget": "1GB", "budget_epochs": 1.0}, r"not both"),
    ],
)
def test_bad_budgets_raise(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **kwargs)


@pytest.mark.parametrize(
    ("size", "expected"), [("750MB", 750 * 10**6), ("2GiB", 2 * 2**30), ("1.5e3", 1500), ("64 kib", 65536)]
)
def test_parse_size_reads_human_sizes(size, expected):
    assert parse_size(size) == expected


def test_trainer_rejects_a_model_that_is_not_split(tiny_vit, tmp_path):
    with pytest.raises(TypeError, match="SplitViTForImageClassification.*got ViTForImageClassification"):
        hf_adc.ADCTrainer(model=tiny_vit, args=make_args(tmp_path))


def _train_to_the_end(vit, output_dir, resume_from=None, stop_at=None):
    split = hf_adc.split_vit(vit, 2, compression=hf_adc.ADCConfig(xi=0.25, seed=3))
    args = make_args(output_dir, budget_epochs=0.6, save_strategy="steps", save_steps=3)
    trainer = hf_adc.ADCTrainer(model=split, args=args, train_dataset=tensor_dataset(48))
    if stop_at is not None:

        class Interrupt(hf_adc.training.trainer.TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                control.should_training_stop = state.global_step >= stop_at

        trainer.add_callback(Interrupt())
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


def test_resume_continues_exactly_where_training_stopped(tiny_vit_path, tmp_path):
    reference = _train_to_the_end(ViTForImageClassification.from_pretrained(tiny_vit_path), tmp_path / "straight")
    assert reference.state.global_step > 6

    interrupted = _train_to_the_end(
        ViTForImageClassification.from_pretrained(tiny_vit_path), tmp_path / "interrupted", stop_at=3
    )
    assert interrupted.state.global_step == 3
    checkpoint = tmp_path / "interrupted" / "checkpoint-3"
    saved = json.loads((checkpoint / "ledger.json").read_text())["ledger"]
    assert saved["total_bytes"] == interrupted.model.ledger.total_bytes

    resumed = _train_to_the_end(
        ViTForImageClassification.from_pretrained(tiny_vit_path), tmp_path / "resumed", resume_from=str(checkpoint)
    )
    assert resumed.state.global_step == reference.state.global_step
    assert resumed.model.ledger.state_dict() == reference.model.ledger.state_dict()
    assert int(resumed.model.bridge.calls) == int(reference.model.bridge.calls)
    for (name, expected), actual in zip(
        reference.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(actual, expected, msg=name)
    expected_state = reference.optimizer.state_dict()["state"]
    for key, state in resumed.optimizer.state_dict()["state"].items():
        torch.testing.assert_close(state["exp_avg"], expected_state[key]["exp_avg"])


def test_gradient_accumulation_keeps_the_loss_scale(tiny_vit, tmp_path):
    weights = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        split = hf_adc.split_vit(copy.deepcopy(tiny_vit), 2)
        args = make_args(
            tmp_path / f"{batch_size}x{accumulation}",
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=0.5,
            lr_scheduler_type="constant",
        )
        trainer = hf_adc.ADCTrainer(model=split, args=args, train_dataset=tensor_dataset(8))
        trainer.train()
        weights.append({name: p.detach().clone() for name, p in split.named_parameters()})
        logged_loss = trainer.state.log_history[0]["loss"]
        assert 1.0 < logged_loss < 2.5  # cross-entropy of 5 classes near log(5), not doubled
    moved = [name for name in weights[0] if not torch.equal(weights[0][name], tiny_vit.state_dict()[_vit_name(name)])]
    assert moved
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], atol=1e-6, rtol=1e-5, msg=name)


def _vit_name(split_name: str) -> str:
    """The unsplit model's name for a split model's parameter (checks that training moved the weights)."""
    part, rest = split_name.split(".", 1)
    if part == "client":
        return "vit." + rest
    if rest.startswith("layers."):
        index, tail = rest.removeprefix("layers.").split(".", 1)
        return f"vit.layers.{int(index) + 2}.{tail}"
    return rest if rest.startswith("classifier") else "vit." + rest


def test_evaluation_is_uncompressed_and_free(tiny_vit, tmp_path):
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.ADCConfig(xi=0.1))
    trainer = hf_adc.ADCTrainer(model=split, args=make_args(tmp_path), eval_dataset=tensor_dataset(20, seed=4))
    metrics = trainer.evaluate()
    split.eval()
    data = tensor_dataset(20, seed=4)[:]
    with torch.no_grad():
        expected = (split(data["pixel_values"]).logits.argmax(-1) == data["labels"]).float().mean()
    assert metrics["eval_accuracy"] == pytest.approx(float(expected))
    assert "eval_top5_accuracy" not in metrics
    assert split.ledger.total_bytes == 0


@pytest.mark.parametrize("label_privacy", [False, True])
def test_pipelining_a_link_that_cannot_pipeline_is_refused_before_training(tiny_vit, tmp_path, label_privacy):
    from hf_adc.distributed.client import RemoteLink, remote_model

    split = hf_adc.split_vit(tiny_vit, 2, label_privacy=label_privacy)
    args = make_args(tmp_path, pipeline_micro_batches=True, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match=r"link \(Link\) cannot"):
        hf_adc.ADCTrainer(model=split, args=args)  # in one process: nothing to pipeline
    if label_privacy:  # a U-shaped split needs the head's gradient before the server's backward
        remote = remote_model(hf_adc.split_vit(tiny_vit, 2, label_privacy=True), RemoteLink(peer=None))
        with pytest.raises(ValueError, match="cannot: train with a --server \\(the standard split"):
            hf_adc.ADCTrainer(model=remote, args=args)
