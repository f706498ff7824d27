"""The checkpoint directory on disk: its manifest, the atomic install, recovery of an interrupted save, stage files."""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

from fxpipe.errors import CheckpointError, StateDictError

__all__ = ["FORMAT", "VERSION", "READS", "MANIFEST", "checkpoint_path", "check_destination", "install",
           "find_checkpoint", "manifest", "read_meta", "load_stage_file", "stage_files", "temporary_path"]

FORMAT = "fxpipe.checkpoint"
VERSION = 2
READS = (1, 2)                  # version 1: the same without buffers and optimizer type
MANIFEST = "fxpipe.json"


def checkpoint_path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes) or str(path) == "":
        raise CheckpointError(f"a checkpoint path must be a non-empty str or os.PathLike, got "
                              f"{type(path).__name__} {path!r}; pass e.g. pipe.save('checkpoints/step_100')")
    return Path(path)


def _is_checkpoint_dir(p: Path) -> bool:
    try:
        meta = json.loads((p / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _checkpoint_file(name: str) -> bool:
    return name == MANIFEST or (name.startswith("stage_") and name.endswith(".pt"))


def check_destination(path: Any) -> Path:
    """The Path to save to, after checking that saving there destroys nothing but an older checkpoint.

    Raises:
        CheckpointError: ``path`` is not a path, is a file, or a directory that is not (only) a checkpoint.
    """
    p = checkpoint_path(path)
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


def temporary_path(path: Path, tag: str | None = None) -> Path:
    """Where a save writes before :func:`install`: ``.NAME.tmp-TAG`` beside ``path`` (a random TAG by default)."""
    return path.parent / f".{path.name}.tmp-{tag or uuid.uuid4().hex[:8]}"


def install(tmp: Path, path: Path) -> None:
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
    p = checkpoint_path(path)
    if p.is_dir() and (p / MANIFEST).exists():
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
    raise CheckpointError(f"{str(p / MANIFEST)!r} is missing: {str(p)!r} is not an fxpipe checkpoint (or was not "
                          f"completely written){extra}; pass a directory written by pipe.save(dir)")


def manifest(pipe: Any, batch: int, executor: str, w: int) -> dict[str, Any]:
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
    mf = p / MANIFEST
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
    if meta.get("version") not in READS:
        raise CheckpointError(f"{str(p)!r} has checkpoint format version {meta.get('version')!r}, this fxpipe "
                              f"reads versions {list(READS)}")
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


def load_stage_file(f: Path) -> dict[str, Any]:
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


def stage_files(path: Path, meta: dict[str, Any], first: int) -> list[dict[str, Any]]:
    """All stage states, stage ``first`` first (so its own entries win)."""
    d = int(meta["num_stages"])
    order = [first] + [s for s in range(d) if s != first] if first < d else list(range(d))
    return [load_stage_file(path / f"stage_{s}.pt") for s in order]
