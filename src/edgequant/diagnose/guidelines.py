"""Guideline checks: what in a model or its training recipe will cost accuracy in fixed point.

Each finding names the modules or parameters it concerns and links to the section of
docs/guidelines.md that explains it. A finding is reported once per cause: one finding
lists every parameter that gets no weight decay, however the optimizer groups them, and
a wide activation range is reported at the layer that creates it, not at every layer
it flows through.

Which layer follows which decides whether a conv has a BN to fold into and which
tensors the engine quantizes. With example inputs it comes from the dataflow of the
torch.export graph (a conv is followed by BN only if the BN reads its output). Without
them, module registration order stands in for the dataflow: right for models that
register modules in the order they call them (torchvision's do), and the last conv or
linear layer is taken as the only prediction layer.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from ..core.errors import UsageError
from ..graph.batchnorm import DEAD_VARIANCE
from ..graph.capture import CaptureError, capture, check_example_inputs
from ..graph.ops import module_name
from ..numerics.scales import qrange, symmetric_scale
from ..surgery.adapt import adapt
from ..surgery.replacements import BY_NAME

DOC = "docs/guidelines.md"
SEVERITIES = ("error", "warning", "info")

# Recommended weight decay and the value below which it no longer holds ranges in check.
RECOMMENDED_WEIGHT_DECAY = 1e-4
MIN_WEIGHT_DECAY = 1e-5
# Depthwise-heavy: at least this many depthwise convs, making up at least this share of all convs.
DEPTHWISE_MIN_LAYERS = 3
DEPTHWISE_MIN_SHARE = 0.15
# A tensor is too wide for one int8 scale when more than this share of its nonzero values rounds to zero.
MAX_ZEROED_SHARE = 0.5

_WEIGHTED = (_ConvNd, nn.Linear)
_NORMS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
# Activations the engine runs inside the preceding conv / BN (no quantized tensor in between).
_FUSED_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
# Modules that keep a 1x1 map 1x1, and global pools that produce one.
_ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Sigmoid,
    nn.SiLU,
    nn.GELU,
    nn.Tanh,
    nn.LeakyReLU,
    nn.PReLU,
    *_NORMS,
)
_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
# Modules that do not change the dataflow between the layers around them.
_TRANSPARENT = (nn.Identity, nn.modules.dropout._DropoutNd)
# Probabilities: rounding the small ones to zero does not change a decision.
_PROBABILITIES = (nn.Softmax, nn.Softmin, nn.Softmax2d)


@dataclass(frozen=True)
class Finding:
    """One departure from the guidelines, worded for the person who trains the model."""

    severity: str  # "error": quantization fails or loses badly; "warning": likely 8-bit loss; "info": advice
    code: str  # stable id, also the section anchor in docs/guidelines.md
    subject: tuple[str, ...]  # module / parameter names (or the optimizer's class name)
    message: str
    doc: str = field(init=False)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise UsageError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")
        object.__setattr__(self, "subject", tuple(self.subject))
        object.__setattr__(self, "doc", f"{DOC}#{self.code}")

    def __str__(self) -> str:
        return f"{self.severity}: [{self.code}] {_names(self.subject)}: {self.message} (see {self.doc})"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields, for `--json` output."""
        data = asdict(self)
        data["subject"] = list(self.subject)
        return data


def checked_codes(optimizer: bool, example_inputs: bool, device: bool = False) -> list[str]:
    """The finding codes `check` looks for, given what it was handed."""
    codes = ["conv-without-bn", "depthwise-heavy", "dead-channel", "weight-range"]
    if example_inputs:
        codes += ["not-capturable", "activation-range"]
        codes += ["surgery-candidate"] if device else []
    if optimizer:
        codes += ["no-weight-decay", "low-weight-decay", "adam-optimizer"]
    return codes


def format_findings(findings: Sequence[Finding], checked: Sequence[str] | None = None) -> str:
    """A summary line, then one line per finding; `checked` names the rules that ran."""
    if not findings:
        return "No findings." + (f" Checked: {', '.join(checked)}." if checked else "")
    counts = [(s, sum(f.severity == s for f in findings)) for s in SEVERITIES]
    summary = ", ".join(f"{n} {s}{'s' if n > 1 else ''}" for s, n in counts if n)
    return "\n".join(
        [f"{len(findings)} finding{'s' if len(findings) > 1 else ''} ({summary}):"] + [f"  {f}" for f in findings]
    )


def check(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    device: str | None = None,
) -> list[Finding]:
    """Check a float model (and its optimizer) against docs/guidelines.md; errors first.

    The optimizer's param groups are read for weight decay; `example_inputs` enable the
    torch.export capture check, dataflow-exact layer order and activation ranges; with
    them, `device` lists what `eq.adapt` would replace for that TIDL device. The model
    is not changed.
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not hasattr(optimizer, "param_groups"):
        raise UsageError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    findings: list[Finding] = []
    graph = None
    if example_inputs is not None:
        example_inputs = check_example_inputs(example_inputs)
        try:
            graph = capture(model, example_inputs)
        except CaptureError as error:
            findings.append(_capture_finding(model, error))
    layout = _graph_layout(model, graph) if graph is not None else _order_layout(model)
    findings += _conv_without_bn(model, layout)
    findings += _depthwise_heavy(model)
    findings += _dead_channels(model, layout)
    findings += _weight_ranges(model, layout)
    if example_inputs is not None:
        untrained = _untrained_bn(model)
        findings += [_untrained_finding(untrained)] if untrained else _activation_ranges(model, example_inputs)
    if device is not None and example_inputs is not None and graph is not None:
        findings += _surgery_candidates(model, example_inputs, device)
    if optimizer is not None:
        findings += _optimizer_findings(model, optimizer)
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))


def _surgery_candidates(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], device: str) -> list[Finding]:
    """One finding per kind of replacement `eq.adapt` would make for `device` (and one for those it keeps)."""
    _, report = adapt(model, device, example_inputs)
    by_kind: dict[str, list[str]] = {}
    for change in report.changes:
        by_kind.setdefault(change.replacement, []).append(change.module)
    call = f"eq.adapt(model, device={report.device!r}, example_inputs=...)"
    findings = [
        Finding(
            "info",
            "surgery-candidate",
            tuple(dict.fromkeys(modules)),
            f"{call} would replace {_plural(len(set(modules)), 'module')}: {BY_NAME[kind].what} "
            + ("(exact)." if BY_NAME[kind].exact else "(approximate: fine-tune with eq.finetune_adapted)."),
        )
        for kind, modules in by_kind.items()
    ]
    if report.kept:
        reasons = "; ".join(dict.fromkeys(c.after.removeprefix("kept: ") for c in report.kept))
        findings.append(
            Finding(
                "info",
                "surgery-candidate",
                tuple(c.module for c in report.kept),
                f"{call} would keep {_plural(len(report.kept), 'candidate')} as they are: {reasons}.",
            )
        )
    return findings


def _names(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else many or word + 's'}"


def _short(x: float) -> str:
    """1e-4 rather than 0.0001 or 1e-04."""
    if x == 0 or abs(x) >= 1e-2:
        return f"{x:g}"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if name and not any(True for _ in m.children())]


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, _ConvNd) and module.groups > 1 and module.in_channels == module.groups


# --- which layer follows which --------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """The leaf module reading each leaf module's output (None: several readers or none)."""

    follower: dict[str, str | None]
    # Convs that need no BN: prediction layers, and 1x1 convs on 1x1 maps (fully connected in effect).
    exempt: frozenset[str]


def _graph_layout(model: nn.Module, graph: GraphModule) -> _Layout:
    leaves = dict(_leaves(model))
    weighted = {n for n, m in leaves.items() if isinstance(m, _WEIGHTED)}
    downstream: dict[Node, bool] = {}  # a conv / linear lies somewhere after this node
    for node in reversed(graph.graph.nodes):
        downstream[node] = any(module_name(u) in weighted or downstream[u] for u in node.users)
    follower: dict[str, str | None] = {}
    needs_bn: dict[str, bool] = {}
    for node in graph.graph.nodes:
        name = module_name(node)
        val = node.meta.get("val")
        if node.op != "call_function" or name not in leaves or not isinstance(val, torch.Tensor):
            continue
        if not val.is_floating_point() or all(module_name(u) == name for u in node.users):
            continue  # a counter, or a step inside the module
        users = list(node.users)
        nxt = module_name(users[0]) if len(users) == 1 else None
        nxt = nxt if nxt in leaves and nxt != name else None
        follower[name] = nxt if follower.get(name, nxt) == nxt else None
        if isinstance(leaves[name], _ConvNd):
            source = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], Node) else None
            fully_connected = isinstance(source, torch.Tensor) and all(s == 1 for s in source.shape[2:])
            needs_bn[name] = needs_bn.get(name, False) or (downstream[node] and not fully_connected)
    return _Layout(follower, frozenset(n for n, needed in needs_bn.items() if not needed))


def _order_layout(model: nn.Module) -> _Layout:
    leaves = [(n, m) for n, m in _leaves(model) if not isinstance(m, _TRANSPARENT)]
    follower = {name: (leaves[i + 1][0] if i + 1 < len(leaves) else None) for i, (name, _) in enumerate(leaves)}
    last = next(((n, m) for n, m in reversed(leaves) if isinstance(m, _WEIGHTED)), None)
    exempt = {last[0]} if last and isinstance(last[1], _ConvNd) else set()
    return _Layout(follower, frozenset(exempt | _convs_after_global_pool(leaves)))


def _convs_after_global_pool(leaves: list[tuple[str, nn.Module]]) -> set[str]:
    """1x1 convs that read a globally pooled map within the same parent (squeeze-excitation blocks)."""
    found: set[str] = set()
    pooled_in: str | None = None  # parent module in which the map in flight is 1x1
    for name, module in leaves:
        parent = name.rpartition(".")[0]
        if isinstance(module, _GLOBAL_POOLS) and module.output_size in (1, (1, 1)):
            pooled_in = parent
        elif parent != pooled_in:
            pooled_in = None
        elif isinstance(module, _ConvNd) and all(k == 1 for k in module.kernel_size):
            found.add(name)
        elif not isinstance(module, _ELEMENTWISE):
            pooled_in = None
    return found


def _bn_after(name: str, modules: dict[str, nn.Module], layout: _Layout) -> str | None:
    """The BN that the conv `name` folds into, if any."""
    conv, nxt = modules[name], layout.follower.get(name)
    if nxt is None or not isinstance(conv, _ConvNd) or isinstance(conv, _ConvTransposeNd):
        return None
    bn = modules[nxt]
    return nxt if isinstance(bn, _BatchNorm) and bn.num_features == conv.out_channels else None


# --- architecture -------------------------------------------------------------------------------


def _capture_finding(model: nn.Module, error: CaptureError) -> Finding:
    text = str(error)
    where = re.search(r"module `([^`]+)`", text)
    subject = where.group(1) if where else type(model).__name__
    return Finding("error", "not-capturable", (subject,), " ".join(ln.strip() for ln in text.splitlines()))


def _conv_without_bn(model: nn.Module, layout: _Layout) -> list[Finding]:
    modules = dict(model.named_modules())
    missing = [
        name
        for name in layout.follower
        if isinstance(modules[name], _ConvNd) and name not in layout.exempt and not _bn_after(name, modules, layout)
    ]
    if not missing:
        return []
    return [
        Finding(
            "warning",
            "conv-without-bn",
            tuple(missing),
            f"{_plural(len(missing), 'conv layer')} {'is' if len(missing) == 1 else 'are'} not followed by "
            "BatchNorm. Without BN folded in, a conv's output channels drift to unrelated scales that one "
            "quantization scale covers badly. Add BatchNorm after each (the final prediction conv is exempt).",
        )
    ]


def _depthwise_heavy(model: nn.Module) -> list[Finding]:
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, _ConvNd)]
    depthwise = [n for n, m in convs if _is_depthwise(m)]
    if len(depthwise) < DEPTHWISE_MIN_LAYERS or len(depthwise) < DEPTHWISE_MIN_SHARE * len(convs):
        return []
    return [
        Finding(
            "warning",
            "depthwise-heavy",
            tuple(depthwise),
            f"{len(depthwise)} of {len(convs)} conv layers are depthwise. After BN folding a depthwise layer's "
            "channels can differ in range by orders of magnitude, so expect a larger 8-bit drop than for a "
            "dense network: use per-channel depthwise weights (scheme 'int8_pow2_dw', or 'int8'), keep "
            "cross-layer equalization on in PTQ, and plan for QAT.",
        )
    ]


# --- ranges -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spread:
    """How one power-of-2 int8 scale (symmetric, per tensor) treats a tensor's nonzero values."""

    magnitudes: torch.Tensor | None  # |x| flattened, kept only when too wide (for the message)
    step: float
    zeroed: float  # share of the nonzero values that round to zero

    @property
    def too_wide(self) -> bool:
        return self.zeroed > MAX_ZEROED_SHARE

    def describe(self) -> str:
        assert self.magnitudes is not None, "only too-wide tensors are described"
        nonzero = self.magnitudes[self.magnitudes > 0]
        return (
            f"span up to {float(nonzero.max()):.3g} while the median nonzero magnitude is "
            f"{float(nonzero.median()):.3g}: one power-of-2 int8 scale (step {self.step:.3g}) rounds "
            f"{self.zeroed:.0%} of them to zero"
        )


_QMAX = qrange(8)[1]


def _spread(x: torch.Tensor) -> _Spread:
    magnitudes = x.detach().abs().flatten()
    nonzero = int(torch.count_nonzero(magnitudes))
    if nonzero == 0:
        return _Spread(None, 0.0, 0.0)
    step = float(symmetric_scale(magnitudes.max(), _QMAX, power_of_2=True))
    zeroed = (nonzero - int(torch.count_nonzero(magnitudes > step / 2))) / nonzero
    return _Spread(magnitudes if zeroed > MAX_ZEROED_SHARE else None, step, zeroed)


def _zeroed_per_channel(w: torch.Tensor) -> float:
    """Share of nonzero weights that round to zero with one power-of-2 scale per output channel."""
    rows = w.detach().abs().flatten(1)
    step = symmetric_scale(rows.amax(dim=1, keepdim=True), _QMAX, power_of_2=True)
    nonzero = rows > 0
    return float(((rows <= step / 2) & nonzero).sum() / nonzero.sum().clamp(min=1))


def _folded_weight(conv: nn.Module, bn: _BatchNorm | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight the engine runs (BN folded in, per output channel) and the fold factors."""
    w = conv.weight.detach().float()
    if bn is None or bn.running_var is None:
        return w, None
    gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(bn.running_var)
    factor = gamma / torch.sqrt(bn.running_var.float() + bn.eps)
    return w * factor.view(-1, *([1] * (w.dim() - 1))), factor


def _dead(bn: _BatchNorm) -> list[int]:
    """Channels whose BN saw a constant (running variance ~0), unless every channel did (untrained)."""
    if bn.running_var is None:
        return []
    dead = torch.nonzero(bn.running_var <= DEAD_VARIANCE * bn.eps).flatten().tolist()
    return dead if len(dead) < len(bn.running_var) else []


def _dead_channels(model: nn.Module, layout: _Layout) -> list[Finding]:
    modules = dict(model.named_modules())
    findings = []
    for name, module in _leaves(model):
        bn_name = _bn_after(name, modules, layout) if isinstance(module, _WEIGHTED) else None
        dead = _dead(modules[bn_name]) if bn_name else []
        if dead:
            shown = ", ".join(map(str, dead[:8])) + (" ..." if len(dead) > 8 else "")
            findings.append(
                Finding(
                    "warning",
                    "dead-channel",
                    (name,),
                    f"output channel{'s' if len(dead) > 1 else ''} {shown} {'have' if len(dead) > 1 else 'has'} "
                    f"running variance ~0 in {bn_name}: the layer's output there is constant on the training "
                    "data, usually because its input channel is dead (a ReLU that never fires, often after a "
                    "too-high learning rate). Folded, those weights are ~1/sqrt(eps) times too large; PTQModule "
                    "and QATModule zero them (the function is unchanged), so they no longer set the layer's range.",
                )
            )
    return findings


def _weight_ranges(model: nn.Module, layout: _Layout) -> list[Finding]:
    modules = dict(model.named_modules())
    findings = []
    for name, module in _leaves(model):
        if not isinstance(module, _WEIGHTED) or not isinstance(module.weight, nn.Parameter):
            continue
        bn_name = _bn_after(name, modules, layout)
        bn = modules[bn_name] if bn_name else None
        w, factor = _folded_weight(module, bn)
        if bn is not None and _dead(bn):
            w[_dead(bn)] = 0.0  # what the wrappers run (see dead-channel)
        spread = _spread(w)
        if not spread.too_wide:
            continue
        folded = f" (BN {bn_name} folded in)" if bn_name else ""
        message = f"weights{folded} {spread.describe()}."
        if factor is not None:
            widest = int(w.abs().flatten(1).amax(dim=1).argmax())
            if factor[widest].abs() > 10 * factor.abs().median():
                message += (
                    f" The BN fold causes it: channel {widest} has running variance "
                    f"{float(bn.running_var[widest]):.2g}: the conv's output there is constant on the data (often a "
                    "dead input channel). Zero that channel's folded weights, or retrain with weight decay on BN."
                )
        if _zeroed_per_channel(w) <= MAX_ZEROED_SHARE:
            message += " Per-channel weight scales (scheme 'int8', or 'int8_pow2_dw' for depthwise) avoid it."
        findings.append(Finding("error", "weight-range", (name,), message))
    return findings


def _fuses(first: nn.Module, second: nn.Module) -> bool:
    """The engine runs `second` inside `first`, quantizing only the output of `second`."""
    if isinstance(second, _BatchNorm):
        return isinstance(first, _WEIGHTED)
    return isinstance(second, _FUSED_ACTIVATIONS) and isinstance(first, (*_WEIGHTED, _BatchNorm))


def _tensors(values: Iterable[object]) -> list[torch.Tensor]:
    return [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]


@dataclass
class _Call:
    """One leaf-module call seen by the activation hooks."""

    name: str
    producers: list[int]  # calls whose outputs this call read
    input_wide: bool
    output: _Spread | None = None  # set when an output is too wide


@torch.no_grad()
def _activation_ranges(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[Finding]:
    """Run the model once with hooks; report each too-wide output where it first appears.

    The hooks also record which call read which call's output (tensor identity), so a
    conv -> BN -> ReLU chain is judged by its last output, as the engine quantizes it.
    """
    modules = dict(model.named_modules())
    calls: list[_Call] = []
    open_calls: dict[str, list[int]] = {}
    # By id of a live tensor: (version, spread) last measured, and (version, call) that wrote it.
    # Entries go when the tensor is freed, so a reused id is never mistaken for it; the version
    # tells in-place updates (ReLU(inplace=True)) apart.
    measured: dict[int, tuple[int, _Spread]] = {}
    producer: dict[int, tuple[int, int]] = {}
    finalizers: dict[int, weakref.finalize] = {}

    def forget(key: int) -> None:
        measured.pop(key, None)
        producer.pop(key, None)
        finalizers.pop(key, None)

    def track(x: torch.Tensor) -> None:
        if id(x) not in finalizers:
            finalizers[id(x)] = weakref.finalize(x, forget, id(x))

    def spread_of(x: torch.Tensor) -> _Spread:
        track(x)
        entry = measured.get(id(x))
        if entry is None or entry[0] != x._version:
            entry = measured[id(x)] = (x._version, _spread(x))
        return entry[1]

    def before(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            xs = _tensors(args)
            written = [producer.get(id(x)) for x in xs]
            sources = [w[1] for x, w in zip(xs, written, strict=True) if w is not None and w[0] == x._version]
            calls.append(_Call(name, sources, any(spread_of(x).too_wide for x in xs)))
            open_calls.setdefault(name, []).append(len(calls) - 1)

        return hook

    def after(name: str):
        def hook(_module: nn.Module, _args: tuple, output: object) -> None:
            index = open_calls[name].pop()
            call = calls[index]
            for x in _tensors(output if isinstance(output, tuple | list) else [output]):
                track(x)
                producer[id(x)] = (x._version, index)
                spread = spread_of(x)
                if spread.too_wide and (call.output is None or spread.zeroed > call.output.zeroed):
                    call.output = spread

        return hook

    modes = {m: m.training for m in model.modules()}
    handles = []
    for name, module in _leaves(model):
        handles.append(module.register_forward_pre_hook(before(name)))
        handles.append(module.register_forward_hook(after(name)))
    try:
        model.eval()
        model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
        for finalizer in list(finalizers.values()):
            finalizer.detach()

    findings = [
        _activation_finding((f"example_inputs[{i}]",), spread)
        for i, spread in enumerate(_spread(x) for x in inputs)
        if spread.too_wide
    ]
    fused_from = {
        j: call.producers[0]
        for j, call in enumerate(calls)
        if len(call.producers) == 1 and _fuses(modules[calls[call.producers[0]].name], modules[call.name])
    }
    absorbed = set(fused_from.values())
    widest: dict[tuple[str, ...], _Spread] = {}
    for j, call in enumerate(calls):
        if call.output is None or j in absorbed or isinstance(modules[call.name], _PROBABILITIES):
            continue
        unit = [j]
        while unit[0] in fused_from:
            unit.insert(0, fused_from[unit[0]])
        if calls[unit[0]].input_wide:
            continue  # the range comes from upstream and is reported there
        subject = tuple(calls[k].name for k in unit)
        if subject not in widest or call.output.zeroed > widest[subject].zeroed:
            widest[subject] = call.output
    return findings + [_activation_finding(subject, spread) for subject, spread in widest.items()]


def _untrained_bn(model: nn.Module) -> list[str]:
    """The BN layers, if every one still has its initial statistics (mean 0, variance 1)."""
    bns = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.running_var is not None]
    untrained = all(bool((m.running_mean == 0).all() and (m.running_var == 1).all()) for _, m in bns)
    return [name for name, _ in bns] if untrained else []


def _untrained_finding(bns: list[str]) -> Finding:
    return Finding(
        "info",
        "untrained-bn",
        tuple(bns),
        "every BatchNorm still has its initial statistics (mean 0, variance 1), so the model looks untrained "
        "and its activations say nothing about the trained model's: activation ranges were not checked. "
        "Check the trained model (load its weights) to include them.",
    )


def _activation_finding(subject: tuple[str, ...], spread: _Spread) -> Finding:
    return Finding(
        "error",
        "activation-range",
        subject,
        f"on the example inputs, the output values {spread.describe()}. Find what produces the outliers (an "
        "unnormalized input, a BN with a huge bias, a missing activation) and bound it, or keep this layer in "
        "16 bit with scheme.with_high_precision([...]).",
    )


# --- training recipe ----------------------------------------------------------------------------


def _parameter_kinds(model: nn.Module) -> dict[str, str]:
    kinds = {}
    for prefix, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            name = f"{prefix}.{pname}" if prefix else pname
            if isinstance(module, _NORMS):
                kinds[name] = "norm"
            elif pname == "weight" and _is_depthwise(module):
                kinds[name] = "depthwise"
            else:
                kinds[name] = "bias" if pname == "bias" else "weight"
    return kinds


_KIND_WORDS = {
    "bias": ("bias", "biases"),
    "norm": ("normalization parameter", "normalization parameters"),
    "depthwise": ("depthwise weight", "depthwise weights"),
    "weight": ("other weight", "other weights"),
}


def _kind_summary(names: list[str], kinds: dict[str, str]) -> str:
    parts = []
    for kind, (one, many) in _KIND_WORDS.items():
        n = sum(kinds.get(name, "weight") == kind for name in names)
        if n:
            parts.append(_plural(n, one, many))
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _optimizer_findings(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[Finding]:
    names = {id(p): n for n, p in model.named_parameters()}
    kinds = _parameter_kinds(model)
    no_decay: list[str] = []
    low_decay: dict[str, float] = {}
    for group in optimizer.param_groups:
        decay = float(group.get("weight_decay", 0.0))
        for p in group["params"]:
            name = names.get(id(p))
            if name is None or not p.requires_grad:
                continue
            if decay == 0:
                no_decay.append(name)
            elif decay < MIN_WEIGHT_DECAY:
                low_decay[name] = decay
    findings = []
    if no_decay:
        findings.append(
            Finding(
                "warning",
                "no-weight-decay",
                tuple(no_decay),
                f"weight decay is 0 for {_kind_summary(no_decay, kinds)}. Nothing then stops their values from "
                "growing during training, and a few large values set the quantization range of the whole tensor. "
                f"Apply weight decay (about {_short(RECOMMENDED_WEIGHT_DECAY)}) to every parameter, biases, BN and "
                "depthwise weights included.",
            )
        )
    if low_decay:
        values = sorted(set(low_decay.values()))
        shown = _short(values[0]) if len(values) == 1 else f"{_short(values[0])} to {_short(values[-1])}"
        findings.append(
            Finding(
                "warning",
                "low-weight-decay",
                tuple(low_decay),
                f"weight decay {shown} for {_kind_summary(list(low_decay), kinds)} is below "
                f"{_short(MIN_WEIGHT_DECAY)}, too weak to keep weight ranges tight. "
                f"Use about {_short(RECOMMENDED_WEIGHT_DECAY)}.",
            )
        )
    kind = type(optimizer).__name__
    if "adam" in kind.lower():
        findings.append(
            Finding(
                "info",
                "adam-optimizer",
                (kind,),
                f"{kind} scales every parameter's step by its own gradient history, which tends to leave a few "
                "large outlier weights. SGD with momentum and a decaying learning rate gives tighter weight ranges "
                "that quantize more reliably.",
            )
        )
    return findings
