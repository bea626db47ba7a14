"""Small helpers on torch.fx nodes that every graph pass shares."""

from __future__ import annotations

from torch.fx import Node


def module_name(node: Node) -> str:
    """Qualified name of the innermost module a node came from ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def producer_module(node: Node) -> str:
    """The module that computed `node`: its own, or the nearest producer's for a functional op.

    conv -> torch.relu -> quantizer in a root forward() names the conv.
    """
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop(0)
        if current in seen:
            continue
        seen.add(current)
        if current.op != "get_attr" and (name := module_name(current)):
            return name
        frontier.extend(a for a in current.all_input_nodes if a.op != "get_attr")
    return node.name
