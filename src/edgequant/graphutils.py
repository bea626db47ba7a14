"""Small helpers on torch.fx nodes that every graph pass shares."""

from __future__ import annotations

from torch.fx import Node


def module_name(node: Node) -> str:
    """Qualified name of the innermost module a node came from ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""
