"""Fold shape arithmetic into constants: the graph is specialised to the example microbatch shapes."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

__all__ = ["specialize_shapes"]

_CONST_TYPES = (int, float, bool, torch.Size, torch.device, torch.dtype, str, type(None))


def _is_constant(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_is_constant(x) for x in v)
    return isinstance(v, _CONST_TYPES) and not isinstance(v, torch.SymInt)


def specialize_shapes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Replace nodes whose value is a Python constant (``x.shape``, ``x.size(1)``, ``T // 2``...)
    by that constant, as recorded by shape_prop in ``node.meta["val"]``.

    After this pass no value that crosses a pipeline stage is a Python int, so stages
    exchange tensors only. Inputs of a different shape must then be re-compiled.

    Returns:
        ``gm``, modified in place and recompiled.
    """
    changed = False
    for node in list(gm.graph.nodes):
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        val = node.meta.get("val")
        if val is None:
            val = _fold(node)
            if val is None or not _is_constant(val):
                continue
            node.meta["val"] = val
        if isinstance(val, torch.Tensor) or not _is_constant(val):
            continue
        if node.op == "call_module":
            continue
        if isinstance(val, torch.Size):
            val = tuple(val)
        for user in list(node.users):
            user.args = torch.fx.node.map_arg(user.args, lambda a: val if a is node else a)
            user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda a: val if a is node else a)
        changed = True
    if changed:
        for node in reversed(list(gm.graph.nodes)):
            if node.op in ("call_function", "call_method") and not node.users and not node.is_impure():
                gm.graph.erase_node(node)
        gm.graph.lint()
        gm.recompile()
    return gm


_TENSOR_ATTRS = {"shape", "device", "dtype", "ndim", "is_cuda"}
_TENSOR_METHODS = {"size", "dim", "numel", "get_device"}


def _fold(node: torch.fx.Node) -> Any:
    """Value of a metadata query (``x.shape``, ``x.size(1)``, ``x.device``) or of arithmetic on constants."""
    def value(a: Any) -> Any:
        return a.meta.get("val") if isinstance(a, torch.fx.Node) else a

    args = torch.fx.node.map_aggregate(node.args, value)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, value)
    try:
        if node.op == "call_function" and node.target is getattr and isinstance(args[0], torch.Tensor):
            return getattr(args[0], args[1]) if args[1] in _TENSOR_ATTRS else None
        if node.op == "call_method" and node.target in _TENSOR_METHODS and isinstance(args[0], torch.Tensor):
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_function" and _is_constant(list(args)) and _is_constant(list(kwargs.values())) \
                and any(isinstance(a, torch.fx.Node) for a in node.all_input_nodes):
            return node.target(*args, **kwargs)  # type: ignore[operator]
    except Exception:  # noqa: BLE001 - not foldable: leave the node in the graph
        return None
    return None
