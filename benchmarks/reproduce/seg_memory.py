"""Where the saved activations of a segmentation training step go, by autograd node type.

One forward + loss per config (no training), on a synthetic-seg batch; walks the autograd graph
from the loss and adds up, per node type (``ConvolutionBackward0``, ``_FilteredConvBackward``,
``NativeGroupNormBackward0``, ``ReluBackward0``, ``NllLoss2DBackward0`` …), the bytes of the
distinct tensor storages each node saved for backward (parameters excluded; a storage shared by
several nodes is counted once, for the first node reached).

    python benchmarks/reproduce/seg_memory.py --out benchmarks/results/seg_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from gradfilter.data import get_dataset
from gradfilter.models import create_model
from gradfilter.train import prepare_model, seed_everything
from gradfilter.train.metrics import segmentation_loss


def _saved(node) -> list[torch.Tensor]:
    out = []
    for attr in dir(node):
        if attr.startswith("_saved_"):
            try:
                v = getattr(node, attr)
            except RuntimeError:  # already freed
                continue
            vals = v if isinstance(v, (tuple, list)) else (v,)
            out += [t for t in vals if isinstance(t, torch.Tensor)]
    if hasattr(node, "saved_tensors"):  # custom autograd Functions
        try:
            out += [t for t in node.saved_tensors if isinstance(t, torch.Tensor)]
        except RuntimeError:
            pass
    return out


def breakdown(loss: torch.Tensor, params: set[int]) -> dict[str, int]:
    seen_nodes, seen_storage = set(), set(params)
    by_kind: dict[str, int] = defaultdict(int)
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        for t in _saved(node):
            ptr = t.untyped_storage().data_ptr()
            if ptr and ptr not in seen_storage:
                seen_storage.add(ptr)
                by_kind[node.name()] += t.untyped_storage().nbytes()
        stack += [f for f, _ in node.next_functions]
    return dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="deeplabv3_tf_efficientnet_lite0,"
                                       "upernet_tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default="benchmarks/results/seg_memory_cpu.json")
    args = p.parse_args()
    splits = get_dataset("synthetic-seg", image_size=args.image_size, split="train")
    x, y = zip(*(splits.train[i] for i in range(args.batch_size)))
    x, y = torch.stack(x), torch.stack(y)
    loss_fn = segmentation_loss(splits.ignore_index)
    rows = []
    for model_name in args.models.split(","):
        for n in (5, 10):
            for method, r in (("vanilla", 0), ("filtered", 2), ("filtered", 4)):
                seed_everything(0)
                model = create_model(model_name, splits.num_classes, pretrained=True)
                model, _ = prepare_model(model, method, r, n, x)
                model.train()
                params = {q.untyped_storage().data_ptr() for q in model.parameters()}
                kinds = breakdown(loss_fn(model(x), y), params)
                rows.append({"model": model_name, "train_last": n, "method": method,
                             "radius": r or None, "total_bytes": sum(kinds.values()),
                             "bytes_by_node": kinds})
                print(model_name, n, method, r, {k: f"{v / 2**20:.2f}" for k, v in kinds.items()},
                      flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
