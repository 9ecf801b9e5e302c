"""Filtered convolution modules: drop-in subclasses of ``nn.Conv2d`` / ``nn.Conv1d``.

They keep the parent's parameters and ``state_dict`` keys, so a model trained filtered loads into
the plain model unchanged (train filtered, deploy vanilla).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as GF

__all__ = ["FilteredConv1d", "FilteredConv2d"]


def _check_padding_mode(mode: str) -> None:
    if mode != "zeros":
        raise ValueError(
            f"padding_mode={mode!r} is not supported by gradient filtering (only 'zeros'): the "
            "filtered backward assumes zero padding"
        )


def tf_same_pad(x: Tensor, kernel, stride, dilation) -> Tensor:
    """TensorFlow 'SAME' padding, computed from the input size (extra pixel at the end)."""
    pads = []
    for size, k, s, d in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride),
                             reversed(dilation)):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


class _FilteredMixin:
    """Shared state of the filtered modules: the radius and TF-style dynamic 'same' padding."""

    radius: int
    tf_same: bool = False

    def _init_filter(self, radius: int, padding_mode: str) -> None:
        GF.validate_radius(radius, 1)
        _check_padding_mode(padding_mode)
        self.radius = radius
        self.tf_same = False

    def extra_repr(self) -> str:
        extra = ", tf_same=True" if self.tf_same else ""
        return f"{super().extra_repr()}, radius={self.radius}{extra}"


class FilteredConv2d(_FilteredMixin, nn.Conv2d):
    """``nn.Conv2d`` with a gradient-filtered backward over ``radius``×``radius`` output patches."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, radius: int = 4,
                 padding_mode: str = "zeros", device=None, dtype=None) -> None:
        _check_padding_mode(padding_mode)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        self._init_filter(radius, padding_mode)

    def forward(self, x: Tensor) -> Tensor:
        padding = self.padding
        if self.tf_same:
            x = tf_same_pad(x, self.kernel_size, self.stride, self.dilation)
            padding = 0
        return GF.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation,
                         self.groups, radius=self.radius)


class FilteredConv1d(_FilteredMixin, nn.Conv1d):
    """``nn.Conv1d`` with a gradient-filtered backward over length-``radius`` output patches."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, radius: int = 4,
                 padding_mode: str = "zeros", device=None, dtype=None) -> None:
        _check_padding_mode(padding_mode)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        self._init_filter(radius, padding_mode)

    def forward(self, x: Tensor) -> Tensor:
        padding = self.padding
        if self.tf_same:
            x = tf_same_pad(x, self.kernel_size, self.stride, self.dilation)
            padding = 0
        return GF.conv1d(x, self.weight, self.bias, self.stride, padding, self.dilation,
                         self.groups, radius=self.radius)
