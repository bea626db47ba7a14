"""Model coverage: every torchvision classifier and segmentation model through the PTQ chain.

    nice -n 19 python benchmarks/zoo.py [--models resnet18 vit_b_32 ...] [--scheme int8_pow2]
                                        [--timeout 600] [--memory-gb 10] [--update]

Each model is built with random weights (weights=None, weights_backbone=None), fed the
smallest square input it accepts (32x32 where it works; a vision transformer's own
image size), and taken through: plain torch.export (the baseline: a model that fails
here is torch.export's limit, not ours), PTQ wrap, calibration on digits images,
convert, and the QDQ ONNX export with its onnxruntime parity check. Each model runs
in its own process under a time and memory limit, so a hang or a crash costs one row;
results are saved after every model, `--update` merges a rerun of some models into
the saved results, and `--render` rewrites the docs page from them.

Writes benchmarks/results/zoo.json and docs/coverage.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torchvision
from _common import RESULTS, save, table
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
COVERAGE = ROOT / "docs" / "coverage.md"
SIZES = (32, 64, 96, 128, 160, 224, 299)
EDGEQUANT = str(ROOT / "src" / "edgequant")
# Calibration: two batches of 8 images; parity: 16 other images (4 for inputs over 64x64, to bound memory).
CALIBRATION_BATCHES, BATCH, EXAMPLES, LARGE_INPUT_EXAMPLES = 2, 8, 16, 4


def all_models() -> list[str]:
    classification = torchvision.models.list_models(module=torchvision.models)
    segmentation = torchvision.models.list_models(module=torchvision.models.segmentation)
    return classification + segmentation


def is_segmentation(name: str) -> bool:
    return name in torchvision.models.list_models(module=torchvision.models.segmentation)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    builder = torchvision.models.get_model_builder(name)
    if is_segmentation(name):
        return builder(weights=None, weights_backbone=None, num_classes=10)
    return builder(weights=None, num_classes=10)


def input_size(model: nn.Module) -> int:
    """The smallest square input the model accepts (in eval mode, as capture runs all but BN and dropout)."""
    fixed = getattr(model, "image_size", None)  # vision transformers: position embeddings fix the size
    candidates = (fixed,) if isinstance(fixed, int) else SIZES
    model.eval()
    for size in candidates:
        try:
            with torch.no_grad():
                model(torch.randn(2, 3, size, size))
            return size
        except Exception:  # too small for this architecture: try the next size
            continue
    raise ValueError(f"no input size in {candidates} works")


def warm_bn(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """BN statistics from the calibration images, as a trained model would have.

    Only BN runs in train mode, as in capture: auxiliary heads and stochastic depth stay in eval form.
    """
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.train()
        bn.momentum = None
    with torch.no_grad():
        for x in batches:
            model(x)
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


def run_one(name: str, scheme: str, status: Path) -> None:
    """Run the chain for one model, writing the row (stage reached, error) to `status` after each stage."""
    import edgequant as eq
    from edgequant.data import digits_tensors
    from edgequant.parity import PARITY_SQNR_DB
    from edgequant.quantizer import UnquantizedOpsWarning

    row: dict = {"model": name, "scheme": scheme, "stage": "build", "ok": False, "stage_seconds": {}}
    start = time.perf_counter()
    since = start

    def mark(stage: str) -> None:
        nonlocal since
        now = time.perf_counter()
        row["stage_seconds"][row["stage"]] = round(now - since, 1)
        since = now
        row["stage"] = stage
        row["seconds"] = round(now - start, 1)
        row["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)
        status.write_text(json.dumps(row))

    mark("build")
    try:
        model = build(name)
        row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        size = input_size(model)
        row["input"] = size
        images = digits_tensors("train", size=size)[0]
        batches = [images[i * BATCH : (i + 1) * BATCH] for i in range(CALIBRATION_BATCHES)]
        warm_bn(model, batches)
        example = (images[-(EXAMPLES if size <= 64 else LARGE_INPUT_EXAMPLES) :],)
        mark("torch.export")
        torch.export.export(model.eval(), example)
        mark("wrap")
        with tempfile.TemporaryDirectory() as tmp:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UnquantizedOpsWarning)
                qmodel = eq.PTQModule(model, example, scheme)
            float_ops = [w.message.ops for w in caught if isinstance(w.message, UnquantizedOpsWarning)]
            row["float_ops"] = {op.removeprefix("aten."): len(where) for op, where in (float_ops or [{}])[0].items()}
            mark("calibrate")
            qmodel.calibrate(batches, progress=False)
            mark("export")  # convert + ONNX export + parity; a failure inside convert.py is reported as "convert"
            result = qmodel.export(Path(tmp) / f"{name}.onnx")
        row["parity"] = str(result.parity)
        row["sqnr_db"] = result.parity.sqnr_db if math.isfinite(result.parity.sqnr_db) else "exact"
        # A pass means agreement, not only an export that did not raise: rounding drift that
        # compounds below PARITY_SQNR_DB is what the engine would run, so the model fails here.
        row["ok"] = result.parity.sqnr_db >= PARITY_SQNR_DB
        if not row["ok"]:
            row["stage"] = "agreement"
            row["error"] = f"onnxruntime vs torch at {result.parity.sqnr_db:.1f} dB SQNR (pass: {PARITY_SQNR_DB:g} dB)"
    except Exception as error:
        frames = [f.filename for f in traceback.extract_tb(error.__traceback__)]
        if row["stage"] == "export" and any(f.startswith(EDGEQUANT) and f.endswith("convert.py") for f in frames):
            row["stage"] = "convert"
        lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
        row["error"] = f"{type(error).__name__}: {lines[0] if lines else ''}"[:400]
        row["detail"] = str(error)[:2000]
        row["trace"] = traceback.format_exc()[-3000:]
    mark(row["stage"])


def run_isolated(name: str, scheme: str, timeout: float, memory_gb: float) -> dict:
    """One model in a child process, so that a hang, a crash or memory use costs only this row."""
    with tempfile.TemporaryDirectory() as tmp:
        status = Path(tmp) / "row.json"
        command = [sys.executable, __file__, "--one", name, "--scheme", scheme, "--status", str(status)]
        command += ["--memory-gb", str(memory_gb)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, timeout=timeout, capture_output=True, text=True)
            failure = None if proc.returncode == 0 else f"process exited with code {proc.returncode}"
            tail = proc.stderr[-2000:]
        except subprocess.TimeoutExpired:
            failure, tail = f"timeout after {timeout:.0f} s", ""
        row = json.loads(status.read_text()) if status.exists() else {"model": name, "scheme": scheme, "stage": "build"}
        row["seconds"] = round(time.perf_counter() - start, 1)
        if failure and row.get("ok") is not True:
            row["ok"] = False
            row["error"] = row.get("error") or failure
            row["trace"] = row.get("trace") or tail
        return row


def reason_note(row: dict) -> str:
    """An issue-style note on what would fix a failure, judged from its stage and message."""
    error = row.get("error", "")
    if row["stage"] == "torch.export":
        return (
            "torch.export cannot capture this model as written, so no graph-based quantizer can; "
            "the fix belongs in the model code (see the reason) or in torch.export."
        )
    if error.startswith("CaptureError"):
        return (
            "torch.export captures the model at a fixed batch size only, and the wrappers need a dynamic batch; "
            "the fix belongs in the model code (see the reason: usually a reshape with a literal batch size)."
        )
    if error.startswith("timeout"):
        return (
            "ran past the time limit on a shared 2-core machine; rerun alone with "
            f"`--models {row['model']}` and a larger `--timeout`."
        )
    if "can't allocate memory" in error or error.startswith("MemoryError"):
        return (
            f"ran out of the `--memory-gb` address-space limit (peak resident {row.get('peak_rss_gb', '?')} GB when it "
            "failed). The chain holds about four float copies of the weights at its peak (the caller's model, "
            "PTQ's float graph, its prepared graph, and onnxruntime's session during the parity check); rerun "
            "with a larger `--memory-gb` on a machine with the memory, or let `PTQModule` drop its float graph "
            "when neither BN re-estimation nor re-calibration needs it."
        )
    if error.startswith("ParityError"):
        return (
            "onnxruntime disagrees with the converted torch model beyond rounding level (see the reason for the "
            "first diverging tensor): an edgequant export bug to reproduce with `--models` and fix in export.py."
        )
    stage = row["stage"]
    return f"edgequant bug: the model exports with torch.export but the chain fails at `{stage}`; see the reason."


def _largest(rows: list[dict]) -> str:
    big = max((r for r in rows if r["ok"]), key=lambda r: r.get("params_m", 0))
    return (
        f"- largest model that passed: {big['model']} ({big.get('params_m')} M parameters, "
        f"peak {big.get('peak_rss_gb', '?')} GB resident)"
    )


def _hungriest(rows: list[dict]) -> str:
    top = max((r for r in rows if r["ok"]), key=lambda r: r.get("peak_rss_gb", 0))
    return (
        f"- most memory: {top['model']} (peak {top.get('peak_rss_gb', '?')} GB resident); the largest models need "
        "a `--memory-gb` (an address-space limit, default 10) well above their resident peak"
    )


def write_coverage(rows: list[dict], command: str, date: str) -> None:
    passed = sum(r["ok"] for r in rows)
    missing = sorted(set(all_models()) - {r["model"] for r in rows})
    exportable = [r for r in rows if r["stage"] != "torch.export" or r["ok"]]
    lines = [
        "# Model coverage",
        "",
        "Every torchvision classifier and segmentation model, random weights, through PTQ",
        "(wrap, calibrate on digits images, convert) and the QDQ ONNX export with its",
        "onnxruntime parity check. Generated by `benchmarks/zoo.py`; do not edit by hand.",
        "",
        "How the chain treats what it meets in these models:",
        "",
        "- ops without a quantization rule (layer norm, softmax, attention, ...) stay in float",
        "  between Q/DQ pairs, with an `UnquantizedOpsWarning` naming them; they are listed per",
        "  model below, and the target engine has to run them in float;",
        "- `if self.training:` branches other than BN and dropout (stochastic depth, auxiliary",
        "  heads) are captured in their eval form, so eval and export are deterministic;",
        "- dict or nested outputs (segmentation models) become ONNX outputs in order;",
        "- a BN with no conv before it (pre-activation blocks) is requantized at its output.",
        "",
        f"- date: {date}",
        f"- command: `{command}`",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}",
        f"- passed: {passed} of {len(rows)} models; {passed} of {len(exportable)} that torch.export captures",
        *([f"- not run: {', '.join(missing)}"] if missing else []),
        *([_largest(rows), _hungriest(rows)] if any(r["ok"] for r in rows) else []),
        "",
        table(
            ["model", "input", "params (M)", "result", "stage", "seconds", "peak GB", "ops left in float"],
            [
                [
                    r["model"],
                    r.get("input", "-"),
                    r.get("params_m", "-"),
                    "pass" if r["ok"] else "FAIL",
                    r["stage"] if not r["ok"] else "-",
                    r.get("seconds", "-"),
                    r.get("peak_rss_gb", "-"),
                    ", ".join(r.get("float_ops", {})),
                ]
                for r in rows
            ],
        ),
        "",
    ]
    failures = [r for r in rows if not r["ok"]]
    if failures:
        lines += ["## Failures", ""]
        for r in failures:
            lines += [
                f"### {r['model']}",
                "",
                f"- stage: {r['stage']}",
                f"- reason: `` {r.get('error', '')} ``",
                f"- what would fix it: {reason_note(r)}",
                "",
            ]
    COVERAGE.write_text("\n".join(lines))


def parameter_count(name: str) -> int:
    """Parameters of a model, counted on the meta device where its constructor allows (no memory, no init)."""
    try:
        with torch.device("meta"):
            model = build(name)
    except NotImplementedError:  # an initialiser that reads values (RegNet): build it for real
        model = build(name)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="a subset (default: all)")
    parser.add_argument("--scheme", default="int8_pow2")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per model")
    parser.add_argument("--memory-gb", type=float, default=10.0, help="address-space limit per model")
    parser.add_argument("--update", action="store_true", help="merge these rows into the existing results")
    parser.add_argument("--render", action="store_true", help="only rewrite docs/coverage.md from the saved results")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--status", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        limit = int(args.memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        run_one(args.one, args.scheme, args.status)
        return
    if args.render:
        saved = json.loads((RESULTS / "zoo.json").read_text())
        write_coverage(saved["rows"], saved["command"], saved["date"])
        return
    names = args.models or all_models()
    unknown = sorted(set(names) - set(all_models()))
    if unknown:
        parser.error(f"unknown models: {', '.join(unknown)}")
    command = " ".join(["python", *[a if a != __file__ else "benchmarks/zoo.py" for a in sys.argv]])
    previous: dict = {}
    if args.update and (RESULTS / "zoo.json").exists():
        earlier = json.loads((RESULTS / "zoo.json").read_text())
        previous = {r["model"]: r for r in earlier["rows"]}
        command = f"{earlier['command']}; then {command}"
    rows: dict[str, dict] = {}
    # Small models first: failures show up early, and a long run that is cut short has covered the most models.
    for name in sorted(names, key=parameter_count):
        rows[name] = run_isolated(name, args.scheme, args.timeout, args.memory_gb)
        row = rows[name]
        verdict = "pass" if row["ok"] else f"FAIL at {row['stage']}: {row.get('error', '')}"
        print(f"{name}: {verdict} ({row['seconds']} s)", flush=True)
        merged = previous | rows
        ordered = [merged[n] for n in all_models() if n in merged]
        path = save("zoo", command, ordered)  # after every model: an interrupted run keeps what it measured
        write_coverage(ordered, command, json.loads(path.read_text())["date"])
    print(
        table(
            ["model", "result", "stage", "error"],
            [[r["model"], "pass" if r["ok"] else "FAIL", r["stage"], r.get("error", "")[:80]] for r in rows.values()],
        )
    )
    print(f"results: {RESULTS / 'zoo.json'}, {COVERAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
