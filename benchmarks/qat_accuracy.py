"""int8_pow2 QAT on digits-trained models: what eval shows, what onnxruntime runs, and whether they agree.

    python benchmarks/qat_accuracy.py [--epochs 3] [--lr 1e-3] [--models resnet18 mobilenet_v2@high_lr ...]

A model is `name` (the default float recipe) or `name@recipe` (a recipe of
edgequant.demo.training.RECIPES; `mobilenet_v2@high_lr` is trained with ten times the
learning rate and comes out with dead channels). For each model, QAT follows the
README snippet (SGD, momentum 0.9, weight decay 1e-4) twice: from the plain start
(`QATModule(model, ...)`) and from the PTQ recipe (`calibration_data=`, 128 images).
Reported: float top-1; top-1 of `qmodel.eval()` after each epoch (what a user picks
checkpoints by) and at the end; top-1 of the exported file in onnxruntime; how often
eval and onnxruntime agree on the 360 test images and their largest logit difference;
next to the same agreement for torchao's own PT2E flow (XNNPACK-style per-tensor
config, PTQ on 128 images, exported with torch.onnx).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import save, table
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

import edgequant as eq
from edgequant.demo.data import digits_loader, digits_tensors
from edgequant.demo.training import accuracy, float_digits_model, onnx_accuracy
from edgequant.export.runtime import run_onnx, session

DEFAULT_MODELS = ["resnet18", "mobilenet_v2", "regnet_x_400mf", "mobilenet_v3_small", "mobilenet_v2@high_lr"]


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


def qat_run(model: torch.nn.Module, calibrated: bool, epochs: int, lr: float, workdir: Path, tag: str) -> dict:
    """The README's loop; eval top-1 after every epoch, then export and agreement."""
    torch.manual_seed(0)
    train = digits_loader("train", batch_size=64)
    test = digits_loader("test", batch_size=120)
    example = digits_tensors("train")[0][:32]
    calib = digits_loader("train", batch_size=32, limit=128, shuffle=False) if calibrated else None
    start = time.perf_counter()
    qmodel = eq.QATModule(
        model, (example,), "int8_pow2", eq.QATConfig(eq.FreezeSchedule(epochs)), calibration_data=calib
    )
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    per_epoch = []
    for _ in range(epochs):
        qmodel.train()
        for x, y in train:
            optimizer.zero_grad()
            loss_fn(qmodel(x), y).backward()
            optimizer.step()
        qmodel.eval()
        per_epoch.append(accuracy(qmodel, test))
    seconds = time.perf_counter() - start
    path = workdir / f"{tag}.onnx"
    result = qmodel.export(path)
    x_test = digits_tensors("test")[0]
    agree, diff = agreement(path, qmodel, x_test)
    return {
        "eval_top1_per_epoch": per_epoch,
        "eval_top1": per_epoch[-1],
        "onnxruntime_top1": onnx_accuracy(path, test),
        "eval_vs_onnxruntime_top1_agreement": agree,
        "eval_vs_onnxruntime_max_diff": diff,
        "dead_channels": sum(len(c) for c in qmodel.dead_channels.values()),
        "seconds": seconds,
        "parity": str(result.parity),
    }


def run_model(spec: str, epochs: int, lr: float, workdir: Path) -> list[dict]:
    name, _, recipe = spec.partition("@")
    model = float_digits_model(name, recipe=recipe or "default")
    float_top1 = accuracy(model, digits_loader("test", batch_size=120))
    x_test, _ = digits_tensors("test")
    x_train, _ = digits_tensors("train")
    peer_agree, peer_diff = torchao_peer_agreement(model, x_train[:128], x_test, workdir / f"{name}_torchao.onnx")
    rows = []
    for start, calibrated in (("plain", False), ("calibration_data", True)):
        row = {"model": spec, "start": start, "float_top1": float_top1}
        try:
            row.update(qat_run(model, calibrated, epochs, lr, workdir, f"{name}_{recipe}_{start}"))
            row["drop_points"] = float_top1 - row["onnxruntime_top1"]
        except eq.NonFiniteError as error:  # training diverged: a result to report, not a crash
            row["error"] = str(error).splitlines()[0]
        row.update(torchao_ort_vs_torch_top1_agreement=peer_agree, torchao_ort_vs_torch_max_diff=peer_diff)
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            rows += run_model(spec, args.epochs, args.lr, Path(tmp))
    headers = [
        "model",
        "start",
        "dead ch.",
        "float",
        "eval top-1",
        "onnxruntime top-1",
        "drop",
        "eval = ORT top-1 %",
        "eval vs ORT max diff",
        "torchao: ORT = torch top-1 %",
        "torchao: max diff",
    ]
    keys = [
        "model",
        "start",
        "dead_channels",
        "float_top1",
        "eval_top1",
        "onnxruntime_top1",
        "drop_points",
        "eval_vs_onnxruntime_top1_agreement",
        "eval_vs_onnxruntime_max_diff",
        "torchao_ort_vs_torch_top1_agreement",
        "torchao_ort_vs_torch_max_diff",
    ]
    print()
    print(f"int8_pow2 QAT, {args.epochs} epochs, SGD lr {args.lr}; top-1 % on the 360 digits test images")
    print(table([*headers, "error"], [[r.get(k, "-") for k in keys] + [r.get("error", "")[:60]] for r in rows]))
    print(f"\nresults: {save('qat_accuracy', ' '.join(['python', *sys.argv]), rows)}")


if __name__ == "__main__":
    main()
