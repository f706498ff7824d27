"""Price ``loss_fn(model_output, targets)`` for the last stage: traced on meta tensors, priced by the cost model.

The model's output object is rebuilt from the graph's output values (shapes and
dtypes only), the loss is traced with ``make_fx`` into a graph of aten ops, and
that graph goes through the same shape propagation and ``annotate`` as the model,
so the analytic or profiled cost model prices it like any other node (under bf16/fp16 the
output has autocast's dtypes and the loss is traced under autocast, its casts in the graph)::

    logits (16, 50257) fp32, targets (16,)  ->  _log_softmax, nll_loss_forward
    fwd + bwd time of those nodes, activation bytes = the log-softmax output autograd saves

The result, a :class:`~fxpipe.ir.LossCost`, is stored in ``gm.meta["fxpipe.loss"]``;
the planner adds it to the last stage's F, B and A through the evaluator.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._subclasses import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from fxpipe.cost_models.amp_trace import to_cpu_graph
from fxpipe.errors import ConfigError
from fxpipe.ir import META_COST, META_LOSS, META_PARAM_BYTES, META_VAL, CostModel, LossCost, NodeCost

from .coarsen import COMPUTE_OPS
from .shape_prop import META_AMP_VAL, autocast_context

__all__ = ["example_output", "trace_loss", "price_loss"]


def _meta_like(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        t = torch.empty(tuple(v.shape), dtype=v.dtype, device="meta")
        return t.requires_grad_(True) if t.dtype.is_floating_point or t.dtype.is_complex else t
    return v


def example_output(gm: torch.fx.GraphModule, key: str = META_VAL) -> Any:
    """The model's output object for one microbatch, as meta tensors (from the graph's output values;
    ``key="fxpipe.amp_val"``: with the dtypes autocast gives them)."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    leaves, spec = pytree.tree_flatten(out_node.args[0])
    out_spec = getattr(gm, "_out_spec", None)     # torch.export: the graph returns flat leaves
    if out_spec is not None and out_spec.num_leaves == len(leaves):
        spec = out_spec
    vals = []
    for leaf in leaves:
        if isinstance(leaf, torch.fx.Node):
            v = leaf.meta.get(key, leaf.meta.get(META_VAL))
            if v is None:
                raise ConfigError(f"example_targets: the model output {leaf.name} has no shape; run "
                                  "shape propagation first (fxpipe.compile/plan do)")
            vals.append(_meta_like(v))
        else:
            vals.append(leaf)
    return pytree.tree_unflatten(vals, spec)


def trace_loss(gm: torch.fx.GraphModule, loss_fn: Callable[..., Any], targets: Any,
               autocast: tuple[str, torch.dtype] | None = None) -> tuple[torch.fx.GraphModule, list[Any]]:
    """``loss_fn(output, targets)`` as a graph of aten ops, and its flat meta inputs.

    ``autocast=(device_type, dtype)``: the model's output has the dtypes autocast gives it, and the
    loss is traced under ``torch.autocast`` (on fake tensors of that device), so the graph holds
    autocast's casts (CPU's cross_entropy casts bf16 logits to float32 before its log-softmax).

    Raises:
        ConfigError: ``loss_fn`` fails on the model's output and the targets, or does not
            return a scalar tensor.
    """
    out = example_output(gm, META_AMP_VAL if autocast else META_VAL)
    out_flat, out_spec = pytree.tree_flatten(out)
    tgt_flat, tgt_spec = pytree.tree_flatten(targets)
    tgt_meta = [_meta_like(t) if isinstance(t, torch.Tensor) else t for t in tgt_flat]
    tgt_meta = [t.detach() if isinstance(t, torch.Tensor) else t for t in tgt_meta]
    k = len(out_flat)

    def f(*flat: Any) -> Any:
        loss = loss_fn(pytree.tree_unflatten(list(flat[:k]), out_spec),
                       pytree.tree_unflatten(list(flat[k:]), tgt_spec))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ConfigError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                              + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
        return loss

    flat = out_flat + tgt_meta
    run, amp = flat, contextlib.nullcontext()
    if autocast is not None:      # autocast acts on tensors of its device (not meta); no grad: fake CUDA
        mode, dev = FakeTensorMode(), torch.device(autocast[0])          # tensors cannot run autograd

        def fake(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            with mode:
                return torch.empty(tuple(t.shape), dtype=t.dtype, device=dev)

        run, amp = [fake(t) for t in flat], autocast_context(*autocast)
    try:
        with amp, (torch.no_grad() if autocast is not None else contextlib.nullcontext()):
            lg = make_fx(f)(*run)
        if autocast is not None:
            lg = to_cpu_graph(lg)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - user code
        raise ConfigError(f"example_targets: loss_fn(model_output, targets) failed while tracing it on "
                          f"meta tensors ({type(e).__name__}: {e}); pass targets shaped like one batch "
                          "(split into microbatches along dim 0 like the inputs) or leave "
                          "example_targets=None") from e
    return lg, flat


def price_loss(gm: torch.fx.GraphModule, cost_model: CostModel, loss_fn: Callable[..., Any],
               targets: Any) -> LossCost:
    """Trace and price ``loss_fn`` on one microbatch of ``targets``; stored in ``gm.meta["fxpipe.loss"]``."""
    from .annotate import annotate
    from .shape_prop import shape_prop

    lg, flat = trace_loss(gm, loss_fn, targets, getattr(cost_model, "autocast_rules", None))
    lg.meta[META_PARAM_BYTES] = {}
    shape_prop(lg, *flat)
    annotate(lg, cost_model)
    costs = [n.meta.get(META_COST) or NodeCost() for n in lg.graph.nodes if n.op in COMPUTE_OPS]
    loss = LossCost(fwd_time=sum(c.fwd_time for c in costs), bwd_time=sum(c.bwd_time for c in costs),
                    activation_bytes=sum(int(c.activation_bytes) for c in costs),
                    fwd_flops=sum(c.fwd_flops for c in costs), nodes=len(costs))
    gm.meta[META_LOSS] = loss
    return loss
