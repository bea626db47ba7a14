"""finetune_adapted: the loss by hand, BN statistics, and that distillation brings the adapted model back."""

import math

import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.core.errors import NonFiniteError, UsageError
from edgequant.surgery.distill import distillation_loss, recompute_bn_statistics

from ..helpers import tiny_detector


def test_distillation_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert float(distillation_loss(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-7)
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[2.0, 0.0]])
    p = torch.softmax(teacher / 2.0, 1)[0]  # the teacher's softened probabilities
    kl = float((p * (p / 0.5).log()).sum()) * 4.0  # student's are (0.5, 0.5); times T^2
    assert float(distillation_loss(student, teacher, 2.0)) == pytest.approx(kl, rel=1e-6)
    outputs = {"a": torch.ones(2, 3, 4, 4), "b": torch.zeros(1, 5)}
    targets = {"a": torch.full((2, 3, 4, 4), 2.0), "b": torch.ones(1, 5)}
    # relative MSE per output, averaged: a: 1 / 4, b: 1 / 1
    assert float(distillation_loss(outputs, targets, 2.0)) == pytest.approx((0.25 + 1.0) / 2)


def test_recompute_bn_statistics_is_the_exact_average():
    bn = nn.BatchNorm2d(3, momentum=0.01)
    batches = [torch.randn(4, 3, 5, 5) * s + s for s in (1.0, 2.0, 3.0)]
    assert recompute_bn_statistics(nn.Sequential(bn), iter(batches)) == 1
    torch.testing.assert_close(bn.running_mean, torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0))
    assert bn.momentum == 0.01 and not bn.training


class Small(nn.Module):
    def __init__(self, act: type[nn.Module]) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), act(), nn.Conv2d(16, 16, 3, 2, 1), nn.BatchNorm2d(16), act()
        )
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


def _sqnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    return 10 * math.log10(float(reference.pow(2).sum() / (test - reference).pow(2).sum()))


def test_distillation_brings_the_adapted_model_back():
    torch.manual_seed(0)
    original = Small(nn.SiLU)
    data = [torch.randn(32, 3, 16, 16) for _ in range(8)]  # no labels: distillation alone
    recompute_bn_statistics(original, iter(data))  # statistics of the data, as after training
    x = torch.randn(2, 3, 16, 16)
    adapted, report = eq.adapt(original, "TDA4VM", (x,))
    assert {c.replacement for c in report.changes} == {"silu"}
    held_out = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        want = original(held_out)
        before = _sqnr(want, adapted.eval()(held_out))
    returned = eq.finetune_adapted(adapted, original, data, eq.DistillConfig(epochs=6), progress=False)
    assert returned is adapted and not adapted.training and not original.training
    with torch.no_grad():
        after = _sqnr(want, adapted(held_out))
    assert after > before + 3, (before, after)  # measured: 4.4 dB -> 17.2 dB


def test_bad_loss_and_config():
    torch.manual_seed(0)
    original = Small(nn.SiLU).eval()
    adapted, _ = eq.adapt(original, "TDA4VM", (torch.randn(2, 3, 16, 16),))
    broken = [torch.full((4, 3, 16, 16), float("nan"))]
    with pytest.raises(NonFiniteError, match=r"epoch 1, step 1; lower DistillConfig\.lr"):
        eq.finetune_adapted(adapted, original, broken, progress=False)
    with pytest.raises(UsageError, match="epochs >= 1"):
        eq.DistillConfig(epochs=0)
    with pytest.raises(UsageError, match="'sgd' or 'adamw'"):
        eq.DistillConfig(optimizer="lamb")
    with pytest.raises(UsageError, match=r"both torch\.nn\.Module"):
        eq.finetune_adapted(adapted, "resnet18", broken)


def test_detector_distills_its_head_outputs_and_learns_from_targets():
    original = tiny_detector("retinanet")
    adapted, _ = eq.adapt(original, "AM68A", (torch.rand(2, 3, 64, 64),))
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([3])}] * 2
    data = [(torch.rand(2, 3, 64, 64), targets)]
    weight = adapted.head.classification_head.cls_logits.weight.clone()
    eq.finetune_adapted(adapted, original, data, eq.DistillConfig(epochs=1, lr=0.01), progress=False)
    assert not torch.equal(weight, adapted.head.classification_head.cls_logits.weight)
    assert torch.equal(weight, original.head.classification_head.cls_logits.weight)
    assert not adapted.training
