"""One rank of the plan-agreement tests: ``python tests/agree_worker.py OUT_DIR`` under RANK/WORLD_SIZE.

Each rank prices operations with :class:`SkewedCostModel`, which makes the first layers
``1 + 30 * rank`` times dearer, so ranks planning alone would cut at different places.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from dist_worker import SGDM  # noqa: E402


class SkewedCostModel:
    """The analytic model, with nodes of ``layers.0`` and ``layers.1`` ``factor`` times dearer."""

    def __init__(self, factor: float) -> None:
        from fxpipe.cost_models.analytic import AnalyticCostModel

        self.base, self.factor = AnalyticCostModel(), float(factor)

    def node_cost(self, node):
        c = self.base.node_cost(node)
        stack = node.meta.get("nn_module_stack") or {}
        if any(str(k).startswith(("layers.0", "layers.1")) for k in stack):
            c = dataclasses.replace(c, fwd_time=c.fwd_time * self.factor, bwd_time=c.bwd_time * self.factor)
        return c

    def comm_time(self, nbytes: int) -> float:
        return self.base.comm_time(nbytes)


def skewed_plan(rank: int, model, x):
    import fxpipe

    return fxpipe.plan(model, (x,), num_stages=2, num_microbatches=4, schedule="flush",
                       cost_model=SkewedCostModel(1 + 30 * rank))


def mode_agree(out: Path) -> dict:
    import fxpipe
    import models
    from fxpipe.runtime.agree import plan_digest
    from test_pipeline import batches_for, reference_losses

    rank = int(os.environ["RANK"])
    model, x, y, loss_fn = models.CASES["mlp"]()
    batches = batches_for(x, y, n=3)
    ref_losses, _ = reference_losses(model, batches, loss_fn, 4, "flush")
    pipe = fxpipe.compile(model, (x,), num_stages=2, num_microbatches=4, schedule="flush", loss_fn=loss_fn,
                          optimizer=SGDM, cost_model=SkewedCostModel(1 + 30 * rank), executor="distributed")
    got = [pipe.step(bx, by).item() for bx, by in batches]
    res = {"digest": plan_digest(pipe.plan), "own_digest": plan_digest(skewed_plan(rank, model, x)),
           "loss_err": max(abs(a - b) for a, b in zip(got, ref_losses))}
    return res


def mode_mismatch(out: Path) -> dict:
    import fxpipe
    import models

    model, x, y, loss_fn = models.CASES["mlp"]()
    res = {}
    try:
        fxpipe.compile(model, (x,), num_stages=2, num_microbatches=4, schedule="flush", loss_fn=loss_fn,
                       plan=skewed_plan(int(os.environ["RANK"]), model, x), executor="distributed")
        res["error"] = None
    except fxpipe.FxpipeError as e:
        res["error"], res["type"] = str(e), type(e).__name__
    return res


def mode_rank0_fails(out: Path) -> dict:
    import fxpipe
    import models

    model, x, y, loss_fn = models.CASES["mlp"]()
    res = {}
    try:     # 1 byte per device fits nowhere: rank 0's planner raises, every rank must raise it
        fxpipe.compile(model, (x,), num_stages=2, num_microbatches=4, schedule="flush", loss_fn=loss_fn,
                       memory_limit=1, executor="distributed")
        res["error"] = None
    except fxpipe.FxpipeError as e:
        res["error"], res["type"] = str(e), type(e).__name__
    return res


def mode_replan(out: Path) -> dict:
    """replan_after=2 under 2bw with a wrong cost model: every rank switches, numbers stay the reference's."""
    import fxpipe
    import models
    from fxpipe.runtime.agree import plan_digest
    from test_pipeline import batches_for, reference_losses

    model, x, y, loss_fn = models.CASES["mlp"]()
    batches = batches_for(x, y, n=5)
    ref_losses, ref = reference_losses(model, batches, loss_fn, 4, "2bw")
    pipe = fxpipe.compile(model, (x,), num_stages=2, num_microbatches=4, schedule="2bw", loss_fn=loss_fn,
                          optimizer=SGDM, cost_model=SkewedCostModel(31), executor="distributed", replan_after=2)
    got = [pipe.step(bx, by).item() for bx, by in batches]
    sd = pipe.state_dict()
    return {"replanned": pipe.replanned, "digest": plan_digest(pipe.plan),
            "initial": plan_digest(pipe.initial_plan),
            "loss_err": max(abs(a - b) for a, b in zip(got, ref_losses)),
            "weight_err": max((sd[k].double() - v.double()).abs().max().item() for k, v in ref.state_dict().items())}


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    # one process group for all three cases, as one torchrun job would run them one after another
    res = {"agree": mode_agree(out), "mismatch": mode_mismatch(out), "rank0_fails": mode_rank0_fails(out),
           "replan": mode_replan(out)}
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(res))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
