"""The trainer under the distributed executor (gloo ranks, as torchrun starts them) against trainer_ref's loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_worker import launch

HERE = Path(__file__).resolve().parent
ALL = "clip-2bw,clip-flush,clip-gpipe,lambda-2bw,cosine-flush,bf16-2bw,fp16-2bw,fp16-flush,evaluate,resume"
LAYOUTS = {(2, 2): ALL, (3, 3): ALL, (4, 2): "clip-2bw,clip-flush"}     # (world, stages): 4 = 2 stages x 2 replicas


def _launch_trainer(world, stages, names, out):
    """dist_worker.launch runs dist_worker.py; this runs trainer_worker.py the same way."""
    import dist_worker

    script = dist_worker.__file__
    dist_worker.__file__ = str(HERE / "trainer_worker.py")
    try:
        return launch(world, ["run", str(out), str(stages), names], timeout=400)
    finally:
        dist_worker.__file__ = script


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    res = {}
    for (world, stages), names in LAYOUTS.items():
        out = tmp_path_factory.mktemp(f"trainer{world}")
        r = _launch_trainer(world, stages, names, out)
        assert not r.timed_out and r.returncodes == [0] * world, \
            f"world {world}: exit codes {r.returncodes}\n" + "\n".join(x[-3000:] for x in r.logs)
        res[(world, stages)] = [json.loads((out / f"rank{i}.json").read_text()) for i in range(world)]
    return res


def _each(results, layout, name):
    return list(enumerate(r[name] for r in results[layout]))


def _runs(*names):
    """(layout, name) for every layout that runs ``name``."""
    return pytest.mark.parametrize("layout,name", [(lay, n) for lay, ns in LAYOUTS.items() for n in names
                                                   if n in ns.split(",")],
                                   ids=lambda v: f"{v[0]}ranks-{v[1]}stages" if isinstance(v, tuple) else v)


@pytest.mark.timeout(1500)
@_runs("clip-2bw", "clip-flush", "clip-gpipe", "lambda-2bw", "cosine-flush")
def test_fp64_trainer_matches_the_loop(results, layout, name):
    for rank, got in _each(results, layout, name):
        assert got["loss_err"] <= 1e-10 and got["weight_err"] <= 1e-10, (rank, got)
        if name.startswith("clip"):
            assert got["clipped"] and got["norm_err"] <= 1e-10, (rank, got)
            # Pipeline.last_grad_norm's contract: batch t's norm after step(t), except 2bw under torchrun
            # with clipping alone: t - 1 on the last stage, t - 2 on the others (None before); after the
            # draining state_dict, the last batch's everywhere
            lag = [0, 0, 0, 0] if not name.endswith("2bw") else [None, 1, 1, 1] if got["last_stage"] \
                else [None, None, 2, 2]
            assert got["norm_lag"] == lag and got["drained_norm_batch"] == 3, (rank, got)
            assert got["lagged_norm_err"] <= 1e-10, (rank, got)


@pytest.mark.timeout(1500)
@_runs("bf16-2bw", "fp16-2bw", "fp16-flush")
def test_mixed_precision_matches_the_autocast_loop(results, layout, name):
    for rank, got in _each(results, layout, name):
        assert got["loss_tol"] > 0 and got["loss_err"] <= got["loss_tol"], (rank, got)
        assert got["weight_err"] <= got["weight_tol"], (rank, got)
        if name.startswith("fp16"):
            assert got["scales"] == got["ref_scales"] == [65536.0, 65536.0, 32768.0, 32768.0], (rank, got)
            # after step(t): batch t - 1's norm under 2bw (the next loss scale needed it), else batch t's
            assert got["norm_lag"] == ([None, 1, 1, 1] if name.endswith("2bw") else [0, 0, 0, 0]), (rank, got)
            assert got["skipped_together"], (rank, got)


@pytest.mark.timeout(1500)
@_runs("evaluate")
def test_evaluate_and_resume_with_scheduler_and_scaler(results, layout, name):
    for rank, got in _each(results, layout, "evaluate"):
        assert got["eval_err"] <= 1e-10 and got["unchanged"], (rank, got)
    for rank, got in _each(results, layout, "resume"):
        assert got["first"] == got["second"] and got["identical"] and got["scalers_equal"], (rank, got)
        assert got["loaded_scale"] == 32768.0, (rank, got)


