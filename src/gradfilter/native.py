"""Native CPU kernels for the filtered convolution's full-resolution passes (optional, JIT-built).

``_native/kernels.cpp`` holds the loops (patch sums, patch repetition, bit-masked ReLU) that
replace the several strided PyTorch ops each pass otherwise takes (docs/performance.md says what
they buy). They are compiled once per machine with ``torch.utils.cpp_extension`` on first use
(about 10 s; cached under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``).

``GRADFILTER_NATIVE`` picks the policy:

* ``auto`` (default): build on first use; if that fails (no C++ compiler, say), warn once with
  the reason and use the pure-PyTorch path, which computes the same values;
* ``1``: the native kernels are required; a failed build raises;
* ``0``: never build, always use the pure-PyTorch path.

:func:`use_native` overrides the variable in-process (tests run both paths through it).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "NativeBuildWarning",
    "available",
    "bn_act_stats",
    "bn_affine",
    "filtered_backward",
    "flush_cache",
    "fused_block",
    "fused_block_backward",
    "fused_block_forward",
    "fused_dw_passes",
    "fused_hand_offs",
    "fused_plan",
    "linear",
    "linear_backward",
    "linear_fast_path",
    "mask_apply",
    "masked_clamp",
    "patch_sum",
    "patch_sum_cm",
    "unit_backward",
    "unpool",
    "use_native",
    "use_simd",
]

_SOURCE = Path(__file__).with_name("_native") / "kernels.cpp"
# One build per torch version: torch's JIT cache keys on the sources and flags only, and a
# library built against another torch's headers must not be loaded.
_LIB_NAME = "gradfilter_native_" + "".join(
    c if c.isalnum() else "_" for c in torch.__version__.split("+")[0])
# No contraction of a*b+c into FMA: the same rounding as PyTorch's separate ops, on every ISA
# (GCC contracts by default where the target has FMA, e.g. AArch64). No -march: the NEON and
# SSE2 paths are baseline on their ISAs, AVX2/AVX-512 are chosen at run time.
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
_lock = threading.Lock()
_state: dict[str, object] = {"loaded": None, "error": None, "override": None}


class NativeBuildWarning(RuntimeWarning):
    """The native kernels could not be built; the pure-PyTorch path is used instead."""


_ENV = "GRADFILTER_NATIVE"
# os.environ's own mapping (its keys encoded): one dict lookup per policy check instead of
# os.environ.get's several Python calls, which a fused block's forward pays inside a training
# step (20-45 us with the interpreter's state evicted by the block's large ops). Kept live:
# a value set through os.environ (monkeypatch.setenv) lands in the same mapping.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(_ENV) if _ENV_DATA is not None else None  # type: ignore[attr-defined]
_env_seen: list = [None, "auto"]  # the raw value last read and its policy


def _policy() -> str:
    if _state["override"] is not None:
        return "1" if _state["override"] else "0"
    raw = _ENV_DATA.get(_ENV_KEY) if _ENV_DATA is not None else os.environ.get(_ENV)
    if raw is _env_seen[0]:
        return _env_seen[1]
    text = os.environ.get(_ENV, "auto")
    value = text.strip().lower()
    if value not in ("auto", "0", "1"):
        raise ValueError(f"GRADFILTER_NATIVE must be auto, 0 or 1, got {value!r}")
    _env_seen[:] = [raw, value]
    return value


def _ninja_dir() -> str | None:
    """Where the pip ``ninja`` (a dependency) keeps its binary, if importable.

    Every build must run the same ninja: versions keep incompatible build logs, so processes
    that find different ninjas on their PATH (a system one, the virtual environment's) rebuild
    the cached kernels on each switch, 10–20 s each time (a Flower client's first round).
    """
    try:
        import ninja
    except ImportError:
        return None
    return getattr(ninja, "BIN_DIR", None)


def _build() -> None:
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "no CUDA runtime" notices: these kernels are CPU-only
    path = os.environ.get("PATH", "")
    ninja_dir = _ninja_dir()
    if ninja_dir:  # torch runs `ninja` from PATH
        os.environ["PATH"] = ninja_dir + os.pathsep + path
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name=_LIB_NAME,
            sources=[str(_SOURCE)],
            extra_cflags=_CFLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    finally:
        quiet.setLevel(level)
        os.environ["PATH"] = path


def available() -> bool:
    """True when the native kernels are (or can now be) loaded under the current policy."""
    policy = _policy()
    if policy == "0":
        return False
    if _state["loaded"] is None:
        with _lock:
            if _state["loaded"] is None:
                try:
                    _build()
                    _state["loaded"] = True
                except Exception as exc:  # compiler missing, build error, ...
                    _state["loaded"], _state["error"] = False, exc
                    if policy == "auto":
                        warnings.warn(
                            f"gradfilter: native CPU kernels could not be built ({exc}); using "
                            "the pure-PyTorch path (same results, slower on small maps). Set "
                            "GRADFILTER_NATIVE=0 to skip the build.",
                            NativeBuildWarning,
                            stacklevel=3,
                        )
    if not _state["loaded"] and policy == "1":
        raise RuntimeError(
            f"gradfilter: GRADFILTER_NATIVE=1 but the native kernels failed to build: "
            f"{_state['error']}"
        )
    return bool(_state["loaded"])


class use_native:  # noqa: N801 - used like a function, as torch.no_grad
    """Force the native kernels on (``True``) or off (``False``) inside a ``with`` block."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self) -> None:
        self._previous = _state["override"]
        _state["override"] = self.enabled

    def __exit__(self, *exc: object) -> None:
        _state["override"] = self._previous


class use_simd:  # noqa: N801 - used like a function, as torch.no_grad
    """Which vector paths the native kernels take inside a ``with`` block: ``True`` (or 2, the
    default) all the CPU has, AVX2/AVX-512 included; ``1`` the 4-lane paths alone (SSE2 on x86,
    NEON on AArch64: on x86 this runs the code ARM boards run); ``False`` (0) the portable
    scalar paths. The tests run each on x86."""

    def __init__(self, enabled: bool | int) -> None:
        self.level = 2 if enabled is True else int(enabled)
        if self.level not in (0, 1, 2):
            raise ValueError(f"use_simd takes True, False, 0, 1 or 2, got {enabled!r}")

    def __enter__(self) -> None:
        self._previous = int(_ops().set_simd(self.level))

    def __exit__(self, *exc: object) -> None:
        _ops().set_simd(self._previous)


def applies(t: Tensor) -> bool:
    """Whether the native kernels handle this tensor (CPU, floating point) under the policy."""
    return t.is_cpu and t.is_floating_point() and available()


def _ops():
    if not available():
        raise RuntimeError("gradfilter: the native kernels are disabled (GRADFILTER_NATIVE=0) "
                           f"or failed to build: {_state['error']}")
    return torch.ops.gradfilter


def patch_sum(x: Tensor, kh: int, kw: int, top: int, left: int, ph: int, pw: int) -> Tensor:
    """Sum of a 4-D map over a ph×pw grid of kh×kw patches starting ``top``/``left`` before it."""
    return _ops().patch_sum(x, kh, kw, top, left, ph, pw)


def patch_sum_cm(x: Tensor, kh: int, kw: int, top: int, left: int, ph: int, pw: int,
                 scale: float = 1.0, scale_map: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Patch sums as :func:`patch_sum`, channel-major (C, N, ph, pw) and times ``scale`` (and
    ``scale_map``, one value per patch, where given), with each channel's plain total (C,)."""
    return _ops().patch_sum_cm(x, kh, kw, top, left, ph, pw, scale, scale_map)


def unpool(g: Tensor, h: int, w: int, kh: int, kw: int, top: int, left: int) -> Tensor:
    """Each value of g repeated over its kh×kw patch of an h×w map (zero off the grid)."""
    return _ops().unpool(g, h, w, kh, kw, top, left)


def masked_clamp(x: Tensor, upper: float) -> tuple[Tensor, Tensor]:
    """(clamp(x, 0, upper), the mask 0 < x < upper packed as bits); ``upper=inf`` for ReLU."""
    return _ops().masked_clamp(x, upper)


def mask_apply(g: Tensor, bits: Tensor) -> Tensor:
    """g where the packed mask bit is set, else 0 (the lean activations' backward)."""
    return _ops().mask_apply(g, bits)


def bn_act_stats(z: Tensor, scale: Tensor, shift: Tensor, upper: float, k: int, top: int,
                 left: int, ph: int, pw: int,
                 count_u8: bool = False,
                 store: bool = True) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """Eval BatchNorm + activation of a fused block in one pass (src/gradfilter/blocks/):
    y = clamp(z·scale + shift, 0, upper) (``upper`` NaN: no activation) and, per k×k patch,
    channel-major (C, N, ph, pw): the count of 0 < v < upper (uint8 with ``count_u8``, which
    needs k·k ≤ 255), the sum of z there, the sum of y. ``store=False``: the sums only, y is
    not written (None; a pooled block's last unit)."""
    return _ops().bn_act_stats(z, scale, shift, upper, k, top, left, ph, pw, count_u8, store)


def bn_affine(mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
              dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """An eval BatchNorm's (scale γ/σ, shift β − μγ/σ, 1/σ) in ``dtype``, σ = sqrt(var + eps),
    in one call. No gradient flows through it: call it under no-grad (a fused block's forward)."""
    return _ops().bn_affine(mean, var, weight, bias, eps, dtype)


def fused_block_backward(g_out: Tensor, out_grid: list[int], inv_counts: Tensor,
                         xt: list[Tensor], count: list[Tensor], mz: list[Tensor],
                         scale: list[Tensor], inv_std: list[Tensor], mean: list[Tensor],
                         weight: list[Tensor], per_pixel: list[Tensor], flags: list[int],
                         grids: list[int], in_grid: list[int],
                         pool_in: Tensor | None) -> tuple[Tensor | None, list[Tensor | None]]:
    """A fused block's whole backward in one call (``blocks.reference.FusedBlock.backward``'s steps;
    ``g_out`` the output map's gradient, or a pooled block's patch means (C, N, P)):
    gx (None unless asked for) and per unit its (weight, conv bias, γ, β) grads (None where not
    asked for). The argument layout is documented at the kernel (kernels.cpp)."""
    return _ops().fused_block_backward(g_out, out_grid, inv_counts, xt, count, mz, scale,
                                       inv_std, mean, weight, per_pixel, flags, grids, in_grid,
                                       pool_in)


def fused_block_forward(x: Tensor, in_grid: list[int], conv_weight: list[Tensor],
                        conv_bias: list[Tensor], bn_mean: list[Tensor], bn_var: list[Tensor],
                        bn_weight: list[Tensor], bn_bias: list[Tensor], eps: list[float],
                        upper: list[float], geometry: list[int], flags: list[int],
                        skip: bool, pool: bool = False) -> tuple[Tensor, list[Tensor | None]]:
    """A fused block's forward in one call (``blocks.reference.FusedBlock.forward``'s steps): the
    block output (with ``pool``: its global average (N, C)) and per unit (x̃, mask count, Σ m·z or
    None, scale, 1/σ). Call it under no-grad. The argument layout is documented at the kernel
    (kernels.cpp)."""
    return _ops().fused_block_forward(x, in_grid, conv_weight, conv_bias, bn_mean, bn_var,
                                      bn_weight, bn_bias, eps, upper, geometry, flags, skip, pool)


def fused_plan(in_grid: list[int], geometry: list[int], flags: list[int], eps: list[float],
               upper: list[float], skip: bool, pool: bool, out_grid: list[int],
               inv_counts: Tensor, per_pixel: list[Tensor], grids: list[int],
               back_flags: list[int], back_in_grid: list[int], pool_in: Tensor | None,
               hw: int, patches: int) -> torch.ScriptObject:
    """A fused block's fixed arguments for one input size, batch and dtype, for
    :func:`fused_block` (the layout is documented at ``FusedPlan`` in kernels.cpp)."""
    _ops()
    return torch.classes.gradfilter.FusedPlan(in_grid, geometry, flags, eps, upper, skip, pool,
                                              out_grid, inv_counts, per_pixel, grids,
                                              back_flags, back_in_grid, pool_in, hw, patches)


def fused_block(x: Tensor, params: list[Tensor], stats: list[Tensor],
                plan: torch.ScriptObject) -> Tensor:
    """A fused block's forward recording one C++ autograd node whose backward is
    :func:`fused_block_backward` (``blocks.reference.FusedBlock`` without Python in between).
    ``params``: per unit its conv weight, then conv bias, BatchNorm γ, β where it has them;
    ``stats``: per unit its BatchNorm running mean and variance."""
    return _ops().fused_block(x, params, stats, plan)


def fused_hand_offs() -> int:
    """How many fused-block forwards so far took their input's patch sums from the fused block
    before them instead of summing the map (``fused_block_forward``'s hand-off: only when the
    input is that block's output tensor, unchanged since)."""
    return int(_ops().fused_hand_offs())


def fused_dw_passes() -> int:
    """How many fused-block depthwise units so far ran their conv inside their statistics pass
    (``fused_block_forward`` on tiny maps: stride 1, float32, AVX2) instead of calling
    ``conv2d`` and then reading its output back."""
    return int(_ops().fused_dw_passes())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` recording one C++ autograd node whose backward is
    :func:`linear_backward` (``gradfilter.linear``)."""
    return _ops().linear(x, weight, bias)


def linear_backward(g: Tensor, x: Tensor, weight: Tensor, need_x: bool = True,
                    need_w: bool = True,
                    need_b: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(g·W, gᵀ·x, Σ_rows g) for 2-D g (B, O), x (B, I), weight (O, I): a Linear layer's
    backward, both products in one pass over the weight where :func:`linear_fast_path` holds
    (else ATen's products). Results not asked for come back None."""
    return _ops().linear_backward(g, x, weight, need_x, need_w, need_b)


def linear_fast_path(batch: int, dtype: torch.dtype) -> bool:
    """Whether :func:`linear_backward` runs its one-pass kernel for this batch size and dtype
    on this CPU (AVX-512F, float32, batch 1-64)."""
    return bool(_ops().linear_fast_path(batch, dtype))


def flush_cache(tensors: list[Tensor]) -> bool:
    """Evict the memory of these CPU tensors from every core's caches (x86: clflushopt, or
    clflush); False where this build cannot (then nothing happened). Values are unchanged.
    See :func:`gradfilter.optim.flush_before_step` for why."""
    tensors = [t for t in tensors if t is not None and t.numel()]
    return bool(_ops().flush_cache(tensors)) if tensors else True


def unit_backward(g: Tensor, count: Tensor, mz: Tensor | None, scale: Tensor, inv_std: Tensor,
                  mean: Tensor, per_pixel: Tensor,
                  gscale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A fused unit's patch-resolution backward before its conv's products, in one pass over
    (C, N·P): (ḡ = g·count·scale/per_pixel·gscale, γ's grad Σ g·(mz − mean·count)·inv_std
    (zeros without ``mz``), β's grad Σ g·count, the conv bias's grad scale·Σ g·count)."""
    return _ops().unit_backward(g, count, mz, scale, inv_std, mean, per_pixel, gscale)


def filtered_backward(gy: Tensor, xt: Tensor, weight: Tensor, kernel: tuple[int, int],
                      out_grid: tuple[int, int, int, int, int, int],
                      in_grid: tuple[int, int, int, int], size: tuple[int, int], scale: float,
                      scale_map: Tensor | None, need_x: bool, need_w: bool,
                      pool_in: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(gx, gW, gb) of a filtered dense conv with summed taps, in one call (plain layout).

    ``xt`` holds the input patch sums (N, Cin, Ph, Pw); ``out_grid`` is
    (rh, rw, top, left, Ph, Pw) of gy's patches, ``in_grid`` (kh, kw, top, left) of the input's,
    ``size`` the input map's (H, W). ``pool_in``: the input grid's membership matrix, to
    unpool a tiny map by GEMM. Results not asked for come back empty.
    """
    return _ops().filtered_backward(gy, xt, weight, *kernel, *out_grid, *in_grid, *size,
                                    scale, scale_map, need_x, need_w, pool_in)
