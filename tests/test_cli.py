"""The fxpipe command: dump a plan as a table or JSON; one-line errors for bad model specs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fxpipe.cli import load_model_spec, main
from fxpipe.errors import ModelSpecError
from fxpipe.ir import Plan

FACTORY = textwrap.dedent("""
    import torch
    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(6)])
        return m, (torch.randn(16, 32),)
    def broken():
        raise RuntimeError("no weights here")
""")


@pytest.fixture
def model_file(tmp_path):
    p = tmp_path / "mymodel.py"
    p.write_text(FACTORY)
    return str(p)


def test_dump_table(model_file, capsys):
    assert main(["dump", f"{model_file}:make", "--stages", "3", "--microbatches", "4"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["stage", "nodes", "first", "last"]
    rows = [l.split() for l in lines[2:5]]
    assert [r[0] for r in rows] == ["0", "1", "2"]
    assert sum(int(r[1]) for r in rows) == 6          # six Linear nodes, each in one stage
    assert "bottleneck" in out and "schedule=2bw" in out


def test_dump_json_round_trips(model_file, tmp_path, capsys):
    out_file = tmp_path / "plan.json"
    assert main(["dump", f"{model_file}:make", "--stages", "2", "--format", "json", "-o", str(out_file)]) == 0
    plan = Plan.from_json(out_file.read_text())
    assert plan.num_stages == 2 and plan.num_microbatches == 4
    assert json.loads(plan.to_json()) == json.loads(out_file.read_text())


def test_dump_package_factory(capsys):
    assert main(["dump", "fxpipe.examples.gpt:gpt_factory", "--stages", "2", "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["stages"]) == 2


@pytest.mark.parametrize("spec, match", [
    ("nofile.py:make", "does not exist"),
    ("{model_file}:missing", "has no callable 'missing'"),
    ("{model_file}", "has no ':factory'"),
    ("{model_file}:broken", "raised RuntimeError: no weights here"),
    ("not_a_real_pkg_xyz.mod:make", "cannot import module"),
])
def test_bad_specs(spec, match, model_file):
    with pytest.raises(ModelSpecError, match=match):
        load_model_spec(spec.format(model_file=model_file))


def test_error_is_one_line_and_nonzero(model_file):
    r = subprocess.run([sys.executable, "-m", "fxpipe.cli", "dump", "nofile.py:make", "--stages", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("fxpipe: error: model file")
