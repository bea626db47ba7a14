"""Peer PTQ tools behind one call, for the PTQ population benchmark; they live in .venv-peers.

    make bench-peers                                      # .venv-peers: edgequant + the peers
    .venv-peers/bin/python benchmarks/peers.py            # smoke test: every variant, random resnet18
    .venv-peers/bin/python benchmarks/peers.py --list     # what imports, with versions

Every peer is called the same way, `PEERS[name](model, calib, per_channel, power_of_2)`,
with a float model and a calibration batch (N, 3, H, W), and returns a `Quantized`: a
callable from a float batch to the logits of that peer's *quantized* model. Where the
peer exports ONNX (all of them here), the logits come from its exported file run in
onnxruntime through `edgequant.export.runtime.session`, as ours are measured in benchmarks/ptq.py;
`Quantized.runtime` says which. Each peer runs its own recommended PTQ recipe, named in
its docstring; `Peer.variants` lists the (per_channel, power_of_2) pairs it implements.

The peers stay out of the library's dependencies (benchmarks/peers-requirements.txt,
installed next to torch 2.14.1 under constraints.txt); a peer that does not import here
lands in `UNAVAILABLE` with its error instead of failing the import of this module.
benchmarks/peers.md records versions, what installs, and what does not.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import importlib.metadata
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import torch
from _common import table
from onnx import numpy_helper

from edgequant.export.runtime import session

# NNCF reports usage through openvino-telemetry unless it believes it runs in CI; a benchmark sends nothing.
os.environ.setdefault("NNCF_CI", "1")

CALIB_BATCH = 32  # calibration batch size, as benchmarks/ptq.py feeds its 128 images
# AdaRound iterations a layer: 1% of AIMET's default 10,000, and still minutes for a resnet18 on 2 cores
ADAROUND_ITERATIONS = 100
BREVITAS_EQUALIZE_ITERS = 20  # graph-equalization iterations, brevitas_examples' PTQ default
BREVITAS_ACT_PERCENTILE = 99.999  # activation range percentile, brevitas_examples' PTQ default

Run = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Quantized:
    """A peer's quantized model: `q(x)` gives its logits for a float batch x."""

    run: Run
    runtime: str  # "onnxruntime": the peer's exported QDQ ONNX; "torch": the peer's simulated model
    seconds: float  # float model to quantized model (capture, calibration, the peer's recipe); export excluded
    onnx: bytes | None = None  # the exported file, where the peer has one

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


PTQ = Callable[[torch.nn.Module, torch.Tensor, bool, bool], Quantized]


@dataclass(frozen=True)
class Peer:
    """One peer tool: `peer(model, calib, per_channel, power_of_2)`; the model is copied, never changed."""

    name: str
    fn: PTQ
    package: str  # distribution whose version is reported
    variants: tuple[tuple[bool, bool], ...]  # the (per_channel, power_of_2) pairs it implements
    slow: bool = False  # minutes for a resnet18 on 2 CPU cores: left out unless asked for by name

    @property
    def version(self) -> str:
        return importlib.metadata.version(self.package)

    def __call__(
        self, model: torch.nn.Module, calib: torch.Tensor, per_channel: bool = False, power_of_2: bool = False
    ) -> Quantized:
        if (per_channel, power_of_2) not in self.variants:
            raise NotImplementedError(
                f"{self.name} has no per_channel={per_channel}, power_of_2={power_of_2} variant; it has {self.variants}"
            )
        return self.fn(copy.deepcopy(model).eval(), calib, per_channel, power_of_2)


# ---------------------------------------------------------------- shared helpers


def _batches(calib: torch.Tensor) -> list[torch.Tensor]:
    return list(calib.split(CALIB_BATCH))


def _example(calib: torch.Tensor) -> torch.Tensor:
    """An export example of at least two images: torch.export specializes a batch of 1 to a constant."""
    return calib[: max(2, min(CALIB_BATCH, len(calib)))]


@contextlib.contextmanager
def _timer() -> Iterator[list[float]]:
    """Seconds of the block, in the yielded list once it ends: PTQ time without the export after it."""
    box: list[float] = []
    start = time.perf_counter()
    yield box
    box.append(time.perf_counter() - start)


def _in_onnxruntime(path: Path, seconds: float) -> Quantized:
    """Load an exported file (with any external data) and run it the way benchmarks/ptq.py measures ours."""
    data = onnx.load(str(path)).SerializeToString()
    sess = session(data)
    name = sess.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {name: x.detach().cpu().float().numpy()})[0])

    return Quantized(run, "onnxruntime", seconds, data)


def _torchscript_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, export: Callable) -> None:
    """A peer's exporter on torch.onnx's TorchScript path, batch dynamic: Brevitas' dynamo path refuses
    int32 biases, and AIMET documents its export with dynamo=False."""
    export(
        model,
        (example,),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )


def _pairs(power_of_2: bool = False) -> tuple[tuple[bool, bool], ...]:
    """(per_channel, power_of_2) pairs: both weight granularities, and power-of-2 scales where the peer has them."""
    return tuple((pc, p2) for p2 in ((False, True) if power_of_2 else (False,)) for pc in (False, True))


# ---------------------------------------------------------------- onnxruntime and torchao (main venv too)


def ort_static(method: str) -> PTQ:
    """onnxruntime `quantize_static`, QDQ, int8 symmetric weights and activations, as benchmarks/ptq.py runs it.

    The float model goes to ONNX through torch.onnx (dynamo, batch dynamic) first; that
    export is excluded from `seconds`, like every peer's own export. Entropy comes out as
    MinMax: quantize_static (1.32) does not pass a bin count to its calibrator, whose
    defaults (128 histogram bins, 128 quantized bins) leave one candidate, the full range.
    """

    def ptq(model: torch.nn.Module, calib: torch.Tensor, per_channel: bool, power_of_2: bool) -> Quantized:
        import onnxruntime.quantization as ortq
        from ptq import _export, _Reader

        with tempfile.TemporaryDirectory() as tmp:
            float_path, path = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
            _export(model, _example(calib), float_path)
            name = onnx.load(str(float_path), load_external_data=False).graph.input[0].name
            with _timer() as seconds:
                ortq.quantize_static(
                    str(float_path),
                    str(path),
                    _Reader(name, [(x, None) for x in _batches(calib)]),
                    quant_format=ortq.QuantFormat.QDQ,
                    activation_type=ortq.QuantType.QInt8,
                    weight_type=ortq.QuantType.QInt8,
                    per_channel=per_channel,
                    calibrate_method=getattr(ortq.CalibrationMethod, method),
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
                )
            return _in_onnxruntime(path, seconds[0])

    ptq.__name__ = f"ort_{method.lower()}"
    return ptq


def torchao_pt2e(model: torch.nn.Module, calib: torch.Tensor, per_channel: bool, power_of_2: bool) -> Quantized:
    """torchao PT2E with the XNNPACK-style symmetric config: benchmarks/ptq.py's own `torchao_pt2e`, reused."""
    from ptq import torchao_pt2e as run_torchao

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "torchao.onnx"
        _, seconds = run_torchao(model, per_channel, [(x, None) for x in _batches(calib)], _example(calib), path)
        return _in_onnxruntime(path, seconds)


# ---------------------------------------------------------------- Brevitas


def brevitas_ptq(model: torch.nn.Module, calib: torch.Tensor, per_channel: bool, power_of_2: bool) -> Quantized:
    """Brevitas' ImageNet PTQ recipe (brevitas_examples): BN merge and graph equalization (CLE,
    20 iterations), int8 symmetric weights, int8 activations at the 99.999th percentile, int32
    bias, calibration, then bias correction. power_of_2 picks its fixed-point quantizers
    (po2_scale). Exported as QCDQ ONNX (int8 weights + DequantizeLinear, int32 bias) with the
    TorchScript exporter: Brevitas' dynamo exporter refuses quantized biases.
    """
    from brevitas.export import export_onnx_qcdq
    from brevitas.graph.calibrate import bias_correction_mode, calibration_mode
    from brevitas.graph.quantize import preprocess_for_quantize
    from brevitas_examples.imagenet_classification.ptq.ptq_common import quantize_model

    batches = _batches(calib)
    with _timer() as seconds, torch.no_grad():
        graph = preprocess_for_quantize(model, equalize_iters=BREVITAS_EQUALIZE_ITERS)
        qmodel = quantize_model(
            graph,
            backend="fx",
            weight_bit_width=8,
            act_bit_width=8,
            bias_bit_width=32,
            weight_quant_granularity="per_channel" if per_channel else "per_tensor",
            act_quant_percentile=BREVITAS_ACT_PERCENTILE,
            act_quant_type="sym",
            scale_factor_type="po2_scale" if power_of_2 else "float_scale",
            quant_format="int",
        ).eval()
        with calibration_mode(qmodel):
            for x in batches:
                qmodel(x)
        with bias_correction_mode(qmodel):
            for x in batches:
                qmodel(x)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "brevitas.onnx"
        _torchscript_onnx(qmodel, _example(calib), path, export_onnx_qcdq)
        return _in_onnxruntime(path, seconds[0])


# ---------------------------------------------------------------- Sony MCT


def mct_ptq(model: torch.nn.Module, calib: torch.Tensor, per_channel: bool, power_of_2: bool) -> Quantized:
    """Sony Model Compression Toolkit PTQ with its default recipe (BN folding, MSE thresholds,
    bias correction) on its IMX500 target, edited to the asked scheme: power_of_2 means
    power-of-two thresholds for weights and activations (MCT's POWER_OF_TWO), otherwise
    SYMMETRIC; per_channel applies to weights. Exported in MCT's FAKELY_QUANT ONNX format:
    weights already on their grid in float, activations as QuantizeLinear/DequantizeLinear.
    MCT's exporter goes through torch.onnx with the dynamo exporter, which cannot trace its
    fake-quantize op under torch 2.14 (nor its *args forward), so it is made to use TorchScript.
    """
    import model_compression_toolkit as mct
    from mct_quantizers import QuantizationMethod
    from model_compression_toolkit.target_platform_capabilities.constants import KERNEL_ATTR
    from model_compression_toolkit.target_platform_capabilities.tpc_models.imx500_tpc.v1_0 import tpc as imx500

    method = QuantizationMethod.POWER_OF_TWO if power_of_2 else QuantizationMethod.SYMMETRIC
    base, _, default = imx500.get_op_quantization_configs()
    kernel = {KERNEL_ATTR: {"weights_quantization_method": method, "weights_per_channel_threshold": per_channel}}
    base = base.clone_and_edit(attr_to_edit=kernel, activation_quantization_method=method)
    default = default.clone_and_edit(activation_quantization_method=method)
    target = imx500.generate_tpc(
        default_config=default, base_config=base, mixed_precision_cfg_list=[base], name="edgequant_peer"
    )
    batches = _batches(calib)

    def representative() -> Iterator[list[np.ndarray]]:
        for x in batches:
            yield [x.numpy()]

    with _timer() as seconds:
        qmodel, _ = mct.ptq.pytorch_post_training_quantization(
            model, representative, target_platform_capabilities=target
        )
    torchscript = functools.partial(torch.onnx.export, dynamo=False)
    with tempfile.TemporaryDirectory() as tmp, mock.patch("torch.onnx.export", torchscript):
        path = Path(tmp) / "mct.onnx"
        mct.exporter.pytorch_export_model(
            qmodel, str(path), representative, quantization_format=mct.exporter.QuantizationFormat.FAKELY_QUANT
        )
        return _in_onnxruntime(path, seconds[0])


# ---------------------------------------------------------------- AIMET


def _aimet(adaround: bool) -> PTQ:
    """AIMET's PTQ recipe, with or without AdaRound (the slow part: minutes on 2 cores)."""

    def ptq(model: torch.nn.Module, calib: torch.Tensor, per_channel: bool, power_of_2: bool) -> Quantized:
        import aimet_torch
        import aimet_torch.onnx
        from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
        from aimet_torch.common.defs import QuantScheme
        from aimet_torch.cross_layer_equalization import equalize_model
        from aimet_torch.model_preparer import prepare_model
        from aimet_torch.quantsim import QuantizationSimModel

        config_dir = Path(aimet_torch.__file__).parent / "common" / "quantsim_config"
        config = "default" if per_channel else str(config_dir / "default_config.json")
        scheme = QuantScheme.post_training_tf_enhanced
        batches, example = _batches(calib), _example(calib)
        with tempfile.TemporaryDirectory() as tmp:
            with _timer() as seconds, torch.no_grad():
                prepared = prepare_model(model)  # one module per use: torchvision's ResNet reuses its ReLUs
                equalize_model(prepared, dummy_input=example)  # BN fold, CLE, high-bias absorption
                if adaround:
                    params = AdaroundParameters(batches, len(batches), default_num_iterations=ADAROUND_ITERATIONS)
                    with torch.enable_grad():
                        prepared = Adaround.apply_adaround(
                            prepared,
                            example,
                            params,
                            path=tmp,
                            filename_prefix="adaround",
                            default_param_bw=8,
                            default_quant_scheme=scheme,
                            default_config_file=config,
                        )
                sim = QuantizationSimModel(
                    prepared, example, quant_scheme=scheme, default_param_bw=8, default_output_bw=8, config_file=config
                )
                if adaround:
                    sim.set_and_freeze_param_encodings(str(Path(tmp) / "adaround.encodings"))
                sim.compute_encodings(lambda m: [m(x) for x in batches])
            path = Path(tmp) / "aimet.onnx"
            _torchscript_onnx(sim.model, example, path, aimet_torch.onnx.export)
            return _in_onnxruntime(path, seconds[0])

    ptq.__doc__ = (
        "AIMET (aimet-torch): model preparer, CLE (BN fold, cross-layer scaling, high-bias absorption), "
        + (f"AdaRound ({ADAROUND_ITERATIONS} iterations a layer), " if adaround else "")
        + "QuantSim with tf_enhanced ranges and AIMET's default config (int8 symmetric weights, per-tensor "
        "or its per-channel default; activations asymmetric uint8), exported with aimet_torch.onnx.export "
        "as QDQ with int32 biases. AIMET 2.x has no bias correction any more and no power-of-2 scales."
    )
    ptq.__name__ = "aimet_adaround" if adaround else "aimet"
    return ptq


# ---------------------------------------------------------------- NNCF


def nncf_ptq(model: torch.nn.Module, calib: torch.Tensor, per_channel: bool, power_of_2: bool) -> Quantized:
    """NNCF `nncf.quantize` with preset PERFORMANCE (symmetric int8 weights and activations, fast
    bias correction), on its torch.fx backend: the model is captured with torch.export first.
    NNCF's nn.Module backend keeps BatchNormalization unfolded, in float, in the exported ONNX,
    which an int8 edge engine cannot run; the fx backend folds it as every other peer does.
    Weights come out int8 with explicit Cast/Sub/Mul dequantization, activations as Q/DQ.
    """
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters
    from ptq import DYNAMIC, _export

    batches, example = _batches(calib), _example(calib)
    weights = QuantizationParameters(per_channel=per_channel)
    advanced = AdvancedQuantizationParameters(weights_quantization_params=weights)
    with _timer() as seconds:
        graph = torch.export.export(model, (example,), dynamic_shapes=DYNAMIC).module()
        qmodel = nncf.quantize(
            graph,
            nncf.Dataset(batches),
            preset=nncf.QuantizationPreset.PERFORMANCE,
            subset_size=len(batches),  # a Dataset item is a batch here
            advanced_parameters=advanced,
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nncf.onnx"
        _export(qmodel, example, path)
        return _in_onnxruntime(path, seconds[0])


# ---------------------------------------------------------------- the registry

_CANDIDATES: list[tuple[Peer, tuple[str, ...]]] = [
    # (peer, modules that must import for it to count as available)
    *[
        (Peer(f"ort {m}", ort_static(m), "onnxruntime", _pairs()), ("onnxruntime.quantization",))
        for m in ("MinMax", "Percentile", "Entropy")
    ],
    (Peer("torchao", torchao_pt2e, "torchao", _pairs()), ("torchao.quantization.pt2e.quantize_pt2e",)),
    (
        Peer("brevitas", brevitas_ptq, "brevitas", _pairs(power_of_2=True)),
        ("brevitas.export", "brevitas_examples.imagenet_classification.ptq.ptq_common", "onnxoptimizer"),
    ),
    (Peer("mct", mct_ptq, "model-compression-toolkit", _pairs(power_of_2=True)), ("model_compression_toolkit",)),
    (Peer("aimet", _aimet(adaround=False), "aimet-torch", _pairs()), ("aimet_torch.quantsim", "aimet_torch.onnx")),
    (
        Peer("aimet adaround", _aimet(adaround=True), "aimet-torch", _pairs(), slow=True),
        ("aimet_torch.quantsim", "aimet_torch.onnx", "aimet_torch.adaround.adaround_weight"),
    ),
    (Peer("nncf", nncf_ptq, "nncf", _pairs()), ("nncf", "nncf.experimental.torch.fx")),
]

# Peers that do not install next to torch 2.14.1 at all, with pip's words (benchmarks/peers.md).
_DOES_NOT_INSTALL: dict[str, str] = {}


def _quiet() -> None:
    """The peers log every layer at INFO; a table is what the benchmark prints."""
    for name in ("nncf", "Model Compression Toolkit", "torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with contextlib.suppress(Exception):
        from aimet_torch.common.utils import AimetLogger

        AimetLogger.set_level_for_all_areas(logging.WARNING)


def _probe() -> tuple[dict[str, Peer], dict[str, str]]:
    """Import each peer now, so that a broken install shows up in UNAVAILABLE, not mid-benchmark."""
    available: dict[str, Peer] = {}
    missing: dict[str, str] = dict(_DOES_NOT_INSTALL)
    for peer, modules in _CANDIDATES:
        if peer.name in missing:
            continue
        try:
            with warnings.catch_warnings():  # import-time notes such as Brevitas' missing fast_hadamard_transform
                warnings.simplefilter("ignore")
                for module in modules:
                    importlib.import_module(module)
            available[peer.name] = peer
        except Exception as error:  # an import failure is a result to report, not a crash
            missing[peer.name] = f"{type(error).__name__}: {error}".splitlines()[0]
    _quiet()
    return available, missing


PEERS: dict[str, Peer]
UNAVAILABLE: dict[str, str]
PEERS, UNAVAILABLE = _probe()


# ---------------------------------------------------------------- smoke test


def _power_of_2_scales(data: bytes | None) -> str:
    """Whether every Q/DQ scale in an exported file is a power of 2 ('-' without a file)."""
    if data is None:
        return "-"
    graph = onnx.load_from_string(data).graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    scales = [
        consts[n.input[1]].ravel()
        for n in graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[1] in consts
    ]
    if not scales:
        return "no Q/DQ"
    log2 = np.log2(np.concatenate(scales).astype(np.float64))
    return "yes" if np.allclose(log2, np.round(log2), atol=1e-6) else "no"


def smoke_model(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """A random-weight torchvision resnet18 with BN statistics warmed on digits, and the digits images."""
    import torchvision

    from edgequant.demo.data import digits_tensors

    torch.manual_seed(seed)
    images = digits_tensors("train")[0]
    model = torchvision.models.resnet18(num_classes=10).train()
    with torch.no_grad():
        for x in images[:256].split(64):
            model(x)
    return model.eval(), images


def smoke(names: list[str], calib_size: int, test_size: int) -> list[dict]:
    """Each variant of each peer once: finite (N, 10) logits, their distance to float, the time.

    The distance is the largest logit error in % of the largest float logit; with random
    weights it says only that the quantized model computes the same function, roughly.
    """
    model, images = smoke_model()
    calib, test = images[:calib_size], images[-test_size:]
    with torch.no_grad():
        reference = model(test)
    rows = []
    for name in names:
        peer = PEERS[name]
        for per_channel, power_of_2 in peer.variants:
            row: dict = {"peer": name, "per_channel": per_channel, "power_of_2": power_of_2}
            start = time.perf_counter()
            try:
                quantized = peer(model, calib, per_channel, power_of_2)
                logits = quantized(test)
                row |= {
                    "runtime": quantized.runtime,
                    "shape": tuple(logits.shape),
                    "finite": bool(torch.isfinite(logits).all()),
                    "max |q - float| %": 100.0 * float((logits - reference).abs().max() / reference.abs().max()),
                    "top-1 = float %": 100.0 * float((logits.argmax(1) == reference.argmax(1)).float().mean()),
                    "pow2 scales": _power_of_2_scales(quantized.onnx),
                    "quantize s": quantized.seconds,
                }
            except Exception as error:  # a peer failing is a result to report, not a crash
                row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            row["total s"] = time.perf_counter() - start
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="only say which peers import, with their versions")
    parser.add_argument("--peers", nargs="+", default=None, help="peers to smoke-test (default: all but the slow)")
    parser.add_argument("--calib", type=int, default=64, help="calibration images")
    parser.add_argument("--images", type=int, default=32, help="images the quantized models run on")
    args = parser.parse_args()
    listing = [
        [p.name, p.version, " ".join(f"({int(c)},{int(t)})" for c, t in p.variants), "slow" if p.slow else ""]
        for p in PEERS.values()
    ]
    print(table(["peer", "version", "variants (per_channel, power_of_2)", ""], listing))
    for name, error in UNAVAILABLE.items():
        print(f"unavailable: {name}: {error}")
    if args.list:
        return
    rows = smoke(args.peers or [name for name, peer in PEERS.items() if not peer.slow], args.calib, args.images)
    headers = ["peer", "per_channel", "power_of_2", "runtime", "shape", "finite", "max |q - float| %"]
    headers += ["top-1 = float %", "pow2 scales", "quantize s", "total s"]
    print(f"\nrandom-weight resnet18, {args.calib} calibration images, logits of {args.images} images")
    print(table([*headers, "error"], [[r.get(h, "") for h in [*headers, "error"]] for r in rows]))


if __name__ == "__main__":
    main()
