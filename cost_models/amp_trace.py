"""One node's forward as CUDA autocast runs it: captured on fake CUDA tensors, replayed on CPU fakes.

Autograd cannot run on fake CUDA tensors without a GPU (it aborts the process), but the
forward can: the CUDA autocast kernels are part of every torch build. So the operation is
captured with ``make_fx`` on fake CUDA tensors under CUDA autocast (no grad), which records
the aten ops CUDA would run, autocast's casts included::

    F.layer_norm(x: bf16)   ->  _to_copy(x, float32), native_layer_norm      (CUDA fp32 list)
    F.softmax(s: bf16)      ->  _to_copy(s, float32), _softmax               (fp32 list, via dtype=)
    F.linear(x, w, b: f32)  ->  _to_copy(x), _to_copy(w), _to_copy(b), addmm (lower-precision list)

and that graph, its devices set to the CPU, is run on the node's CPU fake inputs with
autograd on, so ``saved_tensors_hooks`` sees what CUDA's autograd would save.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx
from torch._subclasses import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

__all__ = ["capture_cuda_autocast", "to_cpu_graph"]


def to_cpu_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` with every device argument (``device=cuda``) set to the CPU, recompiled in place."""
    cpu = torch.device("cpu")

    def fix(a: Any) -> Any:
        if isinstance(a, torch.device) and a.type != "cpu":
            return cpu
        return a

    for n in gm.graph.nodes:
        n.args = pytree.tree_map(fix, n.args)
        n.kwargs = pytree.tree_map(fix, n.kwargs)
    gm.recompile()
    return gm


def capture_cuda_autocast(op: Any, dtype: torch.dtype) -> Callable[[list[torch.Tensor]], Any] | None:
    """The forward of ``op`` (a :class:`~fxpipe.cost_models.op_trace.NodeOp`) as CUDA autocast runs it.

    Returns:
        A function of the flat tensors (the op's tensor inputs, then one per distinct parameter or
        buffer, in ``op.params`` order) returning the op's output; None when capturing fails (an op
        whose fake CUDA kernel needs a GPU, e.g. attention kernel selection): the caller falls
        back to the CPU's autocast.
    """
    from fxpipe.passes.shape_prop import autocast_context

    groups: list[int] = []
    for _, _, g in op.params:
        if g not in groups:
            groups.append(g)
    specs = [op.leaves[p] for p in op.tensor_pos]
    specs += [next(s for _, s, g2 in op.params if g2 == g) for g in groups]
    k = len(op.tensor_pos)

    def f(*ts: torch.Tensor) -> Any:
        leaves = list(op.leaves)
        for pos, t in zip(op.tensor_pos, ts[:k]):
            leaves[pos] = t
        args, kwargs = pytree.tree_unflatten(leaves, op.spec)
        if op.module is not None:
            state = {name: ts[k + groups.index(g)] for name, _, g in op.params}
            return torch.func.functional_call(op.module, state, tuple(args), kwargs, tie_weights=True,
                                              strict=False)
        return op.call(*args, **kwargs)

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with mode:
            cuda = [torch.empty_strided(s.shape, s.stride, dtype=s.dtype, device="cuda") for s in specs]
        with autocast_context("cuda", dtype), torch.no_grad():
            gm = make_fx(f)(*cuda)
        gm = to_cpu_graph(gm)
    except Exception:  # noqa: BLE001 - a fake CUDA kernel that needs a real GPU
        return None
    return lambda flat: gm(*flat)
