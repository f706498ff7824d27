"""The single-process reference a user's own loop computes: grad accumulation over m microbatches,
autocast (bf16/fp16) with torch.amp.GradScaler, clip_grad_norm_, an LR scheduler, and the 2BW delay."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch.func import functional_call

SGDM = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)  # noqa: E731
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def reference(model, batches, loss_fn, m, schedule, make_opt=SGDM, *, max_norm=None, sched=None,
              precision="fp32", device_type="cpu"):
    """Returns (losses, norms, scales, trained model): what ``torch`` alone computes, batch by batch.

    2bw: batch t computes with W(max(t-1, 0)); the update of batch t steps the newest weights W(t).
    """
    ref = copy.deepcopy(model)
    opt = make_opt(list(ref.parameters()))
    sch = sched(opt) if sched is not None else None
    scaler = torch.amp.GradScaler(device_type) if precision == "fp16" else None
    ctx = (lambda: torch.autocast(device_type, dtype=DTYPES[precision])) if precision != "fp32" \
        else contextlib.nullcontext
    prev = None
    losses, norms, scales = [], [], []
    for x, y in batches:
        newest = {n: p.detach().clone() for n, p in ref.named_parameters()}
        used = newest if (schedule != "2bw" or prev is None) else prev
        leaves = {n: v.clone().requires_grad_(True) for n, v in used.items()}
        total = 0.0
        for xm, ym in zip(x.chunk(m), y.chunk(m)):
            with ctx():
                loss = loss_fn(functional_call(ref, leaves, (xm,)), ym)
            (scaler.scale(loss / m) if scaler is not None else loss / m).backward()
            total += loss.item()
        losses.append(total / m)
        for n, p in ref.named_parameters():
            p.grad = leaves[n].grad
        if scaler is not None:
            scales.append(scaler.get_scale())
            scaler.unscale_(opt)
        if max_norm is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
        if sch is not None:
            sch.step()
        prev = newest
    return losses, norms, scales, ref


def max_err(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in b)
