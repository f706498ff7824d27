"""Topology pricing: placements of d x w ranks on nodes, transfers and all-reduces by where ranks sit, precision bytes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fxpipe

from fxpipe.cost_models.device import DeviceSpec, get_device
from fxpipe.cost_models.evaluator import CostContext, gradient_bytes, param_state_bytes, weight_bytes
from fxpipe.cost_models.topology import PLACEMENTS, Placement, Topology
from fxpipe.errors import ConfigError
from fxpipe.ir import Plan, StagePlan

# NVLink 100 B/s, network 1 B/s per device, no latency: easy numbers
DEV = DeviceSpec(name="toy", peak_flops={"float32": 1e12}, intra_node_bandwidth=100.0, inter_node_bandwidth=1.0,
                 link_latency=0.0, devices_per_node=4)


def test_placements_on_two_nodes() -> None:
    a = Placement("stages-in-node", 2, 4, 4)
    assert [[a.device(s, r) for r in range(4)] for s in range(2)] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert not a.boundary_crosses(0) and a.replicas_span_nodes(0) and a.replicas_span_nodes(1)
    b = Placement("replicas-in-node", 2, 4, 4)
    assert [[b.device(s, r) for r in range(4)] for s in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert b.boundary_crosses(0) and not b.replicas_span_nodes(0)
    # d=8 > n=4: a pipeline spans two nodes; boundary 3 is the one between them
    c = Placement("stages-in-node", 8, 1, 4)
    assert [k for k in range(7) if c.boundary_crosses(k)] == [3]
    assert c.to_dict()["inter_node_boundaries"] == [3] and c.to_dict()["inter_node_allreduce"] == []


def _plan(received: int, params: int, m: int = 4) -> Plan:
    st = tuple(StagePlan(index=s, nodes=(f"n{s}",), fwd_time=1.0, bwd_time=2.0, param_bytes=params,
                         received_bytes=received if s else 0) for s in range(2))
    return Plan(stages=st, num_microbatches=m, schedule="flush", bottleneck=3.0, lower_bound=0.0, optimal=False)


def test_price_keeps_the_faster_placement() -> None:
    topo = Topology(DEV, devices_per_node=4)
    # big gradients, small activations: replicas inside a node (all-reduce on NVLink)
    t, exposed, where = topo.price(_plan(received=1, params=400), width=4)
    ar_intra = 2 * 3 / 4 * 400 / 100.0                    # 6 s
    assert where["order"] == "replicas-in-node" and where["inter_node_boundaries"] == [0]
    # flush d=2 m=4, F=1 B=2, 1 s per crossing: rank 0 runs 0F0 [0,1] 0F1 [1,2], waits for 1B0's
    # gradient (1F0 [2,3] 1B0 [3,5], arrives 6): 0B0 [6,8] 0F2 [8,9] 0B1 [9,11] 0F3 [11,12] 0B2 [14,16]
    # 0B3 [17,19]; then the all-reduce (6 s), which the next batch waits for
    assert t == pytest.approx(19.0 + ar_intra) and exposed == pytest.approx(ar_intra)
    # big activations, small gradients: pipelines inside a node (transfers on NVLink)
    t2, _, where2 = topo.price(_plan(received=400, params=1), width=4)
    assert where2["order"] == "stages-in-node" and where2["inter_node_allreduce"] == [0, 1]
    t_other, _, _ = Topology(DEV, devices_per_node=1).price(_plan(received=400, params=1), width=4)
    assert t2 < t_other          # one device per node: every crossing on the network
    with pytest.raises(ConfigError, match="devices_per_node must be an int >= 1, got 0"):
        Topology(DEV, devices_per_node=0)


def test_a_fixed_placement_is_the_only_one_priced() -> None:
    # the plan above prefers replicas-in-node; fixed to stages-in-node (fxpipe's own rank order) it pays
    # the all-reduce across nodes
    free = Topology(DEV, devices_per_node=4)
    fixed = Topology(DEV, devices_per_node=4, placement="stages-in-node")
    assert [p.order for p in fixed.placements(2, 4)] == ["stages-in-node"]
    assert fixed.likely_placement(2, 4).order == "stages-in-node" != free.likely_placement(2, 4).order
    t_free, _, where_free = free.price(_plan(received=1, params=400), width=4)
    t_fixed, _, where = fixed.price(_plan(received=1, params=400), width=4)
    assert where_free["order"] == "replicas-in-node" and where["order"] == "stages-in-node"
    assert t_fixed > t_free
    with pytest.raises(ConfigError, match="placement must be one of stages-in-node, replicas-in-node or None, "
                                          "got 'ring'"):
        Topology(DEV, devices_per_node=4, placement="ring")


def test_rendezvous_prices_the_papers_sends() -> None:
    # gpipe d=3 m=2 w=1, F=1 B=2 per stage, 1 B across each boundary (1 s, one device a node). Blocking:
    # rank 1 runs 1F0 [2,3], its send holds it to 4, 0F1's tensor crossed [3,4]: 1F1 [4,5]. Rendezvous:
    # rank 1 posts 1F1's receive at 4 (send_forward, then recv_forward), so 0F1 crosses [4,5]: 1F1 [5,6];
    # every microbatch pays one more crossing in each phase: 20 s a batch against 18.
    st = tuple(StagePlan(index=s, nodes=(f"n{s}",), fwd_time=1.0, bwd_time=2.0, param_bytes=0,
                         received_bytes=1 if s else 0) for s in range(3))
    plan = Plan(stages=st, num_microbatches=2, schedule="gpipe", bottleneck=3.0, lower_bound=0.0, optimal=False)
    t_block, _, _ = Topology(DEV, devices_per_node=1, blocking_sends=True).price(plan, width=1)
    t_rdv, _, _ = Topology(DEV, devices_per_node=1, blocking_sends=True, rendezvous=True).price(plan, width=1)
    assert (t_block, t_rdv) == (pytest.approx(18.0), pytest.approx(20.0))
    with pytest.raises(ConfigError, match=r"rendezvous=True\) prices sends that wait .* blocking_sends=True"):
        Topology(DEV, devices_per_node=1, rendezvous=True)


def test_precision_sets_gradient_and_state_bytes() -> None:
    assert param_state_bytes("fp32", 2, "flush") == 16 and param_state_bytes("fp32", 2, "2bw") == 20
    assert param_state_bytes("fp16", 2, "flush") == 16 and param_state_bytes("fp16", 2, "2bw") == 20  # the paper's
    assert param_state_bytes("bf16", 0, "flush") == 8
    assert weight_bytes(400, CostContext("2bw", 2, 4, 2, precision="fp16")) == 100 * 20   # 100 params
    assert gradient_bytes(400, "fp16") == 200 and gradient_bytes(400, "fp32") == 400
    fp16 = Topology(DEV, 4, precision="fp16").allreduce(400, 4, inter=True)
    assert fp16 == pytest.approx(Topology(DEV, 4).allreduce(400, 4, inter=True) / 2) == pytest.approx(300.0)
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        param_state_bytes("fp8", 0, "flush")


def test_plan_shows_the_placement() -> None:
    import fxpipe
    from models import MLP

    x = torch.randn(16, 16)
    p = fxpipe.plan(MLP(), (x,), num_stages=None, num_devices=4, global_batch=16, device="a100-80gb",
                    devices_per_node=2, precision="bf16", time_limit=60.0)
    where = p.extra["placement"]
    assert where["devices_per_node"] == 2 and len(where["devices"]) == p.num_stages
    assert sorted(r for row in where["devices"] for r in row) == list(range(p.num_stages * p.data_parallel))
    fixed = fxpipe.plan(MLP(), (x,), num_stages=2, num_microbatches=2, devices_per_node=8, time_limit=5.0)
    assert fixed.extra["placement"]["devices"] == [[0], [1]]
    with pytest.raises(ConfigError, match="devices_per_node must be an int >= 1 or None"):
        fxpipe.plan(MLP(), (x,), num_stages=2, num_microbatches=2, devices_per_node=0)


def test_network_share_follows_the_devices_using_it() -> None:
    """One 4 B/s NIC per node of 4 devices (gpus_per_nic=4): a lone sender gets 4 B/s, four get 1 each."""
    nic = DEV.replace(gpus_per_nic=4)
    topo = Topology(nic, devices_per_node=4)
    assert topo.bandwidth(True) == 1.0 and topo.bandwidth(True, users=1) == 4.0
    assert topo.bandwidth(True, users=2) == 2.0 and topo.bandwidth(False, users=1) == 100.0
    # stages-in-node d=8 w=2: each pipeline spans two nodes; boundary 3 crosses, one device per node sends
    a = Placement("stages-in-node", 8, 2, 4)
    assert [k for k in range(7) if a.boundary_crosses(k)] == [3] and a.boundary_users(3) == 1
    assert a.boundary_users(0) == 0 and a.allreduce_users(0) == 4          # every device all-reduces across
    # replicas-in-node d=2 w=4: stage 0 on node 0, stage 1 on node 1: all four devices cross boundary 0
    b = Placement("replicas-in-node", 2, 4, 4)
    assert b.boundary_users(0) == 4 and b.allreduce_users(0) == 0
    assert topo.transfer(8, True, a.boundary_users(3)) == pytest.approx(2.0)    # 8 B at 4 B/s
    assert topo.transfer(8, True, b.boundary_users(0)) == pytest.approx(8.0)    # 8 B at 1 B/s
    # the search's C_s: replicas fill a node at d=2 w=4 (likely replicas-in-node), boundary 0 shared by 4
    assert topo.links(topo.likely_placement(2, 4))[0][1](8) == pytest.approx(8.0)
    one = topo.links(topo.likely_placement(8, 1))                          # one pipeline over 2 nodes
    assert one[3][4](8) == pytest.approx(2.0) and [s for s in range(1, 8) if one[s - 1][s]] == [4]
    assert Topology(DEV, devices_per_node=4).bandwidth(True, users=1) == 1.0   # a NIC per device: no gain
    with pytest.raises(ConfigError, match="gpus_per_nic must be an int >= 1, got 0"):
        DEV.replace(gpus_per_nic=0)


# -- a fixed-depth plan on a cluster: each stage-to-stage transfer priced by the link it crosses --

V100 = get_device("v100-16gb")       # NVLink 150 GB/s; one 25 Gbit/s NIC for 8 GPUs, latency 10 us
NVLINK = 150e9
NETWORK = 25e9 / 8                   # bytes/s: the one device of each node that sends across gets the whole NIC


def _chain() -> tuple[torch.nn.Module, torch.Tensor]:
    """9 Linear layers 256 wide except one 16-wide output (after layer 6): the cheap place to cross."""
    torch.manual_seed(0)
    w = [256, 256, 256, 256, 256, 256, 16, 256, 256, 256]
    return torch.nn.Sequential(*[torch.nn.Linear(w[i], w[i + 1]) for i in range(len(w) - 1)]), torch.randn(256, 256)


def _chain_plan(devices_per_node: int | None) -> fxpipe.Plan:
    model, x = _chain()
    return fxpipe.plan(model, (x,), num_stages=4, num_microbatches=4, device="v100-16gb",
                       devices_per_node=devices_per_node, time_limit=5.0)


def _sent(nbytes: int, bandwidth: float) -> float:
    """C_s of one received value: sent forward and its gradient back, 2 * (latency + bytes / bandwidth)."""
    return 2 * (V100.link_latency + nbytes / bandwidth)


def test_each_boundary_priced_by_the_link_it_crosses() -> None:
    assert V100.inter_node_bandwidth * V100.gpus_per_nic == NETWORK and V100.intra_node_bandwidth == NVLINK
    p = _chain_plan(devices_per_node=2)      # stages 0, 1 on node 0; 2, 3 on node 1
    assert p.extra["placement"]["inter_node_boundaries"] == [1]
    s = p.stages
    assert s[1].comm_time == _sent(s[1].received_bytes, NVLINK)
    assert s[2].comm_time == _sent(s[2].received_bytes, NETWORK)      # boundary 1 -> 2 crosses nodes
    assert s[3].comm_time == _sent(s[3].received_bytes, NVLINK)
    assert all(st.time == st.fwd_time + st.bwd_time + (st.fwd_time if st.recompute else 0) + st.comm_time
               for st in s) and p.bottleneck == max(st.time for st in s)


def test_the_crossing_cut_moves_to_the_small_tensor() -> None:
    inside = _chain_plan(devices_per_node=None)     # the device's 8 a node: nothing crosses, every link NVLink
    assert inside.extra["placement"]["inter_node_boundaries"] == []
    assert inside.stages[2].received_bytes == 64 * 256 * 4        # a 256-wide microbatch of 64 rows
    assert inside.stages[2].comm_time == _sent(64 * 256 * 4, NVLINK)
    split = _chain_plan(devices_per_node=2)
    assert split.stages[2].received_bytes == 64 * 16 * 4          # the 16-wide output now crosses
    # the old cut priced on the network (by hand) is slower than the plan the planner chose
    old = inside.stages[2]
    old_crossing = old.time - old.comm_time + _sent(old.received_bytes, NETWORK)
    assert split.bottleneck < old_crossing
    assert split.bottleneck >= inside.bottleneck                  # the network costs something


def test_plans_inside_one_node_are_unchanged() -> None:
    a, b = _chain_plan(devices_per_node=None), _chain_plan(devices_per_node=4)
    assert [st.nodes for st in a.stages] == [st.nodes for st in b.stages]
    assert [st.time for st in a.stages] == [st.time for st in b.stages]


def test_summary_shows_the_placement() -> None:
    text = _chain_plan(devices_per_node=2).summary()
    assert "placement stages-in-node, 2 devices a node; boundaries across nodes (network-priced) [1]" in text


def test_dp_cp_sat_and_recheck_price_alike() -> None:
    """Skip connections (values that enter a stage from several stages back): the DP, CP-SAT and the
    re-checked Plan agree on the network-priced bottleneck."""
    from models import SkipNet

    torch.manual_seed(0)
    p = fxpipe.plan(SkipNet(), (torch.randn(8, 12),), num_stages=4, num_microbatches=4, device="v100-16gb",
                    devices_per_node=2, time_limit=5.0)
    info = p.solve_info
    assert info is not None and info.status == "OPTIMAL"
    assert abs(info.solver_bound - p.bottleneck) <= 1e-3 * p.bottleneck
    assert info.dp_bottleneck is not None and abs(info.dp_bottleneck - p.bottleneck) <= 1e-3 * p.bottleneck
    # C_s = sum over the k values entering s of 2 * (latency + bytes / bandwidth): 2*k*latency + 2*X_s/bandwidth
    # (stages 1 and 2 receive only from node 0; stage 3 also gets h0 straight from stage 0: see the test below)
    stage = p.stage_of()
    for s, bandwidth in ((1, NVLINK), (2, NETWORK)):
        k = len({u for u, c in p.cut_edges if stage[c] == s and stage[u] < s})
        st = p.stages[s]
        assert k >= 1 and abs(st.comm_time - k * _sent(st.received_bytes / k, bandwidth)) <= 1e-12


# -- the depth x width search: each boundary priced by its own link under the placement it assumes --

def test_search_prices_each_boundary_by_its_own_link() -> None:
    """6 nodes F=1 B=2 (T=3), d=3 w=1 on 2-device nodes: stages 0, 1 share node 0, so only boundary 1 -> 2
    crosses (1 B/s; NVLink 100 B/s). n1 sends 3 B, every other node 1 B. By its own link the 3 B cut costs
    C = 2 x 3 / 100 inside node 0: [n0 n1 | n2 n3 | n4 n5] has T = 6, 6.06, 6 + 2 x 1 / 1 = 8. Priced at the
    slowest link everywhere, that cut's C_1 = 6 (T_1 = 12) and the best cut avoided n1 (bottleneck 9)."""
    from fxpipe.passes.search import search_depth_width
    from test_partition import FakeCostModel, make_graph

    from fxpipe.ir import NodeCost

    costs = [NodeCost(fwd_time=1.0, bwd_time=2.0, output_bytes=3 if i == 1 else 1) for i in range(6)]

    def graph_for(b: int):
        gm = make_graph([[i - 1] if i else [] for i in range(6)], costs, input_bytes=0,
                        params={i: (f"w{i}",) for i in range(6)}, param_bytes={f"w{i}": 100 for i in range(6)})
        return gm, FakeCostModel(bandwidth=100.0)            # the cost model's own link: NVLink
    # d=1 (w=3) holds all 600 B of parameters x 2 copies (flush, SGD): 1200 > 1000, only d=3 fits
    p = search_depth_width(graph_for, num_devices=3, global_batch=3, schedule="flush", microbatch_sizes=[1],
                           memory_limit=1000, time_limit=20.0, topology=Topology(DEV, devices_per_node=2))
    assert p.num_stages == 3 and p.extra["placement"]["inter_node_boundaries"] == [1]
    assert [st.nodes for st in p.stages] == [("n0", "n1"), ("n2", "n3"), ("n4", "n5")]
    assert [st.comm_time for st in p.stages] == [0.0, pytest.approx(2 * 3 / 100.0), pytest.approx(2 * 1 / 1.0)]
    assert p.bottleneck == pytest.approx(8.0)


# -- a value that skips stages is sent straight from its producer's stage: priced over that link --

def _skip_chain():
    """n0..n7, F=1 B=2 (T=3), each reads the one before; n6 also reads n1 (10 B), every other value is 1 B."""
    from test_partition import FakeCostModel, make_graph

    from fxpipe.ir import NodeCost

    costs = [NodeCost(fwd_time=1.0, bwd_time=2.0, output_bytes=10 if i == 1 else 1) for i in range(8)]
    preds = [[i - 1] if i else [] for i in range(8)]
    preds[6] = [5, 1]
    gm = make_graph(preds, costs, input_bytes=0)
    # 4 stages on 2-device nodes: 0, 1 on node 0, 2, 3 on node 1 (NVLink 100 B/s, network 1 B/s)
    where = Placement("stages-in-node", 4, 1, 2)
    return gm, Topology(DEV, devices_per_node=2).linked(FakeCostModel(bandwidth=100.0), where)


def test_a_skip_pays_the_link_from_its_producers_stage() -> None:
    from fxpipe.passes.partition import plan_from_assignment

    gm, cm = _skip_chain()
    stage_of = {f"n{i}": i // 2 for i in range(8)}            # [n0 n1] [n2 n3] [n4 n5] [n6 n7]
    p = plan_from_assignment(gm, cm, stage_of, [False] * 4, num_microbatches=4, schedule="flush")
    # C_1: n1 for n2 over NVLink (2 x 10 / 100); C_2: n3 across nodes (2 x 1 / 1); C_3: n5 from stage 2 over
    # NVLink (2 x 1 / 100) + n1 straight from stage 0, across nodes (2 x 10 / 1). Priced at link 2 -> 3 (NVLink)
    # as before, n1 cost 0.2 in C_3 and C_3 was 0.22
    assert [st.comm_time for st in p.stages] == [0.0, pytest.approx(2 * 10 / 100), pytest.approx(2 * 1 / 1),
                                                 pytest.approx(2 * 1 / 100 + 2 * 10 / 1)]
    assert p.bottleneck == pytest.approx(6 + 20.02)


def test_the_planner_sees_the_skip_cross_nodes() -> None:
    """n1 is on node 0 and n6 on node 1 in every 4-stage plan, so n1's 10 B cross the network (C += 20)
    wherever n6 sits. With n6 alone on stage 2: T_2 = 3 + 20 + n5 from stage 1 across nodes (2) = 25,
    the optimum (n6 on stage 3 makes T_3 >= 6 + 20). Priced at link 2 -> 3, [n0 n1][n2 n3][n4 n5][n6 n7]
    looked best at 8 (its real bottleneck is 26.02)."""
    from fxpipe.passes.partition import partition

    gm, cm = _skip_chain()
    p = partition(gm, cm, num_stages=4, num_microbatches=4, schedule="flush", time_limit=5.0)
    assert [st.nodes for st in p.stages[2:]] == [("n6",), ("n7",)]
    assert p.stages[2].comm_time == pytest.approx(20 + 2) and p.bottleneck == pytest.approx(25.0)
    assert p.solve_info is not None and p.solve_info.status == "OPTIMAL"


def test_fixed_depth_keeps_the_faster_placement_of_its_replicas(monkeypatch) -> None:
    """num_stages=3, num_devices=6 (w=2) on 4-device nodes: stages-in-node (rank replica*3 + stage) puts
    replica 1's stage 0 on node 0 and its stages 1, 2 on node 1 (boundary 0 -> 1 crosses, stages 1 and 2
    all-reduce across nodes); replicas-in-node (rank stage*2 + replica) crosses boundary 1 -> 2 with both
    replicas and all-reduces inside nodes. The links differ, so each placement gets its own CP-SAT cut
    (half the time limit each) and the plan keeps the one Topology.price finds faster, as the search does.
    One pipeline (w=1) stays inside node 0."""
    import fxpipe.passes.partition as part

    model, x = _chain()
    one = fxpipe.plan(model, (x,), num_stages=3, num_microbatches=4, device="v100-16gb", devices_per_node=4,
                      time_limit=5.0)
    assert one.data_parallel == 1 and one.extra["placement"]["inter_node_boundaries"] == []
    cuts: list = []
    real = part.partition

    def counted(gm, cm, **kw):
        cuts.append((real(gm, cm, **kw), kw["time_limit"]))
        return cuts[-1][0]

    monkeypatch.setattr(part, "partition", counted)
    two = fxpipe.plan(model, (x,), num_stages=3, num_microbatches=4, device="v100-16gb", devices_per_node=4,
                      num_devices=6, time_limit=5.0)
    assert [t for _, t in cuts] == [2.5, 2.5]
    topo = Topology(V100, devices_per_node=4)
    priced = {o: topo.__class__(V100, 4, placement=o).price(c, 2)[0] for (c, _), o in zip(cuts, PLACEMENTS)}
    faster = min(PLACEMENTS, key=lambda o: (priced[o], PLACEMENTS.index(o)))
    where = two.extra["placement"]
    assert two.data_parallel == 2 and where["order"] == faster, priced
    assert [st.nodes for st in two.stages] == [st.nodes for st in cuts[PLACEMENTS.index(faster)][0].stages]
    assert where == Placement(faster, 3, 2, 4).to_dict()
    s = two.stages      # each stage's transfers priced where the recorded placement puts it
    if faster == "replicas-in-node":    # both devices of node 0 send across: half the NIC each
        assert where["devices"] == [[0, 1], [2, 3], [4, 5]] and where["inter_node_boundaries"] == [1]
        assert s[1].comm_time == _sent(s[1].received_bytes, NVLINK)
        assert s[2].comm_time == pytest.approx(_sent(s[2].received_bytes, NETWORK / 2))
    else:
        assert where["devices"] == [[0, 3], [1, 4], [2, 5]] and where["inter_node_boundaries"] == [0]
        assert s[1].comm_time == _sent(s[1].received_bytes, NETWORK)
    # the recorded order is the one a given plan (compile(plan=...)) is re-checked and run under
    from fxpipe.options import check_plan_options
    from fxpipe.planning import plan_graph

    def recheck(given, **cluster):
        opts = check_plan_options(model, num_stages=3, num_microbatches=4, schedule="2bw", optimizer=None,
                                  cost_model="analytic", memory_limit=None, executor="local", **cluster)
        return plan_graph(model, (x,), opts, given_plan=given, width=2)[0]

    again = recheck(two, device="v100-16gb", devices_per_node=4)
    assert again.extra["placement"] == where and [st.comm_time for st in again.stages] == [st.comm_time for st in s]
    assert recheck(two, device=None).extra["placement"]["order"] == faster     # no cluster given: the order stays
    bad = dataclasses.replace(two, extra={**two.extra, "placement": {**where, "order": "diagonal"}})
    with pytest.raises(ConfigError, match="'diagonal', not one of stages-in-node, replicas-in-node"):
        recheck(bad, device=None)
    # all six devices on one 8-device node: both placements cross the same (no) links, so one cut with the
    # whole time limit; their all-reduces stay inside the node too, and the tie goes to stages-in-node
    cuts.clear()
    node = fxpipe.plan(model, (x,), num_stages=3, num_microbatches=4, device="v100-16gb", devices_per_node=8,
                       num_devices=6, time_limit=5.0)
    assert [t for _, t in cuts] == [5.0] and node.extra["placement"]["order"] == "stages-in-node"
    with pytest.raises(ConfigError, match="num_devices=5 is not a multiple of num_stages=3"):
        fxpipe.plan(model, (x,), num_stages=3, num_microbatches=4, num_devices=5)


def _skip_plan(received: list[tuple[tuple[int, int], ...]]) -> Plan:
    """flush m=1, F=1 B=2 per stage; stage s receives ``received[s]`` ((producer, bytes), ...)."""
    st = tuple(StagePlan(index=s, nodes=(f"n{s}",), fwd_time=1.0, bwd_time=2.0, received_from=r,
                         received_bytes=sum(b for _, b in r)) for s, r in enumerate(received))
    return Plan(stages=st, num_microbatches=1, schedule="flush", bottleneck=3.0, lower_bound=0.0, optimal=False)


def _legacy(plan: Plan) -> Plan:
    """The same plan as JSON written before received_from: all of X_s from stage s - 1."""
    return Plan.from_dict({**plan.to_dict(), "stages": [{k: v for k, v in s.items() if k != "received_from"}
                                                        for s in plan.to_dict()["stages"]]})


# 2-device nodes with one NIC each (gpus_per_nic=2): a lone crossing device gets 2 B/s, two get 1 B/s each;
# NVLink 100 B/s; no latency. One pipeline (w=1), stage s on node s // 2.
NIC2 = DEV.replace(gpus_per_nic=2, devices_per_node=2)


def test_a_skip_across_nodes_pays_the_network_where_its_boundary_stays_inside() -> None:
    # 4 stages on nodes (0, 1) | (2, 3); stage 3 reads 10 B straight from stage 1 (a skip across nodes) and
    # 20 B from stage 2 (boundary 2 -> 3, inside node 1). Devices talking across nodes over the plan's pairs:
    # node 0: stage 1 (to 2 and 3); node 1: stages 2 (from 1) and 3 (the skip's consumer): 2, so every
    # crossing gets 1 B/s. Links: 0 -> 1 40 B / 100 = 0.4, 1 -> 2 30 B / 1 = 30, 1 -> 3 10 B / 1 = 10,
    # 2 -> 3 20 B / 100 = 0.2. One batch: 0F0 [0,1] 1F0 [1.4,2.4] 2F0 [32.4,33.4] 3F0 [33.6,34.6]
    # (the skip landed at 12.4) 3B0 [34.6,36.6]; gradients 3 -> 2 land at 36.8, 3 -> 1 at 46.6;
    # 2B0 [36.8,38.8], its gradient lands at 68.8; 1B0 [68.8,70.8]; 0B0 [71.2,73.2]
    plan = _skip_plan([(), ((0, 40),), ((1, 30),), ((1, 10), (2, 20))])
    pl = Placement("stages-in-node", 4, 1, 2)
    assert pl.crosses(1, 3) and not pl.boundary_crosses(2)
    assert pl.crossing_users(plan.transfers()) == {0: 1, 1: 2} and pl.crossing_users() == {0: 1, 1: 1}
    topo = Topology(NIC2, devices_per_node=2)
    t, _, where = topo.price(plan, width=1)
    assert t == pytest.approx(73.2) and where["inter_node_boundaries"] == [1]
    # before received_from, all 30 B of X_3 went over boundary 2 -> 3 on NVLink (0.3) and boundary 1 -> 2
    # had node 1's NIC to itself (30 B at 2 B/s = 15): 0F0 [0,1] 1F0 [1.4,2.4] 2F0 [17.4,18.4]
    # 3F0 [18.7,19.7] 3B0 [19.7,21.7] 2B0 [22,24] 1B0 [39,41] 0B0 [41.4,43.4]
    assert topo.price(_legacy(plan), width=1)[0] == pytest.approx(43.4)


def test_a_skips_sender_shares_its_nodes_network() -> None:
    # 3 stages on nodes (0, 1) | (2): boundary 1 -> 2 crosses, and so does a skip 0 -> 2 (10 B beside 20 B
    # over 1 -> 2). Node 0 now has two devices sending across (stage 0 for the skip, stage 1), so each
    # crossing gets 1 B/s: 0 -> 2 takes 10, 1 -> 2 takes 20, 0 -> 1 0.4. One batch: 0F0 [0,1] 1F0 [1.4,2.4]
    # 2F0 [22.4,23.4] (the skip landed at 11) 2B0 [23.4,25.4]; gradients 2 -> 1 land at 45.4, 2 -> 0 at
    # 35.4; 1B0 [45.4,47.4]; 0B0 [47.8,49.8]
    plan = _skip_plan([(), ((0, 40),), ((0, 10), (1, 20))])
    pl = Placement("stages-in-node", 3, 1, 2)
    assert pl.crossing_users(plan.transfers()) == {0: 2, 1: 1} and pl.crossing_users() == {0: 1, 1: 1}
    topo = Topology(NIC2, devices_per_node=2)
    assert topo.price(plan, width=1)[0] == pytest.approx(49.8)
    # counted as before (stage 1 alone on node 0's NIC, 30 B at 2 B/s = 15 over boundary 1 -> 2):
    # 0F0 [0,1] 1F0 [1.4,2.4] 2F0 [17.4,18.4] 2B0 [18.4,20.4] 1B0 [35.4,37.4] 0B0 [37.8,39.8]
    assert topo.price(_legacy(plan), width=1)[0] == pytest.approx(39.8)
