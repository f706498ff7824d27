"""Graph fix-ups after tracing: in-place updates made explicit edges, torch.no_grad regions kept, guards dropped.

A plan may cut the graph between any two nodes, so everything a node's result
depends on must be an edge of the graph:

    in place     ``s[:, 1:] = x`` / ``x.add_(y)`` / ``x += y`` / ``nn.ReLU(inplace=True)``: plain fx
                 records no edge from the update to the tensor's later readers (and ``x += y``
                 not even the update), so :func:`fx_mutations` sends such models to torch.export,
                 whose aten graph :func:`functional_inplace` rewrites into out-of-place edges
    no_grad      plain fx runs ``with torch.no_grad():`` at trace time and records nothing:
                 the tracer marks the nodes made under it (``META_NO_GRAD``) and
                 :func:`detach_no_grad_values` detaches each value where it leaves the region,
                 which gives the gradients of the eager model on every stage of every plan;
                 ``torch._C._set_grad_enabled`` nodes (make_fx graphs) become the same marks
                 (:func:`grad_toggles_to_meta`); export's ``wrap_with_set_grad_enabled`` is one
                 node already, which no plan can cut
"""

from __future__ import annotations

import copy
import operator
import re
from typing import Any, Iterable

import torch
import torch.fx
import torch.utils._pytree as pytree

__all__ = ["META_NO_GRAD", "META_FIXED_INPUTS", "META_FX_MUTATIONS", "fx_mutations", "functional_fx_inplace",
           "check_mutations_kept", "mutated_copy", "functional_inplace", "stop_grad",
           "grad_toggles_to_meta", "detach_no_grad_values", "drop_guards", "drop_unused_placeholders",
           "drop_constant_inputs", "INPLACE_OPERATORS", "in_place_name"]

META_NO_GRAD = "fxpipe.no_grad"      # node.meta: the node was made with grad mode off (torch.no_grad)
META_FIXED_INPUTS = "fxpipe.fixed_inputs"   # gm.meta: forward arguments fx fixed to their defaults
COMPUTE_OPS = ("call_function", "call_method", "call_module")
# ``x += y`` and friends, as FxpipeTracer records them (plain fx records ``operator.add``)
INPLACE_OPERATORS = tuple(getattr(operator, f"__i{m}__") for m in
                          ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
                           "xor", "lshift", "rshift"))


def in_place_name(name: str) -> bool:
    """A Tensor method or torch function name that updates its first argument's data (``add_``,
    ``relu_``, ``copy_``); ``requires_grad_`` changes a flag, not data."""
    return name.endswith("_") and not name.startswith("_") and name != "requires_grad_"


def fx_mutations(gm: torch.fx.GraphModule) -> list[str]:
    """Nodes of an fx graph that update a tensor in place.

    ``x[i] = v`` (setitem), ``x += y`` (``operator.iadd``, see ``INPLACE_OPERATORS``),
    ``x.add_(y)``-style methods, ``torch.relu_(x)``-style functions, ``inplace=True``
    keyword arguments, and modules with ``inplace=True`` (``nn.ReLU(inplace=True)``).
    """
    def mutates(n: torch.fx.Node) -> bool:
        if n.op == "call_function":
            name = getattr(n.target, "__name__", "")
            return (n.target is operator.setitem or n.target in INPLACE_OPERATORS
                    or in_place_name(name) or n.kwargs.get("inplace") is True)
        if n.op == "call_method":
            return in_place_name(str(n.target))
        if n.op == "call_module":
            return getattr(gm.get_submodule(str(n.target)), "inplace", False) is True
        return False

    return [n.name for n in gm.graph.nodes if mutates(n)]


META_FX_MUTATIONS = "fxpipe.fx_mutations"   # gm.meta: in-place nodes left in an fx graph (export failed)


def check_mutations_kept(gm: torch.fx.GraphModule, stage_of: dict[str, int]) -> None:
    """Refuse a plan under which an in-place update of an fx graph is not seen as the model sees it.

    Only for graphs whose in-place updates stayed fx nodes (``gm.meta[META_FX_MUTATIONS]``,
    set when torch.export could not trace the model): there the update is no edge. A stage
    sends a tensor once its forward is done, so a plan is exact when (1) the update runs on
    the stage that made the tensor (a received copy is a leaf autograd refuses to update;
    a model input reaches each stage on its own, so then every reader shares that stage) and
    (2) every reader on a later stage comes after the update in the model's order (it sees the
    update, as in the model). An update through a view (``h[:, :4].add_(1)``) is checked against
    the viewed tensor ``h`` and its readers (view chains of indexing, ``view``, ``transpose``, ...;
    a view made by another module or function is not followed).

    Raises:
        PartitionError: naming the update, the stages involved and the ways out.
    """
    from fxpipe.errors import PartitionError

    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for name in gm.meta.get(META_FX_MUTATIONS, ()):
        m = nodes.get(name)
        if m is None or m.name not in stage_of or not m.args or not isinstance(m.args[0], torch.fx.Node):
            continue
        target, sm = m.args[0], stage_of[m.name]
        chain = [target]
        while _is_view(chain[-1]):                  # h[:, :4].add_(1) updates h: check h and its views
            chain.append(chain[-1].args[0])
        target = chain[-1]
        readers = [r for c in chain for r in c.users if r is not m and r not in chain and r.name in stage_of]
        bad_view = [c for c in chain[:-1] if stage_of.get(c.name, sm) != sm]
        if target.name in stage_of:
            bad = bad_view + ([] if stage_of[target.name] == sm else [target])
            bad += [r for r in readers if stage_of[r.name] > sm and order[r] < order[m]]
        else:
            bad = bad_view + [r for r in readers if stage_of[r.name] != sm]
        if bad:
            where = ", ".join(f"{n.name} on stage {stage_of[n.name]}" for n in sorted({*bad, m}, key=order.get))
            raise PartitionError(
                f"the plan splits the in-place update {name!r} of {target.name!r} from the nodes that make or "
                f"read it as the model does ({where}); torch.export could not trace this model, so the update is "
                "no graph edge and another stage would read a copy. Write the update out of place (y = x + v, "
                "torch.cat, torch.where), or make the module doing it opaque (leaf_modules=[...]) so it runs "
                "whole on one stage, or give a plan= that keeps the update on the stage making the tensor")


_VIEW_METHODS = frozenset({"view", "view_as", "reshape", "transpose", "permute", "narrow", "select", "expand",
                           "expand_as", "unsqueeze", "squeeze", "flatten", "t", "unflatten", "diagonal",
                           "as_strided", "movedim", "swapaxes", "__getitem__", "unfold", "real", "imag"})


def _is_view(n: Any) -> bool:
    """``n`` may return a view of its first argument (indexing, ``view``, ``transpose``, ...)."""
    if not isinstance(n, torch.fx.Node) or not n.args or not isinstance(n.args[0], torch.fx.Node):
        return False
    if n.op == "call_method":
        return str(n.target) in _VIEW_METHODS
    return n.op == "call_function" and (n.target is operator.getitem or
                                        getattr(n.target, "__name__", "") in _VIEW_METHODS)


def stop_grad(value: Any) -> Any:
    """``value`` with every tensor in it detached: a torch.no_grad region's value where it leaves the region."""
    return pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, value)


def grad_toggles_to_meta(gm: torch.fx.GraphModule) -> None:
    """Turn ``torch._C._set_grad_enabled(False)`` ... ``(True)`` nodes into ``META_NO_GRAD`` marks.

    The toggles read nothing, so a planner may put them on any stage; afterwards the
    region is a property of its nodes, which :func:`detach_no_grad_values` makes exact.
    """
    toggles = (torch._C._set_grad_enabled,)
    if not any(n.op == "call_function" and n.target in toggles for n in gm.graph.nodes):
        return
    enabled = True
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target in toggles and not n.users:
            enabled = bool(n.args[0])
            gm.graph.erase_node(n)
        elif n.op in COMPUTE_OPS and not enabled:
            n.meta[META_NO_GRAD] = True
    gm.graph.lint()
    gm.recompile()


def detach_no_grad_values(gm: torch.fx.GraphModule) -> None:
    """Detach every value of a no-grad region where a node outside it (or the output) reads it.

    Numerically the same as the region run under ``torch.no_grad()``: no gradient flows
    through it into earlier nodes or its parameters, on whichever stages its nodes and
    readers land; each stage runs with grad mode on, as the executor sets it::

        h = a(x)   [y = b(h)]no_grad   c(h + y)
        h = a(x)    y = b(h)   y' = stop_grad(y)   c(h + y')
    """
    changed = False
    for n in list(gm.graph.nodes):
        if not n.meta.get(META_NO_GRAD):
            continue
        outside = [u for u in n.users if not u.meta.get(META_NO_GRAD)]
        if not outside:
            continue
        with gm.graph.inserting_after(n):
            d = gm.graph.call_function(stop_grad, (n,))
        d.meta.update({k: v for k, v in n.meta.items() if k in ("nn_module_stack", "stack_trace")})
        for u in outside:
            u.replace_input_with(n, d)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def mutated_copy(base: torch.Tensor, views: tuple, op: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    """``base`` copied, then ``op`` applied in place to the view ``views`` of the copy; returns the copy.

    ``op`` is an in-place op (aten graphs) or the name of an in-place Tensor method (fx graphs).
    """
    out = base.clone()
    v = out
    for view, a, k in views:
        v = view(v, *a, **k)
    if isinstance(op, str):
        getattr(v, op)(*args, **kwargs)
    else:
        op(v, *args, **kwargs)
    return out


def functional_inplace(gm: torch.fx.GraphModule) -> None:
    """Make in-place updates of the graph's own tensors explicit edges (a local functionalization).

    torch.export keeps in-place aten ops. An fx edge does not say that a later reader of ``s``
    must run after ``s[..., 1:].copy_(x)`` (T5's ``_shift_right``): a mutation with no users may
    land on any later stage, where it updates that stage's copy only. Each such op becomes
    ``s2 = mutated_copy(s, views, op, ...)`` and every later read of ``s`` (or of a view of it)
    reads ``s2`` instead::

        s = new_zeros(..)   v = slice(s)   copy_(v, x)   use(s)
        s = new_zeros(..)   s2 = mutated_copy(s, (slice,), copy_, x)   use(s2)

    Mutations of inputs, parameters and buffers, or of values that alias another tensor
    (``getitem`` of a ``split``), are left as they are.
    """
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
        return n.op == "call_function" and (t is mutated_copy or (
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
                new = graph.call_function(mutated_copy, (latest.get(base, base), views, n.target,
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


def drop_guards(gm: torch.fx.GraphModule) -> None:
    """Drop torch.export's checks of the tracing run: its ``_guards_fn`` node (input shapes; fxpipe checks
    them itself) and ``aten._assert_tensor_metadata`` (a ``.to()``'s dtype and device as traced: a model
    traced on the meta device or the CPU asserts ``device=meta``/``cpu``, which fails where the stage runs,
    and on the fake CPU tensors the planner propagates shapes with)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
        elif node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default \
                and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()


def with_device(tree: Any, device: torch.device, only: str | None = None) -> Any:
    """``tree`` (a node's args and kwargs) with every ``torch.device`` in it replaced by ``device`` (only
    those of type ``only`` when given, e.g. "meta"): the device a graph was traced on is baked in by
    torch.export, and fxpipe runs each stage on a device of its own."""
    def swap(v: Any) -> Any:
        return device if isinstance(v, torch.device) and (only is None or v.type == only) else v

    return pytree.tree_map(swap, tree)


def drop_unused_placeholders(gm: torch.fx.GraphModule, concrete: Iterable[str] = ()) -> None:
    """fx keeps a placeholder per concrete arg; remove those with no users.

    torch.fx names the placeholder of a concrete arg ``mask`` ``mask_1`` and guards it, ``_assert_is_none(
    mask_1)`` for a None, ``torch._assert(mask_1 == False)`` for a bool or number: the graph then asks for an
    input ``mask_1`` that ``forward`` does not have, so a model with an optional argument left out (every
    HF model's ``labels=None``) could not be fed. Those guards of the args in ``concrete`` go first; the
    names of the args fixed at trace time are kept in ``gm.meta["fxpipe.fixed_inputs"]`` (``step`` refuses
    a value for one).
    """
    names = set(concrete)

    def concrete_placeholder(n: Any) -> bool:
        m = re.fullmatch(r"(.+)_\d+", str(n.target)) if isinstance(n, torch.fx.Node) and n.op == "placeholder" \
            else None
        return m is not None and m.group(1) in names

    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not node.args:
            continue
        if node.target is torch.fx._symbolic_trace._assert_is_none and concrete_placeholder(node.args[0]):
            gm.graph.erase_node(node)
        elif node.target is torch._assert and isinstance(cond := node.args[0], torch.fx.Node) \
                and cond.target is operator.eq and concrete_placeholder(cond.args[0]):
            gm.graph.erase_node(node)
            if not cond.users:
                gm.graph.erase_node(cond)
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" and not node.users:
            gm.graph.erase_node(node)
    gm.meta[META_FIXED_INPUTS] = sorted(names)
    gm.recompile()


def drop_constant_inputs(gm: torch.fx.GraphModule, constants: dict[str, Any], example: tuple[tuple, dict]) -> None:
    """Remove the placeholders torch.export made for keyword constants (``return_loss=True``).

    export specialises the graph to a constant and keeps its placeholder only for the guards
    (:func:`drop_guards` removed them); a use left is given the value itself. The graph's input spec is
    ``example`` (args, tensor kwargs) afterwards, so ``gm`` takes the tensors alone.
    """
    if not constants:
        return
    for node in list(gm.graph.find_nodes(op="placeholder")):
        name = str(node.target)
        if name not in constants:
            continue
        value = constants[name]
        for user in list(node.users):
            user.args, user.kwargs = pytree.tree_map(lambda a: value if a is node else a, (user.args, user.kwargs))
        gm.graph.erase_node(node)
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None:
        names = [a for a in info.orig_args if a not in constants]
        gm.graph._codegen.pytree_info = info._replace(orig_args=names, in_spec=pytree.tree_structure(example))
    gm.recompile()


def _in_place_method(n: torch.fx.Node) -> str | None:
    """The Tensor method that performs ``n``'s update in place on its first argument, if one does."""
    if n.op == "call_method":
        return str(n.target)
    if n.op == "call_function":
        if n.target is operator.setitem:
            return "__setitem__"
        name = getattr(n.target, "__name__", "")
        if n.target in INPLACE_OPERATORS or in_place_name(name):
            return name if hasattr(torch.Tensor, name) else None
    return None


def _storages(gm: torch.fx.GraphModule, inputs: dict[str, Any]) -> tuple[dict[torch.fx.Node, int], set[int]] | None:
    """Storage of every tensor a node makes when ``gm`` runs on ``inputs`` (placeholder name -> value), and
    the storages of inputs, parameters and buffers; None when it cannot run (meta inputs, missing ones).
    The run changes nothing: buffers (BatchNorm's running statistics) and the RNG are put back."""
    values = [inputs.get(str(p.target)) for p in gm.graph.nodes if p.op == "placeholder"]
    leaves = [v for v in pytree.tree_leaves(values) if isinstance(v, torch.Tensor)]
    if any(v is None for v in values) or any(t.device.type == "meta" for t in leaves):
        return None
    kept = [(b, b.detach().clone()) for b in gm.buffers()]
    rng = torch.get_rng_state()
    interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
    try:
        with torch.no_grad():
            interp.run(*values)
    except Exception:  # noqa: BLE001 - then nothing is rewritten
        return None
    finally:
        with torch.no_grad():
            for b, v in kept:
                b.copy_(v)
        torch.set_rng_state(rng)
    made = {n: v.untyped_storage().data_ptr() for n, v in interp.env.items()
            if isinstance(v, torch.Tensor) and n.op in COMPUTE_OPS}
    fixed = {t.untyped_storage().data_ptr() for t in [*leaves, *gm.parameters(), *gm.buffers()]}
    return made, fixed


def functional_fx_inplace(gm: torch.fx.GraphModule, inputs: dict[str, Any]) -> list[str]:
    """Turn the in-place updates of an fx graph into edges where that is exact; the ones left, by name.

    The fx counterpart of :func:`functional_inplace`, for models torch.export cannot trace. An
    update of a tensor that the graph made and that nothing else aliases (found by running the
    graph once on ``inputs``, placeholder name -> example value) becomes an update of a copy,
    and every later reader reads the copy::

        h = a(x)   g = h * 2   h.add_(1)   c(h)
        h = a(x)   g = h * 2   h2 = mutated_copy(h, (), "add_", (1,), {})   c(h2)

    (``nn.ReLU(inplace=True)`` and ``inplace=True`` keywords run out of place instead.) Updates
    of inputs, parameters, buffers and views are left, for :func:`check_mutations_kept`.
    """
    names = fx_mutations(gm)
    seen = _storages(gm, inputs) if names else None
    if seen is None:
        return names
    made, fixed = seen
    nodes = {n.name: n for n in gm.graph.nodes}
    mutating = {nodes[x] for x in names}
    fresh: set[torch.fx.Node] = set()          # copies made here: nothing aliases them
    left = []
    for name in names:
        m = nodes[name]
        t = m.args[0] if m.args else None
        ptr = made.get(t) if isinstance(t, torch.fx.Node) else None
        alias = t not in fresh and (ptr is None or ptr in fixed or any(
            p == ptr and n is not t and n not in mutating for n, p in made.items()))
        method = _in_place_method(m)
        if m.op == "call_module":
            mod = gm.get_submodule(str(m.target))
            rewritable = not any(True for _ in mod.parameters()) and not any(True for _ in mod.buffers())
        else:
            rewritable = m.kwargs.get("inplace") is True or method is not None
        if alias or not isinstance(t, torch.fx.Node) or not rewritable:
            left.append(name)
            continue
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        later = [u for u in t.users if u is not m and order[u] > order[m]]
        if m.op == "call_module":                    # nn.ReLU(inplace=True): a copy of it, out of place
            out_of_place = copy.copy(mod)                # (the user's module is left as it is)
            out_of_place.inplace = False
            m.target = str(m.target).replace(".", "_") + "_out_of_place"
            gm.add_submodule(m.target, out_of_place)
            new = m
        elif m.kwargs.get("inplace") is True:        # F.relu(h, inplace=True)
            m.kwargs = {**m.kwargs, "inplace": False}
            new = m
        else:
            with gm.graph.inserting_before(m):
                new = gm.graph.call_function(mutated_copy, (t, (), method, tuple(m.args[1:]), dict(m.kwargs)))
            m.replace_all_uses_with(new)
            gm.graph.erase_node(m)
        for u in later:
            u.replace_input_with(t, new)
        fresh.add(new)
    gm.graph.lint()
    gm.recompile()
    return left
