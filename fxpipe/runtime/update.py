"""Between the gradients and the optimizer step: unscale (fp16), the global norm, clipping, skipping on overflow.

One batch's update on every stage (and replica) follows the single-device loop::

    scaler.unscale_(opt)                                   grads x 1/scale             (fp16)
    norm = clip_grad_norm_(model.parameters(), max_norm)   one norm over ALL stages    (max_grad_norm)
    scaler.step(opt); scaler.update()                      every stage skips together  (fp16)
    sched.step()                                           once per batch, even when skipped

Each stage computes ``stats`` over the gradients it counts (a tied parameter on its lowest
stage, replicas on replica 0 only, after their all-reduce), the executor sums them over all
stages (locally, or with one all-reduce), and every stage then applies the same
:meth:`UpdateRule.decide` result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from fxpipe.runtime.amp import LossScaler

__all__ = ["UpdateRule", "Decision"]


@dataclass(frozen=True)
class Decision:
    """What every stage does with this batch's gradients."""

    skip: bool                 # non-finite gradients (fp16): no optimizer step anywhere
    coef: float | None         # multiply every gradient by this (clipping), None: leave them
    norm: float | None         # the global L2 norm of the (unscaled) gradients, None if not computed


class UpdateRule:
    """The gradient pipeline of one Pipeline: ``max_grad_norm`` (None: no clipping) and a loss scaler (fp16)."""

    def __init__(self, max_grad_norm: float | None = None, scaler: LossScaler | None = None) -> None:
        self.max_grad_norm = max_grad_norm
        self.scaler = scaler

    @property
    def is_global(self) -> bool:
        """True when a stage's update depends on every stage's gradients (clipping or loss scaling)."""
        return self.max_grad_norm is not None or self.scaler is not None

    def unscale(self, grads: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
        """Gradients divided by the loss scale (unchanged without a scaler)."""
        if self.scaler is None:
            return grads
        inv = self.scaler.inv_scale()
        return {k: (g * inv.to(g.device) if g is not None else None) for k, g in grads.items()}

    @staticmethod
    def stats(grads: Iterable[torch.Tensor | None]) -> tuple[float, float]:
        """(sum of squared per-parameter L2 norms, 1.0 if any value is not finite else 0.0)."""
        total = 0.0
        bad = 0.0
        for g in grads:
            if g is None:
                continue
            n = float(torch.linalg.vector_norm(g, 2).double().item())
            if not math.isfinite(n):
                bad = 1.0
            total += n * n
        return total, bad

    def decide(self, sumsq: float, found_inf: float) -> Decision:
        """The decision for summed :meth:`stats`; updates the scaler (call once per batch)."""
        skip = self.scaler is not None and found_inf > 0
        norm = math.sqrt(sumsq) if not found_inf else math.inf
        coef = None
        if self.max_grad_norm is not None and not skip:
            coef = min(self.max_grad_norm / (norm + 1e-6), 1.0)
        if self.scaler is not None:
            self.scaler.update(skip)
        return Decision(skip=skip, coef=coef if coef is not None and coef < 1.0 else None, norm=norm)

    @staticmethod
    def apply(grads: dict[str, torch.Tensor | None], d: Decision) -> dict[str, torch.Tensor | None]:
        """Gradients scaled by the decision's clip coefficient."""
        if d.coef is None:
            return grads
        return {k: (g * d.coef if g is not None else None) for k, g in grads.items()}
