"""Trace a model into a torch.fx GraphModule, with torch.export as the fallback."""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Iterable, Sequence

import torch
import torch.fx

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
    try:
        return _fx(model, args, kwargs, leaf_modules, "fx")
    except Exception as e:  # noqa: BLE001 - any tracer failure leads to the next frontend
        fx_err = e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, tuple(args), kwargs, strict=False)
        gm = ep.module()
        _drop_guards(gm)
        gm.meta["fxpipe.tracer"] = "export"
        gm.meta["fxpipe.kwarg_names"] = list(kwargs)
        return gm  # type: ignore[return-value]
    except Exception as e:  # noqa: BLE001
        ex_err = e
    # 3. make failing submodules opaque, innermost first
    leaves = list(leaf_modules)
    made_opaque: list[str] = []
    err: BaseException = fx_err
    for _ in range(64):
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
        for p in made_opaque:
            warnings.warn(f"fxpipe: submodule {p!r} ({type(model.get_submodule(p)).__name__}) could not be "
                          f"traced ({_one_line(fx_err)}); it runs as one opaque node of its stage. Pass "
                          f"leaf_modules=[{p!r}] to choose this yourself.", stacklevel=2)
        gm.meta["fxpipe.leaves"] = made_opaque
        return gm
    where = _user_frame(err)
    raise TraceError(
        f"could not trace {type(model).__name__}: {where}torch.fx failed with {_one_line(fx_err)}; "
        f"torch.export failed with {_one_line(ex_err)}. If this is data-dependent control flow "
        "(an `if` or loop on tensor values), rewrite it with torch.where / torch.cond, or move it into "
        "a submodule and pass that submodule in leaf_modules=[...] so it runs as one opaque node."
    ) from fx_err


def _fx(model: torch.nn.Module, args: tuple, kwargs: dict, leaves: list, name: str) -> torch.fx.GraphModule:
    tracer = FxpipeTracer(leaves)
    concrete = _concrete_defaults(model, len(args), list(kwargs))
    graph = tracer.trace(model, concrete_args=concrete or None)
    gm = torch.fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    _drop_concrete_placeholders(gm, len(args), list(kwargs), model)
    gm.meta["fxpipe.tracer"] = name
    gm.meta["fxpipe.leaves"] = []
    return gm


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
        if not fr.filename.startswith(torch_dir) and "fxpipe" + os.sep + "trace.py" not in fr.filename:
            return f"tracing stopped at {fr.filename}:{fr.lineno} `{(fr.line or '').strip()}`; "
    return ""
def _drop_concrete_placeholders(gm: torch.fx.GraphModule, num_args: int, kwarg_names: list[str],
                                model: torch.nn.Module) -> None:
    """fx keeps a placeholder per concrete arg; remove those with no users."""
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
