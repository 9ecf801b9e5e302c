"""Frozen-prefix feature caching: same training as without the cache, and refusals when the
prefix cannot be skipped."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from gradfilter.train.cache import FeatureCache, PrefixError, find_prefix, skip_prefix


class _Chain(nn.Module):
    def __init__(self, skip_input: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Linear(4, 2)
        self.skip_input = skip_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(self.stem(x))
        if self.skip_input:  # the input reaches past the prefix: not a chain
            y = y + x.mean()
        return self.head(y.mean((2, 3)))


def _frozen(model: nn.Module, prefix: tuple[str, ...]) -> nn.Module:
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(prefix))
    return model


def test_find_prefix_returns_coarsest_modules_before_the_cut():
    torch.manual_seed(0)
    model = _Chain()
    x = torch.randn(2, 3, 8, 8)
    assert find_prefix(model, "body.1", x) == ["stem", "body.0"]
    assert find_prefix(model, "body", x) == ["stem"]
    with pytest.raises(PrefixError, match="no module named 'nope'"):
        find_prefix(model, "nope", x)


def test_skip_prefix_feeds_features_and_restores_forward():
    torch.manual_seed(0)
    model = _Chain().eval()
    x = torch.randn(2, 3, 8, 8)
    feats = model.body[0](model.stem(x))
    with skip_prefix(model, ["stem", "body.0"]):
        got = model(feats)
    torch.testing.assert_close(got, model(x))
    assert "forward" not in vars(model.stem)  # class forward is back
    assert set(model.state_dict()) == set(_Chain().state_dict())


def test_cache_refuses_a_model_that_is_not_a_chain():
    torch.manual_seed(0)
    model = _frozen(_Chain(skip_input=True), ("stem",))
    data = TensorDataset(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(PrefixError, match="do not form a chain"):
        FeatureCache.build(model, "body", data, None, data.tensors[0][:2])


def test_cache_refuses_a_prefix_with_trainable_parameters():
    model = _Chain()  # nothing frozen
    data = TensorDataset(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(PrefixError, match="trainable parameters"):
        FeatureCache.build(model, "body", data, None, data.tensors[0][:2])


def test_cache_float16_halves_the_bytes():
    torch.manual_seed(0)
    model = _frozen(_Chain(), ("stem",))
    data = TensorDataset(torch.randn(6, 3, 8, 8), torch.arange(6) % 2)
    c32 = FeatureCache.build(model, "body", data, data, data.tensors[0][:2])
    c16 = FeatureCache.build(model, "body", data, data, data.tensors[0][:2],
                             dtype=torch.float16)
    assert c16.bytes * 2 == c32.bytes == 2 * 6 * 4 * 8 * 8 * 4
    x, y = c16.train[3]
    assert x.dtype == torch.float32 and int(y) == 1
    torch.testing.assert_close(x, c32.train[3][0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("model_name,pretrained", [("tf_efficientnet_lite0", True),
                                                   ("resnet18", False)])
def test_cached_finetune_trains_exactly_like_uncached(tmp_path, model_name, pretrained):
    """Same data order, same steps: the weights after an epoch agree to float rounding (the
    cache is computed in larger batches, so it is not bit-identical)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("timm")
    from gradfilter.train.runner import finetune

    common = dict(model=model_name, pretrained=pretrained, data="digits", epochs=1,
                  batch_size=64, lr=1e-3, method="filtered", radius=2, train_last=2,
                  image_size=32, quiet=True, optimizer="sgd")
    plain = finetune(out=tmp_path / "plain", **common)
    cached = finetune(out=tmp_path / "cached", cache_features=True, **common)
    assert cached["cache_features"] and cached["cache_bytes"] > 0
    assert cached["history"][0]["train_loss"] == pytest.approx(
        plain["history"][0]["train_loss"], rel=1e-4)
    assert abs(cached["val_accuracy"] - plain["val_accuracy"]) < 1e-6
    a = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cached" / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    on_disk = json.loads((tmp_path / "cached" / "metrics.json").read_text())
    assert on_disk["cache_time_s"] > 0 and on_disk["epoch_time_s"] > 0


def test_channels_last_finetune_trains_like_the_plain_layout(tmp_path):
    """--channels-last changes the memory format of the weights and batches, not the math."""
    pytest.importorskip("sklearn")
    pytest.importorskip("timm")
    from gradfilter.train.runner import finetune

    common = dict(model="resnet18", data="digits", epochs=1, batch_size=64, lr=1e-3,
                  method="lean", radius=2, train_last=2, image_size=32, quiet=True,
                  optimizer="sgd")
    plain = finetune(out=tmp_path / "plain", **common)
    cl = finetune(out=tmp_path / "cl", channels_last=True, **common)
    assert cl["channels_last"] and not plain["channels_last"]
    assert cl["history"][0]["train_loss"] == pytest.approx(
        plain["history"][0]["train_loss"], rel=1e-4)
    a = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cl" / "checkpoint.pt", weights_only=True)["model"]
    conv = "layer4.1.conv2.weight"  # trained, filtered; the layout reaches the checkpoint
    assert b[conv].is_contiguous(memory_format=torch.channels_last)
    assert not b[conv].is_contiguous() and a[conv].is_contiguous()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)

