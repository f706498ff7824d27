"""The ``fxpipe`` command: ``dump`` shows a model's plan; ``demo`` runs the main job."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from typing import Any, Callable

from fxpipe.errors import FxpipeError, ModelSpecError

__all__ = ["main", "load_model_spec"]


def load_model_spec(spec: str) -> tuple[Any, Any]:
    """Load ``path/to/file.py:factory`` or ``pkg.module:factory`` and call the factory.

    Returns:
        ``(model, example_inputs)`` as the factory returns them.

    Raises:
        ModelSpecError: the file, module or factory does not exist, or the factory fails.
    """
    if ":" not in spec:
        raise ModelSpecError(f"model spec {spec!r} has no ':factory'; write path/to/file.py:factory "
                             "or pkg.module:factory, where factory() returns (model, example_inputs)")
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


def _dump(a: argparse.Namespace) -> int:
    import fxpipe
    from fxpipe.report import parse_bytes

    model, example = load_model_spec(a.model)
    limit = None
    if a.memory_limit:
        try:
            limit = parse_bytes(a.memory_limit)
        except ValueError:
            raise ModelSpecError(f"--memory-limit {a.memory_limit!r} is not a size; write e.g. 16GiB or 8e9") from None
    plan = fxpipe.plan(model, example, num_stages=a.stages, num_microbatches=a.microbatches,
                       schedule=a.schedule, memory_limit=limit, device=a.device, cost_model=a.cost_model,
                       time_limit=a.time_limit)
    if a.format == "json":
        text = plan.to_json()
    else:
        text = plan.summary()
    if a.output:
        with open(a.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fxpipe", description="Pipeline-parallel compiler for PyTorch models.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="plan a model and print the stages")
    d.add_argument("model", help="path/to/file.py:factory or pkg.module:factory returning (model, example_inputs)")
    d.add_argument("--stages", type=int, required=True)
    d.add_argument("--microbatches", type=int, default=None, help="default: max(stages, 4)")
    d.add_argument("--schedule", default="2bw", choices=["2bw", "flush", "gpipe"])
    d.add_argument("--memory-limit", default=None, help="bytes per device, e.g. 16GiB")
    d.add_argument("--device", default=None, help="device preset, e.g. a100-80gb (default: this machine)")
    d.add_argument("--cost-model", default="analytic", choices=["analytic", "profile"])
    d.add_argument("--time-limit", type=float, default=10.0)
    d.add_argument("--format", default="table", choices=["table", "json"])
    d.add_argument("-o", "--output", default=None)
    demo = sub.add_parser("demo", help="the main job: train a small GPT under 2BW", add_help=False)
    demo.add_argument("rest", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "dump":
            if a.microbatches is None:
                a.microbatches = max(a.stages, 4)
            return _dump(a)
        from fxpipe.examples.train_gpt import main as demo_main

        return demo_main(a.rest)
    except FxpipeError as e:
        print(f"fxpipe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
