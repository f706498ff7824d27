"""IR shared by every pass: node costs, the CostModel protocol, and the Plan.

Passes talk to each other only through these types and through namespaced
``node.meta`` keys (see ``META_*`` below).

Worked example of a Plan for a 4-node chain cut into 2 stages::

    x ─▶ fc1 ─▶ relu ─▶ fc2 ─▶ loss
         └─ stage 0 ─┘   └ stage 1 ┘     cut edge: (relu, fc2)

    Plan(stages=(StagePlan(index=0, nodes=("fc1", "relu"), ...),
                 StagePlan(index=1, nodes=("fc2",), ...)),
         bottleneck=max(T_0, T_1), lower_bound=max(sum T / 2, max node), ...)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch.fx
import torch.nn
import torch.utils._pytree as pytree

from fxpipe.units import fmt_bytes, fmt_time

__all__ = [
    "META_COST",
    "META_PARAMS",
    "META_LOCAL",
    "META_PARAM_BYTES",
    "META_LOSS",
    "META_VAL",
    "NodeCost",
    "CostModel",
    "StagePlan",
    "SolveInfo",
    "LossCost",
    "PlanNotes",
    "Plan",
    "SCHEDULES",
    "min_microbatches",
    "Source",
    "StageProgram",
    "PipelineProgram",
]

# node.meta keys written by the passes.
META_VAL = "val"                     # FakeTensor (or pytree of them): shape_prop, as torch does
META_COST = "fxpipe.cost"            # NodeCost: annotate
META_PARAMS = "fxpipe.params"        # tuple[str, ...] canonical parameter names the node reads
META_LOCAL = "fxpipe.local"          # bool: every stage computes this value itself, none sends it (local_values)
# GraphModule.meta key: LossCost of loss_fn(output, targets), priced on the last stage (example_targets=).
META_LOSS = "fxpipe.loss"
# GraphModule.meta key: dict canonical parameter name -> bytes (tied parameters appear once).
META_PARAM_BYTES = "fxpipe.param_bytes"

SCHEDULES: tuple[str, ...] = ("2bw", "flush", "gpipe")
"""The schedule names, defined here once: PipeDream-2BW, PipeDream-Flush (1F1B), GPipe. Which weight
version each runs a batch with is :func:`fxpipe.runtime.actions.weight_version`."""


def min_microbatches(schedule: str, num_stages: int) -> int:
    """The fewest microbatches per batch ``schedule`` runs with on ``num_stages`` stages.

    2bw needs m >= d (with fewer, more than two weight versions would be live at once); flush and
    gpipe run any m >= 1. ``min_microbatches("2bw", 4) == 4``, ``min_microbatches("flush", 4) == 1``.
    """
    return num_stages if schedule == "2bw" else 1


@dataclass(frozen=True)
class NodeCost:
    """Cost of one graph node for one microbatch.

    Times are seconds, sizes bytes. ``param_bytes`` counts a tied parameter
    once for the whole graph (at its first user); the planner uses
    ``node.meta["fxpipe.params"]`` when a tied parameter spans stages.
    """

    fwd_time: float = 0.0            # forward seconds per microbatch
    bwd_time: float = 0.0            # backward seconds per microbatch
    param_bytes: int = 0             # parameters first read by this node
    activation_bytes: int = 0        # bytes autograd saves for backward (not parameters)
    output_bytes: int = 0            # bytes of the node's output tensors
    fwd_flops: float = 0.0           # forward floating-point operations
    bwd_flops: float = 0.0           # backward floating-point operations
    bytes_read: float = 0.0          # forward bytes read (inputs + parameters)
    bytes_written: float = 0.0       # forward bytes written (outputs)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or v != v or v < 0 or v == float("inf"):
                from fxpipe.errors import CostModelError

                raise CostModelError(
                    f"NodeCost.{f.name} must be a finite number >= 0, got {v!r}; "
                    "fix the cost model that produced it"
                )


@runtime_checkable
class CostModel(Protocol):
    """Anything that prices graph nodes and inter-stage transfers."""

    def node_cost(self, node: torch.fx.Node) -> NodeCost:
        """Cost of ``node`` for one microbatch (shapes are in ``node.meta["val"]``)."""
        ...

    def comm_time(self, nbytes: int) -> float:
        """Seconds to move ``nbytes`` between two adjacent pipeline stages."""
        ...


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage of a Plan (all figures per microbatch unless noted)."""

    index: int
    nodes: tuple[str, ...]           # fx node names, in graph order
    recompute: bool = False          # r_s: recompute activations in backward
    time: float = 0.0                # T_s = F_s + B_s + r_s*F_s + C_s  (seconds)
    fwd_time: float = 0.0            # F_s
    bwd_time: float = 0.0            # B_s
    comm_time: float = 0.0           # C_s: receive inputs + send their gradients back
    memory: int = 0                  # M_s predicted peak bytes on the device
    param_bytes: int = 0             # P_s (tied parameters used here counted here)
    activation_bytes: int = 0        # A_s saved for backward, one microbatch
    input_bytes: int = 0             # I_s bytes entering the stage, one microbatch
    in_flight: int = 1               # n_s microbatches whose activations are stashed
    received_bytes: int = 0          # X_s: the part of I_s received from earlier stages
    # X_s by producer: ((p, bytes from stage p), ...), p ascending, summing to X_s; () in plans written
    # before it existed (then all of X_s is read as coming from stage s - 1)
    received_from: tuple[tuple[int, int], ...] = ()
    # the part of received_from whose gradient goes back to p (floating values; a bool or integer one has
    # none): ((p, bytes), ...) over the same producers; None (plans written before it): all of it
    received_grad_from: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True)
class SolveInfo:
    """How the CP-SAT planner reached its plan (``Plan.solve_info``); figures are seconds."""

    status: str = ""                 # CP-SAT's status of the last solve ("OPTIMAL", "FEASIBLE", ...)
    solver_bound: float = 0.0        # CP-SAT's bound on the problem it last solved
    solver_gap: float = 0.0          # (objective - bound) / objective of that solve
    blocks: int = 0                  # blocks of the last solve
    nodes: int = 0                   # compute nodes of the graph
    coarsened: bool = False          # the last solve was on blocks, not single nodes
    dp_bottleneck: float | None = None   # the exact DP over the graph order (None: graph too large)
    wall_time: float = 0.0           # seconds of the last solve
    deterministic_time: float = 0.0  # CP-SAT deterministic time of the last solve
    source: str = ""                 # which candidate won: "cp-sat" | "dp" | "dp-blocks"
    chain: bool = False              # the graph is a chain (the DP is then exact)
    first_blocks: int = 0            # blocks of the first solve
    refinements: int = 0             # re-coarsenings around the incumbent
    fine_proof: bool = False         # the uncoarsened model was solved for a proof
    imbalance: float | None = None   # the balance tie-break's measure of the plan kept (seconds)


@dataclass(frozen=True)
class LossCost:
    """What ``loss_fn(output, targets)`` adds to the last stage (one microbatch)."""

    fwd_time: float = 0.0            # seconds
    bwd_time: float = 0.0            # seconds
    activation_bytes: int = 0        # bytes autograd saves for the loss's backward
    fwd_flops: float = 0.0
    nodes: int = 0                   # operations in the traced loss


_SOLVE_KEYS = frozenset(f.name for f in dataclasses.fields(SolveInfo))
_LEGACY_KEYS = _SOLVE_KEYS | {"over_memory", "over_memory_stages"}


class PlanNotes(dict):  # type: ignore[type-arg]
    """``Plan.extra``: free-form notes of other passes (e.g. the depth search's table).

    The planner's own figures are typed fields of the Plan (``solve_info``,
    ``over_memory_stages``); they still read here under their old keys
    (``plan.extra["status"]``, ``plan.extra.get("over_memory")``).
    """

    def __init__(self, data: Any = (), plan: "Plan | None" = None) -> None:
        super().__init__(data)
        self._plan = plan

    def _typed(self, key: str) -> Any:
        p = self._plan
        if p is not None:
            if key == "over_memory":
                return bool(p.over_memory_stages)
            if key == "over_memory_stages":
                return list(p.over_memory_stages)
            if key in _SOLVE_KEYS and p.solve_info is not None:
                return getattr(p.solve_info, key)
        raise KeyError(key)

    def __missing__(self, key: str) -> Any:
        return self._typed(key)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        try:
            return self._typed(key)
        except KeyError:
            return default


@dataclass(frozen=True)
class Plan:
    """The planner's answer: which node runs on which stage, and what it costs."""

    stages: tuple[StagePlan, ...]
    num_microbatches: int
    schedule: str
    bottleneck: float                # max_s T_s (seconds per microbatch)
    lower_bound: float               # proven lower bound on any plan's bottleneck
    optimal: bool                    # the solver proved bottleneck optimal
    solver: str = "cp-sat"           # "cp-sat" | "dp" | "uniform" | "parameters" | "time" | ...
    solve_time: float = 0.0          # seconds spent planning
    memory_limit: int | None = None  # bytes per device, or None
    optimizer_slots: int = 0         # k: optimizer state tensors per parameter
    cut_edges: tuple[tuple[str, str], ...] = ()   # (producer, consumer) node names across stages
    data_parallel: int = 1           # w: replicas of every stage
    microbatch_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    solve_info: SolveInfo | None = field(default=None, compare=False)   # how CP-SAT got here
    over_memory_stages: tuple[int, ...] = ()   # stages over memory_limit (baselines report, not raise)
    loss: LossCost | None = None     # loss_fn's share of the last stage (example_targets=)

    def __post_init__(self) -> None:
        # Old callers and old JSON put the planner's figures in ``extra``: move them to the typed fields.
        raw = dict(self.extra or {})
        if self.solve_info is None and _SOLVE_KEYS & raw.keys():
            object.__setattr__(self, "solve_info", SolveInfo(**{k: raw[k] for k in _SOLVE_KEYS & raw.keys()}))
        if not self.over_memory_stages and raw.get("over_memory_stages"):
            object.__setattr__(self, "over_memory_stages", tuple(int(s) for s in raw["over_memory_stages"]))
        elif not isinstance(self.over_memory_stages, tuple):
            object.__setattr__(self, "over_memory_stages", tuple(self.over_memory_stages))
        notes = {k: v for k, v in raw.items() if k not in _LEGACY_KEYS}
        object.__setattr__(self, "extra", PlanNotes(notes, self))

    @property
    def over_memory(self) -> bool:
        """True when some stage exceeds ``memory_limit`` (only baselines return such plans)."""
        return bool(self.over_memory_stages)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def gap(self) -> float:
        """Relative gap between the plan and the lower bound (0.0 = proven optimal)."""
        if self.bottleneck <= 0:
            return 0.0
        return max(0.0, (self.bottleneck - self.lower_bound) / self.bottleneck)

    def stage_of(self) -> dict[str, int]:
        """Map from node name to stage index."""
        return {n: s.index for s in self.stages for n in s.nodes}

    def transfers(self) -> dict[tuple[int, int], int]:
        """``{(p, c): bytes}``: what stage p sends stage c per microbatch (forward; the gradient of its floating
        part goes back, :meth:`gradient_transfers`).

        From each stage's ``received_from``. A plan none of whose stages has one (written before it
        existed, or built by hand) sends X_{k+1} over every boundary k -> k+1, as fxpipe priced it then.
        e.g. a skip 0 -> 2 of 10 B beside 30 B over 1 -> 2: ``{(0, 1): 40, (0, 2): 10, (1, 2): 30}``.
        """
        if not any(st.received_from for st in self.stages):
            return {(k - 1, k): int(st.received_bytes) for k, st in enumerate(self.stages) if k > 0}
        return {(int(p), st.index): int(b) for st in self.stages for p, b in st.received_from}

    def gradient_transfers(self) -> dict[tuple[int, int], int]:
        """``{(p, c): bytes}`` over the pairs of :meth:`transfers`: the part of what p sends c whose gradient
        c sends back (floating values; a bool or integer value crosses once), from ``received_grad_from``;
        all of it where a stage has none (a plan written before it). e.g. 64 B of float and 8 B of int64
        token ids sent 0 -> 1: ``transfers() == {(0, 1): 72}``, ``gradient_transfers() == {(0, 1): 64}``.
        """
        out = self.transfers()
        for st in self.stages:
            for p, b in (st.received_grad_from or ()) if st.received_from else ():
                if (p, st.index) in out:
                    out[int(p), st.index] = int(b)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stages"] = [dataclasses.asdict(s) for s in self.stages]
        d["cut_edges"] = [list(e) for e in self.cut_edges]
        d["extra"] = dict(self.extra)
        d["over_memory_stages"] = list(self.over_memory_stages)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=_json_default)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        """The Plan of :meth:`to_dict`'s output.

        Raises:
            PlanFormatError: not a dict, a required field missing, an unknown field, or a malformed stage.
        """
        from fxpipe.errors import PlanFormatError
        from fxpipe.plan_format import received_from, received_grad_from

        how = "pass the output of Plan.to_json() / `fxpipe dump ... --format json` unchanged"
        if not isinstance(d, dict):
            raise PlanFormatError(f"a Plan is a JSON object, got {type(d).__name__}; {how}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = [n for n, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in d]
        unknown = sorted(set(d) - set(fields))
        if missing or unknown:
            raise PlanFormatError(f"not a Plan: missing fields {missing}, unknown fields {unknown} (a Plan has "
                                  f"{sorted(fields)}); {how}")
        if not isinstance(d["stages"], (list, tuple)) or not d["stages"]:
            raise PlanFormatError(f"Plan 'stages' must be a non-empty list of stages, got {d['stages']!r:.80}; {how}")
        stage_fields = {f.name for f in dataclasses.fields(StagePlan)}
        stages = []
        for i, st in enumerate(d["stages"]):
            if not isinstance(st, dict) or "index" not in st or not isinstance(st.get("nodes"), (list, tuple)) \
                    or set(st) - stage_fields:
                bad = sorted(set(st) - stage_fields) if isinstance(st, dict) else type(st).__name__
                raise PlanFormatError(f"Plan stage {i} must be an object with 'index' and a list of 'nodes' "
                                      f"(and only {sorted(stage_fields)}); unexpected: {bad}; {how}")
            got = received_from(st, i, how)
            stages.append(StagePlan(**{**st, "nodes": tuple(st["nodes"]), "received_from": got,
                                       "received_grad_from": received_grad_from(st, i, got, how)}))
        d = dict(d)
        d["stages"] = tuple(stages)
        d["cut_edges"] = tuple(tuple(e) for e in d.get("cut_edges", ()))
        try:
            if isinstance(d.get("solve_info"), dict):
                d["solve_info"] = SolveInfo(**d["solve_info"])
            if isinstance(d.get("loss"), dict):
                d["loss"] = LossCost(**d["loss"])
            d["over_memory_stages"] = tuple(d.get("over_memory_stages", ()))
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise PlanFormatError(f"not a Plan: {e}; {how}") from e

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """:meth:`from_dict` of a JSON text.

        Raises:
            PlanFormatError: the text is not JSON (e.g. truncated) or not a Plan.
        """
        from fxpipe.errors import PlanFormatError

        if not isinstance(text, (str, bytes)):
            raise PlanFormatError(f"Plan.from_json takes the JSON text, got {type(text).__name__}; to read a file "
                                  "use Plan.from_json(open(path).read()) or compile(plan=path)")
        try:
            d = json.loads(text)
        except ValueError as e:
            raise PlanFormatError(f"the plan is not valid JSON ({e}; {len(text)} characters — truncated?); "
                                  "write it again with Plan.to_json() or `fxpipe dump ... --format json`") from None
        return cls.from_dict(d)

    def summary(self, node_names: bool = True) -> str:
        """A plain-text table, one row per stage (nodes, first/last node, time, memory, parameters,
        recompute), then the schedule, the bottleneck against the lower bound and the throughput."""
        head = ["stage", "nodes", "first", "last", "time/mb", "fwd", "bwd", "comm", "memory", "params", "recompute"]
        rows = []
        for s in self.stages:
            rows.append([str(s.index), str(len(s.nodes)), s.nodes[0] if s.nodes else "-",
                         s.nodes[-1] if s.nodes else "-", fmt_time(s.time), fmt_time(s.fwd_time),
                         fmt_time(s.bwd_time), fmt_time(s.comm_time), fmt_bytes(s.memory),
                         fmt_bytes(s.param_bytes), "yes" if s.recompute else "no"])
        if not node_names:
            head = [h for h in head if h not in ("first", "last")]
            rows = [[c for i, c in enumerate(r) if i not in (2, 3)] for r in rows]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
        gap = self.gap * 100
        out.append("")
        out.append(f"schedule={self.schedule} stages={self.num_stages} microbatches={self.num_microbatches} "
                   f"solver={self.solver} ({'optimal' if self.optimal else f'gap {gap:.2f}%'}, "
                   f"{self.solve_time:.2f} s)")
        worst = max(self.stages, key=lambda s: s.time).index if self.stages else "-"
        out.append(f"bottleneck {fmt_time(self.bottleneck)} per microbatch (stage {worst}), lower bound "
                   f"{fmt_time(self.lower_bound)}, gap {gap:.2f}%"
                   + (f", memory limit {fmt_bytes(self.memory_limit)}" if self.memory_limit else ""))
        if self.loss is not None:
            ls = self.loss
            out.append(f"loss_fn on stage {self.num_stages - 1} (included above): fwd {fmt_time(ls.fwd_time)}, "
                       f"bwd {fmt_time(ls.bwd_time)}, saves {fmt_bytes(ls.activation_bytes)} ({ls.nodes} ops)")
        where = self.extra.get("placement")
        if isinstance(where, dict):
            out.append(f"placement {where.get('order')}, {where.get('devices_per_node')} devices a node; "
                       f"boundaries across nodes (network-priced) {where.get('inter_node_boundaries')}, "
                       f"all-reduces across nodes {where.get('inter_node_allreduce')}")
        extra = [f"solver time {self.solve_time:.2f} s", f"cut edges {len(self.cut_edges)}"]
        if self.microbatch_size and self.bottleneck > 0:
            rate = self.microbatch_size * self.data_parallel / self.bottleneck
            extra.append(f"throughput {rate:,.1f} samples/s (microbatch {self.microbatch_size})")
        if self.over_memory_stages:
            extra.append(f"OVER MEMORY on stages {list(self.over_memory_stages)}")
        out.append(", ".join(extra))
        return "\n".join(out)


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)


# -- routing of a split pipeline: written by passes/split.py, read by the runtime -------------------
@dataclass(frozen=True)
class Source:
    """Where a value comes from.

    kind: "input" (``index`` = position among the model's placeholders),
    "attr" (``name`` = qualified attribute of the root module), "stage"
    (output ``index`` of stage ``stage``), or "const" (``value``).
    """

    kind: str
    index: int = 0
    stage: int = -1
    name: str = ""
    value: Any = None


@dataclass
class StageProgram:
    """One generated stage: its module and where each of its inputs comes from."""

    index: int
    module: torch.fx.GraphModule
    sources: list[Source]                  # one per placeholder of ``module``, in order
    num_outputs: int                       # the module returns a tuple of this length
    consumers: set[int] = field(default_factory=set)   # stages (or d for the loss) reading its outputs


@dataclass
class PipelineProgram:
    """All stages plus the model output as a pytree of Sources (read on the last stage)."""

    stages: list[StageProgram]
    output_sources: list[Source]           # leaves of the model output
    output_spec: pytree.TreeSpec           # how to rebuild the model's output object
    input_names: list[str]                 # placeholder names of the traced model, in order
    root: torch.nn.Module                  # owner of the attributes named by "attr" sources

    @property
    def num_stages(self) -> int:
        return len(self.stages)
