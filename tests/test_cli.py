"""The fxpipe command: dump a plan as a table or JSON; one-line errors for bad model specs."""

from __future__ import annotations

import json
import re
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


# ---------------------------------------------------------------- presets and graphical formats

import xml.etree.ElementTree as ET  # noqa: E402

from fxpipe import render  # noqa: E402

PRESET = ["dump", "gpt-small-test", "--stages", "2", "--microbatches", "4"]


@pytest.fixture(scope="module")
def preset_plan():
    """The preset's plan once, as JSON, to compare the other formats against."""
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(PRESET + ["--format", "json"]) == 0
    return Plan.from_json(buf.getvalue())


def test_preset_table(capsys, preset_plan):
    assert main(PRESET) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["stage", "nodes"]
    assert "bottleneck" in out and "lower bound" in out and "gap" in out and "solver time" in out
    assert preset_plan.num_stages == 2 and preset_plan.num_microbatches == 4


def test_preset_dot(capsys, preset_plan):
    assert main(PRESET + ["--format", "dot"]) == 0
    dot = capsys.readouterr().out
    assert dot.startswith("digraph")
    assert "subgraph cluster_stage0 {" in dot and "subgraph cluster_stage1 {" in dot
    assert preset_plan.cut_edges
    for u, v in preset_plan.cut_edges:
        assert re.search(rf'"{u}" -> "{v}" \[color=red, [^\]]*label="[0-9.]+ (B|KiB|MiB)"', dot)


def test_preset_svg(capsys):
    assert main(PRESET + ["--format", "svg"]) == 0
    cap = capsys.readouterr()
    root = ET.fromstring(cap.out)
    assert root.tag.endswith("svg")
    if render.has_dot():
        assert "cluster_stage1" in cap.out        # Graphviz keeps cluster ids as <g id=...> titles


def test_svg_without_graphviz(capsys, monkeypatch):
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    assert main(PRESET + ["--format", "svg"]) == 0
    cap = capsys.readouterr()
    root = ET.fromstring(cap.out)
    assert root.tag.endswith("svg") and "stage 1" in cap.out and "makespan" in cap.out
    assert "Graphviz `dot` not found" in cap.err


def test_preset_html_to_file(tmp_path, capsys, preset_plan):
    out = tmp_path / "plan.html"
    assert main(PRESET + ["--format", "html", "-o", str(out)]) == 0
    assert capsys.readouterr().out == ""
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    for s in range(preset_plan.num_stages):
        assert f"stage {s}" in page
    assert 'aria-label="schedule timeline"' in page
    for u, v in preset_plan.cut_edges:
        assert u in page and v in page


@pytest.mark.parametrize("fmt", ["table", "dot", "svg"])
def test_output_file(fmt, tmp_path, capsys):
    out = tmp_path / f"plan.{fmt}"
    assert main(PRESET + ["--format", fmt, "-o", str(out)]) == 0
    assert out.stat().st_size > 100 and f"wrote {fmt} to" in capsys.readouterr().err


def test_preset_batch_rounded_to_microbatches(capsys):
    assert main(["dump", "gpt-small-test", "--stages", "3", "--microbatches", "3", "--format", "json"]) == 0
    cap = capsys.readouterr()
    assert "using batch 9" in cap.err and Plan.from_json(cap.out).num_microbatches == 3


@pytest.mark.parametrize("argv, match", [
    (["dump", "gpt7-huge", "--stages", "2"], "is not a preset and has no ':factory'; presets: gpt2-small"),
    (["dump", "gpt-small-test", "--stages", "2", "--memory-limit", "lots"], "--memory-limit 'lots' is not a size"),
    (["dump", "gpt-small-test", "--stages", "2", "--batch", "6"], "--batch 6 must be a positive multiple"),
    (["dump", "fxpipe.examples.gpt:gpt_factory", "--stages", "2", "--batch", "8"], "--batch only applies to presets"),
    (["dump", "gpt-small-test", "--stages", "0"], "num_stages must be an int >= 1"),
])
def test_cli_errors_exit_2(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxpipe: error: ") and err.strip().count("\n") == 0 and match in err


def test_load_model_spec_presets():
    model, (idx,) = load_model_spec("gpt-small-test")
    assert next(model.parameters()).is_meta and idx.is_meta
    with pytest.raises(ModelSpecError, match="presets: .*resnet-50"):
        load_model_spec("resnet-5000")


def test_calibrate_prints_predicted_and_measured(model_file, capsys):
    assert main(["calibrate", f"{model_file}:make", "--stages", "2", "--steps", "2", "--replan"]) == 0
    out = capsys.readouterr().out
    assert "fwd pred" in out and "fwd meas" in out and "F+B err" in out
    assert "re-planned from the measurements:" in out
    assert out.count("schedule=2bw stages=2") == 2


def test_calibrate_rejects_meta_models(tmp_path, capsys):
    f = tmp_path / "meta.py"
    f.write_text("import torch\ndef make():\n    with torch.device('meta'):\n"
                 "        return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)), "
                 "(torch.randn(8, 4),)\n")
    assert main(["calibrate", f"{f}:make", "--stages", "2"]) == 2
    assert "builds its model on the meta device" in capsys.readouterr().err


def test_dump_precision_and_devices_per_node(capsys):
    """--precision sets activation and parameter bytes; --devices-per-node where the stages sit."""
    plans = {}
    for extra in ([], ["--precision", "fp16", "--devices-per-node", "1"]):
        assert main(["dump", "gpt-small-test", "--stages", "2", "--device", "v100-16gb", "--format", "json",
                     *extra]) == 0
        plans[bool(extra)] = json.loads(capsys.readouterr().out)
    fp32, fp16 = plans[False], plans[True]
    for a, b in zip(fp32["stages"], fp16["stages"]):
        # fp16 under CUDA autocast: linears save fp16 copies of inputs and weights, the residual stream
        # and layer norms stay fp32 (tests/test_autocast_bytes.py): between half and all of fp32's bytes
        assert 0.5 < b["activation_bytes"] / a["activation_bytes"] < 1.0
        assert b["memory"] < a["memory"]
    assert fp32["extra"]["placement"]["inter_node_boundaries"] == []              # one 8-GPU node
    assert fp16["extra"]["placement"]["devices_per_node"] == 1
    assert fp16["extra"]["placement"]["inter_node_boundaries"] == [0]             # a node per GPU


@pytest.mark.parametrize("extra, match", [
    (["-o", "{tmp}/missing/plan.txt"], r"-o '.*missing/plan.txt': the directory '.*missing' does not exist; "
                                       r"create it first"),
    (["-o", "{tmp}"], r"-o '.*' is a directory; give a file name, e.g. -o '.*plan.table'"),
    (["--stages", "50"], r"gives a batch of 16, not divisible into 50 microbatches \(--microbatches defaults "
                         r"to max\(--stages, 4\) = 50\); .*none is >= --stages 50 as 2bw needs"),
    (["--microbatches", "5"], r"batch of 16, not divisible into 5 microbatches \(--microbatches 5\); pass "
                              r"--microbatches M with M dividing 16 \(e.g. 2\)"),
    (["--microbatches", "0"], r"--microbatches 0 must be >= 1"),
])
def test_dump_bad_arguments_exit_2_before_planning(model_file, tmp_path, capsys, extra, match):
    argv = ["dump", f"{model_file}:make", "--stages", "2"] + [e.replace("{tmp}", str(tmp_path)) for e in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxpipe: error: ") and err.strip().count("\n") == 0
    assert re.search(match, err), err
    assert sorted(os.listdir(tmp_path)) == ["mymodel.py"]        # nothing written


def test_calibrate_needs_a_step(model_file, capsys):
    assert main(["calibrate", f"{model_file}:make", "--stages", "2", "--steps", "0"]) == 2
    assert "--steps 0 must be >= 1" in capsys.readouterr().err


def test_demo_rejects_negative_steps(capsys):
    assert main(["demo", "--steps", "-5"]) == 2
    assert "fxpipe: error: --steps -5 must be >= 1" in capsys.readouterr().err
