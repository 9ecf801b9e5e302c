"""The optimizer's parameter flush (gradfilter.optim.FlushBeforeStep): values untouched, and
``auto``'s choice driven by the step times it measures (a scripted clock here)."""

from __future__ import annotations

import platform

import pytest
import torch

from gradfilter import native
from gradfilter.optim import FlushBeforeStep, flush_before_step
from tests.conftest import native_buildable

needs_native = pytest.mark.skipif(not native_buildable(), reason="no C++ toolchain")


class _Clock:
    """A timer that a step advances by ``flushed`` or ``plain`` seconds, by whether the step
    flushed (read from the recorded flush calls)."""

    def __init__(self, flushed: float, plain: float, calls: list) -> None:
        self.t, self.flushed, self.plain, self.calls, self.seen = 0.0, flushed, plain, calls, 0

    def __call__(self) -> float:
        return self.t

    def advance(self, *args) -> None:
        did = len(self.calls) > self.seen
        self.seen = len(self.calls)
        self.t += self.flushed if did else self.plain


def _setup(monkeypatch, flushed: float, plain: float, **kw):
    """An SGD optimizer with the flush attached, native.flush_cache recording its calls, and a
    scripted clock that each step advances (a pre-hook that runs after the flush's)."""
    calls: list = []
    monkeypatch.setattr(native, "available", lambda: True)
    monkeypatch.setattr(native, "flush_cache", lambda ts: calls.append(list(ts)) or True)
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=0.1)
    clock = _Clock(flushed, plain, calls)
    flush = FlushBeforeStep(opt, timer=clock, **kw)
    opt.register_step_pre_hook(clock.advance)

    def step():
        p.grad = torch.ones(4)
        opt.step()

    return flush, step, calls, p


@pytest.mark.parametrize("flushed,plain,want", [(1.0, 3.8, True), (1.3, 1.1, False),
                                                (1.05, 1.1, False)])  # within the margin
def test_auto_keeps_whichever_form_was_faster(monkeypatch, flushed, plain, want):
    flush, step, calls, p = _setup(monkeypatch, flushed, plain, probe=4, reprobe=10)
    assert flush.settle_steps == 5
    for _ in range(flush.settle_steps):
        step()
    assert flush.flushing is want
    assert len(calls) == 2  # probe steps 1 and 3 flushed, step 0 and the others did not
    assert calls[0][0] is p
    before = len(calls)
    for _ in range(4):  # steps 5..8: the choice
        step()
    assert len(calls) - before == (4 if want else 0)


def test_auto_probes_again_and_follows_a_change(monkeypatch):
    flush, step, calls, _ = _setup(monkeypatch, 1.0, 3.8, probe=2, reprobe=6)
    for _ in range(3):
        step()
    assert flush.flushing is True
    flush._timer.flushed, flush._timer.plain = 1.3, 1.1  # the VM moved its vCPUs
    for _ in range(6):  # steps 3..8: the second probe window is steps 7 and 8
        step()
    assert flush.flushing is False


def test_auto_probes_again_at_once_when_its_steps_drift(monkeypatch):
    """Between periodic probes, steps of the chosen form that turn DRIFT_RATIO times slower than
    the probe measured (over DRIFT_WINDOW steps) start a probe at once; smaller drift does not."""
    from gradfilter.optim import DRIFT_RATIO, DRIFT_WINDOW

    flush, step, calls, _ = _setup(monkeypatch, 1.0, 1.1, probe=2, reprobe=1000)
    for _ in range(flush.settle_steps):
        step()
    assert flush.flushing is False and flush.probes == 1
    flush._timer.plain = 1.1 * DRIFT_RATIO * 0.95  # slower, within the ratio: no probe
    for _ in range(3 * DRIFT_WINDOW):
        step()
    assert flush.probes == 1 and flush.flushing is False and len(calls) == 1
    flush._timer.plain = 3.8  # the VM moved its vCPUs: unflushed steps turn slow
    taken = 0
    while flush.probes == 1 and taken < 2 * DRIFT_WINDOW:
        step()
        taken += 1
    # the window's median (its middle two's mean) turns slow once half of it is slow: then one
    # unmeasured step and the two probe steps
    assert taken == DRIFT_WINDOW // 2 + 1 + 2
    assert flush.probes == 2 and flush.flushing is True
    before = len(calls)
    for _ in range(3):
        step()
    assert len(calls) - before == 3


def test_always_and_never_do_not_probe(monkeypatch):
    for mode, n in (("always", 5), ("never", 0)):
        flush, step, calls, _ = _setup(monkeypatch, 1.0, 3.8, mode=mode)
        for _ in range(5):
            step()
        assert len(calls) == n, mode


def test_the_flush_does_not_keep_its_optimizer_alive():
    """The optimizer holds the flush through its hooks; the flush holds the optimizer only
    weakly, so a registry keyed weakly on optimizers (bench step's) lets them go."""
    import gc
    import weakref

    from gradfilter.bench.step import FLUSH

    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    FLUSH[opt] = flush = flush_before_step(opt)
    assert flush.optimizer is opt
    gone = weakref.ref(opt)
    del opt
    gc.collect()
    assert gone() is None and flush.optimizer is None and flush not in FLUSH.values()


def test_bad_arguments_are_refused():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match="mode must be"):
        FlushBeforeStep(opt, mode="sometimes")
    with pytest.raises(ValueError, match="probe must be an even number"):
        FlushBeforeStep(opt, probe=3)
    with pytest.raises(ValueError, match="reprobe must exceed probe"):
        FlushBeforeStep(opt, probe=4, reprobe=4)


@needs_native
def test_flush_hooks_leave_training_unchanged():
    """A real optimizer with the hooks attached (forced to flush) takes the same steps as one
    without, and the flush leaves every value as it was."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    twin.load_state_dict(model.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, twin)]
    flush = flush_before_step(opts[0], mode="always")
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(3):
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    # x86 builds flush (clflushopt/clflush); others report that they cannot (False), and the
    # first step that would flush turns the hooks off there
    x86 = platform.machine() in ("x86_64", "AMD64")
    assert flush.flushing == x86 and flush.steps == 3
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    t = torch.randn(300, 70)
    before = t.clone()
    assert native.flush_cache([t, t.t(), t[:, ::3], torch.empty(0), None]) == x86
    assert torch.equal(t, before)
    flush.remove()
    opts[0].step()
    assert flush.steps == 3  # detached


def test_no_cpu_parameter_or_no_kernels_turns_the_flush_off(monkeypatch):
    """A model on another device (here the meta device) has nothing to flush, and without the
    native kernels nothing can be: the first step that would flush turns it off for good."""
    calls: list = []
    monkeypatch.setattr(native, "flush_cache", lambda ts: calls.append(ts) or True)
    monkeypatch.setattr(native, "available", lambda: True)
    meta = torch.optim.SGD([torch.nn.Parameter(torch.ones(3, device="meta"))], lr=0.1)
    flush = FlushBeforeStep(meta)
    for _ in range(3):
        flush._before(meta, (), {})
        flush._after(meta, (), {})
    assert flush.mode == "never" and not flush.flushing and not calls
    monkeypatch.setattr(native, "available", lambda: False)
    cpu = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    flush = FlushBeforeStep(cpu, mode="always")
    flush._before(cpu, (), {})
    assert flush.mode == "never" and not flush.flushing and not calls
