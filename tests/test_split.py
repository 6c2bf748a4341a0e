"""split_vit: the halves share the model's modules and, uncompressed, compute exactly what it computes."""

import copy

import pytest
import torch
from conftest import NUM_LABELS, tiny_vit_config
from transformers import ViTForImageClassification, ViTModel

import hf_adc


def _gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def test_uncompressed_split_equals_unsplit_model(tiny_vit, batch, device):
    pixel_values, labels = (tensor.to(device) for tensor in batch)
    tiny_vit.to(device)
    reference = copy.deepcopy(tiny_vit).train()
    expected = reference(pixel_values=pixel_values, labels=labels)
    expected.loss.backward()

    split = hf_adc.split_vit(tiny_vit, split_layer=2).train()
    output = split(pixel_values, labels=labels)
    output.loss.backward()

    torch.testing.assert_close(output.logits, expected.logits)
    torch.testing.assert_close(output.loss, expected.loss)
    expected_grads, grads = _gradients(reference), _gradients(tiny_vit)
    assert len(grads) == len(list(tiny_vit.parameters()))
    assert expected_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], msg=name)


def test_adc_at_xi_one_equals_uncompressed_split(tiny_vit, batch, device):
    pixel_values, labels = (tensor.to(device) for tensor in batch)
    tiny_vit.to(device)
    reference_vit = copy.deepcopy(tiny_vit)
    plain = hf_adc.split_vit(reference_vit, split_layer=2).train()
    expected = plain(pixel_values, labels=labels)
    expected.loss.backward()

    adc = hf_adc.split_vit(tiny_vit, split_layer=2, compression=hf_adc.ADCConfig(xi=1.0)).train()
    output = adc(pixel_values, labels=labels)
    output.loss.backward()

    torch.testing.assert_close(output.loss, expected.loss)
    torch.testing.assert_close(output.logits[output.cluster_ids], expected.logits)
    torch.testing.assert_close(output.targets[output.cluster_ids], expected.targets)
    expected_grads = _gradients(reference_vit)
    for name, grad in _gradients(tiny_vit).items():
        torch.testing.assert_close(grad, expected_grads[name], msg=name)


def test_eval_mode_sends_everything_and_charges_nothing(tiny_vit, batch):
    pixel_values, labels = batch
    expected = copy.deepcopy(tiny_vit).eval()(pixel_values=pixel_values, labels=labels)
    split = hf_adc.split_vit(tiny_vit, split_layer=3, compression=hf_adc.ADCConfig(xi=0.1)).eval()
    with torch.no_grad():
        output = split(pixel_values, labels=labels)
    assert output.logits.shape == (pixel_values.shape[0], NUM_LABELS)
    torch.testing.assert_close(output.logits, expected.logits)
    torch.testing.assert_close(output.loss, expected.loss)
    assert output.communication is None
    assert split.ledger.total_bytes == 0


def test_split_shares_the_model_modules_without_copying(tiny_vit):
    split = hf_adc.split_vit(tiny_vit, split_layer=1)
    assert split.client.embeddings is tiny_vit.vit.embeddings
    assert split.client.layers[0] is tiny_vit.vit.layers[0]
    assert [layer for layer in split.server.layers] == list(tiny_vit.vit.layers[1:])
    assert split.server.classifier is tiny_vit.classifier
    assert all(p.device.type != "meta" for p in split.parameters())
    assert sum(p.numel() for p in split.parameters()) == sum(p.numel() for p in tiny_vit.parameters())


def test_half_configs_record_the_split(tiny_vit):
    split = hf_adc.split_vit(tiny_vit, split_layer=3, compression=hf_adc.ADCConfig(xi=0.2))
    for half in (split.client, split.server):
        assert isinstance(half, ViTModel.__mro__[1])  # ViTPreTrainedModel
        assert half.config.split_layer == 3
        assert half.config.num_hidden_layers == 4
        assert half.config.compression["method"] == "adc"
        assert half.config.compression["xi"] == 0.2
        assert half.config._attn_implementation == "sdpa"
    assert len(split.client.layers) == 3 and len(split.server.layers) == 1


def test_cls_attention_probe_equals_eager_attention_row(tiny_vit_path, batch):
    pixel_values, _ = batch
    eager = ViTForImageClassification.from_pretrained(tiny_vit_path, attn_implementation="eager").eval()
    attentions = eager(pixel_values=pixel_values, output_attentions=True).attentions
    split = hf_adc.split_vit(ViTForImageClassification.from_pretrained(tiny_vit_path), split_layer=2).eval()
    probe = split.client(pixel_values, output_cls_attention=True).cls_attention
    torch.testing.assert_close(probe, attentions[1][:, :, 0].mean(dim=1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probe.sum(dim=1), torch.ones(pixel_values.shape[0]))


def test_from_pretrained_path_splits_and_trains_one_step(tiny_vit_path, batch):
    pixel_values, labels = batch
    split = hf_adc.split_vit(tiny_vit_path, split_layer=2, compression=hf_adc.ADCConfig(xi=0.25)).train()
    optimizer = torch.optim.AdamW(split.parameters(), lr=1e-2)
    before = split.server.classifier.weight.detach().clone()
    output = split(pixel_values, labels=labels)
    output.loss.backward()
    optimizer.step()
    assert torch.isfinite(output.loss)
    assert not torch.equal(before, split.server.classifier.weight)
    assert split.client.config.base_model_name_or_path == tiny_vit_path


@pytest.mark.parametrize("split_layer", [0, 4, -1, 2.0])
def test_split_layer_out_of_range_raises(tiny_vit, split_layer):
    with pytest.raises(ValueError, match=rf"split_layer={split_layer!r} is out of range.*1 \.\. 3"):
        hf_adc.split_vit(tiny_vit, split_layer=split_layer)


def test_model_that_is_not_a_vit_classifier_raises():
    with pytest.raises(TypeError, match="ViTForImageClassification.*got ViTModel"):
        hf_adc.split_vit(ViTModel(tiny_vit_config()), split_layer=1)


def test_unknown_compression_config_raises(tiny_vit):
    with pytest.raises(TypeError, match="not a known bridge config"):
        hf_adc.split_vit(tiny_vit, split_layer=1, compression={"method": "adc"})


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 1, 16, 16), (3, 16, 16)])
def test_pixel_values_of_wrong_shape_raise(tiny_vit, shape):
    split = hf_adc.split_vit(tiny_vit, split_layer=1)
    with pytest.raises(ValueError, match=r"pixel_values has shape .*expected \(batch, 3, 16, 16\)"):
        split(torch.randn(*shape))


@pytest.mark.parametrize("bad_label", [-1, NUM_LABELS])
def test_labels_outside_range_raise(tiny_vit, batch, bad_label):
    pixel_values, labels = batch
    labels = labels.clone()
    labels[3] = bad_label
    split = hf_adc.split_vit(tiny_vit, split_layer=1, compression=hf_adc.ADCConfig(xi=0.5)).train()
    with pytest.raises(ValueError, match=rf"label {bad_label} is out of range.*\[0, {NUM_LABELS}\)"):
        split(pixel_values, labels=labels)


def test_training_without_labels_raises(tiny_vit, batch):
    split = hf_adc.split_vit(tiny_vit, split_layer=1).train()
    with pytest.raises(ValueError, match="needs labels"):
        split(batch[0])
