"""Patch geometry of the filtered convolution (docs/spec.md): the patch grids of one spatial
axis, which dilations the filtered backward can represent, and argument checks shared by the ops."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "INPUT_GRAD_MODES",
    "AxisGeometry",
    "ConvArgs",
    "IntOrPair",
    "UnsupportedDilationError",
    "axis_geometry",
    "ceil_div",
    "check_dilation",
    "conv_args",
    "explicit_padding",
    "filtered_saved_bytes",
    "validate_input_grad",
    "validate_radius",
]

IntOrPair = int | tuple[int, ...]

#: How a filtered conv computes the gradient it passes down (its input gradient):
#: ``"filtered"`` from the patch-mean output gradient (docs/spec.md §4, the paper: cheap,
# approximate);
#: ``"exact"`` from the full output gradient and the weight (exact, full backward-input cost). The
#: weight gradient is filtered in both, and both save the same tensors (x̃ and the weight).
INPUT_GRAD_MODES = ("filtered", "exact")

class UnsupportedDilationError(ValueError):
    """A dilation the filtered backward cannot represent at patch resolution (docs/spec.md §6)."""


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for integers."""
    return -(-a // b)


def _half_up(a: int) -> int:
    """ceil(a / 2) for any integer, negative included."""
    return -((-a) // 2)


@dataclass(frozen=True)
class AxisGeometry:
    """Patch geometry of one spatial axis (docs/spec.md §2, §6)."""

    size: int  # input length
    out_size: int  # output length
    kernel: int
    stride: int
    radius: int
    patches: int  # P = ceil(out_size / radius)
    out_pad: int  # rows of padding before the output grid (0 <= out_pad < radius)
    in_pad: int  # rows of padding before the input grid (negative: the grid starts inside)
    tap_dilation: int  # 0: taps summed; otherwise the dilation of the conv at patch resolution

    @property
    def in_patch(self) -> int:
        """Input patch length: the output patch scaled by the stride."""
        return self.radius * self.stride

    @property
    def keeps_taps(self) -> bool:
        return self.tap_dilation > 0


def check_dilation(kernel: int, stride: int, dilation: int, radius: int) -> int:
    """Return the patch-resolution dilation of one axis (0 when the taps are summed).

    Taps closer than one input patch fall into the same or the next patch and are summed
    (docs/spec.md §4.2).
    Taps at least a patch apart (atrous convs) are kept: the conv at patch resolution then has
    dilation ``d / (r·s)``, which must be an integer with a centred kernel (docs/spec.md §6).
    """
    in_patch = radius * stride
    if kernel == 1 or dilation == 1 or dilation < in_patch:
        return 0
    if dilation % in_patch or ((kernel - 1) * (dilation // in_patch)) % 2:
        raise UnsupportedDilationError(
            f"dilation {dilation} with kernel {kernel}, stride {stride} and radius {radius} is not "
            f"handled: a dilation of at least radius*stride={in_patch} must be a multiple of it "
            f"with a centred kernel; pick a radius that divides {dilation} (or one above it)"
        )
    return dilation // in_patch


def axis_geometry(
    size: int, out_size: int, kernel: int, stride: int, dilation: int, radius: int
) -> AxisGeometry:
    patches = ceil_div(out_size, radius)
    return AxisGeometry(
        size=size,
        out_size=out_size,
        kernel=kernel,
        stride=stride,
        radius=radius,
        patches=patches,
        out_pad=_half_up(patches * radius - out_size),
        in_pad=_half_up(patches * radius * stride - size),
        tap_dilation=check_dilation(kernel, stride, dilation, radius),
    )


def validate_radius(radius: object, ndim: int = 2) -> tuple[int, ...]:
    """Normalise ``radius`` to a tuple of ``ndim`` positive ints, or raise one clear error."""
    values = radius if isinstance(radius, (tuple, list)) else (radius,) * ndim
    if len(values) != ndim or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise TypeError(f"radius must be an int (or {ndim} ints), got {radius!r}")
    if any(v < 1 for v in values):
        raise ValueError(f"radius must be >= 1, got {radius!r}")
    return tuple(values)


def validate_input_grad(input_grad: object) -> bool:
    """Check an ``input_grad`` mode; return True for ``"exact"``."""
    if input_grad not in INPUT_GRAD_MODES:
        raise ValueError(
            f"input_grad must be one of {', '.join(map(repr, INPUT_GRAD_MODES))}, "
            f"got {input_grad!r}"
        )
    return input_grad == "exact"


def filtered_saved_bytes(
    in_shape, out_shape, weight_shape, stride, dilation, radius, element_size: int = 4
) -> int:
    """Bytes of x̃, what the filtered conv saves besides the weight, from 2-D shapes alone."""
    gh, gw = (
        axis_geometry(in_shape[d], out_shape[d], weight_shape[d], stride[i], dilation[i], radius[i])
        for i, d in enumerate((-2, -1))
    )
    return in_shape[0] * in_shape[1] * gh.patches * gw.patches * element_size


@dataclass(frozen=True)
class ConvArgs:
    """A filtered conv's arguments, checked: ``stride``, ``dilation`` and ``padding`` as the
    plain conv takes them, their 2-D view (a 1-D conv is a 2-D one of height 1 and radius 1 on
    that axis) and whether the input gradient is exact."""

    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[int, ...] | str
    stride2: tuple[int, int]
    dilation2: tuple[int, int]
    radius2: tuple[int, int]
    exact_gx: bool


def _as_tuple(v: IntOrPair, n: int, name: str) -> tuple[int, ...]:
    t = tuple(v) if isinstance(v, (tuple, list)) else (v,) * n
    if len(t) != n:
        raise ValueError(f"{name} must be an int or {n} ints, got {v!r}")
    return t


def conv_args(x_shape, weight_shape, stride, padding, dilation, radius, input_grad: object,
              one_d: bool, caller: str) -> ConvArgs:
    """Check a filtered ``conv1d``/``conv2d`` call's arguments (one clear error each, before any
    work: a dilation the radius cannot represent included) and normalise them."""
    nd = 1 if one_d else 2
    radius_t = validate_radius(radius, nd)
    exact_gx = validate_input_grad(input_grad)
    if len(x_shape) not in (nd + 1, nd + 2):
        raise ValueError(f"{caller}: expected a {nd + 2}-D (batched) or {nd + 1}-D (unbatched) "
                         f"input, got {len(x_shape)}-D with shape {tuple(x_shape)}")
    stride_t = _as_tuple(stride, nd, "stride")
    dilation_t = _as_tuple(dilation, nd, "dilation")
    if not isinstance(padding, str):
        padding = _as_tuple(padding, nd, "padding")
    lift = (lambda t: (1, *t)) if one_d else (lambda t: t)
    stride2, dilation2, radius2 = lift(stride_t), lift(dilation_t), lift(radius_t)
    kernel = (1, weight_shape[-1]) if one_d else tuple(weight_shape[-2:])
    for i in range(2):
        check_dilation(kernel[i], stride2[i], dilation2[i], radius2[i])
    return ConvArgs(stride_t, dilation_t, padding, stride2, dilation2, radius2, exact_gx)


def explicit_padding(padding, kernel, dilation) -> tuple[tuple[int, int], tuple[int, int]]:
    """(before, after) zero padding of each axis of a 2-D view with this ``kernel`` (kh, kw) and
    ``dilation``, for ``"same"`` (as ``F.conv2d``: the odd extra element goes after) and
    ``"valid"`` too; ``padding`` is 1 (a 1-D conv's) or 2 ints otherwise."""
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)
    pad = (0, *padding) if len(padding) == 1 else tuple(padding)
    return tuple((p, p) for p in pad)
