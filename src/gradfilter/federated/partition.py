"""Split a data set's training indices among federated clients: IID or Dirichlet non-IID.

Both are deterministic functions of the labels, the number of clients and the seed, so every
client (a separate process, even on another machine) computes the same split on its own and
keeps only its share; no index list ever travels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset

__all__ = ["dataset_labels", "parse_partition", "partition_indices"]

MAX_DIRICHLET_TRIES = 100


def parse_partition(spec: str) -> tuple[str, float | None]:
    """``"iid"`` -> ``("iid", None)``; ``"dirichlet:ALPHA"`` -> ``("dirichlet", ALPHA)``."""
    kind, sep, arg = spec.partition(":")
    if kind == "iid" and not sep:
        return "iid", None
    if kind == "dirichlet" and sep:
        try:
            alpha = float(arg)
        except ValueError:
            alpha = float("nan")
        if not alpha > 0 or alpha == float("inf"):
            raise ValueError(f"partition '{spec}': ALPHA must be a positive number")
        return "dirichlet", alpha
    raise ValueError(f"unknown partition '{spec}'; use 'iid' or 'dirichlet:ALPHA' (e.g. "
                     f"dirichlet:0.5)")


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Integer labels of ``dataset``: read from ``labels`` / ``targets`` when the data set has
    them (the built-in sets, ImageFolder, CIFAR), else by loading every item once."""
    for attr in ("labels", "targets"):
        values = getattr(dataset, attr, None)
        if values is not None:
            return np.asarray(values, dtype=np.int64).reshape(-1)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(part) for part in np.array_split(rng.permutation(n), num_clients)]


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float,
               rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, shares drawn from Dir(alpha); redrawn until no client is left empty."""
    for _ in range(MAX_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) > 0:
            return out
    raise ValueError(
        f"dirichlet:{alpha} left a client without data {MAX_DIRICHLET_TRIES} times; use fewer "
        f"clients or a larger ALPHA"
    )


def partition_indices(labels: Sequence[int] | np.ndarray, num_clients: int, spec: str,
                      seed: int = 0) -> list[np.ndarray]:
    """Disjoint sorted index arrays, one per client, covering ``range(len(labels))``."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    kind, alpha = parse_partition(spec)
    if not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"number of clients must be an int >= 1, got {num_clients!r}")
    if num_clients > len(labels):
        raise ValueError(f"{num_clients} clients but only {len(labels)} training samples")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        return _iid(len(labels), num_clients, rng)
    assert alpha is not None
    return _dirichlet(labels, num_clients, alpha, rng)
