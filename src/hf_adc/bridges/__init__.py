"""Compression bridges at the cut, one module per method, each a config dataclass and a `Bridge`."""

from .adc import ADCBridge, ADCConfig, kmeans
from .base import Bridge, BridgeConfig, IdentityBridge, Message, SeededBridge
from .bottlenet import BottleNetBridge, BottleNetConfig
from .c3sl import C3SLBridge, C3SLConfig
from .composed import ComposedBridge, ComposedConfig
from .levels import COMPOSED_METHODS, LEVEL_METHODS, config_for_ratio
from .quantize import QuantizationConfig, QuantizeBridge
from .topk import RandomTopKBridge, RandomTopKConfig, TopKBridge, TopKConfig

CONFIGS: dict[str, type[BridgeConfig]] = {
    config.method: config
    for config in (ADCConfig, TopKConfig, RandomTopKConfig, BottleNetConfig, C3SLConfig, QuantizationConfig)
}


def config_from_dict(settings: dict) -> BridgeConfig | None:
    """The bridge config recorded by `BridgeConfig.to_dict` (as kept in the halves' configs)."""
    settings = dict(settings)
    method = settings.pop("method", None)
    if method == "none":
        return None
    if method is not None and "+" in method:
        return ComposedConfig(config_from_dict(settings["reducer"]), config_from_dict(settings["codec"]))
    if method not in CONFIGS:
        raise ValueError(f"compression method {method!r} is unknown: choose one of none, {', '.join(CONFIGS)}.")
    return CONFIGS[method](**settings)


def build_bridge(config: BridgeConfig | None, num_tokens: int, hidden_size: int, num_labels: int) -> Bridge:
    """The bridge for `config` at a cut of `num_tokens` x `hidden_size` activations; `None` is uncompressed."""
    if config is None:
        return IdentityBridge()
    if isinstance(config, ComposedConfig):
        parts = [build_bridge(part, num_tokens, hidden_size, num_labels) for part in (config.reducer, config.codec)]
        return ComposedBridge(config, *parts)
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
        f"compression={config!r} is not a known bridge config; use None, ComposedConfig or one of: "
        f"{', '.join(config.__name__ for config in CONFIGS.values())}."
    )


__all__ = [
    "CONFIGS",
    "COMPOSED_METHODS",
    "LEVEL_METHODS",
    "ADCBridge",
    "ADCConfig",
    "BottleNetBridge",
    "BottleNetConfig",
    "Bridge",
    "BridgeConfig",
    "C3SLBridge",
    "C3SLConfig",
    "ComposedBridge",
    "ComposedConfig",
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
    "config_from_dict",
    "config_for_ratio",
    "kmeans",
]
