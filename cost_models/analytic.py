"""Analytic (roofline) cost model: FLOPs, bytes and saved tensors counted on fake tensors, priced by a DeviceSpec.

Each compute node's operation is re-run alone (:mod:`fxpipe.cost_models.op_trace`), on fresh
fake tensors of its inputs' shapes (``node.meta["val"]`` from shape_prop), under three recorders::

    FakeTensorMode            no real memory, no real compute
      └ FlopCounterMode       FLOPs per aten op (+ CPU flash attention, missing upstream)
          └ _OpRecorder       per aten op: FLOPs, bytes moved, dtype, kernel launched?
    saved_tensors_hooks       what autograd keeps for backward: an input, an output, or a temporary

then its backward (``torch.autograd.grad``) under the same recorders. Every
aten op is priced by the roofline (:func:`roofline_time`; by default the intensity form
``flops / peak(dtype) + bytes / bandwidth``, or ``"max"``: ``max(flops / peak(dtype), bytes / bandwidth)``)
plus ``kernel_overhead``. Results are cached per operation signature (op or module
type and config, input shapes/strides/dtypes, parameter shapes), so the 48
identical layers of a GPT-2 XL are counted once.

Under bf16/fp16 the graph is first re-run under ``torch.autocast``
(:func:`fxpipe.passes.shape_prop.autocast_shape_prop`) and every operation is traced on
inputs of the dtypes autocast gives, its forward under autocast: activation bytes are then
what autograd saves in training, the cast copies of a ``Linear``'s input and weight included.

Activation bytes are charged once per storage for the whole graph: a tensor
saved by several nodes (``tanh`` saves its output, the next ``Linear`` saves
the same tensor as its input) is charged to the first saver in graph order,
measured as the size of the storage it lives in (``q``, ``k``, ``v`` are views
of one ``qkv`` storage), exactly as dedup-by-storage of the real autograd graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref
from typing import Any, Iterable, Sequence

import torch
import torch.fx
from torch._subclasses import FakeTensorMode

from fxpipe.cost_models.device import DeviceSpec, get_device
from fxpipe.errors import ConfigError
from fxpipe.ir import META_VAL, NodeCost
from fxpipe.passes.shape_prop import META_AMP_VAL, autocast_shape_prop
from fxpipe.precision import check_precision, compute_dtype

from .op_trace import (FLOP_FORMULAS, NO_WORK_OPS, Instance, NodeOp, OpProfile, OpRecord, Recording,  # noqa: F401
                       Trace, _storage_key, _storage_nbytes, _tensors, _TSpec, classify_saved, make_real,
                       node_op, trace_op)

__all__ = ["AnalyticCostModel", "GraphCostModel", "OpProfile", "NodeOp", "node_op", "roofline_time",
           "FLOP_FORMULAS", "ROOFLINES"]

ROOFLINES = ("intensity", "max")


def roofline_time(flops: float, nbytes: float, dtype: torch.dtype | str, device: DeviceSpec,
                  kernels: int = 1, roofline: str = "max") -> float:
    """Seconds for ``kernels`` launches doing ``flops`` FLOPs and moving ``nbytes`` bytes.

    ``"max"``: the plain roofline, ``max(flops / peak(dtype), nbytes / mem_bandwidth)``;
    ``"intensity"``: ``flops / peak + nbytes / mem_bandwidth``, i.e. an op of arithmetic
    intensity I = flops / nbytes runs at ``peak * I / (I + I_ridge)`` with
    ``I_ridge = peak / mem_bandwidth`` (half the peak at the roofline's ridge point,
    saturating as I grows). A matmul's I grows with its smallest dimension, so a larger
    microbatch (more rows) runs closer to the peak. Both add ``kernels * kernel_overhead``.

    Example: 1 GFLOP of float32 moving 4 MB on a device with 1 TFLOP/s, 1 TB/s and
    5 us per kernel takes max(1e-3, 4e-6) + 5e-6 = 1.005 ms ("max"), 1.009 ms ("intensity").
    """
    compute, memory = flops / device.peak(dtype), nbytes / device.mem_bandwidth
    body = compute + memory if roofline == "intensity" else max(compute, memory)
    return body + kernels * device.kernel_overhead


def _roofline(ops: Iterable[OpRecord], device: DeviceSpec, roofline: str = "max",
              precision: str = "fp32") -> float:
    """Sum of :func:`roofline_time` over aten ops; under bf16/fp16 float32 ops run in the compute dtype."""
    total = 0.0
    for r in ops:
        dtype, nbytes = r.dtype, r.nbytes
        if precision != "fp32" and dtype == torch.float32:
            dtype = compute_dtype(precision)
            nbytes = nbytes * _itemsize(dtype) / 4
        total += roofline_time(r.flops, nbytes, dtype, device, kernels=int(r.kernel), roofline=roofline)
    return total


class GraphCostModel:
    """Base of the analytic and profiled models: caching per signature, activation accounting per graph.

    Subclasses implement :meth:`_profile_many` (signature -> OpProfile).
    """

    _traces_autocast = False     # subclasses that re-run ops under torch.autocast set this

    def __init__(self, device: str | DeviceSpec | None = None, precision: str = "fp32",
                 autocast: bool = True) -> None:
        self.device = get_device(device)
        self.precision = check_precision(precision)
        self.autocast = bool(autocast)
        self._profiles: dict[str, OpProfile] = {}
        self._graphs: "weakref.WeakKeyDictionary[torch.fx.Graph, dict[str, tuple[Any, NodeCost]]]" = \
            weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        amp = "" if self.autocast else ", autocast=False"
        return f"{type(self).__name__}(device={self.device.name!r}, precision={self.precision!r}{amp})"

    @property
    def autocast_rules(self) -> tuple[str, torch.dtype] | None:
        """``(device_type, dtype)`` of the ``torch.autocast`` whose dtype rules activations follow: the
        CPU's for the ``"cpu"`` device, CUDA's for every other (GPU) DeviceSpec; None under fp32 or
        ``autocast=False`` (the blanket rule)."""
        if self.precision == "fp32" or not self.autocast or not self._traces_autocast:
            return None
        return "cpu" if self.device.name == "cpu" else "cuda", compute_dtype(self.precision)

    def _nbytes(self, nbytes: int, dtype: torch.dtype | None) -> int:
        """Bytes of a float32 activation held in the compute dtype of ``precision`` (others as they are):
        the blanket rule, used when :attr:`autocast_rules` is None."""
        if self.precision == "fp32" or dtype not in (torch.float32, None):
            return int(nbytes)
        return int(nbytes) * _itemsize(compute_dtype(self.precision)) // 4

    def comm_time(self, nbytes: int) -> float:
        """Seconds to send ``nbytes`` to the next stage: ``link_latency + nbytes / intra_node_bandwidth``."""
        if nbytes <= 0:
            return 0.0
        return self.device.link_latency + float(nbytes) / self.device.intra_node_bandwidth

    def node_cost(self, node: torch.fx.Node) -> NodeCost:
        """Cost of ``node`` for one microbatch (costs the whole graph on first use, then caches).

        Raises:
            CostModelError: shape_prop has not run, or the node's operation fails on its inputs.
        """
        costs = self._graphs.get(node.graph)
        if costs is None or costs.get(node.name, (None,))[0] is not node.target:
            costs = self._cost_graph(node.graph)
            self._graphs[node.graph] = costs  # keyed by name: values must not keep the graph alive
        return costs[node.name][1]

    def _profile_many(self, ops: list[NodeOp]) -> None:
        raise NotImplementedError

    def _cost_graph(self, graph: torch.fx.Graph) -> dict[str, tuple[Any, NodeCost]]:
        """Price every node of ``graph``: ``name -> (target, NodeCost)``."""
        amp = self.autocast_rules
        key = META_VAL
        if amp is not None:            # each node's dtypes as autocast makes them: bytes as they are
            autocast_shape_prop(graph, *amp)
            key = META_AMP_VAL
        nbytes_of = self._nbytes if amp is None else _as_is
        ops = {n: node_op(n, key) for n in graph.nodes}
        todo: dict[str, NodeOp] = {}
        for op in ops.values():
            if op is not None and op.key not in self._profiles:
                todo.setdefault(op.key, op)
        if todo:
            self._profile_many(list(todo.values()))
        # Saved bytes: a storage once per graph, charged to the node that produced it when that is a
        # compute node (the producing stage keeps its outputs until their backward; a later stage
        # that saves a received tensor holds its own copy, X_s of the memory model), else to the saver.
        charged: set[Any] = set()
        acts: dict[str, int] = {}
        for n, op in ops.items():
            if op is None:
                continue
            for kind, i, nbytes in self._profiles[op.key].saved:
                owner = n.name
                if kind == "in":
                    if op.in_is_state[i]:
                        continue
                    v = op.in_vals[i]
                    skey: Any = _storage_key(v)
                    nbytes = nbytes_of(_storage_nbytes(v), v.dtype)
                    src = op.in_nodes[i]
                    if src is not None and src.op in ("call_function", "call_module", "call_method"):
                        owner = src.name
                elif kind == "out" and i < len(op.out_vals):
                    v = op.out_vals[i]
                    skey, nbytes = _storage_key(v), nbytes_of(_storage_nbytes(v), v.dtype)
                else:
                    skey = (n.name, kind, i)
                    if kind == "tmp":                     # a floating temporary; a "mask" keeps its bytes
                        nbytes = nbytes_of(nbytes, None)
                if skey not in charged:
                    charged.add(skey)
                    acts[owner] = acts.get(owner, 0) + int(nbytes)
        costs: dict[str, tuple[Any, NodeCost]] = {}
        for n, op in ops.items():
            if op is None:
                out = sum(nbytes_of(t.numel() * t.element_size(), t.dtype) for t in _tensors(n.meta.get(key)))
                costs[n.name] = (n.target, NodeCost(output_bytes=int(out) if n.op != "get_attr" else 0,
                                                    activation_bytes=acts.get(n.name, 0)))
                continue
            prof = self._profiles[op.key]
            act = acts.get(n.name, 0)
            out_bytes = sum(nbytes_of(t.numel() * t.element_size(), t.dtype) for t in op.out_vals)
            pbytes = op.param_bytes + sum(int(v.numel() * v.element_size()) for v, st, nd in
                                          zip(op.in_vals, op.in_is_state, op.in_nodes) if st and nd is not None)
            costs[n.name] = (n.target, NodeCost(
                fwd_time=prof.fwd_time, bwd_time=prof.bwd_time, param_bytes=int(pbytes), activation_bytes=act,
                output_bytes=int(out_bytes), fwd_flops=prof.fwd_flops, bwd_flops=prof.bwd_flops,
                bytes_read=prof.bytes_read, bytes_written=prof.bytes_written))
        return costs


def _as_is(nbytes: int, dtype: torch.dtype | None) -> int:
    return int(nbytes)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


class AnalyticCostModel(GraphCostModel):
    """Roofline cost model: FLOPs and bytes counted on fake tensors, priced with a DeviceSpec.

    Implements the CostModel protocol (``node_cost``, ``comm_time``). Works on
    meta-device models; needs only ``node.meta["val"]`` from shape_prop.

    Args:
        device: a DeviceSpec, a preset name (``"a100-80gb"``), or None for this CPU.
        precision: "fp32" | "bf16" | "fp16" (:mod:`fxpipe.precision`): float32 ops are priced at
            the compute dtype's FLOP rate moving the compute dtype's bytes (ops autocast keeps in
            float32 too: an approximation); activations and stage outputs have the dtypes
            ``torch.autocast`` gives them (parameters stay as the model has them; the memory model
            adds master copies).
        autocast: False: the model runs in the compute dtype itself (Megatron-LM's fp16), every
            floating activation and output counted in it, not as autocast makes them.
        roofline: "intensity" (default: efficiency saturates with arithmetic intensity, so larger
            microbatches run faster per sample) or "max" (the plain roofline); see :func:`roofline_time`.

    Example::

        >>> shape_prop(gm, x); annotate(gm, AnalyticCostModel("h100-80gb", precision="bf16"))
    """

    _traces_autocast = True

    def __init__(self, device: str | DeviceSpec | None = None, precision: str = "fp32",
                 roofline: str = "intensity", autocast: bool = True) -> None:
        super().__init__(device, precision, autocast)
        if roofline not in ROOFLINES:
            raise ConfigError(f"unknown roofline {roofline!r}; choose one of {', '.join(map(repr, ROOFLINES))}")
        self.roofline = roofline
        self._mode = FakeTensorMode()

    def _fake(self, s: _TSpec) -> torch.Tensor:
        # CUDA's autocast values are fake CUDA tensors; autograd runs on CPU fakes (amp_trace)
        dev = "cpu" if s.device.type == "cuda" and self.autocast_rules is not None else s.device
        return torch.empty_strided(s.shape, s.stride, dtype=s.dtype, device=dev)

    def _profile_many(self, ops: list[NodeOp]) -> None:
        for op in ops:
            self._profiles[op.key] = self.profile(op)

    def profile(self, op: NodeOp) -> OpProfile:
        """Count and price one operation (no caching; :meth:`node_cost` caches)."""
        try:
            tr = trace_op(op, self._fake, torch.empty_like, lambda: self._mode,
                          fused_dropout=self.device.name != "cpu",   # a GPU saves dropout's 1-byte mask
                          autocast=self.autocast_rules)
        except Exception:  # noqa: BLE001 - data-dependent ops (an opaque leaf's `if x.sum() > 0`)
            try:  # count the same way on real random tensors of the node's shapes
                tr = trace_op(op, lambda s: make_real(dataclasses.replace(s, device=torch.device("cpu"))
                                                      if s.device.type == "cuda" else s),
                              torch.randn_like, contextlib.nullcontext, autocast=self.autocast_rules)
            except Exception as e:  # noqa: BLE001 - price what we know, say what failed
                warnings.warn(f"AnalyticCostModel: could not run {op.name} on fake or real tensors of its "
                              f"shapes ({type(e).__name__}: {e}); pricing it by the bytes of its inputs and "
                              "outputs", stacklevel=3)
                return self._bytes_only(op)
        return self._price(tr)

    def _bytes_only(self, op: NodeOp) -> OpProfile:
        nbytes = sum(_numel(s.shape) * _itemsize(s.dtype) for s in op.leaves if isinstance(s, _TSpec))
        nbytes += sum(t.numel() * t.element_size() for t in op.out_vals)
        t = roofline_time(0.0, self._nbytes(nbytes, None), compute_dtype(self.precision), self.device)
        return OpProfile(fwd_time=t, bwd_time=2 * t, bytes_read=float(nbytes), fwd_kernels=1, bwd_kernels=2)

    def _price(self, tr: Trace) -> OpProfile:
        fwd_flops = float(sum(r.flops for r in tr.fwd_ops))
        fwd_time = _roofline(tr.fwd_ops, self.device, self.roofline, self.precision)
        fwd_kernels = sum(r.kernel for r in tr.fwd_ops)
        if tr.bwd_ops is None:  # backward not runnable on fakes: the usual 2x forward
            bwd_flops, bwd_time, bwd_kernels = 2 * fwd_flops, 2 * fwd_time, 2 * fwd_kernels
        else:
            bwd_flops = float(sum(r.flops for r in tr.bwd_ops))
            bwd_time = _roofline(tr.bwd_ops, self.device, self.roofline, self.precision)
            bwd_kernels = sum(r.kernel for r in tr.bwd_ops)
        return OpProfile(fwd_time=fwd_time, bwd_time=bwd_time, fwd_flops=fwd_flops, bwd_flops=bwd_flops,
                         bytes_read=tr.bytes_read, bytes_written=tr.bytes_written, fwd_kernels=fwd_kernels,
                         bwd_kernels=bwd_kernels, saved=tr.saved)
