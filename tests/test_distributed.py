"""The distributed executor across real gloo processes, against the float64 single-device reference.

Every multi-process run goes through ``dist_worker.launch``: one subprocess per rank
(RANK/WORLD_SIZE/MASTER_* as torchrun sets them) with a hard timeout, so nothing hangs.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

import models
from dist_worker import build, launch

CASES = ("mlp", "skip", "gpt")
SCHEDULES = ("2bw", "flush", "gpipe")
# (world size, stages): 2 and 3 ranks as pure pipelines, 4 ranks as 2 stages x 2 replicas
LAYOUTS = ((2, 2), (3, 3), (4, 2))
EACH_LAYOUT = pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l[0]}ranks-{l[1]}stages")


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Run every case x schedule once per layout; results[(world, stages)][rank][f"{case}/{schedule}"]."""
    results = {}
    for world, stages in LAYOUTS:
        out = tmp_path_factory.mktemp(f"matrix{world}")
        r = launch(world, ["matrix", str(out), ",".join(CASES), ",".join(SCHEDULES), str(stages)], timeout=120)
        assert not r.timed_out and r.returncodes == [0] * world, \
            f"world {world}: exit codes {r.returncodes} after {r.seconds:.0f}s\n" + "\n".join(x[-3000:] for x in r.logs)
        results[(world, stages)] = [json.loads((out / f"rank{i}.json").read_text()) for i in range(world)]
    return results


@pytest.mark.timeout(400)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", CASES)
@EACH_LAYOUT
def test_matches_reference_on_every_rank(matrix, layout, case, schedule):
    for rank, res in enumerate(matrix[layout]):
        got = res[f"{case}/{schedule}"]
        assert got["keys_match"], f"rank {rank}: state_dict keys differ from the model's"
        assert got["loss_err"] <= 1e-10, f"rank {rank}: losses differ from the reference by {got['loss_err']}"
        assert got["weight_err"] <= 1e-10, f"rank {rank}: weights differ from the reference by {got['weight_err']}"
        assert got["forward_err"] <= 1e-10, f"rank {rank}: pipe(x) differs from the reference by {got['forward_err']}"


@pytest.mark.timeout(400)
@EACH_LAYOUT
def test_report_shows_every_stage_and_rank_measured(matrix, layout):
    world, stages = layout
    for rank, res in enumerate(matrix[layout]):
        text = res["gpt/2bw"]["report"]
        assert text == matrix[layout][0]["gpt/2bw"]["report"], f"rank {rank} printed a different report than rank 0"
        lines = text.splitlines()
        stage_rows = [l.split() for l in lines[2:2 + stages]]      # stage, then "<value> <unit>" cells
        assert [r[0] for r in stage_rows] == [str(s) for s in range(stages)], text
        for row in stage_rows:
            assert float(row[3]) > 0 and float(row[7]) > 0, f"unmeasured forward/backward time:\n{text}"
        head = next(i for i, l in enumerate(lines) if l.split()[:2] == ["rank", "stage"])
        rank_rows = [l.split() for l in lines[head + 2:head + 2 + world]]
        assert [(int(r[0]), int(r[1]), int(r[2])) for r in rank_rows] == \
            [(r, r % stages, r // stages) for r in range(world)], text
        assert all(r[-1].endswith("%") and 0 < int(r[-1][:-1]) <= 100 for r in rank_rows), text


@pytest.mark.timeout(400)
@EACH_LAYOUT
def test_sent_outputs_are_not_kept_and_activations_match_the_plan(matrix, layout):
    world, stages = layout
    for rank, res in enumerate(matrix[layout]):
        kept = res["mlp/2bw"]["kept"]
        if rank % stages < stages - 1:      # 2bw: the first stages hold the last batch's tail in flight
            assert kept, f"rank {rank}: expected in-flight microbatches after 2bw steps"
        assert set(kept) <= {"GradientEdge"}, f"rank {rank} keeps sent outputs alive until backward: {kept}"
        # the MLP saves every stage boundary on both sides (tanh saves its output), so A_s + X_s is exact
        for s, (pred, meas) in enumerate(res["mlp/2bw"]["act"]):
            assert pred == meas, f"rank {rank}, stage {s}: predicted {pred} bytes held per microbatch, measured {meas}"


@pytest.mark.timeout(400)
@EACH_LAYOUT
def test_2bw_update_with_an_all_reduce_overlaps_the_next_batch(matrix, layout):
    """Tied weights (gpt) or replicas (w > 1) need an all-reduce at U; under 2bw it is still in
    flight when step() returns (and the numbers match the reference, test above); without one,
    or under flush, the update is done."""
    world, stages = layout
    for rank, res in enumerate(matrix[layout]):
        for case in CASES:
            tied_here = case == "gpt" and rank % stages in (0, stages - 1)   # embedding and head
            needs = tied_here or world > stages
            assert res[f"{case}/2bw"]["pending"] == needs, (rank, case)
            assert res[f"{case}/flush"]["pending"] is False, (rank, case)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how,bad_rank", [("raise", 1), ("exit", 1), ("exit", 0), ("hang", 1)])
def test_failed_rank_stops_every_rank(tmp_path, how, bad_rank):
    limit, grace = (8 if how == "hang" else 20), 5
    started = time.time()
    r = launch(3, ["fault", str(tmp_path), how, str(bad_rank)], timeout=90,
               env={"FXPIPE_TIMEOUT": str(limit), "FXPIPE_ABORT_GRACE": str(grace)})
    assert not r.timed_out, f"ranks still running after 90 s: {r.returncodes}"
    fault = float((tmp_path / "fault_time").read_text())
    # every rank is gone within FXPIPE_TIMEOUT + the abort grace of the fault (+10 s to unwind and exit);
    # counted from the fault, not the launch, so the time 3 ranks take to start on a loaded machine is not in it
    stopped = started + r.seconds - fault
    assert stopped < limit + grace + 10, f"the last rank stopped {stopped:.0f}s after the fault"
    assert all(c != 0 for c in r.returncodes), f"exit codes {r.returncodes}\n" + "\n".join(r.logs)
    for rank, log in enumerate(r.logs):
        assert "finished without error" not in log
        if rank == bad_rank:
            if how == "raise":
                assert f"rank {bad_rank} (stage {bad_rank}, replica 0) failed in action" in log
                assert "injected failure" in log
        else:
            assert "DistributedError" in log and f"rank {rank} (stage {rank}" in log, log[-2000:]
    # the direct neighbours of the failed rank name it
    neighbour = 1 if bad_rank == 0 else 0
    assert f"peer rank {bad_rank} (stage {bad_rank}" in r.logs[neighbour]
    for rank, log in enumerate(r.logs):
        if rank == bad_rank:
            continue
        if how != "hang":        # every survivor names the rank that raised or died, neighbour or not
            assert f"rank {bad_rank} (stage {bad_rank}, replica 0)" in log, log[-2000:]
        # ... and raises within FXPIPE_TIMEOUT of the fault (+2 s of asking the store who failed)
        raised = float(log.split("fxpipe-test: error raised at ")[1].split()[0])
        assert raised - fault <= limit + 3, f"rank {rank} raised {raised - fault:.1f}s after the fault"


@pytest.fixture(scope="module")
def safety(tmp_path_factory):
    out = tmp_path_factory.mktemp("safety")
    r = launch(2, ["safety", str(out)], timeout=90, env={"FXPIPE_TIMEOUT": "20", "FXPIPE_ABORT_GRACE": "3"})
    assert not r.timed_out, f"ranks still running after 90 s: {r.returncodes}\n" + "\n".join(x[-3000:] for x in r.logs)
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)], r


@pytest.mark.timeout(120)
def test_2bw_pending_sends_stay_bounded(safety):
    """gloo's send Work never reports completion by itself: unreaped, the list grew every step."""
    for rank, res in enumerate(safety[0]):
        sends = res["pending_sends"]
        assert len(set(sends[3:])) == 1 and sends[-1] <= 3 * 4, f"rank {rank}: pending sends per step {sends}"


@pytest.mark.timeout(120)
def test_two_unfinished_2bw_pipelines_keep_their_messages_apart(safety):
    """Both on the default group, the second pipeline's receives matched the first's in-flight sends."""
    for rank, res in enumerate(safety[0]):
        assert res["twins_unfinished"] == [True, True], res["twins_unfinished"]
        assert res["twins_loss_err"] < 1e-9, f"rank {rank}: {res['twins_loss_err']}"


@pytest.mark.timeout(120)
def test_batchnorm_resume_and_all_or_nothing_load_on_2_ranks(safety):
    results, _ = safety
    for rank, res in enumerate(results):
        assert res["bn"]["first"] == res["bn"]["second"] and res["bn"]["identical"], (rank, res["bn"])
        assert res["bn"]["buffers"] == results[0]["bn"]["buffers"], "ranks disagree on buffers in state_dict()"
        assert res["unchanged"], f"rank {rank}: a refused load changed the pipeline"
    assert "has shape (3, 3), the model expects" in results[1]["bad_load"]
    assert "failed on another rank" in results[0]["bad_load"] and "nothing was loaded" in results[0]["bad_load"]


@pytest.mark.timeout(120)
def test_failed_step_is_refused_on_every_rank(safety):
    results, _ = safety
    first, again = results[1]["errors"]
    assert "rank 1 (stage 1, replica 0) failed in action" in first and "injected loss failure" in first
    for rank, res in enumerate(results):
        assert res["errors"][0] is not None, f"rank {rank}: the failed step returned"
        assert "already failed" in res["errors"][1] and "pipe.load(dir)" in res["errors"][1], res["errors"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world,schedule", [(2, "gpipe"), (3, "1f1b")])
def test_torch_pipelining_interop_matches_flush_reference(tmp_path, world, schedule):
    r = launch(world, ["interop", str(tmp_path), schedule], timeout=90)
    assert r.returncodes == [0] * world, "\n".join(x[-3000:] for x in r.logs)
    for rank in range(world):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case, got in res.items():
            assert got["loss_err"] <= 1e-10, (rank, case, got)
            assert got["weight_err"] <= 1e-10, (rank, case, got)


def test_interop_rejects_tied_weights():
    from fxpipe.errors import ConfigError
    from fxpipe.runtime.interop import chain_stages

    model, x, _, loss_fn = models.CASES["gpt"]()
    pipe = build(model, x, stages=2, m=4, schedule="flush", loss_fn=loss_fn)
    with pytest.raises(ConfigError, match=r"'wte.weight' is read by stages \[0, 1\].*executor='distributed'"):
        chain_stages(pipe.program, {id(p): n for n, p in pipe._params.items()})


def test_interop_chain_passes_skips_through_middle_stages():
    from fxpipe.runtime.interop import chain_stages

    model, x, _, loss_fn = models.CASES["skip"]()
    pipe = build(model, x, stages=3, m=4, schedule="flush", loss_fn=loss_fn, uniform=True)
    chain = chain_stages(pipe.program, {id(p): n for n, p in pipe._params.items()})
    assert any(k[0] == "stage" and k[1] == 0 for k in chain[1].carried_out), "stage 0 -> 2 skip must pass stage 1"
    h = x.chunk(4)[0]
    for st in chain:
        h = st(*(h if isinstance(h, tuple) else (h,)))
    torch.testing.assert_close(h, model(x.chunk(4)[0]), atol=1e-12, rtol=0)


def test_distributed_without_process_group_says_how_to_launch(monkeypatch):
    from fxpipe.errors import DistributedError

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    model, x, _, loss_fn = models.CASES["mlp"]()
    with pytest.raises(DistributedError, match=r"torchrun --nproc_per_node"):
        build(model, x, stages=2, m=4, schedule="2bw", loss_fn=loss_fn, executor="distributed")


def test_replica_share_needs_divisible_batch():
    from fxpipe.errors import InputError
    from fxpipe.runtime.distributed import replica_share

    x = torch.arange(12).reshape(6, 2)
    assert torch.equal(replica_share(x, 3, 1), x[2:4])
    assert replica_share({"a": x}, 2, 1)["a"].shape == (3, 2)
    with pytest.raises(InputError, match=r"shape \(6, 2\) cannot be split among 4 data-parallel replicas"):
        replica_share(x, 4, 0)


def test_world_size_must_be_a_multiple_of_stages(monkeypatch):
    from fxpipe.errors import ConfigError
    from fxpipe.runtime.distributed import data_parallel_width

    for k, v in {"WORLD_SIZE": "6", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    assert data_parallel_width(3) == 2
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=6 is not a multiple of num_stages=4"):
        data_parallel_width(4)


def test_receive_buffers_are_reused_only_when_nothing_holds_them():
    """Pooled receive buffers: a fresh one while any view (a leaf, a pending send) of the old one lives."""
    from fxpipe.runtime import p2p

    if not p2p._CAN_POOL:
        pytest.skip("this torch has no storage use count: receive buffers are not pooled")
    comm = p2p.Comm.__new__(p2p.Comm)          # no process group needed for the pool
    comm.device, comm._pool = torch.device("cpu"), {}
    shape = torch.Size([2, 3])
    a, b = comm.buffer(shape, torch.float64), comm.buffer(shape, torch.float64)
    ptr = a.untyped_storage().data_ptr()
    assert ptr != b.untyped_storage().data_ptr()           # two receives in flight never share memory
    leaf = a.detach().requires_grad_()                     # what the stage makes of a received input
    del a
    assert comm.buffer(shape, torch.float64).untyped_storage().data_ptr() != ptr
    del leaf
    assert comm.buffer(shape, torch.float64).untyped_storage().data_ptr() == ptr
    assert comm.buffer(torch.Size([3, 2]), torch.float64).shape == (3, 2)


@pytest.mark.timeout(200)
def test_ranks_follow_the_plans_placement_order(tmp_path):
    """A plan recording replicas-in-node runs rank = stage * w + replica (a stage's replicas neighbours),
    matches the reference under 2bw and flush, and its checkpoint resumes under stages-in-node."""
    r = launch(4, ["placement", str(tmp_path)], timeout=180)
    assert not r.timed_out and r.returncodes == [0] * 4, \
        f"exit codes {r.returncodes} after {r.seconds:.0f}s\n" + "\n".join(x[-3000:] for x in r.logs)
    where = ["rank 0 (stage 0, replica 0)", "rank 1 (stage 0, replica 1)", "rank 2 (stage 1, replica 0)",
             "rank 3 (stage 1, replica 1)"]
    for rank in range(4):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        stage, replica = rank // 2, rank % 2
        for sched in ("2bw", "flush"):
            got = res[sched]
            assert got["order"] == got["recorded"] == "replicas-in-node", (rank, sched)
            assert (got["stage"], got["replica"]) == (stage, replica) and got["where"] == where, (rank, got)
            assert got["pipeline_group"] == [replica, 2 + replica] and got["dp_group"] == [2 * stage, 2 * stage + 1]
            for err in ("loss_err", "weight_err", "forward_err"):
                assert got[err] <= 1e-10, f"rank {rank}, {sched}: {err} {got[err]}"
        resumed = res["resumed"]
        assert resumed["order"] == "stages-in-node" and resumed["stage"] == rank % 2, (rank, resumed)
        assert resumed["loss_err"] <= 1e-12 and resumed["weight_err"] <= 1e-12, (rank, resumed)


def test_placement_order_is_read_from_the_plan_and_checked():
    from types import SimpleNamespace

    from fxpipe.errors import ConfigError
    from fxpipe.runtime.groups import placement_order

    assert placement_order(SimpleNamespace(extra={})) == "stages-in-node"        # plans without one run as before
    assert placement_order(SimpleNamespace(extra={"placement": {"order": "replicas-in-node"}})) == "replicas-in-node"
    with pytest.raises(ConfigError, match="is 'rings', not one of stages-in-node, replicas-in-node"):
        placement_order(SimpleNamespace(extra={"placement": {"order": "rings"}}))
