"""`merge_halves` / `merge_ushaped`: the trained parts back into one plain `ViTForImageClassification`."""

import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from .modeling import ViTBottomModel, ViTClientModel, ViTHeadModel, ViTMiddleModel, ViTServerModel

_SPLIT_FIELDS = ("split_layer", "head_layers", "base_model_name_or_path", "compression", "communication")
_SHAPE_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size", "patch_size",
    "num_channels", "qkv_bias", "hidden_act", "layer_norm_eps", "split_layer", "base_model_name_or_path",
)  # fmt: skip


def _check_together(parts: dict[str, nn.Module], fields: tuple[str, ...]) -> None:
    (first_name, first), *others = parts.items()
    for name in fields:
        for other_name, other in others:
            if getattr(first.config, name) != getattr(other.config, name):
                raise ValueError(
                    f"The {'halves' if len(parts) == 2 else 'parts'} do not belong together: {first_name} "
                    f"{name}={getattr(first.config, name)!r}, {other_name} {name}={getattr(other.config, name)!r}."
                )
    if (first.config.compression or {}).get("method") == "bottlenet":
        raise ValueError("A BottleNet++ split has a learned bottleneck between the halves: it cannot be merged away.")


def _merged(config_source, client: ViTClientModel, layer_groups, layernorm, classifier) -> ViTForImageClassification:
    """A `ViTForImageClassification` owning copies of the client's embeddings, the layers of `layer_groups` (in
    order, after the client's) and the final layernorm and classifier."""
    fields = config_source.config.to_dict()
    for key in (*_SPLIT_FIELDS, "model_type", "architectures", "auto_map", "transformers_version"):
        fields.pop(key, None)
    config = ViTConfig(**fields)
    config._name_or_path = client.config.base_model_name_or_path or ""
    with torch.device("meta"):
        merged = ViTForImageClassification(config)
    state = {f"vit.embeddings.{k}": v for k, v in client.embeddings.state_dict().items()}
    offset = 0
    for layers in (client.layers, *layer_groups):
        for key, value in layers.state_dict().items():
            index, rest = key.split(".", 1)
            state[f"vit.layers.{int(index) + offset}.{rest}"] = value
        offset += len(layers)
    state.update({f"vit.layernorm.{k}": v for k, v in layernorm.state_dict().items()})
    state.update({f"classifier.{k}": v for k, v in classifier.state_dict().items()})
    merged.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    return merged.eval()


def merge_halves(client: ViTClientModel, server: ViTServerModel) -> ViTForImageClassification:
    """A `ViTForImageClassification` (loadable without hf_adc) computing what client -> server computes in eval
    mode: embeddings and layers from the client, the other layers, layernorm and classifier from the server.

    The merged model owns copies of the weights. Raises if the halves are swapped or come from different
    models or different cuts. A bridge with weights of its own (BottleNet++) sits between the halves and
    cannot be merged away: merge the halves of a split trained without one.
    """
    if not isinstance(client, ViTClientModel):
        raise TypeError(f"client must be a ViTClientModel; got {type(client).__name__}.")
    if not isinstance(server, ViTServerModel):
        raise TypeError(f"server must be a ViTServerModel; got {type(server).__name__}.")
    _check_together({"client": client, "server": server}, _SHAPE_FIELDS)
    return _merged(server, client, (server.layers,), server.layernorm, server.classifier)


def merge_ushaped(client: ViTBottomModel, server: ViTMiddleModel, head: ViTHeadModel) -> ViTForImageClassification:
    """The sibling of `merge_halves` for a U-shaped split (`split_vit(..., label_privacy=True)`): the client's
    bottom, the server's middle and the client's head back into one `ViTForImageClassification` computing what
    bottom -> middle -> head computes in eval mode. Raises if a part is of the wrong kind or the parts come from
    different models or cuts; a BottleNet++ split cannot be merged away."""
    for name, part, expected in (
        ("client", client, ViTBottomModel), ("server", server, ViTMiddleModel), ("head", head, ViTHeadModel)
    ):  # fmt: skip
        if not isinstance(part, expected):
            raise TypeError(f"{name} must be a {expected.__name__}; got {type(part).__name__}.")
    _check_together({"client": client, "server": server, "head": head}, (*_SHAPE_FIELDS, "head_layers"))
    return _merged(head, client, (server.layers, head.layers), head.layernorm, head.classifier)
