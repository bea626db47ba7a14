"""QAT accuracy on digits-trained models, measured in onnxruntime, and runtime agreement.

    python benchmarks/qat_accuracy.py [--epochs 3] [--models resnet18 regnet_x_400mf mobilenet_v2]

For each model: float top-1; int8_pow2 QAT top-1 in torch and in onnxruntime; and how
often onnxruntime agrees with the converted torch model on all 360 test images, next to
the same agreement for torchao's own PT2E flow (XNNPACK-style per-tensor config, PTQ on
128 images, exported with torch.onnx) on the same model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import quantize_on_digits, save, table
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

from edgequant.data import digits_tensors
from edgequant.parity import run_onnx, session
from edgequant.training import float_digits_model


def agreement(onnx_path: Path, torch_model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement %, max |logit difference|) of onnxruntime vs torch on x."""
    ort_out = run_onnx(session(str(onnx_path)), (x,))[0]
    with torch.no_grad():
        torch_out = torch_model(x).numpy()
    return 100.0 * float((ort_out.argmax(1) == torch_out.argmax(1)).mean()), float(np.abs(ort_out - torch_out).max())


def torchao_peer_agreement(model: torch.nn.Module, calib: torch.Tensor, x: torch.Tensor, out: Path) -> tuple:
    graph = torch.export.export(model.eval(), (calib[:8],), dynamic_shapes=({0: torch.export.Dim("b")},)).module()
    prepared = prepare_pt2e(graph, XNNPACKQuantizer().set_global(get_symmetric_quantization_config()))
    with torch.no_grad():
        prepared(calib)
    converted = convert_pt2e(prepared)
    torch.onnx.export(
        converted, (calib[:8],), str(out), dynamo=True, dynamic_shapes=({0: torch.export.Dim("b")},), verbose=False
    )
    return agreement(out, converted, x)


def run_model(name: str, epochs: int, lr: float, workdir: Path) -> dict:
    row = quantize_on_digits(name, "int8_pow2", epochs, lr, workdir)
    x_test, _ = digits_tensors("test")
    x_train, _ = digits_tensors("train")
    ours_agree, ours_diff = agreement(row.pop("_path"), row.pop("_qmodel").convert(), x_test)
    peer_agree, peer_diff = torchao_peer_agreement(
        float_digits_model(name), x_train[:128], x_test, workdir / f"{name}_torchao.onnx"
    )
    row["drop_points"] = row["float_top1"] - row["qat_onnxruntime_top1"]
    row.update(
        ours_ort_vs_torch_top1_agreement=ours_agree,
        ours_ort_vs_torch_max_diff=ours_diff,
        torchao_ort_vs_torch_top1_agreement=peer_agree,
        torchao_ort_vs_torch_max_diff=peer_diff,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--models", nargs="+", default=["resnet18", "regnet_x_400mf", "mobilenet_v2"])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            row = run_model(name, args.epochs, args.lr, Path(tmp))
            rows.append(row)
            print(row, flush=True)
    headers = [
        "model",
        "float",
        "QAT torch",
        "QAT onnxruntime",
        "drop",
        "ours: ORT=torch top-1 %",
        "ours: max diff",
        "torchao: ORT=torch top-1 %",
        "torchao: max diff",
    ]
    keys = [
        "model",
        "float_top1",
        "qat_torch_top1",
        "qat_onnxruntime_top1",
        "drop_points",
        "ours_ort_vs_torch_top1_agreement",
        "ours_ort_vs_torch_max_diff",
        "torchao_ort_vs_torch_top1_agreement",
        "torchao_ort_vs_torch_max_diff",
    ]
    print()
    print(f"int8_pow2 QAT, {args.epochs} epochs, lr {args.lr}; top-1 % on the 360 digits test images")
    print(table(headers, [[r[k] for k in keys] for r in rows]))
    print(f"\nresults: {save('qat_accuracy', ' '.join(['python', *sys.argv]), rows)}")


if __name__ == "__main__":
    main()
