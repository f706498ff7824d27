"""Opaque leaves under torch.export: chosen submodules run as one eager call_module node of the graph."""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
import torch.fx
import torch.utils._pytree as pytree

from fxpipe.errors import TraceError

__all__ = ["leaf_paths", "failing_submodule", "opaque_during_export", "opaque_calls_to_modules"]


def leaf_paths(model: torch.nn.Module, leaf_modules: Iterable[type | str]) -> list[str]:
    """Qualified names of the submodules chosen by ``leaf_modules`` (outermost wins; never the root)."""
    types = tuple(t for t in leaf_modules if isinstance(t, type))
    names = {t for t in leaf_modules if isinstance(t, str)}
    found: list[str] = []
    for path, m in model.named_modules():
        if not path or any(path.startswith(f + ".") for f in found):
            continue
        if path in names or (types and isinstance(m, types)):
            found.append(path)
    return found


def failing_submodule(model: torch.nn.Module, err: BaseException, leaves: list[str]) -> str | None:
    """Qualified name of the innermost submodule of ``model`` running where ``err`` was raised.

    Read from the traceback: the innermost frame whose ``self`` is a submodule (not the root, not
    one already opaque). None when the failure is in the root's own code.
    """
    path_of = {id(m): p for p, m in model.named_modules() if p}
    tb = err.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for fr in reversed(frames):
        p = path_of.get(id(fr.f_locals.get("self")))
        if p is not None and p not in leaves and not any(p.startswith(f + ".") for f in leaves):
            return p
    return None


# An opaque leaf under torch.export: while exporting, the leaf's forward is replaced by a call of
# this placeholder op, whose fake kernel returns tensors shaped like the leaf's outputs (found by
# running the leaf once on random real tensors of its input shapes: its code may depend on
# values, as an MoE block's loop over the experts hit does). After export each call becomes a
# call_module node of the real submodule, so the stage runs the eager code and autograd flows
# through it as through any module::
#
#     x ──▶ fxpipe.opaque_leaf([x], key) ──▶ getitem 0 ──▶ ...      (exported)
#     x ──▶ call_module model.layers.0.mlp ──────────▶ ...          (after opaque_calls_to_modules)
@torch.library.custom_op("fxpipe::opaque_leaf", mutates_args=())
def _opaque_leaf(inputs: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    raise RuntimeError(f"fxpipe: opaque leaf {key!r} ran outside of tracing; it should have been replaced "
                       "by a call_module node (fxpipe.trace_leaves.opaque_calls_to_modules)")


_OPAQUE_CALLS: dict[str, "_OpaqueCall"] = {}   # key -> call, only while an export is running


@_opaque_leaf.register_fake
def _opaque_leaf_fake(inputs: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    dev = inputs[0].device if inputs else torch.device("cpu")
    return [torch.empty_strided(shape, stride, dtype=dtype, device=dev)
            for shape, stride, dtype in _OPAQUE_CALLS[key].out_meta]


class _OpaqueCall:
    """One call of an opaque leaf seen while exporting: how to rebuild its inputs and outputs."""

    def __init__(self, path: str, in_spec: Any, in_leaves: list[Any], tensor_pos: list[int],
                 out_spec: Any, out_leaves: list[Any], out_meta: list[tuple]) -> None:
        self.path, self.in_spec, self.in_leaves, self.tensor_pos = path, in_spec, in_leaves, tensor_pos
        self.out_spec, self.out_leaves, self.out_meta = out_spec, out_leaves, out_meta


@contextlib.contextmanager
def opaque_during_export(model: torch.nn.Module, leaves: list[str]) -> Iterator[dict[str, _OpaqueCall]]:
    import itertools
    import uuid

    calls: dict[str, _OpaqueCall] = {}
    token = uuid.uuid4().hex[:8]
    counter = itertools.count()
    patched: list[torch.nn.Module] = []
    for path in leaves:
        mod = model.get_submodule(path)
        state = dict(mod.named_parameters(remove_duplicate=False))
        state.update(mod.named_buffers(remove_duplicate=False))
        forward = type(mod).forward.__get__(mod)

        def opaque(*a: Any, _path: str = path, _mod: torch.nn.Module = mod, _fwd: Any = forward,
                   _state: dict = state, **k: Any) -> Any:
            flat, in_spec = pytree.tree_flatten((a, k))
            pos = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
            real_out = _run_on_random(_mod, _fwd, _state, flat, in_spec, pos)
            out_leaves, out_spec = pytree.tree_flatten(real_out)
            meta = [(tuple(t.shape), tuple(t.stride()), t.dtype) for t in out_leaves if isinstance(t, torch.Tensor)]
            key = f"{token}:{next(counter)}:{_path}"
            call = _OpaqueCall(_path, in_spec, [None if i in pos else v for i, v in enumerate(flat)], pos,
                               out_spec, [None if isinstance(v, torch.Tensor) else v for v in out_leaves], meta)
            calls[key] = _OPAQUE_CALLS[key] = call
            outs = iter(torch.ops.fxpipe.opaque_leaf([flat[i] for i in pos], key))
            return pytree.tree_unflatten([next(outs) if isinstance(v, torch.Tensor) else v for v in out_leaves],
                                         out_spec)

        mod.forward = opaque  # type: ignore[method-assign]
        patched.append(mod)
    try:
        yield calls
    finally:
        for mod in patched:
            del mod.forward
        for key in calls:
            _OPAQUE_CALLS.pop(key, None)


def _run_on_random(mod: torch.nn.Module, forward: Any, state: dict[str, torch.Tensor], flat: list[Any],
                   in_spec: Any, pos: list[int]) -> Any:
    """Run ``forward`` of ``mod`` eagerly on random real tensors shaped like the (fake) inputs, untraced."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing
    from torch.nn.utils.stateless import _reparametrize_module

    gen = torch.Generator().manual_seed(0)   # the user's RNG stream is left alone

    def real(t: torch.Tensor) -> torch.Tensor:
        dev = torch.device("cpu") if t.device.type == "meta" else t.device
        if t.dtype.is_floating_point:
            return torch.randn(tuple(t.shape), generator=gen, dtype=torch.float64).to(dtype=t.dtype, device=dev)
        return torch.zeros(tuple(t.shape), dtype=t.dtype, device=dev)

    with unset_fake_temporarily(), disable_proxy_modes_tracing(), torch.no_grad():
        own = {k: (real(v) if v.device.type == "meta" or _is_fake(v) else v) for k, v in state.items()}
        vals = [real(v) if i in pos else v for i, v in enumerate(flat)]
        a, k = pytree.tree_unflatten(vals, in_spec)
        with _reparametrize_module(mod, own, tie_weights=True, strict=False):
            out = forward(*a, **k)
    if any(not isinstance(v, (torch.Tensor, int, float, bool, str, type(None))) for v in pytree.tree_leaves(out)):
        raise TraceError(f"opaque leaf {type(mod).__name__} returns {type(out).__name__} holding non-tensor "
                         "values; a leaf module must return tensors (or tuples/lists/dicts of them)")
    return out


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses import FakeTensor

    return isinstance(t, FakeTensor)


def opaque_calls_to_modules(gm: torch.fx.GraphModule, model: torch.nn.Module, calls: dict[str, _OpaqueCall]) -> None:
    """Replace every ``fxpipe.opaque_leaf`` call of ``gm`` by a call_module of the real submodule."""
    import operator

    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.fxpipe.opaque_leaf.default:
            continue
        call = calls[node.args[1]]
        if call.path not in dict(gm.named_modules()) or \
                gm.get_submodule(call.path) is not model.get_submodule(call.path):
            gm.add_submodule(call.path, model.get_submodule(call.path))
        ins = iter(node.args[0])
        a, k = pytree.tree_unflatten([next(ins) if i in call.tensor_pos else v
                                      for i, v in enumerate(call.in_leaves)], call.in_spec)
        with gm.graph.inserting_before(node):
            mod_node = gm.graph.call_module(call.path, tuple(a), dict(k))
        mod_node.meta.update({key: v for key, v in node.meta.items() if key in ("nn_module_stack", "stack_trace")})
        # output leaf i of the op is tensor leaf i of the module's output: reach it by its path
        paths = [kp for kp, v in pytree.tree_flatten_with_path(
            pytree.tree_unflatten([0 if v is None else v for v in call.out_leaves], call.out_spec))[0]]
        tensor_paths = [kp for kp, v in zip(paths, call.out_leaves) if v is None]
        for user in list(node.users):
            if user.op != "call_function" or user.target is not operator.getitem:
                raise TraceError(f"opaque leaf {call.path!r}: its outputs are read by {user.format_node()}")
            with gm.graph.inserting_before(user):
                cur = mod_node
                for part in tensor_paths[int(user.args[1])]:
                    if isinstance(part, pytree.GetAttrKey):
                        cur = gm.graph.call_function(getattr, (cur, part.name))
                    else:
                        cur = gm.graph.call_function(operator.getitem,
                                                     (cur, getattr(part, "idx", getattr(part, "key", None))))
            user.replace_all_uses_with(cur)
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
