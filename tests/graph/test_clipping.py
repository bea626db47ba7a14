import torch
from torch import nn

from edgequant.graph.capture import capture
from edgequant.graph.clipping import clip_weights


def test_outlier_weight_is_clipped_and_others_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3)).eval()
    with torch.no_grad():
        model[0].weight[1, 0, 1, 1] = 50.0
    gm = capture(model, (torch.randn(2, 2, 5, 5),))
    w_before = model[0].weight.detach().clone()
    assert clip_weights(gm, num_std=3.0) == 1
    w = gm.get_parameter("0.weight").detach()
    flat = w_before[1].reshape(-1)
    bound = flat.mean() + 3.0 * flat.std()
    assert abs(float(w[1, 0, 1, 1]) - float(bound)) < 1e-5
    changed = (w != w_before).sum()
    assert int(changed) == 1
