"""What every rank of a distributed run reads alike: the newest parameters, buffers and measurements.

Each is gathered collectively (every rank calls it) from the rank that holds it: the
parameters of stage s from replica 0's rank of stage s (``layout.rank_of(s, 0)``, under either
rank order), a buffer from its owning stage's (:func:`fxpipe.runtime.checkpoint.buffer_owners`),
measurements from every rank.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Gathered"]


class Gathered:
    """Collective reads of :class:`fxpipe.runtime.distributed.DistributedExecutor` (a mixin of it)."""

    # set by DistributedExecutor.__init__
    d: int
    rank: int
    world: int
    stage: int
    replica: int
    device: torch.device
    program: Any
    layout: Any
    comm: Any
    stage_names: list[dict[str, str]]
    step_seconds: float
    _all_params: dict[str, torch.nn.Parameter]
    _canonical: dict[int, str]

    def drain(self) -> None:  # pragma: no cover - DistributedExecutor's
        raise NotImplementedError

    def gather_params(self) -> dict[str, torch.Tensor]:
        """Newest value of every canonical parameter, on every rank (collective; replica 0 is the source)."""
        self.drain()
        out: dict[str, torch.Tensor] = {}
        for s in range(self.d):
            by_dtype: dict[torch.dtype, list[str]] = {}
            for c in sorted(set(self.stage_names[s].values())):
                by_dtype.setdefault(self._all_params[c].dtype, []).append(c)
            src = self.layout.rank_of(s, 0)
            for dt, cs in by_dtype.items():
                if self.rank == src:
                    flat = torch.cat([self._all_params[c].detach().reshape(-1) for c in cs])
                else:
                    flat = torch.empty(sum(self._all_params[c].numel() for c in cs), dtype=dt, device=self.device)
                try:
                    dist.broadcast(flat, src=src)
                except Exception as e:  # noqa: BLE001
                    raise self.comm.fail("state_dict (gathering parameters)", e, src) from e
                off = 0
                for c in cs:
                    n = self._all_params[c].numel()
                    out.setdefault(c, flat[off:off + n].view(self._all_params[c].shape).cpu().clone())
                    off += n
        return out

    def gather_buffers(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Every persistent buffer of ``model`` as its owning stage's replica-0 rank holds it (collective).

        A rank only runs its own stage, so its copy of another stage's buffers (BatchNorm statistics)
        is stale; each buffer comes from the lowest stage holding it (checkpoint.buffer_owners).
        """
        from fxpipe.runtime.checkpoint import buffer_owners

        owners = buffer_owners(self.program, model)
        sd = model.state_dict(keep_vars=True)
        out: dict[str, torch.Tensor] = {}
        for name in sorted(owners, key=lambda n: (owners[n], n)):
            src = self.layout.rank_of(owners[name], 0)
            b = sd[name].detach()
            wire = b.to(self.device).clone() if b.dtype != torch.bool else b.to(self.device, torch.uint8)
            try:
                dist.broadcast(wire, src=src)
            except Exception as e:  # noqa: BLE001
                raise self.comm.fail(f"state_dict (gathering buffer {name!r})", e, src) from e
            out[name] = wire.to(b.dtype).cpu()
        return out

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The full model state (original names) on every rank; collective."""
        gathered = self.gather_params()
        buffers = self.gather_buffers(model)
        out = {}
        for k, v in model.state_dict(keep_vars=True).items():
            c = self._canonical.get(id(v)) if isinstance(v, torch.nn.Parameter) else None
            out[k] = gathered[c].clone() if c is not None else \
                buffers[k].clone() if k in buffers else v.detach().cpu().clone()
        return out

    def gather_measurements(self) -> list[dict[str, Any]]:
        """Every rank's measurements of its last step, on every rank (collective), in rank order.

        Each entry: rank, stage, replica, fwd/bwd (median seconds per microbatch), saved (median bytes),
        compute (seconds of forward+backward in the last m microbatches), wait and wall (last step).
        """
        self.drain()     # a peer may be blocked in this batch's update (tied weights) until we finish it
        med = lambda xs: float(statistics.median(xs)) if xs else 0.0  # noqa: E731
        mine = {"rank": self.rank, "stage": self.stage, "replica": self.replica,
                "fwd": med(self.fwd_seconds), "bwd": med(self.bwd_seconds), "saved": int(med(self.saved_bytes)),
                "compute": float(sum(self.fwd_seconds) + sum(self.bwd_seconds)),
                "wait": self.wait_seconds, "wall": self.step_seconds}
        out: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(out, mine, group=self.layout.loss_group)
        except Exception as e:  # noqa: BLE001
            raise self.comm.fail("report (gathering measurements)", e) from e
        return out
