"""The planner run on checked options: a given plan re-checked, a fixed depth partitioned, or the depth x width search."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx

from fxpipe.errors import ConfigError
from fxpipe.frontend import CompiledGraph, batch_size, prepare, price_loss, resize_batch
from fxpipe.ir import CostModel, Plan
from fxpipe.options import PlanOptions

__all__ = ["plan_graph"]

_COMPUTE = ("call_function", "call_method", "call_module")


def plan_graph(model: torch.nn.Module, example_inputs: Any, opts: PlanOptions,
               given_plan: Plan | None = None, width: int | None = None) -> tuple[Plan, CompiledGraph]:
    """Trace and annotate ``model`` for ``opts`` and plan it (or re-check ``given_plan`` on its graph).

    Args:
        model: the model (meta-device parameters are fine: nothing runs for real).
        example_inputs: one whole batch.
        opts: from :func:`fxpipe.options.check_plan_options`.
        given_plan: a Plan to re-check on the traced graph instead of solving.
        width: w, the replicas of a fixed-depth pipeline (the distributed executor's WORLD_SIZE / d);
            None: ``opts.num_devices / num_stages`` when num_devices is given, else 1. The d x w ranks'
            placement prices the transfers, and the Plan records w (``data_parallel``).

    Returns:
        The Plan and the CompiledGraph it was cut from (for the search: the graph of the chosen
        microbatch size).

    Raises:
        ConfigError: the graph has no operations, fewer operations than stages, or does not match
            ``given_plan``; InfeasibleMemoryError, TraceError, CostModelError.
    """
    if opts.num_stages is None:
        return _search(model, example_inputs, opts)
    if width is None:
        width = opts.num_devices // opts.num_stages if opts.num_devices else 1
    cg = prepare(model, example_inputs, num_microbatches=opts.num_microbatches, cost_model=opts.cost_model,
                 device=opts.device, leaf_modules=opts.leaf_modules, precision=opts.precision)
    if opts.executor == "local" and opts.device is None and isinstance(opts.cost_model, str):
        # one process, this machine: a stage hands its outputs over by reference (issue 10 item 6)
        from fxpipe.cost_models.evaluator import InProcessTransfers

        cg.cost_model = InProcessTransfers(cg.cost_model)
    base = cg.cost_model
    # the given plan's rank order is the one its ranks run (the runtime follows it): re-check it there
    places = _placements(opts, opts.num_stages, width, _recorded_order(given_plan))
    cg.cost_model = _linked(base, opts, places[0]) if places else base
    if opts.example_targets is not None and opts.loss_fn is not None:
        price_loss(cg, opts.loss_fn, opts.example_targets, opts.num_microbatches)
    if given_plan is not None:
        where = places[0] if places else _given_placement(given_plan, width)
        return _with_placement(_recheck(model, cg, given_plan, opts), width, where), cg
    n_compute = sum(1 for n in cg.gm.graph.nodes if n.op in _COMPUTE)
    if n_compute == 0:
        raise ConfigError(f"the traced graph of {type(model).__name__} has no operations (its forward returns "
                          "its inputs or constants): there is nothing to cut into stages")
    if opts.num_stages > n_compute:
        raise ConfigError(f"num_stages={opts.num_stages} is more than the {n_compute} operations in the "
                          f"traced graph of {type(model).__name__}; use at most {n_compute} stages")
    p, where, cg.cost_model = _partition_placed(cg, base, opts, width, places)
    return _with_placement(p, width, where), cg


def _partition_placed(cg: CompiledGraph, base: CostModel, opts: PlanOptions, width: int,
                      places: list[Any]) -> tuple[Plan, Any, CostModel]:
    """The fixed-depth plan under the faster of ``places`` (as the search chooses: each priced by
    :meth:`~fxpipe.cost_models.topology.Topology.price`, ties to the first, stages-in-node), with
    its placement and the cost model its transfers were priced by.

    One CP-SAT solve per distinct set of links: placements whose stage-to-stage transfers cross the
    same links (all devices on one node, or no boundary leaving a node under either) share one cut,
    and only their all-reduces are priced apart. Two distinct sets split ``time_limit`` between them,
    so planning takes no longer than with one.
    """
    from fxpipe.passes.partition import partition

    by_links: dict[Any, list[Any]] = {}
    for pl in places or [None]:
        by_links.setdefault(None if pl is None else _link_key(pl), []).append(pl)
    share = opts.time_limit / len(by_links)
    best: tuple[float, Plan, Any, CostModel] | None = None
    for group in by_links.values():
        cm = base if group[0] is None else _linked(base, opts, group[0])
        p = partition(cg.gm, cm, num_stages=opts.num_stages, num_microbatches=opts.num_microbatches,
                      schedule=opts.schedule, memory_limit=opts.memory_limit, optimizer_slots=opts.optimizer_slots,
                      recompute=opts.recompute, time_limit=share)
        if len(places) <= 1:
            return p, group[0], cm
        topo = _topology(opts)
        for pl in group:
            t = dataclasses.replace(topo, placement=pl.order).price(p, width)[0]
            if best is None or t < best[0] * (1 - 1e-12):
                best = (t, p, pl, cm)
    assert best is not None
    return best[1], best[2], best[3]


def _link_key(where: Any) -> tuple[int, ...]:
    """What the partitioner sees of a placement: per stage pair p < c, the devices sharing the network
    with a transfer p -> c (0: inside a node), as :meth:`Topology.links` prices it."""
    d, per_node = where.num_stages, where.crossing_users()
    return tuple(where.link_users(a, c, per_node) for a in range(d) for c in range(a + 1, d))


def _search(model: torch.nn.Module, example_inputs: Any, opts: PlanOptions) -> tuple[Plan, CompiledGraph]:
    """num_stages=None: depth, width and microbatch size searched; one traced graph per microbatch size."""
    from fxpipe.passes.search import search_depth_width

    cached: dict[int, CompiledGraph] = {}

    def graph_for(b: int) -> tuple[torch.fx.GraphModule, CostModel]:
        if b not in cached:
            cached[b] = prepare(model, resize_batch(example_inputs, b), num_microbatches=1,
                                cost_model=opts.cost_model, device=opts.device, leaf_modules=opts.leaf_modules,
                                precision=opts.precision)
            if opts.example_targets is not None and opts.loss_fn is not None:
                price_loss(cached[b], opts.loss_fn, resize_batch(opts.example_targets, b), 1)
        return cached[b].gm, cached[b].cost_model

    batch = opts.global_batch or batch_size(example_inputs)
    p = search_depth_width(graph_for, num_devices=int(opts.num_devices or 1), global_batch=int(batch),
                           schedule=opts.schedule, memory_limit=opts.memory_limit,
                           optimizer_slots=opts.optimizer_slots, recompute=opts.recompute,
                           time_limit=opts.time_limit, topology=_topology(opts))
    return p, cached[int(p.microbatch_size or 1)]


def _recheck(model: torch.nn.Module, cg: CompiledGraph, given: Plan, opts: PlanOptions) -> Plan:
    """``plan=`` given: the same operations as the traced graph, re-checked by plan_from_assignment."""
    from fxpipe.passes.partition import plan_from_assignment

    if given.num_stages != opts.num_stages:
        raise ConfigError(f"plan has {given.num_stages} stages but num_stages={opts.num_stages}; "
                          f"pass num_stages={given.num_stages} with this plan")
    names = {n.name for n in cg.gm.graph.nodes if n.op in _COMPUTE}
    planned = set(given.stage_of())
    if names != planned:
        raise ConfigError(
            f"plan does not match the traced graph of {type(model).__name__}: {len(names - planned)} "
            f"operations have no stage (e.g. {sorted(names - planned)[:3]}) and {len(planned - names)} "
            f"planned names are not in the graph (e.g. {sorted(planned - names)[:3]}); re-plan this "
            "model with fxpipe.plan(...) or `fxpipe dump --format json`")
    return plan_from_assignment(cg.gm, cg.cost_model, given.stage_of(), [s.recompute for s in given.stages],
                                num_microbatches=opts.num_microbatches, schedule=opts.schedule,
                                memory_limit=opts.memory_limit, optimizer_slots=opts.optimizer_slots,
                                solver=given.solver, lower_bound=given.lower_bound, optimal=given.optimal)


def _topology(opts: PlanOptions) -> Any:
    """The cluster the search prices placements on: ``device``'s spec, n devices a node, precision."""
    from fxpipe.cost_models.device import get_device
    from fxpipe.cost_models.topology import Topology

    spec = get_device(opts.device)
    n = spec.devices_per_node if opts.devices_per_node is None else opts.devices_per_node
    return Topology(spec, n, opts.precision)


def _recorded_order(plan: Plan | None) -> str | None:
    """The rank order a given plan records (``extra["placement"]["order"]``), or None.

    Raises:
        ConfigError: the recorded order is not one of PLACEMENTS.
    """
    from fxpipe.cost_models.topology import PLACEMENTS

    where = plan.extra.get("placement") if plan is not None else None
    order = where.get("order") if isinstance(where, dict) else None
    if order is not None and order not in PLACEMENTS:
        raise ConfigError(f"the plan's extra['placement']['order'] is {order!r}, not one of {', '.join(PLACEMENTS)}; "
                          "fix the plan's JSON or re-plan the model")
    return order


def _given_placement(plan: Plan, width: int) -> Any:
    """A given plan's recorded rank order, re-laid for ``width`` replicas, when no cluster is described
    (None when it records none): its ranks still run in that order."""
    from fxpipe.cost_models.topology import Placement

    order = _recorded_order(plan)
    if order is None:
        return None
    n = plan.extra["placement"].get("devices_per_node")
    return Placement(order, plan.num_stages, width, n if isinstance(n, int) and n >= 1 else 1)


def _placements(opts: PlanOptions, num_stages: int, width: int = 1, order: str | None = None) -> list[Any]:
    """Where a fixed-depth plan's d x w ranks may sit: both placements when w > 1 and d > 1 (the
    search's :meth:`~fxpipe.cost_models.topology.Topology.placements`), only ``order`` when given (a
    plan that records one), or [] when neither ``device`` nor ``devices_per_node`` describes a
    cluster (the ranks then run stages-in-node, the runtime's default).

    Raises:
        ConfigError: ``order`` is not one of PLACEMENTS.
    """
    if opts.devices_per_node is None and opts.device is None:
        return []
    topo = _topology(opts)
    if order is not None:
        topo = dataclasses.replace(topo, placement=order)      # checked by Topology
    return topo.placements(num_stages, width)


def _linked(cm: CostModel, opts: PlanOptions, where: Any) -> CostModel:
    """The cost model with each transfer priced by the link it crosses where ``where`` puts the stages
    (unchanged when every boundary stays inside a node): partition, re-check and summary share it."""
    return _topology(opts).linked(cm, where)


def _with_placement(p: Plan, width: int, where: Any) -> Plan:
    """A fixed-depth plan records its width w and where its stages sit (``where``: a Placement or None)."""
    p = dataclasses.replace(p, data_parallel=width) if width != p.data_parallel else p
    if where is None:
        return p
    return dataclasses.replace(p, extra={**p.extra, "placement": where.to_dict()})
