"""Baseline bridges: shapes, gradient flow to the client, achieved ratio, determinism, and their errors."""

import math

import pytest
import torch

import hf_adc
from hf_adc.bridges import C3SLBridge, QuantizeBridge, TopKBridge
from hf_adc.bridges.packing import pack_bits, packed_size, unpack_bits

TOKENS, HIDDEN, BATCH = 17, 32, 12
VALUES = TOKENS * HIDDEN

BASELINES = {
    "topk": hf_adc.TopKConfig(rate=0.1),
    "randomtopk": hf_adc.RandomTopKConfig(rate=0.1),
    "bottlenet": hf_adc.BottleNetConfig(ratio=0.25),
    "c3sl": hf_adc.C3SLConfig(R=4),
    "quantize": hf_adc.QuantizationConfig(bits=4),
}
# Activation bytes up over uncompressed activation bytes, from each method's definition (method.md section 4).
EXPECTED_UPLINK_RATIO = {
    "topk": round(0.1 * VALUES) * (4 + math.ceil(math.log2(VALUES)) / 8) / (VALUES * 4),
    "randomtopk": round(0.1 * VALUES) * (4 + math.ceil(math.log2(VALUES)) / 8) / (VALUES * 4),
    "bottlenet": 8 / 32,
    "c3sl": 1 / 4,
    "quantize": (VALUES * 4 / 8 + 8) / (VALUES * 4),
}


class _Wiretap:
    """Catches the client's output (what would go up uncompressed) and its gradient."""

    def __init__(self, split):
        self.sent = None
        split.client.register_forward_hook(self._tap)

    def _tap(self, module, args, output):
        self.sent = output.last_hidden_state
        self.sent.retain_grad()


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_trains_through_the_cut_and_charges_its_ratio(tiny_vit, batch, method, device):
    pixel_values, labels = (tensor.to(device) for tensor in batch)
    split = hf_adc.split_vit(tiny_vit.to(device), split_layer=2, compression=BASELINES[method]).train()
    tap = _Wiretap(split)
    output = split(pixel_values, labels=labels)
    output.loss.backward()

    assert output.logits.shape == (BATCH, 5)
    assert torch.isfinite(output.loss)
    assert tap.sent.grad is not None and tap.sent.grad.abs().sum() > 0
    assert all(p.grad is not None for p in split.client.parameters() if p.requires_grad)
    record = output.communication
    assert record.achieved_ratio == pytest.approx(EXPECTED_UPLINK_RATIO[method], rel=1e-6)
    assert split.wire_bytes(BATCH) == (split.ledger.uplink_bytes, split.ledger.downlink_bytes)
    assert split.ledger.ratio < 0.35


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_is_deterministic_under_a_seed(tiny_vit_path, batch, method):
    pixel_values, labels = batch
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        vit = hf_adc.split_vit(tiny_vit_path, 2, compression=BASELINES[method]).train()
        losses.append([vit(pixel_values, labels=labels).loss.item() for _ in range(2)])
    assert losses[0] == losses[1]


def test_topk_sends_the_largest_values_and_masks_the_gradient_the_same_way():
    bridge = TopKBridge(hf_adc.TopKConfig(rate=0.25))
    activations = torch.randn(3, 4, 8)
    wire, context = bridge.pack(activations)
    received = bridge.unpack(wire, context)
    kept = received != 0
    assert kept.sum() == 3 * 8
    threshold = activations.abs().reshape(3, -1).topk(8).values[:, -1]
    assert (activations.abs().reshape(3, -1)[kept.reshape(3, -1)].view(3, 8) >= threshold[:, None]).all()
    torch.testing.assert_close(received[kept], activations[kept])
    gradient = bridge.unpack_gradient(bridge.pack_gradient(torch.ones_like(activations), context), context)
    assert torch.equal(gradient != 0, kept)


def test_random_topk_draws_mostly_from_the_top():
    config = hf_adc.RandomTopKConfig(rate=0.1, random_portion=0.1, seed=1)
    bridge = hf_adc.bridges.RandomTopKBridge(config)
    activations = torch.randn(64, VALUES)
    _, (_, indices) = bridge.pack(activations)
    top = activations.abs().topk(indices.shape[1], dim=1).indices
    in_top = torch.stack([torch.isin(indices[i], top[i]) for i in range(64)]).float().mean()
    assert 0.8 < in_top < 0.97  # about (1 - a) of the draws come from the top-K


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_c3sl_recovers_each_sample_as_holographic_memory_does(groups):
    """Correlation with random keys recovers a sample with cosine ~ 1/sqrt(R + 1): the rest is crosstalk."""
    activations = torch.randn(8, TOKENS, HIDDEN)
    bridge = C3SLBridge(hf_adc.C3SLConfig(R=groups), TOKENS, HIDDEN).train()
    combined = bridge.encode(activations, None).hidden_states
    assert combined.shape == (8 // groups, VALUES)
    recovered = bridge.decode(combined)
    assert recovered.shape == activations.shape
    cosine = torch.nn.functional.cosine_similarity(recovered.flatten(1), activations.flatten(1))
    assert (cosine - 1 / math.sqrt(groups + 1)).abs().max() < 0.1
    torch.testing.assert_close(bridge.keys.norm(dim=1), torch.ones(groups))


def test_c3sl_batch_not_divisible_by_r_raises(tiny_vit, batch):
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.C3SLConfig(R=5)).train()
    with pytest.raises(ValueError, match=r"R=5 .*multiple of R; got 12"):
        split(*batch)


def test_quantization_error_is_within_half_a_step():
    bridge = QuantizeBridge(hf_adc.QuantizationConfig(bits=3))
    activations = torch.randn(4, TOKENS, HIDDEN)
    wire, context = bridge.pack(activations)
    assert wire["codes"].dtype == torch.uint8 and wire["codes"].numel() == packed_size(4 * VALUES, 3)
    error = (bridge.unpack(wire, context) - activations).abs().reshape(4, -1).max(dim=1).values
    assert (error <= wire["step"] / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [1, 3, 8, 13, 16])
def test_bit_packing_round_trips(bits):
    codes = torch.randint(0, 2**bits, (1001,))
    packed = pack_bits(codes, bits)
    assert packed.numel() == packed_size(1001, bits)
    assert torch.equal(unpack_bits(packed, bits, 1001), codes)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: hf_adc.TopKConfig(rate=0), r"rate=0 is out of range.*\(0, 1\]"),
        (lambda: hf_adc.RandomTopKConfig(rate=0.1, random_portion=1.0), r"random_portion=1.0 is out of range"),
        (lambda: hf_adc.BottleNetConfig(ratio=1.5), r"ratio=1.5 is out of range"),
        (lambda: hf_adc.C3SLConfig(R=0), r"R=0 is out of range"),
        (lambda: hf_adc.QuantizationConfig(bits=33), r"bits=33 is out of range.*1 \.\. 32"),
    ],
)
def test_impossible_baseline_settings_raise(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_bottlenet_runs_in_eval_too(tiny_vit, batch):
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.BottleNetConfig(ratio=0.5)).eval()
    with torch.no_grad():
        assert split(batch[0]).logits.shape == (BATCH, 5)
    assert sum(p.numel() for p in split.bridge.parameters()) > 0


@pytest.mark.parametrize("xi", [0.02, 0.1, 0.5])
@pytest.mark.parametrize("method", hf_adc.bridges.LEVEL_METHODS)
def test_config_for_ratio_lands_near_xi(tiny_vit, method, xi):
    config = hf_adc.bridges.config_for_ratio(method, xi, num_tokens=TOKENS, hidden_size=HIDDEN, batch_size=64)
    split = hf_adc.split_vit(tiny_vit, 2, compression=config).train()
    split(torch.randn(64, 3, 16, 16), labels=torch.randint(0, 5, (64,))).loss.backward()
    # Coarsest steps each method can take: CLS alone (1/n), one bottleneck unit (1/d), one bit (1/32).
    floor = {"adc_tokens": 1 / TOKENS, "bottlenet": 1 / HIDDEN, "quantize": 1 / 32}.get(method, 0)
    target = max(xi, floor)
    assert target / 1.6 < split.ledger.ratio < target * 1.6


@pytest.mark.parametrize(("method", "exponent"), [("adc_a0.25", 0.25), ("adc_a0.75", 0.75), ("adc_a0", 0.0)])
def test_config_for_ratio_names_the_split_exponent(method, exponent):
    config = hf_adc.bridges.config_for_ratio(method, 0.1, num_tokens=TOKENS, hidden_size=HIDDEN, batch_size=64)
    assert (config.xi, config.split_exponent) == (0.1, exponent)
    clusters, tokens = config.sizes(64, TOKENS)
    assert clusters == round(0.1**exponent * 64)


def test_the_recipe_takes_the_split_exponent_for_adc_only():
    from hf_adc.experiment import SplitArguments

    config = SplitArguments(compression="adc", xi=0.1, split_exponent=0.25).compression_config()
    assert (config.xi, config.split_exponent) == (0.1, 0.25)
    with pytest.raises(ValueError, match="split_exponent do not apply to --compression topk"):
        SplitArguments(compression="topk", rate=0.1, split_exponent=0.25).compression_config()


@pytest.mark.parametrize(("method", "message"), [("adc_ahalf", "must be a number"), ("adc_a1.5", r"\[0, 1\]")])
def test_config_for_ratio_refuses_a_bad_split_exponent(method, message):
    with pytest.raises(ValueError, match=message):
        hf_adc.bridges.config_for_ratio(method, 0.1, num_tokens=TOKENS, hidden_size=HIDDEN, batch_size=64)


@pytest.mark.parametrize("method", ["adc", "bottlenet", "quantize", "c3sl"])
def test_split_model_round_trips_through_save_pretrained(tiny_vit, batch, tmp_path, method):
    config = hf_adc.bridges.config_for_ratio(method, 0.25, num_tokens=TOKENS, hidden_size=HIDDEN, batch_size=12)
    split = hf_adc.split_vit(tiny_vit, 2, compression=config, channel=hf_adc.ChannelConfig(snr_db=(10, 20)))
    split.train()
    split(*batch).loss.backward()  # moves ADC's batch counter: it must be saved too
    split.save_pretrained(tmp_path)
    loaded = hf_adc.SplitViTForImageClassification.from_pretrained(tmp_path)
    assert loaded.client.config.compression == split.client.config.compression
    assert loaded.link.channel == split.link.channel
    for name, tensor in split.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    split.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch[0]).logits, split(batch[0]).logits)


def test_loading_a_folder_that_is_not_a_split_model_raises(tiny_vit_path):
    with pytest.raises(FileNotFoundError, match="split_config.json: it is not a folder written by"):
        hf_adc.SplitViTForImageClassification.from_pretrained(tiny_vit_path)
