"""`merge_halves`: the two trained halves back into one plain `ViTForImageClassification`."""

import torch
from transformers import ViTConfig, ViTForImageClassification

from .modeling import ViTClientModel, ViTServerModel

_SPLIT_FIELDS = ("split_layer", "base_model_name_or_path", "compression", "communication")
_SHAPE_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size", "patch_size",
    "num_channels", "qkv_bias", "hidden_act", "layer_norm_eps", "split_layer", "base_model_name_or_path",
)  # fmt: skip


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
    for name in _SHAPE_FIELDS:
        if getattr(client.config, name) != getattr(server.config, name):
            raise ValueError(
                f"The halves do not belong together: client {name}={getattr(client.config, name)!r}, "
                f"server {name}={getattr(server.config, name)!r}."
            )
    method = (client.config.compression or {}).get("method")
    if method == "bottlenet":
        raise ValueError("A BottleNet++ split has a learned bottleneck between the halves: it cannot be merged away.")
    fields = server.config.to_dict()
    for key in (*_SPLIT_FIELDS, "model_type", "architectures", "auto_map", "transformers_version"):
        fields.pop(key, None)
    config = ViTConfig(**fields)
    config._name_or_path = client.config.base_model_name_or_path or ""
    with torch.device("meta"):
        merged = ViTForImageClassification(config)
    state = {f"vit.embeddings.{k}": v for k, v in client.embeddings.state_dict().items()}
    state.update({f"vit.layers.{k}": v for k, v in client.layers.state_dict().items()})
    offset = client.config.split_layer
    for key, value in server.layers.state_dict().items():
        index, rest = key.split(".", 1)
        state[f"vit.layers.{int(index) + offset}.{rest}"] = value
    state.update({f"vit.layernorm.{k}": v for k, v in server.layernorm.state_dict().items()})
    state.update({f"classifier.{k}": v for k, v in server.classifier.state_dict().items()})
    merged.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    return merged.eval()
