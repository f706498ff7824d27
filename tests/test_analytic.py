"""Tests of cost_models/analytic.py: roofline on made-up metadata, FLOPs, saved activations, caching, speed."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxpipe.cost_models.analytic import AnalyticCostModel, roofline_time
from fxpipe.cost_models.device import DeviceSpec
from fxpipe.errors import CostModelError
from fxpipe.passes.shape_prop import shape_prop
from fxpipe.trace import trace
from models import MLP, TinyGPT

TOY = DeviceSpec(name="toy", peak_flops={"float32": 1e12, "bfloat16": 4e12}, mem_bandwidth=1e9,
                 intra_node_bandwidth=1e8, link_latency=1e-5, kernel_overhead=1e-6)
MiB = 2**20


def _meta(*shape: int, rg: bool = True) -> torch.Tensor:
    return torch.empty(*shape, device="meta", requires_grad=rg)


def _costs(gm: fx.GraphModule, cm: AnalyticCostModel) -> dict[str, object]:
    return {n.name: cm.node_cost(n) for n in gm.graph.nodes}


def saved_bytes(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes autograd saves running model(*inputs): non-parameter tensors, each storage once."""
    skip = {t.untyped_storage()._cdata for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        k = t.untyped_storage()._cdata
        if k not in skip:
            seen[k] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return sum(seen.values())


def test_roofline_formula() -> None:
    assert roofline_time(1e9, 4e6, torch.float32, TOY.replace(mem_bandwidth=1e12, kernel_overhead=5e-6)) \
        == pytest.approx(1e-3 + 5e-6)
    assert roofline_time(0, 1e6, "float32", TOY, kernels=3) == pytest.approx(1e-3 + 3e-6)   # memory bound
    assert roofline_time(4e9, 0, torch.bfloat16, TOY, kernels=0) == pytest.approx(1e-3)     # bf16 peak
    # the intensity form: at the ridge point (1e12 FLOP/s / 1e9 B/s = 1000 FLOP/B) half the peak
    assert roofline_time(1e9, 1e6, "float32", TOY, kernels=0, roofline="intensity") == pytest.approx(2e-3)
    assert roofline_time(1e9, 1e6, "float32", TOY, kernels=0) == pytest.approx(1e-3)


def _linear_graph(rows: int) -> fx.Graph:
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = _meta(rows, 1024)
    w = g.placeholder("w")
    w.meta["val"] = _meta(1024, 1024)
    lin = g.call_function(F.linear, (x, w))
    lin.meta["val"] = _meta(rows, 1024)
    g.output(lin)
    return g


def _lin(g: fx.Graph) -> fx.Node:
    return next(n for n in g.nodes if n.op == "call_function")


def test_matmul_efficiency_grows_with_the_microbatch() -> None:
    """A (b*512) x 1024 x 1024 linear on a V100: per-sample time falls as b grows (intensity roofline)."""
    from fxpipe.cost_models.device import get_device

    v100 = get_device("v100-16gb")
    per_sample = {}
    for b in (1, 8):
        cm = AnalyticCostModel(v100, precision="fp16", autocast=False)   # an fp16 model: no casts
        c = cm.node_cost(_lin(_linear_graph(512 * b)))
        per_sample[b] = (c.fwd_time + c.bwd_time) / b
        flops, io = 2 * 512 * b * 1024 * 1024, 2 * (2 * 512 * b * 1024 + 1024 * 1024)   # fp16 bytes
        assert c.fwd_time == pytest.approx(flops / 125e12 + io / 900e9 + v100.kernel_overhead, rel=1e-6)
    assert per_sample[8] < 0.8 * per_sample[1]
    no_launch = v100.replace(kernel_overhead=0.0)
    flat = {b: AnalyticCostModel(no_launch, precision="fp16", roofline="max", autocast=False).node_cost(_lin(_linear_graph(512 * b)))
            for b in (1, 8)}
    assert flat[8].fwd_time / 8 == pytest.approx(flat[1].fwd_time, rel=1e-6)   # the plain roofline: flat


def test_precision_sets_the_flop_rate_and_activation_bytes() -> None:
    from fxpipe.cost_models.device import get_device

    v100 = get_device("v100-16gb")
    g32, g16, gbf = _linear_graph(4096), _linear_graph(4096), _linear_graph(4096)
    c32 = AnalyticCostModel(v100, roofline="max").node_cost(_lin(g32))
    c16 = AnalyticCostModel(v100, precision="fp16", roofline="max", autocast=False).node_cost(_lin(g16))
    cbf = AnalyticCostModel(v100, precision="bf16", roofline="max", autocast=False).node_cost(_lin(gbf))
    flops = 2 * 4096 * 1024 * 1024
    assert c32.fwd_time == pytest.approx(flops / 15.7e12 + v100.kernel_overhead)
    assert c16.fwd_time == pytest.approx(flops / 125e12 + v100.kernel_overhead)
    assert cbf.fwd_time == pytest.approx(flops / 15.7e12 + v100.kernel_overhead)   # no bf16 tensor cores
    assert c32.output_bytes == 4096 * 1024 * 4 and c16.output_bytes == cbf.output_bytes == 4096 * 1024 * 2
    assert c16.activation_bytes == c32.activation_bytes // 2 > 0
    with pytest.raises(Exception, match=r"unknown precision 'fp8'"):
        AnalyticCostModel(v100, precision="fp8")
    with pytest.raises(Exception, match=r"unknown roofline 'soft'"):
        AnalyticCostModel(v100, roofline="soft")


def test_costs_from_made_up_metadata() -> None:
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = _meta(1024, 256)
    w = g.placeholder("w")
    w.meta["val"] = _meta(512, 256)
    r = g.call_function(torch.relu, (x,))
    r.meta["val"] = _meta(1024, 256)
    lin = g.call_function(F.linear, (r, w))
    lin.meta["val"] = _meta(1024, 512)
    g.output(lin)
    cm = AnalyticCostModel(TOY, roofline="max")
    relu = cm.node_cost(r)
    # relu: read 1 MiB, write 1 MiB, one kernel; backward threshold_backward reads grad + output, writes grad
    assert relu.fwd_flops == 0 and relu.fwd_time == pytest.approx(2 * MiB / 1e9 + 1e-6)
    assert relu.bwd_time == pytest.approx(3 * MiB / 1e9 + 1e-6)
    assert relu.activation_bytes == MiB and relu.output_bytes == MiB
    mm = cm.node_cost(lin)
    assert mm.fwd_flops == 2 * 1024 * 256 * 512 and mm.bwd_flops == 2 * mm.fwd_flops
    assert mm.fwd_time == pytest.approx(3.5 * MiB / 1e9 + 1e-6)  # memory bound on this toy device
    assert mm.activation_bytes == 512 * 256 * 4  # w; relu's output was charged to relu already
    assert cm.node_cost(x).fwd_time == 0 and cm.node_cost(x).output_bytes == MiB


def test_comm_time() -> None:
    cm = AnalyticCostModel(TOY)
    assert cm.comm_time(0) == 0.0
    assert cm.comm_time(10**6) == pytest.approx(1e-5 + 1e-2)


def test_costs_positive_finite_and_ordered() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.narrow = nn.Linear(64, 64)
            self.wide = nn.Linear(64, 256)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.narrow(x), self.wide(x)

    x = torch.randn(32, 64)
    gm = trace(Two(), (x,))
    shape_prop(gm, x)
    c = _costs(gm, AnalyticCostModel())
    for cost in (c["narrow"], c["wide"]):
        for v in (cost.fwd_time, cost.bwd_time, cost.fwd_flops, cost.bwd_flops):
            assert v > 0 and math.isfinite(v)
    assert c["wide"].fwd_time > c["narrow"].fwd_time and c["wide"].bwd_time > c["narrow"].bwd_time
    assert c["wide"].fwd_flops == 4 * c["narrow"].fwd_flops == 2 * 32 * 64 * 256
    assert c["wide"].param_bytes == (64 * 256 + 256) * 4


def test_sdpa_flops_are_counted() -> None:
    class Attn(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    B, H, L, E = 2, 4, 64, 32
    q = torch.randn(B, H, L, E, requires_grad=True)
    gm = fx.symbolic_trace(Attn())
    shape_prop(gm, q, q.detach().requires_grad_(), q.detach().requires_grad_())
    cost = next(AnalyticCostModel(TOY).node_cost(n) for n in gm.graph.nodes if n.op == "call_function")
    assert cost.fwd_flops == 4 * B * H * L * L * E
    assert cost.bwd_flops >= 2 * cost.fwd_flops


def test_activation_bytes_equal_what_autograd_saves() -> None:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(16, 32)
    gm = trace(model, (x,))
    shape_prop(gm, x)
    cm = AnalyticCostModel(TOY)
    assert sum(c.activation_bytes for c in _costs(gm, cm).values()) == saved_bytes(model, x)


def test_activation_bytes_of_a_transformer_dedup_by_storage() -> None:
    model = TinyGPT(vocab=64, d=32, n_layer=2, n_head=4, block=16)
    x = torch.randint(0, 64, (4, 16))
    gm = trace(model, (x,))
    shape_prop(gm, x)
    predicted = sum(c.activation_bytes for c in _costs(gm, AnalyticCostModel(TOY)).values())
    actual = saved_bytes(model, x)
    # TinyGPT computes ~mask in every forward (saved by masked_fill); fx folds it into a constant
    assert predicted == actual - 2 * 16 * 16


def test_identical_layers_are_counted_once_and_meta_models_are_fast() -> None:
    from fxpipe.examples.gpt import GPT, GPTConfig

    with torch.device("meta"):  # GPT-2 XL: 48 layers, d=1600, ~1,450 nodes
        model = GPT(GPTConfig(vocab=50257, block=1024, d=1600, n_layer=48, n_head=25))
    x = torch.zeros(1, 1024, dtype=torch.long)
    t0 = time.perf_counter()
    gm = trace(model, (x,))
    shape_prop(gm, x)
    cm = AnalyticCostModel("a100-80gb")
    costs = _costs(gm, cm)
    elapsed = time.perf_counter() - t0
    assert len(costs) > 1400 and len(cm._profiles) < 40
    assert elapsed < 10.0
    fwd_flops = sum(c.fwd_flops for c in costs.values())
    n_params = sum(p.numel() for p in model.parameters())  # 1.56e9, lm_head tied to wte
    assert fwd_flops == pytest.approx(2 * 1024 * n_params, rel=0.15)  # the 6ND rule's forward third


def test_missing_shape_prop_is_an_error() -> None:
    gm = trace(MLP(), (torch.randn(2, 16),))
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    with pytest.raises(CostModelError, match=r"has no node.meta\['val'\].*shape_prop"):
        AnalyticCostModel(TOY).node_cost(node)
