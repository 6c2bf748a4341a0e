"""The link: bytes charged are the bytes of the tensors that crossed, both ways; the channel adds noise."""

import pytest
import torch

import hf_adc


class _Wiretap:
    """Catches what the server receives and the gradient it sends back."""

    def __init__(self, split):
        self.received = None
        self.gradient = None
        split.server.layers[0].register_forward_pre_hook(self._tap)

    def _tap(self, module, args):
        self.received = args[0]
        args[0].register_hook(self._keep_gradient)

    def _keep_gradient(self, grad):
        self.gradient = grad


@pytest.mark.parametrize(
    "compression", [None, hf_adc.ADCConfig(xi=0.3), hf_adc.ADCConfig(batch_ratio=1.0, token_ratio=0.2)]
)
def test_ledger_counts_the_bytes_of_the_tensors_that_crossed(tiny_vit, batch, compression, device):
    pixel_values, labels = (tensor.to(device) for tensor in batch)
    split = hf_adc.split_vit(tiny_vit.to(device), split_layer=2, compression=compression).train()
    tap = _Wiretap(split)
    output = split(pixel_values, labels=labels)
    output.loss.backward()

    batch_size, num_tokens, hidden = pixel_values.shape[0], 17, 32
    sent_labels = labels if compression is None else output.targets
    assert split.ledger.uplink_bytes == tap.received.numel() * 4 + sent_labels.numel() * sent_labels.element_size()
    assert split.ledger.downlink_bytes == tap.gradient.numel() * 4 == tap.received.numel() * 4
    assert split.ledger.uncompressed_uplink_bytes == batch_size * num_tokens * hidden * 4 + batch_size * 8
    assert split.ledger.uncompressed_downlink_bytes == batch_size * num_tokens * hidden * 4
    record = output.communication
    assert record.uplink_bytes == split.ledger.uplink_bytes
    assert record.downlink_bytes == split.ledger.downlink_bytes
    clusters, kept = tap.received.shape[:2]
    assert record.achieved_ratio == pytest.approx(clusters * kept / (batch_size * num_tokens))
    total = split.ledger.uplink_bytes + split.ledger.downlink_bytes
    uncompressed = split.ledger.uncompressed_uplink_bytes + split.ledger.uncompressed_downlink_bytes
    assert split.ledger.ratio == pytest.approx(total / uncompressed)


def test_ledger_accumulates_and_resets(tiny_vit, batch):
    pixel_values, labels = batch
    split = hf_adc.split_vit(tiny_vit, split_layer=2, compression=hf_adc.ADCConfig(xi=0.1)).train()
    split(pixel_values, labels=labels).loss.backward()
    one_step = split.ledger.state_dict()
    split(pixel_values, labels=labels).loss.backward()
    assert split.ledger.state_dict() == {name: 2 * value for name, value in one_step.items()}
    split.ledger.reset()
    assert split.ledger.total_bytes == 0 and split.ledger.ratio == 1.0
    split.ledger.load_state_dict(one_step)
    assert split.ledger.state_dict() == one_step


def test_adc_ratio_tracks_xi(tiny_vit):
    pixel_values, labels = torch.randn(32, 3, 16, 16), torch.randint(0, 5, (32,))
    split = hf_adc.split_vit(tiny_vit, split_layer=2, compression=hf_adc.ADCConfig(xi=0.1)).train()
    output = split(pixel_values, labels=labels)
    output.loss.backward()
    clusters, kept = hf_adc.ADCConfig(xi=0.1).sizes(32, 17)
    assert output.communication.achieved_ratio == pytest.approx(clusters * kept / (32 * 17))
    assert abs(output.communication.achieved_ratio - 0.1) < 0.01
    assert split.ledger.ratio < 0.12


def _measured_snr_db(clean: torch.Tensor, noisy: torch.Tensor) -> float:
    noise = (noisy - clean).pow(2).mean()
    return float(10 * torch.log10(clean.pow(2).mean() / noise))


def test_awgn_channel_noises_activations_up_and_gradients_down(tiny_vit, batch):
    pixel_values, labels = batch
    torch.manual_seed(0)
    split = hf_adc.split_vit(tiny_vit, split_layer=2, channel=hf_adc.ChannelConfig(snr_db=10.0)).train()
    sent = {}
    split.client.register_forward_hook(lambda m, a, out: sent.update(up=out.last_hidden_state))
    tap = _Wiretap(split)
    output = split(pixel_values, labels=labels)
    sent["up"].retain_grad()
    output.loss.backward()
    assert _measured_snr_db(sent["up"].detach(), tap.received.detach()) == pytest.approx(10.0, abs=0.3)
    assert _measured_snr_db(tap.gradient, sent["up"].grad) == pytest.approx(10.0, abs=0.3)


def test_awgn_snr_range_is_drawn_within_bounds():
    channel = hf_adc.ChannelConfig(snr_db=(5.0, 15.0))
    torch.manual_seed(0)
    clean = torch.randn(4096)
    measured = [_measured_snr_db(clean, channel.apply(clean)) for _ in range(20)]
    assert 4.5 < min(measured) and max(measured) < 15.5
    assert max(measured) - min(measured) > 3


def test_empty_snr_range_raises():
    with pytest.raises(ValueError, match=r"snr_db range \(20, 10\) is empty"):
        hf_adc.ChannelConfig(snr_db=(20, 10))


@pytest.mark.parametrize(
    "compression", [None, hf_adc.ADCConfig(xi=0.1), hf_adc.ADCConfig(batch_ratio=0.5, token_ratio=1.0)]
)
def test_planned_wire_bytes_equal_what_the_ledger_charges(tiny_vit, batch, compression):
    pixel_values, labels = batch
    split = hf_adc.split_vit(tiny_vit, split_layer=2, compression=compression).train()
    split(pixel_values, labels=labels).loss.backward()
    batch_size = pixel_values.shape[0]
    assert split.wire_bytes(batch_size) == (split.ledger.uplink_bytes, split.ledger.downlink_bytes)
    assert split.wire_bytes(batch_size, compressed=False) == (
        split.ledger.uncompressed_uplink_bytes,
        split.ledger.uncompressed_downlink_bytes,
    )
