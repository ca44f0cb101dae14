"""sth.pp.pool_to_spots on simulated single cells built from real her2st spots (C6).

Simulation (no single-cell data ships with the tests): each of 40 real C6 spots' raw counts (150 most expressed
genes) is split at random (multinomial, Dirichlet weights) over 10 "cells" placed uniformly in a disc of 45 um around
the spot centre (the spot is 100 um across; neighbouring spots are 200 um apart). The cells are held in the layout
``sth.io.read_xenium`` returns (table "cells" annotating circles ``C6_cells`` in pixels of the real H&E image, cropped
around these spots). Pooling back at the spot centres with the spot diameter must give the spots' counts exactly.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import st_from_he as sth
from st_from_he.io._cells import cells_section
from st_from_he.io._image import array_levels

N_SPOTS, CELLS_PER_SPOT, N_GENES, CELL_RADIUS_UM = 40, 10, 150, 45.0


def split_counts(counts: np.ndarray, k: int, rng) -> np.ndarray:
    """(n, genes) integer counts -> (n * k, genes): each row's counts spread over k parts at random, summing back."""
    parts = []
    for row in counts:
        weights = rng.dirichlet(np.ones(k))
        parts.append(rng.multinomial(row, weights).T)  # (k, genes)
    return np.concatenate(parts)


def disc_points(centres: np.ndarray, k: int, radius: float, rng) -> np.ndarray:
    """k random points uniformly inside a disc of ``radius`` around each centre, grouped by centre."""
    r = radius * np.sqrt(rng.uniform(0, 1, size=(len(centres), k)))
    theta = rng.uniform(0, 2 * np.pi, size=(len(centres), k))
    offsets = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=-1)
    return (centres[:, None, :] + offsets).reshape(-1, 2)


@pytest.fixture(scope="module")
def c6_spots(her2st_dir):
    """40 neighbouring real C6 spots (counts of 150 genes, centres in pixels of an H&E crop) and that crop."""
    sdata = sth.datasets.her2st(["C6"], path=her2st_dir)
    table = sdata.tables["table"]
    px = sth._sdata.pixel_size_um(sdata, "C6_image", "C6")
    xy = np.asarray(table.obsm["spatial"], dtype=float)
    nearest = np.argsort(np.linalg.norm(xy - np.median(xy, axis=0), axis=1))[:N_SPOTS]
    x = table.X[nearest].toarray()
    genes = np.argsort(-x.sum(axis=0))[:N_GENES]
    counts = x[:, genes].astype(np.int64)
    margin = 300
    low = np.floor(xy[nearest].min(axis=0) - margin).astype(int)
    high = np.ceil(xy[nearest].max(axis=0) + margin).astype(int)
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(her2st_dir / "C6" / "C6_HE.jpg") as im:
        crop = np.asarray(im.convert("RGB").crop((*low, *high)))
    return {
        "counts": counts,
        "genes": table.var_names[genes].to_numpy(),
        "ids": table.obs["spot_id"].to_numpy()[nearest].astype(str),
        "centres_px": xy[nearest] - low,
        "px": px,
        "image": crop,
    }


def simulated_cells(spots, *, seed=0):
    rng = np.random.default_rng(seed)
    px = spots["px"]
    cells = split_counts(spots["counts"], CELLS_PER_SPOT, rng)
    xy = disc_points(spots["centres_px"], CELLS_PER_SPOT, CELL_RADIUS_UM / px, rng)
    ids = [f"{s}_c{j}" for s in spots["ids"] for j in range(CELLS_PER_SPOT)]
    return cells_section(
        "C6",
        x=cells,
        var=pd.DataFrame(index=spots["genes"]),
        obs=pd.DataFrame(index=ids),
        ids=ids,
        xy_px=xy,
        radius_px=5.0 / px,
        pixel_size_um=px,
        levels=array_levels(spots["image"]),
        shapes_key="C6_cells",
        table_key="cells",
        patient="C",
        where="simulated cells",
    )


@pytest.fixture
def cells(c6_spots):
    return simulated_cells(c6_spots)


def test_pooling_at_the_spot_centres_recovers_the_spot_counts(c6_spots, cells):
    before = cells.tables["cells"].copy()
    centres = pd.DataFrame(c6_spots["centres_px"] * c6_spots["px"], columns=["x", "y"], index=c6_spots["ids"])
    key = sth.pp.pool_to_spots(cells, centres_um=centres, diameter_um=100)
    assert key == "table"
    pooled = cells.tables["table"]
    np.testing.assert_array_equal(pooled.X.toarray(), c6_spots["counts"])  # exactly, every gene of every spot
    assert np.issubdtype(pooled.X.dtype, np.integer)
    assert (pooled.obs["n_cells"] == CELLS_PER_SPOT).all()
    assert pooled.obs["spot_id"].tolist() == c6_spots["ids"].tolist()
    assert pooled.obs_names.tolist() == [f"C6_{i}" for i in c6_spots["ids"]]
    assert set(pooled.obs["sample"]) == {"C6"} and set(pooled.obs["patient"]) == {"C"}
    assert set(pooled.obs["region"]) == {"C6_spots"}
    assert pooled.uns["spatialdata_attrs"]["instance_key"] == "spot_id"
    assert pooled.uns["st_from_he"]["raw_counts"] is True
    np.testing.assert_allclose(pooled.obsm["spatial"], c6_spots["centres_px"], atol=1e-6)
    circles = cells.shapes["C6_spots"]
    assert circles.index.tolist() == c6_spots["ids"].tolist()
    np.testing.assert_allclose(circles["radius"], 50 / c6_spots["px"])
    # the source table is untouched
    after = cells.tables["cells"]
    assert (after.X != before.X).nnz == 0 and after.obs.equals(before.obs)
    # a diameter that misses the outer cells gives fewer cells and smaller, still integer, sums
    sth.pp.pool_to_spots(cells, centres_um=centres, diameter_um=40, overwrite=True)
    small = cells.tables["table"]
    assert (small.obs["n_cells"] < CELLS_PER_SPOT).any() and (small.obs["n_cells"] >= 1).all()
    rows = pd.Index(c6_spots["ids"]).get_indexer(small.obs["spot_id"])  # spots without a cell are left out
    assert (rows >= 0).all() and (small.X.toarray() <= c6_spots["counts"][rows]).all()


@pytest.mark.parametrize(("grid", "spacing", "diameter"), [("hexagonal", 100.0, 55.0), ("square", 60.0, 90.0)])
def test_grid_spots_sum_the_cells_inside_them(cells, grid, spacing, diameter):
    sth.pp.pool_to_spots(cells, spacing_um=spacing, diameter_um=diameter, grid=grid)
    pooled, source = cells.tables["table"], cells.tables["cells"]
    px = sth._sdata.pixel_size_um(cells, "C6_image", "C6")
    centres_um = pooled.obsm["spatial"] * px
    cells_um = np.asarray(source.obsm["spatial"]) * px
    inside = np.linalg.norm(centres_um[:, None, :] - cells_um[None, :, :], axis=-1) <= diameter / 2
    expected = inside.astype(np.int64) @ source.X.toarray()
    np.testing.assert_array_equal(pooled.X.toarray(), expected)
    assert (pooled.obs["n_cells"].to_numpy() == inside.sum(axis=1)).all() and (inside.sum(axis=1) >= 1).all()
    # the grid's geometry: centres on the lattice of their array indices (hexagonal: columns count half steps)
    rows, cols = pooled.obs["array_row"].to_numpy(), pooled.obs["array_col"].to_numpy()
    col_step, row_step = (spacing / 2, spacing * np.sqrt(3) / 2) if grid == "hexagonal" else (spacing, spacing)
    lattice = np.column_stack([cols * col_step, rows * row_step])
    np.testing.assert_allclose(centres_um - lattice, np.broadcast_to(centres_um[0] - lattice[0], lattice.shape))
    if grid == "hexagonal":
        assert ((rows - cols) % 2 == 0).all()
    d = np.linalg.norm(centres_um[:, None] - centres_um[None], axis=-1)
    assert d[~np.eye(len(d), dtype=bool)].min() >= spacing * (1 - 1e-9)
    assert pooled.obs["spot_id"].tolist() == [f"{r}x{c}" for r, c in zip(rows, cols, strict=True)]
    if diameter > spacing:  # overlapping circles: a cell counts in each circle holding it
        assert pooled.X.sum() > source.X.sum()


def test_pooled_spots_train_predict_and_evaluate(cells):
    sth.pp.pool_to_spots(cells, spacing_um=100, diameter_um=55)
    genes = list(cells.tables["table"].var_names[:30])
    model = sth.tl.ExpressionModel(genes, preset="ridge").fit(cells)
    assert model.training_info["n_train_spots"] == cells.tables["table"].n_obs
    sth.tl.predict_expression(cells, model)
    predicted = cells.tables["predicted_expression"]
    assert predicted.n_obs == cells.tables["table"].n_obs and list(predicted.var_names) == genes
    scores = sth.tl.evaluate(cells)
    per_gene = scores["per_gene"]
    assert set(per_gene["sample"]) == {"C6"} and len(per_gene) == len(genes)
    assert np.isfinite(per_gene["pearson"]).all()
    assert scores["summary"].loc["C6", "n_spots"] == cells.tables["table"].n_obs


def test_pool_errors(cells, her2st_dir):
    with pytest.raises(ValueError, match="`spacing_um` must be a positive number"):
        sth.pp.pool_to_spots(cells, spacing_um=0)
    with pytest.raises(ValueError, match="`spacing_um` must be a positive number"):
        sth.pp.pool_to_spots(cells, spacing_um=-5)
    with pytest.raises(ValueError, match="`diameter_um` must be a positive number"):
        sth.pp.pool_to_spots(cells, diameter_um=float("nan"))
    with pytest.raises(ValueError, match="`grid` must be one of"):
        sth.pp.pool_to_spots(cells, grid="triangular")
    with pytest.raises(ValueError, match="above `max_spots`=2,000,000.*larger `spacing_um`"):
        sth.pp.pool_to_spots(cells, spacing_um=0.5)
    with pytest.raises(ValueError, match="above `max_spots`=10"):
        sth.pp.pool_to_spots(cells, max_spots=10)
    with pytest.raises(ValueError, match="is the source table"):
        sth.pp.pool_to_spots(cells, table_key="cells", key_added="cells")
    with pytest.raises(KeyError, match="No table 'bins'"):
        sth.pp.pool_to_spots(cells, table_key="bins")
    with pytest.raises(ValueError, match="No pseudo-spot of 'C6' holds at least 1000"):
        sth.pp.pool_to_spots(cells, min_cells=1000)
    with pytest.raises(ValueError, match="lie outside the image"):
        sth.pp.pool_to_spots(cells, centres_um=np.array([[-500.0, 10.0], [50.0, 50.0]]))
    with pytest.raises(ValueError, match=r"must be an \(n, 2\) array"):
        sth.pp.pool_to_spots(cells, centres_um=np.zeros((3, 3)))
    with pytest.raises(KeyError, match="absent from table 'cells'"):
        sth.pp.pool_to_spots(cells, centres_um={"C7": np.zeros((1, 2))})
    with pytest.raises(TypeError, match="takes a SpatialData, got an AnnData"):
        sth.pp.pool_to_spots(cells.tables["cells"])
    assert "table" not in cells.tables and "C6_spots" not in cells.shapes  # failed calls add nothing

    # an existing table: refused unless pooled before and overwrite=True; measured tables never replaced
    sth.pp.pool_to_spots(cells)
    with pytest.raises(KeyError, match="exists; pass `overwrite=True`"):
        sth.pp.pool_to_spots(cells, table_key="cells")
    sth.pp.pool_to_spots(cells, table_key="cells", spacing_um=150, overwrite=True)
    assert cells.tables["table"].uns["pool_to_spots"]["params"]["spacing_um"] == 150
    with pytest.raises(KeyError, match="Pass `table_key=`"):
        sth.pp.pool_to_spots(cells, key_added="other")  # two candidate tables now
    measured = sth.datasets.her2st(["C6"], path=her2st_dir)
    measured.tables["cells"] = cells.tables["cells"]
    measured.shapes["C6_cells"] = cells.shapes["C6_cells"]
    with pytest.raises(KeyError, match="was not written by `sth.pp.pool_to_spots`"):
        sth.pp.pool_to_spots(measured, table_key="cells", overwrite=True)
    with pytest.raises(KeyError, match=r"'C6_spots' exists and is annotated by table\(s\) \['table'\]"):
        sth.pp.pool_to_spots(measured, table_key="cells", key_added="pooled", overwrite=True)
    with pytest.raises(KeyError, match="'C6_image' exists and is not a shapes element"):
        sth.pp.pool_to_spots(measured, table_key="cells", key_added="pooled", shapes_suffix="image", overwrite=True)
    sth.pp.pool_to_spots(measured, table_key="cells", key_added="pooled", shapes_suffix="pooled")
    assert measured.tables["table"].n_obs > measured.tables["pooled"].n_obs  # the measured spots are kept
    assert set(measured.tables["pooled"].obs["region"]) == {"C6_pooled"} and "C6_spots" in measured.shapes


def test_pool_refuses_empty_and_non_count_tables(cells):
    from spatialdata import SpatialData

    table = cells.tables["cells"]
    empty = SpatialData(shapes={"C6_cells": cells.shapes["C6_cells"]})
    empty.tables.data["cells"] = table[:0].copy()  # spatialdata refuses to validate an empty table; bypass that
    with pytest.raises(ValueError, match="Table 'cells' has no cells or bins to pool"):
        sth.pp.pool_to_spots(empty)
    normalised = table.copy()
    normalised.X = normalised.X.astype(float) * 0.5
    bad = SpatialData(shapes={"C6_cells": cells.shapes["C6_cells"]}, tables={"cells": normalised})
    with pytest.raises(ValueError, match="non-integer values"):
        sth.pp.pool_to_spots(bad)
    no_shapes = SpatialData(tables={"cells": table.copy()})
    with pytest.raises(KeyError, match="annotates 'C6_cells', which is not a shapes element"):
        sth.pp.pool_to_spots(no_shapes)
