"""Filtered convolution modules: drop-in subclasses of ``nn.Conv2d`` / ``nn.Conv1d``.

They keep the parent's parameters and ``state_dict`` keys, so a model trained filtered loads into
the plain model unchanged (train filtered, deploy vanilla).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as GF
from . import lean

__all__ = [
    "FilteredConv1d", "FilteredConv2d", "LeanBatchNormMixin", "PackedReLU", "PackedReLU6",
]


def _check_padding_mode(mode: str) -> None:
    if mode != "zeros":
        raise ValueError(
            f"padding_mode={mode!r} is not supported by gradient filtering (only 'zeros'): the "
            "filtered backward assumes zero padding"
        )


def tf_same_total(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Total TensorFlow 'SAME' padding of one axis (the extra pixel goes at the end)."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def tf_same_pads(sizes, kernel, stride, dilation) -> list[int]:
    """TensorFlow 'SAME' padding of a map with spatial ``sizes``, in ``F.pad`` order (last axis
    first: before, after; then the axis before it)."""
    pads = []
    for size, k, s, d in zip(reversed(sizes), reversed(kernel), reversed(stride),
                             reversed(dilation)):
        total = tf_same_total(size, k, s, d)
        pads += [total // 2, total - total // 2]
    return pads


def tf_same_pad(x: Tensor, kernel, stride, dilation) -> Tensor:
    """TensorFlow 'SAME' padding, computed from the input size."""
    pads = tf_same_pads(x.shape[2:], kernel, stride, dilation)
    return F.pad(x, pads) if any(pads) else x


class _FilteredMixin:
    """Shared by the filtered modules: radius, TF-style dynamic 'same' padding and the forward.

    Constructor: the parent's (``in_channels, out_channels, kernel_size, stride=1, padding=0,
    dilation=1, groups=1, bias=True, padding_mode="zeros", device=None, dtype=None``) plus
    ``radius`` (int >= 1, default 4) and ``input_grad`` (``"filtered"``, default, or
    ``"exact"``). Only ``padding_mode="zeros"`` is supported.
    """

    radius: int
    tf_same: bool = False
    input_grad: str = "filtered"  # or "exact": see gradfilter.functional.INPUT_GRAD_MODES
    _filtered_conv = None  # gradfilter.functional.conv2d or conv1d (traceable when traced)

    def __init__(self, *args, radius: int = 4, input_grad: str = "filtered",
                 padding_mode: str = "zeros", **kwargs) -> None:
        GF.validate_radius(radius, 1)
        GF.validate_input_grad(input_grad)
        _check_padding_mode(padding_mode)
        super().__init__(*args, padding_mode=padding_mode, **kwargs)
        self.radius = radius
        self.input_grad = input_grad
        self.tf_same = False

    def forward(self, x: Tensor) -> Tensor:
        padding = self.padding
        if self.tf_same:  # timm's Conv2dSame, converted in place by gradfilter.apply
            x = tf_same_pad(x, self.kernel_size, self.stride, self.dilation)
            padding = 0
        return type(self)._filtered_conv(x, self.weight, self.bias, self.stride, padding,
                                         self.dilation, self.groups, radius=self.radius,
                                         input_grad=self.input_grad)

    def extra_repr(self) -> str:
        extra = ", tf_same=True" if self.tf_same else ""
        if self.input_grad != "filtered":
            extra += f", input_grad={self.input_grad!r}"
        return f"{super().extra_repr()}, radius={self.radius}{extra}"


class FilteredConv2d(_FilteredMixin, nn.Conv2d):
    """``nn.Conv2d`` with a gradient-filtered backward over ``radius``×``radius`` output patches."""

    _filtered_conv = staticmethod(GF.conv2d)


class FilteredConv1d(_FilteredMixin, nn.Conv1d):
    """``nn.Conv1d`` with a gradient-filtered backward over length-``radius`` output patches."""

    _filtered_conv = staticmethod(GF.conv1d)


class PackedReLU(nn.ReLU):
    """``nn.ReLU`` whose backward keeps its mask as bits (exact; ``inplace`` is ignored)."""

    def forward(self, x: Tensor) -> Tensor:
        return lean.relu(x)


class PackedReLU6(nn.ReLU6):
    """``nn.ReLU6`` whose backward keeps its mask as bits (exact; ``inplace`` is ignored)."""

    def forward(self, x: Tensor) -> Tensor:
        return lean.relu6(x)


class LeanBatchNormMixin:
    """Mixed in front of a BatchNorm class (``nn.BatchNorm1d/2d``, timm's ``BatchNormAct2d``) by
    :func:`gradfilter.slim`: eval-mode BatchNorm through :func:`gradfilter.lean.batch_norm_eval`.
    ``bn_radius`` None keeps the exact weight gradient (x saved), an int r its patch-sum form;
    a frozen weight saves nothing. Training mode (batch statistics) is refused: this layer's
    saving relies on the running statistics."""

    bn_radius: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.training or self.running_mean is None:
            raise RuntimeError(
                f"{type(self).__name__} needs eval mode with running statistics (gradfilter.freeze "
                "pins BatchNorm to eval); call gradfilter.remove(model) to train it in train mode"
            )
        y = lean.batch_norm_eval(x, self.running_mean, self.running_var, self.weight, self.bias,
                                 self.eps, self.bn_radius)
        if hasattr(self, "act"):  # timm BatchNormAct2d: norm, drop, act
            y = self.act(self.drop(y))
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bn_radius={self.bn_radius}"
