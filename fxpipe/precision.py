"""Training precision: the names users pass as ``precision=`` and what each means in dtypes and bytes.

    precision   compute dtype (autocast)   master weights / grads / optimizer state   loss scaling
    "fp32"      float32 (no autocast)      float32                                    no
    "bf16"      bfloat16                   float32                                    no
    "fp16"      float16                    float32                                    dynamic (GradScaler)

Both the planner (bytes of weights, copies, activations; the device's FLOP rate) and the runtime
(autocast, loss scaling) read these definitions, so the two agree.
"""

from __future__ import annotations

import torch

from fxpipe.errors import ConfigError

__all__ = ["PRECISIONS", "check_precision", "compute_dtype", "uses_autocast", "uses_loss_scaling"]

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: object) -> str:
    """Return ``precision`` if it names a known precision.

    Raises:
        ConfigError: anything else, naming the value and the choices.
    """
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(map(repr, PRECISIONS))} "
                          "(bf16/fp16 run the forward under torch.autocast and keep fp32 master weights)")
    return precision


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls and activations use under ``precision``."""
    return _DTYPES[check_precision(precision)]


def uses_autocast(precision: str) -> bool:
    """True when stage forwards run under ``torch.autocast``."""
    return check_precision(precision) != "fp32"


def uses_loss_scaling(precision: str) -> bool:
    """True when the loss is scaled dynamically (``torch.amp.GradScaler`` semantics)."""
    return check_precision(precision) == "fp16"
