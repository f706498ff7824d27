"""The local executor: interprets per-rank action lists for all stages in one process.

Each rank's list is executed in order; ranks take turns, and an action runs as
soon as what it needs is there (a forward needs its inputs, a backward the
gradients of every consumer of its outputs). If no rank can move, the schedule
deadlocks and the rank x step grid is printed in the error.  The computation of
every action is the stage's (:class:`fxpipe.runtime.stage.StageRuntime`); this
module only hands values from producers to consumers.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from fxpipe.errors import PipelineStateError, ScheduleError
from fxpipe.ir import PipelineProgram
from fxpipe.runtime.schedules import Action, build_schedule, weight_version
from fxpipe.runtime.simulate import render
from fxpipe.runtime.stage import SavedBytes, StageRuntime, check_loss, stage_needs, stage_param_names
from fxpipe.runtime.amp import LossScaler
from fxpipe.runtime.update import Decision, UpdateRule
from fxpipe.runtime.weights import WeightVersions

__all__ = ["StageRuntime", "LocalExecutor", "build_stage_runtimes", "stage_param_names", "SavedBytes",
           "check_loss", "StateSnapshot", "module_buffers"]


def build_stage_runtimes(program: PipelineProgram, canonical: dict[int, str],
                         params: dict[str, torch.nn.Parameter], optimizer: Callable | None,
                         schedule: str, recompute: Sequence[bool], *,
                         loss_fn: Callable[..., torch.Tensor] | None = None, num_microbatches: int = 1,
                         devices: Sequence[torch.device | None] | None = None, lr_scheduler: Callable | None = None,
                         precision: str = "fp32", scaler: LossScaler | None = None) -> list[StageRuntime]:
    """One StageRuntime per stage; the lowest stage using a parameter owns it (versions and optimizer).

    Args:
        program: the split pipeline.
        canonical: id(parameter) -> canonical name (tied parameters share one).
        params: canonical name -> parameter.
        optimizer: optimizer factory; one optimizer per stage over the parameters it owns.
        schedule: "2bw" | "flush" | "gpipe".
        recompute: per stage, whether to recompute activations in backward.
        loss_fn: the loss, run by the last stage.
        num_microbatches: microbatches per batch (the loss is their mean).
        devices: per stage, where it computes (None: where its parameters are); a stage's
            parameters and buffers move there (a tied parameter to its owner's device).
        lr_scheduler: LR scheduler factory, one per optimizer.
        precision: "fp32" | "bf16" | "fp16" (autocast of every stage's forward and the loss).
        scaler: fp16's loss scaler (shared by all stages).
    """
    names = [stage_param_names(program, st, canonical) for st in program.stages]
    owner: dict[str, int] = {}
    for st in program.stages:
        for c in names[st.index].values():
            owner.setdefault(c, st.index)
    owned: list[list[str]] = [[] for _ in program.stages]
    for c, s in owner.items():
        owned[s].append(c)
    if devices is not None:
        _place(program, params, owner, devices)
    weights = [WeightVersions({c: params[c] for c in own}, optimizer, schedule, lr_scheduler) for own in owned]
    weights_of = {c: weights[s] for c, s in owner.items()}
    needs = stage_needs(program)
    runtimes = []
    for st in program.stages:
        rt = StageRuntime(program, st.index, needs, names[st.index], weights_of,
                          recompute=bool(recompute[st.index]), loss_fn=loss_fn, num_microbatches=num_microbatches,
                          device=devices[st.index] if devices is not None else None, precision=precision,
                          scaler=scaler)
        rt.weights, rt.owned = weights[st.index], owned[st.index]
        runtimes.append(rt)
    return runtimes


def _place(program: PipelineProgram, params: dict[str, torch.nn.Parameter], owner: dict[str, int],
           devices: Sequence[torch.device | None]) -> None:
    """Stage s's module (parameters, buffers) onto ``devices[s]``; each parameter onto its owner's device."""
    for st in reversed(program.stages):          # the lowest stage reading a tied parameter wins
        if devices[st.index] is not None:
            st.module.to(devices[st.index])
    with torch.no_grad():
        for c, s in owner.items():
            if devices[s] is not None and params[c].device != torch.device(devices[s]):
                params[c].data = params[c].data.to(devices[s])


def module_buffers(modules: Sequence[torch.nn.Module]) -> list[torch.Tensor]:
    """Every distinct buffer of ``modules`` (a stage shares its buffers with the model), in order."""
    seen: dict[int, torch.Tensor] = {}
    for mod in modules:
        for b in mod.buffers():
            seen.setdefault(id(b), b)
    return list(seen.values())


class StateSnapshot:
    """Buffers and random-number state taken before work that must leave no trace; ``restore`` puts them back."""

    def __init__(self, buffers: Sequence[torch.Tensor]) -> None:
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.buffers = [(b, b.clone()) for b in buffers]

    def changed(self) -> list[torch.Tensor]:
        """The buffers whose values differ from the snapshot (what the work wrote)."""
        return [b for b, old in self.buffers if not torch.equal(b, old)]

    def restore(self) -> None:
        with torch.no_grad():
            for b, old in self.buffers:
                b.copy_(old)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


class LocalExecutor:
    """Runs a PipelineProgram's stages in one process, following the schedule's action lists."""

    def __init__(self, program: PipelineProgram, runtimes: list[StageRuntime], schedule: str,
                 num_microbatches: int, rule: UpdateRule | None = None) -> None:
        self.program = program
        self.runtimes = runtimes
        self.schedule = schedule
        self.m = num_microbatches
        self.rule = rule or UpdateRule()
        self.last_grad_norm: float | None = None   # global gradient norm of the last update (clipping / fp16)
        self.last_grad_norm_batch: int | None = None   # the batch whose gradient that norm is
        self._decision: tuple[Decision, list[dict[str, Any]]] | None = None
        self.d = program.num_stages
        self.batch = 0                       # batches trained so far
        self.broken: str | None = None       # why step() refuses to run (a step failed mid-update)
        self._updated = False                # the running step has stepped some optimizer
        self._mutable: list[torch.Tensor] | None = None   # buffers a step changes; None until a step ran
        self.actions = build_schedule(schedule, self.d, self.m, 1)
        owner = {c: rt for rt in runtimes for c in rt.owned}
        # per stage: the stages whose backward must be done before its update (they read its parameters)
        self._users = [[u.index for u in runtimes if any(owner[c] is rt for c in u.param_names.values())]
                       for rt in runtimes]

    # -- what the pipeline asks of every executor --------------------------------
    def shard(self, tree: Any) -> Any:
        """This process's share of a batch: all of it (one process holds every replica)."""
        return tree

    def drain(self) -> None:
        """Nothing is ever left in flight between steps here."""

    def weight_versions(self) -> list[WeightVersions]:
        """Per stage, the versions (and optimizer) it owns."""
        return [rt.weights for rt in self.runtimes]  # type: ignore[misc]

    # -- forward only ---------------------------------------------------------
    @torch.no_grad()
    def forward(self, inputs: list[list[Any]]) -> list[Any]:
        """Model outputs for each microbatch, with the newest weights."""
        results = []
        for mb in range(len(inputs)):
            outputs: dict[int, tuple[Any, ...]] = {}
            model_out = None
            for rt in self.runtimes:
                received = {(p, k): outputs[p][k] for p, k in rt.needs}
                outputs[rt.index], model_out = rt.forward_only(inputs[mb], received)
            results.append(model_out)
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
        snap = StateSnapshot(self._mutable if self._mutable is not None else
                             module_buffers([self.program.root] + [rt.program.module for rt in self.runtimes]))
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
                self._undo(snap)
            for rt in self.runtimes:
                rt.discard()
            raise
        if self._mutable is None:        # learnt once: the buffers a step changes (BatchNorm statistics)
            self._mutable = snap.changed()
        return loss

    def _undo(self, snap: "StateSnapshot") -> None:
        """Forget what a failed step did before any update: gradients, buffer changes, random draws."""
        version = weight_version(self.schedule, Action(0, "F", self.batch * self.m), self.m)
        for rt in self.runtimes:
            if rt.weights is not None:
                rt.weights.forget_grads(version)
            rt.reset_measurements()
        snap.restore()

    def reset(self, batch: int) -> None:
        """After new weights were loaded: every version restarts from them at ``batch``; a failure is forgiven."""
        self.batch = batch
        self.broken = None

    def _step(self, inputs: list[list[Any]], targets: list[Any]) -> torch.Tensor:
        m, d, batch = self.m, self.d, self.batch
        outputs: dict[tuple[int, int], tuple[Any, ...]] = {}          # (stage, mb) -> detached outputs
        out_grads: dict[tuple[int, int], dict[int, torch.Tensor]] = {}  # (stage, mb) -> k -> summed grad
        backward_done: set[tuple[int, int]] = set()
        losses: list[torch.Tensor | None] = [None] * m
        pos = [0] * d
        done_steps: list[list[Action]] = [[] for _ in range(d)]

        def ready(a: Action) -> bool:
            rt = self.runtimes[a.stage]
            if a.kind == "F":
                return all((p, a.microbatch) in outputs for p in rt.producers)
            if a.kind == "B":
                return a.microbatch in rt.saved and all((c, a.microbatch) in backward_done for c in rt.consumers)
            if a.kind == "U":
                users = range(d) if self.rule.is_global else self._users[a.stage]   # global: the norm of all
                return all((u, i) in backward_done for u in users for i in range(m))
            raise ScheduleError(f"unknown action kind {a.kind!r} in {a}")

        def run(a: Action) -> None:
            rt = self.runtimes[a.stage]
            s, mb = a.stage, a.microbatch
            if a.kind == "F":
                version = weight_version(self.schedule, Action(s, "F", batch * m + mb), m)
                received = {(p, k): outputs[(p, mb)][k] for p, k in rt.needs}
                outs, loss = rt.forward(mb, inputs[mb], received, version, targets[mb] if rt.is_last else None)
                outputs[(s, mb)] = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outs)
                if loss is not None:
                    losses[mb] = loss
            elif a.kind == "B":
                for (p, k), g in rt.backward(mb, out_grads.pop((s, mb), {})).items():
                    if g is not None:
                        slot = out_grads.setdefault((p, mb), {})
                        slot[k] = g if k not in slot else slot[k] + g
                backward_done.add((s, mb))
                if all((s, i) in backward_done for i in range(m)):
                    for i in range(m):
                        outputs.pop((s, i), None)
            elif a.kind == "U":
                self._updated = True
                if not self.rule.is_global:
                    rt.weights.update(batch)  # type: ignore[union-attr]
                    return
                if self._decision is None:     # the first update of the batch decides for every stage
                    grads = [self.rule.unscale(w.take_grads(batch)) for w in self.weight_versions()]
                    stats = [self.rule.stats(g.values()) for g in grads]
                    dec = self.rule.decide(sum(x for x, _ in stats), max(b for _, b in stats))
                    self.last_grad_norm, self.last_grad_norm_batch = dec.norm, batch
                    self._decision = (dec, [self.rule.apply(g, dec) for g in grads])
                dec, grads = self._decision
                rt.weights.update(batch, grads=grads[s], skip=dec.skip)  # type: ignore[union-attr]

        for rt in self.runtimes:
            rt.reset_measurements()
        self._decision = None
        total = sum(len(x) for x in self.actions)
        executed = 0
        while executed < total:
            progressed = False
            for r in range(d):
                while pos[r] < len(self.actions[r]):
                    a = self.actions[r][pos[r]]
                    if not ready(a):
                        break
                    run(a)
                    done_steps[r].append(a)
                    pos[r] += 1
                    executed += 1
                    progressed = True
            if not progressed:
                raise ScheduleError("local executor: no rank can make progress (deadlock); "
                                    f"executed so far:\n{render(done_steps)}\nfull schedule:\n{render(self.actions)}")
        self.batch += 1
        self._decision = None
        return torch.stack([l for l in losses if l is not None]).mean()

    @torch.no_grad()
    def evaluate(self, inputs: list[list[Any]], targets: list[Any]) -> torch.Tensor:
        """Mean loss over the microbatches with the newest weights (no graph, no update)."""
        last = self.runtimes[-1]
        losses = [last.eval_loss(out, tgt) for out, tgt in zip(self.forward(inputs), targets)]
        return torch.stack([x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in losses]).mean()

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The newest weights and buffers of ``model`` (a copy): the model's parameters are the newest version."""
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def load_state_dict(self, model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
        """Copy ``sd`` into ``model``; every stage's versions restart from these weights."""
        with torch.no_grad():
            for k, t in model.state_dict().items():
                t.copy_(sd[k].to(t.dtype))
        for w in self.weight_versions():
            w.reset()
        self.reset(0)

