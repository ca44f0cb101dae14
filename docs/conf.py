"""Sphinx configuration of the st_from_he documentation.

The build must pass with ``-W`` (warnings are errors) on a machine without network access, so everything that
needs the network is opt-in:

- intersphinx (links into the docs of python, numpy, scanpy, spatialdata, torch, ...) is enabled on Read the Docs
  and when ``ST_FROM_HE_DOCS_INTERSPHINX=1``; otherwise cross-references to other projects render as plain text.
- notebooks are never executed here (``nb_execution_mode = "off"``): tutorials are committed executed.

Tutorials live in the top-level ``tutorials/`` folder and benchmark results in ``benchmarks/results/``; both are
pulled into the source tree at build time (``docs/tutorials/`` and ``docs/benchmarks/``, git-ignored).
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import sys
from datetime import datetime
from importlib.metadata import metadata
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent

# -- Project information -----------------------------------------------------------------------------------------

info = metadata("st-from-he")
project = "st_from_he"
author = "st_from_he developers"
copyright = f"{datetime.now():%Y}, {author}"
version = info["Version"]
release = info["Version"]
repository_url = "https://github.com/st-from-he/st_from_he"

# -- General configuration ---------------------------------------------------------------------------------------

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",  # after napoleon
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx_copybutton",
    "sphinxcontrib.bibtex",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "**/_list.md"]
master_doc = "index"
default_role = "literal"
nitpicky = False  # references into other projects cannot resolve offline; see `intersphinx_mapping`
needs_sphinx = "7.0"

# warnings that are not documentation errors
suppress_warnings = [
    # annotations under `if TYPE_CHECKING:` (spatialdata, torch) that cannot be evaluated render as written
    "sphinx_autodoc_typehints.forward_reference",
    "sphinx_autodoc_typehints.guarded_import",
]

# -- autodoc / autosummary / napoleon ----------------------------------------------------------------------------

autosummary_generate = True  # stubs go to docs/generated/ (git-ignored)
autodoc_member_order = "groupwise"
autodoc_typehints = "description"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
napoleon_use_ivar = True  # `Attributes` as a field list: no clash with members that autodoc documents
typehints_defaults = "braces"
always_document_param_types = True

bibtex_bibfiles = ["references.bib"]
bibtex_reference_style = "author_year"

# -- MyST / myst-nb ----------------------------------------------------------------------------------------------

myst_enable_extensions = ["amsmath", "colon_fence", "deflist", "dollarmath", "html_image", "html_admonition"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # tutorials are committed executed; the docs build needs no GPU and no data
nb_merge_streams = True
nb_output_stderr = "remove-warn"

# -- intersphinx: only where the network is available ------------------------------------------------------------

intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "pandas": ("https://pandas.pydata.org/pandas-docs/stable/", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "squidpy": ("https://squidpy.readthedocs.io/en/stable/", None),
    "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
    "xarray": ("https://docs.xarray.dev/en/stable/", None),
    "dask": ("https://docs.dask.org/en/stable/", None),
    "distributed": ("https://distributed.dask.org/en/stable/", None),
    "torch": ("https://docs.pytorch.org/docs/stable/", None),
    "matplotlib": ("https://matplotlib.org/stable/", None),
}


def _reachable(url: str, timeout: float = 10) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/objects.inv", timeout=timeout) as response:
            return response.status == 200
    except Exception:  # noqa: BLE001 - offline, moved or down: leave this project's links out
        return False


if os.environ.get("ST_FROM_HE_DOCS_INTERSPHINX", "") == "1" or os.environ.get("READTHEDOCS") == "True":
    # An unreachable inventory is an untyped warning that cannot be suppressed and that `-W` turns into an error,
    # so keep only the projects whose inventory answers now.
    _unreachable = [name for name, (url, _) in intersphinx_mapping.items() if not _reachable(url)]
    for _name in _unreachable:
        print(f"intersphinx: {_name} inventory unreachable; links into its docs render as plain text")
        del intersphinx_mapping[_name]
else:
    intersphinx_mapping = {}
intersphinx_timeout = 10

# -- HTML output -------------------------------------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = "st_from_he"
html_theme_options = {
    "repository_url": repository_url,
    "repository_branch": "main",
    "path_to_docs": "docs",
    "use_repository_button": True,
    "use_issues_button": True,
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_static_path = ["_static"] if (HERE / "_static").is_dir() else []
html_show_sourcelink = False
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True


# -- Content pulled in from the rest of the repository -----------------------------------------------------------


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` unless the file already holds it, so that incremental builds stay incremental."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def _sync_folder(source: Path, target: Path, patterns: tuple[str, ...]) -> list[Path]:
    """Mirror the files of ``source`` matching ``patterns`` into ``target``; return the copies, sorted."""
    target.mkdir(parents=True, exist_ok=True)
    wanted = {}
    if source.is_dir():
        for pattern in patterns:
            for file in source.rglob(pattern):
                rel = file.relative_to(source)
                if file.is_file() and not any(part.startswith(".") for part in rel.parts):
                    wanted[rel] = file
    for existing in sorted(target.rglob("*"), reverse=True):
        rel = existing.relative_to(target)
        if existing.is_file() and rel not in wanted and existing.name != "_list.md":
            existing.unlink()
        elif existing.is_dir() and not any(existing.iterdir()):
            existing.rmdir()
    for rel, file in wanted.items():
        copy = target / rel
        copy.parent.mkdir(parents=True, exist_ok=True)
        if not copy.is_file() or copy.read_bytes() != file.read_bytes():
            shutil.copy2(file, copy)
    return sorted(target / rel for rel in wanted)


def _toctree(entries: list[str]) -> str:
    return "```{toctree}\n:maxdepth: 1\n\n" + "".join(f"{e}\n" for e in entries) + "```\n"


def _pull_tutorials() -> None:
    """Copy ``tutorials/`` (notebooks and the files they show) to ``docs/tutorials/`` and list the notebooks."""
    target = HERE / "tutorials"
    copies = _sync_folder(ROOT / "tutorials", target, ("*.ipynb", "*.md", "*.png", "*.jpg", "*.svg"))
    notebooks = [p for p in copies if p.suffix == ".ipynb" and p.parent == target]
    if notebooks:
        listing = _toctree([f"tutorials/{p.stem}" for p in notebooks])
    else:
        listing = "No tutorial notebooks have been published yet.\n"
    _write_if_changed(target / "_list.md", listing)


def _pull_benchmarks() -> None:
    """One page per ``benchmarks/results/*.md`` under ``docs/benchmarks/``, accuracy and speed first."""
    results = ROOT / "benchmarks" / "results"
    target = HERE / "benchmarks"
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(results.glob("*.md")) if results.is_dir() else []
    order = {"accuracy": 0, "speed": 1}
    files.sort(key=lambda p: (order.get(p.stem, 2), p.stem))
    pages = {}
    for file in files:
        text = file.read_text()
        title = "" if re.match(r"\s*# ", text) else f"# {file.stem.replace('_', ' ').capitalize()}\n\n"
        rel = os.path.relpath(file, target).replace(os.sep, "/")
        pages[f"{file.stem}.md"] = f"{title}```{{include}} {rel}\n:relative-images:\n```\n"
    for existing in target.glob("*.md"):
        if existing.name not in pages and existing.name != "_list.md":
            existing.unlink()
    for name, text in pages.items():
        _write_if_changed(target / name, text)
    if pages:
        listing = _toctree([f"benchmarks/{Path(name).stem}" for name in pages])
    else:
        listing = "No benchmark results have been committed yet (they will appear here from `benchmarks/results/`).\n"
    _write_if_changed(target / "_list.md", listing)


_pull_tutorials()
_pull_benchmarks()


# -- Docstring clean-up ------------------------------------------------------------------------------------------


def _is_underline(line: str) -> bool:
    return len(line.strip()) >= 3 and set(line.strip()) == {"-"}


def _prose_returns(app, what, name, obj, options, lines: list[str]) -> None:
    """Read a prose **Returns** section (sentences, scanpy style) as one description without a type.

    Napoleon would read every unindented line of such a section as a separate return type. The numpydoc forms
    (``type`` or ``name : type`` followed by an indented description) are left as they are. Runs before napoleon,
    which renders a field headed by a lone ``:`` as ``:returns: description``.
    """
    for i in range(len(lines) - 1):
        if lines[i].strip() != "Returns" or not _is_underline(lines[i + 1]):
            continue
        start = end = i + 2
        while end < len(lines) and not (end + 1 < len(lines) and lines[end].strip() and _is_underline(lines[end + 1])):
            end += 1
        body = lines[start:end]
        content = [j for j, text in enumerate(body) if text.strip()]
        if not content:
            return
        first = body[content[0]]
        second_indented = len(content) > 1 and body[content[1]].startswith((" ", "\t"))
        type_only = len(content) == 1 and not first.rstrip().endswith(".")
        if second_indented or type_only or " : " in first:
            return
        lines[start:end] = [":", *[f"    {text}" if text.strip() else "" for text in body[content[0] :]]]
        return


def _data_docstring(app, what, name, obj, options, lines: list[str]) -> None:
    """Drop the docstring a constant inherits from its type (``tuple``, ``str``, ...); prefer a ``#:`` comment.

    A constant re-exported by a subpackage (``sth.datasets.SECTIONS``) is documented by a ``#:`` comment or a string
    right after its assignment in the private module that defines it.
    """
    if what != "data" or type(obj).__module__.partition(".")[0] == "st_from_he":
        return  # e.g. `sth.settings`: the docstring of its own class is the right one
    if inspect.isroutine(obj) or inspect.isclass(obj) or lines != _cleaned(type(obj).__doc__):
        return
    lines[:] = _attribute_doc(name, obj)


def _cleaned(doc: str | None) -> list[str]:
    return inspect.cleandoc(doc).splitlines() + [""] if doc else []


def _attribute_doc(name: str, obj) -> list[str]:
    from sphinx.pycode import ModuleAnalyzer

    package, _, attr = name.rpartition(".")
    module = sys.modules.get(package)
    if module is None or not hasattr(module, "__path__"):
        return []
    import pkgutil

    for info in pkgutil.iter_modules(module.__path__, prefix=f"{package}."):
        submodule = sys.modules.get(info.name)
        if submodule is None or getattr(submodule, attr, None) is not obj:
            continue
        try:
            docs = ModuleAnalyzer.for_module(info.name).find_attr_docs()
        except Exception:  # noqa: BLE001 - no source to analyse: no docstring
            continue
        if ("", attr) in docs:
            return [*docs[("", attr)]]
    return []


def setup(app):
    app.connect("autodoc-process-docstring", _prose_returns, priority=100)
    app.connect("autodoc-process-docstring", _data_docstring, priority=100)
