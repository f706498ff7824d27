"""A stage's checkpoint state: what it holds, keyed by the model's names, checked in full before anything is set.

New state (a loss scaler, an LR scheduler) is one more key of the stage file: written in
:func:`stage_state`, checked in :func:`prepare_stage`, set in :func:`apply_stage`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fxpipe.errors import CheckpointError, StateDictError
from fxpipe.runtime.weights import WeightVersions

__all__ = ["buffer_owners", "owned_buffers", "stage_state", "prepare_stage", "apply_stage", "load_stage_state",
           "prepare_buffers", "apply_buffers"]


def buffer_owners(program: Any, model: torch.nn.Module) -> dict[str, int]:
    """Persistent buffer name (as in ``model.state_dict()``) -> the lowest stage holding or reading it.

    A buffer no stage holds (unused by forward) is given to stage 0.
    """
    sd_keys = set(model.state_dict(keep_vars=True))
    persistent = {n: b for n, b in model.named_buffers(remove_duplicate=False) if n in sd_keys}
    by_id: dict[int, int] = {}
    for st in reversed(program.stages):
        ids = {id(b) for b in st.module.buffers()}
        for src in st.sources:
            if src.kind == "attr":
                obj = program.root
                try:
                    for part in src.name.split("."):
                        obj = getattr(obj, part)
                except AttributeError:
                    continue
                if isinstance(obj, torch.Tensor):
                    ids.add(id(obj))
        for i in ids:
            by_id[i] = st.index
    return {n: by_id.get(id(b), 0) for n, b in persistent.items()}


def stage_state(weights: WeightVersions, buffers: dict[str, torch.Tensor] | None = None,
                scaler: Any = None) -> dict[str, Any]:
    """A stage's weight versions, optimizer and LR scheduler state, ``buffers`` and the fp16 loss ``scaler``'s
    state, keyed by the model's names (CPU copies)."""
    names = list(weights.params)
    versions = {str(v): {k: t.detach().cpu().clone() for k, t in bufs.items()}
                for v, bufs in weights.versions().items()}
    opt: dict[str, Any] = {}
    group: dict[str, Any] = {}
    if weights.optimizer is not None:
        sd = weights.optimizer.state_dict()
        for i, st in sd["state"].items():
            opt[names[int(i)]] = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
                                  for k, v in st.items()}
        group = {k: v for k, v in sd["param_groups"][0].items() if k != "params"}
    return {"current": weights.current, "versions": versions, "optimizer": opt, "group": group, "names": names,
            "optimizer_type": type(weights.optimizer).__name__ if weights.optimizer is not None else None,
            "buffers": {k: b.detach().cpu().clone() for k, b in (buffers or {}).items()},
            "scheduler": weights.scheduler.state_dict() if weights.scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None}


@dataclass
class _Restore:
    """Everything one stage will be set to, fully checked (nothing of the pipeline touched yet)."""

    weights: WeightVersions
    current: int
    bufs: dict[int, dict[str, torch.Tensor]]
    optimizer: dict[str, Any] | None
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None


def _bad(where: str, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {where}: {what}; the checkpoint is damaged or was written for another "
                           "model — load another checkpoint of this model")


def prepare_stage(weights: WeightVersions, states: list[dict[str, Any]], where: str, scaler: Any = None) -> _Restore:
    """Check stage states against ``weights`` and build what they will become; each parameter is looked up
    in ``states`` in order (first hit wins).

    Raises:
        StateDictError: a parameter is missing, a shape differs, the structure is not a stage file's,
            or the optimizer is of another type / has other settings.
    """
    for st in states:
        if not isinstance(st, dict) or not isinstance(st.get("versions"), dict) or \
                not isinstance(st.get("optimizer", {}), dict) or not isinstance(st.get("current"), int):
            raise _bad(where, f"a stage file is not a dict with 'current' (int), 'versions' and 'optimizer' "
                              f"(got {type(st).__name__} with keys {sorted(st)[:6] if isinstance(st, dict) else []})")
    names = list(weights.params)
    current = states[0]["current"]
    if str(current) not in states[0]["versions"]:
        raise _bad(where, f"current version {current} is not among the saved versions "
                          f"{sorted(states[0]['versions'])}")
    bufs: dict[int, dict[str, torch.Tensor]] = {}
    try:
        for v in states[0]["versions"]:
            bufs[int(v)] = {}
    except ValueError:
        raise _bad(where, f"version keys {sorted(states[0]['versions'])} are not integers") from None
    opt_state: dict[str, Any] = {}
    for n in names:
        st = next((s for s in states if isinstance(s["versions"].get(str(current)), dict)
                   and n in s["versions"][str(current)]), None)
        if st is None:
            raise StateDictError(f"checkpoint {where} holds no weights for parameter {n!r}; it was written "
                                 "for another model — load a checkpoint of this model")
        p = weights.params[n]
        for v, vb in st["versions"].items():
            t = vb.get(n) if isinstance(vb, dict) else None
            if not isinstance(t, torch.Tensor):
                raise _bad(where, f"version {v} of {n!r} is a {type(t).__name__}, not a tensor")
            if tuple(t.shape) != tuple(p.shape):
                raise StateDictError(f"checkpoint {where}: {n!r} has shape {tuple(t.shape)}, the model "
                                     f"expects {tuple(p.shape)}")
            bufs.setdefault(int(v), {})[n] = t
        if n in st.get("optimizer", {}):
            slots = st["optimizer"][n]
            if not isinstance(slots, dict):
                raise _bad(where, f"optimizer state of {n!r} is a {type(slots).__name__}, not a dict")
            for k, t in slots.items():
                if isinstance(t, torch.Tensor) and t.dim() > 0 and tuple(t.shape) != tuple(p.shape):
                    raise StateDictError(f"checkpoint {where}: optimizer slot {k!r} of {n!r} has shape "
                                         f"{tuple(t.shape)}, the parameter {tuple(p.shape)}")
            opt_state[n] = slots
    sched = states[0].get("scheduler") if weights.scheduler is not None else None
    if weights.optimizer is not None and (weights.scheduler is None) != (not isinstance(states[0].get("scheduler"),
                                                                                         dict)):
        have = type(weights.scheduler).__name__ if weights.scheduler is not None else "none"
        raise StateDictError(f"checkpoint {where} holds {'an' if have == 'none' else 'no'} LR scheduler state, this "
                             f"pipeline's lr_scheduler is {have}; compile with the lr_scheduler the checkpoint was "
                             "trained with, or load only the weights with pipe.load_state_dict(...)")
    opt = weights.optimizer
    restore_opt = None
    if opt is not None:
        saved_type = states[0].get("optimizer_type")
        mine = {k for k in opt.param_groups[0] if k != "params"}
        group = states[0].get("group") or {}
        if not isinstance(group, dict):
            raise _bad(where, f"optimizer settings are a {type(group).__name__}, not a dict")
        if (saved_type is not None and saved_type != type(opt).__name__) or (group and set(group) != mine):
            raise StateDictError(
                f"checkpoint {where} holds the state of a {saved_type or 'different'} optimizer (settings "
                f"{sorted(group)}), this pipeline's optimizer is {type(opt).__name__} (settings {sorted(mine)}); "
                "compile with the optimizer the checkpoint was trained with, or load only the weights with "
                "pipe.load_state_dict(...)")
        if len(opt.param_groups) != 1:
            raise StateDictError(f"checkpoint {where}: the optimizer has {len(opt.param_groups)} parameter "
                                 "groups; fxpipe checkpoints hold one group per stage — build the optimizer "
                                 "with one group")
        group = dict(group) or {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        restore_opt = {"state": {names.index(n): s for n, s in opt_state.items()},
                       "param_groups": [{**group, "params": list(range(len(names)))}]}
    sc = None
    if scaler is not None:
        sc = states[0].get("scaler")
        if not isinstance(sc, dict) or not {"scale", "growth_tracker"} <= set(sc):
            raise StateDictError(f"checkpoint {where} holds no loss-scaler state, this pipeline trains with "
                                 "precision='fp16'; compile with the precision the checkpoint was trained with")
    return _Restore(weights, int(current), bufs, restore_opt, scheduler=sched, scaler=sc)


def apply_stage(r: _Restore, scaler: Any = None) -> None:
    """Set a stage (and the loss ``scaler``) to a checked :class:`_Restore` (cannot fail on a checked one)."""
    w = r.weights
    bufs = {v: {n: t.to(device=w.params[n].device, dtype=w.params[n].dtype).clone() for n, t in b.items()}
            for v, b in r.bufs.items()}
    w.restore(r.current, bufs)
    if w.optimizer is not None and r.optimizer is not None:
        w.optimizer.load_state_dict(r.optimizer)
    if w.scheduler is not None and r.scheduler is not None:
        w.scheduler.load_state_dict(r.scheduler)
    if scaler is not None and r.scaler is not None:
        scaler.load_state_dict(r.scaler)


def load_stage_state(weights: WeightVersions, states: list[dict[str, Any]], where: str) -> None:
    """Restore ``weights`` from stage states (checked first; see :func:`prepare_stage`)."""
    apply_stage(prepare_stage(weights, states, where))


def prepare_buffers(model: torch.nn.Module, states: list[dict[str, Any]], meta: dict[str, Any],
                     where: str) -> dict[str, torch.Tensor]:
    """Buffer name -> saved tensor, every persistent buffer of ``model`` (none for a version-1 checkpoint)."""
    if meta.get("version") == 1:
        return {}
    saved: dict[str, Any] = {}
    for st in states:
        b = st.get("buffers", {})
        if not isinstance(b, dict):
            raise _bad(where, f"buffers are a {type(b).__name__}, not a dict")
        for k, v in b.items():
            saved.setdefault(k, v)
    own = {n: b for n, b in model.state_dict(keep_vars=True).items() if not isinstance(b, torch.nn.Parameter)}
    missing = sorted(set(own) - set(saved))
    if missing:
        raise StateDictError(f"checkpoint {where} holds no value for buffers {missing[:5]}; it was written for "
                             "another model — load a checkpoint of this model")
    for n, b in own.items():
        t = saved[n]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(b.shape):
            raise StateDictError(f"checkpoint {where}: buffer {n!r} has shape "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}, "
                                 f"the model expects {tuple(b.shape)}")
    return {n: saved[n] for n in own}


def apply_buffers(model: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    own = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for n, t in buffers.items():
            own[n].copy_(t.to(own[n].dtype))


def owned_buffers(pipe: Any, stage: int) -> dict[str, torch.Tensor]:
    owners = buffer_owners(pipe.program, pipe.model)
    sd = pipe.model.state_dict(keep_vars=True)
    return {n: sd[n] for n, s in owners.items() if s == stage}
