"""Split an fx graph into one GraphModule per pipeline stage with explicit inputs and outputs.

Built on ``torch.fx.passes.split_module``. The top-level graph it returns is read
back into a routing table::

    model inputs ──▶ stage 0 ──▶ stage 1 ──▶ stage 2 ──▶ loss(outputs, targets)
                        └───────── skip ─────────┘        (sent directly, 0 → 2)

Every stage input names its source: a model input, a module attribute (buffer or
parameter read through ``get_attr``), or output ``k`` of an earlier stage.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.passes.split_module import split_module

from fxpipe.errors import PartitionError
from fxpipe.ir import PipelineProgram, Source, StageProgram
from fxpipe.passes.local_values import is_local

__all__ = ["Source", "StageProgram", "PipelineProgram", "split"]


def split(gm: torch.fx.GraphModule, stage_of: dict[str, int], num_stages: int) -> PipelineProgram:
    """Cut ``gm`` into ``num_stages`` GraphModules.

    Args:
        gm: the traced model (compute nodes named as in ``stage_of``).
        stage_of: fx node name -> stage, for every call_function/call_method/call_module node.
        num_stages: d.

    Returns:
        A PipelineProgram whose ``stages[i].module`` is an ordinary GraphModule.

    Raises:
        PartitionError: a compute node has no stage, or a stage would be empty.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    input_index = {n.name: i for i, n in enumerate(placeholders)}
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method", "call_module") and n.name not in stage_of:
            raise PartitionError(f"split: node {n.format_node()} has no stage in the plan; "
                                 "the plan was made for another graph — re-plan this model")
        for a in n.all_input_nodes:
            if n.name in stage_of and a.name in stage_of and stage_of[a.name] > stage_of[n.name]:
                raise PartitionError(f"split: node {n.name!r} on stage {stage_of[n.name]} reads {a.name!r} on "
                                     f"stage {stage_of[a.name]}; stage order must not decrease along an edge "
                                     "— re-plan this model")

    ordered, stage_of = _stage_ordered(gm, stage_of)

    def callback(node: torch.fx.Node) -> int:
        return stage_of[node.name]

    top = split_module(ordered, gm, callback, keep_original_order=True,
                       keep_original_node_name=True, tuple_return=True)
    sub_index: dict[str, int] = {}
    for n in top.graph.nodes:
        if n.op == "call_module" and n.target.startswith("submod_"):
            sub_index[n.name] = int(n.target.split("_")[1])
    present = sorted(set(sub_index.values()))
    if present != list(range(num_stages)):
        missing = sorted(set(range(num_stages)) - set(present))
        raise PartitionError(f"split: stages {missing} of {num_stages} received no node; "
                             "every stage needs at least one compute node")

    def source_of(a: Any) -> Source:
        if isinstance(a, torch.fx.Node):
            if a.op == "placeholder":
                return Source("input", index=input_index[a.name])
            if a.op == "get_attr":
                return Source("attr", name=str(a.target))
            if a.op == "call_function" and a.args and isinstance(a.args[0], torch.fx.Node) \
                    and a.args[0].name in sub_index:
                return Source("stage", stage=sub_index[a.args[0].name], index=int(a.args[1]))
            raise PartitionError(f"split: unexpected value {a.format_node()} between stages")
        return Source("const", value=a)

    stages: list[StageProgram] = []
    for n in top.graph.nodes:
        if n.name not in sub_index:
            continue
        s = sub_index[n.name]
        mod = getattr(top, n.target)
        if n.kwargs:
            raise PartitionError(f"split: stage {s} got keyword inputs {list(n.kwargs)}")
        sources = [source_of(a) for a in n.args]
        out_node = next(x for x in mod.graph.nodes if x.op == "output")
        outs = out_node.args[0]
        stages.append(StageProgram(index=s, module=mod, sources=sources,
                                   num_outputs=len(outs) if isinstance(outs, (tuple, list)) else 1))
    stages.sort(key=lambda st: st.index)
    out_node = next(x for x in top.graph.nodes if x.op == "output")
    leaves, spec = pytree.tree_flatten(out_node.args[0])
    out_spec = getattr(gm, "_out_spec", None)   # torch.export: the graph returns flat leaves
    if out_spec is not None and out_spec.num_leaves == len(leaves):
        spec = out_spec
    output_sources = [source_of(a) for a in leaves]
    for st in stages:
        for src in st.sources:
            if src.kind == "stage":
                if src.stage >= st.index:
                    raise PartitionError(f"split: stage {st.index} reads stage {src.stage}; "
                                         "stage order must not decrease along an edge")
                stages[src.stage].consumers.add(st.index)
    for src in output_sources:
        if src.kind == "stage":
            stages[src.stage].consumers.add(num_stages)  # the loss, on the last stage
    return PipelineProgram(stages=stages, output_sources=output_sources, output_spec=spec,
                           input_names=[p.name for p in placeholders], root=gm)


def _same(x: Any) -> Any:
    """Identity: a getitem moved to its producer's stage leaves this in its place."""
    return x


def _stage_ordered(gm: torch.fx.GraphModule,
                   stage_of: dict[str, int]) -> tuple[torch.fx.GraphModule, dict[str, int]]:
    """``gm`` with its nodes ordered by (stage, graph position), sharing gm's parameters and submodules.

    ``split_module(keep_original_order=True)`` emits the stages in the order their first node
    appears; a node that reads no input (``torch.arange``, export's ``_assert_tensor_metadata``)
    may sit early in graph order yet belong to a late stage, which would emit that stage before
    the stages it reads from. Since stages never decrease along an edge, sorting by
    (stage, position) is a topological order, so the copy computes the same thing::

        graph order:   arange(s1)  a(s0)  relu(s0)  b(s1)  add(s1)
        stage order:   a(s0)  relu(s0)  arange(s1)  b(s1)  add(s1)

    Only tensors may cross stages: a list sent whole (the output of ``chunk``, read by
    ``getitem`` on a later stage) would reach that stage still attached to the first one's
    autograd graph. Such a ``getitem`` is copied to its producer's stage and replaced, on its
    own stage, by an identity of that copy. Placeholders and ``get_attr`` nodes (no stage)
    come first, the output last. Returns the copy and its stage map (with the new nodes).
    """
    import operator

    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    stage_of = dict(stage_of)
    copies = _local_copies(nodes, stage_of)
    lifted = [n for n in nodes
              if n.op == "call_function" and n.target is operator.getitem and n.name in stage_of
              and isinstance(n.args[0], torch.fx.Node) and n.args[0].name in stage_of
              and stage_of[n.args[0].name] < stage_of[n.name] and not isinstance(n.args[0].meta.get("val"), torch.Tensor)
              and all(u.op == "call_function" and u.target is operator.getitem for u in n.args[0].users)]
    head = [n for n in nodes if n.op in ("placeholder", "get_attr")]
    body = sorted([(stage_of[n.name], pos[n], n, False) for n in nodes
                   if n.name in stage_of and n.op not in ("placeholder", "get_attr", "output")] +
                  [(c, pos[n], n, True) for n, c in copies], key=lambda e: e[:2])
    order = head + [e[2] for e in body if not e[3]] + [n for n in nodes if n.op == "output"]
    if not lifted and not copies and [n.name for n in order] == [n.name for n in nodes]:
        return gm, stage_of
    graph = torch.fx.Graph()
    graph._codegen = gm.graph._codegen
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    early: dict[torch.fx.Node, torch.fx.Node] = {}
    local_env: dict[tuple[torch.fx.Node, int], torch.fx.Node] = {}    # (local node, stage) -> its copy there
    lifted_set = set(lifted)
    for n in head:
        env[n] = graph.node_copy(n, lambda a: env[a])
    for c, _, n, is_copy in body:
        def arg(a: torch.fx.Node, c: int = c) -> torch.fx.Node:
            return local_env.get((a, c), env.get(a))
        if is_copy:
            dup = graph.create_node(n.op, n.target, torch.fx.node.map_arg(n.args, arg),
                                    torch.fx.node.map_arg(n.kwargs, arg), name=f"{n.name}_local{c}")
            dup.meta = dict(n.meta)
            stage_of[dup.name] = c
            local_env[(n, c)] = dup
            continue
        if n in lifted_set:
            env[n] = graph.create_node("call_function", _same, (early[n],), name=n.name)
            env[n].meta = dict(n.meta)
            continue
        env[n] = graph.node_copy(n, arg)
        for u in n.users:
            if u in lifted_set:       # emitted right after its producer, on the producer's stage
                item = graph.create_node("call_function", operator.getitem, (env[n], u.args[1]),
                                         name=f"{u.name}_lifted")
                item.meta = dict(u.meta)
                stage_of[item.name] = stage_of[n.name]
                early[u] = item
    out = next(n for n in nodes if n.op == "output")
    env[out] = graph.node_copy(out, lambda a: env[a])
    _drop_unread_locals(graph, stage_of)
    return torch.fx.GraphModule(gm, graph, gm.__class__.__name__), stage_of


def _local_copies(nodes: list[torch.fx.Node], stage_of: dict[str, int]) -> list[tuple[torch.fx.Node, int]]:
    """(local node, stage) for every stage other than its own that reads it, with the local nodes it reads.

    A node marked ``fxpipe.local`` (:mod:`fxpipe.passes.local_values`) reads only model inputs,
    buffers, constants and other local nodes, so a copy computes the same value on any stage::

        arange(s0) -> le(s0) -> mask(s0) ──▶ attn(s0), attn(s2)
        becomes  arange, le, mask on s0 ──▶ attn(s0);  arange_local2, le_local2, mask_local2 ──▶ attn(s2)
    """
    local = {n for n in nodes if n.name in stage_of and is_local(n)}
    need: list[tuple[torch.fx.Node, int]] = []
    seen: set[tuple[torch.fx.Node, int]] = set()

    def want(v: torch.fx.Node, c: int) -> None:
        if stage_of[v.name] == c or (v, c) in seen:
            return
        seen.add((v, c))
        need.append((v, c))
        for a in v.all_input_nodes:
            if a in local:
                want(a, c)

    for u in nodes:
        if u.name in stage_of:
            for a in u.all_input_nodes:
                if a in local:
                    want(a, stage_of[u.name])
    return need


def _drop_unread_locals(graph: torch.fx.Graph, stage_of: dict[str, int]) -> None:
    """Erase local nodes nothing reads any more (every reader got a copy), keeping each stage non-empty."""
    count: dict[int, int] = {}
    for n in graph.nodes:
        if n.name in stage_of:
            count[stage_of[n.name]] = count.get(stage_of[n.name], 0) + 1
    for n in reversed(list(graph.nodes)):
        s = stage_of.get(n.name)
        if s is not None and is_local(n) and not n.users and count[s] > 1:
            graph.erase_node(n)
            count[s] -= 1
