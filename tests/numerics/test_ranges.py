import pytest
import torch

from edgequant.numerics import ranges


def test_batch_extremes_per_tensor_and_per_channel():
    x = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, 0.5]])
    assert [t.item() for t in ranges.batch_extremes(x, None)] == [-4.0, 5.0]
    low, high = ranges.batch_extremes(x, 0)
    assert low.tolist() == [-2.0, -4.0] and high.tolist() == [3.0, 5.0]
    low, high = ranges.batch_extremes(x, 1)
    assert low.tolist() == [-4.0, -2.0, 0.5] and high.tolist() == [1.0, 5.0, 3.0]


def test_batch_extremes_read_other_dtypes_as_float32():
    low, high = ranges.batch_extremes(torch.tensor([1.5, -0.25], dtype=torch.float16), None)
    assert low.dtype == torch.float32 and (low.item(), high.item()) == (-0.25, 1.5)


@pytest.mark.parametrize(
    ("count", "constant", "weight"),
    [
        (1, 0.25, 1.0),  # the first batch replaces the initial (empty) range
        (2, 0.25, 0.5),  # then a plain running mean: 1/2, 1/3, 1/4 ...
        (3, 0.25, 1 / 3),
        (4, 0.25, 0.25),
        (5, 0.25, 0.25),  # ... until 1/n falls below c: the moving average
        (100, 0.25, 0.25),
        (7, 1.0, 1.0),  # c = 1 always tracks the latest batch
    ],
)
def test_averaging_weight_by_hand(count, constant, weight):
    assert ranges.averaging_weight(count, constant) == weight


def test_fold_without_weight_widens_to_everything_seen():
    low, high = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    ranges.fold(low, high, torch.tensor(-1.0), torch.tensor(2.0), None)
    ranges.fold(low, high, torch.tensor(-3.0), torch.tensor(1.0), None)
    assert (low.item(), high.item()) == (-3.0, 2.0)


def test_fold_with_weight_moves_the_range_towards_the_batch():
    low, high = torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 4.0])
    ranges.fold(low, high, torch.tensor([-3.0, -2.0]), torch.tensor([3.0, 0.0]), 0.5)
    assert low.tolist() == [-2.0, -1.0] and high.tolist() == [2.0, 2.0]
    ranges.fold(low, high, torch.tensor([-5.0, 1.0]), torch.tensor([6.0, 7.0]), 1.0)  # onto the batch
    assert low.tolist() == [-5.0, 1.0] and high.tolist() == [6.0, 7.0]


def test_averaged_sequence_by_hand():
    """Maxima 1, 3, 5, 9 with c = 0.5: 1, mean(1, 3) = 2, 2 + (5 - 2) / 2 = 3.5, 3.5 + (9 - 3.5) / 2 = 6.25."""
    low, high = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    seen = []
    for count, m in enumerate([1.0, 3.0, 5.0, 9.0], start=1):
        ranges.fold(low, high, torch.tensor(-m), torch.tensor(m), ranges.averaging_weight(count, 0.5))
        seen.append(high.item())
    assert seen == [1.0, 2.0, 3.5, 6.25] and low.item() == -6.25


@pytest.mark.parametrize("constant", [0.01, 0.3, 1e-3 / 3])
def test_device_count_gives_the_host_weight_and_the_same_ranges(constant):
    """The torch.compile path (count held in a tensor) folds bit for bit as the host path does."""
    torch.manual_seed(0)
    host = [torch.full((3,), float("inf")), torch.full((3,), float("-inf"))]
    device = [t.clone() for t in host]
    count = torch.tensor(0)
    for n in range(1, 400):
        count += 1
        weight = ranges.averaging_weight(count, constant)
        assert weight.dtype == torch.float32 and weight.item() == torch.tensor(max(1 / n, constant)).item()
        batch = torch.randn(2, 3) * n
        ranges.fold(*host, batch[0] - 50, batch[1] + 50, ranges.averaging_weight(n, constant))
        ranges.fold(*device, batch[0] - 50, batch[1] + 50, weight)
        assert torch.equal(host[0], device[0]) and torch.equal(host[1], device[1]), n
