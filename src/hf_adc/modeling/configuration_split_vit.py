"""Configurations of the two halves of a Vision Transformer cut for split learning.

This module may only import from `transformers`, `huggingface_hub` and its siblings: it is copied
next to the weights so that the halves load with `trust_remote_code=True` without hf_adc.
"""

from huggingface_hub.dataclasses import strict
from transformers import ViTConfig


class _HalfConfigLoading:
    """Refuses to load another part's checkpoint (transformers would only warn and build a wrong model)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, _ = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        found = config_dict.get("model_type")
        if found != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a '{found}' checkpoint, not a '{cls.model_type}' one: load "
                "each folder with the class of its own part, or with AutoModel (which reads the part from the config)."
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


@strict
class ViTClientConfig(_HalfConfigLoading, ViTConfig):
    r"""
    Configuration of the client half of a split ViT: the embeddings and layers `0 .. split_layer - 1`.

    Besides every field of [`ViTConfig`] (which still describes the whole, unsplit model):

    split_layer (`int`): number of encoder layers that run on the client.
    base_model_name_or_path (`str`, *optional*): the checkpoint the split was made from.
    compression (`dict`, *optional*): the bridge settings used at the cut (method name and knobs).
    communication (`dict`, *optional*): summary of the bytes that crossed the cut in training.
    """

    model_type = "vit_adc_client"

    split_layer: int = 1
    base_model_name_or_path: str | None = None
    compression: dict | None = None
    communication: dict | None = None


@strict
class ViTServerConfig(_HalfConfigLoading, ViTConfig):
    r"""
    Configuration of the server half of a split ViT: layers `split_layer .. num_hidden_layers - 1`, the final
    layernorm and the classifier. Fields beyond [`ViTConfig`] as in [`ViTClientConfig`].
    """

    model_type = "vit_adc_server"

    split_layer: int = 1
    base_model_name_or_path: str | None = None
    compression: dict | None = None
    communication: dict | None = None
