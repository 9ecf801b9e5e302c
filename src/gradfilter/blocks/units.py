"""Which blocks fuse: a block's units (conv → eval BatchNorm → activation) and its skip, or
the reason it cannot be fused."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from ..nn import FilteredConv2d

__all__ = [
    "NO_ACT", "Unit", "activation_bound", "block_units", "bn_unit", "fusable",
    "sequential_unit", "unit_params",
]


NO_ACT = math.nan  # the stats kernel's "no activation"


@dataclass(frozen=True)
class Unit:
    """conv → eval BatchNorm → activation (upper bound: inf ReLU, 6 ReLU6, NaN none)."""

    conv: nn.Conv2d
    bn: nn.BatchNorm2d
    upper: float


def activation_bound(act: nn.Module | None) -> float | str:
    if act is None or isinstance(act, nn.Identity):
        return NO_ACT
    if isinstance(act, nn.ReLU6):
        return 6.0
    if isinstance(act, nn.ReLU):
        return math.inf
    return f"activation {type(act).__name__} (only ReLU, ReLU6 or none)"


def bn_unit(conv: nn.Module, bn: nn.Module, act: nn.Module | None) -> Unit | str:
    if not isinstance(conv, FilteredConv2d):
        return f"{type(conv).__name__} is not a filtered conv (gradfilter.apply it first)"
    if not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats:
        return f"{type(bn).__name__} is not a BatchNorm2d with running statistics"
    if not isinstance(getattr(bn, "drop", nn.Identity()), nn.Identity):
        return "BatchNormAct2d with dropout"
    k = conv.kernel_size
    if conv.stride not in ((1, 1), (2, 2)) or conv.dilation != (1, 1) or k[0] % 2 == 0 or (
            k[1] % 2 == 0):
        return f"conv {tuple(k)} stride {conv.stride} dilation {conv.dilation} (needs stride 1 " \
               "or 2, dilation 1, odd kernel)"
    if not conv.tf_same and tuple(conv.padding) != ((k[0] - 1) // 2, (k[1] - 1) // 2):
        return f"conv padding {conv.padding} does not keep the map size"
    if conv.groups not in (1, conv.in_channels) or (
            conv.groups > 1 and conv.out_channels != conv.in_channels):
        return f"conv groups={conv.groups} (dense or depthwise only)"
    if conv.input_grad != "filtered":
        return "conv with input_grad='exact'"
    upper = activation_bound(act)
    if isinstance(upper, str):
        return upper
    return Unit(conv, bn, upper)


def block_units(block: nn.Module) -> tuple[list[Unit], bool] | str:
    """The block's (units, has skip), or why it cannot be fused."""
    name = type(block).__name__
    if hasattr(block, "conv_pwl") and hasattr(block, "conv_dw") and hasattr(block, "bn3"):
        for part in ("aa", "se", "drop_path"):  # timm InvertedResidual
            if not isinstance(getattr(block, part, nn.Identity()), nn.Identity):
                return f"timm {name} with {part} (only plain inverted residuals)"
        pieces = [(block.conv_pw, block.bn1), (block.conv_dw, block.bn2),
                  (block.conv_pwl, block.bn3)]
        units = [bn_unit(c, b, getattr(b, "act", None)) for c, b in pieces]
        skip = bool(getattr(block, "has_skip", False))
    elif hasattr(block, "use_res_connect") and isinstance(getattr(block, "conv", None),
                                                          nn.Sequential):
        units, mods = [], list(block.conv)  # torchvision InvertedResidual
        i = 0
        while i < len(mods):
            m = mods[i]
            if isinstance(m, nn.Sequential):
                units.append(sequential_unit(m))
                i += 1
            elif i + 1 < len(mods):
                units.append(bn_unit(m, mods[i + 1], None))
                i += 2
            else:
                return f"{name}: unrecognised layout"
        skip = bool(block.use_res_connect)
    elif isinstance(block, nn.Sequential):  # torchvision Conv2dNormActivation
        units, skip = [sequential_unit(block)], False
    else:
        return f"{name} is not a supported block (inverted residual or conv-BN-act)"
    for u in units:
        if isinstance(u, str):
            return f"{name}: {u}"
    if sum(u.conv.stride != (1, 1) for u in units) > 1:
        return f"{name}: more than one strided conv"
    if skip and any(u.conv.stride != (1, 1) for u in units):
        return f"{name}: a skip connection around a strided conv"
    radii = {u.conv.radius for u in units}
    if len(radii) != 1:
        return f"{name}: its convs have different radii {sorted(radii)}"
    return units, skip


def sequential_unit(seq: nn.Sequential) -> Unit | str:
    mods = list(seq)
    if len(mods) not in (2, 3):
        kinds = ", ".join(type(m).__name__ for m in mods)
        return (f"Sequential of {len(mods)} modules ({kinds}); a fusable one is conv, "
                f"BatchNorm[, activation]")
    return bn_unit(mods[0], mods[1], mods[2] if len(mods) == 3 else None)


def fusable(block: nn.Module) -> str | None:
    """None if :func:`fuse_blocks` can fuse ``block``, else the reason it cannot."""
    found = block_units(block)
    return found if isinstance(found, str) else None


def unit_params(units: list[Unit]) -> list[Tensor | None]:
    flat: list[Tensor | None] = []
    for u in units:
        flat += [u.conv.weight, u.conv.bias, u.bn.weight, u.bn.bias]
    return flat
