import pytest
import torch
from torch import nn

from edgequant.core.errors import CaptureWarning
from edgequant.graph.capture import MODEL_CLASS_KEY, CaptureError, capture, check_example_inputs


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


def test_capture_failure_prints_nothing_of_torch_but_keeps_its_log(capfd, monkeypatch):
    monkeypatch.delenv("EDGEQUANT_DEBUG", raising=False)
    with pytest.raises(CaptureError) as info:
        capture(Net(), (torch.randn(2, 3, 8, 8),))
    out, err = capfd.readouterr()
    assert err == "" and out == ""
    assert "def forward" in info.value.torch_log  # torch's graph dump, held for debugging
    monkeypatch.setenv("EDGEQUANT_DEBUG", "1")
    with pytest.raises(CaptureError):
        capture(Net(), (torch.randn(2, 3, 8, 8),))
    assert "def forward" in capfd.readouterr().err


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


def test_wrong_input_shape_is_named_with_the_shape():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(ValueError, match=r"does not run on example_inputs of shape \(2, 5, 8, 8\)") as info:
        capture(model, (torch.randn(2, 5, 8, 8),))  # 5 channels into a 3-channel conv
    assert "channels" in str(info.value) and len(str(info.value).splitlines()) <= 3


def test_input_dtype_must_match_the_weights():
    with pytest.raises(TypeError, match=r"float64 but the model's weights are torch.float32.*\.to\(torch.float32\)"):
        capture(nn.Conv2d(3, 4, 3), (torch.randn(2, 3, 8, 8, dtype=torch.float64),))


class Noisy(nn.Module):
    def forward(self, x):
        return x + torch.randn_like(x)  # random in every mode, not behind self.training


def test_random_ops_outside_dropout_are_reported():
    with pytest.warns(CaptureWarning, match=r"random numbers \(aten.randn_like in `<root>`\)"):
        capture(Noisy(), (torch.randn(2, 3),))


def test_train_only_branches_are_captured_in_their_eval_form():
    class Aux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            y = self.bn(x)
            return (y, y * 2) if self.training else y  # an auxiliary output in training only

    model = Aux().train()
    gm = capture(model, (torch.randn(4, 3),))
    assert isinstance(gm(torch.randn(4, 3)), torch.Tensor)
    bn = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.batch_norm.default)
    assert bn.args[5] is True  # BN itself stays in train mode, for the wrappers to switch
    assert gm.meta[MODEL_CLASS_KEY].endswith("Aux")
    assert model.training


def test_cumulative_average_bn_is_captured_with_a_warning():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.ReLU())
    with pytest.warns(CaptureWarning, match=r"momentum=None.*`1`.*momentum 0\.1"):
        gm = capture(model, (torch.randn(2, 3, 8, 8),))
    bn = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.batch_norm.default)
    assert bn.args[6] == 0.1
    assert model[1].momentum is None  # the caller's model is untouched


@pytest.mark.parametrize("share", [False, True])
def test_shared_capture_reads_the_callers_tensors_and_leaves_its_modules_alone(share):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).eval()
    graph = capture(model, (torch.randn(2, 3, 8, 8),), share_weights=share)
    ours = {t.data_ptr() for t in [*graph.parameters(), *graph.buffers()] if t.numel() > 1}
    theirs = {t.data_ptr() for t in [*model.parameters(), *model.buffers()] if t.numel() > 1}
    assert (ours == theirs) if share else not ours & theirs
    assert not any(m.training for m in model.modules())  # capture's train-mode BN is set on its copy
