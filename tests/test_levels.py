"""`config_for_ratio` to the byte: each method's exact setting at a ratio xi, from the documented rules, and the exact
bytes (so the exact ratio) one training step of the split then charges.

The shape is fixed: the tiny ViT's n = 17 tokens of width d = 32, a batch of B = 64, 5 classes. Uncompressed, one
step sends the activations (B * n * d float32 = 139264 bytes) and the class ids (B int64 = 512 bytes) up, and the
activations' gradient (139264 bytes) down: 279040 bytes. Python rounds halves to even (round(8.5) == 8).
"""

import pytest
import torch
from conftest import NUM_LABELS

import hf_adc
from hf_adc.bridges import COMPOSED_METHODS, LEVEL_METHODS, config_for_ratio

TOKENS, HIDDEN, BATCH = 17, 32, 64
ACTIVATIONS = BATCH * TOKENS * HIDDEN * 4  # 139264
UNCOMPRESSED = 2 * ACTIVATIONS + BATCH * 8  # 279040
INDEX_BITS = 10  # ceil(log2(n * d)) = ceil(log2(544))
LEVEL_XI, COMPOSED_XI = (0.1, 0.25), (0.05, 0.1)


def adc(clusters: int, kept: int, width: int = HIDDEN) -> tuple[int, int]:
    """ADC's (up, down) bytes: T merged samples of k tokens, and T soft labels (float32), up; their gradient down."""
    values = clusters * kept * width * 4
    return values + clusters * NUM_LABELS * 4, values


def adc_quantized(clusters: int, kept: int, bits: int) -> tuple[int, int]:
    """ADC then quantization: the merged values' packed codes with a float32 minimum and step per merged sample,
    both ways; up also the soft labels and the merged shape (three int32)."""
    coded = (clusters * kept * HIDDEN * bits + 7) // 8 + 2 * clusters * 4
    return coded + clusters * NUM_LABELS * 4 + 12, coded


def topk(kept: int, bits: int = 32) -> tuple[int, int]:
    """Top-K's (up, down) bytes: K values a sample (float32, or codes with a minimum and step a sample) both ways,
    and up their indices packed at 10 bits and the class ids (int64)."""
    values = (BATCH * kept * bits + 7) // 8 + (2 * BATCH * 4 if bits < 32 else 0)
    return values + (BATCH * kept * INDEX_BITS + 7) // 8 + BATCH * 8, values


def dense(values: int) -> tuple[int, int]:
    """A method that sends `values` bytes both ways, and the class ids (int64) up."""
    return values + BATCH * 8, values


EXPECTED = {
    # ADC: T = round(xi**0.5 * B), k = round(xi * B * n / T).
    ("adc", 0.1): (hf_adc.ADCConfig(xi=0.1), adc(20, 5)),  # T = round(20.24), k = round(5.44)
    ("adc", 0.25): (hf_adc.ADCConfig(xi=0.25), adc(32, 8)),  # T = 32, k = round(8.5) = 8
    # Token selection alone: T = B, k = round(xi * n).
    ("adc_tokens", 0.1): (hf_adc.ADCConfig(batch_ratio=1.0, token_ratio=0.1), adc(64, 2)),  # k = round(1.7)
    ("adc_tokens", 0.25): (hf_adc.ADCConfig(batch_ratio=1.0, token_ratio=0.25), adc(64, 4)),  # k = round(4.25)
    # Batch merging alone: T = round(xi * B), k = n.
    ("adc_batch", 0.1): (hf_adc.ADCConfig(batch_ratio=0.1, token_ratio=1.0), adc(6, 17)),  # T = round(6.4)
    ("adc_batch", 0.25): (hf_adc.ADCConfig(batch_ratio=0.25, token_ratio=1.0), adc(16, 17)),
    # Top-K: rate = xi / (1 + index bits / 64), leaving room for the indices; K = round(rate * n * d).
    ("topk", 0.1): (hf_adc.TopKConfig(rate=0.1 / (1 + 10 / 64)), topk(47)),  # K = round(47.05)
    ("topk", 0.25): (hf_adc.TopKConfig(rate=0.25 / (1 + 10 / 64)), topk(118)),  # K = round(117.62)
    ("randomtopk", 0.1): (hf_adc.RandomTopKConfig(rate=0.1 / (1 + 10 / 64)), topk(47)),
    ("randomtopk", 0.25): (hf_adc.RandomTopKConfig(rate=0.25 / (1 + 10 / 64)), topk(118)),
    # BottleNet++: d'/d = xi, d' = round(xi * d).
    ("bottlenet", 0.1): (hf_adc.BottleNetConfig(ratio=0.1), dense(BATCH * TOKENS * 3 * 4)),  # d' = round(3.2)
    ("bottlenet", 0.25): (hf_adc.BottleNetConfig(ratio=0.25), dense(BATCH * TOKENS * 8 * 4)),
    # C3-SL: R is the divisor of B nearest 1/xi (in log): 8 for 10, 4 for 4; B / R superposed samples.
    ("c3sl", 0.1): (hf_adc.C3SLConfig(R=8), dense(BATCH // 8 * TOKENS * HIDDEN * 4)),
    ("c3sl", 0.25): (hf_adc.C3SLConfig(R=4), dense(BATCH // 4 * TOKENS * HIDDEN * 4)),
    # Quantization: round(32 * xi) bits, codes packed, a float32 minimum and step per sample.
    ("quantize", 0.1): (hf_adc.QuantizationConfig(bits=3), dense(BATCH * TOKENS * HIDDEN * 3 // 8 + 2 * BATCH * 4)),
    ("quantize", 0.25): (hf_adc.QuantizationConfig(bits=8), dense(BATCH * TOKENS * HIDDEN + 2 * BATCH * 4)),
    # Compositions: the reducer at xi / (the codec's ratio: bits / 32, or d'/d).
    ("adc+quantize16", 0.05): (  # ADC at 0.1
        hf_adc.ComposedConfig(hf_adc.ADCConfig(xi=0.1), hf_adc.QuantizationConfig(bits=16)), adc_quantized(20, 5, 16)
    ),
    ("adc+quantize16", 0.1): (  # ADC at 0.2: T = round(28.62), k = round(7.50)
        hf_adc.ComposedConfig(hf_adc.ADCConfig(xi=0.2), hf_adc.QuantizationConfig(bits=16)), adc_quantized(29, 8, 16)
    ),
    ("adc+quantize8", 0.05): (
        hf_adc.ComposedConfig(hf_adc.ADCConfig(xi=0.2), hf_adc.QuantizationConfig(bits=8)), adc_quantized(29, 8, 8)
    ),
    ("adc+quantize8", 0.1): (  # ADC at 0.4: T = round(40.48), k = round(10.88)
        hf_adc.ComposedConfig(hf_adc.ADCConfig(xi=0.4), hf_adc.QuantizationConfig(bits=8)), adc_quantized(40, 11, 8)
    ),
    ("adc+quantize4", 0.05): (
        hf_adc.ComposedConfig(hf_adc.ADCConfig(xi=0.4), hf_adc.QuantizationConfig(bits=4)), adc_quantized(40, 11, 4)
    ),
    ("adc+quantize4", 0.1): (  # ADC at 0.8: T = round(57.24), k = round(15.27)
        hf_adc.ComposedConfig(hf_adc.ADCConfig(xi=0.8), hf_adc.QuantizationConfig(bits=4)), adc_quantized(57, 15, 4)
    ),
    ("adc_tokens+quantize8", 0.05): (  # token selection at 0.2: k = round(3.4)
        hf_adc.ComposedConfig(hf_adc.ADCConfig(batch_ratio=1.0, token_ratio=0.2), hf_adc.QuantizationConfig(bits=8)),
        adc_quantized(64, 3, 8),
    ),
    ("adc_tokens+quantize8", 0.1): (  # token selection at 0.4: k = round(6.8)
        hf_adc.ComposedConfig(hf_adc.ADCConfig(batch_ratio=1.0, token_ratio=0.4), hf_adc.QuantizationConfig(bits=8)),
        adc_quantized(64, 7, 8),
    ),
    # Top-K then codes: each kept value costs its code up and down and its index up, rate = xi * 64 / (2 * 8 + 10).
    ("topk+quantize8", 0.05): (  # K = round(66.95)
        hf_adc.ComposedConfig(hf_adc.TopKConfig(rate=0.05 * 64 / 26), hf_adc.QuantizationConfig(bits=8)), topk(67, 8)
    ),
    ("topk+quantize8", 0.1): (  # K = round(133.91)
        hf_adc.ComposedConfig(hf_adc.TopKConfig(rate=0.1 * 64 / 26), hf_adc.QuantizationConfig(bits=8)), topk(134, 8)
    ),
    # ADC then BottleNet++ at d'/d = 0.5: the merged tokens at width 16 both ways.
    ("adc+bottlenet0.5", 0.05): (
        hf_adc.ComposedConfig(hf_adc.ADCConfig(xi=0.1), hf_adc.BottleNetConfig(ratio=0.5)),
        (adc(20, 5, 16)[0] + 12, adc(20, 5, 16)[1]),
    ),
    ("adc+bottlenet0.5", 0.1): (
        hf_adc.ComposedConfig(hf_adc.ADCConfig(xi=0.2), hf_adc.BottleNetConfig(ratio=0.5)),
        (adc(29, 8, 16)[0] + 12, adc(29, 8, 16)[1]),
    ),
}


def test_every_level_and_composed_method_has_its_exact_expectation():
    methods = [(m, xi) for m in LEVEL_METHODS for xi in LEVEL_XI]
    methods += [(m, xi) for m in COMPOSED_METHODS for xi in COMPOSED_XI]
    assert sorted(EXPECTED) == sorted(methods)


@pytest.mark.parametrize(("method", "xi"), sorted(EXPECTED))
def test_config_for_ratio_gives_the_exact_setting_and_the_step_charges_its_exact_ratio(tiny_vit, method, xi):
    config = config_for_ratio(method, xi, num_tokens=TOKENS, hidden_size=HIDDEN, batch_size=BATCH)
    expected_config, (up, down) = EXPECTED[method, xi]
    assert config == expected_config
    generator = torch.Generator().manual_seed(0)
    split = hf_adc.split_vit(tiny_vit, 2, compression=config).train()
    pixel_values = torch.randn(BATCH, 3, 16, 16, generator=generator)
    split(pixel_values, labels=torch.randint(0, NUM_LABELS, (BATCH,), generator=generator)).loss.backward()
    ledger = split.ledger
    assert (ledger.uplink_bytes, ledger.downlink_bytes) == (up, down)
    assert ledger.uncompressed_bytes == UNCOMPRESSED
    assert ledger.ratio == (up + down) / UNCOMPRESSED
