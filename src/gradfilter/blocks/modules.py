"""The modules a fused block becomes: :class:`FusedBlockMixin` runs its training forward as
one fused node; :class:`FusedHeadMixin` (timm EfficientNet) and :class:`FusedPoolMixin`
(torchvision MobileNetV2) also pool inside the last fused node."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import native, traceable
from .native_plan import native_plan
from .reference import FusedBlock, Geometry, block_geometry, traced_units
from .units import Unit, unit_params

__all__ = ["FusedBlockMixin", "FusedHeadMixin", "FusedPoolMixin", "run_fused"]


def run_fused(x: Tensor, units: list[Unit], skip: bool,
               grids: dict[tuple[int, int, int], Geometry | None],
               pool: bool = False) -> Tensor | None:
    """The fused node's output for ``x`` (``pool``: its global average, (N, C)), or None where
    the unit chain must run per layer:
    no-grad or nothing to differentiate, autocast (the per-layer filtered convs cast as autocast
    would; the fused node computes in the map's dtype), BatchNorm in training mode, a non-4-D
    or channels-last map (the per-layer native kernels cover NHWC, the fused stats pass does
    not; its PyTorch form made channels-last steps slower than lean ones), or stride-2 grids
    that do not line up for this input size. While torch.compile or torch.export traces, the
    node's math in traceable ops (:func:`.reference.traced_units`). ``grids``: the block's
    geometries by (radius, h, w), filled here."""
    if x.dim() != 4 or not x.is_contiguous() or not torch.is_grad_enabled() or _autocast(x):
        return None
    params = unit_params(units)
    trains = x.requires_grad
    for u in units:
        if u.bn.training:
            return None
    for p in params:
        trains = trains or (p is not None and p.requires_grad)
    if not trains:
        return None
    key = (units[0].conv.radius, x.shape[-2], x.shape[-1])
    if key not in grids:
        grids[key] = block_geometry(units, key[1], key[2])
    geo = grids[key]
    if geo is None:
        return None
    if traceable.tracing():  # compile / export: the node cannot be traced, its math can
        return traced_units(x, units, skip, pool)
    if native.applies(x):
        stats = [t for u in units for t in (u.bn.running_mean, u.bn.running_var)]
        return native.fused_block(x, [p for p in params if p is not None], stats,
                                  native_plan(units, skip, geo, pool, x))
    return FusedBlock.apply(x, units, skip, geo, pool, *params)


def _autocast(x: Tensor) -> bool:
    """Whether autocast is on for ``x``'s device type (some types, e.g. meta, have none)."""
    kind = x.device.type
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


def _grids(module: nn.Module) -> dict[tuple[int, int, int], Geometry | None]:
    """The fused module's geometry cache (an input size's grids are worked out once)."""
    return module.__dict__.setdefault("_gradfilter_grids", {})


class FusedBlockMixin:
    """Mixed in front of a supported block's class by :func:`fuse_blocks`: its training forward
    runs as one fused node (:mod:`gradfilter.blocks`); no-grad and unsupported calls run the
    block's own forward, as do channels-last inputs."""

    def forward(self, x: Tensor) -> Tensor:
        out = run_fused(x, *self._gradfilter_units, _grids(self))
        return super().forward(x) if out is None else out


def _hooked(*mods: nn.Module) -> bool:
    """Whether a forward or backward hook (the module's own or a global one) would see what
    these modules' calls return: then a pooled head keeps the map that the hooks expect."""
    from torch.nn.modules import module as M

    if M._global_forward_hooks or M._global_forward_pre_hooks or M._global_backward_hooks or (
            M._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               or m._backward_pre_hooks for m in mods)


def _global_average(pool: nn.Module) -> bool:
    """Whether a timm ``SelectAdaptivePool2d`` is a plain global average, flattened."""
    inner, flat = getattr(pool, "pool", None), getattr(pool, "flatten", None)
    if isinstance(inner, nn.AdaptiveAvgPool2d):
        return inner.output_size in (1, (1, 1)) and isinstance(flat, nn.Flatten) and (
            flat.start_dim == 1 and flat.end_dim == -1)
    try:
        from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool
    except ImportError:
        return False
    return (type(inner) is FastAdaptiveAvgPool and inner.flatten
            and getattr(inner, "dim", (2, 3)) == (2, 3) and isinstance(flat, nn.Identity))


class FusedHeadMixin:
    """Mixed in front of a timm ``EfficientNet`` by :func:`fuse_blocks` (block ``conv_head``):
    ``conv_head`` → ``bn2`` (BatchNorm + activation) run as one fused unit. The gradient from
    the pooled head is constant over the map, so this is exact; it spares BatchNorm's and the
    activation's full-resolution backward. Where the model's head is timm's own plain global
    average (and no hook watches ``global_pool``), ``forward`` takes the average straight from
    the fused unit's patch sums and hands its backward one value per sample and channel: the
    full map is neither pooled nor its gradient spread out and pooled again. Same fallbacks as
    a fused block."""

    def _trunk(self, x: Tensor) -> Tensor:
        """timm's forward_features up to the head conv."""
        return self.blocks(self.bn1(self.conv_stem(x)))

    def forward_features(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing:
            return super().forward_features(x)
        x = self._trunk(x)
        out = run_fused(x, *self._gradfilter_units, _grids(self))
        return self.bn2(self.conv_head(x)) if out is None else out

    def forward(self, x: Tensor) -> Tensor:
        if (self.grad_checkpointing or not self.__dict__.get("_gradfilter_pool")
                or not _global_average(self.global_pool) or _hooked(self.global_pool)):
            return super().forward(x)
        x = self._trunk(x)
        pooled = run_fused(x, *self._gradfilter_units, _grids(self), pool=True)
        if pooled is None:
            return self.forward_head(self.bn2(self.conv_head(x)))
        if self.drop_rate > 0.0:  # timm's forward_head
            pooled = F.dropout(pooled, p=self.drop_rate, training=self.training)
        return self.classifier(pooled)


class FusedPoolMixin:
    """Mixed in front of a torchvision ``MobileNetV2`` by :func:`fuse_blocks` when its last
    feature block (``features.18``) is fused: the global average pooling after it comes straight
    from the block's patch sums, and the block's backward gets one value per sample and channel
    (see :class:`FusedHeadMixin`). Where hooks watch ``features`` or that block, or the block
    runs per layer, the model runs as torchvision's."""

    def _forward_impl(self, x: Tensor) -> Tensor:
        feats = self.features
        head = feats[-1] if len(feats) else None
        if not isinstance(head, FusedBlockMixin) or _hooked(feats, head):
            return super()._forward_impl(x)
        for m in itertools.islice(feats, len(feats) - 1):
            x = m(x)
        units, skip = head._gradfilter_units
        pooled = None if skip else run_fused(x, units, skip, _grids(head), pool=True)
        if pooled is None:
            pooled = torch.flatten(F.adaptive_avg_pool2d(head(x), (1, 1)), 1)
        return self.classifier(pooled)
