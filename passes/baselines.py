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

The algorithms are transcriptions of deepspeed/runtime/utils.py and pipe/module.py
(0.19.8) and torchgpipe/balance/blockpartition.py (0.0.7), tie-breaking included, so
they cut where the libraries cut on the same weights. None of them looks at
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
        for st in plan.stages:
            if st.memory > memory_limit:
                rec = StageFigures.of_stage(st).memory(ctx, True)
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


# -- DeepSpeed 0.19.8, deepspeed/runtime/utils.py ------------------------------------------------

def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """DeepSpeed 0.19.8 ``partition_uniform``: part boundaries of equal counts, extras first.

    ``partition_uniform(10, 4) == [0, 3, 6, 8, 10]``; with ``num_items <= num_parts`` the
    trailing parts are empty (``partition_uniform(2, 3) == [0, 1, 2, 2]``).
    """
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    chunk = num_items // num_parts
    residual = num_items - chunk * num_parts
    parts = [i * chunk for i in range(num_parts + 1)]
    for i in range(residual):
        for j in range(i + 1, num_parts + 1):
            parts[j] += 1
    return parts


def partition_balanced(weights: Sequence[float], num_parts: int) -> list[int]:
    """DeepSpeed 0.19.8 ``partition_balanced``: the linear-partition DP minimising max - min part sum.

    Returns part boundaries (``num_parts + 1`` indices into ``weights``). Like the original,
    a later cut wins a tie (``>=``) and ``len(weights) <= num_parts`` falls back to
    :func:`partition_uniform`. Worked example: ``[4, 1, 1, 1, 3]`` into 2 parts: cut
    [4 1 | 1 1 3] has sums 5 and 5 (max - min = 0), so ``[0, 2, 5]``.
    """
    n, m = len(weights), num_parts
    if n <= m:
        return partition_uniform(n, m)
    inf = float("inf")
    dp_max = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_min = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_cost = [[inf] * (m + 1) for _ in range(n + 1)]
    position = [[0] * (m + 1) for _ in range(n + 1)]
    prefix = [0.0] * (n + 1)
    for i, w in enumerate(weights):
        prefix[i + 1] = prefix[i] + float(w)
    dp_max[0][0] = 0.0
    dp_cost[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                seg = prefix[i] - prefix[k]
                max_sum = max(dp_max[k][j - 1], seg)
                min_sum = min(dp_min[k][j - 1], seg)
                cost = max_sum - min_sum
                if dp_cost[i][j] >= cost:
                    dp_cost[i][j] = cost
                    dp_max[i][j] = max_sum
                    dp_min[i][j] = min_sum
                    position[i][j] = k
    parts = [n]
    for j in reversed(range(1, m + 1)):
        parts.append(position[parts[-1]][j])
    parts.reverse()
    return parts


def balanced_partition(weights: Sequence[float], parts: int) -> list[int]:
    """The part index of every item under :func:`partition_balanced` (DeepSpeed 0.19.8)."""
    bounds = partition_balanced(weights, parts)
    out = [0] * len(weights)
    for s in range(parts):
        for i in range(bounds[s], bounds[s + 1]):
            out[i] = s
    return out


# -- torchgpipe 0.0.7, torchgpipe/balance/blockpartition.py --------------------------------------

def block_partition(sequence: Sequence[float], parts: int, max_iter: int = 1_000_000) -> list[int]:
    """torchgpipe 0.0.7 ``blockpartition.solve`` (Barany et al., "Block partitions of sequences").

    Weights are normalised to [0, 1]; starting from equal counts (the last block takes the
    remainder), the heaviest block p is fixed (ties: the highest index, as ``max`` over
    ``(size, i)``) and the lightest block q (ties: the lowest index) takes one element from
    its neighbour on p's side, until max block <= min block + 1 (normalised units)::

        [9 9 | 0 0 | 0 0] -> [9 | 9 0 0 | 0 0]   normalised [1 1 | 0 0 | 0 0]: max 2 > min 0 + 1
                                                 -> max 1 <= min 0 + 1: stop

    Args:
        sequence: non-negative weights (torchgpipe passes integer microseconds).
        parts: number of blocks, 1 <= parts <= len(sequence).
        max_iter: a cap on moves the original does not have (it could loop for ever).

    Returns:
        The block index of every item (non-decreasing).

    Raises:
        ValueError: parts < 1 or longer than the sequence (as the original).
        PartitionError: the moves did not stop within ``max_iter``, or a block came out empty
            (torchgpipe's GPipe then rejects the balance).
    """
    if parts < 1:
        raise ValueError(f"partitions must be a positive integer ({parts} < 1)")
    n = len(sequence)
    if n < parts:
        raise ValueError(f"sequence is shorter than intended partitions ({n} < {parts})")
    minimum = min(sequence)
    maximum = max(sequence) - minimum
    norm = [0.0 for _ in sequence] if maximum == 0 else [(x - minimum) / maximum for x in sequence]
    splits = [n // parts * (x + 1) for x in range(parts - 1)] + [n]

    def block_size(i: int) -> float:
        start = splits[i - 1] if i > 0 else 0
        return sum(norm[start:splits[i]])

    def leaderboard() -> list[tuple[float, int]]:
        return [(block_size(i), i) for i in range(parts)]

    it = 0
    done = False
    while not done:
        max_size, p = max(leaderboard())
        while True:
            it += 1
            if it > max_iter:
                raise PartitionError(f"torchgpipe's blockpartition.solve did not stop after {max_iter} moves "
                                     f"on {n} weights into {parts} blocks; use fxpipe's own planner")
            min_size, q = min(leaderboard())
            if max_size <= min_size + 1:
                done = True
                break
            if p < q:
                h = q - 1
                splits[h] -= 1
            else:
                h = q + 1
                splits[q] += 1
            if p == h:
                break
    bounds = [0] + splits
    if any(bounds[i + 1] <= bounds[i] for i in range(parts)):
        raise PartitionError(f"torchgpipe's blockpartition.solve left a block empty (balance "
                             f"{[bounds[i + 1] - bounds[i] for i in range(parts)]}), which torchgpipe's "
                             "GPipe rejects; use fewer stages or fxpipe's own planner")
    out = [0] * n
    for i in range(parts):
        for j in range(bounds[i], bounds[i + 1]):
            out[j] = i
    return out


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
    t0 = time.perf_counter()
    _validate(num_stages, num_microbatches, schedule, memory_limit, optimizer_slots)
    gc = graph_costs(gm, cost_model)
    _check(gc, num_stages)
    units = _layers_for(gm, gc, num_stages, "uniform (DeepSpeed partition_uniform)")
    parts = partition_uniform(len(units), num_stages)
    return _layer_plan(gm, cost_model, gc, units, parts, "uniform", t0, num_stages=num_stages,
                       num_microbatches=num_microbatches, schedule=schedule, memory_limit=memory_limit,
                       optimizer_slots=optimizer_slots, recompute=recompute)


def _layer_plan(gm: torch.fx.GraphModule, cost_model: CostModel, gc: GraphCosts, units: Sequence[LayerUnit],
                parts: Sequence[int], solver: str, t0: float, **kw: Any) -> Plan:
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
    t0 = time.perf_counter()
    _validate(num_stages, num_microbatches, schedule, memory_limit, optimizer_slots)
    gc = graph_costs(gm, cost_model)
    _check(gc, num_stages)
    units = _layers_for(gm, gc, num_stages, "parameters (DeepSpeed partition_balanced)")
    parts = partition_balanced(_param_counts(gm, gc, units), num_stages)
    return _layer_plan(gm, cost_model, gc, units, parts, "parameters", t0, num_stages=num_stages,
                       num_microbatches=num_microbatches, schedule=schedule, memory_limit=memory_limit,
                       optimizer_slots=optimizer_slots, recompute=recompute)


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
    t0 = time.perf_counter()
    _validate(num_stages, num_microbatches, schedule, memory_limit, optimizer_slots)
    try:
        rx = re.compile(layer_type, re.IGNORECASE)
    except re.error as e:
        raise ConfigError(f"type:{layer_type!r} is not a valid regular expression ({e}); pass e.g. "
                          "'type:Block'") from e
    gc = graph_costs(gm, cost_model)
    _check(gc, num_stages)
    units = _layers_for(gm, gc, num_stages, f"type:{layer_type} (DeepSpeed partition_balanced)")
    weights = [1.0 if rx.search(u.type_name) else 0.0 for u in units]
    if not any(weights):
        names = sorted({u.type_name for u in units})
        raise ConfigError(f"partitioning 'type:{layer_type}' found no layer whose class matches; the layer "
                          f"classes are {names[:10]}{'...' if len(names) > 10 else ''}")
    parts = partition_balanced(weights, num_stages)
    return _layer_plan(gm, cost_model, gc, units, parts, f"type:{layer_type}", t0, num_stages=num_stages,
                       num_microbatches=num_microbatches, schedule=schedule, memory_limit=memory_limit,
                       optimizer_slots=optimizer_slots, recompute=recompute)


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
    t0 = time.perf_counter()
    _validate(num_stages, num_microbatches, schedule, memory_limit, optimizer_slots)
    gc = graph_costs(gm, cost_model)
    _check(gc, num_stages)
    units = _layers_for(gm, gc, num_stages, "time (torchgpipe balance_by_time)")
    weights = [sum(gc.fwd[v] + gc.bwd[v] for v in u.nodes) for u in units]
    blocks = block_partition(weights, num_stages)
    parts = [0] + [i + 1 for i in range(len(units) - 1) if blocks[i + 1] != blocks[i]] + [len(units)]
    return _layer_plan(gm, cost_model, gc, units, parts, "time", t0, num_stages=num_stages,
                       num_microbatches=num_microbatches, schedule=schedule, memory_limit=memory_limit,
                       optimizer_slots=optimizer_slots, recompute=recompute)


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
