"""Where the d x w ranks of a replicated pipeline sit on nodes, and what their transfers cost there.

N = d·w devices on nodes of ``devices_per_node`` (n). Two placements (PipeDream-2BW §3.3)::

    stages-in-node     device = replica·d + stage     a pipeline's stages are neighbours: stage-to-stage
                                                      transfers stay on NVLink while d <= n, the
                                                      all-reduce of a stage's replicas crosses nodes
    replicas-in-node   device = stage·w + replica     a stage's replicas are neighbours: the all-reduce
                                                      stays on NVLink while w <= n, boundaries cross nodes

e.g. d=2, w=4, n=4: stages-in-node puts pipelines (0,1) (2,3) | (4,5) (6,7) on two nodes:
no boundary crosses, each stage's 4 replicas span both nodes. replicas-in-node puts
stage 0 on node 0 and stage 1 on node 1: the one boundary crosses, all-reduces stay inside.

A transfer between two stages on different nodes (for some replica; a boundary k -> k+1 or a
skip p -> c, each on its own link) goes over the network, else over ``intra_node_bandwidth``;
so does a ring all-reduce among
replicas on several nodes. A node's network is shared by the devices that use it at once
(``users``): each gets ``inter_node_bandwidth * gpus_per_nic * min(1, nics / users)``, so with
one 25 Gbit/s NIC for 8 GPUs (v100-16gb) a lone sender gets 25 Gbit/s and eight get 3.125.
Stage-to-stage traffic and all-reduces are counted apart (the all-reduce runs once a batch,
the transfers all the time). e.g. d=16, w=4 on 8-GPU nodes, stages-in-node: a pipeline spans
two nodes and one device per node sends across (25 Gbit/s), while all 8 devices of a node
all-reduce across nodes (3.125 each). :class:`Topology` prices a plan under both placements
and keeps the faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fxpipe.errors import ConfigError

from .device import DeviceSpec
from .evaluator import LinkTransfers, gradient_bytes

if TYPE_CHECKING:
    from fxpipe.ir import Plan

__all__ = ["PLACEMENTS", "Placement", "Topology"]

PLACEMENTS = ("stages-in-node", "replicas-in-node")


@dataclass(frozen=True)
class Placement:
    """The rank of every (stage, replica) and which transfers leave a node."""

    order: str                 # one of PLACEMENTS
    num_stages: int            # d
    width: int                 # w
    devices_per_node: int      # n

    def device(self, stage: int, replica: int) -> int:
        """Global device index of ``stage``'s ``replica``."""
        if self.order == "stages-in-node":
            return replica * self.num_stages + stage
        return stage * self.width + replica

    def node(self, stage: int, replica: int) -> int:
        return self.device(stage, replica) // self.devices_per_node

    def boundary_crosses(self, k: int) -> bool:
        """True when stages k and k+1 sit on different nodes for some replica."""
        return self.crosses(k, k + 1)

    def replicas_span_nodes(self, stage: int) -> bool:
        """True when ``stage``'s replicas sit on more than one node."""
        return len({self.node(stage, r) for r in range(self.width)}) > 1

    def _users(self, uses: Any) -> dict[int, int]:
        """Per node, how many of its devices ``uses(stage, replica)`` the network."""
        count: dict[int, int] = {}
        for s in range(self.num_stages):
            for r in range(self.width):
                if uses(s, r):
                    node = self.node(s, r)
                    count[node] = count.get(node, 0) + 1
        return count

    def crosses(self, src: int, dst: int) -> bool:
        """True when stages ``src`` and ``dst`` sit on different nodes for some replica."""
        return any(self.node(src, r) != self.node(dst, r) for r in range(self.width))

    def crossing_users(self, pairs: Iterable[tuple[int, int]] | None = None) -> dict[int, int]:
        """Per node, how many of its devices send stage-to-stage traffic across nodes: a device counts
        when it talks to a stage on another node over one of ``pairs`` (producer, consumer), as
        either end (the activation goes one way, its gradient back). None: the neighbour pairs
        (k, k+1), all a planner knows before a partition exists; a plan's :meth:`~fxpipe.ir.Plan.transfers`
        also count a skip's ends, e.g. 0 -> 3 on 2-device nodes."""
        d = self.num_stages
        peers: list[set[int]] = [set() for _ in range(d)]
        for p, c in ([(k, k + 1) for k in range(d - 1)] if pairs is None else pairs):
            peers[p].add(c)
            peers[c].add(p)

        def crosses(s: int, r: int) -> bool:
            return any(self.node(t, r) != self.node(s, r) for t in peers[s])

        return self._users(crosses)

    def link_users(self, src: int, dst: int, per_node: dict[int, int] | None = None) -> int:
        """Devices sharing the network with the busiest crossing of a transfer ``src`` -> ``dst`` (0 when it
        stays inside nodes): the crossing devices of either end's node, at least the sender itself."""
        per_node = self.crossing_users() if per_node is None else per_node
        return max((max(per_node.get(self.node(src, r), 0), per_node.get(self.node(dst, r), 0), 1)
                    for r in range(self.width) if self.node(src, r) != self.node(dst, r)), default=0)

    def boundary_users(self, k: int) -> int:
        """Devices sharing the network with boundary k's busiest crossing (0 when it stays inside nodes)."""
        return self.link_users(k, k + 1)

    def allreduce_users(self, stage: int) -> int:
        """Devices sharing the network with ``stage``'s all-reduce (0 when its replicas share a node)."""
        if not self.replicas_span_nodes(stage):
            return 0
        per_node = self._users(lambda s, r: self.width > 1 and self.replicas_span_nodes(s))
        return max(per_node.get(self.node(stage, r), 0) for r in range(self.width))

    def to_dict(self) -> dict[str, Any]:
        d = self.num_stages
        return {"order": self.order, "devices_per_node": self.devices_per_node,
                "inter_node_boundaries": [k for k in range(d - 1) if self.boundary_crosses(k)],
                "inter_node_allreduce": [s for s in range(d) if self.width > 1 and self.replicas_span_nodes(s)],
                "devices": [[self.device(s, r) for r in range(self.width)] for s in range(d)]}


@dataclass(frozen=True)
class Topology:
    """A cluster: the device, how many share a node, the training precision (gradient bytes), and
    how the runtime uses it. ``blocking_sends``: True prices a runtime whose stage waits for each
    send before computing on, as Megatron-LM's p2p in the code PipeDream-2BW ran (fxpipe's runtime
    sends asynchronously: False, the default). ``rendezvous``: with ``blocking_sends``, a transfer also
    waits for its receiver to post the receive, as NCCL point-to-point does (see
    :func:`fxpipe.runtime.simulate.simulate`): the paper's runtime. ``placement``: price only that rank order (e.g.
    ``"replicas-in-node"``, Megatron-LM's, rank = stage * w + replica); None prices both and keeps the
    faster. ``overlap_allreduce``: False prices a runtime whose ranks all-reduce and step between batches,
    holding the rank (the paper's code: ``allreduce_params``, ``torch.cuda.synchronize()``, then the step),
    so 2bw does not hide the all-reduce; fxpipe's runtime overlaps it (True, the default).

    Example::

        >>> topo = Topology(get_device("v100-16gb"), devices_per_node=8, precision="fp16")
        >>> t, exposed, where = topo.price(plan, width=8)      # seconds per batch, placement
    """

    device: DeviceSpec
    devices_per_node: int
    precision: str = "fp32"
    blocking_sends: bool = False
    placement: str | None = None     # one of PLACEMENTS: the only rank order priced; None: both, the faster
    rendezvous: bool = False         # with blocking_sends: a transfer waits for its receiver too (NCCL p2p)
    overlap_allreduce: bool = True   # False: the all-reduce and step hold the rank between batches

    def __post_init__(self) -> None:
        n = self.devices_per_node
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"devices_per_node must be an int >= 1, got {n!r}")
        if self.placement is not None and self.placement not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {', '.join(PLACEMENTS)} or None, got {self.placement!r}")
        if self.rendezvous and not self.blocking_sends:
            raise ConfigError("Topology(rendezvous=True) prices sends that wait for their receiver, a kind of "
                              "blocking send: pass blocking_sends=True too (or neither, for fxpipe's async sends)")

    def bandwidth(self, inter: bool, users: int | None = None) -> float:
        """Bytes/s one device gets: NVLink, or its share of the node's network when ``users`` devices
        of the node use it at once (None: all of them, the device's ``inter_node_bandwidth``)."""
        dev = self.device
        if not inter:
            return dev.intra_node_bandwidth
        if users is None:
            return dev.inter_node_bandwidth
        nics = max(1, self.devices_per_node // dev.gpus_per_nic)
        return dev.inter_node_bandwidth * dev.gpus_per_nic * min(1.0, nics / max(1, users))

    def transfer(self, nbytes: int, inter: bool, users: int | None = None) -> float:
        """Seconds to send ``nbytes`` once between two stages."""
        return 0.0 if nbytes <= 0 else self.device.link_latency + nbytes / self.bandwidth(inter, users)

    def allreduce(self, param_bytes: int, width: int, inter: bool, users: int | None = None) -> float:
        """Ring all-reduce seconds of the gradients of ``param_bytes`` (fp32 bytes) among ``width`` replicas."""
        if width <= 1 or param_bytes <= 0:
            return 0.0
        return 2.0 * (width - 1) / width * gradient_bytes(param_bytes, self.precision) / self.bandwidth(inter, users)

    def likely_placement(self, num_stages: int, width: int) -> Placement:
        """The placement a planner assumes before pricing both: replicas inside a node when they fit
        there (1 < w <= n, the paper's §3.3 rule as we read it), else pipelines inside a node."""
        if self.placement is not None:
            return Placement(self.placement, num_stages, width, self.devices_per_node)
        order = PLACEMENTS[1] if 1 < width <= self.devices_per_node and num_stages > 1 else PLACEMENTS[0]
        return Placement(order, num_stages, width, self.devices_per_node)

    def links(self, placement: Placement) -> list[list[Any]]:
        """``links[p][c]`` (p < c): ``nbytes -> seconds`` of a value sent from stage p straight to stage c
        where ``placement`` puts them (:meth:`transfer` at the node's network share,
        :meth:`Placement.link_users`), or None when p and c share a node (the cost model's own NVLink
        price). For :class:`~fxpipe.cost_models.evaluator.LinkTransfers`: the C_s of a plan. Made before
        a partition exists, so the network share counts only devices that talk to a neighbour stage
        (:meth:`Placement.crossing_users` of None); :meth:`price` counts a plan's own pairs."""
        d = placement.num_stages
        per_node = placement.crossing_users()
        net: dict[int, Any] = {}          # one price per network share, so equal links are one link
        out: list[list[Any]] = [[None] * d for _ in range(d)]
        for p in range(d):
            for c in range(p + 1, d):
                if placement.crosses(p, c):
                    u = placement.link_users(p, c, per_node)
                    if u not in net:
                        net[u] = lambda nbytes, u=u: self.transfer(int(nbytes), True, u)
                    out[p][c] = net[u]
        return out

    def linked(self, cost_model: Any, placement: Placement) -> Any:
        """``cost_model`` with each transfer priced by the link it crosses under ``placement``
        (:class:`~fxpipe.cost_models.evaluator.LinkTransfers` over :meth:`links`); unchanged
        when every boundary stays inside a node. Fixed-depth plans, the depth x width search (at the
        :meth:`likely_placement` of each candidate) and the paper's planner all price C_s this way."""
        if not any(placement.boundary_crosses(k) for k in range(placement.num_stages - 1)):
            return cost_model
        return LinkTransfers(cost_model, self.links(placement))

    def planning_allreduce(self, param_bytes: int, num_stages: int, width: int, stage: int) -> float:
        """All-reduce seconds of ``stage`` under the likely placement."""
        pl = self.likely_placement(num_stages, width)
        return self.allreduce(param_bytes, width, pl.replicas_span_nodes(stage), pl.allreduce_users(stage) or None)

    def placements(self, num_stages: int, width: int) -> list[Placement]:
        """Both placements (one when d = 1 or w = 1: they coincide), or only :attr:`placement` when set."""
        orders = PLACEMENTS if num_stages > 1 and width > 1 else PLACEMENTS[:1]
        if self.placement is not None:
            orders = (self.placement,)
        return [Placement(o, num_stages, width, self.devices_per_node) for o in orders]

    def price(self, plan: "Plan", width: int) -> tuple[float, float, dict[str, Any]]:
        """(seconds per batch, exposed all-reduce, placement) of ``plan`` replicated ``width`` times.

        Each placement runs on :func:`fxpipe.runtime.simulate.steady_batch_time` with each transfer
        p -> c of :meth:`~fxpipe.ir.Plan.transfers` (the bytes stage c receives from stage p; a plan
        without ``received_from`` sends X_{k+1} over boundary k) on its own link, its gradient back
        c -> p priced by the bytes that get one (:meth:`~fxpipe.ir.Plan.gradient_transfers`: 0 s, none
        sent, for a pair carrying only bool or integer values), as C_c prices them: the network when
        :meth:`Placement.crosses` (p, c), shared with the node's devices that talk across nodes
        over the plan's pairs (:meth:`Placement.link_users`), else NVLink; and all-reduces. The
        faster placement wins (ties: stages-in-node). e.g. 4 stages on 2-device nodes, a skip 0 -> 3:
        it crosses nodes although boundary 2 -> 3 does not, so it pays the network, and stage 0
        counts as a crossing device of node 0.
        """
        from fxpipe.runtime.simulate import steady_batch_time

        best: tuple[float, float, Placement] | None = None
        g = plan.extra.get("microbatches_per_flush")
        d = plan.num_stages
        sent, back = plan.transfers(), plan.gradient_transfers()
        for pl in self.placements(d, width):
            per_node = pl.crossing_users(sent)
            comm: list[list[Any]] = [[None] * d for _ in range(d)]
            for (p, c), nbytes in sent.items():
                how = (pl.crosses(p, c), pl.link_users(p, c, per_node))
                t, grad = self.transfer(nbytes, *how), back.get((p, c), nbytes)
                comm[p][c] = t if grad == nbytes else (t, self.transfer(grad, *how))   # (t, 0.0): none back
            ar = [self.allreduce(st.param_bytes, width, pl.replicas_span_nodes(st.index),
                                 pl.allreduce_users(st.index) or None) for st in plan.stages]
            t, exposed = steady_batch_time(plan, ar if width > 1 else None, microbatches_per_flush=g,
                                           comm=comm, blocking_sends=self.blocking_sends,
                                           rendezvous=self.rendezvous, overlap_allreduce=self.overlap_allreduce)
            if best is None or t < best[0] * (1 - 1e-12):
                best = (t, exposed, pl)
        assert best is not None
        return best[0], best[1], best[2].to_dict()
