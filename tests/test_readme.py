"""The README: its Usage block runs as written, its set-up commands are what CI runs, its calls name real APIs."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
# the folder the README's Set-up section promises, relative to the repository root (the Usage block's cwd)
PROMISED_DATA = ROOT.parent / "shared" / "data" / "her2st"
TEST_COMMAND = 'pip install -e ".[test]" && ST_FROM_HE_DATA_DIR=../shared/data python -m pytest'
DEMO_COMMAND = "pip install -e . && python -m st_from_he demo --data ../shared/data/her2st --out st_from_he_demo"


def _section(title: str) -> str:
    """The text of the README section ``## title``, up to the next ``## `` heading."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def test_setup_has_exactly_the_demo_and_the_test_command():
    commands = [block.strip() for block in _blocks(_section("Set-up"), "bash")]
    assert commands == [DEMO_COMMAND, TEST_COMMAND], f"README.md's Set-up shows {commands}"


def test_readme_test_command_is_what_ci_runs():
    assert TEST_COMMAND in CI.read_text(), ".ci/run no longer runs the test command shown in README.md"


# Checks run after the Usage block, in its namespace: the block itself is executed unchanged.
_CHECKS = """
import numpy as _np
_pred = test.tables["predicted_expression"]
_measured = test.tables["table"]
assert set(_pred.obs_names) == set(_measured.obs_names), "prediction does not cover the held-out spots"
assert list(_pred.var_names) == list(genes), "prediction genes are not the model's"
assert {"ERBB2", "KRT19"} <= set(genes), "the markers the block plots were not selected"
assert _np.isfinite(_pred.X).all()
assert "C6" in scores["summary"].index and "C6" not in set(train.tables["table"].obs["sample"])
_pcc = float(scores["summary"].loc["C6", "pcc_hvg"])
assert _pcc > 0.1, f"held-out HVG PCC {_pcc:.3f}: no better than chance"
assert "moranI" in _pred.uns and "spatial_connectivities" in _pred.obsp
_degree = _np.asarray(_pred.obsp["spatial_connectivities"].sum(axis=1)).ravel()
assert _np.median(_degree) == 4, f"the square-grid graph should give interior spots 4 neighbours, got {_np.median(_degree)}"
print("README_USAGE_OK")
"""


@pytest.mark.timeout(1200)
def test_usage_block_runs_as_written(tmp_path):
    if not PROMISED_DATA.is_dir():
        pytest.skip(f"the README's Usage block reads {str(PROMISED_DATA)!r}, which is not there")
    blocks = _blocks(_section("Usage"), "python")
    assert blocks, "README.md's Usage section has no ```python block"
    script = tmp_path / "readme_usage.py"
    script.write_text(blocks[0] + _CHECKS)
    env = dict(os.environ, MPLBACKEND="Agg")
    env.pop("ST_FROM_HE_DATA_DIR", None)  # the block must find the data as written, not through the test command
    result = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"README.md's Usage block failed:\n{output[-6000:]}"
    assert "README_USAGE_OK" in result.stdout
    assert "pcc_hvg" in result.stdout, "the block's printed summary is missing"


# the names the README's blocks call through: modules, and `model`, the fitted ExpressionModel
_ROOTS = {"sth": "st_from_he", "sq": "squidpy", "model": "st_from_he.tl.ExpressionModel"}


def _resolve(dotted: str):
    """The object named by a dotted path whose head is a module (``st_from_he.tl.ExpressionModel.fit``)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(dotted)


def _called_apis() -> list[tuple[str, ast.Call]]:
    """``(dotted name, call)`` for every call through ``sth``, ``sq`` or ``model`` in the README's Python blocks."""
    calls = []
    for block in _blocks(README.read_text(), "python"):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Call):
                parts, func = [], node.func
                while isinstance(func, ast.Attribute):
                    parts.insert(0, func.attr)
                    func = func.value
                if isinstance(func, ast.Name) and func.id in _ROOTS and parts:
                    calls.append((".".join([func.id, *parts]), node))
    return calls


def test_readme_calls_name_real_functions_and_arguments():
    calls = _called_apis()
    assert {"sth.io.read_visium", "model.fit", "sq.gr.spatial_autocorr"} <= {name for name, _ in calls}
    problems = []
    for name, call in calls:
        head, _, rest = name.partition(".")
        try:
            obj = _resolve(f"{_ROOTS[head]}.{rest}")
        except AttributeError:
            problems.append(f"{name} does not exist")
            continue
        if isinstance(obj, type):
            obj = obj.__init__
        params = inspect.signature(obj).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        unknown = [kw.arg for kw in call.keywords if kw.arg is not None and kw.arg not in params]
        if unknown:
            problems.append(f"{name} has no argument(s) {unknown}")
    assert not problems, "README.md calls APIs that do not exist:\n" + "\n".join(problems)
