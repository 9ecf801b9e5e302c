"""``gradfilter finetune`` and ``gradfilter evaluate``: one fine-tuning run of a named model on a
named data set, checkpointed after every epoch and resumable, and the evaluation of a saved
model.

A run folder holds ``checkpoint.pt`` (the last complete epoch, see :mod:`.checkpoint`) and, once
the run finishes, ``metrics.json``. Resuming restores the weights, optimizer and scheduler
state, metric history and every RNG (Python, NumPy, torch and the data order's generator), so
a run killed during epoch k and resumed trains epoch k again from where epoch k - 1 ended, and
ends with the same weights as a run never interrupted.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..files import save_atomic, write_json_atomic
from ..functional import validate_input_grad
from .cache import FeatureCache, skip_prefix
from .checkpoint import (
    CHECKPOINT_NAME,
    FORMAT_VERSION,
    get_rng_state,
    load_training_checkpoint,
    set_rng_state,
)
from .distributed import EpochSampler, init_from_env, wrap
from .trainer import METHODS, evaluate, method_lean, prepare_model, seed_everything, train

__all__ = ["MATCH_KEYS", "evaluate_checkpoint", "finetune"]

# Config entries a resumed run must share with its checkpoint: anything else would give a
# different model, different data or an optimizer state that does not fit.
MATCH_KEYS = ("model", "data", "image_size", "num_classes", "method", "radius", "train_last",
              "optimizer", "lean", "input_grad")
# Entries that may change on resume (with a note): the schedule / data order then differ from
# an uninterrupted run of the new config.
NOTE_KEYS = ("epochs", "batch_size", "lr")
EVAL_BATCH_SIZE = 256
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# The last feature cache built in this process, reused by the next run with the same frozen
# prefix (same model, initial weights, data, image size and first trainable block): a sweep of
# methods and seeds computes it once. Resumed runs rebuild it (their prefix comes from the run).
_CACHE_MEMO: dict[str, Any] = {}


def _normalise_data_spec(spec: str) -> str:
    """Make ``kind:PATH`` specs independent of the working directory."""
    kind, sep, arg = spec.partition(":")
    if sep and arg:
        return f"{kind}:{Path(arg).expanduser().resolve()}"
    return spec


def _saved_value(saved: dict[str, Any], key: str) -> Any:
    """A checkpoint's config entry, in today's terms: version-0.1 runs name the filtered methods
    ``gradfilter`` (with ``lean`` and ``fuse`` entries) and may lack ``input_grad``."""
    legacy = saved.get("method") == "gradfilter"
    if key == "method" and legacy:
        return "fused" if saved.get("fuse") else ("lean" if saved.get("lean") else "filtered")
    if key == "input_grad" and key not in saved:
        return "filtered" if legacy else None
    return saved.get(key)


def _check_resume_config(ckpt_path: Path, saved: dict[str, Any], config: dict[str, Any]) -> None:
    diffs = [
        f"{k}: checkpoint {_saved_value(saved, k)!r}, command {config[k]!r}"
        for k in MATCH_KEYS
        if _saved_value(saved, k) != config[k]
    ]
    if diffs:
        raise ValueError(
            f"cannot resume from {ckpt_path}: the run's config differs ("
            + "; ".join(diffs) + "); use another --out for a new run"
        )
    for k in NOTE_KEYS:
        if saved.get(k) != config[k]:
            print(f"note: resuming with {k}={config[k]!r} (the checkpoint's run had "
                  f"{saved.get(k)!r})", file=sys.stderr)


def _validate(epochs: int, batch_size: int, lr: float, method: str,
              radius: int | Mapping[str, int] | None, image_size: int) -> None:
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if not lr > 0:
        raise ValueError(f"--lr must be > 0, got {lr}")
    if method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {method!r}")
    if isinstance(radius, Mapping):  # per-conv radii from a plan
        bad = {k: v for k, v in radius.items() if not isinstance(v, int) or v < 1}
        if method == "vanilla" or not radius or bad:
            raise ValueError(f"per-layer radii need a filtered method and ints >= 1, got {bad}")
    elif method != "vanilla" and (radius is None or radius < 1):
        raise ValueError(f"--radius must be >= 1 for method {method}, got {radius}")
    if image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {image_size}")


LR_SCHEDULES = ("cosine", "constant")


def _check_runtime(runtime: str | None, lr_schedule: str | None, optimizer: str, resume: bool,
                   device: str, cache_features: bool, compile: bool,
                   channels_last: bool) -> str:
    """The learning-rate schedule; refuses options the runtime does not run."""
    if lr_schedule is not None and lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if runtime is None:
        return lr_schedule or "cosine"
    if runtime != "executorch":
        raise ValueError(f"runtime must be 'executorch' or None (PyTorch), got {runtime!r}")
    from ..runtime.executorch import OPTIMIZERS

    flags = {"optimizer " + optimizer: optimizer not in OPTIMIZERS,
             "a cosine learning-rate schedule": lr_schedule == "cosine",
             "--resume (the runtime keeps its momentum inside)": resume,
             f"device {device}": str(device) != "cpu", "--cache-features": cache_features,
             "--compile": compile, "--channels-last": channels_last}
    bad = [k for k, v in flags.items() if v]
    if bad:
        raise ValueError("--runtime executorch trains with the runtime's SGD (momentum 0.9, "
                         "constant learning rate) on the CPU; it does not take "
                         + ", ".join(bad) + " (use --optimizer sgd)")
    return "constant"


def _export_runtime(net: torch.nn.Module, dataset: Any, batch: int, loss_fn: Any,
                    out_dir: Path, quiet: bool) -> Any:
    """``net``'s training step exported to ``out_dir/train.pte`` (one training batch's shape;
    the first samples, so that the data order's generator is not drawn from)."""
    from torch.utils.data import default_collate

    from ..runtime.executorch import export_training

    inputs, targets = default_collate([dataset[i] for i in range(batch)])
    if not quiet:
        print(f"exporting the training step to {out_dir / 'train.pte'} (ExecuTorch)",
              file=sys.stderr)
    net.train()
    return export_training(net, inputs, targets, loss=loss_fn, out=out_dir / "train.pte")


def finetune(
    *,
    model: str,
    data: str,
    out: str | Path,
    epochs: int,
    batch_size: int,
    lr: float,
    method: str,
    radius: int | Mapping[str, int] | None,
    train_last: int,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    image_size: int = 64,
    seed: int = 0,
    optimizer: str = "adamw",
    resume: bool = False,
    quiet: bool = False,
    device: str = "cpu",
    cache_features: bool = False,
    cache_dtype: str = "float32",
    lean: str | None = None,
    reinit_head: bool = False,
    input_grad: str = "filtered",
    channels_last: bool = False,
    compile: bool = False,
    runtime: str | None = None,
    lr_schedule: str | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model``'s last ``train_last`` blocks on ``data``; checkpoint every epoch into
    ``out``; write and return ``out/metrics.json``'s content.

    ``cache_features``: compute the frozen prefix's output once (stored as ``cache_dtype``,
    "float32" or "float16") and train the last blocks from that cache (:mod:`.cache`); with
    float32 the run is the same as without the cache, only faster. ``lean``: see
    :func:`.trainer.prepare_model`. ``reinit_head``: start from ``checkpoint`` without its
    classifier (a new class set); the re-initialised keys go to ``metrics.json``
    (``reinit_head_keys``); without it a classifier that does not fit is an error.
    ``input_grad``: "filtered" (the paper) or "exact" input gradients through the filtered
    convs (:func:`gradfilter.apply`). ``channels_last``: model and batches in that memory format
    (faster on CPUs, same math; :func:`.trainer.train`). ``compile``: ``torch.compile`` the
    model (inductor; :func:`.trainer.train`). ``runtime``: ``"executorch"`` exports the
    training step to ``out/train.pte`` and runs every step and evaluation in the ExecuTorch
    runtime (:mod:`gradfilter.runtime.executorch`; SGD only, constant learning rate, CPU, no
    resume). ``lr_schedule``: ``"cosine"`` (the default in PyTorch) or ``"constant"`` (the
    runtime's)."""
    from torch.utils.data import DataLoader

    from ..data import get_dataset
    from ..machine import machine_info
    from ..models import create_model, has_offline_weights, load_init_checkpoint
    from .metrics import task_for

    _validate(epochs, batch_size, lr, method, radius, image_size)
    lr_schedule = _check_runtime(runtime, lr_schedule, optimizer, resume, device,
                                 cache_features, compile, channels_last)
    lean = method_lean(method, lean)
    validate_input_grad(input_grad)
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype must be one of {tuple(CACHE_DTYPES)}, got {cache_dtype!r}")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the run (it is created)")
    ckpt_path = out_dir / CHECKPOINT_NAME
    ckpt: dict[str, Any] | None = None
    if resume:
        if ckpt_path.exists():
            ckpt = load_training_checkpoint(ckpt_path)
        else:
            print(f"note: no {ckpt_path} to resume from; starting at epoch 1", file=sys.stderr)
    elif ckpt_path.exists():
        raise ValueError(
            f"{ckpt_path} already exists; pass --resume to continue that run or choose "
            f"another --out"
        )

    splits = get_dataset(data, image_size=image_size)
    if len(splits.train) == 0:
        raise ValueError(f"data set '{data}' has no training images")
    task = task_for(model, splits.task, splits.num_classes, splits.ignore_index)
    config: dict[str, Any] = {
        "model": model,
        "data": _normalise_data_spec(data),
        "image_size": image_size,
        "num_classes": splits.num_classes,
        "method": method,
        "radius": (dict(radius) if isinstance(radius, Mapping) else radius)
        if method != "vanilla" else None,
        "train_last": train_last,
        "lean": lean,
        "input_grad": input_grad if method != "vanilla" else None,
        "optimizer": optimizer,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "pretrained": pretrained,
        "init_checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
        "reinit_head": reinit_head,
        "lr_schedule": lr_schedule,
        "runtime": runtime or "pytorch",
    }
    if reinit_head and checkpoint is None:
        raise ValueError("--reinit-head needs --checkpoint (the weights whose classifier to drop)")
    start_epoch = 0
    if ckpt is not None:
        _check_resume_config(ckpt_path, ckpt["config"], config)
        start_epoch = int(ckpt["epoch"])
        if start_epoch > epochs:
            raise ValueError(
                f"{ckpt_path} already holds {start_epoch} epochs, more than --epochs {epochs}"
            )

    seed_everything(seed)
    # On resume the weights come from the run's checkpoint, not from the initial ones.
    # --pretrained with --checkpoint: the checkpoint is the pretrained weights (for a model
    # without built-in ones) or goes on top of them.
    net = create_model(model, splits.num_classes, pretrained=pretrained and ckpt is None and (
        checkpoint is None or has_offline_weights(model)))
    if ckpt is None and checkpoint is None and not pretrained:
        # not an error (random-start runs are legitimate experiments), but never silent: the
        # frozen layers stay random, and a network fine-tuned on top of them learns little
        print(f"note: {model} starts from random weights (no --pretrained or --checkpoint); "
              "only the trained blocks and the classifier learn, the frozen layers stay random",
              file=sys.stderr)
    # Explicit about the classifier, never silent; a resumed run keeps its first start's list.
    config["reinit_head_keys"] = [] if ckpt is None else ckpt["config"].get("reinit_head_keys")
    if checkpoint is not None and ckpt is None:
        config["reinit_head_keys"] = load_init_checkpoint(net, checkpoint,
                                                          reinit_head=reinit_head)
        if config["reinit_head_keys"] and not quiet:
            print(f"note: {checkpoint}: re-initialised {', '.join(config['reinit_head_keys'])} "
                  f"({splits.num_classes} classes of {data})", file=sys.stderr)
    order = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(splits.train, batch_size=batch_size, shuffle=True,
                              generator=order, drop_last=len(splits.train) >= batch_size)
    val_loader = DataLoader(splits.val, batch_size=EVAL_BATCH_SIZE) \
        if splits.val is not None else None
    n_example = min(batch_size, len(splits.train))
    example = torch.stack([splits.train[i][0] for i in range(n_example)])
    net, info = prepare_model(net, method, radius if radius is not None else 0, train_last,
                              example, lean=lean, input_grad=input_grad)
    resume_state = None
    if ckpt is not None:
        try:
            net.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise ValueError(f"checkpoint {ckpt_path} does not fit the model: {exc}") from exc
        set_rng_state(ckpt["rng"], order)
        resume_state = {"optimizer": ckpt["optimizer"], "scheduler": ckpt.get("scheduler"),
                        "history": ckpt["history"]}
        if not quiet:
            print(f"resuming {ckpt_path} after epoch {start_epoch} of {epochs}", file=sys.stderr)

    cache, cache_reused = None, False
    if cache_features:
        net.to(device)
        init = str(Path(checkpoint).resolve()) if checkpoint is not None else None
        key = (model, pretrained, init, config["data"], image_size, info.blocks[0], cache_dtype,
               str(device))
        if ckpt is None and _CACHE_MEMO.get("key") == key:
            cache = _CACHE_MEMO["cache"]  # same frozen prefix and data: reuse (a sweep)
            cache_reused = True
        else:
            cache = FeatureCache.build(net, info.blocks[0], splits.train, splits.val, example,
                                       device=device, dtype=CACHE_DTYPES[cache_dtype])
            if ckpt is None:
                _CACHE_MEMO.update(key=key, cache=cache)
        train_loader = DataLoader(cache.train, batch_size=batch_size, shuffle=True,
                                  generator=order, drop_last=len(cache.train) >= batch_size)
        val_loader = DataLoader(cache.val, batch_size=EVAL_BATCH_SIZE) \
            if cache.val is not None else None
        if not quiet:
            print(f"cached the input of {info.blocks[0]} for {len(cache.train)} + "
                  f"{0 if cache.val is None else len(cache.val)} images "
                  f"({cache.bytes / 2**20:.1f} MiB, {cache.build_time_s:.1f} s); skipping "
                  f"{len(cache.prefix)} prefix modules", file=sys.stderr)

    # Under torchrun: this process trains on its shard through DDP (see .distributed).
    dist_info = init_from_env(device)
    trained = net
    if dist_info is not None:
        train_set = cache.train if cache is not None else splits.train
        drop = len(train_set) >= batch_size * dist_info.world_size
        sampler = EpochSampler(train_set, dist_info, seed, drop_last=drop,
                               start_epoch=start_epoch)
        train_loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler,
                                  drop_last=drop)
        trained = wrap(net, dist_info, device)
    is_main = dist_info is None or dist_info.is_main

    out_dir.mkdir(parents=True, exist_ok=True)

    def save(state: dict[str, Any]) -> None:
        if not is_main:
            return
        sched = state["scheduler"]
        save_atomic({
            "format": FORMAT_VERSION,
            "epoch": state["epoch"],
            "model": net.state_dict(),
            "optimizer": state["optimizer"].state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None,
            "rng": get_rng_state(order),
            "config": config,
            "history": state["history"],
        }, ckpt_path)

    t0 = time.perf_counter()
    program = None
    if runtime is not None:
        program = _export_runtime(net, splits.train, min(batch_size, len(splits.train)),
                                  task.loss_fn, out_dir, quiet)
    with skip_prefix(net, cache.prefix) if cache is not None else contextlib.nullcontext():
        metrics = train(trained, train_loader, val_loader, epochs=epochs, lr=lr,
                        optimizer=optimizer, device=device, progress=not quiet,
                        start_epoch=start_epoch, resume_state=resume_state, on_epoch_end=save,
                        loss_fn=task.loss_fn, metric_fn=task.metric_fn,
                        metric_name=task.metric_name, channels_last=channels_last,
                        compile=compile, cosine=lr_schedule == "cosine",
                        runtime=program.trainer() if program is not None else None)
    epochs_run = epochs - start_epoch
    key = f"val_{task.metric_name}"
    val_acc = metrics[key]
    history = [
        {"epoch": i + 1, "train_loss": loss, key: val_acc[i] if i < len(val_acc) else None}
        for i, loss in enumerate(metrics["train_loss"])
    ]
    result: dict[str, Any] = {
        **config,
        "data": data,
        key: val_acc[-1] if val_acc else None,
        "epochs": metrics["epochs"],
        "resumed_from_epoch": start_epoch if ckpt is not None else None,
        "steps": metrics["steps"],
        "step_time_ms": metrics["step_time_ms"],
        "backward_time_ms": metrics["backward_time_ms"],
        "saved_activation_bytes": metrics["saved_activation_bytes"],
        "train_time_s": metrics["train_time_s"],
        "epoch_time_s": metrics["train_time_s"] / epochs if epochs_run == epochs and epochs
        else None,
        "channels_last": channels_last,
        "compile": compile,
        "cache_features": cache_features,
        "cache_dtype": cache_dtype if cache_features else None,
        "cache_time_s": cache.build_time_s if cache is not None else None,
        "cache_reused": cache_reused,
        "cache_bytes": cache.bytes if cache is not None else None,
        "run_time_s": time.perf_counter() - t0,
        "trainable_params": metrics["trainable_params"],
        "blocks": info.blocks,
        "filtered_layers": info.report.names if info.report is not None else [],
        "lean_layers": info.slimmed,
        "fused_blocks": info.fused,
        "history": history,
        **_task_extras(task, info, bool(val_acc)),
        "checkpoint": str(ckpt_path),
        "machine": machine_info(device),
        "world_size": dist_info.world_size if dist_info is not None else 1,
    }
    if program is not None:
        result.update(program=str(program.path), program_bytes=program.size_bytes,
                      planned_bytes=program.planned_bytes)
    if is_main:
        write_json_atomic(result, out_dir / "metrics.json")
    return result


def _task_extras(task: Any, info: Any, evaluated: bool) -> dict[str, Any]:
    """Segmentation: the last validation's pixel accuracy, and the filtered convs' input bytes
    (vanilla vs filtered, from the conversion report)."""
    extras: dict[str, Any] = {}
    if task.name == "segmentation":
        acc = task.metric_fn.pixel_accuracy() if evaluated else math.nan
        extras["val_pixel_accuracy"] = None if math.isnan(acc) else acc
    if info.report is not None:
        vanilla, filtered = info.report.total_saved_bytes()
        extras["filtered_conv_saved_bytes"] = {"vanilla": vanilla, "filtered": filtered}
    return extras


def evaluate_checkpoint(
    *,
    model: str,
    checkpoint: str | Path,
    data: str,
    image_size: int = 64,
    quiet: bool = False,
    device: str = "cpu",
) -> float:
    """Validation accuracy (mIoU for segmentation) of ``model`` with the weights in
    ``checkpoint`` (a ``finetune`` checkpoint, or a plain state_dict) on ``data``'s validation
    split."""
    from torch.utils.data import DataLoader

    from ..data import get_dataset
    from ..models import create_model, load_checkpoint
    from .metrics import task_for

    splits = get_dataset(data, image_size=image_size, split="val")
    task = task_for(model, splits.task, splits.num_classes, splits.ignore_index)
    net = create_model(model, splits.num_classes)
    # Evaluating needs the checkpoint's own head: a classifier of another size is an error here.
    load_checkpoint(net, checkpoint, keep_fresh_head=False)
    loader = DataLoader(splits.val, batch_size=EVAL_BATCH_SIZE)
    net.to(device)
    return evaluate(net, loader, task.metric_fn, device=device, progress=not quiet)
