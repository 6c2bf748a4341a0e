"""`split_vit`: cut a `ViTForImageClassification` into client and server halves with a bridge between."""

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ViTConfig, ViTForImageClassification
from transformers.utils import ModelOutput

from .bridges import Bridge, BridgeConfig, IdentityBridge, build_bridge, config_from_dict
from .hub import load_pretrained, push_halves
from .link import ChannelConfig, CommunicationRecord, Ledger, Link, nbytes, wire_dtype_name
from .modeling import ViTClientConfig, ViTClientModel, ViTServerConfig, ViTServerModel

SPLIT_CONFIG_NAME = "split_config.json"
BRIDGE_WEIGHTS_NAME = "bridge.safetensors"
SERVER_BRIDGE_WEIGHTS_NAME = "server_bridge.safetensors"  # the server side of a bridge trained across processes
USHAPED_TOPOLOGY = "u-shaped"  # what `split_vit(..., label_privacy=True)` builds (`hf_adc.ushape` registers it)


@dataclass(frozen=True)
class Topology:
    """A split other than the standard one, registered by the module that defines it (`register_topology`):
    `split(model, split_layer, head_layers, bridge, link, settings)` cuts a model `split_vit` has checked, sharing
    its modules; `load(directory, settings, **kwargs)` reads back what its `save_pretrained` wrote."""

    split: Callable[..., "SplitViTForImageClassification"]
    load: Callable[..., "SplitViTForImageClassification"]


# Topology name, as `split_config.json` records it -> its `Topology`. The modules that build on this one register
# here when imported, so that this one never imports them: `hf_adc.ushape` (which `import hf_adc` imports)
# registers `USHAPED_TOPOLOGY`.
TOPOLOGIES: dict[str, Topology] = {}


def register_topology(name: str, topology: Topology) -> None:
    """Lets `SplitViTForImageClassification.from_pretrained` read splits of topology `name` (and `split_vit` build
    them with `label_privacy=True`, for `USHAPED_TOPOLOGY`)."""
    TOPOLOGIES[name] = topology


def _topology(name: str) -> Topology:
    """The registered topology `name`, or a refusal that lists the known ones."""
    if name not in TOPOLOGIES:
        raise ValueError(
            f"no split of topology {name!r} is registered (known: {', '.join(['standard', *TOPOLOGIES])}); import "
            "the module that defines it."
        )
    return TOPOLOGIES[name]


@dataclass
class SplitViTOutput(ModelOutput):
    """
    loss: soft-target cross-entropy averaged over what the server trained on (T merged samples under ADC)
        in training; ordinary cross-entropy in eval.
    logits: `(T, num_labels)` in training (one row per sent sample), `(B, num_labels)` in eval.
    targets: the label distributions the server trained on, `(T, num_labels)`; training only.
    cluster_ids: the cluster of each sample in the batch, `(B,)`; training with ADC only.
    token_indices: the tokens each cluster kept, CLS first, `(T, k)`; training with ADC only.
    communication: the bytes of this step (downlink filled in by backward); training only.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    targets: torch.FloatTensor | None = None
    cluster_ids: torch.LongTensor | None = None
    token_indices: torch.LongTensor | None = None
    communication: CommunicationRecord | None = None


def _half_config(config_class: type, config: ViTConfig, split_layer: int, compression: dict | None, **extra):
    """The config of one part of a split of `config`'s model, recording the cut, the base model and the compression
    (and `extra` fields, such as the U-shaped split's `head_layers`)."""
    fields = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        fields.pop(key, None)
    half = config_class(
        **fields,
        split_layer=split_layer,
        base_model_name_or_path=config._name_or_path or None,
        compression=compression,
        **extra,
    )
    half._attn_implementation = config._attn_implementation
    return half


def load_bridge_and_link(
    directory: Path, settings: dict, client: ViTClientModel, num_labels: int
) -> tuple[Bridge, Link]:
    """The bridge (with the weights saved next to the parts, if any) and the link recorded in `settings`."""
    bridge = build_bridge(
        config_from_dict(settings["compression"]),
        num_tokens=client.embeddings.patch_embeddings.num_patches + 1,
        hidden_size=client.config.hidden_size,
        num_labels=num_labels,
    ).to(client.device, client.dtype)
    state = {}
    for name in (BRIDGE_WEIGHTS_NAME, SERVER_BRIDGE_WEIGHTS_NAME):
        if (directory / name).exists():
            state.update(load_file(directory / name, device=str(client.device)))
    if state:
        bridge.load_state_dict(state)
    channel = ChannelConfig(**settings["channel"]) if settings["channel"] else None
    return bridge, Link(channel, settings.get("wire_dtype", "float32"))


def soft_targets(labels: torch.Tensor, num_labels: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """The label distributions to train on: soft labels renormalised in float32, or class ids one-hot, mixed
    with the uniform distribution by `label_smoothing`."""
    if labels.is_floating_point():
        targets = labels.float() / labels.float().sum(dim=1, keepdim=True)
    else:
        targets = F.one_hot(labels, num_labels).float()
    return targets * (1 - label_smoothing) + label_smoothing / num_labels


class SplitViTForImageClassification(nn.Module):
    """A ViT image classifier cut in two: `client` -> `bridge.encode` -> `link` -> `bridge.decode` -> `server`.

    In training mode the bridge compresses, the link charges every byte in `ledger`, and the loss is the
    soft-target cross-entropy over what the server received. In eval mode nothing is compressed or charged:
    the two halves compute exactly the unsplit model's logits (a learned bottleneck, BottleNet++, stays in).

    A plain `nn.Module` on purpose: the `Trainer` saves and restores its state dict as is (see hf-notes on
    the resume trap of `ViTModel`), while each half stays a normal `PreTrainedModel`.
    """

    main_input_name = "pixel_values"

    def __init__(self, client: ViTClientModel, server: ViTServerModel, bridge: Bridge, link: Link):
        super().__init__()
        self.client = client
        self.bridge = bridge
        self.link = link
        self.server = server

    def parts(self) -> dict[str, nn.Module]:
        """The model's parts by folder name, as `save_pretrained` writes them: `client` and `server` (across
        processes each side holds only its own, the other is None)."""
        return {"client": self.client, "server": self.server}

    def split_settings(self) -> dict:
        """What `split_config.json` records: the cut, the compression, the channel and the wire dtype."""
        return {
            "split_layer": self.client.config.split_layer,
            "compression": self.client.config.compression,
            "channel": asdict(self.link.channel) if self.link.channel else None,
            "wire_dtype": wire_dtype_name(self.link.wire_dtype),
        }

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """Saves `client/` and `server/` (each part in `parts()`) as normal checkpoints, the bridge's weights (if
        it has any) and `split_config.json` (compression and channel settings). `kwargs` go to each part's
        `save_pretrained`. Across processes each side saves what it holds (the client side has no `server` half)."""
        directory = Path(save_directory)
        for name, part in self.parts().items():
            if part is not None:
                part.save_pretrained(directory / name, **kwargs)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.bridge.state_dict().items()}
        if state:
            save_file(state, directory / BRIDGE_WEIGHTS_NAME)
        (directory / SPLIT_CONFIG_NAME).write_text(json.dumps(self.split_settings(), indent=2))

    @staticmethod
    def read_settings(directory: str | Path) -> dict:
        """The `split_config.json` of a folder written by `save_pretrained`."""
        directory = Path(directory)
        if not (directory / SPLIT_CONFIG_NAME).exists():
            raise FileNotFoundError(
                f"{directory} has no {SPLIT_CONFIG_NAME}: it is not a folder written by "
                "SplitViTForImageClassification.save_pretrained."
            )
        return json.loads((directory / SPLIT_CONFIG_NAME).read_text())

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> "SplitViTForImageClassification":
        """Loads what `save_pretrained` wrote, a U-shaped split included (`split_config.json` records the
        topology); `kwargs` go to each part's `from_pretrained`."""
        directory = Path(directory)
        settings = cls.read_settings(directory)
        if settings.get("topology", "standard") != "standard":
            return _topology(settings["topology"]).load(directory, settings, **kwargs)
        client = ViTClientModel.from_pretrained(directory / "client", **kwargs)
        server = ViTServerModel.from_pretrained(directory / "server", **kwargs)
        bridge, link = load_bridge_and_link(directory, settings, client, server.config.num_labels)
        return cls(client, server, bridge, link)

    def push_to_hub(self, client_repo_id: str, server_repo_id: str, **kwargs) -> dict[str, str]:
        """Pushes each half to its own repo with a model card (see `hf_adc.hub.push_halves` for `kwargs`:
        `image_processor`, `dataset`, `private`, `token`, `commit_message`)."""
        return push_halves(self, client_repo_id, server_repo_id, **kwargs)

    @property
    def ledger(self) -> Ledger:
        return self.link.ledger

    @property
    def num_labels(self) -> int:
        return (self.client or self.server).config.num_labels

    @property
    def num_tokens(self) -> int:
        """Tokens per sample at the cut (patches plus CLS) at the configured image size."""
        return self.client.embeddings.patch_embeddings.num_patches + 1

    def wire_bytes(self, batch_size: int, compressed: bool = True) -> tuple[int, int]:
        """(uplink, downlink) bytes one training batch sends in the link's wire dtype, through this bridge or
        (`compressed=False`) through the uncompressed split, with the link's own control values (none in one
        process)."""
        bridge = self.bridge if compressed else IdentityBridge()
        element_size = self.link.wire_dtype.itemsize
        up, down = bridge.wire_bytes(
            batch_size, self.num_tokens, self.client.config.hidden_size, self.num_labels, element_size
        )
        control_up, control_down = self.link.control_bytes
        return up + control_up, down + control_down

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Recomputes each half's layer activations in backward instead of keeping them (what the `Trainer`
        calls for `--gradient_checkpointing`)."""
        for part in self.parts().values():
            part.activation_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def activation_checkpointing_disable(self) -> None:
        for part in self.parts().values():
            part.activation_checkpointing_disable()

    @torch.no_grad()
    def client_payload(self, pixel_values: torch.Tensor, keep_tokens: float | None = None) -> torch.Tensor:
        """Split inference, client side: what the client sends for `pixel_values` (in the wire dtype), charged
        in `link.inference_ledger` (never in the training ledger a budget is spent from).

        With `keep_tokens` in (0, 1], each sample keeps CLS plus its top round(keep_tokens * n) - 1 tokens by
        its own CLS attention row at the cut (token selection at inference; batch merging cannot apply).
        """
        if keep_tokens is not None and not 0 < keep_tokens <= 1:
            raise ValueError(f"keep_tokens={keep_tokens} is out of range: it must lie in (0, 1].")
        self._check_inputs(pixel_values, None, interpolate_pos_encoding=False)
        output = self.client(pixel_values, output_cls_attention=keep_tokens is not None)
        payload = self.bridge.encode(output.last_hidden_state, None).hidden_states
        ledger = self.link.inference_ledger
        ledger.uncompressed_uplink_bytes += self.link.activation_bytes(output.last_hidden_state.numel())
        if keep_tokens is not None:
            kept = min(max(round(keep_tokens * payload.shape[1]), 1), payload.shape[1])
            top = output.cls_attention[:, 1:].topk(kept - 1, dim=1).indices.sort(dim=1).values + 1
            indices = torch.cat([torch.zeros_like(top[:, :1]), top], dim=1)
            payload = payload.gather(1, indices.unsqueeze(-1).expand(-1, -1, payload.shape[-1]))
        payload = self.link.send({"activations": payload})["activations"]
        ledger.uplink_bytes += nbytes(payload)
        return payload

    @torch.no_grad()
    def server_logits(self, payload: torch.Tensor) -> torch.Tensor:
        """Split inference, server side: logits for a client payload; the logits going back (in the wire dtype)
        are charged in `link.inference_ledger`."""
        logits = self.server(self.bridge.decode(payload.to(self.server.dtype))).logits
        logits = self.link.send({"logits": logits})["logits"]
        self.link.inference_ledger.downlink_bytes += nbytes(logits)
        self.link.inference_ledger.uncompressed_downlink_bytes += nbytes(logits)
        return logits

    def _check_inputs(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None, interpolate_pos_encoding: bool
    ) -> None:
        config = self.client.config
        size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
        expected = (config.num_channels, *size)
        if pixel_values.dim() != 4 or (
            tuple(pixel_values.shape[1:]) != expected
            and not (interpolate_pos_encoding and pixel_values.shape[1] == config.num_channels)
        ):
            expected_text = ", ".join(map(str, expected))
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected (batch, {expected_text}).")
        if labels is None:
            return
        if labels.shape != pixel_values.shape[:1] or labels.is_floating_point():
            raise ValueError(
                f"labels must be integer class ids of shape ({pixel_values.shape[0]},); got dtype {labels.dtype} "
                f"and shape {tuple(labels.shape)}."
            )
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_labels:
            bad = low if low < 0 else high
            raise ValueError(f"label {bad} is out of range: labels must lie in [0, {self.num_labels}).")

    def _client_side(self, pixel_values, labels, interpolate_pos_encoding: bool, label_smoothing: float):
        """Checks the inputs, runs the client half and the bridge's encoder: the client's uncompressed activations
        and the message it puts on the link."""
        self._check_inputs(pixel_values, labels, interpolate_pos_encoding)
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing={label_smoothing} is out of range: it must lie in [0, 1).")
        client_output = self.client(
            pixel_values,
            output_cls_attention=self.training and self.bridge.needs_cls_attention,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        hidden_states = client_output.last_hidden_state
        return hidden_states, self.bridge.encode(hidden_states, labels, client_output.cls_attention)

    def _targets(self, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        """The distributions the loss is taken against: soft labels normalised (ADC's merged ones) or class ids
        one-hot, mixed with the uniform distribution by `label_smoothing`."""
        return soft_targets(labels, self.num_labels, label_smoothing)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        label_smoothing: float = 0.0,
    ) -> SplitViTOutput:
        """`label_smoothing` in [0, 1) mixes the server's targets with the uniform distribution (the soft
        labels of merged samples too), as `--label_smoothing_factor` asks."""
        hidden_states, message = self._client_side(pixel_values, labels, interpolate_pos_encoding, label_smoothing)
        if not self.training:
            logits = self.server(self.bridge.decode(message.hidden_states)).logits
            loss = None if labels is None else F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
            return SplitViTOutput(loss=loss, logits=logits)
        if labels is None:
            raise ValueError("A training step needs labels: the server computes the loss. Call .eval() to infer.")

        received, sent_labels, record = self.link.transmit(message, self.bridge, hidden_states.numel(), labels)
        targets = self._targets(sent_labels, label_smoothing)
        server_output = self.server(self.bridge.decode(received.to(self.server.dtype)), labels=targets)
        return SplitViTOutput(
            loss=server_output.loss,
            logits=server_output.logits,
            targets=targets,
            cluster_ids=message.cluster_ids,
            token_indices=message.token_indices,
            communication=record,
        )


def split_vit(
    model: ViTForImageClassification | str,
    split_layer: int,
    compression: BridgeConfig | None = None,
    channel: ChannelConfig | None = None,
    wire_dtype: str | torch.dtype = "float32",
    label_privacy: bool = False,
    head_layers: int = 0,
) -> SplitViTForImageClassification:
    """Cuts `model` after `split_layer` encoder layers, sharing its modules (no weight is copied).

    `model` is a `ViTForImageClassification` or a Hub id / local path to load one from. `compression` picks
    the bridge (`None`: uncompressed; `ADCConfig(xi=...)`: ADC; or a baseline: `TopKConfig`, `RandomTopKConfig`,
    `BottleNetConfig`, `C3SLConfig`, `QuantizationConfig`; or a reducer then a codec, `ComposedConfig`); `channel`
    adds noise to what crosses.
    `wire_dtype` (`"float32"`, `"bfloat16"` or `"float16"`) is the dtype every floating-point tensor crosses
    in, whatever the model computes in (bf16 autocast included): it fixes the bytes charged and planned.
    `label_privacy=True` makes the split U-shaped (`hf_adc.ushape`): the client also keeps the last `head_layers`
    layers, the final layernorm and the classifier, and computes the loss itself, so no label crosses.
    """
    if isinstance(model, str):
        model = load_pretrained(ViTForImageClassification, model)
    if not isinstance(model, ViTForImageClassification):
        raise TypeError(
            f"split_vit needs a transformers ViTForImageClassification (or its Hub id / path); "
            f"got {type(model).__name__}."
        )
    num_layers = model.config.num_hidden_layers
    if isinstance(split_layer, bool) or not isinstance(split_layer, int) or not 1 <= split_layer < num_layers:
        raise ValueError(
            f"split_layer={split_layer!r} is out of range: a ViT with {num_layers} layers can be cut after "
            f"layer 1 .. {num_layers - 1}."
        )
    bridge = build_bridge(
        compression,
        num_tokens=model.vit.embeddings.patch_embeddings.num_patches + 1,
        hidden_size=model.config.hidden_size,
        num_labels=model.config.num_labels,
    ).to(model.device, model.dtype)
    link = Link(channel, wire_dtype)
    settings = compression.to_dict() if compression is not None else {"method": "none"}
    if label_privacy:
        return _topology(USHAPED_TOPOLOGY).split(model, split_layer, head_layers, bridge, link, settings)
    if head_layers != 0:
        raise ValueError(
            f"head_layers={head_layers!r} keeps layers in a client-side head, which only a U-shaped split has: pass "
            "label_privacy=True too, or leave head_layers at 0."
        )
    client_config = _half_config(ViTClientConfig, model.config, split_layer, settings)
    server_config = _half_config(ViTServerConfig, model.config, split_layer, settings)
    with torch.device("meta"):
        client = ViTClientModel(client_config)
        server = ViTServerModel(server_config)
    client.embeddings = model.vit.embeddings
    client.layers = nn.ModuleList(model.vit.layers[:split_layer])
    server.layers = nn.ModuleList(model.vit.layers[split_layer:])
    server.layernorm = model.vit.layernorm
    server.classifier = model.classifier
    return SplitViTForImageClassification(client, server, bridge, link)
