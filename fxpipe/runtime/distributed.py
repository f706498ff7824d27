"""The distributed executor: one process per (stage, replica); activations and gradients go point to point.

Rank layout (``d`` stages, ``w`` data-parallel replicas, ``WORLD_SIZE = d * w``)::

    rank = replica * d + stage

                 stage 0    stage 1    stage 2
    replica 0:   rank 0 ──▶ rank 1 ──▶ rank 2        pipeline group of replica 0
    replica 1:   rank 3 ──▶ rank 4 ──▶ rank 5        pipeline group of replica 1
                   └ data-parallel group of stage 0: ranks {0, 3}

A skip connection goes straight from the producing rank to the consuming rank
(stage 0 ─▶ stage 2 above), never through stage 1.  Every rank interprets its
own action list from :func:`fxpipe.runtime.schedules.build_schedule`:

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

No flush between batches under 2bw: ``step(t)`` runs this rank's actions up to
(not including) its first forward of batch ``t + 1`` and returns the loss of
batch ``t``; the rest of batch ``t`` (the last backwards and ``U(t)``) runs at the
start of ``step(t + 1)``, interleaved with batch ``t + 1``'s forwards, as in the
2BW stream.  ``forward``, ``state_dict``, ``load_state_dict`` and checkpoints
drain that backlog first (it changes no number).

Faults: every wait is bounded by ``FXPIPE_TIMEOUT`` seconds (default 60; it is
also the process-group timeout).  A rank whose action raises (or whose peer died)
raises :class:`fxpipe.errors.DistributedError` naming rank, stage and action, and
arms a watchdog that ends the process with exit code 1 after
``FXPIPE_ABORT_GRACE`` seconds (default 10; 0 disables) in case the program
catches the error or hangs while shutting down.  Peers blocked on the failed rank
then see its connection close and fail the same way.
"""

from __future__ import annotations

import collections
import faulthandler
import os
import sys
import time
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

try:  # torch >= 2.4: backward from an autograd edge
    from torch.autograd.graph import GradientEdge, get_gradient_edge
except ImportError:  # pragma: no cover - older torch keeps the output tensors
    GradientEdge = None  # type: ignore[assignment,misc]
    get_gradient_edge = None  # type: ignore[assignment]

from fxpipe.errors import ConfigError, DistributedError, InputError
from fxpipe.ir import Plan
from fxpipe.passes.split import PipelineProgram, Source
from fxpipe.runtime.schedules import Action, build_schedule
from fxpipe.runtime.weights import WeightVersions, version_for_batch
from fxpipe.runtime.executor import SavedBytes, _detach_input, _get_attr, check_loss, stage_param_names

__all__ = ["DistributedExecutor", "init_distributed", "data_parallel_width", "replica_share",
           "timeout_seconds", "stage_params"]

_LOSS_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def timeout_seconds() -> float:
    """Seconds any distributed wait may take (env ``FXPIPE_TIMEOUT``, default 60)."""
    raw = os.environ.get("FXPIPE_TIMEOUT", "60")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"FXPIPE_TIMEOUT={raw!r} is not a number of seconds; set e.g. FXPIPE_TIMEOUT=120") from None
    if value <= 0:
        raise ConfigError(f"FXPIPE_TIMEOUT must be > 0 seconds, got {value}")
    return value


def init_distributed() -> None:
    """Initialise the default process group from the environment (torchrun's variables) if needed.

    Backend: NCCL when CUDA is available (device ``cuda:LOCAL_RANK``), gloo otherwise.

    Raises:
        DistributedError: RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT are missing or rendezvous fails.
    """
    if dist.is_initialized():
        return
    _require_env()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds()))
    except Exception as e:  # noqa: BLE001 - any rendezvous failure
        raise DistributedError(f"rank {os.environ.get('RANK')}: init_process_group({backend!r}) failed: {e}; "
                               "check MASTER_ADDR/MASTER_PORT and that every rank was started") from e


def _require_env() -> None:
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"executor='distributed' needs a process group, and the environment lacks "
                               f"{missing}; launch with torchrun --nproc_per_node=N script.py, or call "
                               "torch.distributed.init_process_group(...) before fxpipe.compile")


def _world_size() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    _require_env()
    return int(os.environ["WORLD_SIZE"])


def data_parallel_width(num_stages: int) -> int:
    """w = WORLD_SIZE // num_stages.

    Raises:
        DistributedError: no process group and no torchrun environment.
        ConfigError: WORLD_SIZE is not a multiple of ``num_stages``.
    """
    world = _world_size()
    if world % num_stages != 0:
        raise ConfigError(f"WORLD_SIZE={world} is not a multiple of num_stages={num_stages}: the distributed "
                          f"executor runs one process per (stage, replica); launch {num_stages} x w processes "
                          f"(e.g. torchrun --nproc_per_node={num_stages}) or change num_stages")
    return world // num_stages


def replica_share(tree: Any, w: int, replica: int) -> Any:
    """The contiguous ``replica``-th of ``w`` equal shares (dim 0) of every tensor in ``tree``.

    Raises:
        InputError: a tensor's batch is not divisible by ``w``.
    """
    if w == 1:
        return tree

    def cut(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if x.dim() == 0 or x.shape[0] % w != 0:
            raise InputError(f"a tensor of shape {tuple(x.shape)} cannot be split among {w} data-parallel "
                             f"replicas: its batch dimension (dim 0) must be divisible by {w} "
                             "(x num_microbatches); use a batch size that is a multiple of both")
        n = x.shape[0] // w
        return x[replica * n:(replica + 1) * n]

    return pytree.tree_map(cut, tree)


def stage_params(program: PipelineProgram, canonical: dict[int, str]) -> list[dict[str, str]]:
    """Per stage: stage-module parameter name (or attr name) -> canonical name, tied parameters included."""
    return [stage_param_names(program, st, canonical) for st in program.stages]


def _edge(t: Any) -> Any:
    """What the backward of a sent output needs: its autograd edge, not its data.

    Keeping the output tensor until the microbatch's backward would hold its memory
    (Megatron frees it by swapping ``.data``); a ``GradientEdge`` keeps the graph and
    lets the storage go as soon as the send completes, unless autograd saved it.
    """
    if GradientEdge is not None and isinstance(t, torch.Tensor) and t.grad_fn is not None:
        return get_gradient_edge(t)
    return t


def _shift(a: Action, batches: int, m: int) -> Action:
    return Action(a.stage, a.kind, a.microbatch + (batches if a.kind == "U" else batches * m))


class DistributedExecutor:
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
                 loss_fn: Callable[..., torch.Tensor] | None) -> None:
        init_distributed()
        self.program = program
        self.plan = plan
        self.schedule = plan.schedule
        self.loss_fn = loss_fn
        self.d = d = program.num_stages
        self.m = plan.num_microbatches
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.w = data_parallel_width(d)
        self.stage = self.rank % d
        self.replica = self.rank // d
        self.timeout = timeout_seconds()
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
        self._canonical = canonical
        self._all_params = params
        self._failed: DistributedError | None = None

        # -- parameters: this stage keeps a copy of every parameter it reads (tied ones too)
        self.stage_names = stage_params(program, canonical)
        self.param_names = self.stage_names[self.stage]
        mine = sorted(set(self.param_names.values()))
        if self.device.type != "cpu":
            for c in mine:
                params[c].data = params[c].data.to(self.device)
            program.stages[self.stage].module.to(self.device)
        self.weights = WeightVersions({c: params[c] for c in mine}, optimizer, self.schedule)
        self.recompute = bool(plan.stages[self.stage].recompute)

        # -- process groups (every rank creates every group, in the same order)
        self.pipeline_groups = [dist.new_group([r * d + s for s in range(d)]) for r in range(self.w)]
        self.dp_groups = [dist.new_group([r * d + s for r in range(self.w)]) for s in range(d)]
        self.loss_group = dist.new_group(list(range(self.world)))
        users: dict[str, set[int]] = {}
        for s, names in enumerate(self.stage_names):
            for c in names.values():
                users.setdefault(c, set()).add(s)
        tied_sets = sorted({tuple(sorted(u)) for u in users.values() if len(u) > 1})
        tied_groups = {S: dist.new_group(sorted(r * d + s for r in range(self.w) for s in S)) for S in tied_sets}
        # (group, canonical names) whose gradients are summed in that group, then divided by w
        self._grad_groups: list[tuple[Any, list[str]]] = []
        local = [c for c in mine if len(users[c]) == 1]
        if local and self.w > 1:
            self._grad_groups.append((self.dp_groups[self.stage], local))
        for S, g in tied_groups.items():
            names = [c for c in mine if tuple(sorted(users[c])) == S]
            if names:
                self._grad_groups.append((g, names))
        self.tied = {c: sorted(u) for c, u in users.items() if len(u) > 1}

        # -- routing: which outputs (p, k) each stage needs from earlier stages
        self._needs: list[list[tuple[int, int]]] = []
        for st in program.stages:
            need = {(s.stage, s.index) for s in st.sources if s.kind == "stage"}
            if st.index == d - 1:
                need |= {(s.stage, s.index) for s in program.output_sources if s.kind == "stage" and s.stage != d - 1}
            self._needs.append(sorted(need))
        self._meta = self._edge_meta()
        self.producers = sorted({p for p, _ in self._needs[self.stage]})
        self.consumers = sorted({c for c in range(d) for p, _ in self._needs[c] if p == self.stage})

        # -- state
        self.batch = 0                    # batches whose step() returned
        self._stream_base: int | None = None   # batch where the current 2BW stream started (None: drained)
        self._inputs: dict[int, list[Any]] = {}
        self._targets: dict[int, Any] = {}
        self._saved: dict[int, tuple[dict[tuple[int, int], torch.Tensor], tuple[Any, ...], Any]] = {}
        self._losses: dict[int, list[torch.Tensor]] = {}
        self._loss_work: dict[int, tuple[Any, torch.Tensor]] = {}
        # posted sends, oldest first: (batch of the microbatch sent, Work, the tensor(s) it reads)
        self._sends: collections.deque[tuple[int, Any, Any]] = collections.deque()
        self._prefetched: dict[tuple[str, int], tuple] = {}
        self._pending_update: tuple[int, dict[str, Any], list[tuple[Any, torch.Tensor, list[str]]]] | None = None
        # measured, for pipe.report(): this stage's last m microbatches, and the last step's wall/wait time
        self.fwd_seconds: collections.deque[float] = collections.deque(maxlen=self.m)
        self.bwd_seconds: collections.deque[float] = collections.deque(maxlen=self.m)
        self.saved_bytes: collections.deque[int] = collections.deque(maxlen=self.m)
        self.wait_seconds = 0.0            # blocked on receives / all-reduces during the last step
        self.step_seconds = 0.0            # wall time of the last step

    # -- layout ---------------------------------------------------------------
    def rank_of(self, stage: int, replica: int | None = None) -> int:
        """Global rank of ``stage`` in ``replica`` (default: this process's replica)."""
        return (self.replica if replica is None else replica) * self.d + stage

    def _where(self, rank: int | None = None) -> str:
        r = self.rank if rank is None else rank
        return f"rank {r} (stage {r % self.d}, replica {r // self.d})"

    def _edge_meta(self) -> dict[tuple[int, int], tuple[torch.Size, torch.dtype]]:
        meta = {}
        for st in self.program.stages:
            out = next(n for n in st.module.graph.nodes if n.op == "output").args[0]
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for k, node in enumerate(outs):
                val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
                if val is None and isinstance(node, torch.fx.Node) and "tensor_meta" in node.meta:
                    val = node.meta["tensor_meta"]
                if val is not None and hasattr(val, "shape") and hasattr(val, "dtype"):
                    meta[(st.index, k)] = (torch.Size(val.shape), val.dtype)
        for c, need in enumerate(self._needs):
            for key in need:
                if key not in meta:
                    raise ConfigError(f"distributed executor: output {key[1]} of stage {key[0]} (read by stage {c}) "
                                      "has no static shape/dtype in node.meta['val']; run shape propagation "
                                      "(fxpipe.compile does) and make sure stages exchange tensors only")
        return meta

    # -- faults ---------------------------------------------------------------
    def _fail(self, what: str, exc: BaseException, peer: int | None = None) -> DistributedError:
        text = f"{type(exc).__name__}: {exc}".strip()
        hint = ""
        if peer is not None:
            hint = (f"; the peer {self._where(peer)} probably raised, died or is stuck — its own log names "
                    f"the cause (waits are bounded by FXPIPE_TIMEOUT={self.timeout:g}s)")
        err = DistributedError(f"fxpipe distributed: {self._where()} failed in {what}: {text}{hint}")
        self._failed = err
        print(str(err), file=sys.stderr, flush=True)
        grace = float(os.environ.get("FXPIPE_ABORT_GRACE", "10"))
        if grace > 0:
            faulthandler.dump_traceback_later(grace, exit=True)  # C watchdog: ends the process even mid-shutdown
        return err

    def _check_alive(self) -> None:
        if self._failed is not None:
            raise DistributedError(f"{self._where()} already failed ({self._failed}); the pipeline cannot "
                                   "continue — restart all ranks, e.g. from a checkpoint (pipe.load(dir))")

    def _wait(self, works: list[Any], what: str, peers: list[int]) -> None:
        t0 = time.perf_counter()
        try:
            for wk in works:
                wk.wait(timeout=timedelta(seconds=self.timeout))
        except Exception as e:  # noqa: BLE001
            raise self._fail(what, e, peers[0] if len(peers) == 1 else None) from e
        finally:
            self.wait_seconds += time.perf_counter() - t0

    def _reap_sends(self, wait: bool = False, upto: int | None = None) -> None:
        """Forget finished sends, oldest first; ``wait``: wait for all, ``upto``: for those of batches <= upto.

        gloo's send ``Work.is_completed()`` stays False until ``wait()`` is called, so waiting
        is the only way to let go of a send (its Work and the tensor it reads).  A send of batch
        b is certainly received once every rank has passed the first forward of batch b + 2
        (see :meth:`step`), so waiting for it then never blocks on a peer: the list holds at
        most the sends of the last three batches.
        """
        while self._sends:
            b, wk, _ = self._sends[0]
            if not (wait or (upto is not None and b <= upto) or wk.is_completed()):
                break
            if not wk.is_completed():
                self._wait([wk], "finishing sends", [])
            self._sends.popleft()

    # -- communication ----------------------------------------------------------
    def _post_recv(self, pairs: list[tuple[int, list[tuple[torch.Size, torch.dtype]]]], what: str) -> tuple:
        """Post receives, from each (stage, metas), of tensors of the given shapes; wait with _finish_recv."""
        ops, out = [], {}
        for s, metas in pairs:
            bufs = [torch.empty(shape, dtype=dt, device=self.device) for shape, dt in metas]
            out[s] = bufs
            ops += [dist.P2POp(dist.irecv, b, self.rank_of(s)) for b in bufs]
        works = []
        if ops:
            try:
                works = dist.batch_isend_irecv(ops)
            except Exception as e:  # noqa: BLE001
                raise self._fail(what, e) from e
        return works, out, [self.rank_of(s) for s, _ in pairs]

    def _finish_recv(self, posted: tuple, what: str) -> dict[int, list[torch.Tensor]]:
        works, out, peers = posted
        self._wait(works, what, peers)
        return out

    def _recv_pairs(self, kind: str) -> list[tuple[int, list[tuple[torch.Size, torch.dtype]]]]:
        """What an F (inputs from producers) or a B (output gradients from consumers) of this stage receives."""
        if kind == "F":
            need = self._needs[self.stage]
            return [(p, [self._meta[(p, k)] for q, k in need if q == p]) for p in self.producers]
        return [(c, [self._meta[(self.stage, k)] for k in self._grad_keys(self.stage, c)])
                for c in self.consumers if self._grad_keys(self.stage, c)]

    def _prefetch(self, a: Action) -> None:
        """Post the receives of a later action now, so its data arrives while this rank computes."""
        if a.kind in ("F", "B") and (a.kind, a.microbatch) not in self._prefetched:
            pairs = self._recv_pairs(a.kind)
            if pairs:
                self._prefetched[(a.kind, a.microbatch)] = self._post_recv(pairs, f"{self.stage}{a.kind}{a.microbatch}")

    def _receive(self, kind: str, mb: int | None, what: str) -> dict[int, list[torch.Tensor]]:
        posted = self._prefetched.pop((kind, mb), None) if mb is not None else None
        if posted is None:
            posted = self._post_recv(self._recv_pairs(kind), what)
        return self._finish_recv(posted, what)

    def _send(self, pairs: list[tuple[int, list[torch.Tensor]]], what: str, batch: int) -> None:
        ops = []
        keep = []
        for s, tensors in pairs:
            for t in tensors:
                t = t.detach().contiguous()
                keep.append(t)
                ops.append(dist.P2POp(dist.isend, t, self.rank_of(s)))
        if ops:
            try:
                works = dist.batch_isend_irecv(ops)
            except Exception as e:  # noqa: BLE001
                raise self._fail(what, e) from e
            self._sends.extend((batch, wk, t) for wk, t in (zip(works, keep) if len(works) == len(keep)
                                                             else [(wk, keep) for wk in works]))
        self._reap_sends()

    def _grad_keys(self, producer: int, consumer: int) -> list[int]:
        return [k for p, k in self._needs[consumer] if p == producer and self._meta[(p, k)][1].is_floating_point]

    # -- parameters -----------------------------------------------------------
    def _params(self, version: int | None) -> dict[str, torch.Tensor]:
        src = self.weights.newest() if version is None else self.weights.leaves(version)
        return {name: src[c] for name, c in self.param_names.items()}

    def _resolve(self, src: Source, inputs: list[Any], received: dict[tuple[int, int], Any],
                 params: dict[str, torch.Tensor]) -> Any:
        if src.kind == "input":
            x = inputs[src.index]
            return x.to(self.device) if isinstance(x, torch.Tensor) else x
        if src.kind == "attr":
            return params[src.name] if src.name in params else _get_attr(self.program.root, src.name)
        if src.kind == "stage":
            return received[(src.stage, src.index)]
        return src.value

    def _run_stage(self, args: list[Any], params: dict[str, torch.Tensor], grad: bool) -> tuple[Any, ...]:
        st = self.program.stages[self.stage]
        attrs = {s.name for s in st.sources if s.kind == "attr"}
        mod_params = {k: v for k, v in params.items() if k not in attrs}

        def fn(*xs: Any) -> tuple[Any, ...]:
            return functional_call(st.module, mod_params, xs)

        if not grad:
            out = fn(*args)
        else:
            with SavedBytes(params.values()) as saved:
                saved.hold(a for a in args if isinstance(a, torch.Tensor) and a.requires_grad)
                out = checkpoint(fn, *args, use_reentrant=False) if self.recompute else fn(*args)
            self.saved_bytes.append(saved.total)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def _receive_inputs(self, what: str, mb: int | None = None) -> dict[tuple[int, int], torch.Tensor]:
        need = self._needs[self.stage]
        got = self._receive("F", mb, what)
        received = {}
        for p in self.producers:
            for (q, k), t in zip([x for x in need if x[0] == p], got[p]):
                received[(q, k)] = t
        return received

    def _send_outputs(self, outs: tuple[Any, ...], what: str, batch: int) -> None:
        pairs = []
        for c in self.consumers:
            pairs.append((c, [outs[k] for p, k in self._needs[c] if p == self.stage]))
        self._send(pairs, what, batch)

    # -- actions --------------------------------------------------------------
    def _forward(self, mb: int) -> None:
        batch = mb // self.m
        if self._pending_update is not None and batch >= self._pending_update[0] + 2:
            self._finish_update()          # this batch computes with the weights that update makes
        what = f"{self.stage}F{mb} (batch {batch})"
        received = self._receive_inputs(what, mb)
        t0 = time.perf_counter()
        params = self._params(version_for_batch(self.schedule, batch))
        leaves = {key: _detach_input(v) for key, v in received.items()}
        st = self.program.stages[self.stage]
        args = [self._resolve(s, self._inputs[mb], leaves, params) for s in st.sources]
        outs = self._run_stage(args, params, grad=True)
        compute = time.perf_counter() - t0
        self._send_outputs(outs, what, batch)
        loss = None
        if self.stage == self.d - 1:
            t0 = time.perf_counter()
            out_leaves = [outs[s.index] if s.kind == "stage" and s.stage == self.stage
                          else self._resolve(s, self._inputs[mb], leaves, params)
                          for s in self.program.output_sources]
            model_out = pytree.tree_unflatten(out_leaves, self.program.output_spec)
            assert self.loss_fn is not None
            tgt = pytree.tree_map(lambda t: t.to(self.device) if isinstance(t, torch.Tensor) else t,
                                  self._targets.pop(mb))
            loss = check_loss(self.loss_fn(model_out, tgt), mb % self.m)
            compute += time.perf_counter() - t0
            self._losses.setdefault(batch, []).append(loss.detach())
            if len(self._losses[batch]) == self.m:
                self._start_loss_reduce(batch)
        self.fwd_seconds.append(compute)
        self._inputs.pop(mb, None)
        self._saved[mb] = ({k: v for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad},
                           tuple(_edge(o) for o in outs), loss)

    def _backward(self, mb: int) -> None:
        what = f"{self.stage}B{mb} (batch {mb // self.m})"
        leaves, outs, loss = self._saved.pop(mb)
        consumers = [c for c in self.consumers if self._grad_keys(self.stage, c)]
        got = self._receive("B", mb, what)
        grads: dict[int, torch.Tensor] = {}
        for c in consumers:
            for k, g in zip(self._grad_keys(self.stage, c), got[c]):
                grads[k] = g if k not in grads else grads[k] + g
        tensors, gvals = [], []
        if loss is not None:
            tensors.append(loss / self.m)
            gvals.append(None)
        for k, g in grads.items():
            o = outs[k]
            if (GradientEdge is not None and isinstance(o, GradientEdge)) or \
                    (isinstance(o, torch.Tensor) and o.requires_grad):
                tensors.append(o)
                gvals.append(g)
        t0 = time.perf_counter()
        if tensors:
            torch.autograd.backward(tensors, gvals)
        self.bwd_seconds.append(time.perf_counter() - t0)
        pairs = []
        for p in self.producers:
            ks = self._grad_keys(p, self.stage)
            if ks:
                pairs.append((p, [leaves[(p, k)].grad if (p, k) in leaves and leaves[(p, k)].grad is not None
                                  else torch.zeros(self._meta[(p, k)][0], dtype=self._meta[(p, k)][1],
                                                   device=self.device) for k in ks]))
        self._send(pairs, what, mb // self.m)

    def _update(self, batch: int) -> None:
        """U(batch): all-reduce the gradient of the version the batch used, then step the optimizer.

        Under 2bw the all-reduces are only posted here and the step is finished later
        (:meth:`_finish_update`), at the latest before the first forward of batch + 2, the
        first batch that computes with the new weights: the gradient exchange among replicas
        and tied stages then overlaps batch + 1's compute instead of stalling this rank.
        """
        self._finish_update()
        used = version_for_batch(self.schedule, batch)
        leaves = self.weights.leaves(used)
        grads = {c: t.grad for c, t in leaves.items()}
        if used == batch:          # 2bw batch 0: batch 1 accumulates into the same leaves, from zero
            for t in leaves.values():
                t.grad = None
        posted = []
        for group, names in self._grad_groups:
            by_dtype: dict[torch.dtype, list[str]] = {}
            for c in names:
                by_dtype.setdefault(leaves[c].dtype, []).append(c)
            for dt, cs in by_dtype.items():
                parts = [(grads[c] if grads[c] is not None else torch.zeros_like(leaves[c])).reshape(-1)
                         for c in cs]
                flags = torch.tensor([float(grads[c] is not None) for c in cs], dtype=dt, device=self.device)
                flat = torch.cat(parts + [flags])
                try:
                    work = dist.all_reduce(flat, group=group, async_op=True)
                except Exception as e:  # noqa: BLE001
                    raise self._fail(f"{self.stage}U{batch} (gradient all-reduce)", e) from e
                posted.append((work, flat, cs))
        self._pending_update = (batch, grads, posted)
        if self.schedule != "2bw" or not posted:
            self._finish_update()

    def _finish_update(self) -> None:
        """Wait for the pending U's all-reduces and step the optimizer (no-op if none is pending)."""
        if self._pending_update is None:
            return
        batch, grads, posted = self._pending_update
        self._pending_update = None
        for work, flat, cs in posted:
            self._wait([work], f"{self.stage}U{batch} (gradient all-reduce)", [])
            off = 0
            for i, c in enumerate(cs):
                shape = self.weights.params[c].shape
                n = shape.numel()
                present = flat[len(flat) - len(cs) + i].item() > 0
                grads[c] = (flat[off:off + n].view(shape) / self.w) if present else None
                off += n
        self.weights.update(batch, grads=grads)

    def _start_loss_reduce(self, batch: int) -> None:
        if batch in self._loss_work:
            return
        code = 0.0
        total = 0.0
        if self.stage == self.d - 1:
            ls = self._losses.pop(batch)
            total = float(torch.stack([x.double() for x in ls]).sum().item())
            code = float(_LOSS_DTYPES.index(ls[0].dtype) if ls[0].dtype in _LOSS_DTYPES else 0)
        buf = torch.tensor([total / (self.m * self.w), code / self.w], dtype=torch.float64, device=self.device)
        try:
            work = dist.all_reduce(buf, group=self.loss_group, async_op=True)
        except Exception as e:  # noqa: BLE001
            raise self._fail(f"loss all-reduce of batch {batch}", e) from e
        self._loss_work[batch] = (work, buf)

    def _run(self, actions: list[Action], base: int) -> None:
        shifted = [_shift(a, base, self.m) for a in actions]
        for i, g in enumerate(shifted):
            try:
                if g.kind != "U":
                    self._prefetch(g)          # in list order, so receives match the peers' send order
                    if i + 1 < len(shifted):
                        self._prefetch(shifted[i + 1])
                if g.kind == "F":
                    self._forward(g.microbatch)
                elif g.kind == "B":
                    self._backward(g.microbatch)
                else:
                    self._update(g.microbatch)
            except DistributedError:
                raise
            except Exception as e:  # noqa: BLE001 - the user's loss or model raised
                raise self._fail(f"action {g}", e) from e

    # -- the 2BW stream, cut into per-batch segments ------------------------------
    def _template(self, k: int, extra: int) -> tuple[list[Action], int, int]:
        """Stream-local batch k: this rank's list (shifted), start of batch k's segment, its stop."""
        base = max(k - 1, 0)
        rows = build_schedule(self.schedule, self.d, self.m, k - base + extra)[self.stage]
        acts = [_shift(a, base, self.m) for a in rows]

        def first_f(batch: int) -> int:
            return next((i for i, a in enumerate(acts) if a.kind == "F" and a.microbatch // self.m >= batch),
                        len(acts))

        return acts, (0 if k == 0 else first_f(k)), first_f(k + 1)

    def _segment(self, k: int) -> list[Action]:
        acts, start, stop = self._template(k, 2)
        return acts[start:stop]

    def _drain_list(self, k: int) -> list[Action]:
        _, _, stop = self._template(k, 2)
        acts, _, _ = self._template(k, 1)
        return acts[stop:]

    def drain(self) -> None:
        """Run the rest of the last batch (its last backwards and U); collective over all ranks."""
        self._check_alive()
        if self._stream_base is not None:
            k = self.batch - 1 - self._stream_base
            self._run(self._drain_list(k), self._stream_base)
            self._stream_base = None
        self._finish_update()
        self._reap_sends(wait=True)

    # -- API used by Pipeline ---------------------------------------------------
    def shard(self, tree: Any) -> Any:
        """This replica's share of a full batch (every rank is given the same batch)."""
        return replica_share(tree, self.w, self.replica)

    def step(self, inputs: list[list[Any]], targets: list[Any]) -> torch.Tensor:
        """Train batch ``self.batch`` (this replica's m microbatches); returns the mean loss over all replicas."""
        self._check_alive()
        start, self.wait_seconds = time.perf_counter(), 0.0
        t = self.batch
        if self._stream_base is None:
            self._stream_base = t
        base = self._stream_base
        k = t - base
        for j in range(self.m):
            self._inputs[t * self.m + j] = inputs[j]
            if self.stage == self.d - 1:
                self._targets[t * self.m + j] = targets[j]
        self._run(self._segment(k), base)
        self._start_loss_reduce(t)
        work, buf = self._loss_work.pop(t)
        self._wait([work], f"loss all-reduce of batch {t}", [])
        # every rank has now passed its last forward of batch t, hence (2bw: F of t computes with
        # W(t-1), made by U(t-2) after every backward of t-2) every receive of batches <= t-2
        self._reap_sends(upto=t - 2)
        self.batch += 1
        if self.schedule != "2bw" or k > 10_000:
            self.drain()           # nothing left to drain for flush/gpipe; keeps 2bw indices bounded
        self.step_seconds = time.perf_counter() - start
        dtype = _LOSS_DTYPES[int(round(buf[1].item()))]
        return buf[0].to(dtype).cpu()

    @torch.no_grad()
    def forward(self, inputs: list[list[Any]]) -> list[Any]:
        """Outputs of every microbatch of every replica (on every rank), with the newest weights."""
        self.drain()
        params = self._params(None)
        st = self.program.stages[self.stage]
        results = []
        try:
            for j, mb_inputs in enumerate(inputs):
                what = f"forward-only microbatch {j}"
                received = self._receive_inputs(what)
                args = [self._resolve(s, mb_inputs, received, params) for s in st.sources]
                outs = self._run_stage(args, params, grad=False)
                self._send_outputs(outs, what, self.batch)
                if self.stage == self.d - 1:
                    leaves = [outs[s.index] if s.kind == "stage" and s.stage == self.stage
                              else self._resolve(s, mb_inputs, received, params) for s in self.program.output_sources]
                    results.append(pytree.tree_unflatten(
                        [x.cpu() if isinstance(x, torch.Tensor) else x for x in leaves], self.program.output_spec))
        except DistributedError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._fail("forward", e) from e
        self._reap_sends(wait=True)
        gathered: list[Any] = []
        for r in range(self.w):
            obj = [results if self.rank == self.rank_of(self.d - 1, r) else None]
            try:
                dist.broadcast_object_list(obj, src=self.rank_of(self.d - 1, r))
            except Exception as e:  # noqa: BLE001
                raise self._fail("forward (gathering outputs)", e, self.rank_of(self.d - 1, r)) from e
            gathered += obj[0]
        return gathered

    def gather_params(self) -> dict[str, torch.Tensor]:
        """Newest value of every canonical parameter, on every rank (collective; replica 0 is the source)."""
        self.drain()
        out: dict[str, torch.Tensor] = {}
        for s in range(self.d):
            names = sorted(set(self.stage_names[s].values()))
            by_dtype: dict[torch.dtype, list[str]] = {}
            for c in names:
                by_dtype.setdefault(self._all_params[c].dtype, []).append(c)
            for dt, cs in by_dtype.items():
                if self.rank == s:
                    flat = torch.cat([self._all_params[c].detach().reshape(-1) for c in cs])
                else:
                    flat = torch.empty(sum(self._all_params[c].numel() for c in cs), dtype=dt, device=self.device)
                try:
                    dist.broadcast(flat, src=s)
                except Exception as e:  # noqa: BLE001
                    raise self._fail("state_dict (gathering parameters)", e, s) from e
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
            src = owners[name]
            b = sd[name].detach()
            wire = b.to(self.device).clone() if b.dtype != torch.bool else b.to(self.device, torch.uint8)
            try:
                dist.broadcast(wire, src=src)
            except Exception as e:  # noqa: BLE001
                raise self._fail(f"state_dict (gathering buffer {name!r})", e, src) from e
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

    def load_state_dict(self, model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
        """Every rank loads the same full state dict; both 2BW versions become these weights."""
        self.drain()
        with torch.no_grad():
            for k, t in model.state_dict().items():
                t.copy_(sd[k].to(t.dtype))
        self.weights.reset()
        self.batch = 0
        self._barrier("load_state_dict")

    def _barrier(self, what: str) -> None:
        flag = torch.zeros(1, device=self.device)
        try:
            work = dist.all_reduce(flag, group=self.loss_group, async_op=True)
        except Exception as e:  # noqa: BLE001
            raise self._fail(what, e) from e
        self._wait([work], what, [])

    def gather_measurements(self) -> list[dict[str, Any]]:
        """Every rank's measurements of its last step, on every rank (collective), in rank order.

        Each entry: rank, stage, replica, fwd/bwd (median seconds per microbatch), saved (median bytes),
        compute (seconds of forward+backward in the last m microbatches), wait and wall (last step).
        """
        import statistics

        self.drain()     # a peer may be blocked in this batch's update (tied weights) until we finish it
        med = lambda xs: float(statistics.median(xs)) if xs else 0.0  # noqa: E731
        mine = {"rank": self.rank, "stage": self.stage, "replica": self.replica,
                "fwd": med(self.fwd_seconds), "bwd": med(self.bwd_seconds), "saved": int(med(self.saved_bytes)),
                "compute": float(sum(self.fwd_seconds) + sum(self.bwd_seconds)),
                "wait": self.wait_seconds, "wall": self.step_seconds}
        out: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(out, mine, group=self.loss_group)
        except Exception as e:  # noqa: BLE001
            raise self._fail("report (gathering measurements)", e) from e
        return out

    def agree(self, ok: bool, what: str) -> bool:
        """True on every rank iff ``ok`` on every rank (collective)."""
        flag = torch.tensor([0.0 if ok else 1.0], device=self.device)
        try:
            work = dist.all_reduce(flag, group=self.loss_group, async_op=True)
        except Exception as e:  # noqa: BLE001
            raise self._fail(what, e) from e
        self._wait([work], what, [])
        return flag.item() == 0.0
