"""hf_adc: communication-efficient split learning of Vision Transformers on Hugging Face Transformers."""

from .bridges import (
    ADCConfig,
    BottleNetConfig,
    Bridge,
    BridgeConfig,
    C3SLConfig,
    ComposedConfig,
    Message,
    QuantizationConfig,
    RandomTopKConfig,
    TopKConfig,
    kmeans,
)
from .link import ChannelConfig, CommunicationRecord, Ledger, Link
from .merge import merge_halves, merge_ushaped
from .modeling import (
    ViTBottomConfig,
    ViTBottomModel,
    ViTClientConfig,
    ViTClientModel,
    ViTHeadConfig,
    ViTHeadModel,
    ViTMiddleConfig,
    ViTMiddleModel,
    ViTServerConfig,
    ViTServerModel,
)
from .privacy import PayloadNoiseConfig  # registers the payload-noise stage with `build_bridge`
from .split import SplitViTForImageClassification, SplitViTOutput, split_vit
from .training import ADCTrainer, ADCTrainingArguments
from .ushape import USplitViTForImageClassification  # registers the U-shaped topology with `split_vit`

__version__ = "0.1.0"

__all__ = [
    "ADCConfig",
    "ADCTrainer",
    "ADCTrainingArguments",
    "ImageTransform",
    "image_processor_for",
    "load_image_dataset",
    "merge_halves",
    "merge_ushaped",
    "BottleNetConfig",
    "Bridge",
    "C3SLConfig",
    "ComposedConfig",
    "BridgeConfig",
    "ChannelConfig",
    "CommunicationRecord",
    "Ledger",
    "Link",
    "Message",
    "PayloadNoiseConfig",
    "QuantizationConfig",
    "RandomTopKConfig",
    "TopKConfig",
    "SplitViTForImageClassification",
    "SplitViTOutput",
    "USplitViTForImageClassification",
    "ViTBottomConfig",
    "ViTBottomModel",
    "ViTHeadConfig",
    "ViTHeadModel",
    "ViTMiddleConfig",
    "ViTMiddleModel",
    "ViTClientConfig",
    "ViTClientModel",
    "ViTServerConfig",
    "ViTServerModel",
    "kmeans",
    "split_vit",
]


def __getattr__(name: str):
    # The data helpers pull in `datasets`; import them on first use so the modelling core stays light.
    if name in ("ImageTransform", "image_processor_for", "load_image_dataset"):
        from . import data

        return getattr(data, name)
    raise AttributeError(f"module 'hf_adc' has no attribute {name!r}")
