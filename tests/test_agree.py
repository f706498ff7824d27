"""One plan on every rank under torchrun: rank 0 plans and broadcasts; differing plans fail before step 1."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import models
from agree_worker import skewed_plan
from dist_worker import Result, free_port
from fxpipe.runtime.agree import plan_digest, plan_outline

WORKER = Path(__file__).resolve().parent / "agree_worker.py"


def launch(nprocs: int, out: Path, timeout: float = 150.0) -> Result:
    """``nprocs`` ranks of agree_worker.py as torchrun would start them; all killed after ``timeout``."""
    import os
    import time

    port = free_port()
    procs, logs = [], []
    t0 = time.time()
    for r in range(nprocs):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", FXPIPE_TIMEOUT="60")
        log = open(out / f"log{r}.txt", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out)], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    codes, timed_out = [], False
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, timeout - (time.time() - t0))))
        except subprocess.TimeoutExpired:
            timed_out = True
            p.kill()
            codes.append(p.wait())
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    return Result(codes, texts, time.time() - t0, timed_out)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Both ranks' results of the three cases (one launch)."""
    out = tmp_path_factory.mktemp("agree")
    return _results(launch(2, out), out, 2)


def _results(r: Result, out: Path, n: int) -> list[dict]:
    assert not r.timed_out and r.returncodes == [0] * n, \
        f"exit codes {r.returncodes} after {r.seconds:.0f}s\n" + "\n".join(x[-3000:] for x in r.logs)
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(n)]


def test_skewed_costs_give_different_plans_alone() -> None:
    """The premise of the tests below: each rank's costs alone lead to another cut."""
    model, x, _, _ = models.CASES["mlp"]()
    assert plan_digest(skewed_plan(0, model, x)) != plan_digest(skewed_plan(1, model, x))


@pytest.mark.timeout(200)
def test_ranks_with_different_costs_train_on_rank0s_plan(ranks) -> None:
    res = [r["agree"] for r in ranks]
    assert res[0]["digest"] == res[1]["digest"] == res[0]["own_digest"]
    assert res[1]["own_digest"] != res[0]["digest"]          # rank 1 alone would have cut elsewhere
    for r in res:
        assert r["loss_err"] <= 1e-10


@pytest.mark.timeout(200)
def test_different_given_plans_fail_before_the_first_step(ranks) -> None:
    res = [r["mismatch"] for r in ranks]
    for r in res:
        assert r["type"] == "PlanMismatchError"
        assert "ranks [1] hold a different plan than rank 0" in r["error"]
        assert "rank 0's plan: 2 stages" in r["error"] and "rank 1's plan: 2 stages" in r["error"]
        assert "plan=fxpipe.Plan.from_json" in r["error"]


@pytest.mark.timeout(200)
def test_rank0_planning_error_is_raised_on_every_rank(ranks) -> None:
    res = [r["rank0_fails"] for r in ranks]
    assert res[0]["type"] == "InfeasibleMemoryError"
    assert res[1]["type"] == "InfeasibleMemoryError" and res[1]["error"].startswith("rank 0 failed to plan: ")
    assert res[0]["error"] in res[1]["error"]


def test_digest_ignores_predictions_but_not_structure() -> None:
    model, x, _, _ = models.CASES["mlp"]()
    p = skewed_plan(0, model, x)
    slower = dataclasses.replace(p, bottleneck=p.bottleneck * 2,
                                 stages=tuple(dataclasses.replace(s, time=s.time * 2) for s in p.stages))
    assert plan_digest(slower) == plan_digest(p)
    flipped = dataclasses.replace(p, stages=(dataclasses.replace(p.stages[0], recompute=not p.stages[0].recompute),
                                             *p.stages[1:]))
    assert plan_digest(flipped) != plan_digest(p)
    assert plan_digest(dataclasses.replace(p, num_microbatches=8)) != plan_digest(p)
    # the rank order decides every rank's (stage, replica): stages-in-node when a plan records none
    placed = lambda order: dataclasses.replace(p, extra={**p.extra, "placement": {"order": order}})  # noqa: E731
    assert plan_digest(placed("stages-in-node")) == plan_digest(p) != plan_digest(placed("replicas-in-node"))
    assert "(replicas-in-node)" in plan_outline(placed("replicas-in-node"))
    text = plan_outline(p)
    assert text.startswith("2 stages, schedule flush, m=4") and "stage 1:" in text


@pytest.mark.timeout(200)
def test_replan_after_switches_every_rank_exactly(ranks) -> None:
    res = [r["replan"] for r in ranks]
    assert all(r["replanned"] for r in res)
    assert res[0]["digest"] == res[1]["digest"] != res[0]["initial"] == res[1]["initial"]
    for r in res:
        assert r["loss_err"] <= 1e-10 and r["weight_err"] <= 1e-10
