"""A fused block's fixed arguments for the native kernels (:func:`gradfilter.native.fused_plan`),
built once per block, input size, batch and dtype; the layout is documented at ``FusedPlan`` in
``_native/kernels.cpp``."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import native, patches
from ..nn import tf_same_pads
from .reference import Geometry, per_pixel
from .units import Unit

__all__ = ["native_backward_static", "native_forward_static", "native_plan"]


def native_forward_static(units: list[Unit], geo: Geometry) -> tuple:
    """The fixed arguments of :func:`native.fused_block_forward` for one block and input size
    (cached on the geometry): the input grid, per unit its conv and grid geometry (see the
    kernel), activation bound, BatchNorm eps and the flags that do not depend on what trains."""
    cache = geo.__dict__
    if "_native_forward" not in cache:
        g0h, g0w = geo.grid_in
        in_grid = [g0h.radius, g0h.out_pad, g0w.out_pad, g0h.patches, g0w.patches]
        geometry, flags = [], []
        prev = geo.grid_in
        for i, u in enumerate(units):
            conv, (gh, gw) = u.conv, geo.grids[i]
            k, s = conv.kernel_size, conv.stride[0]
            pads = [0, 0, 0, 0]  # left, right, top, bottom
            if s == 1:
                conv_pad = [k[0] // 2, k[1] // 2]
            elif conv.tf_same:  # what conv_forward's tf_same_pad adds
                conv_pad = [0, 0]
                pads = tf_same_pads((prev[0].size, prev[1].size), k, conv.stride, conv.dilation)
            else:
                conv_pad = list(conv.padding)
            geometry += [s, *conv_pad, *pads, conv.groups, gh.radius, gh.out_pad, gw.out_pad,
                         gh.patches, gw.patches, int(geo.strided[i]), prev[0].patches,
                         prev[1].patches]
            flags.append((2 if gh.radius * gw.radius <= 255 else 0)
                         | (4 if conv.bias is not None else 0)
                         | (8 if u.bn.weight is not None else 0)
                         | (16 if u.bn.bias is not None else 0))
            prev = (gh, gw)
        cache["_native_forward"] = (in_grid, geometry, flags, [u.bn.eps for u in units],
                                    [u.upper for u in units])
    return cache["_native_forward"]


def native_backward_static(units: list[Unit], skip: bool, geo: Geometry, n: int,
                   like: Tensor) -> tuple:
    """The fixed arguments of :func:`native.fused_block_backward` for one block, batch size
    and dtype (cached on the geometry)."""
    key = (n, like.dtype, like.device)
    cache = geo.__dict__.setdefault("_native_static", {})  # frozen dataclass
    if key not in cache:
        gh, gw = geo.grids[-1]
        out_grid = [gh.radius, gh.out_pad, gw.out_pad, gh.patches, gw.patches]
        inv_counts = patches.inverse_counts(gh, gw, like.device, like.dtype)
        pixels = [per_pixel(grid, n, like) for grid in geo.grids]
        grids, flags = [], []
        for i, u in enumerate(units):
            fine = geo.grids[i - 1] if i else geo.grid_in
            grids += [geo.grids[i][0].patches, geo.grids[i][1].patches, fine[0].patches,
                      fine[1].patches]
            flags.append(int(geo.strided[i]) | (32 if u.conv.groups > 1 else 0))
        ih, iw = geo.grid_in
        in_grid = [0, int(skip), ih.size, iw.size, ih.in_patch, iw.in_patch, ih.in_pad,
                   iw.in_pad]
        pool_in = patches.tiny_matrix(ih.size, iw.size, ih, iw, like.dtype)
        cache[key] = (out_grid, inv_counts, pixels, grids, flags, in_grid, pool_in)
    return cache[key]


class _PlanCache(dict):
    """Native plans by batch, dtype and form. Plans are TorchScript objects, which neither copy
    nor pickle: a copied or unpickled module's cache starts empty (its plans are rebuilt on
    use)."""

    def __deepcopy__(self, memo: dict) -> _PlanCache:
        return _PlanCache()

    def __reduce__(self) -> tuple:  # pickled empty too
        return _PlanCache, ()


def native_plan(units: list[Unit], skip: bool, geo: Geometry, pool: bool,
          like: Tensor) -> torch.ScriptObject:
    """The native plan of :func:`native.fused_block` for one block, input size, batch and dtype
    (cached on the geometry)."""
    key = (like.shape[0], like.dtype, like.device, pool)
    cache = geo.__dict__.setdefault("_native_plan", _PlanCache())
    if key not in cache:
        in_grid, geometry, flags, eps, upper = native_forward_static(units, geo)
        out_grid, inv_counts, pixels, grids, back_flags, back_in, pool_in = (
            native_backward_static(units, skip, geo, like.shape[0], like))
        gh, gw = geo.grids[-1]
        cache[key] = native.fused_plan(
            in_grid, geometry, flags, eps, upper, skip, pool, out_grid, inv_counts, pixels,
            grids, back_flags, back_in, pool_in, gh.size * gw.size, gh.patches * gw.patches)
    return cache[key]
