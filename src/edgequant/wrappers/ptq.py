"""PTQModule: post-training quantization from a few hundred unlabelled samples."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, Self

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
from tqdm.auto import tqdm

from ..core.errors import NonFiniteError, NotCalibratedError, UsageError
from ..core.records import record, record_fields
from ..export.devices import Device
from ..graph.adaround import adaround
from ..graph.batchnorm import fold_bn, reestimate_bn, set_graph_training, use_aten_bn, zero_dead_channels
from ..graph.bias_correction import correct_biases
from ..graph.capture import capture
from ..graph.clipping import clip_weights
from ..graph.equalization import equalize
from ..graph.exponents import choose_weight_exponents
from ..graph.ops import CONV_OPS, WEIGHTED_OPS, activation_quantizer_nodes, producer_module, unshare_tensors
from ..graph.quantizer import EdgeQuantizer
from ..numerics import estimators
from ..numerics.observers import RangeObserver
from ..numerics.scheme import Scheme
from .base import QuantWrapper

ESTIMATORS = ("auto", "minmax", *estimators.ESTIMATORS)


@dataclass(frozen=True)
class PTQConfig:
    """Which PTQ techniques to apply; each can be switched off on its own.

    - ``range_estimator``: activation ranges from the min/max seen, a percentile of
      |x|, the range minimising the squared quantization error pooled over all
      values ("mse"; for power-of-2 scales a choice among the candidate exponents),
      the same with each sample's error relative to its own energy ("sample_mse":
      the mean over images of each image's relative error, so a rare outlier image
      counts as one image instead of setting the range), or the mean of each
      sample's max |x| ("mean_max"). "auto" takes "sample_mse" for every scheme: on
      the checkpoint population of benchmarks/ptq_population.py its top-1 beat the
      previous defaults (pooled mse for power-of-2, min/max for free scales) on 12
      to 15 of 24 checkpoints and fell behind on 1 to 5 (docs/ptq.md).
      Estimated ranges are written into the observers' min/max, so a saved
      checkpoint quantizes as the calibrated module did. Every estimator but
      minmax needs a second pass over the calibration data; memory is one
      histogram per quantizer. Asymmetric activations always use min/max.
    - ``equalize``: cross-layer equalization of conv pairs; None = on for schemes with
      per-tensor weights (where it matters), off for per-channel ones.
    - ``bias_correction``: remove the mean output shift caused by weight rounding.
    - ``bn_reestimation``: recompute BN statistics on the calibration data before
      folding (for data that differs from the training data).
    - ``weight_clipping``: clamp weights beyond this many standard deviations per
      output channel before quantizing; None = off.
    - ``weight_exponent``: for power-of-2 weights, "error" takes the exponent (of the
      covering one and the two below) with the least expected layer-output error,
      "ceil" always the covering one (see exponents.py).
    - ``adaround``: learn each 8-bit weight's rounding on the calibration data, layer
      by layer (adaround.py); seconds to minutes on a CPU, so off by default.

    ``to_dict()`` / ``from_dict()`` turn it into versioned plain data and back.
    """

    VERSION: ClassVar[int] = 1

    range_estimator: Literal["auto", "minmax", "percentile", "mse", "sample_mse", "mean_max"] = "auto"
    percentile: float = 99.99
    equalize: bool | None = None
    bias_correction: bool = True
    bn_reestimation: bool = False
    weight_clipping: float | None = None
    weight_exponent: Literal["error", "ceil"] = "error"
    adaround: bool = False

    @property
    def estimator(self) -> str:
        """The activation range estimator this config runs ("auto" resolved)."""
        return "sample_mse" if self.range_estimator == "auto" else self.range_estimator

    def __post_init__(self) -> None:
        if self.range_estimator not in ESTIMATORS:
            raise UsageError(f"range_estimator must be one of {', '.join(ESTIMATORS)}; got {self.range_estimator!r}")
        if not _is_number(self.percentile) or not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"percentile must be a number in (50, 100], got {self.percentile!r}")
        if self.weight_exponent not in ("error", "ceil"):
            raise UsageError(f"weight_exponent must be 'error' or 'ceil', got {self.weight_exponent!r}")
        clip = self.weight_clipping
        if clip is not None and (not _is_number(clip) or clip <= 0):
            raise UsageError(f"weight_clipping must be a positive number of standard deviations or None, got {clip!r}")
        if self.equalize not in (True, False, None):
            raise UsageError(f"equalize must be True, False or None (on for per-tensor schemes), got {self.equalize!r}")
        for name in ("bias_correction", "bn_reestimation", "adaround"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        """The config as versioned plain data, for JSON files and checkpoints."""
        return record(self.VERSION, asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PTQConfig:
        """The config `to_dict()` recorded; a newer version or an unknown field is refused, not guessed at."""
        return cls(**record_fields(data, cls, cls.VERSION))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_finite_inputs(args: tuple[torch.Tensor, ...]) -> None:
    """Refuse a batch with NaN or Inf before any range sees it."""
    for i, x in enumerate(args):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise NonFiniteError(
                f"input {i} of this batch contains NaN or Inf; ranges would be ruined. Clean the data "
                "(for calibration: calibrate(data, skip_nonfinite=True) skips such batches)"
            )


def inputs_of(batch: object, count: int = 1) -> tuple[torch.Tensor, ...]:
    """The model inputs of a data batch, for a model of `count` inputs.

    One input: a tensor, or the first item of an (inputs, labels) pair. Several: a
    tuple or list whose first `count` items are the inputs, in forward's order; items
    after them (labels) are ignored.
    """
    if count == 1 and isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and len(batch) >= count:
        inputs = tuple(batch[:count])
        if all(isinstance(x, torch.Tensor) for x in inputs):
            return inputs
    if count == 1:
        raise UsageError(f"calibration batches must be tensors or (inputs, labels) pairs, got {type(batch).__name__}")
    raise UsageError(
        f"the model takes {count} inputs, so each batch must be a tuple of {count} tensors in forward's "
        f"order (optionally followed by labels); got {type(batch).__name__}"
        + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


class PTQModule(QuantWrapper):
    """Post-training quantization wrapper: no labels, no backprop.

    Construction folds BN (and equalizes / clips weights as configured). In train
    mode (the state after construction) each forward pass observes min/max ranges
    and returns the float result; `calibrate(data)` runs the full recipe over a
    loader and switches to eval mode, where forward runs the quantized integer model.

    `device` (TDA4VM, AM62A, AM67A, AM68A, AM69A) names the TIDL device the model is
    for: without a `scheme` its default is used (int8_pow2 on TDA4VM, int8 on the
    others), a scheme it cannot run is refused, and `export()` writes its files.
    Without either, the scheme is int8_pow2.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        scheme: str | Scheme | None = None,
        config: PTQConfig | None = None,
        dynamic_spatial: bool = False,
        device: str | Device | None = None,
    ) -> None:
        if config is not None and not isinstance(config, PTQConfig):
            raise UsageError(f"config must be an eq.PTQConfig, got {type(config).__name__}")
        super().__init__(example_inputs, scheme, dynamic_spatial, device)
        self.config = config or PTQConfig()
        # The float graph reads the caller's weights: PTQ never writes into them (passes
        # that edit weights run on the copy `_prepare` makes, or replace tensors).
        self._float = capture(model, self.example_inputs, dynamic_spatial, share_weights=True)
        self.__dict__["_caller_tensors"] = {id(t) for t in (*model.parameters(), *model.buffers())}
        set_graph_training(self._float, dropout=False, batchnorm=False)
        # Dead channels (BN running variance ~0) are zeroed on the float graph: exact, see batchnorm.py.
        self.dead_channels = zero_dead_channels(self._float)
        self.model = self._prepare(self._float)
        self.register_buffer("calibrated_samples", torch.tensor(0, dtype=torch.int64))
        self._drop_integer_model()

    @property
    def equalizes(self) -> bool:
        if self.config.equalize is None:
            return self.scheme.weight_granularity != "per_channel"
        return self.config.equalize

    def _prepare(self, float_graph: GraphModule) -> GraphModule:
        graph = copy.deepcopy(float_graph)
        fold_bn(graph)
        if self.config.weight_clipping is not None:
            clip_weights(graph, self.config.weight_clipping)
        if self.equalizes:
            equalize(graph)
        return prepare_pt2e(graph, EdgeQuantizer(self.scheme, qat=False))

    def activation_observers(self) -> list[RangeObserver]:
        """The observers of activations (not of the model's own weights), in graph order."""
        return [obs for _, obs in activation_quantizer_nodes(self.model, RangeObserver)]

    def _bias_correction_inputs(self) -> list[tuple[RangeObserver, int]]:
        """Activation observers whose channel means bias correction can use, with the channel dim.

        A conv, and a linear layer on (N, C) data, read their input channels from dim 1;
        a linear layer on (N, ..., C) data (channels last, as in ConvNeXt or
        transformers) reads them from the last dim.
        """
        found = []
        for node, module in activation_quantizer_nodes(self.model, RangeObserver):
            readers = [u for u in node.users if u.target in WEIGHTED_OPS and u.args[0] is node]
            val = node.args[0].meta.get("val")
            rank = val.dim() if isinstance(val, torch.Tensor) else None
            if not readers or rank is None:
                continue
            if all(u.target in CONV_OPS for u in readers) or (
                rank == 2 and all(u.target in WEIGHTED_OPS for u in readers)
            ):
                found.append((module, 1))
            elif rank > 2 and not any(u.target in CONV_OPS for u in readers):
                found.append((module, -1))
        return found

    def observers(self) -> list[RangeObserver]:
        return [m for m in self.model.modules() if isinstance(m, RangeObserver)]

    def train(self, mode: bool = True) -> PTQModule:
        self._set_training_flags(mode)
        return self

    def _usable_batches(self, data: Iterable, skip_nonfinite: bool, progress: bool) -> list[tuple[torch.Tensor, ...]]:
        batches, skipped = [], 0
        bar = tqdm(data, desc="read calibration data", leave=False, disable=not progress or None)
        for index, batch in enumerate(bar):
            inputs = inputs_of(batch, len(self.example_inputs))
            if not all(bool(torch.isfinite(x).all()) for x in inputs):
                if skip_nonfinite:
                    skipped += 1
                    continue
                raise NonFiniteError(
                    f"calibration batch {index} contains NaN or Inf; clean the data or pass skip_nonfinite=True"
                )
            batches.append(tuple(x.detach() for x in inputs))
        if not batches:
            detail = f" ({skipped} batches skipped as non-finite)" if skipped else ""
            raise UsageError(f"calibration data yielded no usable batch{detail}; is the loader empty or exhausted?")
        return batches

    def _run(self, batches: list[tuple[torch.Tensor, ...]], desc: str, progress: bool) -> None:
        for inputs in tqdm(batches, desc=desc, leave=False, disable=not progress or None):
            self(*inputs)

    @torch.no_grad()
    def calibrate(self, data: Iterable, skip_nonfinite: bool = False, progress: bool = True) -> PTQModule:
        """Run the configured recipe over `data`, then switch to eval (quantized) mode.

        `data` yields tensors or (inputs, labels) batches (for a model of several inputs:
        tuples of those inputs, optionally followed by labels); a few hundred samples suffice.
        They are held in memory for the passes the recipe needs (BN re-estimation,
        ranges, histograms). Batches with NaN or Inf raise NonFiniteError, or are skipped
        with `skip_nonfinite=True`.
        """
        cfg = self.config
        batches = self._usable_batches(data, skip_nonfinite, progress)
        if cfg.bn_reestimation:
            float_graph = copy.deepcopy(self._float)
            reestimate_bn(float_graph, batches)
            self.model = self._prepare(float_graph)
        elif int(self.calibrated_samples):
            self.model = self._prepare(self._float)  # start from fresh ranges
        self.calibrated_samples.zero_()
        self.train()
        activations = self.activation_observers()
        choose_exponents = self.scheme.power_of_2 and cfg.weight_exponent == "error"
        if cfg.bias_correction or choose_exponents:
            for obs, dim in self._bias_correction_inputs():
                obs.track_channel_stats(dim)
        self._run(batches, "calibrate ranges", progress)
        self._check_ranges()  # before the histogram pass, which cannot bin an infinite range
        estimator = cfg.estimator
        if estimator != "minmax":
            estimated = [obs for obs in activations if obs.symmetric]
            for obs in estimated:
                obs.start_estimator(estimator, cfg.percentile)
            self._run(batches, f"calibrate ranges ({estimator})", progress)
            for obs in estimated:
                obs.settle()
        self.calibrated_samples.fill_(sum(inputs[0].shape[0] for inputs in batches))  # samples, not passes
        if choose_exponents:
            choose_weight_exponents(self.model)
        float_weights = adaround(self.model, batches, progress=progress) if cfg.adaround else None
        if cfg.bias_correction:
            correct_biases(self.model, float_weights)
        return self.eval()

    def _check_ranges(self) -> None:
        """Raise, naming the layer, if calibration left a NaN or infinite range (an overflow)."""
        for node in self.model.graph.nodes:
            if node.op != "call_module":
                continue
            obs = self.model.get_submodule(node.target)
            if not isinstance(obs, RangeObserver):
                continue
            low, high = obs.min_val, obs.max_val
            # Never observed reads (+inf, -inf); an overflow or NaN reads otherwise.
            if bool((torch.isnan(low) | torch.isnan(high) | (low == -math.inf) | (high == math.inf)).any()):
                layer = producer_module(node.args[0])
                raise NonFiniteError(
                    f"calibration found NaN or Inf in the output of layer `{layer}` although the inputs were "
                    "finite: the float model overflows there. Check the weights (eq.check) and the input scaling",
                    layer=layer,
                )

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load ranges and weights; a calibrated state puts the module in eval (quantized) mode.

        In train mode every forward pass would widen the loaded ranges.
        """
        unshare_tensors(self._float, self.__dict__["_caller_tensors"])  # loading writes into them
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._drop_integer_model()
        if int(self.calibrated_samples):
            self.eval()
        return result

    def convert(self) -> GraphModule:
        self._require_ranges()
        return super().convert()

    def _require_ranges(self) -> None:
        if not int(self.calibrated_samples):
            raise NotCalibratedError(
                "this PTQModule has no ranges yet: call calibrate(data) with a few hundred samples first "
                "(evaluating, converting or exporting it now would use unit scales)"
            )

    def _apply(self, fn: Any, recurse: bool = True) -> Self:
        # .to() / .half() give parameters new tensors instead of editing `.data`, which
        # the float graph's parameters share with the caller's model.
        overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            return super()._apply(fn, recurse)
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(overwrite)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        self.check_inputs(args)
        if self.training:
            check_finite_inputs(args)
            self.remember_samples(args)
            self._drop_integer_model()
            self.calibrated_samples += args[0].shape[0]
            return self.model(*args)
        self._require_ranges()
        return self.integer_model()(*args)

    def float_model(self) -> GraphModule:
        """The float graph as calibration left it (BN folded, equalized, bias-corrected).

        Weights and biases are trainable parameters again, so this is a starting point
        for QAT (see `QATModule.from_ptq`).
        """
        graph = copy.deepcopy(self.model)
        for node in list(graph.graph.nodes):
            if node.op == "call_module" and isinstance(graph.get_submodule(node.target), RangeObserver):
                node.replace_all_uses_with(node.args[0])
                graph.graph.erase_node(node)
        for node in graph.graph.nodes:
            if node.target not in WEIGHTED_OPS:
                continue
            for arg in node.args[1:3]:
                if isinstance(arg, Node) and arg.op == "get_attr" and "." not in arg.target:
                    value = getattr(graph, arg.target)
                    if not isinstance(value, nn.Parameter):
                        delattr(graph, arg.target)
                        graph.register_parameter(arg.target, nn.Parameter(value.detach().clone()))
        graph.graph.eliminate_dead_code()
        use_aten_bn(graph)  # a plain torch graph again: QAT captures it with torch.export
        graph.recompile()
        for attr in ("train", "eval"):
            graph.__dict__.pop(attr, None)
        return graph
