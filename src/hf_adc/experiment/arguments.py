"""The arguments the recipes and benchmarks share: the data, the model, and the split with its bridge.

`SplitArguments` has one optional flag per knob a registered bridge declares (`--xi`, `--rate`, `--bits`, ...),
typed and documented like the config field it sets; `compression_config` turns the flags into a bridge config.
"""

import math
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import get_type_hints

from transformers import ViTConfig

from ..bridges import BridgeConfig, ComposedConfig
from ..bridges.registry import METHODS, methods_with_role
from ..data import DEFAULT_DATASET
from ..link import WIRE_DTYPES, ChannelConfig, resolve_wire_dtype
from ..privacy.payload_noise import PayloadNoiseConfig


@dataclass
class DataArguments:
    dataset_name: str = field(
        default=DEFAULT_DATASET,
        metadata={"help": "Hub id, local imagefolder / parquet / save_to_disk folder, or 'fashion_mnist' (default)."},
    )
    classes: str | None = field(
        default=None,
        metadata={"help": "Keep only these classes, relabelled 0..k-1: ids or names, e.g. '5-9' or '0,3,Bag'."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep this many test rows."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (found by type if absent)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (found by type if absent)."})
    label_dp_epsilon: float | None = field(
        default=None,
        metadata={
            "help": "Label DP for the standard split: randomized response at this epsilon (> 0) on the training "
            "labels, drawn once before training from a secret seed kept in --output_dir (label_dp_secret.json; never "
            "--seed, which the server knows), reused on resume (hf_adc.privacy.label_dp). Refused with --label_privacy."
        },
    )
    augment: bool = field(
        default=False,
        metadata={
            "help": "Random resized crop and flip on training images. Off by default: on the short fine-tuning "
            "budgets of the main job it cost accuracy (0.835 with it, 0.88 without)."
        },
    )

    def check_label_dp(self, label_privacy: bool) -> None:
        """Raises on a label-DP setting that is out of range, or that a U-shaped split makes pointless."""
        epsilon = self.label_dp_epsilon
        if epsilon is None:
            return
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"label_dp_epsilon={epsilon} is out of range: it must be a finite number > 0.")
        if label_privacy:
            raise ValueError(
                "--label_dp_epsilon randomizes the labels the server reads in the standard split; with "
                "--label_privacy (the U-shaped split) the labels never leave the client, so there is nothing to hide."
            )

    def class_list(self) -> list[int | str] | None:
        if self.classes is None:
            return None
        entries = []
        for part in self.classes.split(","):
            low, _, high = part.strip().partition("-")
            if high and low.isdigit() and high.isdigit():
                if int(low) > int(high):
                    raise ValueError(f"classes range {part!r} is empty: write low-high with low <= high.")
                entries.extend(range(int(low), int(high) + 1))
            else:
                entries.append(int(part) if part.strip().isdigit() else part.strip())
        return entries


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or path of a ViTForImageClassification. Absent: with the default data, a cached ViT "
            "pretrained on Fashion-MNIST classes 0-4 (made on first use); otherwise a small ViT from a config."
        },
    )
    image_size: int = field(default=32, metadata={"help": "From-config model: image size in pixels."})
    patch_size: int = field(default=4, metadata={"help": "From-config model: patch size in pixels."})
    hidden_size: int = field(default=96, metadata={"help": "From-config model: width."})
    num_hidden_layers: int = field(default=6, metadata={"help": "From-config model: encoder layers."})
    num_attention_heads: int = field(default=3, metadata={"help": "From-config model: attention heads."})

    def vit_config(self, num_labels: int) -> ViTConfig:
        return ViTConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=4 * self.hidden_size,
            num_labels=num_labels,
        )


def _compression_methods() -> tuple[str, ...]:
    return ("none", *METHODS)


def _knobs() -> dict[str, list[str]]:
    """Each knob a registered method declares, and the methods that take it, in registration order."""
    users: dict[str, list[str]] = {}
    for method, entry in METHODS.items():
        for knob in entry.knobs:
            users.setdefault(knob, []).append(method)
    return users


def _knob_field(knob: str, methods: list[str]) -> tuple[str, type, object]:
    """The flag of one knob: optional (absent means the config's default), typed and documented like the config
    field it sets, its help prefixed with the methods that take it."""
    config = METHODS[methods[0]].config
    config_field = next(item for item in fields(config) if item.name == knob)
    help_text = f"{', '.join(methods)}: {config_field.metadata.get('help', '')}"
    if config_field.default not in (None, MISSING):
        help_text += f" Absent: {config_field.default}."
    return knob, get_type_hints(config)[knob] | None, field(default=None, metadata={"help": help_text})


class _SplitArgumentsBehaviour:
    """What `SplitArguments` does with its fields (the fields are made below, one per registered knob)."""

    def __post_init__(self):
        resolve_wire_dtype(self.wire_dtype)
        weight = self.nopeek_weight
        if weight is not None and not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"nopeek_weight={weight} is out of range: it must be a finite number > 0.")

    def compression_config(self, seed: int = 0) -> BridgeConfig | None:
        """The bridge config these arguments ask for; knobs of another method are an error, not ignored."""
        reducer, composed, codec = self.compression.partition("+")
        methods = (reducer, codec) if composed else (self.compression,)
        reducers, codecs = methods_with_role("reducer"), methods_with_role("codec")
        if composed and (reducer not in reducers or codec not in codecs):
            raise ValueError(
                f"compression={self.compression!r} is not a reducer ({', '.join(reducers)}) then a codec "
                f"({', '.join(codecs)})."
            )
        if not composed and self.compression not in _compression_methods():
            raise ValueError(
                f"compression={self.compression!r} is unknown: choose one of {', '.join(_compression_methods())}, "
                "or a composition such as adc+quantize."
            )
        given = {name: getattr(self, name, None) for name in sorted(_knobs())}
        knobs = {name: value for name, value in given.items() if value is not None}
        own_knobs = {knob for method in methods if method != "none" for knob in METHODS[method].knobs}
        foreign = sorted(set(knobs) - own_knobs)
        if foreign:
            raise ValueError(f"{', '.join(foreign)} do not apply to --compression {self.compression}.")
        if self.compression == "none":
            return self._with_payload_noise(None)
        configs = []
        for method in methods:
            entry = METHODS[method]
            own = {name: value for name, value in knobs.items() if name in entry.knobs}
            if "seed" in {item.name for item in fields(entry.config)}:
                own["seed"] = seed
            configs.append(entry.config(**own))
        return self._with_payload_noise(ComposedConfig(*configs) if composed else configs[0])

    def _with_payload_noise(self, config: BridgeConfig | None) -> BridgeConfig | None:
        """`config` wrapped in clipped Gaussian noise when `--payload_noise` asks for it. The noise seed is secret
        (None: drawn from the OS every batch, fresh in every process, so a resumed run never reuses a draw), never
        the run's seed, which the server knows."""
        sigma, clip = self.payload_noise, self.payload_clip_norm
        if sigma is None and clip is None:
            if self.payload_noise_in_eval:
                raise ValueError("--payload_noise_in_eval needs --payload_noise and --payload_clip_norm.")
            return config
        if sigma is None or clip is None:
            missing = "payload_clip_norm" if clip is None else "payload_noise"
            raise ValueError(f"--payload_noise and --payload_clip_norm go together: --{missing} is missing.")
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"payload_noise={sigma} is out of range: the noise multiplier must be finite and >= 0.")
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"payload_clip_norm={clip} is out of range: it must be a finite number > 0.")
        in_eval = self.payload_noise_in_eval
        return PayloadNoiseConfig(config, clip_norm=clip, noise_multiplier=sigma, noise_in_eval=in_eval, seed=None)

    def channel_config(self) -> ChannelConfig | None:
        if self.channel not in ("clean", "awgn"):
            raise ValueError(f"channel={self.channel!r} is unknown: choose 'clean' or 'awgn'.")
        if self.channel == "clean":
            if self.snr_db is not None:
                raise ValueError(f"snr_db={self.snr_db!r} needs --channel awgn.")
            return None
        if self.snr_db is None:
            raise ValueError("--channel awgn needs --snr_db (e.g. 20, or a range 10,30).")
        values = [float(value) for value in self.snr_db.split(",")]
        if len(values) not in (1, 2):
            raise ValueError(f"snr_db={self.snr_db!r} must be one value or a range 'low,high'.")
        return ChannelConfig(snr_db=values[0] if len(values) == 1 else tuple(values))

    def validate(self) -> None:
        """Raises now on a bad compression or channel setting, before any model is loaded or made."""
        self.compression_config()
        self.channel_config()


LABEL_PRIVACY_HELP = (
    "A U-shaped split: the client keeps the head (final layernorm, classifier) and computes the loss, so no label "
    "crosses the cut; the server returns what the head needs (hf_adc.ushape)."
)
HEAD_LAYERS_HELP = "With --label_privacy: the last encoder layers the client's head keeps (0 .. layers - split - 1)."

PAYLOAD_NOISE_HELP = (
    "Clipped Gaussian noise on the payload, around the chosen compression (hf_adc.privacy.payload_noise): the noise "
    "multiplier sigma >= 0 (std sigma x --payload_clip_norm; 0: clipping alone). Both sides must give the same."
)
PAYLOAD_CLIP_HELP = "With --payload_noise: the L2 norm C (> 0) each sent row is clipped to."
PAYLOAD_EVAL_HELP = "With --payload_noise: noise evaluation and split-inference payloads too (else unprotected)."
NOPEEK_HELP = (
    "NoPeek (hf_adc.privacy.nopeek): add this weight (> 0) times the distance correlation of each training batch's "
    "images and the client half's output to the loss; an empirical defence, no epsilon. Client side only."
)


def _split_arguments() -> type:
    reducers, codecs = methods_with_role("reducer"), methods_with_role("codec")
    compression_help = (
        f"Bridge at the cut, one of: {', '.join(_compression_methods())}; or a reducer ({', '.join(reducers)}) "
        f"then a codec ({', '.join(codecs)}), e.g. adc+quantize."
    )
    wire_help = (
        "Dtype every floating-point tensor crosses the cut in, whatever --bf16 / --fp16 compute in: "
        f"one of {', '.join(WIRE_DTYPES)}."
    )
    head = [
        ("split_layer", int, field(default=2, metadata={"help": "Encoder layers on the client (1 .. layers - 1)."})),
        ("compression", str, field(default="adc", metadata={"help": compression_help})),
        ("label_privacy", bool, field(default=False, metadata={"help": LABEL_PRIVACY_HELP})),
        ("head_layers", int, field(default=0, metadata={"help": HEAD_LAYERS_HELP})),
    ]
    tail = [
        ("channel", str, field(default="clean", metadata={"help": "Channel at the cut: 'clean' or 'awgn'."})),
        ("snr_db", str | None, field(default=None, metadata={"help": "AWGN SNR in dB: '20', or a range '10,30'."})),
        ("wire_dtype", str, field(default="float32", metadata={"help": wire_help})),
        ("payload_noise", float | None, field(default=None, metadata={"help": PAYLOAD_NOISE_HELP})),
        ("payload_clip_norm", float | None, field(default=None, metadata={"help": PAYLOAD_CLIP_HELP})),
        ("payload_noise_in_eval", bool, field(default=False, metadata={"help": PAYLOAD_EVAL_HELP})),
        ("nopeek_weight", float | None, field(default=None, metadata={"help": NOPEEK_HELP})),
    ]
    knobs = [_knob_field(knob, methods) for knob, methods in _knobs().items()]
    return make_dataclass(
        "SplitArguments",
        [*head, *knobs, *tail],
        bases=(_SplitArgumentsBehaviour,),
        namespace={
            "__module__": __name__,
            "__doc__": "Where the model is cut, the bridge at the cut (one flag per registered knob), the channel "
            "and the wire dtype, the payload noise around the bridge, and NoPeek on the client.",
        },
    )


# Made from the registry when this module is first imported: a bridge registered before then has its flags.
SplitArguments = _split_arguments()
