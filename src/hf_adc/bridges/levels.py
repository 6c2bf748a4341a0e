"""Each method's setting nearest to a total compression ratio xi, for comparing methods level by level.

Every registered method with a `for_ratio` rule is a level method (`level_methods()`), after ADC's ablations.
"""

import math

from .adc import ADCConfig
from .base import BridgeConfig
from .bottlenet import BottleNetConfig
from .composed import ComposedConfig
from .quantize import QuantizationConfig
from .registry import METHODS
from .topk import RandomTopKConfig, TopKConfig

# ADC's ablations: token selection only, batch merging only (and `adc_a<exponent>`, any split exponent).
ADC_ABLATIONS = ("adc_tokens", "adc_batch")
# Compositions "<reducer>+<codec><setting>": the codec shrinks by bits/32 (quantize) or d'/d (bottlenet), and the
# reducer takes the rest of the ratio.
COMPOSED_METHODS = (
    "adc+quantize16", "adc+quantize8", "adc+quantize4", "adc_tokens+quantize8", "topk+quantize8", "adc+bottlenet0.5",
)  # fmt: skip


def level_methods() -> tuple[str, ...]:
    """The methods `config_for_ratio` knows by name (public as `hf_adc.bridges.LEVEL_METHODS`)."""
    ruled = [method for method, entry in METHODS.items() if entry.for_ratio is not None]
    head = ("adc", *ADC_ABLATIONS) if "adc" in ruled else ()
    return (*head, *(method for method in ruled if method != "adc"))


def config_for_ratio(
    method: str, xi: float, num_tokens: int, hidden_size: int, batch_size: int, seed: int = 0
) -> BridgeConfig:
    """The config of `method` whose charged ratio (method.md section 4) comes nearest to `xi`.

    `adc_tokens` / `adc_batch` are ADC's ablations (token selection only / batch merging only); `adc_a<a>` is
    ADC with split exponent a (`adc_a0.25`: T/B = xi**0.25, k/n = xi**0.75). Every other method takes the rule it
    registered with: Top-K's rate leaves room for its indices (values and indices up, values down); C3-SL's R is
    the divisor of the batch size nearest 1/xi; quantization takes round(32 * xi) bits (1 .. 16). A composition
    (`COMPOSED_METHODS`, e.g. `adc+quantize8`) gives its reducer the ratio xi / (codec's ratio): ADC at 0.4 then
    8-bit codes for xi = 0.1.
    """
    if not 0 < xi <= 1:
        raise ValueError(f"xi={xi} is out of range: it must lie in (0, 1].")
    if "+" in method:
        return _composed_for_ratio(method, xi, num_tokens, hidden_size, batch_size, seed)
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
    entry = METHODS.get(method)
    if entry is None or entry.for_ratio is None:
        raise ValueError(
            f"method {method!r} is unknown: choose one of {', '.join(level_methods())}, adc_a<exponent>, or a "
            f"composition like {', '.join(COMPOSED_METHODS)}."
        )
    return entry.for_ratio(xi, num_tokens, hidden_size, batch_size, seed)


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
