import dataclasses
import os
import warnings

import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.wrappers.checkpoint import CheckpointError

from ..helpers import run_qat_resume_script


def _net(classes: int = 4, bn: bool = True) -> nn.Module:
    """A small conv net; without BN, QAT wrapping skips torchao's slow conv+BN pattern search."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8) if bn else nn.Identity(),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    ).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(8, 3, 8, 8)


def _trained_qat(x: torch.Tensor, scheme: str = "int8_pow2") -> eq.QATModule:
    qmodel = eq.QATModule(_net(), (x,), scheme, config=eq.QATConfig(eq.FreezeSchedule(4)))
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.05)
    qmodel.train()
    for _ in range(2):
        optimizer.zero_grad()
        qmodel(x).square().mean().backward()
        optimizer.step()
    qmodel.eval()
    qmodel.train()  # a second epoch starts: the epoch counter must survive the round trip
    qmodel(x).sum().backward()
    return qmodel.eval()


@pytest.mark.slow
def test_qat_checkpoint_round_trip_restores_outputs_and_epoch(x, tmp_path):
    qmodel = _trained_qat(x)
    path = qmodel.save(tmp_path / "qat.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["scheme"]["name"] == "int8_pow2" and payload["wrapper"] == "QATModule"
    assert payload["model_class"] == "torch.nn.modules.container.Sequential"
    fresh = eq.QATModule(_net(), (x,), "int8_pow2", config=eq.QATConfig(eq.FreezeSchedule(4))).load(path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), qmodel(x))
    assert fresh.epoch == qmodel.epoch == 1
    assert os.listdir(tmp_path) == ["qat.pt"]  # no temporary file left


def test_scheme_and_config_are_stored_as_their_records(x, tmp_path):
    config = eq.QATConfig(eq.FreezeSchedule(4), averaging_constant=0.05)
    qmodel = eq.QATModule(_net(bn=False), (x,), "int8", config)
    payload = torch.load(qmodel.save(tmp_path / "q.pt"), weights_only=True)
    assert payload["format_version"] == 2
    assert payload["scheme"] == eq.get_scheme("int8").to_dict()
    assert eq.QATConfig.from_dict(payload["config"]) == config


def _as_format_1(path, out):
    """The checkpoint at `path` as format 1 wrote it: the scheme's fields unversioned, no config."""
    payload = torch.load(path, weights_only=True)
    del payload["config"]
    scheme = {k: v for k, v in payload["scheme"].items() if k != "version"}
    torch.save({**payload, "format_version": 1, "scheme": scheme}, out)
    return out


@pytest.mark.slow
def test_format_1_checkpoints_still_load(x, tmp_path, ptq_checkpoint):
    qmodel = _trained_qat(x)
    old = _as_format_1(qmodel.save(tmp_path / "q.pt"), tmp_path / "q1.pt")
    fresh = eq.QATModule(_net(), (x,), "int8_pow2", eq.QATConfig(eq.FreezeSchedule(8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # format 1 recorded no config: nothing to compare, nothing to warn
        fresh.load(old).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), qmodel(x))
    assert fresh.epoch == qmodel.epoch == 1
    old_ptq = _as_format_1(ptq_checkpoint, tmp_path / "p1.pt")
    assert not eq.PTQModule(_net(), (x,)).load(old_ptq).training
    with pytest.raises(CheckpointError, match=r"scheme 'int8_pow2', this wrapper uses 'int8'.*power_of_2=True"):
        eq.PTQModule(_net(), (x,), "int8").load(old_ptq)


def test_a_scheme_version_1_checkpoint_loads_only_into_signed_grids(x, tmp_path):
    """Version 1 schemes quantized every activation as int8: unsigned grids would change what it computed."""
    signed = dataclasses.replace(eq.get_scheme("int8_pow2"), unsigned_activations=False)
    ptq = eq.PTQModule(_net(), (x,), signed).calibrate([x], progress=False)
    payload = torch.load(ptq.save(tmp_path / "p.pt"), weights_only=True)
    scheme = {k: v for k, v in payload["scheme"].items() if k != "unsigned_activations"}
    torch.save({**payload, "scheme": {**scheme, "version": 1}}, tmp_path / "v1.pt")
    with pytest.raises(CheckpointError, match=r"unsigned_activations=False \(here True\)"):
        eq.PTQModule(_net(), (x,)).load(tmp_path / "v1.pt")
    fresh = eq.PTQModule(_net(), (x,), signed).load(tmp_path / "v1.pt")
    with torch.no_grad():
        assert torch.equal(fresh(x), ptq(x))


@pytest.mark.slow
def test_another_config_loads_with_a_warning(x, tmp_path):
    path = _trained_qat(x).save(tmp_path / "q.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eq.QATModule(_net(), (x,), "int8_pow2", eq.QATConfig(eq.FreezeSchedule(4))).load(path)
    longer = eq.QATModule(_net(), (x,), "int8_pow2", eq.QATConfig(eq.FreezeSchedule(8), sync=False))
    with pytest.warns(
        eq.EdgequantWarning,
        match=r"another QATConfig: schedule=FreezeSchedule\(total_epochs=4\) "
        r"\(here FreezeSchedule\(total_epochs=8\)\), sync=True \(here False\); this wrapper's",
    ):
        longer.load(path)
    assert longer.epoch == 1 and longer.ranges_frozen is False  # its own schedule: ranges freeze at epoch 6


def test_records_this_version_cannot_read_are_refused(x, tmp_path, ptq_checkpoint):
    payload = torch.load(ptq_checkpoint, weights_only=True)
    newer = tmp_path / "newer.pt"
    torch.save({**payload, "scheme": {**payload["scheme"], "version": 3}}, newer)
    with pytest.raises(CheckpointError, match=r"checkpoint's scheme cannot be read: .*version 3.*upgrade edgequant"):
        eq.PTQModule(_net(), (x,)).load(newer)
    torch.save({**payload, "config": {**payload["config"], "shiny": True}}, newer)
    with pytest.raises(CheckpointError, match=r"checkpoint's PTQConfig cannot be read: .*no field 'shiny'"):
        eq.PTQModule(_net(), (x,)).load(newer)


@pytest.mark.parametrize("estimator", ["mse", "sample_mse", "percentile", "mean_max"])
def test_ptq_checkpoint_round_trip_is_calibrated_and_in_eval(x, tmp_path, estimator):
    """Ranges estimated in a second pass (tighter than min/max) are part of the checkpoint."""
    outlier = x.clone()
    outlier[0] *= 40.0  # one sample far outside the others: the estimators clip it
    config = eq.PTQConfig(range_estimator=estimator, percentile=90.0)
    ptq = eq.PTQModule(_net(), (x,), config=config).calibrate([outlier, 0.5 * x], progress=False)
    minmax = eq.PTQModule(_net(), (x,), config=eq.PTQConfig(range_estimator="minmax"))
    minmax.calibrate([outlier, 0.5 * x], progress=False)
    scales = [float(o.qparams()[0][0]) for o in ptq.activation_observers()]
    assert scales != [float(o.qparams()[0][0]) for o in minmax.activation_observers()]
    with torch.no_grad():
        expected = ptq(x)  # also fills the cached integer model, which must not be saved
    ptq.save(tmp_path / "ptq.pt")
    fresh = eq.PTQModule(_net(), (x,), config=config).load(tmp_path / "ptq.pt")
    assert not fresh.training  # a calibrated module quantizes; train mode would widen its ranges
    assert [float(o.qparams()[0][0]) for o in fresh.activation_observers()] == scales
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


@pytest.fixture(scope="module")
def ptq_checkpoint(x, tmp_path_factory):
    path = tmp_path_factory.mktemp("ptq") / "p.pt"
    return eq.PTQModule(_net(), (x,)).calibrate([x], progress=False).save(path)


def test_loading_into_another_scheme_names_both_schemes(x, ptq_checkpoint):
    with pytest.raises(CheckpointError, match=r"scheme 'int8_pow2', this wrapper uses 'int8'.*power_of_2=True"):
        eq.PTQModule(_net(), (x,), "int8").load(ptq_checkpoint)


def test_loading_into_another_wrapper_or_architecture_says_so(x, ptq_checkpoint):
    path = ptq_checkpoint
    with pytest.raises(CheckpointError, match=r"saved from a PTQModule, not a QATModule.*from_ptq"):
        eq.QATModule(_net(bn=False), (x,)).load(path)

    class Other(nn.Sequential):
        pass

    with pytest.raises(CheckpointError, match=r"model class torch\.nn\.modules\.container\.Sequential.*architecture"):
        eq.PTQModule(Other(*_net()), (x,)).load(path)


def test_state_dict_of_another_architecture_lists_the_keys(x):
    state = eq.QATModule(_net(classes=4, bn=False), (x,)).state_dict()
    with pytest.raises(CheckpointError) as info:
        eq.QATModule(_net(classes=5, bn=False), (x,)).load_state_dict(state)
    text = str(info.value)
    assert "different architecture or scheme" in text
    assert "model.7.weight: checkpoint (4, 8) vs this model (5, 8)" in text

    shallow = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with pytest.raises(CheckpointError) as info:
        eq.QATModule(shallow, (x,)).load_state_dict(state)
    text = str(info.value)
    assert "unexpected keys" in text and "model.7.weight" in text


def test_state_dict_of_another_scheme_is_caught_by_range_shapes(x):
    per_channel = eq.QATModule(_net(bn=False), (x,), "int8").state_dict()
    with pytest.raises(CheckpointError, match="per-channel range of 8 vs a per-tensor quantizer"):
        eq.QATModule(_net(bn=False), (x,), "int8_pow2").load_state_dict(per_channel)
    per_tensor = eq.PTQModule(_net(), (x,), "int8_pow2").calibrate([x], progress=False).state_dict()
    with pytest.raises(CheckpointError, match="per-tensor range vs a per-channel quantizer"):
        eq.PTQModule(_net(), (x,), "int8").load_state_dict(per_tensor)


def test_non_strict_load_still_works_for_partial_state(x):
    qmodel = eq.QATModule(_net(bn=False), (x,))
    partial = {"model.0.weight": torch.randn(8, 3, 3, 3)}
    result = qmodel.load_state_dict(partial, strict=False)
    assert "qat_state" in result.missing_keys
    assert torch.equal(qmodel.model.get_parameter("0.weight"), partial["model.0.weight"])


def test_interrupted_save_keeps_the_previous_checkpoint(x, tmp_path, monkeypatch):
    qmodel = eq.PTQModule(_net(), (x,)).calibrate([x], progress=False)
    path = qmodel.save(tmp_path / "q.pt")
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        qmodel.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["q.pt"]


def test_unreadable_or_foreign_files_are_refused(x, tmp_path):
    qmodel = eq.PTQModule(_net(), (x,))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        qmodel.load(garbage)
    plain = tmp_path / "plain.pt"
    torch.save(qmodel.state_dict(), plain)
    with pytest.raises(CheckpointError, match=r"not an edgequant checkpoint.*load_state_dict"):
        qmodel.load(plain)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        qmodel.load(tmp_path / "missing.pt")


@pytest.mark.slow
def test_qat_killed_mid_epoch_resumes_to_a_byte_identical_export(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    whole.mkdir(), resumed.mkdir()
    log = run_qat_resume_script(whole)
    assert "[exit 0]" in log, log
    # Killed in epoch 2, after BN froze and before ranges freeze; the second start resumes there.
    log = run_qat_resume_script(resumed, "--kill", "2:3")
    assert "SIGKILL at epoch 2 step 3" in log and "exported" not in log, log
    assert "saved epoch 1" in log and "saved epoch 2" not in log, log
    log = run_qat_resume_script(resumed, "--kill", "2:3")
    assert "resumed at epoch 2" in log and "[exit 0]" in log, log
    assert (resumed / "final.onnx").read_bytes() == (whole / "final.onnx").read_bytes()


@pytest.mark.slow
def test_optimizer_state_travels_with_the_checkpoint(x, tmp_path):
    qmodel = eq.QATModule(_net(), (x,), "int8_pow2", config=eq.QATConfig(eq.FreezeSchedule(4))).train()
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        optimizer.zero_grad()
        qmodel(x).square().mean().backward()
        optimizer.step()
    path = qmodel.eval().save(tmp_path / "q.pt", optimizer=optimizer)
    fresh = eq.QATModule(_net(), (x,), "int8_pow2", config=eq.QATConfig(eq.FreezeSchedule(4)))
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    fresh.load(path, optimizer=fresh_optimizer)
    for mine, theirs in zip(fresh.parameters(), qmodel.parameters(), strict=True):
        assert torch.equal(fresh_optimizer.state[mine]["momentum_buffer"], optimizer.state[theirs]["momentum_buffer"])
    assert (fresh.epoch, fresh.next_epoch) == (0, 1)  # epoch 0 has trained: a resumed loop starts at 1
    with pytest.raises(eq.EdgequantError, match="no optimizer state") as info:
        fresh.load(qmodel.save(tmp_path / "plain.pt"), optimizer=fresh_optimizer)
    assert isinstance(info.value, CheckpointError)  # one error base: callers may catch either
