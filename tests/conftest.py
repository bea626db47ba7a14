"""Shared fixtures: digits batches, small torchvision models, ONNX inspection helpers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgequant.data import digits_tensors
from edgequant.training import build_model, float_digits_model

ZOO = ("resnet18", "mobilenet_v2", "regnet_x_400mf")


@pytest.fixture(scope="session")
def digits_test() -> tuple[torch.Tensor, torch.Tensor]:
    return digits_tensors("test")


@pytest.fixture(scope="session")
def digits_train() -> tuple[torch.Tensor, torch.Tensor]:
    return digits_tensors("train")


def warmed_model(name: str, data: torch.Tensor, steps: int = 4) -> torch.nn.Module:
    """A random-init model whose BN statistics have seen real data, as after training."""
    model = build_model(name)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.momentum = None  # exact running averages over the warm-up batches
    model.train()
    with torch.no_grad():
        for i in range(steps):
            model(data[i * 32 : (i + 1) * 32])
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory):
    """Factory: a torchvision model briefly trained on digits (confident, not random, logits)."""
    cache = tmp_path_factory.mktemp("float_models")
    models: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in models:
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("EDGEQUANT_CACHE", str(cache))
                models[name] = float_digits_model(name, epochs=2, progress=False)
        return models[name]

    return get


def constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs by name."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def qdq_nodes(path) -> list[tuple[onnx.NodeProto, np.ndarray, np.ndarray]]:
    """Every QuantizeLinear / DequantizeLinear with its scale and zero point arrays."""
    model = onnx.load(str(path))
    values = constant_values(model)
    found = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scale = values[node.input[1]]
            zero_point = values[node.input[2]] if len(node.input) > 2 else np.zeros((), np.int8)
            found.append((node, scale, zero_point))
    return found
