"""Checkpoints: both 2BW weight versions, optimizer state and the batch counter, per stage, written atomically.

Layout of a checkpoint directory (same for the local and the distributed executor)::

    ckpt/
      fxpipe.json     format, version, schedule, d, m, w, batch, executor, parameter shapes
      stage_0.pt      {"current": v, "versions": {"v-1": {name: tensor}, "v": {...}},
      stage_1.pt       "optimizer": {name: {slot: tensor}}, "group": {lr: ..., ...}, "names": [...]}

Everything is keyed by canonical parameter names (the model's own), so a
checkpoint written by one executor loads into the other: a tied parameter is
held by every stage that reads it under the distributed executor and by the
lowest such stage under the local one.  Files are written into a temporary
sibling directory that is renamed into place at the end, and read back with
``torch.load(weights_only=True)`` (no code is ever unpickled).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from fxpipe.errors import FxpipeError, StateDictError
from fxpipe.runtime.weights import WeightVersions

__all__ = ["FORMAT", "stage_state", "load_stage_state", "save_local", "load_local", "save_distributed",
           "load_distributed", "read_meta"]

FORMAT = "fxpipe.checkpoint"
VERSION = 1
_META = "fxpipe.json"


def stage_state(weights: WeightVersions) -> dict[str, Any]:
    """A stage's weight versions and optimizer state, keyed by canonical names (tensors cloned to CPU)."""
    names = list(weights.params)
    versions = {str(v): {k: t.detach().cpu().clone() for k, t in bufs.items()}
                for v, bufs in weights._bufs.items()}
    opt: dict[str, Any] = {}
    group: dict[str, Any] = {}
    if weights.optimizer is not None:
        sd = weights.optimizer.state_dict()
        for i, st in sd["state"].items():
            opt[names[int(i)]] = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
                                  for k, v in st.items()}
        group = {k: v for k, v in sd["param_groups"][0].items() if k != "params"}
    return {"current": weights.current, "versions": versions, "optimizer": opt, "group": group, "names": names}


def load_stage_state(weights: WeightVersions, states: list[dict[str, Any]], where: str) -> None:
    """Restore ``weights`` from stage states; each name is looked up in ``states`` in order (first hit wins).

    Raises:
        StateDictError: a parameter is missing, or its shape differs.
    """
    names = list(weights.params)
    current = states[0]["current"]
    bufs: dict[int, dict[str, torch.Tensor]] = {int(v): {} for v in states[0]["versions"]}
    bufs.setdefault(int(current), {})
    opt_state: dict[int, Any] = {}
    for i, n in enumerate(names):
        st = next((s for s in states if n in s["versions"].get(str(current), {})), None)
        if st is None:
            raise StateDictError(f"checkpoint {where} holds no weights for parameter {n!r}; it was written "
                                 "for another model — load a checkpoint of this model")
        p = weights.params[n]
        for v, vb in st["versions"].items():
            t = vb[n]
            if tuple(t.shape) != tuple(p.shape):
                raise StateDictError(f"checkpoint {where}: {n!r} has shape {tuple(t.shape)}, the model "
                                     f"expects {tuple(p.shape)}")
            bufs.setdefault(int(v), {})[n] = t.to(device=p.device, dtype=p.dtype).clone()
        if n in st["optimizer"]:
            opt_state[i] = st["optimizer"][n]
    weights.current = int(current)
    weights._bufs = bufs
    weights._leaves = {}
    for n, p in weights.params.items():
        p.data = bufs[weights.current][n]
    if weights.optimizer is not None:
        group = dict(states[0]["group"]) or {k: v for k, v in weights.optimizer.param_groups[0].items()
                                             if k != "params"}
        weights.optimizer.load_state_dict({"state": opt_state, "param_groups": [{**group, "params": list(range(len(names)))}]})


# -- files --------------------------------------------------------------------
def _tmp_sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.tmp-{tag}"


def _install(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``, replacing an old checkpoint only once the new one is complete."""
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _meta(pipe: Any, batch: int, executor: str, w: int) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "executor": executor, "schedule": pipe.schedule,
            "num_stages": pipe.plan.num_stages, "num_microbatches": pipe.num_microbatches,
            "data_parallel": w, "batch": batch,
            "params": {n: [list(p.shape), str(p.dtype)] for n, p in pipe._params.items()}}


def read_meta(path: str | os.PathLike, pipe: Any) -> dict[str, Any]:
    """Read and check ``fxpipe.json`` of a checkpoint against ``pipe``.

    Raises:
        StateDictError: missing directory/file, wrong format, or another model/schedule.
    """
    p = Path(path)
    if not p.is_dir():
        raise StateDictError(f"checkpoint directory {str(p)!r} does not exist (or is not a directory); pass the "
                             "directory given to pipe.save(dir)")
    mf = p / _META
    try:
        meta = json.loads(mf.read_text())
    except FileNotFoundError:
        raise StateDictError(f"{str(mf)!r} is missing: {str(p)!r} is not an fxpipe checkpoint (or was not "
                             "completely written); pass a directory written by pipe.save(dir)") from None
    except (OSError, ValueError) as e:
        raise StateDictError(f"cannot read {str(mf)!r}: {e}; the checkpoint is damaged — use another one") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StateDictError(f"{str(mf)!r} is not an fxpipe checkpoint manifest (format "
                             f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise StateDictError(f"{str(p)!r} has checkpoint format version {meta.get('version')}, this fxpipe "
                             f"reads version {VERSION}")
    mine = {n: [list(t.shape), str(t.dtype)] for n, t in pipe._params.items()}
    if meta.get("params") != mine:
        diff = sorted(set(meta.get("params", {})) ^ set(mine))[:5] or \
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
        return torch.load(f, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise StateDictError(f"{str(f)!r} is missing: the checkpoint is incomplete; use another one") from None
    except Exception as e:  # noqa: BLE001 - damaged file or disallowed (non-tensor) content
        raise StateDictError(f"cannot load {str(f)!r} with torch.load(weights_only=True): {e}; the checkpoint "
                             "is damaged or not written by fxpipe") from e


def _stage_files(path: Path, meta: dict[str, Any], first: int) -> list[dict[str, Any]]:
    """All stage states, stage ``first`` first (so its own entries win)."""
    d = int(meta["num_stages"])
    order = [first] + [s for s in range(d) if s != first] if first < d else list(range(d))
    return [_load_file(path / f"stage_{s}.pt") for s in order]


def save_local(pipe: Any, path: str | os.PathLike) -> None:
    """Write a checkpoint of a Pipeline with the local executor."""
    p = Path(path)
    ex = pipe._executor
    tmp = _tmp_sibling(p, uuid.uuid4().hex[:8])
    try:
        tmp.mkdir(parents=True)
        for rt in ex.runtimes:
            torch.save(stage_state(rt.weights), tmp / f"stage_{rt.program.index}.pt")
        (tmp / _META).write_text(json.dumps(_meta(pipe, ex.batch, "local", 1), indent=1))
        _install(tmp, p)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StateDictError(f"cannot write checkpoint {str(p)!r}: {e}; check the path and free space") from e


def load_local(pipe: Any, path: str | os.PathLike) -> None:
    """Restore a Pipeline with the local executor from ``path`` (any executor's checkpoint)."""
    p = Path(path)
    meta = read_meta(p, pipe)
    ex = pipe._executor
    for rt in ex.runtimes:
        states = _stage_files(p, meta, rt.program.index)
        load_stage_state(rt.weights, states, str(p))
    ex.reset(int(meta["batch"]))


def save_distributed(pipe: Any, path: str | os.PathLike) -> None:
    """Collective: replica-0 ranks write their stage, rank 0 the manifest and the final rename.

    The directory must be on a file system every rank sees (one machine, or a shared mount).
    """
    ex = pipe._executor
    ex.drain()
    p = Path(path)
    tmp = _tmp_sibling(p, "fxpipe")
    ok, err = True, ""
    if ex.rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            ok, err = False, str(e)
    if not ex.agree(ok, "save (creating the directory)"):
        raise StateDictError(f"cannot create checkpoint directory {str(tmp)!r}{': ' + err if err else ''}; "
                             "check the path, permissions and that every rank sees the same file system")
    if ex.replica == 0:
        try:
            torch.save(stage_state(ex.weights), tmp / f"stage_{ex.stage}.pt")
            if ex.rank == 0:
                (tmp / _META).write_text(json.dumps(_meta(pipe, ex.batch, "distributed", ex.w), indent=1))
        except OSError as e:
            ok, err = False, str(e)
    if not ex.agree(ok, "save (writing stage files)"):
        raise StateDictError(f"cannot write checkpoint {str(p)!r} ({ex._where()}: {err or 'another rank failed'}); "
                             "check free space and that every rank sees the same file system")
    if ex.rank == 0:
        try:
            _install(tmp, p)
        except OSError as e:
            ok, err = False, str(e)
    if not ex.agree(ok, "save (renaming into place)"):
        raise StateDictError(f"cannot rename {str(tmp)!r} to {str(p)!r}: {err or 'failed on rank 0'}")


def load_distributed(pipe: Any, path: str | os.PathLike) -> None:
    """Collective: every rank reads the manifest and the stage files it needs."""
    ex = pipe._executor
    ex.drain()
    ok, err = True, None
    try:
        meta = read_meta(path, pipe)
        states = _stage_files(Path(path), meta, ex.stage)
        load_stage_state(ex.weights, states, str(path))
        ex.batch = int(meta["batch"])
    except FxpipeError as e:
        ok, err = False, e
    if not ex.agree(ok, "load"):
        if err is not None:
            raise err
        raise StateDictError(f"loading checkpoint {str(path)!r} failed on another rank (see its log); "
                             f"{ex._where()} read it fine")
