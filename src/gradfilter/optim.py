"""Optimizer set-up shared by the trainer, the planner's step timing and the benchmarks: the fused
step where it applies, and the parameter flush before each step where that is faster."""

from __future__ import annotations

import statistics
import time
import weakref
from collections import deque

import torch


def fused_kwargs(params: list[torch.Tensor]) -> dict[str, bool]:
    """``{"fused": True}`` where PyTorch's one-kernel SGD/AdamW step applies (floating-point
    parameters, all on the CPU or all on CUDA), else ``{}``. On this project's 2-core CPU it
    makes the step of the benchmark models' last blocks 1.2-1.6x (SGD with momentum) and 2.3-3.1x
    (AdamW) faster than the default for-each step."""
    kinds = {p.device.type for p in params}
    if len(kinds) == 1 and kinds <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


# auto flushes only where its probe steps were at least 10% shorter: where the cores share a
# cache the flush costs 0.2-0.3 ms (15-25% of the step) and a noisy probe must not pick it; where
# they do not, it saves 60-70% of the step.
FLUSH_MARGIN = 0.9
# auto probes again at once (not at the next periodic probe) when the median of its last
# DRIFT_WINDOW steps exceeds DRIFT_RATIO times what its last probe measured for the form it
# chose: the VM's placement can change within minutes, and an unflushed step that turns slow
# takes 3-4x as long (bench step times 31-step cases inside one 500-step probe period).
DRIFT_RATIO = 1.5
DRIFT_WINDOW = 8


class FlushBeforeStep:
    """Evicts an optimizer's CPU parameters from every cache right before each step, where
    that makes the step faster (``mode="auto"``: measured on the optimizer's own steps).

    Why: an optimizer step writes every parameter. Where the two threads that ran the forward
    and backward sit on cores that share no cache (a VM whose vCPUs the host placed on different
    core complexes), a parameter line both of them read is still in both caches, and each write
    waits for the other core's copy to be invalidated. A long backward (vanilla's) evicts those
    lines before the step; a fused filtered backward is too short to. On this project's VM that
    took MobileNetV2 last 4's fused SGD step from 1.0 to 3.7-3.9 ms; flushing the parameters
    first (0.27 ms) brings it back, and costs ~0.2 ms where the cores share their cache
    (docs/performance.md). Values are never changed.

    ``mode``: ``"auto"`` times ``probe`` steps alternating with and without the flush (after one
    unmeasured step), flushes from then on if the flushed ones took under ``FLUSH_MARGIN`` of
    the others' time, and probes again every ``reprobe`` steps (the VM's placement can change),
    or at once when its steps drift above the probe's time (``DRIFT_RATIO``); ``probes`` counts
    the probes done; ``"always"``; ``"never"``. Without the native kernels, off x86 or with no
    parameter on the CPU, the first step that would flush turns the flush off (``mode`` becomes
    ``"never"``).
    ``remove()`` detaches the hooks."""

    def __init__(self, optimizer: torch.optim.Optimizer, mode: str = "auto", probe: int = 6,
                 reprobe: int = 500, timer=time.perf_counter) -> None:
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"mode must be 'auto', 'always' or 'never', got {mode!r}")
        if probe < 2 or probe % 2:
            raise ValueError(f"probe must be an even number >= 2, got {probe}")
        if reprobe <= probe:
            raise ValueError(f"reprobe must exceed probe ({probe}), got {reprobe}")
        # a weak reference: the optimizer holds this object through its hooks, and a registry
        # keyed weakly on the optimizer (bench.step.FLUSH) must not keep it alive through this
        self._optimizer = weakref.ref(optimizer)
        self.mode, self.probe, self.reprobe = mode, probe, reprobe
        self._timer = timer
        self.steps = 0
        self.flushing = mode == "always"  # the current choice (auto: after the last probe)
        self._now = False  # whether this step flushed
        self._t0 = 0.0
        self._probed: dict[bool, list[float]] = {True: [], False: []}
        self._phase = 0  # the step that opens the current probe period
        self._ref: float | None = None  # the chosen form's median step time in the last probe
        self._recent: deque[float] = deque(maxlen=DRIFT_WINDOW)
        self.probes = 0
        self._handles = [optimizer.register_step_pre_hook(self._before),
                         optimizer.register_step_post_hook(self._after)]

    @property
    def settle_steps(self) -> int:
        """Steps until ``auto`` has made its first choice (steps after that are steady)."""
        return 1 + self.probe if self.mode == "auto" else 0

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer the hooks are on (None once it is gone)."""
        return self._optimizer()

    @staticmethod
    def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        return [p for g in optimizer.param_groups for p in g["params"] if p.device.type == "cpu"]

    def _probing(self) -> int | None:
        """This step's index inside a probe window (steps 1.. of every ``reprobe`` from the
        period's first step), or None."""
        if self.mode != "auto":
            return None
        k = (self.steps - self._phase) % self.reprobe - 1
        return k if 0 <= k < self.probe else None

    def _before(self, optimizer, args, kwargs) -> None:
        k = self._probing()
        self._now = self.flushing if k is None else k % 2 == 0
        self._t0 = self._timer()
        if self._now:
            from . import native

            params = self._params(optimizer)  # none on the CPU (a GPU model): nothing to decide
            if not (params and native.available() and native.flush_cache(params)):
                self.mode, self.flushing, self._now = "never", False, False

    def _after(self, optimizer, args, kwargs) -> None:
        took = self._timer() - self._t0
        k = self._probing()
        if k is not None:
            self._probed[self._now].append(took)
            if k == self.probe - 1:
                flushed = statistics.median(self._probed[True])
                plain = statistics.median(self._probed[False])
                self.flushing = flushed < FLUSH_MARGIN * plain
                self._ref = flushed if self.flushing else plain
                self._probed = {True: [], False: []}
                self._recent.clear()
                self.probes += 1
        elif self.mode == "auto" and self._ref is not None:
            self._recent.append(took)
            if (len(self._recent) == DRIFT_WINDOW
                    and statistics.median(self._recent) > DRIFT_RATIO * self._ref):
                self._phase = self.steps + 1  # a new period: one unmeasured step, then a probe
                self._recent.clear()
        self.steps += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def flush_before_step(optimizer: torch.optim.Optimizer, mode: str = "auto") -> FlushBeforeStep:
    """Attach :class:`FlushBeforeStep` to ``optimizer`` (the trainer and ``bench step`` do, for
    every method); returns it (``.flushing`` says what ``auto`` chose)."""
    return FlushBeforeStep(optimizer, mode)
