"""The client and server halves, registered with the Auto classes on import."""

from transformers import AutoConfig, AutoModel

from .configuration_split_vit import ViTClientConfig, ViTServerConfig
from .modeling_split_vit import ViTClientModel, ViTClientOutput, ViTServerModel

AutoConfig.register(ViTClientConfig.model_type, ViTClientConfig)
AutoConfig.register(ViTServerConfig.model_type, ViTServerConfig)
AutoModel.register(ViTClientConfig, ViTClientModel)
AutoModel.register(ViTServerConfig, ViTServerModel)
# Saved halves also carry their code, so they load with trust_remote_code=True where hf_adc is not installed.
for _config_class, _model_class in ((ViTClientConfig, ViTClientModel), (ViTServerConfig, ViTServerModel)):
    _config_class.register_for_auto_class()
    _model_class.register_for_auto_class("AutoModel")

__all__ = ["ViTClientConfig", "ViTClientModel", "ViTClientOutput", "ViTServerConfig", "ViTServerModel"]
