"""Compression bridges at the cut, one module per method, each a config dataclass and a `Bridge`."""

from .adc import ADCBridge, ADCConfig, kmeans
from .base import Bridge, BridgeConfig, IdentityBridge, Message


def build_bridge(config: BridgeConfig | None, num_labels: int) -> Bridge:
    """The bridge for `config`; `None` is the uncompressed split."""
    if config is None:
        return IdentityBridge()
    if isinstance(config, ADCConfig):
        return ADCBridge(config, num_labels=num_labels)
    raise TypeError(f"compression={config!r} is not a known bridge config; use None or one of: ADCConfig.")


__all__ = [
    "ADCBridge",
    "ADCConfig",
    "Bridge",
    "BridgeConfig",
    "IdentityBridge",
    "Message",
    "build_bridge",
    "kmeans",
]
