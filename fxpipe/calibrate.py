"""Calibration: predicted against measured per-stage time and activation memory, and re-planning from it.

The executor records, for every stage and microbatch of the last batch, the
seconds spent in forward and backward and the bytes autograd saved. Here those
are reduced to medians, set beside the plan's predictions, and turned into a
calibrated cost model: every node's time is scaled by its stage's
measured/predicted ratio, so a re-plan moves work away from stages that ran
slower than predicted::

    stage  predicted  measured  ratio        node cost on re-plan
    0      2.0 ms     3.0 ms    1.50   -->   fwd/bwd x 1.50 for stage-0 nodes
    1      2.0 ms     1.6 ms    0.80   -->   fwd/bwd x 0.80 for stage-1 nodes
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.fx

from fxpipe.errors import ConfigError
from fxpipe.ir import META_COST, CostModel, NodeCost, Plan
from fxpipe.units import fmt_bytes, fmt_time

if TYPE_CHECKING:
    from fxpipe.pipeline import Pipeline

__all__ = ["calibration_cost_model", "StageMeasurement", "measurements", "report_table", "rank_table", "CalibratedCostModel", "calibrated_cost_model"]


@dataclass(frozen=True)
class StageMeasurement:
    """Medians over the microbatches of the last trained batch."""

    index: int
    fwd_time: float          # seconds per microbatch
    bwd_time: float          # seconds per microbatch
    saved_bytes: int         # bytes autograd saved per microbatch (parameters excluded)


def calibration_cost_model(name: str, reprofile: bool = False) -> "str | CostModel":
    """The ``cost_model`` of ``fxpipe calibrate``: ``reprofile`` measures every op again.

    ``--reprofile`` implies the profiled model and overwrites the cached prices
    (``ProfiledCostModel(cache="refresh")``), so a price measured while the machine was
    busy does not stay in the cache for ever.
    """
    if reprofile:
        from fxpipe.cost_models.profiled import ProfiledCostModel

        return ProfiledCostModel(cache="refresh")
    return name


def measurements(pipe: "Pipeline", ranks: list[dict] | None = None) -> list[StageMeasurement]:
    """Per-stage measurements of the last ``pipe.step``.

    Under the distributed executor this is collective (or reads ``ranks``, what
    ``gather_measurements`` returned): stage s as measured on its replica-0 rank.

    Raises:
        ConfigError: nothing has been measured yet (call ``pipe.step`` first).
    """
    gather = getattr(pipe._executor, "gather_measurements", None)
    if gather is not None:
        ranks = gather() if ranks is None else ranks
        if any(not r["fwd"] for r in ranks):
            raise ConfigError("no measurements yet: call pipe.step(inputs, targets) at least once on every "
                              "rank before pipe.report()")
        first = {}
        for r in ranks:
            first.setdefault(r["stage"], r)
        return [StageMeasurement(index=s, fwd_time=first[s]["fwd"], bwd_time=first[s]["bwd"],
                                 saved_bytes=first[s]["saved"]) for s in sorted(first)]
    runtimes = getattr(pipe._executor, "runtimes", None)
    if not runtimes or not runtimes[0].fwd_seconds:
        raise ConfigError("no measurements yet: call pipe.step(inputs, targets) at least once "
                          "before pipe.report() or pipe.replan()")
    out = []
    for rt in runtimes:
        out.append(StageMeasurement(index=rt.program.index,
                                    fwd_time=statistics.median(rt.fwd_seconds),
                                    bwd_time=statistics.median(rt.bwd_seconds) if rt.bwd_seconds else 0.0,
                                    saved_bytes=int(statistics.median(rt.saved_bytes)) if rt.saved_bytes else 0))
    return out


def _err(pred: float, meas: float) -> str:
    if pred <= 0:
        return "-"
    return f"{(meas - pred) / pred * 100:+.0f}%"


def report_table(plan: Plan, meas: list[StageMeasurement],
                 where: str = "measured in this process; stages ran one after another") -> str:
    """Predicted vs measured per stage: forward, backward, their sum, and saved activations."""
    head = ["stage", "fwd pred", "fwd meas", "bwd pred", "bwd meas", "F+B err", "act pred", "act meas", "act err"]
    rows = []
    for s, m in zip(plan.stages, meas):
        pred_fb, meas_fb = s.fwd_time + s.bwd_time, m.fwd_time + m.bwd_time
        act_pred = s.activation_bytes + s.received_bytes if not s.recompute else s.input_bytes
        rows.append([str(s.index), fmt_time(s.fwd_time), fmt_time(m.fwd_time), fmt_time(s.bwd_time),
                     fmt_time(m.bwd_time), _err(pred_fb, meas_fb), fmt_bytes(act_pred), fmt_bytes(m.saved_bytes),
                     _err(act_pred, m.saved_bytes)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    pred_b = max(s.fwd_time + s.bwd_time for s in plan.stages)
    meas_b = max(m.fwd_time + m.bwd_time for m in meas)
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    lines.append("")
    lines.append(f"bottleneck compute: predicted {fmt_time(pred_b)}, measured {fmt_time(meas_b)} per microbatch "
                 f"({where})")
    return "\n".join(lines)


def rank_table(ranks: list[dict]) -> str:
    """Per rank of a distributed run: compute, waiting and wall time of its last step (gather_measurements)."""
    lines = [f"{'rank':>4}  {'stage':>5}  {'replica':>7}  {'compute':>9}  {'waiting':>9}  {'step wall':>9}  busy",
             "-" * 62]
    for r in ranks:
        # under 2bw a rank's last m microbatches can straddle two steps, so compute may exceed one step's wall
        busy = f"{min(r['compute'] / r['wall'], 1.0) * 100:.0f}%" if r["wall"] > 0 else "-"
        lines.append(f"{r['rank']:>4}  {r['stage']:>5}  {r['replica']:>7}  {fmt_time(r['compute']):>9}  "
                     f"{fmt_time(r['wait']):>9}  {fmt_time(r['wall']):>9}  {busy}")
    lines.append("compute = forward+backward of the rank's last m microbatches; waiting = blocked on receives "
                 "and all-reduces in the last step")
    return "\n".join(lines)


class CalibratedCostModel:
    """A cost model whose node times are scaled by the measured/predicted ratio of their stage."""

    def __init__(self, base: CostModel, factors: dict[str, tuple[float, float, float]]) -> None:
        self.base = base
        self.factors = factors     # node name -> (fwd factor, bwd factor, activation factor)

    def node_cost(self, node: torch.fx.Node) -> NodeCost:
        c = node.meta.get(META_COST) or self.base.node_cost(node)
        f = self.factors.get(node.name)
        if f is None:
            return c
        return dataclasses.replace(c, fwd_time=c.fwd_time * f[0], bwd_time=c.bwd_time * f[1],
                                   activation_bytes=int(c.activation_bytes * f[2]))

    def comm_time(self, nbytes: int) -> float:
        return self.base.comm_time(nbytes)


def calibrated_cost_model(plan: Plan, meas: list[StageMeasurement], base: CostModel) -> CalibratedCostModel:
    """Scale factors per node from per-stage measurements (1.0 where nothing was predicted)."""
    factors: dict[str, tuple[float, float, float]] = {}

    def ratio(pred: float, got: float) -> float:
        return got / pred if pred > 0 and got > 0 else 1.0

    for s, m in zip(plan.stages, meas):
        act_pred = s.activation_bytes + s.received_bytes if not s.recompute else 0
        f = (ratio(s.fwd_time, m.fwd_time), ratio(s.bwd_time, m.bwd_time), ratio(act_pred, m.saved_bytes))
        for n in s.nodes:
            factors[n] = f
    return CalibratedCostModel(base, factors)



def replan_pipeline(pipe: "Pipeline", time_limit: float = 10.0) -> "Pipeline":
    """A new Pipeline cut from ``pipe``'s measurements, continuing its training exactly.

    Both 2BW weight versions, the optimizer state and the batch counter move over (keyed by
    canonical parameter names, as in a checkpoint), so the next step computes what it would
    have computed without the re-plan. Under the distributed executor this is collective:
    the measurements are gathered, rank 0 re-plans and broadcasts the plan, every rank
    builds its new stage and takes its weights from the replica-0 rank that held them.

    Raises:
        ConfigError: no step has run yet.
    """
    from fxpipe.passes.annotate import annotate
    from fxpipe.passes.partition import partition
    from fxpipe.runtime.checkpoint_state import load_stage_state, stage_state

    distributed = pipe.executor == "distributed"
    ex = pipe._executor
    if distributed:
        ex.drain()          # finish a running 2bw stream: the versions are then those a checkpoint holds
    meas = measurements(pipe)           # collective under the distributed executor
    p = pipe.plan

    def solve() -> Plan:
        cm = calibrated_cost_model(p, meas, pipe._cg.cost_model)
        annotate(pipe._cg.gm, cm)
        new_plan = partition(pipe._cg.gm, cm, num_stages=p.num_stages, num_microbatches=p.num_microbatches,
                             schedule=p.schedule, memory_limit=p.memory_limit, optimizer_slots=p.optimizer_slots,
                             time_limit=time_limit)
        # the same d x w ranks stay where they are: the new plan keeps the old one's rank order
        kept = {k: p.extra[k] for k in ("placement",) if k in p.extra}
        return dataclasses.replace(new_plan, data_parallel=p.data_parallel,
                                   extra={**new_plan.extra, **kept, "replanned_from": p.solver})

    if distributed:
        import torch.distributed as dist

        from fxpipe.runtime.agree import check_same_plan, plan_on_rank0

        new_plan, _ = plan_on_rank0(lambda given: (solve() if given is None else given, pipe._cg))
        mine = stage_state(ex.weights) if ex.replica == 0 else None
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, (ex.stage, mine))
        by_stage = {s: st for s, st in every if st is not None}
        batch = ex.batch
    else:
        new_plan = solve()
        by_stage = {rt.program.index: stage_state(rt.weights) for rt in ex.runtimes if rt.weights is not None}
        batch = ex.batch
    # a pipeline of pipe's own class: this module is imported by pipeline.py and must not import it back
    new = type(pipe)(pipe.model, pipe._cg, new_plan, loss_fn=pipe.loss_fn, optimizer=pipe._optimizer_factory,
                     **getattr(pipe, "_options", {}),
                     executor=pipe.executor)
    if distributed:
        check_same_plan(new.plan)

    def states_for(stage: int) -> list:
        order = [stage] + sorted(s for s in by_stage if s != stage)
        return [by_stage[s] for s in order if s in by_stage]

    nex = new._executor
    if distributed:
        load_stage_state(nex.weights, states_for(nex.stage), "the re-plan")
        nex.reset(batch)
    else:
        for rt in nex.runtimes:
            if rt.weights is not None:
                load_stage_state(rt.weights, states_for(rt.program.index), "the re-plan")
        nex.reset(batch)
    return new
