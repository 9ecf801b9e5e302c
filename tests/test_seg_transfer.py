"""The paper-like segmentation protocol: a source task (synthetic-seg-source) that differs from
the target, and starting a fine-tuning run from a checkpoint whose classifier is for another
class set (explicit re-initialisation, never silent)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("skimage")

from gradfilter.cli import main  # noqa: E402
from gradfilter.data import get_dataset, make_synthetic_seg  # noqa: E402
from gradfilter.data.segmentation import SOURCE_SEED, SYNTHETIC_SEED  # noqa: E402
from gradfilter.models import create_model, head_name, load_init_checkpoint  # noqa: E402

HEAD_KEYS = ["decoder.classifier.bias", "decoder.classifier.weight"]


def test_source_variant_differs_from_target_and_is_seeded():
    src = get_dataset("synthetic-seg-source", image_size=32, split="val")
    tgt = get_dataset("synthetic-seg", image_size=32, split="val")
    assert src.task == "segmentation" and src.ignore_index == 255
    assert src.num_classes == 6 and tgt.num_classes == 5
    assert set(src.classes) & set(tgt.classes) == {"background"}
    # Every source class occurs, and no label outside the source's class set.
    assert set(src.val.masks.unique().tolist()) == {0, 1, 2, 3, 4, 5, 255}
    # Other pixels, other label maps: not the target's images relabelled.
    assert (src.val.images - tgt.val.images).abs().mean() > 0.1
    assert (src.val.masks != tgt.val.masks).float().mean() > 0.05
    # Deterministic: regenerating (bypassing the in-memory cache) gives the same bytes.
    again = make_synthetic_seg.__wrapped__(200, 32, SOURCE_SEED + 1, "synthetic-seg-source")
    assert torch.equal(again.images, src.val.images) and torch.equal(again.masks, src.val.masks)
    # The variant, not only the seed, decides the content.
    same_seed = make_synthetic_seg.__wrapped__(8, 32, SYNTHETIC_SEED + 1, "synthetic-seg-source")
    assert not torch.equal(same_seed.images, tgt.val.images[:8])
    with pytest.raises(ValueError, match="unknown synthetic variant"):
        make_synthetic_seg(4, 32, 0, "synthetic-seg-other")


def test_source_shapes_have_their_geometry():
    """Ring pixels surround unlabelled centres; crescents are not convex like the ellipses."""
    from gradfilter.data.segmentation import _source_shape_mask

    ring = _source_shape_mask(np.random.default_rng(3), 3, 64)
    ys, xs = np.nonzero(ring)
    cy, cx = int(round(ys.mean())), int(round(xs.mean()))
    assert ring.sum() > 50 and not ring[cy, cx]  # a hole in the middle
    for cls in (1, 2, 4, 5):
        m = _source_shape_mask(np.random.default_rng(cls), cls, 64)
        assert 30 < m.sum() < 64 * 64 // 2


def test_mismatched_classifier_errors_unless_reinit_head(tmp_path):
    torch.manual_seed(0)
    source = create_model("fcn_resnet18", 6)
    path = tmp_path / "source.pt"
    torch.save(source.state_dict(), path)
    target = create_model("fcn_resnet18", 5)
    fresh = {k: v.clone() for k, v in target.state_dict().items() if k in HEAD_KEYS}
    assert head_name(target) == "decoder.classifier"
    with pytest.raises(ValueError, match=r"decoder\.classifier\.weight.*--reinit-head"):
        load_init_checkpoint(target, path)
    assert load_init_checkpoint(target, path, reinit_head=True) == HEAD_KEYS
    state = target.state_dict()
    assert torch.equal(state["encoder.layer4.1.conv2.weight"],
                       source.state_dict()["encoder.layer4.1.conv2.weight"])
    assert torch.equal(state["decoder.convs.1.0.weight"],
                       source.state_dict()["decoder.convs.1.0.weight"])
    assert all(torch.equal(state[k], fresh[k]) for k in HEAD_KEYS)
    # Same shape, other classes: reinit_head still drops the checkpoint's classifier.
    same = create_model("fcn_resnet18", 6)
    own = same.decoder.classifier.weight.detach().clone()
    assert load_init_checkpoint(same, path, reinit_head=True) == HEAD_KEYS
    assert torch.equal(same.decoder.classifier.weight, own)
    assert not torch.equal(own, source.decoder.classifier.weight)
    # Without it a fitting classifier loads, and any other mismatch is still an error.
    load_init_checkpoint(same, path)
    assert torch.equal(same.decoder.classifier.weight, source.decoder.classifier.weight)
    with pytest.raises(ValueError, match="does not fit"):
        load_init_checkpoint(create_model("pspnet_resnet18", 6), path, reinit_head=True)


def _cli(out, checkpoint, *extra):
    return ["finetune", "--model", "fcn_resnet18", "--data", "synthetic-seg", "--image-size",
            "32", "--epochs", "1", "--batch-size", "100", "--lr", "1e-3", "--method",
            "filtered", "--radius", "2", "--train-last", "2", "--quiet", "--checkpoint",
            str(checkpoint), "--out", str(out), *extra]


def test_cli_finetune_reinit_head_is_explicit_and_reported(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "source.pt"
    torch.save(create_model("fcn_resnet18", 6).state_dict(), path)
    assert main(_cli(tmp_path / "plain", path)) == 2
    err = capsys.readouterr().err
    assert "decoder.classifier.weight" in err and "--reinit-head" in err
    assert not (tmp_path / "plain" / "metrics.json").exists()
    out = tmp_path / "reinit"
    assert main(_cli(out, path, "--reinit-head")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["reinit_head"] is True and m["reinit_head_keys"] == HEAD_KEYS
    assert m["init_checkpoint"] == str(path.resolve()) and m["num_classes"] == 5
    # A resumed run still reports what its first start re-initialised.
    resumed = _cli(out, path, "--reinit-head", "--resume")
    resumed[resumed.index("--epochs") + 1] = "2"
    assert main(resumed) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed_from_epoch"] == 1 and m["reinit_head_keys"] == HEAD_KEYS
    assert main(["finetune", "--model", "fcn_resnet18", "--data", "synthetic-seg", "--epochs",
                 "1", "--batch-size", "8", "--lr", "1e-3", "--method", "vanilla",
                 "--train-last", "1", "--reinit-head", "--out", str(tmp_path / "x")]) == 2
    assert "--reinit-head needs --checkpoint" in capsys.readouterr().err
