"""eq.adapt: which replacements each device gets, the checks on every change, and the adapted model downstream."""

import json

import pytest
import torch
import torchvision
from torch import nn

import edgequant as eq
from edgequant.core.errors import UsageError
from edgequant.graph.capture import CaptureError
from edgequant.surgery.adapt import default_replacements
from edgequant.surgery.replacements import BY_NAME, REPLACEMENTS

from ..helpers import tiny_detector

EXACT = {r.name for r in REPLACEMENTS if r.exact}


class Lite(nn.Module):
    """A bit of everything TI's lite surgery changes: a 4x4 stride-4 stem, hardswish, a 5x5 stride-1
    depthwise conv, SiLU, squeeze-excitation, a 5x5 max-pool, ReLU6, and a 5x5 conv on a 1x1 map."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.BatchNorm2d(8), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 5, 1, 2, groups=8), nn.BatchNorm2d(8), nn.SiLU())
        self.se = torchvision.ops.SqueezeExcitation(8, 4)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.head = nn.Sequential(nn.Conv2d(8, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU6())
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.tail = nn.Conv2d(16, 16, 5, 1, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.se(self.dw(self.stem(x))))
        return self.fc(torch.flatten(self.tail(self.gap(self.head(x))), 1))


@pytest.fixture(scope="module")
def lite() -> nn.Module:
    model = Lite()
    model.train()
    with torch.no_grad():  # BN statistics from data, as after training
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32))
    return model.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_devices_get_the_replacements_their_rules_call_for():
    assert default_replacements("TDA4VM") == set(BY_NAME)  # TI's lite models: everything
    assert default_replacements("AM68A") == EXACT == default_replacements("am69a")
    am62a = default_replacements("AM62A")
    assert am62a - EXACT == {"silu", "gelu", "hardsigmoid"}  # no look-up tables on AM62A


def test_exact_device_adapt_keeps_the_function(lite, x):
    adapted, report = eq.adapt(lite, "AM68A", (x,))
    kinds = {c.replacement for c in report.changes}
    assert kinds == {"strided-conv", "even-kernel", "depthwise-kernel", "max-pool", "kernel-crop"}
    assert report.exact and report.output_sqnr_db > 100
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), lite(x), rtol=1e-4, atol=1e-5)
        other = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(adapted(other), lite(other), rtol=1e-4, atol=1e-5)
    assert report.summary.startswith("adapt for AM68A: ") and report.summary.endswith("exact")


def test_tdavm_adapt_replaces_all_and_leaves_the_original_alone(lite, x, tmp_path):
    before = {k: v.clone() for k, v in lite.state_dict().items()}
    types = [type(m) for m in lite.modules()]
    adapted, report = eq.adapt(lite, "TDA4VM", (x,))
    assert {"hardswish", "silu", "relu6", "squeeze-excitation"} <= {c.replacement for c in report.changes}
    assert not report.exact and report.output_sqnr_db < 100
    assert [type(m) for m in lite.modules()] == types
    assert all(torch.equal(v, lite.state_dict()[k]) for k, v in before.items())
    gone = (nn.Hardswish, nn.SiLU, nn.ReLU6, torchvision.ops.SqueezeExcitation)
    assert not any(isinstance(m, gone) for m in adapted.modules())
    assert adapted(x).shape == lite(x).shape
    se = next(c for c in report.changes if c.replacement == "squeeze-excitation")
    assert (se.module, se.after, se.exact) == ("se", "Identity()", False)
    assert "se: SqueezeExcitation(" in str(report) and "(approximate)" in str(report)
    saved = json.loads(report.save(tmp_path / "r.json").read_text())
    assert saved["device"] == "TDA4VM" and saved["exact"] is False and len(saved["changes"]) == len(report.changes)


def test_chosen_replacements_only(lite, x):
    _, report = eq.adapt(lite, "TDA4VM", (x,), replacements={"silu"})
    assert [c.replacement for c in report.changes] == ["silu"] and report.replacements == ("silu",)
    _, none = eq.adapt(lite, "AM68A", (x,), replacements=())
    assert none.changes == [] and none.summary == "adapt for AM68A: nothing to change"


def test_modes_are_kept_module_by_module(lite, x):
    lite.train()
    lite.stem[1].eval()  # a frozen BN, as some recipes keep
    try:
        adapted, _ = eq.adapt(lite, "TDA4VM", (x,))
        assert adapted.training and not adapted.stem[1].training and adapted.dw[1].training
        assert isinstance(adapted.stem[2], nn.ReLU) and adapted.stem[2].training
        assert lite.training and not lite.stem[1].training
    finally:
        lite.eval()


class SEModule(nn.Module):
    """Named like timm's squeeze-excitation, but it changes the shape: replacing it would too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1, keepdim=True)


class Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_bad_input(lite, x):
    with pytest.raises(UsageError, match=r"torch\.nn\.Module"):
        eq.adapt("resnet18", "TDA4VM", (x,))
    with pytest.raises(UsageError, match="unknown device 'TDA5X'"):
        eq.adapt(lite, "TDA5X", (x,))
    with pytest.raises(UsageError, match=r"unknown replacements \['swish'\]; valid: strided-conv"):
        eq.adapt(lite, "TDA4VM", (x,), replacements={"swish"})
    with pytest.raises(UsageError, match="collection of names"):
        eq.adapt(lite, "TDA4VM", (x,), replacements="silu")
    with pytest.raises(UsageError, match="example_inputs"):
        eq.adapt(lite, "TDA4VM")
    with pytest.raises(UsageError, match=r"1: replacing SEModule\(\) by Identity\(\) would change its output shape"):
        eq.adapt(nn.Sequential(nn.Conv2d(3, 4, 3), SEModule()), "TDA4VM", (x,))
    with pytest.raises(CaptureError) as error:
        eq.adapt(Branchy(), "TDA4VM", (x,))
    assert len(str(error.value).splitlines()) <= 6 and "x.sum() > 0" in str(error.value)


@pytest.mark.slow
def test_adapted_model_wraps_exports_and_runs_on_the_accelerator(lite, x, tmp_path):
    data = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    with pytest.warns(eq.TidlFallbackWarning, match="3 fall back"):
        original = eq.PTQModule(lite, (x,), device="TDA4VM").calibrate(data, progress=False).export(tmp_path / "o.onnx")
    assert original.tidl_check.fallback and original.tidl_check.advice  # the 5x5 depthwise; the activations
    adapted, _ = eq.adapt(lite, "TDA4VM", (x,))
    result = eq.PTQModule(adapted, (x,), device="TDA4VM").calibrate(data, progress=False).export(tmp_path / "a.onnx")
    assert result.tidl_check.fallback == [] and result.tidl_check.advice == [], str(result.tidl_check)
    assert result.parity.max_abs_diff == 0.0  # 8-bit power-of-2, every op quantized: bit-exact


@pytest.mark.slow
def test_detectors_are_adapted_backbone_and_heads(tmp_path):
    from edgequant.demo.detection import build_detector

    model = build_detector("ssdlite").eval()
    images = torch.rand(2, 3, 128, 128)
    adapted, report = eq.adapt(model, "TDA4VM", (images,))
    paths = {c.module.split(".")[0] for c in report.changes}
    kinds = {c.replacement for c in report.changes}
    assert {"backbone", "head"} <= paths and {"hardswish", "squeeze-excitation", "relu6"} <= kinds
    assert isinstance(adapted, type(model)) and adapted is not model
    qmodel = eq.PTQModule(adapted, (images,), device="TDA4VM")
    assert isinstance(qmodel, eq.DetectionModule)
    result = qmodel.calibrate([images], progress=False).export(tmp_path / "ssd.onnx")
    assert result.tidl_check.fallback == [], str(result.tidl_check)


def test_plain_detector_adapts_to_itself():
    model = tiny_detector("retinanet")
    _, report = eq.adapt(model, "AM68A", (torch.rand(2, 3, 64, 64),))
    assert report.changes == [] and report.output_sqnr_db == float("inf")
