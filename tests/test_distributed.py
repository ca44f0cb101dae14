"""`predict_expression` over a list of slides: here one after the other, and on a dask.distributed LocalCluster."""

from __future__ import annotations

import logging

import distributed
import numpy as np
import pandas as pd
import pytest

import st_from_he as sth
from st_from_he.tl._distributed import resolve_client

KEY = "predicted_expression"


@pytest.fixture(scope="module")
def model(her2st_dir):
    """A ridge model on 100 spots of C5 (real data; deterministic), on small patches: coarse levels decode fast."""
    train = sth.datasets.her2st(["C5"], path=her2st_dir)
    genes = sth.pp.select_genes(train, n_top=20)
    spots = list(train.tables["table"].obs_names[:100])
    return sth.tl.ExpressionModel(genes, preset="ridge", img_size=32, context_scales=(1.0,)).fit(
        train, spots=spots, progress_bar=False
    )


@pytest.fixture(scope="module")
def read_slides(her2st_dir):
    """C6 (its measured table's spots) and C4 with 40 of its circles as their own element (no table), read once."""
    from spatialdata.models import ShapesModel

    c6 = sth.datasets.her2st(["C6"], path=her2st_dir)
    c4 = sth.datasets.her2st(["C4"], path=her2st_dir)
    c4.shapes["C4_subset"] = ShapesModel.parse(c4.shapes["C4_spots"].iloc[:40].copy())  # keeps its transformations
    return c6, c4


def _slides(read_slides):
    """Fresh SpatialData objects over the same (lazy) images, with their own tables."""
    import spatialdata as sd

    return [
        sd.SpatialData(images=dict(s.images), shapes=dict(s.shapes), tables={k: v.copy() for k, v in s.tables.items()})
        for s in read_slides
    ]


SHAPES = [None, "C4_subset"]


@pytest.fixture(scope="module")
def expected(read_slides, model):
    """Each slide predicted on its own in this process (the single-slide path)."""
    slides = _slides(read_slides)
    for slide, shapes_key in zip(slides, SHAPES, strict=True):
        sth.tl.predict_expression(slide, model, shapes_key=shapes_key, progress_bar=False)
    return [slide.tables[KEY] for slide in slides]


def _assert_same(tables, expected):
    for got, want in zip(tables, expected, strict=True):
        np.testing.assert_allclose(got.X, want.X, rtol=1e-5)
        np.testing.assert_allclose(got.obsm["X_he"], want.obsm["X_he"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got.obsm["spatial"], want.obsm["spatial"])
        pd.testing.assert_frame_equal(got.obs, want.obs)
        assert list(got.var_names) == list(want.var_names)
        assert got.uns["predict_expression"] == want.uns["predict_expression"]


def test_list_without_client_equals_one_by_one(read_slides, model, expected):
    slides = _slides(read_slides)
    measured = slides[0].tables["table"].copy()
    sth.tl.predict_expression(slides, model, shapes_key=SHAPES, progress_bar=False)
    _assert_same([s.tables[KEY] for s in slides], expected)
    assert expected[1].n_obs == 40 and expected[0].n_obs == measured.n_obs
    # the measured table is left as it was
    np.testing.assert_array_equal(slides[0].tables["table"].X.toarray(), measured.X.toarray())


def test_list_on_local_cluster_equals_single_process(read_slides, model, expected):
    slides = _slides(read_slides)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        assert resolve_client("default") is client  # the explicit opt-in finds it
        with distributed.get_task_stream(client) as stream:
            sth.tl.predict_expression(slides, model, shapes_key=SHAPES, client=client, progress_bar=False)
        _assert_same([s.tables[KEY] for s in slides], expected)
        # one task per slide, run by the cluster's workers
        tasks = [t for t in stream.data if str(t["key"]).startswith("_remote_task")]
        assert len(tasks) == 2 and {t["worker"] for t in tasks} <= set(client.scheduler_info()["workers"])

        # one slide with the default client (the explicit opt-in): one task, the same table
        one = _slides(read_slides)[1]
        sth.tl.predict_expression(one, model, shapes_key="C4_subset", client="default", progress_bar=False)
        _assert_same([one.tables[KEY]], expected[1:])

        # a slide that fails in its worker: its index is named, and no slide gets a table
        again = _slides(read_slides)
        del again[1].images["C4_image"]
        with pytest.raises(ValueError, match="Cannot tell which image the circles 'C4_subset'") as err:
            sth.tl.predict_expression(again, model, shapes_key=SHAPES, client=client, progress_bar=False)
        assert "slide 1 of the 2" in err.value.__notes__[-1]
        assert all(KEY not in s.tables for s in again)


def test_input_errors_are_clear(read_slides, model):
    slides = _slides(read_slides)
    with pytest.raises(TypeError, match=r"takes a SpatialData, got an AnnData") as err:
        sth.tl.predict_expression([slides[0], slides[0].tables["table"]], model)
    assert "slide 1 of the 2" in err.value.__notes__[0]
    with pytest.raises(ValueError, match="empty list"):
        sth.tl.predict_expression([], model)
    with pytest.raises(ValueError, match="same SpatialData"):
        sth.tl.predict_expression([slides[0], slides[0]], model)
    with pytest.raises(ValueError, match="`shapes_key` .* 1 entries for 2 slides"):
        sth.tl.predict_expression(slides, model, shapes_key=["C4_subset"])
    with pytest.raises(TypeError, match=r"`client` .* must be a `distributed.Client`.*got str"):
        sth.tl.predict_expression(slides, model, shapes_key=SHAPES, client="tcp://127.0.0.1:8786")
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster:  # no workers
        with pytest.raises(TypeError, match=r"got LocalCluster\. For a cluster, pass a client"):
            sth.tl.predict_expression(slides, model, shapes_key=SHAPES, client=cluster)
    with pytest.raises(ValueError, match="none exists"):
        sth.tl.predict_expression(slides, model, shapes_key=SHAPES, client="default")
    # a slide refused before any work (its prediction table exists): nothing is written into the others
    sth.tl.predict_expression(slides[1], model, shapes_key="C4_subset", progress_bar=False)
    with pytest.raises(KeyError, match="exists; pass `overwrite=True`") as err:
        sth.tl.predict_expression(slides, model, shapes_key=SHAPES)
    assert "slide 1 of the 2" in err.value.__notes__[0]
    assert KEY not in slides[0].tables


# ---- embed over many slides ----------------------------------------------------------------------------------------


def _table_slides(read_slides, n: int = 30):
    """Fresh slides whose tables hold their first ``n`` spots (C6 and C4)."""
    slides = _slides(read_slides)
    for slide in slides:
        table = slide.tables["table"]
        slide.tables["table"] = table[:n].copy()
    return slides


def test_embed_list_here_and_on_local_cluster_equal_one_by_one(read_slides, tiny_weights):
    expected = _table_slides(read_slides)
    for slide in expected:
        sth.tl.embed(slide, "sth_tinycnn", weights=tiny_weights, progress_bar=False)
    want = [s.tables["table"].obsm["X_sth_tinycnn"] for s in expected]
    assert all(w.shape == (30, want[0].shape[1]) and np.isfinite(w).all() for w in want)
    assert not np.allclose(want[0], want[1])  # two slides, two sets of embeddings

    here = _table_slides(read_slides)
    sth.tl.embed(here, "sth_tinycnn", weights=tiny_weights, progress_bar=False)
    for slide, w in zip(here, want, strict=True):
        np.testing.assert_allclose(slide.tables["table"].obsm["X_sth_tinycnn"], w, rtol=1e-5, atol=1e-6)
        assert (
            slide.tables["table"].uns["X_sth_tinycnn"]["params"]
            == expected[0].tables["table"].uns["X_sth_tinycnn"]["params"]
        )

    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        remote = _table_slides(read_slides)
        with distributed.get_task_stream(client) as stream:
            sth.tl.embed(remote, "sth_tinycnn", weights=tiny_weights, client=client, progress_bar=False)
        for slide, w in zip(remote, want, strict=True):
            np.testing.assert_allclose(slide.tables["table"].obsm["X_sth_tinycnn"], w, rtol=1e-5, atol=1e-6)
        assert len([t for t in stream.data if str(t["key"]).startswith("_remote_task")]) == 2

        # a slide that fails in its worker is named, and no slide gets embeddings
        broken = _table_slides(read_slides)
        del broken[1].images["C4_image"]
        with pytest.raises(KeyError, match="No image for section 'C4'") as err:
            sth.tl.embed(broken, "sth_tinycnn", weights=tiny_weights, client=client, progress_bar=False)
        assert "slide 1 of the 2" in err.value.__notes__[-1] and "sth.tl.embed" in err.value.__notes__[-1]
        assert all("X_sth_tinycnn" not in s.tables["table"].obsm for s in broken)


def test_embed_list_errors_are_clear(read_slides, tiny_weights):
    slides = _table_slides(read_slides)
    sth.tl.embed(slides[1], "sth_tinycnn", weights=tiny_weights, progress_bar=False)
    before = slides[1].tables["table"].obsm["X_sth_tinycnn"].copy()
    with pytest.raises(KeyError, match="already has obsm") as err:
        sth.tl.embed(slides, "sth_tinycnn", weights=tiny_weights, progress_bar=False)
    assert "slide 1 of the 2 passed to `sth.tl.embed`" in err.value.__notes__[0]
    assert "X_sth_tinycnn" not in slides[0].tables["table"].obsm  # checked before any work: nothing written
    np.testing.assert_array_equal(slides[1].tables["table"].obsm["X_sth_tinycnn"], before)
    with pytest.raises(ValueError, match="empty list of slides"):
        sth.tl.embed([], "sth_tinycnn")
    with pytest.raises(TypeError, match="`client` of `sth.tl.embed` must be"):
        sth.tl.embed(slides[0], "sth_tinycnn", client="localhost:8786")
