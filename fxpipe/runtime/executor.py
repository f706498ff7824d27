"""The local executor: interprets per-rank action lists for all stages in one process.

Each rank's list is executed in order; ranks take turns, and an action runs as
soon as what it needs is there (a forward needs its inputs, a backward the
gradients of every consumer of its outputs). If no rank can move, the schedule
deadlocks and the rank x step grid is printed in the error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import time

import torch
import torch.utils._pytree as pytree
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from fxpipe.errors import LossError, PipelineStateError, ScheduleError
from fxpipe.passes.split import PipelineProgram, Source, StageProgram
from fxpipe.runtime.schedules import Action, build_schedule, render
from fxpipe.runtime.weights import WeightVersions, version_for_batch

__all__ = ["StageRuntime", "LocalExecutor", "build_stage_runtimes", "stage_param_names", "SavedBytes",
           "check_loss"]


def check_loss(loss: Any, microbatch: int) -> torch.Tensor:
    """``loss`` if it is a one-element floating tensor with a gradient, else a LossError saying what it is.

    Raises:
        LossError: a Python number, a non-scalar tensor, an integer tensor, or one without ``grad_fn``.
    """
    how = "return loss_fn(model_output, targets) as a scalar tensor computed from the output, e.g. " \
          "torch.nn.functional.mse_loss(out, y)"
    if not isinstance(loss, torch.Tensor):
        extra = " (was .item() or float() called on it?)" if isinstance(loss, (int, float)) else ""
        raise LossError(f"loss_fn returned a {type(loss).__name__} ({loss!r:.60}) for microbatch {microbatch}, "
                        f"not a tensor{extra}; {how}")
    if loss.numel() != 1:
        raise LossError(f"loss_fn returned a tensor of shape {tuple(loss.shape)} for microbatch {microbatch}, "
                        "not a scalar; reduce it (e.g. .mean() or reduction='mean') — " + how)
    if not (loss.is_floating_point() or loss.is_complex()):
        raise LossError(f"loss_fn returned a {loss.dtype} tensor for microbatch {microbatch}; a loss must be "
                        f"floating point to have a gradient; {how}")
    if not loss.requires_grad:
        raise LossError(f"loss_fn returned a tensor without a gradient (requires_grad=False) for microbatch "
                        f"{microbatch}: it was detached, computed under torch.no_grad(), or built from "
                        f"Python numbers; {how}")
    return loss


@dataclass
class StageRuntime:
    """A stage with its parameters mapped to canonical names and its weight versions."""

    program: StageProgram
    param_names: dict[str, str]          # stage-module parameter name -> canonical name
    owned: list[str]                     # canonical names whose versions/optimizer live here
    weights: WeightVersions | None = None
    recompute: bool = False
    # measured, for reports: seconds of forward / backward compute and bytes autograd saved
    # (parameters excluded, one count per storage), one entry per microbatch of the last batch
    fwd_seconds: list[float] = field(default_factory=list)
    bwd_seconds: list[float] = field(default_factory=list)
    saved_bytes: list[int] = field(default_factory=list)


def build_stage_runtimes(program: PipelineProgram, canonical: dict[int, str],
                         params: dict[str, torch.nn.Parameter], optimizer: Callable | None,
                         schedule: str, recompute: Sequence[bool]) -> list[StageRuntime]:
    """Map every stage parameter to its canonical name; the lowest stage using a parameter owns it.

    Args:
        program: the split pipeline.
        canonical: id(parameter) -> canonical name (tied parameters share one).
        params: canonical name -> parameter.
        optimizer: optimizer factory; one optimizer per stage over the parameters it owns.
        schedule: "2bw" | "flush" | "gpipe".
        recompute: per stage, whether to recompute activations in backward.
    """
    owner: dict[str, int] = {}
    runtimes = []
    for st in program.stages:
        names = stage_param_names(program, st, canonical)
        for c in names.values():
            owner.setdefault(c, st.index)
        runtimes.append(StageRuntime(program=st, param_names=names, owned=[], recompute=bool(recompute[st.index])))
    for c, s in owner.items():
        runtimes[s].owned.append(c)
    for rt in runtimes:
        rt.weights = WeightVersions({c: params[c] for c in rt.owned}, optimizer, schedule)
    return runtimes


def stage_param_names(program: PipelineProgram, st: StageProgram, canonical: dict[int, str]) -> dict[str, str]:
    """Stage-module parameter name (or attr name read as a stage input) -> canonical name, tied ones included."""
    names = {n: canonical[id(p)] for n, p in st.module.named_parameters(remove_duplicate=False)}
    for src in st.sources:
        if src.kind == "attr":
            obj = _get_attr(program.root, src.name)
            if isinstance(obj, torch.nn.Parameter) and id(obj) in canonical:
                names.setdefault(src.name, canonical[id(obj)])
    return names


class SavedBytes:
    """Counts the bytes autograd saves for backward inside ``with``: once per view, at most the whole
    storage, parameters (``weights``) excluded; :meth:`hold` adds tensors the executor keeps anyway
    (a stage's received inputs).  ``total`` holds the count after the block."""

    def __init__(self, weights: Any) -> None:
        self._weights = {t.untyped_storage().data_ptr() for t in weights if t.device.type != "meta"}
        self._views: dict[int, tuple[int, set[tuple[int, tuple[int, ...], tuple[int, ...]]], int]] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in self._weights:
                cap, seen, total = self._views.get(ptr, (st.nbytes(), set(), 0))
                key = (t.storage_offset(), tuple(t.shape), tuple(t.stride()))
                if key not in seen:
                    seen.add(key)
                    total += t.numel() * t.element_size()
                self._views[ptr] = (cap, seen, total)
        return t

    def hold(self, tensors: Any) -> None:
        """Count ``tensors`` (those that are tensors) as held for the backward too."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._pack(t)

    @property
    def total(self) -> int:
        return sum(min(cap, total) for cap, _, total in self._views.values())

    def __enter__(self) -> "SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def _detach_input(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()):
        return x.detach().requires_grad_(True)
    if isinstance(x, torch.Tensor):
        return x.detach()
    return x


class LocalExecutor:
    """Runs a PipelineProgram's stages in one process, following the schedule's action lists."""

    def __init__(self, program: PipelineProgram, runtimes: list[StageRuntime], schedule: str,
                 num_microbatches: int, loss_fn: Callable[..., torch.Tensor]) -> None:
        self.program = program
        self.runtimes = runtimes
        self.schedule = schedule
        self.m = num_microbatches
        self.d = program.num_stages
        self.loss_fn = loss_fn
        self.batch = 0                       # batches trained so far
        self.broken: str | None = None       # why step() refuses to run (a step failed mid-update)
        self._updated = False                # the running step has stepped some optimizer
        self._mutable: list[torch.Tensor] | None = None   # buffers a step changes; None until a step ran
        self.actions = build_schedule(schedule, self.d, self.m, 1)
        owner = {}
        for rt in runtimes:
            for c in rt.owned:
                owner[c] = rt
        self._owner = owner

    # -- parameters -----------------------------------------------------------
    def _params_for(self, rt: StageRuntime, version: int | None) -> dict[str, torch.Tensor]:
        out = {}
        for name, c in rt.param_names.items():
            w = self._owner[c].weights
            assert w is not None
            out[name] = w.newest()[c] if version is None else w.leaves(version)[c]
        return out

    def _resolve(self, src: Source, mb: int, inputs: list[list[Any]], outputs: dict, params: dict) -> Any:
        if src.kind == "input":
            return inputs[mb][src.index]
        if src.kind == "attr":
            if src.name in params:
                return params[src.name]
            return _get_attr(self.program.root, src.name)
        if src.kind == "stage":
            return outputs[(src.stage, mb)][src.index]
        return src.value

    def _run_stage(self, rt: StageRuntime, args: list[Any], params: dict[str, torch.Tensor],
                   grad: bool) -> tuple[Any, ...]:
        mod = rt.program.module
        attr_params = {s.name: params[s.name] for s in rt.program.sources if s.kind == "attr" and s.name in params}
        mod_params = {k: v for k, v in params.items() if k not in attr_params}

        def fn(*xs: Any) -> tuple[Any, ...]:
            return functional_call(mod, mod_params, xs)

        if not grad:
            out = fn(*args)
            return tuple(out) if isinstance(out, (tuple, list)) else (out,)
        with SavedBytes(params.values()) as saved:
            saved.hold(a for a in args if isinstance(a, torch.Tensor) and a.requires_grad)
            if rt.recompute:
                out = checkpoint(fn, *args, use_reentrant=False)
            else:
                out = fn(*args)
        rt.saved_bytes.append(saved.total)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    # -- forward only ---------------------------------------------------------
    @torch.no_grad()
    def forward(self, inputs: list[list[Any]]) -> list[Any]:
        """Model outputs for each microbatch, with the newest weights."""
        results = []
        for mb in range(len(inputs)):
            outputs: dict = {}
            for rt in self.runtimes:
                params = self._params_for(rt, None)
                args = [self._resolve(s, mb, inputs, outputs, params) for s in rt.program.sources]
                outputs[(rt.program.index, mb)] = self._run_stage(rt, args, params, grad=False)
            leaves = [self._resolve(s, mb, inputs, outputs, {}) for s in self.program.output_sources]
            results.append(pytree.tree_unflatten(leaves, self.program.output_spec))
        return results

    # -- training -------------------------------------------------------------
    def step(self, inputs: list[list[Any]], targets: list[Any]) -> torch.Tensor:
        """Train one batch (len(inputs) == m microbatches); returns the mean loss.

        A step that raises leaves no trace when no weight was updated yet (the usual case: the
        model or ``loss_fn`` raised in a forward or backward): the gradients it accumulated, the
        buffers it changed (BatchNorm statistics) and the random-number state are put back, so
        the next step is the one a run without the failed batch would take.  If some stage had
        already stepped its optimizer, the pipeline refuses further steps instead.

        Raises:
            PipelineStateError: an earlier step failed after updating weights; ``load`` a
                checkpoint or ``load_state_dict`` to continue.
        """
        if self.broken is not None:
            raise PipelineStateError(self.broken)
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        snap = [(b, b.clone()) for b in (self._mutable if self._mutable is not None else self._buffers())]
        self._updated = False
        try:
            loss = self._step(inputs, targets)
        except BaseException as e:
            if self._updated:
                self.broken = (f"an earlier step (batch {self.batch}) raised {type(e).__name__}: {e} after some "
                               "stages had updated their weights, so the weights are neither before nor after "
                               "that batch; restore them with pipe.load(checkpoint_dir) or "
                               "pipe.load_state_dict(...), or compile the model again")
            else:
                self._undo(rng, cuda_rng, snap)
            raise
        if self._mutable is None:        # learnt once: the buffers a step changes (BatchNorm statistics)
            self._mutable = [b for b, old in snap if not torch.equal(b, old)]
        return loss

    def _buffers(self) -> list[torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        for mod in [self.program.root] + [rt.program.module for rt in self.runtimes]:
            for b in mod.buffers():
                seen.setdefault(id(b), b)
        return list(seen.values())

    def _undo(self, rng: torch.Tensor, cuda_rng: Any, snap: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Forget what a failed step did before any update: gradients, buffer changes, random draws."""
        version = version_for_batch(self.schedule, self.batch)
        for rt in self.runtimes:
            if rt.weights is not None:
                rt.weights.forget_grads(version)
            rt.fwd_seconds, rt.bwd_seconds, rt.saved_bytes = [], [], []
        with torch.no_grad():
            for b, old in snap:
                b.copy_(old)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)

    def reset(self, batch: int) -> None:
        """After new weights were loaded: every version restarts from them at ``batch``; a failure is forgiven."""
        self.batch = batch
        self.broken = None

    def _step(self, inputs: list[list[Any]], targets: list[Any]) -> torch.Tensor:
        m, d, batch = self.m, self.d, self.batch
        version = version_for_batch(self.schedule, batch)
        outputs: dict[tuple[int, int], tuple[Any, ...]] = {}
        saved: dict[tuple[int, int], tuple[list[tuple[Source, torch.Tensor]], tuple[Any, ...], Any]] = {}
        out_grads: dict[tuple[int, int], list[Any]] = {}
        backward_done: set[tuple[int, int]] = set()
        losses: list[torch.Tensor | None] = [None] * m
        pos = [0] * d
        done_steps: list[list[Action]] = [[] for _ in range(d)]

        def ready(a: Action) -> bool:
            st = self.runtimes[a.stage].program
            if a.kind == "F":
                return all((s.stage, a.microbatch) in outputs for s in st.sources if s.kind == "stage") and \
                    (a.stage != d - 1 or all((s.stage, a.microbatch) in outputs for s in self.program.output_sources
                                             if s.kind == "stage" and s.stage != a.stage))
            if a.kind == "B":
                return (a.stage, a.microbatch) in saved and all(
                    (c, a.microbatch) in backward_done for c in st.consumers if c < d)
            if a.kind == "U":
                users = [rt.program.index for rt in self.runtimes
                         if any(self._owner[c] is self.runtimes[a.stage] for c in rt.param_names.values())]
                return all((u, mb) in backward_done for u in users for mb in range(m))
            raise ScheduleError(f"unknown action kind {a.kind!r} in {a}")

        def run(a: Action) -> None:
            rt = self.runtimes[a.stage]
            s, mb = a.stage, a.microbatch
            if a.kind == "F":
                t0 = time.perf_counter()
                params = self._params_for(rt, version)
                leaf_inputs: list[tuple[Source, torch.Tensor]] = []
                args = []
                for src in rt.program.sources:
                    v = self._resolve(src, mb, inputs, outputs, params)
                    if src.kind == "stage":
                        v = _detach_input(v)
                        if isinstance(v, torch.Tensor) and v.requires_grad:
                            leaf_inputs.append((src, v))
                    args.append(v)
                outs = self._run_stage(rt, args, params, grad=True)
                outputs[(s, mb)] = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outs)
                loss = None
                if s == d - 1:
                    leaves = []
                    for src in self.program.output_sources:
                        if src.kind == "stage" and src.stage == s:
                            leaves.append(outs[src.index])
                        elif src.kind == "stage":
                            v = _detach_input(outputs[(src.stage, mb)][src.index])
                            if isinstance(v, torch.Tensor) and v.requires_grad:
                                leaf_inputs.append((src, v))
                            leaves.append(v)
                        else:
                            leaves.append(self._resolve(src, mb, inputs, outputs, params))
                    model_out = pytree.tree_unflatten(leaves, self.program.output_spec)
                    loss = check_loss(self.loss_fn(model_out, targets[mb]), mb)
                    losses[mb] = loss.detach()
                saved[(s, mb)] = (leaf_inputs, outs, loss)
                out_grads[(s, mb)] = [None] * len(outs)
                rt.fwd_seconds.append(time.perf_counter() - t0)
            elif a.kind == "B":
                t0 = time.perf_counter()
                leaf_inputs, outs, loss = saved.pop((s, mb))
                tensors, grads = [], []
                if loss is not None:
                    tensors.append(loss / m)
                    grads.append(None)
                for o, g in zip(outs, out_grads.pop((s, mb))):
                    if g is not None and isinstance(o, torch.Tensor) and o.requires_grad:
                        tensors.append(o)
                        grads.append(g)
                if tensors:
                    torch.autograd.backward(tensors, grads)
                for src, leaf in leaf_inputs:
                    if leaf.grad is None:
                        continue
                    slot = out_grads[(src.stage, mb)]
                    slot[src.index] = leaf.grad if slot[src.index] is None else slot[src.index] + leaf.grad
                backward_done.add((s, mb))
                rt.bwd_seconds.append(time.perf_counter() - t0)
                if all((s, i) in backward_done for i in range(m)):
                    for i in range(m):
                        outputs.pop((s, i), None)
            elif a.kind == "U":
                self._updated = True
                rt.weights.update(batch)  # type: ignore[union-attr]

        for rt in self.runtimes:
            rt.fwd_seconds, rt.bwd_seconds, rt.saved_bytes = [], [], []
        total = sum(len(x) for x in self.actions)
        executed = 0
        while executed < total:
            progressed = False
            for r in range(d):
                while pos[r] < len(self.actions[r]):
                    a = self.actions[r][pos[r]]
                    shifted = Action(a.stage, a.kind, a.microbatch)
                    if not ready(shifted):
                        break
                    run(shifted)
                    done_steps[r].append(a)
                    pos[r] += 1
                    executed += 1
                    progressed = True
            if not progressed:
                raise ScheduleError("local executor: no rank can make progress (deadlock); "
                                    f"executed so far:\n{render(done_steps)}\nfull schedule:\n{render(self.actions)}")
        self.batch += 1
        return torch.stack([l for l in losses if l is not None]).mean()


def _get_attr(root: torch.nn.Module, qualname: str) -> Any:
    obj: Any = root
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
