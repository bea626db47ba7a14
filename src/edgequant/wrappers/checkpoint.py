"""Checkpoints of the quantization wrappers, and errors that say why one does not fit.

A checkpoint is the wrapper's state_dict plus what it was made from: the wrapper
class, the float model's class, the scheme, the wrapper's config and the edgequant
version. Loading compares those first, so a checkpoint from another scheme or
architecture is refused with the reason instead of failing deep inside torch or,
worse, loading ranges that mean something else. Scheme and config are stored as
their versioned `to_dict()` records.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import EdgequantError, EdgequantWarning, UsageError
from ..core.files import atomic_path
from ..core.records import VERSION_KEY, record
from ..core.version import __version__
from ..numerics.observers import RangeObserver
from ..numerics.scheme import Scheme

FORMAT = "edgequant-checkpoint"
# 2: scheme and config as versioned records. 1 stored the scheme's fields unversioned and no config.
FORMAT_VERSION = 2
# Range tensors that observers and fake-quantizers size on first use (per channel).
_LAZY_RANGES = ("min_val", "max_val", "scale", "zero_point")
_LISTED = 8  # keys named per kind of mismatch; the rest are counted


class CheckpointError(EdgequantError, RuntimeError):
    """A checkpoint that does not fit the wrapper it is loaded into."""


WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _range_owner(module: nn.Module, key: str) -> nn.Module | None:
    """The observer / fake-quantizer holding a lazily sized range tensor `key`, if it is one."""
    owner_name, _, attr = key.rpartition(".")
    if attr not in _LAZY_RANGES:
        return None
    try:
        owner = module.get_submodule(owner_name)
    except AttributeError:
        return None
    return owner if isinstance(owner, RangeObserver) or hasattr(owner, "activation_post_process") else None


def _range_misfit(owner: nn.Module, current: torch.Tensor, incoming: torch.Tensor) -> str | None:
    """Why a stored range does not fit its quantizer: per-tensor vs per-channel, or channel count."""
    observer = getattr(owner, "activation_post_process", owner)
    if getattr(observer, "ch_axis", None) is None:
        return None if incoming.numel() <= 1 else f"per-channel range of {incoming.numel()} vs a per-tensor quantizer"
    if incoming.dim() != 1:
        return "per-tensor range vs a per-channel quantizer"
    if current.numel() > 1 and current.shape != incoming.shape:
        return f"{incoming.numel()} channels vs {current.numel()}"
    return None


def _listing(kind: str, items: list[str]) -> str:
    more = f", ... ({len(items) - _LISTED} more)" if len(items) > _LISTED else ""
    return f"\n  {kind} ({len(items)}): {', '.join(items[:_LISTED])}{more}"


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Keys as the bare model names them: DistributedDataParallel ("module.") and
    torch.compile ("_orig_mod.") prefix every key of the model they wrap."""
    state = dict(state_dict)
    for prefix in WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key.removeprefix(prefix): value for key, value in state.items()}
    return state


def missing_and_unexpected(expected: Mapping[str, Any], given: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Keys a state_dict lacks, and keys it has that the module does not, in their own order."""
    return [k for k in expected if k not in given], [k for k in given if k not in expected]


def check_state_dict(module: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Raise CheckpointError listing missing, unexpected and shape-mismatched keys."""
    own = module.state_dict()
    missing, unexpected = missing_and_unexpected(own, state_dict)
    mismatched = []
    for key, value in state_dict.items():
        current = own.get(key)
        if not isinstance(current, torch.Tensor) or not isinstance(value, torch.Tensor):
            continue
        owner = _range_owner(module, key)
        if owner is not None:
            misfit = _range_misfit(owner, current, value)
            if misfit:
                mismatched.append(f"{key}: {misfit}")
        elif current.shape != value.shape:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs this model {tuple(current.shape)}")
    if not (missing or unexpected or mismatched):
        return
    text = (
        f"the state_dict does not fit this {type(module).__name__}; it looks like a different architecture or scheme:"
    )
    for kind, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            text += _listing(kind, items)
    text += "\nWrap the same model class with the same scheme that produced the checkpoint."
    raise CheckpointError(text)


def save_checkpoint(
    wrapper: nn.Module,
    path: str | os.PathLike,
    scheme: Scheme,
    model_class: str,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write state_dict and metadata (and the optimizer's state, if given) to `path` atomically."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "edgequant_version": __version__,
        "wrapper": type(wrapper).__name__,
        "model_class": model_class,
        "scheme": scheme.to_dict(),
        "config": wrapper.config.to_dict(),
        "state_dict": wrapper.state_dict(),
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at `path`, checked to be one of ours, in the current format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint: {first}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an edgequant checkpoint (written by `save()`); "
            "for a plain state_dict use load_state_dict(torch.load(path))"
        )
    version = payload.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by edgequant {payload.get('edgequant_version')} in a newer format; upgrade edgequant"
        )
    if version == 1:  # the scheme's fields were those of Scheme version 1
        payload["scheme"] = record(1, payload["scheme"])
    return payload


def check_metadata(payload: Mapping[str, Any], wrapper: nn.Module, scheme: Scheme, model_class: str) -> None:
    """Refuse a checkpoint made for another wrapper, model class or scheme, saying which.

    A checkpoint made with another config loads with a warning: the config steers what
    happens next (recalibration, freezing), not what the stored state means.
    """
    problems = []
    if payload["wrapper"] != type(wrapper).__name__:
        hint = " (start QAT from PTQ with QATModule.from_ptq)" if payload["wrapper"] == "PTQModule" else ""
        problems.append(f"it was saved from a {payload['wrapper']}, not a {type(wrapper).__name__}{hint}")
    if payload["model_class"] != model_class:
        problems.append(
            f"it was saved for model class {payload['model_class']}, this wrapper holds {model_class} "
            "(a different architecture)"
        )
    try:
        saved = {**Scheme().to_dict(), **Scheme.record_fields(payload["scheme"])}
    except UsageError as error:
        raise CheckpointError(f"the checkpoint's scheme cannot be read: {error}") from None
    ours = scheme.to_dict()
    differ = [k for k in ours if k not in (*Scheme.LABELS, VERSION_KEY) and saved[k] != ours[k]]
    if differ:
        detail = ", ".join(f"{k}={saved[k]!r} (here {ours[k]!r})" for k in differ)
        problems.append(f"it was saved with scheme {saved['name']!r}, this wrapper uses {ours['name']!r}: {detail}")
    if problems:
        raise CheckpointError(
            "checkpoint does not fit: " + "; ".join(problems) + ". Build the wrapper the way the checkpoint was made."
        )
    if "config" in payload:  # format 1 did not record it
        _warn_config_difference(payload["config"], wrapper.config)


def _warn_config_difference(saved_record: Mapping[str, Any], config: Any) -> None:
    kind = type(config)
    try:
        saved = kind.from_dict(saved_record)
    except UsageError as error:
        raise CheckpointError(f"the checkpoint's {kind.__name__} cannot be read: {error}") from None
    differ = [f.name for f in dataclasses.fields(config) if getattr(saved, f.name) != getattr(config, f.name)]
    if differ:
        detail = ", ".join(f"{k}={getattr(saved, k)!r} (here {getattr(config, k)!r})" for k in differ)
        warnings.warn(
            EdgequantWarning(
                f"the checkpoint was made with another {kind.__name__}: {detail}; this wrapper's config applies "
                "from here on (build the wrapper with the checkpoint's config to continue the same run)"
            ),
            stacklevel=4,
        )
