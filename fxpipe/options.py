"""The arguments of ``fxpipe.plan`` / ``fxpipe.compile``, checked once into a frozen :class:`PlanOptions`.

The trainer's own options (precision on its device, clipping, the LR scheduler, devices) are checked
by :func:`fxpipe.runtime.options.check_training_options`; everything the planner reads is here.
"""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.utils._pytree as pytree

from fxpipe.errors import ConfigError, InputError, ScheduleError
from fxpipe.ir import SCHEDULES, CostModel, Plan, min_microbatches
from fxpipe.precision import check_precision

__all__ = ["PlanOptions", "check_plan_options", "DEVICE_MEMORY", "EXECUTORS", "resolve_memory_limit",
           "resolve_executor", "check_loss_fn", "read_plan", "check_input_dtypes", "check_replan_after"]

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]

EXECUTORS: tuple[str, ...] = ("auto", "local", "distributed")
"""The ``executor=`` values: "auto" is "distributed" under torchrun with WORLD_SIZE > 1, else "local"."""


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


@dataclass(frozen=True)
class PlanOptions:
    """What the planner reads, every field checked and resolved (built by :func:`check_plan_options`)."""

    num_stages: int | None              # d, or None: the depth x width search picks it (needs num_devices)
    num_microbatches: int               # m
    schedule: str                       # one of SCHEDULES
    optimizer: OptimizerFactory | None  # the factory as given (None: SGD without momentum)
    optimizer_slots: int                # k, parameter-sized optimizer tensors per parameter
    cost_model: str | CostModel         # a name or a CostModel, resolved by passes.annotate
    memory_limit: int | None            # bytes per device (DEVICE_MEMORY resolved against device); None: no limit
    device: Any                         # DeviceSpec, preset name, or None (this machine)
    executor: str                       # "local" | "distributed" ("auto" resolved)
    num_devices: int | None = None      # devices the search may use (num_stages=None); with num_stages=d: d x w
    global_batch: int | None = None     # B of the search; None: the example batch's size
    leaf_modules: tuple[type | str, ...] = ()
    recompute: bool | None = None       # forced on / off, or None: the planner decides per stage
    time_limit: float = 10.0            # seconds the solver may spend
    precision: str = "fp32"
    devices_per_node: int | None = None  # None: the device's own
    loss_fn: Callable[..., Any] | None = None
    example_targets: Any = None         # one batch of targets: loss_fn is priced on the last stage


def resolve_memory_limit(memory_limit: Any, device: Any) -> int | None:
    """Bytes per device that a plan must fit, from ``memory_limit=`` and ``device=``.

    ``DEVICE_MEMORY`` (the default) gives ``device``'s ``usable_memory`` (its memory less what the CUDA
    context and libraries hold, ``memory_reserved``, and ``memory_headroom``) when ``device`` is given,
    else None; None gives None (no limit); a string such as ``"16GiB"`` or ``"8e9"`` is parsed; a number
    is taken as bytes.

    Raises:
        ConfigError: a string that is not a size, a number <= 0, or another type.
    """
    if memory_limit is DEVICE_MEMORY:
        if device is None:
            return None
        from fxpipe.cost_models.device import get_device

        return int(get_device(device).usable_memory)
    if memory_limit is None:
        return None
    if isinstance(memory_limit, str):
        from fxpipe.units import parse_bytes

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


def resolve_executor(executor: str) -> str:
    """"auto" -> "distributed" under torchrun with WORLD_SIZE > 1, else "local"."""
    if executor == "auto":
        return "distributed" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "local"
    return executor


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def check_plan_options(model: Any, *, num_stages: int | None, num_microbatches: int, schedule: str,
                       optimizer: OptimizerFactory | None, cost_model: str | CostModel, memory_limit: Any,
                       device: Any, executor: str, num_devices: int | None = None,
                       global_batch: int | None = None, leaf_modules: Iterable[type | str] = (),
                       recompute: bool | None = None, time_limit: float = 10.0, precision: str = "fp32",
                       devices_per_node: int | None = None, loss_fn: Callable[..., Any] | None = None,
                       example_targets: Any = None) -> PlanOptions:
    """Check the planner's arguments of :func:`fxpipe.plan` / :func:`fxpipe.compile` and resolve them.

    Returns:
        The :class:`PlanOptions`; nothing downstream checks them again.

    Raises:
        ConfigError: a value out of range or of the wrong type (the message names it and the fix).
        ScheduleError: schedule '2bw' with num_microbatches < num_stages.
    """
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}; "
                          "wrap your function in an nn.Module whose forward calls it")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not _is_count(num_microbatches):
        raise ConfigError(f"num_microbatches must be an int >= 1, got {num_microbatches!r}")
    if num_stages is None:
        if num_devices is None:
            raise ConfigError("num_stages=None needs num_devices=N so the planner can choose the depth; "
                              "pass num_stages=d or num_devices=N")
    elif not _is_count(num_stages):
        raise ConfigError(f"num_stages must be an int >= 1, got {num_stages!r}")
    if num_stages is not None and num_microbatches < min_microbatches(schedule, num_stages):
        raise ScheduleError(
            f"schedule '2bw' needs num_microbatches >= num_stages, got num_microbatches="
            f"{num_microbatches} < num_stages={num_stages}; raise num_microbatches to at least "
            f"{num_stages} or use schedule='flush'")
    if memory_limit is not DEVICE_MEMORY:
        resolve_memory_limit(memory_limit, None)  # validates strings and numbers before the device is looked up
    if num_devices is not None and not _is_count(num_devices):
        raise ConfigError(f"num_devices must be an int >= 1 or None, got {num_devices!r}; it is the number of "
                          "devices the planner may use (depth x data-parallel width)")
    if num_stages is not None and num_devices is not None and num_devices % num_stages:
        raise ConfigError(f"num_devices={num_devices} is not a multiple of num_stages={num_stages}: a fixed-depth "
                          "plan runs w = num_devices / num_stages copies of its pipeline; pass num_devices = "
                          f"{num_stages} x w, or num_stages=None to let the planner choose the depth")
    check_precision(precision)
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; choose 'auto', 'local' or 'distributed'")
    leaves = _check_planning(model, time_limit, recompute, leaf_modules)
    _check_targets(example_targets, loss_fn)
    if devices_per_node is not None and not _is_count(devices_per_node):
        raise ConfigError(f"devices_per_node must be an int >= 1 or None (the device's), got {devices_per_node!r}")
    if optimizer is not None and not callable(optimizer):
        raise ConfigError(f"optimizer must be a factory params -> torch.optim.Optimizer, got {optimizer!r}; "
                          "pass e.g. optimizer=lambda params: torch.optim.SGD(params, lr=0.1)")
    from fxpipe.cost_models.memory import optimizer_slots

    k = optimizer_slots(optimizer)
    return PlanOptions(num_stages=num_stages, num_microbatches=num_microbatches, schedule=schedule,
                       optimizer=optimizer, optimizer_slots=k, cost_model=cost_model,
                       memory_limit=resolve_memory_limit(memory_limit, device), device=device,
                       executor=resolve_executor(executor), num_devices=num_devices, global_batch=global_batch,
                       leaf_modules=leaves, recompute=recompute, time_limit=time_limit, precision=precision,
                       devices_per_node=devices_per_node, loss_fn=loss_fn, example_targets=example_targets)


def _check_planning(model: torch.nn.Module, time_limit: Any, recompute: Any,
                    leaf_modules: Any) -> tuple[type | str, ...]:
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
    leaves = tuple(leaf_modules)
    names = dict(model.named_modules())
    for entry in leaves:
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
                          f"no effect{f' (did you mean {close}?)' if close else ''}", stacklevel=_user_frame())
    return leaves


def _user_frame() -> int:
    """The ``stacklevel`` of a warning raised here that names the first caller outside fxpipe/."""
    here, level = os.path.dirname(os.path.abspath(__file__)), 2
    frame = sys._getframe(2)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here + os.sep):
        frame, level = frame.f_back, level + 1
    return level


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


# -- compile's own: what training needs beyond a plan ------------------------------------------------
def check_loss_fn(loss_fn: Any) -> None:
    """``loss_fn`` is None or callable as ``loss_fn(model_output, targets)``.

    Raises:
        ConfigError: not callable, or its signature does not take two positional arguments.
    """
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


def check_replan_after(replan_after: Any) -> None:
    """``replan_after`` is None or a number of steps >= 1 (raises ConfigError otherwise)."""
    if replan_after is not None and not _is_count(replan_after):
        raise ConfigError(f"replan_after must be a number of steps >= 1 or None, got {replan_after!r}; "
                          "e.g. replan_after=10")


def read_plan(plan: Any) -> Plan | None:
    """``plan=`` as given: None, a Plan, or the path of a JSON file written by ``fxpipe dump --format json``.

    Raises:
        ConfigError: another type, or a file that cannot be read; PlanFormatError: not a plan's JSON.
    """
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


def check_input_dtypes(model: torch.nn.Module, example_inputs: Any) -> None:
    """A floating input of another dtype than every floating parameter fails in the first matmul; say so now.

    Raises:
        InputError: naming the input, both dtypes and the conversion.
    """
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        return
    (want,) = dtypes
    for i, v in enumerate(pytree.tree_leaves(example_inputs)):
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != want:
            raise InputError(f"example input {i} is {v.dtype} but every floating parameter of "
                             f"{type(model).__name__} is {want}; convert one of them (x.to({want}) or "
                             f"model.to({v.dtype})) — under torch.autocast the parameters stay {want} too")
