"""One rank of a multi-process test: ``python tests/dist_worker.py MODE OUT_DIR [args]`` under RANK/WORLD_SIZE env.

Also the launcher the tests use (:func:`launch`): one subprocess per rank, like torchrun, each
with its own exit code and log, all killed after a hard timeout.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

SGDM = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)  # noqa: E731 - same as test_pipeline


# -- building a pipeline (fxpipe.compile once every pass has landed) -----------------
def _have_full_compiler() -> bool:
    if os.environ.get("FXPIPE_TEST_UNIFORM_SPLIT") == "1":   # build from a contiguous cut even if compile exists
        return False
    try:
        import fxpipe.passes.annotate  # noqa: F401
        import fxpipe.passes.partition  # noqa: F401
        import fxpipe.passes.shape_prop  # noqa: F401
    except ImportError:
        return False
    return True


def build(model, x, *, stages, m, schedule, loss_fn, optimizer=SGDM, executor="local", recompute=False,
          uniform=False):
    """fxpipe.compile(...) if the compiler is complete, else the same Pipeline built from a contiguous cut.

    ``uniform=True`` always cuts the node list into equal contiguous runs: the planner keeps
    SkipNet's skips short, the uniform cut makes them cross stages (0 -> 2) on purpose.
    """
    import fxpipe

    if _have_full_compiler() and not uniform:
        return fxpipe.compile(model, (x,), num_stages=stages, num_microbatches=m, schedule=schedule,
                              loss_fn=loss_fn, optimizer=optimizer, executor=executor, recompute=recompute)
    from torch._subclasses import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    from fxpipe.api import CompiledGraph
    from fxpipe.ir import Plan, StagePlan
    from fxpipe.passes.specialize import specialize_shapes
    from fxpipe.pipeline import Pipeline
    from fxpipe.trace import trace

    w = 1
    if executor == "distributed":
        from fxpipe.runtime.distributed import data_parallel_width, replica_share

        w = data_parallel_width(stages)
        x = replica_share(x, w, 0)
    xm = x.chunk(m)[0]
    gm = trace(model, (xm,))
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(xm)
    specialize_shapes(gm)
    nodes = [n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    per = [[n for i, n in enumerate(nodes) if i * stages // len(nodes) == s] for s in range(stages)]
    plan = Plan(stages=tuple(StagePlan(index=s, nodes=tuple(ns), recompute=recompute) for s, ns in enumerate(per)),
                num_microbatches=m, schedule=schedule, bottleneck=0.0, lower_bound=0.0, optimal=False,
                solver="uniform", data_parallel=w)
    cg = CompiledGraph(gm=gm, cost_model=None, input_names=[n.name for n in gm.graph.nodes if n.op == "placeholder"],
                       microbatch_inputs=[xm], batch_size=int(x.shape[0]), trace_seconds=0.0, annotate_seconds=0.0)
    return Pipeline(model, cg, plan, loss_fn=loss_fn, optimizer=optimizer, executor=executor)


# -- launcher -------------------------------------------------------------------------
@dataclass
class Result:
    returncodes: list[int]
    logs: list[str]
    seconds: float
    timed_out: bool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nprocs: int, args: list[str], *, timeout: float = 90.0, env: dict[str, str] | None = None) -> Result:
    """Start ``nprocs`` ranks of this script; kill everything after ``timeout`` seconds."""
    port = free_port()
    procs, logs = [], []
    t0 = time.time()
    for r in range(nprocs):
        e = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", **(env or {}))
        log = open(Path(args[1]) / f"log{r}.txt", "w+") if len(args) > 1 else subprocess.DEVNULL
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], env=e,
                                      stdout=log, stderr=subprocess.STDOUT))
    timed_out = False
    codes = []
    for p in procs:
        left = max(0.1, timeout - (time.time() - t0))
        try:
            codes.append(p.wait(timeout=left))
        except subprocess.TimeoutExpired:
            timed_out = True
            codes.append(-9)
    if timed_out:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        codes = [p.returncode for p in procs]
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    return Result(codes, texts, time.time() - t0, timed_out)


# -- modes --------------------------------------------------------------------------------
def _max_err(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in b)


def mode_matrix(out: Path, cases: str, schedules: str, stages: int) -> None:
    import models
    from test_pipeline import batches_for, reference_losses

    rank = int(os.environ["RANK"])
    w = int(os.environ["WORLD_SIZE"]) // stages
    m = 4
    res = {}
    for case in cases.split(","):
        for sched in schedules.split(","):
            t0 = time.time()
            model, x, y, loss_fn = models.CASES[case]()
            batches = batches_for(x, y)
            ref_losses, ref = reference_losses(model, batches, loss_fn, m * w, sched)
            pipe = build(model, x, stages=stages, m=m, schedule=sched, loss_fn=loss_fn, executor="distributed",
                         recompute=(case == "skip" and sched == "2bw"), uniform=(case == "skip"))
            got = [pipe.step(bx, by).item() for bx, by in batches]
            # 2bw leaves the last batch's tail in flight: what is kept of each sent output for its backward
            kept = [type(o).__name__ for _, outs, _ in pipe._executor._saved.values() for o in outs]
            pending = pipe._executor._pending_update is not None     # 2bw: an update still overlapping
            from fxpipe.calibrate import measurements

            act = [(s.activation_bytes + s.received_bytes if not s.recompute else s.input_bytes, ms.saved_bytes)
                   for s, ms in zip(pipe.plan.stages, measurements(pipe))]     # collective
            sd = pipe.state_dict()
            fwd = pipe(x)
            report = pipe.report()          # collective; measured per stage and per rank
            res[f"{case}/{sched}"] = {
                "report": report, "kept": kept, "act": act, "pending": pending,
                "loss_err": max(abs(a - b) for a, b in zip(got, ref_losses)),
                "weight_err": _max_err(sd, ref.state_dict()),
                "keys_match": sorted(sd) == sorted(ref.state_dict()),
                "forward_err": (fwd.double() - ref(x).double()).abs().max().item(),
                "seconds": time.time() - t0,
            }
    (out / f"rank{rank}.json").write_text(json.dumps(res, indent=1))


def mode_resume(out: Path, stages: int, executor: str) -> None:
    import models
    from test_pipeline import batches_for

    rank = int(os.environ.get("RANK", "0"))
    res = {}
    for case in ("gpt", "skip"):
        for sched in ("2bw", "flush"):
            model, x, y, loss_fn = models.CASES[case]()
            batches = batches_for(x, y, n=4)
            pipe = build(copy.deepcopy(model), x, stages=stages, m=4, schedule=sched, loss_fn=loss_fn,
                         executor=executor, uniform=(case == "skip"))
            for bx, by in batches[:2]:
                pipe.step(bx, by)
            ck = out / f"ckpt-{case}-{sched}"
            pipe.save(str(ck))
            first = [pipe.step(bx, by).item() for bx, by in batches[2:]]
            sd1 = pipe.state_dict()
            fresh = build(copy.deepcopy(model), x, stages=stages, m=4, schedule=sched, loss_fn=loss_fn,
                          executor=executor, uniform=(case == "skip"))
            fresh.load(str(ck))
            second = [fresh.step(bx, by).item() for bx, by in batches[2:]]
            sd2 = fresh.state_dict()
            res[f"{case}/{sched}"] = {"first": first, "second": second,
                                     "identical_weights": all(torch.equal(sd1[k], sd2[k]) for k in sd1)}
    (out / f"rank{rank}.json").write_text(json.dumps(res, indent=1))


def mode_placement(out: Path) -> None:
    """4 ranks, d=2 x w=2, a plan whose placement order is replicas-in-node (rank = stage * 2 + replica):
    each rank's place and groups; losses, weights and pipe(x) of 2bw and flush against the reference; a
    checkpoint written under that order resumes a pipeline of the same plan without one (stages-in-node)."""
    import dataclasses

    import torch.distributed as dist

    import fxpipe
    import models
    from fxpipe.runtime.groups import replica_share
    from test_pipeline import batches_for, reference_losses

    rank, stages, m = int(os.environ["RANK"]), 2, 4
    w = int(os.environ["WORLD_SIZE"]) // stages
    model0, x, y, loss_fn = models.CASES["gpt"]()       # tied embedding / head: a group over both stages
    batches = batches_for(x, y, n=4)
    base = fxpipe.plan(copy.deepcopy(model0), (replica_share(x, w, 0),), num_stages=stages, num_microbatches=m,
                       schedule="2bw", executor="local")
    placed = {"order": "replicas-in-node", "devices_per_node": 1}
    res: dict = {}
    for sched in ("2bw", "flush"):
        ref_losses, ref = reference_losses(model0, batches, loss_fn, m * w, sched)
        plan = dataclasses.replace(base, schedule=sched, extra={**base.extra, "placement": placed})
        pipe = fxpipe.compile(copy.deepcopy(model0), (x,), num_stages=stages, num_microbatches=m, schedule=sched,
                              loss_fn=loss_fn, optimizer=SGDM, executor="distributed", plan=plan)
        ex = pipe._executor
        got = [pipe.step(bx, by).item() for bx, by in batches[:2]]
        ck = out / f"ckpt-{sched}"
        if sched == "2bw":
            pipe.save(str(ck))
        got += [pipe.step(bx, by).item() for bx, by in batches[2:]]
        sd = pipe.state_dict()
        lay = ex.layout
        res[sched] = {
            "order": lay.order, "recorded": pipe.plan.extra["placement"]["order"],
            "stage": ex.stage, "replica": ex.replica, "where": [lay.where(r) for r in range(lay.world)],
            "pipeline_group": dist.get_process_group_ranks(lay.pipeline_groups[ex.replica]),
            "dp_group": dist.get_process_group_ranks(lay.dp_groups[ex.stage]),
            "loss_err": max(abs(a - b) for a, b in zip(got, ref_losses)),
            "weight_err": _max_err(sd, ref.state_dict()),
            "forward_err": (pipe(x).double() - ref(x).double()).abs().max().item(),
        }
        if sched == "2bw":      # the same stages, ranks in the other order: the checkpoint is keyed by stage
            plain = dataclasses.replace(plan, extra={k: v for k, v in plan.extra.items() if k != "placement"})
            fresh = fxpipe.compile(copy.deepcopy(model0), (x,), num_stages=stages, num_microbatches=m,
                                   schedule=sched, loss_fn=loss_fn, optimizer=SGDM, executor="distributed", plan=plain)
            fresh.load(str(ck))
            again = [fresh.step(bx, by).item() for bx, by in batches[2:]]
            sd2 = fresh.state_dict()
            # the tied weight's gradient is summed over 4 ranks in another group order: equal to rounding
            res["resumed"] = {"order": fresh._executor.layout.order, "stage": fresh._executor.stage,
                              "loss_err": max(abs(a - b) for a, b in zip(again, got[2:])), "weight_err": _max_err(sd2, sd)}
    (out / f"rank{rank}.json").write_text(json.dumps(res, indent=1))


def mode_fault(out: Path, how: str, bad_rank: int) -> None:
    """Rank ``bad_rank`` raises (how="raise") or dies (how="exit") in its 7th forward (batch 1)."""
    import models
    from test_pipeline import batches_for

    rank = int(os.environ["RANK"])
    model, x, y, loss_fn = models.CASES["mlp"]()
    pipe = build(model, x, stages=int(os.environ["WORLD_SIZE"]), m=4, schedule="2bw", loss_fn=loss_fn,
                 executor="distributed")
    ex = pipe._executor
    real_forward = ex._forward
    calls = {"n": 0}

    def forward(mb):
        calls["n"] += 1
        if rank == bad_rank and calls["n"] == 7:
            (out / "fault_time").write_text(repr(time.time()))
            if how == "exit":
                os._exit(1)
            if how == "hang":                # stuck (not dead) past every peer's timeout, then gone
                time.sleep(ex.timeout + 8)
                os._exit(3)
            raise ValueError("injected failure")
        return real_forward(mb)

    ex._forward = forward
    try:
        for bx, by in batches_for(x, y, n=6):
            pipe.step(bx, by)
        pipe.state_dict()
    except Exception:
        print(f"fxpipe-test: error raised at {time.time()!r}", flush=True)
        raise
    print("finished without error", flush=True)


def mode_safety(out: Path) -> None:
    """2 ranks, 2bw: the pending sends stay bounded over many steps; BatchNorm resumes bit-identically;
    a damaged checkpoint loads nowhere; then a loss_fn that raises on the last rank fails the step on
    every rank and every later step is refused (the ranks then end)."""
    import models
    from fxpipe.errors import DistributedError, StateDictError
    from test_pipeline import batches_for

    rank = int(os.environ["RANK"])
    res: dict = {}
    model, x, y, loss_fn = models.CASES["mlp"]()
    calls = {"n": 0, "fail_at": None}

    def flaky(out_, t):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise ValueError("injected loss failure")
        return loss_fn(out_, t)

    pipe = build(model, x, stages=2, m=4, schedule="2bw", loss_fn=flaky, executor="distributed")
    sends = []
    for bx, by in batches_for(x, y, n=16):
        pipe.step(bx, by)
        sends.append(len(pipe._executor._sends))
    res["pending_sends"] = sends

    # two 2bw pipelines stepped alternately, each leaving its tail in flight, with a user's own send on
    # the default group in between: each pipeline's messages stay its own (its own process group)
    import torch.distributed as dist
    from test_pipeline import reference_losses

    model, x, y, loss_fn = models.CASES["mlp"]()
    batches = batches_for(x, y, n=4)
    ref_losses, _ = reference_losses(model, batches, loss_fn, 4, "2bw")
    twins = [build(copy.deepcopy(model), x, stages=2, m=4, schedule="2bw", loss_fn=loss_fn, executor="distributed")
             for _ in range(2)]
    got: list[list[float]] = [[], []]
    for bx, by in batches:
        for i, tw in enumerate(twins):
            got[i].append(tw.step(bx, by).item())
            token = torch.tensor([float(rank)])
            if rank == 0:
                dist.send(token, dst=1)
            else:
                dist.recv(token, src=0)
    res["twins_loss_err"] = max(abs(a - b) for g in got for a, b in zip(g, ref_losses))
    res["twins_unfinished"] = [tw._executor._stream_base is not None for tw in twins]

    # BatchNorm: resume is bit-identical including buffers; every rank's state_dict has the owners' buffers
    bmodel, bx0, by0, bloss = models.bn_case()
    bbatches = batches_for(bx0, by0, n=4)
    bn = build(copy.deepcopy(bmodel), bx0, stages=2, m=4, schedule="2bw", loss_fn=bloss, executor="distributed")
    for bx, by in bbatches[:2]:
        bn.step(bx, by)
    ck = out / "ckpt-bn"
    bn.save(str(ck))
    torch.manual_seed(7)
    first = [bn.step(bx, by).item() for bx, by in bbatches[2:]]
    sd1 = bn.state_dict()
    fresh = build(copy.deepcopy(bmodel), bx0, stages=2, m=4, schedule="2bw", loss_fn=bloss, executor="distributed")
    fresh.load(str(ck))
    torch.manual_seed(7)
    second = [fresh.step(bx, by).item() for bx, by in bbatches[2:]]
    sd2 = fresh.state_dict()
    res["bn"] = {"first": first, "second": second, "identical": all(torch.equal(sd1[k], sd2[k]) for k in sd1),
                 "buffers": {k: v.double().sum().item() for k, v in sd1.items() if "running" in k or "num_b" in k}}
    # a checkpoint damaged in stage 1's file: rank 1 refuses it, so rank 0 loads nothing either
    if rank == 0:
        st = torch.load(ck / "stage_1.pt", weights_only=True)
        name = next(iter(st["versions"][str(st["current"])]))
        for v in st["versions"].values():
            v[name] = torch.zeros(3, 3, dtype=v[name].dtype)
        torch.save(st, ck / "stage_1.pt")
    fresh._executor.agree(True, "test barrier")
    before = fresh.state_dict()
    try:
        fresh.load(str(ck))
        res["bad_load"] = None
    except StateDictError as e:
        res["bad_load"] = str(e)
    after = fresh.state_dict()
    res["unchanged"] = all(torch.equal(before[k], after[k]) for k in before) and fresh._executor.batch == 4

    calls["fail_at"] = calls["n"] + 3            # microbatch 2 of the next batch, on the last rank
    errors = []
    for _ in range(2):
        try:
            pipe.step(x, y)
            errors.append(None)
        except DistributedError as e:
            errors.append(str(e))
    res["errors"] = errors
    (out / f"rank{rank}.json").write_text(json.dumps(res, indent=1))


def mode_interop(out: Path, schedule: str) -> None:
    import torch.distributed as dist
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    import models
    from test_pipeline import batches_for, reference_losses

    rank = int(os.environ["RANK"])
    res = {}
    for case in ("mlp", "skip"):
        model, x, y, loss_fn = models.CASES[case]()
        m = 4
        batches = batches_for(x, y)
        ref_losses, ref = reference_losses(model, batches, loss_fn, m, "flush")
        pipe = build(model, x, stages=int(os.environ["WORLD_SIZE"]), m=m, schedule="flush", loss_fn=loss_fn,
                     executor="distributed", uniform=(case == "skip"))
        stage = pipe.to_torch_pipelining()
        params = list(stage.submod.parameters())
        opt = SGDM(params) if params else None      # a planner may leave a stage without parameters
        cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        sch = cls(stage, n_microbatches=m, loss_fn=loss_fn)
        got = []
        for bx, by in batches:
            losses: list = []
            if rank == 0:
                sch.step(bx)
            elif rank == int(os.environ["WORLD_SIZE"]) - 1:
                sch.step(target=by, losses=losses)
            else:
                sch.step()
            t = torch.tensor([sum(float(v.detach()) for v in losses) / m if losses else 0.0], dtype=torch.float64)
            dist.all_reduce(t)
            got.append(t.item())
            if opt is not None:
                opt.step()
                opt.zero_grad()
        ref_sd = ref.state_dict()
        werr = max([(p.detach().double() - ref_sd[stage.submod.canonical[n]].double()).abs().max().item()
                    for n, p in stage.submod.named_parameters()] + [0.0])
        res[case] = {"loss_err": max(abs(a - b) for a, b in zip(got, ref_losses)), "weight_err": werr}
    (out / f"rank{rank}.json").write_text(json.dumps(res, indent=1))


def mode_local(out: Path) -> None:
    """MaskNet on 2 ranks, the mask built on stage 0 and recomputed (not received) on stage 1."""
    import fxpipe
    import models
    from test_local_values import _masknet_plan
    from test_pipeline import batches_for, reference_losses

    rank = int(os.environ["RANK"])
    _, plan = _masknet_plan(local=True)
    res: dict = {}
    for sched in ("2bw", "flush"):
        model, x, y, loss_fn = models.mask_case()       # fresh weights for each pipeline
        batches = batches_for(x, y, n=3)
        ref_losses, ref = reference_losses(model, batches, loss_fn, 4, sched)
        pipe = fxpipe.compile(model, (x,), num_stages=2, num_microbatches=4, schedule=sched, loss_fn=loss_fn,
                              optimizer=SGDM, executor="distributed", plan=plan)
        got = [pipe.step(bx, by).item() for bx, by in batches]
        sd = pipe.state_dict()
        res[sched] = {"loss_err": max(abs(a - b) for a, b in zip(got, ref_losses)),
                      "weight_err": _max_err(sd, ref.state_dict())}
        res["copies"] = sorted(n.name for n in pipe.program.stages[1].module.graph.nodes if n.name.endswith("_local1"))
        res["received_from"] = [[list(p) for p in st.received_from] for st in pipe.plan.stages]
    (out / f"rank{rank}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, out_dir, *rest = sys.argv[1:]
    out = Path(out_dir)
    if mode == "matrix":
        mode_matrix(out, rest[0], rest[1], int(rest[2]))
    elif mode == "resume":
        mode_resume(out, int(rest[0]), rest[1])
    elif mode == "fault":
        mode_fault(out, rest[0], int(rest[1]))
    elif mode == "interop":
        mode_interop(out, rest[0])
    elif mode == "safety":
        mode_safety(out)
    elif mode == "placement":
        mode_placement(out)
    elif mode == "local":
        mode_local(out)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
