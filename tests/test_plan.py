"""Planner: predicted saved bytes against what autograd really saves (count_saved), budgets
respected, impossible budgets name the smallest feasible one, plans apply exactly."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradfilter import count_saved
from gradfilter.cli import main
from gradfilter.models import block_names, create_model
from gradfilter.nn import FilteredConv2d
from gradfilter.plan import (
    Plan,
    apply_plan,
    load_plan,
    make_plan,
    parse_bytes,
    parse_ms,
    predict,
    profile_model,
)
from gradfilter.surgery import apply, freeze


class _Block(nn.Module):
    def __init__(self, c: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.stride = stride

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x[..., ::2, ::2] if self.stride == 2 else x))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(_Block(8), _Block(8, 2), _Block(8), _Block(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


SHAPE = (4, 3, 16, 16)


@pytest.fixture(scope="module")
def tiny_profile():
    torch.manual_seed(0)
    model = _Net()
    return model, profile_model(model, SHAPE, (2, 4), repeats=1)


def _measured(model: nn.Module, trainable: list[str], radii: dict[str, int], shape) -> int:
    if radii:
        apply(model, radius=radii)
    freeze(model, trainable=trainable + ["fc" if hasattr(model, "fc") else "classifier"])
    model.train()
    x = torch.randn(*shape)
    with count_saved(model.parameters()) as saved:
        out = model(x)
        F.cross_entropy(out, torch.arange(shape[0]) % out.shape[1])
    return saved.bytes


def test_parse_budgets():
    assert parse_bytes("20MB") == 20_000_000
    assert parse_bytes("1.5 KiB") == 1536
    assert parse_bytes(512) == 512
    assert parse_ms("300ms") == 300.0 and parse_ms("1.5s") == 1500.0 and parse_ms("40") == 40.0
    for bad in ("20 parsecs", "-3MB", "MB", "0"):
        with pytest.raises(ValueError, match="memory budget"):
            parse_bytes(bad)
    with pytest.raises(ValueError, match="time budget"):
        parse_ms("soon")


@pytest.mark.parametrize("radii", [[2, 4, 2], [4, 4, 2, 2], [0, 2], [4]])
def test_predicted_saved_bytes_equal_measured_on_mixed_plans(tiny_profile, radii):
    model, profile = tiny_profile
    names = block_names(model)[-len(radii):]
    mapping = {f"{b}.{c}": r for b, r in zip(names, radii) if r for c in ("conv1", "conv2")}
    fresh = _Net()
    fresh.load_state_dict(model.state_dict())
    measured = _measured(fresh, names, mapping, SHAPE)
    # the cost model was calibrated at batch 1 and 2; SHAPE has batch 4
    assert predict(profile, radii)[0] == pytest.approx(measured, rel=1e-6)


def test_mobilenet_v2_mixed_plan_within_ten_percent():
    """A real architecture, radii mixed across blocks, a suffix start mid-network."""
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", 10)
    shape = (2, 3, 64, 64)
    profile = profile_model(model, shape, (2, 4, 7), repeats=0)  # saved bytes only
    radii = [7, 2, 4, 2, 7, 4]
    names = block_names(model)[-len(radii):]
    mapping = {}
    for b, r in zip(names, radii):
        for n, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and n.startswith(b + "."):
                mapping[n] = r
    measured = _measured(model, names, mapping, shape)
    assert predict(profile, radii)[0] == pytest.approx(measured, rel=0.10)


def test_plan_respects_budget_and_applies_exactly(tiny_profile):
    model, profile = tiny_profile
    full = predict(profile, [2] * 4)[0]
    budget = int(full * 0.7)
    plan = make_plan(model, SHAPE, (2, 4), memory_budget=budget, profile=profile,
                     model_name="tiny")
    assert plan.predicted_saved_bytes <= budget
    assert 1 <= plan.train_last < 4
    bigger = make_plan(model, SHAPE, (2, 4), memory_budget=full, profile=profile)
    assert bigger.objective >= plan.objective and bigger.train_last == 4
    # round trip through JSON, then apply: same blocks, same radius per conv
    d = json.loads(json.dumps(plan.to_dict()))
    for key in ("predicted_saved_bytes", "predicted_step_ms", "layers", "blocks"):
        assert key in d
    fresh = _Net()
    fresh.load_state_dict(model.state_dict())
    _, info = apply_plan(fresh, d, torch.randn(*SHAPE))
    assert info.blocks == plan.block_names
    radii = {n: m.radius for n, m in fresh.named_modules() if isinstance(m, FilteredConv2d)}
    assert radii == plan.layers
    trainable = {n.rsplit(".", 1)[0] for n, p in fresh.named_parameters() if p.requires_grad}
    assert all(t == "fc" or any(t.startswith(b + ".") for b in plan.block_names)
               for t in trainable)
    fresh.train()
    x = torch.randn(*SHAPE)
    with count_saved(fresh.parameters()) as saved:
        F.cross_entropy(fresh(x), torch.arange(4) % 4)
    assert saved.bytes == pytest.approx(plan.predicted_saved_bytes, rel=1e-6)


def test_impossible_budget_names_smallest_feasible(tiny_profile):
    model, profile = tiny_profile
    with pytest.raises(ValueError, match="smallest feasible") as err:
        make_plan(model, SHAPE, (2, 4), memory_budget=100, profile=profile)
    smallest = int(re.search(r"smallest feasible [0-9.]+ MB \(([0-9]+) bytes\)",
                             str(err.value)).group(1))
    plan = make_plan(model, SHAPE, (2, 4), memory_budget=smallest + 1, profile=profile)
    assert plan.train_last == 1 and plan.predicted_saved_bytes <= smallest + 1
    with pytest.raises(ValueError, match="smallest feasible"):
        make_plan(model, SHAPE, (2, 4), memory_budget=smallest - 2, profile=profile)
    with pytest.raises(ValueError, match="time budget .* below the smallest feasible"):
        make_plan(model, SHAPE, (2, 4), time_budget_ms=1e-6, profile=profile)


def test_plan_errors(tiny_profile, tmp_path):
    model, profile = tiny_profile
    plan = make_plan(model, SHAPE, (2, 4), profile=profile)
    bad = plan.to_dict()
    bad["layers"] = {**bad["layers"], "blocks.9.conv1": 2}
    with pytest.raises(ValueError, match="does not have: blocks.9.conv1"):
        apply_plan(_Net(), bad, torch.randn(*SHAPE))
    wrong = plan.to_dict()
    wrong["blocks"] = [{"name": "blocks.0", "radius": 2}]
    wrong["layers"] = {"blocks.0.conv1": 2}
    with pytest.raises(ValueError, match="not this model's last 1 blocks"):
        apply_plan(_Net(), wrong, torch.randn(*SHAPE))
    with pytest.raises(ValueError, match="no nn.Conv1d/nn.Conv2d"):
        make_plan(nn.Sequential(nn.Flatten(), nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)),
                  (2, 3, 1, 1))
    with pytest.raises(ValueError, match="not a gradfilter plan"):
        Plan.from_dict({"format": "something else"})
    with pytest.raises(FileNotFoundError):
        load_plan(tmp_path / "missing.json")


def test_cli_plan_writes_json_and_reports_impossible_budget(tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = ["plan", "--model", "test_efficientnet", "--input-shape", "2,3,32,32", "--radii", "2,4",
            "--repeats", "1", "--quiet", "--out", str(out)]
    assert main([*args, "--memory-budget", "2MB"]) == 0
    data = json.loads(out.read_text())
    assert data["predicted_saved_bytes"] <= 2_000_000 and data["layers"]
    assert data["model"] == "test_efficientnet" and data["train_last"] == len(data["blocks"])
    assert main([*args, "--memory-budget", "1KB"]) == 2
    assert "smallest feasible" in capsys.readouterr().err
    assert main([*args[:4], "2,3,32", "--out", str(out)]) == 2


def test_cli_plan_is_reproducible_without_weights(tmp_path):
    """No --pretrained/--checkpoint: the random model and batch come from --seed, so the
    planned fidelities repeat exactly (only timings vary) and another seed changes them."""
    def fidelities(seed: int) -> list[float]:
        out = tmp_path / f"plan{seed}.json"
        assert main(["plan", "--model", "test_efficientnet", "--input-shape", "2,3,32,32",
                     "--radii", "2,4", "--repeats", "1", "--quiet", "--seed", str(seed),
                     "--memory-budget", "2MB", "--out", str(out)]) == 0
        return [b["fidelity"] for b in json.loads(out.read_text())["blocks"]]

    first = fidelities(0)
    assert first and fidelities(0) == first
    assert fidelities(1) != first


@pytest.mark.slow
def test_cli_finetune_with_plan_trains_the_planned_layers(tmp_path):
    plan_path = tmp_path / "plan.json"
    assert main(["plan", "--model", "tf_efficientnet_lite0", "--pretrained", "--input-shape",
                 "16,3,32,32", "--memory-budget", "3MB", "--data", "digits", "--repeats", "1",
                 "--quiet", "--out", str(plan_path)]) == 0
    plan = load_plan(plan_path)
    run = tmp_path / "run"
    assert main(["finetune", "--plan", str(plan_path), "--model", "tf_efficientnet_lite0",
                 "--pretrained", "--data", "digits", "--image-size", "32", "--epochs", "1",
                 "--batch-size", "16", "--lr", "5e-4", "--quiet", "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["blocks"] == plan.block_names
    assert sorted(metrics["filtered_layers"]) == sorted(plan.layers)
    assert metrics["radius"] == plan.layers
    assert metrics["saved_activation_bytes"] == pytest.approx(plan.predicted_saved_bytes,
                                                              rel=0.10)
    assert main(["finetune", "--plan", str(plan_path), "--model", "resnet18", "--data",
                 "digits", "--epochs", "1", "--batch-size", "16", "--lr", "1e-3",
                 "--out", str(tmp_path / "x")]) == 2


def test_objective_weights_each_block_by_downstream_transmissions(tiny_profile):
    """Hand computation of the documented score on made-up fidelities: block k's convs count
    cos(gW) times the product of the transmissions of the trained blocks after it."""
    from gradfilter.plan.planner import _Costs

    _, profile = tiny_profile
    names = [b.name for b in profile.blocks]
    fid = {(c, r): v for b in profile.blocks for c in b.convs
           for r, v in ((2, 0.9), (4, 0.6))}
    trans = {(n, r): v for n in names for r, v in ((2, 0.8), (4, 0.5))}
    costs = _Costs(profile, fid, trans)
    convs = [len(b.convs) for b in profile.blocks]
    # last two blocks: block 3 at r=4 (weight 1), block 2 at r=2 (weight = t(block 3, 4) = 0.5)
    want = convs[3] * 0.6 + 0.5 * convs[2] * 0.9
    assert costs.objective({2: 2, 3: 4}) == pytest.approx(want)
    # three blocks, all r=2: weights 1, 0.8, 0.64
    want3 = 0.9 * (convs[3] + 0.8 * convs[2] + 0.64 * convs[1])
    assert costs.objective({1: 2, 2: 2, 3: 2}) == pytest.approx(want3)
    # a finer radius downstream raises the weight of every block before it
    assert costs.objective({2: 4, 3: 2}) > costs.objective({2: 4, 3: 4})


def test_plan_segmentation_model_dense_targets_and_ignore_label():
    """Dense logits: per-pixel synthetic targets, a task loss that skips the ignore label, and
    a model whose head is its last block (nothing trainable in the base timing step)."""
    from gradfilter.train.metrics import segmentation_loss

    torch.manual_seed(0)
    model = create_model("fcn_resnet18", 3)
    x = torch.randn(2, 3, 32, 32)
    y = torch.randint(0, 3, (2, 32, 32))
    y[:, :2] = 255  # ignore label: plain cross-entropy would fail on it
    plan = make_plan(model, (2, 3, 32, 32), radii=(2,), memory_budget="1MB", repeats=1,
                     fidelity_batches=[(x, y)], loss_fn=segmentation_loss(255))
    blocks = block_names(model)[-plan.train_last:]
    assert plan.layers and plan.predicted_saved_bytes <= 1_000_000
    assert all(any(n.startswith(b + ".") or n == b for b in blocks) for n in plan.layers)
    assert plan.predicted_step_ms > 0
    # without data: a random batch with per-pixel cycling targets
    assert make_plan(model, (2, 3, 32, 32), radii=(2,), memory_budget="1MB",
                     repeats=0).train_last >= 1
