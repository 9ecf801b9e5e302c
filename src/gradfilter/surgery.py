"""Model surgery: turn chosen convolutions of any model into filtered ones, and back.

Conversion swaps the class of the existing module in place, so parameter objects, hooks, optimizer
references and ``state_dict`` keys stay exactly as they were.
"""

from __future__ import annotations

import fnmatch
import functools
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from . import functional as GF
from ._mixed import mixed_class
from .blocks import enclosing_blocks, fuse_blocks
from .nn import (
    FilteredConv1d,
    FilteredConv2d,
    LeanBatchNormMixin,
    PackedReLU,
    PackedReLU6,
    tf_same_total,
)
from .selection import match, trace

__all__ = ["BN_MODES", "ConversionReport", "LayerReport", "apply", "conv_layers", "freeze",
           "is_timm_conv2d_same", "remove", "slim"]

RadiusSpec = int | Mapping[str, int] | Callable[[str, nn.Module], int]
FilterFn = Callable[[nn.Module, str], bool]

_FILTERED = (FilteredConv1d, FilteredConv2d)
_PLAIN_TO_FILTERED: dict[type, type] = {nn.Conv2d: FilteredConv2d, nn.Conv1d: FilteredConv1d}


def is_timm_conv2d_same(module: nn.Module) -> bool:
    """timm's ``Conv2dSame``: TF 'SAME' padding computed at run time (tf_* EfficientNets)."""
    cls = type(module)
    return cls.__name__ == "Conv2dSame" and cls.__module__.startswith("timm.")


def _target_class(module: nn.Module) -> tuple[type | None, str]:
    """The filtered class for ``module``, or None and the reason it cannot be filtered."""
    if isinstance(module, _FILTERED):
        return type(module), ""
    cls = type(module)
    if cls in _PLAIN_TO_FILTERED or is_timm_conv2d_same(module):
        if module.padding_mode != "zeros":
            return None, f"padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
        return (FilteredConv2d if isinstance(module, nn.Conv2d) else FilteredConv1d), ""
    return None, f"{cls.__module__}.{cls.__qualname__} overrides the convolution's forward"


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All 1-D/2-D convolutions of ``model`` (qualified name, module), in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]


@dataclass
class LayerReport:
    """One converted layer: where it is, what it sees, and what it saves for backward."""

    name: str
    kind: str
    radius: int
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    vanilla_saved_bytes: int | None = None
    filtered_saved_bytes: int | None = None


@dataclass
class ConversionReport:
    """What ``apply`` converted (in forward order when traced) and what it skipped, and why;
    ``lean``: the ReLU/BatchNorm modules it slimmed, ``fused``: the blocks it fused."""

    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    lean: list[str] = field(default_factory=list)
    fused: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [row.name for row in self.layers]

    def total_saved_bytes(self) -> tuple[int, int]:
        """(vanilla, filtered) bytes saved for backward by the converted layers' inputs."""
        v = sum(r.vanilla_saved_bytes or 0 for r in self.layers)
        f = sum(r.filtered_saved_bytes or 0 for r in self.layers)
        return v, f

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(r) for r in self.layers], "skipped": self.skipped,
                "lean": list(self.lean), "fused": list(self.fused)}

    def __len__(self) -> int:
        return len(self.layers)

    def __str__(self) -> str:
        def shape(s):
            return "x".join(map(str, s)) if s else "?"

        def size(b):
            return "?" if b is None else _fmt_bytes(b)

        head = ("layer", "kind", "r", "input", "output", "saved vanilla", "saved filtered")
        rows = [
            (r.name, r.kind, str(r.radius), shape(r.in_shape), shape(r.out_shape),
             size(r.vanilla_saved_bytes), size(r.filtered_saved_bytes))
            for r in self.layers
        ]
        v, f = self.total_saved_bytes()
        if any(r.vanilla_saved_bytes for r in self.layers):
            ratio = f"{v / f:.1f}x less" if f else ""
            rows.append(("total", "", "", "", "", _fmt_bytes(v), f"{_fmt_bytes(f)} ({ratio})"))
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *rows]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += [f"skipped {n}: {why}" for n, why in self.skipped]
        if self.lean:
            lines.append(f"lean: {len(self.lean)} ReLU/BatchNorm modules")
        if self.fused:
            lines.append(f"fused blocks: {', '.join(self.fused)}")
        return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def _radius_for(radius: RadiusSpec, name: str, module: nn.Module) -> int | None:
    if isinstance(radius, Mapping):
        if name in radius:
            return radius[name]
        for pattern, r in radius.items():
            if fnmatch.fnmatchcase(name, pattern):
                return r
        return None
    if callable(radius):
        return radius(name, module)
    return radius


def _as_2d(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:-1] + (1, shape[-1]) if len(shape) == 3 else shape


def _saved_bytes(module: nn.Module, radius: int, in_shape, out_shape, dtype) -> tuple[int, int]:
    elem = torch.empty((), dtype=dtype).element_size()
    in2, out2 = _as_2d(in_shape), _as_2d(out_shape)
    if len(in2) != 4:  # unbatched input
        in2, out2 = (1, *in2), (1, *out2)
    one_d = isinstance(module, nn.Conv1d)
    w_shape = _as_2d(tuple(module.weight.shape))
    stride = (1, *module.stride) if one_d else module.stride
    dilation = (1, *module.dilation) if one_d else module.dilation
    radius2 = (1, radius) if one_d else (radius, radius)
    if getattr(module, "tf_same", False) or is_timm_conv2d_same(module):
        # The conv sees the TF-'SAME'-padded input.
        pads = [tf_same_total(s, k, st, d)
                for s, k, st, d in zip(in2[2:], w_shape[2:], stride, dilation)]
        in2 = (*in2[:2], in2[2] + pads[0], in2[3] + pads[1])
    vanilla = elem
    for s in in_shape:
        vanilla *= s
    filtered = GF.filtered_saved_bytes(in2, out2, w_shape, stride, dilation, radius2, elem)
    return vanilla, filtered


def apply(
    model: nn.Module,
    radius: RadiusSpec = 4,
    last: int | None = None,
    names: str | Iterable[str] | None = None,
    filter_fn: FilterFn | None = None,
    example_input: Any = None,
    lean: str | None = None,
    fuse: bool = False,
    input_grad: str = "filtered",
    on_unsupported: str = "error",
    plan: Any = None,
) -> ConversionReport:
    """Convert matching ``nn.Conv2d``/``nn.Conv1d`` modules of ``model`` in place; return a report.

    The one call for a model's cheapest configuration: filtered convs, and optionally lean
    ReLU/BatchNorm layers around them (``lean``) and fused blocks (``fuse``), in the order
    they must be applied. Each module's train/eval mode is left as it was; :func:`remove`
    undoes everything.

    Selection (criteria combine; none given means every convolution):
      names     glob patterns on qualified module names (``"layer4.*"``);
      filter_fn ``filter_fn(module, name) -> bool``;
      last      the last N selected convolutions in forward execution order, found with one
                no-grad forward on ``example_input`` (required for ``last``).
    ``radius`` is an int, a ``{name or glob: radius}`` dict (which also restricts the selection to
    the layers it names) or ``radius(name, module) -> int``.
    ``on_unsupported``: ``"error"`` (default) raises for a selected layer that cannot be
    filtered (custom conv subclass, non-zero padding mode, unhandled dilation); ``"skip"`` leaves
    it plain and lists it in ``report.skipped``. Converting an already filtered layer just
    updates its radius.
    ``plan``: a ``gradfilter plan`` (its plan.json path, its dict, or a ``Plan``): converts
    exactly the convs it lists at their radii (``radius`` is then taken from it). To also freeze
    what the plan leaves frozen, use :func:`gradfilter.plan.apply_plan`.
    ``input_grad``: ``"filtered"`` (default, the paper) or ``"exact"``: the converted convs pass
    the exact input gradient down (weight gradients stay filtered, the saved tensors are the
    same, the backward-input cost is vanilla's); see ``gradfilter.functional.INPUT_GRAD_MODES``.
    ``lean``: ``"patch"``, ``"exact"`` or ``"frozen"`` also runs :func:`slim` (that BatchNorm
    mode) on the modules of the converted convs' parents (for a conv whose parent is an
    ``nn.Sequential``: the modules after it, up to the next conv); BatchNorm's patch radius is
    the largest of the converted convs there. ``fuse``: :func:`gradfilter.fuse_blocks` on the
    outermost blocks around the converted convs that it supports (others stay per layer).
    """
    GF.validate_input_grad(input_grad)
    if plan is not None:
        radius = _plan_layers(plan)
    if on_unsupported not in ("error", "skip"):
        raise ValueError(f"on_unsupported must be 'error' or 'skip', got {on_unsupported!r}")
    if last is not None and (not isinstance(last, int) or last < 1):
        raise ValueError(f"last must be a positive int, got {last!r}")
    if last is not None and example_input is None:
        raise ValueError("last=N needs example_input to find the forward execution order")
    if isinstance(names, str):
        names = [names]
    found = conv_layers(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.Conv1d/nn.Conv2d modules to filter")

    selected = {}
    for name, mod in found:
        if names is not None and not match(name, names):
            continue
        if filter_fn is not None and not filter_fn(mod, name):
            continue
        if isinstance(radius, Mapping) and _radius_for(radius, name, mod) is None:
            continue
        selected[name] = mod

    traced = trace(model, dict(found), example_input) if example_input is not None else {}
    if last is not None:
        order = [n for n in traced if n in selected]
        selected = {n: selected[n] for n in order[-last:]}
    if not selected:
        listing = "\n  ".join(f"{n} ({type(m).__name__})" for n, m in found)
        raise ValueError(f"no convolution matched the selection; the model has:\n  {listing}")

    report = ConversionReport()
    plan = []
    for name, mod in selected.items():
        r = _radius_for(radius, name, mod)
        problem = ""
        try:
            r = GF.validate_radius(r, 1)[0]
        except (TypeError, ValueError) as e:
            raise type(e)(f"{name}: {e}") from None
        cls, problem = _target_class(mod)
        if cls is not None:
            try:
                ks = mod.kernel_size if cls is FilteredConv2d else (1, *mod.kernel_size)
                st = mod.stride if cls is FilteredConv2d else (1, *mod.stride)
                dl = mod.dilation if cls is FilteredConv2d else (1, *mod.dilation)
                rr = (r, r) if cls is FilteredConv2d else (1, r)
                for i in range(2):
                    GF.check_dilation(ks[i], st[i], dl[i], rr[i])
            except GF.UnsupportedDilationError as e:
                problem = str(e)
        if problem:
            if on_unsupported == "error":
                raise ValueError(f"cannot filter {name}: {problem}")
            report.skipped.append((name, problem))
            continue
        plan.append((name, mod, cls, r))

    for name, mod, cls, r in plan:
        if not isinstance(mod, _FILTERED):
            mod._gradfilter_original_class = type(mod)
            mod.tf_same = is_timm_conv2d_same(mod)
            mod.__class__ = cls
        mod.radius = r
        mod.input_grad = input_grad
        row = LayerReport(name=name, kind=cls.__name__, radius=r)
        if name in traced:
            in_shape, out_shape, dtype = traced[name]
            row.in_shape, row.out_shape = in_shape, out_shape
            row.vanilla_saved_bytes, row.filtered_saved_bytes = _saved_bytes(
                mod, r, in_shape, out_shape, dtype
            )
        report.layers.append(row)
    if traced:
        order = {n: i for i, n in enumerate(traced)}
        report.layers.sort(key=lambda row: order.get(row.name, len(order)))
    radii = {row.name: row.radius for row in report.layers}
    if lean is not None and radii:
        report.lean = _slim_around(model, radii, lean)
    if fuse and radii:
        blocks = enclosing_blocks(model, radii)
        report.fused = fuse_blocks(model, blocks, on_unsupported="skip") if blocks else []
    return report


def _lean_scopes(model: nn.Module, convs: Iterable[str]) -> dict[str, list[str]]:
    """``{module name: [converted convs it belongs with]}`` for :func:`apply`'s ``lean``: every
    module under a converted conv's parent, or, where that parent is an ``nn.Sequential``,
    the modules after the conv up to the next child holding a conv."""
    scopes: dict[str, list[str]] = {}
    for conv in convs:
        parent_name, _, leaf = conv.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        prefix = f"{parent_name}." if parent_name else ""
        if isinstance(parent, nn.Sequential):
            children = list(parent.named_children())
            at = next(i for i, (n, _) in enumerate(children) if n == leaf)
            after = itertools.takewhile(lambda c: not conv_layers(c[1]), children[at + 1:])
            heads = [f"{prefix}{n}" for n, _ in after]
        elif parent_name:
            heads = [parent_name]
        else:  # a conv at the top of a model that is not a Sequential: no scope of its own
            heads = []
        for head in heads:
            for name, _ in model.get_submodule(head).named_modules(prefix=head):
                scopes.setdefault(name, []).append(conv)
    return scopes


def _slim_around(model: nn.Module, radii: dict[str, int], bn: str) -> list[str]:
    """:func:`slim` on the lean scopes of the converted convs ``radii`` ({name: radius})."""
    scopes = _lean_scopes(model, radii)
    if not scopes:
        raise ValueError("lean: the converted convs have no parent module whose ReLU/BatchNorm "
                         "layers could be slimmed; use gradfilter.slim(model, names=...)")

    def bn_radius(name: str, module: nn.Module) -> int:
        return max(radii[c] for c in scopes[name])

    return slim(model, names=list(scopes), bn=bn, radius=bn_radius)


BN_MODES = ("exact", "patch", "frozen")
_PACKED = {nn.ReLU: PackedReLU, nn.ReLU6: PackedReLU6}


def _lean_bn_class(cls: type) -> type:
    return mixed_class(LeanBatchNormMixin, cls, "Lean")


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d))


def slim(
    model: nn.Module,
    names: str | Iterable[str] | None = None,
    bn: str | None = "patch",
    radius: RadiusSpec = 4,
    pack_relu: bool = True,
) -> list[str]:
    """Make the activations and BatchNorm layers of the chosen part of ``model`` keep little
    for backward (:mod:`gradfilter.lean`); return the converted module names.

    ``names``: glob patterns of module names (None: the whole model). ``pack_relu``: every
    ``nn.ReLU``/``nn.ReLU6`` keeps its mask as bits (exact). ``bn`` for every BatchNorm:
    ``"exact"`` saves x only when its weight trains (exact gradients), ``"patch"`` saves x's
    sums over ``radius`` patches (the weight gradient becomes the patch approximation),
    ``"frozen"`` freezes the weight (the bias keeps training) and saves nothing; None leaves
    BatchNorm alone. Lean BatchNorm runs in eval mode only (as :func:`freeze` pins it).
    Call after :func:`freeze`: ``"frozen"`` changes ``requires_grad``. :func:`remove` undoes it.
    """
    if bn is not None and bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES} or None, got {bn!r}")
    if isinstance(names, str):
        names = [names]
    converted = []
    for name, mod in model.named_modules():
        if not name or (names is not None and not match(name, names)):
            continue
        if pack_relu and type(mod) in _PACKED:
            mod._gradfilter_original_class = type(mod)
            mod.__class__ = _PACKED[type(mod)]
            converted.append(name)
        elif bn is not None and (_is_batchnorm(mod) or isinstance(mod, LeanBatchNormMixin)):
            if not isinstance(mod, LeanBatchNormMixin):
                mod._gradfilter_original_class = type(mod)
                mod.__class__ = _lean_bn_class(type(mod))
            r = None
            if bn == "patch":
                r = _radius_for(radius, name, mod)
                try:
                    r = GF.validate_radius(r, 1)[0]
                except (TypeError, ValueError) as e:
                    raise type(e)(f"{name}: {e}") from None
            mod.bn_radius = r
            mod.bn_mode = bn
            if bn == "frozen" and mod.weight is not None:
                mod.weight.requires_grad_(False)
            converted.append(name)
    if not converted:
        raise ValueError("slim: no ReLU/ReLU6/BatchNorm module matched "
                         f"{'the whole model' if names is None else list(names)}")
    return converted


def _plan_layers(plan: Any) -> dict[str, int]:
    """The ``{conv name: radius}`` of a plan given as a path, a dict or an object."""
    import json
    from pathlib import Path

    if isinstance(plan, (str, Path)):
        try:
            plan = json.loads(Path(plan).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read plan {plan}: {e}") from None
    layers = plan.get("layers") if isinstance(plan, Mapping) else getattr(plan, "layers", None)
    if not isinstance(layers, Mapping) or not layers:
        raise ValueError("plan has no 'layers' mapping of conv names to radii")
    return {str(k): int(v) for k, v in layers.items()}


def remove(model: nn.Module) -> list[str]:
    """Turn every filtered convolution and every :func:`slim` layer back into its original
    class; return their names."""
    reverted = []
    for name, mod in model.named_modules():
        original = mod.__dict__.get("_gradfilter_original_class")
        if original is not None and not isinstance(mod, _FILTERED):
            del mod._gradfilter_original_class
            mod.__dict__.pop("bn_radius", None)
            mod.__dict__.pop("bn_mode", None)
            mod.__dict__.pop("_gradfilter_units", None)
            mod.__dict__.pop("_gradfilter_grids", None)
            mod.__dict__.pop("_gradfilter_pool", None)
            mod.__class__ = original
            reverted.append(name)
        elif isinstance(mod, _FILTERED):
            original = mod.__dict__.pop("_gradfilter_original_class", None)
            if original is None:
                original = nn.Conv2d if isinstance(mod, nn.Conv2d) else nn.Conv1d
            for attr in ("radius", "tf_same", "input_grad"):
                mod.__dict__.pop(attr, None)
            mod.__class__ = original
            reverted.append(name)
    return reverted


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` replacement for BatchNorm layers pinned to eval mode by ``freeze``."""
    return nn.Module.train(self, False)


def freeze(
    model: nn.Module,
    trainable: ConversionReport | Iterable[str] | Callable[[str, nn.Module], bool],
    bn_eval: bool = True,
) -> list[str]:
    """Freeze every parameter except those of the ``trainable`` modules; return trainable names.

    ``trainable`` is a report from :func:`apply`, module names / glob patterns (a module's
    submodules train with it), or ``fn(name, module) -> bool``; BatchNorm weights that
    :func:`slim` froze (``bn="frozen"``) stay frozen. With ``bn_eval`` every BatchNorm
    layer is put in eval mode and kept there through later ``model.train()`` calls (the paper's
    protocol: running statistics frozen, affine parameters train where their module trains).
    """
    if isinstance(trainable, ConversionReport):
        trainable = trainable.names
    if isinstance(trainable, str):
        trainable = [trainable]
    if callable(trainable):
        chosen = [n for n, m in model.named_modules() if n and trainable(n, m)]
    else:
        patterns = list(trainable)
        chosen = [n for n, _ in model.named_modules() if n and match(n, patterns)]
        missing = [p for p in patterns if not any(match(n, [p]) for n in chosen)]
        if missing:
            raise ValueError(f"freeze: no module matches {missing}")
    prefixes = tuple(f"{n}." for n in chosen)
    # slim(bn="frozen") keeps its BatchNorm weights frozen wherever they are
    pinned = {id(m.weight) for m in model.modules()
              if m.__dict__.get("bn_mode") == "frozen" and getattr(m, "weight", None) is not None}
    names = []
    for pname, p in model.named_parameters():
        p.requires_grad_(pname.startswith(prefixes) and id(p) not in pinned)
        if p.requires_grad:
            names.append(pname)
    if bn_eval:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                # a partial, not a bound method: it pickles (torch.save(model) of a frozen
                # model loads again), and copies with its module
                m.train = functools.partial(_stay_in_eval, m)
                m.train()
    return names
