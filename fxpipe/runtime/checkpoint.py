"""Checkpoints: both 2BW weight versions, optimizer state, buffers and the batch counter, installed atomically.

Layout of a checkpoint directory (same for the local and the distributed executor)::

    ckpt/
      fxpipe.json     format, version, schedule, d, m, w, batch, executor, parameter and buffer shapes
      stage_0.pt      {"current": v, "versions": {"v-1": {name: tensor}, "v": {...}},
      stage_1.pt       "optimizer": {name: {slot: tensor}}, "group": {lr: ..., ...}, "names": [...],
                       "optimizer_type": "SGD", "buffers": {buffer name: tensor}}

Everything is keyed by the model's own names, so a checkpoint written by one
executor loads into the other: a tied parameter is held by every stage that
reads it under the distributed executor and by the lowest such stage under the
local one; a buffer by the lowest stage that holds it (:func:`buffer_owners`).
New state (a loss scaler, an LR scheduler) is one more key of the stage file:
written in :func:`stage_state`, checked in :func:`_prepare`, set in :func:`_apply`.

Saving never destroys anything but an older checkpoint: the path must be absent,
an empty directory, or a directory holding only a checkpoint's files.  Files are
written into ``.NAME.tmp-*`` beside the path, the manifest last; installing renames
an old checkpoint to ``.NAME.old-*``, the new one into place, then deletes the old::

    write .ck.tmp-X ──▶ ck → .ck.old-Y ──▶ .ck.tmp-X → ck ──▶ rm .ck.old-Y
                                       ▲ killed here: ck is missing, both copies are complete;
                                         load(ck) installs the newer (.tmp) one and says so

Loading is all or nothing: the manifest, every stage file, every shape and the
optimizer's type are checked before the first tensor is copied.  Files are read
with ``torch.load(weights_only=True)`` (no code is ever unpickled).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fxpipe.errors import CheckpointError, FxpipeError, StateDictError
from fxpipe.runtime.weights import WeightVersions

__all__ = ["FORMAT", "stage_state", "load_stage_state", "save_local", "load_local", "save_distributed",
           "load_distributed", "read_meta", "buffer_owners", "check_destination", "find_checkpoint"]

FORMAT = "fxpipe.checkpoint"
VERSION = 2
_READS = (1, 2)                  # version 1: the same without buffers and optimizer type
_META = "fxpipe.json"


# -- what a stage holds ---------------------------------------------------------------------------
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


def _prepare(weights: WeightVersions, states: list[dict[str, Any]], where: str, scaler: Any = None) -> _Restore:
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


def _apply(r: _Restore, scaler: Any = None) -> None:
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
    """Restore ``weights`` from stage states (checked first; see :func:`_prepare`)."""
    _apply(_prepare(weights, states, where))


def _prepare_buffers(model: torch.nn.Module, states: list[dict[str, Any]], meta: dict[str, Any],
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


def _apply_buffers(model: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    own = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for n, t in buffers.items():
            own[n].copy_(t.to(own[n].dtype))


# -- the directory ------------------------------------------------------------------------------
def _path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes) or str(path) == "":
        raise CheckpointError(f"a checkpoint path must be a non-empty str or os.PathLike, got "
                              f"{type(path).__name__} {path!r}; pass e.g. pipe.save('checkpoints/step_100')")
    return Path(path)


def _is_checkpoint_dir(p: Path) -> bool:
    try:
        meta = json.loads((p / _META).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _checkpoint_file(name: str) -> bool:
    return name == _META or (name.startswith("stage_") and name.endswith(".pt"))


def check_destination(path: Any) -> Path:
    """The Path to save to, after checking that saving there destroys nothing but an older checkpoint.

    Raises:
        CheckpointError: ``path`` is not a path, is a file, or a directory that is not (only) a checkpoint.
    """
    p = _path(path)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise CheckpointError(f"cannot save a checkpoint to {str(p)!r}: it is a "
                              f"{'symbolic link' if p.is_symlink() else 'file'} ({p.lstat().st_size} bytes), "
                              "which saving would replace; pass a new directory name")
    if p.is_dir():
        entries = sorted(os.listdir(p))
        foreign = [e for e in entries if not _checkpoint_file(e)]
        if entries and (foreign or not _is_checkpoint_dir(p)):
            shown = foreign or entries
            raise CheckpointError(
                f"cannot save a checkpoint to {str(p)!r}: it is a directory holding "
                f"{'files that are not an fxpipe checkpoint' if foreign else 'no valid fxpipe.json'} "
                f"({', '.join(shown[:5])}{', ...' if len(shown) > 5 else ''}; {len(entries)} entries), which "
                "saving would delete; only an earlier fxpipe checkpoint is replaced — pass a new directory "
                f"name, e.g. {str(p / 'checkpoint')!r}")
    return p


def _siblings(p: Path, kind: str) -> list[Path]:
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        return []
    pre = f".{p.name}.{kind}-"
    out = [parent / e for e in os.listdir(parent) if e.startswith(pre)]
    return sorted(out, key=lambda q: q.stat().st_mtime, reverse=True)


def _install(tmp: Path, path: Path) -> None:
    """Rename the complete ``tmp`` to ``path``, replacing an old checkpoint only once the new one is in place."""
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for stale in _siblings(path, "tmp") + _siblings(path, "old"):   # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)


def find_checkpoint(path: Any, recover: bool = True) -> Path:
    """The checkpoint directory at ``path``; if a save was killed while installing, recover it first.

    A save killed between its two renames leaves no ``path`` but a complete ``.NAME.tmp-*`` (the new
    checkpoint) and ``.NAME.old-*`` (the previous one): the newest complete one is renamed into place
    (when ``recover``) with a warning.

    Raises:
        CheckpointError: nothing loadable at ``path`` (the message names any leftovers found).
    """
    p = _path(path)
    if p.is_dir() and (p / _META).exists():
        return p
    found = [q for q in _siblings(p, "tmp") + _siblings(p, "old") if _is_checkpoint_dir(q)]
    if not p.exists() and found:
        best = found[0] if not any(".tmp-" in q.name for q in found) else \
            next(q for q in found if ".tmp-" in q.name)
        if not recover:
            return best
        os.replace(best, p)
        for q in found:
            if q != best:
                shutil.rmtree(q, ignore_errors=True)
        warnings.warn(f"fxpipe: {str(p)!r} was missing (a save was interrupted while installing); recovered "
                      f"it from the complete copy {best.name!r}", stacklevel=3)
        return p
    left = _siblings(p, "tmp") + _siblings(p, "old")
    extra = (f"; incomplete leftovers of an interrupted save lie beside it: {[q.name for q in left][:4]}"
             if left else "")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint directory {str(p)!r} does not exist (or is not a directory){extra}; "
                              "pass the directory given to pipe.save(dir)")
    raise CheckpointError(f"{str(p / _META)!r} is missing: {str(p)!r} is not an fxpipe checkpoint (or was not "
                          f"completely written){extra}; pass a directory written by pipe.save(dir)")


def _meta(pipe: Any, batch: int, executor: str, w: int) -> dict[str, Any]:
    buffers = {n: [list(b.shape), str(b.dtype)] for n, b in pipe.model.state_dict(keep_vars=True).items()
               if not isinstance(b, torch.nn.Parameter)}
    return {"format": FORMAT, "version": VERSION, "executor": executor, "schedule": pipe.schedule,
            "num_stages": pipe.plan.num_stages, "num_microbatches": pipe.num_microbatches,
            "data_parallel": w, "batch": batch,
            "params": {n: [list(p.shape), str(p.dtype)] for n, p in pipe._params.items()},
            "buffers": buffers}


def _int_field(meta: dict[str, Any], key: str, low: int, mf: Path) -> int:
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise CheckpointError(f"{str(mf)!r}: {key!r} is {v!r}, expected an int >= {low}; the manifest is "
                              "damaged — use another checkpoint")
    return v


def read_meta(path: str | os.PathLike, pipe: Any) -> dict[str, Any]:
    """Read and check every field of ``fxpipe.json`` of a checkpoint against ``pipe``.

    Raises:
        StateDictError: missing directory/file, wrong format or field types, or another model/schedule.
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint directory {str(p)!r} does not exist (or is not a directory); pass the "
                              "directory given to pipe.save(dir)")
    mf = p / _META
    try:
        meta = json.loads(mf.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{str(mf)!r} is missing: {str(p)!r} is not an fxpipe checkpoint (or was not "
                              "completely written); pass a directory written by pipe.save(dir)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {str(mf)!r}: {e}; the checkpoint is damaged — use another one") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(mf)!r} is not an fxpipe checkpoint manifest (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") not in _READS:
        raise CheckpointError(f"{str(p)!r} has checkpoint format version {meta.get('version')!r}, this fxpipe "
                              f"reads versions {list(_READS)}")
    for key, low in (("batch", 0), ("num_stages", 1), ("num_microbatches", 1), ("data_parallel", 1)):
        _int_field(meta, key, low, mf)
    mine = {n: [list(t.shape), str(t.dtype)] for n, t in pipe._params.items()}
    if not isinstance(meta.get("params"), dict):
        raise CheckpointError(f"{str(mf)!r}: 'params' is {type(meta.get('params')).__name__}, expected a dict "
                              "of parameter shapes; the manifest is damaged — use another checkpoint")
    if meta["params"] != mine:
        diff = sorted(set(meta["params"]) ^ set(mine))[:5] or \
            [n for n in mine if meta["params"].get(n) != mine[n]][:5]
        raise StateDictError(f"checkpoint {str(p)!r} was written for another model: parameters differ at "
                             f"{diff}; load a checkpoint of this model (or use load_state_dict for weights only)")
    for key, have in (("schedule", pipe.schedule), ("num_microbatches", pipe.num_microbatches)):
        if meta.get(key) != have:
            raise StateDictError(f"checkpoint {str(p)!r} has {key}={meta.get(key)!r}, this pipeline "
                                 f"{key}={have!r}; compile with the checkpoint's {key} to resume exactly")
    return meta


def _load_file(f: Path) -> dict[str, Any]:
    try:
        out = torch.load(f, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{str(f)!r} is missing: the checkpoint is incomplete; use another one") from None
    except Exception as e:  # noqa: BLE001 - damaged file or disallowed (non-tensor) content
        raise CheckpointError(f"cannot load {str(f)!r} with torch.load(weights_only=True): {e}; the checkpoint "
                              "is damaged or not written by fxpipe") from e
    if not isinstance(out, dict):
        raise CheckpointError(f"{str(f)!r} holds a {type(out).__name__}, not an fxpipe stage state")
    return out


def _stage_files(path: Path, meta: dict[str, Any], first: int) -> list[dict[str, Any]]:
    """All stage states, stage ``first`` first (so its own entries win)."""
    d = int(meta["num_stages"])
    order = [first] + [s for s in range(d) if s != first] if first < d else list(range(d))
    return [_load_file(path / f"stage_{s}.pt") for s in order]


def _owned_buffers(pipe: Any, stage: int) -> dict[str, torch.Tensor]:
    owners = buffer_owners(pipe.program, pipe.model)
    sd = pipe.model.state_dict(keep_vars=True)
    return {n: sd[n] for n, s in owners.items() if s == stage}


def _scaler(pipe: Any) -> Any:
    return getattr(pipe, "scaler", None)


def save_local(pipe: Any, path: Any) -> None:
    """Write a checkpoint of a Pipeline with the local executor (see the module docstring)."""
    p = check_destination(path)
    ex = pipe._executor
    tmp = p.parent / f".{p.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        for s, weights in enumerate(ex.weight_versions()):
            torch.save(stage_state(weights, _owned_buffers(pipe, s), _scaler(pipe)), tmp / f"stage_{s}.pt")
        (tmp / _META).write_text(json.dumps(_meta(pipe, ex.batch, "local", 1), indent=1))   # last: complete
        check_destination(p)
        _install(tmp, p)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {str(p)!r}: {e}; check the path and free space") from e
    except FxpipeError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_local(pipe: Any, path: Any) -> None:
    """Restore a Pipeline with the local executor from ``path`` (any executor's checkpoint); all or nothing."""
    p = find_checkpoint(path)
    meta = read_meta(p, pipe)
    ex = pipe._executor
    restores, states_all = [], []
    for s, weights in enumerate(ex.weight_versions()):
        states = _stage_files(p, meta, s)
        states_all = states_all or states
        restores.append(_prepare(weights, states, str(p), _scaler(pipe)))
    buffers = _prepare_buffers(pipe.model, states_all, meta, str(p))
    for r in restores:
        _apply(r, _scaler(pipe))
    _apply_buffers(pipe.model, buffers)
    ex.reset(int(meta["batch"]))


def save_distributed(pipe: Any, path: Any) -> None:
    """Collective: replica-0 ranks write their stage, rank 0 the manifest (last) and the final rename.

    The directory must be on a file system every rank sees (one machine, or a shared mount).
    """
    ex = pipe._executor
    p = _path(path)
    ex.drain()
    tmp = p.parent / f".{p.name}.tmp-fxpipe"
    ok, err = True, ""
    if ex.rank == 0:
        try:
            check_destination(p)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except (OSError, FxpipeError) as e:
            ok, err = False, str(e)
    if not ex.agree(ok, "save (creating the directory)"):
        raise CheckpointError(err or f"cannot create checkpoint directory {str(tmp)!r} (see rank 0's log); "
                              "check the path, permissions and that every rank sees the same file system")
    if ex.replica == 0:
        try:
            torch.save(stage_state(ex.weights, _owned_buffers(pipe, ex.stage), _scaler(pipe)),
                       tmp / f"stage_{ex.stage}.pt")
        except OSError as e:
            ok, err = False, str(e)
    if not ex.agree(ok, "save (writing stage files)"):
        raise CheckpointError(f"cannot write checkpoint {str(p)!r} ({ex._where()}: {err or 'another rank failed'}); "
                              "check free space and that every rank sees the same file system")
    if ex.rank == 0:
        try:
            (tmp / _META).write_text(json.dumps(_meta(pipe, ex.batch, "distributed", ex.w), indent=1))
            _install(tmp, p)
        except OSError as e:
            ok, err = False, str(e)
    if not ex.agree(ok, "save (renaming into place)"):
        raise CheckpointError(f"cannot rename {str(tmp)!r} to {str(p)!r}: {err or 'failed on rank 0'}")


def load_distributed(pipe: Any, path: Any) -> None:
    """Collective, all or nothing on every rank: each rank checks the manifest and the stage files it needs,
    and nothing is changed unless every rank found its part sound."""
    ex = pipe._executor
    ex.drain()
    ok, err = True, None
    if ex.rank == 0:
        try:
            find_checkpoint(path)            # rank 0 alone recovers an interrupted install
        except FxpipeError as e:
            ok, err = False, e
    if not ex.agree(ok, "load (finding the checkpoint)"):
        raise err if err is not None else CheckpointError(
            f"loading checkpoint {str(path)!r} failed on rank 0 (see its log)")
    try:
        p = find_checkpoint(path, recover=False)
        meta = read_meta(p, pipe)
        states = _stage_files(p, meta, ex.stage)
        restore = _prepare(ex.weights, states, str(p), _scaler(pipe))
        buffers = _prepare_buffers(pipe.model, states, meta, str(p))
    except FxpipeError as e:
        ok, err = False, e
    if not ex.agree(ok, "load"):
        if err is not None:
            raise err
        raise CheckpointError(f"loading checkpoint {str(path)!r} failed on another rank (see its log); "
                              f"{ex._where()} read it fine; nothing was loaded")
    _apply(restore, _scaler(pipe))
    _apply_buffers(pipe.model, buffers)
    ex.batch = int(meta["batch"])
