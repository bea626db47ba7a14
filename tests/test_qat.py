"""QATModule end to end on the torchvision zoo: train steps, eval, export, resume."""

import numpy as np
import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.parity import run_onnx, session

from .conftest import ZOO, qdq_nodes, warmed_model


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
    qmodel = eq.QATModule(model, (x[:8],), scheme="int8_pow2", total_epochs=3)
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
    fresh = eq.QATModule(warmed_model(name, digits_train[0], steps=1), (digits_train[0][:8],), total_epochs=3)
    fresh.load_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), qmodel(x))
    assert fresh.epoch == qmodel.epoch


def test_freeze_schedule_follows_epochs(digits_train):
    x, y = digits_train
    qmodel = eq.QATModule(warmed_model("resnet18", x, steps=1), (x[:8],), total_epochs=4)
    assert (qmodel.schedule.bn_freeze_epoch, qmodel.schedule.range_freeze_epoch) == (2, 3)
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


def test_evaluating_before_training_does_not_count_as_epoch(digits_train):
    x, y = digits_train
    qmodel = eq.QATModule(warmed_model("resnet18", x, steps=1), (x[:8],), total_epochs=2)
    qmodel.eval()
    qmodel.train()
    qmodel.eval()
    qmodel.train()
    assert qmodel.epoch == 0
    _steps(qmodel, x, y, n=1)
    qmodel.eval()
    qmodel.train()
    assert qmodel.epoch == 1


def test_gradients_reach_weights_through_rounding(digits_train):
    x, y = digits_train
    qmodel = eq.QATModule(warmed_model("resnet18", x, steps=1), (x[:8],))
    qmodel.train()
    nn.functional.cross_entropy(qmodel(x[:8]), y[:8]).backward()
    grads = [p.grad for p in qmodel.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads[:5])


def test_users_float_model_is_left_untouched(digits_train):
    x, y = digits_train
    model = warmed_model("resnet18", x, steps=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = eq.QATModule(model, (x[:8],))
    _steps(qmodel, x, y, n=2, lr=0.1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_qat_from_ptq_starts_where_ptq_ended(digits_model, digits_test, tmp_path):
    from edgequant.data import digits_loader

    x, _ = digits_test
    calib = digits_loader("train", batch_size=32, limit=64, shuffle=False)
    ptq = eq.PTQModule(digits_model("mobilenet_v2"), (x[:16],), "int8_pow2").calibrate(calib, progress=False)
    qmodel = eq.QATModule.from_ptq(ptq, total_epochs=2).eval()
    ptq_scales = [o.calculate_qparams()[0] for o in ptq.activation_observers()]
    qat_scales = [fq.scale for fq in qmodel.fake_quantizers() if fq.activation_post_process.averaging_constant != 1.0]
    assert all(torch.equal(a, b) for a, b in zip(ptq_scales, qat_scales, strict=True))
    with torch.no_grad():
        # same folded weights and ranges: the converted models compute the same integers
        assert torch.equal(qmodel.convert()(x[:32]), ptq(x[:32]))
    assert all(isinstance(p, torch.nn.Parameter) for p in qmodel.parameters()) and len(list(qmodel.parameters()))
    assert qmodel.export(tmp_path / "m.onnx").parity.max_abs_diff == 0.0


def test_from_uncalibrated_ptq_is_an_error(digits_train):
    x, _ = digits_train
    with pytest.raises(ValueError, match="calibrate"):
        eq.QATModule.from_ptq(eq.PTQModule(warmed_model("resnet18", x, steps=1), (x[:8],)))
