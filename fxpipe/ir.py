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

__all__ = [
    "META_COST",
    "META_PARAMS",
    "META_PARAM_BYTES",
    "META_VAL",
    "NodeCost",
    "CostModel",
    "StagePlan",
    "Plan",
    "SCHEDULES",
]

# node.meta keys written by the passes.
META_VAL = "val"                     # FakeTensor (or pytree of them): shape_prop, as torch does
META_COST = "fxpipe.cost"            # NodeCost: annotate
META_PARAMS = "fxpipe.params"        # tuple[str, ...] canonical parameter names the node reads
# GraphModule.meta key: dict canonical parameter name -> bytes (tied parameters appear once).
META_PARAM_BYTES = "fxpipe.param_bytes"

SCHEDULES = ("2bw", "flush", "gpipe")


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

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stages"] = [dataclasses.asdict(s) for s in self.stages]
        d["cut_edges"] = [list(e) for e in self.cut_edges]
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=_json_default)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        d = dict(d)
        d["stages"] = tuple(
            StagePlan(**{**s, "nodes": tuple(s["nodes"])}) for s in d["stages"]
        )
        d["cut_edges"] = tuple(tuple(e) for e in d.get("cut_edges", ()))
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def summary(self) -> str:
        """A plain-text table, one row per stage."""
        from fxpipe.report import plan_table

        return plan_table(self)


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)
