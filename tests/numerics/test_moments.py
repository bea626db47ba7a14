import torch

from edgequant.numerics.moments import ChannelMoments


def test_nothing_seen_gives_no_statistics():
    moments = ChannelMoments()
    assert moments.mean is None and moments.energy is None


def test_channel_mean_and_energy_of_nchw_data_by_hand():
    moments = ChannelMoments(dim=1)
    # channel 0 holds 1, 3, 5, 7; channel 1 holds -2, 0, 2, 4 (two samples, 1 x 2 pixels each)
    moments.add(torch.tensor([[[[1.0, 3.0]], [[-2.0, 0.0]]], [[[5.0, 7.0]], [[2.0, 4.0]]]]))
    assert moments.count == 4
    assert moments.mean.tolist() == [4.0, 1.0]
    assert moments.energy.tolist() == [(1 + 9 + 25 + 49) / 4, (4 + 0 + 4 + 16) / 4]


def test_batches_accumulate_as_one():
    moments = ChannelMoments(dim=1)
    moments.add(torch.tensor([[1.0, 10.0]]))
    moments.add(torch.tensor([[3.0, 20.0], [5.0, 30.0]]))
    assert moments.count == 3
    assert moments.mean.tolist() == [3.0, 20.0]
    assert moments.squares.tolist() == [35.0, 1400.0]  # 1 + 9 + 25, 100 + 400 + 900
    torch.testing.assert_close(moments.energy, torch.tensor([35 / 3, 1400 / 3]))


def test_channels_last_data_reads_the_last_dim():
    moments = ChannelMoments(dim=-1)
    moments.add(torch.tensor([[[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]]))  # (N, tokens, C)
    assert moments.mean.tolist() == [2.0, 3.0, 4.0]


def test_tensors_without_a_channel_dim_are_skipped():
    moments = ChannelMoments()
    moments.add(torch.tensor([1.0, 2.0]))
    moments.add(torch.zeros(0, 3))
    assert moments.count == 0 and moments.mean is None
