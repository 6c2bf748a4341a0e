"""The three parts of a U-shaped split ViT: the client's bottom and head around the server's middle.

`ViTBottomModel` is the client half of the ordinary split (embeddings and the first `split_layer` layers).
`ViTMiddleModel` runs the server's layers and returns their hidden states: it has no classifier and takes no
labels. `ViTHeadModel` runs on the client again: its `head_layers` layers, the final layernorm and the classifier
on the CLS token. Chained, they compute exactly what `ViTForImageClassification` computes.

This module may only import from `torch`, `transformers` and its siblings: it is copied next to the weights so
that the parts load with `trust_remote_code=True` without hf_adc.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, ImageClassifierOutput
from transformers.models.vit.modeling_vit import ViTLayer, ViTPreTrainedModel

from .configuration_ushape_vit import ViTBottomConfig, ViTHeadConfig, ViTMiddleConfig
from .modeling_split_vit import ViTClientModel


def _check_topology(config) -> None:
    """The cuts must leave the bottom and the middle at least one layer each; the head may hold none."""
    num_layers = config.num_hidden_layers
    if not 1 <= config.split_layer < num_layers:
        raise ValueError(
            f"split_layer={config.split_layer} is out of range: a ViT with {num_layers} layers can be cut after "
            f"layer 1 .. {num_layers - 1}."
        )
    most = num_layers - config.split_layer - 1
    if not 0 <= config.head_layers <= most:
        raise ValueError(
            f"head_layers={config.head_layers} is out of range: cut after layer {config.split_layer} of {num_layers}, "
            f"the head can keep 0 .. {most} layers (the server keeps at least one)."
        )


class ViTBottomModel(ViTClientModel):
    """The client's bottom in a U-shaped split: what `ViTClientModel` holds, under a config recording the topology."""

    config: ViTBottomConfig
    config_class = ViTBottomConfig

    def __init__(self, config: ViTBottomConfig):
        _check_topology(config)
        super().__init__(config)


class ViTMiddleModel(ViTPreTrainedModel):
    """The server's part of a U-shaped split: layers `split_layer .. num_hidden_layers - head_layers - 1`.

    It returns its last layer's hidden states, from which the client's head reads what it needs; what it returns is
    computed from the activations it received alone and carries no label. Its layers carry no position information,
    so they accept any number of tokens in any order (CLS first).
    """

    config: ViTMiddleConfig
    config_class = ViTMiddleConfig
    base_model_prefix = "middle"

    def __init__(self, config: ViTMiddleConfig):
        _check_topology(config)
        super().__init__(config)
        count = config.num_hidden_layers - config.split_layer - config.head_layers
        self.layers = nn.ModuleList([ViTLayer(config) for _ in range(count)])
        self.post_init()

    def forward(self, hidden_states: torch.Tensor) -> BaseModelOutput:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return BaseModelOutput(last_hidden_state=hidden_states)


class ViTHeadModel(ViTPreTrainedModel):
    """The client's head in a U-shaped split: the last `head_layers` layers, the final layernorm and the classifier.

    It takes the tokens the server returned, CLS first (only CLS when `head_layers` is 0), and classifies the CLS
    token; the loss against the client's own targets is computed here, so labels never leave the client.
    """

    config: ViTHeadConfig
    config_class = ViTHeadConfig
    base_model_prefix = "head"

    def __init__(self, config: ViTHeadConfig):
        _check_topology(config)
        super().__init__(config)
        self.layers = nn.ModuleList([ViTLayer(config) for _ in range(config.head_layers)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(self, hidden_states: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        """Classifies `hidden_states` `(batch, tokens, hidden)`. `labels` are class ids `(batch,)` or soft targets
        `(batch, classes)`; either way the loss is cross-entropy averaged over the batch."""
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        logits = self.classifier(self.layernorm(hidden_states)[:, 0])
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return ImageClassifierOutput(loss=loss, logits=logits)
