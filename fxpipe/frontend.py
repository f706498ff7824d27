"""The compiler's front half: one microbatch traced, shape-propagated, specialised and annotated (CompiledGraph)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx
import torch.utils._pytree as pytree

from fxpipe.errors import ConfigError, InputError
from fxpipe.ir import CostModel
from fxpipe.runtime.microbatch import bind_inputs, flatten_for_graph, forward_signature, is_constant, split_batch

__all__ = ["CompiledGraph", "prepare", "price_loss", "batch_size", "resize_batch", "constant_inputs"]


@dataclass
class CompiledGraph:
    """What the front half of the compiler produced: the annotated graph and how inputs bind to it."""

    gm: torch.fx.GraphModule
    cost_model: CostModel
    input_names: list[str]              # placeholder names, in order
    microbatch_inputs: list[Any]        # one example microbatch, flat, placeholder order
    batch_size: int                     # the example batch's size along dim 0
    trace_seconds: float
    annotate_seconds: float


def prepare(model: torch.nn.Module, example_inputs: Any, *, num_microbatches: int,
            cost_model: str | CostModel = "analytic", device: Any = None,
            leaf_modules: Iterable[type | str] = (), precision: str = "fp32") -> CompiledGraph:
    """Trace, shape-propagate (fake tensors), specialise shapes, annotate costs and mark local values.

    The graph is traced for ONE microbatch: ``example_inputs`` is a whole batch as
    ``step`` will receive it, split into ``num_microbatches`` along dim 0.

    Raises:
        InputError: the batch does not split into ``num_microbatches``; TraceError, CostModelError.
    """
    from fxpipe.passes.annotate import annotate, resolve_cost_model
    from fxpipe.passes.local_values import mark_local
    from fxpipe.passes.shape_prop import shape_prop
    from fxpipe.passes.specialize import specialize_shapes
    from fxpipe.trace import trace

    args, kwargs = bind_inputs(model, example_inputs)
    constants = constant_inputs(model, kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in constants}
    names = [f"arg{i}" for i in range(len(args))] + list(kwargs)
    _check_tensor_inputs(names, list(args) + list(kwargs.values()))
    flat_given = list(args) + list(kwargs.values())
    mbs = split_batch(flat_given, num_microbatches, "example_inputs")
    # a microbatch of its own (not a view of the batch): what autograd saves of an input is then charged
    # at the microbatch's size, not at the size of the whole batch's storage
    mb0 = [v.clone() if isinstance(v, torch.Tensor) and num_microbatches > 1 else v for v in mbs[0]]
    mb_args = tuple(mb0[: len(args)])
    mb_kwargs = dict(zip(names[len(args):], mb0[len(args):]))
    t0 = time.perf_counter()
    gm = trace(model, mb_args, {**mb_kwargs, **constants}, leaf_modules=leaf_modules)
    flat = flatten_for_graph(gm, model, mb_args, mb_kwargs)
    shape_prop(gm, *flat)
    specialize_shapes(gm)
    t1 = time.perf_counter()
    cm = resolve_cost_model(cost_model, device, precision)
    annotate(gm, cm)
    mark_local(gm)          # values every stage computes itself: planner and split read the flag
    t2 = time.perf_counter()
    return CompiledGraph(gm=gm, cost_model=cm, input_names=[str(n.target) for n in gm.graph.nodes if n.op == "placeholder"],
                         microbatch_inputs=flat, batch_size=int(flat_given[0].shape[0]) if flat_given else 0,
                         trace_seconds=t1 - t0, annotate_seconds=t2 - t1)


def _check_tensor_inputs(names: list[str], values: list[Any]) -> None:
    """Every example input left after the keyword constants must be a tensor, split into microbatches.

    Raises:
        InputError: naming the input, its value and the ways out.
    """
    for name, v in zip(names, values):
        if not isinstance(v, torch.Tensor):
            how = ("pass it by keyword (forward(x, flag=True): a keyword None, bool, int, float or str is fixed "
                   "into the graph) or leave it out" if name.startswith("arg") and is_constant(v) else
                   "leave it out")
            raise InputError(
                f"example input {name!r} is {v!r:.40} ({type(v).__name__}), not a tensor: fxpipe cuts every input "
                f"into microbatches along dim 0, so inputs are tensors, or keyword constants. {how.capitalize()}, "
                "and set it where the model reads it (its config, e.g. model.config.output_hidden_states = True)")


def constant_inputs(model: torch.nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword inputs that are constants (None, bool, int, float, str): traced into the graph as given.

    ``use_cache=False``, ``return_loss=True``, ``output_hidden_states=True``: the graph is specialised to the
    value, and ``step`` accepts the same value again (or none) and refuses another (``check_constants``).

    Raises:
        InputError: a constant names no parameter of ``forward``.
    """
    consts = {k: v for k, v in kwargs.items() if is_constant(v)}
    if not consts:
        return {}
    try:
        params = forward_signature(model).parameters
    except (TypeError, ValueError):
        return consts
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return consts
    unknown = sorted(set(consts) - set(params))
    if unknown:
        raise InputError(f"example inputs {unknown} are not parameters of {type(model).__name__}.forward "
                         f"(it takes {list(params)}); leave them out or set them where the model reads them")
    return consts


def price_loss(cg: CompiledGraph, loss_fn: Callable[..., Any], example_targets: Any, num_microbatches: int) -> None:
    """Price loss_fn on one microbatch of ``example_targets`` (gm.meta["fxpipe.loss"])."""
    from fxpipe.passes.loss_cost import price_loss as _price

    flat, spec = pytree.tree_flatten(example_targets)
    tensors = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
    mb = split_batch([flat[i] for i in tensors], num_microbatches, "example_targets")[0]
    one = list(flat)
    for i, v in zip(tensors, mb):
        one[i] = v
    _price(cg.gm, cg.cost_model, loss_fn, pytree.tree_unflatten(one, spec))


def batch_size(example_inputs: Any) -> int:
    """dim-0 size of the first tensor in ``example_inputs``.

    Raises:
        ConfigError: no tensor with a batch dimension (the search then needs global_batch=B).
    """
    for v in pytree.tree_leaves(example_inputs):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ConfigError("num_stages=None needs a tensor input with a batch dimension (dim 0) or "
                      "global_batch=B")


def resize_batch(example_inputs: Any, b: int) -> Any:
    """Every tensor of ``example_inputs`` sliced (or repeated) to size ``b`` along dim 0."""
    def one(v: Any) -> Any:
        if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] == b:
            return v
        n = int(v.shape[0])
        if n >= b:
            return v[:b]
        if n == 0:
            raise ConfigError("example_inputs has an empty batch; give at least one sample")
        return torch.cat([v] * (-(-b // n)), dim=0)[:b]

    if isinstance(example_inputs, torch.Tensor):
        return one(example_inputs)
    if isinstance(example_inputs, dict):
        return {k: one(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(one(v) for v in example_inputs)
    return example_inputs
