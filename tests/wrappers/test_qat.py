"""QATModule end to end on the torchvision zoo: train steps, eval, export, resume."""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.export.runtime import run_onnx, session

from ..helpers import ZOO, qdq_nodes, warmed_model


def _steps(qmodel, x, y, n=2, lr=1e-3):
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    qmodel.train()
    for i in range(n):
        optimizer.zero_grad()
        nn.functional.cross_entropy(qmodel(x[i * 8 : (i + 1) * 8]), y[i * 8 : (i + 1) * 8]).backward()
        optimizer.step()
    return optimizer


@pytest.fixture(scope="module", params=ZOO)
def trained(request, digits_train):
    x, y = digits_train
    model = warmed_model(request.param, x)
    qmodel = eq.QATModule(model, (x[:8],), scheme="int8_pow2", config=eq.QATConfig(eq.FreezeSchedule(3)))
    _steps(qmodel, x, y)
    qmodel.eval()
    return request.param, qmodel


def test_train_eval_export_parity(trained, digits_test, tmp_path):
    name, qmodel = trained
    path = tmp_path / f"{name}.onnx"
    result = qmodel.export(path)
    assert result.parity.max_abs_diff == 0.0 and result.parity.top1_agreement == 1.0
    # Beyond the example batch: a different batch size, through onnxruntime, against convert().
    x = digits_test[0][:24]
    converted = qmodel.convert()
    ort_out = run_onnx(session(str(path)), (x,))[0]
    torch_out = converted(x).detach().numpy()
    assert ort_out.shape == (24, 10)
    assert np.array_equal(ort_out.argmax(1), torch_out.argmax(1))
    assert np.abs(ort_out - torch_out).max() <= result.parity.output_step
    for node, scale, zero_point in qdq_nodes(path):
        assert np.all(zero_point == 0), node.name
        assert np.all(np.frexp(scale.astype(np.float32))[0] == 0.5), node.name


def test_eval_is_deterministic_and_batch_size_free(trained, digits_test):
    _, qmodel = trained
    x = digits_test[0][:5]
    before = [fq.scale.clone() for fq in qmodel.fake_quantizers()]
    converted = qmodel.convert()
    with torch.no_grad():
        a = qmodel(x)
        b = qmodel(x)
        c = converted(x)
        single = converted(x[:1])
    assert torch.equal(a, b)
    # Integer arithmetic on power-of-2 grids: each sample's result is exact, whatever the batch.
    assert torch.equal(single, c[:1])
    assert all(torch.equal(s, fq.scale) for s, fq in zip(before, qmodel.fake_quantizers(), strict=True))


def test_state_dict_resume_gives_identical_outputs(trained, digits_train, digits_test):
    name, qmodel = trained
    x = digits_test[0][:16]
    state = qmodel.state_dict()
    fresh = eq.QATModule(
        warmed_model(name, digits_train[0], steps=1), (digits_train[0][:8],), config=eq.QATConfig(eq.FreezeSchedule(3))
    )
    fresh.load_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), qmodel(x))
    assert fresh.epoch == qmodel.epoch


@pytest.mark.slow
def test_freeze_schedule_follows_epochs(digits_train):
    x, y = digits_train
    qmodel = eq.QATModule(warmed_model("resnet18", x, steps=1), (x[:8],), config=eq.QATConfig(eq.FreezeSchedule(4)))
    assert (qmodel.config.schedule.bn_freeze_epoch, qmodel.config.schedule.range_freeze_epoch) == (2, 3)
    bn_var = qmodel.model.bn1.running_var
    seen = []
    for epoch in range(4):
        qmodel.train()
        var_before = bn_var.clone()
        ranges_before = [fq.activation_post_process.max_val.clone() for fq in qmodel.fake_quantizers()]
        _steps(qmodel, x[epoch * 16 :], y[epoch * 16 :], n=2)
        qmodel.eval()
        bn_moved = not torch.equal(var_before, bn_var)
        ranges_moved = any(
            not torch.equal(r, fq.activation_post_process.max_val)
            for r, fq in zip(ranges_before, qmodel.fake_quantizers(), strict=True)
        )
        seen.append((qmodel.epoch, bn_moved, ranges_moved))
    assert seen == [(0, True, True), (1, True, True), (2, False, True), (3, False, False)]
    assert all(fq.is_frozen for fq in qmodel.fake_quantizers())


@pytest.mark.slow
def test_evaluating_before_training_does_not_count_as_epoch(digits_train):
    x, y = digits_train
    qmodel = eq.QATModule(warmed_model("resnet18", x, steps=1), (x[:8],), config=eq.QATConfig(eq.FreezeSchedule(2)))
    qmodel.eval()
    qmodel.train()
    qmodel.eval()
    qmodel.train()
    assert qmodel.epoch == 0
    _steps(qmodel, x, y, n=1)
    qmodel.eval()
    qmodel.train()
    assert qmodel.epoch == 1


@pytest.mark.slow
def test_gradients_reach_weights_through_rounding(digits_train):
    x, y = digits_train
    qmodel = eq.QATModule(warmed_model("resnet18", x, steps=1), (x[:8],))
    qmodel.train()
    nn.functional.cross_entropy(qmodel(x[:8]), y[:8]).backward()
    grads = [p.grad for p in qmodel.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads[:5])


@pytest.mark.slow
def test_users_float_model_is_left_untouched(digits_train):
    x, y = digits_train
    model = warmed_model("resnet18", x, steps=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = eq.QATModule(model, (x[:8],))
    _steps(qmodel, x, y, n=2, lr=0.1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_qat_from_ptq_starts_where_ptq_ended(digits_model, digits_test, tmp_path):
    from edgequant.demo.data import digits_loader

    x, _ = digits_test
    calib = digits_loader("train", batch_size=32, limit=64, shuffle=False)
    # QAT ranges weights on the tensor each step with the covering exponent; a PTQ that chose lower
    # exponents by output error (the default) hands over its weights and activation ranges, not those.
    config = eq.PTQConfig(weight_exponent="ceil")
    ptq = eq.PTQModule(digits_model("mobilenet_v2"), (x[:16],), "int8_pow2", config).calibrate(calib, progress=False)
    qmodel = eq.QATModule.from_ptq(ptq, config=eq.QATConfig(eq.FreezeSchedule(2))).eval()
    ptq_scales = [o.calculate_qparams()[0] for o in ptq.activation_observers()]
    qat_scales = [fq.scale for fq in qmodel.activation_quantizers()]
    assert all(torch.equal(a, b) for a, b in zip(ptq_scales, qat_scales, strict=True))
    with torch.no_grad():
        # same folded weights and ranges: the converted models compute the same integers
        assert torch.equal(qmodel.convert()(x[:32]), ptq(x[:32]))
    assert qmodel.export(tmp_path / "m.onnx").parity.max_abs_diff == 0.0


def test_from_uncalibrated_ptq_is_an_error(digits_train):
    x, _ = digits_train
    with pytest.raises(eq.NotCalibratedError, match="calibrate"):
        eq.QATModule.from_ptq(eq.PTQModule(warmed_model("resnet18", x, steps=1), (x[:8],)))


def _eval_equals_convert(qmodel, x) -> torch.Tensor:
    """Eval output, checked bit for bit against a fresh convert() of the current state."""
    was_training = qmodel.training
    qmodel.eval()
    with torch.no_grad():
        seen = qmodel(x)
        expected = qmodel.convert()(x)
    assert torch.equal(seen, expected)
    if was_training:
        qmodel.train()
    return seen


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, scheme",
    [
        *((name, "int8_pow2") for name in (*ZOO, "tiny_densenet")),
        ("resnet18", "int8"),
        ("regnet_x_400mf", "int16"),
    ],
)
def test_eval_is_the_integer_model_at_every_point_of_training(name, scheme, digits_train, digits_test, tmp_path):
    x, y = digits_train
    x_test = digits_test[0][:48]
    qmodel = eq.QATModule(warmed_model(name, x), (x[:8],), scheme, config=eq.QATConfig(eq.FreezeSchedule(2)))
    outputs = [_eval_equals_convert(qmodel, x_test)]  # before any step
    _steps(qmodel, x, y, n=1)
    outputs.append(_eval_equals_convert(qmodel, x_test))  # after one step
    _steps(qmodel, x[16:], y[16:], n=3)
    outputs.append(_eval_equals_convert(qmodel, x_test))  # after N steps
    qmodel.eval()
    qmodel.train()  # epoch 1: BN statistics and ranges freeze
    assert qmodel.bn_frozen and qmodel.ranges_frozen
    _steps(qmodel, x[64:], y[64:], n=2)
    outputs.append(_eval_equals_convert(qmodel, x_test))  # after freezing
    # Eval changed with training (and each time matched a fresh convert: nothing stale).
    assert not torch.equal(outputs[0], outputs[-1])
    # An optimizer step taken in eval mode (the weights changed): eval follows.
    qmodel.eval()
    cached = qmodel.integer_model()
    with torch.no_grad():
        for p in qmodel.parameters():
            p.mul_(1.01)
    after = _eval_equals_convert(qmodel, x_test)
    assert qmodel.integer_model() is not cached
    # Resumed from a checkpoint in a fresh process-like wrapper: the same integer model.
    fresh = eq.QATModule(warmed_model(name, x, steps=1), (x[:8],), scheme, config=eq.QATConfig(eq.FreezeSchedule(2)))
    fresh.load_state_dict(qmodel.state_dict())
    assert torch.equal(_eval_equals_convert(fresh, x_test), after)
    # And what eval shows is what onnxruntime computes on the exported file.
    result = qmodel.export(tmp_path / "m.onnx")
    assert result.parity.eval_agreement == (0.0, 1.0)
    ort_out = run_onnx(session(str(result.path)), (x_test,))[0]
    if scheme == "int8_pow2":
        assert np.array_equal(ort_out, after.numpy())
    else:  # float32 sums in another order: the documented rounding rule, not bit-exactness
        assert result.parity.rounding is None or result.parity.rounding.max_lsb <= 1
        assert (ort_out.argmax(1) == after.numpy().argmax(1)).mean() >= 0.9  # random weights: many near-ties


def _mobilenet_with_dead_channel(model: nn.Module, channel: int = 3) -> nn.Module:
    """Kill one stem channel as a too-high learning rate does (its ReLU6 is 0 on every input).

    The first depthwise conv's BN then has running variance 0 there, so its fold
    factor is ~1/sqrt(eps): the case of shared/notes/per-tensor-depthwise-collapse.md.
    """
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        model.features[0][1].bias[channel] = -1e3
        dw_bn = model.features[1].conv[0][1]
        dw_bn.running_var[channel] = 0.0
        dw_bn.running_mean[channel] = 0.0
    return model.eval()


@pytest.mark.slow
def test_dead_channel_model_trains_without_nan_and_ends_near_float(digits_model, digits_train, digits_test):
    from edgequant.demo.training import accuracy

    x, y = digits_train
    model = _mobilenet_with_dead_channel(digits_model("mobilenet_v2"))
    test = list(zip(digits_test[0].split(120), digits_test[1].split(120), strict=True))
    float_top1 = accuracy(model, test)
    qmodel = eq.QATModule(model, (x[:32],), "int8_pow2", config=eq.QATConfig(eq.FreezeSchedule(1)))
    assert qmodel.dead_channels == {"features.1.conv.0.0": [3]}
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    qmodel.train()
    for i in range(0, 640, 64):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(qmodel(x[i : i + 64]), y[i : i + 64])
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    assert accuracy(qmodel, test) >= float_top1 - 1.0


@pytest.mark.slow
def test_nan_input_in_training_raises_before_any_range_moves(digits_train):
    x, _ = digits_train
    qmodel = eq.QATModule(warmed_model("resnet18", x, steps=1), (x[:8],))
    ranges = [fq.activation_post_process.max_val.clone() for fq in qmodel.activation_quantizers()]
    bad = x[:8].clone()
    bad[3, 0, 5, 5] = float("nan")
    with pytest.raises(eq.NonFiniteError, match="input 0 of this batch contains NaN"):
        qmodel.train()(bad)
    after = [fq.activation_post_process.max_val for fq in qmodel.activation_quantizers()]
    assert all(torch.equal(a, b) for a, b in zip(ranges, after, strict=True))


class _TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3, padding=1)
        self.second = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.second(torch.relu(self.first(x)))).mean((2, 3)))


def test_overflow_in_a_layer_raises_naming_that_layer():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 8, 8)
    qmodel = eq.QATModule(_TwoConvs(), (x,)).train()
    with torch.no_grad():
        qmodel.model.second.weight.fill_(3e38)  # finite weights whose sums overflow to Inf
    with pytest.raises(eq.NonFiniteError, match="layer `second` overflowed") as info:
        qmodel(x)
    assert info.value.layer == "second"


def test_diverged_weights_raise_naming_the_parameter():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 8, 8)
    qmodel = eq.QATModule(_TwoConvs(), (x,)).train()
    with torch.no_grad():
        qmodel.model.first.bias[2] = float("nan")
    with pytest.raises(eq.NonFiniteError, match=r"parameter `first\.bias`.*learning rate"):
        qmodel(x)


def test_ptq_calibration_overflow_raises_naming_the_layer():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 8, 8)
    model = _TwoConvs().eval()
    with torch.no_grad():
        model.second.weight.fill_(3e38)
    with pytest.raises(eq.NonFiniteError, match="layer `second`"):
        eq.PTQModule(model, (x,)).calibrate([x], progress=False)


@pytest.mark.slow
def test_calibration_data_starts_qat_from_the_ptq_recipe(digits_model, digits_train, digits_test):
    x, _ = digits_train
    model = _mobilenet_with_dead_channel(digits_model("mobilenet_v2"))
    calib = [x[i : i + 32] for i in range(0, 128, 32)]
    # covering weight exponents: QAT re-ranges weights that way (see test_qat_from_ptq_starts_where_ptq_ended)
    config = eq.PTQConfig(weight_exponent="ceil")
    ptq = eq.PTQModule(model, (x[:32],), "int8_pow2", config).calibrate(calib, progress=False)
    qmodel = eq.QATModule(
        model,
        (x[:32],),
        "int8_pow2",
        config=eq.QATConfig(eq.FreezeSchedule(2)),
        calibration_data=calib,
        ptq_config=config,
    ).eval()
    x_test = digits_test[0][:64]
    with torch.no_grad():
        # Same folded, equalized weights and the same ranges: the same integer model as PTQ's.
        assert torch.equal(qmodel(x_test), ptq(x_test))
    assert qmodel.dead_channels == ptq.dead_channels == {"features.1.conv.0.0": [3]}


def _conv_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()


def test_qat_config_round_trips_and_validates():
    config = eq.QATConfig(eq.FreezeSchedule(10), averaging_constant=0.05, sync=False)
    data = config.to_dict()
    assert data == {
        "version": 1,
        "schedule": {"version": 1, "total_epochs": 10},
        "averaging_constant": 0.05,
        "sync": False,
    }
    assert eq.QATConfig.from_dict(json.loads(json.dumps(data))) == config
    assert eq.QATConfig.from_dict({"version": 1}) == eq.QATConfig()
    with pytest.raises(ValueError, match=r"QATConfig data has version 2, newer .*upgrade edgequant"):
        eq.QATConfig.from_dict({**data, "version": 2})
    with pytest.raises(ValueError, match="QATConfig has no field 'total_epochs'; its fields are schedule, "):
        eq.QATConfig.from_dict({"version": 1, "total_epochs": 10})
    with pytest.raises(ValueError, match=r"schedule must be an eq\.FreezeSchedule, e\.g\. FreezeSchedule\("):
        eq.QATConfig(schedule=10)
    for bad in (0, 1.0, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match=r"averaging_constant must be a number in \(0, 1\)"):
            eq.QATConfig(averaging_constant=bad)
    with pytest.raises(ValueError, match="sync must be True or False, got 'no'"):
        eq.QATConfig(sync="no")


@pytest.mark.slow
def test_default_call_and_a_wrong_config_type():
    x = torch.randn(4, 3, 8, 8)
    qmodel = eq.QATModule(_conv_bn(), (x,), "int8_pow2")
    assert qmodel.config == eq.QATConfig()
    assert {fq.activation_post_process.averaging_constant for fq in qmodel.activation_quantizers()} == {0.01}
    assert all(fq.activation_post_process.sync_across_ranks for fq in qmodel.activation_quantizers())
    unsynced = eq.QATModule(_conv_bn(), (x,), "int8_pow2", eq.QATConfig(sync=False))
    assert not any(fq.activation_post_process.sync_across_ranks for fq in unsynced.activation_quantizers())
    # The old fourth argument was total_epochs: the error says what to pass instead.
    with pytest.raises(TypeError, match=r"config must be an eq\.QATConfig, e\.g\. .*FreezeSchedule.*; got int"):
        eq.QATModule(_conv_bn(), (x,), "int8_pow2", 10)


@pytest.mark.slow
def test_averaging_constant_sets_how_fast_a_range_follows():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 8, 8)
    grown = {}
    for constant in (0.01, 0.5):
        qmodel = eq.QATModule(_conv_bn(), (x,), "int8_pow2", eq.QATConfig(averaging_constant=constant)).train()
        observer = qmodel.activation_quantizers()[0].activation_post_process  # the network input's range
        start = float(observer.max_val)  # from the example batch: the first of the running mean
        with torch.no_grad():
            for _ in range(3):
                qmodel(10 * x)
        grown[constant] = float(observer.max_val) / start
    # Each batch weighs max(1/n, c): 0.01 keeps the plain mean of (1, 10, 10, 10) = 7.75 here,
    # 0.5 halves the distance to 10 at each step: 1 -> 5.5 -> 7.75 -> 8.875.
    assert grown[0.01] == pytest.approx(7.75, rel=1e-5)
    assert grown[0.5] == pytest.approx(8.875, rel=1e-5)


@pytest.mark.slow
def test_freeze_schedule_from_the_config_freezes_bn_then_ranges():
    torch.manual_seed(2)
    x = torch.randn(16, 3, 8, 8)
    qmodel = eq.QATModule(_conv_bn(), (x[:4],), "int8_pow2", eq.QATConfig(eq.FreezeSchedule(total_epochs=4)))
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=1e-2)
    running_var = qmodel.model.get_buffer("1.running_var")
    seen = []
    for epoch in range(4):
        qmodel.train()
        var_before = running_var.clone()
        ranges_before = [fq.activation_post_process.max_val.clone() for fq in qmodel.activation_quantizers()]
        for step in range(2):
            optimizer.zero_grad()
            qmodel(x * (1 + epoch + step)).square().mean().backward()  # growing inputs: ranges must move
            optimizer.step()
        qmodel.eval()
        ranges_moved = any(
            not torch.equal(before, fq.activation_post_process.max_val)
            for before, fq in zip(ranges_before, qmodel.activation_quantizers(), strict=True)
        )
        seen.append((qmodel.epoch, not torch.equal(var_before, running_var), ranges_moved))
    # FreezeSchedule(4): BN statistics freeze at epoch 2, ranges at epoch 3.
    assert seen == [(0, True, True), (1, True, True), (2, False, True), (3, False, False)]


def _small_residual_net() -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6())
            self.head = nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            return self.head((x + self.dw(x)).mean((2, 3)))

    torch.manual_seed(3)
    return Net().eval()


def _train_losses(qmodel, forward, x, y, steps=3):
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for i in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(forward(x[8 * i : 8 * i + 8]), y[8 * i : 8 * i + 8])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8_pow2", "int8"])
def test_torch_compile_traces_one_graph_and_trains_exactly_as_eager(scheme):
    """No graph break inside the wrapped model; with Inductor's code generation left out
    (`aot_eager`), compiled training steps are bit-equal to eager ones, ranges included."""
    torch.manual_seed(0)
    x, y = torch.randn(24, 3, 12, 12), torch.randint(0, 5, (24,))
    qmodel = eq.QATModule(_small_residual_net(), (x[:4],), scheme).train()
    explained = torch._dynamo.explain(copy.deepcopy(qmodel).model)(x[:8])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    eager, compiled = copy.deepcopy(qmodel), copy.deepcopy(qmodel)
    expected = _train_losses(eager, eager, x, y)
    assert _train_losses(compiled, torch.compile(compiled, backend="aot_eager"), x, y) == expected
    after_eager, after_compiled = eager.state_dict(), compiled.state_dict()
    assert all(torch.equal(after_eager[k], after_compiled[k]) for k in after_eager)
    # Eager steps after compiled ones go on from the same range history.
    assert _train_losses(compiled, compiled, x, y) == _train_losses(eager, eager, x, y)
    eager.eval(), compiled.eval()
    assert torch.equal(eager(x), compiled(x))


@pytest.mark.slow
def test_inductor_compiled_qat_trains_and_evaluates_as_its_integer_model(tmp_path):
    """Inductor reorders float arithmetic, so rounding ties fall differently than in eager:
    the losses are close, not equal; the result is still a model whose eval is its export."""
    torch.manual_seed(0)
    x, y = torch.randn(24, 3, 12, 12), torch.randint(0, 5, (24,))
    qmodel = eq.QATModule(_small_residual_net(), (x[:4],), "int8_pow2").train()
    eager = copy.deepcopy(qmodel)
    expected = _train_losses(eager, eager, x, y)
    compiled = torch.compile(qmodel)
    got = _train_losses(qmodel, compiled, x, y)
    assert got[0] == pytest.approx(expected[0], abs=0.05) and all(np.isfinite(got))
    compiled.eval()
    assert torch.equal(compiled(x), qmodel.convert()(x))
    result = qmodel.export(tmp_path / "compiled.onnx")
    assert result.parity.max_abs_diff == 0.0
    ort_out = run_onnx(session(str(tmp_path / "compiled.onnx")), (x,))[0]
    assert np.array_equal(ort_out, qmodel(x).detach().numpy())
