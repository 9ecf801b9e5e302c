"""apply / remove / freeze on real architectures, untouched (no per-architecture config)."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import gradfilter as gf
from gradfilter.nn import FilteredConv2d


def _mobilenet():
    return torchvision.models.mobilenet_v2(num_classes=5)


def _resnet():
    return torchvision.models.resnet18(num_classes=5)


def _deeplab():
    return torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=3, aux_loss=False
    )


def _effnet():
    timm = pytest.importorskip("timm")
    return timm.create_model("tf_efficientnet_lite0", num_classes=5)


def _smp():
    smp = pytest.importorskip("segmentation_models_pytorch")
    return smp.Unet("resnet18", encoder_weights=None, classes=3)


MODELS = {
    "mobilenet_v2": (_mobilenet, 64, False),
    "resnet18": (_resnet, 64, False),
    "deeplabv3_resnet50": (_deeplab, 64, True),
    "tf_efficientnet_lite0": (_effnet, 64, False),
    "smp_unet_resnet18": (_smp, 64, True),
}


def _loss(out, seg: bool, target):
    if isinstance(out, dict):
        out = out["out"]
    return F.cross_entropy(out, target)


@pytest.mark.parametrize("name", list(MODELS))
def test_apply_train_step_remove(name):
    factory, size, seg = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(4, 3, size, size)
    target = torch.randint(0, 3, (4, size, size)) if seg else torch.randint(0, 5, (4,))
    params_before = {n: p for n, p in model.named_parameters()}
    report = gf.apply(model, radius=2, last=6, example_input=x[:1])
    assert len(report) == 6 and all(r.in_shape is not None for r in report.layers)
    assert all(isinstance(model.get_submodule(n), FilteredConv2d) for n in report.names)
    assert "saved vanilla" in str(report)
    head = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear,))]
    trainable = gf.freeze(model, [*report.names, *head])
    assert trainable and all(
        any(t.startswith(n + ".") for n in [*report.names, *head]) for t in trainable
    )
    model.train()  # BatchNorm stays in eval mode after freeze
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    # the whole model pickles (torch.save(model)); the copy's BatchNorm stays pinned, its own
    twin = pickle.loads(pickle.dumps(model))
    twin_bns = [m for m in twin.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    twin_bns[0].training = True
    twin.train()
    assert not any(m.training for m in twin_bns)
    bns[0].training = True  # the original's pin acts on the original only
    assert all(not b.training for b in twin_bns)
    model.train()
    assert not any(m.training for m in bns)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = _loss(model(x), seg, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(model.get_submodule(n).weight.grad is not None for n in report.names)
    reverted = gf.remove(model)
    assert sorted(reverted) == sorted(report.names)
    assert not any(isinstance(m, FilteredConv2d) for m in model.modules())
    assert all(params_before[n] is p for n, p in model.named_parameters())


def test_timm_same_padding_forward_identical():
    model = _effnet().eval()
    x = torch.randn(2, 3, 65, 65)
    with torch.no_grad():
        ref = model(x)
    report = gf.apply(model, radius=2)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Conv2dSame" not in kinds and any(
        getattr(model.get_submodule(n), "tf_same", False) for n in report.names
    )
    x.requires_grad_()
    out = model(x)
    assert torch.equal(out, ref)
    out.sum().backward()
    assert x.grad.shape == x.shape
    gf.remove(model)
    assert "Conv2dSame" in {type(m).__name__ for m in model.modules()}
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_selection_by_names_filter_fn_radius_dict():
    model = _resnet()
    rep = gf.apply(model, radius={"layer4.*": 4, "layer3.1.conv2": 2})
    radii = {r.name: r.radius for r in rep.layers}
    assert radii["layer3.1.conv2"] == 2 and radii["layer4.0.conv1"] == 4
    assert all(n.startswith("layer4") or n == "layer3.1.conv2" for n in radii)
    model = _resnet()
    rep = gf.apply(model, names="layer2.*", filter_fn=lambda m, n: m.kernel_size == (3, 3),
                   radius=lambda n, m: 3)
    assert rep.names and all(n.startswith("layer2") and "downsample" not in n for n in rep.names)
    assert all(r.radius == 3 for r in rep.layers)


def test_last_follows_execution_order():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Conv2d(4, 4, 3, padding=1)  # registered first, runs last
            self.early = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.late(self.early(x))

    model = Odd()
    rep = gf.apply(model, last=1, example_input=torch.randn(1, 3, 8, 8))
    assert rep.names == ["late"]


def test_convert_twice_is_harmless():
    model = _mobilenet()
    x = torch.randn(1, 3, 32, 32)
    first = gf.apply(model, radius=2, last=3, example_input=x)
    second = gf.apply(model, radius=4, last=3, example_input=x)
    assert first.names == second.names and all(r.radius == 4 for r in second.layers)
    assert gf.remove(model) and not gf.remove(model)


def test_errors_are_clear():
    model = _resnet()
    with pytest.raises(ValueError, match="(?s)no convolution matched.*layer1.0.conv1"):
        gf.apply(model, names="nothing.*")
    with pytest.raises(ValueError, match="example_input"):
        gf.apply(model, last=2)
    with pytest.raises(ValueError, match="no nn.Conv1d/nn.Conv2d"):
        gf.apply(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="radius"):
        gf.apply(model, radius=0)
    padded = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="cannot filter 0: padding_mode"):
        gf.apply(padded)

    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ValueError, match="overrides"):
        gf.apply(nn.Sequential(MyConv(3, 3, 3)))


def test_unhandled_dilation_error_or_reported_skip():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=3, dilation=3), nn.Conv2d(4, 4, 3, padding=1))
    with pytest.raises(ValueError, match="cannot filter 0: dilation 3"):
        gf.apply(model, radius=2)
    rep = gf.apply(model, radius=2, on_unsupported="skip")
    assert rep.names == ["1"] and rep.skipped[0][0] == "0"
    assert "skipped 0" in str(rep)
    assert type(model[0]) is nn.Conv2d


def test_report_saved_bytes_match_measurement():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1))
    x = torch.randn(2, 3, 30, 30, requires_grad=True)
    rep = gf.apply(model, radius=4, example_input=x)
    vanilla, filtered = rep.total_saved_bytes()
    with gf.count_saved(model.parameters()) as saved:
        model(x)
    assert saved.bytes == filtered
    assert vanilla == (2 * 3 * 30 * 30 + 2 * 8 * 30 * 30) * 4


def test_conv1d_model():
    model = nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.ReLU(), nn.Conv1d(4, 3, 3, stride=2))
    x = torch.randn(3, 2, 40)
    rep = gf.apply(model, radius=4, example_input=x)
    assert [r.kind for r in rep.layers] == ["FilteredConv1d"] * 2
    out = model(x.requires_grad_())
    out.sum().backward()
    gf.remove(model)
    assert type(model[0]) is nn.Conv1d


def test_apply_takes_a_plan_file_or_dict(tmp_path):
    import json

    model = torchvision.models.mobilenet_v2(num_classes=10)
    layers = {"features.17.conv.0.0": 2, "features.17.conv.1.0": 4, "features.18.0": 7}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"model": "mobilenet_v2", "layers": layers}))
    report = gf.apply(model, plan=path)
    assert {row.name: row.radius for row in report.layers} == layers
    assert type(model.features[16].conv[0][0]) is torch.nn.Conv2d  # not in the plan
    gf.remove(model)
    report = gf.apply(model, plan={"layers": layers})
    assert {row.name: row.radius for row in report.layers} == layers
    with pytest.raises(ValueError, match="no 'layers'"):
        gf.apply(model, plan={"blocks": []})
    with pytest.raises(ValueError, match="cannot read plan"):
        gf.apply(model, plan=tmp_path / "missing.json")


def _mixed_modes(model: nn.Module, seed: int) -> dict[str, bool]:
    """Put ``model`` in training mode with every BatchNorm and a random third of the other
    modules in eval mode (the usual fine-tuning set-up, plus noise); return the modes."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) or torch.rand((), generator=gen) < 1 / 3:
            m.training = False
    return {n: m.training for n, m in model.named_modules()}


def _modes(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "tf_efficientnet_lite0"])
def test_every_conversion_verb_leaves_each_modules_mode_as_it_found_it(name):
    """apply (with the traced example, lean and fuse), slim, fuse_blocks, fuse_linear, remove
    and freeze(bn_eval=False) keep every module's train/eval flag; freeze(bn_eval=True)
    changes only the BatchNorm layers and what they hold (timm's act/drop; its job)."""
    make, size, _ = MODELS[name]
    x = torch.randn(2, 3, size, size)
    fusable_blocks = {"mobilenet_v2": ["features.17", "features.18"],
                      "tf_efficientnet_lite0": ["blocks.6.0"], "resnet18": []}[name]
    head = {"mobilenet_v2": "classifier.1", "tf_efficientnet_lite0": "classifier",
            "resnet18": "fc"}[name]
    model = make()
    want = _mixed_modes(model, seed=1)
    report = gf.apply(model, radius=2, last=4, example_input=x)
    assert report.names and _modes(model) == want, "apply"
    assert gf.slim(model, names=[f"{n.rpartition('.')[0]}.*" for n in report.names])
    assert _modes(model) == want, "slim"
    if fusable_blocks:
        gf.apply(model, radius=2, names=[f"{b}.*" for b in fusable_blocks])
        assert gf.fuse_blocks(model, fusable_blocks) == fusable_blocks
        assert _modes(model) == want, "fuse_blocks"
    assert gf.fuse_linear(model, head) == [head]
    assert _modes(model) == want, "fuse_linear"
    assert gf.remove(model)
    assert _modes(model) == want, "remove"
    gf.freeze(model, [head], bn_eval=False)
    assert _modes(model) == want, "freeze(bn_eval=False)"

    fresh = make()
    want = _mixed_modes(fresh, seed=2)
    report = gf.apply(fresh, radius=2, last=8, lean="patch", fuse=True, example_input=x)
    assert report.lean and _modes(fresh) == want, "apply(lean, fuse)"
    assert bool(report.fused) == bool(fusable_blocks)
    gf.freeze(fresh, [head], bn_eval=True)
    changed = {n for n, m in fresh.named_modules() if m.training != want[n]}
    bns = [n for n, m in fresh.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(any(n == b or n.startswith(f"{b}.") for b in bns) for n in changed)


def _step_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["mobilenet_v2", "tf_efficientnet_lite0", "resnet18"])
def test_one_call_equals_the_expert_verbs_in_order(name):
    """apply(lean=, fuse=) gives the model that apply → slim → fuse_blocks build by hand: the
    same classes everywhere, the same saved bytes and the same gradients."""
    make, size, _ = MODELS[name]
    blocks = {"mobilenet_v2": ["features.15", "features.16", "features.17", "features.18"],
              "tf_efficientnet_lite0": ["blocks.5.3", "blocks.6.0", "conv_head"],
              "resnet18": ["layer4.0", "layer4.1"]}[name]
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, size, size), torch.tensor([1, 3])
    one = make().eval()
    by_hand = copy.deepcopy(one)
    scope = [f"{b}.*" for b in blocks] + blocks
    report = gf.apply(one, radius=2, names=scope, lean="patch", fuse=True, example_input=x)
    names = gf.apply(by_hand, radius=2, names=scope, example_input=x).names
    lean = gf.slim(by_hand, names=[f"{b}.*" for b in blocks], bn="patch", radius=2)
    fusable = [b for b in blocks if name != "resnet18"]
    fused = gf.fuse_blocks(by_hand, fusable) if fusable else []
    assert report.names == names and sorted(report.lean) == sorted(lean)
    assert report.fused == fused and bool(fused) == (name != "resnet18")
    assert [type(m).__name__ for m in one.modules()] == [
        type(m).__name__ for m in by_hand.modules()]
    saved = []
    for model in (one, by_hand):
        with gf.count_saved(model.parameters(), model=model) as s:
            F.cross_entropy(model(x), y)
        saved.append(s.bytes)
    assert saved[0] == saved[1]
    got, want = _step_grads(one, x, y), _step_grads(by_hand, x, y)
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n
    gf.remove(one)
    assert not any("Filtered" in type(m).__name__ or "Fused" in type(m).__name__
                   or "Lean" in type(m).__name__ or "Packed" in type(m).__name__
                   for m in one.modules())
