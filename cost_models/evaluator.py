"""The one cost and memory model of a pipeline stage: T_s and M_s from a stage's figures.

Every planner derives its numbers from here: the exact DP (on numpy arrays of
every contiguous stage at once), the CP-SAT encoding (on linear expressions),
the plan builder that re-checks a plan (on floats), the lower bounds and the
baselines (symbols: docs/cost-model.md). The formulas use only ``+`` and multiplication by constants, so one
definition serves floats, numpy arrays and OR-Tools expressions alike::

    T_s = F_s + B_s + r_s*F_s + C_s
    M_s = W(P_s) + (r_s ? n_s*(I_s + K_s) + A_s - K_s : n_s*(A_s + X_s))    K_s: loss_fn's saved bytes, last stage
    W(P) = P * (1 weights + 1 grads + k optimizer slots + [1 second version if 2bw])
    n_s = min(d - s, m) for 2bw / flush (1F1B),   m for gpipe

F_s, B_s: forward and backward seconds of one microbatch; C_s: 2 * transfer time
of every distinct value entering the stage (sent, and its gradient sent back; 1 * for
a bool or integer value, which gets no gradient: :func:`transfer_cost`);
P_s: parameter bytes the stage reads (a tied parameter counted on every stage
that reads it); A_s: bytes autograd saves in the stage; I_s: every tensor
entering the stage (model inputs included); X_s <= I_s: the tensors received from
earlier stages. The executor keeps each received tensor of an in-flight
microbatch until that microbatch's backward, so X_s is held per in-flight
microbatch even when no node saves it; a recomputing stage holds all its inputs
and, during one backward, its whole A_s.

Worked example: P=100, A=10, I=X=2, d=4, s=1, m=8, SGD (k=0), 2bw:
n=3, M = 100*3 + 3*(10+2) = 336 without recompute, 100*3 + 3*2 + 10 = 316 with it.

A :class:`CostContext` holds everything these formulas depend on besides the
stage's own figures (schedule, d, m, k, the recompute policy and the
precision); a transfer's price is :func:`transfer_cost`; a change to the model is made here once.

Transfers are priced by the link they cross when the cost model is a
:class:`LinkTransfers` (a plan on a cluster, :mod:`fxpipe.cost_models.topology`):
a value made on stage p and entering stage s pays ``2 * links[p][s](bytes)`` in C_s, the
link from p's devices to s's (NVLink inside a node, the node's network across nodes), since
the runtime sends it straight there. The DP, CP-SAT, the plan builder and the bounds all
read these prices from :func:`pair_links` (through ``GraphCosts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from fxpipe.ir import CostModel, StagePlan

__all__ = ["CostContext", "StageFigures", "InProcessTransfers", "LinkTransfers", "pair_links", "transfer_cost",
           "IN_PROCESS_TRANSFER_SECONDS", "in_flight", "weight_copies", "stage_time", "stage_memory", "weight_bytes", "stash_bytes", "param_state_bytes",
           "gradient_bytes"]


def in_flight(schedule: str, num_stages: int, stage: int, num_microbatches: int) -> int:
    """n_s: microbatches whose activations stage ``stage`` holds at once."""
    if schedule == "gpipe":
        return num_microbatches
    return min(num_stages - stage, num_microbatches)


def weight_copies(schedule: str, optimizer_slots: int) -> int:
    """How many parameter-sized tensors a stage keeps per parameter."""
    return 2 + optimizer_slots + (1 if schedule == "2bw" else 0)


@dataclass(frozen=True)
class CostContext:
    """What T_s and M_s depend on besides the stage's own figures.

    ``precision`` names the training precision (:mod:`fxpipe.precision`): bytes per
    parameter by :func:`param_state_bytes`; activation bytes come from the cost model,
    which counts them in the dtypes autocast gives them. Transfers are priced per value by
    :func:`transfer_cost` (C_s sums them).
    """

    schedule: str
    num_stages: int
    num_microbatches: int
    optimizer_slots: int = 0
    recompute: bool | None = None            # None: chosen per stage; True/False: forced
    precision: str = "fp32"

    def in_flight(self, stage: int) -> int:
        """n_s of ``stage``."""
        return in_flight(self.schedule, self.num_stages, stage, self.num_microbatches)

    @property
    def weight_copies(self) -> int:
        """Parameter-sized tensors kept per parameter."""
        return weight_copies(self.schedule, self.optimizer_slots)

    @property
    def recompute_options(self) -> tuple[bool, ...]:
        """The values r_s may take: (False, True) when chosen, else the forced one."""
        return (False, True) if self.recompute is None else (bool(self.recompute),)


def transfer_cost(nbytes: int, price: Callable[[int], float] | None, grad: bool = True) -> float:
    """One value's share of C_s: 2 * its transfer time (sent forward, gradient sent back), 1 * for a
    value that gets no gradient (``grad=False``: the runtimes send gradients of floating tensors only);
    0 for no bytes."""
    if nbytes <= 0 or price is None:
        return 0.0
    return (2.0 if grad else 1.0) * float(price(int(nbytes)))


def stage_time(fwd: Any, bwd: Any, comm: Any, recompute: bool) -> Any:
    """T_s = F_s + B_s + r_s*F_s + C_s (floats, numpy arrays or solver expressions)."""
    return fwd + bwd + (fwd if recompute else 0) + comm


# Bytes per parameter a stage holds, by precision (:mod:`fxpipe.precision`), k optimizer slots:
#
#   fp32       weights 4 + gradients 4 + optimizer 4k + [2bw] second version 4
#   bf16/fp16  compute-dtype weights 2 + compute-dtype gradients 2 + fp32 master 4 + optimizer 4k
#              + [2bw] second compute-dtype version 2 and its coalesced gradient 2
#
# (PipeDream-2BW's accounting: fp16 + Adam = 16 B/param, 20 B under 2bw.) P_s is counted at the
# model's fp32 4 B/param, so both give W(P) = P * (2 + k + [2bw]): the weight copies below.
# What precision changes is elsewhere: activations and transfers in autocast's dtypes (the cost
# model counts them so) and the gradients the data-parallel all-reduce moves (gradient_bytes).
_GRAD_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def param_state_bytes(precision: str, optimizer_slots: int, schedule: str) -> int:
    """Bytes per parameter held on the device under ``precision`` (see the table above)."""
    if precision == "fp32":
        return 4 + 4 + 4 * optimizer_slots + (4 if schedule == "2bw" else 0)
    if precision in ("bf16", "fp16"):
        return 2 + 2 + 4 + 4 * optimizer_slots + (4 if schedule == "2bw" else 0)
    from fxpipe.precision import check_precision

    check_precision(precision)
    raise AssertionError("unreachable")


def gradient_bytes(param_bytes: Any, precision: str) -> Any:
    """Bytes of the gradients of ``param_bytes`` (fp32 bytes) that the all-reduce moves."""
    return param_bytes * _GRAD_BYTES[precision] // 4


def weight_bytes(param_bytes: Any, ctx: CostContext) -> Any:
    """W(P_s): weights, gradients, optimizer slots and 2bw's second version, in ``ctx.precision``.

    ``param_bytes`` counts the model's fp32 parameters (4 B each); the multiplier is
    :func:`param_state_bytes` / 4, an integer for every precision, so it also multiplies
    solver expressions.
    """
    per = param_state_bytes(ctx.precision, ctx.optimizer_slots, ctx.schedule)
    return param_bytes * (per // 4)


def stash_bytes(activation_bytes: Any, input_bytes: Any, received_bytes: Any, n: Any,
                recompute: bool, kept_bytes: Any = 0) -> Any:
    """What the in-flight microbatches keep: r_s ? n_s*(I_s + K_s) + A_s - K_s : n_s*(A_s + X_s).

    K_s (``kept_bytes``, part of A_s) is saved outside the recomputed region, so every in-flight
    microbatch keeps it even when the stage recomputes: on the last stage, what ``loss_fn`` saves
    (it runs after the stage's checkpointed forward), e.g. GPT's fp32 log-softmax over the vocabulary.
    It matters where n_s > 1 on the last stage (gpipe); 1F1B and 2bw keep one microbatch there.
    """
    if recompute:
        return n * (input_bytes + kept_bytes) + activation_bytes - kept_bytes
    return n * (activation_bytes + received_bytes)


def stage_memory(param_bytes: Any, activation_bytes: Any, input_bytes: Any, received_bytes: Any,
                 n: Any, recompute: bool, ctx: CostContext, kept_bytes: Any = 0) -> Any:
    """M_s = W(P_s) + stash (see the module docstring; ``kept_bytes``: :func:`stash_bytes`)."""
    return weight_bytes(param_bytes, ctx) + stash_bytes(activation_bytes, input_bytes,
                                                        received_bytes, n, recompute, kept_bytes)


@dataclass(frozen=True)
class StageFigures:
    """The sums over one stage that T_s and M_s are made of (one microbatch)."""

    fwd: float = 0.0                 # F_s
    bwd: float = 0.0                 # B_s
    comm: float = 0.0                # C_s
    param_bytes: int = 0             # P_s
    activation_bytes: int = 0        # A_s
    input_bytes: int = 0             # I_s
    received_bytes: int = 0          # X_s
    in_flight: int = 1               # n_s
    kept_bytes: int = 0              # K_s: loss_fn's saved bytes on the last stage (part of A_s)
    received_from: tuple[tuple[int, int], ...] = ()   # X_s by producer stage: ((p, bytes), ...)
    # the part of received_from whose gradient goes back (floating values), same producers; None: all of it
    received_grad_from: tuple[tuple[int, int], ...] | None = None

    def time(self, recompute: bool) -> float:
        """T_s with r_s = ``recompute``."""
        return stage_time(self.fwd, self.bwd, self.comm, recompute)

    def memory(self, ctx: CostContext, recompute: bool) -> int:
        """M_s in bytes with r_s = ``recompute``."""
        return int(stage_memory(self.param_bytes, self.activation_bytes, self.input_bytes,
                                self.received_bytes, self.in_flight, recompute, ctx, self.kept_bytes))

    @classmethod
    def of_stage(cls, st: "StagePlan", kept_bytes: int = 0) -> "StageFigures":
        """The figures a :class:`~fxpipe.ir.StagePlan` records (``kept_bytes``: the plan's loss
        activations when ``st`` is the last stage)."""
        return cls(fwd=st.fwd_time, bwd=st.bwd_time, comm=st.comm_time, param_bytes=st.param_bytes,
                   activation_bytes=st.activation_bytes, input_bytes=st.input_bytes,
                   received_bytes=st.received_bytes, in_flight=st.in_flight, kept_bytes=kept_bytes,
                   received_from=st.received_from, received_grad_from=st.received_grad_from)


# What handing a tensor to the next stage costs in one process (the local executor): the tensor is
# passed by reference and re-rooted with x.detach().requires_grad_(), ~8 us measured on this VM
# for the pair (forward and gradient); no bytes move.
IN_PROCESS_TRANSFER_SECONDS = 4e-6


class InProcessTransfers:
    """A cost model whose transfers cost what they cost between stages of one process.

    Node costs (and every other attribute) are the wrapped model's; ``comm_time``
    is :data:`IN_PROCESS_TRANSFER_SECONDS` for any non-empty tensor.
    """

    def __init__(self, base: "CostModel") -> None:
        self.base = base

    def node_cost(self, node: Any) -> Any:
        return self.base.node_cost(node)

    def comm_time(self, nbytes: int) -> float:
        return IN_PROCESS_TRANSFER_SECONDS if nbytes > 0 else 0.0

    def __getattr__(self, name: str) -> Any:
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return f"InProcessTransfers({self.base!r})"


def pair_links(cost_model: Any) -> tuple[tuple[Callable[[int], float], ...], tuple[tuple[int, ...], ...]]:
    """(prices, link_of) of a :class:`LinkTransfers`: the distinct ``nbytes -> seconds`` links, and per
    producer stage p and consumer stage c > p the index into prices of the link p -> c (-1 for c <= p);
    ((), ()) when the cost model prices every transfer alike (its ``comm_time``)."""
    return tuple(getattr(cost_model, "pair_links", None) or ()), tuple(getattr(cost_model, "pair_link_of", None) or ())


class LinkTransfers:
    """A cost model whose stage-to-stage transfers are priced by the link each one crosses.

    ``links[p][c]`` (d x d, read for p < c) prices a value sent from stage p straight to stage c:
    the runtime sends a value from its producer's stage to every stage that reads it, so a
    skip connection p -> c > p + 1 crosses the link between p's and c's devices, not c-1 -> c.
    None keeps the wrapped model's ``comm_time`` (a link inside a node). Node costs and every
    other attribute are the wrapped model's; ``comm_time`` is the wrapped one's.

    Example (3 stages, 2 devices a node: stages 0, 1 on node 0, stage 2 on node 1)::

        >>> net = lambda b: 1e-5 + b / 3.125e9
        >>> lt = LinkTransfers(cm, [[None, None, net], [None, None, net], [None] * 3])
        >>> lt.pair_links[lt.pair_link_of[0][2]](10**6)    # 0 -> 2 and 1 -> 2 over the network
    """

    def __init__(self, base: "CostModel", links: Any) -> None:
        self.base = base
        prices: list[Callable[[int], float]] = []
        index: dict[Any, int] = {}
        of: list[tuple[int, ...]] = []
        for p, row in enumerate(links):
            out = []
            for c, f in enumerate(row):
                if c <= p:
                    out.append(-1)
                    continue
                key = None if f is None else id(f)     # one entry per distinct link
                if key not in index:
                    index[key] = len(prices)
                    prices.append(base.comm_time if f is None else f)
                out.append(index[key])
            of.append(tuple(out))
        self.pair_links, self.pair_link_of = tuple(prices), tuple(of)

    def node_cost(self, node: Any) -> Any:
        return self.base.node_cost(node)

    def comm_time(self, nbytes: int) -> float:
        return self.base.comm_time(nbytes)

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "pair_links", "pair_link_of"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return f"LinkTransfers({self.base!r}, {len(self.pair_link_of)} stages)"
