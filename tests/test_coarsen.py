"""Coarsening: blocks cover every node once, form an acyclic block graph, keep hinted cuts."""

from __future__ import annotations

import random

from fxpipe.errors import ConfigError
from fxpipe.passes.coarsen import coarsen, coarsen_costs, graph_costs
from fxpipe.passes.dp import best_contiguous_split
from test_partition import FakeCostModel, gpt_like, random_dag

import pytest


def _check_blocks(gm, blocks) -> dict[str, int]:
    names = [n.name for n in gm.graph.nodes if n.op == "call_function"]
    flat = [x for b in blocks for x in b]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
    block_of = {x: i for i, b in enumerate(blocks) for x in b}
    for n in gm.graph.nodes:
        for u in n.users:
            if n.name in block_of and u.name in block_of:
                assert block_of[n.name] <= block_of[u.name]   # blocks in topological order
    return block_of


def test_small_graphs_are_not_coarsened() -> None:
    gm = random_dag(random.Random(0), 8)
    blocks = coarsen(gm, FakeCostModel(), num_stages=2)
    assert blocks == [(f"n{i}",) for i in range(8)]


def test_gpt_like_blocks() -> None:
    gm = gpt_like(48)
    cm = FakeCostModel(bandwidth=25e9)
    blocks = coarsen(gm, cm, num_stages=16)
    block_of = _check_blocks(gm, blocks)
    assert 150 <= len(blocks) <= 400
    # shape ints (0 output bytes) share a block with their first consumer
    gc = graph_costs(gm, cm)
    for v in range(gc.n):
        if gc.out_bytes[v] == 0 and gc.consumers[v]:
            assert block_of[gc.names[v]] == block_of[gc.names[gc.consumers[v][0]]]


def test_stage_hint_is_kept_representable() -> None:
    gm = gpt_like(12)
    cm = FakeCostModel(bandwidth=25e9)
    sp = best_contiguous_split(gm, cm, num_stages=5, num_microbatches=5)
    blocks = coarsen(gm, cm, num_stages=5, min_blocks=10, blocks_per_stage=4,
                     stage_hint=sp.stage_of)
    _check_blocks(gm, blocks)
    for b in blocks:
        assert len({sp.stage_of[x] for x in b}) == 1
    assert len(blocks) < 120


def test_zero_cost_graph_and_errors() -> None:
    gm = gpt_like(4)
    gc = graph_costs(gm, FakeCostModel())
    zero = gc.__class__(**{**gc.__dict__, "fwd": (0.0,) * gc.n, "bwd": (0.0,) * gc.n})
    blocks = coarsen_costs(zero, num_stages=2, blocks_per_stage=4, min_blocks=8)
    assert sorted(v for b in blocks for v in b) == list(range(gc.n)) and len(blocks) >= 2
    with pytest.raises(ConfigError):
        coarsen(gm, FakeCostModel(), num_stages=0)
