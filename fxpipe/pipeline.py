"""The compiled pipeline a user trains: ``step``, forward, and state dicts keyed by the model's names."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.fx
import torch.utils._pytree as pytree

from fxpipe.errors import ConfigError, InputError, StateDictError
from fxpipe.ir import PipelineProgram, Plan
from fxpipe.passes.split import split
from fxpipe.precision import uses_loss_scaling
from fxpipe.runtime.amp import LossScaler
from fxpipe.runtime.executor import LocalExecutor, StateSnapshot, build_stage_runtimes, module_buffers
from fxpipe.runtime.microbatch import bind_inputs, check_constants, forward_signature, split_inputs, split_targets
from fxpipe.runtime.update import UpdateRule
from fxpipe.trace_fixes import META_FIXED_INPUTS, check_mutations_kept

if TYPE_CHECKING:
    from fxpipe.frontend import CompiledGraph

__all__ = ["Pipeline"]


class Pipeline:
    """Generated stages plus the executor that trains them (see :func:`fxpipe.compile`).

    Attributes:
        plan: the Plan the stages were cut from.
        replan_after: re-plan once from the measurements after this many steps (None: never).
        replanned: the automatic re-plan has happened; ``initial_plan`` is the plan before it.
        steps_done: ``step`` calls so far.
        stages: one ``torch.fx.GraphModule`` per stage.
        program: the routing of values between stages.
    """

    replan_after: int | None = None
    replanned: bool = False
    initial_plan: Plan | None = None
    steps_done: int = 0

    def __init__(self, model: torch.nn.Module, cg: "CompiledGraph", plan: Plan, *,
                 loss_fn: Callable[..., torch.Tensor] | None, optimizer: Callable,
                 executor: str = "local", precision: str = "fp32", max_grad_norm: float | None = None,
                 lr_scheduler: Callable | None = None, devices: list[torch.device] | None = None) -> None:
        self.model = model
        self.precision = precision
        self.max_grad_norm = max_grad_norm
        # what a re-planned Pipeline of this one is built with, too
        self._options = {"precision": precision, "max_grad_norm": max_grad_norm, "lr_scheduler": lr_scheduler,
                         "devices": devices}
        self.scaler: LossScaler | None = LossScaler() if uses_loss_scaling(precision) else None
        rule = UpdateRule(max_grad_norm, self.scaler)
        self.plan = plan
        self.loss_fn = loss_fn
        # one process holds every replica's share: w data-parallel replicas = w*m microbatches
        self.num_microbatches = plan.num_microbatches * (plan.data_parallel if executor != "distributed" else 1)
        self.schedule = plan.schedule
        self._optimizer_factory = optimizer
        self._cg = cg
        check_mutations_kept(cg.gm, plan.stage_of())
        self.program: PipelineProgram = split(cg.gm, plan.stage_of(), plan.num_stages)
        self.stages: list[torch.fx.GraphModule] = [st.module for st in self.program.stages]
        # canonical names: the model's own (first) name of every distinct parameter
        self._params: dict[str, torch.nn.Parameter] = dict(model.named_parameters())
        canonical = {id(p): n for n, p in self._params.items()}
        missing = [n for n, p in cg.gm.named_parameters() if id(p) not in canonical]
        if missing:
            raise ConfigError(f"traced graph holds parameters not found in the model: {missing[:5]}")
        self._example = [x for x in cg.microbatch_inputs]
        if executor == "distributed":
            from fxpipe.runtime.distributed import DistributedExecutor

            self._executor: Any = DistributedExecutor(self.program, canonical, self._params, optimizer,
                                                      plan, loss_fn, precision=precision, rule=rule,
                                                      lr_scheduler=lr_scheduler, example=self._example)
        else:
            runtimes = build_stage_runtimes(self.program, canonical, self._params, optimizer,
                                            plan.schedule, [s.recompute for s in plan.stages], loss_fn=loss_fn,
                                            num_microbatches=self.num_microbatches, devices=devices,
                                            lr_scheduler=lr_scheduler, precision=precision, scaler=self.scaler)
            self._executor = LocalExecutor(self.program, runtimes, plan.schedule, self.num_microbatches, rule=rule)
        self.executor = executor

    # -- inputs ---------------------------------------------------------------
    def _microbatches(self, inputs: Any) -> list[list[Any]]:
        inputs = check_constants(self._cg.gm, inputs)   # use_cache=False again: fixed in the graph
        _check_fixed_inputs(self._cg.gm, self.model, inputs, len(self._cg.input_names))
        return split_inputs(self._cg.gm, self.model, inputs, self.num_microbatches, self._example,
                            self._cg.input_names)

    # -- API ------------------------------------------------------------------
    def step(self, inputs: Any, targets: Any) -> torch.Tensor:
        """Train on one batch of ``num_microbatches`` microbatches; returns the mean loss.

        Raises:
            ConfigError: compiled without ``loss_fn``.
            InputError: inputs or targets do not match the compiled shapes.
        """
        if self.loss_fn is None:
            raise ConfigError("step() needs a loss: compile(..., loss_fn=torch.nn.functional.cross_entropy) "
                              "or any callable (model_output, targets) -> scalar tensor")
        inputs, targets = self._executor.shard(inputs), self._executor.shard(targets)  # this replica's share
        mbs = self._microbatches(inputs)
        batch = self._example[0].shape[0] * self.num_microbatches if self._example else None
        loss = self._executor.step(mbs, split_targets(targets, self.num_microbatches, batch))
        self.steps_done += 1
        if self.replan_after is not None and self.steps_done == self.replan_after and not self.replanned:
            self._adopt(self.replan())          # compile(..., replan_after=N): once, from what was measured
        return loss

    def _adopt(self, new: "Pipeline") -> None:
        """Become ``new`` (a re-planned pipeline), keeping the step count and the plan it started from."""
        first, steps, after = self.initial_plan or self.plan, self.steps_done, self.replan_after
        self.__dict__.update(new.__dict__)
        self.initial_plan, self.steps_done, self.replan_after, self.replanned = first, steps, after, True

    @property
    def last_grad_norm(self) -> float | None:
        """Global L2 norm of the gradients of the last finished update (before clipping; fp16: unscaled;
        inf on overflow), over every parameter of every stage, tied ones once, after the data-parallel
        all-reduce; :attr:`last_grad_norm_batch` says which batch's gradient it is.  Computed when
        ``max_grad_norm`` or fp16 is set, else None.  Under 2bw it is the gradient of W(t-1), the one
        the update used.

        After ``step(t)`` (batches counted from 0) it is batch t's norm locally and under flush/gpipe.
        Under torchrun with 2bw the earlier stages' last backwards and updates of batch t run during
        ``step(t + 1)``, overlapped with batch t + 1's forwards (no flush), and the norm (one
        all-reduce) is agreed where a rank needs it: after ``step(t)`` it is batch t - 1's with fp16
        (the next loss scale depends on it); with clipping alone batch t - 1's on the last stage's
        ranks and batch t - 2's on the others (None before).  A draining call (``state_dict``,
        ``save``, ``evaluate``, ``pipe(x)``) finishes batch t's update; after it, the norm is batch
        t's on every rank.  Batch t's norm at the end of every ``step(t)`` would need that flush.
        """
        return self._executor.last_grad_norm

    @property
    def last_grad_norm_batch(self) -> int | None:
        """The batch whose gradient :attr:`last_grad_norm` is (0-based: the ``step`` calls before it;
        ``load`` restores the count, ``load_state_dict`` restarts it at 0); None before the first."""
        return self._executor.last_grad_norm_batch

    def evaluate(self, inputs: Any, targets: Any) -> torch.Tensor:
        """Mean loss of one batch (over its microbatches, as ``step`` reports it) with the newest weights.

        No gradient, no update and no change to any state: module buffers (BatchNorm statistics)
        and the random-number generators are put back afterwards.  Dropout is active unless the
        model is in eval mode (``model.eval()``), as in PyTorch.  Collective under torchrun.

        Raises:
            ConfigError: compiled without ``loss_fn``.
            InputError: inputs or targets do not match the compiled shapes.
        """
        if self.loss_fn is None:
            raise ConfigError("evaluate() needs a loss: compile(..., loss_fn=...)")
        inputs, targets = self._executor.shard(inputs), self._executor.shard(targets)
        mbs = self._microbatches(inputs)
        batch = self._example[0].shape[0] * self.num_microbatches if self._example else None
        tgt = split_targets(targets, self.num_microbatches, batch)
        snap = StateSnapshot(module_buffers([self.model] + self.stages))
        try:
            return self._executor.evaluate(mbs, tgt)
        finally:
            snap.restore()

    def __call__(self, inputs: Any) -> Any:
        """Forward only, through all stages, with the newest weights; outputs concatenated along dim 0."""
        outs = self._executor.forward(self._microbatches(self._executor.shard(inputs)))
        leaves = [pytree.tree_flatten(o)[0] for o in outs]
        spec = pytree.tree_flatten(outs[0])[1]
        cat = [torch.cat(list(vals), 0) if isinstance(vals[0], torch.Tensor) and vals[0].dim() > 0
               else torch.stack(list(vals)) if isinstance(vals[0], torch.Tensor) else vals[0]
               for vals in zip(*leaves)]
        return pytree.tree_unflatten(cat, spec)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The newest weights and buffers, keyed by the ORIGINAL model's names (a copy)."""
        return self._executor.state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load weights keyed by the original model's names; both 2BW versions become these weights.

        Raises:
            StateDictError: keys missing or unexpected, or a shape/dtype mismatch. Nothing is loaded then.
        """
        if not isinstance(state_dict, dict):
            raise StateDictError(f"state_dict must be a dict of name -> tensor, got {type(state_dict).__name__}")
        own = self.model.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise StateDictError(f"state_dict does not match {type(self.model).__name__}: missing keys "
                                 f"{missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected keys "
                                 f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}; pass a dict from "
                                 "pipe.state_dict() or model.state_dict() of the same architecture")
        for k, v in state_dict.items():
            if not isinstance(v, torch.Tensor) or v.shape != own[k].shape:
                raise StateDictError(f"state_dict[{k!r}] has shape "
                                     f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}, "
                                     f"the model expects {tuple(own[k].shape)}")
        self._executor.load_state_dict(self.model, state_dict)

    def save(self, path: str) -> None:
        """Write a checkpoint directory: both 2BW weight versions, optimizer state, the batch counter.

        Collective under the distributed executor (every rank calls it with the same path).

        Raises:
            StateDictError: the directory cannot be written.
        """
        from fxpipe.runtime import checkpoint

        if self.executor == "distributed":
            checkpoint.save_distributed(self, path)
        else:
            checkpoint.save_local(self, path)

    def load(self, path: str) -> None:
        """Resume from a directory written by :meth:`save` (of either executor); training continues bit-identically.

        Raises:
            StateDictError: missing/damaged directory, or a checkpoint of another model or schedule.
        """
        from fxpipe.runtime import checkpoint

        if self.executor == "distributed":
            checkpoint.load_distributed(self, path)
        else:
            checkpoint.load_local(self, path)

    def to_torch_pipelining(self, group: Any = None) -> Any:
        """This rank's stage as a ``torch.distributed.pipelining.PipelineStage`` (see fxpipe.runtime.interop)."""
        from fxpipe.runtime.interop import to_torch_pipelining

        self._executor.drain()       # finish a 2bw stream so the stages hold the newest weights
        return to_torch_pipelining(self, group=group)

    def report(self) -> str:
        """Predicted against measured per stage (time, saved activations) for the last ``step``.

        Under the distributed executor this is collective (every rank must call it) and adds,
        per rank, its compute, waiting and wall time, so bubbles and slow links show.

        Raises:
            ConfigError: no step has run yet.
        """
        from fxpipe.calibrate import measurements, rank_table, report_table

        if self.executor == "distributed":
            ranks = self._executor.gather_measurements()      # collective, once
            meas = measurements(self, ranks)
            return (report_table(self.plan, meas, where="stage s measured on its replica-0 rank, all stages "
                                 "running at once") + "\n\n" + rank_table(ranks))
        return report_table(self.plan, measurements(self))

    def replan(self, time_limit: float = 10.0) -> "Pipeline":
        """A new Pipeline planned from this one's measurements (calibrated per-stage costs).

        The new pipeline trains the same model object and continues exactly: both 2BW weight
        versions, the optimizer state and the batch counter move over. Collective under the
        distributed executor (rank 0 re-plans and broadcasts; every rank switches).

        Raises:
            ConfigError: no step has run yet.
        """
        from fxpipe.calibrate import replan_pipeline

        return replan_pipeline(self, time_limit=time_limit)

    def __repr__(self) -> str:
        return (f"Pipeline({type(self.model).__name__}, stages={self.plan.num_stages}, "
                f"microbatches={self.num_microbatches}, schedule={self.schedule!r}, executor={self.executor!r})")


def _check_fixed_inputs(gm: torch.fx.GraphModule, model: torch.nn.Module, inputs: Any, num_inputs: int) -> None:
    """Refuse an input that torch.fx fixed to its default when tracing (the graph has no place for it).

    Raises:
        InputError: ``inputs`` gives a forward argument the example inputs left at its default.
    """
    fixed = gm.meta.get(META_FIXED_INPUTS)
    if not fixed:
        return
    args, kwargs = bind_inputs(model, inputs)
    if len(args) + len(kwargs) == num_inputs and not kwargs.keys() & set(fixed):
        return      # the common case, without binding: a fixed input given here would leave a placeholder unfed
    try:
        given = forward_signature(model).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return      # split_inputs names the mismatch
    late = sorted(set(given) & set(fixed))
    if late:
        raise InputError(f"inputs {late} of {type(model).__name__}.forward were not in example_inputs, so the "
                         "graph was traced with their defaults and has no input for them; pass them in "
                         "example_inputs to fxpipe.compile as well")
