"""The plan builder and re-checker: an assignment of nodes to stages becomes a frozen, re-checked Plan.

Every planner (CP-SAT, DP, baselines, a user's saved plan) ends here, so every
figure a Plan shows comes from the graph and the evaluator, never from a solver.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch.fx

from fxpipe.cost_models.evaluator import CostContext, StageFigures
from fxpipe.errors import ConfigError, PartitionError
from fxpipe.ir import SCHEDULES, CostModel, Plan, SolveInfo, StagePlan

from .bounds import trivial_lower_bound
from .coarsen import GraphCosts, graph_costs
from .problem import build_problem, stage_figures

__all__ = ["plan_from_assignment", "validate_options", "drop_needless_recompute"]


def validate_options(num_stages: int | None, num_microbatches: int, schedule: str,
              memory_limit: int | None, optimizer_slots: int) -> None:
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ConfigError(f"num_microbatches must be an integer >= 1, got {num_microbatches!r}")
    if memory_limit is not None and memory_limit <= 0:
        raise ConfigError(f"memory_limit must be a positive number of bytes or None, "
                          f"got {memory_limit!r}")
    if optimizer_slots < 0:
        raise ConfigError(f"optimizer_slots must be >= 0, got {optimizer_slots}")


def plan_from_assignment(gm: torch.fx.GraphModule, cost_model: CostModel, stage_of: dict[str, int],
                         recompute: Sequence[bool], *, num_microbatches: int, schedule: str,
                         memory_limit: int | None = None, optimizer_slots: int = 0,
                         solver: str = "cp-sat", solve_time: float = 0.0,
                         lower_bound: float | None = None, optimal: bool = False,
                         extra: dict[str, Any] | None = None, check_memory: bool = True,
                         costs: GraphCosts | None = None,
                         solve_info: SolveInfo | None = None) -> Plan:
    """Build the frozen Plan of an assignment, recomputing and re-checking every figure.

    ``Plan.stages[s].nodes`` lists the compute nodes (call_function / call_method
    / call_module) of stage s in graph order; placeholders and get_attr nodes are
    not listed (inputs are available on every stage, get_attr follows its users).
    ``cut_edges`` lists (producer, consumer) compute-node pairs on different stages.

    Args:
        gm: annotated graph.
        cost_model: prices transfers.
        stage_of: compute-node name -> stage; names of placeholder/get_attr/output
            nodes are ignored.
        recompute: r_s per stage; its length is the number of stages d.
        num_microbatches: m.
        schedule: "2bw" | "flush" | "gpipe".
        memory_limit: bytes per device, or None.
        optimizer_slots: k.
        solver, solve_time, optimal, extra, solve_info: recorded in the Plan.
        lower_bound: proven lower bound; default :func:`trivial_lower_bound`. It is
            clipped to the bottleneck.
        check_memory: raise when a stage exceeds ``memory_limit`` (baselines pass
            False; the plan's ``over_memory_stages`` lists such stages).
        costs: precomputed graph costs of ``gm``.

    Returns:
        The Plan.

    Raises:
        ConfigError: bad schedule / num_microbatches / empty ``recompute``.
        PartitionError: a compute node is unassigned or assigned out of range, a
            name is unknown, a stage is empty, an edge goes to an earlier stage, or
            (check_memory) a stage exceeds the memory limit.
    """
    validate_options(None, num_microbatches, schedule, memory_limit, optimizer_slots)
    gc = costs if costs is not None else graph_costs(gm, cost_model)
    d = len(recompute)
    if d < 1:
        raise ConfigError("recompute must have one flag per stage (at least one stage)")
    graph_names = {n.name for n in gm.graph.nodes}
    for name in stage_of:
        if name not in graph_names:
            raise PartitionError(f"plan_from_assignment: stage_of names {name!r}, which is not a "
                                 "node of the graph")
    stage = [0] * gc.n
    for v, name in enumerate(gc.names):
        if name not in stage_of:
            raise PartitionError(f"plan_from_assignment: compute node {name!r} has no stage")
        s = stage_of[name]
        if not isinstance(s, int) or not 0 <= s < d:
            raise PartitionError(f"plan_from_assignment: node {name!r} is assigned stage {s!r}, "
                                 f"outside 0..{d - 1}")
        stage[v] = s
    for v in range(gc.n):
        for c in gc.consumers[v]:
            if stage[c] < stage[v]:
                raise PartitionError(
                    f"plan_from_assignment: edge {gc.names[v]} -> {gc.names[c]} goes from stage "
                    f"{stage[v]} back to stage {stage[c]}; stages must not decrease along edges")
    members: list[list[int]] = [[] for _ in range(d)]
    for v in range(gc.n):
        members[stage[v]].append(v)
    for s in range(d):
        if not members[s]:
            raise PartitionError(f"plan_from_assignment: stage {s} of {d} has no compute node")

    ctx = CostContext(schedule=schedule, num_stages=d, num_microbatches=num_microbatches,
                      optimizer_slots=optimizer_slots)
    prob = build_problem(gc, [[v] for v in range(gc.n)], num_stages=d,
                         num_microbatches=num_microbatches, schedule=schedule,
                         memory_limit=memory_limit, optimizer_slots=optimizer_slots,
                         recompute=None, ctx=ctx)
    stages: list[StagePlan] = []
    over: list[tuple[int, int]] = []
    for s, fig in enumerate(stage_figures(prob, stage)):
        r = bool(recompute[s])
        mem = fig.memory(ctx, r)
        if memory_limit is not None and mem > memory_limit:
            over.append((s, mem))
        stages.append(StagePlan(
            index=s, nodes=tuple(gc.names[v] for v in members[s]), recompute=r,
            time=fig.time(r), fwd_time=fig.fwd, bwd_time=fig.bwd, comm_time=fig.comm, memory=mem,
            param_bytes=fig.param_bytes, activation_bytes=fig.activation_bytes,
            input_bytes=fig.input_bytes, in_flight=fig.in_flight,
            received_bytes=fig.received_bytes, received_from=fig.received_from,
            received_grad_from=fig.received_grad_from))
    if over and check_memory:
        s, mem = over[0]
        raise PartitionError(
            f"plan_from_assignment: stage {s} needs {mem} bytes, over memory_limit={memory_limit} "
            f"(P={stages[s].param_bytes}, A={stages[s].activation_bytes}, "
            f"I={stages[s].input_bytes}, X={stages[s].received_bytes}, n={stages[s].in_flight}, "
            f"recompute={stages[s].recompute})")
    cut = tuple((gc.names[v], gc.names[c]) for v in range(gc.n) for c in gc.consumers[v]
                if stage[c] != stage[v] and not gc.is_local(v))     # a local value is recomputed there
    bottleneck = max(st.time for st in stages)
    lb = trivial_lower_bound(gc, d, None) if lower_bound is None else lower_bound
    lb = min(lb, bottleneck)
    return Plan(
        stages=tuple(stages), num_microbatches=num_microbatches, schedule=schedule,
        bottleneck=bottleneck, lower_bound=lb,
        optimal=bool(optimal or bottleneck <= lb * (1 + 1e-9)),
        solver=solver, solve_time=solve_time, memory_limit=memory_limit,
        optimizer_slots=optimizer_slots, cut_edges=cut, extra=dict(extra or {}),
        solve_info=solve_info, over_memory_stages=tuple(s for s, _ in over), loss=gc.loss)


def drop_needless_recompute(gm: torch.fx.GraphModule, cost_model: CostModel, gc: GraphCosts,
                             assign: dict[str, int], flags: list[bool], recompute: bool | None,
                             opts: dict[str, Any]) -> list[bool]:
    """Turn r_s off where the stage fits without recomputation (never slower)."""
    if recompute is not None or not any(flags):
        return flags
    plan = plan_from_assignment(gm, cost_model, assign, flags, costs=gc, **opts)
    limit = opts["memory_limit"]
    ctx = CostContext(schedule=opts["schedule"], num_stages=len(flags),
                      num_microbatches=opts["num_microbatches"],
                      optimizer_slots=opts["optimizer_slots"])
    out = list(flags)
    for st in plan.stages:
        if st.recompute:
            mem = StageFigures.of_stage(st).memory(ctx, False)
            if limit is None or mem <= limit:
                out[st.index] = False
    return out
