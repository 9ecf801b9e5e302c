"""The training step exported to ExecuTorch and run in its runtime (the real one; the tests skip
without the ``executorch`` extra): losses and trained parameters equal eager gradfilter's, whose
gradients tests/test_ops_spec.py and tests/test_export.py tie to the float64 spec; gradients
against tests/spec.py directly for one conv; filtered programs' gradients are not vanilla's;
what cannot run in the runtime is refused with the reason."""

import copy
import subprocess
import sys
from importlib.util import find_spec

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradfilter as gf

needs_et = pytest.mark.skipif(find_spec("executorch") is None,
                              reason="needs the executorch extra (pip install -e '.[executorch]')")
STEPS = 3
LR, MOMENTUM = 0.05, 0.9


def _randomise_bn(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)


def small_mobilenet() -> nn.Module:
    """A frozen stem, two torchvision inverted residuals, a pooled linear head."""
    from torchvision.models.mobilenetv2 import InvertedResidual

    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        InvertedResidual(8, 16, 2, 2), InvertedResidual(16, 16, 1, 3),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )
    _randomise_bn(m)
    return m


def small_resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(8, 12, 1, stride=2, bias=False), nn.BatchNorm2d(12))
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        BasicBlock(8, 12, stride=2, downsample=down), BasicBlock(12, 12),
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(12, 5),
    )
    _randomise_bn(m)
    return m


BLOCKS = {"mobilenet": (small_mobilenet, ["3", "4"], "7"),
          "resnet": (small_resnet, ["3", "4"], "7")}


def _prepared(kind: str, method: str, x: torch.Tensor) -> nn.Module:
    build, blocks, head = BLOCKS[kind]
    m = build()
    if method != "vanilla":
        gf.apply(m, radius=2, names=[f"{b}.*" for b in blocks], example_input=x,
                 lean="patch" if method in ("lean", "fused") else None, fuse=method == "fused")
    gf.freeze(m, trainable=[*blocks, head], bn_eval=True)
    return m.eval()


def _batch(n: int = 4, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 5, (n,), generator=g)


def _eager_steps(model: nn.Module, x, y, steps: int = STEPS):
    """Losses and trainable parameters after ``steps`` eager SGD steps (momentum)."""
    model = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(params.values(), lr=LR, momentum=MOMENTUM)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach() for n, p in params.items()}


def _eager_grads(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _runtime_steps(model: nn.Module, x, y, steps: int = STEPS):
    """The first gradients (no update), then the losses of ``steps`` SGD steps, in the
    runtime; returns (gradients, losses, trainer)."""
    from gradfilter.runtime.executorch import export_training

    trainer = export_training(model, x, y, predict=False).trainer()
    trainer.forward_backward(x, y)
    grads = {k: v.clone() for k, v in trainer.gradients().items()}
    trainer.set_optimizer("sgd", lr=LR, momentum=MOMENTUM)
    losses = [trainer.step(x, y)[0].item() for _ in range(steps)]
    return grads, losses, trainer


def _close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


def _differs(a: dict, b: dict) -> float:
    """Largest relative difference over the names both hold."""
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in set(a) & set(b))


# ---------------------------------------------------------------------------------------------


def test_gradfilter_imports_without_executorch():
    """The library never imports ExecuTorch by itself (the extra is optional)."""
    code = ("import sys, gradfilter, gradfilter.cli, gradfilter.runtime, gradfilter.train; "
            "sys.exit(any(m.split('.')[0] == 'executorch' for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@needs_et
@pytest.mark.parametrize("kind,method", [
    pytest.param("mobilenet", "vanilla", marks=pytest.mark.slow), ("mobilenet", "filtered"),
    pytest.param("mobilenet", "lean", marks=pytest.mark.slow), ("mobilenet", "fused"),
    ("resnet", "filtered"),
])
def test_runtime_steps_equal_eager_gradfilter(kind, method):
    """STEPS SGD steps in the runtime: the losses and trained parameters of eager gradfilter
    (float32 tolerance); the first gradients too; a filtered program's are not vanilla's."""
    x, y = _batch()
    model = _prepared(kind, method, x)
    want_losses, want_params = _eager_steps(model, x, y)
    got, got_losses, trainer = _runtime_steps(model, x, y)
    assert got_losses == pytest.approx(want_losses, rel=1e-5, abs=1e-6)
    _close(trainer.parameters(), want_params)
    assert len(set(want_losses)) == STEPS  # the parameters moved
    _close(got, _eager_grads(model, x, y))
    if method != "vanilla":
        vanilla = _eager_grads(_prepared(kind, "vanilla", x), x, y)
        assert _differs(got, vanilla) > 1e-2, "the runtime's gradients are vanilla's"


@needs_et
def test_filtered_conv_gradients_match_the_spec():
    """One trainable filtered conv under a frozen head: the runtime's weight and bias
    gradients are tests/spec.py's, from the output gradient of the plain model."""
    from spec import filtered_grads

    from gradfilter.runtime.executorch import export_training

    torch.manual_seed(0)
    x, y = _batch(2, 12)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.Tanh(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    out = m[0](x).detach().requires_grad_()  # the output gradient (the conv is the first layer)
    F.cross_entropy(m[4](m[3](m[2](m[1](out)))), y).backward()
    _, gw, gb = filtered_grads(x, m[0].weight.detach(), out.grad, (2, 2), (1, 1), 1, (2, 2))
    gf.apply(m, radius=2, names=["0"], example_input=x)
    gf.freeze(m, trainable=["0"])
    trainer = export_training(m, x, y, predict=False).trainer()
    trainer.forward_backward(x, y)
    got = trainer.gradients()
    torch.testing.assert_close(got["0.weight"].double(), gw, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["0.bias"].double(), gb, rtol=1e-4, atol=1e-6)


@needs_et
def test_negative_pad_in_the_backward():
    """A pad's backward is a pad by negative amounts (a crop), which ExecuTorch's kernel
    rejects: the exported program crops by slices instead, with the same gradients."""
    from gradfilter.runtime.executorch import export_training

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(144, 5)

        def forward(self, x):
            return self.fc(F.pad(self.conv(x), (1, 0, 2, 1))[:, :, 1:].flatten(1))

    torch.manual_seed(0)
    m, x, y = Padded(), torch.randn(2, 3, 6, 7), torch.tensor([1, 2])
    trainer = export_training(m, x, y, predict=False).trainer()
    trainer.forward_backward(x, y)
    _close(trainer.gradients(), _eager_grads(m, x, y))


@needs_et
def test_predict_saved_program_and_copy_back(tmp_path):
    """predict follows the trained parameters (any batch size); a saved .pte loads and trains
    the same (the runtime's SGD only); copy_to writes the runtime's parameters into the model."""
    from gradfilter.runtime.executorch import export_training, load_training

    x, y = _batch()
    model = _prepared("mobilenet", "fused", x)
    prog = export_training(model, x, y, out=tmp_path / "train.pte")
    assert (tmp_path / "train.pte").read_bytes() == prog.buffer
    assert prog.planned_bytes["forward"] > 0 and prog.planned_bytes["predict"] > 0
    trainer = load_training(tmp_path / "train.pte")
    with pytest.raises(ValueError, match="SGD only"):
        trainer.set_optimizer("adamw", lr=1e-3)
    trainer.set_optimizer("sgd", lr=LR, momentum=MOMENTUM)
    for _ in range(STEPS):
        trainer.step(x, y)
    trained = copy.deepcopy(model)
    trainer.copy_to(trained)
    _close({n: p.detach() for n, p in trained.named_parameters() if p.requires_grad},
           _eager_steps(model, x, y)[1])
    x7 = torch.randn(7, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(trainer.predict(x7), trained(x7), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="exported for inputs of shape"):
        trainer.step(x7, torch.zeros(7, dtype=torch.long))


@needs_et
def test_train_loop_with_the_runtime():
    """trainer.train(runtime=...): the same loop, each step in the runtime; losses, metrics
    and the model's final parameters are eager train()'s with the same settings."""
    from torch.utils.data import DataLoader, TensorDataset

    from gradfilter.runtime.executorch import export_training
    from gradfilter.train import train

    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(12, 3, 16, 16, generator=g), torch.randint(0, 5, (12,)))
    x, y = data[:4]
    runs = {}
    for mode in ("eager", "runtime"):
        model = _prepared("mobilenet", "lean", x)
        loader = DataLoader(data, batch_size=4, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(0))
        runtime = export_training(model, x, y).trainer() if mode == "runtime" else None
        m = train(model, loader, DataLoader(data, batch_size=5), epochs=2, lr=LR,
                  optimizer="sgd", momentum=MOMENTUM, cosine=False, progress=False,
                  runtime=runtime)
        runs[mode] = m, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    (em, ep), (rm, rp) = runs["eager"], runs["runtime"]
    assert rm["train_loss"] == pytest.approx(em["train_loss"], rel=1e-5)
    assert rm["val_accuracy"] == pytest.approx(em["val_accuracy"])
    assert rm["steps"] == em["steps"] == 6
    _close(rp, ep)


@needs_et
def test_refusals():
    """Clear errors: BatchNorm in training mode, an operator without a
    runtime kernel (a 2x2 adaptive pool's backward), nothing trainable."""
    from gradfilter.runtime.executorch import UnsupportedForRuntimeError, export_training

    x, y = _batch()
    model = _prepared("mobilenet", "filtered", x)
    bn_train = copy.deepcopy(model)
    bn_train[4].conv[3].training = True
    with pytest.raises(UnsupportedForRuntimeError, match="BatchNorm in training mode"):
        export_training(bn_train, x, y)
    pooled = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                           nn.Linear(16, 5))
    with pytest.raises(UnsupportedForRuntimeError, match="no kernel for .*pool"):
        export_training(pooled, x, y, predict=False)
    gf.freeze(pooled, trainable=[])
    with pytest.raises(UnsupportedForRuntimeError, match="no trainable parameters"):
        export_training(pooled, x, y)


def test_finetune_refuses_what_the_runtime_does_not_run(tmp_path):
    from gradfilter.cli import main

    rc = main(["finetune", "--model", "mobilenet_v2", "--data", "digits", "--runtime",
               "executorch", "--optimizer", "adamw", "--out", str(tmp_path / "r")])
    assert rc == 2
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# Whole registry models, prepared as finetune prepares them (slow: -m slow)


@needs_et
@pytest.mark.slow
@pytest.mark.parametrize("name,method", [
    ("mobilenet_v2", "vanilla"), ("mobilenet_v2", "fused"), ("resnet18", "filtered"),
    ("tf_efficientnet_lite0", "lean"), ("tf_efficientnet_lite0", "fused"),
])
def test_registry_models(name, method):
    from gradfilter.models import create_model
    from gradfilter.train.trainer import prepare_model

    x, y = _batch(4, 64)

    def build(method):
        torch.manual_seed(0)
        return prepare_model(create_model(name, 5), method, 2, 3, x)[0].eval()

    model = build(method)
    want_losses, want_params = _eager_steps(model, x, y)
    got, got_losses, trainer = _runtime_steps(model, x, y)
    assert got_losses == pytest.approx(want_losses, rel=1e-4, abs=1e-5)
    _close(trainer.parameters(), want_params)
    _close(got, _eager_grads(model, x, y))
    if method != "vanilla":
        assert _differs(got, _eager_grads(build("vanilla"), x, y)) > 1e-2
