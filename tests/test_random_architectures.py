"""Property tests on generated conv nets: PTQ -> QDQ ONNX export -> onnxruntime parity.

The hand-written parity tests cover a few fixed models; the op vocabulary here (conv + BN + ReLU/ReLU6,
depthwise convs, residual adds, concatenated branches, max/avg pools, nearest upsampling, BN with no conv
before it, a linear or conv head) combines into graphs nobody wrote by hand. For each generated net:

- int8_pow2: onnxruntime on the exported file equals the integer model bit for bit (max |diff| == 0),
  both in export's own check and when we run the file ourselves on fresh inputs;
- int8 / int16 (free scales, 16 bit): onnxruntime may differ only by the rounding rule of
  `edgequant.export.parity` (the first diverging quantized tensor is off by one step on under
  ROUNDING_FRACTION of its values, `Divergence.is_rounding`);
- eval mode of the wrapper equals `convert()` bit for bit.

Nets are built deterministically from drawn integers (a `NetSpec`, printed as a list of layer specs), so
hypothesis shrinks a failure to a small, readable architecture.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import edgequant as eq
from edgequant.export.parity import compare, is_exact, locate_divergence, output_steps, reexport
from edgequant.export.runtime import session_options

# --- architecture specs ---------------------------------------------------------------------------------------

ACTS = (None, "relu", "relu6")


@dataclass(frozen=True)
class Conv:
    out: int
    k: int = 3
    stride: int = 1
    bn: bool = True
    act: str | None = "relu"


@dataclass(frozen=True)
class DWConv:
    """Depthwise: groups == in channels == out channels."""

    k: int = 3
    stride: int = 1
    bn: bool = True
    act: str | None = "relu"


@dataclass(frozen=True)
class Residual:
    """x + BN(conv(x)) (same channels), then an optional activation."""

    k: int = 3
    act: str | None = "relu"


@dataclass(frozen=True)
class Cat:
    """torch.cat of a 1x1 conv branch, a 3x3 conv branch and (optionally) the input itself."""

    a: int
    b: int
    identity: bool = False


@dataclass(frozen=True)
class Pool:
    """kind "max" or "avg"; k 2 (stride 2) or 3 (stride 2, padding 1)."""

    kind: str = "max"
    k: int = 2


@dataclass(frozen=True)
class Up:
    """Nearest, scale 2: nn.Upsample (functional=False) or F.interpolate."""

    functional: bool = False


@dataclass(frozen=True)
class Norm:
    """BN with no conv before it (DenseNet's pre-activation), then an optional activation."""

    act: str | None = "relu"


@dataclass(frozen=True)
class LinearHead:
    """Global average pool + Linear."""

    classes: int


@dataclass(frozen=True)
class ConvHead:
    """A 1x1 conv output (no activation), as in dense prediction."""

    out: int


Layer = Conv | DWConv | Residual | Cat | Pool | Up | Norm
Head = LinearHead | ConvHead


@dataclass(frozen=True)
class NetSpec:
    """A generated net: input shape (N, C, H, W), its layers, its head, and the seed for weights and data."""

    shape: tuple[int, int, int, int]
    layers: tuple[Layer, ...]
    head: Head
    seed: int = 0

    def __repr__(self) -> str:
        return f"NetSpec(shape={self.shape}, layers={list(self.layers)}, head={self.head}, seed={self.seed})"


def _act(name: str | None) -> nn.Module:
    return {None: nn.Identity(), "relu": nn.ReLU(), "relu6": nn.ReLU6()}[name]


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, bn: bool = True, groups: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=not bn)
    return nn.Sequential(conv, nn.BatchNorm2d(cout)) if bn else nn.Sequential(conv)


class _Residual(nn.Module):
    def __init__(self, channels: int, spec: Residual) -> None:
        super().__init__()
        self.branch = _conv_bn(channels, channels, spec.k)
        self.act = _act(spec.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.branch(x))


class _Cat(nn.Module):
    def __init__(self, channels: int, spec: Cat) -> None:
        super().__init__()
        self.a = nn.Sequential(*_conv_bn(channels, spec.a, 1), nn.ReLU())
        self.b = nn.Sequential(*_conv_bn(channels, spec.b, 3), nn.ReLU6())
        self.identity = spec.identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.a(x), self.b(x)] + ([x] if self.identity else [])
        return torch.cat(parts, dim=1)


class _Interpolate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest")


class _LinearHead(nn.Module):
    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


def _block(channels: int, spec: Layer) -> tuple[nn.Module, int]:
    """The module for one layer spec and its output channel count."""
    if isinstance(spec, Conv):
        conv = _conv_bn(channels, spec.out, spec.k, spec.stride, spec.bn)
        return nn.Sequential(*conv, _act(spec.act)), spec.out
    if isinstance(spec, DWConv):
        conv = _conv_bn(channels, channels, spec.k, spec.stride, spec.bn, groups=channels)
        return nn.Sequential(*conv, _act(spec.act)), channels
    if isinstance(spec, Residual):
        return _Residual(channels, spec), channels
    if isinstance(spec, Cat):
        return _Cat(channels, spec), spec.a + spec.b + (channels if spec.identity else 0)
    if isinstance(spec, Pool):
        stride, padding = 2, spec.k // 2 if spec.k == 3 else 0
        pool = nn.MaxPool2d if spec.kind == "max" else nn.AvgPool2d
        return pool(spec.k, stride, padding), channels
    if isinstance(spec, Up):
        return (_Interpolate() if spec.functional else nn.Upsample(scale_factor=2, mode="nearest")), channels
    if isinstance(spec, Norm):
        return nn.Sequential(nn.BatchNorm2d(channels), _act(spec.act)), channels
    raise TypeError(spec)


class Net(nn.Module):
    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        channels = spec.shape[1]
        blocks = []
        for layer in spec.layers:
            block, channels = _block(channels, layer)
            blocks.append(block)
        self.layers = nn.Sequential(*blocks)
        if isinstance(spec.head, LinearHead):
            self.head: nn.Module = _LinearHead(channels, spec.head.classes)
        else:
            self.head = nn.Conv2d(channels, spec.head.out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x))

    def extra_repr(self) -> str:
        return repr(self.spec)


def build(spec: NetSpec) -> nn.Module:
    """The float net of a spec: seeded weights, non-trivial BN affine and warmed BN statistics, in eval mode."""
    torch.manual_seed(spec.seed)
    net = Net(spec)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.momentum = None  # exact running averages of the warm-up batches
        net.train()
        for _ in range(3):
            net(torch.randn(8, *spec.shape[1:]))
    for bn in bns:
        bn.momentum = 0.1
    return net.eval()


def inputs(spec: NetSpec, batches: int, offset: int = 0) -> list[torch.Tensor]:
    """Random input batches of the spec's shape, from a generator seeded by the spec (offset: another stream)."""
    gen = torch.Generator().manual_seed(spec.seed * 7919 + offset)
    return [torch.randn(spec.shape, generator=gen) for _ in range(batches)]


# --- the strategy ---------------------------------------------------------------------------------------------

MAX_CHANNELS = 16


@st.composite
def net_specs(draw: st.DrawFn, max_layers: int = 5) -> NetSpec:
    """A small conv net that fits its input: layer kinds are drawn in an order that shrinks towards plain convs."""
    batch = draw(st.integers(2, 4))
    channels = draw(st.integers(1, 4))
    size = draw(st.integers(8, 24))
    shape = (batch, channels, size, size)
    layers: list[Layer] = []
    for _ in range(draw(st.integers(1, max_layers))):
        kinds = ["conv", "dw", "residual", "cat", "norm"]
        if size >= 4:
            kinds += ["pool", "strided"]
        if size <= 16:
            kinds.append("up")
        kind = draw(st.sampled_from(kinds))
        if kind in ("conv", "strided"):
            stride = 2 if kind == "strided" else 1
            layer: Layer = Conv(
                draw(st.integers(1, 12)),
                draw(st.sampled_from([3, 1])),
                stride,
                draw(st.booleans()),
                draw(st.sampled_from(ACTS)),
            )
            channels = layer.out
            size = (size - 1) // stride + 1  # padding k // 2: the same for k = 1 and 3
        elif kind == "dw":
            layer = DWConv(draw(st.sampled_from([3, 5])), 1, draw(st.booleans()), draw(st.sampled_from(ACTS)))
        elif kind == "norm":
            layer = Norm(draw(st.sampled_from(ACTS)))
        elif kind == "residual":
            layer = Residual(draw(st.sampled_from([3, 1])), draw(st.sampled_from(ACTS)))
        elif kind == "cat":
            identity = draw(st.booleans())
            a, b = draw(st.integers(1, 6)), draw(st.integers(1, 6))
            if a + b + (channels if identity else 0) > MAX_CHANNELS:
                identity = False
            layer = Cat(a, b, identity)
            channels = a + b + (channels if identity else 0)
        elif kind == "pool":
            layer = Pool(draw(st.sampled_from(["max", "avg"])), draw(st.sampled_from([2, 3])))
            size = size // 2 if layer.k == 2 else (size - 1) // 2 + 1
        else:
            layer = Up(draw(st.booleans()))
            size *= 2
        layers.append(layer)
    head: Head = draw(st.one_of(st.builds(LinearHead, st.integers(2, 10)), st.builds(ConvHead, st.integers(1, 4))))
    return NetSpec(shape, tuple(layers), head, draw(st.integers(0, 2**16)))


# --- the property ---------------------------------------------------------------------------------------------


def _ort_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


def check_ptq_export_parity(spec: NetSpec, scheme: str) -> None:
    """PTQ, export, then hold onnxruntime and convert() to eval mode; raises AssertionError or ParityError."""
    net = build(spec)
    calibration = inputs(spec, 4)
    qmodel = eq.PTQModule(net, (calibration[0],), scheme).calibrate(calibration, progress=False)
    assert not qmodel.training
    exact = scheme == "int8_pow2"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "net.onnx"
        result = qmodel.export(path)  # raises ParityError when onnxruntime disagrees beyond the rule
        parity = result.parity
        if exact:
            assert parity.max_abs_diff == 0.0 and parity.rounding is None, str(parity)
            assert parity.top1_agreement == 1.0, str(parity)
        elif parity.rounding is not None:
            assert parity.rounding.is_rounding, str(parity)
        else:
            assert parity.output_step is not None and parity.max_abs_diff <= parity.output_step * 1.0001, str(parity)
        assert parity.eval_agreement is not None and parity.eval_agreement[0] == 0.0, str(parity)

        # Independently: fresh inputs at another batch size, the file in our own session, against eval mode.
        fresh = torch.cat(inputs(spec, 2, offset=1))[: spec.shape[0] + 1]
        integer = qmodel.convert()
        with torch.no_grad():
            seen = qmodel(fresh)
            converted = integer(fresh)
        assert torch.equal(seen, converted), f"eval vs convert(): max |diff| {(seen - converted).abs().max():g}"
        sess = _ort_session(path)
        got = sess.run(None, {sess.get_inputs()[0].name: fresh.numpy()})[0]
        want = seen.numpy()
        assert got.shape == want.shape
        _, reference = reexport(integer, (fresh,))
        if exact:
            diff = float(np.abs(got - want).max())
            assert diff == 0.0, f"onnxruntime vs eval: max |diff| {diff:g} on an int8_pow2 net"
            assert is_exact(reference), "an int8_pow2 graph of exact ops, yet parity.is_exact says it is not"
        else:
            compare(str(path), reference, (fresh,), sess)  # export's own rule, on inputs it never saw
            # Ours, on eval mode's outputs: within one output step with the same top-1, or else the first
            # diverging quantized tensor is off by rounding only (parity.Divergence.is_rounding).
            step = output_steps(reference)[0]
            assert step is not None, "the generated heads all end in a quantized output"
            close = float(np.abs(got - want).max()) <= step * 1.0001
            if not (close and np.array_equal(got.argmax(1), want.argmax(1))):
                divergence = locate_divergence(str(path), reference, (fresh,))
                assert divergence is not None, "outputs differ, yet every quantized tensor agrees"
                assert divergence.is_rounding, str(divergence)


# Each example takes a second or two (capture, PTQ, two exports, onnxruntime), so shrinking a failure can take
# many minutes: it runs only with EDGEQUANT_SHRINK=1 set. Unshrunk, the failing spec is still printed.
SHRINK = [Phase.shrink] if os.environ.get("EDGEQUANT_SHRINK") else []
SETTINGS = {
    "deadline": None,
    "derandomize": True,  # the same examples on every run and machine
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow],
    "phases": [Phase.explicit, Phase.generate, *SHRINK],
}
SCHEMES = ("int8_pow2", "int8", "int16")


@pytest.mark.filterwarnings("error::edgequant.UnquantizedOpsWarning")  # every op of the vocabulary has a rule
@pytest.mark.filterwarnings("ignore::edgequant.ParityDriftWarning")  # random nets amplify rounding (free scales)
@pytest.mark.parametrize("scheme", SCHEMES)
@settings(max_examples=2, **SETTINGS)
@given(spec=net_specs(max_layers=4))
def test_random_net_exports_with_parity(spec: NetSpec, scheme: str) -> None:
    check_ptq_export_parity(spec, scheme)


@pytest.mark.slow
@pytest.mark.filterwarnings("error::edgequant.UnquantizedOpsWarning")
@pytest.mark.filterwarnings("ignore::edgequant.ParityDriftWarning")
@pytest.mark.parametrize("scheme", SCHEMES)
@settings(max_examples=12, **SETTINGS)  # 36 nets in all: about 2 minutes, within the suite's budget
@given(spec=net_specs())
def test_random_net_exports_with_parity_many(spec: NetSpec, scheme: str) -> None:
    check_ptq_export_parity(spec, scheme)


def test_strategy_builds_nets_that_run() -> None:
    """The generator itself: specs of every kind build, warm (BN not identity) and run at their input shape."""
    spec = NetSpec(
        (2, 3, 12, 12),
        (
            Conv(6),
            DWConv(),
            Residual(),
            Cat(2, 3, identity=True),
            Pool("avg", 3),
            Norm(),
            Up(functional=True),
            Pool(),
        ),
        LinearHead(5),
        seed=1,
    )
    net = build(spec)
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    with torch.no_grad():
        assert net(inputs(spec, 1)[0]).shape == (2, 5)
    assert "Cat(a=2, b=3, identity=True)" in repr(spec)


@pytest.mark.parametrize("functional", [False, True], ids=["nn.Upsample", "F.interpolate"])
def test_nearest_upsample_is_exact(functional: bool) -> None:
    spec = NetSpec((2, 1, 8, 8), (Conv(1), Up(functional)), ConvHead(1), seed=0)
    batches = inputs(spec, 2)
    qmodel = eq.PTQModule(build(spec), (batches[0],), "int8_pow2").calibrate(batches, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        assert qmodel.export(Path(tmp) / "up.onnx").parity.max_abs_diff == 0.0  # the file is exact ...
    _, reference = reexport(qmodel.convert(), (batches[0],))
    assert is_exact(reference)  # ... and the check demands it (nearest upsampling only copies values)
