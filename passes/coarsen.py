"""Read the planner's view of an annotated graph, and merge its nodes into blocks.

Two things live here because every planner (CP-SAT, DP, baselines) needs both:

* :func:`graph_costs` reads ``node.meta["fxpipe.cost"]``, ``node.meta["fxpipe.params"]``
  and ``gm.meta["fxpipe.param_bytes"]`` once into a flat :class:`GraphCosts`
  (compute nodes in graph order, their costs, the values they send and the
  parameters they read).
* :func:`coarsen` merges compute nodes into blocks so the solver stays small.

Coarsening, worked on a 9-node transformer-ish piece (costs F+B in brackets,
``size`` produces a Python int, ``|`` marks cut points kept)::

    graph order:  ln[1] size[0] view[0] qkv[6] attn[5] proj[2] add[0] fc[8] gelu[1] out[8] add2[0]
    step 1  non-tensor producers move next to their first consumer and are glued to it:
                  ln  (size view)  qkv  attn  proj  add  fc  gelu  out  add2
    step 2  greedy segments of F+B <= theta (theta = total / target_blocks = 8 here);
            when a segment is full, it is cut at the gap in its second half that
            sends the fewest bytes (ties: module boundary, then latest gap):
                  ln size view qkv | attn proj add | fc | gelu out add2

Blocks are contiguous pieces of one topological order, so the graph of blocks
is acyclic and every monotone block assignment is a monotone node assignment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from typing import Sequence

import torch.fx
import torch.utils._pytree

from fxpipe.cost_models.evaluator import pair_links, transfer_cost
from fxpipe.errors import ConfigError, PartitionError
from fxpipe.ir import META_COST, META_LOCAL, META_LOSS, META_PARAM_BYTES, META_PARAMS, META_VAL, CostModel, LossCost, \
    NodeCost

__all__ = ["COMPUTE_OPS", "InputValue", "GraphCosts", "graph_costs", "coarsen", "coarsen_costs"]

COMPUTE_OPS = ("call_function", "call_method", "call_module")


@dataclass(frozen=True)
class InputValue:
    """A model input (placeholder): free to send, counted in I_s of a recomputing stage."""

    name: str
    nbytes: int
    consumers: tuple[int, ...]        # compute-node indices reading it


@dataclass(frozen=True)
class GraphCosts:
    """The planner's flat view of an annotated graph; index i = i-th compute node in graph order."""

    names: tuple[str, ...]            # compute node names, graph order
    fwd: tuple[float, ...]            # F of each node (seconds per microbatch)
    bwd: tuple[float, ...]            # B of each node
    act: tuple[int, ...]              # activation bytes saved for backward
    out_bytes: tuple[int, ...]        # bytes of the node's output tensors (0: non-tensor)
    comm: tuple[float, ...]           # 2 * comm_time(out_bytes): send + gradient back (0 if no bytes);
                                      # 1 * for a value with no gradient (not floating), 0 for a local one
    consumers: tuple[tuple[int, ...], ...]   # compute consumers (indices, sorted)
    producers: tuple[tuple[int, ...], ...]   # compute producers (indices, sorted)
    returned: tuple[bool, ...]        # the node's value is a model output (goes to the last stage)
    params: tuple[tuple[str, ...], ...]      # canonical parameters each node reads (incl. via get_attr)
    param_bytes: dict[str, int]       # canonical parameter name -> bytes
    inputs: tuple[InputValue, ...]    # placeholders read by compute nodes
    module: tuple[str, ...] = ()      # innermost-but-leaf module path of each node ("" if unknown)
    index: dict[str, int] = field(default_factory=dict, compare=False)
    loss: LossCost | None = None      # loss_fn's share of the last stage (gm.meta["fxpipe.loss"])
    # per node, 2 * the transfer time over each distinct link (evaluator.LinkTransfers), and per
    # (producer stage p, consumer stage c > p) the index of the link p -> c a value sent there pays;
    # both () when every link costs ``comm``. ``comm`` is then the cheapest link.
    comm_links: tuple[tuple[float, ...], ...] = ()
    link_of: tuple[tuple[int, ...], ...] = ()
    # per node, node.meta["fxpipe.local"] (passes.local_values): every stage that reads it computes
    # it, so it is never sent (no C_s, I_s, X_s); () when no node is local
    local: tuple[bool, ...] = ()
    # per node, whether its value gets a gradient back when sent (_gets_gradient: floating or complex);
    # () when every node's does
    grad: tuple[bool, ...] = ()

    @property
    def n(self) -> int:
        return len(self.names)

    def is_local(self, v: int) -> bool:
        """Whether node ``v``'s value is computed on every stage that reads it (never sent)."""
        return bool(self.local) and self.local[v]

    def gets_gradient(self, v: int) -> bool:
        """Whether node ``v``'s value, sent to a later stage, has its gradient sent back."""
        return not self.grad or self.grad[v]

    def comm_peak(self, v: int) -> float:
        """2 * the dearest transfer of node ``v``'s value over any link."""
        return max(self.comm_links[v]) if self.comm_links else self.comm[v]


def _node_cost(node: torch.fx.Node, cost_model: CostModel | None) -> NodeCost:
    c = node.meta.get(META_COST)
    if isinstance(c, NodeCost):
        return c
    if node.op not in COMPUTE_OPS:
        return NodeCost()
    if cost_model is not None:
        return cost_model.node_cost(node)
    raise PartitionError(
        f"partition: node {node.format_node()} has no node.meta[{META_COST!r}] and no cost "
        "model was given; run passes.annotate first"
    )


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    last = list(stack.values())[-1]
    if isinstance(last, (tuple, list)) and last:
        return str(last[0])
    return str(last)


def graph_costs(gm: torch.fx.GraphModule, cost_model: CostModel | None = None) -> GraphCosts:
    """Read node costs, parameters and data flow of an annotated graph.

    Args:
        gm: graph annotated by ``passes.annotate`` (``node.meta["fxpipe.cost"]``,
            ``node.meta["fxpipe.params"]``, ``gm.meta["fxpipe.param_bytes"]``).
        cost_model: prices transfers (``comm_time``); also prices compute nodes
            that lack ``node.meta["fxpipe.cost"]``.

    Returns:
        A :class:`GraphCosts`. Nodes without ``fxpipe.params`` but with
        ``NodeCost.param_bytes > 0`` get a private parameter ``"<node>"``.

    Raises:
        PartitionError: a compute node has no cost and there is no cost model, or
            reads a parameter missing from ``gm.meta["fxpipe.param_bytes"]``.
    """
    graph = gm.graph
    nodes = list(graph.nodes)
    compute = [n for n in nodes if n.op in COMPUTE_OPS]
    index = {n.name: i for i, n in enumerate(compute)}
    declared: dict[str, int] = dict(getattr(gm, "meta", {}).get(META_PARAM_BYTES, {}) or {})
    param_bytes = dict(declared)

    links, link_of = pair_links(cost_model)

    price = None if cost_model is None else cost_model.comm_time

    # Parameters read through get_attr nodes go to every compute consumer.
    attr_params: dict[str, tuple[str, ...]] = {}
    for n in nodes:
        if n.op == "get_attr":
            attr_params[n.name] = tuple(n.meta.get(META_PARAMS, ()) or ())

    fwd, bwd, act, out, comm, cons, prods, params, module = [], [], [], [], [], [], [], [], []
    returned = [False] * len(compute)
    comm_links: list[tuple[float, ...]] = []
    grads: list[bool] = []
    local = tuple(bool(n.meta.get(META_LOCAL, False)) for n in compute)
    for n, loc in zip(compute, local):
        c = _node_cost(n, cost_model)
        fwd.append(float(c.fwd_time))
        bwd.append(float(c.bwd_time))
        act.append(int(c.activation_bytes))
        out.append(int(c.output_bytes))
        sent = 0 if loc else int(c.output_bytes)
        grad = _gets_gradient(n)
        grads.append(grad)
        comm.append(transfer_cost(sent, price, grad))
        if links:
            comm_links.append(tuple(transfer_cost(sent, f, grad) for f in links))
            comm[-1] = min(comm_links[-1])      # bounds stay bounds
        cons.append(tuple(sorted({index[u.name] for u in n.users if u.name in index})))
        prods.append(tuple(sorted({index[a.name] for a in n.all_input_nodes if a.name in index})))
        ps: list[str] = []
        if META_PARAMS in n.meta:
            ps.extend(n.meta[META_PARAMS] or ())
        elif c.param_bytes > 0:
            private = f"<{n.name}>"
            param_bytes[private] = int(c.param_bytes)
            ps.append(private)
        for a in n.all_input_nodes:
            ps.extend(attr_params.get(a.name, ()))
        ps = list(dict.fromkeys(ps))
        for p in ps:
            if p not in param_bytes:
                raise PartitionError(
                    f"partition: node {n.format_node()} reads parameter {p!r} that is missing from "
                    f"gm.meta[{META_PARAM_BYTES!r}]; run passes.annotate on this graph"
                )
        params.append(tuple(ps))
        module.append(_module_path(n))
    inputs = []
    for n in nodes:
        if n.op == "output":
            for a in n.all_input_nodes:
                if a.name in index:
                    returned[index[a.name]] = True
        elif n.op == "placeholder":
            users = tuple(sorted({index[u.name] for u in n.users if u.name in index}))
            if users:
                inputs.append(InputValue(n.name, int(_node_cost(n, None).output_bytes), users))
    return GraphCosts(
        names=tuple(index), fwd=tuple(fwd), bwd=tuple(bwd), act=tuple(act), out_bytes=tuple(out),
        comm=tuple(comm), consumers=tuple(cons), producers=tuple(prods), returned=tuple(returned),
        params=tuple(params), param_bytes=param_bytes, inputs=tuple(inputs),
        module=tuple(module), index=index, loss=_loss(gm), comm_links=tuple(comm_links),
        link_of=link_of if links else (), local=local if any(local) else (),
        grad=tuple(grads) if not all(grads) else (),
    )


def _gets_gradient(node: torch.fx.Node) -> bool:
    """Whether a value sent from ``node`` has its gradient sent back: both runtimes send gradients of
    floating (and complex) tensors only (stage.py ``_detach_input``, distributed.py ``_grad_keys``), so a
    bool or integer tensor crosses once. Unknown values (no ``val``) count as floating."""
    leaves = [t for t in torch.utils._pytree.tree_leaves(node.meta.get(META_VAL)) if isinstance(t, torch.Tensor)]
    return not leaves or any(t.is_floating_point() or t.is_complex() for t in leaves)


def _loss(gm: torch.fx.GraphModule) -> LossCost | None:
    loss = getattr(gm, "meta", {}).get(META_LOSS)
    if loss is None or isinstance(loss, LossCost):
        return loss
    raise PartitionError(f"gm.meta[{META_LOSS!r}] must be a LossCost, got {type(loss).__name__}")


def _order_with_glue(gc: GraphCosts) -> tuple[list[int], list[bool]]:
    """Graph order with non-tensor producers moved before their first consumer.

    Returns the order and ``glue[k]``: item k must share a block with item k+1.
    """
    moved: dict[int, list[int]] = {}
    is_moved = [False] * gc.n
    for i in range(gc.n):
        if gc.out_bytes[i] == 0 and gc.consumers[i] and not gc.returned[i]:
            is_moved[i] = True
    order: list[int] = []
    glue: list[bool] = []

    def first_consumer(i: int) -> int:
        return gc.consumers[i][0]

    for i in range(gc.n):
        if is_moved[i]:
            moved.setdefault(first_consumer(i), []).append(i)
    placed = [False] * gc.n

    def emit(i: int) -> None:
        for j in moved.get(i, ()):  # producers of i that were postponed
            if not placed[j]:
                emit(j)
                glue[-1] = True
        placed[i] = True
        order.append(i)
        glue.append(False)

    for i in range(gc.n):
        if not is_moved[i] and not placed[i]:
            emit(i)
    for i in range(gc.n):  # safety net: nothing lost
        if not placed[i]:
            emit(i)
    return order, glue


def coarsen_costs(gc: GraphCosts, *, num_stages: int, blocks_per_stage: int = 12,
                  min_blocks: int = 96,
                  stage_hint: Sequence[int] | None = None) -> list[list[int]]:
    """Blocks of compute-node indices (see the module docstring for the algorithm).

    Args:
        gc: the graph's costs.
        num_stages: d; the target block count is ``max(min_blocks, blocks_per_stage * d)``.
        blocks_per_stage: target blocks per stage.
        min_blocks: graphs with at most this many nodes (and at most the target)
            are not coarsened.
        stage_hint: a monotone stage per node (e.g. the DP's split); nodes on
            different hinted stages never share a block, so the hint stays a
            solution of the coarse problem.

    Returns:
        Blocks in a topological order; each block lists node indices in graph order.
    """
    target = max(min_blocks, blocks_per_stage * num_stages)
    if gc.n <= target:
        return [[i] for i in range(gc.n)]
    order, glue = _order_with_glue(gc)
    pos = {v: k for k, v in enumerate(order)}
    n = len(order)
    w = [gc.fwd[v] + gc.bwd[v] for v in order]
    total = sum(w)
    # crossing[k]: comm of distinct values produced before gap k and read at or after it.
    diff = [0.0] * (n + 1)
    for v in range(gc.n):
        if gc.consumers[v]:
            last = max(pos[c] for c in gc.consumers[v])
            sent = 0 if gc.is_local(v) else gc.out_bytes[v]
            diff[pos[v] + 1] += gc.comm[v] + 1e-12 * sent
            diff[last + 1] -= gc.comm[v] + 1e-12 * sent
    crossing, run = [0.0] * (n + 1), 0.0
    for k in range(n + 1):
        run += diff[k]
        crossing[k] = run
    boundary = [k > 0 and k < n and gc.module and
                gc.module[order[k]] != gc.module[order[k - 1]] for k in range(n + 1)]
    hard = [False] * (n + 1)
    if stage_hint is not None:
        for k in range(1, n):
            if stage_hint[order[k]] != stage_hint[order[k - 1]]:
                hard[k] = True
    theta = total / target if total > 0 else 0.0
    cap = max(1, n // target)  # count cap when costs are zero
    blocks: list[list[int]] = []
    start = 0
    while start < n:
        k, acc = start, 0.0
        while k < n and not (k > start and hard[k]) and (
                k == start or glue[k - 1] or
                (acc + w[k] <= theta if theta > 0 else k - start < cap)):
            acc += w[k]
            k += 1
        if k < n and not hard[k]:
            # Choose the cheapest gap in the second half of [start, k].
            half, best, run = acc / 2, None, 0.0
            for g in range(start + 1, k + 1):
                run += w[g - 1]
                if (glue[g - 1] and g < k) or (theta > 0 and run < half and g < k):
                    continue
                key = (crossing[g], not boundary[g], -g)
                if best is None or key < best[0]:
                    best = (key, g)
            if best is not None:
                k = best[1]
        blocks.append(sorted(order[start:k]))
        start = k
    return blocks


def coarsen(gm: torch.fx.GraphModule, cost_model: CostModel | None = None, *, num_stages: int,
            blocks_per_stage: int = 12, min_blocks: int = 96,
            costs: GraphCosts | None = None,
            stage_hint: dict[str, int] | None = None) -> list[tuple[str, ...]]:
    """Merge compute nodes into blocks the partitioner assigns whole.

    Args:
        gm: annotated graph (see :func:`graph_costs`).
        cost_model: prices transfers (used to prefer cheap cut points).
        num_stages: d, the number of pipeline stages the blocks will be split into.
        blocks_per_stage: target blocks per stage (more: finer balance, slower solve).
        min_blocks: graphs this small are returned one node per block.
        costs: precomputed :func:`graph_costs` of ``gm`` (skips re-reading the meta).
        stage_hint: node name -> stage of a plan to keep representable (no block
            straddles two of its stages).

    Returns:
        Blocks of compute-node names, in a topological order of the block graph.

    Raises:
        ConfigError: ``num_stages < 1``.
        PartitionError: see :func:`graph_costs`.
    """
    if num_stages < 1:
        raise ConfigError(f"coarsen: num_stages must be >= 1, got {num_stages}")
    gc = costs if costs is not None else graph_costs(gm, cost_model)
    hint = [stage_hint[name] for name in gc.names] if stage_hint is not None else None
    blocks = coarsen_costs(gc, num_stages=num_stages, blocks_per_stage=blocks_per_stage,
                           min_blocks=min_blocks, stage_hint=hint)
    return [tuple(gc.names[i] for i in b) for b in blocks]
