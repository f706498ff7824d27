"""Hand fxpipe's stages to ``torch.distributed.pipelining`` so PyTorch's own schedules can run them.

PyTorch's pipelining needs a linear chain: stage ``s`` receives only what stage
``s - 1`` returns, and only stage 0 sees the model inputs.  fxpipe's stages can
read model inputs and outputs of any earlier stage (skip connections), so each
stage is wrapped to pass through what later stages need::

    fxpipe:   x ─▶ S0 ─h0─▶ S1 ─▶ S2          S2 also reads h0 (skip 0 → 2)
                    └────── h0 ──────┘
    chain:    (x) ─▶ [S0] ─(h1, h0)─▶ [S1 + pass h0] ─(h2, h0)─▶ [S2]

Restriction: a parameter read by two stages (tied embeddings) would become two
independent copies there, with nothing summing their gradients; that raises
:class:`fxpipe.errors.ConfigError` — use ``executor="distributed"`` for tied models.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from fxpipe.errors import ConfigError, DistributedError
from fxpipe.ir import PipelineProgram
from fxpipe.runtime.stage import get_attr as _get_attr, stage_params

__all__ = ["ChainStage", "chain_stages", "to_torch_pipelining"]

Key = tuple  # ("input", i) or ("stage", p, k)


class ChainStage(torch.nn.Module):
    """Stage ``index`` of a linear chain: takes ``carried_in`` positionally, returns ``carried_out``.

    The last stage returns the model output instead.  ``canonical`` maps this
    module's parameter names to the original model's names.
    """

    def __init__(self, program: PipelineProgram, index: int, carried_in: list[Key], carried_out: list[Key] | None,
                 canonical: dict[int, str]) -> None:
        super().__init__()
        st = program.stages[index]
        self.index = index
        self.program = program
        self.stage = st.module
        self.carried_in = carried_in
        self.carried_out = carried_out
        self._attr_names: dict[str, str] = {}
        for i, src in enumerate(st.sources):
            if src.kind == "attr" and src.name not in self._attr_names:
                obj = _get_attr(program.root, src.name)
                local = f"attr_{i}"
                if isinstance(obj, torch.nn.Parameter):
                    self.register_parameter(local, obj)
                else:
                    self.register_buffer(local, obj)
                self._attr_names[src.name] = local
        self.canonical = {n: canonical[id(p)] for n, p in self.named_parameters(remove_duplicate=False)
                          if id(p) in canonical}

    def forward(self, *xs: Any) -> Any:
        env: dict[Key, Any] = dict(zip(self.carried_in, xs))
        st = self.program.stages[self.index]
        args = []
        for src in st.sources:
            if src.kind == "input":
                args.append(env[("input", src.index)])
            elif src.kind == "attr":
                args.append(getattr(self, self._attr_names[src.name]))
            elif src.kind == "stage":
                args.append(env[("stage", src.stage, src.index)])
            else:
                args.append(src.value)
        out = self.stage(*args)
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        for k, o in enumerate(outs):
            env[("stage", self.index, k)] = o
        if self.carried_out is None:   # last stage: the model output
            leaves = [env[("stage", s.stage, s.index)] if s.kind == "stage" else env[("input", s.index)]
                      for s in self.program.output_sources]
            return pytree.tree_unflatten(leaves, self.program.output_spec)
        passed = tuple(env[k] if k[0] == "stage" and k[1] == self.index else env[k].view_as(env[k])
                       for k in self.carried_out)
        return passed if len(passed) != 1 else passed[0]


def chain_stages(program: PipelineProgram, canonical: dict[int, str]) -> list[ChainStage]:
    """Wrap every stage so the pipeline is a linear chain (see the module docstring).

    Raises:
        ConfigError: a parameter is read by more than one stage (tied weights).
    """
    names = stage_params(program, canonical)
    users: dict[str, list[int]] = {}
    for s, ns in enumerate(names):
        for c in set(ns.values()):
            users.setdefault(c, []).append(s)
    tied = {c: u for c, u in users.items() if len(u) > 1}
    if tied:
        c, u = next(iter(tied.items()))
        raise ConfigError(f"to_torch_pipelining: parameter {c!r} is read by stages {u} (tied weights); "
                          "torch.distributed.pipelining would train independent copies of it. Use "
                          "executor='distributed' (it sums tied gradients), or untie the weights")
    d = program.num_stages
    needed_after: list[set[Key]] = [set() for _ in range(d)]   # keys read by stages > s (or the output)
    for st in program.stages:
        for src in st.sources:
            key = ("input", src.index) if src.kind == "input" else ("stage", src.stage, src.index) \
                if src.kind == "stage" else None
            if key is not None:
                for s in range(st.index):
                    needed_after[s].add(key)
    for src in program.output_sources:
        if src.kind in ("input", "stage"):
            key = ("input", src.index) if src.kind == "input" else ("stage", src.stage, src.index)
            for s in range(d - 1):
                needed_after[s].add(key)
    n_inputs = len(program.input_names)
    carried_in: list[Key] = [("input", i) for i in range(n_inputs)]
    out = []
    for s in range(d):
        available = set(carried_in) | {("stage", s, k) for k in range(program.stages[s].num_outputs)}
        carried_out = None if s == d - 1 else sorted(k for k in needed_after[s] if k in available)
        out.append(ChainStage(program, s, carried_in, carried_out, canonical))
        carried_in = carried_out or []
    return out


def to_torch_pipelining(pipe: Any, group: Any = None) -> Any:
    """This rank's stage of ``pipe`` as a ``torch.distributed.pipelining.PipelineStage``.

    Run one rank per stage (stage index = rank in ``group``), then drive it with any of
    PyTorch's schedules; the optimizer over ``stage.submod.parameters()`` is yours::

        stage = pipe.to_torch_pipelining()
        sched = ScheduleGPipe(stage, n_microbatches=m, loss_fn=loss_fn)   # or Schedule1F1B
        sched.step(x) on rank 0, sched.step(target=y, losses=losses) on the last rank

    Returns:
        A PipelineStage whose ``submod`` is a :class:`ChainStage`.

    Raises:
        DistributedError: no process group, or its size is not the number of stages.
        ConfigError: tied weights (see :func:`chain_stages`).
    """
    from torch.distributed.pipelining import PipelineStage

    if not dist.is_initialized():
        raise DistributedError("to_torch_pipelining needs an initialised process group: launch with torchrun "
                               "and compile with executor='distributed' (or call init_process_group first)")
    d = pipe.plan.num_stages
    size = dist.get_world_size(group)
    if size != d:
        raise DistributedError(f"to_torch_pipelining runs one rank per stage: the group has {size} ranks and the "
                               f"plan {d} stages; launch {d} processes or pass group= with {d} ranks")
    index = dist.get_rank(group)
    canonical = {id(p): n for n, p in pipe._params.items()}
    chain = chain_stages(pipe.program, canonical)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")
    # static (contiguous) example tensors, so PyTorch needs no shape inference round
    st = chain[index]
    ins = tuple(_example(pipe, k, device, grad=index > 0) for k in st.carried_in)
    if st.carried_out is None:
        outs: Any = pytree.tree_unflatten(
            [_example(pipe, ("stage", s.stage, s.index) if s.kind == "stage" else ("input", s.index), device)
             for s in pipe.program.output_sources], pipe.program.output_spec)
    else:
        outs = tuple(_example(pipe, k, device, grad=True) for k in st.carried_out)
        outs = outs if len(outs) != 1 else outs[0]
    return PipelineStage(st.to(device), index, d, device, input_args=ins, output_args=outs, group=group)


def _example(pipe: Any, key: Key, device: torch.device, grad: bool = False) -> torch.Tensor:
    """A zero tensor shaped like value ``key`` of one microbatch (from the trace's node.meta["val"]).

    ``grad``: floating tensors require grad (PyTorch then sends their gradients back).
    """
    if key[0] == "input":
        x = pipe._example[key[1]]
        t = torch.zeros(x.shape, dtype=x.dtype, device=device)
        return t.requires_grad_(grad and t.is_floating_point())
    out = next(n for n in pipe.program.stages[key[1]].module.graph.nodes if n.op == "output").args[0]
    node = (out if isinstance(out, (tuple, list)) else (out,))[key[2]]
    val = node.meta.get("val")
    if val is None:
        raise ConfigError(f"to_torch_pipelining: output {key[2]} of stage {key[1]} has no static shape in "
                          "node.meta['val']; run shape propagation (fxpipe.compile does)")
    t = torch.zeros(val.shape, dtype=val.dtype, device=device)
    return t.requires_grad_(grad and t.is_floating_point())
