"""The parts of a split ViT, registered with the Auto classes on import: the client and server halves of the
ordinary split, and the bottom, middle and head of the U-shaped split (whose labels never leave the client)."""

from transformers import AutoConfig, AutoModel

from .configuration_split_vit import ViTClientConfig, ViTServerConfig
from .configuration_ushape_vit import ViTBottomConfig, ViTHeadConfig, ViTMiddleConfig
from .modeling_split_vit import ViTClientModel, ViTClientOutput, ViTServerModel
from .modeling_ushape_vit import ViTBottomModel, ViTHeadModel, ViTMiddleModel

_PARTS = (
    (ViTClientConfig, ViTClientModel),
    (ViTServerConfig, ViTServerModel),
    (ViTBottomConfig, ViTBottomModel),
    (ViTMiddleConfig, ViTMiddleModel),
    (ViTHeadConfig, ViTHeadModel),
)
for _config_class, _model_class in _PARTS:
    AutoConfig.register(_config_class.model_type, _config_class)
    AutoModel.register(_config_class, _model_class)
    # Saved parts also carry their code, so they load with trust_remote_code=True where hf_adc is not installed.
    _config_class.register_for_auto_class()
    _model_class.register_for_auto_class("AutoModel")

__all__ = [
    "ViTBottomConfig",
    "ViTBottomModel",
    "ViTClientConfig",
    "ViTClientModel",
    "ViTClientOutput",
    "ViTHeadConfig",
    "ViTHeadModel",
    "ViTMiddleConfig",
    "ViTMiddleModel",
    "ViTServerConfig",
    "ViTServerModel",
]
