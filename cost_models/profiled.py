"""Profiled cost model: every distinct operation timed forward and backward on real tensors, cached on disk.

For each operation signature (op or module type, input shapes/strides/dtypes,
parameter shapes) of the graph, once::

    random inputs of the node's shapes (integer inputs = 0, a valid index)
    one recorded run     FLOPs, bytes, what autograd saves (saved_tensors_hooks)
    timing rounds        round r: for every op of a chunk of 16: one forward sample, one backward
                         sample (each a loop of n calls, torch.utils.benchmark.Timer)
    robust price         outliers beyond 3 robust deviations (1.4826 * MAD) dropped, median of the rest
    noise                the rest's robust relative deviation (MAD-based); an op noisier than
                         ``max_noise`` gets more rounds, up to ``max_repeats`` samples
    backward             minus the autograd engine's start-up, which the whole model pays once

Interleaving the rounds across ops makes a slow second of a shared machine slow
down every op of the chunk a little rather than one op a lot: the *ratios*
between prices, which is all a plan depends on, stay put. (Measured on the
issue-15 MLP: one op's price swung 2.4x between profiles taken seconds apart when
each op was timed in one block.)

Each sample loops n calls for >= ``min_sample`` seconds and keeps every result
alive until the loop ends, as a training step keeps activations for backward:
an op timed on the buffer it has just freed runs from hot cache without page
faults and reads 2-4x faster than inside the model (measured on TinyGPT, d=64).

Results go to ``<cache>/profiles.json`` keyed by a hash of the signature and the
device, with the noise of each price. The cache policy (``cache=`` or the
environment variable ``FXPIPE_PROFILE_CACHE``):

    use      (default) take cached prices; re-measure, once, an entry that was noisier than
             ``max_noise`` or records no noise (older caches), and keep the quieter of the two
    refresh  measure everything again and overwrite (``fxpipe calibrate --reprofile``)
    off      neither read nor write the cache
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from fxpipe.cost_models.analytic import (GraphCostModel, Instance, NodeOp, OpProfile, make_real, node_op,
                                         trace_op)
from fxpipe.cost_models.device import DeviceSpec, cache_dir as default_cache_dir, host_fingerprint
from fxpipe.errors import ConfigError, CostModelError

__all__ = ["ProfiledCostModel", "robust_estimate", "CACHE_POLICIES"]

CACHE_POLICIES = ("use", "refresh", "off")
_FIELDS = {f.name for f in dataclasses.fields(OpProfile)}
_CHUNK = 16          # ops interleaved per round: bounds the real tensors alive at once


def robust_estimate(samples: list[float]) -> tuple[float, float, int]:
    """(price, relative noise, samples dropped) of timing samples.

    Samples further than 3 robust deviations (1.4826 * median absolute deviation) from the
    median are outliers; the price is the median of the rest and the noise their robust
    relative deviation (1.4826 * MAD / median; 0.0 for a single sample or a zero median).
    Example: [1.0, 1.1, 0.9, 1.0, 5.0] -> drops 5.0, price 1.0, noise 0.074.
    """
    if not samples:
        return 0.0, 0.0, 0
    med = statistics.median(samples)
    mad = 1.4826 * statistics.median(abs(s - med) for s in samples)
    kept = [s for s in samples if abs(s - med) <= 3 * mad] if mad > 0 else list(samples)
    kept = kept or list(samples)
    price = statistics.median(kept)
    if len(kept) < 2 or price <= 0:
        return price, 0.0, len(samples) - len(kept)
    noise = 1.4826 * statistics.median(abs(s - price) for s in kept) / price
    return price, noise, len(samples) - len(kept)


class _Job:
    """One op being timed: its instance, forward/backward closures, loop sizes and samples."""

    def __init__(self, op: NodeOp) -> None:
        self.op = op
        self.fwd: Callable[[], Any] | None = None
        self.bwd: Callable[[], Any] | None = None
        self.n_fwd = self.n_bwd = 1
        self.fwd_samples: list[float] = []
        self.bwd_samples: list[float] = []
        self.result: tuple[float, float, float, float] | None = None   # fwd, bwd, fwd noise, bwd noise
        self.keep: list[Any] = []
        self.sync: Callable[[], None] | None = None     # waits for an asynchronous device (CUDA)


class ProfiledCostModel(GraphCostModel):
    """Cost model that measures each distinct operation on this machine (CostModel protocol).

    Args:
        device: DeviceSpec, preset name or None (this CPU): used for ``comm_time``
            and as part of the cache key; the measurements run on real tensors
            on the device of the node's values (CPU here).
        warmup: untimed runs before measuring (they also size each sample's loop).
        repeats: timing rounds (samples per op and direction).
        cache_dir: where ``profiles.json`` lives; default ``$FXPIPE_CACHE_DIR`` or
            ``~/.cache/fxpipe``.
        min_sample: seconds one timing sample lasts at least (short ops run in a loop).
        timer: the clock; wall time by default. ``time.thread_time`` with one torch
            thread measures CPU time, which other processes on a shared machine do not disturb.
        cache: "use" | "refresh" | "off" (see the module docstring); None reads
            ``FXPIPE_PROFILE_CACHE``, default "use".
        max_noise: relative noise above which an op gets more rounds (and a cached entry is re-measured).
        max_repeats: at most this many samples per op and direction.

    Attributes:
        measurements: operations measured by this instance (0 when all came from the cache).
        noise: op signature -> (forward noise, backward noise) of its price.

    Raises:
        ConfigError: ``warmup < 0``, ``repeats < 1``, ``max_repeats < repeats`` or an unknown cache policy.
    """

    def __init__(self, device: str | DeviceSpec | None = None, warmup: int = 2, repeats: int = 7,
                 cache_dir: str | os.PathLike[str] | None = None, min_sample: float = 1e-3,
                 timer: Callable[[], float] = time.perf_counter, cache: str | None = None,
                 max_noise: float = 0.10, max_repeats: int = 21) -> None:
        if int(warmup) < 0 or int(repeats) < 1:
            raise ConfigError(f"ProfiledCostModel needs warmup >= 0 and repeats >= 1, got warmup={warmup}, "
                              f"repeats={repeats}; e.g. warmup=2, repeats=7")
        if int(max_repeats) < int(repeats):
            raise ConfigError(f"ProfiledCostModel needs max_repeats >= repeats, got max_repeats={max_repeats}, "
                              f"repeats={repeats}")
        policy = cache if cache is not None else os.environ.get("FXPIPE_PROFILE_CACHE", "use")
        if policy not in CACHE_POLICIES:
            where = "cache" if cache is not None else "FXPIPE_PROFILE_CACHE"
            raise ConfigError(f"{where}={policy!r} is not a profile cache policy; use one of "
                              f"{', '.join(CACHE_POLICIES)}")
        super().__init__(device)
        self.warmup, self.repeats, self.min_sample = int(warmup), int(repeats), float(min_sample)
        self.max_repeats, self.max_noise, self.cache = int(max_repeats), float(max_noise), policy
        self.timer = timer
        self.cache_path = Path(cache_dir or default_cache_dir()) / "profiles.json"
        self.measurements = 0
        self.noise: dict[str, tuple[float, float]] = {}
        self._disk: dict[str, Any] | None = None
        self._engine_overhead: float | None = None
        where = host_fingerprint() if self.device.name == "cpu" else self.device.name
        clock = "" if timer is time.perf_counter else f"|{getattr(timer, '__name__', repr(timer))}"
        self._salt = f"{self.device.name}|{where}{clock}"

    def __repr__(self) -> str:
        return f"ProfiledCostModel(device={self.device.name!r}, cache={self.cache!r})"

    def node_noise(self, node: torch.fx.Node) -> tuple[float, float]:
        """(forward, backward) relative noise of ``node``'s price; (0, 0) for nodes doing no tensor work."""
        self.node_cost(node)
        op = node_op(node)
        return self.noise.get(op.key, (0.0, 0.0)) if op is not None else (0.0, 0.0)

    # -- cache --------------------------------------------------------------------------
    def _cache_key(self, op: NodeOp) -> str:
        return hashlib.sha1(f"{op.key}|{self._salt}".encode()).hexdigest()

    def _load(self) -> dict[str, Any]:
        if self._disk is None:
            self._disk = {}
            if self.cache != "off":
                try:
                    self._disk = json.loads(self.cache_path.read_text())
                except (OSError, ValueError):
                    pass
        return self._disk

    def _save(self, new: dict[str, Any]) -> None:
        if self.cache == "off":
            return
        try:
            current = json.loads(self.cache_path.read_text())  # merge with concurrent writers
        except (OSError, ValueError):
            current = {}
        current.update(new)
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(current))
            os.replace(tmp, self.cache_path)
        except OSError:
            pass  # unwritable cache: measurements stay in memory
        self._disk = current

    @staticmethod
    def _entry_noise(entry: dict[str, Any]) -> float | None:
        n = entry.get("noise")
        if not isinstance(n, dict):
            return None
        try:
            return max(float(n.get("fwd", 0.0)), float(n.get("bwd", 0.0)))
        except (TypeError, ValueError):
            return None

    # -- measuring ----------------------------------------------------------------------
    def _profile_many(self, ops: list[NodeOp]) -> None:
        disk = self._load() if self.cache == "use" else {}
        todo: list[NodeOp] = []
        cached: dict[str, dict[str, Any]] = {}
        for op in ops:
            entry = disk.get(self._cache_key(op))
            if entry is not None:
                try:
                    prof = OpProfile.from_json({k: v for k, v in entry.items() if k in _FIELDS})
                except (TypeError, KeyError, ValueError):
                    prof = None
                noise = self._entry_noise(entry)
                if prof is not None:
                    self._profiles[op.key] = prof
                    n = entry.get("noise") or {}
                    self.noise[op.key] = (float(n.get("fwd", 0.0)), float(n.get("bwd", 0.0)))
                    if noise is not None and (noise <= self.max_noise or int(entry.get("checks", 1)) >= 2):
                        continue                      # quiet, or noisy twice: the machine's own noise
                    cached[op.key] = entry            # suspicious: measure again, keep the quieter
            todo.append(op)
        if not todo:
            return
        quiet = os.environ.get("FXPIPE_QUIET") == "1" or not sys.stderr.isatty()
        new: dict[str, Any] = {}
        bar = tqdm(total=len(todo), desc="fxpipe: profiling ops", unit="op", disable=quiet)
        for start in range(0, len(todo), _CHUNK):
            for op, prof, noise in self._measure_chunk(todo[start:start + _CHUNK]):
                old = cached.get(op.key)
                old_noise = self._entry_noise(old) if old is not None else None
                checks = int(old.get("checks", 1)) + 1 if old_noise is not None else 1
                bar.update(1)
                if old_noise is not None and old_noise <= max(noise):
                    new[self._cache_key(op)] = {**old, "checks": checks}   # the cached price was quieter
                    continue
                self._profiles[op.key] = prof
                self.noise[op.key] = noise
                new[self._cache_key(op)] = {**prof.to_json(), "noise": {"fwd": noise[0], "bwd": noise[1]},
                                            "checks": checks}
        bar.close()
        self._save(new)

    def engine_overhead(self) -> float:
        """Fixed seconds one ``torch.autograd.grad`` call costs beyond its nodes (calibrated once).

        A node timed alone pays the autograd engine's start-up on every backward; the
        whole model pays it once. Calibrated from chains of 1 and 5 tiny multiplications.
        """
        if self._engine_overhead is None:
            x = torch.ones(1, requires_grad=True)
            g = torch.ones(1)

            def chain(k: int) -> float:
                y = x
                for _ in range(k):
                    y = y * 2
                fn = lambda: torch.autograd.grad(y, x, g, retain_graph=True)  # noqa: E731
                n = self._loop_size(fn, 1 << 12)
                return robust_estimate([self._sample(fn, n) for _ in range(7)])[0]

            one, five = chain(1), chain(5)
            per_node = max(0.0, (five - one) / 4)
            self._engine_overhead = max(0.0, one - per_node)
        return self._engine_overhead

    def measure(self, op: NodeOp) -> OpProfile:
        """Time one operation forward and backward on real tensors (no caching).

        Raises:
            CostModelError: the operation fails on real tensors of its shapes.
        """
        return self._measure_chunk([op])[0][1]

    def _fail(self, op: NodeOp, e: Exception) -> CostModelError:
        return CostModelError(
            f"ProfiledCostModel: {op.name} failed on real tensors of its shapes: {type(e).__name__}: {e}. "
            "Ops that need particular input values (indices, masks) get zeros; use "
            "cost_model='analytic' for this model")

    def _measure_chunk(self, ops: list[NodeOp]) -> list[tuple[NodeOp, OpProfile, tuple[float, float]]]:
        """Interleaved timing rounds over ``ops``; returns (op, profile, (fwd noise, bwd noise)) in order."""
        traces = {}
        jobs: list[_Job] = []
        for op in ops:
            self.measurements += 1
            try:
                traces[op.key] = trace_op(op, make_real, torch.randn_like, contextlib.nullcontext)
                job = _Job(op)
                self._prepare(job)
            except CostModelError:
                raise
            except Exception as e:  # noqa: BLE001
                raise self._fail(op, e) from e
            jobs.append(job)
        overhead = self.engine_overhead()
        timed = [j for j in jobs if j.result is None]
        try:
            for rnd in range(self.max_repeats):
                if rnd >= self.repeats:       # past the planned rounds: only the noisy ops go on
                    timed = [j for j in timed if self._noisy(j)]
                    if not timed:
                        break
                for j in timed:
                    j.fwd_samples.append(self._sample(j.fwd, j.n_fwd, j.sync))
                    if j.bwd is not None:
                        j.bwd_samples.append(self._sample(j.bwd, j.n_bwd, j.sync))
        except Exception as e:  # noqa: BLE001
            bad = timed[0].op if timed else ops[0]
            raise self._fail(bad, e) from e
        out = []
        for j in jobs:
            if j.result is None:
                f, fn, _ = robust_estimate(j.fwd_samples)
                b, bn, _ = robust_estimate(j.bwd_samples) if j.bwd is not None else (0.0, 0.0, 0)
                if j.bwd is not None:
                    b = max(b - overhead, 0.1 * b)
                j.result = (f, b, fn, bn)
            j.fwd = j.bwd = None
            j.keep.clear()
            f, b, fn, bn = j.result
            tr = traces[j.op.key]
            prof = OpProfile(
                fwd_time=f, bwd_time=b, fwd_flops=float(sum(r.flops for r in tr.fwd_ops)),
                bwd_flops=float(sum(r.flops for r in tr.bwd_ops or ())), bytes_read=tr.bytes_read,
                bytes_written=tr.bytes_written, fwd_kernels=sum(r.kernel for r in tr.fwd_ops),
                bwd_kernels=sum(r.kernel for r in tr.bwd_ops or ()), saved=tr.saved)
            out.append((j.op, prof, (fn, bn)))
        return out

    def _noisy(self, j: _Job) -> bool:
        return (robust_estimate(j.fwd_samples)[1] > self.max_noise
                or (j.bwd is not None and robust_estimate(j.bwd_samples)[1] > self.max_noise))

    def _prepare(self, job: _Job) -> None:
        """Materialise the op, size its loops; in-place ops are timed right away (fresh copies per call)."""
        op = job.op
        inst = Instance(op, make_real)
        try:
            out = inst()
        except RuntimeError as e:
            if "in-place" not in str(e) and "inplace" not in str(e):
                raise
            job.result = self._time_cloned(op)
            return
        # keep at most ~256 MiB of results alive per sample
        kept = sum(t.numel() * t.element_size() for t in _flat(out)) + 1
        max_n = int(min(1 << 12, max(1, (256 << 20) // kept)))
        on_cuda = any(t.device.type == "cuda" for t in op.in_vals + op.out_vals) and torch.cuda.is_available()
        job.sync = torch.cuda.synchronize if on_cuda else None
        job.keep = [inst, out]
        job.fwd = inst
        job.n_fwd = self._loop_size(inst, max_n, job.sync)
        outs = [o for o in _flat(out) if o.requires_grad]
        targets = inst.grad_targets()
        if outs and targets:
            grads = [torch.randn_like(o) for o in outs]
            job.keep.append(grads)
            job.bwd = lambda: torch.autograd.grad(outs, targets, grads, retain_graph=True, allow_unused=True)
            job.n_bwd = self._loop_size(job.bwd, max_n, job.sync)

    def _clock(self, sync: Callable[[], None] | None) -> Callable[[], float]:
        if sync is None:
            return self.timer
        timer = self.timer
        return lambda: (sync(), timer())[1]

    def _sample(self, fn: Callable[[], Any], n: int, sync: Callable[[], None] | None = None) -> float:
        """Seconds per call of ``fn`` over a loop of ``n`` calls whose results stay alive until it ends.

        Timed with ``torch.utils.benchmark.Timer`` (``timeit`` of ``keep.append(fn())``), on
        ``self.timer``; the results are freed after the clock stops.
        """
        from torch.utils.benchmark import Timer

        keep: list[Any] = []
        t = Timer(stmt="keep.append(fn())", globals={"fn": fn, "keep": keep}, timer=self._clock(sync),
                  num_threads=torch.get_num_threads())
        per_call = t.timeit(n).median
        keep.clear()
        return per_call

    def _loop_size(self, fn: Callable[[], Any], max_n: int, sync: Callable[[], None] | None = None) -> int:
        """Calls per sample so one sample lasts >= ``min_sample`` (``timeit``'s autorange; warm-up runs)."""
        n = 1
        for _ in range(max(self.warmup, 1)):
            while True:
                dt = self._sample(fn, n, sync) * n
                if dt >= self.min_sample or n >= max_n:
                    break
                n = min(n * max(2, int(self.min_sample / max(dt, 1e-7))), max_n)
        return n

    def _time_cloned(self, op: NodeOp) -> tuple[float, float, float, float]:
        """Ops writing into their inputs: fresh copies every call, one call per sample."""
        fwd_times: list[float] = []
        bwd_times: list[float] = []
        for i in range(self.warmup + self.repeats):
            inst = Instance(op, make_real, clone_inputs=True)
            t0 = self.timer()
            out = inst()
            t1 = self.timer()
            outs = [o for o in _flat(out) if o.requires_grad]
            targets = inst.grad_targets()
            t_bwd = 0.0
            if outs and targets:
                grads = [torch.randn_like(o) for o in outs]
                t2 = self.timer()
                torch.autograd.grad(outs, targets, grads, allow_unused=True)
                t_bwd = max(self.timer() - t2 - self.engine_overhead(), 0.0)
            if i >= self.warmup:
                fwd_times.append(t1 - t0)
                bwd_times.append(t_bwd)
        f, fn, _ = robust_estimate(fwd_times)
        b, bn, _ = robust_estimate(bwd_times)
        return f, b, fn, bn


def _flat(out: Any) -> list[torch.Tensor]:
    return [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
