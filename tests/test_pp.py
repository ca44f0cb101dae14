"""Gene selection, normalisation, section splits, tissue detection and spot grids on the real her2st sections."""

from __future__ import annotations

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse

import st_from_he as sth
from st_from_he.io._section import build_section
from st_from_he.pp._normalize import log_normalize

MARKERS = ["ERBB2", "KRT19", "NOT_A_GENE"]


@pytest.fixture(scope="module")
def c6(her2st_dir):
    """Section C6, this module's own copy (tests add elements and layers to it)."""
    return sth.datasets.her2st(["C6"], path=her2st_dir)


@pytest.fixture(scope="module")
def c6_tissue(c6):
    """The tissue mask of C6, computed once and stored as ``C6_tissue``."""
    return sth.pp.detect_tissue(c6, "C6_image", key_added="C6_tissue")


def _synthetic(sample: str = "S", pixel_size: float = 2.0):
    """A 1200 x 1000 px white slide with a dark 'tissue' rectangle (x 300-700, y 400-900) and two spots."""
    pixels = np.full((3, 1200, 1000), 235, np.uint8)
    pixels[0, 400:900, 300:700] = 150
    pixels[1:, 400:900, 300:700] = 90
    table = ad.AnnData(np.array([[1, 2], [3, 4]], np.int32))
    return build_section(
        sample,
        x=table.X,
        var=pd.DataFrame(index=["g1", "g2"]),
        obs=pd.DataFrame(index=[f"{sample}_a", f"{sample}_b"]),
        spatial_px=np.array([[500.0, 600.0], [100.0, 100.0]]),
        levels=[da.from_array(pixels, chunks=(3, 512, 512))],
        pixel_size_um=pixel_size,
        spot_diameter_um=100.0,
    )


# ---- log_normalize / normalize ---------------------------------------------------------------------------------------


def test_log_normalize_matches_scanpy(c6):
    counts = c6.tables["table"].X
    before = counts.copy()
    ours = log_normalize(counts)
    reference = ad.AnnData(counts.astype(np.float64))
    sc.pp.normalize_total(reference, target_sum=1e4)
    sc.pp.log1p(reference)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference.X.toarray(), rtol=1e-6, atol=1e-6)
    assert (counts != before).nnz == 0  # input untouched
    kept = log_normalize(counts, keep_sparse=True)
    assert sparse.issparse(kept) and kept.dtype == np.float32
    np.testing.assert_array_equal(kept.toarray(), ours)
    dense = log_normalize(counts.toarray())
    np.testing.assert_array_equal(dense, ours)
    zero_row = log_normalize(np.array([[0, 0], [1, 3]]))
    np.testing.assert_array_equal(zero_row[0], [0, 0])
    np.testing.assert_allclose(zero_row[1], np.log1p([2500, 7500]), rtol=1e-6)
    with pytest.raises(ValueError, match="target_sum"):
        log_normalize(counts, target_sum=0)


def test_normalize_writes_a_new_layer(c6):
    table = c6.tables["table"]
    x_before = table.X.copy()
    sth.pp.normalize(c6)
    assert (table.X != x_before).nnz == 0 and table.X.dtype == x_before.dtype  # X keeps the raw counts
    np.testing.assert_array_equal(table.layers["lognorm"].toarray(), log_normalize(table.X))
    assert table.uns["lognorm"]["params"]["target_sum"] == 1e4
    with pytest.raises(ValueError, match="overwrite"):
        sth.pp.normalize(c6)
    sth.pp.normalize(c6, target_sum=1e6, overwrite=True)
    np.testing.assert_allclose(table.layers["lognorm"].toarray(), log_normalize(table.X, target_sum=1e6))
    sth.pp.normalize(table, key_added="cp10k")  # an AnnData table works too
    assert "cp10k" in table.layers
    with pytest.raises(KeyError, match="tables present"):
        sth.pp.normalize(c6, table_key="nope")
    logged = ad.AnnData(np.log1p(np.array([[1.0, 2.0], [3.0, 0.0]])))
    with pytest.raises(ValueError, match="raw counts"):
        sth.pp.normalize(logged)


# ---- select_genes ----------------------------------------------------------------------------------------------------


def test_select_genes_hvg_union_over_sections(her2st_small):
    table = her2st_small.tables["table"]
    snapshot = (table.X.copy(), table.obs.copy(), table.var.copy(), set(table.uns), set(table.layers))
    genes = sth.pp.select_genes(her2st_small, n_top=200)
    assert genes == sth.pp.select_genes(her2st_small, n_top=200)  # deterministic
    assert 200 <= len(genes) <= 400 and len(set(genes)) == len(genes)
    assert genes == [g for g in table.var_names if g in set(genes)]  # table order
    # the union of each section's own top 200 (scanpy's seurat flavour on log1p CP10k)
    per_section = []
    for sample in ("C5", "C6"):
        sub = table[table.obs["sample"] == sample]
        sub = sub[:, np.asarray(sub.X.sum(0)).ravel() > 0]
        lognorm = ad.AnnData(log_normalize(sub.X), var=sub.var)
        sc.pp.highly_variable_genes(lognorm, flavor="seurat", n_top_genes=200)
        per_section.append(set(lognorm.var_names[lognorm.var["highly_variable"]]))
    assert set(genes) == per_section[0] | per_section[1]
    # the table is not modified
    assert (table.X != snapshot[0]).nnz == 0
    pd.testing.assert_frame_equal(table.obs, snapshot[1])
    pd.testing.assert_frame_equal(table.var, snapshot[2])
    assert set(table.uns) == snapshot[3] and set(table.layers) == snapshot[4]


def test_select_genes_mean_and_markers(her2st_small):
    table = her2st_small.tables["table"]
    genes = sth.pp.select_genes(her2st_small, n_top=50, method="mean", markers=MARKERS)
    c6 = table[table.obs["sample"] == "C6"]
    means = log_normalize(c6.X).mean(0)
    top_c6 = set(c6.var_names[np.argsort(-means, kind="stable")[:50]])
    assert top_c6 <= set(genes)
    assert {"ERBB2", "KRT19"} <= set(genes) and "NOT_A_GENE" not in genes
    assert 50 <= len(genes) <= 102


def test_select_genes_given_list(her2st_small):
    assert sth.pp.select_genes(her2st_small, genes=["KRT19", "ERBB2", "KRT19"]) == ["KRT19", "ERBB2"]
    assert sth.pp.select_genes(her2st_small, genes=["KRT19"], markers=["ERBB2", "KRT19"]) == ["KRT19", "ERBB2"]
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        sth.pp.select_genes(her2st_small, genes=["ERBB2", "NOT_A_GENE"])
    with pytest.raises(ValueError, match="method"):
        sth.pp.select_genes(her2st_small, method="pca")
    with pytest.raises(ValueError, match="n_top"):
        sth.pp.select_genes(her2st_small, n_top=0)
    with pytest.raises(KeyError, match="tables present"):
        sth.pp.select_genes(her2st_small, table_key="nope")


# ---- split_sections --------------------------------------------------------------------------------------------------


def test_split_sections(her2st_small):
    from spatialdata.models import TableModel

    n_before = her2st_small.tables["table"].n_obs
    train, test = sth.pp.split_sections(her2st_small, test=["C6"])
    for part, sample in ((train, "C5"), (test, "C6")):
        table = part.tables["table"]
        assert set(table.obs["sample"]) == {sample}
        assert list(table.obs["sample"].cat.categories) == [sample]
        assert list(part.images) == [f"{sample}_image"] and list(part.shapes) == [f"{sample}_spots"]
        attrs = table.uns["spatialdata_attrs"]
        assert attrs["region"] in (f"{sample}_spots", [f"{sample}_spots"])
        TableModel().validate(table)
        assert table.n_obs == int((her2st_small.tables["table"].obs["sample"] == sample).sum())
    assert test.images["C6_image"] is her2st_small.images["C6_image"]  # lazy images are shared, not copied
    assert her2st_small.tables["table"].n_obs == n_before  # the input is untouched
    patches = sth.pp.extract_patches(test, size_px=16)
    assert set(patches.samples) == {"C6"}


def test_split_sections_with_validation_and_errors(her2st_small):
    c5_only = sth.pp.split_sections(her2st_small, test="C6")[0]
    with pytest.raises(ValueError, match="No section is left"):
        sth.pp.split_sections(her2st_small, test=["C5", "C6"])
    with pytest.raises(ValueError, match="No section is left"):
        sth.pp.split_sections(her2st_small, test="C6", val="C5")
    with pytest.raises(ValueError, match="Unknown sample"):
        sth.pp.split_sections(her2st_small, test=["C9"])
    with pytest.raises(ValueError, match="both"):
        sth.pp.split_sections(her2st_small, test="C6", val=["C6"])
    with pytest.raises(ValueError, match="Unknown sample"):
        sth.pp.split_sections(c5_only, test="C6")
    a, b = _synthetic("A"), _synthetic("B")
    three = sth.io.concatenate([a, b, _synthetic("C")])
    train, val, test = sth.pp.split_sections(three, test="C", val=["B"])
    assert [sorted(t.tables["table"].obs["sample"].unique()) for t in (train, val, test)] == [["A"], ["B"], ["C"]]


# ---- detect_tissue ---------------------------------------------------------------------------------------------------


def test_detect_tissue_on_c6(c6, c6_tissue):
    mask, (sy, sx) = c6_tissue
    assert mask.dtype == bool and mask.ndim == 2
    assert 7.5 < sy < 8.5 and 7.5 < sx < 8.5  # the 1/8 level of the pyramid (5.5 um/px)
    spots = c6.tables["table"].obsm["spatial"]
    inside = mask[(spots[:, 1] / sy).astype(int), (spots[:, 0] / sx).astype(int)]
    assert inside.mean() > 0.95
    assert 0.08 < mask.mean() < 0.4  # the section is a small part of the slide
    corners = [mask[:50, :50], mask[:50, -50:], mask[-50:, :50], mask[-50:, -50:]]
    assert not any(c.any() for c in corners)  # glass
    labels = c6.labels["C6_tissue"]
    np.testing.assert_array_equal(labels.values, mask.astype(np.uint8))
    from spatialdata.transformations import get_transformation

    matrix = get_transformation(labels, "C6").to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    px = sth.pp.extract_patches(c6).pixel_size_um["C6"]
    np.testing.assert_allclose([matrix[0, 0], matrix[1, 1]], [sx * px, sy * px])
    with pytest.raises(KeyError, match="overwrite"):
        sth.pp.detect_tissue(c6, "C6_image", key_added="C6_tissue")
    with pytest.raises(KeyError, match="C6_image"):
        sth.pp.detect_tissue(c6, "C6")
    with pytest.raises(ValueError, match="level"):
        sth.pp.detect_tissue(c6, "C6_image", level=9)


def test_detect_tissue_synthetic_and_overwrite():
    sdata = _synthetic(pixel_size=2.0)
    mask, (sy, sx) = sth.pp.detect_tissue(sdata, "S_image", key_added="S_tissue")
    assert (sy, sx) == (2.0, 2.0)  # 2 um/px, reduced 2x to reach at least 4 um/px
    rows, cols = np.nonzero(mask)
    # the edges of the tissue (x 300-700, y 400-900 px at 2 um/px) within 30 um: the threshold lies near the glass
    assert abs(rows.min() * sy - 400) <= 15 and abs((rows.max() + 1) * sy - 900) <= 15
    assert abs(cols.min() * sx - 300) <= 15 and abs((cols.max() + 1) * sx - 700) <= 15
    otsu, _ = sth.pp.detect_tissue(sdata, "S_image", method="otsu", key_added="S_tissue", overwrite=True)
    assert not (otsu & ~mask).any() and (otsu == mask).mean() > 0.95  # Otsu: the same rectangle, tighter
    with pytest.raises(ValueError, match="method"):
        sth.pp.detect_tissue(sdata, "S_image", method="magic")


# ---- spot_grid -------------------------------------------------------------------------------------------------------


def test_spot_grid_over_the_whole_image(c6):
    px = sth.pp.extract_patches(c6).pixel_size_um["C6"]
    key = sth.pp.spot_grid(c6, "C6_image", spacing_um=100, diameter_um=55, tissue_only=False, key_added="all")
    assert key == "all"
    grid = c6.shapes[key]
    h, w = c6.images["C6_image"]["scale0"]["image"].shape[1:]
    spacing = 100 / px
    n_rows, n_cols = int(np.ceil(h / spacing)), int(np.ceil(w / spacing))
    assert len(grid) == n_rows * n_cols == 4416
    x, y = grid.geometry.x.to_numpy(), grid.geometry.y.to_numpy()
    assert x.min() > 0 and y.min() > 0 and x.max() < w and y.max() < h
    np.testing.assert_allclose(np.diff(np.unique(x.round(6))), spacing)
    np.testing.assert_allclose(np.diff(np.unique(y.round(6))), spacing)
    np.testing.assert_allclose(x.min() + x.max(), w)  # centred on the image
    np.testing.assert_allclose(grid["radius"], 55 / 2 / px)
    assert grid["array_row"].max() == n_rows - 1 and grid["array_col"].max() == n_cols - 1
    from spatialdata.transformations import get_transformation

    assert get_transformation(grid, "C6") == get_transformation(c6.images["C6_image"], "C6")
    with pytest.raises(KeyError, match="overwrite"):
        sth.pp.spot_grid(c6, "C6_image", tissue_only=False, key_added="all")
    with pytest.raises(ValueError, match="spacing_um"):
        sth.pp.spot_grid(c6, "C6_image", spacing_um=0, key_added="other")
    with pytest.raises(KeyError, match="images present"):
        sth.pp.spot_grid(c6, "C7_image")


def test_spot_grid_on_tissue(c6, c6_tissue):
    mask, (sy, sx) = c6_tissue
    key = sth.pp.spot_grid(c6, "C6_image", spacing_um=200, diameter_um=100)  # uses the stored C6_tissue
    assert key == "C6_grid"
    grid = c6.shapes[key]
    x, y = grid.geometry.x.to_numpy(), grid.geometry.y.to_numpy()
    assert mask[(y / sy).astype(int), (x / sx).astype(int)].all()
    # about as many pseudo-spots as measured spots on the same 200 um pitch (the tissue is a bit larger)
    assert 0.8 * c6.tables["table"].n_obs < len(grid) < 2.0 * c6.tables["table"].n_obs
    patches = sth.pp.extract_patches(c6, shapes_key=key, size_px=16)
    assert list(patches.obs_names[:2]) == ["C6_grid-0", "C6_grid-1"]


def test_spot_grid_synthetic_tissue_without_stored_mask():
    sdata = _synthetic(pixel_size=2.0)
    key = sth.pp.spot_grid(sdata, "S_image", spacing_um=100, diameter_um=55)  # computes the mask on the fly
    grid = sdata.shapes[key]
    x, y = grid.geometry.x.to_numpy(), grid.geometry.y.to_numpy()
    assert ((x > 290) & (x < 710) & (y > 390) & (y < 910)).all()
    assert len(grid) == 8 * 10  # 400 x 500 px of tissue at 50 px spacing
    assert "S_tissue" not in sdata.labels
