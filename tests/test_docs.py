"""The docs ship with the code: links resolve, no pointer to a design file users do not have, and the CLI entry points."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import fxpipe
from fxpipe.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_python_m_fxpipe_version():
    out = subprocess.run([sys.executable, "-m", "fxpipe", "--version"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"fxpipe {fxpipe.__version__}"


def test_cli_version_matches_the_installed_package(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fxpipe {importlib.metadata.version('fxpipe')}"


def test_no_reference_to_the_design_repository():
    """Users never see the team's DESIGN.md; the design lives in docs/."""
    hits = []
    for folder in ("fxpipe", "passes", "cost_models", "tests", "bench", "scripts", "docs"):
        for p in sorted((ROOT / folder).rglob("*")):
            if p.suffix in (".py", ".md", ".sh") and p != Path(__file__).resolve():
                hits += [f"{p.relative_to(ROOT)}:{i}" for i, line in enumerate(p.read_text().splitlines(), 1)
                         if "DESIGN.md" in line]
    hits += [f"README.md:{i}" for i, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1)
             if "DESIGN.md" in line]
    assert hits == [], f"point these at docs/ instead: {hits}"
