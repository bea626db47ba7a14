import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import StochasticDepth

import edgequant as eq
from edgequant.export.runtime import run_onnx, session
from edgequant.graph.ops import BN_OPS


class Residual(nn.Module):
    """Conv-BN-ReLU stem, a residual branch behind stochastic depth, a dropout head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.drop_path = StochasticDepth(0.5, "row")
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, 4))

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.drop_path(self.branch(x)))


def _bn_buffers(qmodel: eq.QATModule) -> list[torch.Tensor]:
    return [b.clone() for name, b in qmodel.model.named_buffers() if "running_" in name]


@pytest.mark.slow
def test_eval_is_deterministic_and_leaves_bn_statistics_alone():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    qmodel = eq.QATModule(Residual().train(), (x,))
    assert not any("bernoulli" in str(n.target) for n in qmodel.model.graph.nodes)  # no stochastic depth
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    qmodel.train()
    optimizer.zero_grad()
    qmodel(x).sum().backward()
    optimizer.step()
    with torch.no_grad():
        assert not torch.equal(qmodel(x), qmodel(x))  # train mode: dropout is still active
    stats = _bn_buffers(qmodel)
    nn.Sequential(qmodel).eval()  # eval() through a parent module, as a training loop's model.eval() does
    assert not qmodel.training
    with torch.no_grad():
        first, second = qmodel(x), qmodel(x)
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(stats, _bn_buffers(qmodel), strict=True))
    bn_nodes = [n for n in qmodel.model.graph.nodes if n.target in BN_OPS]
    assert bn_nodes and all(n.args[5] is False for n in bn_nodes)


@pytest.mark.slow
def test_batch_of_one_example_with_bn_in_train_mode_wraps_and_exports(tmp_path):
    torch.manual_seed(0)
    model = Residual().train()
    x = torch.randn(1, 3, 8, 8)
    qmodel = eq.QATModule(model, (x,)).eval()
    assert model.training  # the caller's model is not switched
    with torch.no_grad():
        out = qmodel(x)
    assert out.shape == (1, 4) and torch.isfinite(out).all()
    result = qmodel.export(tmp_path / "one.onnx")
    assert result.parity.max_abs_diff == 0.0
    converted = qmodel.convert()
    assert np.array_equal(run_onnx(session(str(result.path)), (x,))[0], converted(x).detach().numpy())


def test_ptq_eval_is_deterministic_and_moving_the_module_rebuilds_the_integer_model():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    qmodel = eq.PTQModule(Residual().eval(), (x,)).calibrate([x], progress=False)
    with torch.no_grad():
        first = qmodel(x)
        cached = qmodel.integer_model()
        assert torch.equal(first, qmodel(x)) and qmodel.integer_model() is cached
        qmodel.to(torch.float32)
        assert qmodel.__dict__["_integer"] is None and torch.equal(first, qmodel(x))
    assert qmodel.integer_model() is not cached
    assert not any(k.startswith("_integer") for k in qmodel.state_dict())


class FullyConv(nn.Module):
    """conv-BN-ReLU, a strided conv, a 1x1 prediction conv: runs at any input size."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.down(self.body(x))))


@pytest.mark.slow
def test_a_wrong_input_size_is_one_line_that_says_what_to_do():
    x = torch.randn(4, 3, 32, 32)
    for qmodel in (
        eq.PTQModule(Residual().eval(), (x,)).calibrate([x], progress=False),
        eq.QATModule(Residual(), (x,)),
    ):
        for bad, shown in (
            (torch.randn(2, 3, 64, 64), "(2, 3, 64, 64)"),
            (torch.randn(2, 1, 32, 32), "(2, 1, 32, 32)"),
        ):
            with torch.no_grad(), pytest.raises(eq.InputShapeError) as info:
                qmodel(bad)
            message = str(info.value)
            assert message == (
                f"captured for inputs of shape (N, 3, 32, 32); got {shown} for input 0: pass example_inputs at the "
                "size you run, or dynamic_spatial=True for a fully convolutional model"
            )
        with pytest.raises(eq.InputShapeError, match="captured with 1 input"):
            qmodel(x, x)


@pytest.mark.slow
def test_dynamic_spatial_runs_and_calibrates_at_several_sizes(tmp_path):
    torch.manual_seed(0)
    small, large = torch.randn(4, 3, 16, 16), torch.randn(2, 3, 40, 24)  # sizes from 8 up
    model = FullyConv().eval()
    qmodel = eq.PTQModule(model, (small,), "int8_pow2", dynamic_spatial=True)
    qmodel.calibrate([small, large], progress=False)
    with torch.no_grad():
        assert qmodel(large).shape == (2, 2, 20, 12) and qmodel(small).shape == (4, 2, 8, 8)
        reference = model(large)
        # the integer model at the other size, within the quantization error of the float one
        assert float((qmodel(large) - reference).abs().max()) < 0.1 * float(reference.abs().max())
    with pytest.raises(eq.InputShapeError, match=r"\(N, 3, H, W\); got \(2, 1, 16, 16\)"):
        qmodel(torch.randn(2, 1, 16, 16))
    result = qmodel.export(tmp_path / "m.onnx")  # static again, at the example size
    assert result.parity.max_abs_diff == 0.0
    qat = eq.QATModule(model, (small,), dynamic_spatial=True).train()
    assert qat(large).shape == (2, 2, 20, 12)


def test_dynamic_spatial_refuses_a_model_fixed_to_one_size():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 2)).eval()
    with pytest.raises(eq.CaptureError, match="does not run at every input size"):
        eq.PTQModule(model, (torch.randn(2, 3, 8, 8),), dynamic_spatial=True)


def test_an_uncalibrated_ptq_module_refuses_to_evaluate_convert_or_export(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    qmodel = eq.PTQModule(Residual().eval(), (x,)).eval()
    for action in (lambda: qmodel(x), qmodel.convert, lambda: qmodel.export(tmp_path / "m.onnx")):
        with pytest.raises(eq.NotCalibratedError, match=r"call calibrate\(data\)"):
            action()
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(eq.NotCalibratedError):
        eq.QATModule.from_ptq(qmodel)


@pytest.mark.slow
def test_exporting_qat_before_any_step_warns_that_it_holds_the_initial_ranges(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    qmodel = eq.QATModule(Residual(), (x,)).eval()
    with pytest.warns(eq.InitialRangesWarning, match="before any training step"):
        qmodel.export(tmp_path / "m.onnx")
    qmodel.train()
    qmodel(x).sum().backward()
    qmodel.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", eq.InitialRangesWarning)
        qmodel.export(tmp_path / "m.onnx")


class TwoInputs(nn.Module):
    """An image and a second map (say depth), fused by concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.rgb = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.depth = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4))

    def forward(self, a, b):
        return self.head(torch.cat([self.rgb(a), self.depth(b)], 1))


@pytest.mark.slow
def test_two_input_model_calibrates_trains_and_exports_with_parity(tmp_path):
    torch.manual_seed(0)
    a, b, labels = torch.randn(16, 3, 8, 8), torch.rand(16, 1, 8, 8), torch.randint(0, 4, (16,))
    model = TwoInputs().eval()
    batches = [(a[:8], b[:8], labels[:8]), (a[8:], b[8:])]  # with and without labels
    ptq = eq.PTQModule(model, (a[:4], b[:4])).calibrate(batches, progress=False)
    assert int(ptq.calibrated_samples) == 16
    result = ptq.export(tmp_path / "ptq.onnx")
    assert result.parity.max_abs_diff == 0.0
    ort_out = run_onnx(session(str(result.path)), (a, b))[0]
    with torch.no_grad():
        assert np.array_equal(ort_out, ptq(a, b).numpy())
    with pytest.raises(TypeError, match="must be a tuple of 2 tensors"):
        eq.PTQModule(model, (a[:4], b[:4])).calibrate([a], progress=False)
    qat = eq.QATModule(model, (a[:4], b[:4]), calibration_data=batches, config=eq.QATConfig(eq.FreezeSchedule(1)))
    optimizer = torch.optim.SGD(qat.parameters(), lr=1e-3)
    qat.train()
    nn.functional.cross_entropy(qat(a, b), labels).backward()
    optimizer.step()
    qat.eval()
    assert qat.export(tmp_path / "qat.onnx").parity.max_abs_diff == 0.0
