"""``fuse_blocks``: the in-place transform, the per-library head integrations it recognises,
and ``enclosing_blocks``, the blocks around converted convs that it can fuse."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .._mixed import mixed_class
from ..selection import Refusals, match
from .modules import FusedBlockMixin, FusedHeadMixin, FusedPoolMixin
from .units import Unit, block_units, bn_unit, fusable

__all__ = ["enclosing_blocks", "fuse_blocks", "head_units"]


def head_units(model: nn.Module, name: str,
                conv: nn.Module) -> tuple[nn.Module, Unit] | str | None:
    """(the EfficientNet, its head unit) when ``name`` is the ``conv_head`` of a timm
    EfficientNet whose ``forward_features`` is timm's own (so the swap keeps its meaning); the
    reason when it is such a head that cannot be fused; None when it is none."""
    try:
        from timm.models.efficientnet import EfficientNet
    except ImportError:
        return None
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf != "conv_head" or not isinstance(owner, EfficientNet) or owner.conv_head is not conv:
        return None
    own_features = type(owner).forward_features is EfficientNet.forward_features
    if not (own_features or isinstance(owner, FusedHeadMixin)):  # a subclass with its own
        return None
    unit = bn_unit(conv, owner.bn2, getattr(owner.bn2, "act", None))
    return f"head conv_head → bn2: {unit}" if isinstance(unit, str) else (owner, unit)


def _own_pooled_head(cls: type) -> bool:
    """Whether a timm EfficientNet class runs timm's own ``forward`` and ``forward_head`` (so
    :class:`FusedHeadMixin` may pool inside the fused head)."""
    from timm.models.efficientnet import EfficientNet

    return cls.forward is EfficientNet.forward and cls.forward_head is EfficientNet.forward_head


def _pool_owner(model: nn.Module, name: str, block: nn.Module) -> nn.Module | None:
    """The torchvision MobileNetV2 whose last feature block ``block`` (named ``name``) is, if
    its ``_forward_impl`` is torchvision's own and it is not yet swapped; else None."""
    try:
        from torchvision.models import MobileNetV2
    except ImportError:
        return None
    owner_name, _, _ = name.rpartition(".")
    parent_name, _, leaf = owner_name.rpartition(".")
    if leaf != "features":
        return None
    owner = model.get_submodule(parent_name) if parent_name else model
    if (not isinstance(owner, MobileNetV2) or isinstance(owner, FusedPoolMixin)
            or type(owner)._forward_impl is not MobileNetV2._forward_impl
            or not len(owner.features) or owner.features[-1] is not block):
        return None
    return owner


def _fused_class(cls: type, mixin: type = FusedBlockMixin) -> type:
    return mixed_class(mixin, cls, "Fused")


def fuse_blocks(model: nn.Module, names: str | Iterable[str],
                on_unsupported: str = "error") -> list[str]:
    """Fuse the named blocks of ``model`` in place (see the module docstring); return the names
    fused. ``names``: block names or glob patterns; a timm EfficientNet's ``conv_head`` fuses
    with the ``bn2`` after it (:class:`FusedHeadMixin`). Where the fused block is the last before
    the model's global average pooling (that head, torchvision MobileNetV2's ``features.18``:
    :class:`FusedPoolMixin`), the model pools inside the fused node. A block named exactly that
    cannot be fused raises with the reason (``on_unsupported="error"``) or stays as it is
    (``"skip"``); blocks matched by a glob only are fused where they can be.
    :func:`gradfilter.remove` undoes it. Call after :func:`gradfilter.apply` (the blocks' convs
    must be filtered); BatchNorm must be in eval mode when training (:func:`gradfilter.freeze`
    pins it)."""
    refusals = Refusals("fuse_blocks", "block", names, on_unsupported)
    patterns = refusals.patterns
    fused: list[str] = []
    inside: list[str] = []  # fused blocks (earlier calls included): their sub-modules are parts
    for name, mod in model.named_modules():
        if not name:
            continue
        if any(name.startswith(f"{b}.") for b in inside):
            refusals.refuse(name, "inside a fused block")
            continue
        if isinstance(mod, FusedBlockMixin):
            inside.append(name)
            refusals.refuse(name, "already fused")
            continue
        if not match(name, patterns):
            continue
        found = block_units(mod)
        head = head_units(model, name, mod) if isinstance(found, str) else None
        if isinstance(head, str):
            found = head
        elif head is not None:  # EfficientNet's conv_head: its owner runs conv_head → bn2 fused
            owner, unit = head
            if isinstance(owner, FusedHeadMixin):
                found = "already fused"
            else:
                owner._gradfilter_units = ([unit], False)
                owner._gradfilter_pool = _own_pooled_head(type(owner))
                owner._gradfilter_original_class = type(owner)
                owner.__class__ = _fused_class(type(owner), FusedHeadMixin)
                fused.append(name)
                continue
        if isinstance(found, str):
            refusals.refuse(name, found)
            continue
        mod._gradfilter_units = found
        mod._gradfilter_original_class = type(mod)
        mod.__class__ = _fused_class(type(mod))
        fused.append(name)
        inside.append(name)
        owner = _pool_owner(model, name, mod)
        if owner is not None:  # MobileNetV2's features.18: pool inside it
            owner._gradfilter_original_class = type(owner)
            owner.__class__ = _fused_class(type(owner), FusedPoolMixin)
    if not fused:
        raise refusals.nothing_fused()
    return fused


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def enclosing_blocks(model: nn.Module, convs: Iterable[str]) -> list[str]:
    """The blocks :func:`fuse_blocks` can fuse around the filtered convs named ``convs``, in
    module order, each once. For each conv, its enclosing modules are looked at from the
    outermost (the model itself excluded): the first whose convs are all filtered and which is a
    supported block is chosen; plain containers (``nn.Sequential``, ``nn.ModuleList``,
    ``nn.ModuleDict``) are looked into; any other module that cannot be fused ends the search
    (a ResNet ``BasicBlock``: its parts stay per layer, as the block's own gradients are not
    patch-constant inside). A timm EfficientNet's ``conv_head`` is chosen itself (it fuses with
    ``bn2``)."""
    chosen: set[str] = set()
    fuses: dict[str, bool] = {}  # per enclosing module, looked at once (its convs share it)
    for conv in convs:
        parts = conv.split(".")
        for depth in range(1, len(parts)):
            name = ".".join(parts[:depth])
            block = model.get_submodule(name)
            if name not in fuses:  # a supported block's units are all its convs, all filtered
                fuses[name] = fusable(block) is None
            if fuses[name]:
                chosen.add(name)
                break
            if type(block) not in _CONTAINERS:
                break
        else:
            head = head_units(model, conv, model.get_submodule(conv))
            if head is not None and not isinstance(head, str):
                chosen.add(conv)
    return [name for name, _ in model.named_modules() if name in chosen]
