import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgequant.demo.training import build_model
from edgequant.diagnose.guidelines import Finding, check, checked_codes, format_findings

from ..helpers import ROOT

DOC = ROOT / "docs" / "guidelines.md"
CODES = (
    "conv-without-bn",
    "depthwise-heavy",
    "weight-range",
    "activation-range",
    "not-capturable",
    "no-weight-decay",
    "low-weight-decay",
    "adam-optimizer",
    "untrained-bn",
    "dead-channel",
    "surgery-candidate",
)


class Net(nn.Module):
    """conv-BN-ReLU twice, pool, linear; `bn2=False` leaves the second conv without BN."""

    def __init__(self, bn2: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=not bn2)
        self.bn2 = nn.BatchNorm2d(16) if bn2 else nn.Identity()
        self.relu = nn.ReLU()  # shared by both blocks, as in torchvision's ResNet
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def estimated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """`model` with BN statistics estimated on `x`, as after training."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.momentum = None  # plain average over the batch
    with torch.no_grad():
        model.train()(x)
    for bn in bns:
        bn.momentum = 0.1  # torch.export cannot capture a cumulative-average BN in train mode
    return model.eval()


def codes(findings: list[Finding]) -> list[str]:
    return sorted(f.code for f in findings)


@pytest.fixture(scope="module")
def images(digits_test) -> tuple[torch.Tensor]:
    return (digits_test[0][:8],)


@pytest.fixture(params=[False, True], ids=["module-order", "graph"])
def inputs(request, images):
    return images if request.param else None


def test_clean_recipe_has_no_findings(inputs, images):
    torch.manual_seed(0)
    model = estimated(Net(), images[0])
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert check(model, sgd, inputs) == []


def test_faulty_recipe_reports_each_fault_once(inputs, images):
    torch.manual_seed(0)
    model = estimated(Net(bn2=False), images[0])
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    adam = torch.optim.Adam(
        [
            {"params": weights, "weight_decay": 1e-4},
            # The biases are split over two groups: still one cause, one finding.
            {"params": biases[:1], "weight_decay": 0.0},
            {"params": biases[1:], "weight_decay": 0.0},
        ]
    )
    findings = check(model, adam, inputs)
    assert codes(findings) == ["adam-optimizer", "conv-without-bn", "no-weight-decay"]
    by_code = {f.code: f for f in findings}
    assert by_code["conv-without-bn"].subject == ("conv2",)
    assert by_code["no-weight-decay"].subject == ("bn1.bias", "conv2.bias", "fc.bias")
    assert "2 biases and 1 normalization parameter" in by_code["no-weight-decay"].message
    assert by_code["adam-optimizer"].subject == ("Adam",)
    assert [f.severity for f in findings] == ["warning", "warning", "info"]  # most severe first


def test_weight_decay_below_threshold():
    model = Net()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-6)
    (finding,) = check(model, sgd)
    assert finding.code == "low-weight-decay"
    assert finding.subject == tuple(n for n, _ in model.named_parameters())
    assert check(model, torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-5)) == []


def test_zero_decay_everywhere_is_one_finding():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, groups=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, groups=8))
    (finding,) = check(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert finding.code == "no-weight-decay"
    assert len(finding.subject) == 6
    assert "2 biases, 2 normalization parameters, 1 depthwise weight and 1 other weight" in finding.message


class Misordered(nn.Module):
    """`bn` is registered right after `conv_b` but normalizes the skip path, not conv_b's output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 10, 1)  # prediction conv: its output is the model output

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        return self.head(self.conv_b(x) + self.bn(x))


def test_dataflow_decides_what_follows_a_conv(images):
    model = estimated(Misordered(), images[0])
    (finding,) = check(model, example_inputs=images)
    assert (finding.code, finding.subject) == ("conv-without-bn", ("conv_b",))
    # Without example inputs registration order stands in for the dataflow, and it pairs conv_b with bn.
    assert check(model) == []


class TwoHeads(nn.Module):
    """A segmentation head (conv, then upsampling) and an auxiliary head: both are prediction convs."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.seg = nn.Conv2d(8, 5, 1)
        self.aux = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        features = self.backbone(x)
        return F.interpolate(self.seg(features), scale_factor=2.0), self.aux(features)


def test_prediction_convs_need_no_bn(images):
    assert check(estimated(TwoHeads(), images[0]), example_inputs=images) == []
    # Registration order knows only one prediction layer: the last one.
    (finding,) = check(TwoHeads())
    assert finding.subject == ("seg",)


@pytest.mark.slow
def test_squeeze_excitation_convs_need_no_bn(images):
    model = build_model("mobilenet_v3_small")
    for inputs in (None, images):
        assert "conv-without-bn" not in codes(check(model, example_inputs=inputs))


@pytest.mark.parametrize(("name", "heavy"), [("mobilenet_v2", True), ("resnet18", False), ("regnet_x_400mf", False)])
def test_depthwise_heavy(name, heavy):
    model = build_model(name)
    findings = [f for f in check(model) if f.code == "depthwise-heavy"]
    if heavy:
        (finding,) = findings
        assert len(finding.subject) == 17  # one depthwise conv per inverted-residual block
        assert all(model.get_submodule(n).groups == model.get_submodule(n).in_channels for n in finding.subject)
        assert "int8_pow2_dw" in finding.message
    else:
        assert findings == []


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return x * 2
        return x


def test_uncapturable_module_is_named_and_other_checks_still_run(images):
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 4, 3))
    model.add_module("conv2", nn.Conv2d(4, 4, 3))
    model.add_module("gate", Branchy())
    findings = check(model, example_inputs=images)
    assert codes(findings) == ["conv-without-bn", "not-capturable"]
    failure = findings[0]
    assert (failure.severity, failure.subject) == ("error", ("gate",))
    assert "if x.sum() > 0" in failure.message and "Fix:" in failure.message
    assert findings[1].subject == ("conv1",)  # conv2 is the prediction conv
    assert codes(check(model)) == ["conv-without-bn"]  # capture is tried only with example inputs


def pow2_zeroed_share(x: torch.Tensor) -> float:
    """Share of nonzero values that one power-of-2 int8 scale rounds to zero, in float64."""
    values = [abs(v) for v in x.double().flatten().tolist() if v != 0]
    step = 2.0 ** math.ceil(math.log2(max(values) / 127))
    return sum(v <= step / 2 for v in values) / len(values)


def test_weight_outlier_is_reported():
    torch.manual_seed(0)
    model = Net()
    assert check(model) == []
    with torch.no_grad():
        model.conv2.weight[3, 1, 0, 0] = 50.0
    (finding,) = check(model)
    assert (finding.code, finding.severity, finding.subject) == ("weight-range", "error", ("conv2",))
    folded = model.conv2.weight / torch.sqrt(model.bn2.running_var + model.bn2.eps).view(-1, 1, 1, 1)
    assert f"rounds {pow2_zeroed_share(folded):.0%} of them to zero" in finding.message


def test_dead_channel_bn_fold_is_reported():
    """A BN whose channel never varies (running variance 0) blows up that channel's folded weights."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 4, 1),
    )  # fmt: skip
    assert check(model) == []
    model[4].running_var[5] = 1e-6  # nearly constant: the fold blows the channel up
    (finding,) = check(model)
    assert (finding.code, finding.subject) == ("weight-range", ("3",))
    assert "channel 5 has running variance 1e-06" in finding.message
    assert "'int8_pow2_dw'" in finding.message  # one scale per channel represents it
    model[4].running_var[5] = 0.0  # constant: a dead channel, which the wrappers zero
    (finding,) = check(model)
    assert (finding.code, finding.severity, finding.subject) == ("dead-channel", "warning", ("3",))
    assert "output channel 5 has running variance ~0 in 4" in finding.message


@pytest.mark.parametrize("inplace", [False, True])
def test_activation_outlier_is_reported_where_it_starts(images, inplace):
    torch.manual_seed(0)
    model = estimated(Net(), images[0])
    model.relu.inplace = inplace  # an in-place ReLU rewrites BN's output tensor: still one conv-BN-ReLU unit
    with torch.no_grad():
        model.bn1.bias[0] = 1e4
    findings = check(model, example_inputs=images)
    assert check(model) == []  # activations need example inputs
    (finding,) = findings  # downstream layers see the same outlier: not reported again
    assert (finding.code, finding.subject) == ("activation-range", ("conv1", "bn1", "relu"))
    with torch.no_grad():
        out = model.relu(model.bn1(model.conv1(images[0])))
    assert f"rounds {pow2_zeroed_share(out):.0%} of them to zero" in finding.message


def test_too_wide_input_is_reported_once(images):
    torch.manual_seed(0)
    x = images[0].clone()
    x[0, 0, 0, 0] = 1e5
    (finding,) = check(estimated(Net(), images[0]), example_inputs=(x,))
    assert (finding.code, finding.subject) == ("activation-range", ("example_inputs[0]",))


def test_untrained_model_skips_activation_ranges(images):
    """Initial BN statistics do not normalize anything: activations of a fresh model are not the trained ones."""
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.bn1.bias[0] = 1e4
    (finding,) = check(model, example_inputs=images)
    assert (finding.code, finding.severity, finding.subject) == ("untrained-bn", "info", ("bn1", "bn2"))
    assert codes(check(estimated(model, images[0]), example_inputs=images)) == ["activation-range"]


def test_check_leaves_the_model_unchanged(images):
    model = Net().train()
    model.bn1.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    check(model, example_inputs=images)
    assert model.training and not model.bn1.training and model.conv1.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_rendering():
    finding = Finding("warning", "conv-without-bn", ["a", "b", "c", "d"], "needs BN.")
    assert finding.subject == ("a", "b", "c", "d")
    assert finding.doc == "docs/guidelines.md#conv-without-bn"
    assert str(finding) == (
        "warning: [conv-without-bn] a, b, c and 1 more: needs BN. (see docs/guidelines.md#conv-without-bn)"
    )
    data = json.loads(json.dumps(finding.to_dict()))
    assert data == {
        "severity": "warning",
        "code": "conv-without-bn",
        "subject": ["a", "b", "c", "d"],
        "message": "needs BN.",
        "doc": "docs/guidelines.md#conv-without-bn",
    }
    info = Finding("info", "adam-optimizer", ("Adam",), "prefer SGD.")
    lines = format_findings([finding, info]).splitlines()
    assert lines[0] == "2 findings (1 warning, 1 info):"
    assert lines[1:] == [f"  {finding}", f"  {info}"]
    assert format_findings([]) == "No findings."
    assert format_findings([], checked_codes(optimizer=False, example_inputs=True)) == (
        "No findings. Checked: conv-without-bn, depthwise-heavy, dead-channel, weight-range, not-capturable, "
        "activation-range."
    )
    assert set(checked_codes(optimizer=True, example_inputs=True, device=True)) == set(CODES) - {"untrained-bn"}
    assert "surgery-candidate" not in checked_codes(optimizer=True, example_inputs=True)
    with pytest.raises(ValueError, match="severity"):
        Finding("fatal", "x", (), "")


def test_every_finding_has_a_section_in_the_guidelines():
    anchors = set(re.findall(r"^#+ `([a-z0-9-]+)`", DOC.read_text(), flags=re.MULTILINE))
    assert set(CODES) <= anchors


class GatedNet(Net):
    def __init__(self) -> None:
        super().__init__(bn2=False)
        self.gate = Branchy()

    def forward(self, x):
        return self.gate(super().forward(x))


def test_messages_are_one_line(images):
    model = estimated(GatedNet(), images[0])
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = 100.0
        model.bn1.bias[0] = 1e4
    findings = check(model, torch.optim.AdamW(model.parameters(), weight_decay=0.0), images)
    assert set(codes(findings)) == set(CODES) - {
        "depthwise-heavy",
        "low-weight-decay",
        "untrained-bn",
        "dead-channel",
        "surgery-candidate",
    }
    assert all("\n" not in str(f) for f in findings)


@pytest.mark.slow
def test_surgery_candidates_for_a_device():
    model = build_model("mobilenet_v3_small").eval()
    x = torch.randn(2, 3, 32, 32)
    assert not [f for f in check(model, example_inputs=(x,)) if f.code == "surgery-candidate"]
    found = {
        f.message.split(": ")[1].split(" (")[0]: f
        for f in check(model, example_inputs=(x,), device="TDA4VM")
        if f.code == "surgery-candidate"
    }
    assert "Hardswish -> ReLU" in found and "squeeze-excitation block -> identity" in found
    depthwise = next(f for text, f in found.items() if text.startswith("depthwise kernel TIDL lacks"))
    assert (
        depthwise.severity == "info"
        and depthwise.message.endswith("(exact).")
        and "features.5.block.1.0" in depthwise.subject
    )
    assert "eq.adapt(model, device='TDA4VM', example_inputs=...) would replace" in depthwise.message
    newer = [f for f in check(model, example_inputs=(x,), device="AM68A") if f.code == "surgery-candidate"]
    assert all(f.message.endswith("(exact).") for f in newer) and newer
