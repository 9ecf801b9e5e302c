"""Semantic segmentation: models, atrous convs against the docs/spec.md §6 spec and the DC oracle,
data
(synthetic-seg, voc:), mIoU, and the CLI end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from spec import filtered_grads
from torch import nn

import gradfilter as gf

pytest.importorskip("timm")
pytest.importorskip("skimage")

from gradfilter.cli import main  # noqa: E402
from gradfilter.data import get_dataset  # noqa: E402
from gradfilter.models import block_names, create_model  # noqa: E402
from gradfilter.nn import FilteredConv2d  # noqa: E402
from gradfilter.train import prepare_model  # noqa: E402
from gradfilter.train.metrics import SegmentationMetric, segmentation_loss  # noqa: E402

NUM_CLASSES = 5


def _batch(size=32, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n, size, size), generator=g)
    y[:, :2] = 255  # some ignored pixels
    return x, y


@pytest.fixture(scope="module")
def seg_batch():
    """A fixed batch of four 32x32 synthetic-seg images and masks."""
    val = get_dataset("synthetic-seg", image_size=32, split="val").val
    x, y = zip(*(val[i] for i in range(4)))
    return torch.stack(x), torch.stack(y)


# ---------------------------------------------------------------------------------------------
# Models


@pytest.mark.parametrize("name,pretrained,train_last", [
    ("deeplabv3_resnet18", False, 10),  # 8 decoder blocks + layer4 (dilations 2 and 4)
    ("fcn_resnet18", False, 5),
    ("pspnet_resnet18", False, 8),
    ("upernet_resnet18", False, 6),
    ("deeplabv3_tf_efficientnet_lite0", True, 12),  # reaches the dilated blocks.5/6
    ("upernet_tf_efficientnet_lite0", True, 5),
])
def test_each_head_trains_filtered(name, pretrained, train_last, seg_batch):
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES, pretrained=pretrained)
    x, y = seg_batch
    model, info = prepare_model(model, "filtered", 2, train_last, x)
    assert info.blocks == block_names(model)[-train_last:]
    assert info.blocks[-1] == "decoder.classifier"
    filtered = [n for n, m in model.named_modules() if isinstance(m, FilteredConv2d)]
    assert filtered and set(filtered) == set(info.report.names)
    if name.startswith("deeplabv3"):  # the atrous ASPP branches and dilated encoder convs
        assert any(model.get_submodule(n).dilation[0] >= 4 for n in filtered)
    loss_fn = segmentation_loss(255)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return loss_fn(model(x), y).item()

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = eval_loss()
    model.train()
    for _ in range(10):
        out = model(x)
        assert out.shape == (4, NUM_CLASSES, 32, 32)
        loss = loss_fn(out, y)
        opt.zero_grad()
        loss.backward()
        for n in filtered:
            assert model.get_submodule(n).weight.grad is not None, n
        opt.step()
    assert eval_loss() < 0.9 * before


def test_blocks_cover_decoder_then_encoder_last_stages():
    model = create_model("deeplabv3_resnet18", NUM_CLASSES)
    blocks = block_names(model)
    assert blocks[-10:] == [
        "encoder.layer4.0", "encoder.layer4.1", "decoder.aspp.convs.0", "decoder.aspp.convs.1",
        "decoder.aspp.convs.2", "decoder.aspp.convs.3", "decoder.aspp.convs.4",
        "decoder.aspp.project", "decoder.bottleneck", "decoder.classifier",
    ]
    # Every decoder conv lies in exactly one block.
    for name, _ in gf.conv_layers(model.decoder):
        full = f"decoder.{name}"
        assert sum(full.startswith(b + ".") or full == b for b in blocks) == 1, full


def test_unknown_model_and_missing_weights_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'segformer_resnet18'"):
        create_model("segformer_resnet18", NUM_CLASSES)
    with pytest.raises(ValueError, match="no offline pretrained weights"):
        create_model("fcn_resnet18", NUM_CLASSES, pretrained=True)


def test_unsupported_dilation_is_an_error_or_a_reported_skip():
    """r=3 cannot represent the dilation-2/4 convs of a dilated ResNet-18 (docs/spec.md §6)."""
    model = create_model("deeplabv3_resnet18", NUM_CLASSES)
    x, _ = _batch()
    with pytest.raises(ValueError, match="dilation"):
        prepare_model(model, "filtered", 3, 10, x)
    report = gf.apply(model, radius=3, names=["encoder.layer4.*", "decoder.*"], example_input=x,
                      on_unsupported="skip")
    skipped = dict(report.skipped)
    assert skipped and all("dilation" in why for why in skipped.values())
    for name in skipped:
        conv = model.get_submodule(name)
        assert type(conv) is nn.Conv2d and conv.dilation[0] > 1
    assert report.layers  # the rest is filtered


# ---------------------------------------------------------------------------------------------
# The atrous convolutions the models use, against the docs/spec.md §6 spec and the DC oracle

# (kernel, dilation, depthwise) of every dilated conv in the OS-8 models built here.
ATROUS_CONFIGS = [
    (3, 2, False), (3, 4, False),  # ResNet-18 layer3/layer4
    (3, 12, False), (3, 24, False), (3, 36, False),  # DeepLabV3 ASPP
    (3, 2, True), (5, 2, True), (5, 4, True), (3, 4, True),  # EfficientNet-Lite0 blocks.3-6
]


def test_atrous_configs_are_those_the_models_use():
    used = set()
    for name in ("deeplabv3_resnet18", "deeplabv3_tf_efficientnet_lite0", "fcn_resnet18",
                 "pspnet_tf_efficientnet_lite0"):
        for _, conv in gf.conv_layers(create_model(name, NUM_CLASSES)):
            if conv.dilation[0] > 1:
                assert conv.stride == (1, 1) and conv.dilation[0] == conv.dilation[1]
                depthwise = conv.groups == conv.in_channels > 1
                used.add((conv.kernel_size[0], conv.dilation[0], depthwise))
    assert used == set(ATROUS_CONFIGS)


def _conv_case(k, d, depthwise, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    cin, cout, groups = (2, 2, 2) if depthwise else (2, 3, 1)
    x = torch.randn(2, cin, size, size, generator=g, dtype=torch.float64)
    w = torch.randn(cout, cin // groups, k, k, generator=g, dtype=torch.float64)
    return x, w, groups


@pytest.mark.parametrize("radius", [2, 4])
@pytest.mark.parametrize("k,d,depthwise", ATROUS_CONFIGS)
def test_atrous_config_matches_spec(k, d, depthwise, radius):
    size = max(2 * d + 3, 13)  # taps land inside the map, size not a multiple of r
    x, w, groups = _conv_case(k, d, depthwise, size)
    x.requires_grad_()
    w.requires_grad_()
    y = gf.conv2d(x, w, None, 1, d * (k - 1) // 2, d, groups, radius)  # 'same', as the models
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y.backward(gy)
    gx, gw, _ = filtered_grads(x.detach(), w.detach(), gy, (1, 1), (d, d), groups,
                               (radius, radius))
    torch.testing.assert_close(x.grad, gx, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(w.grad, gw, rtol=1e-9, atol=1e-9)
    if d >= radius:  # taps kept at their patch offsets, not summed away
        assert w.grad[0, 0].flatten().unique().numel() > 1


@pytest.mark.parametrize("radius", [2, 4])
@pytest.mark.parametrize("k,d,depthwise", ATROUS_CONFIGS)
def test_atrous_config_dc_oracle(k, d, depthwise, radius):
    """Constant x and gy per channel: filtered == exact autograd gradients (docs/spec.md §11).

    Kept taps (d >= r): a 'same' conv on a map the patches tile exactly is exact everywhere.
    Summed taps (d < r): a 'valid' conv is exact in the interior.
    """
    span = d * (k - 1) + 1
    keeps = d >= radius
    ho = radius * math.ceil(max(16, 2 * d + 2) / radius)
    padding, h = (d * (k - 1) // 2, ho) if keeps else (0, ho + span - 1)
    x, w, groups = _conv_case(k, d, depthwise, 1)
    x = x.expand(-1, -1, h, h).clone()
    gc = torch.randn(1, w.shape[0], 1, 1, generator=torch.Generator().manual_seed(2),
                     dtype=torch.float64)

    def grads(conv):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = conv(xx, ww)
        y.backward(gc.expand_as(y))
        return xx.grad, ww.grad

    ex_gx, ex_gw = grads(lambda a, b: F.conv2d(a, b, None, 1, padding, d, groups))
    fi_gx, fi_gw = grads(lambda a, b: gf.conv2d(a, b, None, 1, padding, d, groups, radius))
    torch.testing.assert_close(fi_gw, ex_gw, rtol=1e-10, atol=1e-10)
    margin = 0 if keeps else max(span, radius) + 1
    inner = (..., slice(margin, h - margin), slice(margin, h - margin))
    assert ex_gx[inner].numel() > 0
    torch.testing.assert_close(fi_gx[inner], ex_gx[inner], rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Metric and loss


def test_miou_and_pixel_accuracy_against_hand_count():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    logits = F.one_hot(pred, 4).permute(2, 0, 1)[None].float()  # class 3 never occurs
    metric = SegmentationMetric(4, ignore_index=255)
    metric.update(logits, target[None])
    # Labelled (true, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (1,1). IoU = inter/union:
    # class 0 1/3, class 1 3/4, class 2 1/2; class 3 occurs nowhere and has no IoU.
    expect = [1 / 3, 3 / 4, 1 / 2]
    assert metric.compute() == pytest.approx(sum(expect) / 3)
    assert metric.pixel_accuracy() == pytest.approx(5 / 7)
    metric.reset()
    assert math.isnan(metric.compute())
    with pytest.raises(ValueError, match="outside"):
        metric.update(logits, torch.full((1, 2, 4), 7))


def test_loss_ignores_the_ignore_label():
    x, y = _batch(8)
    logits = torch.randn(2, NUM_CLASSES, 8, 8)
    keep = y != 255
    expect = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], y[keep])
    torch.testing.assert_close(segmentation_loss(255)(logits, y), expect)


# ---------------------------------------------------------------------------------------------
# Data


def test_synthetic_seg_is_seeded_and_labelled():
    a = get_dataset("synthetic-seg", image_size=32, split="val")
    b = get_dataset("synthetic-seg", image_size=32, split="val")
    assert a.task == "segmentation" and a.num_classes == 5 and a.ignore_index == 255
    x, m = a.val[3]
    assert x.shape == (3, 32, 32) and m.shape == (32, 32) and m.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.val.masks, b.val.masks)
    values = set(a.val.masks.unique().tolist())
    assert {0, 1, 2, 3, 4, 255} <= values <= {0, 1, 2, 3, 4, 255}
    train = get_dataset("synthetic-seg", image_size=32, split="train").train
    assert not torch.equal(train.images[:5], a.val.images[:5])  # splits differ


def _write_voc(root, ids_by_split, size=(20, 30)):
    from PIL import Image

    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    palette = [v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)]
    for split, ids in ids_by_split.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i in ids:
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
                root / "JPEGImages" / f"{i}.jpg")
            mask = np.zeros(size, dtype=np.uint8)
            mask[:, size[1] // 2:] = 15  # person
            mask[:, size[1] // 2] = 255  # border
            png = Image.fromarray(mask, mode="P")
            png.putpalette(palette)
            png.save(root / "SegmentationClass" / f"{i}.png")


def test_voc_loader_on_a_tiny_folder(tmp_path):
    _write_voc(tmp_path, {"train": ["2007_000001", "2007_000002", "2007_000003"],
                          "val": ["2008_000001", "2008_000002"]})
    splits = get_dataset(f"voc:{tmp_path}", image_size=16)
    assert splits.num_classes == 21 and splits.task == "segmentation"
    assert len(splits.train) == 3 and len(splits.val) == 2
    x, m = splits.val[1]
    assert x.shape == (3, 16, 16) and m.shape == (16, 16) and m.dtype == torch.int64
    assert set(m.unique().tolist()) == {0, 15, 255}
    assert (m[:, :6] == 0).all() and (m[:, -6:] == 15).all()  # nearest resize keeps classes


def test_voc_missing_parts_are_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing folder"):
        get_dataset(f"voc:{tmp_path / 'nope'}")
    _write_voc(tmp_path, {"train": ["a"], "val": ["b"]})
    (tmp_path / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="SegmentationClass"):
        get_dataset(f"voc:{tmp_path}")
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="val.txt"):
        get_dataset(f"voc:{tmp_path}")


# ---------------------------------------------------------------------------------------------
# CLI


def _finetune(out, *, model="fcn_resnet18", data="synthetic-seg", method="filtered"):
    return ["finetune", "--model", model, "--data", data, "--image-size", "32", "--epochs", "1",
            "--batch-size", "100", "--lr", "1e-3", "--method", method, "--radius", "2",
            "--train-last", "4", "--quiet", "--out", str(out)]


def test_cli_finetune_segmentation_and_compare(tmp_path, capsys):
    out = tmp_path / "gradfilter"
    assert main(_finetune(out)) == 0
    assert "val mIoU" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert 0 <= m["val_miou"] <= 1 and 0 <= m["val_pixel_accuracy"] <= 1
    assert "val_accuracy" not in m
    assert m["blocks"] == ["encoder.layer4.1", "decoder.convs.0", "decoder.convs.1",
                           "decoder.classifier"]
    assert m["filtered_layers"] and m["saved_activation_bytes"] > 0
    saved = m["filtered_conv_saved_bytes"]
    assert saved["filtered"] < saved["vanilla"]
    other = tmp_path / "vanilla"
    other.mkdir()
    (other / "metrics.json").write_text(json.dumps({**m, "method": "vanilla", "radius": None}))
    png = tmp_path / "cmp.png"
    assert main(["compare", str(out), str(other), "--out", str(png)]) == 0
    assert "val_miou" in capsys.readouterr().out
    assert png.read_bytes()[:4] == b"\x89PNG"
    # The saved checkpoint evaluates to the run's mIoU.
    assert main(["evaluate", "--model", "fcn_resnet18", "--data", "synthetic-seg",
                 "--image-size", "32", "--quiet", "--checkpoint", str(out / "checkpoint.pt")]) == 0
    assert f"val mIoU {100 * m['val_miou']:.2f}%" in capsys.readouterr().out
    # Segmentation and classification runs do not mix in one comparison.
    digits = tmp_path / "digits"
    digits.mkdir()
    (digits / "metrics.json").write_text(json.dumps(
        {k: v for k, v in m.items() if k != "val_miou"} | {"val_accuracy": 0.5}))
    assert main(["compare", str(out), str(digits), "--out", str(png)]) == 2
    assert "cannot compare" in capsys.readouterr().err


@pytest.mark.parametrize("model,data,needle", [
    ("deeplabv3_mobilenet", "synthetic-seg", "not a segmentation model"),
    ("resnet18", "synthetic-seg", "not a segmentation model"),
    ("fcn_resnet18", "digits", "is a segmentation model"),
    ("fcn_resnet18", "voc:/nonexistent/gradfilter-voc", "/nonexistent/gradfilter-voc"),
])
def test_cli_bad_segmentation_inputs_exit_2(tmp_path, capsys, model, data, needle):
    assert main(_finetune(tmp_path / "bad", model=model, data=data)) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_cityscapes_loader_maps_label_ids_to_train_ids(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for d in ("leftImg8bit", "gtFine"):
            (tmp_path / d / split / "aachen").mkdir(parents=True)
        stem = f"aachen_000000_00001{split == 'val'}"
        Image.fromarray(np.zeros((8, 16, 3), dtype=np.uint8)).save(
            tmp_path / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png")
        ids = np.zeros((8, 16), dtype=np.uint8)  # id 0: unlabeled -> ignore
        ids[:, 4:8], ids[:, 8:12], ids[:, 12:] = 7, 26, 24  # road, car, person
        Image.fromarray(ids).save(tmp_path / "gtFine" / split / "aachen" /
                                  f"{stem}_gtFine_labelIds.png")
    splits = get_dataset(f"cityscapes:{tmp_path}", image_size=16)
    assert splits.num_classes == 19 and splits.classes[0] == "road"
    _, m = splits.train[0]
    assert m.shape == (16, 16)
    # 8x16 resized to 16x16 (nearest): unlabeled -> 255, road -> 0, car -> 13, person -> 11.
    assert (m[:, :4] == 255).all() and (m[:, 4:8] == 0).all()
    assert (m[:, 8:12] == 13).all() and (m[:, 12:] == 11).all()
    (tmp_path / "gtFine" / "val").rename(tmp_path / "gtFine" / "gone")
    with pytest.raises(FileNotFoundError, match="gtFine"):
        get_dataset(f"cityscapes:{tmp_path}")
