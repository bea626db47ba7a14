"""Model coverage: every torchvision classifier and segmentation model, and a list of edge
timm classifiers, through the PTQ chain.

    nice -n 19 python benchmarks/zoo.py [--library torchvision|timm] [--models resnet18 vit_b_32 ...]
                                        [--scheme int8_pow2] [--size 64] [--timeout 600] [--memory-gb 10]
                                        [--update] [--render]

Each model is built with random weights (torchvision: weights=None, weights_backbone=None;
timm: pretrained=False, so nothing is downloaded), num_classes=10, fed the smallest square
input it accepts (32x32 where it works; a vision transformer's own image size) or the
`--size` given, and taken through: plain torch.export (the baseline: a model that fails
here is torch.export's limit, not ours; edgequant's own capture then runs too, so the row
carries edgequant's short message naming the construct), PTQ wrap, calibration on digits
images, convert, and the QDQ ONNX export with its onnxruntime parity check. A row passes
when onnxruntime and torch agree: their logit SQNR is at least PARITY_SQNR_DB (30 dB). A row
under the bar is "drift", not a pass, when the file agrees with torch op by op and torch
alone, with as many rounding ties flipped at the same tensors, lands as far (DRIFT_MARGIN_DB).
Rows saved before that rule (no `sqnr_db`) passed when the export did not raise; the page
marks them "old rule" until they are rerun.

Each model runs in its own process under a time and memory limit, so a hang or a crash
costs one row; results are saved after every model, `--update` merges a rerun of some
models into the saved results (a row is one model, scheme and `--size`), and `--render`
rewrites the docs page from them.

timm is for breadth only, never a dependency of edgequant: `pip install -e '.[zoo]'`
(or `make bench-zoo`) installs it.

Writes benchmarks/results/zoo.json (torchvision), benchmarks/results/zoo_timm.json (timm)
and docs/coverage.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
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
from _common import RESULTS, save, table, warm_bn
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
COVERAGE = ROOT / "docs" / "coverage.md"
SIZES = (32, 64, 96, 128, 160, 224, 256, 299)
EDGEQUANT = str(ROOT / "src" / "edgequant")
# Calibration: two batches of 8 images; parity: 16 other images (4 for inputs over 64x64, to bound memory).
CALIBRATION_BATCHES, BATCH, EXAMPLES, LARGE_INPUT_EXAMPLES = 2, 8, 16, 4
DEFAULT_SCHEME = "int8_pow2"
TIDL_DEVICES = ("TDA4VM", "AM68A")  # the column of docs/coverage.md: power-of-2 and per-channel generations
LIBRARIES = ("torchvision", "timm")
RESULT_FILES = {"torchvision": "zoo", "timm": "zoo_timm"}
# Edge-relevant timm classifiers (mobile CNNs, NAS nets, re-parameterisable and small hybrid
# models); those missing from the installed timm are skipped and listed on the page.
TIMM_MODELS = (
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "efficientnet_lite3",
    "efficientnet_lite4",
    "tf_efficientnet_lite0",
    "mobilenetv2_100",
    "mobilenetv3_large_100",
    "mobilenetv3_small_100",
    "mobilenetv4_conv_small",
    "mobilenetv4_conv_medium",
    "mnasnet_100",
    "fbnetc_100",
    "ghostnet_100",
    "lcnet_100",
    "mixnet_s",
    "rexnet_100",
    "regnetx_002",
    "regnety_002",
    "resnet18d",
    "repvgg_a0",
    "mobileone_s0",
    "hardcorenas_a",
    "tinynet_a",
    "efficientvit_m0",
    "fastvit_t8",
    "mobilevit_xxs",
    "edgenext_xx_small",
)
# A row under the SQNR bar is drift, not a fault, when the file agrees with torch op by op and torch alone,
# with as many ties rounded the other way at the same tensors, lands at most this much above onnxruntime.
DRIFT_MARGIN_DB = 3.0
# How the rows saved before the SQNR rule (no "rule" field) passed.
OLD_RULE_NOTE = "export and parity check did not raise; no SQNR measured"


def all_models(library: str = "torchvision") -> list[str]:
    if library == "timm":
        import timm

        available = set(timm.list_models())
        return [name for name in TIMM_MODELS if name in available]
    classification = torchvision.models.list_models(module=torchvision.models)
    segmentation = torchvision.models.list_models(module=torchvision.models.segmentation)
    return classification + segmentation


def is_segmentation(name: str) -> bool:
    return name in torchvision.models.list_models(module=torchvision.models.segmentation)


def build(name: str, library: str = "torchvision") -> nn.Module:
    torch.manual_seed(0)
    if library == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10)
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


def construct(message: str) -> str:
    """From edgequant's capture message, the construct that stopped torch.export (module and code)."""
    first = message.splitlines()[0] if message else ""
    found = re.search(r" in (module `.*?` \(.*?\)|the model) at (.*?):(\d+): `(.*)`", first)
    if found:
        owner, path, line, code = found.groups()
        return f"`{code}` in {owner}, {'/'.join(Path(path).parts[-2:])}:{line}"
    reason = next((ln for ln in message.splitlines() if ln.startswith("Reason:")), first)
    return reason.removeprefix("Reason: ")[:200]


def adapted_chain(model: nn.Module, example: tuple, scheme: str, batches: list, path: Path) -> dict:
    """eq.adapt for TDA4VM, then the same chain on the adapted model: changes, agreement, ARM fallbacks."""
    import edgequant as eq
    from edgequant.export.parity import PARITY_SQNR_DB

    entry: dict = {"ok": False}
    try:
        adapted, report = eq.adapt(model, "TDA4VM", example)
        entry["changes"] = len(report.changes)
        entry["kinds"] = sorted({c.replacement for c in report.changes})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel = eq.PTQModule(adapted, example, scheme).calibrate(batches, progress=False)
            result = qmodel.export(path)
        entry["sqnr_db"] = round(result.parity.sqnr_db, 2) if math.isfinite(result.parity.sqnr_db) else "exact"
        entry["ok"] = result.parity.sqnr_db >= PARITY_SQNR_DB
        entry["tidl"] = {
            device: len(
                set(
                    (
                        result.tidl_check if device == result.device.name else eq.tidl_check(result.tidl_path, device)
                    ).fallback
                )
            )
            for device in TIDL_DEVICES
        }
    except Exception as error:
        lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
        entry["error"] = f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]
    return entry


def adapt_text(row: dict) -> str:
    """The adapted model's cell: pass / FAIL, how many changes, TIDL fallbacks per device; "-" when not run."""
    entry = row.get("adapt")
    if not entry:
        return "-"
    if not entry["ok"]:
        return "FAIL: " + entry.get("error", f"{entry.get('sqnr_db')} dB").replace("|", "\\|")[:100]
    fallback = " / ".join(str(entry["tidl"][d]) for d in TIDL_DEVICES)
    return f"pass ({entry['changes']} changes; {fallback})"


def run_one(name: str, library: str, scheme: str, size: int | None, status: Path, adapt: bool = True) -> None:
    """Run the chain for one model, writing the row (stage reached, error) to `status` after each stage."""
    import edgequant as eq
    from edgequant.core.errors import UnquantizedOpsWarning
    from edgequant.demo.data import digits_tensors
    from edgequant.export.parity import PARITY_SQNR_DB
    from edgequant.graph.capture import CaptureError

    row: dict = {"model": name, "library": library, "scheme": scheme, "stage": "build", "ok": False}
    if size:
        row["size_arg"] = size
    row["stage_seconds"] = {}
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
        model = build(name, library)
        row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        size = size or input_size(model)
        row["input"] = size
        images = digits_tensors("train", size=size)[0]
        batches = [images[i * BATCH : (i + 1) * BATCH] for i in range(CALIBRATION_BATCHES)]
        warm_bn(model, batches)
        example = (images[-(EXAMPLES if size <= 64 else LARGE_INPUT_EXAMPLES) :],)
        mark("torch.export")
        try:
            torch.export.export(model.eval(), example)
        except Exception as error:  # torch.export's limit; edgequant's capture below says where, in short
            lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
            row["torch_error"] = f"{type(error).__name__}: {lines[0] if lines else ''}"[:400]
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
            # TIDL's import rules on the static TIDL model, for the two device generations.
            for device in TIDL_DEVICES:
                report = result.tidl_check if device == result.device.name else eq.tidl_check(result.tidl_path, device)
                fallback = set(report.fallback)
                row.setdefault("tidl", {})[device] = {
                    "nodes": report.nodes,
                    "fallback": len(fallback),
                    "ops": sorted({f.op_type for f in report.findings if f.node in fallback}),
                }
            if adapt:
                mark("adapt")
                row["adapt"] = adapted_chain(model, example, scheme, batches, Path(tmp) / f"{name}_adapted.onnx")
        row["parity"] = str(result.parity)
        row["sqnr_db"] = round(result.parity.sqnr_db, 2) if math.isfinite(result.parity.sqnr_db) else "exact"
        if result.parity.rounding is not None:
            row["divergence"] = str(result.parity.rounding)
        if result.parity.flip_sqnr_db is not None:
            row["flip_sqnr_db"] = round(result.parity.flip_sqnr_db, 2)
        if result.parity.local:  # op by op, from the same inputs: each tensor's own rounding differences
            row["op_by_op"] = {
                "tensors": len(result.parity.local),
                "values": sum(d.count for d in result.parity.local),
                "worst_fraction": max(d.count / d.size for d in result.parity.local),
            }
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
        if row["stage"] == "wrap" and "torch_error" in row and isinstance(error, CaptureError):
            row["stage"] = "torch.export"  # plain torch.export fails too: the row carries edgequant's message
            row["construct"] = construct(str(error))
        lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
        row["error"] = f"{type(error).__name__}: {lines[0] if lines else ''}"[:400]
        row["detail"] = str(error)[:2000]
        row["trace"] = traceback.format_exc()[-3000:]
    mark(row["stage"])


def row_key(row: dict) -> tuple[str, str, int | None]:
    """A row is one model, scheme and forced input size (None: the smallest size the model accepts)."""
    return row["model"], row.get("scheme", DEFAULT_SCHEME), row.get("size_arg")


def run_isolated(
    name: str, library: str, scheme: str, size: int | None, timeout: float, memory_gb: float, no_adapt: bool = False
) -> dict:
    """One model in a child process, so that a hang, a crash or memory use costs only this row."""
    with tempfile.TemporaryDirectory() as tmp:
        status = Path(tmp) / "row.json"
        command = [sys.executable, __file__, "--one", name, "--library", library, "--scheme", scheme]
        command += ["--status", str(status), "--memory-gb", str(memory_gb)]
        command += ["--size", str(size)] if size else []
        command += ["--no-adapt"] if no_adapt else []
        env = os.environ | {"HF_HUB_OFFLINE": "1"}  # random weights: nothing may be downloaded
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, timeout=timeout, capture_output=True, text=True, env=env)
            failure = None if proc.returncode == 0 else f"process exited with code {proc.returncode}"
            tail = proc.stderr[-2000:]
        except subprocess.TimeoutExpired:
            failure, tail = f"timeout after {timeout:.0f} s", ""
        if status.exists():
            row = json.loads(status.read_text())
        else:
            row = {"model": name, "library": library, "scheme": scheme, "stage": "build"}
            row |= {"size_arg": size} if size else {}
        row["seconds"] = round(time.perf_counter() - start, 1)
        row["measured"] = time.strftime("%Y-%m-%d", time.gmtime())
        row["rule"] = "sqnr"  # a pass means agreement (see run_one); rows without it passed on "did not raise"
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
            "the fix belongs in the model code (see the construct) or in torch.export."
        )
    if row["stage"] == "agreement" and is_drift(row):
        local = row["op_by_op"]
        return (
            f"nothing in the file: op by op (each quantized tensor computed by onnxruntime from torch's values of "
            f"its inputs) {local['values']} values in {local['tensors']} tensors differ, each by one step, at most "
            f"{100 * local['worst_fraction']:.3f}% of a tensor: ties that float32 arithmetic done in another order "
            "(conv sums, and any op left in float) rounds the other way. "
            "The random-weight model amplifies those few ties: torch alone, with as many of its "
            f"values nearest a tie rounded the other way at the same tensors, lands at {row['flip_sqnr_db']:.1f} dB "
            "from itself. No float32 runtime can agree with torch at the bar on this model; trained models "
            "amplify far less (benchmarks/parity.py: 45-48 dB at int8 on digits-trained resnet18 and mobilenet_v2)."
        )
    if row["stage"] == "agreement":
        return (
            "the first diverging tensor is off by rounding only, but torch alone, with as many ties rounded the "
            "other way, stays closer to itself than onnxruntime does (or was not measured): an export difference "
            "that is more than drift, to reproduce with `--models` and compare op by op (`parity.local_divergences`)."
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
    if "can't allocate memory" in error or "bad_alloc" in error or error.startswith("MemoryError"):
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


def is_drift(row: dict) -> bool:
    """Under the SQNR bar by the model's amplification of rounding ties alone (see DRIFT_MARGIN_DB)."""
    flip = row.get("flip_sqnr_db")
    return (
        row["stage"] == "agreement"
        and "op_by_op" in row
        and flip is not None
        and flip <= row["sqnr_db"] + DRIFT_MARGIN_DB
    )


def result_text(row: dict) -> str:
    if not row["ok"]:
        return "drift" if is_drift(row) else "FAIL"
    return "pass" if row.get("rule") == "sqnr" else "pass (old rule)"


def tidl_text(row: dict) -> str:
    """ARM-core fallback nodes per device: "2 (ReduceMean, Einsum) / 2 (...)", or "-" when not measured."""
    found = row.get("tidl")
    if not found:
        return "-"
    cells = []
    for device in TIDL_DEVICES:
        entry = found[device]
        ops = ", ".join(entry["ops"])
        cells.append(f"{entry['fallback']}" + (f" ({ops})" if ops else ""))
    return " / ".join(cells)


def sqnr_text(row: dict) -> str:
    """onnxruntime vs torch; under drift, also torch vs torch with the same flips (its own amplification)."""
    value = row.get("sqnr_db")
    if value is None:
        return "-"
    text = value if isinstance(value, str) else f"{value:.1f}"
    flip = row.get("flip_sqnr_db")
    return text if flip is None else f"{text} (flips in torch alone: {flip:.1f})"


def why_text(row: dict) -> str:
    """A failure's reason in a table cell: the construct that stopped torch.export, or the error."""
    if row["ok"]:
        return ""
    text = row.get("construct") or row.get("error", "")
    return text.replace("|", "\\|")[:140]


def _named(rows: list[dict]) -> str:
    return ", ".join(f"{r['model']} ({r.get('scheme')}, {r.get('input', '?')}x{r.get('input', '?')})" for r in rows)


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


def _rows_table(rows: list[dict]) -> str:
    return table(
        [
            "model",
            "scheme",
            "input",
            "params (M)",
            "result",
            "SQNR dB",
            "stage",
            "why",
            "measured",
            "seconds",
            "peak GB",
            "ops left in float",
            "TIDL ARM fallback (TDA4VM / AM68A)",
            "adapted for TDA4VM (changes; fallback TDA4VM / AM68A)",
        ],
        [
            [
                r["model"],
                r.get("scheme", DEFAULT_SCHEME),
                r.get("input", "-"),
                r.get("params_m", "-"),
                result_text(r),
                sqnr_text(r),
                r["stage"] if not r["ok"] else "-",
                why_text(r),
                r.get("measured", "before SQNR rule"),
                r.get("seconds", "-"),
                r.get("peak_rss_gb", "-"),
                ", ".join(r.get("float_ops", {})),
                tidl_text(r),
                adapt_text(r),
            ]
            for r in rows
        ],
    )


def section(library: str, saved: dict) -> list[str]:
    """The page's section for one library: its counts, the table and the failures."""
    from edgequant.export.parity import PARITY_SQNR_DB

    rows = saved["rows"]
    main = [r for r in rows if r.get("scheme", DEFAULT_SCHEME) == DEFAULT_SCHEME and "size_arg" not in r]
    others = [r for r in rows if r not in main]
    measured = [r for r in main if r.get("rule") == "sqnr"]
    old = [r for r in main if r not in measured]
    passed = [r for r in measured if r["ok"]]
    drift = [r for r in measured if is_drift(r)]
    exportable = [r for r in measured if r["stage"] != "torch.export"]
    try:
        missing = sorted(set(all_models(library)) - {r["model"] for r in main})
    except ImportError:  # timm not installed: the page is rendered from the saved rows alone
        missing = []
    dates = sorted({r["measured"] for r in measured if "measured" in r})
    lines = [
        f"## {library}",
        "",
        f"- command: `{saved['command']}`",
        f"- torch {saved.get('torch', torch.__version__)}; saved {saved['date']}",
        f"- default: scheme `{DEFAULT_SCHEME}`, the smallest square input each model accepts",
        f"- under the SQNR rule (pass: onnxruntime vs torch SQNR ≥ {PARITY_SQNR_DB:g} dB), "
        f"measured {', '.join(dates) or '-'}: {len(passed)} of {len(measured)} models pass; "
        f"{len(passed)} of {len(exportable)} that torch.export captures"
        + (
            f"; of the others, {len(drift)} agree op by op and drift end to end (no pass): "
            + ", ".join(r["model"] for r in drift)
            if drift
            else ""
        ),
    ]
    if old:
        when = ", ".join(sorted({r.get("measured", "before the SQNR rule") for r in old}))
        lines += [
            f"- NOT rerun under the SQNR rule, still carrying the old pass ({OLD_RULE_NOTE}; measured {when}), "
            f"marked `pass (old rule)`: {len(old)} models: " + ", ".join(r["model"] for r in old)
        ]
    if others:
        drifted = [r for r in others if is_drift(r)]
        failed = [r for r in others if not r["ok"] and r not in drifted]
        lines += [
            f"- other schemes and input sizes (second table): {sum(r['ok'] for r in others)} of {len(others)} rows pass"
            + (f"; drift: {_named(drifted)}" if drifted else "")
            + (f"; FAIL: {_named(failed)}" if failed else "")
        ]
    if missing:
        lines += [f"- not run: {', '.join(missing)}"]
    if passed:
        lines += [_largest(passed), _hungriest(passed)]
    lines += ["", _rows_table(main), ""]
    if others:
        lines += ["### Other schemes and input sizes", "", _rows_table(others), ""]
    failures = [r for r in rows if not r["ok"]]
    if failures:
        lines += ["### Failures and drift", ""]
        for r in failures:
            lines += [
                f"#### {r['model']} ({r.get('scheme', DEFAULT_SCHEME)}, {r.get('input', '?')}x{r.get('input', '?')})",
                "",
                f"- stage: {r['stage']}",
                f"- reason: `` {r.get('error', '')} ``",
            ]
            if r.get("construct"):
                lines += [f"- stopped by: {r['construct']}"]
            if r["stage"] == "torch.export" and r.get("detail"):
                lines += [
                    "- edgequant says:",
                    "",
                    "  ```text",
                    *(f"  {ln}" for ln in r["detail"].splitlines()),
                    "  ```",
                ]
            if r.get("divergence"):
                lines += [f"- parity report: {r['divergence']}"]
            lines += [f"- what would fix it: {reason_note(r)}", ""]
    return lines


def write_coverage() -> None:
    from edgequant.export.parity import PARITY_SQNR_DB

    lines = [
        "# Model coverage",
        "",
        "Every torchvision classifier and segmentation model, and a list of edge-relevant timm",
        "classifiers, with random weights and 10 classes, through PTQ (wrap, calibrate on digits",
        "images, convert) and the QDQ ONNX export with its onnxruntime parity check. Generated by",
        "`benchmarks/zoo.py` (`--render` rewrites it from the saved results); do not edit by hand.",
        "",
        "A row passes when onnxruntime and torch agree: the SQNR of onnxruntime's outputs against torch's",
        f"is at least {PARITY_SQNR_DB:g} dB (`edgequant.export.parity.PARITY_SQNR_DB`). Rows marked `pass (old rule)`",
        "were measured before that rule, when a pass meant only that the export and its parity check did",
        "not raise; they have no SQNR and keep that mark until they are rerun (`--update --models ...`).",
        "SQNR `exact`: onnxruntime's outputs equal torch's bit for bit (as they must with 8-bit power-of-2",
        "scales and no op left in float); a number: the two runtimes round some ties differently, and the",
        "number says how far that leaves their outputs apart. Under the bar, the export check has compared",
        "the file op by op: each quantized tensor computed by onnxruntime from torch's own values of its",
        "inputs, which may differ from torch's by one step on under 1% of its values and no more, or the",
        "export raises. The figure in brackets is torch against itself with as many values, at the same",
        "tensors, rounded the other way (those nearest a tie; `ParityReport.flip_sqnr_db`): how far the model",
        "amplifies that much rounding by itself. A row under the bar is `drift` when that figure is at most",
        f"{DRIFT_MARGIN_DB:g} dB above onnxruntime's (the file agrees op by op and the distance is the model's);",
        "`drift` is not counted as a pass.",
        "A model that plain torch.export cannot capture fails at `torch.export`; its row names the",
        "construct that stopped it, from edgequant's capture message.",
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
        "The TIDL column runs TIDL's import rules (`eq.tidl_check`, rules from TI's",
        "docs/supported_ops_rts_versions.md) on each exported static TIDL model: how many nodes",
        "TIDL would run on the ARM core instead of the accelerator, on TDA4VM / AM68A, with their op",
        "types; `-` where the row predates the checker or did not export.",
        "",
        "The last column takes the same model through model surgery first (`eq.adapt(model,",
        "'TDA4VM', example_inputs)`, [surgery](surgery.md)) and then the same chain: pass when the",
        "adapted model wraps, calibrates, exports and agrees with onnxruntime (same SQNR rule), with",
        "the number of changes and the ARM fallbacks left on TDA4VM / AM68A; `-` where not run yet.",
        "",
        f"torch {torch.__version__}, torchvision {torchvision.__version__}"
        + (f", timm {_timm_version()}" if _timm_version() else "")
        + ".",
        "",
    ]
    for library in LIBRARIES:
        path = RESULTS / f"{RESULT_FILES[library]}.json"
        if path.exists():
            lines += section(library, json.loads(path.read_text()))
    COVERAGE.write_text("\n".join(lines))


def _timm_version() -> str | None:
    try:
        import timm
    except ImportError:
        return None
    return timm.__version__


def parameter_count(name: str, library: str) -> int:
    """Parameters of a model, counted on the meta device where its constructor allows (no memory, no init)."""
    try:
        with torch.device("meta"):
            model = build(name, library)
    except Exception:  # an initialiser that reads values (RegNet): build it for real
        model = build(name, library)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", choices=LIBRARIES, default="torchvision")
    parser.add_argument("--models", nargs="+", help="a subset (default: all of the library's)")
    parser.add_argument("--scheme", default=DEFAULT_SCHEME)
    parser.add_argument("--size", type=int, help="square input size (default: the smallest the model accepts)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per model")
    parser.add_argument("--memory-gb", type=float, default=10.0, help="address-space limit per model")
    parser.add_argument(
        "--budget-minutes", type=float, help="start no new model after this many minutes (the rest is not run)"
    )
    parser.add_argument("--update", action="store_true", help="merge these rows into the existing results")
    parser.add_argument("--render", action="store_true", help="only rewrite docs/coverage.md from the saved results")
    parser.add_argument("--no-adapt", action="store_true", help="skip the adapted-model column (eq.adapt, TDA4VM)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--status", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        limit = int(args.memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        run_one(args.one, args.library, args.scheme, args.size, args.status, adapt=not args.no_adapt)
        return
    if args.render:
        write_coverage()
        return
    known = all_models(args.library)
    names = args.models or known
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown {args.library} models: {', '.join(unknown)}")
    result = RESULT_FILES[args.library]
    command = " ".join(["python", *[a if a != __file__ else "benchmarks/zoo.py" for a in sys.argv]])
    previous: dict = {}
    if args.update and (RESULTS / f"{result}.json").exists():
        earlier = json.loads((RESULTS / f"{result}.json").read_text())
        for r in earlier["rows"]:
            # Rows from before per-row dates were measured on the date of the run that saved them.
            r.setdefault("measured", earlier["date"][:10])
            previous[row_key(r)] = r
        command = f"{earlier['command']}; then {command}"
    rows: dict = {}
    # Small models first: failures show up early, and a long run that is cut short has covered the most models.
    began = time.monotonic()
    for name in sorted(names, key=lambda n: parameter_count(n, args.library)):
        if args.budget_minutes is not None and time.monotonic() - began > 60 * args.budget_minutes:
            print(f"{name}: not run (past --budget-minutes {args.budget_minutes:g})", flush=True)
            continue
        row = run_isolated(name, args.library, args.scheme, args.size, args.timeout, args.memory_gb, args.no_adapt)
        rows[row_key(row)] = row
        verdict = "pass" if row["ok"] else f"FAIL at {row['stage']}: {row.get('error', '')}"
        print(f"{name}: {verdict}, SQNR (dB) {sqnr_text(row)} ({row['seconds']} s)", flush=True)
        merged = previous | rows
        order = {n: i for i, n in enumerate(known)}
        ordered = sorted(merged.values(), key=lambda r: (order.get(r["model"], len(order)), str(row_key(r))))
        save(result, command, ordered)  # after every model: an interrupted run keeps what it measured
        write_coverage()
    print(
        table(
            ["model", "result", "SQNR dB", "stage", "error"],
            [[r["model"], result_text(r), sqnr_text(r), r["stage"], r.get("error", "")[:80]] for r in rows.values()],
        )
    )
    print(f"results: {RESULTS / f'{result}.json'}, {COVERAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
