"""One plan on every rank: plan on rank 0, broadcast it, and check a digest before training.

Without this, every torchrun rank profiles and plans by itself. Two ranks that
measure (or, with ties, solve) differently cut the graph differently, and the
first send of a differently shaped activation dies inside gloo ("Received data
size doesn't match expected size") with a message that blames the peer. So,
under the distributed executor::

    every rank      init the process group (before planning)
    rank 0          trace, annotate, plan            (profiles alone: the other ranks wait idle,
                                                      so they do not perturb its measurements)
    rank 0 -> all   broadcast the Plan (or rank 0's error, which every rank then raises)
    other ranks     trace, annotate with "analytic" instead of "profile" (the plan is not theirs
                    to make), check the received plan against their own graph
    every rank      all-gather a digest of the plan's structure (stages, nodes, recompute,
                    schedule, m, w); differing digests raise PlanMismatchError on every rank,
                    showing both plans and the way out (the same ``plan=`` on every rank)

The broadcast waits in a group of its own whose timeout is ``FXPIPE_PLAN_TIMEOUT``
seconds (default 1800), since profiling on rank 0 may take longer than a step's
``FXPIPE_TIMEOUT``.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any, Callable

import torch.distributed as dist

from fxpipe import errors
from fxpipe.errors import DistributedError, FxpipeError, PlanMismatchError
from fxpipe.ir import Plan
from fxpipe.runtime.groups import env_seconds

__all__ = ["plan_digest", "plan_outline", "plan_on_rank0", "check_same_plan", "plan_timeout_seconds"]


def plan_timeout_seconds() -> float:
    """Seconds the other ranks wait for rank 0's plan (env ``FXPIPE_PLAN_TIMEOUT``, default 1800)."""
    return env_seconds("FXPIPE_PLAN_TIMEOUT", 1800)


def _structure(plan: Plan) -> dict[str, Any]:
    where = plan.extra.get("placement")
    return {"schedule": plan.schedule, "num_microbatches": plan.num_microbatches,
            "data_parallel": plan.data_parallel,
            "stages": [[list(s.nodes), bool(s.recompute)] for s in plan.stages],
            # the rank order decides which rank runs which (stage, replica) and every process group
            "order": where.get("order", "stages-in-node") if isinstance(where, dict) else "stages-in-node"}


def plan_digest(plan: Plan) -> str:
    """sha256 of what every rank must agree on: stages, their nodes and recompute flags, schedule, m, w,
    and the rank order (``plan.extra["placement"]["order"]``).

    Predicted times and memory are left out: they do not change what runs.
    """
    return hashlib.sha256(json.dumps(_structure(plan), sort_keys=True).encode()).hexdigest()


def plan_outline(plan: Plan) -> str:
    """One line per stage: first..last node, node count, recompute flag, predicted time."""
    lines = [f"{plan.num_stages} stages, schedule {plan.schedule}, m={plan.num_microbatches}, "
             f"w={plan.data_parallel} ({_structure(plan)['order']}), solver {plan.solver}, "
             f"digest {plan_digest(plan)[:12]}"]
    for s in plan.stages:
        span = f"{s.nodes[0]}..{s.nodes[-1]}" if s.nodes else "(empty)"
        lines.append(f"  stage {s.index}: {len(s.nodes)} nodes {span}{' recompute' if s.recompute else ''}"
                     f" ({s.time * 1e3:.3f} ms predicted)")
    return "\n".join(lines)


def _group() -> Any:
    return dist.new_group(list(range(dist.get_world_size())),
                          timeout=timedelta(seconds=plan_timeout_seconds()))


def plan_on_rank0(make_plan: Callable[[Plan | None], tuple[Plan, Any]]) -> tuple[Plan, Any]:
    """Run ``make_plan(None)`` on rank 0 and ``make_plan(rank0_plan)`` elsewhere; collective.

    ``make_plan(given)`` traces and annotates, then solves (``given is None``) or checks
    ``given`` against its own graph; it returns ``(plan, compiled_graph)``. Every rank
    returns rank 0's Plan object and its own compiled graph.

    Raises:
        the error rank 0 raised while planning (same class, on every rank), or
        PlanMismatchError: a rank's graph does not fit rank 0's plan (on every rank).
    """
    from fxpipe.runtime.distributed import init_distributed

    init_distributed()
    group = _group()
    rank = dist.get_rank()
    payload: list[Any] = [None]
    failure: BaseException | None = None
    if rank == 0:
        try:
            plan, cg = make_plan(None)
            payload[0] = {"plan": plan}
        except FxpipeError as e:
            failure = e
            payload[0] = {"error": str(e), "type": type(e).__name__}
    try:
        dist.broadcast_object_list(payload, src=0, group=group)
    except Exception as e:  # noqa: BLE001
        raise DistributedError(f"rank {rank}: waiting for rank 0's plan failed: {e}; rank 0 may have died while "
                               "planning (see its log), or planning took longer than FXPIPE_PLAN_TIMEOUT="
                               f"{plan_timeout_seconds():.0f}s") from e
    got = payload[0]
    if "error" in got:
        if failure is not None:
            raise failure
        cls = getattr(errors, got["type"], None)
        cls = cls if isinstance(cls, type) and issubclass(cls, FxpipeError) else DistributedError
        try:
            err = cls(f"rank 0 failed to plan: {got['error']}")
        except TypeError:
            err = DistributedError(f"rank 0 failed to plan ({got['type']}): {got['error']}")
        raise err
    plan = got["plan"]
    problem = ""
    if rank != 0:
        try:
            _, cg = make_plan(plan)
        except FxpipeError as e:
            problem = f"rank {rank}: rank 0's plan does not fit this rank's graph: {e}"
    problems: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem, group=group)
    bad = [p for p in problems if p]
    if bad:
        raise PlanMismatchError(
            "the ranks traced different graphs, so rank 0's plan cannot run everywhere:\n" + "\n".join(bad) +
            "\nEvery rank must build the same model with the same example inputs and options; then pass the "
            "same plan to every rank: save rank 0's (pipe.plan.to_json() or `fxpipe dump --format json`) "
            "and compile(..., plan=fxpipe.Plan.from_json(text)) on all ranks")
    return plan, cg


def check_same_plan(plan: Plan) -> None:
    """Raise PlanMismatchError on every rank unless all ranks hold the same plan (collective).

    Raises:
        PlanMismatchError: digests differ; the message outlines rank 0's plan and each differing one.
    """
    from fxpipe.runtime.distributed import init_distributed

    init_distributed()
    mine = (plan_digest(plan), plan_outline(plan))
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine, group=_group())
    differ = [r for r, (dg, _) in enumerate(every) if dg != every[0][0]]
    if differ:
        shown = "\n".join(f"rank {r}'s plan: {every[r][1]}" for r in [0, *differ])
        raise PlanMismatchError(
            f"ranks {differ} hold a different plan than rank 0, and training would fail at the first "
            f"send with mismatched tensor sizes:\n{shown}\nPass the same plan to every rank: save rank 0's "
            "(pipe.plan.to_json() or `fxpipe dump --format json`) and compile(..., "
            "plan=fxpipe.Plan.from_json(text)) on all ranks, or leave plan=None and fxpipe plans on "
            "rank 0 and broadcasts it")
