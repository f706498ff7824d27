"""Mixed precision at run time: the autocast of stage forwards, and dynamic loss scaling for fp16.

    precision   forward + loss                       backward          update
    "fp32"      as the model is                      -                 -
    "bf16"      torch.autocast(device, bfloat16)     outside autocast  fp32 master weights
    "fp16"      torch.autocast(device, float16)      loss x scale      unscale, skip on inf/NaN, grow/backoff

:class:`LossScaler` follows ``torch.amp.GradScaler``'s rule (the same defaults): the loss of
every microbatch is multiplied by ``scale`` before backward; before the optimizer step the
gradients are multiplied by ``1 / scale``; if any gradient of any stage (or replica) is
not finite, every stage skips the step and the scale is multiplied by ``backoff_factor``;
after ``growth_interval`` finite steps in a row it is multiplied by ``growth_factor``.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any

import torch

from fxpipe.errors import ConfigError
from fxpipe.precision import check_precision, compute_dtype, uses_autocast

__all__ = ["autocast", "check_device_precision", "LossScaler"]


def autocast(precision: str, device_type: str) -> Any:
    """The context a stage's forward and the loss run in: ``torch.autocast`` for bf16/fp16, else nothing."""
    if not uses_autocast(precision):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=compute_dtype(precision))


def check_device_precision(precision: Any, device_type: str) -> str:
    """``precision`` if the device can run it.

    Raises:
        ConfigError: unknown precision, or bf16/fp16 autocast unavailable on ``device_type``
            (e.g. fp16 on a CUDA GPU older than compute capability 5.3, or a device without autocast).
    """
    p = check_precision(precision)
    if not uses_autocast(p):
        return p
    dtype = compute_dtype(p)
    ok = torch.amp.is_autocast_available(device_type)
    if ok and device_type == "cuda" and torch.cuda.is_available():
        if p == "bf16":
            ok = torch.cuda.is_bf16_supported()
        else:
            ok = torch.cuda.get_device_capability() >= (5, 3)
    if not ok:
        other = "bf16" if p == "fp16" else "fp16"
        raise ConfigError(f"precision={p!r} needs torch.autocast with {dtype} on the {device_type!r} device, which "
                          f"this device does not support; use precision='fp32' (or {other!r} if the device has it), "
                          "or run on a device that supports it")
    return p


class LossScaler:
    """Dynamic loss scale with ``torch.amp.GradScaler`` semantics (one per pipeline, the same on every rank)."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000) -> None:
        self.scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.growth_tracker = 0
        self.skipped = 0                  # steps skipped so far (non-finite gradients)

    def inv_scale(self) -> torch.Tensor:
        """``1 / scale`` as GradScaler computes it (in float64, then float32)."""
        return torch.tensor(self.scale, dtype=torch.float64).reciprocal().float()

    def update(self, found_inf: bool) -> None:
        """After a step: back off on overflow, else grow after ``growth_interval`` good steps."""
        if found_inf:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            self.skipped += 1
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.scale *= self.growth_factor
                self.growth_tracker = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "growth_tracker": self.growth_tracker,
                "skipped": self.skipped}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.scale = float(sd["scale"])
        self.growth_factor = float(sd["growth_factor"])
        self.backoff_factor = float(sd["backoff_factor"])
        self.growth_interval = int(sd["growth_interval"])
        self.growth_tracker = int(sd["growth_tracker"])
        self.skipped = int(sd.get("skipped", 0))


def autocast_output_dtypes(program: Any, example: list[Any], precision: str,
                           device: torch.device) -> dict[tuple[int, int], torch.dtype]:
    """(stage, output index) -> dtype of every stage output when the stages run under ``precision``'s autocast.

    Shape propagation ran without autocast, so the graph's dtypes are fp32 where autocast makes
    bf16/fp16; the distributed executor allocates its receive buffers from these.  Runs all stages
    once on fake tensors (no compute, no memory) with ``example`` (one microbatch, flat) on ``device``.
    """
    from torch._subclasses import FakeTensorMode
    from torch.func import functional_call

    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(t: Any) -> Any:
        return mode.from_tensor(t).to(device) if isinstance(t, torch.Tensor) else t

    out: dict[tuple[int, int], Any] = {}
    dtypes: dict[tuple[int, int], torch.dtype] = {}
    with mode, autocast(precision, device.type), torch.no_grad():
        for st in program.stages:
            args = []
            for src in st.sources:
                if src.kind == "input":
                    args.append(fake(example[src.index]))
                elif src.kind == "attr":
                    args.append(fake(operator.attrgetter(src.name)(program.root)))
                elif src.kind == "stage":
                    args.append(out[(src.stage, src.index)])
                else:
                    args.append(src.value)
            state = {n: fake(t) for n, t in list(st.module.named_parameters(remove_duplicate=False))
                     + list(st.module.named_buffers(remove_duplicate=False))}
            res = functional_call(st.module, state, tuple(args))
            res = tuple(res) if isinstance(res, (tuple, list)) else (res,)
            for k, o in enumerate(res):
                out[(st.index, k)] = o
                if isinstance(o, torch.Tensor):
                    dtypes[(st.index, k)] = o.dtype
    return dtypes
