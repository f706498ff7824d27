"""Shape propagation with fake tensors: every node gets ``meta["val"]`` and ``meta["tensor_meta"]``, no real memory.

:func:`autocast_shape_prop` runs the graph again under ``torch.autocast`` and keeps what each
node then produces (dtypes as autocast makes them) under ``meta["fxpipe.amp_val"]``.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator

import torch
import torch.fx
from torch._subclasses import FakeTensor, FakeTensorMode
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                           unset_fake_temporarily)
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils import _pytree as pytree

from fxpipe.errors import TraceError
from fxpipe.ir import META_VAL
from fxpipe.trace_fixes import with_device

__all__ = ["shape_prop", "FakeShapeProp", "autocast_shape_prop", "autocast_context", "META_AMP_VAL"]

META_AMP_VAL = "fxpipe.amp_val"   # FakeTensor(s) of the node under torch.autocast: autocast_shape_prop


_DATA_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException, GuardOnDataDependentSymNode)


class FakeShapeProp(torch.fx.Interpreter):
    """An Interpreter that runs every node on fake tensors and records what it produced.

    Like ``torch.fx.passes.shape_prop.ShapeProp`` (``meta["tensor_meta"]``) and
    ``FakeTensorProp`` (``meta["val"]``), but wraps failures in :class:`TraceError`
    naming the node, and keeps ``requires_grad`` on the recorded values so that
    cost models know which inputs autograd differentiates.

    A node whose result depends on tensor values (an opaque leaf module with an
    ``if x.sum() > 0``) cannot run on fakes: it runs once on real random tensors
    of its input shapes (its own real parameters, or random ones for meta
    parameters), and its output is turned back into a fake.

    Args:
        gm: the graph module.
        mode: the FakeTensorMode the run uses.
        state: the module's original parameters and buffers by qualified name.
    """

    def __init__(self, gm: torch.fx.GraphModule, mode: FakeTensorMode, state: dict[str, torch.Tensor],
                 device: torch.device | None = None) -> None:
        super().__init__(gm)
        self.mode = mode
        self.state = state
        self.device = device if device is not None else torch.device("cpu")   # where the fakes live

    def _run_real(self, n: torch.fx.Node) -> Any:
        """Run ``n`` on real tensors shaped like its fake inputs; return fake outputs."""
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        with unset_fake_temporarily():
            def real(t: Any) -> Any:
                if not isinstance(t, torch.Tensor):
                    return t
                dev = t.device if t.device.type != "meta" else torch.device("cpu")
                r = torch.randn(t.shape, device=dev).to(t.dtype) if t.dtype.is_floating_point else \
                    torch.zeros(t.shape, dtype=t.dtype, device=dev)
                return r.requires_grad_(t.requires_grad)

            args, kwargs = pytree.tree_map(real, (args, kwargs))
            if n.op == "call_module":
                mod = self.module.get_submodule(str(n.target))
                prefix = f"{n.target}."
                own = {k[len(prefix):]: (real(v) if v.device.type == "meta" else v)
                       for k, v in self.state.items() if k.startswith(prefix)}
                out = torch.func.functional_call(mod, own, tuple(args), kwargs, tie_weights=True, strict=False)
            elif n.op == "call_method":
                out = getattr(args[0], str(n.target))(*args[1:], **kwargs)
            else:
                out = n.target(*args, **kwargs)  # type: ignore[operator]

        def back(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            f = self.mode.from_tensor(t.detach(), static_shapes=True)
            return f.requires_grad_(True) if t.requires_grad else f

        return pytree.tree_map(back, out)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        # a model traced on the meta device carries device=meta in arange(...) and .to(x.device): make
        # those the fakes' device, as its inputs and parameters were
        args, kwargs = with_device((args, kwargs), self.device, only="meta")
        return super().call_function(target, args, kwargs)

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            try:
                result = super().run_node(n)
            except _DATA_DEPENDENT:
                if n.op not in ("call_module", "call_function", "call_method"):
                    raise
                result = self._run_real(n)
            except Exception as e:  # noqa: BLE001
                # a module (an opaque leaf) whose eager code fakes cannot run, such as NLLB-MoE's router
                # calling self.classifier.to(dtype) in forward (a module's fake parameters must be swapped,
                # and cannot be): its real run gives the shapes, as for a data-dependent one
                if n.op != "call_module":
                    raise
                try:
                    result = self._run_real(n)
                except Exception:  # noqa: BLE001 - it fails for real too: report what the fakes said
                    raise e from None
        except TraceError:
            raise
        except Exception as e:  # noqa: BLE001 - any op failure is reported with its node
            raise TraceError(
                f"shape_prop: node {n.format_node()} failed on fake tensors: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}. Check that the example inputs have the "
                "shapes/dtypes the model expects; data-dependent operations (.item(), nonzero, "
                "tensor-valued `if`) cannot be planned: move them into a leaf module or make them static"
            ) from e
        if isinstance(result, torch.Tensor) or any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(result)):
            n.meta[META_VAL] = pytree.tree_map(_storable, result)
        else:
            n.meta[META_VAL] = result  # Python values (torch.Size, int, device...) as they are
        found = False

        def extract(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = torch.fx.node.map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        else:
            n.meta.pop("tensor_meta", None)
        return result


def _storable(v: Any) -> Any:
    """A value safe to keep in node.meta: a detached leaf (deepcopy-able) that keeps requires_grad."""
    if isinstance(v, torch.Tensor):
        rg = v.requires_grad
        v = v.detach()
        if rg:
            v.requires_grad_(True)
    elif isinstance(v, torch.SymInt) and v.node.is_constant():
        v = int(v)
    return v


def _target_device(tensors: list[torch.Tensor]) -> torch.device:
    """Device the fakes live on: that of the first non-meta tensor, else CPU."""
    for t in tensors:
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def _faker(mode: FakeTensorMode, device: torch.device) -> Callable[[Any], Any]:
    """Converts tensors to fakes of ``mode`` once each (tied parameters stay tied)."""
    memo: dict[int, torch.Tensor] = {}

    def fake(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) in memo:
            return memo[id(t)]
        foreign = isinstance(t, FakeTensor) and t.fake_mode is not mode  # from another FakeTensorMode
        if t.device.type == "meta" or foreign:
            with mode:
                f = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                        device=device if t.device.type == "meta" else t.device)
            if t.requires_grad:
                f.requires_grad_(True)
        elif isinstance(t, FakeTensor):  # already ours
            f = t
        else:
            f = mode.from_tensor(t.detach() if isinstance(t, torch.nn.Parameter) else t, static_shapes=True)
            if t.requires_grad and not f.requires_grad:
                f.requires_grad_(True)
        memo[id(t)] = f
        return f

    return fake


def _bind_placeholders(gm: torch.fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(args) > len(placeholders):
        raise TraceError(
            f"shape_prop: got {len(args)} positional inputs but the graph has {len(placeholders)} "
            f"placeholders ({[p.target for p in placeholders]}); pass one value per placeholder"
        )
    bound = list(args)
    for p in placeholders[len(args):]:
        name = str(p.target).lstrip("*")
        if name in kwargs:
            bound.append(kwargs[name])
        elif p.args:
            bound.append(p.args[0])
        else:
            raise TraceError(
                f"shape_prop: no example value for placeholder {p.format_node()}; given "
                f"{len(args)} positional inputs and keywords {sorted(kwargs)}. Pass it positionally "
                f"or as {name}=..."
            )
    unknown = set(kwargs) - {str(p.target).lstrip("*") for p in placeholders[len(args):]}
    if unknown:
        raise TraceError(
            f"shape_prop: keyword inputs {sorted(unknown)} match no placeholder; placeholders are "
            f"{[str(p.target) for p in placeholders]}"
        )
    return bound


def shape_prop(gm: torch.fx.GraphModule, *example_inputs: Any, **example_kwargs: Any) -> torch.fx.GraphModule:
    """Run ``gm`` on fake tensors and record every node's value and tensor metadata.

    Parameters, buffers and inputs (real, meta-device or fake) are replaced by fake
    tensors of the same shape, stride and dtype, so no real memory is used and
    meta-device models work. Meta tensors become fakes on the device of the first
    real tensor seen (CPU if there is none).

    Args:
        gm: the traced graph module (modified in place: ``node.meta`` only).
        *example_inputs: one example value per placeholder, in order (one microbatch).
        **example_kwargs: values for the remaining placeholders, by name.

    Returns:
        ``gm``, with ``node.meta["val"]`` (a FakeTensor, a pytree of them, or a Python
        value such as an int for shape arithmetic) and ``node.meta["tensor_meta"]``
        (``TensorMetadata`` or a pytree of them) on every node with tensor outputs.

    Raises:
        TraceError: an input is missing or unknown, or a node fails on fake tensors;
            the message names the node (``node.format_node()``) and the original error.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise TraceError(f"shape_prop: expected a torch.fx.GraphModule, got {type(gm).__name__}; "
                         "trace the model first (fxpipe.trace.trace)")
    bound = _bind_placeholders(gm, example_inputs, dict(example_kwargs))
    state = dict(gm.named_parameters(remove_duplicate=False))
    state.update(gm.named_buffers(remove_duplicate=False))
    device = _target_device([t for t in pytree.tree_leaves((bound, list(state.values())))
                             if isinstance(t, torch.Tensor)])
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = _faker(mode, device)
    fake_state = {k: fake(v) for k, v in state.items()}
    fake_inputs = pytree.tree_map(fake, bound)
    interp = FakeShapeProp(gm, mode, state, device)
    with _reparametrize_module(gm, fake_state, tie_weights=True), mode, torch.enable_grad():
        kw = {"enable_io_processing": False} if "enable_io_processing" in inspect.signature(interp.run).parameters else {}
        interp.run(*fake_inputs, **kw)
    return gm


def _attr_of(gm: Any, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _with_grad_flags(amp: Any, ref: Any) -> Any:
    """``amp`` stored like :func:`_storable`, ``requires_grad`` taken from the fp32 value ``ref``."""
    a_flat, a_spec = pytree.tree_flatten(amp)
    r_flat = pytree.tree_leaves(ref)
    same = len(a_flat) == len(r_flat)
    out = []
    for i, v in enumerate(a_flat):
        if isinstance(v, torch.Tensor):
            r = r_flat[i] if same else None
            v = v.detach()
            if isinstance(r, torch.Tensor) and r.requires_grad and (v.dtype.is_floating_point or v.dtype.is_complex):
                v.requires_grad_(True)
        out.append(v)
    return pytree.tree_unflatten(out, a_spec)


def autocast_shape_prop(graph: torch.fx.Graph, device_type: str, dtype: torch.dtype) -> int:
    """Run ``graph`` on fake tensors under ``torch.autocast(device_type, dtype)``; ``meta["fxpipe.amp_val"]``.

    The dtypes are torch's own: each op goes through the autocast kernels of ``device_type``
    (``"cpu"``: the CPU lists; ``"cuda"``: fake CUDA tensors, which need no GPU, with the CUDA
    lists). Inputs come from ``meta["val"]`` (shape_prop must have run); ``requires_grad`` is
    copied from there (the run itself is under ``no_grad``: autograd cannot run on fake CUDA
    tensors). A node whose fake CUDA kernel needs a GPU (``contiguous``, batch norm) runs on CPU
    fakes of the same dtypes, without autocast; a node that fails even so keeps its
    ``meta["val"]`` (priced as without autocast).

    Args:
        graph: a graph after :func:`shape_prop` (its owning module, if any, gives parameters).
        device_type: ``"cpu"`` or ``"cuda"``.
        dtype: the autocast dtype (``torch.bfloat16`` or ``torch.float16``).

    Returns:
        The number of nodes that fell back to ``meta["val"]``.
    """
    gm = graph.owning_module
    device = torch.device(device_type)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    memo: dict[int, torch.Tensor] = {}

    def fake(t: Any) -> Any:          # a fake of mode on device (tied tensors stay tied)
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) not in memo:
            with mode:
                memo[id(t)] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
        return memo[id(t)]

    def call(n: torch.fx.Node, args: Any, kwargs: Any, conv: Callable[[Any], Any] = lambda t: t) -> Any:
        args, kwargs = with_device((args, kwargs), device, only="meta")   # as FakeShapeProp.call_function
        if n.op == "call_module":
            mod = gm.get_submodule(str(n.target))
            state = {k: conv(fake(v)) for k, v in list(mod.named_parameters(remove_duplicate=False))
                     + list(mod.named_buffers(remove_duplicate=False))}
            return torch.func.functional_call(mod, state, tuple(args), kwargs, tie_weights=True, strict=False)
        if n.op == "call_method":
            return getattr(args[0], str(n.target))(*args[1:], **kwargs)
        return n.target(*args, **kwargs)  # type: ignore[operator]

    env: dict[torch.fx.Node, Any] = {}
    failed = 0
    for n in graph.nodes:
        if n.op == "output":
            continue
        ref = n.meta.get(META_VAL)
        try:
            if n.op == "placeholder":
                out = pytree.tree_map(fake, ref)
            elif n.op == "get_attr":
                obj = _attr_of(gm, str(n.target)) if gm is not None else None
                out = pytree.tree_map(fake, obj if isinstance(obj, torch.Tensor) else ref)
            else:
                args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
                try:
                    with mode, autocast_context(device_type, dtype), torch.no_grad():
                        out = call(n, args, kwargs)
                except Exception:  # noqa: BLE001 - a fake CUDA kernel that needs a GPU (copies, batch norm)
                    if device_type == "cpu":
                        raise
                    out = _on_cpu(mode, lambda a, k, conv: call(n, a, k, conv), args, kwargs)
        except Exception:  # noqa: BLE001 - data-dependent or device-specific: keep the fp32 value
            failed += 1
            out = pytree.tree_map(fake, ref)
        env[n] = out
        if any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(out)):
            n.meta[META_AMP_VAL] = _with_grad_flags(out, ref)
        else:
            n.meta[META_AMP_VAL] = ref
    return failed


def _on_cpu(mode: FakeTensorMode, fn: Callable[[Any, Any, Callable[[Any], Any]], Any], args: Any, kwargs: Any) -> Any:
    """``fn`` on CPU fakes with the dtypes, shapes and strides of the fake CUDA ``args`` (no autocast:
    ops whose fake CUDA kernel needs a GPU are copies, views and norms not on autocast's lists);
    results back as CUDA fakes, views of an input's storage kept as views of it."""
    bases: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # CPU storage -> (CPU base, a CUDA tensor on it)

    def to_cpu(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.device.type == "cpu":
            return t
        with mode:
            base = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype, device="cpu")
            c = base.as_strided(t.shape, t.stride(), t.storage_offset())
        bases[int(c.untyped_storage()._cdata)] = (base, t)
        return c

    cargs, ckwargs = pytree.tree_map(to_cpu, (args, kwargs))
    with mode, torch.no_grad():
        out = fn(cargs, ckwargs, to_cpu)

    def back(o: Any) -> Any:
        if not isinstance(o, torch.Tensor):
            return o
        with mode:
            hit = bases.get(int(o.untyped_storage()._cdata))
            if hit is not None and hit[1].dtype == o.dtype:
                return hit[1].as_strided(o.shape, o.stride(), o.storage_offset())
            return torch.empty_strided(o.shape, o.stride(), dtype=o.dtype, device="cuda")

    return pytree.tree_map(back, out)


@contextlib.contextmanager
def autocast_context(device_type: str, dtype: torch.dtype) -> Iterator[None]:
    """``torch.autocast``; for ``"cuda"`` without a GPU, the same switches set directly (the
    context manager refuses, but the CUDA autocast kernels run on fake CUDA tensors)."""
    if device_type != "cuda" or torch.cuda.is_available():
        with torch.autocast(device_type=device_type, dtype=dtype):
            yield
        return
    prev, prev_dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    torch.set_autocast_enabled(device_type, True)
    torch.set_autocast_dtype(device_type, dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(device_type, prev)
        torch.set_autocast_dtype(device_type, prev_dtype)
