"""The documentation: API reference complete, docstrings with examples, tutorials executed, built by CI.

The Sphinx build itself (``sphinx-build -W``) is a step of ``.ci/run`` with the ``doc`` extra, not a test: the
``test`` extra does not bring the docs stack.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API = DOCS / "api.md"
TUTORIALS = ROOT / "tutorials"
SUBPACKAGES = ("io", "datasets", "pp", "tl", "pl")


def _existing_subpackages() -> list[str]:
    return [s for s in SUBPACKAGES if importlib.util.find_spec(f"st_from_he.{s}") is not None]


def _public_names(sub: str) -> list[str]:
    module = importlib.import_module(f"st_from_he.{sub}")
    return list(getattr(module, "__all__", []))


def _api_entries() -> set[str]:
    """Entries of the autosummary blocks of docs/api.md, as ``sub.name`` (``st_from_he.`` prefix removed)."""
    text = API.read_text()
    entries = set()
    for block in re.findall(r"\.\. autosummary::\n((?:[ \t]+.*\n|\n)*)", text):
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith(":"):
                entries.add(line.lstrip("~").removeprefix("st_from_he."))
    return entries


def _has_examples(doc: str | None) -> bool:
    return bool(doc) and re.search(r"^\s*Examples\n\s*-{3,}", inspect.cleandoc(doc), re.MULTILINE) is not None


@pytest.mark.parametrize("sub", _existing_subpackages())
def test_public_names_listed_in_api_docs(sub):
    entries = _api_entries()
    missing = [name for name in _public_names(sub) if f"{sub}.{name}" not in entries]
    assert not missing, (
        f"st_from_he.{sub}.__all__ has names not listed in docs/api.md: {missing}. Add them as `{sub}.<name>` to the "
        f"autosummary block of the `{sub}` section."
    )


@pytest.mark.parametrize("sub", _existing_subpackages())
def test_public_callables_have_examples(sub):
    module = importlib.import_module(f"st_from_he.{sub}")
    lacking = []
    for name in _public_names(sub):
        obj = getattr(module, name)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and not _has_examples(obj.__doc__):
            lacking.append(name)
    assert not lacking, f"public callables of st_from_he.{sub} without an 'Examples' docstring section: {lacking}"


def test_api_docs_list_only_existing_names():
    import st_from_he

    unknown = []
    for entry in sorted(_api_entries()):
        obj, path = st_from_he, "st_from_he"
        for part in entry.split("."):
            path = f"{path}.{part}"
            try:  # subpackages that `import st_from_he` leaves lazy (models: torch) are imported here
                obj = getattr(obj, part) if hasattr(obj, part) else importlib.import_module(path)
            except ImportError:
                unknown.append(entry)
                break
    assert not unknown, f"docs/api.md lists names that do not exist: {unknown}"


def test_ci_builds_the_docs_with_warnings_as_errors():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[doc]"' in ci and "sphinx-build -W" in ci, ".ci/run no longer builds the docs with -W"


def test_import_is_light():
    """docs/installation.md: ``import st_from_he`` and its subpackages do not import torch (only models need it)."""
    code = (
        "import sys, st_from_he as sth\n"
        "for sub in ('io', 'datasets', 'pp', 'tl', 'pl'):\n"
        "    getattr(sth, sub)\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'timm', 'lightning') if m in sys.modules)\n"
        "assert not heavy, f'import st_from_he (and io, datasets, pp, tl, pl) imported {heavy}'\n"
        "sth.models\n"
        "assert 'torch' in sys.modules, 'sth.models did not import torch: the check above proves nothing'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _notebook_problems(notebook: Path) -> list[str]:
    """Why ``notebook`` is not a committed, executed, error-free tutorial (empty list: it is)."""
    nb = json.loads(notebook.read_text())
    problems, counts = [], []
    for i, cell in enumerate(nb.get("cells", [])):
        source = cell.get("source", "")
        if cell.get("cell_type") != "code" or not "".join(source).strip():
            continue
        if cell.get("execution_count") is None:
            problems.append(f"code cell {i} was not executed")
            continue
        counts.append(cell["execution_count"])
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                problems.append(f"code cell {i} raised {output.get('ename')}: {output.get('evalue')}")
    if not counts:
        problems.append("no executed code cell")
    elif counts != sorted(counts) or len(set(counts)) != len(counts):
        problems.append(
            f"not executed top to bottom in one run (execution counts {counts}); re-run it with "
            "`jupyter nbconvert --to notebook --execute --inplace`"
        )
    return [f"{notebook.relative_to(ROOT)}: {p}" for p in problems]


def test_tutorials_executed_without_errors():
    assert TUTORIALS.is_dir(), "the top-level tutorials/ folder is missing"
    notebooks = sorted(p for p in TUTORIALS.glob("**/*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    problems = [problem for notebook in notebooks for problem in _notebook_problems(notebook)]
    assert not problems, "\n".join(problems)
