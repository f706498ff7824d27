"""One graph node's operation run alone, forward and backward, on fake or real tensors: aten ops and saved tensors.

:func:`node_op` detaches a node's operation from the graph (what to call, on inputs of
which shapes); :func:`trace_op` runs it under FlopCounterMode and an aten recorder, with
``saved_tensors_hooks`` naming what autograd keeps (an input, an output or a temporary).
The analytic and profiled cost models price what it records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch.utils import _pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from fxpipe.errors import CostModelError
from fxpipe.ir import META_VAL

__all__ = ["OpProfile", "NodeOp", "node_op", "OpRecord", "Recording", "Instance", "Trace", "trace_op",
           "make_real", "classify_saved", "FLOP_FORMULAS", "NO_WORK_OPS", "FusedDropout"]

_aten = torch.ops.aten
NO_WORK_OPS = ("placeholder", "output", "get_attr")


def _sdpa_cpu_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_bwd_flops(grad_out: Any, query: Any, key: Any, value: Any, *args: Any,
                        out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# Formulas missing from torch.utils.flop_counter: scaled_dot_product_attention on CPU and
# fake CPU tensors dispatches to the CPU flash kernel, which upstream counts as 0 FLOPs.
FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_bwd_flops,
}

# Ops that move no data and launch no kernel (besides those marked is_view).
_METADATA_OPS = {
    _aten._unsafe_view, _aten.detach, _aten.alias, _aten.lift_fresh, _aten.empty, _aten.empty_like,
    _aten.empty_strided, _aten.new_empty, _aten.new_empty_strided, _aten._reshape_alias,
}



@dataclass(frozen=True)
class OpProfile:
    """Cost of one operation signature (shared by every node with that signature).

    ``saved`` lists what autograd keeps for backward, parameters and buffers excluded:
    ``("in", i, nbytes)`` the i-th tensor input, ``("out", k, nbytes)`` the k-th tensor
    output, ``("tmp", j, nbytes)`` a floating tensor created inside the operation,
    ``("mask", j, nbytes)`` a non-floating one (a dropout mask: its bytes do not follow precision).
    """

    fwd_time: float
    bwd_time: float
    fwd_flops: float = 0.0
    bwd_flops: float = 0.0
    bytes_read: float = 0.0
    bytes_written: float = 0.0
    fwd_kernels: int = 0
    bwd_kernels: int = 0
    saved: tuple[tuple[str, int, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["saved"] = [list(s) for s in self.saved]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "OpProfile":
        return cls(**{**d, "saved": tuple((str(k), int(i), int(b)) for k, i, b in d["saved"])})


@dataclass(frozen=True)
class _TSpec:
    """Shape, stride, dtype and device of a tensor input."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool

    @classmethod
    def of(cls, t: torch.Tensor, requires_grad: bool | None = None) -> "_TSpec":
        dev = t.device if t.device.type != "meta" else torch.device("cpu")
        rg = t.requires_grad if requires_grad is None else requires_grad
        return cls(tuple(int(s) for s in t.shape), tuple(int(s) for s in t.stride()), t.dtype, dev,
                   bool(rg and (t.dtype.is_floating_point or t.dtype.is_complex)))

    def describe(self) -> str:
        return f"T{list(self.shape)}{list(self.stride)}{str(self.dtype)[6:]}{'g' if self.requires_grad else ''}"


class _Leaf:
    """A tensor among a node's inputs, with the node that produced it (pytree leaf)."""

    __slots__ = ("node", "val")

    def __init__(self, node: torch.fx.Node | None, val: torch.Tensor) -> None:
        self.node, self.val = node, val


@dataclass
class NodeOp:
    """A node's operation, detached from the graph: what to call and on which inputs."""

    name: str                               # node.format_node(), for messages
    kind: str                               # fx op
    call: Callable[..., Any] | None         # function / method caller (None for modules)
    module: torch.nn.Module | None          # call_module: the submodule
    spec: Any                               # pytree spec of (args, kwargs)
    leaves: list[Any]                       # constants, or _TSpec for tensor inputs
    tensor_pos: list[int]                   # positions in leaves of the tensor inputs
    in_vals: list[torch.Tensor]             # shape_prop values of the tensor inputs
    in_is_state: list[bool]                 # the input is a parameter/buffer/constant
    in_nodes: list[torch.fx.Node | None]    # the node that produced each tensor input
    params: list[tuple[str, _TSpec, int]]   # call_module: (name, spec, identity group) params then buffers
    out_vals: list[torch.Tensor]            # shape_prop values of the tensor outputs
    param_bytes: int = 0                    # call_module: bytes of its distinct parameters
    key: str = ""


def _target_name(node: torch.fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"method:{t}"
    if node.op == "call_module":
        return "module"  # its type and configuration are in the key, not its path
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(t)
    name = f"{getattr(t, '__module__', '')}.{getattr(t, '__qualname__', repr(t))}"
    code = getattr(t, "__code__", None)
    if code is not None and "<" in name:  # lambdas and local functions: tell them apart by source line
        name += f"@{code.co_filename}:{code.co_firstlineno}"
    return name


def _module_config(mod: torch.nn.Module) -> str:
    """Types and plain attributes (in_features, eps, n_head, training...) of a module tree."""
    plain = (int, float, bool, str, type(None))
    parts = []
    for name, m in mod.named_modules():
        attrs = sorted((k, repr(v)) for k, v in vars(m).items() if not k.startswith("_") and (
            isinstance(v, plain) or (isinstance(v, tuple) and all(isinstance(x, plain) for x in v))))
        parts.append(f"{name}:{type(m).__module__}.{type(m).__qualname__}{attrs}")
    return ";".join(parts)


def _val(node: torch.fx.Node, user: torch.fx.Node, key: str = META_VAL) -> Any:
    if key not in node.meta:
        if key != META_VAL and META_VAL in node.meta:
            return node.meta[META_VAL]
        raise CostModelError(
            f"cost model: node {user.format_node()} reads {node.name!r}, which has no "
            f"node.meta[{META_VAL!r}]; run fxpipe.passes.shape_prop.shape_prop(gm, *example_inputs) first"
        )
    return node.meta[key]


def _tensors(v: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(v) if isinstance(x, torch.Tensor)]


def node_op(node: torch.fx.Node, key: str = META_VAL) -> NodeOp | None:
    """The operation of ``node`` with its input signature, or None when it does no tensor work.

    ``key``: the node.meta entry holding the values (``"fxpipe.amp_val"``: as under autocast).

    Raises:
        CostModelError: the node or one of its inputs lacks ``meta["val"]`` (shape_prop not run).
    """
    if node.op in NO_WORK_OPS:
        return None
    out_vals = _tensors(_val(node, node, key))
    if not out_vals:
        return None  # shape arithmetic, getattr on tensors, python scalars

    def leafify(n: torch.fx.Node) -> Any:
        return pytree.tree_map(lambda v: _Leaf(n, v) if isinstance(v, torch.Tensor) else v, _val(n, node, key))

    struct = torch.fx.node.map_arg((tuple(node.args), dict(node.kwargs)), leafify)
    flat, spec = pytree.tree_flatten(struct)
    leaves: list[Any] = []
    tensor_pos, in_vals, in_state, in_nodes = [], [], [], []
    for i, x in enumerate(flat):
        if isinstance(x, torch.Tensor):  # a tensor constant in the args
            x = _Leaf(None, x)
        if isinstance(x, _Leaf):
            state = x.node is None or x.node.op == "get_attr"
            leaves.append(_TSpec.of(x.val, requires_grad=False if state and x.node is None else None))
            tensor_pos.append(i)
            in_vals.append(x.val)
            in_state.append(state)
            in_nodes.append(x.node)
        else:
            leaves.append(x)
    call: Callable[..., Any] | None = None
    module = None
    params: list[tuple[str, _TSpec, int]] = []
    param_bytes = 0
    extra = ""
    if node.op == "call_module":
        gm = node.graph.owning_module
        if gm is None:
            raise CostModelError(f"cost model: call_module node {node.format_node()} belongs to a graph "
                                 "without an owning module; cost a GraphModule's graph")
        module = gm.get_submodule(str(node.target))
        groups: dict[int, int] = {}
        param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        for name, p in list(module.named_parameters(remove_duplicate=False)) + \
                list(module.named_buffers(remove_duplicate=False)):
            params.append((name, _TSpec.of(p, requires_grad=isinstance(p, torch.nn.Parameter) and p.requires_grad),
                           groups.setdefault(id(p), len(groups))))
        extra = _module_config(module)
    elif node.op == "call_method":
        method = str(node.target)
        call = lambda self_, *a, **k: getattr(self_, method)(*a, **k)  # noqa: E731
    else:
        call = node.target  # type: ignore[assignment]
    desc = [x.describe() if isinstance(x, _TSpec) else repr(x) for x in leaves]
    pdesc = [f"{n}={s.describe()}#{g}" for n, s, g in params]
    raw = f"{node.op}|{_target_name(node)}|{spec}|{desc}|{pdesc}|{extra}"
    return NodeOp(name=node.format_node(), kind=node.op, call=call, module=module, spec=spec, leaves=leaves,
                  tensor_pos=tensor_pos, in_vals=in_vals, in_is_state=in_state, in_nodes=in_nodes, params=params,
                  out_vals=out_vals, param_bytes=int(param_bytes), key=hashlib.sha1(raw.encode()).hexdigest())


@dataclass
class OpRecord:
    """One aten op seen while running a node."""

    flops: float
    nbytes: float
    bytes_in: float
    bytes_out: float
    dtype: torch.dtype
    kernel: bool


class _OpRecorder(TorchDispatchMode):
    """Records every aten op; FLOPs come from the FlopCounterMode below it."""

    def __init__(self, counter: FlopCounterMode) -> None:
        super().__init__()
        self.counter = counter
        self.ops: list[OpRecord] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        before = self.counter.get_total_flops()
        out = func(*args, **kwargs)
        packet = getattr(func, "_overloadpacket", None)
        if getattr(func, "namespace", "") == "prim" or packet is None:
            return out
        meta_only = bool(getattr(func, "is_view", False)) or packet in _METADATA_OPS
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        b_in = 0.0 if meta_only else float(sum(t.numel() * t.element_size() for t in ins))
        b_out = 0.0 if meta_only else float(sum(t.numel() * t.element_size() for t in outs))
        dtype = next((t.dtype for t in ins + outs if t.dtype.is_floating_point), torch.float32)
        self.ops.append(OpRecord(float(self.counter.get_total_flops() - before), b_in + b_out, b_in, b_out,
                                 dtype, not meta_only))
        return out


class Recording:
    """FLOP counter + op recorder, entered together; ``ops`` holds the records."""

    def __init__(self) -> None:
        self.counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
        self.recorder = _OpRecorder(self.counter)

    def __enter__(self) -> "Recording":
        self.counter.__enter__()
        self.recorder.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.recorder.__exit__(*exc)
        self.counter.__exit__(*exc)

    @property
    def ops(self) -> list[OpRecord]:
        return self.recorder.ops


def _storage_key(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage()._cdata)
    except Exception:  # noqa: BLE001 - tensors without storage (some subclasses)
        return id(t)


def _storage_nbytes(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except Exception:  # noqa: BLE001
        return int(t.numel() * t.element_size())


def _storage_numel(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(shape, stride))


def make_real(s: _TSpec) -> torch.Tensor:
    """A real tensor of the spec: normal floats, zeros for integers and booleans (valid indices, masks)."""
    base = torch.empty(_storage_numel(s.shape, s.stride), dtype=s.dtype, device=s.device)
    if s.dtype.is_floating_point or s.dtype.is_complex:
        base.normal_()
    else:
        base.zero_()
    return base.as_strided(s.shape, s.stride)


class Instance:
    """One materialised call of a NodeOp: inputs, parameters and how to call it."""

    def __init__(self, op: NodeOp, make: Callable[[_TSpec], torch.Tensor], clone_inputs: bool = False) -> None:
        self.op = op
        leaves = list(op.leaves)
        self.leaf_inputs: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []
        for pos in op.tensor_pos:
            s: _TSpec = leaves[pos]
            t = make(s)
            if s.requires_grad:
                t.requires_grad_(True)
            self.leaf_inputs.append(t)
            x = t.clone() if clone_inputs and s.requires_grad else t
            leaves[pos] = x
            self.inputs.append(x)
        self.args, self.kwargs = pytree.tree_unflatten(leaves, op.spec)
        self.state: dict[str, torch.Tensor] = {}
        made: dict[int, torch.Tensor] = {}
        for name, s, group in op.params:
            if group not in made:
                made[group] = make(s)
                if s.requires_grad:
                    made[group].requires_grad_(True)
            self.state[name] = made[group]
        self.by_group = made                 # one tensor per distinct parameter/buffer, op.params order
        self.state_keys = {_storage_key(t) for t in self.state.values()}

    def __call__(self) -> Any:
        if self.op.module is not None:
            return torch.func.functional_call(self.op.module, self.state, tuple(self.args), self.kwargs,
                                              tie_weights=True, strict=False)
        return self.op.call(*self.args, **self.kwargs)  # type: ignore[misc]

    def grad_targets(self) -> list[torch.Tensor]:
        ts = [t for t in self.leaf_inputs if t.requires_grad]
        seen = set()
        for t in self.state.values():
            if t.requires_grad and id(t) not in seen:
                seen.add(id(t))
                ts.append(t)
        return ts


def classify_saved(inst: Instance, saved: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]
                   ) -> tuple[tuple[str, int, int], ...]:
    """Name what autograd saved: an input, an output or a temporary; parameters dropped, storages once."""
    ins = {}
    for i, t in enumerate(inst.inputs):
        ins.setdefault(_storage_key(t), i)
    for i, t in enumerate(inst.leaf_inputs):
        ins.setdefault(_storage_key(t), i)
    out_keys = {}
    for k, t in enumerate(outs):
        out_keys.setdefault(_storage_key(t), k)
    result: list[tuple[str, int, int]] = []
    seen: set[int] = set()
    tmp = 0
    for t in saved:
        key = _storage_key(t)
        if key in seen or key in inst.state_keys:
            continue
        seen.add(key)
        if key in ins:
            result.append(("in", ins[key], _storage_nbytes(t)))
        elif key in out_keys:
            result.append(("out", out_keys[key], _storage_nbytes(t)))
        else:
            result.append(("tmp" if t.dtype.is_floating_point else "mask", tmp, _storage_nbytes(t)))
            tmp += 1
    return tuple(result)


@dataclass
class Trace:
    """What one forward + backward of a node recorded."""

    fwd_ops: list[OpRecord]
    bwd_ops: list[OpRecord] | None      # None: backward could not run
    saved: tuple[tuple[str, int, int], ...]
    bytes_read: float
    bytes_written: float


class FusedDropout(TorchFunctionMode):
    """Dropout as CUDA runs it: ``native_dropout``, which saves a 1-byte mask for backward.

    On CPU (and CPU fake tensors) ``F.dropout`` multiplies by a floating noise tensor and saves
    that, twice the mask's bytes in 16-bit; a GPU device is priced with the kernel it would run.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.dropout:
            bound = dict(zip(("input", "p", "training", "inplace"), args), **kwargs)
            x, p, train = bound["input"], float(bound.get("p", 0.5)), bool(bound.get("training", True))
            if train and 0.0 < p < 1.0 and x.is_floating_point():
                return torch.native_dropout(x, p, True)[0]
        return func(*args, **kwargs)


def trace_op(op: NodeOp, make: Callable[[_TSpec], torch.Tensor], grad_like: Callable[[torch.Tensor], torch.Tensor],
             context: Callable[[], Any], fused_dropout: bool = False,
             autocast: tuple[str, torch.dtype] | None = None) -> Trace:
    """Run ``op`` forward and backward once, recording aten ops and saved tensors.

    Args:
        op: the node's operation.
        make: builds an input tensor (fake or real) from its spec.
        grad_like: builds an output gradient for a tensor.
        context: returns the context manager to run in (a FakeTensorMode, or a null context).
        fused_dropout: run dropout as a GPU does (:class:`FusedDropout`).
        autocast: ``(device_type, dtype)``: the forward runs under that device's ``torch.autocast``
            (its casts, and the cast copies autograd saves, are recorded; CUDA's through
            :mod:`~fxpipe.cost_models.amp_trace`, the CPU's if that fails); the backward outside.

    Returns:
        The aten ops of forward and backward (backward None if it could not run),
        the classified saved tensors, and the node-level bytes read and written.
    """
    replay = None   # CUDA's autocast: its aten ops captured on fake CUDA tensors, run here (amp_trace)
    if autocast is not None and autocast[0] == "cuda":
        from .amp_trace import capture_cuda_autocast
        replay = capture_cuda_autocast(op, autocast[1])
    amp = torch.autocast("cpu", dtype=autocast[1]) if autocast and replay is None else contextlib.nullcontext()

    def run(clone: bool) -> tuple[Instance, Any, list[torch.Tensor], Recording]:
        with context():
            inst = Instance(op, make, clone_inputs=clone)
            saved: list[torch.Tensor] = []

            def pack(t: torch.Tensor) -> torch.Tensor:
                saved.append(t)
                return t

            with Recording() as rec, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                    (FusedDropout() if fused_dropout else contextlib.nullcontext()), amp:
                out = inst() if replay is None else replay(inst.inputs + list(inst.by_group.values()))
        return inst, out, saved, rec

    try:
        inst, out, saved, fwd = run(False)
    except RuntimeError as e:
        if "in-place" not in str(e) and "inplace" not in str(e):
            raise
        inst, out, saved, fwd = run(True)  # in-place on an input: run on non-leaf copies
    outs = _tensors(out)
    saved_desc = classify_saved(inst, saved, outs)
    bytes_read = sum(t.numel() * t.element_size() for t in inst.inputs)
    bytes_read += sum(t.numel() * t.element_size() for t in {id(t): t for t in inst.state.values()}.values())
    bytes_written = sum(t.numel() * t.element_size() for t in outs)
    bwd_ops: list[OpRecord] | None = []
    diff_outs = [o for o in outs if o.requires_grad]
    targets = inst.grad_targets()
    if diff_outs and targets:
        try:
            with context():
                grads = [grad_like(o) for o in diff_outs]
                with Recording() as bwd:
                    torch.autograd.grad(diff_outs, targets, grads, allow_unused=True)
            bwd_ops = bwd.ops
        except Exception:  # noqa: BLE001 - no backward on fakes for this op: estimate it
            bwd_ops = None
    return Trace(fwd.ops, bwd_ops, saved_desc, float(bytes_read), float(bytes_written))
