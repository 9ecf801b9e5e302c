"""The filtered training step as an ExecuTorch program, and training with it in the runtime.

:func:`export_training` turns a prepared model (filtered convs, lean or fused blocks, frozen
prefix) into a ``.pte`` program with two methods:

* ``forward(x, y) -> (loss, logits, *gradients, *parameters)``: the joint forward, loss and
  backward of the trainable parameters (``torch.export`` → ``_export_forward_backward`` →
  ``to_edge`` → ``to_executorch``). The filtered layers trace their stop-gradient form
  (:mod:`gradfilter.traceable`), so the backward in the program is the filtered one; frozen
  parameters and BatchNorm statistics are constants of the program.
* ``predict(x, *trainable parameters) -> logits``: the forward alone, fed the live trainable
  parameters of the training method (two methods do not share weights otherwise).

:class:`ExecuTorchTrainer` loads such a program into the ExecuTorch runtime
(``executorch.extension.training``) and runs each step there with the runtime's SGD.

Not exportable, refused at export with the reason: BatchNorm in training mode (batch
statistics), and any graph that needs an operator the ExecuTorch runtime has no kernel for
(``torch.nn.AdaptiveAvgPool2d`` to 1×1 is exported as the equal mean, whose backward the
runtime has). Global average pooling through ``F.adaptive_avg_pool2d`` decomposes to a mean;
pads by negative amounts (autograd's backward of a pad) become slices.
Programs run on ExecuTorch's portable CPU kernels; no delegate (XNNPACK) is used for training
graphs: delegated weights would not follow the optimizer's updates.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..files import write_atomic

__all__ = [
    "OPTIMIZERS",
    "ExecuTorchTrainer",
    "ExportedTraining",
    "UnsupportedForRuntimeError",
    "export_model",
    "export_training",
    "load_training",
    "planned_bytes",
    "require_executorch",
]

#: Optimizers the runtime runs: ExecuTorch's SGD (momentum, weight decay, constant rate).
OPTIMIZERS = ("sgd",)
EXTRA_HINT = "pip install 'gradfilter[executorch]' (executorch==1.5.1)"
_PREFIX = "model."  # the wrapped model's attribute name in the exported step


class UnsupportedForRuntimeError(ValueError):
    """The model (or an option) cannot be exported to the runtime with its exact backward."""


def require_executorch() -> None:
    """Import the ExecuTorch runtime, or raise one error naming the extra that provides it."""
    try:
        import executorch.exir  # noqa: F401
        import executorch.extension.training  # noqa: F401
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"the ExecuTorch runtime needs the executorch extra: {EXTRA_HINT} ({exc})"
        ) from exc


# ----------------------------------------------------------------------------------------------
# The exported copy of the model


class _GlobalMean(nn.Module):
    """``AdaptiveAvgPool{1,2}d(1)`` as the equal mean (the runtime has the mean's backward)."""

    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(self.dims, keepdim=True)


def _swap_global_pools(model: nn.Module) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            size = getattr(child, "output_size", None)
            if isinstance(child, nn.AdaptiveAvgPool2d) and size in (1, (1, 1)):
                setattr(parent, name, _GlobalMean((-2, -1)))
            elif isinstance(child, nn.AdaptiveAvgPool1d) and size in (1, (1,)):
                setattr(parent, name, _GlobalMean((-1,)))


def _frozen_to_buffers(model: nn.Module) -> None:
    """Parameters that do not require grad become buffers: constants of the program."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and not p.requires_grad:
                del module._parameters[name]
                module.register_buffer(name, p.detach())


def _check_exportable(model: nn.Module) -> list[str]:
    """The trainable parameter names; refuses what the runtime cannot train exactly."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise UnsupportedForRuntimeError("the model has no trainable parameters (nothing "
                                         "requires grad): nothing to train in the runtime")
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise UnsupportedForRuntimeError(
                f"{name}: BatchNorm in training mode (batch statistics, running-stat updates) "
                "cannot be exported; put it in eval mode (gradfilter.freeze(..., bn_eval=True), "
                "as prepare_model does)")
    return names


class _TrainStep(nn.Module):
    def __init__(self, model: nn.Module, loss: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(x)
        return self.loss(out, y), out.detach()


class _Predict(nn.Module):
    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, x: Tensor, *params: Tensor) -> Tensor:
        return torch.func.functional_call(self.model, dict(zip(self.names, params)), (x,))


# ----------------------------------------------------------------------------------------------
# Export


class ExportedTraining:
    """An exported training program: ``buffer`` (the ``.pte`` bytes) and what it holds."""

    def __init__(self, buffer: bytes, planned_bytes: dict[str, int], operators: list[str],
                 path: Path | None = None) -> None:
        self.buffer = buffer
        #: memory the runtime plans for each method's non-constant tensors (activations,
        #: gradients, outputs), from the program's ``non_const_buffer_sizes``
        self.planned_bytes = planned_bytes
        self.operators = operators
        self.path = path

    @property
    def size_bytes(self) -> int:
        return len(self.buffer)

    def save(self, path: str | Path) -> Path:
        """Write the ``.pte`` atomically."""
        self.path = write_atomic(path, lambda f: f.write(self.buffer))
        return self.path

    def trainer(self) -> ExecuTorchTrainer:
        """The program loaded into the runtime."""
        return ExecuTorchTrainer(self.buffer)


def _crop_negative_pads(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``constant_pad_nd`` with negative pads (a crop: autograd's backward of a pad)
    as slices followed by the non-negative pad; ExecuTorch's kernel rejects negative pads.
    Returns the number of rewritten nodes."""
    aten = torch.ops.aten
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.constant_pad_nd.default:
            continue
        src, pad = node.args[0], list(node.args[1])
        if min(pad) >= 0:
            continue
        fake = src.meta["val"]
        nd = fake.dim()
        value = node.args[2] if len(node.args) > 2 else 0.0
        with gm.graph.inserting_before(node):
            cur, val = src, fake
            for i in range(len(pad) // 2):
                dim = nd - 1 - i
                before, after = pad[2 * i], pad[2 * i + 1]
                start, end = max(-before, 0), val.shape[dim] - max(-after, 0)
                if start or end != val.shape[dim]:
                    cur = gm.graph.call_function(aten.slice.Tensor, (cur, dim, start, end))
                    with fake.fake_mode:
                        val = aten.slice.Tensor(val, dim, start, end)
                    cur.meta["val"] = val
            rest = [max(p, 0) for p in pad]
            if any(rest):
                cur2 = gm.graph.call_function(aten.constant_pad_nd.default, (cur, rest, value))
                with fake.fake_mode:
                    cur2.meta["val"] = aten.constant_pad_nd.default(val, rest, value)
                cur = cur2
        node.replace_all_uses_with(cur)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def planned_bytes(program: Any) -> dict[str, int]:
    """Per method of an ExecuTorch program: the bytes the runtime plans for its non-constant
    tensors (``non_const_buffer_sizes``: activations, gradients, outputs)."""
    return {p.name: int(sum(p.non_const_buffer_sizes)) for p in program.execution_plan}


def _operator_names(program: Any) -> list[str]:
    """The operators every method of ``program`` calls (``name.overload``), sorted."""
    return sorted({f"{o.name}.{o.overload}" if o.overload else o.name
                   for plan in program.execution_plan for o in plan.operators})


def export_training(
    model: nn.Module,
    example_input: Tensor,
    example_target: Tensor,
    loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    out: str | Path | None = None,
    predict: bool = True,
) -> ExportedTraining:
    """Export ``model``'s training step (forward, ``loss(model(x), y)``, the backward of the
    parameters that require grad) as an ExecuTorch program; write it to ``out`` if given.

    ``model`` is already converted (:func:`gradfilter.apply`, :func:`gradfilter.freeze` or
    :func:`gradfilter.train.prepare_model`); it is not modified. Its train/eval mode is kept:
    dropout in training mode is part of the program. The program's inputs have the example's
    shapes (a fixed batch). ``predict``: also a forward-only ``predict`` method. Raises
    :class:`UnsupportedForRuntimeError` with the reason when the step cannot run in the runtime
    with its exact (filtered) backward.
    """
    require_executorch()
    from executorch.exir import to_edge
    from executorch.extension.pybindings.portable_lib import _get_operator_names
    from torch.export.experimental import _export_forward_backward

    if not isinstance(example_input, Tensor) or not isinstance(example_target, Tensor):
        raise TypeError("example_input and example_target must be tensors (one batch)")
    names = _check_exportable(model)
    copy_ = copy.deepcopy(model)
    _swap_global_pools(copy_)
    _frozen_to_buffers(copy_)
    step = _TrainStep(copy_, loss)
    x, y = example_input.detach(), example_target.detach()
    programs: dict[str, Any] = {}
    try:
        joint = torch.export.export(step, (x, y), strict=False)
        programs["forward"] = _export_forward_backward(joint)
        _crop_negative_pads(programs["forward"].graph_module)
        if predict:
            params = dict(copy_.named_parameters())
            pred = _Predict(copy_, names).eval()  # evaluation: dropout off
            with torch.no_grad():
                programs["predict"] = torch.export.export(
                    pred, (x, *(params[n].detach() for n in names)), strict=False)
    except Exception as exc:  # an untraceable model: say which step failed
        raise UnsupportedForRuntimeError(
            f"torch.export could not trace the training step: {type(exc).__name__}: {exc}"
        ) from exc
    executorch = to_edge(programs).to_executorch()
    program = executorch.executorch_program
    ops = _operator_names(program)
    missing = sorted(set(ops) - set(_get_operator_names()))
    if missing:
        raise UnsupportedForRuntimeError(
            "the ExecuTorch runtime has no kernel for " + ", ".join(missing) + " (needed by "
            "the exported training step); the model cannot train there with its backward")
    planned = {k: v for k, v in planned_bytes(program).items() if k in programs}
    result = ExportedTraining(executorch.buffer, planned, ops)
    if out is not None:
        result.save(out)
    return result


# ----------------------------------------------------------------------------------------------
# The runtime


class _RuntimeForward(nn.Module):
    """The program's ``predict`` method as a module (for :func:`gradfilter.train.evaluate`)."""

    def __init__(self, trainer: ExecuTorchTrainer) -> None:
        super().__init__()
        self.trainer = trainer

    def forward(self, x: Tensor) -> Tensor:
        return self.trainer.predict(x)


class ExecuTorchTrainer:
    """An exported training program loaded into the ExecuTorch runtime.

    :meth:`step` runs the joint forward-backward in the runtime and the runtime's SGD on its
    parameters; :meth:`predict` the forward alone; :meth:`copy_to` writes the trained
    parameters back into a PyTorch model.
    """

    def __init__(self, program: bytes | str | Path) -> None:
        require_executorch()
        from executorch.extension.training import (
            _load_for_executorch_for_training,
            _load_for_executorch_for_training_from_buffer,
        )

        if isinstance(program, (str, Path)):
            self.module = _load_for_executorch_for_training(str(program))
        else:
            self._buffer = program  # the runtime reads the program from it: keep it alive
            self.module = _load_for_executorch_for_training_from_buffer(program)
        methods = self.module.model.method_names()
        meta = self.module.model.method_meta("forward")
        self.input_shape = tuple(meta.input_tensor_meta(0).sizes())
        self.has_predict = "predict" in methods
        self.names: list[str] = [n.removeprefix(_PREFIX) for n in self.module.model.run_method(
            "__et_training_fqn_forward", ())]
        self._optimizer: Any = None
        self._hyper: dict[str, float] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.input_shape[0])

    def set_optimizer(self, name: str = "sgd", lr: float = 0.01, momentum: float = 0.0,
                      weight_decay: float = 0.0, nesterov: bool = False) -> None:
        """Use the runtime's SGD (constant ``lr``); any other optimizer is refused."""
        if name not in OPTIMIZERS:
            raise ValueError(f"the ExecuTorch runtime trains with its SGD only (momentum, "
                             f"weight decay, constant learning rate), not {name!r}: use "
                             f"optimizer 'sgd'")
        if not lr > 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD needs lr > 0, momentum >= 0, weight_decay >= 0; got "
                             f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        self._hyper = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                       "nesterov": nesterov}
        self._optimizer = None  # built on the next step (parameters exist after the first run)

    def _check_batch(self, x: Tensor) -> None:
        if tuple(x.shape) != self.input_shape:
            raise ValueError(f"the program was exported for inputs of shape {self.input_shape}, "
                             f"got {tuple(x.shape)} (a fixed batch: drop the last partial "
                             "batch)")

    def forward_backward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Loss and outputs; the gradients land in :meth:`gradients`. No update."""
        self._check_batch(x)
        loss, out = self.module.forward_backward("forward", (x.contiguous(), y.contiguous()))
        return loss, out

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One training step in the runtime: forward, loss, backward, SGD update."""
        if self._hyper is None:
            raise RuntimeError("call set_optimizer() before step()")
        loss, out = self.forward_backward(x, y)
        if self._optimizer is None:
            from executorch.extension.training import get_sgd_optimizer

            h = self._hyper
            self._optimizer = get_sgd_optimizer(
                self.module.named_parameters(), h["lr"], h["momentum"], 0.0,
                h["weight_decay"], bool(h["nesterov"]))
        self._optimizer.step(self.module.named_gradients())
        return loss, out

    def gradients(self) -> dict[str, Tensor]:
        """The last :meth:`forward_backward`'s gradients, by the model's parameter names."""
        return {k.removeprefix(_PREFIX): v for k, v in self.module.named_gradients().items()}

    def parameters(self) -> dict[str, Tensor]:
        """The runtime's trainable parameters (live tensors), by the model's names."""
        try:
            params = self.module.named_parameters()
        except RuntimeError:  # not run yet: run once on zeros to reach them (no update)
            self.module.forward_backward("forward", self._zeros())
            params = self.module.named_parameters()
        return {k.removeprefix(_PREFIX): v for k, v in params.items()}

    def _zeros(self) -> tuple[Tensor, Tensor]:
        meta = self.module.model.method_meta("forward")
        y_meta = meta.input_tensor_meta(1)
        y_dtype = {4: torch.int64, 3: torch.int32, 6: torch.float32}.get(y_meta.dtype(),
                                                                        torch.int64)
        return torch.zeros(self.input_shape), torch.zeros(tuple(y_meta.sizes()), dtype=y_dtype)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The forward in the runtime with the current parameters; any batch size (run in
        chunks of the program's batch, the last one padded)."""
        if not self.has_predict:
            raise RuntimeError("the program was exported without a predict method")
        if tuple(x.shape[1:]) != self.input_shape[1:]:
            want = ", ".join(map(str, self.input_shape[1:]))
            raise ValueError(f"inputs must have shape (N, {want}), got {tuple(x.shape)}")
        params = self.parameters()
        args = [params[n] for n in self.names]
        b, outs = self.batch_size, []
        for i in range(0, x.shape[0], b):
            chunk = x[i:i + b]
            n = chunk.shape[0]
            if n < b:
                chunk = torch.cat([chunk, chunk.new_zeros(b - n, *chunk.shape[1:])])
            out = self.module.model.run_method("predict", (chunk.contiguous(), *args))[0]
            outs.append(out[:n].clone())
        return torch.cat(outs)

    def as_module(self) -> nn.Module:
        """:meth:`predict` as an ``nn.Module`` (for loops that call ``model(x)``)."""
        return _RuntimeForward(self)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the runtime's trainable parameters into ``model`` (same names)."""
        own = dict(model.named_parameters())
        for name, value in self.parameters().items():
            if name not in own:
                raise KeyError(f"the model has no parameter {name!r} (is it the exported one?)")
            own[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's settings (its momentum buffers live inside the runtime)."""
        return {"runtime": "executorch", "optimizer": dict(self._hyper or {})}


def load_training(path: str | Path) -> ExecuTorchTrainer:
    """A ``.pte`` written by :func:`export_training`, loaded into the runtime."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ExecuTorch program at {path}")
    return ExecuTorchTrainer(path)


def export_model(*, model: str, num_classes: int, input_shape: tuple[int, int, int, int],
                 train_last: int, method: str, radius: int, out: str | Path,
                 lean: str | None = None, pretrained: bool = False,
                 checkpoint: str | Path | None = None) -> ExportedTraining:
    """``gradfilter export``: a registry model prepared as ``finetune`` prepares it (last
    ``train_last`` blocks with ``method``, the rest frozen, training mode), its cross-entropy
    training step exported to ``out`` for batches of ``input_shape``."""
    from ..models import create_model, has_offline_weights, load_init_checkpoint
    from ..models.segmentation import is_segmentation_model
    from ..train.trainer import prepare_model

    require_executorch()
    if is_segmentation_model(model):
        raise UnsupportedForRuntimeError(
            f"gradfilter export takes classification models (cross-entropy on class indices); "
            f"export {model} with gradfilter.export_training and its own loss")
    net = create_model(model, num_classes, pretrained=pretrained and (
        checkpoint is None or has_offline_weights(model)))
    if checkpoint is not None:
        load_init_checkpoint(net, checkpoint)
    example = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    net, _ = prepare_model(net, method, radius, train_last, example, lean=lean)
    target = torch.zeros(input_shape[0], dtype=torch.long)
    return export_training(net.train(), example, target, loss=F.cross_entropy, out=out)
