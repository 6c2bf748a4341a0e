"""Each method's setting nearest to a total compression ratio xi, for comparing methods level by level."""

import math

from .adc import ADCConfig
from .base import BridgeConfig
from .bottlenet import BottleNetConfig
from .c3sl import C3SLConfig
from .composed import ComposedConfig
from .quantize import QuantizationConfig
from .topk import RandomTopKConfig, TopKConfig

LEVEL_METHODS = ("adc", "adc_tokens", "adc_batch", "topk", "randomtopk", "bottlenet", "c3sl", "quantize")
# Compositions "<reducer>+<codec><setting>": the codec shrinks by bits/32 (quantize) or d'/d (bottlenet), and the
# reducer takes the rest of the ratio.
COMPOSED_METHODS = (
    "adc+quantize16", "adc+quantize8", "adc+quantize4", "adc_tokens+quantize8", "topk+quantize8", "adc+bottlenet0.5",
)  # fmt: skip


def _nearest_divisor(batch_size: int, target: float) -> int:
    divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
    return min(divisors, key=lambda d: abs(math.log(d) - math.log(target)))


def config_for_ratio(
    method: str, xi: float, num_tokens: int, hidden_size: int, batch_size: int, seed: int = 0
) -> BridgeConfig:
    """The config of `method` whose charged ratio (method.md section 4) comes nearest to `xi`.

    `adc_tokens` / `adc_batch` are ADC's ablations (token selection only / batch merging only); `adc_a<a>` is
    ADC with split exponent a (`adc_a0.25`: T/B = xi**0.25, k/n = xi**0.75). Top-K's rate
    leaves room for its indices (values and indices up, values down); C3-SL's R is the divisor of the batch
    size nearest 1/xi; quantization takes round(32 * xi) bits (1 .. 16). A composition (`COMPOSED_METHODS`, e.g.
    `adc+quantize8`) gives its reducer the ratio xi / (codec's ratio): ADC at 0.4 then 8-bit codes for xi = 0.1.
    """
    if not 0 < xi <= 1:
        raise ValueError(f"xi={xi} is out of range: it must lie in (0, 1].")
    if "+" in method:
        return _composed_for_ratio(method, xi, num_tokens, hidden_size, batch_size, seed)
    if method == "adc":
        return ADCConfig(xi=xi, seed=seed)
    if method == "adc_tokens":
        return ADCConfig(batch_ratio=1.0, token_ratio=xi, seed=seed)
    if method == "adc_batch":
        return ADCConfig(batch_ratio=xi, token_ratio=1.0, seed=seed)
    if method.startswith("adc_a"):
        try:
            exponent = float(method.removeprefix("adc_a"))
        except ValueError:
            message = f"method {method!r}: the split exponent after 'adc_a' must be a number in [0, 1]."
            raise ValueError(message) from None
        return ADCConfig(xi=xi, split_exponent=exponent, seed=seed)
    rate = min(xi / (1 + math.ceil(math.log2(num_tokens * hidden_size)) / 64), 1.0)
    if method == "topk":
        return TopKConfig(rate=rate)
    if method == "randomtopk":
        return RandomTopKConfig(rate=rate, seed=seed)
    if method == "bottlenet":
        return BottleNetConfig(ratio=xi)
    if method == "c3sl":
        return C3SLConfig(R=_nearest_divisor(batch_size, 1 / xi), seed=seed)
    if method == "quantize":
        return QuantizationConfig(bits=min(max(round(32 * xi), 1), 16))
    raise ValueError(
        f"method {method!r} is unknown: choose one of {', '.join(LEVEL_METHODS)}, adc_a<exponent>, or a composition "
        f"like "
        f"{', '.join(COMPOSED_METHODS)}."
    )


def _composed_for_ratio(method, xi, num_tokens, hidden_size, batch_size, seed) -> ComposedConfig:
    reducer, _, codec = method.partition("+")
    setting = codec.lstrip("abcdefghijklmnopqrstuvwxyz")
    try:
        if codec.startswith("quantize"):
            codec_config, codec_ratio = QuantizationConfig(bits=int(setting)), int(setting) / 32
        elif codec.startswith("bottlenet") and not reducer.endswith("topk"):
            codec_config, codec_ratio = BottleNetConfig(ratio=float(setting)), float(setting)
        else:
            raise ValueError(f"codec {codec!r} is not quantize<bits> (or bottlenet<ratio> after ADC)")
    except ValueError as error:
        raise ValueError(f"method {method!r}: {error}.") from error
    if xi / codec_ratio > 1:
        raise ValueError(
            f"method {method!r} cannot reach xi={xi}: its codec alone sends {codec_ratio:g} of the bytes; "
            f"use xi <= {codec_ratio:g}."
        )
    if reducer in ("topk", "randomtopk"):
        # Each kept value costs its code up and down, and its index up: rate * (2 * bits + index bits) / 64.
        index_bits = math.ceil(math.log2(num_tokens * hidden_size))
        rate = min(xi * 64 / (2 * codec_config.bits + index_bits), 1.0)
        reducer_config = TopKConfig(rate=rate) if reducer == "topk" else RandomTopKConfig(rate=rate, seed=seed)
    else:
        reducer_config = config_for_ratio(reducer, xi / codec_ratio, num_tokens, hidden_size, batch_size, seed)
    return ComposedConfig(reducer_config, codec_config)
