"""CP-SAT partitioner: optimality against exhaustive search, memory limits, errors, determinism.

The graph helpers at the top (``make_graph``, ``gpt_like``, ``ref_eval``) are
shared by test_dp.py, test_coarsen.py and test_baselines.py.
"""

from __future__ import annotations

import itertools
import random
from typing import Sequence

import pytest
import torch
import torch.fx

from fxpipe.cost_models.memory import in_flight, stage_memory
from fxpipe.errors import ConfigError, InfeasibleMemoryError, PartitionError, PlanFormatError
from fxpipe.ir import META_COST, META_PARAM_BYTES, META_PARAMS, NodeCost, Plan
from fxpipe.passes.coarsen import graph_costs
from fxpipe.passes.partition import partition, plan_from_assignment



class FakeCostModel:
    """comm_time = latency + bytes / bandwidth; node costs come from the meta."""

    def __init__(self, bandwidth: float = 1e9, latency: float = 0.0) -> None:
        self.bandwidth, self.latency = bandwidth, latency

    def node_cost(self, node: torch.fx.Node) -> NodeCost:
        return node.meta[META_COST]

    def comm_time(self, nbytes: int) -> float:
        return self.latency + nbytes / self.bandwidth


def _op(*xs):  # the graphs are never run
    return xs[0]


def make_graph(preds: Sequence[Sequence[int]], costs: Sequence[NodeCost], *,
               params: dict[int, tuple[str, ...]] | None = None,
               param_bytes: dict[str, int] | None = None, input_bytes: int = 64,
               returns: Sequence[int] | None = None,
               modules: dict[int, dict] | None = None) -> torch.fx.GraphModule:
    """A graph of call_function nodes n0..n{k-1}; node i reads ``preds[i]`` (or the input x)."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta[META_COST] = NodeCost(output_bytes=input_bytes)
    nodes: list[torch.fx.Node] = []
    for i, c in enumerate(costs):
        args = tuple(nodes[j] for j in preds[i]) or (x,)
        nd = g.create_node("call_function", _op, args, name=f"n{i}")
        nd.meta[META_COST] = c
        nd.meta[META_PARAMS] = tuple((params or {}).get(i, ()))
        if modules and i in modules:
            nd.meta["nn_module_stack"] = modules[i]
        nodes.append(nd)
    rets = list(returns) if returns is not None else [len(costs) - 1]
    g.output(tuple(nodes[i] for i in rets) if len(rets) > 1 else nodes[rets[0]])
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    gm.meta[META_PARAM_BYTES] = dict(param_bytes or {})
    return gm


def random_costs(rng: random.Random, n: int, *, params: bool = True,
                 act: int = 100) -> list[NodeCost]:
    return [NodeCost(fwd_time=rng.uniform(1, 3), bwd_time=rng.uniform(2, 6),
                     activation_bytes=rng.randint(10, act), output_bytes=rng.randint(5, 50),
                     param_bytes=rng.randint(0, 40) if params else 0) for _ in range(n)]


def chain(rng: random.Random, n: int, act: int = 100) -> torch.fx.GraphModule:
    """A chain; node costs random, each node with a private parameter (via NodeCost.param_bytes)."""
    costs = random_costs(rng, n, act=act)
    g = make_graph([[i - 1] if i else [] for i in range(n)], costs)
    for nd in g.graph.nodes:  # private parameters through NodeCost.param_bytes
        nd.meta.pop(META_PARAMS, None)
    return g


def gpt_like(layers: int, *, vocab_params: int = 160_000_000, unit: float = 1e-4,
             hidden_bytes: int = 3_276_800) -> torch.fx.GraphModule:
    """A GPT-2-like layered DAG (~30 nodes per layer, residual skips, shape ints, a tied head).

    Per layer: layernorm (6 nodes), qkv, 3 getitems, 3 view+transpose pairs using a
    shape int, attention (5 nodes), output matmul, transpose, view, proj, residual
    add, layernorm (4 nodes), fc, gelu, proj, residual add.
    """
    preds: list[list[int]] = []
    costs: list[NodeCost] = []
    params: dict[int, tuple[str, ...]] = {}
    pbytes: dict[str, int] = {"wte": vocab_params, "wpe": 3_276_800}
    modules: dict[int, dict] = {}
    H = hidden_bytes

    def add(pr, f, out, act=None, ps=(), mod=None, bwd=2.0):
        preds.append(list(pr))
        costs.append(NodeCost(fwd_time=f * unit, bwd_time=bwd * f * unit,
                              activation_bytes=out if act is None else act, output_bytes=out))
        if ps:
            params[len(costs) - 1] = tuple(ps)
        if mod is not None:
            modules[len(costs) - 1] = mod
        return len(costs) - 1

    tok = add([], 0.05, H, ps=("wte",))
    pos = add([], 0.01, H, ps=("wpe",))
    x = add([tok, pos], 0.02, H)
    for l in range(layers):
        m = {f"h.{l}": (f"h.{l}", "Block")}
        p = lambda name: f"h.{l}.{name}"  # noqa: E731
        for name, nb in (("ln1", 6400), ("attn", 19_660_800), ("proj", 5_120_000),
                         ("ln2", 6400), ("fc", 20_480_000), ("proj2", 20_480_000)):
            pbytes[p(name)] = nb
        size = add([x], 0.001, 0, act=0, mod=m, bwd=0.0)
        mean = add([x], 0.02, H // 1600, mod=m)
        sub = add([x, mean], 0.02, H, mod=m)
        var = add([sub], 0.02, H // 1600, mod=m)
        mul = add([sub, var], 0.02, H, mod=m)
        ln = add([mul], 0.03, H, ps=(p("ln1"),), mod=m)
        qkv = add([ln], 3.0, 3 * H, ps=(p("attn"),), mod=m)
        tq, tk, tv = [add([add([add([qkv], 0.001, H, act=0, mod=m), size], 0.001, H, act=0, mod=m)],
                          0.001, H, act=0, mod=m) for _ in range(3)]
        att = add([tq, tk], 0.6, 16 * H, mod=m)
        sc = add([att], 0.1, 16 * H, mod=m)
        mk = add([sc], 0.1, 16 * H, act=0, mod=m)
        sm = add([mk], 0.2, 16 * H, mod=m)
        y = add([sm, tv], 0.6, H, mod=m)
        ty = add([y], 0.01, H, act=0, mod=m)
        vy = add([ty, size], 0.001, H, act=0, mod=m)
        proj = add([vy], 1.0, H, ps=(p("proj"),), mod=m)
        a1 = add([x, proj], 0.02, H, act=0, mod=m)
        mean2 = add([a1], 0.02, H // 1600, mod=m)
        sub2 = add([a1, mean2], 0.02, H, mod=m)
        ln2 = add([sub2], 0.03, H, ps=(p("ln2"),), mod=m)
        fc = add([ln2], 4.0, 4 * H, ps=(p("fc"),), mod=m)
        ge = add([fc], 0.1, 4 * H, mod=m)
        pr2 = add([ge], 4.0, H, ps=(p("proj2"),), mod=m)
        x = add([a1, pr2], 0.02, H, act=0, mod=m)
    lnf = add([x], 0.05, H, ps=("lnf",))
    pbytes["lnf"] = 6400
    head = add([lnf], 6.0, 15 * H, ps=("wte",))
    return make_graph(preds, costs, params=params, param_bytes=pbytes, input_bytes=8192,
                      returns=[head], modules=modules)


def ref_eval(gm: torch.fx.GraphModule, cm: FakeCostModel, stage_of: dict[str, int],
             flags: Sequence[bool], *, m: int, schedule: str = "2bw",
             k: int = 0) -> tuple[float, list[int]]:
    """Bottleneck and per-stage memory, computed straight from the graph (independent code)."""
    d = len(flags)
    comp = [n for n in gm.graph.nodes if n.op == "call_function"]
    pb = gm.meta[META_PARAM_BYTES]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    returned = {a.name for a in out_node.all_input_nodes}
    times, mems = [], []
    for s in range(d):
        mine = [n for n in comp if stage_of[n.name] == s]
        cost = [n.meta[META_COST] for n in mine]
        f = sum(c.fwd_time for c in cost)
        b = sum(c.bwd_time for c in cost)
        a = sum(c.activation_bytes for c in cost)
        params: dict[str, int] = {}
        for n, c in zip(mine, cost):
            if META_PARAMS in n.meta:
                params.update({p: pb[p] for p in n.meta[META_PARAMS]})
            elif c.param_bytes:
                params[n.name] = c.param_bytes
        comm, ibytes, xbytes, seen = 0.0, 0, 0, set()   # I_s: all inputs; X_s: from earlier stages
        for n in mine:
            for a_ in n.all_input_nodes:
                if a_.name in seen:
                    continue
                if a_.op == "placeholder":
                    seen.add(a_.name)
                    ibytes += a_.meta[META_COST].output_bytes
                elif stage_of[a_.name] < s:
                    seen.add(a_.name)
                    ob = a_.meta[META_COST].output_bytes
                    comm += 2 * cm.comm_time(ob) if ob else 0.0
                    ibytes += ob
                    xbytes += ob
        if s == d - 1:
            for n in comp:
                if n.name in returned and stage_of[n.name] < s and n.name not in seen:
                    ob = n.meta[META_COST].output_bytes
                    comm += 2 * cm.comm_time(ob) if ob else 0.0
                    ibytes += ob
                    xbytes += ob
        times.append(f + b + (f if flags[s] else 0.0) + comm)
        n_s = in_flight(schedule, d, s, m)
        copies = 2 + k + (1 if schedule == "2bw" else 0)
        stash = n_s * ibytes + a if flags[s] else n_s * (a + xbytes)   # written out, not stage_memory
        mems.append(sum(params.values()) * copies + stash)
    return max(times), mems


def brute_force(gm: torch.fx.GraphModule, cm: FakeCostModel, d: int, *, m: int,
                limit: int | None = None, schedule: str = "2bw", k: int = 0,
                recompute: bool | None = None) -> tuple[float, int]:
    """(best bottleneck, smallest max memory) over every monotone assignment and flag vector."""
    comp = [n for n in gm.graph.nodes if n.op == "call_function"]
    best, best_mem = float("inf"), None
    flag_sets = ([tuple([recompute] * d)] if recompute is not None
                 else list(itertools.product([False, True], repeat=d)))
    for assign in itertools.product(range(d), repeat=len(comp)):
        st = dict(zip((n.name for n in comp), assign))
        if len(set(assign)) < d or any(st[a.name] > st[n.name] for n in comp
                                       for a in n.all_input_nodes if a.name in st):
            continue
        for flags in flag_sets:
            t, mems = ref_eval(gm, cm, st, flags, m=m, schedule=schedule, k=k)
            best_mem = max(mems) if best_mem is None else min(best_mem, max(mems))
            if limit is None or max(mems) <= limit:
                best = min(best, t)
    return best, best_mem  # type: ignore[return-value]


def check_plan(plan: Plan, gm: torch.fx.GraphModule, cm: FakeCostModel, *, m: int,
               schedule: str = "2bw", k: int = 0) -> None:
    """The plan's own figures agree with ref_eval; n_s as docs/cost-model.md."""
    d = plan.num_stages
    t, mems = ref_eval(gm, cm, plan.stage_of(), [s.recompute for s in plan.stages], m=m,
                       schedule=schedule, k=k)
    assert plan.bottleneck == pytest.approx(t, rel=1e-9)
    assert [s.memory for s in plan.stages] == mems
    for s in plan.stages:
        assert s.in_flight == (m if schedule == "gpipe" else min(d - s.index, m))
        assert s.nodes
    if plan.memory_limit is not None:
        assert max(mems) <= plan.memory_limit
    assert plan.lower_bound <= plan.bottleneck * (1 + 1e-9)


def random_dag(rng: random.Random, n: int, *, tied: bool = True) -> torch.fx.GraphModule:
    """Random DAG: each node reads 1-2 earlier nodes (skips included); a tied parameter."""
    preds: list[list[int]] = []
    for i in range(n):
        if i == 0:
            preds.append([])
        else:
            k = rng.choice([1, 1, 2])
            preds.append(sorted(set(rng.sample(range(i), min(k, i)))))
    costs = random_costs(rng, n, params=False)
    params = {i: (f"w{i}",) for i in range(n) if rng.random() < 0.6}
    pbytes = {f"w{i}": rng.randint(5, 60) for i in range(n)}
    if tied:
        a, b = 0, n - 1
        params[a] = params.get(a, ()) + ("tied",)
        params[b] = params.get(b, ()) + ("tied",)
        pbytes["tied"] = 80
    sinks = [i for i in range(n) if not any(i in p for p in preds)]
    return make_graph(preds, costs, params=params, param_bytes=pbytes, returns=sinks)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("d", [2, 3, 4])
def test_chain_matches_exhaustive_search(seed: int, d: int) -> None:
    rng = random.Random(100 * seed + d)
    gm = chain(rng, 9)
    cm = FakeCostModel(bandwidth=rng.choice([5.0, 20.0, 1e9]))
    m = rng.choice([d, 2 * d])
    best, _ = brute_force(gm, cm, d, m=m)
    plan = partition(gm, cm, num_stages=d, num_microbatches=m)
    check_plan(plan, gm, cm, m=m)
    assert plan.bottleneck == pytest.approx(best, rel=1e-6)
    assert plan.optimal


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("d", [2, 3, 4])
def test_chain_tight_memory_forces_recompute(seed: int, d: int) -> None:
    rng = random.Random(7 + 31 * seed + d)
    gm = chain(rng, 9, act=400)
    cm = FakeCostModel(bandwidth=10.0)
    m, k = 2 * d, 1
    _, mem_nr = brute_force(gm, cm, d, m=m, k=k, recompute=False)
    _, mem_r = brute_force(gm, cm, d, m=m, k=k, recompute=True)
    if mem_r >= mem_nr:
        pytest.skip("recomputation does not save memory on this draw")
    limit = (mem_r + mem_nr) // 2
    best, _ = brute_force(gm, cm, d, m=m, k=k, limit=limit)
    plan = partition(gm, cm, num_stages=d, num_microbatches=m, memory_limit=limit,
                     optimizer_slots=k)
    check_plan(plan, gm, cm, m=m, k=k)
    assert any(s.recompute for s in plan.stages)
    assert plan.bottleneck == pytest.approx(best, rel=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_dag_matches_exhaustive_search(seed: int) -> None:
    rng = random.Random(seed)
    n, d = rng.choice([(6, 3), (7, 2), (8, 2), (7, 3)])
    gm = random_dag(rng, n)
    cm = FakeCostModel(bandwidth=rng.choice([4.0, 15.0]))
    m = 4
    best, _ = brute_force(gm, cm, d, m=m)
    plan = partition(gm, cm, num_stages=d, num_microbatches=m, coarsen=False)
    check_plan(plan, gm, cm, m=m)
    assert plan.bottleneck == pytest.approx(best, rel=1e-6)
    assert plan.optimal


@pytest.mark.parametrize("seed", range(4))
def test_dag_with_memory_limit_matches_exhaustive_search(seed: int) -> None:
    rng = random.Random(50 + seed)
    n, d = rng.choice([(6, 3), (7, 2), (6, 2)])
    gm = random_dag(rng, n)
    cm = FakeCostModel(bandwidth=8.0)
    m, k, schedule = 3, 2, rng.choice(["2bw", "gpipe", "flush"])
    _, mem_any = brute_force(gm, cm, d, m=m, k=k, schedule=schedule)
    _, mem_nr = brute_force(gm, cm, d, m=m, k=k, schedule=schedule, recompute=False)
    limit = (mem_any + mem_nr) // 2 + 1 if mem_any < mem_nr else mem_any
    best, _ = brute_force(gm, cm, d, m=m, k=k, schedule=schedule, limit=limit)
    plan = partition(gm, cm, num_stages=d, num_microbatches=m, memory_limit=limit,
                     optimizer_slots=k, schedule=schedule, coarsen=False)
    check_plan(plan, gm, cm, m=m, k=k, schedule=schedule)
    assert plan.bottleneck == pytest.approx(best, rel=1e-6)


def test_skip_connection_is_paid_once_at_its_consumer() -> None:
    # n0 -> n1 -> n2 -> n3, and n0 -> n3: four stages; n0's value goes straight to stage 3.
    costs = [NodeCost(fwd_time=1, bwd_time=1, output_bytes=10) for _ in range(4)]
    gm = make_graph([[], [0], [1], [2, 0]], costs)
    cm = FakeCostModel(bandwidth=10.0)   # comm 2 * 1.0 per value
    plan = partition(gm, cm, num_stages=4, num_microbatches=4)
    assert [s.comm_time for s in plan.stages] == [0.0, 2.0, 2.0, 4.0]
    assert [s.input_bytes for s in plan.stages] == [64, 10, 10, 20]
    assert set(plan.cut_edges) == {("n0", "n1"), ("n1", "n2"), ("n2", "n3"), ("n0", "n3")}
    # where X_s comes from: stage 3's 20 B are n2's 10 from stage 2 and n0's 10 straight from stage 0
    assert [s.received_from for s in plan.stages] == [(), ((0, 10),), ((1, 10),), ((0, 10), (2, 10))]
    assert plan.transfers() == {(0, 1): 10, (1, 2): 10, (0, 3): 10, (2, 3): 10}
    back = Plan.from_json(plan.to_json())
    assert back == plan and back.stages[3].received_from == ((0, 10), (2, 10))
    # JSON written before received_from existed still loads: all of X_s then comes from stage s - 1
    old = plan.to_dict()
    old["stages"] = [{k: v for k, v in st.items() if k != "received_from"} for st in old["stages"]]
    legacy = Plan.from_dict(old)
    assert [s.received_from for s in legacy.stages] == [()] * 4
    assert legacy.transfers() == {(0, 1): 10, (1, 2): 10, (2, 3): 20}
    from fxpipe.runtime.agree import plan_digest     # what ranks compare: the same structure, either JSON

    assert plan_digest(back) == plan_digest(legacy) == plan_digest(plan)
    bad = plan.to_dict()
    bad["stages"][3]["received_from"] = [[0, 10], [3, 10]]
    with pytest.raises(PlanFormatError, match=r"Plan stage 3: received_from must be \[\[producer stage, bytes\], "
                                              r"\.\.\.\] with distinct producers in 0\.\.2, .* summing to "
                                              r"received_bytes=20; got \[\[0, 10\], \[3, 10\]\]"):
        Plan.from_dict(bad)
    bad["stages"][3]["received_from"] = [[0, 10], [2, 9]]
    with pytest.raises(PlanFormatError, match="summing to received_bytes=20"):
        Plan.from_dict(bad)


def test_tied_parameter_counts_on_both_stages() -> None:
    costs = [NodeCost(fwd_time=1, bwd_time=1, output_bytes=1) for _ in range(3)]
    gm = make_graph([[], [0], [1]], costs, params={0: ("wte",), 2: ("wte",), 1: ("w1",)},
                    param_bytes={"wte": 100, "w1": 7})
    plan = plan_from_assignment(gm, FakeCostModel(), {"n0": 0, "n1": 0, "n2": 1}, [False, False],
                                num_microbatches=2, schedule="flush")
    assert [s.param_bytes for s in plan.stages] == [107, 100]


def test_infeasible_limit_raises_with_bound() -> None:
    from fxpipe.passes.coarsen import graph_costs
    from fxpipe.passes.partition import memory_lower_bound

    cm = FakeCostModel(bandwidth=8.0)
    for seed in range(50):  # a draw where the cheap bound does not already decide
        gm = random_dag(random.Random(seed), 6)
        _, mem_min = brute_force(gm, cm, 2, m=4, k=2)
        cheap = memory_lower_bound(graph_costs(gm, cm), num_stages=2, num_microbatches=4,
                                   schedule="2bw", optimizer_slots=2, recompute=None)
        if cheap < mem_min - 1:
            break
    limit = mem_min - 1
    with pytest.raises(InfeasibleMemoryError, match=r"(?i)raise memory_limit to at least \d+") as ei:
        partition(gm, cm, num_stages=2, num_microbatches=4, memory_limit=limit, optimizer_slots=2)
    e = ei.value
    assert e.memory_limit == limit
    assert limit < e.min_feasible <= mem_min          # a valid lower bound
    assert str(e.min_feasible) in str(e)
    assert e.binding_stage is not None and f"stage {e.binding_stage} of 2 binds" in str(e)
    # A limit far below any single node fails before solving, still with a bound.
    with pytest.raises(InfeasibleMemoryError, match="more stages") as ei:
        partition(gm, cm, num_stages=2, num_microbatches=4, memory_limit=5, optimizer_slots=2)
    assert 5 < ei.value.min_feasible <= mem_min
    # The bound is usable: at that limit a plan exists.
    assert partition(gm, cm, num_stages=2, num_microbatches=4, memory_limit=mem_min,
                     optimizer_slots=2).stages


def test_config_errors() -> None:
    gm = chain(random.Random(0), 5)
    cm = FakeCostModel()
    with pytest.raises(ConfigError, match=r"num_stages=6 .*\(5\)"):
        partition(gm, cm, num_stages=6, num_microbatches=8)
    with pytest.raises(ConfigError, match=r"num_stages=0"):
        partition(gm, cm, num_stages=0, num_microbatches=8)
    with pytest.raises(ConfigError, match="unknown schedule 'pipedream'"):
        partition(gm, cm, num_stages=2, num_microbatches=8, schedule="pipedream")
    with pytest.raises(ConfigError, match="num_microbatches"):
        partition(gm, cm, num_stages=2, num_microbatches=0)


def test_missing_cost_names_the_node() -> None:
    gm = chain(random.Random(0), 3)
    del next(n for n in gm.graph.nodes if n.name == "n1").meta[META_COST]
    with pytest.raises(PartitionError, match="n1.*annotate"):
        partition(gm, None, num_stages=2, num_microbatches=2)  # type: ignore[arg-type]


def test_plan_from_assignment_rejects_bad_assignments() -> None:
    costs = [NodeCost(fwd_time=1, bwd_time=1, activation_bytes=10, output_bytes=1)] * 4
    gm = make_graph([[], [0], [1], [2]], costs)
    cm = FakeCostModel()
    kw = dict(num_microbatches=2, schedule="2bw")
    with pytest.raises(PartitionError, match="'n3' has no stage"):
        plan_from_assignment(gm, cm, {"n0": 0, "n1": 0, "n2": 1}, [False, False], **kw)
    with pytest.raises(PartitionError, match="n1 -> n2 goes from stage 1 back to stage 0"):
        plan_from_assignment(gm, cm, {"n0": 0, "n1": 1, "n2": 0, "n3": 1}, [False, False], **kw)
    with pytest.raises(PartitionError, match="stage 1 of 3 has no compute node"):
        plan_from_assignment(gm, cm, {"n0": 0, "n1": 0, "n2": 2, "n3": 2}, [False] * 3, **kw)
    with pytest.raises(PartitionError, match="stage 5"):
        plan_from_assignment(gm, cm, {"n0": 0, "n1": 0, "n2": 1, "n3": 5}, [False] * 2, **kw)
    with pytest.raises(PartitionError, match="'nope', which is not a node"):
        plan_from_assignment(gm, cm, {"n0": 0, "n1": 0, "n2": 1, "n3": 1, "nope": 0},
                             [False] * 2, **kw)
    with pytest.raises(PartitionError, match="stage 0 needs 40 bytes, over memory_limit=30"):
        plan_from_assignment(gm, cm, {"n0": 0, "n1": 0, "n2": 1, "n3": 1}, [False] * 2,
                             memory_limit=30, **kw)
    ok = plan_from_assignment(gm, cm, {"n0": 0, "n1": 0, "n2": 1, "n3": 1, "x": 0}, [False] * 2,
                              **kw)
    assert ok.stages[0].nodes == ("n0", "n1") and ok.cut_edges == (("n1", "n2"),)


def test_plans_repeat_exactly_and_round_trip_json() -> None:
    gm = gpt_like(6)
    cm = FakeCostModel(bandwidth=25e9)
    kw = dict(num_stages=4, num_microbatches=8, memory_limit=3 * 10**9, optimizer_slots=2,
              time_limit=4.0)
    a = partition(gm, cm, **kw)
    b = partition(gm, cm, **kw)
    assert a.stages == b.stages and a.cut_edges == b.cut_edges and a.bottleneck == b.bottleneck
    assert a.extra["status"] == b.extra["status"]
    check_plan(a, gm, cm, m=8, k=2)
    back = Plan.from_json(a.to_json())
    assert back == a
    assert back.extra["status"] == a.extra["status"]


def test_coarsened_gpt_like_beats_or_ties_the_dp() -> None:
    from fxpipe.passes.dp import dp_plan

    gm = gpt_like(16)          # ~520 nodes
    cm = FakeCostModel(bandwidth=25e9)
    kw = dict(num_stages=8, num_microbatches=8, memory_limit=4 * 10**9, optimizer_slots=2)
    plan = partition(gm, cm, time_limit=4.0, **kw)
    check_plan(plan, gm, cm, m=8, k=2)
    assert plan.extra["first_blocks"] < 200          # solved on a coarsened graph first
    assert plan.bottleneck <= dp_plan(gm, cm, **kw).bottleneck * (1 + 1e-9)
    assert plan.solve_time < 10


def test_memory_limited_plan_is_proven_on_the_uncoarsened_model() -> None:
    """A binding limit leaves the coarse plan above the memory-blind bound; the fine solve proves it."""
    gm = gpt_like(12)          # ~390 nodes
    cm = FakeCostModel(bandwidth=1e10)
    free = partition(gm, cm, num_stages=8, num_microbatches=16, time_limit=10.0)
    limit = int(0.85 * max(s.memory for s in free.stages))
    # wall_limit: only CP-SAT's deterministic time decides, so a loaded machine gets the same proof
    plan = partition(gm, cm, num_stages=8, num_microbatches=16, memory_limit=limit, time_limit=10.0,
                     wall_limit=120.0)
    check_plan(plan, gm, cm, m=16)
    assert max(s.memory for s in plan.stages) <= limit
    assert plan.bottleneck > free.bottleneck * 1.01        # the limit costs time: the first bound is loose
    assert plan.extra["fine_proof"] and plan.extra["first_blocks"] < 389
    assert plan.optimal and plan.gap < 1e-3, (plan.gap, plan.extra["status"])


def test_forced_recompute_flags_are_kept() -> None:
    gm = chain(random.Random(1), 6)
    cm = FakeCostModel()
    on = partition(gm, cm, num_stages=2, num_microbatches=2, recompute=True)
    off = partition(gm, cm, num_stages=2, num_microbatches=2, recompute=False)
    free = partition(gm, cm, num_stages=2, num_microbatches=2)
    assert all(s.recompute for s in on.stages)
    assert not any(s.recompute for s in off.stages + free.stages)
    assert on.bottleneck >= off.bottleneck == pytest.approx(free.bottleneck)


def _head_heavy_chain() -> torch.fx.GraphModule:
    """9 light nodes (F+B = 3) then one heavy head (F+B = 30): the head's stage is the bottleneck."""
    n = 10
    costs = [NodeCost(fwd_time=10.0, bwd_time=20.0, output_bytes=8) if i == n - 1
             else NodeCost(fwd_time=1.0, bwd_time=2.0, output_bytes=8) for i in range(n)]
    return make_graph([[i - 1] if i else [] for i in range(n)], costs)


def test_ties_go_to_the_balanced_plan() -> None:
    """Of plans with the optimal bottleneck, the tie-break keeps one whose other stages are even."""
    from fxpipe.passes.refine import Search

    gm, cm = _head_heavy_chain(), FakeCostModel(latency=0.1)
    opts = dict(num_microbatches=4, schedule="2bw", memory_limit=None, optimizer_slots=0)
    lopsided = plan_from_assignment(gm, cm, {f"n{i}": (0, 1, 2, 2, 2, 2, 2, 2, 2, 3)[i] for i in range(10)},
                                    [False] * 4, **opts)
    assert [round(s.time, 6) for s in lopsided.stages] == [3.0, 3.2, 21.2, 30.2]
    search = Search(gm, cm, graph_costs(gm, cm), num_stages=4, recompute=None, time_limit=5.0,
                    num_workers=1, opts=opts)
    at = search.attempt(search.singletons, 5.0)
    plan, imbalance = search.balance(at, lopsided)
    assert plan.bottleneck == pytest.approx(lopsided.bottleneck, rel=1e-9)
    assert [len(s.nodes) for s in plan.stages] == [3, 3, 3, 1] and imbalance is not None
    full = partition(gm, cm, num_stages=4, num_microbatches=4)
    assert [len(s.nodes) for s in full.stages] == [3, 3, 3, 1]
    assert full.solve_info is not None and full.solve_info.imbalance is not None


def test_local_executor_prices_transfers_in_process_and_balances_nanogpt() -> None:
    """nanoGPT-style model at 4 stages on this machine: transfers cost microseconds, stages are even."""
    import fxpipe
    from fxpipe.cost_models.evaluator import IN_PROCESS_TRANSFER_SECONDS
    from models import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(vocab=64, d=32, n_layer=6, n_head=2, block=16)
    x = torch.randint(0, 64, (8, 16))
    local = fxpipe.plan(model, (x,), num_stages=4, num_microbatches=4, executor="local", time_limit=5.0)
    counts = [len(s.nodes) for s in local.stages]
    assert max(counts) <= 2 * min(counts), counts
    for s in local.stages:   # comm = 2 * (one way) per value entering the stage
        assert s.comm_time <= 2 * IN_PROCESS_TRANSFER_SECONDS * max(1, len(local.cut_edges))
    remote = fxpipe.plan(model, (x,), num_stages=4, num_microbatches=4, executor="distributed",
                         time_limit=5.0)
    assert max(s.comm_time for s in remote.stages) > 10 * max(s.comm_time for s in local.stages)
