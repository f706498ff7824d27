"""Optimizer state slots k, and the memory model's helpers under their historical names.

The memory model itself (M_s, n_s, the weight copies) is written once, in
:mod:`fxpipe.cost_models.evaluator`; this module keeps ``stage_memory``'s keyword
form for callers that hold a stage's figures as separate numbers.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from fxpipe.errors import ConfigError

from .evaluator import CostContext, in_flight, weight_copies
from .evaluator import stage_memory as _stage_memory

__all__ = ["in_flight", "weight_copies", "stage_memory", "optimizer_slots"]


def stage_memory(*, param_bytes: int, activation_bytes: int, input_bytes: int, in_flight: int,
                 recompute: bool, optimizer_slots: int, schedule: str, received_bytes: int = 0,
                 kept_bytes: int = 0) -> int:
    """M_s in bytes (:func:`fxpipe.cost_models.evaluator.stage_memory`); ``received_bytes`` is X_s,
    ``kept_bytes`` K_s (what loss_fn saves, on the last stage)."""
    ctx = CostContext(schedule=schedule, num_stages=1, num_microbatches=1,
                      optimizer_slots=optimizer_slots)
    return int(_stage_memory(param_bytes, activation_bytes, input_bytes, received_bytes, in_flight,
                             recompute, ctx, kept_bytes))


def optimizer_slots(optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer] | None) -> int:
    """k: parameter-sized state tensors the optimizer keeps per parameter.

    Known optimizers are answered from their arguments (SGD 0, SGD+momentum 1,
    Adam/AdamW 2 (+1 with amsgrad)); anything else is found by taking one step
    on a tiny tensor and counting the parameter-shaped tensors in its state.
    """
    if optimizer is None:
        return 0
    p = torch.nn.Parameter(torch.zeros(3, 2))
    try:
        opt = optimizer([p])
    except Exception as e:  # noqa: BLE001 - user callable
        raise ConfigError(
            f"optimizer factory {optimizer!r} failed on a list of parameters: {e}; "
            "pass e.g. optimizer=lambda params: torch.optim.SGD(params, lr=0.1)"
        ) from e
    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(
            f"optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer; "
            "pass e.g. optimizer=lambda params: torch.optim.SGD(params, lr=0.1)"
        )
    p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state.get(p, {})
    return sum(1 for v in state.values() if isinstance(v, torch.Tensor) and v.shape == p.shape)
