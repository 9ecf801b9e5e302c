"""Patch geometry of the filtered convolution (docs/spec.md): the patch grids of one spatial
axis, which dilations the filtered backward can represent, and argument checks shared by the ops."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "INPUT_GRAD_MODES",
    "AxisGeometry",
    "IntOrPair",
    "UnsupportedDilationError",
    "axis_geometry",
    "ceil_div",
    "check_dilation",
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
