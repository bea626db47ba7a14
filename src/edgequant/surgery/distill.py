"""`finetune_adapted`: train an adapted model to reproduce the original (knowledge distillation).

The original model is the teacher: an approximate replacement (ReLU for SiLU, identity
for squeeze-excitation) changes the function, and matching the original's outputs on
unlabelled images brings it back faster than labels alone. Labels, when the batches
carry them, add a cross-entropy term. For a torchvision detector the raw head outputs
of the quantized core are matched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import NonFiniteError, UsageError
from ..wrappers.detection import DetectionCore, detector_family, images_of, network_inputs
from .adapt import tensors_in


@dataclass(frozen=True)
class DistillConfig:
    """How `finetune_adapted` trains: AdamW (or SGD with momentum), a cosine learning rate over all steps.

    The defaults were chosen on the four models of benchmarks/surgery.py (AdamW 1e-3 came
    closest to float on all four; SGD 0.005-0.01 and AdamW 2e-3 lost up to 2 points on one).
    """

    epochs: int = 5
    lr: float = 1e-3
    optimizer: str = "adamw"  # or "sgd" (with `momentum`, Nesterov)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    temperature: float = 2.0  # softens both models' class probabilities
    label_weight: float = 0.5  # share of the label loss when batches carry labels (the rest: distillation)

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise UsageError(f"DistillConfig.optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.epochs < 1 or self.lr <= 0 or self.temperature <= 0 or not 0 <= self.label_weight <= 1:
            raise UsageError(
                "DistillConfig needs epochs >= 1, lr > 0, temperature > 0 and 0 <= label_weight <= 1; got "
                f"epochs={self.epochs}, lr={self.lr}, temperature={self.temperature}, label_weight={self.label_weight}"
            )


def distillation_loss(student: Any, teacher: Any, temperature: float) -> torch.Tensor:
    """KL divergence of softened class probabilities for (N, classes) logits; else relative MSE of every output."""
    pairs = list(zip(tensors_in(student), tensors_in(teacher), strict=True))
    if len(pairs) == 1 and pairs[0][0].dim() == 2:
        s, t = pairs[0]
        log_p = F.log_softmax(s / temperature, dim=1)
        return F.kl_div(log_p, F.log_softmax(t / temperature, dim=1), log_target=True, reduction="batchmean") * (
            temperature**2
        )
    return sum(F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12) for s, t in pairs) / len(pairs)


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, inputs: Iterable[Any]) -> int:
    """Every BN's running statistics as the exact average over one pass of `inputs` (model left in eval).

    A replacement shifts the statistics BN layers see; and models with a small BN
    momentum (mobilenet_v3 uses 0.01) end a short training run far from the data's.
    Returns how many BNs.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    try:
        for x in inputs:
            model(*(x if isinstance(x, tuple) else (x,)))
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        model.eval()
    return len(bns)


def _split(batch: object, detector: bool) -> tuple[Any, Any]:
    """(inputs, labels or None) of a batch."""
    if detector:
        images = images_of(batch)
        targets = batch[1] if isinstance(batch, (tuple, list)) and len(batch) == 2 and images is batch[0] else None
        return images, targets
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    raise UsageError(f"batches must be tensors or (inputs, labels) pairs, got {type(batch).__name__}")


def _network_input(inputs: Any, original: nn.Module, detector: bool) -> torch.Tensor:
    """What the trained network takes: a detector's transformed image batch, else the inputs."""
    return network_inputs(original.transform, inputs) if detector else inputs


def _network_inputs(loader: Iterable, original: nn.Module, detector: bool) -> Iterator[torch.Tensor]:
    for batch in loader:
        yield _network_input(_split(batch, detector)[0], original, detector)


def finetune_adapted(
    adapted: nn.Module,
    original: nn.Module,
    loader: Iterable,
    config: DistillConfig | None = None,
    progress: bool = True,
) -> nn.Module:
    """Train `adapted` (in place) to reproduce `original` on `loader`'s images, plus its labels if any.

    Returns `adapted` in eval mode. `original` is not changed. A loss that turns NaN or
    Inf stops training with the epoch and step.
    """
    config = config or DistillConfig()
    if not isinstance(adapted, nn.Module) or not isinstance(original, nn.Module):
        raise UsageError("finetune_adapted takes the adapted and the original model, both torch.nn.Module")
    detector = detector_family(original) is not None
    teacher_mode = {m: m.training for m in original.modules()}
    original.eval()
    teacher = DetectionCore(original, detector_family(original)) if detector else original
    student = DetectionCore(adapted, detector_family(adapted)) if detector else adapted
    params = [p for p in adapted.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
        )
    recompute_bn_statistics(student, _network_inputs(loader, original, detector))  # a sane start
    steps = config.epochs * len(loader) if hasattr(loader, "__len__") else None
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if steps else None
    try:
        for epoch in tqdm(range(config.epochs), desc="distill", disable=None if progress else True):
            adapted.train()
            for step, batch in enumerate(loader):
                inputs, labels = _split(batch, detector)
                x = _network_input(inputs, original, detector)
                with torch.no_grad():
                    target = teacher(x)
                out = student(x)
                loss = distillation_loss(out, target, config.temperature)
                if labels is not None and config.label_weight > 0:
                    # A detector's own losses need its train-mode forward with targets.
                    label_loss = (
                        sum(adapted(list(inputs), labels).values()) if detector else F.cross_entropy(out, labels)
                    )
                    loss = (1 - config.label_weight) * loss + config.label_weight * label_loss
                if not math.isfinite(value := loss.item()):
                    raise NonFiniteError(
                        f"distillation loss is {value} at epoch {epoch + 1}, step {step + 1}; lower DistillConfig.lr"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if schedule is not None:
                    schedule.step()
        recompute_bn_statistics(student, _network_inputs(loader, original, detector))
    finally:
        for m, mode in teacher_mode.items():
            m.training = mode
    return adapted.eval()
