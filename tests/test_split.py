"""passes/split.py: generated stage modules, direct skip routing, buffers and tied parameters."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fxpipe.errors import PartitionError
from fxpipe.passes.specialize import specialize_shapes
from fxpipe.passes.split import split
from fxpipe.trace import trace
from models import CASES


def _prepared(case):
    model, x, y, _ = CASES[case]()
    gm = trace(model, (x[:2],))
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x[:2])
    specialize_shapes(gm)
    compute = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    return model, x, gm, compute


def _run(program, x):
    outs = {}
    for st in program.stages:
        args = []
        for s in st.sources:
            args.append(x if s.kind == "input" else program.root.get_buffer(s.name) if s.kind == "attr"
                        else outs[s.stage][s.index])
        outs[st.index] = st.module(*args)
    return outs[program.output_sources[0].stage][program.output_sources[0].index]


@pytest.mark.parametrize("case", ["mlp", "skip", "gpt"])
@pytest.mark.parametrize("d", [1, 2, 4])
def test_split_reproduces_model(case, d):
    model, x, gm, compute = _prepared(case)
    stage_of = {n.name: i * d // len(compute) for i, n in enumerate(compute)}
    prog = split(gm, stage_of, d)
    assert [st.index for st in prog.stages] == list(range(d))
    torch.testing.assert_close(_run(prog, x[:2]), model(x[:2]), atol=0, rtol=0)


def test_skip_goes_straight_to_consumer():
    model, x, gm, compute = _prepared("skip")
    d = 3
    stage_of = {n.name: i * d // len(compute) for i, n in enumerate(compute)}
    prog = split(gm, stage_of, d)
    last = prog.stages[-1]
    assert any(s.kind == "stage" and s.stage == 0 for s in last.sources), "h0 must come from stage 0 directly"
    assert 2 in prog.stages[0].consumers
    assert any(s.kind == "attr" and s.name == "scale" for st in prog.stages for s in st.sources)


def test_specialize_removes_shape_values():
    _, _, gm, _ = _prepared("gpt")
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        assert n.op in ("placeholder", "output", "get_attr") or isinstance(v, torch.Tensor) or \
            isinstance(v, (tuple, list)), n.format_node()


def test_split_errors():
    _, _, gm, compute = _prepared("mlp")
    with pytest.raises(PartitionError, match="has no stage"):
        split(gm, {}, 2)
    with pytest.raises(PartitionError, match=r"stages \[1\] of 3 received no node"):
        split(gm, {n.name: (0 if i < 2 else 2) for i, n in enumerate(compute)}, 3)
