"""QAT training-step cost relative to the float step, ours vs torchao's PT2E peer.

    python benchmarks/qat_overhead.py [--repeats 25]

Batch 64 of 3x32x32, SGD with momentum. The three variants of a model (float,
edgequant QAT, torchao PT2E QAT) run in the same process, one step each in turn for
`--repeats` rounds after warm-up; each ratio is the median over rounds of the
step-time ratio within a round, so load changes on a shared machine hit all three alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from _common import interleaved_times, median_ratio, save, table
from torch import nn
from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

import edgequant as eq
from edgequant.demo.training import build_model


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    return step


def torchao_peer(model: nn.Module, x: torch.Tensor) -> nn.Module:
    from torchao.quantization.pt2e import move_exported_model_to_train

    graph = torch.export.export(model.train(), (x,)).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_qat=True))
    prepared = prepare_qat_pt2e(graph, quantizer)
    return move_exported_model_to_train(prepared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    y = torch.randint(0, 10, (64,))
    rows = []
    for name in args.models:
        float_model = build_model(name).train()
        ours = eq.QATModule(build_model(name), (x[:8],), "int8_pow2").train()
        peer = torchao_peer(build_model(name), x)
        times = interleaved_times(
            {"float": step_fn(float_model, x, y), "ours": step_fn(ours, x, y), "peer": step_fn(peer, x, y)},
            args.repeats,
        )
        t_float, t_ours, t_peer = (statistics.median(times[k]) for k in ("float", "ours", "peer"))
        ours_ratio = median_ratio(times["ours"], times["float"])
        peer_ratio = median_ratio(times["peer"], times["float"])
        rows.append(
            {
                "model": name,
                "float_step_ms": 1e3 * t_float,
                "edgequant_step_ms": 1e3 * t_ours,
                "torchao_xnnpack_step_ms": 1e3 * t_peer,
                "edgequant_ratio": ours_ratio,
                "torchao_ratio": peer_ratio,
            }
        )
        print(f"{name}: float {1e3 * t_float:.0f} ms, ours {ours_ratio:.2f}x, torchao {peer_ratio:.2f}x")
    headers = ["model", "float step ms", "edgequant / float", "torchao PT2E / float"]
    print()
    print(table(headers, [[r["model"], r["float_step_ms"], r["edgequant_ratio"], r["torchao_ratio"]] for r in rows]))
    print(f"\nresults: {save('qat_overhead', ' '.join(['python', *sys.argv]), rows)}")


if __name__ == "__main__":
    main()
