"""A small, task-agnostic fine-tuning loop: vanilla backprop or gradient filtering on the last
N blocks of any model, with the paper's protocol (last N blocks + classifier train, BatchNorm
in eval mode).

Loss, metric and data are parameters, so another task (segmentation, regression) plugs in
without touching the loop:

* ``loss_fn(outputs, targets) -> scalar tensor``;
* ``metric_fn`` is either a function ``(outputs, targets) -> float`` whose per-batch values
  are averaged weighted by batch size (accuracy), or an object with ``reset()``,
  ``update(outputs, targets)`` and ``compute() -> float`` for metrics that do not average
  over batches (mIoU from a confusion matrix);
* loaders yield ``(inputs, targets)`` pairs; tensors (also inside tuples, lists and dicts)
  are moved to ``device``.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..memory import count_saved
from ..methods import METHODS, default_lean
from ..models.registry import block_names, classifier_name
from ..optim import flush_before_step, fused_kwargs
from ..surgery import BN_MODES, ConversionReport, apply, freeze, slim

__all__ = [
    "METHODS",
    "method_lean",
    "PrepareInfo",
    "accuracy",
    "cross_entropy",
    "evaluate",
    "prepare_model",
    "seed_everything",
    "train",
]

TIMING_WARMUP_STEPS = 2  # first steps (allocator, oneDNN/cuDNN kernel selection) are not timed


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of ``outputs`` logits (``N x C [x ...]``) against class indices."""
    return F.cross_entropy(outputs, targets)


def accuracy(outputs: Tensor, targets: Tensor) -> float:
    """Fraction of samples whose arg-max logit is the target class."""
    return (outputs.argmax(dim=1) == targets).float().mean().item()


@dataclass
class PrepareInfo:
    """What :func:`prepare_model` did: which blocks train, which convs were filtered."""

    method: str
    radius: int | dict[str, int] | None
    blocks: list[str]
    trainable: list[str] = field(default_factory=list)  # modules left trainable
    trainable_params: int = 0
    report: ConversionReport | None = None
    lean: str | None = None
    slimmed: list[str] = field(default_factory=list)  # ReLU/BatchNorm layers made lean
    input_grad: str | None = None  # filtered convs' input-gradient mode (filtered methods)
    fused: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "radius": self.radius,
            "blocks": list(self.blocks),
            "trainable": list(self.trainable),
            "trainable_params": self.trainable_params,
            "filtered_layers": self.report.names if self.report is not None else [],
            "lean": self.lean,
            "lean_layers": list(self.slimmed),
            "fused_blocks": list(self.fused),
            "input_grad": self.input_grad,
        }


def method_lean(method: str, lean: str | None = None) -> str | None:
    """The BatchNorm mode of ``method``'s lean layers (None: no lean layers): ``lean`` where
    given, else ``"patch"`` for the lean and fused methods."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if lean is not None and lean not in BN_MODES:
        raise ValueError(f"lean must be one of {BN_MODES} or None, got {lean!r}")
    return lean if lean is not None else default_lean(method)


def prepare_model(
    model: nn.Module,
    method: str,
    radius: int | Mapping[str, int],
    train_last: int,
    example_input: Any,
    lean: str | None = None,
    input_grad: str = "filtered",
) -> tuple[nn.Module, PrepareInfo]:
    """Set ``model`` up in place for fine-tuning its last ``train_last`` blocks with ``method``.

    ``method`` (:data:`METHODS`): ``"vanilla"`` plain backprop; ``"filtered"`` every convolution
    inside those blocks (and a block that is itself a conv, such as EfficientNet's
    ``conv_head``) filtered at ``radius``; ``"lean"`` also lean ReLU/BatchNorm layers there;
    ``"fused"`` also fused blocks (:func:`gradfilter.apply`'s ``lean`` and ``fuse``). Only those
    blocks and the classifier keep ``requires_grad``, and BatchNorm layers stay in eval mode.
    ``example_input`` is a batch the model accepts (one no-grad forward traces the converted
    layers' shapes). ``radius`` may also be ``{conv name: radius}`` (a ``gradfilter plan``):
    only those convs are filtered, each at its own radius; every name must be a conv inside the
    trained blocks. ``lean`` ("exact", "patch" or "frozen") picks the lean BatchNorm mode (the
    lean and fused methods default to "patch"; given with vanilla or filtered it slims those
    methods' blocks too). ``input_grad`` ("filtered" or "exact"): what the filtered convs pass
    down (:func:`gradfilter.apply`'s ``input_grad``).
    """
    lean = method_lean(method, lean)
    blocks_all = block_names(model)
    if not isinstance(train_last, int) or not 1 <= train_last <= len(blocks_all):
        raise ValueError(
            f"train_last must be an int in 1..{len(blocks_all)} (the model's blocks), "
            f"got {train_last!r}"
        )
    blocks = blocks_all[-train_last:]
    scope = [f"{b}.*" for b in blocks] + blocks
    report = None
    slimmed: list[str] = []
    if method != "vanilla":
        report = apply(model, radius=radius, names=scope, example_input=example_input,
                       input_grad=input_grad, lean=lean, fuse=method == "fused")
        if isinstance(radius, Mapping):
            unknown = sorted(set(radius) - set(report.names))
            if unknown:
                raise ValueError(f"radius names convs not in the last {train_last} blocks "
                                 f"({', '.join(blocks)}): {', '.join(unknown[:5])}")
        slimmed = report.lean
    elif lean is not None:  # lean layers around plain convs
        slimmed = slim(model, names=scope, bn=lean, radius=radius if radius else 1)
    head = classifier_name(model)
    trainable = blocks + ([head] if head is not None else [])
    freeze(model, trainable=trainable, bn_eval=True)
    info = PrepareInfo(
        method=method,
        radius=(dict(radius) if isinstance(radius, Mapping) else radius)
        if method != "vanilla" else None,
        blocks=blocks,
        trainable=trainable,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        report=report,
        lean=lean,
        slimmed=slimmed,
        input_grad=input_grad if method != "vanilla" else None,
        fused=report.fused if report is not None else [],
    )
    return model, info


def _to(obj: Any, device: torch.device, channels_last: bool = False) -> Any:
    """obj's tensors on ``device``; with ``channels_last`` its 4-D floating ones in that format."""
    if isinstance(obj, Tensor):
        obj = obj.to(device, non_blocking=True)
        if channels_last and obj.dim() == 4 and obj.is_floating_point():
            obj = obj.contiguous(memory_format=torch.channels_last)
        return obj
    if isinstance(obj, Mapping):
        return {k: _to(v, device, channels_last) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device, channels_last) for v in obj)
    return obj


def _forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def _batch_size(targets: Any) -> int:
    if isinstance(targets, Tensor):
        return int(targets.shape[0]) if targets.ndim else 1
    if isinstance(targets, Mapping):
        return _batch_size(next(iter(targets.values())))
    if isinstance(targets, (tuple, list)) and targets and isinstance(targets[0], Tensor):
        return _batch_size(targets[0])
    if isinstance(targets, (tuple, list)):
        return len(targets)
    return 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Bar:
    """A tqdm bar updated by hand, or nothing. The loop iterates the loader itself: tqdm's
    ``tqdm.auto`` class calls ``iter()`` on what it wraps when built, which would start an
    extra DataLoader epoch, draw from its generator and so change the data order."""

    def __init__(self, enabled: bool, total: int | None, **kwargs) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, **kwargs)

    def update(self, **postfix: str) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _len(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    metric_fn: Callable | Any = accuracy,
    device: str | torch.device = "cpu",
    progress: bool = False,
    channels_last: bool = False,
) -> float:
    """``metric_fn`` over ``loader`` with the model in eval mode (its mode is restored);
    ``channels_last``: inputs in that memory format (as the model's weights, see :func:`train`)."""
    device = torch.device(device)
    stateful = all(hasattr(metric_fn, a) for a in ("reset", "update", "compute"))
    was_training = model.training
    model.eval()
    total, weight = 0.0, 0
    try:
        if stateful:
            metric_fn.reset()
        bar = _Bar(progress, _len(loader), desc="val", leave=False)
        for inputs, targets in loader:
            inputs, targets = _to(inputs, device, channels_last), _to(targets, device)
            outputs = _forward(model, inputs)
            if stateful:
                metric_fn.update(outputs, targets)
            else:
                n = _batch_size(targets)
                total += float(metric_fn(outputs, targets)) * n
                weight += n
            bar.update()
        bar.close()
    finally:
        model.train(was_training)
    if stateful:
        return float(metric_fn.compute())
    return total / weight if weight else math.nan


def train(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None,
    *,
    epochs: int,
    lr: float,
    loss_fn: Callable[[Any, Any], Tensor] = cross_entropy,
    metric_fn: Callable | Any = accuracy,
    metric_name: str = "accuracy",
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    cosine: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = True,
    start_epoch: int = 0,
    resume_state: Mapping[str, Any] | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    channels_last: bool = False,
    compile: bool | str = False,
    runtime: Any = None,
) -> dict[str, Any]:
    """Fine-tune the parameters of ``model`` that require grad; return metrics.

    ``runtime``: an on-device runtime that runs each step instead of PyTorch
    (:class:`gradfilter.runtime.executorch.ExecuTorchTrainer`, loaded from ``model``'s exported
    training program): ``optimizer`` must be one it runs, ``cosine`` off; evaluation runs its
    forward; ``model`` receives the trained parameters after every epoch and at the end.
    ``backward_time_ms`` is then NaN (the runtime runs forward and backward as one call).

    ``compile``: ``model.compile()`` in place first (``True``: inductor; a string names another
    ``torch.compile`` backend). Its gradfilter layers then trace their stop-gradient form: the
    same gradients as eager (docs/performance.md §6); the first steps (and the first evaluation)
    pay the compilation.

    ``channels_last``: the model and its inputs in ``torch.channels_last`` memory format, which
    oneDNN runs faster on CPUs (docs/performance.md: 1.2–1.5× per step); the math is unchanged.

    ``optimizer``: ``"sgd"`` (momentum ``momentum``) or ``"adamw"``; with ``cosine`` the
    learning rate follows a per-step cosine from ``lr`` to 0. BatchNorm modes set by
    :func:`prepare_model` are kept.

    The returned dict holds ``epochs``, ``steps``, ``train_loss`` (mean per epoch),
    ``val_<metric_name>`` (per epoch, empty without ``val_loader``), ``step_time_ms`` (median
    wall time of forward + backward + optimizer step, data loading excluded, first
    ``TIMING_WARMUP_STEPS`` steps excluded), ``backward_time_ms`` (the same for
    ``loss.backward()`` alone), ``saved_activation_bytes`` (distinct storages
    autograd saved for backward in the first step's forward and loss, parameters excluded),
    ``train_time_s`` and ``trainable_params``.

    Resuming: ``start_epoch`` skips the epochs already done; ``resume_state`` is the
    ``on_epoch_end`` payload of that run's last epoch with ``optimizer`` and ``scheduler`` as
    state dicts (the model's weights are loaded by the caller). ``on_epoch_end`` is called after
    every epoch with ``epoch`` (epochs done), ``optimizer`` and ``scheduler`` (objects, the
    scheduler may be None) and ``history`` (the metric lists and counters so far, plain Python).
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if not 0 <= start_epoch <= epochs:
        raise ValueError(f"start_epoch must be in 0..{epochs}, got {start_epoch}")
    device = torch.device(device)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    if compile:
        model.compile(backend="inductor" if compile is True else compile)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (nothing requires grad)")
    if runtime is not None:
        if cosine:
            raise ValueError("the runtime's optimizer has a constant learning rate: "
                             "pass cosine=False")
        runtime.set_optimizer(optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
        opt = runtime
    elif optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, **fused_kwargs(params)
        )
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fused_kwargs(params))
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    if device.type == "cpu" and runtime is None:  # evict the parameters before a step
        flush_before_step(opt)
    steps_per_epoch = _len(train_loader) or 0
    total_steps = steps_per_epoch * epochs
    sched = (
        torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
        )
        if cosine and total_steps
        else None
    )

    step_times: list[float] = []
    backward_times: list[float] = []
    saved_bytes: int | None = None
    train_loss: list[float] = []
    val_metric: list[float] = []
    step = 0
    time_before = 0.0  # training time spent by the run(s) being resumed
    if resume_state is not None:
        if resume_state.get("optimizer") is not None:
            opt.load_state_dict(resume_state["optimizer"])
        if sched is not None and resume_state.get("scheduler") is not None:
            sched.load_state_dict(resume_state["scheduler"])
        hist = resume_state.get("history") or {}
        step_times = [float(t) for t in hist.get("step_times", [])]
        backward_times = [float(t) for t in hist.get("backward_times", [])]
        saved_bytes = hist.get("saved_activation_bytes")
        train_loss = [float(v) for v in hist.get("train_loss", [])]
        val_metric = [float(v) for v in hist.get(f"val_{metric_name}", [])]
        step = int(hist.get("steps", 0))
        time_before = float(hist.get("train_time_s", 0.0))
    t_start = time.perf_counter()
    epoch_bar = _Bar(progress, epochs, desc="epochs", unit="ep", initial=start_epoch)
    for epoch in range(start_epoch, epochs):
        model.train()
        loss_sum, loss_n = 0.0, 0
        batches = _Bar(progress, steps_per_epoch or None, desc=f"epoch {epoch + 1}",
                       leave=False)
        for inputs, targets in train_loader:
            inputs, targets = _to(inputs, device, channels_last), _to(targets, device)
            _sync(device)
            t0 = time.perf_counter()
            if runtime is not None:  # the whole step, in the runtime
                if saved_bytes is None:  # what the same graph saves in PyTorch
                    with count_saved(model.parameters()) as saved:
                        _forward(model, inputs)
                    saved_bytes = saved.bytes
                    t0 = time.perf_counter()
                loss = runtime.step(inputs, targets)[0]
                step_times.append(time.perf_counter() - t0)
            else:
                if saved_bytes is None:
                    with count_saved(model.parameters()) as saved:
                        loss = loss_fn(_forward(model, inputs), targets)
                    saved_bytes = saved.bytes
                else:
                    loss = loss_fn(_forward(model, inputs), targets)
                opt.zero_grad(set_to_none=True)
                _sync(device)
                t1 = time.perf_counter()
                loss.backward()
                _sync(device)
                backward_times.append(time.perf_counter() - t1)
                opt.step()
                if sched is not None:
                    sched.step()
                _sync(device)
                step_times.append(time.perf_counter() - t0)
            n = _batch_size(targets)
            loss_value = loss.item()
            loss_sum += loss_value * n
            loss_n += n
            step += 1
            batches.update(loss=f"{loss_value:.3f}")
        batches.close()
        train_loss.append(loss_sum / loss_n if loss_n else math.nan)
        if runtime is not None:
            runtime.copy_to(model)
        if val_loader is not None:
            val_metric.append(evaluate(model if runtime is None else runtime.as_module(),
                                       val_loader, metric_fn, device,
                                       channels_last=channels_last))
        postfix = {"loss": f"{train_loss[-1]:.3f}"}
        if val_metric:
            postfix[metric_name] = f"{val_metric[-1]:.4f}"
        epoch_bar.update(**postfix)
        if on_epoch_end is not None:
            on_epoch_end({
                "epoch": epoch + 1,
                "optimizer": opt,
                "scheduler": sched,
                "history": {
                    "train_loss": list(train_loss),
                    f"val_{metric_name}": list(val_metric),
                    "step_times": list(step_times),
                    "backward_times": list(backward_times),
                    "saved_activation_bytes": saved_bytes,
                    "steps": step,
                    "train_time_s": time_before + time.perf_counter() - t_start,
                },
            })
    epoch_bar.close()
    train_time = time_before + time.perf_counter() - t_start

    def median_ms(times: list[float]) -> float:
        timed = times[TIMING_WARMUP_STEPS:] or times
        return statistics.median(timed) * 1e3 if timed else math.nan

    return {
        "epochs": epochs,
        "steps": step,
        "train_loss": train_loss,
        f"val_{metric_name}": val_metric,
        "step_time_ms": median_ms(step_times),
        "backward_time_ms": median_ms(backward_times),
        "saved_activation_bytes": saved_bytes,
        "train_time_s": train_time,
        "trainable_params": sum(p.numel() for p in params),
        "optimizer": optimizer,
        "lr": lr,
    }
