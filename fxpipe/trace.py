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
    """Trace ``model`` with torch.fx; fall back to ``torch.export`` when fx fails.

    Args:
        model: the module to trace (real, meta or fake parameters).
        args: example positional inputs (one microbatch).
        kwargs: example keyword inputs.
        leaf_modules: module types or qualified names kept as opaque call_module nodes.

    Returns:
        A GraphModule whose placeholders are, in order, the positional inputs then the
        keyword inputs given. ``gm.meta["fxpipe.tracer"]`` says which frontend worked.

    Raises:
        TraceError: neither frontend could trace the model; the message holds both errors.
    """
    kwargs = dict(kwargs or {})
    tracer = FxpipeTracer(leaf_modules)
    concrete = _concrete_defaults(model, len(args), list(kwargs))
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
        gm = torch.fx.GraphModule(tracer.root, graph, model.__class__.__name__)
        _drop_concrete_placeholders(gm, len(args), list(kwargs), model)
        gm.meta["fxpipe.tracer"] = "fx"
        return gm
    except Exception as fx_err:  # noqa: BLE001 - any tracer failure leads to the fallback
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(model, tuple(args), kwargs, strict=False)
            gm = ep.module()
            gm.meta["fxpipe.tracer"] = "export"
            return gm  # type: ignore[return-value]
        except Exception as ex_err:  # noqa: BLE001
            raise TraceError(
                f"could not trace {type(model).__name__}: torch.fx.symbolic_trace failed with "
                f"{type(fx_err).__name__}: {fx_err}; torch.export failed with "
                f"{type(ex_err).__name__}: {ex_err}. Mark the failing submodule as a leaf with "
                "leaf_modules=[...] or remove data-dependent control flow."
            ) from fx_err


def _drop_concrete_placeholders(gm: torch.fx.GraphModule, num_args: int, kwarg_names: list[str],
                                model: torch.nn.Module) -> None:
    """fx keeps a placeholder per concrete arg; remove those with no users."""
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
