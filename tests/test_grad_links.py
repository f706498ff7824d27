"""A bool or integer value crosses once: the plan, the simulator and the topology send no gradient back for it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxpipe
from fxpipe.cost_models.device import DeviceSpec, get_device
from fxpipe.cost_models.topology import Topology
from fxpipe.errors import PlanFormatError, ScheduleError
from fxpipe.ir import Plan, StagePlan
from fxpipe.runtime.links import plan_links
from fxpipe.runtime.schedules import build_schedule
from fxpipe.runtime.simulate import simulate, steady_batch_time


def _rows(sim) -> list[list[tuple[float, float, str]]]:
    return [[(s, e, str(a)) for s, e, a in row if a.kind != "U"] for row in sim.timeline]


def test_an_integer_only_boundary_sends_no_gradient_back() -> None:
    # flush d=2 m=1, F=1 B=2, the activation takes 0.5 s. Floating (one number, both ways): 0F0 [0,1],
    # 1F0 [1.5,2.5], 1B0 [2.5,4.5], its gradient lands at 5, 0B0 [5,7]. Token ids only, (0.5, 0): nothing
    # comes back, so 0B0 follows 0F0 at once: [1,3], and the batch ends with 1B0 at 4.5
    acts = build_schedule("flush", 2, 1)
    floating = simulate(acts, 1.0, 2.0, 0.5)
    assert _rows(floating) == [[(0, 1, "0F0"), (5, 7, "0B0")], [(1.5, 2.5, "1F0"), (2.5, 4.5, "1B0")]]
    ints = [(0, 1, "0F0"), (1, 3, "0B0")], [(1.5, 2.5, "1F0"), (2.5, 4.5, "1B0")]
    for comm in ([(0.5, 0.0)], [[None, (0.5, 0.0)], [None, None]]):
        sim = simulate(acts, 1.0, 2.0, comm)
        assert _rows(sim) == list(ints) and sim.makespan == 4.5
    # rendezvous: 0F0's send waits for 1F0's receive (posted at 0), so rank 0 is held until 1.5;
    # 1B0 has no gradient to hand over, so neither rank waits for the other's receive: 0B0 [1.5,3.5].
    # As one number, 1B0's gradient waits for 0B0's receive and lands at 5: 0B0 [5,7]
    sim = simulate(acts, 1.0, 2.0, [(0.5, 0.0)], blocking_sends=True, rendezvous=True)
    assert _rows(sim) == [[(0, 1, "0F0"), (1.5, 3.5, "0B0")], [(1.5, 2.5, "1F0"), (2.5, 4.5, "1B0")]]
    assert simulate(acts, 1.0, 2.0, 0.5, blocking_sends=True, rendezvous=True).makespan == 7


def test_a_mixed_boundary_sends_back_the_floating_part_only() -> None:
    # stage 1 receives 32 B from stage 0, 16 B of floats and 16 B of int64 ids, at t(b) = b / 16 seconds:
    # C_1 = 2 t(16) + t(16) = 3 s. The link takes 2 s forward (32 B), 1 s back (the floats' gradient)
    st = (StagePlan(index=0, nodes=("a",), fwd_time=1.0, bwd_time=2.0),
          StagePlan(index=1, nodes=("b",), fwd_time=1.0, bwd_time=2.0, comm_time=3.0, received_bytes=32,
                    received_from=((0, 32),), received_grad_from=((0, 16),)))
    plan = Plan(stages=st, num_microbatches=1, schedule="flush", bottleneck=6.0, lower_bound=0.0, optimal=False)
    assert plan.transfers() == {(0, 1): 32} and plan.gradient_transfers() == {(0, 1): 16}
    assert plan_links(plan) == [[None, (2.0, 1.0)], [None, None]]
    # 0F0 [0,1], 1F0 [3,4], 1B0 [4,6], the gradient lands at 7: 0B0 [7,9]. Each way C_1 / 2 = 1.5 had 1F0 at 2.5
    sim = simulate(build_schedule("flush", 2, 1), 1.0, 2.0, plan_links(plan))
    assert _rows(sim) == [[(0, 1, "0F0"), (7, 9, "0B0")], [(3, 4, "1F0"), (4, 6, "1B0")]]
    # the topology prices each direction by its own bytes: 32 B and 16 B at 16 B/s on NVLink
    dev = DeviceSpec(name="toy", peak_flops={"float32": 1e12}, intra_node_bandwidth=16.0, inter_node_bandwidth=1.0,
                     link_latency=0.0, devices_per_node=2)
    topo = Topology(dev, devices_per_node=2)
    assert topo.price(plan, width=1)[0] == pytest.approx(steady_batch_time(plan)[0])
    # a plan written before received_grad_from: every byte gets its gradient, C_1 / 2 each way
    old = Plan.from_dict({**plan.to_dict(), "stages": [{k: v for k, v in s.items() if k != "received_grad_from"}
                                                       for s in plan.to_dict()["stages"]]})
    assert [s.received_grad_from for s in old.stages] == [None, None]
    assert old.gradient_transfers() == {(0, 1): 32} and plan_links(old) == [[None, 1.5], [None, None]]


class _Ids(nn.Module):
    """Stage 0 picks token ids (argmax of a learned projection: not a local value), stage 1 embeds them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
        self.emb = nn.Embedding(64, 64)
        self.b = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.emb(self.a(x).argmax(-1)))


def test_a_plan_whose_boundary_carries_token_ids_prices_them_once_everywhere() -> None:
    torch.manual_seed(0)
    plan = fxpipe.plan(_Ids(), (torch.randn(32, 8, 64),), num_stages=2, num_microbatches=4, device="v100-16gb")
    s0, s1 = plan.stages
    assert s0.nodes[-1] == "argmax" and s1.nodes[0] == "emb" and plan.cut_edges == (("argmax", "emb"),)
    ids = 8 * 8 * 8                                # a microbatch of 8 x 8 int64 ids
    assert (s1.received_from, s1.received_grad_from, s0.received_grad_from) == (((0, ids),), ((0, 0),), ())
    dev = get_device("v100-16gb")
    once = dev.link_latency + ids / dev.intra_node_bandwidth
    assert s1.comm_time == pytest.approx(once)    # C_1: sent once, no gradient back
    assert plan.gradient_transfers() == {(0, 1): 0}
    back = Plan.from_json(plan.to_json())
    assert back == plan and back.stages[1].received_grad_from == ((0, 0),)
    # the simulator's link carries C_1 forward and nothing back; the topology (one node) prices the same
    assert plan_links(plan) == [[None, (s1.comm_time, 0.0)], [None, None]]
    t, _ = steady_batch_time(plan)
    assert Topology(dev, devices_per_node=8).price(plan, width=1)[0] == pytest.approx(t, rel=1e-12)
    # priced as before (C_1 / 2 forward and a gradient of C_1 / 2 back): a plan JSON without the field
    old = json.loads(plan.to_json())
    for st in old["stages"]:
        del st["received_grad_from"]
    legacy = Plan.from_dict(old)
    assert legacy.gradient_transfers() == legacy.transfers() == {(0, 1): ids}
    assert plan_links(legacy) == [[None, s1.comm_time / 2], [None, None]]


def test_bad_gradient_bytes_and_link_times_are_refused() -> None:
    st = (StagePlan(index=0, nodes=("a",)),
          StagePlan(index=1, nodes=("b",), received_bytes=32, received_from=((0, 32),), received_grad_from=((0, 16),)))
    d = Plan(stages=st, num_microbatches=1, schedule="flush", bottleneck=0.0, lower_bound=0.0, optimal=False).to_dict()
    d["stages"][1]["received_grad_from"] = [[0, 40]]
    with pytest.raises(PlanFormatError, match=r"Plan stage 1: received_grad_from must be .* over the producers of "
                                              r"received_from=\[\[0, 32\]\], each 0 <= bytes <= .* got \[\[0, 40\]\]"):
        Plan.from_dict(d)
    d["stages"][1]["received_grad_from"] = [[1, 0]]
    with pytest.raises(PlanFormatError, match="over the producers of received_from"):
        Plan.from_dict(d)
    acts = build_schedule("flush", 2, 1)
    with pytest.raises(ScheduleError, match=r"comm_time\[0\]\[1\] must be seconds >= 0 or None .* pair .* "
                                            r"got \(1.0, -1.0\)"):
        simulate(acts, comm_time=[[None, (1.0, -1.0)], [None, None]])
    with pytest.raises(ScheduleError, match=r"comm_time\[1\]\[0\] = \(0.0, 1.0\), but only p < c send"):
        simulate(acts, comm_time=[[None, 1.0], [(0.0, 1.0), None]])
