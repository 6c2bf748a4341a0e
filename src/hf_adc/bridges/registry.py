"""The one table of compression methods: each bridge registers its config, its bridge and its knobs once.

Everything that lists or dispatches on methods reads this table: `CONFIGS`, `build_bridge` and
`config_from_dict` (in `hf_adc.bridges`), the composition rules (`ComposedConfig`), the ratio planner
(`config_for_ratio`, `LEVEL_METHODS`) and the recipes' `--compression` and knob flags (`SplitArguments`). The
built-in methods register in `hf_adc/bridges/__init__.py`; a new bridge is its own module plus one
`register_bridge` call (PEFT's `register_peft_method` is the model).
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Literal

from .base import Bridge, BridgeConfig

Role = Literal["reducer", "codec"]
# What a bridge's constructor may take besides its config: the shape of the cut it sits at.
CUT_SIZES = ("num_tokens", "hidden_size", "num_labels")


@dataclass(frozen=True)
class BridgeMethod:
    """One registered compression method.

    `knobs` are the config fields the recipes expose as flags (`--xi`, `--rate`, ...); `role` says where it fits
    in a composition (a reducer sends fewer samples, tokens or values; a codec codes each value or token in fewer
    bytes); `cut_sizes` are the sizes of the cut its bridge's constructor takes; `for_ratio(xi, num_tokens,
    hidden_size, batch_size, seed)` is its setting nearest a total ratio xi (for the planner); `refuses` maps a codec
    method this reducer cannot feed to the reason.
    """

    config: type[BridgeConfig]
    bridge: type[Bridge]
    knobs: tuple[str, ...] = ()
    role: Role | None = None
    cut_sizes: tuple[str, ...] = ()
    for_ratio: Callable[..., BridgeConfig] | None = None
    refuses: Mapping[str, str] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config.method

    def build(self, config: BridgeConfig, num_tokens: int, hidden_size: int, num_labels: int) -> Bridge:
        sizes = {"num_tokens": num_tokens, "hidden_size": hidden_size, "num_labels": num_labels}
        return self.bridge(config, **{name: sizes[name] for name in self.cut_sizes})


METHODS: dict[str, BridgeMethod] = {}
# method name -> config class, kept in step with METHODS (public as `hf_adc.bridges.CONFIGS`).
CONFIGS: dict[str, type[BridgeConfig]] = {}
# Stages that wrap a whole bridge (a defence such as `hf_adc.privacy.PayloadNoiseConfig`): method name -> config class.
# Such a config holds the wrapped config in its field `compression` (None: the uncompressed split) and builds its
# bridge with `wrap(inner_bridge)`; it is no compression method, so it is listed apart from METHODS.
WRAPPERS: dict[str, type[BridgeConfig]] = {}


def register_bridge(
    *,
    config: type[BridgeConfig],
    bridge: type[Bridge],
    knobs: tuple[str, ...] = (),
    role: Role | None = None,
    cut_sizes: tuple[str, ...] = (),
    for_ratio: Callable[..., BridgeConfig] | None = None,
    refuses: Mapping[str, str] | None = None,
) -> BridgeMethod:
    """Registers a compression method under `config.method` (the name on the command line and in checkpoints)."""
    method = config.method
    if not isinstance(method, str) or not method or "+" in method or method == "none":
        raise ValueError(f"{config.__name__}.method={method!r} cannot name a method: give one without '+', not 'none'.")
    if method in METHODS:
        raise ValueError(f"compression method {method!r} is registered already (by {METHODS[method].config.__name__}).")
    if role not in (None, "reducer", "codec"):
        raise ValueError(f"role={role!r} is unknown: choose 'reducer', 'codec' or None.")
    config_fields = {item.name for item in fields(config)}
    unknown = [knob for knob in knobs if knob not in config_fields]
    if unknown:
        raise ValueError(f"knobs {unknown} are not fields of {config.__name__}: choose among {sorted(config_fields)}.")
    if not set(cut_sizes) <= set(CUT_SIZES):
        raise ValueError(f"cut_sizes={cut_sizes} must be among {', '.join(CUT_SIZES)}.")
    entry = BridgeMethod(config, bridge, tuple(knobs), role, tuple(cut_sizes), for_ratio, dict(refuses or {}))
    METHODS[method] = entry
    CONFIGS[method] = config
    return entry


def register_wrapper(config: type[BridgeConfig]) -> None:
    """Lets `build_bridge` and `config_from_dict` handle `config`, a stage around any bridge (see `WRAPPERS`)."""
    method = config.method
    if method in METHODS or WRAPPERS.get(method, config) is not config:
        raise ValueError(f"method {method!r} is registered already; give the wrapper {config.__name__} another name.")
    WRAPPERS[method] = config


def method_of(config: BridgeConfig) -> BridgeMethod | None:
    """The registered method of a config instance (its `method`, with a class that fits), or None."""
    entry = METHODS.get(getattr(config, "method", None))
    return entry if entry is not None and isinstance(config, entry.config) else None


def methods_with_role(role: Role) -> tuple[str, ...]:
    """The registered methods of one role, in registration order."""
    return tuple(method for method, entry in METHODS.items() if entry.role == role)
