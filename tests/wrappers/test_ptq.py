import json

import numpy as np
import pytest
import torch

import edgequant as eq
from edgequant.demo.data import digits_loader
from edgequant.demo.training import accuracy
from edgequant.export.runtime import run_onnx, session

from ..helpers import warmed_model


@pytest.fixture(scope="module")
def calib():
    return digits_loader("train", batch_size=32, limit=128, shuffle=False)


@pytest.mark.parametrize("scheme", ["int8_pow2", "int8", "int16"])
def test_ptq_close_to_float_and_exported_with_parity(scheme, digits_model, calib, digits_test, tmp_path):
    model = digits_model("resnet18")
    x, y = digits_test
    qmodel = eq.PTQModule(model, (x[:16],), scheme).calibrate(calib, progress=False)
    assert not qmodel.training
    test = [(x[i : i + 90], y[i : i + 90]) for i in range(0, 360, 90)]
    float_top1, ptq_top1 = accuracy(model, test), accuracy(qmodel, test)
    assert ptq_top1 >= float_top1 - 2.0  # a 2-epoch float model (~92%): within 2 points
    result = qmodel.export(tmp_path / "ptq.onnx")
    assert result.parity.top1_agreement == 1.0
    ort = run_onnx(session(str(result.path)), (x[:64],))[0]
    with torch.no_grad():
        assert np.array_equal(ort.argmax(1), qmodel(x[:64]).numpy().argmax(1))


@pytest.mark.slow
def test_calibrate_equals_plain_loop_and_folds_bn(digits_train, calib):
    x, _ = digits_train
    model = warmed_model("mobilenet_v2", x, steps=2)
    minmax = eq.PTQConfig(range_estimator="minmax", bias_correction=False, weight_exponent="ceil")
    a = eq.PTQModule(model, (x[:8],), config=minmax).calibrate(calib, progress=False)
    b = eq.PTQModule(model, (x[:8],), config=minmax)
    with torch.no_grad():
        for batch, _ in calib:  # the plain-loop form of calibration
            b(batch)
    b.eval()
    assert not any("batch_norm" in str(n.target) for n in a.model.graph.nodes)
    for oa, ob in zip(a.observers(), b.observers(), strict=True):
        assert torch.equal(oa.min_val, ob.min_val) and torch.equal(oa.max_val, ob.max_val)
    with torch.no_grad():
        assert torch.equal(a(x[:4]), b(x[:4]))


@pytest.mark.slow
def test_bad_calibration_data(digits_train):
    x, _ = digits_train
    model = warmed_model("resnet18", x, steps=1)
    qmodel = eq.PTQModule(model, (x[:8],))
    with pytest.raises(ValueError, match="empty or exhausted"):
        qmodel.calibrate([], progress=False)
    bad = x[:8].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="batch 1 contains NaN"):
        qmodel.calibrate([x[:8], bad], progress=False)
    qmodel.calibrate([bad, x[8:16]], skip_nonfinite=True, progress=False)
    with pytest.raises(ValueError, match="1 batches skipped"):
        eq.PTQModule(model, (x[:8],)).calibrate([bad], skip_nonfinite=True, progress=False)
    with pytest.raises(TypeError, match="calibration batches"):
        eq.PTQModule(model, (x[:8],)).calibrate(["not a tensor"], progress=False)


def test_eval_before_calibration_is_an_error(digits_train):
    x, _ = digits_train
    qmodel = eq.PTQModule(warmed_model("resnet18", x, steps=1), (x[:8],)).eval()
    with pytest.raises(RuntimeError, match="calibrate"):
        qmodel(x[:2])


def test_auto_range_estimator_is_sample_mse_and_one_outlier_image_does_not_set_the_range():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(32, 3, 8, 8)
    x[0] *= 30.0  # one outlier image among 32
    assert eq.PTQConfig().estimator == "sample_mse"
    assert eq.PTQConfig(range_estimator="minmax").estimator == "minmax"
    for scheme in ("int8_pow2", "int8"):
        scales = {}
        for estimator in ("auto", "minmax", "mse", "sample_mse"):
            q = eq.PTQModule(model, (x[:4],), scheme, eq.PTQConfig(range_estimator=estimator, bias_correction=False))
            q.calibrate([x], progress=False)
            scales[estimator] = [float(o.calculate_qparams()[0]) for o in q.activation_observers()]
        assert scales["auto"] == scales["sample_mse"]
        # Pooled mse lets the outlier image's squared error decide; per-image it is one image of 32.
        for pooled, per_image in zip(scales["mse"], scales["sample_mse"], strict=True):
            assert per_image < 0.6 * pooled


def test_config_validation():
    with pytest.raises(ValueError, match="range_estimator"):
        eq.PTQConfig(range_estimator="kl")
    with pytest.raises(ValueError, match="percentile"):
        eq.PTQConfig(percentile=10)
    with pytest.raises(ValueError, match="weight_clipping"):
        eq.PTQConfig(weight_clipping=0)
    with pytest.raises(ValueError, match="adaround must be True or False, got 'no'"):
        eq.PTQConfig(adaround="no")  # a truthy string would silently switch it on
    with pytest.raises(ValueError, match="equalize must be True, False or None"):
        eq.PTQConfig(equalize=1.5)
    with pytest.raises(TypeError, match=r"config must be an eq\.PTQConfig, got dict"):
        eq.PTQModule(torch.nn.Conv2d(3, 4, 3), (torch.randn(2, 3, 8, 8),), "int8_pow2", {"adaround": True})


def test_config_round_trips_through_plain_data():
    config = eq.PTQConfig(range_estimator="percentile", percentile=99.9, equalize=False, weight_clipping=4.0)
    data = config.to_dict()
    assert data["version"] == eq.PTQConfig.VERSION == 1
    assert eq.PTQConfig.from_dict(json.loads(json.dumps(data))) == config
    assert eq.PTQConfig.from_dict({"version": 1}) == eq.PTQConfig()  # missing fields take the defaults
    with pytest.raises(ValueError, match=r"PTQConfig has no field 'estimator'; its fields are range_estimator, "):
        eq.PTQConfig.from_dict({"version": 1, "estimator": "mse"})
    with pytest.raises(ValueError, match=r"version 2, newer than this edgequant reads \(up to 1\); upgrade"):
        eq.PTQConfig.from_dict({**data, "version": 2})
    with pytest.raises(ValueError, match="range_estimator must be one of"):
        eq.PTQConfig.from_dict({**data, "range_estimator": "kl"})  # from_dict validates like the constructor


@pytest.mark.parametrize(
    "config",
    [
        eq.PTQConfig(range_estimator="percentile", equalize=True, bn_reestimation=True, weight_clipping=6.0),
        eq.PTQConfig(range_estimator="minmax", equalize=False, bias_correction=False),
    ],
)
def test_every_technique_runs_through_export(config, digits_model, calib, digits_test, tmp_path):
    x, y = digits_test
    model = digits_model("mobilenet_v2")
    qmodel = eq.PTQModule(model, (x[:16],), "int8_pow2", config).calibrate(calib, progress=False)
    result = qmodel.export(tmp_path / "m.onnx")
    assert result.parity.max_abs_diff == 0.0
    test = [(x[i : i + 120], y[i : i + 120]) for i in range(0, 360, 120)]
    # A sanity bound (chance is 80 points down): on this 2-epoch model, 99.99th-percentile ranges with
    # clipped weights sit 2.8 (all-int8 grids) to 3.1 (unsigned grids) points under float.
    assert accuracy(qmodel, test) >= accuracy(model, test) - 4.0


def test_nan_in_a_plain_calibration_loop_is_refused(digits_train):
    x, _ = digits_train
    qmodel = eq.PTQModule(warmed_model("resnet18", x, steps=1), (x[:8],))
    bad = x[:8].clone()
    bad[3, 1] = float("inf")
    with torch.no_grad(), pytest.raises(ValueError, match=r"input 0 of this batch contains NaN or Inf.*skip_nonfinite"):
        qmodel(bad)
    assert int(qmodel.calibrated_samples) == 0  # nothing was observed


class ChannelsLast(torch.nn.Module):
    """A linear layer on (N, H, W, C) data, as in ConvNeXt blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.mix = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, x):
        y = self.mix(self.conv(x).permute(0, 2, 3, 1))  # channels are the last dim here, not dim 1
        return self.head(y.mean((1, 2)))


def test_bias_correction_reads_each_layers_channels_from_its_own_dim(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 5, 5)  # H = 5 != C = 6: a mean along dim 1 would not fit the mix layer
    model = ChannelsLast().eval()
    qmodel = eq.PTQModule(model, (x,))
    dims = {}
    for n in qmodel.model.graph.nodes:
        if n.op == "call_module":
            for obs, dim in qmodel._bias_correction_inputs():
                if qmodel.model.get_submodule(n.target) is obs:
                    dims[next(iter(n.users)).target, n.args[0].meta["val"].dim()] = dim
    aten = torch.ops.aten
    assert dims == {(aten.conv2d.default, 4): 1, (aten.linear.default, 4): -1, (aten.linear.default, 2): 1}
    qmodel.calibrate([x], progress=False)
    mix_input = next(obs for obs, dim in qmodel._bias_correction_inputs() if dim == -1)
    with torch.no_grad():
        expected = model.conv(x).permute(0, 2, 3, 1).mean((0, 1, 2))
    torch.testing.assert_close(mix_input.channel_mean, expected, rtol=1e-5, atol=1e-6)
    result = qmodel.export(tmp_path / "cl.onnx")
    assert result.parity.max_abs_diff == 0.0


def test_ptq_shares_the_float_weights_but_never_changes_the_callers_model(tmp_path):
    """The float graph reads the caller's tensors (one copy less); calibrating, zeroing dead
    channels, loading another model's state and moving the wrapper must leave the caller's model as it was."""
    from ..helpers import tiny_densenet

    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    model = tiny_densenet().eval()
    model.features.norm0.running_var[:3] = 0.0  # dead channels: zeroed on the float graph
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = eq.PTQModule(model, (x,))
    shared = {t.data_ptr() for t in q._float.parameters()} & {t.data_ptr() for t in model.parameters()}
    assert len(shared) > 1 and q.dead_channels
    q.calibrate([x], progress=False)
    other = tiny_densenet().eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    eq.PTQModule(other, (x,)).calibrate([x], progress=False).save(tmp_path / "other.pt")
    q.load(tmp_path / "other.pt")  # another model's float weights are written into q's own copies
    assert torch.equal(q._float.features.conv0.weight, other.features.conv0.weight)
    q.double()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert q._float.features.conv0.weight.dtype == torch.float64
