"""The two halves of a Vision Transformer cut after layer `split_layer`.

`ViTClientModel` runs on the device that holds the data: embeddings (patches, CLS token, positions) and the
first `split_layer` encoder layers. `ViTServerModel` runs the rest: the remaining layers, the final layernorm
and the classifier on the CLS token. Chained, they compute exactly what `ViTForImageClassification` computes.

This module may only import from `torch`, `transformers` and its siblings: it is copied next to the weights
so that the halves load with `trust_remote_code=True` without hf_adc.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.vit.modeling_vit import ViTAttention, ViTEmbeddings, ViTLayer, ViTPreTrainedModel
from transformers.utils import ModelOutput

from .configuration_split_vit import ViTClientConfig, ViTServerConfig


def _check_split_layer(config) -> None:
    if not 1 <= config.split_layer < config.num_hidden_layers:
        raise ValueError(
            f"split_layer={config.split_layer} is out of range: a ViT with {config.num_hidden_layers} layers "
            f"can be cut after layer 1 .. {config.num_hidden_layers - 1}."
        )


@dataclass
class ViTClientOutput(ModelOutput):
    """
    last_hidden_state: what the client would send uncompressed, `(batch, tokens, hidden)`.
    cls_attention: post-softmax attention of the CLS query over all tokens in the client's last layer,
        averaged over heads, `(batch, tokens)`; only when asked for.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cls_attention: torch.FloatTensor | None = None


class _CLSAttentionProbe:
    """Captures the CLS row of one attention module's softmax from its q/k projections.

    The model keeps its fused (sdpa) attention: forward hooks read the query and key projections as they are
    computed, and only the CLS query's row, `softmax(q_cls K^T * scaling)`, is formed -- O(tokens) per head.
    """

    def __init__(self, attention: ViTAttention):
        self.attention = attention
        self.query = None
        self.key = None

    def __enter__(self) -> "_CLSAttentionProbe":
        self._handles = [
            self.attention.q_proj.register_forward_hook(self._keep("query")),
            self.attention.k_proj.register_forward_hook(self._keep("key")),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _keep(self, name: str):
        def hook(module, args, output):
            setattr(self, name, output.detach())

        return hook

    def cls_row(self) -> torch.Tensor:
        batch, tokens, _ = self.key.shape
        heads, head_dim = self.attention.num_attention_heads, self.attention.head_dim
        query = self.query[:, 0].reshape(batch, heads, head_dim)
        key = self.key.reshape(batch, tokens, heads, head_dim)
        scores = torch.einsum("bhd,bnhd->bhn", query, key) * self.attention.scaling
        return scores.softmax(dim=-1, dtype=torch.float32).mean(dim=1)


class ViTClientModel(ViTPreTrainedModel):
    """Client half of a split ViT: embeddings + encoder layers `0 .. split_layer - 1`."""

    config: ViTClientConfig
    config_class = ViTClientConfig
    base_model_prefix = "client"

    def __init__(self, config: ViTClientConfig):
        _check_split_layer(config)
        super().__init__(config)
        self.embeddings = ViTEmbeddings(config)
        self.layers = nn.ModuleList([ViTLayer(config) for _ in range(config.split_layer)])
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_cls_attention: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> ViTClientOutput:
        """Embeds `pixel_values` and runs the client's layers; optionally returns the CLS attention row."""
        dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        hidden_states = self.embeddings(pixel_values.to(dtype), interpolate_pos_encoding=interpolate_pos_encoding)
        if not output_cls_attention:
            for layer in self.layers:
                hidden_states = layer(hidden_states)
            return ViTClientOutput(last_hidden_state=hidden_states)
        for layer in self.layers[:-1]:
            hidden_states = layer(hidden_states)
        with _CLSAttentionProbe(self.layers[-1].attention) as probe:
            hidden_states = self.layers[-1](hidden_states)
        return ViTClientOutput(last_hidden_state=hidden_states, cls_attention=probe.cls_row())


class ViTServerModel(ViTPreTrainedModel):
    """Server half of a split ViT: encoder layers `split_layer ..`, final layernorm and classifier.

    Its layers carry no position information, so they accept any number of tokens in any order (CLS first).
    """

    config: ViTServerConfig
    config_class = ViTServerConfig
    base_model_prefix = "server"

    def __init__(self, config: ViTServerConfig):
        _check_split_layer(config)
        super().__init__(config)
        self.layers = nn.ModuleList([ViTLayer(config) for _ in range(config.num_hidden_layers - config.split_layer)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(self, hidden_states: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        """Classifies the received tokens. `labels` are class ids `(batch,)` or soft targets `(batch, classes)`;
        either way the loss is cross-entropy averaged over the batch."""
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        logits = self.classifier(self.layernorm(hidden_states)[:, 0])
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return ImageClassifierOutput(loss=loss, logits=logits)
