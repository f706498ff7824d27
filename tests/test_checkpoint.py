"""Checkpoints: resume bit-identically (local and distributed), cross-executor loading, and error paths."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import models
from dist_worker import build, launch
from fxpipe.errors import StateDictError
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
