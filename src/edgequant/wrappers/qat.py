"""QATModule: one line around a trained float model, the user's loop unchanged."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from google.protobuf.message import Message
from torch import nn
from torch.fx import GraphModule
from torch.utils._pytree import tree_leaves
from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

from ..core.errors import InitialRangesWarning, NonFiniteError, UsageError
from ..core.records import record, record_fields
from ..export.devices import Device
from ..export.onnx import ExportResult
from ..graph.batchnorm import attach_bn_factors, set_graph_training, zero_dead_channels
from ..graph.capture import capture
from ..graph.ops import activation_quantizer_nodes, producer_module
from ..graph.quantizer import DEFAULT_AVERAGING_CONSTANT, EdgeQuantizer
from ..numerics.observers import FakeQuantize
from ..numerics.scheme import Scheme
from .base import QuantWrapper
from .checkpoint import strip_wrapper_prefixes
from .ptq import PTQConfig, PTQModule, check_finite_inputs
from .schedule import FreezeSchedule


@dataclass(frozen=True)
class QATConfig:
    """How QAT moves ranges and BN statistics; each field can be set on its own.

    - ``schedule``: when BN statistics and then ranges freeze, as `FreezeSchedule(total_epochs)`
      derives it from the run's length; the default (no length) freezes nothing.
    - ``averaging_constant``: the weight of each batch's min/max in the moving average of an
      activation range (a plain mean over the first 1/c batches, then the moving average).
      Larger follows a drifting range faster and is noisier. In (0, 1): 1 would keep only
      the last batch, the rule for weights, not activations.
    - ``sync``: under DistributedDataParallel, reduce activation ranges and BN batch statistics
      over all ranks, so every rank holds what one process on the concatenated batch would;
      False keeps them per rank.

    ``to_dict()`` / ``from_dict()`` turn it into versioned plain data and back.
    """

    VERSION: ClassVar[int] = 1

    schedule: FreezeSchedule = field(default_factory=FreezeSchedule)
    averaging_constant: float = DEFAULT_AVERAGING_CONSTANT
    sync: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, FreezeSchedule):
            raise UsageError(
                f"schedule must be an eq.FreezeSchedule, e.g. FreezeSchedule(total_epochs=10); got {self.schedule!r}"
            )
        c = self.averaging_constant
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0 < c < 1:
            raise UsageError(f"averaging_constant must be a number in (0, 1), e.g. 0.01; got {c!r}")
        if not isinstance(self.sync, bool):
            raise UsageError(f"sync must be True or False, got {self.sync!r}")

    def to_dict(self) -> dict[str, Any]:
        """The config as versioned plain data (the schedule nested as its own record)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["schedule"] = self.schedule.to_dict()
        return record(self.VERSION, fields)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QATConfig:
        """The config `to_dict()` recorded; a newer version or an unknown field is refused, not guessed at."""
        fields = record_fields(data, cls, cls.VERSION)
        if "schedule" in fields:
            fields["schedule"] = FreezeSchedule.from_dict(fields["schedule"])
        return cls(**fields)


class QATModule(QuantWrapper):
    """Quantization-aware training wrapper around a float model.

    Conv+BN(+ReLU) run in their folded form with fake-quantized weights and
    activations; gradients pass straight through the rounding. Each call to
    ``train()`` after some training steps starts a new epoch, and the `FreezeSchedule`
    of the `QATConfig` decides when BN statistics and then ranges freeze. ``eval()``
    runs the integer model itself (`integer_model()`, the one `export()` writes), so
    the accuracy measured in eval is the deployed one, bit for bit; it is rebuilt
    whenever the weights or ranges have changed.

    With ``calibration_data`` (a few hundred unlabelled samples, as for PTQ) QAT
    starts from the PTQ recipe: BN folded, dead channels zeroed, cross-layer
    equalization for per-tensor schemes, calibrated ranges. Without it, ranges start
    from the example inputs and dead channels (BN running variance ~0) are zeroed.

    `device` names the TIDL device, as for `PTQModule`: it sets the default scheme
    and export's files, and refuses a scheme the device cannot run.

    A NaN or Inf in a training step raises `NonFiniteError` naming the layer.

    Under DistributedDataParallel (any time torch.distributed is initialized with
    more than one rank during a training step) activation ranges and BN batch
    statistics are reduced over all ranks, so every rank holds the same state as
    one process on the concatenated batch would. ``QATConfig(sync=False)`` keeps them
    per rank. Construction itself never communicates.
    """

    trains = True

    def __init__(
        self,
        model: nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        scheme: str | Scheme | None = None,
        config: QATConfig | None = None,
        calibration_data: Iterable | None = None,
        ptq_config: PTQConfig | None = None,
        dynamic_spatial: bool = False,
        device: str | Device | None = None,
    ) -> None:
        if config is not None and not isinstance(config, QATConfig):
            raise UsageError(
                "config must be an eq.QATConfig, e.g. eq.QATConfig(eq.FreezeSchedule(total_epochs=10)); "
                f"got {type(config).__name__}"
            )
        super().__init__(example_inputs, scheme, dynamic_spatial, device)
        self.config = config or QATConfig()
        training, ptq = model.training, None
        if calibration_data is not None:
            ptq = PTQModule(model, self.example_inputs, self.scheme, ptq_config, dynamic_spatial)
            model = ptq.calibrate(calibration_data).float_model()
        graph = capture(model, self.example_inputs, dynamic_spatial)
        self.dead_channels = zero_dead_channels(graph) if ptq is None else ptq.dead_channels
        quantizer = EdgeQuantizer(self.scheme, qat=True, averaging_constant=self.config.averaging_constant)
        self.model: GraphModule = prepare_qat_pt2e(graph, quantizer)
        attach_bn_factors(self.model)
        # [epoch, trained-since-last-train()-call]; a buffer so checkpoints resume the schedule.
        self.register_buffer("qat_state", torch.tensor([0, 0], dtype=torch.int64))
        self._init_ranges()
        if ptq is not None:
            self._take_ranges(ptq)
            self.remember_samples(ptq.parity_inputs())
        # Weight quantizers need no reduction: DDP keeps weights (and synced BN statistics) equal.
        for fq in self.activation_quantizers():
            fq.activation_post_process.sync_across_ranks = self.config.sync
        self.train(training)

    @classmethod
    def from_ptq(cls, ptq: PTQModule, config: QATConfig | None = None) -> QATModule:
        """Start QAT from a calibrated PTQModule: its folded, equalized weights and its ranges.

        BN is already folded there, so only the range-freezing part of the schedule applies.
        ``QATModule(model, ..., calibration_data=data)`` does the same in one step.
        """
        ptq._require_ranges()
        qmodel = cls(ptq.float_model(), ptq.example_inputs, ptq.scheme, config, dynamic_spatial=ptq.dynamic_spatial)
        qmodel._take_ranges(ptq)
        qmodel.remember_samples(ptq.parity_inputs())
        qmodel.dead_channels = ptq.dead_channels
        return qmodel

    @torch.no_grad()
    def _take_ranges(self, ptq: PTQModule) -> None:
        sources = ptq.activation_observers()
        targets = self.activation_quantizers()
        if len(sources) != len(targets):
            raise RuntimeError(f"cannot match {len(sources)} PTQ ranges to {len(targets)} QAT quantizers")
        for source, target in zip(sources, targets, strict=True):
            scale, _ = source.calculate_qparams()
            obs = target.activation_post_process
            if obs.symmetric:
                max_abs = scale * source.quant_max
                obs.min_val, obs.max_val = -max_abs.reshape(()), max_abs.reshape(())
            else:
                obs.min_val, obs.max_val = source.min_val.clone(), source.max_val.clone()
            # Count the calibration as history: the moving average starts from these ranges.
            obs.set_history(int(1 / obs.averaging_constant))
            new_scale, new_zero_point = obs.qparams()
            target.scale.copy_(new_scale)
            target.zero_point.copy_(new_zero_point)
        self._drop_integer_model()

    @property
    def epoch(self) -> int:
        return int(self.qat_state[0])

    @property
    def next_epoch(self) -> int:
        """The epoch a resumed loop starts at: `epoch`, plus one if that epoch has trained steps."""
        return self.epoch + int(bool(self.qat_state[1]))

    @property
    def bn_frozen(self) -> bool:
        return self.config.schedule.bn_frozen(self.epoch)

    @property
    def ranges_frozen(self) -> bool:
        return self.config.schedule.ranges_frozen(self.epoch)

    def fake_quantizers(self) -> list[FakeQuantize]:
        return [m for m in self.model.modules() if isinstance(m, FakeQuantize)]

    def activation_quantizers(self) -> list[FakeQuantize]:
        """The quantizers of activations (inputs that are not the model's own weights), in graph order."""
        return [fq for _, fq in activation_quantizer_nodes(self.model, FakeQuantize)]

    @torch.no_grad()
    def _init_ranges(self) -> None:
        # Ranges from the example batch, with BN on running statistics, so that an
        # evaluation before the first training step is already meaningful.
        set_graph_training(self.model, dropout=False, batchnorm=False)
        for fq in self.fake_quantizers():
            fq.set_observing(True)
        self.model(*self.example_inputs)

    def train(self, mode: bool = True) -> QATModule:
        self._drop_integer_model()
        if mode and not self.training and self.qat_state[1]:
            self.qat_state[0] += 1
            self.qat_state[1] = 0
        # The graph's BN / dropout nodes are switched below, not by nn.Module.train().
        self._set_training_flags(mode)
        if self.ranges_frozen:
            for fq in self.fake_quantizers():
                if not fq.is_frozen:
                    fq.freeze()
        for fq in self.fake_quantizers():
            fq.set_observing(mode)
        set_graph_training(self.model, dropout=mode, batchnorm=mode and not self.bn_frozen, sync_bn=self.config.sync)
        return self

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load a checkpoint, also one saved from the DDP wrapper (keys prefixed "module.")."""
        result = super().load_state_dict(strip_wrapper_prefixes(state_dict), strict=strict, assign=assign)
        self.train(self.training)  # apply the loaded epoch's freezing to the graph now
        return result

    def export(
        self,
        path: str | os.PathLike,
        opset: int | None = None,
        device: str | Device | None = None,
        batch: int = 1,
        *,
        meta_arch: Message | None = None,
    ) -> ExportResult:
        if not self.epoch and not int(self.qat_state[1]):
            warnings.warn(
                InitialRangesWarning(
                    "exporting a QATModule before any training step: the file holds its initial ranges "
                    "(from calibration_data, or from example_inputs)"
                ),
                stacklevel=2,
            )
        return super().export(path, opset, device, batch, meta_arch=meta_arch)

    def forward(self, *args: torch.Tensor) -> Any:
        if not self.training:
            return self._evaluate(*args)
        self._begin_step(args)
        out = self.model(*args)
        self._end_step(out)
        return out

    # The wrapper's host-side work runs eagerly, also under torch.compile: Dynamo then
    # compiles the wrapped model as one graph and steps around these calls.
    @torch.compiler.disable
    def _evaluate(self, *args: torch.Tensor) -> Any:
        self.check_inputs(args)
        return self.integer_model()(*args)

    @torch.compiler.disable
    def _begin_step(self, args: tuple[torch.Tensor, ...]) -> None:
        self.check_inputs(args)
        check_finite_inputs(args)
        self.remember_samples(args)
        if torch.is_grad_enabled():
            self.qat_state[1] = 1

    @torch.compiler.disable
    def _end_step(self, out: Any) -> None:
        # One host sync per step: every output finite, every activation scale finite and positive.
        checks = [torch.isfinite(t).all() for t in tree_leaves(out) if t.is_floating_point()]
        scales = self._activation_scales()
        if scales is not None:
            checks.append((torch.isfinite(scales) & (scales > 0)).all())
        if not bool(torch.stack(checks).all()):
            raise self._nonfinite_error()

    def _activation_scales(self) -> torch.Tensor | None:
        found = self.__dict__.get("_scale_owners")
        if found is None:
            found = self.__dict__["_scale_owners"] = self.activation_quantizers()
        return torch.cat([fq.scale.reshape(-1) for fq in found]) if found else None

    def _nonfinite_error(self) -> NonFiniteError:
        """Where a training step's NaN / Inf came from, in the user's terms."""
        for name, p in self.model.named_parameters():
            if not bool(torch.isfinite(p).all()):
                return NonFiniteError(
                    f"parameter `{name}` holds NaN or Inf: training diverged at the previous optimizer step. "
                    "Lower the learning rate (or clip gradients) and resume from the last checkpoint",
                    layer=name,
                )
        for node, fq in activation_quantizer_nodes(self.model, FakeQuantize):
            obs = fq.activation_post_process
            ranges = torch.cat([obs.min_val.reshape(-1), obs.max_val.reshape(-1), fq.scale.reshape(-1)])
            if not bool(torch.isfinite(ranges).all() and (fq.scale > 0).all()):
                layer = producer_module(node.args[0])
                return NonFiniteError(
                    f"the output of layer `{layer}` overflowed to NaN or Inf, which ruined its quantization "
                    "range. Usual causes: a learning rate too high, or a dead channel whose BN fold factor "
                    "is huge (see eq.check). Lower the learning rate and resume from the last checkpoint",
                    layer=layer,
                )
        return NonFiniteError(
            "the model's output holds NaN or Inf although every range and weight is finite: an op after "
            "the last quantizer overflowed. Check the model's head and the learning rate"
        )
