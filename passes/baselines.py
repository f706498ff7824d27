"""Baseline planners that cut where DeepSpeed and torchgpipe cut, returning the same Plan type.

Both libraries partition a *sequence of layers* (DeepSpeed: ``PipelineModule(layers=[...])``,
torchgpipe: the children of an ``nn.Sequential``). Here the layers are read from the
graph (:func:`layer_units`): every compute node belongs to the layer named by its
module path up to the first list index (``blocks.3.attn.qkv`` -> ``blocks.3``,
``wte`` -> ``wte``, ``features.0`` -> ``features.0``); nodes outside any module join
the layer before them (leading ones the first layer); a module called again later
(a tied head, a reused module) is a new layer there, as a user writing the layer list
would write it. Then the library's own algorithm cuts that sequence:

    uniform     DeepSpeed 0.19.8 ``partition_method="uniform"``: ``partition_uniform``,
                equal layer counts, the first ``n % d`` parts one layer longer.
    parameters  DeepSpeed 0.19.8 ``partition_method="parameters"``: ``partition_balanced`` (a DP
                minimising max - min part sum, ties to the latest cut) over each layer's
                trainable parameter count (a tied weight counts in every layer that holds it).
    type:REGEX  DeepSpeed 0.19.8 ``partition_method="type:REGEX"``: ``partition_balanced`` over
                1 for layers whose class name matches REGEX (case-insensitive search), else 0.
    time        torchgpipe 0.0.7 ``balance_by_time``: ``blockpartition.solve`` (Barany et al.)
                over each layer's forward+backward time, here the cost model's F+B.

The algorithms (:mod:`fxpipe.passes.layer_partition`) are transcriptions of
deepspeed/runtime/utils.py and pipe/module.py (0.19.8) and torchgpipe/balance/blockpartition.py
(0.0.7), tie-breaking included, so they cut where the libraries cut on the same weights. None of them looks at
communication or memory while cutting. Each then picks r_s per stage (recompute only
where the stage would not fit otherwise, unless forced) and reports a stage over the
limit as ``plan.extra["over_memory"] = True`` instead of raising.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch.fx

from fxpipe.cost_models.evaluator import CostContext, StageFigures
from fxpipe.errors import ConfigError, PartitionError
from fxpipe.ir import CostModel, Plan

from .coarsen import COMPUTE_OPS, GraphCosts, graph_costs
from .layer_partition import balanced_partition, block_partition, partition_balanced, partition_uniform
from .plan_build import plan_from_assignment
from .plan_build import validate_options as _validate

__all__ = ["uniform_plan", "parameters_plan", "type_plan", "time_plan", "baseline", "BASELINES",
           "LayerUnit", "layer_units", "partition_uniform", "partition_balanced", "block_partition",
           "balanced_partition"]


def _finish(gm: torch.fx.GraphModule, cost_model: CostModel, gc: GraphCosts, stage: Sequence[int],
            *, solver: str, t0: float, num_stages: int, num_microbatches: int, schedule: str,
            memory_limit: int | None, optimizer_slots: int, recompute: bool | None,
            extra: dict[str, Any] | None = None) -> Plan:
    opts = dict(num_microbatches=num_microbatches, schedule=schedule, memory_limit=memory_limit,
                optimizer_slots=optimizer_slots)
    assign = {gc.names[v]: int(stage[v]) for v in range(gc.n)}
    flags = [bool(recompute)] * num_stages
    plan = plan_from_assignment(gm, cost_model, assign, flags, costs=gc, check_memory=False,
                                **opts)
    if recompute is None and memory_limit is not None:
        ctx = CostContext(schedule=schedule, num_stages=num_stages,
                          num_microbatches=num_microbatches, optimizer_slots=optimizer_slots)
        loss_kept = gc.loss.activation_bytes if gc.loss is not None else 0
        for st in plan.stages:
            if st.memory > memory_limit:
                rec = StageFigures.of_stage(st, loss_kept if st.index == num_stages - 1 else 0).memory(ctx, True)
                flags[st.index] = rec < st.memory
    info = dict(extra or {})
    info.setdefault("over_memory", False)
    return plan_from_assignment(gm, cost_model, assign, flags, costs=gc, check_memory=False,
                                solver=solver, solve_time=time.perf_counter() - t0, extra=info,
                                **opts)


def _check(gc: GraphCosts, num_stages: int) -> None:
    if not isinstance(num_stages, int) or not 1 <= num_stages <= gc.n:
        raise ConfigError(f"num_stages={num_stages} must be between 1 and the number of compute "
                          f"nodes in the graph ({gc.n})")


# -- the layer sequence a DeepSpeed / torchgpipe user would write ---------------------------------

@dataclass(frozen=True)
class LayerUnit:
    """One layer of the sequence: a run of consecutive compute nodes (indices into GraphCosts)."""

    key: str                  # module path up to the first list index, or the function's name
    type_name: str            # class name (DeepSpeed's ``_find_layer_type`` matches this)
    nodes: tuple[int, ...]


def _layer_key(stack: Any) -> tuple[str, str] | None:
    """(layer path, class name) from a node's ``nn_module_stack``, or None outside every module."""
    paths = []
    for val in (stack or {}).values():
        if isinstance(val, (tuple, list)) and val:
            path, typ = str(val[0]), val[1] if len(val) > 1 else None
        else:
            path, typ = str(val), None
        if path:
            paths.append((path, typ))
    if not paths:
        return None
    deepest = max(paths, key=lambda pt: len(pt[0].split(".")))[0]
    parts = deepest.split(".")
    cut = next((i for i, p in enumerate(parts) if p.isdigit()), 0)
    key = ".".join(parts[: cut + 1])
    typ = next((t for p, t in paths if p == key), None)
    if typ is None:
        name = key
    elif isinstance(typ, type):
        name = typ.__name__
    else:
        name = str(typ).rsplit(".", 1)[-1].strip("'>")
    return key, name


def layer_units(gm: torch.fx.GraphModule, gc: GraphCosts | None = None) -> list[LayerUnit]:
    """The graph as the layer list a user of DeepSpeed's PipelineModule or torchgpipe would write.

    Example (TinyGPT, 4 blocks): ``wte`` (with the ``arange`` before it), ``wpe`` (with the
    ``add``), ``blocks.0`` .. ``blocks.3``, ``ln_f``, ``lm_head``: 8 layers.
    """
    nodes = {n.name: n for n in gm.graph.nodes if n.op in COMPUTE_OPS}
    order = list(gc.names) if gc is not None else list(nodes)
    keys: list[tuple[str, str] | None] = []
    for name in order:
        node = nodes[name]
        k = _layer_key(node.meta.get("nn_module_stack"))
        if k is None and node.op == "call_module":
            k = _layer_key({name: (str(node.target), type(gm.get_submodule(str(node.target))))})
        keys.append(k)
    first = next((k for k in keys if k is not None), None)
    units: list[tuple[str, str, list[int]]] = []
    for v, k in enumerate(keys):
        if k is None:
            if units:                    # functional code joins the layer before it
                units[-1][2].append(v)
                continue
            if first is None:            # no modules at all: every node is a layer
                fn = nodes[order[v]].target
                units.append((order[v], getattr(fn, "__name__", str(fn)), [v]))
                continue
            k = first                    # leading functional code joins the first layer
        if units and units[-1][0] == k[0]:
            units[-1][2].append(v)
        else:
            units.append((k[0], k[1], [v]))
    return [LayerUnit(key=k, type_name=t, nodes=tuple(vs)) for k, t, vs in units]


def _stages_from_parts(units: Sequence[LayerUnit], parts: Sequence[int], n: int, d: int) -> list[int]:
    """Node stages from DeepSpeed-style part boundaries ``parts`` (d+1 layer indices)."""
    if len(parts) != d + 1 or any(parts[s + 1] <= parts[s] for s in range(d)):
        raise PartitionError(f"the layer partition {list(parts)} leaves a stage of {d} without layers "
                             f"({len(units)} layers); use fewer stages or fxpipe's own planner")
    stage = [0] * n
    for s in range(d):
        for u in units[parts[s]:parts[s + 1]]:
            for v in u.nodes:
                stage[v] = s
    return stage


def _layers_for(gm: torch.fx.GraphModule, gc: GraphCosts, d: int, what: str) -> list[LayerUnit]:
    units = layer_units(gm, gc)
    if len(units) < d:
        raise PartitionError(f"{what}: the graph has {len(units)} layers ({', '.join(u.key for u in units[:6])}"
                             f"{'...' if len(units) > 6 else ''}), fewer than num_stages={d}; the real tool "
                             "would leave a stage empty. Use fewer stages or fxpipe's own planner")
    return units


# -- the planners --------------------------------------------------------------------------------

def _param_counts(gm: torch.fx.GraphModule, gc: GraphCosts, units: Sequence[LayerUnit]) -> list[float]:
    """Trainable parameter count of every layer; a weight shared by two layers counts in both."""
    def numel(p: str) -> float:
        try:
            t = gm.get_parameter(p)
        except AttributeError:
            return float(gc.param_bytes.get(p, 0))      # graphs without real parameters: bytes
        return float(t.numel()) if t.requires_grad else 0.0

    return [sum(numel(p) for p in sorted({p for v in u.nodes for p in gc.params[v]})) for u in units]


def uniform_plan(gm: torch.fx.GraphModule, cost_model: CostModel, *, num_stages: int,
                 num_microbatches: int, schedule: str = "2bw", memory_limit: int | None = None,
                 optimizer_slots: int = 0, recompute: bool | None = None) -> Plan:
    """DeepSpeed 0.19.8 ``partition_method="uniform"``: equal numbers of layers per stage.

    Args:
        gm: annotated graph.
        cost_model: prices transfers.
        num_stages: d.
        num_microbatches: m.
        schedule: "2bw" | "flush" | "gpipe".
        memory_limit: bytes per device (reported, not enforced).
        optimizer_slots: k.
        recompute: None: recompute only stages over the limit; True/False: forced.

    Returns:
        A Plan with ``solver="uniform"``; ``extra["parts"]`` holds DeepSpeed's layer
        boundaries and ``extra["layers"]`` the layer names.

    Raises:
        ConfigError: num_stages out of range or bad schedule.
        PartitionError: fewer layers than stages.
    """
    return _cut_layers(gm, cost_model, "uniform", "uniform (DeepSpeed partition_uniform)",
                       lambda gc, units: partition_uniform(len(units), num_stages),
                       num_stages=num_stages, num_microbatches=num_microbatches, schedule=schedule,
                       memory_limit=memory_limit, optimizer_slots=optimizer_slots, recompute=recompute)


def _cut_layers(gm: torch.fx.GraphModule, cost_model: CostModel, solver: str, what: str,
                cut: Callable[[GraphCosts, list[LayerUnit]], Sequence[int]], **kw: Any) -> Plan:
    """The steps every baseline shares: check the options, read the layers, ``cut(gc, layers)`` -> part
    boundaries (the library's algorithm), then the stages, r_s and the re-checked Plan."""
    t0 = time.perf_counter()
    _validate(kw["num_stages"], kw["num_microbatches"], kw["schedule"], kw["memory_limit"], kw["optimizer_slots"])
    gc = graph_costs(gm, cost_model)
    _check(gc, kw["num_stages"])
    units = _layers_for(gm, gc, kw["num_stages"], what)
    parts = cut(gc, units)
    stage = _stages_from_parts(units, parts, gc.n, kw["num_stages"])
    extra = {"parts": [int(p) for p in parts], "layers": [u.key for u in units]}
    return _finish(gm, cost_model, gc, stage, solver=solver, t0=t0, extra=extra, **kw)


def parameters_plan(gm: torch.fx.GraphModule, cost_model: CostModel, *, num_stages: int,
                    num_microbatches: int, schedule: str = "2bw",
                    memory_limit: int | None = None, optimizer_slots: int = 0,
                    recompute: bool | None = None) -> Plan:
    """DeepSpeed 0.19.8 ``partition_method="parameters"``: :func:`partition_balanced` of per-layer parameter counts.

    Args:
        see :func:`uniform_plan`.

    Returns:
        A Plan with ``solver="parameters"``.

    Raises:
        ConfigError: num_stages out of range or bad schedule.
        PartitionError: fewer layers than stages.
    """
    return _cut_layers(gm, cost_model, "parameters", "parameters (DeepSpeed partition_balanced)",
                       lambda gc, units: partition_balanced(_param_counts(gm, gc, units), num_stages),
                       num_stages=num_stages, num_microbatches=num_microbatches, schedule=schedule,
                       memory_limit=memory_limit, optimizer_slots=optimizer_slots, recompute=recompute)


def type_plan(gm: torch.fx.GraphModule, cost_model: CostModel, *, layer_type: str, num_stages: int,
              num_microbatches: int, schedule: str = "2bw", memory_limit: int | None = None,
              optimizer_slots: int = 0, recompute: bool | None = None) -> Plan:
    """DeepSpeed 0.19.8 ``partition_method="type:REGEX"``: balance the layers whose class matches.

    Weights are 1 for layers whose class name matches ``layer_type`` (``re.search``,
    case-insensitive, as DeepSpeed's ``_find_layer_type``), 0 otherwise, then
    :func:`partition_balanced`.

    Args:
        layer_type: the regex, e.g. ``"Block"`` or ``"transformerlayer|Block"``.
        others: see :func:`uniform_plan`.

    Returns:
        A Plan with ``solver="type:<layer_type>"``.

    Raises:
        ConfigError: bad regex, or no layer matches (DeepSpeed raises then too).
        PartitionError: fewer layers than stages.
    """
    try:
        rx = re.compile(layer_type, re.IGNORECASE)
    except re.error as e:
        raise ConfigError(f"type:{layer_type!r} is not a valid regular expression ({e}); pass e.g. "
                          "'type:Block'") from e

    def cut(gc: GraphCosts, units: list[LayerUnit]) -> list[int]:
        weights = [1.0 if rx.search(u.type_name) else 0.0 for u in units]
        if not any(weights):
            names = sorted({u.type_name for u in units})
            raise ConfigError(f"partitioning 'type:{layer_type}' found no layer whose class matches; the layer "
                              f"classes are {names[:10]}{'...' if len(names) > 10 else ''}")
        return partition_balanced(weights, num_stages)

    return _cut_layers(gm, cost_model, f"type:{layer_type}", f"type:{layer_type} (DeepSpeed partition_balanced)",
                       cut, num_stages=num_stages, num_microbatches=num_microbatches, schedule=schedule,
                       memory_limit=memory_limit, optimizer_slots=optimizer_slots, recompute=recompute)


def time_plan(gm: torch.fx.GraphModule, cost_model: CostModel, *, num_stages: int,
              num_microbatches: int, schedule: str = "2bw", memory_limit: int | None = None,
              optimizer_slots: int = 0, recompute: bool | None = None) -> Plan:
    """torchgpipe 0.0.7 ``balance_by_time``: :func:`block_partition` of per-layer F+B.

    torchgpipe measures each layer's forward+backward; here the cost model's F+B
    of the layer's nodes stands in for that measurement.

    Args:
        see :func:`uniform_plan`.

    Returns:
        A Plan with ``solver="time"``.

    Raises:
        ConfigError: num_stages out of range or bad schedule.
        PartitionError: fewer layers than stages, or the solve leaves a block empty.
    """
    def cut(gc: GraphCosts, units: list[LayerUnit]) -> list[int]:
        blocks = block_partition([sum(gc.fwd[v] + gc.bwd[v] for v in u.nodes) for u in units], num_stages)
        return [0] + [i + 1 for i in range(len(units) - 1) if blocks[i + 1] != blocks[i]] + [len(units)]

    return _cut_layers(gm, cost_model, "time", "time (torchgpipe balance_by_time)", cut,
                       num_stages=num_stages, num_microbatches=num_microbatches, schedule=schedule,
                       memory_limit=memory_limit, optimizer_slots=optimizer_slots, recompute=recompute)


BASELINES: dict[str, Callable[..., Plan]] = {
    "uniform": uniform_plan, "parameters": parameters_plan, "time": time_plan,
}


def baseline(name: str, gm: torch.fx.GraphModule, cost_model: CostModel, **kwargs: Any) -> Plan:
    """Run the baseline planner ``name``: "uniform" | "parameters" | "time" | "type:REGEX".

    Args:
        name: which baseline; ``"type:Block"`` is DeepSpeed's ``partition_method="type:Block"``.
        gm, cost_model, kwargs: as in :func:`uniform_plan`.

    Returns:
        The baseline's Plan.

    Raises:
        ConfigError: unknown name (the message lists the known ones), or bad arguments.
    """
    if isinstance(name, str) and name.lower().startswith("type:"):
        return type_plan(gm, cost_model, layer_type=name.split(":", 1)[1], **kwargs)
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; use one of {', '.join(BASELINES)} or 'type:REGEX'")
    return BASELINES[name](gm, cost_model, **kwargs)
