"""sth.pl on layouts not made by our readers: spatialdata-io Visium, AnnData tables, and after squidpy's SpatialData route.

Every spatial plot must put each spot where its circle is on the image drawn underneath: positions come from the
shapes the table annotates and their transformations (``obsm["spatial"]`` of a SpatialData table may hold anything;
squidpy's SpatialData route writes coordinate-system units there). Checks compare the drawn spot centres with the
circles mapped into the drawn image's pixels, and the image's darkness under the spots with the glass around them.
"""

from __future__ import annotations

import warnings

import anndata as ad
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import TableModel

import st_from_he as sth
import st_from_he.pl as pl
from st_from_he._sdata import pixel_size_um

pytestmark = pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")

GENES = ["ERBB2", "KRT19", "GRB7", "CD74"]
DOWN = 4  # the Space Ranger folder's "full resolution" is C6's H&E at 1/4 scale (JPEG draft decoding: fast)


def _lognorm(x) -> np.ndarray:
    x = sparse.csr_matrix(x, dtype=np.float64)
    totals = np.asarray(x.sum(axis=1)).ravel()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log1p((sparse.diags(scale) @ x).toarray())


def _prediction(table: ad.AnnData, genes, *, seed: int = 0) -> ad.AnnData:
    """Measured log1p CP10k plus noise: a plausible prediction annotating the same spots as ``table``."""
    rng = np.random.default_rng(seed)
    x = _lognorm(table.X)[:, table.var_names.get_indexer(genes)]
    x = (x + rng.normal(scale=0.5, size=x.shape)).astype(np.float32)
    region_key = table.uns["spatialdata_attrs"]["region_key"]
    instance_key = table.uns["spatialdata_attrs"]["instance_key"]
    columns = [c for c in ("sample", region_key, instance_key) if c in table.obs]
    pred = ad.AnnData(X=x, obs=table.obs[columns].copy(), var=pd.DataFrame(index=list(genes)))
    region = table.uns["spatialdata_attrs"]["region"]
    return TableModel.parse(pred, region=region, region_key=region_key, instance_key=instance_key)


def _drawn(ax) -> np.ndarray:
    """Centres of the spots drawn into ``ax`` (its first collection), in data units."""
    return np.asarray(ax.collections[0].get_offsets(), dtype=float)


def _darkness_contrast(ax) -> float:
    """Mean grey level of the drawn image off the spots minus under them (tissue is darker than glass)."""
    image = ax.images[0]
    rgb = np.asarray(image.get_array(), dtype=float).mean(axis=-1)
    left, right, bottom, top = image.get_extent()
    rows, cols = rgb.shape
    xy = _drawn(ax)
    c = np.clip(((xy[:, 0] - left) / (right - left) * cols).astype(int), 0, cols - 1)
    r = np.clip(((xy[:, 1] - top) / (bottom - top) * rows).astype(int), 0, rows - 1)
    under = np.zeros(rgb.shape, bool)
    under[r, c] = True
    return float(rgb[~under].mean() - rgb[under].mean())


@pytest.fixture(scope="module")
def c6(her2st_dir) -> SpatialData:
    """Our reader's C6 (all 178 spots) with its overview level decoded once, and a prediction table."""
    sdata = sth.datasets.her2st(["C6"], path=her2st_dir)
    tree = sdata.images["C6_image"]
    coarsest = sorted(tree.children)[-1]
    level = tree[coarsest].to_dataset()
    level["image"] = level["image"].copy(data=level["image"].data.persist())
    tree[coarsest] = level
    sdata.tables["predicted_expression"] = _prediction(sdata.tables["table"], GENES)
    return sdata


@pytest.fixture(scope="module")
def visium(c6, her2st_dir, tmp_path_factory, spaceranger_writer) -> SpatialData:
    """C6 written as a Space Ranger ``outs/`` folder and read with ``spatialdata_io.visium`` (images ``C6_*_image``,
    circles ``C6``, table rows with region ``"C6"`` and no ``obs["sample"]``)."""
    import spatialdata_io

    out = tmp_path_factory.mktemp("spaceranger") / "outs"
    spaceranger_writer(c6, "C6", her2st_dir / "C6" / "C6_HE.jpg", out, down=DOWN, genes=GENES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = spatialdata_io.visium(out, dataset_id="C6", fullres_image_file="C6_full.tif")
    sdata.tables["predicted_expression"] = _prediction(sdata.tables["table"], GENES)
    return sdata


def _width(element) -> int:
    """Width of an image element's finest level."""
    return (element["scale0"]["image"] if hasattr(element, "children") else element).shape[-1]


def _circles(sdata: SpatialData, shapes_key: str, ids) -> np.ndarray:
    circles = sdata.shapes[shapes_key].loc[list(ids)]
    return np.c_[circles.geometry.x.to_numpy(), circles.geometry.y.to_numpy()]


# --------------------------------------------------------------------------------------------------------------------
# after squidpy's SpatialData route (obsm["spatial"] rewritten in micrometres)
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("builder", ["spatial_neighbors", "spatial_neighbors_knn"])
def test_spots_stay_on_tissue_after_squidpy_sdata_route(c6, builder):
    import squidpy as sq

    table = c6.tables["table"]
    before = table.obsm["spatial"].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(sq.gr, builder)(c6, table_key="table", elements_to_coordinate_systems={"C6_spots": "C6"})
    try:
        um = pixel_size_um(c6, "C6_spots", "C6")
        np.testing.assert_allclose(table.obsm["spatial"], before * um)  # squidpy wrote micrometres
        circles = _circles(c6, "C6_spots", table.obs["spot_id"])  # pixels of C6_image
        fig = pl.predicted_vs_measured(c6, ["ERBB2", "KRT19"], return_fig=True)
        for ax in fig.axes[:4]:  # 2 genes x (measured, predicted); the rest are colour bars
            np.testing.assert_allclose(_drawn(ax), circles)
            assert _darkness_contrast(ax) > 20
        plt.close(fig)
        ax = pl.tumor_map(_scored(c6), show=False)
        np.testing.assert_allclose(_drawn(ax), circles)
        assert _darkness_contrast(ax) > 20
        plt.close("all")
    finally:
        table.obsm["spatial"] = before  # the module's other tests see the reader's table


def _scored(sdata: SpatialData, key: str = "predicted_expression") -> SpatialData:
    """``sdata`` with a tumour score (ERBB2 + GRB7 predicted) in the prediction table's obs."""
    pred = sdata.tables[key]
    pred.obs["tumor_score"] = np.asarray(pred[:, ["ERBB2", "GRB7"]].X).mean(axis=1)
    return sdata


# --------------------------------------------------------------------------------------------------------------------
# spatialdata-io Visium layout: C6_full_image / C6_hires_image, circles C6, sample from the region
# --------------------------------------------------------------------------------------------------------------------
def test_visium_layout_spots_on_their_circles(visium):
    table = visium.tables["table"]
    assert "sample" not in table.obs and set(visium.shapes) == {"C6"}
    assert {"C6_full_image", "C6_hires_image", "C6_lowres_image"} <= set(visium.images)
    circles = _circles(visium, "C6", table.obs["spot_id"])  # full-resolution pixels
    fig = pl.predicted_vs_measured(visium, GENES[:2], return_fig=True)  # the one section is found from the region
    assert fig.get_suptitle().startswith("C6: ")
    for ax in fig.axes[:4]:
        np.testing.assert_allclose(_drawn(ax), circles)
        assert _darkness_contrast(ax) > 20
        assert ax.images[0].get_extent()[1] <= _width(visium.images["C6_full_image"]) + 1  # drawn in its pixels
    plt.close(fig)
    # the hires image by name: the same spots, in hires pixels (scale 0.5)
    ax = pl.tumor_map(_scored(visium), sample="C6", image="C6_hires_image", show=False)
    np.testing.assert_allclose(_drawn(ax), circles * 0.5)
    assert _darkness_contrast(ax) > 20
    assert ax.get_title() == "C6: tumor score (predicted)"
    plt.close("all")


def test_visium_layout_in_a_global_coordinate_system(visium):
    """Older spatialdata-io versions (and hand-made objects) name the coordinate system ``global``."""
    from spatialdata import deepcopy

    renamed = deepcopy(visium)  # renaming acts in place on the elements
    renamed.rename_coordinate_systems({"C6": "global"})
    assert "global" in renamed.coordinate_systems and "C6" not in renamed.coordinate_systems
    fig = pl.predicted_vs_measured(renamed, "ERBB2", sample="C6", return_fig=True)
    circles = _circles(renamed, "C6", renamed.tables["table"].obs["spot_id"])
    np.testing.assert_allclose(_drawn(fig.axes[0]), circles)
    assert _darkness_contrast(fig.axes[0]) > 20
    plt.close(fig)
    fig = pl.gene_correlation(renamed, GENES, return_fig=True)
    assert fig.get_suptitle().startswith("C6: gene-gene correlation of 4 genes")
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------
# AnnData tables
# --------------------------------------------------------------------------------------------------------------------
def test_anndata_tables_with_and_without_an_image(c6):
    table, pred = c6.tables["table"], c6.tables["predicted_expression"]
    with pytest.raises(TypeError, match="predicted="):
        pl.predicted_vs_measured(table, "ERBB2")
    # no image: spots alone, at obsm["spatial"]
    fig = pl.predicted_vs_measured(table, ["ERBB2", "KRT19"], predicted=pred, return_fig=True)
    assert not fig.axes[0].images and fig.get_suptitle().startswith("C6: ")
    np.testing.assert_allclose(_drawn(fig.axes[0]), table.obsm["spatial"])
    plt.close(fig)
    # an array image (the coarsest level, y x c) with its scale factor
    tree = c6.images["C6_image"]
    level = tree[sorted(tree.children)[-1]]["image"]
    array = np.moveaxis(np.asarray(level), 0, -1)
    scale = level.shape[-1] / tree["scale0"]["image"].shape[-1]
    fig = pl.predicted_vs_measured(table, "ERBB2", predicted=pred, image=array, scale_factor=scale, return_fig=True)
    ax = fig.axes[0]
    np.testing.assert_allclose(_drawn(ax), table.obsm["spatial"])
    drawn = ax.images[0]
    left, right, bottom, top = drawn.get_extent()
    assert (right - left) / drawn.get_array().shape[1] == pytest.approx(1 / scale)  # array pixels -> positions
    assert _darkness_contrast(ax) > 20
    plt.close(fig)
    # scatter, gene correlation and a score map take the AnnData too
    fig = pl.predicted_vs_measured(table, GENES, predicted=pred, kind="scatter", return_fig=True)
    assert len([a for a in fig.axes if a.get_visible()]) == 4
    plt.close(fig)
    axes = pl.gene_correlation(table, GENES, predicted=pred, show=False)
    assert [a.get_title().split("\n")[0] for a in axes] == ["Measured", "Predicted", "Predicted \u2212 measured"]
    scored = pred.copy()
    scored.obs["tumor_score"] = np.asarray(pred[:, "ERBB2"].X).ravel()
    scored.obsm["spatial"] = table.obsm["spatial"]  # as sth.tl.predict_expression writes (same spots, same order)
    ax = pl.tumor_map(scored, labels=pd.Series(True, index=scored.obs_names[:40]).reindex(scored.obs_names), show=False)
    assert not ax.images and ax.get_title() == "C6: tumor score"
    plt.close("all")


def test_plain_scanpy_table_matched_by_obs_names(visium_crop_dir):
    """A scanpy Visium AnnData (no region, no sample): matched by name, drawn over its uns['spatial'] or H&E image."""
    adata = ad.read_h5ad(visium_crop_dir / "adata.h5ad")
    library = adata.uns["spatial"]["V1_Adult_Mouse_Brain"]
    genes = ["Gad1", "Hbb-bs"]
    backwards = adata[::-1, genes]  # rows in another order: matched by name, not position
    pred = ad.AnnData(
        X=backwards.X.toarray() + 0.1, obs=pd.DataFrame(index=backwards.obs_names), var=pd.DataFrame(index=genes)
    )
    fig = pl.predicted_vs_measured(adata, genes, predicted=pred, normalize=False, image="lowres", return_fig=True)
    ax = fig.axes[0]
    np.testing.assert_allclose(_drawn(ax), adata.obsm["spatial"])
    scalef = library["scalefactors"]["tissue_lowres_scalef"]
    left, right, _, _ = ax.images[0].get_extent()  # the lowres image cropped to the spots, in full-resolution pixels
    assert (right - left) / ax.images[0].get_array().shape[1] == pytest.approx(1 / scalef)
    assert fig.get_suptitle() == "predicted vs measured expression"  # no section name to give
    assert fig.axes[1].get_title() == "Gad1: predicted (PCC 1.00)"
    assert ax.collections[0].get_widths()[0] == pytest.approx(library["scalefactors"]["spot_diameter_fullres"])
    plt.close(fig)
    with Image.open(visium_crop_dir / "image.jpg") as im:  # the full-resolution crop: spots on tissue
        he = np.asarray(im.convert("RGB"))
    adata.obs["score"] = adata[:, "Gad1"].X.toarray().ravel()
    ax = pl.tumor_map(adata, score_key="score", image=he, show=False)
    np.testing.assert_allclose(_drawn(ax), adata.obsm["spatial"])
    left, right, bottom, top = ax.images[0].get_extent()
    assert 0 <= left < right <= he.shape[1] and 0 <= top < bottom <= he.shape[0]  # the crop is nearly all tissue
    assert (right - left) / ax.images[0].get_array().shape[1] == pytest.approx(1.0)  # its pixels are obsm's units
    plt.close("all")


# --------------------------------------------------------------------------------------------------------------------
# ax, show, save, return_fig
# --------------------------------------------------------------------------------------------------------------------
def test_show_save_return_conventions(c6, tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(1))
    assert pl.predicted_vs_measured(c6, "ERBB2", save=tmp_path / "a.png") is None  # shown, nothing returned
    assert shown == [1] and (tmp_path / "a.png").stat().st_size > 1000
    fig = pl.predicted_vs_measured(c6, "ERBB2", return_fig=True)  # returned, not shown
    assert shown == [1] and len(fig.axes) == 3
    axes = pl.predicted_vs_measured(c6, "ERBB2", show=False)  # not shown: the axes come back
    assert shown == [1] and [a.get_title() for a in axes] == ["ERBB2: measured", axes[1].get_title()]
    assert pl.predicted_vs_measured(c6, "ERBB2", return_fig=True, show=True) is not None and shown == [1, 1]
    # given axes: drawn into, not shown, returned
    fig, grid = plt.subplots(2, 2, figsize=(8, 8))
    got = pl.predicted_vs_measured(c6, "ERBB2", ax=grid[0])
    assert list(got) == list(grid[0]) and shown == [1, 1]
    assert pl.predicted_vs_measured(c6, ["ERBB2", "KRT19"], kind="scatter", ax=grid[1], return_fig=True) is fig
    assert [a.get_title().split(" ")[0] for a in grid[1]] == ["ERBB2", "KRT19"]
    with pytest.raises(ValueError, match="takes 2 Axes, got 1"):
        pl.predicted_vs_measured(c6, "ERBB2", ax=grid[1, 0])
    plt.close("all")
    fig, grid = plt.subplots(1, 2, figsize=(8, 4))
    assert list(pl.gene_correlation(c6, GENES, ax=grid)) == list(grid) and shown == [1, 1]
    assert grid[1].get_title().startswith("Predicted\npreservation r = ")
    plt.close("all")


def test_layout_errors(c6):
    table = c6.tables["table"]
    with pytest.raises(TypeError, match="takes a SpatialData or an AnnData table, got int"):
        pl.tumor_map(42)
    with pytest.raises(KeyError, match=r"No image element 'C6_he' \(`image`\); images present: \['C6_image'\]"):
        pl.predicted_vs_measured(c6, "ERBB2", image="C6_he", show=False)
    with pytest.raises(ValueError, match="takes 2 Axes"):
        pl.gene_correlation(c6, GENES, ax=plt.subplots()[1])
    bare = table.copy()
    del bare.obsm["spatial"]
    with pytest.raises(KeyError, match=r"no obsm\['spatial'\] of spot positions"):
        pl.predicted_vs_measured(bare, "ERBB2", predicted=c6.tables["predicted_expression"])
    # a table whose region is not a shapes element here, and no obsm: nothing places its spots
    alone = SpatialData(tables={"table": bare, "predicted_expression": c6.tables["predicted_expression"]})
    with pytest.raises(KeyError, match="Cannot place the spots of table 'table'"):
        pl.predicted_vs_measured(alone, "ERBB2")
    plt.close("all")
