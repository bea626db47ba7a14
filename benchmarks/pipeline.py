"""Speed and memory at the sizes users run: each PTQ stage, the peers side by side, the QAT step.

    python benchmarks/pipeline.py [--models resnet50 ...] [--calib 256] [--part ptq qat memory]

Torchvision models with random weights and BN statistics warmed on the calibration
images (as a trained model has), digits upsampled to the model's input size.

- ptq: one child process per model (so that its peak memory is its own). Ours first,
  stage by stage: capture+prepare (`PTQModule(...)`), calibrate (the default recipe),
  convert, export (ONNX, parity check in onnxruntime, TIDL files); the peak resident
  memory is read right after. Then, on the same images: a min/max-only calibration
  (the throughput target), float inference throughput, torchao PT2E (XNNPACK
  per-tensor: capture, prepare, calibrate, convert) and onnxruntime (float ONNX export
  + `quantize_static` MinMax, QDQ, symmetric int8).
- qat: training-step time at 224x224 batch 32 (the segmenter at 512 batch 4) of the
  float model, our QATModule and torchao's PT2E QAT, in contiguous and channels_last
  layouts; each ratio is the median of per-round ratios of interleaved steps. Then
  torch.compile of the QATModule (Inductor, and aot_eager): the first steps' losses
  against eager's, and its step time against eager's and against the compiled float model's.
- --profile MODEL: cProfile of our PTQ chain on one model (docs/performance.md).
- --profile-qat MODEL: torch.profiler tables of one float and one QAT training step.
- memory: the whole chain (16 calibration images) on the largest zoo models; peak
  resident memory against the fp32 weight bytes, per stage.

Writes benchmarks/results/pipeline.json (rows tagged by part; a part's rerun replaces its rows).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from _common import RESULTS, interleaved_times, median_ratio, save, table, warm_bn
from torch import nn

PTQ_MODELS = {
    "resnet50": 224,
    "mobilenet_v2": 224,
    "regnet_x_1_6gf": 224,
    "efficientnet_b0": 224,
    "deeplabv3_mobilenet_v3_large": 512,
}
QAT_MODELS = {"resnet50": (224, 32), "mobilenet_v2": (224, 32), "deeplabv3_mobilenet_v3_large": (512, 4)}
# regnet_y_128gf at 32 px as in the zoo: its memory is its weights.
MEMORY_MODELS = {"vit_h_14": 224, "regnet_y_128gf": 32, "densenet121": 224}
BATCH = 32
SCHEME = "int8_pow2"


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    builder = torchvision.models.get_model_builder(name)
    if name in torchvision.models.list_models(module=torchvision.models.segmentation):
        return builder(weights=None, weights_backbone=None, aux_loss=False)
    return builder(weights=None)


def images(count: int, size: int) -> torch.Tensor:
    """`count` digits training images, upsampled to size x size (3 channels, in [-1, 1])."""
    from edgequant.demo.data import digits_tensors

    small = digits_tensors("train")[0][:count]
    return F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)


def batches_of(x: torch.Tensor, batch: int) -> list[torch.Tensor]:
    return list(x.split(batch))


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# --- ptq: one model per child process ----------------------------------------------------------


def ours(model: nn.Module, batches: list[torch.Tensor], work: Path) -> dict:
    import edgequant as eq

    example = (batches[0][:8],)
    row: dict = {}
    qmodel, row["capture_prepare_s"] = timed(lambda: eq.PTQModule(model, example, SCHEME))
    _, row["calibrate_s"] = timed(lambda: qmodel.calibrate(batches, progress=False))
    _, row["convert_s"] = timed(qmodel.convert)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TIDL fallback advice is not what this measures
        result, row["export_s"] = timed(lambda: qmodel.export(work / "ours.onnx"))
    row["parity"] = str(result.parity)
    row["ptq_s"] = row["capture_prepare_s"] + row["calibrate_s"] + row["export_s"]
    return row


def calibration_vs_float(model: nn.Module, batches: list[torch.Tensor], rounds: int = 3) -> dict:
    """Images/s of a min/max-only calibration and of float inference, in interleaved rounds.

    The ratio is the median of the per-round ratios (a shared machine's load hits both alike).
    """
    import edgequant as eq

    config = eq.PTQConfig(range_estimator="minmax", bias_correction=False, weight_exponent="ceil", equalize=False)
    qmodel = eq.PTQModule(model, (batches[0][:8],), SCHEME, config)
    images = sum(len(x) for x in batches)

    @torch.no_grad()
    def inference() -> None:
        for x in batches:
            model(x)

    times = interleaved_times(
        {"float": inference, "calibrate": lambda: qmodel.calibrate(batches, progress=False)}, rounds, warmup=1
    )
    return {
        "float_img_s": images / statistics.median(times["float"]),
        "calibrate_img_s": images / statistics.median(times["calibrate"]),
        "ratio": 1.0 / median_ratio(times["calibrate"], times["float"]),
    }


def torchao_pt2e(model: nn.Module, batches: list[torch.Tensor]) -> dict:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    def capture_prepare() -> nn.Module:
        dynamic = ({0: torch.export.Dim("batch")},)
        graph = torch.export.export(model.eval(), (batches[0],), dynamic_shapes=dynamic).module()
        return prepare_pt2e(graph, XNNPACKQuantizer().set_global(get_symmetric_quantization_config()))

    row: dict = {}
    prepared, row["capture_prepare_s"] = timed(capture_prepare)
    with torch.no_grad():
        _, row["calibrate_s"] = timed(lambda: [prepared(x) for x in batches])
    _, row["convert_s"] = timed(lambda: convert_pt2e(prepared))
    row["ptq_s"] = row["capture_prepare_s"] + row["calibrate_s"] + row["convert_s"]
    return row


def onnxruntime_static(model: nn.Module, batches: list[torch.Tensor], work: Path) -> dict:
    import onnx
    import onnxruntime.quantization as ortq

    class Reader(ortq.CalibrationDataReader):
        """Batches by index range, for onnxruntime's strided calibration (`CalibStridedMinMax`)."""

        def __init__(self, name: str) -> None:
            self.feeds = [{name: x.numpy()} for x in batches]
            self.set_range(0, len(self.feeds))

        def __len__(self) -> int:
            return len(self.feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.items = iter(self.feeds[start_index:end_index])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    float_path = work / "float.onnx"
    dynamic = ({0: torch.export.Dim("batch")},)

    def export() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (batches[0][:8],), str(float_path), dynamo=True, dynamic_shapes=dynamic)

    row: dict = {}
    _, row["export_s"] = timed(export)
    name = onnx.load(str(float_path), load_external_data=False).graph.input[0].name
    _, row["calibrate_s"] = timed(
        lambda: ortq.quantize_static(
            str(float_path),
            str(work / "ort.onnx"),
            Reader(name),
            quant_format=ortq.QuantFormat.QDQ,
            activation_type=ortq.QuantType.QInt8,
            weight_type=ortq.QuantType.QInt8,
            calibrate_method=ortq.CalibrationMethod.MinMax,
            # Ranges reduced after every batch (onnxruntime's option for this): keeping every
            # intermediate output of 256 images at 224 px, its default, needs tens of GB.
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "CalibStridedMinMax": 1},
        )
    )
    row["ptq_s"] = row["export_s"] + row["calibrate_s"]
    return row


def run_ptq_one(name: str, calib: int, out: Path) -> None:
    size = PTQ_MODELS[name]
    row: dict = {"part": "ptq", "model": name, "input": size, "calib_images": calib}
    batches = batches_of(images(calib, size), BATCH)
    model = warm_bn(build(name), batches[:4])
    row["weights_mb"] = weight_bytes(model) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        steps: dict[str, Callable[[], object]] = {
            "ours": lambda: ours(model, batches, work),
            "peak_rss_gb": peak_gb,  # ours ran first: the peak so far is our chain's
            "minmax": lambda: calibration_vs_float(model.eval(), batches),
            "torchao": lambda: torchao_pt2e(model, batches),
            "onnxruntime": lambda: onnxruntime_static(model, batches, work),
        }
        for key, step in steps.items():
            try:
                row[key] = step()
            except Exception as error:  # a failing step (or peer) is a result; the others still run
                row[f"{key} error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
            out.write_text(json.dumps(row))


# --- memory of the largest models ---------------------------------------------------------------


class RssSampler:
    """The largest resident set seen during each labelled stage (a thread reads /proc every 10 ms).

    Unlike ru_maxrss, which only grows, this shows what each stage itself adds or frees.
    """

    def __init__(self) -> None:
        self.stage = "start"
        self.peaks: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self._since = time.perf_counter()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            self.sample()

    def sample(self) -> None:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * self._page / 2**30
        self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), rss)

    def enter(self, stage: str) -> None:
        self.sample()
        now = time.perf_counter()
        self.seconds[self.stage] = round(self.seconds.get(self.stage, 0.0) + now - self._since, 2)
        self.stage, self._since = stage, now
        self.sample()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {k: round(v, 2) for k, v in self.peaks.items()}


def label_export_steps(sampler: RssSampler) -> None:
    """Label the steps inside export() (benchmark-only: wraps the functions export_onnx calls)."""
    from edgequant.export import onnx as export_module

    steps = {
        "reexport": "export: torch.export again",
        "compare": "export: onnxruntime parity",
        "write_deploy_files": "export: TIDL files",
        "check_static": "export: static model check",
        "tidl_check": "export: TIDL rules",
    }
    for attr, stage in steps.items():
        fn = getattr(export_module, attr)

        def wrapped(*args, _fn=fn, _stage=stage, **kwargs):
            sampler.enter(_stage)
            return _fn(*args, **kwargs)

        setattr(export_module, attr, wrapped)
    onnx_export = torch.onnx.export

    def wrapped_onnx(*args, **kwargs):
        sampler.enter("export: torch.onnx.export")
        return onnx_export(*args, **kwargs)

    torch.onnx.export = wrapped_onnx


def run_memory_one(name: str, out: Path) -> None:
    import edgequant as eq

    size = MEMORY_MODELS[name]
    sampler = RssSampler()
    label_export_steps(sampler)
    row: dict = {"part": "memory", "model": name, "input": size}
    sampler.enter("build")
    batches = batches_of(images(16, size), 8)
    model = warm_bn(build(name), batches[:1])
    row["weights_gb"] = weight_bytes(model) / 2**30
    sampler.enter("capture+prepare")
    qmodel, row["capture_prepare_s"] = timed(lambda: eq.PTQModule(model, (batches[0][:2],), SCHEME))
    sampler.enter("calibrate")
    _, row["calibrate_s"] = timed(lambda: qmodel.calibrate(batches, progress=False))
    sampler.enter("convert")
    _, row["convert_s"] = timed(qmodel.convert)
    sampler.enter("export: convert")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, row["export_s"] = timed(lambda: qmodel.export(Path(tmp) / f"{name}.onnx"))
    sampler.enter("done")
    row["stages_seconds"] = sampler.seconds
    row["stages_peak_gb"] = sampler.stop()
    row["peak_rss_gb"] = peak_gb()
    row["peak_over_weights"] = row["peak_rss_gb"] / row["weights_gb"]
    out.write_text(json.dumps(row))


def profile_chain(name: str, calib: int) -> None:
    """cProfile of our whole PTQ chain on one model: the functions with the most cumulative time."""
    import cProfile
    import pstats

    size = PTQ_MODELS.get(name) or MEMORY_MODELS[name]
    batches = batches_of(images(calib, size), BATCH)
    model = warm_bn(build(name), batches[:4])
    with tempfile.TemporaryDirectory() as tmp:
        profiler = cProfile.Profile()
        profiler.enable()
        ours(model, batches, Path(tmp))
        profiler.disable()
    shown = r"edgequant|onnxruntime|torch/onnx|torch/export|torchao"
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(shown, 40)


def in_child(flag: str, name: str, extra: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, __file__, flag, name, "--out", str(out), *extra]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        row = json.loads(out.read_text()) if out.exists() else {"model": name}
        if proc.returncode != 0:
            row["error"] = proc.stderr[-1500:] or f"exit code {proc.returncode}"
        return row


# --- qat step --------------------------------------------------------------------------------


def loss_of(output: object, target: torch.Tensor) -> torch.Tensor:
    logits = output["out"] if isinstance(output, dict) else output
    return F.cross_entropy(logits, target)


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def torchao_qat(model: nn.Module, x: torch.Tensor) -> nn.Module:
    from torchao.quantization.pt2e import move_exported_model_to_train
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    graph = torch.export.export(model.train(), (x,)).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_qat=True))
    return move_exported_model_to_train(prepare_qat_pt2e(graph, quantizer))


def qat_setup(name: str) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """A QAT model's batch, its labels (per pixel for the segmenter), and the model with warmed BN."""
    size, batch = QAT_MODELS[name]
    torch.manual_seed(0)
    x = images(batch, size)
    segmentation = name.startswith("deeplab")
    y = torch.randint(0, 21 if segmentation else 1000, (batch, size, size) if segmentation else (batch,))
    return x, y, warm_bn(build(name), [x])


def profile_qat(name: str) -> None:
    """torch.profiler tables of one float and one QAT training step of `name` (docs/performance.md#qat-step)."""
    from torch.profiler import ProfilerActivity, profile

    import edgequant as eq

    x, y, base = qat_setup(name)
    qat = eq.QATModule(copy.deepcopy(base), (x[:2],), SCHEME).train()
    steps = {"float": step_fn(copy.deepcopy(base).train(), x, y), "QAT": step_fn(qat, x, y)}
    for step in (*steps.values(), *steps.values()):  # warm-up
        step()
    for label, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"\n{label} training step of {name}, ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    fake_quant_floor()


def fake_quant_floor(shape: tuple[int, ...] = (32, 96, 112, 112), repeats: int = 5) -> None:
    """Forward + backward on one activation: our fake quantizer, torch's fused kernel, and a ReLU6.

    A ReLU6 (one elementwise pass each way) is about the floor for one fake quantizer.
    """
    from edgequant.numerics.observers import FakeQuantize, RangeObserver

    x = torch.randn(shape).mul_(2).requires_grad_()
    grad = torch.randn(shape)
    ours = FakeQuantize(RangeObserver, dtype=torch.int8, quant_min=-128, quant_max=127, power_of_2=True)
    ours.scale.fill_(2.0**-4)
    ours.enable_observer(False)
    zero_point = torch.zeros(1, dtype=torch.int32)
    variants = {
        "edgequant FakeQuantize": lambda: ours(x),
        "torch fake_quantize_per_tensor_affine": lambda: torch.fake_quantize_per_tensor_affine(
            x, ours.scale, zero_point, -128, 127
        ),
        "ReLU6": lambda: F.relu6(x),
    }
    steps = {k: (lambda f=f: torch.autograd.grad(f(), x, grad)) for k, f in variants.items()}
    times = interleaved_times(steps, repeats, warmup=1)
    relu6 = times["ReLU6"]
    print(f"\nforward + backward on one {'x'.join(map(str, shape))} activation (median of {repeats})")
    print(
        table(
            ["variant", "s", "/ ReLU6"],
            [[k, f"{statistics.median(t):.3f}", f"{median_ratio(t, relu6):.2f}"] for k, t in times.items()],
        )
    )


def run_qat(name: str, repeats: int, compile_too: bool) -> dict:
    import edgequant as eq

    x, y, base = qat_setup(name)
    size, batch = QAT_MODELS[name]
    row: dict = {"part": "qat", "model": name, "input": size, "batch": batch}
    for layout in ("contiguous", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        xl = x.contiguous(memory_format=fmt)
        float_model = copy.deepcopy(base).train().to(memory_format=fmt)
        ours = eq.QATModule(copy.deepcopy(base), (xl[:2],), SCHEME).train().to(memory_format=fmt)
        steps = {"float": step_fn(float_model, xl, y), "ours": step_fn(ours, xl, y)}
        try:
            steps["torchao"] = step_fn(torchao_qat(copy.deepcopy(base), xl).to(memory_format=fmt), xl, y)
        except Exception as error:  # a peer that cannot run is a result, not a crash
            row[f"{layout} torchao error"] = str(error).splitlines()[0][:200]
        times = interleaved_times(steps, repeats, warmup=1)
        row[f"{layout} float_step_s"] = statistics.median(times["float"])
        for peer in ("ours", "torchao"):
            if peer in times:
                row[f"{layout} {peer}_ratio"] = median_ratio(times[peer], times["float"])
        print(f"{name} {layout}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if layout in k), flush=True)
    if compile_too:
        row |= compiled_qat(base, x, y)
    return row


def compiled_qat(base: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """torch.compile (Inductor) of a QATModule: its loss against eager's, its step against eager's and
    against the compiled float model's, and the same with `aot_eager` (no code generation: bit-exact)."""
    import torch._inductor.config

    import edgequant as eq

    # Dropout draws the same masks in each variant only from the same seed and with aten's generator.
    torch._inductor.config.fallback_random = True
    seeded = lambda step, seed: (torch.manual_seed(seed), step())[1]  # noqa: E731
    out: dict = {}
    eager = eq.QATModule(copy.deepcopy(base), (x[:2],), SCHEME).train()
    exact = copy.deepcopy(eager)
    compiled = torch.compile(copy.deepcopy(eager))
    float_compiled = torch.compile(copy.deepcopy(base).train())
    eager_step, compiled_step = step_fn(eager, x, y), step_fn(compiled, x, y)
    exact_step = step_fn(torch.compile(exact, backend="aot_eager"), x, y)
    try:
        first = seeded(eager_step, 0)
        start = time.perf_counter()
        compiled_first = seeded(compiled_step, 0)
        out["compile_first_step_s"] = time.perf_counter() - start
        out["compile_loss_diff_step0"] = float((first - compiled_first).abs())
        out["aot_eager_loss_diff_step0"] = float((first - seeded(exact_step, 0)).abs())
        second = seeded(eager_step, 1)
        out["compile_loss_diff_step1"] = float((second - seeded(compiled_step, 1)).abs())  # after one update
        out["aot_eager_loss_diff_step1"] = float((second - seeded(exact_step, 1)).abs())
        steps = {"eager": eager_step, "compiled": compiled_step, "float compiled": step_fn(float_compiled, x, y)}
        times = interleaved_times(steps, 3, warmup=1)
        out["compiled_over_eager"] = median_ratio(times["compiled"], times["eager"])
        out["compiled_over_compiled_float"] = median_ratio(times["compiled"], times["float compiled"])
    except Exception as error:  # the closing note must say exactly why, so keep the message
        out["compile_error"] = f"{type(error).__name__}: {str(error).strip()[:1500]}"
    return out


# --- report -------------------------------------------------------------------------------------


def merge(part: str, rows: list[dict]) -> list[dict]:
    """The saved rows of the other parts, plus these."""
    path = RESULTS / "pipeline.json"
    kept = json.loads(path.read_text())["rows"] if path.exists() else []
    names = {r["model"] for r in rows}
    return [r for r in kept if not (r.get("part") == part and r["model"] in names)] + rows


def ptq_tables(rows: list[dict]) -> None:
    for r in rows:
        for key in (k for k in r if k.endswith("error")):
            print(f"{r['model']}: {key}: {r[key][-300:]}")
    ok = [r for r in rows if all(k in r for k in ("ours", "torchao", "onnxruntime", "minmax"))]
    if not ok:
        return
    stages = [
        [
            r["model"],
            r["ours"]["capture_prepare_s"],
            r["ours"]["calibrate_s"],
            r["ours"]["convert_s"],
            r["ours"]["export_s"],
            r["ours"]["ptq_s"],
            r["torchao"]["ptq_s"],
            r["onnxruntime"]["ptq_s"],
        ]
        for r in ok
    ]
    print("\nPTQ stages, seconds (ours: export includes a convert and the parity check)")
    print(
        table(["model", "capture+prepare", "calibrate", "convert", "export", "ours", "torchao", "onnxruntime"], stages)
    )
    ratios = [
        [
            r["model"],
            r["ours"]["ptq_s"] / r["onnxruntime"]["ptq_s"],
            r["ours"]["ptq_s"] / r["torchao"]["ptq_s"],
            r["minmax"]["ratio"],
            r["peak_rss_gb"] * 2**10 / r["weights_mb"],
        ]
        for r in ok
    ]
    print("\nratios")
    print(
        table(
            ["model", "PTQ / onnxruntime", "PTQ / torchao", "min/max calib / float img/s", "peak RSS / weights"], ratios
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", choices=["ptq", "qat", "memory"], default=["ptq", "qat"])
    parser.add_argument("--models", nargs="+", help="restrict each part to these of its models")
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", nargs="*", default=["mobilenet_v2"], help="QAT models to try torch.compile on")
    parser.add_argument("--profile", metavar="MODEL", help="print a cProfile of our PTQ chain on MODEL and stop")
    parser.add_argument("--profile-qat", metavar="MODEL", help="print torch.profiler tables of a float and a QAT step")
    parser.add_argument("--ptq-one", help=argparse.SUPPRESS)
    parser.add_argument("--memory-one", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ptq_one:
        return run_ptq_one(args.ptq_one, args.calib, args.out)
    if args.memory_one:
        return run_memory_one(args.memory_one, args.out)
    if args.profile:
        return profile_chain(args.profile, args.calib)
    if args.profile_qat:
        return profile_qat(args.profile_qat)
    command = " ".join(["python", *sys.argv])
    chosen = lambda names: [n for n in names if not args.models or n in args.models]  # noqa: E731
    rows: list[dict] = []
    if "ptq" in args.part:
        ptq = [in_child("--ptq-one", n, ["--calib", str(args.calib)], 3600) for n in chosen(PTQ_MODELS)]
        for r in ptq:
            print(json.dumps(r), flush=True)
        ptq_tables(ptq)
        rows = merge("ptq", ptq)
        save("pipeline", command, rows)
    if "memory" in args.part:
        memory = [in_child("--memory-one", n, [], 3600) for n in chosen(MEMORY_MODELS)]
        for r in memory:
            print(json.dumps(r), flush=True)
        rows = merge("memory", memory)
        save("pipeline", command, rows)
    if "qat" in args.part:
        qat = [run_qat(n, args.repeats, n in args.compile) for n in chosen(QAT_MODELS)]
        rows = merge("qat", qat)
        save("pipeline", command, rows)
    print(f"\nresults: {RESULTS / 'pipeline.json'}")


if __name__ == "__main__":
    main()
