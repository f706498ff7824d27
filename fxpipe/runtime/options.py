"""The trainer's options of ``fxpipe.compile``, checked once before anything is built.

Precision on its device, clipping, the LR scheduler factory, and the devices of a one-process
pipeline. What the planner reads is checked by :func:`fxpipe.options.check_plan_options`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from fxpipe.errors import ConfigError
from fxpipe.runtime.amp import check_device_precision
from fxpipe.runtime.weights import check_scheduler

__all__ = ["check_training_options"]


def check_training_options(model: torch.nn.Module, *, precision: Any, max_grad_norm: Any, lr_scheduler: Any,
                           devices: Any, executor: str, num_stages: int | None) -> list[torch.device] | None:
    """Validate the trainer options of :func:`fxpipe.compile`; returns ``devices`` as torch.devices.

    Raises:
        ConfigError: an unknown precision or one the device cannot run, ``max_grad_norm`` not a
            positive finite number, ``lr_scheduler`` not a factory returning an LR scheduler, or
            ``devices`` not one available device per stage of a local pipeline.
    """
    devs = _check_devices(devices, executor, num_stages)
    where = devs[0].type if devs else next((p.device.type for p in model.parameters()), "cpu")
    if executor == "distributed" and torch.cuda.is_available():
        where = "cuda"
    check_device_precision(precision, where)
    if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                      or not math.isfinite(max_grad_norm) or max_grad_norm <= 0):
        raise ConfigError(f"max_grad_norm must be a positive finite number (the largest global L2 norm of the "
                          f"gradients) or None for no clipping, got {max_grad_norm!r}; e.g. max_grad_norm=1.0")
    if lr_scheduler is not None:
        if not callable(lr_scheduler):
            raise ConfigError(f"lr_scheduler must be a factory optimizer -> LR scheduler, got {lr_scheduler!r}; "
                              "pass e.g. lr_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, "
                              "T_max=1000)")
        _try_factory(lr_scheduler)
    return devs


def _try_factory(factory: Callable) -> None:
    """Call the factory on a throwaway optimizer so a wrong one fails before anything is built."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    try:
        sched = factory(probe)
    except Exception as e:  # noqa: BLE001 - the user's factory
        raise ConfigError(f"lr_scheduler factory raised {type(e).__name__}: {e} when called with an optimizer; "
                          "it is called once per stage's optimizer: lr_scheduler=lambda opt: ...") from e
    check_scheduler(sched)


def _check_devices(devices: Any, executor: str, num_stages: int | None) -> list[torch.device] | None:
    if devices is None:
        return None
    if executor == "distributed":
        raise ConfigError("devices= places the stages of a one-process pipeline; under torchrun every rank uses "
                          "cuda:LOCAL_RANK (or the CPU) — drop devices= or use executor='local'")
    if isinstance(devices, (str, torch.device)) or not isinstance(devices, Sequence):
        raise ConfigError(f"devices must be a list with one device per stage, e.g. ['cuda:0', 'cuda:1'], "
                          f"got {devices!r}")
    if num_stages is None or len(devices) != num_stages:
        raise ConfigError(f"devices has {len(devices)} entries but num_stages={num_stages!r}; give one device "
                          "per stage and num_stages=len(devices)")
    out = []
    for d in devices:
        try:
            dev = torch.device(d)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"devices entry {d!r} is not a device: {e}") from e
        if dev.type == "cuda":
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            idx = dev.index if dev.index is not None else 0
            if idx >= n:
                raise ConfigError(f"devices entry {d!r}: this machine has {n} CUDA device(s); use devices among "
                                  f"{[f'cuda:{i}' for i in range(n)] or ['cpu']}")
            dev = torch.device("cuda", idx)
        elif dev.type != "cpu":
            raise ConfigError(f"devices entry {d!r}: only 'cpu' and 'cuda:i' are supported")
        out.append(dev)
    return out
