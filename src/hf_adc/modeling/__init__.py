"""The client and server halves, registered with the Auto classes on import."""

from transformers import AutoConfig, AutoModel

from .configuration_split_vit import ViTClientConfig, ViTServerConfig
from .modeling_split_vit import ViTClientModel, ViTClientOutput, ViTServerModel

AutoConfig.register(ViTClientConfig.model_type, ViTClientConfig)
AutoConfig.register(ViTServerConfig.model_type, ViTServerConfig)
AutoModel.register(ViTClientConfig, ViTClientModel)
AutoModel.register(ViTServerConfig, ViTServerModel)

__all__ = ["ViTClientConfig", "ViTClientModel", "ViTClientOutput", "ViTServerConfig", "ViTServerModel"]
