"""One rank of the trainer's multi-process tests: ``python tests/trainer_worker.py run OUT_DIR STAGES CONFIGS``.

Each config trains with fxpipe under the distributed executor and with the torch-only loop of
trainer_ref (on every rank), and writes the differences to OUT_DIR/rank{RANK}.json.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

LAMBDA = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 3))  # noqa: E731
COSINE = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3, eta_min=0.001)  # noqa: E731

# name -> (case, dtype, schedule, options)
CONFIGS = {
    "clip-2bw": ("gpt", torch.float64, "2bw", {"max_grad_norm": 0.3}),
    "clip-flush": ("gpt", torch.float64, "flush", {"max_grad_norm": 0.3}),
    "clip-gpipe": ("gpt", torch.float64, "gpipe", {"max_grad_norm": 0.3}),
    "lambda-2bw": ("mlp", torch.float64, "2bw", {"lr_scheduler": LAMBDA}),
    "cosine-flush": ("mlp", torch.float64, "flush", {"lr_scheduler": COSINE}),
    "bf16-2bw": ("gpt", torch.float32, "2bw", {"precision": "bf16"}),
    "fp16-2bw": ("mlp", torch.float32, "2bw", {"precision": "fp16", "max_grad_norm": 1.0}),
    "fp16-flush": ("mlp", torch.float32, "flush", {"precision": "fp16", "max_grad_norm": 1.0}),
    "evaluate": ("mlp", torch.float64, "2bw", {}),
    "resume": ("mlp", torch.float32, "2bw", {"precision": "fp16", "max_grad_norm": 1.0, "lr_scheduler": LAMBDA}),
}


def _batches(case, x, y, fp16):
    from test_pipeline import batches_for

    b = batches_for(x, y, n=4)
    if fp16:
        b[1] = (b[1][0], b[1][1] * 1e4)     # loss x scale overflows fp16 in backward: every stage must skip
    return b


def run(name: str, stages: int, out: Path) -> dict:
    import fxpipe
    import models
    from trainer_ref import SGDM, max_err, reference

    case, dtype, schedule, opts = CONFIGS[name]
    w = int(os.environ["WORLD_SIZE"]) // stages
    m = 4
    model, x, y, loss_fn = models.CASES[case](dtype)
    prec = opts.get("precision", "fp32")
    batches = _batches(case, x, y, prec == "fp16")
    ref_losses, ref_norms, ref_scales, ref = reference(model, batches, loss_fn, m * w, schedule, precision=prec,
                                                       max_norm=opts.get("max_grad_norm"),
                                                       sched=opts.get("lr_scheduler"))
    pipe = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=stages, num_microbatches=m, schedule=schedule,
                          loss_fn=loss_fn, optimizer=SGDM, executor="distributed", **opts)
    res: dict = {}
    if name == "evaluate":
        for bx, by in batches[:2]:
            pipe.step(bx, by)
        before = pipe.state_dict()
        got = pipe.evaluate(*batches[2]).item()
        newest = copy.deepcopy(model)
        newest.load_state_dict(before)
        with torch.no_grad():
            want = sum(loss_fn(newest(xm), ym).item() for xm, ym in zip(batches[2][0].chunk(m * w),
                                                                          batches[2][1].chunk(m * w))) / (m * w)
        after = pipe.state_dict()
        return {"eval_err": abs(got - want), "unchanged": all(torch.equal(before[k], after[k]) for k in before)}
    if name == "resume":
        more = batches + _batches(case, x, y, False)[:2]
        for bx, by in more[:3]:
            pipe.step(bx, by)
        pipe.save(str(out / "ck"))
        first = [pipe.step(bx, by).item() for bx, by in more[3:]]
        a = pipe.state_dict()      # drains pipe's 2bw tail: both pipelines share the process group
        fresh = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=stages, num_microbatches=m,
                               schedule=schedule, loss_fn=loss_fn, optimizer=SGDM, executor="distributed", **opts)
        fresh.load(str(out / "ck"))
        scale = fresh.scaler.scale
        second = [fresh.step(bx, by).item() for bx, by in more[3:]]
        b = fresh.state_dict()
        return {"first": first, "second": second, "identical": all(torch.equal(a[k], b[k]) for k in a),
                "loaded_scale": scale, "scalers_equal": pipe.scaler.state_dict() == fresh.scaler.state_dict()}
    got, scales, states, norms = [], [], [], []
    for bx, by in batches:
        scales.append(pipe.scaler.scale if pipe.scaler is not None else None)
        got.append(pipe.step(bx, by).item())
        norms.append((pipe.last_grad_norm_batch, pipe.last_grad_norm))     # before any draining call
        if prec == "fp16":
            states.append(pipe.state_dict())       # collective; drains the 2bw stream
    sd = pipe.state_dict()
    res = {"loss_err": max(abs(a - b) for a, b in zip(got, ref_losses)), "weight_err": max_err(sd, ref.state_dict())}
    if opts.get("max_grad_norm") is not None:
        res["norm_err"] = abs(pipe.last_grad_norm - ref_norms[-1])
        res["drained_norm_batch"] = pipe.last_grad_norm_batch
        res["last_stage"] = pipe._executor.stage == stages - 1
        # after step(t): which batch's norm, and its error against that batch's reference norm
        res["norm_lag"] = [None if b is None else t - b for t, (b, _) in enumerate(norms)]
        res["lagged_norm_err"] = max([abs(n - ref_norms[b]) for b, n in norms if b is not None], default=None)
        res["clipped"] = min(ref_norms) > opts["max_grad_norm"]
    if prec != "fp32":
        fp32_losses, _, _, ref32 = reference(model, batches, loss_fn, m * w, schedule,
                                             max_norm=opts.get("max_grad_norm"))
        keep = [i for i in range(len(batches)) if prec != "fp16" or i != 1]
        res["loss_tol"] = 0.01 * max(abs(ref_losses[i] - fp32_losses[i]) for i in keep)
        res["loss_err"] = max(abs(got[i] - ref_losses[i]) for i in keep)
        res["weight_tol"] = 0.01 * max_err(ref32.state_dict(), ref.state_dict())
    if prec == "fp16":
        res["scales"], res["ref_scales"] = scales, ref_scales
        res["skipped_together"] = all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    return res


if __name__ == "__main__":
    torch.set_num_threads(1)
    _, out_dir, stages, names = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
    out = Path(out_dir)
    rank = int(os.environ["RANK"])
    results = {}
    for n in names:
        sub = out / n
        sub.mkdir(exist_ok=True)
        results[n] = run(n, stages, sub)
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
