"""numerics.batchnorm: BN in inference equals onnxruntime's BatchNormalization bit for bit."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgequant.numerics.batchnorm import batch_norm


def _onnxruntime_bn(x: torch.Tensor, weight, bias, mean, var, eps: float) -> np.ndarray:
    names = ("scale", "bias", "mean", "var")
    node = helper.make_node("BatchNormalization", ["x", *names], ["y"], epsilon=eps)
    shape = [None, *x.shape[1:]]
    graph = helper.make_graph(
        [node],
        "bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(t.numpy(), n) for t, n in zip((weight, bias, mean, var), names, strict=True)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.numpy()})[0]


def _params(channels: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.rand(channels, generator=g) * 1.7 + 0.3
    bias = torch.rand(channels, generator=g) * 2 - 1
    mean = torch.rand(channels, generator=g) * 2 - 1
    var = torch.rand(channels, generator=g) * 2.9 + 0.1
    return weight, bias, mean, var


@pytest.mark.parametrize("shape", [(64, 96, 8, 8), (128, 33), (16, 7, 40)], ids=["2d", "1d-flat", "1d"])
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_equals_onnxruntime_where_torch_does_not(shape: tuple[int, ...], eps: float) -> None:
    # Dequantized 8-bit power-of-2 values, as BN reads them between Q/DQ pairs.
    x = torch.randint(-128, 128, shape, generator=torch.Generator().manual_seed(1)).float() / 16
    weight, bias, mean, var = _params(shape[1], seed=len(shape))
    want = _onnxruntime_bn(x, weight, bias, mean, var, eps)
    ours = batch_norm(x, weight, bias, mean, var, False, 0.1, eps).numpy()
    assert np.array_equal(ours, want)
    torch_bn = torch.nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.1, eps).numpy()
    assert np.allclose(torch_bn, want, rtol=1e-6, atol=1e-6)
    if x.numel() > 100_000:  # the reason this function exists: torch's kernel rounds otherwise
        assert not np.array_equal(torch_bn, want)


def test_without_affine_parameters_and_in_channels_last() -> None:
    x = (torch.randn(8, 24, 6, 6) * 3).contiguous(memory_format=torch.channels_last)
    _, _, mean, var = _params(24, seed=3)
    want = _onnxruntime_bn(x.contiguous(), torch.ones(24), torch.zeros(24), mean, var, 1e-5)
    assert np.array_equal(batch_norm(x, None, None, mean, var, False, 0.1, 1e-5).numpy(), want)


def test_training_mode_is_torchs_own_and_updates_statistics() -> None:
    x = torch.randn(8, 4, 5, 5)
    weight, bias, mean, var = _params(4, seed=4)
    mean_ref, var_ref = mean.clone(), var.clone()
    ours = batch_norm(x, weight, bias, mean, var, True, 0.1, 1e-5)
    want = torch.nn.functional.batch_norm(x, mean_ref, var_ref, weight, bias, True, 0.1, 1e-5)
    assert torch.equal(ours, want) and torch.equal(mean, mean_ref) and torch.equal(var, var_ref)
    assert not torch.equal(mean, _params(4, seed=4)[2])  # running statistics moved


def test_gradients_reach_the_affine_parameters() -> None:
    # Frozen BN in QAT runs in eval arithmetic while its weight and bias still learn.
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    weight, bias, mean, var = (t.clone().requires_grad_(i < 2) for i, t in enumerate(_params(3, seed=5)))
    batch_norm(x, weight, bias, mean, var, False, 0.1, 1e-5).square().sum().backward()
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    torch.nn.functional.batch_norm(x2, mean.detach(), var.detach(), w2, b2, False).square().sum().backward()
    for ours, want in ((x.grad, x2.grad), (weight.grad, w2.grad), (bias.grad, b2.grad)):
        assert torch.allclose(ours, want, rtol=1e-4, atol=1e-5)
