"""Gradient-fidelity diagnostics: energy kept against an independent patch-loop oracle, cosine
exactly 1 where the filtered gradient is exact, docs/spec.md §4 costs checked by hand and against
the
bytes autograd really saves."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradfilter import FilteredConv2d, count_saved
from gradfilter.cli import main
from gradfilter.diagnostics import conv_costs, energy_kept, inspect, select_convs


def _energy_oracle(g: torch.Tensor, r: int) -> float:
    """||P g||^2 / ||g||^2 with explicit loops over the centred r x r patch grid (docs/spec.md
    §2.1)."""
    g = g.double()
    h, w = g.shape[-2:]
    ph, pw = -(-h // r), -(-w // r)
    top, left = -(-(ph * r - h) // 2), -(-(pw * r - w) // 2)
    kept = 0.0
    for i in range(ph):
        for j in range(pw):
            r0, c0 = max(0, i * r - top), max(0, j * r - left)
            r1, c1 = min(h, (i + 1) * r - top), min(w, (j + 1) * r - left)
            patch = g[..., r0:r1, c0:c1]
            mean = patch.mean(dim=(-2, -1))
            kept += float((mean**2).sum()) * patch.shape[-1] * patch.shape[-2]
    return kept / float((g**2).sum())


@pytest.mark.parametrize("r", [1, 2, 3, 4])
def test_energy_of_constant_gradient_is_one(r):
    gy = torch.full((2, 3, 7, 9), 0.5)
    kept, total = energy_kept(gy, r)
    assert kept / total == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("r", [2, 4])
def test_energy_of_checkerboard_is_zero(r):
    i = torch.arange(8)
    board = ((i[:, None] + i[None, :]) % 2 * 2 - 1).double()  # +1/-1 checkerboard
    gy = board.expand(2, 3, 8, 8)
    kept, total = energy_kept(gy, r)
    assert total == pytest.approx(2 * 3 * 64)
    assert kept / total == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("shape,r", [((2, 3, 8, 8), 2), ((1, 2, 7, 5), 3), ((2, 1, 9, 6), 4)])
def test_energy_matches_patch_loop_oracle(shape, r):
    gy = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    kept, total = energy_kept(gy, r)
    assert 0.0 < kept / total < 1.0
    assert kept / total == pytest.approx(_energy_oracle(gy, r), rel=1e-9)


def test_conv_costs_by_hand_and_against_measured_saved_bytes():
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    c = conv_costs(conv, (2, 4, 8, 8), (2, 8, 8, 8), radius=2)
    fwd = 2 * 2 * 8 * 4 * 9 * 64
    assert c.forward_flops == fwd
    assert c.flops_vanilla == 2 * fwd
    assert c.flops_filtered == 2 * (2 * 2 * 8 * 4 * 4 * 4)
    assert c.saved_vanilla == 2 * 4 * 64 * 4
    assert c.saved_filtered == 2 * 4 * 16 * 4
    # the filtered conv really saves that much (weight excluded)
    f = FilteredConv2d(4, 8, 3, padding=1, bias=False, radius=2)
    x = torch.randn(2, 4, 8, 8)
    with count_saved(f.parameters()) as saved:
        f(x)
    assert saved.bytes == c.saved_filtered
    with count_saved(conv.parameters()) as saved:
        conv(x.requires_grad_(False))
    assert saved.bytes == c.saved_vanilla


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.pw(x))
        x = self.dw(x)
        return self.fc(x.mean((2, 3)))


def _batches(n=2, size=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, size, size, generator=g), torch.randint(0, 5, (4,), generator=g))
            for _ in range(n)]


def test_inspect_exact_cases_and_model_untouched():
    torch.manual_seed(0)
    model = _Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = inspect(model, _batches(), layers=["pw", "dw"], radii=(1, 2, 4))
    # r=1 on a 1x1 stride-1 conv is plain backprop: cosine exactly 1, every gradient energy kept
    row = report.get("pw", 1)
    assert row.cos_weight == pytest.approx(1.0, abs=1e-9)
    assert row.cos_input == pytest.approx(1.0, abs=1e-9)
    assert row.energy_kept == pytest.approx(1.0, abs=1e-12)
    # a 3x3 conv at r=2 is an approximation: strictly below 1
    assert report.get("dw", 2).cos_weight < 0.999
    assert report.get("pw", 2).energy_kept < 1.0
    # nested patch grids (8x8 maps, r=2 inside r=4): energy can only fall
    assert report.get("pw", 4).energy_kept <= report.get("pw", 2).energy_kept + 1e-12
    assert report.layers == ["pw", "dw"] and report.batches == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())
    text = report.table()
    assert "pw" in text and "cos gW" in text
    json.dumps(report.to_dict())


def test_inspect_real_pretrained_fidelity_falls_with_radius():
    """docs/spec.md §11 fidelity oracle on real weights and real digits: energy kept by the patch
    means
    never grows from r=2 to r=4 on nested grids, and is below 1."""
    from torch.utils.data import DataLoader

    from gradfilter.data import get_dataset
    from gradfilter.models import create_model

    splits = get_dataset("digits", image_size=64, split="train")
    model = create_model("tf_efficientnet_lite0", splits.num_classes, pretrained=True)
    report = inspect(model, DataLoader(splits.train, batch_size=8), layers="blocks.2.*",
                     radii=(2, 4), max_batches=1)
    for name in report.layers:
        r2, r4 = report.get(name, 2), report.get(name, 4)
        if r2.out_shape[-1] % 4 == 0:
            assert r4.energy_kept <= r2.energy_kept + 1e-9
        assert r2.energy_kept < 1.0
        assert -1.0 <= r2.cos_weight <= 1.0 and not math.isnan(r2.cos_input)


def test_select_convs_errors():
    with pytest.raises(ValueError, match="no convolution matches layer 'nope'"):
        select_convs(_Tiny(), ["nope"])
    with pytest.raises(ValueError, match="has no nn.Conv1d/nn.Conv2d"):
        select_convs(nn.Sequential(nn.Linear(3, 3)), None)
    assert list(select_convs(_Tiny(), "d*")) == ["dw"]


def test_cli_inspect_writes_table_json_png(tmp_path, capsys):
    out = tmp_path / "inspect.json"
    rc = main(["inspect", "--model", "tf_efficientnet_lite0", "--pretrained", "--data", "digits",
               "--image-size", "32", "--batch-size", "4", "--batches", "1", "--layers",
               "conv_head,blocks.6.*", "--radii", "1,2", "--quiet", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert {r["layer"] for r in data["rows"]} >= {"conv_head", "blocks.6.0.conv_pw"}
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "conv_head" in capsys.readouterr().out
    assert main(["inspect", "--model", "tf_efficientnet_lite0", "--data", "digits",
                 "--layers", "nope", "--out", str(out), "--quiet"]) == 2


class _OneByOne(nn.Module):
    """stem -> blk (one 1x1 conv) -> act (no convs) -> nonlinear head, on 8x8 maps."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blk = nn.Sequential(nn.Conv2d(4, 5, 1, bias=False))
        self.act = nn.Tanh()
        self.fc = nn.Linear(5 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(self.act(self.blk(self.stem(x))).flatten(1))


def _exact_x_gy(model, x, y):
    """The 1x1 conv's input and the loss gradient at its output, by plain autograd."""
    h = model.stem(x).detach()
    out = model.blk(h)
    loss = F.cross_entropy(model.fc(model.act(out).flatten(1)), y)
    (gy,) = torch.autograd.grad(loss, out)
    return h, gy


@pytest.mark.parametrize("r", [2, 4])
def test_descent_weight_matches_hand_computed_projection(r):
    """<filtered gW, exact gW>/||exact gW||^2 of a 1x1 conv on maps that r tiles: the filtered
    gW is sum over patches of mean(gy) x patch-sum(x) (docs/spec.md §4.3), computed here with
    avg_pool2d."""
    torch.manual_seed(0)
    model = _OneByOne()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    h, gy = _exact_x_gy(model, x, y)
    exact = torch.einsum("nohw,nihw->oi", gy.double(), h.double())
    filt = torch.einsum("nohw,nihw->oi", F.avg_pool2d(gy.double(), r),
                        F.avg_pool2d(h.double(), r) * r * r)
    want = float((filt * exact).sum() / (exact * exact).sum())
    row = inspect(model, [(x, y)], layers=["blk.0"], radii=[r]).get("blk.0", r)
    assert row.descent_weight == pytest.approx(want, rel=1e-4)
    assert row.descent_weight < 1.0


@pytest.mark.parametrize("r", [2, 4])
def test_block_transmission_matches_hand_computed_input_gradient(r):
    """Block filtered alone: its input gradient is W^T applied to the patch means of gy,
    repeated over each patch (docs/spec.md §4.4), against the exact W^T gy; a block without convs
    transmits exactly 1; the model is not modified."""
    from gradfilter.diagnostics import block_transmission

    torch.manual_seed(1)
    model = _OneByOne()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 0])
    _, gy = _exact_x_gy(model, x, y)
    w = model.blk[0].weight.detach().double()[:, :, 0, 0]
    ex = torch.einsum("oi,nohw->nihw", w, gy.double())
    pooled = F.avg_pool2d(gy.double(), r).repeat_interleave(r, 2).repeat_interleave(r, 3)
    fi = torch.einsum("oi,nohw->nihw", w, pooled)
    want = float(F.cosine_similarity(fi.flatten(), ex.flatten(), dim=0))
    got = block_transmission(model, [(x, y)], ["blk", "act"], [r])
    assert got[("blk", r)] == pytest.approx(want, rel=1e-4)
    assert want < 0.99
    assert got[("act", r)] == 1.0
    assert type(model.blk[0]) is nn.Conv2d
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_cli_inspect_segmentation_uses_the_ignore_label(tmp_path):
    """Segmentation targets carry the ignore label 255: inspect must use the task's loss (plain
    cross-entropy would reject the label) and still report finite fidelities."""
    out = tmp_path / "seg.json"
    assert main(["inspect", "--model", "fcn_resnet18", "--data", "synthetic-seg",
                 "--image-size", "32", "--batch-size", "2", "--batches", "1", "--train-last", "1",
                 "--radii", "2", "--quiet", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(math.isfinite(r["cos_weight"]) for r in rows)
