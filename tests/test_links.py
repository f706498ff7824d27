"""Skips on the simulator's links: a value sent p -> c takes link (p, c)'s time, never a boundary's."""

from __future__ import annotations

import dataclasses

import pytest

from fxpipe.errors import ScheduleError
from fxpipe.ir import Plan, StagePlan
from fxpipe.runtime.links import comm_links, plan_links
from fxpipe.runtime.schedules import build_schedule
from fxpipe.runtime.simulate import simulate, steady_batch_time

# d = 3: boundaries 0 -> 1 and 1 -> 2 take 1 s, a skip 0 -> 2 takes 5 s
SKIP = [[None, 1.0, 5.0], [None, None, 1.0], [None, None, None]]


def _starts(sim, rank: int, kind: str) -> list[float]:
    return [s for s, _, a in sim.timeline[rank] if a.kind == kind]


def test_a_skip_takes_its_own_link_and_the_consumer_waits_for_every_producer() -> None:
    # flush d=3 m=1, F=1 B=2: 0F0 [0,1]; 1F0 [2,3] (0 -> 1 lands at 2); 2F0 waits for both inputs:
    # the skip lands at 1 + 5 = 6, 1F0's output at 3 + 1 = 4, so 2F0 [6,7]; 2B0 [7,9] sends both
    # gradients: 2 -> 1 lands at 10, 2 -> 0 at 9 + 5 = 14; 1B0 [10,12], its gradient lands at 13;
    # 0B0 waits for the later, the skip's: [14,16]
    sim = simulate(build_schedule("flush", 3, 1), 1.0, 2.0, comm_time=SKIP)
    rows = [[(s, e, str(a)) for s, e, a in row if a.kind != "U"] for row in sim.timeline]
    assert rows == [[(0, 1, "0F0"), (14, 16, "0B0")], [(2, 3, "1F0"), (10, 12, "1B0")],
                    [(6, 7, "2F0"), (7, 9, "2B0")]]
    assert sim.makespan == 16
    # the same numbers as a per-boundary list: no skip, so 2F0 starts when 1F0's output lands (4)
    chain = simulate(build_schedule("flush", 3, 1), 1.0, 2.0, comm_time=[1.0, 1.0])
    assert _starts(chain, 2, "F") == [4] and chain.makespan == 13     # 0B0 [11,13]


def test_a_skip_does_not_occupy_the_boundary_into_its_consumer() -> None:
    # gpipe d=3 m=2, F=B=1, boundaries 1 s, skip 0 -> 2 takes 2 s. rank 0: 0F0 [0,1] 0F1 [1,2];
    # its skips land at 1 + 2 = 3 and max(2, 3) + 2 = 5; rank 1: 1F0 [2,3] 1F1 [3,4], landing at 4, 5.
    # rank 2: 2F0 at max(3, 4) = 4, 2F1 at max(5, 5) = 5: boundary 1 -> 2 carries only stage 1's output,
    # as without the skip. Lumping the skip into boundary 1 (1 + 2 = 3 s there): 1F0's output lands at
    # 3 + 3 = 6, 1F1's at max(4, 6) + 3 = 9.
    acts = build_schedule("gpipe", 3, 2)
    skip = [[None, 1.0, 2.0], [None, None, 1.0], [None] * 3]
    alone = [[None, 1.0, None], [None, None, 1.0], [None] * 3]
    assert _starts(simulate(acts, 1.0, 1.0, skip), 2, "F") == [4, 5]
    assert _starts(simulate(acts, 1.0, 1.0, alone), 2, "F") == [4, 5]
    assert _starts(simulate(acts, 1.0, 1.0, [1.0, 3.0]), 2, "F") == [6, 9]
    # the skip's own link carries one tensor at a time: at 2.5 s, 0F1's skip leaves when 0F0's has
    # landed (3.5) and lands at 6, so 2F1 starts at 6, not at 2 + 2.5 = 4.5
    slow = [[None, 1.0, 2.5], [None, None, 1.0], [None] * 3]
    assert _starts(simulate(acts, 1.0, 1.0, slow), 2, "F") == [4, 6]


def test_blocking_sends_wait_for_the_skip_too() -> None:
    # flush d=3 m=2: rank 0 runs 0F0 0F1 0B0 0B1. Blocking, 0F0 holds rank 0 until both its sends have
    # landed: 0 -> 1 at 2, the skip 0 -> 2 at 1 + 5 = 6, so 0F1 [6,7]; sends overlapping, 0F1 [1,2]
    acts = build_schedule("flush", 3, 2)
    assert _starts(simulate(acts, 1.0, 2.0, SKIP, blocking_sends=True), 0, "F") == [0, 6]
    assert _starts(simulate(acts, 1.0, 2.0, SKIP), 0, "F") == [0, 1]


def test_comm_tables_are_checked() -> None:
    assert comm_links(0.5, 3) == {(0, 1): 0.5, (1, 2): 0.5}
    assert comm_links([1.0, 2.0], 3) == {(0, 1): 1.0, (1, 2): 2.0}
    assert comm_links(SKIP, 3) == {(0, 1): 1.0, (0, 2): 5.0, (1, 2): 1.0}
    acts = build_schedule("flush", 3, 1)
    with pytest.raises(ScheduleError, match=r"comm_time as a table must be 3 x 3 .* got \[3, 2\]"):
        simulate(acts, comm_time=[[None, 1, 2], [None, None]])
    with pytest.raises(ScheduleError, match=r"comm_time\[2\]\[0\] = 1.0, but only p < c send"):
        simulate(acts, comm_time=[[None, 1, 2], [None, None, 1], [1.0, None, None]])
    with pytest.raises(ScheduleError, match=r"comm_time\[0\]\[2\] must be seconds >= 0 or None .* got -1"):
        simulate(acts, comm_time=[[None, 1, -1], [None, None, 1], [None] * 3])


def _plan(received: list[tuple[tuple[int, int], ...]], comm: list[float]) -> Plan:
    stages = tuple(StagePlan(index=s, nodes=(f"n{s}",), fwd_time=1.0, bwd_time=2.0, comm_time=comm[s],
                             received_bytes=sum(b for _, b in received[s]), received_from=received[s])
                   for s in range(len(comm)))
    return Plan(stages=stages, num_microbatches=1, schedule="flush", bottleneck=0.0, lower_bound=0.0, optimal=False)


def test_a_plan_prices_each_transfer_on_its_own_link() -> None:
    # stage 2 receives 50 B from stage 0 (a skip) and 10 B from stage 1, C_2 = 12 s: one way 6 s split
    # 50 : 10, so 5 s on 0 -> 2 and 1 s on 1 -> 2; C_1 = 2 s: 1 s on 0 -> 1 (the table SKIP)
    plan = _plan([(), ((0, 40),), ((0, 50), (1, 10))], [0.0, 2.0, 12.0])
    assert plan.transfers() == {(0, 1): 40, (0, 2): 50, (1, 2): 10}
    assert plan_links(plan) == SKIP
    # flush m=1 repeats one batch: 16 s (the first test's run)
    assert steady_batch_time(plan)[0] == pytest.approx(16.0)
    # a plan saved before received_from sends all of X_2 = 60 B over boundary 1 -> 2, 6 s one way:
    # 0F0 [0,1] 1F0 [2,3] 2F0 [9,10] 2B0 [10,12] 1B0 [18,20] 0B0 [21,23]
    old = dataclasses.replace(plan, stages=tuple(dataclasses.replace(s, received_from=()) for s in plan.stages))
    assert old.transfers() == {(0, 1): 40, (1, 2): 60}
    assert plan_links(old) == [[None, 1.0, None], [None, None, 6.0], [None] * 3]
    assert steady_batch_time(old)[0] == pytest.approx(23.0)
