import pytest
import torch

from edgequant.demo.data import digits_loader, digits_tensors


def test_split_sizes_shapes_and_range():
    x_train, _ = digits_tensors("train")
    x_test, y_test = digits_tensors("test")
    assert (len(x_train), len(x_test)) == (1437, 360)
    assert x_test.shape[1:] == (3, 32, 32)
    assert float(x_test.min()) >= -1.0 and float(x_test.max()) <= 1.0
    assert set(y_test.tolist()) == set(range(10))
    assert torch.equal(x_test[:, 0], x_test[:, 2])  # grey repeated to 3 channels


def test_loader_limit_and_bad_split():
    batches = list(digits_loader("test", batch_size=50, limit=120))
    assert [len(b[0]) for b in batches] == [50, 50, 20]
    with pytest.raises(ValueError, match="split"):
        digits_tensors("val")
