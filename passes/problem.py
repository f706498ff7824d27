"""The planner's block problem: a graph's costs grouped into blocks, and the figures of any assignment.

:func:`build_problem` groups the compute nodes of a :class:`GraphCosts` into
blocks (single nodes for the exact problem) and lists the values that may cross
stages and the parameters each block reads. :func:`stage_figures` sums, for any
stage assignment of the blocks, the per-stage figures (F, B, C, P, A, I, X, n)
that :mod:`fxpipe.cost_models.evaluator` turns into T_s and M_s; the DP's
``evaluate``, the plan builder and the diagnosis all read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from fxpipe.cost_models.evaluator import CostContext, StageFigures
from fxpipe.errors import ConfigError

from .coarsen import GraphCosts

__all__ = ["Value", "BlockProblem", "build_problem", "stage_figures", "evaluate"]


@dataclass(frozen=True)
class Value:
    """A value that may cross stages: one node's output (or a model input)."""

    producer: int                  # block index; -1 = model input (free to send)
    consumers: tuple[int, ...]     # reading blocks other than the producer, sorted
    comm: float                    # 2 * comm_time(bytes): paid once per stage it enters
    nbytes: int                    # counted in I_s of a stage it enters
    returned: bool = False         # a model output: enters the last stage
    comm_links: tuple[float, ...] = ()  # comm over each distinct link (BlockProblem.link_of); () = ``comm`` everywhere
    grad: bool = True              # its gradient is sent back (floating); False: crosses once (bool, int)


@dataclass(frozen=True)
class BlockProblem:
    """Stage-assignment problem on blocks listed in a topological order."""

    fwd: tuple[float, ...]         # F of each block
    bwd: tuple[float, ...]         # B of each block
    act: tuple[int, ...]           # A: activation bytes of each block
    values: tuple[Value, ...]
    params: tuple[tuple[int, tuple[int, ...]], ...]   # (bytes, reader blocks) per parameter
    edges: tuple[tuple[int, int], ...]                # block precedence (u before v), u < v
    ctx: CostContext               # schedule, d, m, k, recompute policy
    memory_limit: int | None
    loss: tuple[float, float, int] = (0.0, 0.0, 0)   # loss_fn's (F, B, A), always on the last stage
    link_of: tuple[tuple[int, ...], ...] = ()        # [p][c]: the link a value sent from stage p to c pays
    # per block, whether it holds a node that is not local (passes.local_values); every stage needs one,
    # since a stage of local nodes only does nothing the stages reading them do not redo. () = all do
    work: tuple[bool, ...] = ()

    def comm_at(self, v: Value, src: int, dst: int) -> float:
        """What ``v`` costs in C_dst when sent from stage ``src`` (its producer's) straight into ``dst``."""
        return v.comm_links[self.link_of[src][dst]] if v.comm_links else v.comm

    def comm_lowest(self, v: Value, dst: int) -> float:
        """The cheapest :meth:`comm_at` of ``v`` into ``dst`` from any earlier stage."""
        if not v.comm_links:
            return v.comm
        return min((v.comm_links[self.link_of[t][dst]] for t in range(dst)), default=v.comm)

    @property
    def n(self) -> int:
        return len(self.fwd)

    @property
    def num_stages(self) -> int:
        """d."""
        return self.ctx.num_stages

    @property
    def in_flight(self) -> tuple[int, ...]:
        """n_s per stage."""
        return tuple(self.ctx.in_flight(s) for s in range(self.ctx.num_stages))

    @property
    def weight_copies(self) -> int:
        """2 + k + [2bw]."""
        return self.ctx.weight_copies

    @property
    def recompute(self) -> bool | None:
        """None: chosen per stage; True/False: forced."""
        return self.ctx.recompute


def build_problem(gc: GraphCosts, blocks: Sequence[Sequence[int]], *, num_stages: int,
                  num_microbatches: int, schedule: str, memory_limit: int | None,
                  optimizer_slots: int, recompute: bool | None,
                  time_scale: float | None = None, ctx: CostContext | None = None) -> BlockProblem:
    """Block-level problem from graph costs and blocks (a topological order of blocks).

    Args:
        gc: graph costs.
        blocks: compute-node indices per block; blocks must be in a topological order.
        num_stages, num_microbatches, schedule, memory_limit, optimizer_slots, recompute:
            as in :func:`fxpipe.passes.partition.partition`.
        time_scale: if given, every time is multiplied by it and rounded to an
            integer (the CP-SAT model's units).
        ctx: the cost context to use instead of one made from the arguments above
            (which must then agree with it).

    Returns:
        The :class:`BlockProblem`.
    """
    if ctx is None:
        ctx = CostContext(schedule=schedule, num_stages=num_stages,
                          num_microbatches=num_microbatches, optimizer_slots=optimizer_slots,
                          recompute=recompute)
    blk = [0] * gc.n
    for b, nodes in enumerate(blocks):
        for v in nodes:
            blk[v] = b

    def t(x: float) -> float:
        return float(round(x * time_scale)) if time_scale is not None else x

    if len(blocks) == gc.n and all(len(vs) == 1 for vs in blocks):
        fwd = tuple(t(gc.fwd[vs[0]]) for vs in blocks)
        bwd = tuple(t(gc.bwd[vs[0]]) for vs in blocks)
        act = tuple(gc.act[vs[0]] for vs in blocks)
    else:
        fwd = tuple(t(sum(gc.fwd[v] for v in nodes)) for nodes in blocks)
        bwd = tuple(t(sum(gc.bwd[v] for v in nodes)) for nodes in blocks)
        act = tuple(sum(gc.act[v] for v in nodes) for nodes in blocks)
    if gc.link_of and len(gc.link_of) != ctx.num_stages:
        raise ConfigError(f"the cost model prices links between {len(gc.link_of)} stages, but the problem "
                          f"has num_stages={ctx.num_stages}; build its LinkTransfers for {ctx.num_stages} stages")
    values: list[Value] = []
    edges: set[tuple[int, int]] = set()
    for v in range(gc.n):
        cons = tuple(sorted({blk[c] for c in gc.consumers[v]} - {blk[v]}))
        for c in cons:
            edges.add((blk[v], c))
        ret = gc.returned[v]
        if gc.is_local(v):             # computed on every stage that reads it: never sent (local_values)
            continue
        if cons or ret:
            links = tuple(t(c) for c in gc.comm_links[v]) if gc.comm_links else ()
            values.append(Value(blk[v], cons, t(gc.comm[v]), gc.out_bytes[v], ret, links, gc.gets_gradient(v)))
    for inp in gc.inputs:
        values.append(Value(-1, tuple(sorted({blk[c] for c in inp.consumers})), 0.0, inp.nbytes))
    readers: dict[str, set[int]] = {}
    for v in range(gc.n):
        for p in gc.params[v]:
            readers.setdefault(p, set()).add(blk[v])
    params = tuple((gc.param_bytes[p], tuple(sorted(r))) for p, r in readers.items())
    for (u, w) in edges:
        if u >= w:
            raise ValueError(f"blocks are not in a topological order: edge {u} -> {w}")
    loss = (t(gc.loss.fwd_time), t(gc.loss.bwd_time), int(gc.loss.activation_bytes)) \
        if gc.loss is not None else (0.0, 0.0, 0)
    work = tuple(any(not gc.is_local(v) for v in nodes) for nodes in blocks) if gc.local else ()
    return BlockProblem(fwd=fwd, bwd=bwd, act=act, values=tuple(values), params=params, work=work,
                        edges=tuple(sorted(edges)), ctx=ctx, memory_limit=memory_limit, loss=loss,
                        link_of=gc.link_of)


def stage_figures(prob: BlockProblem, block_stage: Sequence[int]) -> list[StageFigures]:
    """The figures of every stage when block b runs on stage ``block_stage[b]``.

    A value enters stage s when a consumer runs on s (or s is the last stage and
    the value is a model output) and its producer runs on an earlier stage; it is
    paid in C_s (over the link from the producer's stage to s: the runtime sends it
    straight there) and counted in I_s (and in X_s unless it is a model input) once
    per stage it enters, however many nodes of s read it; ``received_from`` splits X_s
    by the producer's stage, ``received_grad_from`` the part of it whose gradient goes back
    (the floating values: ``Value.grad``).
    """
    d = prob.num_stages
    f = [0.0] * d
    b_ = [0.0] * d
    a = [0] * d
    for b in range(prob.n):
        s = block_stage[b]
        f[s] += prob.fwd[b]
        b_[s] += prob.bwd[b]
        a[s] += prob.act[b]
    if prob.loss != (0.0, 0.0, 0):      # loss_fn runs after the last stage's forward
        f[d - 1] += prob.loss[0]
        b_[d - 1] += prob.loss[1]
        a[d - 1] += prob.loss[2]
    c = [0.0] * d
    ib = [0] * d
    xb = [0] * d
    xf: list[dict[int, int]] = [{} for _ in range(d)]      # X_s by producer stage
    xg: list[dict[int, int]] = [{} for _ in range(d)]      # the part of it that gets a gradient back
    for v in prob.values:
        ps = block_stage[v.producer] if v.producer >= 0 else -1
        into = {block_stage[k] for k in v.consumers}
        if v.returned and v.producer >= 0:
            into.add(d - 1)
        for s in into:
            if s > ps:
                ib[s] += v.nbytes
                if v.producer >= 0:
                    c[s] += prob.comm_at(v, ps, s)
                    xb[s] += v.nbytes
                    xf[s][ps] = xf[s].get(ps, 0) + v.nbytes
                    xg[s][ps] = xg[s].get(ps, 0) + (v.nbytes if v.grad else 0)
    pb = [0] * d
    for nbytes, readers in prob.params:
        for s in {block_stage[k] for k in readers}:
            pb[s] += nbytes
    return [StageFigures(fwd=f[s], bwd=b_[s], comm=c[s], param_bytes=pb[s], activation_bytes=a[s],
                         input_bytes=ib[s], received_bytes=xb[s], in_flight=prob.ctx.in_flight(s),
                         kept_bytes=prob.loss[2] if s == d - 1 else 0,
                         received_from=tuple(sorted(xf[s].items())),
                         received_grad_from=tuple(sorted(xg[s].items())))
            for s in range(d)]


def evaluate(prob: BlockProblem, block_stage: Sequence[int],
             flags: Sequence[bool]) -> tuple[list[float], list[int]]:
    """Stage times T_s and memories M_s of any block assignment (in the problem's units).

    Args:
        prob: the block problem.
        block_stage: stage of each block.
        flags: r_s per stage.

    Returns:
        (times, memories), one entry per stage.
    """
    figs = stage_figures(prob, block_stage)
    return ([fig.time(bool(flags[s])) for s, fig in enumerate(figs)],
            [fig.memory(prob.ctx, bool(flags[s])) for s, fig in enumerate(figs)])
