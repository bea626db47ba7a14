"""Detection on the digits canvases: float, PTQ, QAT and peers, mAP measured in onnxruntime.

    python benchmarks/detection.py [--families ssdlite retinanet fcos] [--qat-epochs 3]

For each detector (demo/detection.py: trained once on 512 canvases and cached), on 128
test canvases:
- float mAP (torchvision's own forward);
- edgequant PTQ at int8_pow2, int8, int16 and int8_pow2 with the heads in 16 bit
  (calibration: 128 canvases of the calibration split), mAP of the exported file:
  onnxruntime computes the head outputs, torchvision's post-processing decodes them;
  the eval-mode mAP beside it (the two agree bit for bit at int8_pow2) and the export's
  check of TIDL's meta-architecture prototxt;
- QAT (int8_pow2) for `--qat-epochs` from the PTQ recipe, with the freezing schedule over those
  epochs at lr 2e-4, in onnxruntime likewise;
- peers on the same network and images: torchao PT2E (XNNPACK per-tensor) and
  onnxruntime quantize_static (MinMax, QDQ, symmetric int8);
- time of each stage, and the QAT step / float step ratio (median of interleaved rounds).

Writes benchmarks/results/detection.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime.quantization as ortq
import torch
from _common import RESULTS, interleaved_times, median_ratio, save, table
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

import edgequant as eq
from edgequant.demo.canvases import canvas_loader, digit_canvases
from edgequant.demo.detection import DETECTORS, detection_map, float_canvas_detector, train_detector
from edgequant.diagnose.detection import mean_average_precision
from edgequant.export.runtime import run_onnx, session
from edgequant.wrappers.detection import DetectionCore, DetectionModule

SCHEMES = {
    "int8_pow2": "int8_pow2",
    "int8": "int8",
    "int16": "int16",
    "int8_pow2 + 16-bit heads": eq.get_scheme("int8_pow2").with_high_precision(["head"]),
}
HeadRun = Callable[[torch.Tensor], dict[str, torch.Tensor]]
DYNAMIC = ({0: torch.export.Dim("batch")},)
PEERS = ("torchao per-tensor", "ort MinMax")
QAT_LR = 2e-4  # the peers run test batches of another size than the example


def heads_map(qmodel: DetectionModule, run: HeadRun, test) -> dict[str, float]:
    """mAP with `run` computing the head outputs and torchvision's post-processing decoding them."""
    found, truth = [], []
    for images, targets in test:
        inputs = qmodel.core_inputs(images)
        found += qmodel.postprocess(run(inputs), inputs)
        truth += targets
    return mean_average_precision(found, truth)


def onnx_run(path: Path) -> HeadRun:
    sess = session(str(path))
    names = [o.name for o in sess.get_outputs()]

    def run(inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: torch.from_numpy(v) for n, v in zip(names, run_onnx(sess, (inputs,)), strict=True)}

    return run


def ours(model, scheme, calibration, example, test, path: Path) -> dict:
    start = time.perf_counter()
    qmodel = eq.PTQModule(model, (example,), scheme)
    wrapped = time.perf_counter()
    qmodel.calibrate(calibration, progress=False)
    calibrated = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", eq.TidlFallbackWarning)
        result = qmodel.export(path)
    exported = time.perf_counter()
    return {
        "qmodel": qmodel,
        "mAP": heads_map(qmodel, onnx_run(path), test)["map"],
        "eval mAP": detection_map(qmodel, test)["map"],
        "parity max diff": result.parity.max_abs_diff,
        "meta arch": result.detection_check or "-",
        "seconds": {"wrap": wrapped - start, "calibrate": calibrated - wrapped, "export": exported - calibrated},
    }


def torchao_peer(core, example, calibration_inputs) -> HeadRun:
    graph = torch.export.export(core.eval(), (example,), dynamic_shapes=DYNAMIC).module()
    prepared = prepare_pt2e(graph, XNNPACKQuantizer().set_global(get_symmetric_quantization_config()))
    with torch.no_grad():
        for x in calibration_inputs:
            prepared(x)
    converted = convert_pt2e(prepared)
    return lambda x: converted(x)


class _Reader(ortq.CalibrationDataReader):
    def __init__(self, name: str, inputs: list[torch.Tensor]) -> None:
        self.batches = iter([{name: x.numpy()} for x in inputs])

    def get_next(self):
        return next(self.batches, None)


def ort_peer(core, example, calibration_inputs, work: Path) -> HeadRun:
    float_path, path = work / "core_float.onnx", work / "core_ort.onnx"
    torch.onnx.export(core.eval(), (example,), str(float_path), dynamo=True, dynamic_shapes=DYNAMIC, verbose=False)
    name = onnx.load(str(float_path)).graph.input[0].name
    ortq.quantize_static(
        str(float_path),
        str(path),
        _Reader(name, calibration_inputs),
        quant_format=ortq.QuantFormat.QDQ,
        activation_type=ortq.QuantType.QInt8,
        weight_type=ortq.QuantType.QInt8,
        calibrate_method=ortq.CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    run = onnx_run(path)
    names = list(core(example[:1]).keys())  # the exporter numbers outputs; ours are named
    return lambda x: dict(zip(names, run(x).values(), strict=True))


def qat_step_ratio(model, qat: DetectionModule, images, targets, repeats: int) -> float:
    float_model = model.train()
    opt_f = torch.optim.SGD(float_model.parameters(), lr=1e-5, momentum=0.9)
    opt_q = torch.optim.SGD(qat.parameters(), lr=1e-5, momentum=0.9)

    def step(m, opt, x):
        def run():
            opt.zero_grad(set_to_none=True)
            sum(m(x, targets).values()).backward()
            opt.step()

        return run

    qat.train()
    times = interleaved_times(
        {"float": step(float_model, opt_f, list(images)), "qat": step(qat, opt_q, images)}, repeats, warmup=2
    )
    model.eval()
    return median_ratio(times["qat"], times["float"])


def run_family(family: str, qat_epochs: int, repeats: int, work: Path, only: str | None = None) -> dict:
    model = float_canvas_detector(family)
    test = canvas_loader("test", batch_size=16)
    images, targets = digit_canvases("calibration")
    calibration = [(images[i : i + 16], targets[i : i + 16]) for i in range(0, len(targets), 16)]
    example = images[:8]
    row: dict = {"detector": family, "float mAP": detection_map(model, test)["map"]}
    for label, scheme in SCHEMES.items():
        if only:  # a rerun of one part: the wrapper only decodes the peers' head outputs
            qmodel = eq.PTQModule(model, (example,), "int16")
            break
        result = ours(model, scheme, calibration, example, test, work / f"{family}_{label.split()[0]}.onnx")
        row[label] = result["mAP"]
        row[f"{label} eval"] = result["eval mAP"]
        row[f"{label} parity"] = result["parity max diff"]
        row[f"{label} seconds"] = result["seconds"]
        row[f"{label} meta arch"] = result["meta arch"]
        if label == "int8_pow2":
            qmodel = result["qmodel"]
    core_inputs = [qmodel.core_inputs(x) for x, _ in calibration]
    core = DetectionCore(model, qmodel.family)
    builders = (
        lambda: torchao_peer(core, core_inputs[0][:8], core_inputs),
        lambda: ort_peer(core, core_inputs[0][:8], core_inputs, work),
    )
    for label, build in zip(PEERS, builders, strict=True):
        if only == "qat":
            break
        try:
            row[label] = heads_map(qmodel, build(), test)["map"]
        except Exception as error:  # a peer failing is a result, not a crash
            row[label] = float("nan")
            row[f"{label} error"] = str(error).splitlines()[0][:200]
    if only == "peers":
        return row
    start = time.perf_counter()
    timed = copy.deepcopy(model)  # its steps move weights and BN statistics: not the model QAT starts from
    qat = eq.QATModule(timed, (example,), "int8_pow2", calibration_data=calibration)
    row["qat step ratio"] = qat_step_ratio(timed, qat, images[:16], targets[:16], repeats)
    # The documented QAT recipe: BN then ranges freeze over the epochs (docs/qat.md), a small learning rate.
    config = eq.QATConfig(eq.FreezeSchedule(qat_epochs))
    qat = eq.QATModule(model, (example,), "int8_pow2", config=config, calibration_data=calibration)
    train_detector(qat, canvas_loader("train"), qat_epochs, lr=QAT_LR, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", eq.TidlFallbackWarning)
        qat.export(work / f"{family}_qat.onnx")
    row[f"QAT {qat_epochs} epochs"] = heads_map(qat, onnx_run(work / f"{family}_qat.onnx"), test)["map"]
    row["QAT seconds"] = time.perf_counter() - start
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(DETECTORS), choices=DETECTORS)
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the QAT / float step timing")
    parser.add_argument("--only", choices=("peers", "qat"), help="rerun one part and merge it into the saved results")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            rows.append(run_family(family, args.qat_epochs, args.repeats, Path(tmp), args.only))
            print(f"{family}: done", flush=True)
    command = "python " + " ".join(["benchmarks/detection.py", *sys.argv[1:]])
    if args.only:
        saved = json.loads((RESULTS / "detection.json").read_text())
        fresh = {r["detector"]: r for r in rows}
        for row in saved["rows"]:
            if row["detector"] in fresh:
                for label in PEERS if args.only == "peers" else ():
                    row.pop(f"{label} error", None)
                row.update({k: v for k, v in fresh[row["detector"]].items() if k != "float mAP"})
        rows, command = saved["rows"], f"{saved['command']}; then {command}"
    labels = ["float mAP", *SCHEMES, f"QAT {args.qat_epochs} epochs", *PEERS]
    print(
        table(
            ["detector", *labels, "QAT/float step"],
            [[r["detector"], *(r[k] for k in labels), r["qat step ratio"]] for r in rows],
        )
    )
    for r in rows:
        print(f"{r['detector']}: {r['int8_pow2 meta arch']}")
    print(f"results: {save('detection', command, rows)}")


if __name__ == "__main__":
    main()
