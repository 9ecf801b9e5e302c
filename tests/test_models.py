"""Model registry, offline EfficientNet-Lite0 weights, checkpoints and block discovery."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("timm")

from gradfilter.models import (  # noqa: E402
    block_names,
    classifier_name,
    create_model,
    has_offline_weights,
    list_models,
    load_efficientnet_lite0_weights,
    tf_efficientnet_lite0,
)


def _imagenet_input(image) -> torch.Tensor:
    """HxWx3 uint8 -> 1x3x224x224, whole image resized, mean 0.5 / std 0.5."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    return (x - 0.5) / 0.5


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return tf_efficientnet_lite0(pretrained=True).eval()


def test_lite0_real_imagenet_weights(lite0):
    skimage_data = pytest.importorskip("skimage.data")
    batch = torch.cat(
        [_imagenet_input(skimage_data.chelsea()), _imagenet_input(skimage_data.coffee())]
    )
    with torch.no_grad():
        probs = lite0(batch).softmax(-1)
    top = probs.argmax(-1).tolist()
    assert 281 <= top[0] <= 285  # a domestic-cat class (tabby ... Egyptian cat)
    assert top[1] == 967  # espresso
    assert probs[1, 967] > 0.5


def test_lite0_new_head_keeps_backbone(lite0):
    model = tf_efficientnet_lite0(pretrained=True, num_classes=7)
    assert isinstance(model.classifier, torch.nn.Linear)
    assert model.classifier.out_features == 7
    assert torch.equal(model.conv_head.weight, lite0.conv_head.weight)


def test_lite0_shape_mismatch_is_named():
    model = tf_efficientnet_lite0(pretrained=False, num_classes=10)
    with pytest.raises(ValueError, match=r"_fc\.weight.*classifier\.weight"):
        load_efficientnet_lite0_weights(model)


@pytest.mark.parametrize(
    "name", ["mobilenet_v2", "resnet18", "resnet34", "tf_efficientnet_lite0", "resnet10t"]
)
def test_create_model_num_classes(name):
    model = create_model(name, num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5)


def test_create_model_pretrained_lite0_head():
    model = create_model("tf_efficientnet_lite0", num_classes=3, pretrained=True)
    assert model.classifier.out_features == 3
    assert has_offline_weights("tf_efficientnet_lite0")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "resnet10t"])
def test_pretrained_without_offline_weights_raises(name):
    with pytest.raises(ValueError, match="no offline pretrained weights.*checkpoint"):
        create_model(name, num_classes=10, pretrained=True)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'no_such_net'.*resnet18"):
        create_model("no_such_net", num_classes=10)
    assert {"mobilenet_v2", "resnet18", "resnet34", "tf_efficientnet_lite0"} <= set(list_models())


def test_checkpoint_roundtrip_and_head_swap(tmp_path):
    source = create_model("resnet18", num_classes=1000)
    path = tmp_path / "r18.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    same = create_model("resnet18", num_classes=1000, checkpoint=str(path))
    assert torch.equal(same.fc.weight, source.fc.weight)
    # A 1000-class checkpoint stands in for pretrained weights of a 10-class model.
    with pytest.warns(UserWarning, match=r"not loaded fc.weight, fc.bias .*fc stays fresh"):
        small = create_model("resnet18", num_classes=10, pretrained=True, checkpoint=path)
    assert small.fc.out_features == 10
    assert torch.equal(small.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_missing_and_corrupt_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        create_model("resnet18", num_classes=10, checkpoint=tmp_path / "absent.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt is corrupt or not a PyTorch weights file"):
        create_model("resnet18", num_classes=10, checkpoint=bad)
    unsafe = tmp_path / "unsafe.pt"  # arbitrary objects: refused, never loaded unsafely
    torch.save({"weight": torch.zeros(2), "config": argparse.Namespace(a=1)}, unsafe)
    with pytest.raises(ValueError, match="holds objects other than tensors") as err:
        create_model("resnet18", num_classes=10, checkpoint=unsafe)
    assert "weights_only=False" not in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_of_another_model_raises(tmp_path):
    path = tmp_path / "mbv2.pt"
    torch.save(create_model("mobilenet_v2", num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit ResNet"):
        create_model("resnet18", num_classes=10, checkpoint=path)


def test_block_names():
    mbv2 = block_names(create_model("mobilenet_v2", 10))
    assert mbv2 == [f"features.{i}" for i in range(1, 19)]
    r18 = block_names(create_model("resnet18", 10))
    assert r18 == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    lite0 = create_model("tf_efficientnet_lite0", 10)
    names = block_names(lite0)
    assert names[0] == "blocks.0.0" and names[-2:] == ["blocks.6.0", "conv_head"]
    assert len(names) == 17
    modules = dict(lite0.named_modules())
    assert all(n in modules for n in names)


def test_classifier_name():
    assert classifier_name(create_model("resnet18", 10)) == "fc"
    assert classifier_name(create_model("mobilenet_v2", 10)) == "classifier.1"
    assert classifier_name(create_model("tf_efficientnet_lite0", 10)) == "classifier"
