import pytest
import torch

from edgequant import QATModule
from edgequant.demo.data import digits_loader, digits_tensors
from edgequant.demo.training import accuracy, build_model, float_digits_model, onnx_accuracy


@pytest.mark.slow
def test_float_training_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQUANT_CACHE", str(tmp_path))
    first = float_digits_model("resnet18", epochs=1, progress=False)
    assert list(tmp_path.glob("resnet18_digits_e1_*.pt"))
    second = float_digits_model("resnet18", epochs=1, progress=False)
    x = digits_tensors("test")[0][:4]
    with torch.no_grad():
        assert torch.equal(first(x), second(x))


@pytest.mark.slow
def test_onnx_accuracy_matches_torch_accuracy_of_converted_model(tmp_path):
    x, _ = digits_tensors("train")
    qmodel = QATModule(build_model("resnet18"), (x[:8],)).eval()
    path = tmp_path / "m.onnx"
    qmodel.export(path)
    loader = digits_loader("test", batch_size=60, limit=120)
    assert onnx_accuracy(path, loader) == accuracy(qmodel.convert(), loader)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown torchvision model"):
        build_model("resnet19")
