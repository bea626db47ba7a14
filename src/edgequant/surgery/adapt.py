"""`adapt`: a copy of a float model with what the device runs badly replaced, and a report of each change.

Which replacements a device wants comes from TIDL's rule table (export/tidl_check.py):
a replacement applies when one of its rules is checked on the device. Every change is
checked on the tensor the module received in an example pass: the output shape must
stay, and an exact replacement must give the original output to float rounding.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import EdgequantError, UsageError
from ..core.files import write_atomic
from ..export.devices import Device, get_device
from ..export.parity import output_sqnr_db
from ..export.tidl_check import device_rules
from ..graph.capture import capture, check_example_inputs
from ..wrappers.detection import DetectionCore, detector_family, images_of, network_inputs
from .replacements import BY_NAME, REPLACEMENTS, SQUEEZE_EXCITATION, Replacement

MAX_PASSES = 6  # a conv takes at most four replacements in turn; a pass more finds nothing
# An exact replacement may differ from the original by float rounding only.
EXACT_RTOL = 1e-4


@dataclass(frozen=True)
class Change:
    """One module of the model: what it was, what it became (or why it stayed)."""

    module: str  # its path in the adapted model
    replacement: str  # the Replacement's name
    before: str
    after: str  # the new module, or "kept: why"
    exact: bool
    note: str = ""


@dataclass
class AdaptReport:
    """Every change `adapt` made, the candidates it kept, and how close the adapted model stays."""

    device: str
    replacements: tuple[str, ...]  # those that were enabled
    changes: list[Change] = field(default_factory=list)
    kept: list[Change] = field(default_factory=list)
    output_sqnr_db: float = float("inf")  # adapted against original on the example inputs, before fine-tuning

    @property
    def exact(self) -> bool:
        """True when every change preserves the function: the adapted model needs no fine-tuning."""
        return all(c.exact for c in self.changes)

    @property
    def summary(self) -> str:
        """One line: how many changes of each kind."""
        if not self.changes:
            return f"adapt for {self.device}: nothing to change" + (f" ({len(self.kept)} kept)" if self.kept else "")
        counts: dict[str, int] = {}
        for change in self.changes:
            counts[change.replacement] = counts.get(change.replacement, 0) + 1
        kinds = ", ".join(f"{n} {name}" for name, n in counts.items())
        closeness = "exact" if self.exact else f"output SQNR {self.output_sqnr_db:.1f} dB before fine-tuning"
        kept = f"; {len(self.kept)} candidates kept" if self.kept else ""
        return f"adapt for {self.device}: {len(self.changes)} changes ({kinds}); {closeness}{kept}"

    def __str__(self) -> str:
        lines = [self.summary]
        for c in self.changes:
            kind = "exact" if c.exact else "approximate"
            lines.append(f"  {c.module}: {c.before} -> {c.after} ({kind})" + (f"; {c.note}" if c.note else ""))
        lines += [f"  {c.module}: {c.before} {c.after}" for c in self.kept]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (JSON-ready)."""
        data = asdict(self)
        data["exact"] = self.exact
        data["output_sqnr_db"] = None if np.isinf(self.output_sqnr_db) else self.output_sqnr_db
        return data

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON, atomically."""
        return write_atomic(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())


def default_replacements(device: str | Device) -> frozenset[str]:
    """The replacements `adapt` makes for `device`: those whose TIDL rules are checked on it."""
    rules = {rule.id for rule in device_rules(device)}
    return frozenset(r.name for r in REPLACEMENTS if rules.intersection(r.rules))


def _enabled(replacements: Collection[str] | None, device: Device) -> tuple[Replacement, ...]:
    if replacements is None:
        names = default_replacements(device)
    elif isinstance(replacements, str) or not isinstance(replacements, Collection):
        raise UsageError("replacements must be a collection of names, e.g. {'silu', 'max-pool'}")
    else:
        unknown = sorted(set(replacements) - set(BY_NAME))
        if unknown:
            raise UsageError(f"unknown replacements {unknown}; valid: {', '.join(BY_NAME)}")
        names = frozenset(replacements)
    return tuple(r for r in REPLACEMENTS if r.name in names)


def _describe(module: nn.Module) -> str:
    """A short one-line description of a module (a Sequential's children joined)."""
    if isinstance(module, nn.Sequential):
        return " + ".join(_describe(m) for m in module)
    text = " ".join(repr(module).split())
    return text if len(text) <= 100 else text[:97] + "..."


def tensors_in(value: object) -> Iterator[torch.Tensor]:
    """The tensors of a model output (tensor, dict, tuple or list, nested), in order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from tensors_in(v)


class _Recorder:
    """Forward hooks that keep, per module, the first tensor it received and its output in the last pass."""

    def __init__(self, model: nn.Module) -> None:
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.outputs: dict[nn.Module, list[torch.Tensor]] = {}
        # Replacements look at leaf modules and squeeze-excitation blocks only.
        watched = [
            m
            for m in model.modules()
            if m is not model and (not next(m.children(), None) or type(m).__name__ in SQUEEZE_EXCITATION)
        ]
        self._hooks = [m.register_forward_hook(self._hook) for m in watched]

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        first = next(tensors_in(args), None)
        if first is not None and module not in self.inputs:
            self.inputs[module] = first.detach().clone()
            self.outputs[module] = [t.detach() for t in tensors_in(output)]

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _forward(model: nn.Module, inputs: tuple[Any, ...], detector: bool) -> Any:
    """The model in eval mode on the example inputs (its modes restored after): a detector's core outputs."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            if detector:
                return DetectionCore(model, detector_family(model))(network_inputs(model.transform, inputs[0]))
            return model(*inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode


def _check(change: Change, new: nn.Module, x: torch.Tensor | None, expected: list[torch.Tensor] | None) -> None:
    """Refuse a replacement that changes the output shape, and report an exact one that changes values."""
    if x is None or expected is None:
        return
    was = new.training
    new.eval()
    with torch.no_grad():
        got = list(tensors_in(new(x)))
    new.train(was)
    shapes = [tuple(t.shape) for t in got], [tuple(t.shape) for t in expected]
    if shapes[0] != shapes[1]:
        raise UsageError(
            f"{change.module}: replacing {change.before} by {change.after} would change its output shape from "
            f"{shapes[1]} to {shapes[0]}; leave {change.replacement!r} out of replacements"
        )
    if change.exact:
        for a, b in zip(got, expected, strict=True):
            scale = float(b.abs().max()) if b.numel() else 0.0
            if not torch.allclose(a, b, rtol=EXACT_RTOL, atol=EXACT_RTOL * max(scale, 1e-12)):
                raise EdgequantError(
                    f"{change.module}: the exact replacement {change.replacement!r} changed the output by up to "
                    f"{float((a - b).abs().max()):.3g} (please report this); leave it out of replacements meanwhile"
                )


def _pass(
    model: nn.Module, inputs: tuple[Any, ...], enabled: tuple[Replacement, ...], report: AdaptReport, detector: bool
) -> int:
    """One example pass, then one sweep over the modules: returns how many were replaced."""
    recorder = _Recorder(model)
    try:
        _forward(model, inputs, detector)
    finally:
        recorder.close()
    kept = {c.module for c in report.kept}
    done: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or any(name.startswith(prefix + ".") for prefix in done):
            continue
        x = recorder.inputs.get(module)
        for replacement in enabled:
            built = replacement.build(module, x)
            if built is None:
                continue
            if isinstance(built, str):
                if name not in kept:
                    report.kept.append(Change(name, replacement.name, _describe(module), built, replacement.exact))
                    kept.add(name)
                continue
            change = Change(
                name, replacement.name, _describe(module), _describe(built), replacement.exact, replacement.note
            )
            built.train(module.training)
            _check(change, built, x, recorder.outputs.get(module))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, built)
            report.changes.append(change)
            done.append(name)
            break
    return len(done)


def adapt(
    model: nn.Module,
    device: str | Device = "TDA4VM",
    example_inputs: tuple[Any, ...] | None = None,
    replacements: Collection[str] | None = None,
) -> tuple[nn.Module, AdaptReport]:
    """A copy of `model` in which what `device` runs badly or not at all is replaced, and the report.

    `replacements` None takes the device's (`default_replacements`): on TDA4VM all of
    them, as TI's lite models do; on the newer devices the exact ones (and, on AM62A,
    the activations it has no look-up tables for). Name them to choose. `example_inputs`
    (at the deployment size; `(images,)` for a torchvision detector) give the shapes the
    replacements and their checks need. The user's model is never modified.
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    target = get_device(device)
    enabled = _enabled(replacements, target)
    if example_inputs is None:
        raise UsageError("adapt needs example_inputs=(x,) at the size the model is deployed at")
    detector = detector_family(model) is not None
    if detector:
        if not isinstance(example_inputs, (tuple, list)) or len(example_inputs) != 1:
            raise UsageError("a detector takes example_inputs=(images,): one (N, 3, H, W) batch at the deployment size")
        inputs: tuple[Any, ...] = (images_of(example_inputs[0]),)
    else:
        inputs = check_example_inputs(example_inputs)
        capture(model, inputs)  # a model the wrappers cannot take is refused here, in a short message
    adapted = copy.deepcopy(model)  # each module keeps its train / eval mode; passes run in eval and restore it
    report = AdaptReport(target.name, tuple(r.name for r in enabled))
    for _ in range(MAX_PASSES):
        if not _pass(adapted, inputs, enabled, report, detector):
            break
    before = [t.numpy(force=True) for t in tensors_in(_forward(model, inputs, detector))]
    after = [t.numpy(force=True) for t in tensors_in(_forward(adapted, inputs, detector))]
    if [a.shape for a in after] != [b.shape for b in before]:
        raise UsageError(
            f"the adapted model's outputs have shapes {[a.shape for a in after]}, the original's "
            f"{[b.shape for b in before]}; leave the replacements listed in the report out"
        )
    report.output_sqnr_db = output_sqnr_db(before, after)
    for module in adapted.modules():  # an in-place dropout after a new ReLU would break its backward
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return adapted, report
