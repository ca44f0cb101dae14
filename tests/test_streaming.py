"""Training that streams its patches (LazyPatches), and the strategy option for multi-process (DDP) training."""

from __future__ import annotations

import numpy as np
import pytest

import st_from_he as sth
from st_from_he.tl._data import LazyPatches, concat_arrays, spot_arrays

# Tiny budgets: 32 px patches, one epoch; enough to run every step of the default preset on 2 CPU cores.
TINY = {"img_size": 32, "batch_size": 16}


@pytest.fixture(scope="module")
def genes(her2st_small):
    return sth.pp.select_genes(her2st_small, n_top=30)


@pytest.fixture(scope="module")
def spots(her2st_small):
    """45 spots of C5 and 45 of C6 (each section above the probe's 30 spots for per-section statistics)."""
    obs = her2st_small.tables["table"].obs
    rng = np.random.default_rng(0)
    return [name for s in ("C5", "C6") for name in rng.choice(obs.index[obs["sample"] == s], 45, replace=False)]


def test_lazy_patches_index_like_the_in_memory_array(her2st_small, genes):
    geometry = {"size_um": 112.0, "size_px": 32, "context": (1.0, 3.0)}
    parts = [
        spot_arrays(sth.pp.split_sections(her2st_small, test=[s])[1], genes, **geometry, lazy=lazy)
        for s in ("C5", "C6")
        for lazy in (False, True)
    ]
    eager, lazy = concat_arrays(parts[0::2]), concat_arrays(parts[1::2])
    assert isinstance(lazy.patches, LazyPatches) and len(lazy.patches.datasets) == 2  # concatenation stays lazy
    assert lazy.patches.shape == eager.patches.shape and lazy.patches.dtype == eager.patches.dtype == np.uint8
    assert lazy.patches.nbytes == eager.patches.nbytes and lazy.patches.ndim == 5
    n = len(eager.patches)
    rows = np.array([n - 1, 0, 3, 3, n // 2])  # across both sections, out of order, repeated
    np.testing.assert_array_equal(lazy.patches[rows], eager.patches[rows])
    np.testing.assert_array_equal(lazy.patches[-1], eager.patches[-1])
    np.testing.assert_array_equal(lazy.patches[5:40:7], eager.patches[5:40:7])
    # a subset stays lazy, and indexes like the in-memory subset
    sub_rows = np.arange(n)[::-37]
    sub = lazy.subset(sub_rows)
    assert sub.is_lazy and len(sub.patches) == len(sub_rows)
    np.testing.assert_array_equal(sub.patches[1:4], eager.subset(sub_rows).patches[1:4])
    np.testing.assert_array_equal(sub.in_memory().patches, eager.patches[sub_rows])
    with pytest.raises(IndexError, match="out of range"):
        lazy.patches[n]
    with pytest.raises(IndexError, match="1D array"):
        lazy.patches[np.zeros((2, 2), int)]


def test_streaming_fit_equals_the_in_memory_fit(her2st_small, genes, spots):
    patches = sth.pp.extract_patches(
        sth.pp.split_sections(her2st_small, test=["C6"])[1], size_um=112, size_px=32, context=(1.0, 3.0)
    )
    fits = {}
    for stream in (False, True):
        model = sth.tl.ExpressionModel(genes, preset="default", **TINY)
        model.fit(her2st_small, spots=spots, max_epochs=1, seed=5, stream=stream, progress_bar=False)
        assert model.training_info["streamed"] is stream
        fits[stream] = model, model.predict_patches(patches, device="cpu", progress_bar=False)[0]
    (memory, expected), (streamed, got) = fits[False], fits[True]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert len(memory.history) == 1
    np.testing.assert_allclose(streamed.history.to_numpy(float), memory.history.to_numpy(float), rtol=1e-6)
    assert list(streamed.history.columns) == list(memory.history.columns)
    assert streamed.blend == memory.blend and streamed.training_info["best_epoch"] == 0


def test_bad_stream_and_strategy_are_refused(her2st_small, genes):
    model = sth.tl.ExpressionModel(genes, preset="default", **TINY)
    with pytest.raises(ValueError, match=r"`stream` must be True .* or 'auto'.*got 'yes'"):
        model.fit(her2st_small, stream="yes")
    with pytest.raises(ValueError, match=r"Unknown `strategy` 'dpp'; use 'auto', 'ddp'.*'ddp_notebook'"):
        model.fit(her2st_small, strategy="dpp")
    with pytest.raises(TypeError, match="`strategy` must be a strategy name or a Lightning Strategy"):
        model.fit(her2st_small, strategy=2)


_DDP_SCRIPT = """
import json, sys
import numpy as np
import st_from_he as sth

data, genes, spots = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
sdata = sth.datasets.her2st(["C5", "C6"], path=data)
out = {}
for devices, strategy in ((1, "auto"), (2, "ddp_notebook")):
    model = sth.tl.ExpressionModel(genes, preset="default", img_size=32, batch_size=16)
    model.fit(sdata, spots=spots, max_epochs=2, patience=None, accelerator="cpu", devices=devices,
              strategy=strategy, seed=1, progress_bar=False)
    patches = sth.pp.extract_patches(sdata, size_um=112, size_px=32, context=(1.0, 3.0), samples=["C6"])
    out[strategy] = {"history": model.history.to_dict("list"), "best_epoch": model.training_info["best_epoch"],
                     "finite": bool(np.isfinite(model.predict_patches(patches, progress_bar=False)[0]).all())}
print("RESULT" + json.dumps(out))
"""


def test_ddp_on_two_cpu_processes(her2st_dir, genes, spots):
    """2 CPU processes forked by Lightning (``ddp_notebook``, as in Jupyter) train a model comparable to 1 process.

    In a fresh process: forking after numba's OpenMP threads ran (scanpy) can hang DDP, so numba uses its own pool.
    """
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"NUMBA_THREADING_LAYER": "workqueue"}
    args = [str(her2st_dir), json.dumps(list(genes)), json.dumps(list(spots))]
    done = subprocess.run(
        [sys.executable, "-c", _DDP_SCRIPT, *args], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT")[-1])
    single, ddp = result["auto"], result["ddp_notebook"]
    # the training ran in the forked processes: rank 0's history and best weights came back to this one
    assert list(ddp["history"]) == list(single["history"]) and ddp["history"]["epoch"] == [0, 1]
    val = np.array(ddp["history"]["val_loss"])
    assert ddp["best_epoch"] == int(np.argmin(val)) and ddp["finite"] and single["finite"]
    # each process saw half of every global batch: a comparable model, not the same one
    assert 0.5 < val[-1] / single["history"]["val_loss"][-1] < 2.0


def test_batches_from_lazy_patches_equal_the_in_memory_ones(her2st_small, genes):
    """The training data set reads a whole batch (and its neighbours, padded slots blank) at once from lazy patches."""
    from st_from_he.tl._training import _SpotDataset

    c6 = sth.pp.split_sections(her2st_small, test=["C6"])[1]
    lazy = spot_arrays(c6, genes, size_um=112.0, size_px=32, context=(1.0, 3.0), lazy=True)
    eager = lazy.in_memory()
    rng = np.random.default_rng(0)
    n = len(eager.patches)
    neighbours = rng.integers(0, n, size=(n, 4))
    neighbours[rng.random((n, 4)) < 0.3] = -1  # padding
    batch = [7, 0, n - 1, 7]
    items = [_SpotDataset(p.patches, p.targets, neighbours, p.patches).__getitems__(batch) for p in (eager, lazy)]
    for a, b in zip(*items, strict=True):
        assert set(a) == {"image", "expression", "neighbours", "neighbour_mask"}
        for key in a:
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    first = items[1][0]
    assert (first["neighbours"][first["neighbour_mask"]] == 0).all()
    np.testing.assert_array_equal(first["image"].numpy(), eager.patches[7])
