"""Compression bridges at the cut, one module per method, each a config dataclass and a `Bridge`, registered once
below (`register_bridge`: config, bridge, flags, role in a composition, setting for a ratio)."""

from .adc import ADCBridge, ADCConfig, adc_for_ratio, kmeans
from .base import Bridge, BridgeConfig, IdentityBridge, Message, SeededBridge
from .bottlenet import BottleNetBridge, BottleNetConfig, bottlenet_for_ratio
from .c3sl import C3SLBridge, C3SLConfig, c3sl_for_ratio
from .composed import ComposedBridge, ComposedConfig
from .levels import COMPOSED_METHODS, config_for_ratio, level_methods
from .quantize import QuantizationConfig, QuantizeBridge, quantize_for_ratio
from .registry import CONFIGS, WRAPPERS, BridgeMethod, method_of, register_bridge, register_wrapper
from .topk import RandomTopKBridge, RandomTopKConfig, TopKBridge, TopKConfig, randomtopk_for_ratio, topk_for_ratio

register_bridge(
    config=ADCConfig, bridge=ADCBridge, knobs=("xi", "batch_ratio", "token_ratio", "split_exponent", "kmeans_iters"),
    role="reducer", cut_sizes=("num_labels",), for_ratio=adc_for_ratio,
)  # fmt: skip
register_bridge(
    config=TopKConfig, bridge=TopKBridge, knobs=("rate",), role="reducer", for_ratio=topk_for_ratio,
    refuses={"bottlenet": "BottleNet++ encodes whole tokens, and Top-K keeps scattered values; compose Top-K with "
                          "quantization, or ADC with BottleNet++."},
)  # fmt: skip
register_bridge(
    config=RandomTopKConfig, bridge=RandomTopKBridge, knobs=("rate", "random_portion"), role="reducer",
    for_ratio=randomtopk_for_ratio,
)  # fmt: skip
register_bridge(
    config=BottleNetConfig, bridge=BottleNetBridge, knobs=("ratio",), role="codec", cut_sizes=("hidden_size",),
    for_ratio=bottlenet_for_ratio,
)  # fmt: skip
register_bridge(
    config=C3SLConfig, bridge=C3SLBridge, knobs=("R",), cut_sizes=("num_tokens", "hidden_size"),
    for_ratio=c3sl_for_ratio,
)  # fmt: skip
register_bridge(
    config=QuantizationConfig, bridge=QuantizeBridge, knobs=("bits",), role="codec", for_ratio=quantize_for_ratio
)


def config_from_dict(settings: dict) -> BridgeConfig | None:
    """The bridge config recorded by `BridgeConfig.to_dict` (as kept in the halves' configs)."""
    settings = dict(settings)
    method = settings.pop("method", None)
    if method == "none":
        return None
    if method in WRAPPERS:
        return WRAPPERS[method](compression=config_from_dict(settings.pop("compression")), **settings)
    if method is not None and "+" in method:
        return ComposedConfig(config_from_dict(settings["reducer"]), config_from_dict(settings["codec"]))
    if method not in CONFIGS:
        raise ValueError(f"compression method {method!r} is unknown: choose one of none, {', '.join(CONFIGS)}.")
    return CONFIGS[method](**settings)


def build_bridge(config: BridgeConfig | None, num_tokens: int, hidden_size: int, num_labels: int) -> Bridge:
    """The bridge for `config` at a cut of `num_tokens` x `hidden_size` activations; `None` is uncompressed."""
    if config is None:
        return IdentityBridge()
    if isinstance(config, tuple(WRAPPERS.values())):
        return config.wrap(build_bridge(config.compression, num_tokens, hidden_size, num_labels))
    if isinstance(config, ComposedConfig):
        parts = [build_bridge(part, num_tokens, hidden_size, num_labels) for part in (config.reducer, config.codec)]
        return ComposedBridge(config, *parts)
    entry = method_of(config)
    if entry is None:
        raise TypeError(
            f"compression={config!r} is not a known bridge config; use None, ComposedConfig or one of: "
            f"{', '.join(config.__name__ for config in CONFIGS.values())}."
        )
    return entry.build(config, num_tokens, hidden_size, num_labels)


def __getattr__(name: str):
    if name == "LEVEL_METHODS":  # read from the registry when asked, so that a method registered later is listed
        return level_methods()
    raise AttributeError(f"module 'hf_adc.bridges' has no attribute {name!r}")


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
    "BridgeMethod",
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
    "register_bridge",
    "register_wrapper",
]
