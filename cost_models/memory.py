"""The memory model of docs/cost-model.md: bytes a pipeline stage holds on its device.

For stage s of d, per device::

    M_s = P_s * (1 weights + 1 grads + k optimizer slots + [1 second version if 2bw])
        + (r_s ? n_s * I_s + A_s : n_s * (A_s + X_s))
    n_s = min(d - s, m) for 2bw / flush (1F1B),   m for gpipe

A_s: bytes autograd saves in the stage (a tensor saved by several nodes counted
once, charged to the node that produced it); I_s: every tensor entering the stage
(model inputs included); X_s <= I_s: the tensors received from earlier stages.
The executor keeps each received tensor of an in-flight microbatch until that
microbatch's backward (the gradient sent back is read from it), so X_s is held
per in-flight microbatch even when no node of the stage saves it; a recomputing
stage holds all its inputs and, during one backward, its whole A_s.

Worked example: P=100, A=10, I=X=2, d=4, s=1, m=8, SGD (k=0), 2bw:
n=3, M = 100*3 + 3*(10+2) = 336 without recompute, 100*3 + 3*2 + 10 = 316 with it.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from fxpipe.errors import ConfigError

__all__ = ["in_flight", "weight_copies", "stage_memory", "optimizer_slots"]


def in_flight(schedule: str, num_stages: int, stage: int, num_microbatches: int) -> int:
    """n_s: microbatches whose activations stage ``stage`` holds at once."""
    if schedule == "gpipe":
        return num_microbatches
    return min(num_stages - stage, num_microbatches)


def weight_copies(schedule: str, optimizer_slots: int) -> int:
    """How many parameter-sized tensors a stage keeps per parameter."""
    return 2 + optimizer_slots + (1 if schedule == "2bw" else 0)


def stage_memory(*, param_bytes: int, activation_bytes: int, input_bytes: int, in_flight: int,
                 recompute: bool, optimizer_slots: int, schedule: str, received_bytes: int = 0) -> int:
    """M_s in bytes (see the module docstring); ``received_bytes`` is X_s."""
    weights = param_bytes * weight_copies(schedule, optimizer_slots)
    if recompute:
        stash = in_flight * input_bytes + activation_bytes
    else:
        stash = in_flight * (activation_bytes + received_bytes)
    return int(weights + stash)


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
