import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from edgequant.cli.loading import (
    DataError,
    ModelSpecError,
    WeightsError,
    digits_data,
    image_folder_loader,
    load_data,
    load_weights,
    resolve_model,
)
from edgequant.demo.data import digits_tensors


def small_net(num_classes: int = 10) -> nn.Module:
    """A factory for the `module:factory` spec tests."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    )


def not_a_model() -> str:
    return "a string"


SMALL_INSTANCE = nn.Linear(2, 2)


def test_torchvision_spec_builds_random_init_with_classes():
    model = resolve_model("torchvision:resnet18", num_classes=7)
    assert model.fc.out_features == 7
    assert not model.training


def test_torchvision_segmentation_spec_never_downloads_a_backbone():
    # weights_backbone defaults to ImageNet weights in torchvision; resolve_model must switch it off.
    model = resolve_model("torchvision:lraspp_mobilenet_v3_large", num_classes=3)
    out = model(torch.rand(1, 3, 64, 64))["out"]
    assert out.shape == (1, 3, 64, 64)


def test_unknown_torchvision_name_suggests_close_ones():
    with pytest.raises(ModelSpecError, match=r"no model 'resnet19'.*resnet18"):
        resolve_model("torchvision:resnet19")


def test_factory_spec_passes_num_classes_only_when_given():
    model = resolve_model("tests.cli.test_loading:small_net", num_classes=3)
    assert model(torch.zeros(2, 3, 4, 4)).shape == (2, 3)
    assert resolve_model("tests.cli.test_loading:small_net")(torch.zeros(2, 3, 4, 4)).shape == (2, 10)


def test_spec_may_name_a_model_instance_or_a_file(tmp_path):
    assert resolve_model("tests.cli.test_loading:SMALL_INSTANCE") is SMALL_INSTANCE
    source = tmp_path / "my_models.py"
    source.write_text("from torch import nn\n\ndef build():\n    return nn.Linear(3, 5)\n")
    assert resolve_model(f"{source}:build").out_features == 5


def test_spec_may_be_a_whole_saved_model(tmp_path):
    torch.save(nn.Sequential(nn.Linear(3, 5)).train(), tmp_path / "whole.pt")
    loaded = resolve_model(str(tmp_path / "whole.pt"))
    assert isinstance(loaded, nn.Sequential) and loaded[0].out_features == 5 and not loaded.training
    torch.save(nn.Linear(3, 5).state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ModelSpecError, match="holds a OrderedDict, not a whole model"):
        resolve_model(str(tmp_path / "weights.pt"))
    with pytest.raises(ModelSpecError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("resnet18", "should look like torchvision:resnet18"),
        ("no_such_package.models:net", "cannot import module 'no_such_package.models'"),
        ("tests.cli.test_loading:missing", "has no attribute 'missing'"),
        ("tests.cli.test_loading:not_a_model", "returned a str, not a torch nn.Module"),
        ("/no/such/file.py:net", "does not exist"),
    ],
)
def test_unresolvable_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ModelSpecError, match=message):
        resolve_model(spec)


def test_factory_without_num_classes_parameter():
    with pytest.raises(ModelSpecError, match="takes no num_classes"):
        resolve_model("tests.cli.test_loading:not_a_model", num_classes=3)


def _trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model.state_dict()


@pytest.mark.parametrize("layout", ["plain", "nested", "ddp"])
def test_load_weights_accepts_common_checkpoint_layouts(tmp_path, layout):
    source = small_net()
    state = _trained_state(source)
    saved = {
        "plain": state,
        "nested": {"epoch": 3, "state_dict": state},
        "ddp": {f"module.{k}": v for k, v in state.items()},
    }[layout]
    torch.save(saved, tmp_path / "w.pt")
    target = load_weights(small_net(), tmp_path / "w.pt")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(target(x), source.eval()(x))


def test_mismatched_checkpoint_lists_the_keys(tmp_path):
    torch.save(resolve_model("torchvision:resnet18", num_classes=10).state_dict(), tmp_path / "w.pt")
    with pytest.raises(WeightsError, match=r"shape mismatch: fc.weight \(checkpoint \[10, 512\], model \[5, 512\]\)"):
        load_weights(resolve_model("torchvision:resnet18", num_classes=5), tmp_path / "w.pt")
    with pytest.raises(WeightsError, match=r"missing: 0.weight, 0.bias, .*; unexpected: conv1.weight, .* and 114 more"):
        load_weights(resolve_model("tests.cli.test_loading:small_net"), tmp_path / "w.pt")


def test_unreadable_or_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights file .* does not exist"):
        load_weights(small_net(), tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read checkpoint"):
        load_weights(small_net(), tmp_path / "bad.pt")
    torch.save({"lr": 0.1}, tmp_path / "hparams.pt")
    with pytest.raises(WeightsError, match="holds no state_dict"):
        load_weights(small_net(), tmp_path / "hparams.pt")


def _image_folder(root, classes=("cat", "dog"), per_class=3, size=(40, 30)):
    rng = np.random.default_rng(0)
    pixels = {}
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(array).save(root / c / f"{i}.png")
            pixels[(c, i)] = array
    return pixels


def test_image_folder_resizes_crops_and_normalizes(tmp_path):
    pixels = _image_folder(tmp_path, size=(8, 8))
    # 8x8 images at image_size 7: resize to round(7 * 8/7) = 8 (a no-op), then center-crop 7.
    data = image_folder_loader(tmp_path, image_size=7, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), batch_size=4)
    assert (data.num_classes, data.size) == (2, 6)
    x, y = next(iter(data.loader))
    assert x.shape == (4, 3, 7, 7)
    assert y.tolist() == [0, 0, 0, 1]  # class index = sorted folder name
    expected = (pixels[("cat", 0)][0:7, 0:7].astype(np.float32) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_resize_none_leaves_images_at_the_input_size_untouched(tmp_path):
    pixels = _image_folder(tmp_path, size=(16, 16))
    kept = image_folder_loader(tmp_path, image_size=16, mean=(0, 0, 0), std=(1, 1, 1), resize="none")
    x, _ = next(iter(kept.loader))
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), pixels[("cat", 0)] / 255, atol=1e-6)
    # the default resamples: short side to round(16 * 8/7) = 18, then a 16 crop of that
    cropped = next(iter(image_folder_loader(tmp_path, image_size=16, mean=(0, 0, 0), std=(1, 1, 1)).loader))[0]
    assert not np.allclose(cropped[0].numpy(), x[0].numpy(), atol=1e-3)
    with pytest.raises(DataError, match="smaller than --input-size 32"):
        next(iter(image_folder_loader(tmp_path, image_size=32, resize="none").loader))
    with pytest.raises(ValueError, match="resize must be one of"):
        image_folder_loader(tmp_path, image_size=16, resize="stretch")


def test_limit_draws_from_every_class(tmp_path):
    _image_folder(tmp_path, classes=("a", "b", "c"), per_class=10, size=(8, 8))
    data = image_folder_loader(tmp_path, image_size=8, batch_size=64, limit=9)
    labels = next(iter(data.loader))[1]
    assert len(labels) == 9 and set(labels.tolist()) == {0, 1, 2}


def test_empty_data_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data folder .* does not exist"):
        image_folder_loader(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders, nothing; expected the ImageFolder layout"):
        image_folder_loader(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match=r"no class folders, only files \(x.png\)"):
        image_folder_loader(tmp_path / "flat")
    (tmp_path / "hollow" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"has class folders \(cat\) but no images"):
        image_folder_loader(tmp_path / "hollow")


def test_digits_data_matches_the_bundled_split():
    data = digits_data("test", image_size=16, batch_size=400)
    x, y = next(iter(data.loader))
    expected_x, expected_y = digits_tensors("test", 16)
    assert torch.equal(x, expected_x) and torch.equal(y, expected_y)
    assert data.num_classes == 10


def test_load_data_dispatches_and_rejects_normalization_for_digits(tmp_path):
    assert load_data("digits", "train", limit=5).size == 5
    with pytest.raises(ValueError, match="--mean / --std apply to image folders"):
        load_data("digits", "train", mean=(0.5, 0.5, 0.5))
    _image_folder(tmp_path, size=(8, 8))
    assert load_data(str(tmp_path), "train", image_size=8).num_classes == 2
