import numpy as np
import torch
from torch import nn
from torchvision.ops import StochasticDepth

import edgequant as eq
from edgequant.batchnorm import BN_OPS
from edgequant.parity import run_onnx, session


class Residual(nn.Module):
    """Conv-BN-ReLU stem, a residual branch behind stochastic depth, a dropout head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.drop_path = StochasticDepth(0.5, "row")
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, 4))

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.drop_path(self.branch(x)))


def _bn_buffers(qmodel: eq.QATModule) -> list[torch.Tensor]:
    return [b.clone() for name, b in qmodel.model.named_buffers() if "running_" in name]


def test_eval_is_deterministic_and_leaves_bn_statistics_alone():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    qmodel = eq.QATModule(Residual().train(), (x,))
    assert not any("bernoulli" in str(n.target) for n in qmodel.model.graph.nodes)  # no stochastic depth
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    qmodel.train()
    optimizer.zero_grad()
    qmodel(x).sum().backward()
    optimizer.step()
    with torch.no_grad():
        assert not torch.equal(qmodel(x), qmodel(x))  # train mode: dropout is still active
    stats = _bn_buffers(qmodel)
    nn.Sequential(qmodel).eval()  # eval() through a parent module, as a training loop's model.eval() does
    assert not qmodel.training
    with torch.no_grad():
        first, second = qmodel(x), qmodel(x)
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(stats, _bn_buffers(qmodel), strict=True))
    bn_nodes = [n for n in qmodel.model.graph.nodes if n.target in BN_OPS]
    assert bn_nodes and all(n.args[5] is False for n in bn_nodes)


def test_batch_of_one_example_with_bn_in_train_mode_wraps_and_exports(tmp_path):
    torch.manual_seed(0)
    model = Residual().train()
    x = torch.randn(1, 3, 8, 8)
    qmodel = eq.QATModule(model, (x,)).eval()
    assert model.training  # the caller's model is not switched
    with torch.no_grad():
        out = qmodel(x)
    assert out.shape == (1, 4) and torch.isfinite(out).all()
    result = qmodel.export(tmp_path / "one.onnx")
    assert result.parity.max_abs_diff == 0.0
    converted = qmodel.convert()
    assert np.array_equal(run_onnx(session(str(result.path)), (x,))[0], converted(x).detach().numpy())


def test_ptq_eval_is_deterministic_and_moving_the_module_rebuilds_the_integer_model():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    qmodel = eq.PTQModule(Residual().eval(), (x,)).calibrate([x], progress=False)
    with torch.no_grad():
        first = qmodel(x)
        cached = qmodel.integer_model()
        assert torch.equal(first, qmodel(x)) and qmodel.integer_model() is cached
        qmodel.to(torch.float32)
        assert qmodel.__dict__["_integer"] is None and torch.equal(first, qmodel(x))
    assert qmodel.integer_model() is not cached
    assert not any(k.startswith("_integer") for k in qmodel.state_dict())
