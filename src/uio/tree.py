"""Parameter trees: the released checkpoints nest their parameters by module (``{"encoder":
{"layers_0": {...}}}``); this package addresses them by ``/``-joined paths."""
from __future__ import annotations

from typing import Any, Mapping


def nest_paths(leaves: Mapping[str, Any]) -> dict:
    """``{"a/b/kernel": leaf}`` -> ``{"a": {"b": {"kernel": leaf}}}``, in the mapping's order."""
    tree: dict = {}
    for path, leaf in leaves.items():
        node = tree
        *parents, name = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = leaf
    return tree
