import pytest
import torch
from torch import nn

from edgequant.capture import CaptureError, capture, check_example_inputs


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return x * 2
        return x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = Branchy()

    def forward(self, x):
        return self.gate(self.conv(x))


def test_untraceable_module_is_named_with_reason_and_fix():
    with pytest.raises(CaptureError) as info:
        capture(Net(), (torch.randn(2, 3, 8, 8),))
    text = str(info.value)
    assert "`gate`" in text and "Branchy" in text
    assert "if x.sum() > 0" in text
    assert "Fix:" in text
    assert len(text.splitlines()) < 10  # a message, not a trace


class FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        return self.fc(x.view(4, -1))


def test_fixed_batch_model_is_rejected_with_hint():
    with pytest.raises(CaptureError, match="batch"):
        capture(FixedBatch(), (torch.randn(4, 3, 2, 2),))


def test_batch_of_one_with_bn_exports_and_runs_any_batch():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(4)
    )
    gm = capture(model.eval(), (torch.randn(1, 3, 8, 8),))
    for batch in (1, 3, 5):
        assert gm(torch.randn(batch, 3, 8, 8)).shape == (batch, 4)
    assert not model.training  # the user's model is not touched


@pytest.mark.parametrize(
    ("inputs", "error"),
    [
        (torch.randn(2, 3), TypeError),
        ((), TypeError),
        (([1, 2],), TypeError),
        ((torch.ones(2, 3, dtype=torch.int64),), TypeError),
        ((torch.randn(3),), ValueError),
    ],
)
def test_bad_example_inputs(inputs, error):
    with pytest.raises(error):
        check_example_inputs(inputs)
