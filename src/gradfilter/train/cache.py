"""Frozen-prefix feature caching (docs/accuracy.md, feature cache).

When only the last N blocks train and the inputs are not augmented, everything the model runs
before its first trainable block computes the same features every epoch. :class:`FeatureCache`
computes them once; :func:`skip_prefix` then turns those prefix modules into pass-throughs so
that the unchanged model, fed the cached features instead of images, trains exactly as before
at a fraction of the cost.

The prefix is found by one traced forward: the coarsest modules that start and finish before
the first trainable block starts. Skipping them is only right when the model is a chain up to
that block (each prefix module feeds the next one); this is checked numerically when the cache
is built, and a model for which it fails is refused with a clear error, never cached wrongly.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["CachedFeatures", "FeatureCache", "PrefixError", "find_prefix", "skip_prefix"]


class PrefixError(ValueError):
    """The model's frozen prefix cannot be cached (not a chain, or not frozen)."""


class _Stop(Exception):
    """Raised by the capture hook to end a forward once the cut point's input is known."""


def _passthrough(x: Any, *args: Any, **kwargs: Any) -> Any:
    return x


def find_prefix(model: nn.Module, first_trainable: str, example: Tensor) -> list[str]:
    """Names of the coarsest modules of ``model`` that run completely before the module named
    ``first_trainable`` starts, in call order (one no-grad forward of ``example``)."""
    modules = dict(model.named_modules())
    if first_trainable not in modules:
        raise PrefixError(f"no module named '{first_trainable}' in the model")
    events: list[tuple[str, str]] = []
    handles = []
    for name, mod in modules.items():
        if not name:
            continue
        handles.append(mod.register_forward_pre_hook(
            lambda m, a, n=name: events.append(("start", n))))
        handles.append(mod.register_forward_hook(
            lambda m, a, o, n=name: events.append(("end", n))))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    calls: dict[str, int] = {}
    for i, (kind, name) in enumerate(events):
        if kind == "start":
            calls[name] = calls.get(name, 0) + 1
            start.setdefault(name, i)
        else:
            end[name] = i
    if first_trainable not in start:
        raise PrefixError(f"'{first_trainable}' is not called by the model's forward")
    cut = start[first_trainable]
    done_before = {n for n in start if end.get(n, cut) < cut and calls[n] == 1}
    prefix = [
        n for n in done_before
        if not any(n.startswith(p + ".") for p in done_before if p != n)
    ]
    prefix.sort(key=lambda n: start[n])
    return prefix


@contextlib.contextmanager
def skip_prefix(model: nn.Module, prefix: list[str]) -> Iterator[nn.Module]:
    """Within the context the ``prefix`` modules return their input unchanged, so ``model``
    takes the cached features of its first trainable block as input. Weights and state_dict
    are untouched; the modules' own ``forward`` comes back on exit."""
    modules = dict(model.named_modules())
    patched = []
    try:
        for name in prefix:
            mod = modules[name]
            mod.forward = _passthrough  # instance attribute shadows the class's forward
            patched.append(mod)
        yield model
    finally:
        for mod in patched:
            del mod.forward


@dataclass
class FeatureCache:
    """Cached inputs of a model's first trainable block, per split.

    ``build`` runs the frozen prefix once over each dataset (in eval mode, without grad) and
    checks on ``example`` that the model fed the cached features gives the same output as the
    model fed images. ``loader`` serves ``(features, target)`` pairs.
    """

    prefix: list[str]
    first_trainable: str
    train: Dataset | None
    val: Dataset | None
    build_time_s: float
    bytes: int

    @classmethod
    def build(
        cls,
        model: nn.Module,
        first_trainable: str,
        train: Dataset | None,
        val: Dataset | None,
        example: Tensor,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> FeatureCache:
        device = torch.device(device)
        modules = dict(model.named_modules())
        prefix = find_prefix(model, first_trainable, example.to(device))
        trainable = [
            f"{n}.{pn}" if n else pn
            for n in prefix for pn, p in modules[n].named_parameters() if p.requires_grad
        ]
        if trainable:
            raise PrefixError(
                f"cannot cache features: the prefix before '{first_trainable}' has trainable "
                f"parameters ({', '.join(trainable[:3])}{', ...' if len(trainable) > 3 else ''})"
            )
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            _check_chain(model, first_trainable, prefix, example.to(device))
            train_ds = _features(model, first_trainable, train, batch_size, device, dtype)
            val_ds = _features(model, first_trainable, val, batch_size, device, dtype)
        finally:
            model.train(was_training)
        nbytes = sum(ds.features.nbytes for ds in (train_ds, val_ds) if ds is not None)
        return cls(prefix, first_trainable, train_ds, val_ds, time.perf_counter() - t0, nbytes)


def _capture(model: nn.Module, first_trainable: str, inputs: Tensor) -> Tensor:
    """The input the module ``first_trainable`` receives when ``model`` runs on ``inputs``."""
    got: list[Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        if len(args) != 1 or not isinstance(args[0], Tensor):
            raise PrefixError(
                f"cannot cache features: '{first_trainable}' takes {len(args)} inputs, "
                "not one tensor"
            )
        got.append(args[0])
        raise _Stop

    handle = dict(model.named_modules())[first_trainable].register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise PrefixError(f"'{first_trainable}' was not called by the model's forward")
    return got[0]


def _check_chain(
    model: nn.Module, first_trainable: str, prefix: list[str], example: Tensor
) -> None:
    with torch.no_grad():
        want = model(example)
        feats = _capture(model, first_trainable, example)
        with skip_prefix(model, prefix):
            got = model(feats)
    if not isinstance(want, Tensor) or not isinstance(got, Tensor) or got.shape != want.shape \
            or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise PrefixError(
            f"cannot cache features: the modules before '{first_trainable}' "
            f"({', '.join(prefix)}) do not form a chain the model can skip"
        )


class CachedFeatures(Dataset):
    """``(features, target)`` pairs held in RAM; stored as ``features.dtype`` (float16 halves
    the cache), served as float32."""

    def __init__(self, features: Tensor, targets: Tensor) -> None:
        self.features = features
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.features[index].float(), self.targets[index]


def _features(model: nn.Module, first_trainable: str, dataset: Dataset | None, batch_size: int,
              device: torch.device, dtype: torch.dtype) -> CachedFeatures | None:
    if dataset is None:
        return None
    feats, targets = [], []
    for inputs, y in DataLoader(dataset, batch_size=batch_size):
        feats.append(_capture(model, first_trainable, inputs.to(device)).to("cpu", dtype))
        targets.append(torch.as_tensor(y))
    if not feats:
        raise ValueError("cannot cache features of an empty data set")
    return CachedFeatures(torch.cat(feats), torch.cat(targets))
