"""Test helpers shared by several test files: small models, ONNX inspection, Q/DQ in onnxruntime."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from hypothesis import settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgequant.demo.training import build_model

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
ZOO = ("resnet18", "mobilenet_v2", "regnet_x_400mf")


class FloatNormNet(torch.nn.Module):
    """A conv, then a layer norm and softmax that stay in float between Q/DQ pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.LayerNorm(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).mean((2, 3))
        return self.fc(self.norm(x).softmax(-1))


def tiny_densenet() -> torch.nn.Module:
    """torchvision's DenseNet, two blocks deep: BN with no conv before it (pre-activation) in every layer."""
    torch.manual_seed(0)
    return torchvision.models.DenseNet(
        growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=10
    )


class TinyBackbone(torch.nn.Module):
    """Three conv+BN+ReLU stages of stride 2 whose outputs are the pyramid levels (as torchvision's FPN returns)."""

    def __init__(self, channels: int = 16, levels: int = 3) -> None:
        super().__init__()
        self.out_channels = channels
        stages, cin = [], 3
        for _ in range(levels + 1):
            stages.append(
                torch.nn.Sequential(
                    torch.nn.Conv2d(cin, channels, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(channels), torch.nn.ReLU()
                )
            )
            cin = channels
        self.stages = torch.nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.stages[0](x)
        levels = OrderedDict()
        for i, stage in enumerate(self.stages[1:]):
            x = stage(x)
            levels[str(i)] = x
        return levels


def tiny_detector(
    family: str, size: int = 64, classes: int = 11, warm: torch.Tensor | None = None, **kwargs: object
) -> torch.nn.Module:
    """A small torchvision SSD, RetinaNet or FCOS at `size` x `size` (levels at strides 4, 8, 16), in eval mode.

    Anchors are ones TIDL's prototxt expresses exactly (whole-pixel half-extents, no clipping).
    BN statistics come from `warm` images (default: uniform noise).
    """
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD

    torch.manual_seed(0)
    backbone = TinyBackbone(32 if family == "fcos" else 16)  # FCOS's head normalizes in 32 groups
    fixed = {"min_size": size, "max_size": size}
    if family == "ssd":
        boxes = DefaultBoxGenerator([[2], [2], [2]], scales=[0.25, 0.5, 0.75, 1.0], clip=False)
        backbone.out_channels = [backbone.out_channels] * 3  # SSD takes one count per level
        model = SSD(backbone, boxes, (size, size), classes, **kwargs)
    elif family == "retinanet":
        anchors = AnchorGenerator(((16,), (32,), (64,)), ((0.25, 1.0, 4.0),) * 3)
        model = RetinaNet(backbone, classes, anchor_generator=anchors, **fixed, **kwargs)
    else:
        anchors = AnchorGenerator(((8,), (16,), (32,)), ((1.0,),) * 3)
        model = FCOS(backbone, classes, anchor_generator=anchors, **fixed, **kwargs)
    with torch.no_grad():  # spread the head's outputs: distinct scores, not torchvision's uniform prior
        for module in model.head.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(0.0, 0.1)
                module.bias.normal_(0.0, 0.5)
        if family != "ssd":  # sigmoid scores: most anchors are background
            model.head.classification_head.cls_logits.bias.sub_(4.0)
    warm = torch.rand(8, 3, size, size) if warm is None else warm
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None  # the exact statistics of the warm-up batch
    model.train()
    with torch.no_grad():
        model.backbone(model.transform(list(warm))[0].tensors)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


# Small test models by name, next to the torchvision names that `warmed_model` takes.
TEST_MODELS = {"tiny_densenet": tiny_densenet}


def warmed_model(name: str, data: torch.Tensor, steps: int = 4) -> torch.nn.Module:
    """A random-init model whose BN statistics have seen real data, as after training."""
    model = TEST_MODELS[name]() if name in TEST_MODELS else build_model(name)
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


# Property tests of the quantization arithmetic (hypothesis), against onnxruntime.

PROPERTY = settings(max_examples=60, deadline=None)
# Offsets from an integer grid point, in steps: exact ties, near-ties and plain values.
OFFSETS = st.sampled_from([0.0, 0.5, -0.5, 0.25, -0.75, 0.4999999, 0.5000001])


@cache
def _qdq_session(bits: int, axis: int | None) -> ort.InferenceSession:
    """QuantizeLinear -> DequantizeLinear with scale and zero point fed at run time."""
    qtype = TensorProto.INT8 if bits == 8 else TensorProto.INT16
    attrs = {} if axis is None else {"axis": axis}
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs),
        ],
        "qdq",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("z", qtype, None),
        ],
        [helper.make_tensor_value_info("q", qtype, None), helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def ort_qdq(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int, axis: int | None = None):
    """(integers, dequantized values) as onnxruntime computes them."""
    dtype = np.int8 if bits == 8 else np.int16
    feed = {"x": x.astype(np.float32), "s": np.asarray(scale, np.float32), "z": np.asarray(zero_point, dtype)}
    return _qdq_session(bits, axis).run(None, feed)


def run_qat_resume_script(out, *args: str, ranks: int = 0) -> str:
    """Run tests/qat_resume_script.py (under torchrun with `ranks` > 0): its stdout, exit code and stderr tail."""
    script = TESTS / "qat_resume_script.py"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "--max-restarts", "1"]
    command = [sys.executable, *(launcher if ranks else []), str(script), str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    return done.stdout + f"\n[exit {done.returncode}]\n" + done.stderr[-3000:]
