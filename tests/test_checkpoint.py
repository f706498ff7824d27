"""Checkpoints: resume bit-identically (local and distributed), cross-executor loading, and error paths."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import models
from dist_worker import build, launch
from fxpipe.errors import CheckpointError, StateDictError
from test_pipeline import SGDM, batches_for


def _train_save_resume(case, schedule, path, stages=3):
    model, x, y, loss_fn = models.CASES[case]()
    batches = batches_for(x, y, n=4)
    pipe = build(copy.deepcopy(model), x, stages=stages, m=4, schedule=schedule, loss_fn=loss_fn,
                 uniform=(case == "skip"))
    for bx, by in batches[:2]:
        pipe.step(bx, by)
    pipe.save(str(path))
    first = [pipe.step(bx, by).item() for bx, by in batches[2:]]
    fresh = build(copy.deepcopy(model), x, stages=stages, m=4, schedule=schedule, loss_fn=loss_fn,
                  uniform=(case == "skip"))
    fresh.load(str(path))
    second = [fresh.step(bx, by).item() for bx, by in batches[2:]]
    return pipe, fresh, first, second, model, batches


@pytest.mark.parametrize("case,schedule", [("gpt", "2bw"), ("skip", "2bw"), ("mlp", "flush"), ("gpt", "gpipe")])
def test_local_resume_is_bit_identical(tmp_path, case, schedule):
    pipe, fresh, first, second, _, _ = _train_save_resume(case, schedule, tmp_path / "ck")
    assert first == second
    a, b = pipe.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fresh._executor.batch == pipe._executor.batch == 4


def test_2bw_checkpoint_holds_both_versions(tmp_path):
    """Restoring only the newest weights (load_state_dict) would not resume a 2bw run exactly."""
    pipe, _, first, _, model, batches = _train_save_resume("mlp", "2bw", tmp_path / "ck")
    stage0 = torch.load(tmp_path / "ck" / "stage_0.pt", weights_only=True)
    assert sorted(stage0["versions"]) == ["1", "2"] and stage0["current"] == 2
    x, _ = batches[0]
    other = build(copy.deepcopy(model), x, stages=3, m=4, schedule="2bw", loss_fn=torch.nn.functional.mse_loss)
    other.load(str(tmp_path / "ck"))
    newest_only = build(copy.deepcopy(model), x, stages=3, m=4, schedule="2bw", loss_fn=torch.nn.functional.mse_loss)
    newest_only.load_state_dict(other.state_dict())
    assert newest_only.step(*batches[2]).item() != first[0]


@pytest.mark.timeout(120)
def test_distributed_resume_and_load_into_local(tmp_path):
    r = launch(2, ["resume", str(tmp_path), "2", "distributed"], timeout=90)
    assert r.returncodes == [0, 0], "\n".join(x[-3000:] for x in r.logs)
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key, got in res.items():
            assert got["first"] == got["second"], (rank, key)
            assert got["identical_weights"], (rank, key)
    # a distributed checkpoint (tied weight held by both stages) resumes under the local executor too
    res = json.loads((tmp_path / "rank0.json").read_text())["gpt/2bw"]
    model, x, y, loss_fn = models.CASES["gpt"]()
    batches = batches_for(x, y, n=4)
    local = build(copy.deepcopy(model), x, stages=2, m=4, schedule="2bw", loss_fn=loss_fn)
    local.load(str(tmp_path / "ckpt-gpt-2bw"))
    got = [local.step(bx, by).item() for bx, by in batches[2:]]
    assert got == pytest.approx(res["first"], abs=1e-12, rel=0)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p], "temporary directories left behind"


def _small(tmp_path):
    model, x, y, loss_fn = models.CASES["mlp"]()
    pipe = build(model, x, stages=2, m=4, schedule="2bw", loss_fn=loss_fn, optimizer=SGDM)
    pipe.step(x, y)
    pipe.save(str(tmp_path / "ck"))
    return pipe, x, y


def test_save_replaces_atomically(tmp_path):
    pipe, x, y = _small(tmp_path)
    pipe.step(x, y)
    pipe.save(str(tmp_path / "ck"))
    assert json.loads((tmp_path / "ck" / "fxpipe.json").read_text())["batch"] == 2
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_missing_directory(tmp_path):
    pipe, _, _ = _small(tmp_path)
    with pytest.raises(StateDictError, match=r"'.*nope' does not exist.*pipe.save\(dir\)"):
        pipe.load(str(tmp_path / "nope"))


def test_directory_without_manifest(tmp_path):
    pipe, _, _ = _small(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StateDictError, match=r"fxpipe.json' is missing.*not an fxpipe checkpoint"):
        pipe.load(str(tmp_path / "empty"))


def test_damaged_stage_file(tmp_path):
    pipe, _, _ = _small(tmp_path)
    (tmp_path / "ck" / "stage_1.pt").write_bytes(b"garbage")
    with pytest.raises(StateDictError, match=r"stage_1.pt' with torch.load\(weights_only=True\)"):
        pipe.load(str(tmp_path / "ck"))


def test_missing_stage_file(tmp_path):
    pipe, _, _ = _small(tmp_path)
    (tmp_path / "ck" / "stage_0.pt").unlink()
    with pytest.raises(StateDictError, match=r"stage_0.pt' is missing"):
        pipe.load(str(tmp_path / "ck"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_never_unpickles_code(tmp_path):
    pipe, _, _ = _small(tmp_path)
    torch.save({"current": 0, "versions": {}, "evil": _Evil()}, tmp_path / "ck" / "stage_0.pt")
    with pytest.raises(StateDictError, match=r"weights_only=True"):
        pipe.load(str(tmp_path / "ck"))


def test_checkpoint_of_another_model(tmp_path):
    _small(tmp_path)
    model, x, y, loss_fn = models.CASES["skip"]()
    other = build(model, x, stages=2, m=4, schedule="2bw", loss_fn=loss_fn)
    with pytest.raises(StateDictError, match=r"written for another model"):
        other.load(str(tmp_path / "ck"))


def test_checkpoint_of_another_schedule(tmp_path):
    _small(tmp_path)
    model, x, y, loss_fn = models.CASES["mlp"]()
    other = build(model, x, stages=2, m=4, schedule="flush", loss_fn=loss_fn)
    with pytest.raises(StateDictError, match=r"schedule='2bw', this pipeline schedule='flush'"):
        other.load(str(tmp_path / "ck"))


# -- saving never destroys what is not a checkpoint ----------------------------------------------------
def test_save_refuses_a_user_directory(tmp_path):
    pipe, _, _ = _small(tmp_path)
    results = tmp_path / "results"
    results.mkdir()
    (results / "paper.tex").write_text("\\section{Results}")
    with pytest.raises(CheckpointError, match=r"cannot save a checkpoint to '.*results': it is a directory "
                                              r"holding files that are not an fxpipe checkpoint \(paper.tex; 1 "
                                              r"entries\).*pass a new directory name"):
        pipe.save(str(results))
    assert (results / "paper.tex").read_text() == "\\section{Results}"
    # an extra file inside an old checkpoint is kept safe too
    (tmp_path / "ck" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match=r"notes.txt"):
        pipe.save(str(tmp_path / "ck"))
    assert sorted(os.listdir(tmp_path)) == ["ck", "results"]


def test_save_refuses_a_file_and_a_non_path(tmp_path):
    pipe, _, _ = _small(tmp_path)
    f = tmp_path / "model.bin"
    f.write_bytes(b"12345")
    with pytest.raises(CheckpointError, match=r"'.*model.bin': it is a file \(5 bytes\).*new directory name"):
        pipe.save(str(f))
    assert f.read_bytes() == b"12345" and sorted(os.listdir(tmp_path)) == ["ck", "model.bin"]
    with pytest.raises(CheckpointError, match=r"must be a non-empty str or os.PathLike, got int 123"):
        pipe.save(123)
    with pytest.raises(CheckpointError, match=r"got NoneType None"):
        pipe.load(None)


def test_save_into_an_empty_directory(tmp_path):
    pipe, _, _ = _small(tmp_path)
    (tmp_path / "fresh").mkdir()
    pipe.save(tmp_path / "fresh")
    assert sorted(os.listdir(tmp_path / "fresh")) == ["fxpipe.json", "stage_0.pt", "stage_1.pt"]


def test_kill_between_the_renames_is_recovered_by_load(tmp_path, monkeypatch):
    from fxpipe.runtime import checkpoint_files

    pipe, x, y = _small(tmp_path)                # ck holds batch 1
    pipe.step(x, y)
    want = pipe.state_dict()
    real, calls = os.replace, []

    def killed(src, dst):                        # the process dies right after renaming the old one aside
        calls.append((src, dst))
        if len(calls) == 2:
            raise SystemExit("killed")
        real(src, dst)
    monkeypatch.setattr(checkpoint_files.os, "replace", killed)
    with pytest.raises(SystemExit):
        pipe.save(str(tmp_path / "ck"))
    monkeypatch.setattr(checkpoint_files.os, "replace", real)
    left = sorted(os.listdir(tmp_path))
    assert "ck" not in left and any(".ck.old-" in e for e in left) and any(".ck.tmp-" in e for e in left)
    model, x, y, loss_fn = models.CASES["mlp"]()
    fresh = build(model, x, stages=2, m=4, schedule="2bw", loss_fn=loss_fn, optimizer=SGDM)
    with pytest.warns(UserWarning, match=r"'.*ck' was missing \(a save was interrupted while installing\); "
                                         r"recovered it from the complete copy '.ck.tmp-"):
        fresh.load(str(tmp_path / "ck"))
    assert sorted(os.listdir(tmp_path)) == ["ck"] and fresh._executor.batch == 2
    got = fresh.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_load_names_incomplete_leftovers(tmp_path):
    pipe, _, _ = _small(tmp_path)
    (tmp_path / ".gone.tmp-1234").mkdir()        # a save killed before its manifest was written
    with pytest.raises(CheckpointError, match=r"'.*gone' does not exist.*leftovers of an interrupted save "
                                              r"lie beside it: \['.gone.tmp-1234'\]"):
        pipe.load(str(tmp_path / "gone"))


# -- buffers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["2bw", "flush"])
def test_batchnorm_resume_is_bit_identical_with_buffers(tmp_path, schedule):
    model, x, y, loss_fn = models.bn_case()
    batches = batches_for(x, y, n=4)
    pipe = build(copy.deepcopy(model), x, stages=2, m=4, schedule=schedule, loss_fn=loss_fn, optimizer=SGDM)
    for bx, by in batches[:2]:
        pipe.step(bx, by)
    pipe.save(tmp_path / "ck")
    torch.manual_seed(7)                         # dropout draws of the resumed steps
    first = [pipe.step(bx, by).item() for bx, by in batches[2:]]
    fresh = build(copy.deepcopy(model), x, stages=2, m=4, schedule=schedule, loss_fn=loss_fn, optimizer=SGDM)
    fresh.load(tmp_path / "ck")
    torch.manual_seed(7)
    second = [fresh.step(bx, by).item() for bx, by in batches[2:]]
    assert first == second
    a, b = pipe.state_dict(), fresh.state_dict()
    assert a["bn2.num_batches_tracked"].item() == 4 * 4      # BatchNorm counts every microbatch
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- a failed load changes nothing -----------------------------------------------------------------------
def _snapshot(pipe):
    opt = [{k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)}
           for rt in pipe._executor.runtimes for st in rt.weights.optimizer.state.values()]
    return pipe.state_dict(), opt, pipe._executor.batch


def _unchanged(pipe, snap):
    sd, opt, batch = snap
    now_sd, now_opt, now_batch = _snapshot(pipe)
    assert now_batch == batch
    assert all(torch.equal(sd[k], now_sd[k]) for k in sd)
    assert len(opt) == len(now_opt) and all(torch.equal(a[k], b[k]) for a, b in zip(opt, now_opt) for k in a)


def _corrupt_shape(ck):
    st = torch.load(ck / "stage_1.pt", weights_only=True)
    name = next(iter(st["versions"][str(st["current"])]))
    for v in st["versions"].values():
        v[name] = torch.zeros(3, 3, dtype=torch.float64)
    torch.save(st, ck / "stage_1.pt")


def _corrupt_batch(ck):
    meta = json.loads((ck / "fxpipe.json").read_text())
    meta["batch"] = "abc"
    (ck / "fxpipe.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("corrupt, match", [
    (_corrupt_shape, r"has shape \(3, 3\), the model expects"),
    (_corrupt_batch, r"'batch' is 'abc', expected an int >= 0; the manifest is damaged"),
])
def test_corrupt_checkpoint_leaves_the_pipeline_unchanged(tmp_path, corrupt, match):
    pipe, x, y = _small(tmp_path)
    pipe.step(x, y)
    pipe.step(x, y)                               # differs from the checkpoint (batch 1)
    corrupt(tmp_path / "ck")
    snap = _snapshot(pipe)
    with pytest.raises(StateDictError, match=match):
        pipe.load(str(tmp_path / "ck"))
    _unchanged(pipe, snap)
    assert torch.isfinite(pipe.step(x, y))


def test_checkpoint_of_another_optimizer_is_refused_before_loading(tmp_path):
    model, x, y, loss_fn = models.CASES["mlp"]()
    adam = build(copy.deepcopy(model), x, stages=2, m=4, schedule="2bw", loss_fn=loss_fn,
                 optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3))
    adam.step(x, y)
    adam.save(tmp_path / "adam")
    pipe, x, y = _small(tmp_path)
    pipe.step(x, y)
    snap = _snapshot(pipe)
    with pytest.raises(StateDictError, match=r"holds the state of a Adam optimizer .*this pipeline's optimizer is "
                                             r"SGD .*compile with the optimizer the checkpoint was trained with"):
        pipe.load(tmp_path / "adam")
    _unchanged(pipe, snap)
