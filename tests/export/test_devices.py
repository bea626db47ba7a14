import pytest
import torch

import edgequant as eq
from edgequant.export.devices import DEVICES, device_for, get_device, target_scheme


def test_each_device_refuses_what_it_cannot_run():
    with pytest.raises(eq.EdgequantError, match=r"TDA4VM runs power-of-2, symmetric scales only.*use 'int8_pow2'"):
        get_device("TDA4VM").check(eq.get_scheme("int8"))
    asymmetric = eq.Scheme(power_of_2=False, symmetric_activations=False)
    with pytest.raises(ValueError, match="symmetric scales only"):
        get_device("TDA4VM").check(asymmetric)
    for name in ("AM62A", "AM67A", "AM68A", "AM69A"):
        for scheme in ("int8", "int8_pow2", "int16"):
            DEVICES[name].check(eq.get_scheme(scheme))
        DEVICES[name].check(asymmetric)
    with pytest.raises(ValueError, match=r"unknown device 'TDA5'; valid devices: TDA4VM, AM62A"):
        get_device("TDA5")


def test_target_scheme_follows_the_device():
    assert target_scheme(None, None)[0].name == "int8_pow2"
    assert target_scheme(None, "AM62A")[0].name == "int8"
    scheme, device = target_scheme("int8_pow2_dw", "tda4vm")
    assert (scheme.name, device.name) == ("int8_pow2_dw", "TDA4VM")
    assert (
        device_for(eq.get_scheme("int8")).name == "AM68A" and device_for(eq.get_scheme("int16_pow2")).name == "TDA4VM"
    )
    with pytest.raises(ValueError, match="device must be a name"):
        get_device(3)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


def test_device_sets_the_default_scheme_and_refuses_others():
    x = torch.randn(4, 3, 8, 8)
    assert eq.PTQModule(Net().eval(), (x,), device="AM68A").scheme.name == "int8"
    assert eq.QATModule(Net().eval(), (x,), device="TDA4VM").scheme.name == "int8_pow2"
    assert eq.PTQModule(Net().eval(), (x,)).scheme.name == "int8_pow2"
    with pytest.raises(ValueError, match="TDA4VM runs power-of-2"):
        eq.PTQModule(Net().eval(), (x,), "int8", device="TDA4VM")
