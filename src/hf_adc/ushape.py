"""The U-shaped split: labels that never leave the client (`split_vit(..., label_privacy=True)`).

    pixel_values ─► bottom ─► bridge.encode ─► link ─► bridge.decode ─► middle ─► link ─► head ─► loss
                   (client)   (client: ADC       │       (server)        (server)   │    (client: last head_layers
                               merges targets    │                                   │     layers, layernorm,
                               from its own ids) │                                   │     classifier, loss)
                                   activations up ┘              head_activations down┘
    gradient: head_gradients go up the second cut, gradients come down the first through the bridge as today.

What crosses, and under which names in the `CommunicationRecord` and the `Ledger`:

- up the first cut, in forward: the bridge's wire form of the activations (`activations`, or codes, values and
  indices, ...), exactly as in the standard split, but no `labels` entry: the class ids, and ADC's soft labels
  (merged on the client from its own cluster ids, exactly as the server merges them in the standard split), stay
  on the client, which computes the targets, the logits and the loss;
- down the second cut, in forward: `head_activations`, what the server's last layer computed, as the head needs
  it: the CLS row of each sample (T x 1 x d under ADC) when `head_layers` is 0, or every token it holds (T x k x d)
  when the head keeps layers of its own. It is a function of the activations the server received and of the
  server's weights only; no label went into it;
- up the second cut, in backward: `head_gradients`, the gradient of the loss with respect to `head_activations`;
- down the first cut, in backward: the bridge's gradient (`gradients`, or its codes), as in the standard split.

No label tensor crosses, but gradients are computed from the labels: `head_gradients` (and every gradient after
it) depend on them, as in any split trained by backpropagation, so label inference from gradients (e.g. from their
norms or directions) is not ruled out. The classifier stays on the client, so the server cannot read the classes
off the gradient of a known classifier.

The uncompressed counterfactual, against which `Ledger.ratio` is measured, is the uncompressed U-shaped split:
every activation up the first cut and its gradient down (B x n x d each), the CLS row (B x d) or, with head layers,
every token (B x n x d) of every sample down the second cut and its gradient up, and no labels. The second cut is
not compressed by the bridge: it crosses in the link's wire dtype (and through its channel).

Evaluation runs the same parts uncompressed and charges nothing; the logits are computed on the client.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTForImageClassification

from .bridges import Bridge, IdentityBridge
from .hub import push_parts
from .link import Link, nbytes
from .modeling import ViTBottomConfig, ViTBottomModel, ViTHeadConfig, ViTHeadModel, ViTMiddleConfig, ViTMiddleModel
from .split import (
    USHAPED_TOPOLOGY,
    SplitViTForImageClassification,
    SplitViTOutput,
    Topology,
    _half_config,
    load_bridge_and_link,
    register_topology,
)


class USplitViTForImageClassification(SplitViTForImageClassification):
    """A ViT image classifier cut twice: the client holds the bottom (`client`) and the head (`head`), the server
    the middle (`server`); see the module docstring for what crosses. Trains, evaluates, saves and loads as the
    standard split does (`ADCTrainer` included), with the same losses and gradients."""

    def __init__(
        self, client: ViTBottomModel, server: ViTMiddleModel, head: ViTHeadModel, bridge: Bridge, link: Link
    ):
        super().__init__(client, server, bridge, link)
        self.head = head

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> "USplitViTForImageClassification":
        """Loads a U-shaped split that `save_pretrained` wrote; refuses a standard split's folder."""
        return load_ushaped(Path(directory), cls.read_settings(directory), **kwargs)

    @property
    def head_layers(self) -> int:
        """The encoder layers the head keeps (every part's config records it: a federation's server holds no head)."""
        return next(part for part in self.parts().values() if part is not None).config.head_layers

    def parts(self) -> dict[str, nn.Module]:
        """`client` (the bottom), `server` (the middle) and `head`, as `save_pretrained` writes them."""
        return {"client": self.client, "server": self.server, "head": self.head}

    def split_settings(self) -> dict:
        return {**super().split_settings(), "topology": USHAPED_TOPOLOGY, "head_layers": self.head_layers}

    def push_to_hub(self, client_repo_id: str, server_repo_id: str, head_repo_id: str, **kwargs) -> dict[str, str]:
        """Pushes the bottom, the middle and the head to their own repos with model cards (`kwargs` as in
        `hf_adc.hub.push_parts`); the head's repo is the client's to keep private (`private=True`)."""
        repos = {"client": client_repo_id, "server": server_repo_id, "head": head_repo_id}
        return push_parts(self, repos, **kwargs)

    def head_tokens(self, num_tokens: int) -> int:
        """Tokens per returned row at the second cut: CLS alone, or all `num_tokens` when the head has layers."""
        return num_tokens if self.head_layers else 1

    def wire_bytes(self, batch_size: int, compressed: bool = True) -> tuple[int, int]:
        """(uplink, downlink) bytes one training batch sends across both cuts, in the wire dtype: the bridge's
        activations less its labels up and its gradient down, plus `head_activations` down and `head_gradients`
        up; with `compressed=False`, the uncompressed U-shaped split's."""
        bridge = self.bridge if compressed else IdentityBridge()
        element_size = self.link.wire_dtype.itemsize
        num_tokens, hidden_size = self.num_tokens, self.client.config.hidden_size
        up, down = bridge.wire_bytes(batch_size, num_tokens, hidden_size, self.num_labels, element_size)
        up -= bridge.label_bytes(batch_size, self.num_labels, element_size)
        rows, tokens = bridge.server_tokens(batch_size, num_tokens)
        head = rows * (tokens if self.head_layers else 1) * hidden_size * element_size
        control_up, control_down = self.link.control_bytes
        return up + head + control_up, down + head + control_down

    def _returned(self, features: torch.Tensor) -> torch.Tensor:
        """What the server hands the head: the CLS row of each sample, or every token when the head has layers."""
        return features if self.head_layers else features[:, :1]

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        label_smoothing: float = 0.0,
    ) -> SplitViTOutput:
        """As the standard split's forward; the targets, the logits and the loss are computed on the client."""
        hidden_states, message = self._client_side(pixel_values, labels, interpolate_pos_encoding, label_smoothing)
        if not self.training:
            features = self.server(self.bridge.decode(message.hidden_states)).last_hidden_state
            logits = self.head(self._returned(features)).logits
            loss = None if labels is None else F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
            return SplitViTOutput(loss=loss, logits=logits)
        if labels is None:
            raise ValueError("A training step needs labels: the client's head computes the loss. Call .eval() to infer")

        targets = self._targets(message.labels, label_smoothing)  # the client's own, never sent
        received, record = self.link.transmit_activations(message, self.bridge, hidden_states.numel())
        features = self.server(self.bridge.decode(received.to(self.server.dtype))).last_hidden_state
        batch_size, num_tokens, hidden_size = hidden_states.shape
        uncompressed = batch_size * self.head_tokens(num_tokens) * hidden_size
        returned = self.link.transmit_head(self._returned(features), record, uncompressed)
        return self._head_output(returned, targets, message, record)

    def _head_output(self, returned: torch.Tensor, targets: torch.Tensor, message, record) -> SplitViTOutput:
        """The head's logits and loss on what came down the second cut, with the step's targets and record."""
        head_output = self.head(returned.to(self.head.dtype), labels=targets)
        return SplitViTOutput(
            loss=head_output.loss,
            logits=head_output.logits,
            targets=targets,
            cluster_ids=message.cluster_ids,
            token_indices=message.token_indices,
            communication=record,
        )

    def server_logits(self, payload: torch.Tensor) -> torch.Tensor:
        raise TypeError(
            "A U-shaped split's server holds no classifier, so it returns no logits: call "
            "client_logits(server_features(payload)), whose logits are computed on the client."
        )

    @torch.no_grad()
    def server_features(self, payload: torch.Tensor) -> torch.Tensor:
        """Split inference, server side: what the server returns to the head for a client payload (the CLS rows, or
        every token when the head has layers), charged in `link.inference_ledger` in the wire dtype."""
        features = self.server(self.bridge.decode(payload.to(self.server.dtype))).last_hidden_state
        returned = self.link.send({"head_activations": self._returned(features)})["head_activations"]
        self.link.inference_ledger.downlink_bytes += nbytes(returned)
        self.link.inference_ledger.uncompressed_downlink_bytes += nbytes(returned)
        return returned

    @torch.no_grad()
    def client_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Split inference, client side: the head's logits for what `server_features` returned."""
        return self.head(features.to(self.head.dtype)).logits

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """As the standard split's; a head without layers has nothing to recompute (transformers refuses it)."""
        for part in self.parts().values():
            if len(part.layers):
                part.activation_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def activation_checkpointing_disable(self) -> None:
        for part in self.parts().values():
            if len(part.layers):
                part.activation_checkpointing_disable()


def split_ushaped(
    model: ViTForImageClassification, split_layer: int, head_layers: int, bridge: Bridge, link: Link, settings: dict
) -> USplitViTForImageClassification:
    """The U-shaped split of `model` (already checked by `split_vit`), sharing its modules: the bottom takes the
    embeddings and layers `0 .. split_layer - 1`, the head the last `head_layers` layers, the final layernorm and
    the classifier, the middle the layers between."""
    num_layers = model.config.num_hidden_layers
    most = num_layers - split_layer - 1
    if isinstance(head_layers, bool) or not isinstance(head_layers, int) or not 0 <= head_layers <= most:
        raise ValueError(
            f"head_layers={head_layers!r} is out of range: cut after layer {split_layer} of {num_layers}, the head "
            f"can keep 0 .. {most} layers (the server keeps at least one)."
        )
    configs = [
        _half_config(config_class, model.config, split_layer, settings, head_layers=head_layers)
        for config_class in (ViTBottomConfig, ViTMiddleConfig, ViTHeadConfig)
    ]
    with torch.device("meta"):
        client, server, head = ViTBottomModel(configs[0]), ViTMiddleModel(configs[1]), ViTHeadModel(configs[2])
    top = num_layers - head_layers
    client.embeddings = model.vit.embeddings
    client.layers = nn.ModuleList(model.vit.layers[:split_layer])
    server.layers = nn.ModuleList(model.vit.layers[split_layer:top])
    head.layers = nn.ModuleList(model.vit.layers[top:])
    head.layernorm = model.vit.layernorm
    head.classifier = model.classifier
    return USplitViTForImageClassification(client, server, head, bridge, link)


def load_ushaped(directory: Path, settings: dict, **kwargs) -> USplitViTForImageClassification:
    """What `USplitViTForImageClassification.save_pretrained` wrote to `directory` (`settings`: its
    `split_config.json`); `kwargs` go to each part's `from_pretrained`."""
    if settings.get("topology") != USHAPED_TOPOLOGY:
        raise ValueError(
            f"{directory} holds a split of topology {settings.get('topology', 'standard')!r}; this loader reads "
            f"{USHAPED_TOPOLOGY!r} ones (SplitViTForImageClassification.from_pretrained reads both)."
        )
    client = ViTBottomModel.from_pretrained(directory / "client", **kwargs)
    server = ViTMiddleModel.from_pretrained(directory / "server", **kwargs)
    head = ViTHeadModel.from_pretrained(directory / "head", **kwargs)
    bridge, link = load_bridge_and_link(directory, settings, client, head.config.num_labels)
    return USplitViTForImageClassification(client, server, head, bridge, link)


# `split_vit(..., label_privacy=True)` and `SplitViTForImageClassification.from_pretrained` reach this module through
# the registry: `hf_adc.split`, which this module builds on, never imports it.
register_topology(USHAPED_TOPOLOGY, Topology(split=split_ushaped, load=load_ushaped))
