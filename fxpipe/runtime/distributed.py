"""The distributed executor: one process per (stage, replica); activations and gradients go point to point.

The layout of ranks and groups is :mod:`fxpipe.runtime.groups`; the bounded sends,
receives and collectives :mod:`fxpipe.runtime.p2p`; what a stage computes
:class:`fxpipe.runtime.stage.StageRuntime`.  This module interprets this rank's
action list from :func:`fxpipe.runtime.schedules.build_schedule`:

* ``F``: receive the stage inputs from every producer (``batch_isend_irecv``),
  run, send each output to every consumer (sends are not waited for);
* ``B``: receive output gradients from every consumer, sum them, run backward,
  send input gradients to every producer;
* ``U``: all-reduce the gradient of the version used among the ranks that hold a
  copy of each parameter (replicas of the stage; for a tied parameter also the
  other stages reading it), divide by ``w``, step the optimizer (WeightVersions).
  Under 2bw the all-reduces are only posted at U(t) and the step is finished before
  the first forward of batch t + 2 (the first to use W(t+1)), so the exchange
  overlaps batch t + 1 instead of blocking the rank (about 10% per step for a tied
  GPT on 2 CPU ranks).

A skip connection goes straight from the producing rank to the consuming rank,
never through the stages between.  No flush between batches under 2bw:
``step(t)`` runs this rank's actions up to (not including) its first forward of
batch ``t + 1`` and returns the loss of batch ``t``; the rest of batch ``t`` (the
last backwards and ``U(t)``) runs at the start of ``step(t + 1)``, interleaved
with batch ``t + 1``'s forwards, as in the 2BW stream.  ``forward``,
``state_dict``, ``load_state_dict`` and checkpoints drain that backlog first (it
changes no number).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from fxpipe.errors import DistributedError
from fxpipe.ir import PipelineProgram, Plan
from fxpipe.runtime.gather import Gathered
from fxpipe.runtime.groups import (Layout, data_parallel_width, init_distributed, placement_order,  # noqa: F401
                                   replica_share, timeout_seconds)
from fxpipe.runtime.p2p import Comm
from fxpipe.runtime.schedules import Action, build_schedule, weight_version
from fxpipe.runtime.stage import (Key, StageRuntime, edge_meta, get_attr, stage_needs,  # noqa: F401
                                  stage_params)
from fxpipe.precision import uses_autocast
from fxpipe.runtime.amp import autocast_output_dtypes
from fxpipe.runtime.update import UpdateRule
from fxpipe.runtime.weights import WeightVersions

__all__ = ["DistributedExecutor", "init_distributed", "data_parallel_width", "replica_share",
           "timeout_seconds", "stage_params"]

_LOSS_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_get_attr = get_attr          # the name fxpipe.runtime.interop imported before the stage runtime existed


@functools.lru_cache(maxsize=64)
def _stage_rows(schedule: str, d: int, m: int, batches: int, stage: int) -> tuple[Action, ...]:
    """``build_schedule(...)[stage]``, built once: every step of a run asks for the same few lists."""
    return tuple(build_schedule(schedule, d, m, batches)[stage])


@functools.lru_cache(maxsize=64)
def _stream_rows(schedule: str, d: int, m: int, stage: int, j: int, extra: int) -> tuple[tuple[Action, ...], int, int]:
    """The stream's list for a batch k with ``j = min(k, 1)`` (k = 0 starts the stream, every later k
    looks alike), relative to batch ``max(k - 1, 0)``: (actions, start of batch k's segment, its stop)."""
    rows = _stage_rows(schedule, d, m, j + extra, stage)

    def first_f(batch: int) -> int:
        return next((i for i, a in enumerate(rows) if a.kind == "F" and a.microbatch // m >= batch), len(rows))

    return rows, (0 if j == 0 else first_f(j)), first_f(j + 1)


class DistributedExecutor(Gathered):
    """Runs this process's stage of a PipelineProgram; see the module docstring for the layout.

    Args:
        program: the split pipeline (every rank holds all of it; it runs one stage).
        canonical: id(parameter) -> canonical name.
        params: canonical name -> the model's parameter (this process's copy).
        optimizer: optimizer factory, called with this stage's parameters.
        plan: the Plan (schedule, microbatches, recompute flags).
        loss_fn: ``loss_fn(output, targets) -> scalar`` (run on the last stage).
    """

    def __init__(self, program: PipelineProgram, canonical: dict[int, str],
                 params: dict[str, torch.nn.Parameter], optimizer: Callable | None, plan: Plan,
                 loss_fn: Callable[..., torch.Tensor] | None, *, precision: str = "fp32",
                 rule: UpdateRule | None = None, lr_scheduler: Callable | None = None,
                 example: list[Any] | None = None) -> None:
        order = placement_order(plan)       # the rank order the plan was priced for (checked first)
        init_distributed()
        self.rule = rule or UpdateRule()
        self.last_grad_norm: float | None = None   # global gradient norm of the last update (clipping / fp16)
        self.last_grad_norm_batch: int | None = None   # the batch whose gradient that norm is
        self.program = program
        self.plan = plan
        self.schedule = plan.schedule
        self.d = d = program.num_stages
        self.m = plan.num_microbatches
        self.stage_names = stage_params(program, canonical)
        self.layout = lay = Layout(d, self.stage_names, order)
        self.rank, self.world, self.w, self.stage, self.replica = lay.rank, lay.world, lay.w, lay.stage, lay.replica
        self.tied = lay.tied
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
        self.comm = Comm(lay, self.device)
        self.timeout = self.comm.timeout
        self._canonical = canonical
        self._all_params = params

        # -- this stage keeps a copy of every parameter it reads (tied ones too) and owns all of them
        self.param_names = self.stage_names[self.stage]
        mine = sorted(set(self.param_names.values()))
        if self.device.type != "cpu":
            for c in mine:
                params[c].data = params[c].data.to(self.device)
            program.stages[self.stage].module.to(self.device)
        self.weights = WeightVersions({c: params[c] for c in mine}, optimizer, self.schedule, lr_scheduler)
        self._needs = stage_needs(program)
        self.runtime = StageRuntime(program, self.stage, self._needs, self.param_names,
                                    {c: self.weights for c in mine},
                                    recompute=bool(plan.stages[self.stage].recompute), loss_fn=loss_fn,
                                    num_microbatches=self.m, device=None if self.device.type == "cpu" else self.device,
                                    keep=self.m, precision=precision, scaler=self.rule.scaler)
        self.runtime.weights, self.runtime.owned = self.weights, mine
        self._meta = edge_meta(program, self._needs)
        if uses_autocast(precision) and example is not None:   # autocast changes what stages exchange
            for key, dt in autocast_output_dtypes(program, example, precision, self.device).items():
                if key in self._meta:
                    self._meta[key] = (self._meta[key][0], dt)
        # the tensors whose norm this rank adds to the global one: tied ones on their lowest stage, replica 0
        self._counted = [c for c in mine if self.replica == 0 and self.tied.get(c, [self.stage])[0] == self.stage]
        self.producers, self.consumers = self.runtime.producers, self.runtime.consumers
        self._routes: dict[tuple, list] = {}   # _grad_keys / _recv_pairs, the same every step

        # -- state
        self.batch = 0                    # batches whose step() returned
        self._stream_base: int | None = None   # batch where the current 2BW stream started (None: drained)
        self._inputs: dict[int, list[Any]] = {}
        self._targets: dict[int, Any] = {}
        self._losses: dict[int, list[torch.Tensor]] = {}
        self._loss_work: dict[int, tuple[Any, torch.Tensor]] = {}
        self._prefetched: dict[tuple[str, int], tuple] = {}
        self._pending_update: tuple[int, dict[str, Any], list[tuple[Any, torch.Tensor, list[str]]]] | None = None
        self.step_seconds = 0.0            # wall time of the last step

    # -- what tests, reports and checkpoints read -----------------------------------
    @property
    def _saved(self) -> dict:
        return self.runtime.saved

    @property
    def _sends(self) -> Any:
        return self.comm._sends

    @property
    def fwd_seconds(self) -> list[float]:
        return self.runtime.fwd_seconds

    @property
    def bwd_seconds(self) -> list[float]:
        return self.runtime.bwd_seconds

    @property
    def saved_bytes(self) -> list[int]:
        return self.runtime.saved_bytes

    @property
    def wait_seconds(self) -> float:
        """Seconds blocked on receives / all-reduces during the last step."""
        return self.comm.wait_seconds

    def rank_of(self, stage: int, replica: int | None = None) -> int:
        return self.layout.rank_of(stage, replica)

    def _where(self, rank: int | None = None) -> str:
        return self.layout.where(rank)

    def agree(self, ok: bool, what: str) -> bool:
        """True on every rank iff ``ok`` on every rank (collective)."""
        return self.comm.agree(ok, what)

    def weight_versions(self) -> list[WeightVersions]:
        """The versions (and optimizer) of this rank's stage."""
        return [self.weights]

    # -- routing ------------------------------------------------------------------------
    def _grad_keys(self, producer: int, consumer: int) -> list[int]:
        if (hit := self._routes.get(("grad", producer, consumer))) is None:
            hit = self._routes["grad", producer, consumer] = [
                k for p, k in self._needs[consumer] if p == producer and self._meta[(p, k)][1].is_floating_point]
        return hit

    def _recv_pairs(self, kind: str) -> list[tuple[int, list[tuple[torch.Size, torch.dtype]]]]:
        """What an F (inputs from producers) or a B (output gradients from consumers) of this stage receives."""
        if (hit := self._routes.get(("recv", kind))) is not None:
            return hit
        if kind == "F":
            need = self._needs[self.stage]
            hit = [(p, [self._meta[(p, k)] for q, k in need if q == p]) for p in self.producers]
        else:
            hit = [(c, [self._meta[(self.stage, k)] for k in self._grad_keys(self.stage, c)])
                   for c in self.consumers if self._grad_keys(self.stage, c)]
        self._routes["recv", kind] = hit
        return hit

    def _prefetch(self, kind: str, mb: int) -> None:
        """Post the receives of a later F/B now, so its data arrives while this rank computes."""
        if (kind, mb) not in self._prefetched:
            pairs = self._recv_pairs(kind)
            if pairs:
                self._prefetched[(kind, mb)] = self.comm.post_recv(pairs, f"{self.stage}{kind}{mb}")

    def _receive(self, kind: str, mb: int | None, what: str) -> dict[int, list[torch.Tensor]]:
        posted = self._prefetched.pop((kind, mb), None) if mb is not None else None
        if posted is None:
            posted = self.comm.post_recv(self._recv_pairs(kind), what)
        return self.comm.finish_recv(posted, what)

    def _receive_inputs(self, what: str, mb: int | None = None) -> dict[Key, torch.Tensor]:
        got = self._receive("F", mb, what)
        need = self._needs[self.stage]
        return {key: t for p in self.producers for key, t in zip([x for x in need if x[0] == p], got[p])}

    def _send_outputs(self, outs: tuple[Any, ...], what: str, batch: int) -> None:
        self.comm.send([(c, [outs[k] for p, k in self._needs[c] if p == self.stage]) for c in self.consumers], what,
                       batch)

    # -- actions --------------------------------------------------------------
    def _forward(self, mb: int) -> None:
        batch = mb // self.m
        if self._pending_update is not None and batch >= self._pending_update[0] + 2:
            self._finish_update()          # this batch computes with the weights that update makes
        what = f"{self.stage}F{mb} (batch {batch})"
        received = self._receive_inputs(what, mb)
        version = weight_version(self.schedule, Action(self.stage, "F", mb), self.m)
        target = self._targets.pop(mb) if self.runtime.is_last else None
        outs, loss = self.runtime.forward(mb, self._inputs.pop(mb), received, version, target)
        self._send_outputs(outs, what, batch)
        if loss is not None:
            self._losses.setdefault(batch, []).append(loss)
            if len(self._losses[batch]) == self.m:
                self._start_loss_reduce(batch)

    def _backward(self, mb: int) -> None:
        if self.rule.scaler is not None and self._pending_update is not None and \
                mb // self.m >= self._pending_update[0] + 1:
            self._finish_update()          # this batch's loss is scaled by the scale that update sets
        what = f"{self.stage}B{mb} (batch {mb // self.m})"
        got = self._receive("B", mb, what)
        grads: dict[int, torch.Tensor] = {}
        for c in self.consumers:
            for k, g in zip(self._grad_keys(self.stage, c), got.get(c, [])):
                grads[k] = g if k not in grads else grads[k] + g
        in_grads = self.runtime.backward(mb, grads)
        pairs = []
        for p in self.producers:
            ks = self._grad_keys(p, self.stage)
            if ks:
                pairs.append((p, [g if (g := in_grads.get((p, k))) is not None
                                  else torch.zeros(self._meta[(p, k)][0], dtype=self._meta[(p, k)][1],
                                                   device=self.device) for k in ks]))
        self.comm.send(pairs, what, mb // self.m)

    def _update(self, batch: int) -> None:
        """U(batch): all-reduce the gradient of the version the batch used, then step the optimizer.

        Under 2bw the all-reduces are only posted here and the step is finished later
        (:meth:`_finish_update`), at the latest before the first forward of batch + 2, the
        first batch that computes with the new weights: the gradient exchange among replicas
        and tied stages then overlaps batch + 1's compute instead of stalling this rank.
        """
        self._finish_update()
        used = weight_version(self.schedule, Action(self.stage, "F", batch * self.m), self.m)   # what batch used
        leaves = self.weights.leaves(used)
        grads = self.weights.take_grads(batch)
        posted = []
        what = f"{self.stage}U{batch} (gradient all-reduce)"
        for group, names in self.layout.grad_groups:
            by_dtype: dict[torch.dtype, list[str]] = {}
            for c in names:
                by_dtype.setdefault(leaves[c].dtype, []).append(c)
            for dt, cs in by_dtype.items():
                parts = [(grads[c] if grads[c] is not None else torch.zeros_like(leaves[c])).reshape(-1)
                         for c in cs]
                flags = torch.tensor([float(grads[c] is not None) for c in cs], dtype=dt, device=self.device)
                flat = torch.cat(parts + [flags])
                posted.append((self.comm.all_reduce(flat, group, what), flat, cs))
        self._pending_update = (batch, grads, posted)
        if self.schedule != "2bw" or (not posted and not self.rule.is_global):
            self._finish_update()
        # 2bw with clipping / fp16: the global norm is agreed when it is needed, in the same step() on
        # every rank (first backward of batch + 1 for the loss scale, else first forward of batch + 2)

    def _finish_update(self) -> None:
        """Wait for the pending U's all-reduces and step the optimizer (no-op if none is pending)."""
        if self._pending_update is None:
            return
        batch, grads, posted = self._pending_update
        self._pending_update = None
        for work, flat, cs in posted:
            self.comm.wait([work], f"{self.stage}U{batch} (gradient all-reduce)", [])
            off = 0
            present = flat[len(flat) - len(cs):].tolist()    # one device sync for all of them, not one each
            for c, here in zip(cs, present):
                shape = self.weights.params[c].shape
                n = shape.numel()
                grads[c] = (flat[off:off + n].view(shape) / self.w) if here > 0 else None
                off += n
        if not self.rule.is_global:
            self.weights.update(batch, grads=grads)
            return
        grads = self.rule.unscale(grads)
        sumsq, bad = self.rule.stats(grads[c] for c in self._counted)
        buf = torch.tensor([sumsq, bad], dtype=torch.float64, device=self.device)
        what = f"{self.stage}U{batch} (global gradient norm)"
        self.comm.wait([self.comm.all_reduce(buf, self.layout.stats_group, what)], what, [])
        dec = self.rule.decide(float(buf[0].item()), float(buf[1].item()))
        self.last_grad_norm, self.last_grad_norm_batch = dec.norm, batch
        self.weights.update(batch, grads=self.rule.apply(grads, dec), skip=dec.skip)

    def _start_loss_reduce(self, batch: int) -> None:
        """The mean loss of ``batch`` on its way to every rank (once per batch).

        The last stage has it after its last forward of the batch: it averages it over the
        replicas' last stages (an all-reduce among them, when w > 1) and sends it to the other
        stages of its pipeline, which posted the receive when the step began.  Nothing waits for
        all ranks, so under 2bw the first stage starts batch t + 1 while the last one still runs
        batch t's last backward (an all-reduce over every rank made it wait for that, ~3% a step).
        """
        if batch in self._loss_work:
            return
        what = f"loss of batch {batch}"
        if self.stage != self.d - 1:
            self._loss_work[batch] = self.comm.post_loss_recv(self.rank_of(self.d - 1), what)
            return
        ls = self._losses.pop(batch)
        code = float(_LOSS_DTYPES.index(ls[0].dtype) if ls[0].dtype in _LOSS_DTYPES else 0)
        # filled on the device, not through .item(): on a GPU the backwards that follow queue without a sync
        buf = torch.empty(2, dtype=torch.float64, device=self.device)
        buf[0] = torch.stack([x.double() for x in ls]).sum().to(self.device) / (self.m * self.w)
        buf[1] = code / self.w
        if self.w > 1:
            self.comm.wait([self.comm.all_reduce(buf, self.layout.dp_groups[self.stage], what)], what, [])
        self.comm.send_loss(buf, [self.rank_of(s) for s in range(self.d - 1)], batch, what)
        self._loss_work[batch] = (None, buf)

    def _run(self, actions: Sequence[Action], shift: int) -> None:
        """Run ``actions`` (a stream-relative list) moved ``shift`` batches on: F/B microbatch i runs as
        i + shift * m, U of batch b as b + shift."""
        n, m = len(actions), self.m
        for i, a in enumerate(actions):
            kind = a.kind
            mb = a.microbatch + (shift if kind == "U" else shift * m)
            try:
                if kind != "U":
                    self._prefetch(kind, mb)   # in list order, so receives match the peers' send order
                    if i + 1 < n and (b := actions[i + 1]).kind != "U":
                        self._prefetch(b.kind, b.microbatch + shift * m)
                if kind == "F":
                    self._forward(mb)
                elif kind == "B":
                    self._backward(mb)
                else:
                    self._update(mb)
            except DistributedError:
                raise
            except Exception as e:  # noqa: BLE001 - the user's loss or model raised
                raise self.comm.fail(f"action {self.stage}{kind}{mb}", e) from e

    # -- the 2BW stream, cut into per-batch segments ------------------------------
    def _segment(self, k: int) -> tuple[Sequence[Action], int]:
        """Stream-local batch k's actions, relative to batch max(k - 1, 0), and that batch."""
        rows, start, stop = _stream_rows(self.schedule, self.d, self.m, self.stage, min(k, 1), 2)
        return rows[start:stop], max(k - 1, 0)

    def _drain_list(self, k: int) -> tuple[Sequence[Action], int]:
        """What is left of the stream after batch k's segment: its last backwards and U."""
        _, _, stop = _stream_rows(self.schedule, self.d, self.m, self.stage, min(k, 1), 2)
        rows, _, _ = _stream_rows(self.schedule, self.d, self.m, self.stage, min(k, 1), 1)
        return rows[stop:], max(k - 1, 0)

    def drain(self) -> None:
        """Run the rest of the last batch (its last backwards and U); collective over all ranks."""
        self.comm.check_alive()
        if self._stream_base is not None:
            acts, base = self._drain_list(self.batch - 1 - self._stream_base)
            self._run(acts, self._stream_base + base)
            self._stream_base = None
        self._finish_update()
        self.comm.reap_sends(wait=True)

    # -- API used by Pipeline ---------------------------------------------------
    def shard(self, tree: Any) -> Any:
        """This replica's share of a full batch (every rank is given the same batch)."""
        return replica_share(tree, self.w, self.replica)

    def step(self, inputs: list[list[Any]], targets: list[Any]) -> torch.Tensor:
        """Train batch ``self.batch`` (this replica's m microbatches); returns the mean loss over all replicas."""
        self.comm.check_alive()
        start, self.comm.wait_seconds = time.perf_counter(), 0.0
        t = self.batch
        if self._stream_base is None:
            self._stream_base = t
        base = self._stream_base
        k = t - base
        for j in range(self.m):
            self._inputs[t * self.m + j] = inputs[j]
            if self.stage == self.d - 1:
                self._targets[t * self.m + j] = targets[j]
        if self.stage != self.d - 1:
            self._start_loss_reduce(t)     # post the receive of the loss the last stage will send
        acts, at = self._segment(k)
        self._run(acts, base + at)
        work, buf = self._loss_work.pop(t)
        if work is not None:
            self.comm.wait([work], f"loss of batch {t}", [self.rank_of(self.d - 1)])
        # every rank has now passed its last forward of batch t (the last stage needed them), hence (2bw: F of t
        # computes with W(t-1), made by U(t-2) after every backward of t-2) every receive of batches <= t-2
        self.comm.reap_sends(upto=t - 2)
        self.batch += 1
        if self.schedule != "2bw" or k > 10_000:
            self.drain()           # nothing left to drain for flush/gpipe; keeps 2bw indices bounded
        self.step_seconds = time.perf_counter() - start
        dtype = _LOSS_DTYPES[int(round(buf[1].item()))]
        return buf[0].to(dtype).cpu()

    def _forward_only(self, inputs: list[list[Any]], what: str, keep: Callable[[int, Any], Any]) -> list[Any]:
        """Run every microbatch forward through this rank's stage with the newest weights, after a drain;
        ``keep(microbatch, model output)`` of each where this rank's stage has the model's output (the last
        stage). A failure in either is reported to the peers like one in a step."""
        self.drain()
        out = []
        try:
            for j, mb_inputs in enumerate(inputs):
                name = f"{what} microbatch {j}"
                outs, model_out = self.runtime.forward_only(mb_inputs, self._receive_inputs(name))
                self._send_outputs(outs, name, self.batch)
                if model_out is not None:
                    out.append(keep(j, model_out))
        except DistributedError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self.comm.fail(what, e) from e
        self.comm.reap_sends(wait=True)
        return out

    @torch.no_grad()
    def evaluate(self, inputs: list[list[Any]], targets: list[Any]) -> torch.Tensor:
        """Mean loss over every replica's microbatches with the newest weights (collective)."""
        losses = self._forward_only(inputs, "evaluate", lambda j, out: self.runtime.eval_loss(out, targets[j]))
        total = float(torch.stack([x.double() for x in losses]).sum().item()) if losses else 0.0
        code = float(_LOSS_DTYPES.index(losses[0].dtype) if losses and losses[0].dtype in _LOSS_DTYPES else 0)
        buf = torch.tensor([total / (len(inputs) * self.w), code / self.w], dtype=torch.float64, device=self.device)
        self.comm.wait([self.comm.all_reduce(buf, self.layout.loss_group, "evaluate (mean loss)")],
                       "evaluate (mean loss)", [])
        return buf[0].to(_LOSS_DTYPES[int(round(buf[1].item()))]).cpu()

    @torch.no_grad()
    def forward(self, inputs: list[list[Any]]) -> list[Any]:
        """Outputs of every microbatch of every replica (on every rank), with the newest weights."""
        results = self._forward_only(inputs, "forward", lambda _, out: pytree.tree_map(
            lambda x: x.cpu() if isinstance(x, torch.Tensor) else x, out))
        gathered: list[Any] = []
        for r in range(self.w):
            src = self.rank_of(self.d - 1, r)
            obj = [results if self.rank == src else None]
            try:
                dist.broadcast_object_list(obj, src=src)
            except Exception as e:  # noqa: BLE001
                raise self.comm.fail("forward (gathering outputs)", e, src) from e
            gathered += obj[0]
        return gathered

    def load_state_dict(self, model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
        """Every rank loads the same full state dict; both 2BW versions become these weights."""
        self.drain()
        with torch.no_grad():
            for k, t in model.state_dict().items():
                t.copy_(sd[k].to(t.dtype))
        self.weights.reset()
        self.reset(0)
        self.comm.barrier("load_state_dict")

    def reset(self, batch: int) -> None:
        """After new weights were loaded: the next step trains batch ``batch``."""
        self.batch = batch
