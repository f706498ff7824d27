"""Public entry points: ``fxpipe.plan`` (plan only) and ``fxpipe.compile`` (plan, split, executor)."""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx
import torch.utils._pytree as pytree

from fxpipe.errors import ConfigError, InputError, ScheduleError
from fxpipe.ir import SCHEDULES, CostModel, Plan
from fxpipe.precision import check_precision
from fxpipe.runtime.microbatch import bind_inputs as _bind_inputs
from fxpipe.runtime.microbatch import flatten_for_graph as _flatten_for_graph
from fxpipe.runtime.microbatch import split_batch

__all__ = ["compile", "plan", "CompiledGraph", "prepare", "split_batch", "DEVICE_MEMORY", "resolve_memory_limit"]

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


class _DeviceMemory:
    """Type of :data:`DEVICE_MEMORY`, the default ``memory_limit``."""

    _instance: "_DeviceMemory | None" = None

    def __new__(cls) -> "_DeviceMemory":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DEVICE_MEMORY"

    def __reduce__(self) -> str:
        return "DEVICE_MEMORY"


DEVICE_MEMORY = _DeviceMemory()
"""Default of ``memory_limit``: the memory of the device named by ``device=`` (no limit when
``device`` is None, i.e. this machine). Pass ``memory_limit=None`` to lift the limit."""


def resolve_memory_limit(memory_limit: Any, device: Any) -> int | None:
    """Bytes per device that a plan must fit, from ``memory_limit=`` and ``device=``.

    ``DEVICE_MEMORY`` (the default) gives ``device``'s ``memory_bytes`` when ``device`` is given, else
    None; None gives None (no limit); a string such as ``"16GiB"`` or ``"8e9"`` is parsed; a number
    is taken as bytes.

    Raises:
        ConfigError: a string that is not a size, a number <= 0, or another type.
    """
    if memory_limit is DEVICE_MEMORY:
        if device is None:
            return None
        from fxpipe.cost_models.device import get_device

        return int(get_device(device).memory_bytes)
    if memory_limit is None:
        return None
    if isinstance(memory_limit, str):
        from fxpipe.report import parse_bytes

        try:
            return parse_bytes(memory_limit)
        except ValueError:
            raise ConfigError(f"memory_limit {memory_limit!r} is not a size; write e.g. '16GiB', '80GB' or "
                              "8e9 (bytes), or None for no limit") from None
    if isinstance(memory_limit, bool) or not isinstance(memory_limit, (int, float)) or not memory_limit > 0 \
            or memory_limit == float("inf"):
        raise ConfigError(f"memory_limit must be a positive number of bytes or None, got {memory_limit!r}; "
                          "give bytes, a size string like '16GiB', or None (no limit)")
    if memory_limit < 1:
        raise ConfigError(f"memory_limit={memory_limit!r} is less than one byte (it would be taken as "
                          f"{int(memory_limit)}); memory_limit is in bytes: give e.g. 16e9 or '16GiB', or None")
    return int(memory_limit)


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


def _check_common(model: Any, num_stages: int | None, num_microbatches: int, schedule: str,
                  num_devices: int | None, memory_limit: Any, precision: str = "fp32") -> None:
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}; "
                          "wrap your function in an nn.Module whose forward calls it")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not isinstance(num_microbatches, int) or isinstance(num_microbatches, bool) or num_microbatches < 1:
        raise ConfigError(f"num_microbatches must be an int >= 1, got {num_microbatches!r}")
    if num_stages is None:
        if num_devices is None:
            raise ConfigError("num_stages=None needs num_devices=N so the planner can choose the depth; "
                              "pass num_stages=d or num_devices=N")
    elif not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise ConfigError(f"num_stages must be an int >= 1, got {num_stages!r}")
    if num_stages is not None and schedule == "2bw" and num_microbatches < num_stages:
        raise ScheduleError(
            f"schedule '2bw' needs num_microbatches >= num_stages, got num_microbatches="
            f"{num_microbatches} < num_stages={num_stages}; raise num_microbatches to at least "
            f"{num_stages} or use schedule='flush'")
    if memory_limit is not DEVICE_MEMORY:
        resolve_memory_limit(memory_limit, None)  # validates strings and numbers
    if num_devices is not None and (not isinstance(num_devices, int) or isinstance(num_devices, bool)
                                    or num_devices < 1):
        raise ConfigError(f"num_devices must be an int >= 1 or None, got {num_devices!r}; it is the number of "
                          "devices the planner may use (depth x data-parallel width)")
    check_precision(precision)


def _check_planning(model: torch.nn.Module, time_limit: Any, recompute: Any, leaf_modules: Any) -> None:
    """The planner's own knobs: a solver time, a recompute switch, and leaf modules that exist."""
    if isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or not 0 < time_limit < float("inf"):
        raise ConfigError(f"time_limit must be a positive finite number of seconds, got {time_limit!r} "
                          f"({type(time_limit).__name__}); e.g. time_limit=10.0")
    if recompute is not None and not isinstance(recompute, bool):
        raise ConfigError(f"recompute must be True (always recompute), False (never) or None (the planner "
                          f"decides per stage), got {recompute!r}")
    if isinstance(leaf_modules, (str, type)):
        raise ConfigError(f"leaf_modules must be a list of module types or qualified names, got "
                          f"{leaf_modules!r}; write leaf_modules=[{leaf_modules!r}]")
    names = dict(model.named_modules())
    for entry in leaf_modules:
        if isinstance(entry, str):
            hit = entry in names
        elif isinstance(entry, type) and issubclass(entry, torch.nn.Module):
            hit = any(isinstance(mod, entry) for mod in names.values())
        else:
            raise ConfigError(f"leaf_modules entry {entry!r} is neither an nn.Module subclass nor a qualified "
                              "module name such as 'blocks.0.attn'")
        if not hit:
            import difflib
            import warnings

            close = difflib.get_close_matches(entry, list(names), n=3) if isinstance(entry, str) else []
            warnings.warn(f"leaf_modules entry {entry!r} matches no submodule of {type(model).__name__}; it has "
                          f"no effect{f' (did you mean {close}?)' if close else ''}", stacklevel=3)


def _check_loss_fn(loss_fn: Any) -> None:
    if loss_fn is None:
        return
    if not callable(loss_fn):
        raise ConfigError(f"loss_fn must be callable (model_output, targets) -> scalar, got {loss_fn!r}")
    try:
        sig = inspect.signature(loss_fn)
    except (TypeError, ValueError):     # a builtin without a signature: it is tried at the first step
        return
    try:
        sig.bind(object(), object())
    except TypeError as e:
        raise ConfigError(f"loss_fn{sig} cannot be called as loss_fn(model_output, targets): {e}; give it "
                          "exactly two positional parameters, e.g. lambda out, y: F.cross_entropy(out, y)") from None


def _read_plan(plan: Any) -> Plan | None:
    """``plan=`` as given: None, a Plan, or the path of a JSON file written by ``fxpipe dump --format json``."""
    if plan is None or isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        try:
            with open(plan, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"plan={str(plan)!r}: cannot read the plan file ({e.strerror}); pass a Plan or "
                              "the path of `fxpipe dump ... --format json -o plan.json`") from None
        return Plan.from_json(text)
    raise ConfigError(f"plan must be a Plan, a path to a plan JSON file, or None, got {type(plan).__name__}")


def _check_input_dtypes(model: torch.nn.Module, example_inputs: Any) -> None:
    """A floating input of another dtype than every floating parameter fails in the first matmul; say so now."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        return
    (want,) = dtypes
    for i, v in enumerate(pytree.tree_leaves(example_inputs)):
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != want:
            raise InputError(f"example input {i} is {v.dtype} but every floating parameter of "
                             f"{type(model).__name__} is {want}; convert one of them (x.to({want}) or "
                             f"model.to({v.dtype})) — under torch.autocast the parameters stay {want} too")


def prepare(model: torch.nn.Module, example_inputs: Any, *, num_microbatches: int,
            cost_model: str | CostModel = "analytic", device: Any = None,
            leaf_modules: Iterable[type | str] = (), precision: str = "fp32") -> CompiledGraph:
    """Trace, shape-propagate (fake tensors), specialise shapes and annotate costs.

    The graph is traced for ONE microbatch: ``example_inputs`` is a whole batch as
    ``step`` will receive it, split into ``num_microbatches`` along dim 0.
    """
    from fxpipe.passes.annotate import annotate, resolve_cost_model
    from fxpipe.passes.shape_prop import shape_prop
    from fxpipe.passes.specialize import specialize_shapes
    from fxpipe.trace import trace

    args, kwargs = _bind_inputs(model, example_inputs)
    names = [f"arg{i}" for i in range(len(args))] + list(kwargs)
    flat_given = list(args) + list(kwargs.values())
    mbs = split_batch(flat_given, num_microbatches, "example_inputs")
    # a microbatch of its own (not a view of the batch): what autograd saves of an input is then charged
    # at the microbatch's size, not at the size of the whole batch's storage
    mb0 = [v.clone() if isinstance(v, torch.Tensor) and num_microbatches > 1 else v for v in mbs[0]]
    mb_args = tuple(mb0[: len(args)])
    mb_kwargs = dict(zip(names[len(args):], mb0[len(args):]))
    t0 = time.perf_counter()
    gm = trace(model, mb_args, mb_kwargs, leaf_modules=leaf_modules)
    flat = _flatten_for_graph(gm, model, mb_args, mb_kwargs)
    shape_prop(gm, *flat)
    specialize_shapes(gm)
    t1 = time.perf_counter()
    cm = resolve_cost_model(cost_model, device, precision)
    annotate(gm, cm)
    t2 = time.perf_counter()
    return CompiledGraph(gm=gm, cost_model=cm, input_names=[str(n.target) for n in gm.graph.nodes if n.op == "placeholder"],
                         microbatch_inputs=flat, batch_size=int(flat_given[0].shape[0]) if flat_given else 0,
                         trace_seconds=t1 - t0, annotate_seconds=t2 - t1)


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
    _check_common(model, num_stages, num_microbatches, schedule, num_devices, memory_limit, precision)
    _check_targets(example_targets, loss_fn)
    _check_planning(model, time_limit, recompute, leaf_modules)
    return _plan(model, example_inputs, num_stages=num_stages, num_microbatches=num_microbatches,
                 schedule=schedule, optimizer=optimizer, cost_model=cost_model, memory_limit=memory_limit,
                 device=device, num_devices=num_devices, global_batch=global_batch,
                 leaf_modules=leaf_modules, recompute=recompute, time_limit=time_limit,
                 precision=precision, devices_per_node=devices_per_node, executor=executor,
                 loss_fn=loss_fn, example_targets=example_targets)[0]


def _check_targets(example_targets: Any, loss_fn: Any) -> None:
    if example_targets is None:
        return
    if loss_fn is None or not callable(loss_fn):
        raise ConfigError(f"example_targets= needs loss_fn=(model_output, targets) -> scalar to price, got "
                          f"loss_fn={loss_fn!r}; pass loss_fn, or leave example_targets=None")
    leaves = [v for v in pytree.tree_leaves(example_targets) if isinstance(v, torch.Tensor)]
    if not leaves:
        raise ConfigError(f"example_targets must hold tensors (one batch of targets), got "
                          f"{type(example_targets).__name__}")


def _price_loss(cg: "CompiledGraph", loss_fn: Callable[..., Any], example_targets: Any,
                num_microbatches: int) -> None:
    """Price loss_fn on one microbatch of ``example_targets`` (gm.meta["fxpipe.loss"])."""
    from fxpipe.passes.loss_cost import price_loss

    flat, spec = pytree.tree_flatten(example_targets)
    tensors = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
    mb = split_batch([flat[i] for i in tensors], num_microbatches, "example_targets")[0]
    one = list(flat)
    for i, v in zip(tensors, mb):
        one[i] = v
    price_loss(cg.gm, cg.cost_model, loss_fn, pytree.tree_unflatten(one, spec))


def _resolve_executor(executor: str) -> str:
    """"auto" -> "distributed" under torchrun with WORLD_SIZE > 1, else "local"."""
    if executor == "auto":
        return "distributed" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "local"
    return executor


def _plan(model: torch.nn.Module, example_inputs: Any, *, num_stages: int | None, num_microbatches: int,
          schedule: str, optimizer: OptimizerFactory | None, cost_model: Any, memory_limit: Any,
          device: Any, num_devices: int | None, global_batch: int | None,
          leaf_modules: Iterable[type | str], recompute: bool | None,
          time_limit: float, given_plan: Plan | None = None,
          precision: str = "fp32", devices_per_node: int | None = None,
          executor: str = "auto", loss_fn: Callable[..., Any] | None = None,
          example_targets: Any = None) -> tuple[Plan, CompiledGraph]:
    from fxpipe.cost_models.memory import optimizer_slots
    from fxpipe.passes.partition import partition

    k = optimizer_slots(optimizer)
    limit = resolve_memory_limit(memory_limit, device)
    if devices_per_node is not None and (isinstance(devices_per_node, bool) or not isinstance(devices_per_node, int)
                                         or devices_per_node < 1):
        raise ConfigError(f"devices_per_node must be an int >= 1 or None (the device's), got {devices_per_node!r}")
    if num_stages is None:
        from fxpipe.passes.search import search_depth_width

        cached: dict[int, CompiledGraph] = {}

        def graph_for(b: int) -> tuple[torch.fx.GraphModule, CostModel]:
            if b not in cached:
                cached[b] = prepare(model, _resize_batch(example_inputs, b), num_microbatches=1,
                                    cost_model=cost_model, device=device, leaf_modules=leaf_modules,
                                    precision=precision)
                if example_targets is not None and loss_fn is not None:
                    _price_loss(cached[b], loss_fn, _resize_batch(example_targets, b), 1)
            return cached[b].gm, cached[b].cost_model

        batch = global_batch or _batch_size(example_inputs)
        p = search_depth_width(graph_for, num_devices=int(num_devices or 1), global_batch=int(batch),
                               schedule=schedule,
                               memory_limit=limit,
                               optimizer_slots=k, recompute=recompute, time_limit=time_limit,
                               topology=_topology(device, devices_per_node, precision))
        return p, cached[int(p.microbatch_size or 1)]
    cg = prepare(model, example_inputs, num_microbatches=num_microbatches, cost_model=cost_model,
                 device=device, leaf_modules=leaf_modules, precision=precision)
    if _resolve_executor(executor) == "local" and device is None and isinstance(cost_model, str):
        # one process, this machine: a stage hands its outputs over by reference (issue 10 item 6)
        from fxpipe.cost_models.evaluator import InProcessTransfers

        cg.cost_model = InProcessTransfers(cg.cost_model)
    if example_targets is not None and loss_fn is not None:
        _price_loss(cg, loss_fn, example_targets, num_microbatches)
    if given_plan is not None:
        from fxpipe.passes.partition import plan_from_assignment

        if given_plan.num_stages != num_stages:
            raise ConfigError(f"plan has {given_plan.num_stages} stages but num_stages={num_stages}; "
                              f"pass num_stages={given_plan.num_stages} with this plan")
        names = {n.name for n in cg.gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")}
        planned = set(given_plan.stage_of())
        if names != planned:
            raise ConfigError(
                f"plan does not match the traced graph of {type(model).__name__}: {len(names - planned)} "
                f"operations have no stage (e.g. {sorted(names - planned)[:3]}) and {len(planned - names)} "
                f"planned names are not in the graph (e.g. {sorted(planned - names)[:3]}); re-plan this "
                "model with fxpipe.plan(...) or `fxpipe dump --format json`")
        p = plan_from_assignment(cg.gm, cg.cost_model, given_plan.stage_of(),
                                 [s.recompute for s in given_plan.stages], num_microbatches=num_microbatches,
                                 schedule=schedule, memory_limit=limit,
                                 optimizer_slots=optimizer_slots(optimizer), solver=given_plan.solver,
                                 lower_bound=given_plan.lower_bound, optimal=given_plan.optimal)
        return p, cg
    n_compute = sum(1 for n in cg.gm.graph.nodes if n.op in ("call_function", "call_method", "call_module"))
    if n_compute == 0:
        raise ConfigError(f"the traced graph of {type(model).__name__} has no operations (its forward returns "
                          "its inputs or constants): there is nothing to cut into stages")
    if num_stages > n_compute:
        raise ConfigError(f"num_stages={num_stages} is more than the {n_compute} operations in the "
                          f"traced graph of {type(model).__name__}; use at most {n_compute} stages")
    p = partition(cg.gm, cg.cost_model, num_stages=num_stages, num_microbatches=num_microbatches,
                  schedule=schedule, memory_limit=limit,
                  optimizer_slots=k, recompute=recompute, time_limit=time_limit)
    return _with_placement(p, devices_per_node, device), cg


def _topology(device: Any, devices_per_node: int | None, precision: str) -> Any:
    """The cluster the search prices placements on: ``device``'s spec, n devices a node, precision."""
    from fxpipe.cost_models.device import get_device
    from fxpipe.cost_models.topology import Topology

    spec = get_device(device)
    return Topology(spec, spec.devices_per_node if devices_per_node is None else devices_per_node, precision)


def _with_placement(p: Plan, devices_per_node: int | None, device: Any) -> Plan:
    """A fixed-depth plan records where its stages sit (one pipeline, stages on neighbouring devices)."""
    if devices_per_node is None and device is None:
        return p
    import dataclasses

    from fxpipe.cost_models.device import get_device
    from fxpipe.cost_models.topology import Placement

    n = get_device(device).devices_per_node if devices_per_node is None else devices_per_node
    where = Placement("stages-in-node", p.num_stages, p.data_parallel, n).to_dict()
    return dataclasses.replace(p, extra={**p.extra, "placement": where})


def _batch_size(example_inputs: Any) -> int:
    """dim-0 size of the first tensor in ``example_inputs``."""
    for v in pytree.tree_leaves(example_inputs):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ConfigError("num_stages=None needs a tensor input with a batch dimension (dim 0) or "
                      "global_batch=B")


def _resize_batch(example_inputs: Any, b: int) -> Any:
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
            ``DEVICE_MEMORY``, is the memory of ``device`` when it is given; None lifts the limit.
        device: a DeviceSpec, a preset name ("a100-80gb"), or None for this machine.
        executor: "local", "distributed", or "auto" (distributed under torchrun with WORLD_SIZE > 1).
        leaf_modules: module types / qualified names to keep opaque when tracing.
        recompute: force activation recomputation on (True) or off (False); None lets the planner decide.
        time_limit: seconds the solver may spend.
        precision: "fp32" | "bf16" | "fp16" (:mod:`fxpipe.precision`): the planner prices compute at
            the compute dtype's FLOP rate and counts activations and gradients in it.
        devices_per_node: devices sharing a node (default: the device's ``devices_per_node``); the
            depth/width search prices transfers and all-reduces by where ranks sit
            (:mod:`fxpipe.cost_models.topology`) and records ``plan.extra["placement"]``.
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

    _check_common(model, num_stages, num_microbatches, schedule, num_devices, memory_limit, precision)
    from fxpipe.runtime.options import check_training_options

    devs = check_training_options(model, precision=precision, max_grad_norm=max_grad_norm,
                                  lr_scheduler=lr_scheduler, devices=devices,
                                  executor=("distributed" if executor == "distributed" or (
                                      executor == "auto" and int(os.environ.get("WORLD_SIZE", "1")) > 1)
                                      else "local"), num_stages=num_stages)
    if replan_after is not None and (not isinstance(replan_after, int) or isinstance(replan_after, bool)
                                     or replan_after < 1):
        raise ConfigError(f"replan_after must be a number of steps >= 1 or None, got {replan_after!r}; "
                          "e.g. replan_after=10")
    if executor not in ("auto", "local", "distributed"):
        raise ConfigError(f"unknown executor {executor!r}; choose 'auto', 'local' or 'distributed'")
    _check_planning(model, time_limit, recompute, leaf_modules)
    _check_loss_fn(loss_fn)
    _check_targets(example_targets, loss_fn)
    plan = _read_plan(plan)
    if optimizer is not None and not callable(optimizer):
        raise ConfigError(f"optimizer must be a factory params -> torch.optim.Optimizer, got {optimizer!r}; "
                          "pass e.g. optimizer=lambda params: torch.optim.SGD(params, lr=0.1)")
    if any(p.is_meta for p in model.parameters()):
        raise ConfigError(f"{type(model).__name__} has parameters on the meta device: compile needs real "
                          "weights to train; use fxpipe.plan(...) to plan a meta-device model")
    _check_input_dtypes(model, example_inputs)
    executor = _resolve_executor(executor)
    width = 1
    if executor == "distributed":
        # one process per (stage, replica): each of w replicas traces and trains its 1/w share of a batch
        from fxpipe.runtime.distributed import data_parallel_width, replica_share

        if num_stages is None:
            raise ConfigError("executor='distributed' needs num_stages=d (WORLD_SIZE = d x replicas)")
        width = data_parallel_width(num_stages)
        example_inputs = replica_share(example_inputs, width, 0)
        if example_targets is not None:
            example_targets = replica_share(example_targets, width, 0)
    plan_kw = dict(num_stages=num_stages, num_microbatches=num_microbatches, schedule=schedule,
                   optimizer=optimizer, memory_limit=memory_limit, device=device, num_devices=num_devices,
                   global_batch=global_batch, leaf_modules=leaf_modules, recompute=recompute,
                   time_limit=time_limit, precision=precision, devices_per_node=devices_per_node,
                   executor=executor, loss_fn=loss_fn, example_targets=example_targets)
    if executor == "distributed" and plan is None:
        # one plan for all ranks: rank 0 plans (and profiles, alone), the others check and take it
        from fxpipe.runtime.agree import plan_on_rank0

        others_cm = "analytic" if isinstance(cost_model, str) and cost_model == "profile" else cost_model
        p, cg = plan_on_rank0(lambda given: _plan(model, example_inputs, given_plan=given,
                                                  cost_model=cost_model if given is None else others_cm,
                                                  **plan_kw))
    else:
        p, cg = _plan(model, example_inputs, cost_model=cost_model, given_plan=plan, **plan_kw)
    if width > 1:
        import dataclasses

        p = dataclasses.replace(p, data_parallel=width)
    if executor == "distributed":
        from fxpipe.runtime.agree import check_same_plan

        check_same_plan(p)        # before the first step: a differing plan= fails here, naming both plans
    pipe = Pipeline(model, cg, p, loss_fn=loss_fn,
                    optimizer=optimizer or (lambda ps: torch.optim.SGD(ps, lr=0.01)),
                    executor=executor, precision=precision, max_grad_norm=max_grad_norm,
                    lr_scheduler=lr_scheduler, devices=devs)
    pipe.replan_after = replan_after
    return pipe
