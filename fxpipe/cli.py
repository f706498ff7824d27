"""The ``fxpipe`` command: ``dump`` shows a model's plan; ``demo`` runs the main job.

    fxpipe dump gpt2-xl --stages 16                         # a preset, planned on the meta device
    fxpipe dump bert-large --stages 8 --memory-limit 16GiB --device a100-80gb --format html -o plan.html
    fxpipe dump path/to/model.py:make --stages 4 --format dot -o plan.dot
    fxpipe dump pkg.module:factory --stages 2 --format json

Formats: ``table`` (text), ``json`` (``Plan.to_json``), ``dot`` (Graphviz, one cluster
per stage), ``svg`` (the DOT laid out by Graphviz when ``dot`` is installed, else
charts drawn in pure Python), ``html`` (one self-contained report).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from typing import Any, Callable

from fxpipe import __version__
from fxpipe.errors import ConfigError, FxpipeError, ModelSpecError
from fxpipe.ir import SCHEDULES
from fxpipe.passes.annotate import COST_MODELS
from fxpipe.precision import PRECISIONS

__all__ = ["main", "load_model_spec", "resolve_model"]

FORMATS = ("table", "json", "dot", "svg", "html")


def load_model_spec(spec: str) -> tuple[Any, Any]:
    """Build a preset (``gpt2-xl``) or load ``path/to/file.py:factory`` / ``pkg.module:factory``.

    A preset name (see :mod:`fxpipe.presets`) is resolved first; anything else
    must name a factory that returns ``(model, example_inputs)``.

    Returns:
        ``(model, example_inputs)`` as the preset or factory returns them.

    Raises:
        ModelSpecError: not a preset and the file, module or factory does not exist,
            or the factory fails.
    """
    from fxpipe.presets import PRESETS, get_preset

    if spec in PRESETS:
        return get_preset(spec)
    if ":" not in spec:
        raise ModelSpecError(f"model spec {spec!r} is not a preset and has no ':factory'; presets: "
                             f"{', '.join(PRESETS)}; or write path/to/file.py:factory or "
                             "pkg.module:factory, where factory() returns (model, example_inputs)")
    where, _, name = spec.rpartition(":")
    if where.endswith(".py") or os.sep in where:
        if not os.path.isfile(where):
            raise ModelSpecError(f"model file {where!r} does not exist (cwd {os.getcwd()})")
        mod_name = "_fxpipe_user_" + os.path.splitext(os.path.basename(where))[0]
        sp = importlib.util.spec_from_file_location(mod_name, where)
        if sp is None or sp.loader is None:
            raise ModelSpecError(f"cannot import {where!r} as a Python file")
        mod = importlib.util.module_from_spec(sp)
        sys.modules[mod_name] = mod
        try:
            sp.loader.exec_module(mod)
        except Exception as e:  # noqa: BLE001 - user code
            raise ModelSpecError(f"importing {where!r} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            mod = importlib.import_module(where)
        except Exception as e:  # noqa: BLE001
            raise ModelSpecError(f"cannot import module {where!r}: {type(e).__name__}: {e}") from e
    factory: Callable[[], Any] | None = getattr(mod, name, None)
    if not callable(factory):
        avail = sorted(k for k, v in vars(mod).items() if callable(v) and not k.startswith("_"))
        raise ModelSpecError(f"{where!r} has no callable {name!r}; callables there: {avail[:12]}")
    try:
        out = factory()
    except Exception as e:  # noqa: BLE001
        raise ModelSpecError(f"factory {spec!r} raised {type(e).__name__}: {e}") from e
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ModelSpecError(f"factory {spec!r} must return (model, example_inputs), got {type(out).__name__}")
    return out


def resolve_model(spec: str, num_microbatches: int, batch: int | None = None) -> tuple[Any, Any]:
    """:func:`load_model_spec`, with a preset's batch made divisible by ``num_microbatches``.

    Args:
        spec: preset name or ``file.py:factory`` / ``pkg.module:factory``.
        num_microbatches: m; a preset's default batch is rounded to a multiple of m
            (a note goes to stderr).
        batch: whole-batch size for a preset (``--batch``); not allowed with a factory.

    Returns:
        ``(model, example_inputs)``.

    Raises:
        ModelSpecError: as :func:`load_model_spec`, or ``batch`` given for a factory
            spec or not divisible by ``num_microbatches``.
    """
    from fxpipe.presets import PRESETS, get_preset

    if spec not in PRESETS:
        if batch is not None:
            raise ModelSpecError(f"--batch only applies to presets ({', '.join(PRESETS)}); for {spec!r} "
                                 "change the batch your factory returns")
        return load_model_spec(spec)
    if batch is not None:
        if batch < 1 or batch % num_microbatches:
            raise ModelSpecError(f"--batch {batch} must be a positive multiple of --microbatches "
                                 f"{num_microbatches}")
        return get_preset(spec, batch=batch)
    model, example = get_preset(spec)
    size = int(example[0].shape[0])
    if size % num_microbatches:
        fixed = num_microbatches * max(1, round(size / num_microbatches))
        print(f"fxpipe: note: preset {spec} batch {size} is not divisible by {num_microbatches} "
              f"microbatches; using batch {fixed} (set it with --batch)", file=sys.stderr)
        model, example = get_preset(spec, batch=fixed)
    return model, example


def _check_args(a: argparse.Namespace) -> None:
    """Numbers in range and ``-o`` writable, before anything is planned.

    Raises:
        ConfigError: a count < 1, or ``-o`` names a directory or a file in a missing directory.
    """
    for flag in ("microbatches", "steps", "batch", "max_nodes"):   # --stages: compile says num_stages
        v = getattr(a, flag, None)
        if v is not None and v < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {v} must be >= 1")
    if getattr(a, "time_limit", None) is not None and not a.time_limit > 0:
        raise ConfigError(f"--time-limit {a.time_limit} must be > 0 seconds")
    out = getattr(a, "output", None)
    if out:
        if os.path.isdir(out):
            raise ConfigError(f"-o {out!r} is a directory; give a file name, e.g. -o {os.path.join(out, 'plan.' + a.format)!r}")
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise ConfigError(f"-o {out!r}: the directory {parent!r} does not exist; create it first "
                              f"(mkdir -p {parent}) or write elsewhere")


def _check_batch(a: argparse.Namespace, example: Any) -> None:
    """A factory's batch must split into the microbatches; say which flag set them."""
    import torch
    import torch.utils._pytree as pytree

    sizes = [int(t.shape[0]) for t in pytree.tree_leaves(example) if isinstance(t, torch.Tensor) and t.dim() > 0]
    if sizes and sizes[0] % a.microbatches:
        why = (f"--microbatches defaults to max(--stages, 4) = {a.microbatches}" if a.default_microbatches
               else f"--microbatches {a.microbatches}")
        fits = [m for m in range(1, sizes[0] + 1) if sizes[0] % m == 0 and (a.schedule != "2bw" or m >= a.stages)]
        raise ConfigError(f"{a.model!r} gives a batch of {sizes[0]}, not divisible into {a.microbatches} "
                          f"microbatches ({why}); pass --microbatches M with M dividing {sizes[0]}"
                          + (f" (e.g. {fits[0]})" if fits else
                             f" — none is >= --stages {a.stages} as 2bw needs: use fewer --stages, "
                             "--schedule flush, or a larger batch"))


def _dump(a: argparse.Namespace) -> int:
    import fxpipe
    from fxpipe.options import DEVICE_MEMORY
    from fxpipe.units import parse_bytes

    limit: Any = DEVICE_MEMORY        # --device's memory unless --memory-limit says otherwise
    if a.memory_limit and a.memory_limit.strip().lower() == "none":
        limit = None
    elif a.memory_limit:
        try:
            limit = parse_bytes(a.memory_limit)
        except ValueError:
            raise ModelSpecError(f"--memory-limit {a.memory_limit!r} is not a size; write e.g. 16GiB or 8e9, "
                                 "or none for no limit") from None
    model, example = resolve_model(a.model, a.microbatches, a.batch)
    _check_batch(a, example)
    kwargs = dict(num_stages=a.stages, num_microbatches=a.microbatches, schedule=a.schedule,
                  memory_limit=limit, device=a.device, cost_model=a.cost_model, time_limit=a.time_limit,
                  precision=a.precision, devices_per_node=a.devices_per_node)
    if a.format in ("table", "json"):
        plan = fxpipe.plan(model, example, **kwargs)
        text = plan.to_json() if a.format == "json" else plan.summary()
    else:
        plan, edges, labels = _plan_with_graph(model, example, kwargs)
        text = _render(a, plan, edges, labels)
    if a.device is not None:
        for line in _over_device_memory(plan, a.device):
            print(f"fxpipe: warning: {line}", file=sys.stderr)
            if a.format == "table":
                text += f"\nWARNING: {line}"
    if a.output:
        with open(a.output, "w", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        print(f"fxpipe: wrote {a.format} to {a.output}", file=sys.stderr)
    else:
        print(text)
    return 0


def _over_device_memory(plan: Any, device: str) -> list[str]:
    """One line per stage whose predicted memory exceeds what ``device`` leaves to tensors (limit lifted or raised)."""
    from fxpipe.cost_models.device import get_device
    from fxpipe.units import fmt_bytes

    spec = get_device(device)
    kept = [f"{fmt_bytes(spec.memory_reserved)} the CUDA context and libraries hold"] if spec.memory_reserved else []
    kept += [f"{spec.memory_headroom:.0%} headroom for the allocator"] if spec.headroom_bytes else []
    held = f" ({fmt_bytes(spec.memory_bytes)} less {' and '.join(kept)})" if kept else ""
    return [f"stage {st.index} needs {fmt_bytes(st.memory)}, more than the {fmt_bytes(spec.usable_memory)} usable "
            f"on one {spec.name}{held}; drop --memory-limit (the planner then fits the device), add stages, or "
            "allow recompute" for st in plan.stages if st.memory > spec.usable_memory]


def _plan_with_graph(model: Any, example: Any, kwargs: dict[str, Any]) -> tuple[Any, list[Any], dict[str, str]]:
    """Plan like fxpipe.plan, and also return the annotated graph's edges and node labels."""
    import fxpipe
    from fxpipe.render import graph_edges, node_labels

    r = fxpipe.plan_with_graph(model, example, **kwargs)
    return r.plan, graph_edges(r.gm), node_labels(r.gm)


def _render(a: argparse.Namespace, plan: Any, edges: list[Any], labels: dict[str, str]) -> str:
    from fxpipe import render

    title = f"fxpipe plan: {a.model}"
    if a.format == "dot":
        return render.to_dot(plan, edges, labels, max_nodes=a.max_nodes, title=title)
    if a.format == "html":
        return render.to_html(plan, edges, labels, title=title, max_nodes=a.max_nodes)
    svg = render.dot_to_svg(render.to_dot(plan, edges, labels, max_nodes=a.max_nodes, title=title))
    if svg is None:
        print("fxpipe: note: Graphviz `dot` not found; writing per-stage charts and the schedule "
              "timeline as SVG instead of the graph (install graphviz for the graph drawing)", file=sys.stderr)
        svg = render.plan_svg(plan, title=title)
    return svg


def _calibrate(a: argparse.Namespace) -> int:
    """Compile with real weights, train ``--steps`` steps on random data, print predicted vs measured."""
    import torch
    import torch.utils._pytree as pytree

    import fxpipe
    from fxpipe.calibrate import calibration_cost_model
    from fxpipe.presets import PRESETS, get_preset

    if a.model in PRESETS:
        model, example = get_preset(a.model, device="cpu")
    else:
        model, example = load_model_spec(a.model)
    _check_batch(a, example)
    if any(p.is_meta for p in model.parameters()):
        raise ModelSpecError(f"{a.model!r} builds its model on the meta device; calibrate trains it, so the "
                             "factory must create real weights")

    def loss_fn(out: object, _targets: object) -> torch.Tensor:
        # the timing does not depend on the loss: mean square of every floating-point output
        leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return sum(t.float().pow(2).mean() for t in leaves) / max(1, len(leaves))

    pipe = fxpipe.compile(model, example, num_stages=a.stages, num_microbatches=a.microbatches,
                          schedule=a.schedule, cost_model=calibration_cost_model(a.cost_model, a.reprofile),
                          loss_fn=loss_fn, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0))
    leaves = pytree.tree_leaves(example)
    batch = next(t.shape[0] for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 0)
    targets = torch.zeros(batch)
    for _ in range(a.steps):
        pipe.step(example, targets)
    print(pipe.plan.summary())
    print()
    print(pipe.report())
    if a.replan:
        print()
        print("re-planned from the measurements:")
        print(pipe.replan().plan.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":   # its options belong to the demo's own parser
        from fxpipe.examples.train_gpt import main as demo_main

        try:
            return demo_main(argv[1:])
        except FxpipeError as e:
            print(f"fxpipe: error: {e}", file=sys.stderr)
            return 2
    ap = argparse.ArgumentParser(prog="fxpipe", description="Pipeline-parallel compiler for PyTorch models.")
    ap.add_argument("--version", action="version", version=f"fxpipe {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="plan a model and print the stages")
    d.add_argument("model", help="a preset (gpt2-small, gpt2-xl, bert-large, llama-7b, resnet-50, ...; see "
                   "fxpipe.presets) or path/to/file.py:factory or pkg.module:factory returning "
                   "(model, example_inputs)")
    d.add_argument("--stages", type=int, required=True)
    d.add_argument("--microbatches", type=int, default=None, help="default: max(stages, 4)")
    d.add_argument("--schedule", default="2bw", choices=SCHEDULES)
    d.add_argument("--memory-limit", default=None, help="bytes per device, e.g. 16GiB; default: --device's memory; none: no limit")
    d.add_argument("--device", default=None, help="device preset, e.g. a100-80gb (default: this machine)")
    d.add_argument("--cost-model", default="analytic", choices=COST_MODELS)
    d.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="bytes of weights, masters, gradients and activations, and the FLOP rate (default fp32)")
    d.add_argument("--devices-per-node", type=int, default=None,
                   help="devices sharing a node's fast links (default: --device's, e.g. 8)")
    d.add_argument("--time-limit", type=float, default=10.0)
    d.add_argument("--batch", type=int, default=None, help="whole-batch size of a preset (default: the preset's)")
    d.add_argument("--format", default="table", choices=list(FORMATS))
    d.add_argument("--max-nodes", type=int, default=400,
                   help="dot/svg/html: collapse stage interiors of graphs with more nodes than this")
    d.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")
    c = sub.add_parser("calibrate", help="train a few steps on random data; predicted vs measured per stage")
    c.add_argument("model", help="path/to/file.py:factory or pkg.module:factory with REAL weights, or a preset "
                   "(built with real weights on this CPU: use a small one)")
    c.add_argument("--stages", type=int, required=True)
    c.add_argument("--microbatches", type=int, default=None, help="default: max(stages, 4)")
    c.add_argument("--schedule", default="2bw", choices=SCHEDULES)
    c.add_argument("--cost-model", default="analytic", choices=COST_MODELS)
    c.add_argument("--steps", type=int, default=3, help="training steps; the last one is measured")
    c.add_argument("--replan", action="store_true", help="also re-plan from the measurements and show the new plan")
    c.add_argument("--reprofile", action="store_true",
                   help="measure every op again (implies --cost-model profile) and overwrite the cached prices")
    demo = sub.add_parser("demo", help="the main job: train a small GPT under 2BW", add_help=False)
    demo.add_argument("rest", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    try:
        _check_args(a)
        a.default_microbatches = a.microbatches is None
        if a.microbatches is None:
            a.microbatches = max(a.stages, 4)
        if a.cmd == "calibrate":
            return _calibrate(a)
        return _dump(a)
    except FxpipeError as e:
        print(f"fxpipe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
