"""Inputs to microbatches: bind a batch to the traced graph's placeholders and split it along dim 0.

    step(inputs, targets)                         (like torch.distributed.pipelining.microbatch)
        │ bind_inputs:  tensor | tuple | dict  ->  (args, kwargs)
        │ split_batch:  every tensor chunked along dim 0 into m equal parts
        ▼ flatten_for_graph: each microbatch in the graph's placeholder order, checked against the example
    [[x_0, mask_0], [x_1, mask_1], ...]           one flat list per microbatch
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Sequence

import torch
import torch.fx
import torch.utils._pytree as pytree

from fxpipe.errors import ConfigError, InputError

__all__ = ["bind_inputs", "split_batch", "forward_signature", "flatten_for_graph", "split_inputs", "split_targets",
           "META_CONSTANTS", "is_constant", "check_constants"]


def bind_inputs(model: torch.nn.Module, example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``example_inputs`` (a tensor, a tuple/list of positional inputs or a dict of keyword inputs) as (args, kwargs).

    Raises:
        ConfigError: anything else.
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ConfigError(f"example_inputs must be a tensor, a tuple of tensors or a dict of keyword "
                      f"tensors, got {type(example_inputs).__name__}")


META_CONSTANTS = "fxpipe.constant_inputs"   # gm.meta: keyword inputs traced in as constants, name -> value


def is_constant(value: Any) -> bool:
    """A keyword input the graph is specialised to rather than fed: None, bool, int, float or str."""
    return value is None or isinstance(value, (bool, int, float, str))


def check_constants(gm: torch.fx.GraphModule, inputs: Any) -> Any:
    """``inputs`` without the keyword constants the graph was traced with, each checked against its value.

    Raises:
        InputError: a constant given with another value than at compile time.
    """
    consts = gm.meta.get(META_CONSTANTS)
    if not consts or not isinstance(inputs, dict) or not inputs.keys() & consts.keys():
        return inputs
    for k in inputs.keys() & consts.keys():
        v, traced = inputs[k], consts[k]
        if type(v) is not type(traced) or v != traced:
            shown = f"a tensor of shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else \
                f"{v!r:.40} ({type(v).__name__})"
            raise InputError(f"input {k!r} is {shown}, but the graph was traced with {k}={traced!r}, fixed into "
                             f"it; pass {k}={traced!r} (or leave it out), or compile again with that value of "
                             f"{k} in example_inputs")
    return {k: v for k, v in inputs.items() if k not in consts}


def split_batch(values: Sequence[Any], num_microbatches: int, what: str) -> list[list[Any]]:
    """Split every tensor along dim 0 into ``num_microbatches`` equal parts.

    Returns:
        ``out[mb][i]`` is microbatch ``mb`` of ``values[i]``.

    Raises:
        InputError: a value is not a tensor, or its batch is not divisible.
    """
    per_value = []
    for i, v in enumerate(values):
        if not isinstance(v, torch.Tensor):
            raise InputError(f"{what}[{i}] is a {type(v).__name__}, not a tensor; fxpipe splits every "
                             "input into microbatches along dim 0, so inputs must be tensors "
                             "(fold constants into the model instead)")
        if v.dim() == 0 or v.shape[0] % num_microbatches != 0:
            raise InputError(f"{what}[{i}] has shape {tuple(v.shape)}: its batch dimension (dim 0) must be "
                             f"divisible by num_microbatches={num_microbatches}; use a batch size that is "
                             f"a multiple of {num_microbatches} or change num_microbatches")
        per_value.append(v.chunk(num_microbatches, dim=0) if v.shape[0] else [v] * num_microbatches)
    return [[pv[mb] for pv in per_value] for mb in range(num_microbatches)]


_SIGNATURES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[Any, inspect.Signature]]" = \
    weakref.WeakKeyDictionary()


def forward_signature(model: torch.nn.Module) -> inspect.Signature:
    """``inspect.signature(model.forward)``, computed once per model and forward (~40 us a call)."""
    fwd = model.forward
    func = getattr(fwd, "__func__", fwd)
    hit = _SIGNATURES.get(model)
    if hit is None or hit[0] is not func:
        hit = _SIGNATURES[model] = (func, inspect.signature(fwd))
    return hit[1]


def flatten_for_graph(gm: torch.fx.GraphModule, model: torch.nn.Module, args: tuple, kwargs: dict) -> list[Any]:
    """The values of ``model.forward(*args, **kwargs)``'s inputs in the order of ``gm``'s placeholders.

    Raises:
        InputError: an input the graph reads was not given, or the inputs do not bind to ``forward``.
    """
    placeholders = gm.graph.find_nodes(op="placeholder")
    if gm.meta.get("fxpipe.tracer") == "export":
        order = gm.meta.get("fxpipe.kwarg_names", list(kwargs))
        if set(order) != set(kwargs):
            raise InputError(f"keyword inputs {sorted(kwargs)} differ from the compiled ones {sorted(order)}")
        flat = pytree.tree_leaves((tuple(args), {k: kwargs[k] for k in order}))
        if len(flat) != len(placeholders):
            raise InputError(f"got {len(flat)} input tensors, the exported graph takes {len(placeholders)}")
        return flat
    try:
        bound = forward_signature(model).bind_partial(*args, **kwargs)
    except TypeError as e:
        raise InputError(f"inputs do not match {type(model).__name__}.forward: {e}") from e
    values = dict(bound.arguments)
    flat = []
    for p in placeholders:
        name = str(p.target).lstrip("*")
        if name not in values:
            raise InputError(f"input {name!r} of {type(model).__name__}.forward was not given; "
                             f"given: {sorted(values)}")
        flat.append(values[name])
    return flat


def split_inputs(gm: torch.fx.GraphModule, model: torch.nn.Module, inputs: Any, num_microbatches: int,
                 example: Sequence[torch.Tensor], input_names: Sequence[str]) -> list[list[Any]]:
    """A batch of ``inputs`` as ``num_microbatches`` flat microbatches, each checked against ``example``.

    Args:
        gm: the traced graph (its placeholders fix the order).
        model: the user's model (its ``forward`` signature binds keyword inputs).
        inputs: a batch as ``step`` receives it.
        num_microbatches: m.
        example: the compiled example microbatch (flat, placeholder order).
        input_names: placeholder names, for messages.

    Raises:
        InputError: a non-tensor input, a batch not divisible by m, or a shape/dtype the graph was not compiled for.
    """
    args, kwargs = bind_inputs(model, inputs)
    for i, v in enumerate(list(args) + list(kwargs.values())):
        if not isinstance(v, torch.Tensor):
            raise InputError(f"input {i} is a {type(v).__name__}, not a tensor; pass the same kind of "
                             "inputs as example_inputs")
    # bound to the graph's placeholders once per batch, then split (binding is ~30 us a call)
    flat = flatten_for_graph(gm, model, tuple(args), dict(kwargs))
    if len(flat) != len(example):
        raise InputError(f"got {len(flat)} inputs, compiled for {len(example)}")
    m = num_microbatches
    for i, (x, e) in enumerate(zip(flat, example)):
        if x.dim() == 0 or e.dim() == 0 or tuple(x.shape[1:]) != tuple(e.shape[1:]) or x.dtype != e.dtype \
                or x.shape[0] != e.shape[0] * m:
            raise InputError(
                f"input {input_names[i]!r}: the batch has shape {tuple(x.shape)} {x.dtype}, compiled for "
                f"{tuple(e.shape)} {e.dtype} per microbatch (batch {e.shape[0] * m if e.dim() else '?'} = {m} "
                f"microbatches of {e.shape[0] if e.dim() else '?'}); pass batches of the example's shape or "
                "compile again for the new shape")
    return split_batch(flat, m, "inputs")


def split_targets(targets: Any, num_microbatches: int, batch: int | None) -> list[Any]:
    """``targets`` (any pytree of tensors with ``batch`` rows) as ``num_microbatches`` pytrees of the same shape.

    Raises:
        InputError: no tensors, or a leaf whose dim 0 is not the inputs' batch size.
    """
    for i, t in enumerate(pytree.tree_leaves(targets)):
        if isinstance(t, torch.Tensor) and batch is not None and (t.dim() == 0 or t.shape[0] != batch):
            raise InputError(f"targets leaf {i} has shape {tuple(t.shape)}: its dim 0 must be the batch size "
                             f"{batch} of the inputs; pass one target row per input sample")
    leaves, spec = pytree.tree_flatten(targets)
    if not leaves:
        raise InputError("targets are empty; pass the targets loss_fn(output, targets) expects")
    per = split_batch(leaves, num_microbatches, "targets")
    return [pytree.tree_unflatten(mb, spec) for mb in per]
