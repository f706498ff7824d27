"""The docs ship with the code: links resolve, no pointer to a design file users do not have, and the CLI entry points."""

from __future__ import annotations

import importlib.metadata
import re
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


DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a repository path named in the text: fxpipe/runtime/executor.py, tests/test_pipeline.py, docs/planner.md ...
_PATH = re.compile(r"(?<![\w./~<>-])((?:fxpipe|passes|cost_models|tests|bench|scripts|docs)/[\w/.-]*\w\.(?:py|md|sh|txt))")


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as '-'."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_docs_exist_and_the_readme_links_them():
    assert {p.name for p in DOCS} >= {"README.md", "flow.md", "api.md", "semantics.md", "cost-model.md",
                                      "planner.md", "runtime.md"}
    assert "(docs/README.md)" in (ROOT / "README.md").read_text()
    index = (ROOT / "docs" / "README.md").read_text()
    assert [p.name for p in DOCS if p.name != "README.md" and f"]({p.name})" not in index] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_named_file_resolves(page):
    text = page.read_text()
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    missing = sorted({p for p in _PATH.findall(text) if not (ROOT / p).exists()})
    assert broken == [] and missing == [], (f"{page.relative_to(ROOT)}: broken links {broken}, "
                                            f"files that do not exist {missing}")


@pytest.mark.parametrize("path", [p for p in DOCS if ">>> " in p.read_text()], ids=lambda p: p.name)
def test_docs_examples_run_as_written(path):
    """Every ``>>>`` example in docs/ prints what the page says it prints."""
    import doctest

    result = doctest.testfile(str(path), module_relative=False, verbose=False,
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {path.name} failed (see above)"


def test_readme_layout_names_every_source_file():
    """README's layout section says where each idea lives: every module is on it."""
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    files = sorted(str(p.relative_to(ROOT)) for folder in ("fxpipe", "passes", "cost_models")
                   for p in (ROOT / folder).rglob("*.py")
                   if p.name != "__init__.py" and "examples" not in p.parts)
    missing = [f for f in files if f not in layout]
    assert missing == [], f"add a line for each of {missing} to README.md's Layout section"


SOURCES = sorted(p for folder in ("fxpipe", "passes", "cost_models") for p in (ROOT / folder).rglob("*.py"))


def test_every_module_says_its_one_idea_in_one_line():
    """A module docstring whose first line stands alone (the summary a reader sees first)."""
    import ast

    bad = []
    for p in SOURCES:
        doc = ast.get_docstring(ast.parse(p.read_text()))
        lines = (doc or "").splitlines()
        if not lines or not lines[0].strip() or (len(lines) > 1 and lines[1].strip()):
            bad.append(str(p.relative_to(ROOT)))
    assert bad == [], f"give each a one-line module docstring (a blank line before any detail): {bad}"


def test_no_source_file_over_500_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in SOURCES}
    over = {f: n for f, n in sizes.items() if n > 500}
    assert over == {}, f"split these by idea (one idea a file, ~400 lines): {over}"
