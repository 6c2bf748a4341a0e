"""Compression bridges at the cut, one module per method, each a config dataclass and a `Bridge`."""

from .adc import ADCBridge, ADCConfig, kmeans
from .base import Bridge, BridgeConfig, IdentityBridge, Message, SeededBridge
from .bottlenet import BottleNetBridge, BottleNetConfig
from .c3sl import C3SLBridge, C3SLConfig
from .levels import LEVEL_METHODS, config_for_ratio
from .quantize import QuantizationConfig, QuantizeBridge
from .topk import RandomTopKBridge, RandomTopKConfig, TopKBridge, TopKConfig

CONFIGS: dict[str, type[BridgeConfig]] = {
    config.method: config
    for config in (ADCConfig, TopKConfig, RandomTopKConfig, BottleNetConfig, C3SLConfig, QuantizationConfig)
}


def build_bridge(config: BridgeConfig | None, num_tokens: int, hidden_size: int, num_labels: int) -> Bridge:
    """The bridge for `config` at a cut of `num_tokens` x `hidden_size` activations; `None` is uncompressed."""
    if config is None:
        return IdentityBridge()
    if isinstance(config, ADCConfig):
        return ADCBridge(config, num_labels=num_labels)
    if isinstance(config, RandomTopKConfig):
        return RandomTopKBridge(config)
    if isinstance(config, TopKConfig):
        return TopKBridge(config)
    if isinstance(config, BottleNetConfig):
        return BottleNetBridge(config, hidden_size=hidden_size)
    if isinstance(config, C3SLConfig):
        return C3SLBridge(config, num_tokens=num_tokens, hidden_size=hidden_size)
    if isinstance(config, QuantizationConfig):
        return QuantizeBridge(config)
    raise TypeError(
        f"compression={config!r} is not a known bridge config; use None or one of: "
        f"{', '.join(config.__name__ for config in CONFIGS.values())}."
    )


__all__ = [
    "CONFIGS",
    "LEVEL_METHODS",
    "ADCBridge",
    "ADCConfig",
    "BottleNetBridge",
    "BottleNetConfig",
    "Bridge",
    "BridgeConfig",
    "C3SLBridge",
    "C3SLConfig",
    "IdentityBridge",
    "Message",
    "QuantizationConfig",
    "QuantizeBridge",
    "RandomTopKBridge",
    "RandomTopKConfig",
    "SeededBridge",
    "TopKBridge",
    "TopKConfig",
    "build_bridge",
    "config_for_ratio",
    "kmeans",
]
