"""Cross-layer equalization (CLE) of a BN-folded float graph, for per-tensor schemes.

A per-tensor weight scale has to cover the widest output channel of a layer; when
channel ranges differ by orders of magnitude (typical of depthwise convs after BN
folding) the narrow channels round to zero. For consecutive convs A -> act -> B,
scaling A's output channel i by 1/s_i and B's matching input channel by s_i leaves
the function unchanged (ReLU is positively homogeneous) and, with
s_i = sqrt(r_A,i * r_B,i) / r_B,i, makes the two layers' channel ranges proportional.

ReLU6 is not homogeneous: relu6(z) = s * min(relu(z / s), 6 / s), so it is rewritten
as relu followed by a minimum with a per-channel bound, which keeps the model exact.
Pairs never cross a residual add or any tensor with several users.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .ops import BOUND_OP, CONV_OPS, RELU6_OPS, RELU_OPS, constant, conv_groups, sole_user

aten = torch.ops.aten


def _is_relu6(node: Node) -> bool:
    if node.target == aten.relu6.default:
        return True
    lo, hi = [*node.args[1:3], -1.0, 1.0][:2]
    return node.target in RELU6_OPS and lo == 0.0 and hi == 6.0


def _bound_to_relu(gm: GraphModule, act: Node, channels: int) -> Node:
    """Rewrite relu6 as relu -> minimum(bound), with bound a per-channel constant (all 6 for now)."""
    graph = gm.graph
    name = f"{act.name}_cle_bound"
    gm.register_buffer(name, torch.full((1, channels, 1, 1), 6.0))
    with graph.inserting_before(act):
        relu = graph.call_function(aten.relu.default, (act.args[0],))
        bound = graph.get_attr(name)
        out = graph.call_function(BOUND_OP, (relu, bound))
    for new in (relu, out):
        new.meta.update({k: v for k, v in act.meta.items() if k != "quantization_annotation"})
    act.replace_all_uses_with(out)
    graph.erase_node(act)
    return out


def pairs(gm: GraphModule) -> list[tuple[Node, Node | None, Node]]:
    """(conv A, activation or None, conv B) chains where A's output feeds only B."""
    found = []
    for a in gm.graph.nodes:
        if a.target not in CONV_OPS or constant(gm, a.args[1]) is None:
            continue
        act = sole_user(a)
        if act is None:
            continue
        b = act
        if act.target in RELU_OPS or _is_relu6(act):
            b = sole_user(act)
        elif act.target == BOUND_OP:
            continue  # already rewritten: reached through its relu
        else:
            act = None
        if b is None or b.target not in CONV_OPS or constant(gm, b.args[1]) is None:
            continue
        if act is not None and act.target in RELU_OPS and sole_user(act) is not None:
            bound = sole_user(act)
            if bound.target == BOUND_OP:
                b = sole_user(bound)
                if b is None or b.target not in CONV_OPS:
                    continue
                act = bound
        found.append((a, act, b))
    return found


def _input_channel_ranges(w_b: torch.Tensor, groups: int) -> torch.Tensor:
    """max |W_B| per input channel of B, for any group count."""
    out_ch, per_group = w_b.shape[0], w_b.shape[1]
    grouped = w_b.abs().reshape(groups, out_ch // groups, per_group, -1)
    return grouped.amax(dim=(1, 3)).reshape(-1)  # (groups * per_group,) = input channels


def _scale_input_channels(w_b: torch.Tensor, groups: int, s: torch.Tensor) -> None:
    out_ch, per_group = w_b.shape[0], w_b.shape[1]
    view = w_b.view(groups, out_ch // groups, per_group, -1)
    view.mul_(s.reshape(groups, 1, per_group, 1))


@torch.no_grad()
def equalize(gm: GraphModule, iterations: int = 20, tolerance: float = 1e-4) -> int:
    """Equalize every eligible conv pair in place; return the number of pairs."""
    chain = pairs(gm)
    for i, (a, act, b) in enumerate(chain):
        if act is not None and _is_relu6(act):
            chain[i] = (a, _bound_to_relu(gm, act, constant(gm, a.args[1]).shape[0]), b)
    gm.recompile()
    for _ in range(iterations):
        change = 0.0
        for a, act, b in chain:
            w_a, w_b = constant(gm, a.args[1]), constant(gm, b.args[1])
            r_a = w_a.abs().reshape(w_a.shape[0], -1).amax(dim=1)
            r_b = _input_channel_ranges(w_b, conv_groups(b))
            s = torch.sqrt(r_a * r_b) / r_b
            s = torch.where((r_a > 0) & (r_b > 0) & torch.isfinite(s), s, torch.ones_like(s))
            w_a.div_(s.reshape([-1] + [1] * (w_a.dim() - 1)))
            bias = constant(gm, a.args[2]) if len(a.args) > 2 else None
            if bias is not None:
                bias.div_(s)
            _scale_input_channels(w_b, conv_groups(b), s)
            if act is not None and act.target == BOUND_OP:
                constant(gm, act.args[1]).div_(s.reshape(1, -1, 1, 1))
            change = max(change, float((s - 1).abs().max()))
        if change < tolerance:
            break
    return len(chain)
