import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgequant as eq
from edgequant.demo.data import digits_tensors
from edgequant.diagnose.analysis import (
    BitWidthSimulator,
    analyze,
    fidelity,
    quantizer_owners,
    sixteen_bit,
    sqnr_db,
)
from edgequant.diagnose.results import VERDICT_OUTSIDE, VERDICT_QUANTIZATION, DetectionAnalysis
from edgequant.numerics.observers import RangeObserver

LAYERS = ["stem.0", "block.0", "block.3", "head.0", "fc"]


class TinyNet(nn.Module):
    """conv, depthwise -> pointwise with a residual add, max pool, strided conv, avg pool, flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 1, bias=False),
            nn.BatchNorm2d(8),
        )
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.block(x))
        x = self.head(self.pool(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture(scope="module")
def digits8():
    """The digits at their native 8x8: (train images, test images, test labels)."""
    x, _ = digits_tensors("train", size=8)
    xt, yt = digits_tensors("test", size=8)
    return x, xt, yt


@pytest.fixture(scope="module")
def tiny(digits8):
    """A random-weight TinyNet whose BN statistics match the data."""
    x, _, _ = digits8
    torch.manual_seed(0)
    model = TinyNet()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None
    with torch.no_grad():
        model.train()(x[:256])
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def _with_outliers(model: TinyNet, factor: float = 100.0) -> TinyNet:
    """head.0 gets weights `factor` x its largest, on two channels that are always equal: float is unchanged.

    Channel 1 becomes a copy of channel 0 up to head.0's input; head.0 reads channel 0
    with +B and channel 1 with -B. The pair cancels exactly, in float and after
    quantization alike (equal inputs round equally), but it sets head.0's weight scale.
    """
    faulty = copy.deepcopy(model)
    with torch.no_grad():
        for conv in (faulty.stem[0], faulty.block[0], faulty.block[3]):
            conv.weight[1] = conv.weight[0]
        for bn in (faulty.stem[1], faulty.block[1], faulty.block[4]):
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t[1] = t[0]
        big = factor * float(faulty.head[0].weight.abs().max())
        faulty.head[0].weight[:, 0, 1, 1] = big
        faulty.head[0].weight[:, 1, 1, 1] = -big
    return faulty.eval()


def _sqnr_by_hand(reference: torch.Tensor, test: torch.Tensor) -> float:
    return 10 * math.log10(float((reference**2).sum()) / float(((test - reference) ** 2).sum()))


def test_metrics_by_hand():
    reference = torch.tensor([[3.0, 1.0], [1.0, 3.0], [2.0, 0.0], [0.0, 2.0]])
    test = reference.clone()
    test[3] = torch.tensor([2.0, 0.0])  # one flipped prediction
    # signal 9+1+1+9+4+0+0+4 = 28, noise 4+4 = 8
    assert sqnr_db(reference, test) == pytest.approx(10 * math.log10(28 / 8))
    f = fidelity("x", reference, test, labels=torch.tensor([0, 1, 1, 1]))
    assert f.top1_agreement == pytest.approx(75.0)
    assert f.top1_accuracy == pytest.approx(50.0)  # predictions 0, 1, 0, 0 against labels 0, 1, 1, 1
    assert sqnr_db(reference, reference) == 200.0
    assert fidelity("x", reference, test, labels=None).top1_accuracy is None


def test_sixteen_bit_counterparts():
    assert sixteen_bit(eq.get_scheme("int8_pow2")).name == "int16_pow2"
    assert sixteen_bit(eq.get_scheme("int8")).name == "int16"
    dw = sixteen_bit(eq.get_scheme("int8_pow2_dw"))
    assert (dw.weight_bits, dw.activation_bits, dw.weight_granularity) == (16, 16, "depthwise_per_channel")


def _observer_bits(ptq: eq.PTQModule) -> list[int]:
    gm = ptq.model
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), RangeObserver):
            found.append(16 if gm.get_submodule(node.target).quant_max > 255 else 8)  # uint8: 255
    return found


def test_quantizer_owners_match_the_mixed_precision_quantizer(tiny, digits8):
    """Every observer the analysis assigns to layer L is exactly one the quantizer makes 16-bit for [L]."""
    x, _, _ = digits8
    base = eq.PTQModule(tiny, (x[:8],), "int8_pow2")
    owners = quantizer_owners(base.model)
    gm = base.model
    order = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in owners]
    assert set(owners.values()) == {*LAYERS, None}
    for layer in LAYERS:
        scheme = eq.get_scheme("int8_pow2").with_high_precision([layer])
        actual = _observer_bits(eq.PTQModule(tiny, (x[:8],), scheme))
        predicted = [16 if owners[t] == layer else 8 for t in order]
        assert actual == predicted, layer


@pytest.mark.parametrize("outlier", [1.0, 30.0], ids=["plain", "outlier_image"])
def test_simulation_matches_the_ptq_models(tiny, digits8, outlier):
    """The 8-bit and 16-bit calibrations reproduce the converted 8-bit, 16-bit and mixed PTQ models.

    With one calibration image 30x brighter, the 8-bit ranges clip it and the 16-bit ones
    do not: a 16-bit layer must run on its 16-bit range, as the mixed model does.
    """
    x, xt, _ = digits8
    x = x.clone()
    x[0] *= outlier
    calib = [x[i : i + 64] for i in range(0, 256, 64)]

    def ptq(scheme):
        return eq.PTQModule(tiny, (x[:8],), scheme).calibrate(calib, progress=False)

    ptq8, ptq16 = ptq("int8_pow2"), ptq("int16_pow2")
    if outlier > 1:  # the 8-bit calibration clips somewhere the 16-bit one does not
        pairs = zip(ptq8.activation_observers(), ptq16.activation_observers(), strict=True)
        assert any(float(a.max_val.max()) < float(b.max_val.max()) for a, b in pairs)
    sim = BitWidthSimulator(ptq8.model, ptq16.model, bias_correction=True)
    mixed = eq.get_scheme("int8_pow2").with_high_precision(["block.3", "fc"])
    with torch.no_grad():
        for layers, others, high, real in (
            (8, 8, {}, ptq8),
            (16, 16, {}, ptq16),
            (8, 8, {"block.3": 16, "fc": 16}, ptq(mixed)),
        ):
            sim.configure(layers, others, high)
            assert torch.allclose(sim.outputs([xt]), real(xt), atol=1e-6, rtol=0), (layers, high)
        sim.configure(None, None)
        assert torch.allclose(sim.outputs([xt]), tiny(xt), atol=1e-4)


@pytest.fixture(scope="module")
def fault_report(tiny, digits8):
    x, xt, yt = digits8
    calib = [x[i : i + 64] for i in range(0, 256, 64)]
    evaluation = [(xt[i : i + 120], yt[i : i + 120]) for i in range(0, 360, 120)]
    faulty = _with_outliers(tiny)
    report = analyze(faulty, calib, (x[:8],), "int8_pow2", eval_data=evaluation, target_sqnr_db=25.0, progress=False)
    return faulty, report


def test_weight_outliers_ranked_first_and_16_bit_restores(fault_report, tiny, digits8):
    x, xt, _ = digits8
    faulty, report = fault_report
    with torch.no_grad():
        assert torch.allclose(faulty(xt), _with_outliers(tiny, 0.0)(xt), atol=1e-3)  # invisible in float
    assert report.verdict == VERDICT_QUANTIZATION
    assert report.layers[0].name == "head.0"
    # over 90% with the covering exponent; the exponent chosen by output error clips the outliers a little
    assert report.layers[0].weight_zero_8bit_pct > 40.0
    assert all(layer.weight_zero_8bit_pct < 20.0 for layer in report.layers[1:])
    assert report.recommended_high_precision == ["head.0"]
    # Independently: a PTQ model with head.0 in 16 bit, calibrated and measured here.
    calib = [x[i : i + 64] for i in range(0, 256, 64)]
    mixed = eq.get_scheme("int8_pow2").with_high_precision(report.recommended_high_precision)
    mixed_model = eq.PTQModule(faulty, (x[:8],), mixed).calibrate(calib, progress=False)
    with torch.no_grad():
        reference, after = faulty(xt), mixed_model(xt)
    agreement = float((after.argmax(1) == reference.argmax(1)).float().mean()) * 100
    assert report.int8.sqnr_db < 10.0
    assert _sqnr_by_hand(reference, after) > 25.0
    assert agreement > 95.0 and agreement > report.int8.top1_agreement + 20
    assert report.recommended.sqnr_db == pytest.approx(_sqnr_by_hand(reference, after), abs=1e-3)
    assert report.target_met


def test_normalization_mismatch_is_outside_quantization(tiny, digits8):
    """Calibration images scaled by 1/255 a second time; evaluation images (unlabelled) as the model expects."""
    x, xt, _ = digits8
    wrong = analyze(tiny, x[:256] / 255, (x[:8],), eval_data=xt, sweep_samples=64, progress=False)
    assert wrong.verdict == VERDICT_OUTSIDE
    assert wrong.int16.top1_agreement < 90.0 and wrong.int16.sqnr_db < 10.0
    assert wrong.input_outside_range_pct > 50.0
    assert wrong.recommended is None and wrong.recommended_high_precision == []
    assert "outside the range seen in calibration" in str(wrong)
    assert wrong.float_accuracy is None and wrong.int8.top1_accuracy is None
    assert (wrong.calibration_samples, wrong.eval_samples, wrong.sweep_samples) == (256, 360, 64)


def test_report_data(fault_report):
    _, report = fault_report
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["recommended_high_precision"] == ["head.0"]
    assert [layer["rank"] for layer in data["layers"]] == list(range(1, len(LAYERS) + 1))
    kinds = {layer["name"]: layer["kind"] for layer in data["layers"]}
    assert kinds == {"stem.0": "conv", "block.0": "depthwise conv", "block.3": "conv", "head.0": "conv", "fc": "linear"}
    assert report.float_accuracy is not None and report.int8.top1_accuracy is not None


def test_bad_arguments(tiny, digits8):
    x, _, yt = digits8
    with pytest.raises(ValueError, match="8-bit scheme"):
        analyze(tiny, x[:64], (x[:8],), "int16", progress=False)
    with pytest.raises(ValueError, match="some batches have labels"):
        analyze(tiny, [(x[:32], yt[:32]), x[32:64]], (x[:8],), progress=False)
    with pytest.raises(TypeError, match="tensors or \\(inputs, labels\\) pairs"):
        analyze(tiny, ["not a batch"], (x[:8],), progress=False)


def test_dead_channels_are_named_in_the_report(tiny, digits8):
    x, xt, _ = digits8
    model = copy.deepcopy(tiny)
    with torch.no_grad():
        model.stem[1].bias[2] = -1e3  # stem channel 2 never fires: block.0 sees zeros there
        model.block[1].running_var[2] = 0.0
        model.block[1].running_mean[2] = 0.0
    report = analyze(model, x[:64], (x[:8],), eval_data=xt[:64], sweep_samples=16, confirm=False, progress=False)
    assert report.dead_channels == {"block.0": [2]}
    assert "dead channels (BN running variance ~0) in 1 layer(s): block.0 [2]" in str(report)


@pytest.mark.slow
def test_a_detector_is_analyzed_by_map_against_its_own_float_detections():
    from edgequant.demo.canvases import digit_canvases

    from ..helpers import tiny_detector

    images, _ = digit_canvases("calibration", 16, size=64)
    model = tiny_detector("ssd", 64, warm=images, score_thresh=0.3)
    with torch.no_grad():
        found = model(list(images))
    # The float model's own confident detections as ground truth: float scores 100 by construction.
    truth = [{"boxes": d["boxes"][d["scores"] > 0.35], "labels": d["labels"][d["scores"] > 0.35]} for d in found]
    batches = [(images[i : i + 8], truth[i : i + 8]) for i in (0, 8)]
    report = eq.analyze(model, batches, (images[:4],), "int8_pow2", progress=False)
    assert isinstance(report, DetectionAnalysis)
    assert report.float_map["map"] == pytest.approx(100.0)
    assert report.int16_map["map"] > 95.0 and report.int16_sqnr_db > report.int8_sqnr_db + 20
    assert report.int8_map["map"] <= report.int16_map["map"] + 1.0
    assert "mAP within 0.5 points of float" in str(report) and report.to_dict()["eval_samples"] == 16
    with pytest.raises(eq.EdgequantError, match=r"must be \(images, targets\) pairs"):
        eq.analyze(model, [images[:8]], (images[:4],), progress=False)
