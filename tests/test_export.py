"""Filtered models under torch.compile(fullgraph=True) and torch.export (strict and non-strict,
native kernels on and off): the traced model's gradients are the eager filtered model's (which
tests/test_ops_spec.py ties to the float64 spec), never vanilla's, or the trace fails loudly."""

import pytest
import torch
from conftest import native_buildable
from torch import nn

import gradfilter as gf
from gradfilter import native, traceable

NATIVE = [pytest.param(True, id="native"), pytest.param(False, id="pytorch")]
MODES = ["compile", "strict", "nonstrict"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # no recompile limit across tests, no reuse of another test's graphs
    yield
    torch._dynamo.reset()


def _use_native(enabled: bool):
    if enabled and not native_buildable():
        pytest.skip("native kernels cannot be built here")
    return native.use_native(enabled)


def _randomise_bn(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(c, generator=g) + 1.5)
            m.bias.data.copy_(torch.randn(c, generator=g))


def small_cnn() -> nn.Module:
    """TF-'same' stride-2 stem (asymmetric padding), depthwise, atrous (kept taps at r=2) and
    1×1 convs, BatchNorm, ReLU6/ReLU, a pooled linear head."""
    Conv2dSame = pytest.importorskip("timm.layers").Conv2dSame

    torch.manual_seed(0)
    m = nn.Sequential(
        Conv2dSame(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=4, dilation=4), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 5),
    )
    _randomise_bn(m)
    return m.eval()


def small_cnn1d() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv1d(3, 6, 5, stride=2, padding=2), nn.BatchNorm1d(6), nn.ReLU(),
        nn.Conv1d(6, 6, 3, padding="same", groups=3), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        nn.Linear(6, 4),
    )
    _randomise_bn(m)
    return m.eval()


def _filtered(model: nn.Module, example: torch.Tensor, lean: str | None = "patch",
              input_grad: str = "filtered") -> nn.Module:
    report = gf.apply(model, radius=2, example_input=example, input_grad=input_grad)
    assert report.names  # every conv is filtered
    if lean is not None:
        gf.slim(model, bn=lean, radius=2)
    return model.eval()


def _grads(model, x, input_grad=True) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(input_grad)
    out = model(x)
    (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view(out.shape)).pow(2).sum() \
        .backward()
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()
             if p.requires_grad}
    if input_grad:
        grads["input"] = x.grad
    return grads


def _rel(a: dict, b: dict, common: bool = False) -> float:
    """Largest relative error of a's gradients against b's (on the names both train)."""
    if common:
        a, b = ({k: d[k] for k in set(a) & set(b)} for d in (a, b))
    assert set(a) == set(b) and all(v is not None for v in a.values()), (set(a), set(b))
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


def _trace(model: nn.Module, x: torch.Tensor, mode: str, backend: str = "aot_eager"):
    if mode == "compile":
        return torch.compile(model, fullgraph=True, backend=backend)
    return torch.export.export(model, (x,), strict=mode == "strict").module()


def _check(build, x, mode, use_native, tol, **kw):
    """Traced gradients == eager filtered ones (same native setting), != vanilla's."""
    with _use_native(use_native):
        want = _grads(_filtered(build(), x, **kw), x)
        traced = _trace(_filtered(build(), x, **kw), x, mode)
        got = _grads(traced, x)
    vanilla = _grads(build(), x)
    err = _rel(got, want)
    assert err < tol, f"{mode}: relative error {err:.2e} against eager gradfilter"
    assert _rel(got, vanilla, common=True) > 1e-2, f"{mode}: the traced gradients are vanilla's"
    return err


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_tracing_flag_is_seen_without_graph_break(mode):
    class Probe(nn.Module):
        def forward(self, x):
            return x * (2.0 if traceable.tracing() else 3.0)

    x = torch.ones(2)
    assert Probe()(x)[0].item() == 3.0
    assert _trace(Probe(), x, mode)(x)[0].item() == 2.0


@pytest.mark.parametrize("use_native,lean,input_grad", [
    (True, None, "filtered"), (True, "patch", "filtered"), (True, "frozen", "exact"),
    (False, "patch", "filtered"), (False, "exact", "exact"),
])
def test_compile_fullgraph_matches_eager(use_native, lean, input_grad):
    """float64, aot_eager: graph-for-graph the same ATen ops as eager autograd would run."""
    x = torch.randn(2, 3, 15, 13, dtype=torch.float64)
    _check(lambda: small_cnn().double(), x, "compile", use_native, 1e-10, lean=lean,
           input_grad=input_grad)


@pytest.mark.parametrize("mode,use_native,input_grad", [
    ("strict", True, "filtered"), ("strict", False, "exact"), ("nonstrict", True, "exact"),
    ("nonstrict", False, "filtered"),
])
def test_export_matches_eager(mode, use_native, input_grad):
    """Exported with an input that does not require grad, run with one that does."""
    x = torch.randn(2, 3, 15, 13, dtype=torch.float64)
    _check(lambda: small_cnn().double(), x, mode, use_native, 1e-10, input_grad=input_grad)


@pytest.mark.parametrize("mode", MODES)
def test_conv1d_model(mode):
    x = torch.randn(3, 3, 29, dtype=torch.float64)
    _check(lambda: small_cnn1d().double(), x, mode, True, 1e-10, lean="exact")


def test_inductor_float32():
    """One filtered conv through inductor (C++ codegen, ~6 s): float32 output and gradients as
    eager's."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1))

    x = torch.randn(2, 3, 17, 16)
    eager = _filtered(build(), x, lean=None)
    want = _grads(eager, x)
    compiled = torch.compile(_filtered(build(), x, lean=None), fullgraph=True,
                             backend="inductor")
    got = _grads(compiled, x)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    assert _rel(got, want) < 1e-5
    assert _rel(got, _grads(build(), x)) > 1e-2


class _Direct(nn.Module):
    """A model whose own forward calls a functional filtered conv (``conv``)."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3, dtype=torch.float64))

    def forward(self, x):
        return self.conv(x, self.w, None, 1, 1, radius=2)


def test_traceable_functional_in_a_custom_module():
    """gradfilter.traceable.conv2d called by a model's own forward traces in every mode."""
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    m = _Direct(traceable.conv2d)
    want = _grads(m, x)
    for mode in MODES:
        assert _rel(_grads(_trace(m, x, mode), x), want) < 1e-12


@pytest.mark.parametrize("use_native", NATIVE)
@pytest.mark.parametrize("mode", MODES)
def test_functional_op_traced(use_native, mode):
    """gradfilter.conv2d (the functional op) called by a model's own forward: traced, it must
    give the filtered gradients or fail, never vanilla ones or none (needs functional.py to
    run gradfilter.traceable's form while torch.compiler.is_compiling())."""
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with _use_native(use_native):
        m = _Direct(gf.conv2d)
        want = _grads(m, x)
        try:
            traced = _trace(m, x, mode)
            got = _grads(traced, x)
        except Exception as e:  # a loud failure is allowed; it must say what failed
            assert str(e)
            return
    assert _rel(got, want) < 1e-12


# ---------------------------------------------------------------------------------------------
# Fused blocks: traced, the fused node's math runs in plain ops (blocks.reference.traced_units);
# with patch-constant gradients at the blocks (a pooled head) those are the node's gradients.


def small_mobilenet() -> nn.Module:
    from torchvision.models.mobilenetv2 import InvertedResidual

    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), InvertedResidual(8, 16, 2, 2),
        InvertedResidual(16, 16, 1, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )
    _randomise_bn(m)
    return m.eval()


def _blocks_model(fuse: bool, x) -> nn.Module:
    m = small_mobilenet()
    gf.apply(m, radius=2, names=["1.*", "2.*"], example_input=x)
    gf.freeze(m, trainable=["1", "2", "5"], bn_eval=True)
    gf.slim(m, names=["1.*", "2.*"], bn="patch", radius=2)
    if fuse:
        assert gf.fuse_blocks(m, ["1", "2"]) == ["1", "2"]
    return m


@pytest.mark.parametrize("mode,use_native", [
    ("compile", True), ("strict", False), ("nonstrict", True), ("nonstrict", False),
])
def test_traced_fused_blocks_give_the_fused_nodes_gradients(mode, use_native):
    """Traced fused blocks give the eager fused node's gradients (exact BatchNorm weight
    gradients: not the lean per-layer path's patch approximation, nor vanilla's)."""
    x = torch.randn(2, 3, 16, 16)
    with _use_native(use_native):
        want = _grads(_blocks_model(True, x), x, input_grad=False)
        got = _grads(_trace(_blocks_model(True, x), x, mode), x, input_grad=False)
        lean = _grads(_blocks_model(False, x), x, input_grad=False)
    assert _rel(got, want) < 1e-5
    assert _rel(got, lean) > 1e-3  # the lean path's BatchNorm weight gradients differ
    assert _rel(got, _grads(small_mobilenet(), x, input_grad=False), common=True) > 1e-2


@pytest.mark.parametrize("mode", MODES)
def test_fused_linear_traces_as_nn_linear(mode):
    """fuse_linear's native node has no fake kernel: traced, the layer is nn.Linear."""
    x = torch.randn(2, 3, 16, 16)
    with _use_native(True):
        model = _blocks_model(True, x)
        gf.fuse_linear(model, "5")
        want = _grads(model, x, input_grad=False)
        got = _grads(_trace(model, x, mode), x, input_grad=False)
    assert _rel(got, want) < 1e-5


# ---------------------------------------------------------------------------------------------
# Whole models, last blocks filtered/lean (slow: -m slow)


@pytest.mark.slow
@pytest.mark.parametrize("use_native", NATIVE)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,method", [
    ("mobilenet_v2", "lean"), ("resnet18", "filtered"), ("tf_efficientnet_lite0", "lean"),
    ("mobilenet_v2", "fused"),
])
def test_whole_models(name, method, mode, use_native):
    """Models prepared as the trainer does (last 3 blocks): traced gradients equal eager ones
    (a fused model's too), and are not vanilla's."""
    from gradfilter.models import create_model
    from gradfilter.train.trainer import prepare_model

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    def build(method):
        torch.manual_seed(0)
        return prepare_model(create_model(name, 10), method, 2, 3, x)[0]

    with _use_native(use_native):
        want = _grads(build(method), x, input_grad=False)
        got = _grads(_trace(build(method), x, mode), x, input_grad=False)
    assert _rel(got, want) < 1e-5
    assert _rel(got, _grads(build("vanilla"), x, input_grad=False), common=True) > 1e-2
