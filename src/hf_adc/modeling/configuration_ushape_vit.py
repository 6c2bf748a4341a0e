"""Configurations of the three parts of a U-shaped split ViT, whose labels never leave the client.

The client holds the bottom (embeddings and layers `0 .. split_layer - 1`) and the head (the last `head_layers`
layers, the final layernorm and the classifier); the server holds the middle. Every part's config records the
topology: `split_layer` and `head_layers` fix which layers each part holds.

This module may only import from `transformers`, `huggingface_hub` and its siblings: it is copied next to the
weights so that the parts load with `trust_remote_code=True` without hf_adc.
"""

from huggingface_hub.dataclasses import strict
from transformers import ViTConfig

from .configuration_split_vit import _HalfConfigLoading


@strict
class ViTBottomConfig(_HalfConfigLoading, ViTConfig):
    r"""
    Configuration of the client's bottom in a U-shaped split ViT: the embeddings and layers `0 .. split_layer - 1`.

    Besides every field of [`ViTConfig`] (which still describes the whole, unsplit model):

    split_layer (`int`): number of encoder layers below the first cut, on the client.
    head_layers (`int`): number of encoder layers above the second cut, on the client too (in its head).
    base_model_name_or_path (`str`, *optional*): the checkpoint the split was made from.
    compression (`dict`, *optional*): the bridge settings used at the first cut (method name and knobs).
    communication (`dict`, *optional*): summary of the bytes that crossed both cuts in training.
    """

    model_type = "vit_adc_bottom"

    split_layer: int = 1
    head_layers: int = 0
    base_model_name_or_path: str | None = None
    compression: dict | None = None
    communication: dict | None = None


@strict
class ViTMiddleConfig(_HalfConfigLoading, ViTConfig):
    r"""
    Configuration of the server's middle in a U-shaped split ViT: layers `split_layer .. num_hidden_layers -
    head_layers - 1`, and no classifier (the server never sees a label). Fields beyond [`ViTConfig`] as in
    [`ViTBottomConfig`].
    """

    model_type = "vit_adc_middle"

    split_layer: int = 1
    head_layers: int = 0
    base_model_name_or_path: str | None = None
    compression: dict | None = None
    communication: dict | None = None


@strict
class ViTHeadConfig(_HalfConfigLoading, ViTConfig):
    r"""
    Configuration of the client's head in a U-shaped split ViT: the last `head_layers` encoder layers, the final
    layernorm and the classifier. Fields beyond [`ViTConfig`] as in [`ViTBottomConfig`].
    """

    model_type = "vit_adc_head"

    split_layer: int = 1
    head_layers: int = 0
    base_model_name_or_path: str | None = None
    compression: dict | None = None
    communication: dict | None = None
