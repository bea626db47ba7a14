import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edgequant import EdgequantError, ParityDriftWarning, ParityError, QATModule
from edgequant.export import parity
from edgequant.export.parity import (
    Divergence,
    compare,
    flip_sqnr_db,
    local_divergences,
    locate_divergence,
    output_sqnr_db,
    output_steps,
    reexport,
)
from edgequant.export.runtime import run_onnx, session
from edgequant.graph.ops import Q_OPS

from ..helpers import FloatNormNet


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    q = QATModule(Two(), (x,)).eval()
    path = tmp_path_factory.mktemp("parity") / "two.onnx"
    result = q.export(path)
    _, reference = reexport(q.convert(), (x,))
    return path, reference, (x,), result


def test_export_reports_exact_parity(exported):
    _, _, _, result = exported
    assert result.parity.max_abs_diff == 0.0
    assert result.parity.top1_agreement == 1.0


def _corrupt_second_conv(path, out):
    model = onnx.load(str(path))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    weight_dq = convs[1].input[1]
    producer = next(n for n in model.graph.node if weight_dq in n.output)
    init = next(t for t in model.graph.initializer if t.name == producer.input[0])
    w = numpy_helper.to_array(init).copy()
    w[: w.shape[0] // 2] = np.int8(127)  # half the output channels saturate
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(out))


def test_corrupted_weight_is_caught_and_located(exported, tmp_path):
    path, reference, inputs, _ = exported
    bad = tmp_path / "bad.onnx"
    _corrupt_second_conv(path, bad)
    where = locate_divergence(str(bad), reference, inputs)
    assert where is not None and where.module == "conv2"  # the module whose output first differs
    assert where.max_lsb > 1 and not where.is_rounding
    with pytest.raises(ParityError, match="conv2") as info:
        compare(str(bad), reference, inputs)
    assert isinstance(info.value, EdgequantError)  # one error base for what edgequant raises on purpose


def test_op_by_op_check_blames_the_faulty_op_alone(exported, tmp_path):
    """Each quantized tensor is computed from torch's own inputs: a bad conv2 does not spill into fc's tensor."""
    path, reference, inputs, _ = exported
    bad = tmp_path / "bad.onnx"
    _corrupt_second_conv(path, bad)
    local = local_divergences(str(bad), reference, inputs)
    assert [d.module for d in local] == ["conv2"] and not local[0].is_rounding
    # End to end, the same fault reaches every tensor after conv2, the output included.
    with torch.no_grad():
        want = reference(*inputs).numpy()
    got = run_onnx(session(str(bad)), inputs)[0]
    assert not np.array_equal(want, got)


def test_fault_behind_rounding_drift_is_refused(exported, monkeypatch):
    """Rounding at the first divergence no longer excuses a real fault further on."""
    path, reference, inputs, _ = exported
    monkeypatch.setattr(parity, "is_exact", lambda model: False)
    monkeypatch.setattr(parity, "run_onnx", lambda sess, part: [np.zeros((part[0].shape[0], 4), np.float32)])
    rounding = Divergence("q1", "conv1", count=1, size=10_000, max_lsb=1)
    fault = Divergence("q3", "fc", count=40, size=100, max_lsb=9)
    monkeypatch.setattr(parity, "local_divergences", lambda *args: [rounding, fault])
    with pytest.raises(ParityError, match=r"output of `fc`.*computed from the same inputs"):
        compare(str(path), reference, inputs)
    monkeypatch.setattr(parity, "local_divergences", lambda *args: [rounding])
    monkeypatch.setattr(parity, "flip_sqnr_db", lambda *args: 3.0)
    with pytest.warns(ParityDriftWarning, match="every quantized tensor agrees up to rounding"):
        report = compare(str(path), reference, inputs)
    assert report.local == (rounding,) and "quantized tensors that differ: 1, each by rounding only" in str(report)


def test_output_sqnr_matches_its_definition():
    expected = [np.array([[3.0, 4.0]]), np.array([[0.0]])]
    actual = [np.array([[3.0, 4.5]]), np.array([[0.5]])]
    assert output_sqnr_db(expected, actual) == pytest.approx(10 * np.log10(25 / 0.5))
    assert output_sqnr_db(expected, expected) == np.inf


def _near_tied_outputs(samples: int, drift: float):
    """Logits whose top two classes are 0.001 apart on every sample; `drift` swaps them."""
    rng = np.random.default_rng(0)
    torch_out = rng.normal(size=(samples, 10)).astype(np.float32)
    top = torch_out.argmax(1)
    runner_up = np.where(top == 0, 1, 0)
    torch_out[np.arange(samples), runner_up] = torch_out[np.arange(samples), top] - 0.001
    ort_out = torch_out.copy()
    ort_out[np.arange(samples), runner_up] += drift
    return torch_out, ort_out


@pytest.mark.parametrize(("samples", "drift", "passes"), [(2, 0.002, True), (32, 0.002, True), (32, 1.0, False)])
def test_near_tie_flips_pass_whatever_the_sample_count_and_amplified_drift_warns(
    exported, monkeypatch, samples, drift, passes
):
    """Rounding-level first divergence; top-1 flips on every sample: the file passes, whatever the count."""
    import edgequant.export.parity as parity

    path, reference, _, _ = exported
    torch_out, ort_out = _near_tied_outputs(samples, drift)
    monkeypatch.setattr(parity, "_as_list", lambda _: [torch.from_numpy(torch_out)])
    monkeypatch.setattr(parity, "run_onnx", lambda sess, inputs: [ort_out])
    monkeypatch.setattr(parity, "output_steps", lambda model: [None])
    monkeypatch.setattr(parity, "is_exact", lambda model: False)
    rounding = parity.Divergence("q", "conv1", count=1, size=10_000, max_lsb=1)
    monkeypatch.setattr(parity, "local_divergences", lambda *args: [rounding])
    monkeypatch.setattr(parity, "flip_sqnr_db", lambda *args: 12.5)
    inputs = (torch.zeros(samples, 3, 8, 8),)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = compare(str(path), reference, inputs)
    assert report.top1_agreement == 0.0 and report.rounding == rounding
    drift = [w for w in caught if issubclass(w.category, ParityDriftWarning)]
    assert (report.sqnr_db >= parity.PARITY_SQNR_DB) == passes
    assert len(drift) == (0 if passes else 1)
    if not passes:
        message = str(drift[0].message)
        assert "dB SQNR" in message and "torch alone move torch's outputs to 12.5 dB" in message
    assert report.flip_sqnr_db == (None if passes else 12.5)


def test_flip_sqnr_moves_the_named_values_one_step(exported):
    """Flipping k values of the output tensor moves the output by k steps: SQNR by hand."""
    _, reference, inputs, _ = exported
    last_q = [n for n in reference.graph.nodes if n.target in Q_OPS][-1]
    step = output_steps(reference)[0]
    with torch.no_grad():
        y = reference(*inputs).double()
    signal = float((y**2).sum())
    for count in (1, 3):
        divergence = Divergence(last_q.name, "fc", count=count, size=y.numel(), max_lsb=1)
        # Each flipped value moves by exactly one output step (up, or down at the top of the range).
        assert flip_sqnr_db(reference, inputs, [divergence]) == pytest.approx(10 * np.log10(signal / (count * step**2)))


@pytest.mark.filterwarnings("ignore::edgequant.UnquantizedOpsWarning")
@pytest.mark.parametrize(
    ("model", "scheme", "exact"),
    [(Two, "int8_pow2", True), (Two, "int8", False), (Two, "int16_pow2", False), (FloatNormNet, "int8_pow2", False)],
)
def test_bit_exact_only_for_int8_pow2_graphs_without_float_ops(model, scheme, exact):
    from edgequant.export.parity import is_exact

    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    q = QATModule(model(), (x,), scheme=scheme).eval()
    _, reference = reexport(q.convert(), (x,))
    assert is_exact(reference) is exact


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::edgequant.ParityDriftWarning")  # a random 53-layer net amplifies drift
def test_export_judges_parity_on_calibration_samples_not_the_example_batch(tmp_path):
    """A random BN-warmed mobilenet_v2 at 224x224, int8 PTQ, an example batch of 2: ties flip, the file passes."""
    import edgequant as eq
    from edgequant.demo.data import digits_tensors
    from edgequant.wrappers.base import PARITY_SAMPLES

    from ..helpers import warmed_model

    images = digits_tensors("train", size=224)[0][:64]
    model = warmed_model("mobilenet_v2", images, steps=2)
    qmodel = eq.PTQModule(model, (images[:2],), "int8").calibrate(images.split(16), progress=False)
    result = qmodel.export(tmp_path / "mobilenet_v2.onnx")
    assert result.parity.samples == PARITY_SAMPLES
    assert result.parity.rounding is not None and result.parity.rounding.is_rounding
    # Op by op, every quantized tensor that differs does so by rounding; the first is the end-to-end first.
    assert result.parity.local and result.parity.local[0] == result.parity.rounding
    assert all(d.is_rounding for d in result.parity.local)


def test_rounding_is_one_step_on_at_most_one_percent_or_one_value():
    def divergence(count: int, size: int, max_lsb: int = 1) -> Divergence:
        return Divergence("q", "fc", count=count, size=size, max_lsb=max_lsb)

    assert divergence(100, 10_000).is_rounding and not divergence(101, 10_000).is_rounding
    assert divergence(1, 12).is_rounding  # one tie in a 12-value head is still rounding
    assert not divergence(2, 12).is_rounding
    assert not divergence(1, 10_000, max_lsb=2).is_rounding


def test_checks_run_in_chunks_and_locate_the_divergence_in_any_chunk(exported, tmp_path, monkeypatch):
    path, reference, inputs, _ = exported
    batch = torch.cat([inputs[0]] * 4)[: 2 * parity.CHECK_BATCH + 3]  # three chunks, the last one short
    seen = []
    forward = reference.forward
    monkeypatch.setattr(reference, "forward", lambda *args: seen.append(args[0].shape[0]) or forward(*args))
    report = compare(str(path), reference, (batch,))
    assert seen == [parity.CHECK_BATCH, parity.CHECK_BATCH, 3] and report.samples == batch.shape[0]
    # A difference only in the last chunk's samples is found there, counted over every chunk's values.
    original = parity.run_onnx

    def off_by_one_step_in_last_chunk(sess, part):
        outputs = original(sess, part)
        if part[0].shape[0] == 3:
            name = [o.name for o in sess.get_outputs()].index(first_q)
            outputs[name] = outputs[name].copy()
            outputs[name].flat[0] += 1
        return outputs

    first_q = next(n.name for n in reference.graph.nodes if n.target in parity.Q_OPS)
    monkeypatch.setattr(parity, "run_onnx", off_by_one_step_in_last_chunk)
    divergence = locate_divergence(str(path), reference, (batch,))
    assert divergence is not None and divergence.tensor == first_q and divergence.count == 1
    recorder = parity._Recorder(reference)
    with torch.no_grad():
        recorder.run(batch)
    assert divergence.size == recorder.values[first_q].numel()  # all samples' values, not one chunk's
