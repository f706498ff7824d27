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
New state (a loss scaler, an LR scheduler) is one more key of the stage file
(:mod:`fxpipe.runtime.checkpoint_state`); the directory, its manifest and the atomic
install are :mod:`fxpipe.runtime.checkpoint_files`; this module saves and loads.

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
import shutil
from typing import Any

import torch

from fxpipe.errors import CheckpointError, FxpipeError
from fxpipe.runtime.checkpoint_files import (FORMAT, MANIFEST, check_destination, checkpoint_path, find_checkpoint,
                                             install, manifest, read_meta, stage_files, temporary_path)
from fxpipe.runtime.checkpoint_state import (apply_buffers, apply_stage, buffer_owners, load_stage_state,
                                             owned_buffers, prepare_buffers, prepare_stage, stage_state)

__all__ = ["FORMAT", "stage_state", "load_stage_state", "save_local", "load_local", "save_distributed",
           "load_distributed", "read_meta", "buffer_owners", "check_destination", "find_checkpoint"]


def _scaler(pipe: Any) -> Any:
    return getattr(pipe, "scaler", None)


def save_local(pipe: Any, path: Any) -> None:
    """Write a checkpoint of a Pipeline with the local executor (see the module docstring)."""
    p = check_destination(path)
    ex = pipe._executor
    tmp = temporary_path(p)
    try:
        tmp.mkdir(parents=True)
        for s, weights in enumerate(ex.weight_versions()):
            torch.save(stage_state(weights, owned_buffers(pipe, s), _scaler(pipe)), tmp / f"stage_{s}.pt")
        (tmp / MANIFEST).write_text(json.dumps(manifest(pipe, ex.batch, "local", 1), indent=1))   # last: complete
        check_destination(p)
        install(tmp, p)
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
        states = stage_files(p, meta, s)
        states_all = states_all or states
        restores.append(prepare_stage(weights, states, str(p), _scaler(pipe)))
    buffers = prepare_buffers(pipe.model, states_all, meta, str(p))
    for r in restores:
        apply_stage(r, _scaler(pipe))
    apply_buffers(pipe.model, buffers)
    ex.reset(int(meta["batch"]))


def save_distributed(pipe: Any, path: Any) -> None:
    """Collective: replica-0 ranks write their stage, rank 0 the manifest (last) and the final rename.

    The directory must be on a file system every rank sees (one machine, or a shared mount).
    """
    ex = pipe._executor
    p = checkpoint_path(path)
    ex.drain()
    tmp = temporary_path(p, "fxpipe")
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
            torch.save(stage_state(ex.weights, owned_buffers(pipe, ex.stage), _scaler(pipe)),
                       tmp / f"stage_{ex.stage}.pt")
        except OSError as e:
            ok, err = False, str(e)
    if not ex.agree(ok, "save (writing stage files)"):
        raise CheckpointError(f"cannot write checkpoint {str(p)!r} ({ex._where()}: {err or 'another rank failed'}); "
                              "check free space and that every rank sees the same file system")
    if ex.rank == 0:
        try:
            (tmp / MANIFEST).write_text(json.dumps(manifest(pipe, ex.batch, "distributed", ex.w), indent=1))
            install(tmp, p)
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
        states = stage_files(p, meta, ex.stage)
        restore = prepare_stage(ex.weights, states, str(p), _scaler(pipe))
        buffers = prepare_buffers(pipe.model, states, meta, str(p))
    except FxpipeError as e:
        ok, err = False, e
    if not ex.agree(ok, "load"):
        if err is not None:
            raise err
        raise CheckpointError(f"loading checkpoint {str(path)!r} failed on another rank (see its log); "
                              f"{ex._where()} read it fine; nothing was loaded")
    apply_stage(restore, _scaler(pipe))
    apply_buffers(pipe.model, buffers)
    ex.batch = int(meta["batch"])
