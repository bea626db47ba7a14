"""onnxruntime as the reference engine: how every exported file is run and checked."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch


def session_options(optimized: bool = True) -> ort.SessionOptions:
    """onnxruntime options for running a QDQ file as the file says.

    ORT's fused int8 kernels (QGemm, QLinearConv) on x86 CPUs without VNNI multiply
    u8 x s8 with an instruction that saturates pairs of products at int16: with
    full-range int8 weights the result is off by many steps (seen: 14 output steps on
    a resnet18 head). Neither the ONNX spec nor TIDL computes that, so the QDQ
    fusions are kept off; every other graph optimization (and ORT's own int32 bias
    rounding) stays on.
    """
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.log_severity_level = 3
    return options


def session(path: str | bytes, optimized: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session for a file (or serialized model), see `session_options`."""
    return ort.InferenceSession(path, session_options(optimized), providers=["CPUExecutionProvider"])


def run_onnx(sess: ort.InferenceSession, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    """Run `sess` on torch tensors, fed to its inputs in order."""
    feed = {i.name: x.detach().cpu().numpy() for i, x in zip(sess.get_inputs(), inputs, strict=True)}
    return sess.run(None, feed)
