"""Values every stage can compute by itself (causal masks, positions): marked ``node.meta["fxpipe.local"]``.

A marked node is not sent between stages: :func:`fxpipe.passes.split.split` copies it (with the
marked nodes it reads) into every stage that reads it, and the planner
(:func:`fxpipe.passes.coarsen.graph_costs`) charges no transfer for it. Both read the flag this
pass writes, so they cannot disagree. A node is local when

1. it is a ``call_function`` / ``call_method`` whose value is one tensor, not a model output;
2. everything it reads is a model input (every rank holds the whole microbatch's inputs), a
   buffer or constant (``get_attr`` of a non-parameter that nothing in the graph updates), a
   Python constant, or another local node: so no gradient can reach it, and no stage's result
   can differ from another's;
3. it draws no random numbers (``dropout``, ``rand``, ... : a copy would draw different ones)
   and updates nothing in place;
4. it is cheap: the forward FLOPs of it and the local nodes it reads are at most
   :data:`LOCAL_FLOPS` per microbatch. ``FlopCounterMode`` counts matmuls, convolutions and
   attention only, so this admits what builds masks and positions (``arange``, comparisons,
   ``expand``, ``narrow``: bandwidth-bound work on the value's own bytes, which memory does
   faster than any link) and refuses a matmul over buffers.

Worked example (HF GPT-2 at 4 stages; ``L`` = local)::

    input_ids ─▶ wte ─▶ ... block 0 ... │ block 1 │ block 2 │ block 3
    arange(256) L ─▶ le L ─▶ expand L ──┴─────────┴─────────┘   read by every block's attention

    before: stage 0 sends the [2, 1, 256, 256] bool mask (131072 B) to stages 1, 2 and 3
    after:  stages 1, 2, 3 each run arange/le/expand themselves; only hidden states cross
"""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.fx

from fxpipe.ir import META_COST, META_LOCAL, META_PARAMS, META_VAL, NodeCost
from fxpipe.trace_fixes import INPLACE_OPERATORS, in_place_name

__all__ = ["LOCAL_FLOPS", "mark_local", "is_local"]

LOCAL_FLOPS = float(2 ** 20)
"""Most forward FLOPs (per microbatch) a local value's sub-graph may take."""

_RANDOM = re.compile(r"rand|dropout|bernoulli|normal|multinomial|poisson|uniform|exponential|cauchy|"
                     r"geometric|shuffle")
_VIEWS = {"view", "reshape", "expand", "narrow", "slice", "select", "transpose", "permute", "unsqueeze",
          "squeeze", "t", "as_strided", "detach", "alias", "getitem", "flatten", "unflatten", "view_as",
          "expand_as", "unbind", "split", "chunk", "diagonal", "movedim", "contiguous", "_same"}


def _name(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.split("::")[-1]
    return getattr(t, "__name__", str(t))


def _mutates(node: torch.fx.Node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        return bool(node.target._schema.is_mutable)
    if node.target is operator.setitem or node.target in INPLACE_OPERATORS:
        return True
    return in_place_name(_name(node))


def _random(node: torch.fx.Node) -> bool:
    if isinstance(node.target, torch._ops.OpOverload):
        if torch.Tag.nondeterministic_seeded in node.target.tags:
            return True
    return bool(_RANDOM.search(_name(node).lower()))


def _updated(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes whose tensor something updates in place: the updated argument and what it views, back
    to the buffer (``get_attr``) it may alias; and buffers of modules run as one ``call_module``."""
    out: set[torch.fx.Node] = set()
    for n in graph.nodes:
        if not _mutates(n):
            continue
        todo = _written(n)
        while todo:
            a = todo.pop()
            if a in out:
                continue
            out.add(a)
            if a.op in ("call_function", "call_method") and (_name(a) in _VIEWS or _name(a).lstrip("_") in _VIEWS) and a.all_input_nodes:
                todo.append(a.all_input_nodes[0])
    modules = [str(n.target) for n in graph.nodes if n.op == "call_module"]
    targets = {str(n.target) for n in out if n.op == "get_attr"}     # every read of an updated buffer
    for n in graph.nodes:
        if n.op == "get_attr" and (str(n.target) in targets or any(str(n.target).startswith(m + ".") for m in modules)):
            out.add(n)
    return out


def _written(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The arguments an in-place node writes: by its schema's alias annotations (``Tensor(a!)``) for an
    aten op (``copy_``, ``index_put_``, ``out=`` variants), else its first argument (``x.add_(y)``)."""
    if isinstance(node.target, torch._ops.OpOverload):
        out = []
        for i, arg in enumerate(node.target._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                v = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                vs = v if isinstance(v, (list, tuple)) else [v]
                out.extend(a for a in vs if isinstance(a, torch.fx.Node))
        return out
    first = node.args[0] if node.args else None
    return [first] if isinstance(first, torch.fx.Node) else []


def _fetch(gm: torch.nn.Module, qualname: str) -> Any:
    obj: Any = gm
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def _is_tensor_value(node: torch.fx.Node) -> bool:
    return isinstance(node.meta.get(META_VAL), torch.Tensor)


def mark_local(gm: torch.fx.GraphModule, *, max_flops: float = LOCAL_FLOPS) -> torch.fx.GraphModule:
    """Set ``node.meta["fxpipe.local"]`` (True / False) on every compute node (rules: module docstring).

    Args:
        gm: a graph after :func:`fxpipe.passes.annotate.annotate` (reads ``fxpipe.cost``'s
            ``fwd_flops``, ``fxpipe.params`` and ``val``).
        max_flops: the most forward FLOPs of a local value's sub-graph (rule 4).

    Returns:
        ``gm``, its node.meta updated in place.
    """
    graph = gm.graph
    updated = _updated(graph)
    returned = {a for n in graph.nodes if n.op == "output" for a in n.all_input_nodes}
    free: set[torch.fx.Node] = set()          # inputs and buffers any stage holds, no gradient
    for n in graph.nodes:
        if n in updated:
            continue
        if n.op == "placeholder":
            val = n.meta.get(META_VAL)
            if not (isinstance(val, torch.Tensor) and val.requires_grad):
                free.add(n)
        elif n.op == "get_attr" and not n.meta.get(META_PARAMS):
            if not isinstance(_fetch(gm, str(n.target)), torch.nn.Parameter):
                free.add(n)
    local: dict[torch.fx.Node, set[torch.fx.Node]] = {}   # local node -> local nodes of its sub-graph
    for n in graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        ok = (n.op != "call_module" and _is_tensor_value(n) and n not in returned and n not in updated
              and not _mutates(n) and not _random(n) and not n.meta.get(META_PARAMS)
              and all(a in free or a in local for a in n.all_input_nodes))
        if ok:
            sub = {n}.union(*(local[a] for a in n.all_input_nodes if a in local))
            flops = sum(_flops(x) for x in sub)
            ok = flops <= max_flops
        if ok:
            local[n] = sub
        n.meta[META_LOCAL] = ok
    return gm


def _flops(node: torch.fx.Node) -> float:
    c = node.meta.get(META_COST)
    return float(c.fwd_flops) if isinstance(c, NodeCost) else 0.0


def is_local(node: torch.fx.Node) -> bool:
    """Whether :func:`mark_local` marked ``node`` local (False where it has not run)."""
    return bool(node.meta.get(META_LOCAL, False))
