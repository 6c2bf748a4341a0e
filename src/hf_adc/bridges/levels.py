"""Each method's setting nearest to a total compression ratio xi, for comparing methods level by level."""

import math

from .adc import ADCConfig
from .base import BridgeConfig
from .bottlenet import BottleNetConfig
from .c3sl import C3SLConfig
from .quantize import QuantizationConfig
from .topk import RandomTopKConfig, TopKConfig

LEVEL_METHODS = ("adc", "adc_tokens", "adc_batch", "topk", "randomtopk", "bottlenet", "c3sl", "quantize")


def _nearest_divisor(batch_size: int, target: float) -> int:
    divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
    return min(divisors, key=lambda d: abs(math.log(d) - math.log(target)))


def config_for_ratio(
    method: str, xi: float, num_tokens: int, hidden_size: int, batch_size: int, seed: int = 0
) -> BridgeConfig:
    """The config of `method` whose charged ratio (method.md section 4) comes nearest to `xi`.

    `adc_tokens` / `adc_batch` are ADC's ablations (token selection only / batch merging only). Top-K's rate
    leaves room for its indices (values and indices up, values down); C3-SL's R is the divisor of the batch
    size nearest 1/xi; quantization takes round(32 * xi) bits (1 .. 16).
    """
    if not 0 < xi <= 1:
        raise ValueError(f"xi={xi} is out of range: it must lie in (0, 1].")
    if method == "adc":
        return ADCConfig(xi=xi, seed=seed)
    if method == "adc_tokens":
        return ADCConfig(batch_ratio=1.0, token_ratio=xi, seed=seed)
    if method == "adc_batch":
        return ADCConfig(batch_ratio=xi, token_ratio=1.0, seed=seed)
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
    raise ValueError(f"method {method!r} is unknown: choose one of {', '.join(LEVEL_METHODS)}.")
