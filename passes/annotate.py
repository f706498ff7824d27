"""Annotate every node with its NodeCost and the canonical parameters it reads (tied parameters once)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.fx

from fxpipe.errors import ConfigError, CostModelError, FxpipeError
from fxpipe.ir import META_COST, META_PARAM_BYTES, META_PARAMS, META_VAL, CostModel, NodeCost
from fxpipe.trace_fixes import META_NO_GRAD

__all__ = ["annotate", "resolve_cost_model", "canonical_parameters", "COST_MODELS"]

COST_MODELS = ("analytic", "profile")


def resolve_cost_model(spec: str | CostModel | None, device: Any = None, precision: str = "fp32") -> CostModel:
    """Turn the ``cost_model`` argument of compile/plan into a CostModel.

    Args:
        spec: ``"analytic"`` (roofline on fake tensors, the default for None),
            ``"profile"`` (measured on this machine), or an object with
            ``node_cost(node)`` and ``comm_time(nbytes)``.
        device: DeviceSpec, preset name or None, for the built-in models.
        precision: "fp32" | "bf16" | "fp16" for the analytic model (FLOP rate of the compute
            dtype, activation bytes as ``torch.autocast`` makes them); the profiled model measures
            the model as it is.

    Returns:
        A CostModel.

    Raises:
        ConfigError: unknown name, or an object missing ``node_cost``/``comm_time``.
    """
    if spec is None or isinstance(spec, str):
        name = (spec or "analytic").strip().lower()
        if name == "analytic":
            from fxpipe.cost_models.analytic import AnalyticCostModel

            return AnalyticCostModel(device, precision=precision)
        if name in ("profile", "profiled"):
            from fxpipe.cost_models.profiled import ProfiledCostModel

            return ProfiledCostModel(device)
        raise ConfigError(f"unknown cost_model {spec!r}; choose one of {list(COST_MODELS)} or pass an "
                          "object with node_cost(node) -> NodeCost and comm_time(nbytes) -> seconds")
    missing = [m for m in ("node_cost", "comm_time") if not callable(getattr(spec, m, None))]
    if missing:
        raise ConfigError(f"cost_model {type(spec).__name__} has no callable {' or '.join(missing)}; a cost "
                          "model needs node_cost(node) -> NodeCost and comm_time(nbytes) -> seconds, or pass "
                          f"one of {list(COST_MODELS)}")
    return spec  # type: ignore[return-value]


def canonical_parameters(gm: torch.nn.Module) -> tuple[dict[int, str], dict[str, int]]:
    """Canonical names of parameters: a tied parameter keeps its first name in ``named_parameters()``.

    Returns:
        ``(id(parameter) -> canonical name, canonical name -> bytes)``.
    """
    names: dict[int, str] = {}
    sizes: dict[str, int] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        if id(p) not in names:
            names[id(p)] = name
            sizes[name] = int(p.numel() * p.element_size())
    return names, sizes


def _params_read(node: torch.fx.Node, gm: torch.nn.Module, canon: dict[int, str]) -> tuple[str, ...]:
    found: list[str] = []
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        found += [canon[id(p)] for _, p in mod.named_parameters(remove_duplicate=False) if id(p) in canon]
    elif node.op == "get_attr":
        obj = _attr(gm, str(node.target))
        if isinstance(obj, torch.nn.Parameter) and id(obj) in canon:
            found.append(canon[id(obj)])
    if node.op in ("call_module", "call_function", "call_method"):
        for a in node.all_input_nodes:
            if a.op == "get_attr":
                obj = _attr(gm, str(a.target))
                if isinstance(obj, torch.nn.Parameter) and id(obj) in canon:
                    found.append(canon[id(obj)])
    return tuple(dict.fromkeys(found))


def _attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _check(cost: Any, node: torch.fx.Node, cost_model: Any) -> NodeCost:
    if not isinstance(cost, NodeCost):
        raise CostModelError(f"annotate: {type(cost_model).__name__}.node_cost returned "
                             f"{type(cost).__name__} ({cost!r}) for node {node.format_node()}; it must return "
                             "fxpipe.ir.NodeCost")
    for f in dataclasses.fields(cost):
        v = getattr(cost, f.name)
        if not isinstance(v, (int, float)) or math.isnan(v) or v < 0 or math.isinf(v):
            raise CostModelError(f"annotate: {type(cost_model).__name__} gave node {node.format_node()} "
                                 f"{f.name}={v!r}; costs must be finite numbers >= 0. Fix the cost model")
    return cost


def _state_bytes_read(node: torch.fx.Node, gm: torch.nn.Module) -> int:
    """Real bytes of the buffers (tensor attributes that are not parameters) ``node`` reads via get_attr."""
    total = 0
    for a in node.all_input_nodes:
        if a.op == "get_attr":
            obj = _attr(gm, str(a.target))
            if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter):
                total += int(obj.numel() * obj.element_size())
    return total


def _price(table: dict[str, int], sizes: dict[str, int], read: tuple[str, ...], new: list[str],
           priced: float, buffers: int) -> None:
    """Bytes of the parameters ``new`` (first read here) from the cost model's figure ``priced``
    for all the parameters ``read`` (and ``buffers`` bytes of buffers, which the built-in models
    count too): each gets its share by real size, rounded so that the shares add up."""
    real = sum(sizes[p] for p in read) + buffers
    if real <= 0:
        return
    scale = priced / real
    done = sum(sizes[p] for p in read if p not in new)   # shares of parameters priced at earlier users
    acc = done
    for p in new:
        lo = round(acc * scale)
        acc += sizes[p]
        table[p] = int(round(acc * scale) - lo)


def annotate(gm: torch.fx.GraphModule, cost_model: str | CostModel = "analytic") -> torch.fx.GraphModule:
    """Set ``node.meta["fxpipe.cost"]`` and ``node.meta["fxpipe.params"]`` on every node.

    Parameters are named canonically: a parameter reachable under several names
    (TinyGPT's ``wte.weight`` is ``lm_head.weight``) is known by the first name
    in ``gm.named_parameters()`` order, appears once in ``gm.meta["fxpipe.param_bytes"]``,
    and its bytes count in ``NodeCost.param_bytes`` of its first user in graph
    order only (the planner charges it to every stage that reads it).

    Parameter bytes are the cost model's: a node's ``NodeCost.param_bytes > 0``
    prices all the parameters it reads (another dtype, or a small model standing
    for a big one), shared among them by real size; a parameter takes its price
    from its first user. ``param_bytes == 0`` means "not priced": the real bytes
    are kept. The figure covers the buffers the node reads as well (as the
    built-in models count them), so the built-in models keep the real bytes.
    Example: a cost model that says bf16 (half of fp32) for ``fc`` with a 4 KiB
    weight and 64 B bias gives them 2 KiB and 32 B. Placeholders cost nothing but carry ``output_bytes`` (the input's
    size); get_attr and output nodes cost nothing.

    Args:
        gm: a graph after :func:`fxpipe.passes.shape_prop.shape_prop`.
        cost_model: a CostModel, or ``"analytic"`` / ``"profile"`` (on this machine).

    Returns:
        ``gm`` (node.meta and gm.meta updated in place).

    Raises:
        ConfigError: shape_prop has not run, or ``cost_model`` is not a cost model.
        CostModelError: the cost model failed on a node, returned something that is
            not a NodeCost, or a negative, NaN or infinite value; names node and model.
    """
    cm = resolve_cost_model(cost_model)
    missing = [n for n in gm.graph.nodes if n.op not in ("output", "get_attr") and META_VAL not in n.meta]
    if missing:
        raise ConfigError(f"annotate: {len(missing)} node(s) have no node.meta[{META_VAL!r}], first "
                          f"{missing[0].format_node()}; run fxpipe.passes.shape_prop.shape_prop(gm, "
                          "*example_inputs) before annotate")
    canon, sizes = canonical_parameters(gm)
    table = dict(sizes)          # canonical parameter -> bytes, as the cost model prices them
    first_user: set[str] = set()
    for node in gm.graph.nodes:
        params = _params_read(node, gm, canon)
        node.meta[META_PARAMS] = params
        if node.op in ("output", "get_attr"):
            node.meta[META_COST] = NodeCost()
            continue
        if node.op == "placeholder":
            val = node.meta.get(META_VAL)
            nbytes = sum(int(t.numel() * t.element_size()) for t in torch.utils._pytree.tree_leaves(val)
                         if isinstance(t, torch.Tensor))
            node.meta[META_COST] = NodeCost(output_bytes=nbytes)
            continue
        try:
            cost = cm.node_cost(node)
        except FxpipeError as e:
            if node.name in str(e):
                raise
            raise CostModelError(f"annotate: {cm!r} failed on node {node.format_node()}: {e}") from e
        except Exception as e:  # noqa: BLE001 - a user cost model may raise anything
            raise CostModelError(f"annotate: {cm!r} failed on node {node.format_node()}: "
                                 f"{type(e).__name__}: {e}; fix the cost model or the graph") from e
        cost = _check(cost, node, cm)
        if node.meta.get(META_NO_GRAD):    # torch.no_grad region: backward never reaches it, it saves nothing
            cost = dataclasses.replace(cost, bwd_time=0.0, activation_bytes=0)
        mine = [p for p in params if p not in first_user]
        first_user.update(mine)
        if cost.param_bytes > 0 and mine:
            _price(table, sizes, params, mine, float(cost.param_bytes), _state_bytes_read(node, gm))
        node.meta[META_COST] = dataclasses.replace(cost, param_bytes=sum(table[p] for p in mine))
    gm.meta[META_PARAM_BYTES] = table
    return gm
