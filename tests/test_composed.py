"""Composed bridges: a reducer then a codec, charged as sent, trained end to end, saved and loaded like any split."""

import pytest
import torch
from conftest import NUM_LABELS

import hf_adc
from hf_adc.bridges import COMPOSED_METHODS, config_for_ratio
from hf_adc.experiment import SplitArguments
from hf_adc.hub import model_card

REDUCERS = {
    "adc": hf_adc.ADCConfig(xi=0.4),
    "tokens": hf_adc.ADCConfig(batch_ratio=1.0, token_ratio=0.3),
    "topk": hf_adc.TopKConfig(rate=0.2),
    "randomtopk": hf_adc.RandomTopKConfig(rate=0.2),
}
CODECS = {
    "q2": hf_adc.QuantizationConfig(bits=2),
    "q8": hf_adc.QuantizationConfig(bits=8),
    "q16": hf_adc.QuantizationConfig(bits=16),
    "bottlenet": hf_adc.BottleNetConfig(ratio=0.5),
}
PAIRS = [
    (reducer, codec)
    for reducer in REDUCERS
    for codec in CODECS
    if not (reducer.endswith("topk") and codec == "bottlenet")
]


@pytest.mark.parametrize(("reducer", "codec"), PAIRS)
def test_every_pair_charges_what_it_planned_and_trains_the_client(tiny_vit, batch, reducer, codec):
    pixel_values, labels = batch
    config = hf_adc.ComposedConfig(REDUCERS[reducer], CODECS[codec])
    split = hf_adc.split_vit(tiny_vit, 2, compression=config).train()
    output = split(pixel_values, labels=labels)
    output.loss.backward()
    assert split.wire_bytes(12) == (split.ledger.uplink_bytes, split.ledger.downlink_bytes)
    assert torch.isfinite(output.loss)
    assert split.client.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    assert split.client.layers[0].attention.q_proj.weight.grad.abs().sum() > 0


def test_adc_then_32_bit_codes_equals_adc_alone(tiny_vit_path, batch):
    pixel_values, labels = batch
    results = []
    exact_codes = hf_adc.ComposedConfig(hf_adc.ADCConfig(xi=0.3), hf_adc.QuantizationConfig(bits=32))
    for compression in (hf_adc.ADCConfig(xi=0.3), exact_codes):
        vit = hf_adc.split_vit(tiny_vit_path, 2, compression=compression).train()
        output = vit(pixel_values, labels=labels)
        output.loss.backward()
        results.append((output, [parameter.grad for parameter in vit.client.parameters()]))
    (alone, alone_grads), (composed, composed_grads) = results
    torch.testing.assert_close(composed.loss, alone.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(composed.logits, alone.logits, atol=1e-6, rtol=1e-6)
    assert torch.equal(composed.cluster_ids, alone.cluster_ids)
    for plain, coded in zip(alone_grads, composed_grads, strict=True):
        torch.testing.assert_close(coded, plain, atol=1e-6, rtol=1e-5)


def test_8_bit_codes_send_about_a_quarter_of_adc_alone(tiny_vit, batch):
    pixel_values, labels = batch
    sent = {}
    for name, compression in (
        ("alone", hf_adc.ADCConfig(xi=0.4)),
        ("composed", hf_adc.ComposedConfig(hf_adc.ADCConfig(xi=0.4), hf_adc.QuantizationConfig(bits=8))),
    ):
        split = hf_adc.split_vit(tiny_vit, 2, compression=compression).train()
        split(pixel_values, labels=labels).loss.backward()
        sent[name] = split.ledger.downlink_bytes
    assert sent["composed"] == pytest.approx(sent["alone"] / 4, rel=0.05)


@pytest.mark.parametrize(
    ("reducer", "codec", "message"),
    [
        (hf_adc.ADCConfig(xi=0.4), hf_adc.TopKConfig(rate=0.1), "is two reducers"),
        (hf_adc.QuantizationConfig(bits=8), hf_adc.ADCConfig(xi=0.4), "a codec before a reducer"),
        (hf_adc.TopKConfig(rate=0.1), hf_adc.BottleNetConfig(ratio=0.5), "BottleNet\\+\\+ encodes whole tokens"),
        (hf_adc.C3SLConfig(R=2), hf_adc.QuantizationConfig(bits=8), "the first step must be a reducer"),
        (hf_adc.ADCConfig(xi=0.4), hf_adc.C3SLConfig(R=2), "an unknown second step"),
    ],
)
def test_bad_pairs_are_refused(reducer, codec, message):
    with pytest.raises(ValueError, match=message):
        hf_adc.ComposedConfig(reducer, codec)


def test_a_composed_split_saves_loads_merges_and_names_itself(tiny_vit, batch, tmp_path):
    pixel_values, labels = batch
    config = hf_adc.ComposedConfig(hf_adc.ADCConfig(xi=0.4), hf_adc.BottleNetConfig(ratio=0.5))
    split = hf_adc.split_vit(tiny_vit, 2, compression=config).train()
    split(pixel_values, labels=labels).loss.backward()
    split.eval()
    with torch.no_grad():
        expected = split(pixel_values).logits
    split.save_pretrained(tmp_path)
    loaded = hf_adc.SplitViTForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.client.config.compression["method"] == "adc+bottlenet"
    assert loaded.bridge.config == config
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, expected)
    card = str(model_card(loaded.client, "client", "me/x-client"))
    assert "adc+bottlenet" in card
    quantized = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.ComposedConfig(
        hf_adc.ADCConfig(xi=0.4), hf_adc.QuantizationConfig(bits=8)
    )).eval()  # fmt: skip
    merged = hf_adc.merge_halves(quantized.client, quantized.server).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values).logits, quantized(pixel_values).logits)


def test_the_recipe_arguments_compose(tmp_path):
    config = SplitArguments(compression="adc+quantize", xi=0.4, bits=8).compression_config(seed=3)
    assert config == hf_adc.ComposedConfig(hf_adc.ADCConfig(xi=0.4, seed=3), hf_adc.QuantizationConfig(bits=8))
    assert config.method == "adc+quantize"
    with pytest.raises(ValueError, match="is not a reducer .* then a codec"):
        SplitArguments(compression="adc+topk").compression_config()
    with pytest.raises(ValueError, match="R do not apply to --compression adc\\+quantize"):
        SplitArguments(compression="adc+quantize", R=2).compression_config()


@pytest.mark.parametrize("method", COMPOSED_METHODS)
@pytest.mark.parametrize("xi", [0.05, 0.1])
def test_config_for_ratio_offers_compositions_near_xi(tiny_vit, method, xi):
    config = config_for_ratio(method, xi, num_tokens=17, hidden_size=32, batch_size=64)
    split = hf_adc.split_vit(tiny_vit, 2, compression=config)
    achieved = sum(split.wire_bytes(64)) / sum(split.wire_bytes(64, compressed=False))
    assert achieved == pytest.approx(xi, rel=0.35), (method, config)


def test_a_composition_that_cannot_reach_xi_says_so():
    with pytest.raises(ValueError, match="cannot reach xi=0.8: its codec alone sends 0.5 of the bytes"):
        config_for_ratio("adc+quantize16", 0.8, num_tokens=17, hidden_size=32, batch_size=64)


def test_composed_bridges_decode_in_eval_like_their_codec(tiny_vit, batch):
    pixel_values, _ = batch
    config = hf_adc.ComposedConfig(hf_adc.ADCConfig(xi=0.4), hf_adc.BottleNetConfig(ratio=0.5))
    split = hf_adc.split_vit(tiny_vit, 2, compression=config).eval()
    with torch.no_grad():
        hidden = split.client(pixel_values).last_hidden_state
        through = split.server(split.bridge.codec.decoder(split.bridge.codec.encoder(hidden))).logits
        torch.testing.assert_close(split(pixel_values).logits, through)
    assert split.num_labels == NUM_LABELS



@pytest.mark.parametrize(("reducer", "codec"), PAIRS)
def test_a_receiver_with_only_the_wire_unpacks_what_the_sender_packed(tiny_vit, batch, reducer, codec):
    """What a server process does: it rebuilds the context from the wire and the activations' shape alone."""
    pixel_values, labels = batch
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.ComposedConfig(REDUCERS[reducer], CODECS[codec])).train()
    with torch.no_grad():
        hidden, message = split._client_side(pixel_values, labels, False, 0.0)
        wire, context = split.bridge.pack(message.hidden_states)
        shape = (message.labels.shape[0], *hidden.shape[1:])
        rebuilt = split.bridge.receiver_context(wire, shape, hidden.dtype)
        received = split.bridge.unpack(wire, rebuilt)
        torch.testing.assert_close(received, split.bridge.unpack(wire, context), atol=0, rtol=0)
        gradient = torch.randn_like(received)
        down, expected = split.bridge.pack_gradient(gradient, rebuilt), split.bridge.pack_gradient(gradient, context)
    assert down.keys() == expected.keys()
    for name in down:
        torch.testing.assert_close(down[name], expected[name], atol=0, rtol=0, msg=name)


def test_a_merged_shape_that_does_not_fit_the_activations_is_refused(tiny_vit, batch):
    pixel_values, labels = batch
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.ComposedConfig(REDUCERS["adc"], CODECS["q8"])).train()
    with torch.no_grad():
        hidden, message = split._client_side(pixel_values, labels, False, 0.0)
        wire, _ = split.bridge.pack(message.hidden_states)
    shape = (message.labels.shape[0], *hidden.shape[1:])
    for bad in ([shape[0], 10**6, shape[2]], [shape[0] + 1, 2, shape[2]], [shape[0], 2]):
        wire["shape"] = torch.tensor(bad, dtype=torch.int32)
        with pytest.raises(ValueError, match=r"the merged shape .* does not fit activations of shape"):
            split.bridge.receiver_context(wire, shape, hidden.dtype)
