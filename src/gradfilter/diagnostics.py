"""Gradient-fidelity diagnostics: how close the filtered gradients of each convolution are to the
exact ones on real batches, and what they cost.

For every chosen convolution and radius r, one real batch gives the conv's input x and the
gradient arriving at its output, gy (from ``loss_fn`` of the model as given, in eval mode). Both
backward passes of that one conv are then run on the *same* x and gy:

* exact:    autograd of the plain convolution (``F.conv2d``/``F.conv1d``);
* filtered: autograd of ``gradfilter.functional.conv2d``/``conv1d`` at radius r.

Reported per layer and radius (``docs/planner.md`` defines each):

* ``cos_weight`` / ``cos_input``: cosine similarity of the filtered and exact weight / input
  gradients, averaged over batches;
* ``energy_kept``: ||P gy||^2 / ||gy||^2, P the projection replacing each output pixel by the mean
  of its r x r patch (real pixels only, docs/spec.md §4.1); summed over batches before dividing;
* backward FLOPs (weight + input gradient, docs/spec.md §7 cost formulas) and bytes saved for
backward,
  vanilla and filtered.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as GF
from . import patches
from .nn import tf_same_pad, tf_same_total
from .surgery import conv_layers, is_timm_conv2d_same

__all__ = [
    "ConvCosts",
    "conv_geometry",
    "FidelityRow",
    "InspectReport",
    "block_transmission",
    "conv_costs",
    "energy_kept",
    "inspect",
    "select_convs",
]


# ----------------------------------------------------------------------------------------------
# Per-conv geometry and costs (docs/spec.md §7)


def conv_geometry(mod: nn.Module, in_shape: Sequence[int], out_shape: Sequence[int], radius: int):
    """(gh, gw, 2-D input shape, 2-D output shape) of ``mod`` seen as a 2-D conv."""
    one_d = isinstance(mod, nn.Conv1d)
    in2 = tuple(in_shape[:-1]) + (1, in_shape[-1]) if one_d else tuple(in_shape)
    out2 = tuple(out_shape[:-1]) + (1, out_shape[-1]) if one_d else tuple(out_shape)
    k = (1, *mod.kernel_size) if one_d else tuple(mod.kernel_size)
    s = (1, *mod.stride) if one_d else tuple(mod.stride)
    d = (1, *mod.dilation) if one_d else tuple(mod.dilation)
    rr = (1, radius) if one_d else (radius, radius)
    if _tf_same(mod):
        pads = [tf_same_total(in2[2 + i], k[i], s[i], d[i]) for i in range(2)]
        in2 = (*in2[:2], in2[2] + pads[0], in2[3] + pads[1])
    gh, gw = (GF.axis_geometry(in2[2 + i], out2[2 + i], k[i], s[i], d[i], rr[i]) for i in range(2))
    return gh, gw, in2, out2


def _tf_same(mod: nn.Module) -> bool:
    return bool(getattr(mod, "tf_same", False)) or is_timm_conv2d_same(mod)


@dataclass(frozen=True)
class ConvCosts:
    """Backward FLOPs and bytes saved for backward of one conv, vanilla and filtered."""

    flops_vanilla: int  # weight + input gradient
    flops_filtered: int
    saved_vanilla: int  # the conv's input
    saved_filtered: int  # x̃ (or x itself where the patch grid does not shrink the map)
    forward_flops: int


def conv_costs(
    mod: nn.Module,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    radius: int,
    element_size: int = 4,
    input_grad: bool = True,
) -> ConvCosts:
    """docs/spec.md §7 costs of ``mod`` on a batch of ``in_shape`` -> ``out_shape``.

    Vanilla backward: 2·N·Cout·(Cin/G)·kh·kw·Ho·Wo FLOPs for each of gW and gx; filtered:
    2·N·Cout·(Cin/G)·Ph·Pw each (times the kept taps for atrous convs, docs/spec.md §6). Without
    ``input_grad`` (the first trainable layer) gx is not computed.
    """
    gh, gw, in2, out2 = conv_geometry(mod, in_shape, out_shape, radius)
    n, cin = in2[0], in2[1]
    cout, cin_g = mod.weight.shape[0], mod.weight.shape[1]
    kh, kw = gh.kernel, gw.kernel
    fwd = 2 * n * cout * cin_g * kh * kw * out2[2] * out2[3]
    taps = (kh if gh.keeps_taps else 1) * (kw if gw.keeps_taps else 1)
    filt = 2 * n * cout * cin_g * gh.patches * gw.patches * taps
    parts = 2 if input_grad else 1
    vanilla_saved = math.prod(in_shape) * element_size
    patches = gh.patches * gw.patches
    if patches >= in2[2] * in2[3]:  # keeps x itself (functional._FilteredConv.forward)
        filtered_saved = math.prod(in2) * element_size
    else:
        filtered_saved = n * cin * patches * element_size
    return ConvCosts(fwd * parts, filt * parts, vanilla_saved, filtered_saved, fwd)


def energy_kept(gy: Tensor, radius: int) -> tuple[float, float]:
    """(||P gy||^2, ||gy||^2) for an N×C×H×W (or N×C×L) output gradient, P the r×r patch-mean
    projection on the centred patch grid of docs/spec.md §2.1 (means over real pixels only)."""
    g = gy.detach().double()
    if g.dim() == 3:
        g, rr = g.unsqueeze(-2), (1, radius)
    else:
        rr = (radius, radius)
    gh, gw = (
        GF.axis_geometry(g.shape[2 + i], g.shape[2 + i], 1, 1, 1, rr[i]) for i in range(2)
    )
    sums, scale, _ = patches.patch_mean_output(g, gh, gw)
    # ||P g||^2 = sum over patches of count * mean^2 = sum of sums^2 / count.
    kept = float((sums.pow(2) * scale).sum())
    return kept, float(g.pow(2).sum())


# ----------------------------------------------------------------------------------------------
# Layer selection and the per-conv backward passes


def select_convs(model: nn.Module, layers: str | Iterable[str] | None) -> dict[str, nn.Module]:
    """The convs named by ``layers`` (names or glob patterns; a pattern naming a block selects
    the convs inside it; None: every conv). Unknown names are an error listing the convs."""
    convs = dict(conv_layers(model))
    if not convs:
        raise ValueError(f"{type(model).__name__} has no nn.Conv1d/nn.Conv2d modules")
    if layers is None:
        return convs
    patterns = [layers] if isinstance(layers, str) else list(layers)
    chosen: dict[str, nn.Module] = {}
    for p in patterns:
        hits = [n for n in convs if n == p or fnmatch.fnmatchcase(n, p) or n.startswith(p + ".")]
        if not hits:
            listing = ", ".join(list(convs)[:12]) + (" ..." if len(convs) > 12 else "")
            raise ValueError(f"no convolution matches layer {p!r}; convs: {listing}")
        chosen.update((n, convs[n]) for n in hits)
    return chosen


def _conv(mod: nn.Module, x: Tensor, w: Tensor, radius: int | None) -> Tensor:
    """``mod``'s convolution with weight ``w``: plain (radius None) or filtered."""
    padding = mod.padding
    if _tf_same(mod):
        x = tf_same_pad(x, mod.kernel_size, mod.stride, mod.dilation)
        padding = 0
    one_d = isinstance(mod, nn.Conv1d)
    if radius is None:
        plain = F.conv1d if one_d else F.conv2d
        return plain(x, w, None, mod.stride, padding, mod.dilation, mod.groups)
    filtered = GF.conv1d if one_d else GF.conv2d
    return filtered(x, w, None, mod.stride, padding, mod.dilation, mod.groups, radius=radius)


def _grads(mod: nn.Module, x: Tensor, gy: Tensor, radius: int | None) -> tuple[Tensor, Tensor]:
    x = x.detach().requires_grad_(True)
    w = mod.weight.detach().requires_grad_(True)
    with torch.enable_grad():
        y = _conv(mod, x, w, radius)
        gx, gw = torch.autograd.grad(y, (x, w), gy)
    return gx, gw


def _cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return float("nan")
    return float(a @ b / (na * nb))


def _projection(a: Tensor, b: Tensor) -> float:
    """<a, b> / ||b||^2 (nan when b is zero)."""
    a, b = a.double().flatten(), b.double().flatten()
    nb = float(b @ b)
    return float("nan") if nb == 0 else float(a @ b) / nb


def _capture(model: nn.Module, convs: dict[str, nn.Module], inputs: Tensor, targets: Any,
             loss_fn: Callable) -> dict[str, tuple[Tensor, Tensor]]:
    """One forward/backward of the model; the input and output gradient of every chosen conv."""
    xs: dict[str, Tensor] = {}
    gys: dict[str, Tensor] = {}
    handles = []
    for name, mod in convs.items():
        def hook(m, args, out, name=name):
            if name in xs:  # a conv called twice: keep its first call
                return
            xs[name] = args[0].detach()
            if out.requires_grad:
                out.register_hook(lambda g, name=name: gys.__setitem__(name, g.detach()))
        handles.append(mod.register_forward_hook(hook))
    inputs = inputs.detach().float().requires_grad_(True)  # so every activation has a gradient
    try:
        with torch.enable_grad():
            loss = loss_fn(model(inputs), targets)
            torch.autograd.grad(loss, inputs)
    finally:
        for h in handles:
            h.remove()
    return {n: (xs[n], gys[n]) for n in convs if n in xs and n in gys}


# ----------------------------------------------------------------------------------------------
# Report


@dataclass
class FidelityRow:
    """Fidelity and costs of one conv at one radius (means over the batches seen)."""

    layer: str
    radius: int
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    cos_weight: float
    cos_input: float
    energy_kept: float
    flops_vanilla: int
    flops_filtered: int
    saved_vanilla: int
    saved_filtered: int
    # <filtered gW, exact gW> / ||exact gW||^2: the share of exact backprop's first-order (SGD)
    # loss decrease that a filtered weight update achieves — the cosine times the norm ratio
    descent_weight: float = float("nan")


@dataclass
class InspectReport:
    """What :func:`inspect` measured: one row per (layer, radius), layers in forward order."""

    rows: list[FidelityRow] = field(default_factory=list)
    batches: int = 0
    radii: tuple[int, ...] = ()

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(r.layer for r in self.rows))

    def get(self, layer: str, radius: int) -> FidelityRow:
        for r in self.rows:
            if r.layer == layer and r.radius == radius:
                return r
        raise KeyError(f"no row for layer {layer!r} at radius {radius}")

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "radii": list(self.radii),
                "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        head = ("layer", "kind", "r", "cos gW", "descent gW", "cos gx", "energy",
                "bwd MFLOP van/filt", "saved KiB van/filt")
        body = [
            (r.layer, r.kind, str(r.radius), f"{r.cos_weight:.3f}", f"{r.descent_weight:.3f}",
             f"{r.cos_input:.3f}", f"{r.energy_kept:.3f}",
             f"{r.flops_vanilla / 1e6:.1f}/{r.flops_filtered / 1e6:.2f}",
             f"{r.saved_vanilla / 1024:.0f}/{r.saved_filtered / 1024:.0f}")
            for r in self.rows
        ]
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                 for row in [head, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """PNG: weight-gradient cosine and energy kept vs radius, one line per layer (colour =
        depth)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = self.layers
        cmap = plt.get_cmap("viridis")
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        titles = ("weight gradient: cosine(filtered, exact)",
                  "input gradient: cosine(filtered, exact)", "gradient energy kept by patch means")
        keys = ("cos_weight", "cos_input", "energy_kept")
        for ax, title, key in zip(axes, titles, keys):
            for i, name in enumerate(layers):
                rows = sorted((r for r in self.rows if r.layer == name), key=lambda r: r.radius)
                colour = cmap(i / max(1, len(layers) - 1))
                ax.plot([r.radius for r in rows], [getattr(r, key) for r in rows], marker="o",
                        color=colour, label=name if len(layers) <= 12 else None, alpha=0.8)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("radius r")
            ax.set_xticks(list(self.radii))
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
        if len(layers) <= 12:
            axes[0].legend(fontsize=7)
        else:
            sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, len(layers) - 1))
            fig.colorbar(sm, ax=axes, label="layer index (forward order)")
        fig.suptitle(f"gradient fidelity per layer ({self.batches} batches)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return path


def _kind(mod: nn.Module) -> str:
    k = "x".join(map(str, mod.kernel_size))
    s = mod.stride[-1]
    g = "dw" if mod.groups == mod.in_channels and mod.groups > 1 else (
        f"g{mod.groups}" if mod.groups > 1 else "")
    return f"{k} s{s}{' ' + g if g else ''}"


def inspect(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]],
    layers: str | Iterable[str] | None = None,
    radii: Sequence[int] = (2, 4, 7),
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    max_batches: int | None = None,
    progress: bool = False,
) -> InspectReport:
    """Fidelity of the filtered gradients of ``layers`` (default: every conv) at each radius, on
    the ``(inputs, targets)`` pairs of ``batches``. The model runs in eval mode; its weights and
    ``.grad`` are not touched. ``loss_fn`` defaults to cross-entropy."""
    radii = tuple(GF.validate_radius(r, 1)[0] for r in radii)
    if not radii:
        raise ValueError("radii must name at least one radius")
    convs = select_convs(model, layers)
    loss_fn = loss_fn or (lambda out, t: F.cross_entropy(out, t))
    acc: dict[tuple[str, int], dict[str, float]] = {}
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    order: list[str] = []
    was_training = model.training
    model.eval()
    n_batches = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_batches, desc="inspect", unit="batch")
    try:
        for inputs, targets in batches:
            if max_batches is not None and n_batches >= max_batches:
                break
            captured = _capture(model, convs, inputs, targets, loss_fn)
            for name, (x, gy) in captured.items():
                if name not in shapes:
                    order.append(name)
                    shapes[name] = (tuple(x.shape), tuple(gy.shape))
                mod = convs[name]
                ex_gx, ex_gw = _grads(mod, x, gy, None)
                for r in radii:
                    gx, gw = _grads(mod, x, gy, r)
                    kept, total = energy_kept(gy, r)
                    a = acc.setdefault((name, r), {"cw": 0.0, "cx": 0.0, "n": 0, "k": 0.0,
                                                   "t": 0.0, "dw": 0.0})
                    a["cw"] += _cosine(gw, ex_gw)
                    a["dw"] += _projection(gw, ex_gw)
                    a["cx"] += _cosine(gx, ex_gx)
                    a["n"] += 1
                    a["k"] += kept
                    a["t"] += total
            n_batches += 1
            if bar is not None:
                bar.update(1)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if n_batches == 0:
        raise ValueError("inspect needs at least one batch")
    missing = [n for n in convs if n not in shapes]
    if len(missing) == len(convs):
        raise ValueError(f"none of the chosen convs ran with a gradient: {missing[:5]}")
    report = InspectReport(batches=n_batches, radii=radii)
    for name in order:
        mod = convs[name]
        in_shape, out_shape = shapes[name]
        for r in radii:
            a = acc[(name, r)]
            c = conv_costs(mod, in_shape, out_shape, r)
            report.rows.append(FidelityRow(
                layer=name, radius=r, kind=_kind(mod), in_shape=in_shape, out_shape=out_shape,
                cos_weight=a["cw"] / a["n"], cos_input=a["cx"] / a["n"],
                energy_kept=a["k"] / a["t"] if a["t"] > 0 else float("nan"),
                flops_vanilla=c.flops_vanilla, flops_filtered=c.flops_filtered,
                saved_vanilla=c.saved_vanilla, saved_filtered=c.saved_filtered,
                descent_weight=a["dw"] / a["n"],
            ))
    return report


def _block_input_grads(model: nn.Module, blocks: Sequence[str], inputs: Tensor, targets: Any,
                       loss_fn: Callable) -> dict[str, Tensor]:
    """One forward/backward; the gradient of the loss at the (first tensor) input of each of
    ``blocks`` (first call of a block only)."""
    mods = dict(model.named_modules())
    seen: dict[str, Tensor] = {}
    handles = []
    for name in blocks:
        def pre(m, args, name=name):
            if name not in seen and args and isinstance(args[0], Tensor):
                seen[name] = args[0]
        handles.append(mods[name].register_forward_pre_hook(pre))
    inputs = inputs.detach().float().requires_grad_(True)
    try:
        with torch.enable_grad():
            loss = loss_fn(model(inputs), targets)
            names = [n for n in blocks if n in seen and seen[n].requires_grad]
            grads = torch.autograd.grad(loss, [seen[n] for n in names], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return {n: g.detach() for n, g in zip(names, grads) if g is not None}


def block_transmission(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]],
    blocks: Sequence[str],
    radii: Sequence[int],
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    max_batches: int | None = 1,
) -> dict[tuple[str, int], float]:
    """How faithfully each block passes the gradient on to the blocks before it when its convs
    are filtered: the cosine between the loss gradient at the block's input with only that
    block's convs filtered at radius r and with none filtered (everything downstream exact).
    A trained block upstream of filtered blocks receives a gradient degraded by each of their
    transmissions, which is what the planner weighs (docs/planner.md). Convs that cannot be
    filtered at r (unsupported dilation) stay plain; a block with none filtered transmits 1.
    ``model`` is not modified (the measurements run on one copy, in eval mode)."""
    import copy

    from .surgery import apply, remove

    loss_fn = loss_fn or (lambda out, t: F.cross_entropy(out, t))
    radii = tuple(GF.validate_radius(r, 1)[0] for r in radii)
    base = copy.deepcopy(model).eval()  # filtered one block at a time, reverted after each
    convs = [n for n, _ in conv_layers(base)]
    has_conv = {b: any(n == b or n.startswith(b + ".") for n in convs) for b in blocks}
    sums: dict[tuple[str, int], float] = {}
    counts: dict[tuple[str, int], int] = {}
    for i, (inputs, targets) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        exact = _block_input_grads(base, blocks, inputs, targets, loss_fn)
        for name in blocks:
            if name not in exact:
                continue
            for r in radii:
                report = (apply(base, radius=r, names=[name, f"{name}.*"],
                                on_unsupported="skip") if has_conv[name] else None)
                if report is None or not report.layers:
                    cos = 1.0
                else:
                    got = _block_input_grads(base, [name], inputs, targets, loss_fn)
                    cos = _cosine(got[name], exact[name])
                    for conv in report.names:  # back to plain for the next measurement
                        remove(base.get_submodule(conv))
                if not math.isnan(cos):
                    sums[(name, r)] = sums.get((name, r), 0.0) + cos
                    counts[(name, r)] = counts.get((name, r), 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


def run_inspect(
    *,
    model: str,
    data: str,
    out: str | Path,
    layers: Sequence[str] | None = None,
    train_last: int | None = None,
    radii: Sequence[int] = (2, 4, 7),
    batches: int = 2,
    batch_size: int = 16,
    image_size: int = 64,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    quiet: bool = False,
) -> InspectReport:
    """``gradfilter inspect``: the fidelity report of a named model on the first ``batches``
    training batches of ``data``; table on stdout, JSON at ``out`` and a PNG beside it."""
    from torch.utils.data import DataLoader

    from .data import get_dataset
    from .files import write_json_atomic
    from .models import block_names, create_model

    if batches < 1 or batch_size < 1:
        raise ValueError(f"--batches and --batch-size must be >= 1, got {batches}, {batch_size}")
    splits = get_dataset(data, image_size=image_size, split="train")
    net = create_model(model, splits.num_classes, pretrained=pretrained, checkpoint=checkpoint)
    if train_last is not None:
        blocks = block_names(net)
        if not 1 <= train_last <= len(blocks):
            raise ValueError(f"--train-last must be in 1..{len(blocks)}, got {train_last}")
        layers = [*(layers or []), *blocks[-train_last:]]
    from .train.metrics import task_for

    task = task_for(model, splits.task, splits.num_classes, splits.ignore_index)
    loader = DataLoader(splits.train, batch_size=batch_size, shuffle=False)
    report = inspect(net, loader, layers=layers, radii=radii, loss_fn=task.loss_fn,
                     max_batches=batches, progress=not quiet)
    print(report.table())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"model": model, "data": data, "image_size": image_size,
                       "batch_size": batch_size, **report.to_dict()}, out)
    png = report.plot(out.with_suffix(".png"))
    print(f"wrote {out} and {png}")
    return report
