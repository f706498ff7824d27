"""Trace a model into a torch.fx GraphModule, with torch.export as the fallback."""

from __future__ import annotations

import contextlib
import inspect
import io
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.fx
import torch.utils._pytree as pytree

from fxpipe.errors import TraceError
from fxpipe.runtime.microbatch import META_CONSTANTS, is_constant
from fxpipe.trace_fixes import (INPLACE_OPERATORS, META_FIXED_INPUTS, META_FX_MUTATIONS, META_NO_GRAD,
                                detach_no_grad_values, drop_constant_inputs, drop_guards, drop_unused_placeholders,
                                functional_fx_inplace, functional_inplace, fx_mutations, grad_toggles_to_meta,
                                in_place_name)
from fxpipe.trace_leaves import failing_submodule, leaf_paths, opaque_calls_to_modules, opaque_during_export

__all__ = ["trace", "FxpipeTracer"]


class _Proxy(torch.fx.Proxy):
    """A Proxy that records ``x += y`` as ``operator.iadd`` (plain fx records ``x + y``, and the update of
    ``x`` is lost for every other name of the same tensor)."""


for _op in INPLACE_OPERATORS:
    def _inplace(self: _Proxy, other: Any, _op: Any = _op) -> torch.fx.Proxy:
        return self.tracer.create_proxy("call_function", _op, (self, other), {})

    setattr(_Proxy, f"__{_op.__name__.strip('_')}__", _inplace)


# random draws whose arguments are all constants: symbolic tracing would run them once and freeze the
# numbers into the graph (every step would reuse the same noise)
_RANDOM = frozenset({torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal, torch.bernoulli,
                     torch.multinomial, torch.poisson, torch.rand_like, torch.randn_like, torch.randint_like,
                     torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.random_, torch.Tensor.bernoulli_,
                     torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.cauchy_,
                     torch.Tensor.log_normal_, torch.nn.functional.dropout})


def _updates_in_place(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    return name == "__setitem__" or any(name == f"__{op.__name__}__" for op in INPLACE_OPERATORS) or (
        in_place_name(name) and "Tensor" in getattr(func, "__qualname__", ""))


class _NoTraceTimeEffects(torch.overrides.TorchFunctionMode):
    """While torch.fx traces, refuses what would happen once at trace time and never in the graph: a random
    draw with no traced argument (it would become a constant) and an in-place update of a tensor that is
    not traced (a buffer fx does not proxy: ``self.count.add_(1)`` ran once and vanished)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if args and _updates_in_place(func) and isinstance(args[0], torch.Tensor) \
                and not isinstance(args[0], torch.fx.Proxy):
            raise TraceError(f"torch.fx would run torch.Tensor.{func.__name__} on a tensor it does not trace (a "
                             f"buffer or a constant of shape {tuple(args[0].shape)}) once, while tracing, and leave "
                             "it out of the graph; fxpipe traces this model with torch.export instead")
        if func in _RANDOM:
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            if not any(isinstance(a, torch.fx.Proxy) for a in leaves):
                name = ("torch.Tensor." if "Tensor" in getattr(func, "__qualname__", "") else "torch.") \
                    + getattr(func, "__name__", str(func))
                raise TraceError(f"torch.fx would freeze {name}(...) into a constant: its arguments are all "
                                 "constants, so symbolic tracing draws the numbers once and every step would "
                                 "reuse them; fxpipe traces this model with torch.export instead (or derive the "
                                 "shape from an input, e.g. torch.randn_like(x))")
        return func(*args, **kwargs)


class FxpipeTracer(torch.fx.Tracer):
    """torch.fx tracer that keeps user-chosen submodules as opaque leaves, records ``x += y`` as an
    in-place update and marks the nodes it makes under ``torch.no_grad()`` (``node.meta["fxpipe.no_grad"]``)."""

    def __init__(self, leaf_modules: Iterable[type | str] = ()) -> None:
        super().__init__()
        self._leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self._leaf_names = {t for t in leaf_modules if isinstance(t, str)}
        self.output_spec: pytree.TreeSpec | None = None

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> Any:
        """Also records the pytree structure of what the root returns (``output_spec``): the graph's output
        node keeps a dict subclass such as a HuggingFace ``ModelOutput`` as a plain dict, and the model's
        own output type is what reaches ``loss_fn`` (``out.logits``)."""
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)

        def recording(*a: Any, **k: Any) -> Any:
            out = fn(*a, **k)
            self.output_spec = pytree.tree_structure(out)
            return out

        return recording, args

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _Proxy(node, self)

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any, name: str | None = None,
                    type_expr: Any = None) -> torch.fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind in ("call_function", "call_method", "call_module") and not torch.is_grad_enabled():
            node.meta[META_NO_GRAD] = True
        return node

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
    """Trace ``model`` for the example inputs, trying four frontends in turn.

    1. ``torch.fx`` symbolic tracing (module-level graph, fastest); a graph that updates
       a tensor in place (:func:`~fxpipe.trace_fixes.fx_mutations`), updates a tensor fx does not trace
       (a buffer: the update would run once while tracing) or draws random numbers from constant
       arguments (``torch.randn(8)``: fx would freeze them into the graph) goes to 2 instead, and
       ``torch.no_grad()`` regions are kept (:func:`~fxpipe.trace_fixes.detach_no_grad_values`);
    2. ``torch.export`` (aten-level graph, specialised to the example shapes: handles
       shape-dependent code such as ``torch.ones(T, T)`` and HF transformers models);
       in-place updates become edges (:func:`~fxpipe.trace_fixes.functional_inplace`);
    3. ``torch.fx`` again, keeping every submodule that fails to trace as an opaque
       leaf (costed as a whole), with a warning naming it;
    4. ``torch.export`` again, with the submodule that stopped it as an opaque leaf
       (:mod:`fxpipe.trace_leaves`), innermost first.

    Args:
        model: the module to trace (real, meta or fake parameters).
        args: example positional inputs (one microbatch).
        kwargs: example keyword inputs; a constant among them (None, bool, int, float or str:
            ``use_cache=False``, ``return_loss=True``) is traced into the graph, which has no input for it
            (``gm.meta["fxpipe.constant_inputs"]``).
        leaf_modules: module types or qualified names kept as opaque call_module nodes.

    Returns:
        A GraphModule; ``gm.meta["fxpipe.tracer"]`` says which frontend worked
        ("fx", "export", "fx+leaves" or "export+leaves") and ``gm.meta["fxpipe.leaves"]`` lists modules made opaque.

    Raises:
        TraceError: no frontend could trace the model; the message names the source line
        that stopped tracing (e.g. data-dependent control flow) and the fix.
    """
    kwargs = dict(kwargs or {})
    leaf_modules = list(leaf_modules)
    with _kv_cache_off(model, kwargs):
        gm = _trace(model, args, kwargs, leaf_modules)
    gm.meta[META_CONSTANTS] = _constants(kwargs)
    return gm


def _trace(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
           leaf_modules: list[type | str]) -> torch.fx.GraphModule:
    try:
        gm = _fx(model, args, kwargs, leaf_modules, "fx")
    except Exception as e:  # noqa: BLE001 - any tracer failure leads to the next frontend
        fx_err = e
    else:
        mutations = fx_mutations(gm)
        if not mutations:
            return gm
        # in-place updates (``s[:, 1:] = x``) are no fx edges, so a plan could split them from their
        # readers: take export's graph, where they become edges (functional_inplace)
        try:
            return _export(model, args, kwargs, leaf_paths(model, leaf_modules), "export")
        except Exception:  # noqa: BLE001
            # then the fx graph: updates of tensors nothing else aliases become edges; the rest must stay
            # with the tensor's readers, and compile refuses a plan that splits them
            left = functional_fx_inplace(gm, _example_inputs(model, args, kwargs))
            if left:
                warnings.warn(f"fxpipe: {type(model).__name__} updates tensors in place "
                              f"({', '.join(left[:3])}) that alias an input, a parameter, a buffer or a view, "
                              "and torch.export could not trace it; the plan must keep each update on the "
                              "stage of the tensor's readers. Write it out of place (torch.cat, torch.where) "
                              "to be safe", stacklevel=3)
                gm.meta[META_FX_MUTATIONS] = left
            return gm
    try:
        return _export(model, args, kwargs, leaf_paths(model, leaf_modules), "export")
    except Exception as e:  # noqa: BLE001
        ex_err = e
    # 3. fx, making failing submodules opaque, innermost first
    gm, made, err = _with_auto_leaves(
        model, lambda leaves: _fx(model, args, kwargs, leaves, "fx+leaves"), list(leaf_modules), fx_err,
        lambda e, leaves: (p if (p := getattr(e, "_fxpipe_module", "")) and p not in leaves else None))
    if gm is not None:
        _warn_opaque(model, made)
        return gm
    # 4. export, making the submodule that stopped it opaque, innermost first (plain fx fails at the
    # root of most HF models, so step 3 never starts there)
    gm, made, last = _with_auto_leaves(
        model, lambda leaves: _export(model, args, kwargs, leaves, "export+leaves"), leaf_paths(model, leaf_modules),
        ex_err, lambda e, leaves: failing_submodule(model, e, leaves))
    if gm is not None:
        _warn_opaque(model, made)
        return gm
    where = next((w for w in map(_user_frame, (last, ex_err, err, fx_err)) if w), "")
    msgs = " ".join(str(e) for e in (ex_err, last))
    advice = ""
    if "in output, which is not a known type" in msgs or "cache" in msgs.lower():
        advice = ("The model returns an object that is not tensors (or a pytree of them), typically a "
                  "key/value cache (DynamicCache, past_key_values): training needs no cache, so turn it off "
                  "(config.use_cache=False, or use_cache=False in the forward inputs) or return tensors "
                  "only. ")
    if "NoneType" in msgs and "attention_mask" not in _example_inputs(model, args, kwargs) \
            and "attention_mask" in _forward_parameters(model):
        advice += ("The model takes an attention_mask that was not given, and a None reached an operation: "
                   "HuggingFace models skip building their default mask while torch.export traces "
                   "(is_torchdynamo_compiling()), so pass attention_mask=torch.ones_like(input_ids) in "
                   "example_inputs and in every batch. ")
    raise TraceError(
        f"could not trace {type(model).__name__}: {where}torch.fx failed with {_one_line(fx_err)}; "
        f"torch.export failed with {_one_line(last)}. {advice}If this is data-dependent control flow "
        "(an `if` or loop on tensor values), rewrite it with torch.where / torch.cond, or move it into "
        "a submodule and pass that submodule in leaf_modules=[...] so it runs as one opaque node."
    ) from last


_MAX_AUTO_LEAVES = 64


def _with_auto_leaves(model: torch.nn.Module, retrace: Callable[[list[Any]], torch.fx.GraphModule],
                      leaves: list[Any], err: BaseException, failing: Callable[[BaseException, list[Any]], str | None],
                      ) -> tuple[torch.fx.GraphModule | None, dict[str, BaseException], BaseException]:
    """Retrace with the submodule that stopped the last try (``failing(err, leaves)``) made opaque, and
    every other submodule of its class with it when that is the model's own class, not torch's (the
    layers of a model repeat: one retrace, not one per layer), until one works or none is left:
    (graph or None, each path made opaque -> the error that stopped the try before it, the last error).

    A graph that works records the paths in ``gm.meta["fxpipe.leaves"]``.
    """
    made: dict[str, BaseException] = {}
    for _ in range(_MAX_AUTO_LEAVES):
        path = failing(err, leaves)
        if not path:
            break
        cls = type(model.get_submodule(path))
        new = [path]
        if not cls.__module__.startswith("torch."):      # a model's own block, not nn.Linear
            new = [q for q, m in model.named_modules() if q and type(m) is cls
                   and not any(isinstance(f, str) and (q == f or q.startswith(f + ".")) for f in leaves)]
            new = [q for q in new if not any(q.startswith(o + ".") for o in new)] or [path]
        # a leaf inside a new one is now part of it: it must not stay a leaf of its own, whose stand-in
        # would run (and refuse to) when the outer leaf runs eagerly
        inner = [q for q in leaves if isinstance(q, str) and any(q.startswith(n + ".") for n in new)]
        leaves[:] = [q for q in leaves if q not in inner] + new
        for q in inner:
            made.pop(q, None)
        made.update(dict.fromkeys(new, err))
        try:
            gm = retrace(leaves)
        except Exception as e:  # noqa: BLE001 - the next failing submodule, or give up
            err = e
            continue
        gm.meta["fxpipe.leaves"] = list(made)
        return gm, made, err
    return None, made, err


def _warn_opaque(model: torch.nn.Module, made: dict[str, BaseException]) -> None:
    for p, cause in made.items():
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


def _forward_parameters(model: torch.nn.Module) -> list[str]:
    try:
        return list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return []


def _example_inputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """forward's parameter name -> the example value given for it."""
    try:
        names = [p.name for p in inspect.signature(model.forward).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return dict(kwargs)
    return {**dict(zip(names, args)), **kwargs}


def _constants(kwargs: dict) -> dict[str, Any]:
    """The keyword constants among the inputs (None, bool, int, float, str), traced into the graph."""
    return {k: v for k, v in kwargs.items() if is_constant(v)}


def _fx(model: torch.nn.Module, args: tuple, kwargs: dict, leaves: list, name: str) -> torch.fx.GraphModule:
    tracer = FxpipeTracer(leaves)
    concrete = _concrete_defaults(model, len(args), list(kwargs))
    if "use_cache" in concrete:
        concrete["use_cache"] = False
    constants = _constants(kwargs)
    concrete.update(constants)
    with torch.enable_grad(), _NoTraceTimeEffects():   # grad mode restored however the traced code leaves it
        graph = tracer.trace(model, concrete_args=concrete or None)
    gm = torch.fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if tracer.output_spec is not None and tracer.output_spec.num_leaves == len(pytree.tree_leaves(out)):
        gm._out_spec = tracer.output_spec   # as torch.export's graphs: how to rebuild the model's output
    drop_unused_placeholders(gm, concrete)
    # the defaults only: the constants given are gm.meta["fxpipe.constant_inputs"], accepted again by step
    gm.meta[META_FIXED_INPUTS] = sorted(set(concrete) - set(constants))
    detach_no_grad_values(gm)
    gm.meta["fxpipe.tracer"] = name
    gm.meta["fxpipe.leaves"] = []
    return gm


def _export(model: torch.nn.Module, args: tuple, kwargs: dict, leaves: list[str], name: str) -> torch.fx.GraphModule:
    """``torch.export`` (non-strict) with the submodules at ``leaves`` kept as opaque call_module nodes."""
    constants = _constants(kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in constants}
    # torch.export prints the partial graph of a failed export to stderr; fxpipe reports failures itself
    with warnings.catch_warnings(), opaque_during_export(model, leaves) as calls, \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, tuple(args), {**kwargs, **constants}, strict=False)
        gm = ep.module()
        opaque_calls_to_modules(gm, model, calls)
    drop_guards(gm)
    drop_constant_inputs(gm, constants, (tuple(args), kwargs))
    functional_inplace(gm)
    grad_toggles_to_meta(gm)
    detach_no_grad_values(gm)
    gm.meta["fxpipe.tracer"] = name
    gm.meta["fxpipe.kwarg_names"] = list(kwargs)
    gm.meta["fxpipe.leaves"] = []
    return gm  # type: ignore[return-value]


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
