"""Communication with bounded waits: point-to-point sends and receives, collectives, and failing loudly.

Every wait is bounded by ``FXPIPE_TIMEOUT`` seconds (default 60; it is also the
process-group timeout).  An operation that raises (or whose peer died) becomes a
:class:`fxpipe.errors.DistributedError` naming this rank, its stage and what it
was doing, and arms a watchdog that ends the process with exit code 1 after
``FXPIPE_ABORT_GRACE`` seconds (default 10; 0 disables) in case the program
catches the error or hangs while shutting down.  Peers blocked on the failed rank
then see its connection close and fail the same way.
"""

from __future__ import annotations

import collections
import faulthandler
import os
import socket
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from fxpipe.errors import DistributedError
from fxpipe.runtime.groups import Layout, timeout_seconds

__all__ = ["Comm"]

Posted = tuple  # (works, {stage: buffers}, peer ranks)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:                               # a zombie (exited, not yet reaped by its launcher) is gone too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


_CAN_POOL = hasattr(torch._C, "_storage_Use_Count")     # receive buffers are pooled only where it can tell


def _unshared(t: torch.Tensor) -> bool:
    """Nothing but ``t`` holds its storage (this call's temporary storage object is the second count)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2


def _post(ops: list[dist.P2POp]) -> list[Any]:
    """Start ``ops``: one of them on its own, several as one ``batch_isend_irecv`` (NCCL posts those as
    one group, so their order across ranks cannot deadlock; gloo loops over them either way)."""
    if not ops:
        return []
    if len(ops) == 1:
        op = ops[0]
        return [op.op(op.tensor, op.peer, group=op.group)]
    return dist.batch_isend_irecv(ops)


class Comm:
    """Sends, receives and collectives of one rank; tracks the seconds spent waiting.

    Args:
        layout: ranks and groups.
        device: where received buffers are allocated.
    """

    def __init__(self, layout: Layout, device: torch.device) -> None:
        self.layout = layout
        self.device = device
        self.timeout = timeout_seconds()
        self.failed: DistributedError | None = None
        # this pipeline's own group: its sends and receives never match another pipeline's (or a
        # torch.distributed.pipelining schedule's) on the default group, even with 2bw work unfinished
        self._p2p_group = layout.pipeline_groups[layout.replica]
        self.wait_seconds = 0.0            # blocked on receives / collectives since the last reset
        self._pool: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        # posted sends, oldest first: (batch of the microbatch sent, Work, the tensor(s) it reads)
        self._sends: collections.deque[tuple[int, Any, Any]] = collections.deque()
        self._announce()

    # -- faults ---------------------------------------------------------------
    def fail(self, what: str, exc: BaseException, peer: int | None = None) -> DistributedError:
        """The DistributedError for ``exc`` raised during ``what`` (naming ``peer`` if one is to blame)."""
        text = f"{type(exc).__name__}: {exc}".strip()
        hint = ""
        if peer is not None:
            hint = (f"; the peer {self.layout.where(peer)} probably raised, died or is stuck — its own log names "
                    f"the cause (waits are bounded by FXPIPE_TIMEOUT={self.timeout:g}s)")
        others = self._diagnose(what)
        err = DistributedError(f"fxpipe distributed: {self.layout.where()} failed in {what}: {text}{hint}{others}")
        self.failed = err
        print(str(err), file=sys.stderr, flush=True)
        grace = float(os.environ.get("FXPIPE_ABORT_GRACE", "10"))
        if grace > 0:
            faulthandler.dump_traceback_later(grace, exit=True)  # C watchdog: ends the process even mid-shutdown
        return err

    # what the other ranks are doing, for the message of a failure: through the rendezvous store
    _STORE_SECONDS = 2.0

    def _announce(self) -> None:
        """Tell the store where this rank runs (host, pid), so a peer can tell later whether it exited."""
        try:
            store = dist.distributed_c10d._get_default_store()
            store.set(f"fxpipe/proc/{self.layout.rank}", f"{socket.gethostname()} {os.getpid()}")
        except Exception:  # noqa: BLE001 - diagnosis only
            pass

    def _diagnose(self, what: str) -> str:
        """A sentence naming the ranks that failed or exited, as far as the store tells (bounded, ~2 s)."""
        where, host, said = self.layout.where, socket.gethostname(), []
        try:
            store = dist.distributed_c10d._get_default_store()
            store.set_timeout(timedelta(seconds=self._STORE_SECONDS))
            store.set(f"fxpipe/failed/{self.layout.rank}", what)
            for r in range(self.layout.world):
                if r == self.layout.rank:
                    continue
                if store.check([f"fxpipe/failed/{r}"]):
                    said.append(f"{where(r)} failed in {store.get(f'fxpipe/failed/{r}').decode()}")
                elif store.check([f"fxpipe/proc/{r}"]):
                    h, pid = store.get(f"fxpipe/proc/{r}").decode().rsplit(" ", 1)
                    if h == host and not _process_alive(int(pid)):
                        said.append(f"{where(r)} has exited (process {pid})")
        except Exception:  # noqa: BLE001 - the store is gone with the process hosting it
            said.append(f"the rendezvous store ({os.environ.get('MASTER_ADDR', '?')}:"
                        f"{os.environ.get('MASTER_PORT', '?')}) does not answer: the process hosting it, "
                        f"{where(0)} unless torchrun's agent hosts it, has probably died")
        return f"; meanwhile {'; '.join(said)}" if said else ""

    def check_alive(self) -> None:
        """Raise if this rank failed before: its peers are gone or out of step."""
        if self.failed is not None:
            raise DistributedError(f"{self.layout.where()} already failed ({self.failed}); the pipeline cannot "
                                   "continue — restart all ranks, e.g. from a checkpoint (pipe.load(dir))")

    def wait(self, works: list[Any], what: str, peers: list[int]) -> None:
        """Wait for ``works``, all of them within one FXPIPE_TIMEOUT (not one each)."""
        t0 = time.perf_counter()
        try:
            for wk in works:
                left = max(0.001, self.timeout - (time.perf_counter() - t0))
                wk.wait(timeout=timedelta(seconds=left))
        except Exception as e:  # noqa: BLE001
            raise self.fail(what, e, peers[0] if len(peers) == 1 else None) from e
        finally:
            self.wait_seconds += time.perf_counter() - t0

    # -- point to point -------------------------------------------------------------
    # receive buffers kept for reuse, per (shape, dtype): allocating each microbatch's afresh made glibc
    # unmap and fault the memory back in on every step (the last stage's backward ran ~30% slower on CPU)
    _POOL_PER_SHAPE = 16

    def buffer(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A tensor to receive into: a pooled buffer that nothing refers to any more, or a new one.

        The caller gets an alias of the pooled tensor, so the storage counts as used for as long as
        the caller, the autograd graph or a pending send holds any view of it.
        """
        if not _CAN_POOL:
            return torch.empty(shape, dtype=dtype, device=self.device)
        pool = self._pool.setdefault((tuple(shape), dtype), [])
        b = next((b for b in pool if _unshared(b)), None)
        if b is None:
            b = torch.empty(shape, dtype=dtype, device=self.device)
            if len(pool) >= self._POOL_PER_SHAPE:
                return b
            pool.append(b)
        return b.detach()

    def post_recv(self, pairs: list[tuple[int, list[tuple[torch.Size, torch.dtype]]]], what: str) -> Posted:
        """Post receives, from each (stage, metas), of tensors of the given shapes; wait with :meth:`finish_recv`."""
        ops, out = [], {}
        for s, metas in pairs:
            bufs = [self.buffer(shape, dt) for shape, dt in metas]
            out[s] = bufs
            ops += [dist.P2POp(dist.irecv, b, self.layout.rank_of(s), group=self._p2p_group) for b in bufs]
        try:
            works = _post(ops)
        except Exception as e:  # noqa: BLE001
            raise self.fail(what, e) from e
        return works, out, [self.layout.rank_of(s) for s, _ in pairs]

    def finish_recv(self, posted: Posted, what: str) -> dict[int, list[torch.Tensor]]:
        """Wait for posted receives; stage -> received tensors."""
        works, out, peers = posted
        self.wait(works, what, peers)
        return out

    def send(self, pairs: list[tuple[int, list[torch.Tensor]]], what: str, batch: int) -> None:
        """Send each stage its tensors of ``batch`` (not waited for; kept alive until reaped)."""
        ops = []
        keep = []
        for s, tensors in pairs:
            for t in tensors:
                t = t.detach().contiguous()
                keep.append(t)
                ops.append(dist.P2POp(dist.isend, t, self.layout.rank_of(s), group=self._p2p_group))
        if ops:
            try:
                works = _post(ops)
            except Exception as e:  # noqa: BLE001
                raise self.fail(what, e) from e
            self._sends.extend((batch, wk, t) for wk, t in (zip(works, keep) if len(works) == len(keep)
                                                             else [(wk, keep) for wk in works]))
        self.reap_sends()

    def reap_sends(self, wait: bool = False, upto: int | None = None) -> None:
        """Forget finished sends, oldest first; ``wait``: wait for all, ``upto``: for those of batches <= upto.

        gloo's send ``Work.is_completed()`` stays False until ``wait()`` is called, so waiting
        is the only way to let go of a send (its Work and the tensor it reads).  A send of batch
        b is certainly received once every rank has passed the first forward of batch b + 2
        (see ``DistributedExecutor.step``), so waiting for it then never blocks on a peer: the
        list holds at most the sends of the last three batches.
        """
        while self._sends:
            b, wk, _ = self._sends[0]
            if not (wait or (upto is not None and b <= upto) or wk.is_completed()):
                break
            if not wk.is_completed():
                self.wait([wk], "finishing sends", [])
            self._sends.popleft()

    def send_loss(self, buf: torch.Tensor, dsts: list[int], batch: int, what: str) -> None:
        """Send a batch's loss ``buf`` to the ranks ``dsts`` (not waited for; reaped with the other sends)."""
        group = self.layout.loss_p2p_groups[self.layout.replica]
        for r in dsts:
            try:
                self._sends.append((batch, dist.isend(buf, r, group=group), buf))
            except Exception as e:  # noqa: BLE001
                raise self.fail(what, e) from e

    def post_loss_recv(self, src: int, what: str) -> tuple[Any, torch.Tensor]:
        """Post the receive of a batch's loss (what :meth:`send_loss` sends) from ``src``: (work, buffer)."""
        buf = torch.empty(2, dtype=torch.float64, device=self.device)
        try:
            return dist.irecv(buf, src, group=self.layout.loss_p2p_groups[self.layout.replica]), buf
        except Exception as e:  # noqa: BLE001
            raise self.fail(what, e) from e

    # -- collectives ----------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor, group: Any, what: str) -> Any:
        """Post an async sum of ``t`` over ``group``; returns the work to :meth:`wait` on."""
        try:
            return dist.all_reduce(t, group=group, async_op=True)
        except Exception as e:  # noqa: BLE001
            raise self.fail(what, e) from e

    def agree(self, ok: bool, what: str) -> bool:
        """True on every rank iff ``ok`` on every rank (collective)."""
        flag = torch.tensor([0.0 if ok else 1.0], device=self.device)
        self.wait([self.all_reduce(flag, self.layout.loss_group, what)], what, [])
        return flag.item() == 0.0

    def barrier(self, what: str) -> None:
        """Every rank reaches this point (collective)."""
        self.agree(True, what)
