"""The whole chain on SpatialData layouts the package did not make: spatialdata-io's Visium reader, our readers, and
``spatialdata.concatenate`` of our sections.

Each layout runs select_genes -> fit (ridge, <= 150 training spots) -> predict -> evaluate -> squidpy's grid
neighbours and Moran's I on the predictions. The spatialdata-io section is C6 of her2st written as a Space Ranger
folder (``tests/conftest.py``): its patches must show the same tissue as those our reader cuts from the original
image, and its resolution must come from Space Ranger's ``spot_diameter_fullres``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import st_from_he as sth
from st_from_he._sdata import find_table, samples, table_sections

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

N_TRAIN = 150
SIZE_PX = 32  # small patches: the ridge preset's features are cheap on them


@pytest.fixture(scope="module")
def visium_c6(spaceranger_c6):
    """C6 read by ``spatialdata_io.visium``: images ``C6_{full,hires,lowres}_image``, circles ``C6``, system ``C6``
    in full-resolution pixels, table region ``"C6"``, instance key ``spot_id``, no ``obs["sample"]``."""
    import spatialdata_io

    out, px_um = spaceranger_c6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = spatialdata_io.visium(out, dataset_id="C6", fullres_image_file="C6_full.tif")
    return sdata, px_um


def _chain(sdata, *, train_rows=None, **keys):
    """select genes -> ridge fit on <= N_TRAIN spots -> predict -> evaluate -> squidpy; returns (pred, scores)."""
    import squidpy as sq

    table_key = find_table(sdata, keys.get("table_key"))
    genes = sth.pp.select_genes(sdata, n_top=40, table_key=table_key, markers=["ERBB2", "KRT19"])
    assert 40 <= len(genes) <= 200
    names = sdata.tables[table_key].obs_names
    rows = np.arange(len(names)) if train_rows is None else train_rows
    spots = list(names[rows][:: max(1, len(rows) // N_TRAIN)][:N_TRAIN])
    model = sth.tl.ExpressionModel(genes, preset="ridge", img_size=56)
    model.fit(sdata, table_key=table_key, spots=spots)
    sth.tl.predict_expression(sdata, model, table_key=table_key, batch_size=64)
    pred = sdata.tables["predicted_expression"]
    measured = sdata.tables[table_key]
    assert pred.n_obs == measured.n_obs and list(pred.obs_names) == list(measured.obs_names)
    assert np.isfinite(pred.X).all() and pred.X.std(axis=0).max() > 0
    scores = sth.tl.evaluate(sdata, measured_key=table_key, gene_sets={"markers": ["ERBB2", "KRT19"]})
    sq.gr.spatial_neighbors_grid(pred, n_neighs=4, library_key="sample")
    sq.gr.spatial_autocorr(pred, mode="moran", genes=["ERBB2", "KRT19"], n_perms=None, n_jobs=1)
    assert np.isfinite(pred.uns["moranI"]["I"]).all()
    return pred, scores


def test_spatialdata_io_visium_sections_and_resolution(visium_c6, her2st_small):
    sdata, px_um = visium_c6
    assert "sample" not in sdata.tables["table"].obs
    sections, sample_of, centres = table_sections(sdata, "table")
    sec = sections["C6"]
    assert set(sample_of) == {"C6"} and sec.image_key == "C6_full_image" and sec.shapes_key == "C6"
    assert sec.pixel_size_um == pytest.approx(px_um, rel=1e-6)  # from spot_diameter_fullres (65 um)
    assert "spatialdata-io" in sec.resolution_source
    # the downscaled image has its own, coarser, resolution, carried by the Scale transformation
    hires = table_sections(sdata, "table", image_key="C6_hires_image")[0]["C6"]
    assert hires.pixel_size_um == pytest.approx(2 * px_um, rel=1e-6)
    # the same tissue as our reader's patches of the original image
    ours = sth.pp.extract_patches(her2st_small, size_um=112, size_px=SIZE_PX, samples="C6")
    theirs = sth.pp.extract_patches(sdata, size_um=112, size_px=SIZE_PX)
    assert list(theirs.samples) == ["C6"] * len(theirs)
    order = [list(ours.obs_names).index(f"C6_{b}") for b in theirs.obs_names]
    a, b = theirs[:20].astype(float), ours[np.asarray(order[:20])].astype(float)
    shuffled = ours[np.asarray(order[20:40])].astype(float)
    assert np.abs(a - b).mean() < 6 < np.abs(a - shuffled).mean()
    low = sth.pp.extract_patches(sdata, size_um=112, size_px=SIZE_PX, image_key="C6_lowres_image")
    low = low[:20].astype(float)
    assert np.abs(low - b).mean() < np.abs(low - shuffled).mean()  # the same tissue, blurrier


def test_chain_on_spatialdata_io_visium(visium_c6):
    sdata, _ = visium_c6
    pred, scores = _chain(sdata)
    assert set(pred.obs["sample"]) == {"C6"} and set(pred.obs["region"]) == {"C6"}
    assert pred.uns["predict_expression"]["coordinate_systems"] == {"C6": "C6"}
    assert list(scores["summary"].index) == ["C6"]
    # the other pp functions find the image and its resolution too
    mask, _ = sth.pp.detect_tissue(sdata)
    assert 0.2 < mask.mean() < 0.95
    key = sth.pp.spot_grid(sdata, spacing_um=200, tissue_only=False)
    grid = sth.pp.extract_patches(sdata, shapes_key=key, size_px=SIZE_PX)
    assert len(grid) == len(sdata.shapes[key]) and set(grid.samples) == {"C6"}


def _shallow(sdata):
    """The same elements with copies of the tables: predictions written into it leave the session fixture alone."""
    from spatialdata import SpatialData

    tables = {key: table.copy() for key, table in sdata.tables.items()}
    return SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes), tables=tables)


def test_chain_on_our_readers(her2st_small):
    sdata = _shallow(her2st_small)
    rows = np.flatnonzero(sdata.tables["table"].obs["sample"] == "C5")
    pred, _ = _chain(sdata, train_rows=rows)
    assert set(pred.obs["sample"]) == {"C5", "C6"}
    assert pred.uns["predict_expression"]["coordinate_systems"] == {"C5_spots": "C5", "C6_spots": "C6"}


def _our_sections(her2st_small):
    train, test = sth.pp.split_sections(her2st_small, test="C6")
    return train, test


def test_chain_on_concatenated_sections(her2st_small):
    import spatialdata as sd

    c5, c6 = _our_sections(her2st_small)
    joined = sd.concatenate([c5, c6], concatenate_tables=True)
    assert samples(joined, "table") == ["C5", "C6"]
    rows = np.flatnonzero(joined.tables["table"].obs["sample"] == "C5")
    _chain(joined, train_rows=rows)
    train, test = sth.pp.split_sections(joined, test="C6")
    assert set(test.images) == {"C6_image"} and set(train.images) == {"C5_image"}


def test_concatenate_without_concatenate_tables(her2st_small):
    import spatialdata as sd

    c5, c6 = _our_sections(her2st_small)
    joined = sd.concatenate([c5, c6])
    assert len(joined.tables) == 2
    with pytest.raises(KeyError, match="concatenate_tables=True"):
        sth.pp.extract_patches(joined, size_px=SIZE_PX)
    with pytest.raises(KeyError, match="concatenate_tables=True"):
        sth.pp.select_genes(joined)
    genes = list(joined.tables[sorted(joined.tables)[0]].var_names[:20])
    with pytest.raises(KeyError, match="concatenate_tables=True"):
        sth.tl.ExpressionModel(genes, preset="mean").fit(joined)
    assert sth.tl.ExpressionModel(genes, preset="mean").fit(joined, table_key=sorted(joined.tables)[0]).is_fitted
    key = sorted(joined.tables)[1]
    patches = sth.pp.extract_patches(joined, size_px=SIZE_PX, table_key=key)  # one table chosen by name
    assert set(patches.samples) == {"C6"}


def test_split_spatialdata_io_sections(visium_c6):
    sdata, _ = visium_c6
    with pytest.raises(ValueError, match="No section is left for training"):
        sth.pp.split_sections(sdata, test="C6")


def _read_visium(out, sample, **kwargs):
    import spatialdata_io

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spatialdata_io.visium(out, dataset_id=sample, **kwargs)


def test_spatialdata_io_without_the_full_resolution_image(spaceranger_c6):
    out, px_um = spaceranger_c6
    sdata = _read_visium(out, "C6")  # hires and lowres PNGs only, each with its Scale to the system "C6"
    patches = sth.pp.extract_patches(sdata, size_px=SIZE_PX)
    sec = table_sections(sdata, "table")[0]["C6"]
    assert sec.image_key == "C6_hires_image" and sec.pixel_size_um == pytest.approx(2 * px_um, rel=1e-6)
    assert np.all(patches.spatial <= np.array(sdata.images["C6_hires_image"].shape[:0:-1]))


def test_concatenated_spatialdata_io_sections(spaceranger_c5, spaceranger_c6):
    """Two spatialdata-io sections in one SpatialData: sections from the regions, in their own systems or in a
    shared "global" one (then told apart by their names)."""
    import spatialdata as sd
    from spatialdata.transformations import get_transformation, set_transformation

    parts = [
        _read_visium(out, s, fullres_image_file=f"{s}_full.tif")
        for s, (out, _) in (("C5", spaceranger_c5), ("C6", spaceranger_c6))
    ]
    joined = sd.concatenate(parts, concatenate_tables=True)
    assert "sample" not in joined.tables["table"].obs and samples(joined, "table") == ["C5", "C6"]
    sections = table_sections(joined, "table")[0]
    assert {s: sec.image_key for s, sec in sections.items()} == {"C5": "C5_full_image", "C6": "C6_full_image"}
    assert sections["C5"].pixel_size_um == pytest.approx(spaceranger_c5[1], rel=1e-6)
    train, test = sth.pp.split_sections(joined, test="C6")
    assert set(test.images) == {"C6_full_image", "C6_hires_image", "C6_lowres_image"} and set(test.shapes) == {"C6"}
    assert set(train.shapes) == {"C5"} and samples(train, "table") == ["C5"]
    pred, scores = _chain(joined, train_rows=np.flatnonzero(joined.tables["table"].obs["region"] == "C5"))
    assert list(dict.fromkeys(pred.obs["sample"])) == ["C5", "C6"]
    assert set(scores["summary"].index) >= {"C6"}  # scored per section, the sections being the regions
    del joined.tables["predicted_expression"]
    # everything in one "global" system: images and circles are matched by their names
    for name in [*joined.images, *joined.shapes]:
        element = joined[name]
        transforms = get_transformation(element, get_all=True)
        transforms["global"] = transforms.pop(name.split("_")[0])  # older spatialdata-io: "global", not "C6"
        set_transformation(element, transforms, set_all=True)
    sections = table_sections(joined, "table")[0]
    assert {s: sec.image_key for s, sec in sections.items()} == {"C5": "C5_full_image", "C6": "C6_full_image"}
    patches = sth.pp.extract_patches(joined, size_px=SIZE_PX)
    assert list(dict.fromkeys(patches.samples)) == ["C5", "C6"]
    train, test = sth.pp.split_sections(joined, test="C6")
    assert set(test.shapes) == {"C6"} and "C5_full_image" in train.images and "C6_full_image" not in train.images


def test_resolution_order(visium_c6):
    """pixel_size_um= wins; without Space Ranger's scale factors and without a Visium grid (these are legacy ST
    array coordinates) the resolution is refused, naming the argument that gives it."""
    from spatialdata import SpatialData
    from spatialdata.transformations import Identity, set_transformation

    sdata, px_um = visium_c6
    given = sth.pp.extract_patches(sdata, size_px=SIZE_PX, pixel_size_um=0.5)
    assert given._sections["C6"].pixel_size_um == 0.5
    shapes = sdata.shapes["C6"].copy()
    set_transformation(shapes, {"C6": Identity()}, set_all=True)  # not recognisably spatialdata-io's any more
    bare = SpatialData(
        images={"C6_full_image": sdata.images["C6_full_image"]},
        shapes={"C6": shapes},
        tables={"table": sdata.tables["table"]},
    )
    assert not bare.attrs
    with pytest.raises(ValueError, match=r"resolution is unknown.*Pass `pixel_size_um=`"):
        sth.pp.extract_patches(bare, size_px=SIZE_PX)
    with pytest.raises(ValueError, match=r"resolution is unknown"):
        sth.pp.detect_tissue(bare)
    assert (
        sth.pp.extract_patches(bare, size_px=SIZE_PX, pixel_size_um={"C6": px_um})._sections["C6"].pixel_size_um
        == px_um
    )
