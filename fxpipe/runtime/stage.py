"""One pipeline stage at run time: forward and backward of one microbatch, and what it receives and sends.

Both executors drive the same object and only move data between stages (the split of
``torch.distributed.pipelining``'s ``_PipelineStageBase`` and the schedules that drive it)::

    received {(p, k): tensor}   ──▶ StageRuntime.forward(mb)   ──▶ outputs (to every consumer),
                                                                    loss (last stage)
    {k: grad of output k}       ──▶ StageRuntime.backward(mb)  ──▶ {(p, k): grad of that input}
                                                                    (to every producer p)

``(p, k)`` names output ``k`` of stage ``p``.  The local executor takes the received values from
a dict in the same process; the distributed one receives them from the producers' ranks.  A
stage computes with one weight version per batch (:mod:`fxpipe.runtime.weights`): the leaves
of that version collect the gradients of all its microbatches.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.utils.checkpoint import checkpoint

try:  # torch >= 2.4: backward from an autograd edge
    from torch.autograd.graph import GradientEdge, get_gradient_edge
except ImportError:  # pragma: no cover - older torch keeps the output tensors
    GradientEdge = None  # type: ignore[assignment,misc]
    get_gradient_edge = None  # type: ignore[assignment]

from fxpipe.errors import ConfigError, LossError
from fxpipe.ir import PipelineProgram, Source, StageProgram
from fxpipe.runtime.amp import LossScaler, autocast
from fxpipe.runtime.weights import WeightVersions
from fxpipe.trace_fixes import with_device

__all__ = ["StageRuntime", "SavedBytes", "Key", "check_loss", "stage_needs", "stage_param_names", "stage_params",
           "get_attr", "edge_meta"]

Key = tuple[int, int]          # (producer stage p, index k of its output)


def get_attr(root: torch.nn.Module, qualname: str) -> Any:
    """``root.a.b.c`` for ``qualname == "a.b.c"``."""
    obj: Any = root
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def stage_param_names(program: PipelineProgram, st: StageProgram, canonical: dict[int, str]) -> dict[str, str]:
    """Stage-module parameter name (or attr name read as a stage input) -> canonical name, tied ones included."""
    names = {n: canonical[id(p)] for n, p in st.module.named_parameters(remove_duplicate=False)}
    for src in st.sources:
        if src.kind == "attr":
            obj = get_attr(program.root, src.name)
            if isinstance(obj, torch.nn.Parameter) and id(obj) in canonical:
                names.setdefault(src.name, canonical[id(obj)])
    return names


def stage_params(program: PipelineProgram, canonical: dict[int, str]) -> list[dict[str, str]]:
    """Per stage: stage-module parameter name (or attr name) -> canonical name, tied parameters included."""
    return [stage_param_names(program, st, canonical) for st in program.stages]


def stage_needs(program: PipelineProgram) -> list[list[Key]]:
    """Per stage, the outputs ``(p, k)`` of earlier stages it reads, sorted; the last stage also
    reads the model outputs that earlier stages produce (it runs the loss)."""
    d = program.num_stages
    out = []
    for st in program.stages:
        need = {(s.stage, s.index) for s in st.sources if s.kind == "stage"}
        if st.index == d - 1:
            need |= {(s.stage, s.index) for s in program.output_sources if s.kind == "stage" and s.stage != d - 1}
        out.append(sorted(need))
    return out


def edge_meta(program: PipelineProgram, needs: list[list[Key]]) -> dict[Key, tuple[torch.Size, torch.dtype]]:
    """Shape and dtype of every output another stage reads (from shape propagation), for receive buffers."""
    meta = {}
    for st in program.stages:
        out = next(n for n in st.module.graph.nodes if n.op == "output").args[0]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for k, node in enumerate(outs):
            val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
            if val is None and isinstance(node, torch.fx.Node) and "tensor_meta" in node.meta:
                val = node.meta["tensor_meta"]
            if val is not None and hasattr(val, "shape") and hasattr(val, "dtype"):
                meta[(st.index, k)] = (torch.Size(val.shape), val.dtype)
    for c, need in enumerate(needs):
        for key in need:
            if key not in meta:
                raise ConfigError(f"distributed executor: output {key[1]} of stage {key[0]} (read by stage {c}) "
                                  "has no static shape/dtype in node.meta['val']; run shape propagation "
                                  "(fxpipe.compile does) and make sure stages exchange tensors only")
    return meta


def check_loss(loss: Any, microbatch: int) -> torch.Tensor:
    """``loss`` if it is a one-element floating tensor with a gradient, else a LossError saying what it is.

    Raises:
        LossError: a Python number, a non-scalar tensor, an integer tensor, or one without ``grad_fn``.
    """
    how = "return loss_fn(model_output, targets) as a scalar tensor computed from the output, e.g. " \
          "torch.nn.functional.mse_loss(out, y)"
    if not isinstance(loss, torch.Tensor):
        extra = " (was .item() or float() called on it?)" if isinstance(loss, (int, float)) else ""
        raise LossError(f"loss_fn returned a {type(loss).__name__} ({loss!r:.60}) for microbatch {microbatch}, "
                        f"not a tensor{extra}; {how}")
    if loss.numel() != 1:
        raise LossError(f"loss_fn returned a tensor of shape {tuple(loss.shape)} for microbatch {microbatch}, "
                        "not a scalar; reduce it (e.g. .mean() or reduction='mean') — " + how)
    if not (loss.is_floating_point() or loss.is_complex()):
        raise LossError(f"loss_fn returned a {loss.dtype} tensor for microbatch {microbatch}; a loss must be "
                        f"floating point to have a gradient; {how}")
    if not loss.requires_grad:
        raise LossError(f"loss_fn returned a tensor without a gradient (requires_grad=False) for microbatch "
                        f"{microbatch}: it was detached, computed under torch.no_grad(), or built from "
                        f"Python numbers; {how}")
    return loss


class SavedBytes:
    """Counts the bytes autograd saves for backward inside ``with``: once per view, at most the whole
    storage, parameters (``weights``) excluded; :meth:`hold` adds tensors the executor keeps anyway
    (a stage's received inputs).  ``total`` holds the count after the block."""

    def __init__(self, weights: Any) -> None:
        self._weights = {t.untyped_storage().data_ptr() for t in weights if t.device.type != "meta"}
        self._views: dict[int, tuple[int, set[tuple[int, tuple[int, ...], tuple[int, ...]]], int]] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in self._weights:
                cap, seen, total = self._views.get(ptr, (st.nbytes(), set(), 0))
                key = (t.storage_offset(), tuple(t.shape), tuple(t.stride()))
                if key not in seen:
                    seen.add(key)
                    total += t.numel() * t.element_size()
                self._views[ptr] = (cap, seen, total)
        return t

    def hold(self, tensors: Any) -> None:
        """Count ``tensors`` (those that are tensors) as held for the backward too."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._pack(t)

    @property
    def total(self) -> int:
        return sum(min(cap, total) for cap, _, total in self._views.values())

    def __enter__(self) -> "SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def _detach_input(x: Any) -> Any:
    """A received value as a leaf of this stage's graph (floating tensors collect their gradient)."""
    if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()):
        return x.detach().requires_grad_(True)
    if isinstance(x, torch.Tensor):
        return x.detach()
    return x


def _edge(t: Any) -> Any:
    """What the backward of an output needs: its autograd edge, not its data.

    Keeping the output tensor until the microbatch's backward would hold its memory
    (Megatron frees it by swapping ``.data``); a ``GradientEdge`` keeps the graph and
    lets the storage go as soon as nobody else holds it, unless autograd saved it.
    """
    if GradientEdge is not None and isinstance(t, torch.Tensor) and t.grad_fn is not None:
        return get_gradient_edge(t)
    return t


def _devices_on(module: torch.fx.GraphModule, device: torch.device) -> None:
    """Every device constant of the stage's graph made ``device``: torch.export bakes the tracing run's
    device into ``arange(..., device=)`` and ``.to(x.device)`` (``aten.to.dtype_layout(device=cpu)``), so a
    model traced on the CPU would build its positions and move its activations off a CUDA stage (received
    values are moved onto it by ``_here``)."""
    dev, changed = torch.device(device), False
    for n in module.graph.nodes:
        if n.op in ("call_function", "call_method") and any(
                isinstance(v, torch.device) and v != dev for v in pytree.tree_leaves((n.args, n.kwargs))):
            n.args, n.kwargs = with_device((n.args, n.kwargs), dev)
            changed = True
    if changed:
        module.recompile()


def _needs_grad(o: Any) -> bool:
    return (GradientEdge is not None and isinstance(o, GradientEdge)) or \
        (isinstance(o, torch.Tensor) and o.requires_grad)


class StageRuntime:
    """Stage ``index`` of ``program``: runs its module on one microbatch forward or backward.

    Args:
        program: the whole split pipeline (routing and the root module of "attr" sources).
        index: which stage this is.
        needs: :func:`stage_needs` of ``program``.
        param_names: stage-module parameter name -> canonical name (:func:`stage_param_names`).
        weights_of: canonical name -> the WeightVersions holding that parameter (this stage's own,
            or for a tied parameter under the local executor the owning stage's).
        recompute: recompute activations in backward (``torch.utils.checkpoint``).
        loss_fn: ``loss_fn(model_output, targets) -> scalar``, run by the last stage.
        num_microbatches: the loss of each microbatch is divided by this (the batch's mean).
        device: where this stage computes (inputs, received values and targets are moved there);
            None leaves them where they are.
        keep: how many microbatches' measurements to keep (None: all, until :meth:`reset_measurements`).
        precision: "fp32" | "bf16" | "fp16": the forward and the loss run under ``torch.autocast``
            for the latter two (:mod:`fxpipe.runtime.amp`).
        scaler: fp16's loss scaler; the last stage multiplies its loss by ``scaler.scale``.

    Attributes:
        program: this stage's StageProgram; ``weights``/``owned``: the versions and canonical
        names whose optimizer lives here; ``fwd_seconds``/``bwd_seconds``: per microbatch, compute
        seconds; ``saved_bytes``: bytes autograd saved (parameters excluded) by the first microbatch
        of each batch (``mb % num_microbatches == 0``): every microbatch has the same shapes, and
        counting them costs a Python hook per saved tensor, 5-7% of a step when done on all.
    """

    def __init__(self, program: PipelineProgram, index: int, needs: list[list[Key]], param_names: dict[str, str],
                 weights_of: dict[str, WeightVersions], *, recompute: bool,
                 loss_fn: Callable[..., torch.Tensor] | None, num_microbatches: int,
                 device: torch.device | None = None, keep: int | None = None, precision: str = "fp32",
                 scaler: LossScaler | None = None) -> None:
        d = program.num_stages
        self.routing = program
        self.program: StageProgram = program.stages[index]
        self.index = index
        self.is_last = index == d - 1
        self.needs: list[Key] = needs[index]
        self.producers = sorted({p for p, _ in self.needs})
        self.consumers = sorted({c for c in range(d) for p, _ in needs[c] if p == index})
        self.param_names = param_names
        self._weights_of = weights_of
        self.weights: WeightVersions | None = None
        self.owned: list[str] = []
        self.recompute = recompute
        self.loss_fn = loss_fn
        self.m = num_microbatches
        self.device = device
        if device is not None:
            _devices_on(self.program.module, device)
        self._keep = keep
        self.precision = precision
        self.scaler = scaler
        first = next((weights_of[c].params[c] for c in param_names.values()), None)
        self.device_type = device.type if device is not None else first.device.type if first is not None else "cpu"
        attrs = {s.name for s in self.program.sources if s.kind == "attr"}
        self._slots = _param_slots(self.program.module, [n for n in param_names if n not in attrs])
        # per microbatch in flight: (received leaves needing grad, output edges, loss or None)
        self.saved: dict[int, tuple[dict[Key, torch.Tensor], tuple[Any, ...], torch.Tensor | None]] = {}
        self.fwd_seconds: list[float] = []
        self.bwd_seconds: list[float] = []
        self.saved_bytes: list[int] = []

    # -- parameters ---------------------------------------------------------------
    def params(self, version: int | None) -> dict[str, torch.Tensor]:
        """Stage-module name -> tensor of weight ``version`` (leaves collecting grads), or the newest (None)."""
        by_owner: dict[int, dict[str, torch.Tensor]] = {}
        out = {}
        for name, c in self.param_names.items():
            w = self._weights_of[c]
            src = by_owner.get(id(w))
            if src is None:
                src = by_owner[id(w)] = w.newest() if version is None else w.leaves(version)
            out[name] = self._here(src[c])      # a tied parameter of a stage on another device: a copy
        return out

    # -- forward / backward of one microbatch -------------------------------------
    def forward(self, mb: int, inputs: list[Any], received: dict[Key, Any], version: int,
                target: Any = None) -> tuple[tuple[Any, ...], torch.Tensor | None]:
        """Run microbatch ``mb`` with weight ``version``; keep what its backward needs.

        Args:
            mb: the microbatch's id (any int unique among those in flight).
            inputs: the model inputs of this microbatch (flat, placeholder order).
            received: ``(p, k) -> value`` for every key in :attr:`needs`.
            version: the weight version (``weight_version`` of the schedule).
            target: the targets of this microbatch (last stage only).

        Returns:
            (the stage's outputs, the detached loss on the last stage else None).
        """
        t0 = time.perf_counter()
        params = self.params(version)
        leaves = {key: _detach_input(self._here(v)) for key, v in received.items()}
        args = [self._resolve(s, inputs, leaves, params) for s in self.program.sources]
        outs = self._call(args, params, grad=True, measure=not self.saved_bytes)
        loss = None
        if self.is_last:
            assert self.loss_fn is not None
            model_out = self._model_output(outs, inputs, leaves, params)
            with autocast(self.precision, self.device_type):
                loss = check_loss(self.loss_fn(model_out, pytree.tree_map(self._here, target)), mb % self.m)
        self.saved[mb] = ({k: v for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad},
                          tuple(_edge(o) for o in outs), loss)
        self._record(self.fwd_seconds, time.perf_counter() - t0)
        return outs, (loss.detach() if loss is not None else None)

    def backward(self, mb: int, grads: dict[int, torch.Tensor | None]) -> dict[Key, torch.Tensor | None]:
        """Backward of microbatch ``mb`` given the gradient of each output ``k`` (summed over consumers).

        The last stage adds its loss divided by ``num_microbatches`` (times the loss scale under
        fp16).  Parameter gradients
        accumulate on the weight version's leaves.

        Returns:
            ``(p, k) -> gradient`` of every received floating input (None where it got none).
        """
        t0 = time.perf_counter()
        leaves, outs, loss = self.saved.pop(mb)
        tensors: list[Any] = []
        gvals: list[Any] = []
        if loss is not None:
            tensors.append(loss / self.m if self.scaler is None else (loss / self.m) * self.scaler.scale)
            gvals.append(None)
        for k in sorted(grads):
            g = grads[k]
            if g is not None and _needs_grad(outs[k]):
                tensors.append(outs[k])
                gvals.append(self._here(g))
        if tensors:
            torch.autograd.backward(tensors, gvals)
        self._record(self.bwd_seconds, time.perf_counter() - t0)
        return {key: leaf.grad for key, leaf in leaves.items()}

    @torch.no_grad()
    def forward_only(self, inputs: list[Any], received: dict[Key, Any]) -> tuple[tuple[Any, ...], Any]:
        """Outputs with the newest weights, no graph kept; and the model output on the last stage (else None)."""
        params = self.params(None)
        vals = {key: self._here(v) for key, v in received.items()}
        args = [self._resolve(s, inputs, vals, params) for s in self.program.sources]
        outs = self._call(args, params, grad=False)
        return outs, (self._model_output(outs, inputs, vals, params) if self.is_last else None)

    @torch.no_grad()
    def eval_loss(self, model_out: Any, target: Any) -> torch.Tensor:
        """``loss_fn`` of a forward-only output (last stage), under the stage's autocast, detached."""
        assert self.loss_fn is not None
        with autocast(self.precision, self.device_type):
            loss = self.loss_fn(model_out, pytree.tree_map(self._here, target))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            check_loss(loss, 0)
        return loss.detach()

    def discard(self) -> None:
        """Forget every microbatch in flight (after a failed step)."""
        self.saved.clear()

    def reset_measurements(self) -> None:
        """Forget the compute times (``saved_bytes``, measured once, stays)."""
        self.fwd_seconds, self.bwd_seconds = [], []

    # -- helpers --------------------------------------------------------------------
    def _here(self, x: Any) -> Any:
        if self.device is not None and isinstance(x, torch.Tensor) and x.device != self.device:
            return x.to(self.device)
        return x

    def _record(self, values: list, v: Any) -> None:
        values.append(v)
        if self._keep is not None and len(values) > self._keep:
            del values[0]

    def _resolve(self, src: Source, inputs: list[Any], received: dict[Key, Any],
                 params: dict[str, torch.Tensor]) -> Any:
        if src.kind == "input":
            return self._here(inputs[src.index])
        if src.kind == "attr":      # a buffer read by a local value's copy lives on the root's device
            return params[src.name] if src.name in params else self._here(get_attr(self.routing.root, src.name))
        if src.kind == "stage":
            return received[(src.stage, src.index)]
        return src.value

    def _model_output(self, outs: tuple[Any, ...], inputs: list[Any], received: dict[Key, Any],
                      params: dict[str, torch.Tensor]) -> Any:
        leaves = [outs[s.index] if s.kind == "stage" and s.stage == self.index
                  else self._resolve(s, inputs, received, params) for s in self.routing.output_sources]
        return pytree.tree_unflatten(leaves, self.routing.output_spec)

    def _call(self, args: list[Any], params: dict[str, torch.Tensor], grad: bool,
              measure: bool = False) -> tuple[Any, ...]:
        mod = self.program.module

        def fn(*xs: Any) -> tuple[Any, ...]:
            with _reparametrized(self._slots, params), autocast(self.precision, self.device_type):
                return mod(*xs)

        if not grad:
            out = fn(*args)
        elif not measure:
            out = checkpoint(fn, *args, use_reentrant=False) if self.recompute else fn(*args)
        else:
            with SavedBytes(params.values()) as saved:
                saved.hold(a for a in args if isinstance(a, torch.Tensor) and a.requires_grad)
                out = checkpoint(fn, *args, use_reentrant=False) if self.recompute else fn(*args)
            self._record(self.saved_bytes, saved.total)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


Slot = tuple[str, dict[str, Any], str]       # (stage-module name, the owning submodule's _parameters, its key)


def _param_slots(module: torch.nn.Module, names: list[str]) -> list[Slot]:
    """Where each parameter ``names[i]`` of ``module`` lives, looked up once per stage."""
    slots = []
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        slots.append((name, module.get_submodule(prefix)._parameters, leaf))
    return slots


@contextlib.contextmanager
def _reparametrized(slots: list[Slot], params: dict[str, torch.Tensor]) -> Iterator[None]:
    """The module's parameters replaced by ``params`` (its name -> tensor) for one call, then put back.

    What ``torch.func.functional_call(module, params, args)`` does, without resolving every name
    and checking ties on each call: the slots were resolved once (:func:`_param_slots`) and every
    tied name is given its tensor.
    """
    old = [(table, leaf, table[leaf]) for _, table, leaf in slots]
    try:
        for name, table, leaf in slots:
            table[leaf] = params[name]
        yield
    finally:
        for table, leaf, value in reversed(old):
            table[leaf] = value
