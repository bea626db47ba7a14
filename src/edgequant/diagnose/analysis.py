"""Why a quantized model is worse than float, and which layers to keep in 16 bit.

`analyze` compares float, 16-bit and 8-bit outputs on the user's data, then measures
each conv / linear layer's share of the 8-bit loss and picks the fewest 16-bit layers
that bring the 8-bit model back to a target.

The per-layer sweep does not quantize the model again for every configuration. PTQ
ranges are observed in float, so they do not depend on the bit width: the calibrated
graph's observers are swapped for switches that fake-quantize from the observed range
at 8 or 16 bit, or pass the tensor through. Each switch follows the layer that writes
its tensor, as our mixed precision does (every input is read at its producer's
precision), and each layer's bias carries the bias correction of its bit width. The
headline numbers and the recommended set are measured on the real PTQ path.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from ..core.errors import NonFiniteError, UsageError
from ..graph.bias_correction import mean_shift
from ..graph.convert import int32_bias
from ..graph.ops import (
    BOUND_OP,
    FUSED_ACTIVATIONS,
    FUSED_BN_OP,
    PASS_THROUGH_OPS,
    WEIGHTED_OPS,
    constant,
    conv_groups,
    is_depthwise,
    module_name,
)
from ..numerics.observers import RangeObserver
from ..numerics.scales import qrange, to_grid
from ..numerics.scheme import PRESETS, Scheme, get_scheme
from ..wrappers.detection import DetectionCore, detector_family, images_of
from ..wrappers.ptq import PTQConfig, PTQModule
from .detection import mean_average_precision
from .report import AnalysisReport
from .results import (
    VERDICT_FINE,
    VERDICT_OUTSIDE,
    VERDICT_QUANTIZATION,
    DetectionAnalysis,
    Fidelity,
    LayerSensitivity,
)

aten = torch.ops.aten

# SQNR of outputs equal to float (or of an all-zero reference) is reported as this bound, never as inf.
SQNR_CAP_DB = 200.0
# Ops between a conv / linear and the tensor the engine writes (fused BN, activation, CLE bound).
_TAIL_OPS = (*FUSED_ACTIVATIONS, BOUND_OP, FUSED_BN_OP, operator.getitem)


# ---- data and metrics -------------------------------------------------------------------------


@dataclass
class _Data:
    inputs: list[torch.Tensor]
    labels: torch.Tensor | None

    @property
    def samples(self) -> int:
        return sum(len(x) for x in self.inputs)

    def head(self, n: int) -> list[torch.Tensor]:
        """The first n samples, as batches."""
        out, left = [], n
        for x in self.inputs:
            if left <= 0:
                break
            out.append(x[:left])
            left -= len(out[-1])
        return out


def _read(data: Iterable | torch.Tensor, what: str) -> _Data:
    """Batches of inputs and, when every batch is an (inputs, labels) pair, the labels."""
    if isinstance(data, torch.Tensor):
        data = [data]
    inputs, labels = [], []
    for index, batch in enumerate(data):
        if isinstance(batch, torch.Tensor):
            inputs.append(batch.detach())
            labels.append(None)
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            inputs.append(batch[0].detach())
            label = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
            labels.append(label)
        else:
            raise UsageError(
                f"{what}: batch {index} is a {type(batch).__name__}; batches must be tensors or (inputs, labels) pairs"
            )
        if not bool(torch.isfinite(inputs[-1]).all()):
            raise NonFiniteError(f"{what}: batch {index} contains NaN or Inf; clean the data before analysing")
    if not inputs:
        raise UsageError(f"{what} yielded no batch; is the loader empty or exhausted?")
    have = [y is not None for y in labels]
    if any(have) and not all(have):
        raise UsageError(f"{what}: some batches have labels and some do not; give labels for all batches or none")
    return _Data(inputs, torch.cat(labels) if all(have) else None)


def _logits(out: object) -> torch.Tensor:
    """The model output compared with float: a tensor, or the first tensor of a tuple / list."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise UsageError(f"analyze compares tensor outputs; the model returned a {type(out).__name__}")
    return out.detach().float()


@torch.no_grad()
def _outputs(model: Callable, batches: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([_logits(model(x)) for x in batches])


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `test` against `reference`, in dB (capped at +-200)."""
    signal = float(reference.double().pow(2).sum())
    noise = float((test.double() - reference.double()).pow(2).sum())
    if noise == 0.0:
        return SQNR_CAP_DB
    if signal == 0.0:
        return -SQNR_CAP_DB
    return max(-SQNR_CAP_DB, min(SQNR_CAP_DB, 10.0 * math.log10(signal / noise)))


def fidelity(
    scheme: str, reference: torch.Tensor, test: torch.Tensor, labels: torch.Tensor | None, simulated: bool = False
) -> Fidelity:
    """SQNR, top-1 agreement with the reference and, with labels, top-1 accuracy."""
    if reference.dim() < 2:
        raise UsageError(f"top-1 needs class scores along dim 1; the model output has shape {tuple(reference.shape)}")
    predicted = test.argmax(1)
    agreement = 100.0 * float((predicted == reference.argmax(1)).float().mean())
    accuracy = None if labels is None else 100.0 * float((predicted == labels).float().mean())
    return Fidelity(scheme, sqnr_db(reference, test), agreement, accuracy, simulated)


# ---- which layer owns which quantizer ----------------------------------------------------------


def _observer(gm: GraphModule, node: object) -> RangeObserver | None:
    if isinstance(node, Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        return module if isinstance(module, RangeObserver) else None
    return None


def _weighted(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in WEIGHTED_OPS]


def _output_node(gm: GraphModule, layer: Node) -> Node | None:
    """The tensor a layer writes: itself or the end of its fused tail, the node its output observer reads."""
    node = layer
    while True:
        users = list(node.users)
        if any(_observer(gm, u) is not None for u in users):
            return node
        if len(users) != 1 or users[0].target not in _TAIL_OPS:
            return None
        node = users[0]


def _producer(gm: GraphModule, node: Node) -> Node:
    """Walk back through observers and pass-through ops to the node that computed the values."""
    while (_observer(gm, node) is not None or node.target in PASS_THROUGH_OPS) and node.args:
        node = node.args[0]
    return node


def _first_reader(gm: GraphModule, start: Node) -> Node | None:
    """The first conv / linear that reads `start` (through observers and pass-through ops)."""
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for user in node.users:
            if user.target in WEIGHTED_OPS and user.args[0] is node:
                return user
            if _observer(gm, user) is not None or user.target in PASS_THROUGH_OPS:
                frontier.append(user)
    return None


def quantizer_owners(gm: GraphModule) -> dict[str, str | None]:
    """For each observer of a prepared graph, the layer whose precision it follows (None: the scheme's default).

    A layer owns its weight quantizer and the quantizer of the tensor it writes, also
    where that tensor is read after pass-through ops; the network input follows the
    first layer that reads it. Residual adds, pools and other requantizing ops write at
    the scheme's default precision.
    """
    writes = {}
    for layer in _weighted(gm):
        out = _output_node(gm, layer)
        if out is not None:
            writes[out] = module_name(layer)
    owners: dict[str, str | None] = {}
    for node in gm.graph.nodes:
        if _observer(gm, node) is None or node.target in owners:
            continue
        source = node.args[0]
        owner = None
        if source.op == "get_attr":
            readers = [u for u in node.users if u.target in WEIGHTED_OPS]
            owner = module_name(readers[0]) if readers else None
        else:
            producer = _producer(gm, source)
            if producer in writes:
                owner = writes[producer]
            elif producer.op == "placeholder":
                reader = _first_reader(gm, node)
                owner = module_name(reader) if reader is not None else None
        owners[node.target] = owner
    return owners


# ---- the switchable simulation -------------------------------------------------------------------


def _qparams(
    observer: RangeObserver, bits: int, constant: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Scale and zero point the observer's range gives at `bits`, with the integer range.

    A weight (`constant`) at another width than its observer's is ranged on the tensor
    itself: its calibrated range may have been narrowed for that width (exponents.py).
    """
    wide = copy.deepcopy(observer)
    # An unsigned activation keeps its [0, 255] grid at its own width.
    if not (observer.unsigned and bits == 8):
        wide.quant_min, wide.quant_max = qrange(bits)
    if constant is not None and wide.quant_max != observer.quant_max:
        wide.min_val, wide.max_val = wide.extremes(constant)
    scale, zero_point = wide.calculate_qparams()
    return scale, zero_point.float(), wide.quant_min, wide.quant_max


class _Switch(nn.Module):
    """A calibrated observer turned into a fake-quantizer whose bit width can change (None: float).

    At 16 bit an activation takes its range from `wide`, the same quantizer calibrated at
    16 bit: the 8-bit range may clip what a 16-bit calibration covers (a range estimator
    trades clipping against an 8-bit step, and at 16 bit the step is 256 times finer).
    """

    def __init__(
        self, observer: RangeObserver, constant: torch.Tensor | None, wide: RangeObserver | None = None
    ) -> None:
        super().__init__()
        self.axis = observer.ch_axis
        self.symmetric = observer.symmetric
        self.power_of_2 = observer.power_of_2
        wide = observer if wide is None else wide
        self.params = {8: _qparams(observer, 8, constant), 16: _qparams(wide, 16, constant)}
        self.low, self.high = float(observer.min_val.min()), float(observer.max_val.max())
        self.constant = constant is not None
        self.bits: int | None = None
        self.outside = 0  # values seen beyond the calibrated range, while counting
        self.seen = 0
        self.counting = False
        self._cache: dict[int, torch.Tensor] = {}

    def quantize(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        scale, zero_point, qmin, qmax = self.params[bits]
        if scale.numel() > 1:
            shape = [1] * x.dim()
            shape[self.axis or 0] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        q = to_grid(x, scale, self.power_of_2)
        if self.symmetric:
            return q.clamp_(qmin, qmax).mul_(scale)
        return q.add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.counting:
            self.outside += int(((x < self.low) | (x > self.high)).sum())
            self.seen += x.numel()
        if self.bits is None:
            return x
        if not self.constant:
            return self.quantize(x, self.bits)
        if self.bits not in self._cache:
            self._cache[self.bits] = self.quantize(x, self.bits)
        return self._cache[self.bits]


def _wide_observer(wide: GraphModule, node: Node) -> RangeObserver:
    """The observer of `wide` at the place of `node`'s: both graphs come from one capture and prepare."""
    try:
        observer = wide.get_submodule(node.target)
    except AttributeError:
        observer = None
    if not isinstance(observer, RangeObserver):
        raise UsageError(f"the 16-bit graph has no quantizer {node.target!r}: calibrate both widths from one model")
    return observer


@dataclass
class _Bias:
    """A conv / linear bias: its value per bit width of the layer, and the quantizers that set its int32 grid."""

    tensor: torch.Tensor
    values: dict[int | None, torch.Tensor]
    input_switch: _Switch | None
    weight_switch: _Switch

    def set(self, bits: int | None) -> None:
        value = self.values[bits]
        in_bits = None if self.input_switch is None else self.input_switch.bits
        if bits is not None and in_bits is not None:
            value = _int32_bias(value, self.input_switch.params[in_bits][0] * self.weight_switch.params[bits][0])
        self.tensor.copy_(value)


def _int32_bias(bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The bias rounded to int32 at scale s_in * s_w, as `convert.quantize_biases` writes it.

    Without this rounding the simulation drifts measurably from the converted model:
    tiny bias errors flip activations that sit at a rounding edge, and flips add up.
    """
    q, scale = int32_bias(bias, scale)
    return q.to(bias.dtype) * scale


@dataclass
class _Layer:
    name: str
    kind: str
    weight: torch.Tensor
    weight_switch: _Switch
    output_switch: _Switch | None
    biases: list[_Bias]


class BitWidthSimulator:
    """A copy of a calibrated prepared graph whose quantizers run at chosen bit widths.

    `prepared` is calibrated with the 8-bit scheme and `wide` with its 16-bit counterpart
    (`sixteen_bit`), on the same data: each activation runs at 16 bit on the range that
    the 16-bit calibration chose, as in a mixed-precision model calibrated for real.
    Weights at either width are ranged on the weights themselves.
    """

    def __init__(self, prepared: GraphModule, wide: GraphModule, bias_correction: bool) -> None:
        gm = copy.deepcopy(prepared)
        owners = quantizer_owners(gm)
        switches: dict[str, _Switch] = {}
        for node in gm.graph.nodes:
            obs = _observer(gm, node)
            if obs is not None and node.target not in switches:
                weight = constant(gm, node.args[0])
                switches[node.target] = _Switch(obs, weight, None if weight is not None else _wide_observer(wide, node))
        self.layers = self._layers(gm, switches, bias_correction)
        for target, switch in switches.items():
            gm.set_submodule(target, switch)
        self.gm = gm
        self.switches = [(switch, owners[target]) for target, switch in switches.items()]
        self.input_switches = [
            switches[n.target] for n in gm.graph.nodes if n.target in switches and n.args[0].op == "placeholder"
        ]

    @staticmethod
    def _layers(gm: GraphModule, switches: dict[str, _Switch], bias_correction: bool) -> dict[str, _Layer]:
        layers: dict[str, _Layer] = {}
        for node in _weighted(gm):
            name = module_name(node)
            w_node, x_node = node.args[1], node.args[0]
            w_obs, x_obs = _observer(gm, w_node), _observer(gm, x_node)
            if w_obs is None or w_node.args[0].op != "get_attr":
                continue
            weight = constant(gm, w_node.args[0])
            w_switch = switches[w_node.target]
            groups = conv_groups(node)
            biases = []
            bias = constant(gm, node.args[2]) if len(node.args) > 2 else None
            if bias is not None:
                shift = {None: torch.zeros_like(bias), 8: torch.zeros_like(bias), 16: torch.zeros_like(bias)}
                if bias_correction and x_obs is not None and x_obs.channel_mean is not None:
                    # Calibration corrected the bias for 8-bit weights (correct_biases); undo that, apply per width.
                    for bits in (8, 16):
                        shift[bits] = mean_shift(weight, w_switch.quantize(weight, bits), x_obs.channel_mean, groups)
                base = bias - shift[8]
                values = {bits: base + s for bits, s in shift.items()}
                biases.append(_Bias(bias, values, switches.get(x_node.target) if x_obs else None, w_switch))
            if name in layers:
                layers[name].biases += biases
                continue
            out = _output_node(gm, node)
            out_switch = next((switches[u.target] for u in out.users if u.target in switches), None) if out else None
            kind = "depthwise conv" if is_depthwise(node, weight) else "conv"
            kind = "linear" if node.target == aten.linear.default else kind
            layers[name] = _Layer(name, kind, weight.detach(), w_switch, out_switch, biases)
        return layers

    @torch.no_grad()
    def configure(self, layers: int | None, others: int | None, overrides: dict[str, int | None] | None = None) -> None:
        """Bit width of every layer (`layers`, except `overrides` by name) and of the other quantizers."""
        overrides = overrides or {}
        for switch, owner in self.switches:
            switch.bits = others if owner is None else overrides.get(owner, layers)
        for name, layer in self.layers.items():
            for bias in layer.biases:
                bias.set(overrides.get(name, layers))

    def outputs(self, batches: list[torch.Tensor]) -> torch.Tensor:
        return _outputs(self.gm, batches)

    def count_outside(self, batches: list[torch.Tensor]) -> None:
        """Run float once, counting per quantizer the values beyond the calibrated range."""
        self.configure(None, None)
        for switch, _ in self.switches:
            switch.counting, switch.outside, switch.seen = True, 0, 0
        self.outputs(batches)
        for switch, _ in self.switches:
            switch.counting = False


def _outside_pct(switches: list[_Switch]) -> float:
    seen = sum(s.seen for s in switches)
    return 100.0 * sum(s.outside for s in switches) / seen if seen else 0.0


# ---- the analysis ------------------------------------------------------------------------------------


def _eight_bit(scheme: Scheme) -> Scheme:
    if (scheme.weight_bits, scheme.activation_bits) != (8, 8):
        raise UsageError(
            f"analyze compares an 8-bit scheme with its 16-bit counterpart; scheme {scheme.name!r} has "
            f"{scheme.weight_bits}-bit weights and {scheme.activation_bits}-bit activations. "
            "Pass an 8-bit scheme such as 'int8_pow2' or 'int8'."
        )
    # The analysis starts from every layer in 8 bit; its recommendation replaces any high_precision.
    return scheme.with_high_precision(None)


def sixteen_bit(scheme: Scheme) -> Scheme:
    """The same scheme (scales, granularity, symmetry) with 16-bit weights and activations."""
    wide = replace(scheme, weight_bits=16, activation_bits=16, high_precision=None)
    for preset in PRESETS.values():
        if replace(preset, name=wide.name, description=wide.description) == wide:
            return preset
    return replace(wide, name=f"{scheme.name} at 16 bit", description=f"{scheme.name} with 16-bit weights and outputs")


@dataclass(frozen=True)
class _Target:
    """When a quantized model counts as close to float: top-1 agreement, or output SQNR when given."""

    tolerance: float
    sqnr_db: float | None

    def met(self, f: Fidelity) -> bool:
        if self.sqnr_db is not None:
            return f.sqnr_db >= self.sqnr_db
        return f.top1_agreement >= 100.0 - self.tolerance

    def __str__(self) -> str:
        if self.sqnr_db is not None:
            return f"output SQNR >= {self.sqnr_db:.1f} dB"
        return f"top-1 agreement with float >= {100.0 - self.tolerance:.2f} %"


def _sweep(
    sim: BitWidthSimulator, inputs: list[torch.Tensor], reference: torch.Tensor, progress: bool
) -> list[LayerSensitivity]:
    """Each layer alone in 8 bit (rest float) and alone in 16 bit (rest 8 bit), with its weight and output ranges."""

    def sqnr(layers: int | None, overrides: dict[str, int | None]) -> float:
        sim.configure(layers, layers, overrides)
        return sqnr_db(reference, sim.outputs(inputs))

    found = []
    bar = tqdm(sim.layers.items(), desc="per-layer sweep", leave=False, disable=not progress or None)
    for position, (name, layer) in enumerate(bar):
        w = layer.weight
        out = layer.output_switch
        found.append(
            LayerSensitivity(
                rank=0,
                position=position,
                name=name,
                kind=layer.kind,
                sqnr_only_8bit_db=sqnr(None, {name: 8}),
                sqnr_keep_16bit_db=sqnr(8, {name: 16}),
                weight_min=float(w.min()),
                weight_max=float(w.max()),
                weight_abs_median=float(w.abs().median()),
                weight_zero_8bit_pct=100.0 * float((layer.weight_switch.quantize(w, 8) == 0).float().mean()),
                output_min=out.low if out is not None else math.nan,
                output_max=out.high if out is not None else math.nan,
                output_outside_range_pct=_outside_pct([out]) if out is not None else 0.0,
            )
        )
    # Most harmful first: lowest SQNR with only this layer in 8 bit, then most gain from keeping it in 16 bit.
    found.sort(key=lambda s: (s.sqnr_only_8bit_db, -s.sqnr_keep_16bit_db))
    return [replace(s, rank=i + 1) for i, s in enumerate(found)]


def _greedy(
    sim: BitWidthSimulator,
    ranked: list[LayerSensitivity],
    close: Callable[[list[str]], bool],
    progress: bool,
) -> list[str]:
    """Add layers down the ranking until the 8-bit model is close, then drop those it does not need."""
    chosen: list[str] = []
    bar = tqdm(ranked, desc="mixed-precision search", leave=False, disable=not progress or None)
    for layer in bar:
        chosen.append(layer.name)
        if close(chosen):
            break
    else:
        return chosen  # every conv / linear in 16 bit still misses: the 8-bit adds and pools hold it back
    for name in reversed(chosen[:-1]):
        trial = [n for n in chosen if n != name]
        if close(trial):
            chosen = trial
    return chosen


def analyze(
    model: nn.Module,
    data: Iterable | torch.Tensor,
    example_inputs: tuple[torch.Tensor, ...],
    scheme: str | Scheme = "int8_pow2",
    *,
    eval_data: Iterable | torch.Tensor | None = None,
    config: PTQConfig | None = None,
    tolerance: float = 0.5,
    target_sqnr_db: float | None = None,
    sweep_samples: int = 256,
    confirm: bool = True,
    progress: bool = True,
) -> AnalysisReport | DetectionAnalysis:
    """Diagnose an 8-bit PTQ scheme on your data: is the loss quantization, which layers, which to keep in 16 bit.

    For a torchvision detector (SSD, RetinaNet, FCOS) it returns a `DetectionAnalysis`
    instead: float, 16-bit and 8-bit mAP on (images, targets) batches (see `analyze_detector`).

    `data` calibrates the ranges and, unless `eval_data` is given, is also where the
    outputs are compared; batches are tensors or (inputs, labels) pairs (labels add
    top-1 accuracy). Give `eval_data` to compare on other data than you calibrate on,
    as deployment will. A model counts as close to float when its top-1 agrees with
    float's on at least 100 - `tolerance` % of the evaluation samples (or, with
    `target_sqnr_db`, when its output SQNR reaches that). The recommendation is the
    smallest set of 16-bit layers, found greedily down the ranking, that makes the 8-bit
    model close; the analysis starts from every layer in 8 bit, whatever the scheme's
    `high_precision`. The per-layer sweep runs on the first `sweep_samples` evaluation
    samples; `confirm` re-measures the recommendation on a freshly calibrated PTQModule.
    """
    base = _eight_bit(get_scheme(scheme))
    wide = sixteen_bit(base)
    if not 0 <= tolerance < 100:
        raise UsageError(f"tolerance is in points of top-1 agreement, between 0 and 100; got {tolerance}")
    if detector_family(model) is not None:
        return analyze_detector(model, data, example_inputs, base, eval_data, config, tolerance, progress)
    if sweep_samples < 1:
        raise UsageError(f"sweep_samples must be at least 1, got {sweep_samples}")
    target = _Target(tolerance, target_sqnr_db)
    calib = _read(data, "data")
    evaluation = calib if eval_data is None else _read(eval_data, "eval_data")
    labels = evaluation.labels
    reference = _outputs(copy.deepcopy(model).eval(), evaluation.inputs)

    def measure(s: Scheme) -> tuple[PTQModule, Fidelity]:
        ptq = PTQModule(model, example_inputs, s, config).calibrate(calib.inputs, progress=progress)
        return ptq, fidelity(s.name, reference, _outputs(ptq, evaluation.inputs), labels)

    ptq8, int8 = measure(base)
    ptq16, int16 = measure(wide)
    sim = BitWidthSimulator(ptq8.model, ptq16.model, ptq8.config.bias_correction)
    sim.count_outside(evaluation.inputs)
    sweep_inputs = evaluation.head(sweep_samples)
    sweep_reference = reference[: sum(len(x) for x in sweep_inputs)]
    ranked = _sweep(sim, sweep_inputs, sweep_reference, progress)
    sweep_int8, sweep_int16 = (sqnr_db(sweep_reference, _simulated(sim, bits, [], sweep_inputs)) for bits in (8, 16))

    def mixed(high: list[str]) -> Fidelity:
        outputs = _simulated(sim, 8, high, evaluation.inputs)
        return fidelity(f"{base.name}+16bit", reference, outputs, labels, simulated=True)

    chosen: list[str] = []
    recommended: Fidelity | None = None
    if target.met(int16):
        recommended = int8
        if not target.met(int8):
            chosen = _greedy(sim, ranked, lambda high: target.met(mixed(high)), progress)
            recommended = measure(base.with_high_precision(chosen))[1] if confirm else mixed(chosen)
    return AnalysisReport(
        scheme=base.name,
        scheme_16bit=wide.name,
        calibration_samples=calib.samples,
        eval_samples=evaluation.samples,
        sweep_samples=len(sweep_reference),
        target=str(target),
        float_accuracy=None if labels is None else fidelity("float", reference, reference, labels).top1_accuracy,
        int16=int16,
        int8=int8,
        verdict=_verdict(target.met(int16), target.met(int8)),
        input_outside_range_pct=_outside_pct(sim.input_switches),
        sweep_int8_sqnr_db=sweep_int8,
        sweep_int16_sqnr_db=sweep_int16,
        layers=ranked,
        recommended_high_precision=chosen,
        recommended=recommended,
        target_met=recommended is not None and target.met(recommended),
        dead_channels=ptq8.dead_channels,
    )


@torch.no_grad()
def analyze_detector(
    model: nn.Module,
    data: Iterable,
    example_inputs: tuple[torch.Tensor, ...],
    scheme: Scheme,
    eval_data: Iterable | None = None,
    config: PTQConfig | None = None,
    tolerance: float = 0.5,
    progress: bool = True,
) -> DetectionAnalysis:
    """`analyze` for a torchvision detector: float, 16-bit and 8-bit mAP and head SQNR on (images, targets) batches.

    Calibrates a PTQ `DetectionModule` at each width on `data`, and evaluates on
    `eval_data` (default: `data`), whose batches must carry targets.
    """
    wide = sixteen_bit(scheme)
    calibration = list(data)
    evaluation = calibration if eval_data is None else list(eval_data)
    if not all(isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[1], list) for b in evaluation):
        raise UsageError("analyze measures a detector's mAP: evaluation batches must be (images, targets) pairs")
    truth = [t for _, targets in evaluation for t in targets]
    images = [batch[0] for batch in evaluation]
    model = model.eval()
    float_found = [d for x in images for d in model(list(x))]
    widths = {}
    for s in (wide, scheme):
        qmodel = PTQModule(model, example_inputs, s, config).calibrate(calibration, progress=progress)
        core_float = DetectionCore(model, qmodel.family)
        inputs = [qmodel.core_inputs(x) for x in images]
        reference = torch.cat([_flat_heads(core_float(x)) for x in inputs])
        quantized = torch.cat([_flat_heads(qmodel.quantized(x)) for x in inputs])
        found = [d for x in images for d in qmodel(x)]
        widths[s.name] = (mean_average_precision(found, truth), sqnr_db(reference, quantized))
    float_map = mean_average_precision(float_found, truth)
    (int16_map, int16_sqnr), (int8_map, int8_sqnr) = widths[wide.name], widths[scheme.name]
    close16 = float_map["map"] - int16_map["map"] <= tolerance
    close8 = float_map["map"] - int8_map["map"] <= tolerance
    return DetectionAnalysis(
        scheme=scheme.name,
        scheme_16bit=wide.name,
        calibration_samples=sum(len(images_of(b)) for b in calibration),
        eval_samples=len(truth),
        tolerance=tolerance,
        float_map=float_map,
        int16_map=int16_map,
        int8_map=int8_map,
        int16_sqnr_db=int16_sqnr,
        int8_sqnr_db=int8_sqnr,
        verdict=_verdict(close16, close8),
    )


def _flat_heads(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """A detector network's head outputs as one (N, values) tensor, for SQNR."""
    return torch.cat([v.flatten(1) for v in outputs.values()], dim=1).float()


def _verdict(int16_close: bool, int8_close: bool) -> str:
    if not int16_close:
        return VERDICT_OUTSIDE
    return VERDICT_FINE if int8_close else VERDICT_QUANTIZATION


def _simulated(sim: BitWidthSimulator, bits: int, high: list[str], inputs: list[torch.Tensor]) -> torch.Tensor:
    """Outputs with every quantizer at `bits` except the `high` layers in 16 bit."""
    sim.configure(bits, bits, dict.fromkeys(high, 16))
    return sim.outputs(inputs)
