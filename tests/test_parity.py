import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edgequant import ParityError, QATModule
from edgequant.parity import compare, locate_divergence, reexport

from .conftest import FloatNormNet


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
    with pytest.raises(ParityError, match="conv2"):
        compare(str(bad), reference, inputs)


def test_near_tie_flips_are_told_apart_from_real_ones():
    from edgequant.parity import _flips_are_near_ties

    torch_out = np.array([[1.00, 0.99, -2.0], [3.0, -1.0, 0.0], [0.5, 2.0, 0.0]])
    # drift of 0.02 on the steady samples; sample 0 flips on a 0.01 margin
    drifted = np.array([[0.98, 1.00, -2.0], [3.02, -1.0, 0.0], [0.5, 2.02, 0.0]])
    assert _flips_are_near_ties(torch_out, drifted, step=0.01)
    # sample 2 flips although torch preferred class 1 by 1.5, far beyond the drift
    flipped_far = np.array([[1.00, 0.99, -2.0], [3.02, -1.0, 0.0], [2.1, 2.0, 0.0]])
    assert not _flips_are_near_ties(torch_out, flipped_far, step=0.01)


@pytest.mark.filterwarnings("ignore::edgequant.UnquantizedOpsWarning")
@pytest.mark.parametrize(
    ("model", "scheme", "exact"),
    [(Two, "int8_pow2", True), (Two, "int8", False), (Two, "int16_pow2", False), (FloatNormNet, "int8_pow2", False)],
)
def test_bit_exact_only_for_int8_pow2_graphs_without_float_ops(model, scheme, exact):
    from edgequant.parity import is_exact

    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    q = QATModule(model(), (x,), scheme=scheme).eval()
    _, reference = reexport(q.convert(), (x,))
    assert is_exact(reference) is exact
