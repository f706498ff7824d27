"""Topology pricing: placements of d x w ranks on nodes, transfers and all-reduces by where ranks sit, precision bytes."""

from __future__ import annotations

import pytest
import torch

from fxpipe.cost_models.device import DeviceSpec
from fxpipe.cost_models.evaluator import CostContext, gradient_bytes, param_state_bytes, weight_bytes
from fxpipe.cost_models.topology import Placement, Topology
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
    # the planner's C_s: replicas fill a node at d=2 w=4 (likely replicas-in-node), shared by 4
    assert topo.planning_transfer(2, 4)(8) == pytest.approx(8.0)
    assert topo.planning_transfer(8, 1)(8) == pytest.approx(2.0)           # one pipeline over 2 nodes
    assert Topology(DEV, devices_per_node=4).bandwidth(True, users=1) == 1.0   # a NIC per device: no gain
    with pytest.raises(ConfigError, match="gpus_per_nic must be an int >= 1, got 0"):
        DEV.replace(gpus_per_nic=0)
