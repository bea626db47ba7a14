"""Graph capture with torch.export, and errors that point at the user's code.

torch.export's failures are long dynamo traces; users need the module, the line,
the reason and the fix. The batch dimension is exported as dynamic so a wrapped
model runs at any batch size.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..core.errors import CaptureWarning, EdgequantError, UsageError
from .ops import module_name


class CaptureError(EdgequantError, RuntimeError):
    """torch.export could not turn the model into a graph.

    `torch_log` holds what torch printed while trying (its graph dumps and logged
    tracebacks run to thousands of lines); set EDGEQUANT_DEBUG=1 to see it live.
    """

    def __init__(self, message: str, torch_log: str = "") -> None:
        super().__init__(message)
        self.torch_log = torch_log


@contextlib.contextmanager
def torch_output() -> Iterator[list[str]]:
    """Hold back what torch writes to stderr (file descriptor 2, C++ included) meanwhile.

    Yields a list that receives the text; the caller decides whether to show it.
    With EDGEQUANT_DEBUG=1 nothing is held back.
    """
    held: list[str] = []
    if os.environ.get("EDGEQUANT_DEBUG"):
        yield held
        return
    sys.stderr.flush()
    saved = os.dup(2)
    python_stderr = sys.stderr
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(2), "wb"), write_through=True)
            try:
                yield held
            finally:
                sys.stderr.flush()
                sys.stderr.close()
                sys.stderr = python_stderr
                os.dup2(saved, 2)
                sink.seek(0)
                held.append(sink.read().decode(errors="replace"))
    finally:
        os.close(saved)


# GraphModule.meta key: the qualified class name of the model that was captured.
MODEL_CLASS_KEY = "edgequant_model_class"


_HINTS = (
    (
        ("data-dependent", "Could not guard on data-dependent", "GuardOnDataDependentSymNode"),
        "Python control flow depends on tensor values. Replace the `if`/loop on a tensor "
        "with tensor ops (torch.where, masking) or torch.cond, or compute the condition "
        "from shapes and constants only.",
    ),
    (
        (".numpy()", "numpy", ".tolist()", ".item()"),
        "the model leaves PyTorch (numpy / .item() / .tolist()). Keep the computation in torch ops.",
    ),
    (
        ("Constraints violated", "specialized", "batch"),
        "the code fixes the batch size (for example x.view(64, -1)). Use x.flatten(1) or "
        "x.reshape(x.shape[0], -1) so that any batch size works.",
    ),
    (
        ("Unsupported", "not supported", "graph break"),
        "this construct is not supported by torch.export. Move it out of forward(), or "
        "rewrite it with plain tensor ops.",
    ),
)


def check_example_inputs(example_inputs: object) -> tuple[torch.Tensor, ...]:
    """Validate example inputs early: a tuple of float tensors with a batch dimension."""
    if isinstance(example_inputs, torch.Tensor):
        raise UsageError("example_inputs must be a tuple of tensors, e.g. example_inputs=(x,)")
    if not isinstance(example_inputs, Sequence) or not example_inputs:
        raise UsageError("example_inputs must be a non-empty tuple of tensors, e.g. (x,)")
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise UsageError(f"example_inputs[{i}] is a {type(x).__name__}, expected a torch.Tensor")
        if not x.is_floating_point():
            raise UsageError(f"example_inputs[{i}] has dtype {x.dtype}; the model input must be a float tensor")
        if x.dim() < 2:
            raise UsageError(f"example_inputs[{i}] has shape {tuple(x.shape)}; expected a batch dimension first")
    return tuple(example_inputs)


def check_input_dtypes(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Inputs must have the dtype of the model's weights (float64 data into a float32 model fails late)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        return
    (dtype,) = dtypes
    for i, x in enumerate(example_inputs):
        if x.dtype != dtype:
            raise UsageError(
                f"example_inputs[{i}] has dtype {x.dtype} but the model's weights are {dtype}; "
                f"convert the inputs with .to({dtype})"
            )


def batch_of_two(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The inputs, repeated to a batch of two if they have one sample.

    torch.export specialises size-1 dims (a dynamic batch needs two), and BN in train
    mode rejects a batch of one.
    """
    return tuple(x if x.shape[0] >= 2 else x.repeat(2, *([1] * (x.dim() - 1))) for x in inputs)


def _user_frames(message: str) -> list[tuple[str, int, str]]:
    frames = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.*)', message)
    return [(f, int(line), code.strip()) for f, line, code in frames if "/torch/" not in f]


def _module_at(model: nn.Module, filename: str, line: int) -> str | None:
    """Name of the submodule whose forward() contains filename:line, deepest first."""
    best = None
    for name, module in model.named_modules():
        forward = type(module).forward
        try:
            src, start = inspect.getsourcelines(forward)
            file = inspect.getsourcefile(forward)
        except (OSError, TypeError):
            continue
        if file == filename and start <= line < start + len(src):
            best = name or "<root>"
    return best


def explain_export_failure(model: nn.Module, error: BaseException) -> str:
    """A short, human message for a torch.export failure."""
    message = str(error)
    reason = next((ln.strip() for ln in message.splitlines() if ln.strip()), type(error).__name__)
    where = ""
    frames = _user_frames(message)
    if frames:
        filename, line, code = frames[-1]
        module = _module_at(model, filename, line)
        owner = "the model"
        if module:
            kind = type(model.get_submodule("" if module == "<root>" else module)).__name__
            owner = f"module `{module}` ({kind})"
        where = f" in {owner} at {filename}:{line}: `{code}`"
    hint = next((h for keys, h in _HINTS if any(k in message for k in keys)), None)
    text = f"torch.export cannot capture {type(model).__name__}{where}.\nReason: {reason[:300]}"
    if hint:
        text += f"\nFix: {hint}"
    return text


def model_class(model: nn.Module) -> str:
    """The user's model class; a graph captured before (QAT from PTQ) keeps its original class."""
    if isinstance(model, torch.fx.GraphModule) and MODEL_CLASS_KEY in model.meta:
        return model.meta[MODEL_CLASS_KEY]
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _shape_error(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> str | None:
    """Why the model cannot run on `inputs` eagerly at all (wrong shape, channels), if it cannot."""
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    except Exception as error:
        first = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), type(error).__name__)
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
        return (
            f"{type(model).__name__} does not run on example_inputs of shape {shapes}: {first[:300]}\n"
            "Pass example inputs shaped like the real data (batch first), e.g. (torch.randn(2, 3, 224, 224),)."
        )
    return None


# Layers whose train / eval behaviour the wrappers switch on the graph itself.
SWITCHED_LAYERS = (_BatchNorm, nn.modules.dropout._DropoutNd)
RANDOM_OPS = ("bernoulli", "rand", "randn", "randint", "randperm", "normal", "uniform", "multinomial")


def _capture_mode(model: nn.Module) -> nn.Module:
    """BN and dropout in train mode, every other module in eval mode.

    One graph serves training and evaluation; the wrappers switch its BN and dropout
    nodes. Any other `if self.training:` branch (stochastic depth, auxiliary heads)
    is frozen at capture, and it must be the eval branch: a train branch would keep
    dropping paths at random after `eval()` and in the exported model.
    """
    for module in model.modules():
        module.training = isinstance(module, SWITCHED_LAYERS)
    cumulative = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.momentum is None]
    if cumulative:
        # BN's cumulative average divides by its batch counter, a data-dependent value
        # torch.export cannot trace; the graph updates with a fixed momentum instead.
        for name in cumulative:
            model.get_submodule(name).momentum = 0.1
        warnings.warn(
            f"BN layers with momentum=None (cumulative average) cannot be captured; {_names(cumulative)} "
            "will update their running statistics with momentum 0.1 during QAT",
            CaptureWarning,
            stacklevel=3,
        )
    return model


def _names(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(f"`{n}`" for n in names[:shown]) + more


def warn_random_ops(graph: torch.fx.GraphModule) -> None:
    """Random ops that no train / eval switch reaches would make eval and export non-deterministic."""
    found = []
    for node in graph.graph.nodes:
        op = str(getattr(node.target, "_overloadpacket", node.target)).removeprefix("aten.")
        if node.op == "call_function" and op.rstrip("_").removesuffix("_like") in RANDOM_OPS:
            found.append(f"aten.{op} in `{module_name(node) or '<root>'}`")
    if found:
        warnings.warn(
            f"the captured graph draws random numbers ({', '.join(sorted(set(found)))}) outside nn.Dropout; "
            "they run in eval mode and in the exported model too. Make them depend on self.training or remove them.",
            CaptureWarning,
            stacklevel=3,
        )


def _first_line(error: BaseException) -> str:
    return next((ln.strip() for ln in str(error).splitlines() if ln.strip()), type(error).__name__)[:300]


def _check_other_sizes(
    model: nn.Module, graph: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...], log: str
) -> None:
    """Run the captured graph on fake inputs of twice the size: guards that pin sizes fail there."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    larger = [torch.Size([2, x.shape[1], *(2 * d for d in x.shape[2:])]) for x in inputs]
    buffers = {name: b.clone() for name, b in graph.named_buffers()}  # BN counters would move
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            graph(*(torch.empty(shape, dtype=x.dtype) for shape, x in zip(larger, inputs, strict=True)))
    except Exception as error:
        raise CaptureError(_fixed_size_message(model, error), log) from None
    finally:
        with torch.no_grad():
            for name, b in graph.named_buffers():
                b.copy_(buffers[name])


def _fixed_size_message(model: nn.Module, error: BaseException) -> str:
    return (
        f"{type(model).__name__} does not run at every input size (for example a flatten before a linear "
        "layer, a reshape to fixed sizes, or skip connections that need sizes divisible by a stride): "
        "dynamic_spatial=True is for fully convolutional models. Pass example_inputs at the size you run "
        f"instead.\nReason: {_first_line(error)}"
    )


def _spatial_dims(index: int, x: torch.Tensor) -> dict[int, torch.export.Dim]:
    """Symbolic sizes for every dim after the channels, from half the example's size up.

    The lower bound keeps torch.export from specializing deep feature maps to size 1.
    """
    return {d: torch.export.Dim(f"input{index}_dim{d}", min=max(2, x.shape[d] // 2)) for d in range(2, x.dim())}


def capture(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    dynamic_spatial: bool = False,
    share_weights: bool = False,
) -> torch.fx.GraphModule:
    """Export a copy of `model` (batch dimension dynamic) to an ATen graph module.

    BN and dropout are captured in train mode for the wrappers to switch; the rest of
    the model in eval mode (see `_capture_mode`). With `share_weights` the graph reads
    the caller's parameters and buffers instead of copies (one float copy of the model
    less at PTQ's memory peak): for callers that never write into them.
    """
    inputs = batch_of_two(check_example_inputs(example_inputs))
    check_input_dtypes(model, inputs)
    name = model_class(model)
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch, **(_spatial_dims(i, x) if dynamic_spatial else {})} for i, x in enumerate(inputs))
    # The exported graph would share parameters with the caller's model; QAT must not
    # train the user's float model in place.
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())} if share_weights else {}
    model = _capture_mode(copy.deepcopy(model, shared))
    failure, log = None, ""
    with torch_output() as held:
        try:
            program = torch.export.export(model, inputs, dynamic_shapes=dynamic)
        except Exception as dynamic_error:
            failure = dynamic_error
            try:
                torch.export.export(model, inputs)
                static = True
            except Exception:
                static = False
    log = "".join(held)
    if failure is None:
        sys.stderr.write(log)  # warnings of a capture that worked stay visible
    elif static and dynamic_spatial:
        raise CaptureError(_fixed_size_message(model, failure), log) from None
    elif static:
        raise CaptureError(
            explain_export_failure(model, failure)
            + "\nThe model exports at a fixed batch size only; wrapping needs any batch size to work.",
            log,
        ) from None
    else:
        shape_error = _shape_error(model, inputs)
        if shape_error:
            raise UsageError(shape_error) from None
        raise CaptureError(explain_export_failure(model, failure), log) from None
    graph = program.module()
    if dynamic_spatial:
        _check_other_sizes(model, graph, inputs, log)
    graph.meta[MODEL_CLASS_KEY] = name
    warn_random_ops(graph)
    return graph
