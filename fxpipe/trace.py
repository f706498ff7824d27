"""Trace a model into a torch.fx GraphModule, with torch.export as the fallback."""

from __future__ import annotations

import contextlib
import inspect
import io
import warnings
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.fx
import torch.utils._pytree as pytree

from fxpipe.errors import TraceError

__all__ = ["trace", "FxpipeTracer"]


class FxpipeTracer(torch.fx.Tracer):
    """torch.fx tracer that keeps user-chosen submodules as opaque leaves."""

    def __init__(self, leaf_modules: Iterable[type | str] = ()) -> None:
        super().__init__()
        self._leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self._leaf_names = {t for t in leaf_modules if isinstance(t, str)}

    def call_module(self, m: torch.nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:
            if not hasattr(e, "_fxpipe_module"):
                try:
                    e._fxpipe_module = self.path_of_module(m)  # type: ignore[attr-defined]
                except Exception:  # noqa: BLE001
                    pass
            raise

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _concrete_defaults(model: torch.nn.Module, num_args: int, kwarg_names: Sequence[str]) -> dict[str, Any]:
    """Forward parameters the user did not pass are fixed to their defaults."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return {}
    concrete: dict[str, Any] = {}
    params = [p for p in sig.parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for i, p in enumerate(params):
        if i < num_args and p.kind != p.KEYWORD_ONLY:
            continue
        if p.name in kwarg_names:
            continue
        if p.default is not p.empty:
            concrete[p.name] = p.default
    return concrete


def trace(model: torch.nn.Module, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, *,
          leaf_modules: Iterable[type | str] = ()) -> torch.fx.GraphModule:
    """Trace ``model`` for the example inputs, trying three frontends in turn.

    1. ``torch.fx`` symbolic tracing (module-level graph, fastest);
    2. ``torch.export`` (aten-level graph, specialised to the example shapes: handles
       shape-dependent code such as ``torch.ones(T, T)`` and HF transformers models);
    3. ``torch.fx`` again, keeping every submodule that fails to trace as an opaque
       leaf (costed as a whole), with a warning naming it.

    Args:
        model: the module to trace (real, meta or fake parameters).
        args: example positional inputs (one microbatch).
        kwargs: example keyword inputs.
        leaf_modules: module types or qualified names kept as opaque call_module nodes.

    Returns:
        A GraphModule; ``gm.meta["fxpipe.tracer"]`` says which frontend worked
        ("fx", "export" or "fx+leaves") and ``gm.meta["fxpipe.leaves"]`` lists modules made opaque.

    Raises:
        TraceError: no frontend could trace the model; the message names the source line
        that stopped tracing (e.g. data-dependent control flow) and the fix.
    """
    kwargs = dict(kwargs or {})
    leaf_modules = list(leaf_modules)
    with _kv_cache_off(model, kwargs):
        return _trace(model, args, kwargs, leaf_modules)


def _trace(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
           leaf_modules: list[type | str]) -> torch.fx.GraphModule:
    try:
        gm = _fx(model, args, kwargs, leaf_modules, "fx")
    except Exception as e:  # noqa: BLE001 - any tracer failure leads to the next frontend
        fx_err = e
    else:
        if not _fx_mutates(gm):
            return gm
        # in-place updates (``s[:, 1:] = x``) are no fx edges, so a plan could split them from their
        # readers: take export's graph, where they become edges (_functional_inplace)
        try:
            return _export(model, args, kwargs, _leaf_paths(model, leaf_modules), "export")
        except Exception:  # noqa: BLE001
            warnings.warn(f"fxpipe: {type(model).__name__} updates tensors in place "
                          f"({', '.join(_fx_mutates(gm)[:3])}) and torch.export could not trace it; the "
                          "plan must keep each update on the stage of the tensor's readers. Write it "
                          "out of place (torch.cat, torch.where) to be safe", stacklevel=3)
            return gm
    try:
        return _export(model, args, kwargs, _leaf_paths(model, leaf_modules), "export")
    except Exception as e:  # noqa: BLE001
        ex_err = e
    # 3. fx, making failing submodules opaque, innermost first
    leaves = list(leaf_modules)
    made_opaque: list[str] = []
    err: BaseException = fx_err
    for _ in range(_MAX_AUTO_LEAVES):
        path = getattr(err, "_fxpipe_module", "")
        if not path or path in leaves:
            break
        leaves.append(path)
        made_opaque.append(path)
        try:
            gm = _fx(model, args, kwargs, leaves, "fx+leaves")
        except Exception as e:  # noqa: BLE001
            err = e
            continue
        _warn_opaque(model, made_opaque, fx_err)
        gm.meta["fxpipe.leaves"] = made_opaque
        return gm
    # 4. export, making the submodule that stopped it opaque, innermost first (plain fx fails at the
    # root of most HF models, so step 3 never starts there)
    ex_leaves = _leaf_paths(model, leaf_modules)
    ex_made: list[str] = []
    last: BaseException = ex_err
    for _ in range(_MAX_AUTO_LEAVES):
        path = _failing_submodule(model, last, ex_leaves)
        if path is None:
            break
        ex_leaves.append(path)
        ex_made.append(path)
        try:
            gm = _export(model, args, kwargs, ex_leaves, "export+leaves")
        except Exception as e:  # noqa: BLE001
            last = e
            continue
        _warn_opaque(model, ex_made, ex_err)
        gm.meta["fxpipe.leaves"] = ex_made
        return gm
    where = next((w for w in map(_user_frame, (last, ex_err, err, fx_err)) if w), "")
    msgs = " ".join(str(e) for e in (ex_err, last))
    advice = ""
    if "in output, which is not a known type" in msgs or "cache" in msgs.lower():
        advice = ("The model returns an object that is not tensors (or a pytree of them), typically a "
                  "key/value cache (DynamicCache, past_key_values): training needs no cache, so turn it off "
                  "(config.use_cache=False, or use_cache=False in the forward inputs) or return tensors "
                  "only. ")
    raise TraceError(
        f"could not trace {type(model).__name__}: {where}torch.fx failed with {_one_line(fx_err)}; "
        f"torch.export failed with {_one_line(last)}. {advice}If this is data-dependent control flow "
        "(an `if` or loop on tensor values), rewrite it with torch.where / torch.cond, or move it into "
        "a submodule and pass that submodule in leaf_modules=[...] so it runs as one opaque node."
    ) from last


_MAX_AUTO_LEAVES = 64


def _warn_opaque(model: torch.nn.Module, paths: list[str], cause: BaseException) -> None:
    for p in paths:
        warnings.warn(f"fxpipe: submodule {p!r} ({type(model.get_submodule(p)).__name__}) could not be "
                      f"traced ({_one_line(cause)}); it runs as one opaque node of its stage. Pass "
                      f"leaf_modules=[{p!r}] to choose this yourself.", stacklevel=4)


@contextlib.contextmanager
def _kv_cache_off(model: torch.nn.Module, kwargs: dict[str, Any]) -> Iterator[None]:
    """Trace with the key/value cache off: training never reads it, and torch.export rejects cache outputs.

    HuggingFace models default to ``config.use_cache=True`` and then return a ``DynamicCache``
    (``EncoderDecoderCache`` for T5) in ``past_key_values``; with it off that field is None and the
    rest of the model output (logits, loss, ...) is unchanged. ``forward(use_cache=...)`` given by
    the user wins. The config is restored afterwards, so the eager model behaves as before.
    """
    configs = [c for c in _configs(model) if _use_cache(c)]
    if not configs or "use_cache" in kwargs:
        yield
        return
    warnings.warn(f"fxpipe: tracing {type(model).__name__} with use_cache=False (its config says "
                  "use_cache=True): training needs no key/value cache, so the traced output's "
                  "past_key_values is None; everything else in the output (logits, loss, ...) reaches "
                  "loss_fn unchanged", stacklevel=4)
    for c in configs:
        c.use_cache = False
    try:
        yield
    finally:
        for c in configs:
            c.use_cache = True


def _configs(model: torch.nn.Module) -> list[Any]:
    """The distinct ``config`` objects of ``model`` and its submodules (HF models share one, or a few)."""
    seen: dict[int, Any] = {}
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and not isinstance(c, (torch.Tensor, torch.nn.Module)) and _use_cache(c) is not None:
            seen.setdefault(id(c), c)
            for sub in ("text_config", "decoder"):      # composite configs keep the flag per part
                cs = getattr(c, sub, None)
                if cs is not None and _use_cache(cs) is not None:
                    seen.setdefault(id(cs), cs)
    return list(seen.values())


def _use_cache(config: Any) -> bool | None:
    """``config.use_cache``, or None where there is none (some HF configs raise their own errors)."""
    try:
        v = getattr(config, "use_cache", None)
    except Exception:  # noqa: BLE001
        return None
    return v if isinstance(v, bool) else None


def _fx(model: torch.nn.Module, args: tuple, kwargs: dict, leaves: list, name: str) -> torch.fx.GraphModule:
    tracer = FxpipeTracer(leaves)
    concrete = _concrete_defaults(model, len(args), list(kwargs))
    if "use_cache" in concrete:
        concrete["use_cache"] = False
    graph = tracer.trace(model, concrete_args=concrete or None)
    gm = torch.fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    _drop_concrete_placeholders(gm, len(args), list(kwargs), model)
    gm.meta["fxpipe.tracer"] = name
    gm.meta["fxpipe.leaves"] = []
    return gm


def _export(model: torch.nn.Module, args: tuple, kwargs: dict, leaves: list[str], name: str) -> torch.fx.GraphModule:
    """``torch.export`` (non-strict) with the submodules at ``leaves`` kept as opaque call_module nodes."""
    # torch.export prints the partial graph of a failed export to stderr; fxpipe reports failures itself
    with warnings.catch_warnings(), _opaque_during_export(model, leaves) as calls, \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, tuple(args), kwargs, strict=False)
        gm = ep.module()
        _opaque_calls_to_modules(gm, model, calls)
    _drop_guards(gm)
    _functional_inplace(gm)
    gm.meta["fxpipe.tracer"] = name
    gm.meta["fxpipe.kwarg_names"] = list(kwargs)
    gm.meta["fxpipe.leaves"] = []
    return gm  # type: ignore[return-value]


def _leaf_paths(model: torch.nn.Module, leaf_modules: Iterable[type | str]) -> list[str]:
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


def _failing_submodule(model: torch.nn.Module, err: BaseException, leaves: list[str]) -> str | None:
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
#     x ──▶ call_module model.layers.0.mlp ──────────▶ ...          (after _opaque_calls_to_modules)
@torch.library.custom_op("fxpipe::opaque_leaf", mutates_args=())
def _opaque_leaf(inputs: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    raise RuntimeError(f"fxpipe: opaque leaf {key!r} ran outside of tracing; it should have been replaced "
                       "by a call_module node (fxpipe.trace._opaque_calls_to_modules)")


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
def _opaque_during_export(model: torch.nn.Module, leaves: list[str]) -> Iterator[dict[str, _OpaqueCall]]:
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


def _opaque_calls_to_modules(gm: torch.fx.GraphModule, model: torch.nn.Module, calls: dict[str, _OpaqueCall]) -> None:
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


def _fx_mutates(gm: torch.fx.GraphModule) -> list[str]:
    """Nodes of an fx graph that update a tensor in place: ``x[i] = v`` and ``x.add_(y)``-style methods."""
    import operator

    return [n.name for n in gm.graph.nodes
            if (n.op == "call_function" and n.target is operator.setitem)
            or (n.op == "call_method" and str(n.target).endswith("_") and not str(n.target).startswith("_")
                and str(n.target) != "requires_grad_")]


def _mutated_copy(base: torch.Tensor, views: tuple, op: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    """``base`` copied, then ``op`` applied in place to the view ``views`` of the copy; returns the copy."""
    out = base.clone()
    v = out
    for view, a, k in views:
        v = view(v, *a, **k)
    op(v, *args, **kwargs)
    return out


def _functional_inplace(gm: torch.fx.GraphModule) -> None:
    """Make in-place updates of the graph's own tensors explicit edges (a local functionalization).

    torch.export keeps in-place aten ops. An fx edge does not say that a later reader of ``s``
    must run after ``s[..., 1:].copy_(x)`` (T5's ``_shift_right``): a mutation with no users may
    land on any later stage, where it updates that stage's copy only. Each such op becomes
    ``s2 = _mutated_copy(s, views, op, ...)`` and every later read of ``s`` (or of a view of it)
    reads ``s2`` instead::

        s = new_zeros(..)   v = slice(s)   copy_(v, x)   use(s)
        s = new_zeros(..)   s2 = _mutated_copy(s, (slice,), copy_, x)   use(s2)

    Mutations of inputs, parameters and buffers, or of values that alias another tensor
    (``getitem`` of a ``split``), are left as they are.
    """
    import operator

    def mutates_self(t: Any) -> bool:
        if not isinstance(t, torch._ops.OpOverload):
            return False
        a = t._schema.arguments
        return bool(a and a[0].alias_info is not None and a[0].alias_info.is_write
                    and all(x.alias_info is None or not x.alias_info.is_write for x in a[1:]))

    def is_view(t: Any) -> bool:
        return isinstance(t, torch._ops.OpOverload) and bool(getattr(t, "is_view", False)) \
            and len(t._schema.returns) == 1 and t._schema.returns[0].type.kind() == "TensorType"

    def owns_storage(n: torch.fx.Node) -> bool:
        t = n.target
        return n.op == "call_function" and (t is _mutated_copy or (
            isinstance(t, torch._ops.OpOverload) and all(r.alias_info is None for r in t._schema.returns)))

    if not any(n.op == "call_function" and mutates_self(n.target) for n in gm.graph.nodes):
        return
    info: dict[torch.fx.Node, tuple[torch.fx.Node, tuple, int]] = {}   # node -> (base, views from base, version)
    latest: dict[torch.fx.Node, torch.fx.Node] = {}                     # base -> node holding its value now
    version: dict[torch.fx.Node, int] = {}
    graph = gm.graph

    def of(a: torch.fx.Node) -> tuple[torch.fx.Node, tuple, int]:
        return info.get(a, (a, (), 0))

    def chain(start: torch.fx.Node, base: torch.fx.Node, views: tuple) -> torch.fx.Node:
        cur = start
        for i, (view, va, vk) in enumerate(views):
            cur = graph.call_function(view, (cur, *va), dict(vk))
            info[cur] = (base, views[: i + 1], version.get(base, 0))
        return cur

    for n in list(graph.nodes):
        if n.op != "call_function":
            continue

        def fresh(a: torch.fx.Node, _n: torch.fx.Node = n) -> torch.fx.Node:
            base, views, made = of(a)
            if version.get(base, 0) <= made:
                return a
            with graph.inserting_before(_n):
                return chain(latest[base], base, views)

        n.args = torch.fx.node.map_arg(n.args, fresh)
        n.kwargs = torch.fx.node.map_arg(n.kwargs, fresh)
        src = n.args[0] if n.args else None
        if not isinstance(src, torch.fx.Node):
            continue
        base, views, made = of(src)
        if is_view(n.target):
            info[n] = (base, views + ((n.target, tuple(n.args[1:]), dict(n.kwargs)),), made)
        elif mutates_self(n.target) and owns_storage(base):
            with graph.inserting_before(n):
                new = graph.call_function(_mutated_copy, (latest.get(base, base), views, n.target,
                                                          tuple(n.args[1:]), dict(n.kwargs)))
                new.meta.update({k: v for k, v in n.meta.items() if k in ("nn_module_stack", "stack_trace")})
                version[base] = version.get(base, 0) + 1
                latest[base] = new
                info[new] = (base, (), version[base])
                result = chain(new, base, views)
            n.replace_all_uses_with(result)
            graph.erase_node(n)
    for n in reversed(list(graph.nodes)):      # views left without readers
        if n.op == "call_function" and not n.users and (is_view(n.target) or n.target is operator.getitem):
            graph.erase_node(n)
    graph.lint()
    gm.recompile()


def _drop_guards(gm: torch.fx.GraphModule) -> None:
    """torch.export's module checks input shapes in a ``_guards_fn`` node: fxpipe checks them itself."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
    gm.recompile()


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"


def _user_frame(e: BaseException) -> str:
    """'file.py:12 `if x.sum() > 0:` — ' for the innermost frame outside torch, or ''."""
    import os
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    torch_dir = os.path.dirname(torch.__file__)
    for fr in reversed(frames):
        if not fr.filename.startswith(torch_dir) and "fxpipe" + os.sep + "trace.py" not in fr.filename \
                and not fr.filename.startswith("<") and fr.line:
            return f"tracing stopped at {fr.filename}:{fr.lineno} `{(fr.line or '').strip()}`; "
    return ""
def _drop_concrete_placeholders(gm: torch.fx.GraphModule, num_args: int, kwarg_names: list[str],
                                model: torch.nn.Module) -> None:
    """fx keeps a placeholder per concrete arg; remove those with no users."""
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
