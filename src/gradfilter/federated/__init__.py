"""Federated fine-tuning with Flower: each client fine-tunes the gradient-filtered model on its
own data and exchanges only the trainable parameters; the server aggregates with Flower's
FedAvg or FedProx and evaluates the global model on a held-out split every round.

Importing the apps needs ``flwr`` (the ``federated`` extra); the partition helpers do not.
"""

from .config import DEFAULTS, STRATEGIES, resolve_config
from .partition import dataset_labels, parse_partition, partition_indices

__all__ = [
    "DEFAULTS",
    "STRATEGIES",
    "dataset_labels",
    "parse_partition",
    "partition_indices",
    "resolve_config",
    "run_simulation",
]


def run_simulation(*args, **kwargs):
    """:func:`gradfilter.federated.simulation.run_simulation` (imports Flower on first use)."""
    from .simulation import run_simulation as _run

    return _run(*args, **kwargs)
