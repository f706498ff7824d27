"""passes/split.py as a property: every valid stage assignment of a random DAG splits and computes the same thing.

Valid = what the planner accepts: stages never decrease along an edge and every stage holds a node.
Nodes that read no input (``torch.arange``, ``torch.ones``, a buffer read) may sit on any stage, in
particular a later one than nodes after them in graph order (issue 10, item 2).
"""

from __future__ import annotations

import copy
import operator
import random

import pytest
import torch
import torch.nn as nn

import fxpipe
from fxpipe.passes.split import PipelineProgram, split
from test_pipeline import SGDM, batches_for, reference_losses

W = 6   # feature width of every value in the random graphs
B = 4   # batch


class _Root(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.ModuleList(nn.Linear(W, W) for _ in range(3))
        self.register_buffer("buf", torch.linspace(-1.0, 1.0, W))


def _random_graph(rng: random.Random, n: int) -> torch.fx.GraphModule:
    """A DAG of ``n`` operations on one (B, W) input; about a third of them read no input at all."""
    root = _Root().double()
    g = torch.fx.Graph()
    x = g.placeholder("x")
    values: list[torch.fx.Node] = [x]
    for i in range(n):
        kind = rng.choice(["unary", "unary", "binary", "binary", "linear", "arange", "ones", "buf", "assert",
                           "chunk"])
        a, b = rng.choice(values), rng.choice(values)
        if kind == "unary":
            v = g.call_function(rng.choice([torch.tanh, torch.sin, torch.neg]), (a,))
        elif kind == "binary":
            v = g.call_function(rng.choice([torch.add, torch.mul, torch.sub]), (a, b))
        elif kind == "linear":
            v = g.call_module(f"lin.{rng.randrange(3)}", (a,))
        elif kind == "arange":      # input-free: a row broadcast over the batch
            v = g.call_function(torch.arange, (W,), {"dtype": torch.float64})
            v = g.call_function(torch.mul, (v, 0.1 * (i + 1)))
        elif kind == "ones":
            v = g.call_function(torch.ones, (B, W), {"dtype": torch.float64})
        elif kind == "buf":
            v = g.call_function(torch.add, (g.get_attr("buf"), float(i)))
        elif kind == "chunk":       # a multi-output node: its getitems may sit on later stages
            parts = g.call_function(torch.chunk, (a, 2), {"dim": -1})
            first = g.call_function(operator.getitem, (parts, 0))
            v = g.call_function(torch.cat, ([g.call_function(operator.getitem, (parts, 1)), first],), {"dim": -1})
        else:                       # what torch.export leaves in a graph: a check with no users
            g.call_function(torch.ops.aten._assert_tensor_metadata.default, (a,), {"dtype": torch.float64})
            continue
        values.append(v)
    sinks = [v for v in values[1:] if not v.users] or values[-1:]
    g.output(tuple(sinks))
    return torch.fx.GraphModule(root, g)


def _random_valid_stages(rng: random.Random, gm: torch.fx.GraphModule, d: int) -> dict[str, int] | None:
    """Stages that never decrease along an edge; input-free nodes anywhere. None if a stage stays empty."""
    stage: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        lo = max((stage[a.name] for a in node.all_input_nodes if a.name in stage), default=0)
        # input-free nodes: uniform over all stages; others mostly stay, sometimes move on
        stage[node.name] = rng.randint(lo, d - 1) if not node.all_input_nodes or rng.random() < 0.3 else lo
    return stage if set(stage.values()) == set(range(d)) else None


def _run(prog: PipelineProgram, x: torch.Tensor) -> list[torch.Tensor]:
    outs: dict[int, tuple] = {}

    def value(s):
        if s.kind == "input":
            return x
        if s.kind == "attr":
            obj = prog.root
            for part in s.name.split("."):
                obj = getattr(obj, part)
            return obj
        if s.kind == "const":
            return s.value
        v = outs[s.stage][s.index]
        assert isinstance(v, torch.Tensor), f"stage {s.stage} sends a {type(v).__name__}: only tensors cross"
        return v

    for st in prog.stages:
        outs[st.index] = st.module(*[value(s) for s in st.sources])
    return [value(s) for s in prog.output_sources]


@pytest.mark.parametrize("d", [2, 3, 4])
def test_every_valid_assignment_splits_and_runs(d):
    rng = random.Random(1000 + d)
    checked = late_input_free = 0
    while checked < 60:
        gm = _random_graph(rng, rng.randint(d + 2, 18))
        stage_of = _random_valid_stages(rng, gm, d)
        if stage_of is None:
            continue
        nodes = [n for n in gm.graph.nodes if n.name in stage_of]
        late_input_free += any(not n.all_input_nodes and stage_of[n.name] > stage_of[m.name]
                               for i, n in enumerate(nodes) for m in nodes[i + 1:])
        x = torch.randn(B, W, dtype=torch.float64, generator=torch.Generator().manual_seed(checked))
        want = list(gm(x))
        prog = split(gm, stage_of, d)
        assert [st.index for st in prog.stages] == list(range(d))
        got = _run(prog, x)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        checked += 1
    assert late_input_free >= 10, "the generator must put input-free nodes on later stages than later nodes"


def test_non_monotone_assignment_is_a_partition_error():
    gm = _random_graph(random.Random(0), 8)
    compute = [n for n in gm.graph.nodes if n.op in ("call_function", "call_module")]
    user = next(n for n in compute if any(a.op != "placeholder" for a in n.all_input_nodes))
    producer = next(a for a in user.all_input_nodes if a.op != "placeholder")
    stage_of = {n.name: 0 for n in compute}
    stage_of[producer.name] = 1
    with pytest.raises(fxpipe.PartitionError, match=rf"{user.name!r} on stage 0 reads {producer.name!r} on stage 1"):
        split(gm, stage_of, 2)


class ArangeNet(nn.Module):
    """The reproduction of issue 10: ``torch.arange`` reads no input and is added after the last layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)

    def forward(self, x):
        pos = torch.arange(64, dtype=x.dtype)
        return self.b(torch.relu(self.a(x))) + pos


@pytest.mark.parametrize("schedule", ["2bw", "flush"])
def test_input_free_node_on_a_later_stage_compiles_and_trains_exactly(schedule):
    from fxpipe.api import prepare
    from fxpipe.passes.partition import plan_from_assignment

    torch.manual_seed(0)
    model = ArangeNet().double()
    x, y = torch.randn(8, 64, dtype=torch.float64), torch.randn(8, 64, dtype=torch.float64)
    batches = batches_for(x, y, n=3)
    ref_losses, ref = reference_losses(model, batches, torch.nn.functional.mse_loss, 4, schedule)
    # the solver's plan, and a hand-made one with `arange` (first in graph order) on the last stage
    cg = prepare(model, (x,), num_microbatches=4)
    compute = [n.name for n in cg.gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    assert compute[0] == "arange"
    stage_of = {n: (0 if n in ("a", "relu") else 1) for n in compute}
    forced = plan_from_assignment(cg.gm, cg.cost_model, stage_of, [False, False], num_microbatches=4,
                                  schedule=schedule, solver="hand")
    for given in (None, forced):
        pipe = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=2, num_microbatches=4, schedule=schedule,
                              loss_fn=torch.nn.functional.mse_loss, optimizer=SGDM, plan=given)
        got = [pipe.step(bx, by).item() for bx, by in batches]
        assert got == pytest.approx(ref_losses, abs=1e-12, rel=0)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(pipe.state_dict()[k], v, atol=1e-12, rtol=0, msg=k)
    assert pipe.plan.stage_of()["arange"] == 1
