"""The public entry points: ``plan`` and ``plan_with_graph`` (plan only), ``compile`` (plan, split, executor)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.fx

from fxpipe.errors import ConfigError
from fxpipe.frontend import CompiledGraph, prepare
from fxpipe.ir import CostModel, Plan
from fxpipe.options import (DEVICE_MEMORY, OptimizerFactory, _DeviceMemory, check_input_dtypes, check_loss_fn,
                            check_plan_options, check_replan_after, read_plan, resolve_memory_limit)
from fxpipe.planning import plan_graph
from fxpipe.runtime.microbatch import split_batch

if TYPE_CHECKING:
    from fxpipe.pipeline import Pipeline

__all__ = ["compile", "plan", "plan_with_graph", "PlannedGraph", "CompiledGraph", "prepare", "split_batch",
           "DEVICE_MEMORY", "resolve_memory_limit"]


@dataclass(frozen=True)
class PlannedGraph:
    """A Plan and the annotated graph it was cut from (what :func:`plan_with_graph` returns).

    Draw it with :mod:`fxpipe.render`: ``to_dot(r.plan, graph_edges(r.gm), node_labels(r.gm))``.
    """

    plan: Plan
    graph: CompiledGraph    # the traced microbatch graph, its cost model and how inputs bind to it

    @property
    def gm(self) -> torch.fx.GraphModule:
        """The traced graph: every node has ``meta["val"]`` (shapes, dtypes) and ``meta["fxpipe.cost"]``."""
        return self.graph.gm

    @property
    def cost_model(self) -> CostModel:
        """The cost model that priced ``gm`` (the one the plan's figures come from)."""
        return self.graph.cost_model


def plan(model: torch.nn.Module, example_inputs: Any, *, num_stages: int | None = 4,
         num_microbatches: int = 8, schedule: str = "2bw", loss_fn: Callable | None = None,
         optimizer: OptimizerFactory | None = None, cost_model: str | CostModel = "analytic",
         memory_limit: int | str | None | _DeviceMemory = DEVICE_MEMORY, device: Any = None, executor: str = "auto",
         num_devices: int | None = None, global_batch: int | None = None,
         leaf_modules: Iterable[type | str] = (), recompute: bool | None = None,
         time_limit: float = 10.0, precision: str = "fp32", devices_per_node: int | None = None,
         example_targets: Any = None) -> Plan:
    """Plan a pipeline without building it (works on meta-device models).

    Takes the same arguments as :func:`compile`; ``loss_fn`` is used only with ``example_targets``
    (then the loss is priced on the last stage). With ``executor="local"``
    (the default "auto" outside torchrun), ``device=None`` and a named cost model, a transfer between
    stages is priced as a hand-over by reference in one process (a few microseconds).

    Returns:
        The Plan: stages, per-stage predicted time and memory, recompute flags, cut edges.

    Raises:
        ConfigError, ScheduleError, TraceError, InfeasibleMemoryError (all FxpipeError).
    """
    return plan_with_graph(model, example_inputs, num_stages=num_stages, num_microbatches=num_microbatches,
                           schedule=schedule, loss_fn=loss_fn, optimizer=optimizer, cost_model=cost_model,
                           memory_limit=memory_limit, device=device, executor=executor, num_devices=num_devices,
                           global_batch=global_batch, leaf_modules=leaf_modules, recompute=recompute,
                           time_limit=time_limit, precision=precision, devices_per_node=devices_per_node,
                           example_targets=example_targets).plan


def plan_with_graph(model: torch.nn.Module, example_inputs: Any, *, num_stages: int | None = 4,
                    num_microbatches: int = 8, schedule: str = "2bw", loss_fn: Callable | None = None,
                    optimizer: OptimizerFactory | None = None, cost_model: str | CostModel = "analytic",
                    memory_limit: int | str | None | _DeviceMemory = DEVICE_MEMORY, device: Any = None,
                    executor: str = "auto", num_devices: int | None = None, global_batch: int | None = None,
                    leaf_modules: Iterable[type | str] = (), recompute: bool | None = None,
                    time_limit: float = 10.0, precision: str = "fp32", devices_per_node: int | None = None,
                    example_targets: Any = None) -> PlannedGraph:
    """:func:`plan`, also returning the annotated graph the plan was cut from.

    The same arguments and checks as :func:`plan`; the graph is the one traced for one microbatch
    (for ``num_stages=None``: for the microbatch size the search chose), every node annotated with
    its shapes and :class:`~fxpipe.ir.NodeCost`. Example::

        r = fxpipe.plan_with_graph(model, x, num_stages=2, num_microbatches=4)
        dot = fxpipe.render.to_dot(r.plan, graph_edges(r.gm), node_labels(r.gm))

    Returns:
        A :class:`PlannedGraph` (``.plan``, ``.gm``, ``.cost_model``, ``.graph``).

    Raises:
        ConfigError, ScheduleError, TraceError, InfeasibleMemoryError (all FxpipeError).
    """
    opts = check_plan_options(model, num_stages=num_stages, num_microbatches=num_microbatches, schedule=schedule,
                              optimizer=optimizer, cost_model=cost_model, memory_limit=memory_limit, device=device,
                              executor=executor, num_devices=num_devices, global_batch=global_batch,
                              leaf_modules=leaf_modules, recompute=recompute, time_limit=time_limit,
                              precision=precision, devices_per_node=devices_per_node, loss_fn=loss_fn,
                              example_targets=example_targets)
    p, cg = plan_graph(model, example_inputs, opts)
    return PlannedGraph(plan=p, graph=cg)


def compile(model: torch.nn.Module, example_inputs: Any, *, num_stages: int | None = 4,
            num_microbatches: int = 8, schedule: str = "2bw",
            loss_fn: Callable[..., torch.Tensor] | None = None,
            optimizer: OptimizerFactory | None = None, cost_model: str | CostModel = "analytic",
            memory_limit: int | str | None | _DeviceMemory = DEVICE_MEMORY, device: Any = None, executor: str = "auto",
            num_devices: int | None = None, global_batch: int | None = None,
            leaf_modules: Iterable[type | str] = (), recompute: bool | None = None,
            time_limit: float = 10.0, plan: Plan | None = None, precision: str = "fp32",
            replan_after: int | None = None, devices_per_node: int | None = None,
            example_targets: Any = None, max_grad_norm: float | None = None,
            lr_scheduler: Callable[[Any], Any] | None = None, devices: Any = None) -> "Pipeline":
    """Compile ``model`` into pipeline stages and an executor that trains them.

    Args:
        model: the nn.Module (its parameters become the pipeline's newest weights).
        example_inputs: one batch as ``step`` will receive it: a tensor, a tuple, or a dict of kwargs.
        num_stages: pipeline depth d, or None with ``num_devices`` to let the planner choose.
        num_microbatches: m microbatches per batch (2bw needs m >= d).
        schedule: "2bw" (PipeDream-2BW), "flush" (PipeDream-Flush), or "gpipe".
        loss_fn: ``loss_fn(model_output, targets) -> scalar``; required for ``step``.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer``; default SGD(lr=0.01).
        cost_model: "analytic", "profile", or a CostModel instance.
        memory_limit: bytes per device (a number, or a size string like ``"16GiB"``); the default,
            ``DEVICE_MEMORY``, is the memory ``device`` leaves to tensors when it is given
            (``DeviceSpec.usable_memory``: its memory less what the CUDA context holds and the 5% headroom
            the GPU presets keep for the allocator); None lifts the limit.
        device: a DeviceSpec, a preset name ("a100-80gb"), or None for this machine.
        executor: "local", "distributed", or "auto" (distributed under torchrun with WORLD_SIZE > 1).
        leaf_modules: module types / qualified names to keep opaque when tracing.
        recompute: force activation recomputation on (True) or off (False); None lets the planner decide.
        time_limit: seconds the solver may spend.
        precision: "fp32" | "bf16" | "fp16" (:mod:`fxpipe.precision`): the planner prices compute at
            the compute dtype's FLOP rate and counts activations and gradients in it.
        devices_per_node: devices sharing a node (default: the device's ``devices_per_node``); the
            depth/width search prices transfers and all-reduces by where ranks sit
            (:mod:`fxpipe.cost_models.topology`); a fixed depth prices each stage-to-stage transfer
            by the link it crosses (the network where stages s-1 and s sit on different nodes); with
            w > 1 replicas both keep the faster rank order (stages-in-node or replicas-in-node) and
            record it in ``plan.extra["placement"]``; the distributed executor places ranks by it.
        plan: use this Plan (e.g. ``Plan.from_json`` of a saved ``fxpipe dump --format json``, or a
            baseline), or the path of such a JSON file, instead of solving; it is re-checked against
            the traced graph.
        example_targets: one batch of targets as ``step`` will receive them; when given, ``loss_fn``
            (model_output, targets) is traced and priced by the cost model as part of the last stage
            (its time and the activations it saves, e.g. a large vocabulary's log-softmax), shown in
            ``plan.loss`` and the plan summary.
        replan_after: after this many steps, re-plan once from what the run measured per stage
            (``pipe.replan()``) and go on training exactly (same numbers; weights, both 2BW versions,
            optimizer state carried over); under torchrun every rank switches at the same step.
        max_grad_norm: clip the gradients by their global L2 norm over all parameters before every
            update, as ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)`` would
            (``pipe.last_grad_norm`` reports the norm); None: no clipping.
        lr_scheduler: ``lr_scheduler(optimizer) -> torch.optim.lr_scheduler.LRScheduler``, built once per
            optimizer and stepped once per batch after the optimizer step; saved in checkpoints.
        devices: one device per stage (``["cuda:0", "cuda:1"]``) for a one-process pipeline: stage s
            computes on ``devices[s]`` and activations move between them; None: where the model is.

    Returns:
        A :class:`fxpipe.Pipeline`.

    Raises:
        FxpipeError subclasses for every bad argument, with the values seen and the fix.
    """
    from fxpipe.pipeline import Pipeline
    from fxpipe.runtime.options import check_training_options

    opts = check_plan_options(model, num_stages=num_stages, num_microbatches=num_microbatches, schedule=schedule,
                              optimizer=optimizer, cost_model=cost_model, memory_limit=memory_limit, device=device,
                              executor=executor, num_devices=num_devices, global_batch=global_batch,
                              leaf_modules=leaf_modules, recompute=recompute, time_limit=time_limit,
                              precision=precision, devices_per_node=devices_per_node, loss_fn=loss_fn,
                              example_targets=example_targets)
    devs = check_training_options(model, precision=precision, max_grad_norm=max_grad_norm,
                                  lr_scheduler=lr_scheduler, devices=devices, executor=opts.executor,
                                  num_stages=num_stages)
    check_replan_after(replan_after)
    check_loss_fn(loss_fn)
    plan = read_plan(plan)
    if any(p.is_meta for p in model.parameters()):
        raise ConfigError(f"{type(model).__name__} has parameters on the meta device: compile needs real "
                          "weights to train; use fxpipe.plan(...) to plan a meta-device model")
    check_input_dtypes(model, example_inputs)
    width = 1
    if opts.executor == "distributed":
        # one process per (stage, replica): each of w replicas traces and trains its 1/w share of a batch
        from fxpipe.runtime.distributed import data_parallel_width, replica_share

        if num_stages is None:
            raise ConfigError("executor='distributed' needs num_stages=d (WORLD_SIZE = d x replicas)")
        width = data_parallel_width(num_stages)
        example_inputs = replica_share(example_inputs, width, 0)
        if example_targets is not None:
            opts = dataclasses.replace(opts, example_targets=replica_share(example_targets, width, 0))
    if opts.executor == "distributed" and plan is None:
        # one plan for all ranks: rank 0 plans (and profiles, alone), the others check and take it
        from fxpipe.runtime.agree import plan_on_rank0

        profile = isinstance(opts.cost_model, str) and opts.cost_model == "profile"
        others = dataclasses.replace(opts, cost_model="analytic") if profile else opts
        p, cg = plan_on_rank0(lambda given: plan_graph(model, example_inputs, opts if given is None else others,
                                                       given_plan=given, width=width))
    else:
        p, cg = plan_graph(model, example_inputs, opts, given_plan=plan, width=width)
    if opts.executor == "distributed":
        from fxpipe.runtime.agree import check_same_plan

        check_same_plan(p)        # before the first step: a differing plan= fails here, naming both plans
    pipe = Pipeline(model, cg, p, loss_fn=loss_fn,
                    optimizer=optimizer or (lambda ps: torch.optim.SGD(ps, lr=0.01)),
                    executor=opts.executor, precision=precision, max_grad_norm=max_grad_norm,
                    lr_scheduler=lr_scheduler, devices=devs)
    pipe.replan_after = replan_after
    return pipe
