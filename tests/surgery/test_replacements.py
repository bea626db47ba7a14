"""Each replacement against the module it replaces: exact ones on random inputs, approximate ones by construction."""

import pytest
import torch
import torchvision
from torch import nn

from edgequant.export.tidl_check import DEPTHWISE_KERNELS
from edgequant.surgery.replacements import BY_NAME, REPLACEMENTS, SQUEEZE_EXCITATION, LastAxisBatchNorm

EXACT = [r.name for r in REPLACEMENTS if r.exact]


def build(name: str, module: nn.Module, x: torch.Tensor) -> nn.Module | str | None:
    return BY_NAME[name].build(module, x)


def same(a: nn.Module, b: nn.Module, x: torch.Tensor, exact: bool = False) -> None:
    with torch.no_grad():
        want, got = a(x), b(x)
    assert got.shape == want.shape
    if exact:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_every_replacement_names_tidl_rules_that_exist():
    from edgequant.export.tidl_check import RULES

    ids = {rule.id for rule in RULES}
    assert all(set(r.rules) <= ids and r.rules for r in REPLACEMENTS)
    assert len(BY_NAME) == len(REPLACEMENTS)


@pytest.mark.parametrize("kernel", [5, 7, 9, 13])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("extra", [0, 1])
@pytest.mark.parametrize("size", [9, 16, 17])
def test_max_pool_cascade_is_bit_exact(kernel, stride, extra, size):
    padding = (kernel - 3) // 2 + extra
    pool = nn.MaxPool2d(kernel, stride, padding)
    x = torch.randn(2, 3, size, size)
    cascade = build("max-pool", pool, x)
    assert isinstance(cascade, nn.Sequential)
    assert all(m.kernel_size == 3 for m in cascade)
    same(pool, cascade, x, exact=True)


def test_max_pool_kept_or_left():
    x = torch.randn(1, 2, 12, 12)
    assert build("max-pool", nn.MaxPool2d(3, 2, 1), x) is None  # validated by TI
    assert build("max-pool", nn.MaxPool2d(4, 1, 2), x).startswith("kept: ")  # even
    assert build("max-pool", nn.MaxPool2d(5, 1, 2, ceil_mode=True), x).startswith("kept: ")
    assert build("max-pool", nn.MaxPool2d(5, 1, 0), x).startswith("kept: ")  # padding 0 < (5-3)/2
    assert build("max-pool", nn.AvgPool2d(5), x) is None


@pytest.mark.parametrize(("mode", "align"), [("nearest", None), ("bilinear", None), ("bilinear", True)])
def test_upsample_size_becomes_scale(mode, align):
    up = nn.Upsample(size=(24, 16), mode=mode, align_corners=align)
    x = torch.randn(2, 3, 6, 4)
    new = build("upsample-size", up, x)
    assert new.size is None and new.scale_factor == (4.0, 4.0)
    same(up, new, x)
    assert build("upsample-size", nn.Upsample(size=10), torch.randn(1, 1, 4, 4)).startswith("kept: ")
    assert build("upsample-size", nn.Upsample(scale_factor=2), x) is None


@pytest.mark.parametrize(
    ("kernel", "stride", "padding"),
    [((2, 2), 2, 0), ((4, 4), 2, 1), ((2, 2), 1, 0), ((4, 4), 1, 2), ((2, 3), 1, (1, 1)), ((4, 1), 2, (1, 0))],
)
@pytest.mark.parametrize("size", [7, 8, 9])
def test_even_kernel_becomes_odd(kernel, stride, padding, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel, stride, padding)
    x = torch.randn(2, 3, size, size)
    new = build("even-kernel", conv, x)
    convs = [m for m in new.modules() if isinstance(m, nn.Conv2d)]
    assert all(k % 2 for k in convs[0].kernel_size)
    same(conv, new, x)


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(4, 4, 0), (3, 4, 1), (9, 2, 4), (8, 2, 3)])
def test_strided_conv_is_a_smaller_stride_then_subsampling(kernel, stride, padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel, stride, padding)
    x = torch.randn(2, 3, 32, 32)
    new = build("strided-conv", conv, x)
    assert isinstance(new[1], nn.MaxPool2d) and new[1].kernel_size == 1
    assert new[0].stride[0] * new[1].stride == stride
    same(conv, new, x)
    assert build("strided-conv", nn.Conv2d(3, 4, 11, 4), x) is None  # TIDL's one stride-4 kernel


@pytest.mark.parametrize(("kernel", "stride", "multiplier"), [(5, 1, 1), (3, 3, 1), (5, 1, 2), (1, 1, 1), (9, 2, 1)])
def test_depthwise_kernel_becomes_pairs(kernel, stride, multiplier):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6 * multiplier, kernel, stride, kernel // 2, groups=6)
    x = torch.randn(2, 6, 11, 11)
    new = build("depthwise-kernel", conv, x)
    assert new.groups == 3 and new.weight.shape[1] == 2
    same(conv, new, x)
    ok = nn.Conv2d(6, 6, 3, 1, 1, groups=6)
    assert (3, 3, 1) in DEPTHWISE_KERNELS and build("depthwise-kernel", ok, x) is None
    odd = nn.Conv2d(5, 5, 5, 1, 2, groups=5)
    assert build("depthwise-kernel", odd, torch.randn(1, 5, 8, 8)).startswith("kept: ")


@pytest.mark.parametrize(("kernel", "groups", "size"), [(5, 8, 1), (7, 1, 2), (7, 8, 2), (9, 8, 3), (9, 1, 1)])
def test_kernel_crop_on_maps_narrower_than_padding(kernel, groups, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, kernel, 1, kernel // 2, groups=groups)
    x = torch.randn(2, 8, size, size)
    new = build("kernel-crop", conv, x)
    assert max(new.padding) <= size - 1 and new.kernel_size == (2 * size - 1,) * 2
    same(conv, new, x)
    assert build("kernel-crop", conv, torch.randn(1, 8, kernel // 2, kernel // 2)) is None  # as wide as the padding
    strided = nn.Conv2d(8, 8, kernel, 2, kernel // 2)
    assert build("kernel-crop", strided, x).startswith("kept: ")


@pytest.mark.parametrize(("kernel", "dilation", "size"), [(3, 2, 1), (3, 4, 2), (5, 2, 3), (3, 4, 3), (5, 3, 2)])
def test_kernel_crop_of_dilated_convs(kernel, dilation, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, kernel, 1, dilation * (kernel // 2), dilation=dilation, groups=4)
    x = torch.randn(2, 4, size, size)
    new = build("kernel-crop", conv, x)
    assert max(new.padding) < size
    same(conv, new, x)


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("silu", nn.SiLU()),
        ("hardswish", nn.Hardswish(inplace=True)),
        ("hardsigmoid", nn.Hardsigmoid()),
        ("gelu", nn.GELU()),
        ("mish", nn.Mish()),
        ("leaky_relu", nn.LeakyReLU(0.1)),
        ("relu6", nn.ReLU6(inplace=True)),
    ],
)
def test_activations_become_relu(name, module):
    new = build(name, module, None)
    assert type(new) is nn.ReLU and not new.inplace
    assert build(name, nn.ReLU(), None) is None


def test_activations_of_other_libraries_by_class_name():
    swish = type("Swish", (nn.Module,), {"forward": lambda self, x: x * torch.sigmoid(x)})()
    assert type(build("silu", swish, None)) is nn.ReLU


def test_squeeze_excitation_becomes_identity():
    se = torchvision.ops.SqueezeExcitation(8, 2)
    assert type(se).__name__ in SQUEEZE_EXCITATION
    assert isinstance(build("squeeze-excitation", se, None), nn.Identity)
    assert build("squeeze-excitation", nn.Conv2d(8, 8, 1), None) is None


def test_layer_norm_over_channels_becomes_batch_norm_with_the_example_statistics():
    from torchvision.models.convnext import LayerNorm2d

    torch.manual_seed(0)
    ln = LayerNorm2d(6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2)
        ln.bias.normal_()
    x = torch.randn(4, 6, 5, 5) * 3 + 1
    bn = build("layer-norm", ln, x)
    assert type(bn) is nn.BatchNorm2d
    torch.testing.assert_close(bn.running_mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, x.var((0, 2, 3), unbiased=False))
    want = (x - x.mean((0, 2, 3), keepdim=True)) / (x.var((0, 2, 3), unbiased=False, keepdim=True) + ln.eps).sqrt()
    want = want * ln.weight[:, None, None] + ln.bias[:, None, None]
    torch.testing.assert_close(bn.eval()(x), want, rtol=1e-4, atol=1e-4)


def test_channels_last_layer_norm_becomes_last_axis_batch_norm():
    ln = nn.LayerNorm(6)
    x = torch.randn(4, 5, 5, 6)
    bn = build("layer-norm", ln, x)
    assert isinstance(bn, LastAxisBatchNorm)
    out = bn.eval()(x)
    want = (x - x.mean((0, 1, 2))) / (x.var((0, 1, 2), unbiased=False) + ln.eps).sqrt()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert build("layer-norm", nn.LayerNorm(6), torch.randn(2, 7, 6)).startswith("kept: ")  # tokens
