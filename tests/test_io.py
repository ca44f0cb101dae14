"""Readers: images and TIFF pyramids, legacy ST, Visium, HEST, attach_histology, concatenate, and their errors."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from scipy import sparse

import st_from_he as sth
from st_from_he._sdata import get_section, pixel_size_um, samples
from st_from_he.io import _image

# ----------------------------------------------------------------------------------------------------------------------
# helpers


def write_pyramid(path, img, *, levels=3, tile=256, pixel_size=None, compression=None, ome=False, **kwargs):
    """A tiled pyramidal TIFF with the coarser levels as sub-IFDs (2x steps) and optional resolution tags."""
    with tifffile.TiffWriter(path, ome=ome) as tw:
        for i in range(levels):
            level = img[:: 2**i, :: 2**i]
            options = {
                "tile": (tile, tile),
                "photometric": "rgb" if img.ndim == 3 else "minisblack",
                "compression": compression,
            }
            if pixel_size is not None:
                options |= {"resolution": (1e4 / (pixel_size * 2**i),) * 2, "resolutionunit": "CENTIMETER"}
            if i == 0:
                tw.write(level, subifds=levels - 1, **options, **kwargs)
            else:
                tw.write(level, subfiletype=1, **options)


def her2st_frames(folder, sample):
    counts = pd.read_csv(folder / sample / f"{sample}_counts.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(folder / sample / f"{sample}_spots.tsv", sep="\t")
    spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    return counts, spots


@pytest.fixture(scope="module")
def synthetic_rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(1500, 2100, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pyramid_tif(tmp_path_factory, synthetic_rgb):
    path = tmp_path_factory.mktemp("tiff") / "slide.tif"
    write_pyramid(path, synthetic_rgb, pixel_size=0.5)
    return path


@pytest.fixture(scope="module")
def c6_small(her2st_dir, tmp_path_factory):
    """C6 with its first 20 selected spots and 5 genes, and a copy of the spot file, for cheap error cases."""
    folder = tmp_path_factory.mktemp("c6_small")
    counts, spots = her2st_frames(her2st_dir, "C6")
    selected = spots[spots["selected"] == 1]
    shared = selected.index.intersection(counts.index)[:20]
    counts.loc[shared].iloc[:, :5].to_csv(folder / "counts.tsv", sep="\t")
    selected.loc[shared].to_csv(folder / "spots.tsv", sep="\t", index=False)
    return folder, her2st_dir / "C6" / "C6_HE.jpg"


# ----------------------------------------------------------------------------------------------------------------------
# images and TIFF pyramids


def test_tiff_pyramid_is_lazy_and_tiled(pyramid_tif, synthetic_rgb, monkeypatch):
    levels, size = _image.read_image_levels(pyramid_tif)
    assert size == pytest.approx(0.5)
    assert [lvl.shape for lvl in levels] == [(3, 1500, 2100), (3, 750, 1050), (3, 375, 525)]
    assert all(lvl.dtype == np.uint8 for lvl in levels)
    assert levels[0].numblocks[1:] == (2, 3)  # 1024 px chunks of whole 256 px tiles
    assert levels[0].chunksize[1:] == (1024, 1024)

    reads = []
    original = _image._TiffLevel.__getitem__

    def counting(self, key):
        reads.append((self.level, key))
        return original(self, key)

    monkeypatch.setattr(_image._TiffLevel, "__getitem__", counting)
    window = levels[0][:, 100:400, 1100:1300].compute()
    np.testing.assert_array_equal(window, np.moveaxis(synthetic_rgb[100:400, 1100:1300], -1, 0))
    assert len(reads) == 1  # one chunk of the 6, not the whole image
    np.testing.assert_array_equal(levels[2][:, :5, :5].compute(), np.moveaxis(synthetic_rgb[::4, ::4][:5, :5], -1, 0))


def test_tiff_level_pickles_without_handle(pyramid_tif):
    import pickle

    levels, _ = _image.read_image_levels(pyramid_tif)
    levels[0][:, :2, :2].compute()  # opens the file
    clone = pickle.loads(pickle.dumps(levels[1]))
    assert clone[:, :3, :3].compute().shape == (3, 3, 3)


def test_pyramid_element_transformations_follow_spatialdata(pyramid_tif, tmp_path):
    import spatialdata as sd
    from spatialdata.transformations import Scale, Sequence, get_transformation

    levels, size = _image.read_image_levels(pyramid_tif)
    element = _image.image_element(levels, size, "S1")
    assert list(element) == ["scale0", "scale1", "scale2"]
    h0, w0 = levels[0].shape[1:]
    for i, level in enumerate(levels):
        arr = element[f"scale{i}"]["image"]
        assert arr.data is level or arr.shape == level.shape  # the file's own level, not recomputed
        t = get_transformation(arr, get_all=True)["S1"]
        if i:
            assert isinstance(t, Sequence) and isinstance(t.transformations[0], Scale)
        matrix = t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        h, w = level.shape[1:]
        assert matrix[0, 0] == pytest.approx(0.5 * w0 / w)
        assert matrix[1, 1] == pytest.approx(0.5 * h0 / h)
        # pixel-centre coordinates in level-0 pixels, as Image2DModel.parse(scale_factors=...) leaves them
        assert arr.coords["x"].values[0] == pytest.approx(w0 / w / 2)

    sdata = sd.SpatialData(images={"S1_image": element})
    assert pixel_size_um(sdata, "S1_image", "S1") == pytest.approx(0.5)  # level 0
    sdata.write(tmp_path / "s.zarr")
    back = sd.read_zarr(tmp_path / "s.zarr")
    assert pixel_size_um(back, "S1_image", "S1") == pytest.approx(0.5)
    np.testing.assert_array_equal(back["S1_image"]["scale2"]["image"].values, element["scale2"]["image"].values)


def test_single_level_gets_overviews():
    levels = _image.array_levels(np.zeros((4500, 2300, 3), dtype=np.uint8))
    element = _image.image_element(levels, 0.5, "S")
    assert [element[k]["image"].shape for k in element][:2] == [(3, 4500, 2300), (3, 2250, 1150)]


def test_ome_tiff_physical_size(tmp_path, synthetic_rgb):
    small = synthetic_rgb[:300, :400]
    path = tmp_path / "slide.ome.tif"
    tifffile.imwrite(
        path,
        small,
        photometric="rgb",
        ome=True,
        metadata={
            "axes": "YXS",
            "PhysicalSizeX": 250.0,
            "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": 250.0,
            "PhysicalSizeYUnit": "nm",
        },
    )
    levels, size = _image.read_image_levels(path)
    assert size == pytest.approx(0.25)
    assert levels[0].shape == (3, 300, 400)
    tifffile.imwrite(path, small, photometric="rgb", ome=True, metadata={"axes": "YXS", "PhysicalSizeX": 0.4})
    assert _image.read_image_levels(path)[1] == pytest.approx(0.4)  # the OME default unit is the micrometre


def test_tiff_resolution_tags_and_aperio_mpp(tmp_path, synthetic_rgb):
    small = synthetic_rgb[:64, :64]
    inch = tmp_path / "inch.tif"
    tifffile.imwrite(inch, small, photometric="rgb", resolution=(25400 / 0.8, 25400 / 0.8), resolutionunit="INCH")
    assert _image.read_image_levels(inch)[1] == pytest.approx(0.8)
    screen = tmp_path / "screen.tif"
    tifffile.imwrite(screen, small, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    assert _image.read_image_levels(screen)[1] is None  # 72 dpi is no scan resolution
    svs = tmp_path / "aperio.svs"
    tifffile.imwrite(
        svs, small, photometric="rgb", description="Aperio Image Library v12\n64x64 |AppMag = 40|MPP = 0.2527"
    )
    assert _image.read_image_levels(svs)[1] == pytest.approx(0.2527)


def test_grey_and_channels_first_tiffs(tmp_path, synthetic_rgb):
    grey = tmp_path / "grey.tif"
    write_pyramid(grey, synthetic_rgb[:600, :500, 0], levels=2, tile=128)
    levels, _ = _image.read_image_levels(grey)
    assert [lvl.shape for lvl in levels] == [(1, 600, 500), (1, 300, 250)]
    element = _image.image_element(levels, 1.0, "G")
    assert element["scale1"]["image"].shape == (3, 300, 250)
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, np.moveaxis(synthetic_rgb[:50, :60], -1, 0), photometric="rgb", planarconfig="separate")
    levels, _ = _image.read_image_levels(planar)
    np.testing.assert_array_equal(levels[0].compute(), np.moveaxis(synthetic_rgb[:50, :60], -1, 0))


def test_read_image(tmp_path, pyramid_tif, synthetic_rgb):
    sdata = sth.io.read_image(pyramid_tif, sample_id="slide")
    assert list(sdata.images) == ["slide_image"] and not sdata.shapes and not sdata.tables
    assert pixel_size_um(sdata, "slide_image", "slide") == pytest.approx(0.5)
    assert get_section(sdata, "slide").shapes_key is None
    assert samples(sdata) == ["slide"]
    png = tmp_path / "he.png"
    Image.fromarray(synthetic_rgb[:200, :300]).save(png)
    sdata = sth.io.read_image(png, sample_id="he", pixel_size_um=2.0)
    assert pixel_size_um(sdata, "he_image", "he") == pytest.approx(2.0)
    assert sdata["he_image"]["scale0"]["image"].shape == (3, 200, 300)
    with pytest.raises(ValueError, match="pixel_size_um"):
        sth.io.read_image(png, sample_id="he")
    with pytest.raises(TypeError, match="sample_id"):
        sth.io.read_image(png, sample_id="", pixel_size_um=1.0)


def test_unreadable_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sth.io.read_image(tmp_path / "absent.jpg", sample_id="x", pixel_size_um=1)
    fake = tmp_path / "fake.jpg"
    fake.write_text("not an image")
    with pytest.raises(ValueError, match="Could not read image"):
        sth.io.read_image(fake, sample_id="x", pixel_size_um=1)
    fake_tif = tmp_path / "fake.tif"
    fake_tif.write_text("not a tiff")
    with pytest.raises(ValueError, match="Could not read TIFF"):
        sth.io.read_image(fake_tif, sample_id="x", pixel_size_um=1)
    gif = tmp_path / "image.gif"
    gif.write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="Unsupported image format"):
        sth.io.read_image(gif, sample_id="x", pixel_size_um=1)


def test_lookup_errors(her2st_small):
    with pytest.raises(KeyError, match="No image 'C1_image'"):
        get_section(her2st_small, "C1")
    with pytest.raises(ValueError, match="no transformation to the micrometre coordinate system 'C5'"):
        pixel_size_um(her2st_small, "C6_image", "C5")
    with pytest.raises(KeyError, match="No shapes element"):
        get_section(her2st_small, "C6", shapes_key="C1_spots")


# ----------------------------------------------------------------------------------------------------------------------
# legacy ST


def test_read_st_aligns_by_array_position(her2st_small, her2st_dir):
    table = her2st_small.tables["table"]
    counts, spots = her2st_frames(her2st_dir, "C6")
    selected = spots[spots["selected"] == 1]
    assert "17x14" in selected.index and "17x14" not in counts.index  # C6's selected spot without counts
    rows = table.obs["sample"] == "C6"
    assert rows.sum() == len(selected.index.intersection(counts.index)) == len(selected) - 1
    assert "C6_17x14" not in table.obs_names

    c6 = table[rows.to_numpy()]
    i = int(np.flatnonzero(c6.obs_names == "C6_18x20")[0])
    genes = list(c6.var_names[:300]) + ["ERBB2"]
    measured = np.asarray(c6[:, genes].X[i].todense()).ravel()
    np.testing.assert_array_equal(measured, counts.loc["18x20", genes].to_numpy())
    np.testing.assert_allclose(c6.obsm["spatial"][i], spots.loc["18x20", ["pixel_x", "pixel_y"]].to_numpy(float))
    # the circle with index spot_id sits at obsm["spatial"]
    circles = her2st_small["C6_spots"]
    spot_id = c6.obs["spot_id"].iloc[i]
    assert spot_id == "18x20"  # the array position: a stable identity across re-reads
    point = circles.geometry.loc[spot_id]
    assert (point.x, point.y) == pytest.approx(tuple(c6.obsm["spatial"][i]))
    assert np.issubdtype(table.X.dtype, np.integer)
    assert table.uns["st_from_he"] == {"raw_counts": True}
    assert table.uns["spatialdata_attrs"]["region"] == ["C5_spots", "C6_spots"]


def test_read_st_counts_without_selected_spot(her2st_dir, tmp_path):
    counts, spots = her2st_frames(her2st_dir, "C6")
    removed = "18x20"
    spots.drop(index=removed).to_csv(tmp_path / "spots.tsv", sep="\t", index=False)
    d = her2st_dir / "C6"
    sdata = sth.io.read_st(d / "C6_counts.tsv.gz", tmp_path / "spots.tsv", d / "C6_HE.jpg", sample_id="C6")
    table = sdata.tables["table"]
    assert f"C6_{removed}" not in table.obs_names
    assert table.n_obs == 177
    i = int(np.flatnonzero(table.obs_names == "C6_10x15")[0])
    np.testing.assert_array_equal(np.asarray(table[:, "ERBB2"].X[i].todense()).ravel(), counts.loc["10x15", ["ERBB2"]])
    np.testing.assert_allclose(table.obsm["spatial"][i], spots.loc["10x15", ["pixel_x", "pixel_y"]].to_numpy(float))


def test_read_st_no_overlap(c6_small, tmp_path):
    folder, image = c6_small
    spots = pd.read_csv(folder / "spots.tsv", sep="\t")
    spots["x"] += 100
    spots.to_csv(tmp_path / "spots.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="no count row matches a selected spot"):
        sth.io.read_st(folder / "counts.tsv", tmp_path / "spots.tsv", image, sample_id="C6")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: -c, "negative"),
        (lambda c: c + 0.5, "non-integer"),
        (lambda c: c.astype(float).mask(np.eye(*c.shape, k=1, dtype=bool)), "NaN"),
    ],
    ids=["negative", "non-integer", "nan"],
)
def test_read_st_rejects_bad_counts(c6_small, tmp_path, change, message):
    folder, image = c6_small
    counts = pd.read_csv(folder / "counts.tsv", sep="\t", index_col=0)
    counts.iloc[0, 0] = 2
    change(counts).to_csv(tmp_path / "counts.tsv", sep="\t")
    with pytest.raises(ValueError, match=message):
        sth.io.read_st(tmp_path / "counts.tsv", folder / "spots.tsv", image, sample_id="C6")


def test_read_st_spots_outside_image(c6_small, tmp_path):
    folder, image = c6_small
    spots = pd.read_csv(folder / "spots.tsv", sep="\t")
    spots["pixel_x"] *= 10
    spots.to_csv(tmp_path / "spots.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="outside the 9288 x 9907 px image"):
        sth.io.read_st(folder / "counts.tsv", tmp_path / "spots.tsv", image, sample_id="C6")


def test_read_st_unknown_resolution(c6_small, tmp_path):
    folder, image = c6_small
    pd.read_csv(folder / "spots.tsv", sep="\t").iloc[:2].to_csv(tmp_path / "spots.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="from 2 spots; pass `pixel_size_um=`"):
        sth.io.read_st(folder / "counts.tsv", tmp_path / "spots.tsv", image, sample_id="C6")
    sdata = sth.io.read_st(folder / "counts.tsv", tmp_path / "spots.tsv", image, sample_id="C6", pixel_size_um=0.7)
    assert sdata.tables["table"].n_obs == 2
    assert pixel_size_um(sdata, "C6_image", "C6") == pytest.approx(0.7)


def test_read_st_missing_or_unreadable_files(c6_small, tmp_path):
    folder, _ = c6_small
    with pytest.raises(FileNotFoundError, match="image file"):
        sth.io.read_st(folder / "counts.tsv", folder / "spots.tsv", tmp_path / "none.jpg", sample_id="C6")
    fake = tmp_path / "fake.jpg"
    fake.write_text("text, not JPEG")
    with pytest.raises(ValueError, match="Could not read image"):
        sth.io.read_st(folder / "counts.tsv", folder / "spots.tsv", fake, sample_id="C6")
    pd.DataFrame({"x": [1], "y": [2]}).to_csv(tmp_path / "bad_spots.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="lacks column"):
        sth.io.read_st(folder / "counts.tsv", tmp_path / "bad_spots.tsv", fake, sample_id="C6")


# ----------------------------------------------------------------------------------------------------------------------
# concatenate


def test_concatenate_rejects_duplicates_and_bad_input(her2st_small):
    with pytest.raises(ValueError, match="'C5' occurs twice"):
        sth.io.concatenate([her2st_small, her2st_small])
    with pytest.raises(ValueError, match="at least one"):
        sth.io.concatenate([])
    with pytest.raises(TypeError, match="SpatialData"):
        sth.io.concatenate([her2st_small, "C6"])
    with pytest.raises(ValueError, match="join"):
        sth.io.concatenate([her2st_small], join="left")


# ----------------------------------------------------------------------------------------------------------------------
# attach_histology


@pytest.fixture(scope="module")
def crop_adata(visium_crop_dir):
    return ad.read_h5ad(visium_crop_dir / "adata.h5ad")


def raw_copy(adata):
    """The crop with integer counts derived from its log-normalised X."""
    out = adata.copy()
    out.X = sparse.csr_matrix(np.rint(np.expm1(adata.X.toarray()) * 3).astype(np.int64))
    return out


def test_attach_histology_crop(crop_adata, visium_crop_dir):
    adata = crop_adata.copy()
    before = adata.copy()
    sdata = sth.io.attach_histology(adata, visium_crop_dir / "image.jpg", sample_id="brain")
    px = pixel_size_um(sdata, "brain_image", "brain")
    assert px == pytest.approx(0.73, abs=0.02)
    assert pixel_size_um(sdata, "brain_spots", "brain") == px
    table = sdata.tables["table"]
    _, height, width = sdata["brain_image"]["scale0"]["image"].shape
    assert (height, width) == (1717, 950)
    xy = table.obsm["spatial"]
    assert (xy >= 0).all() and (xy[:, 0] < width).all() and (xy[:, 1] < height).all()
    np.testing.assert_array_equal(xy, before.obsm["spatial"])
    assert sdata["brain_spots"]["radius"].iloc[0] == pytest.approx(27.5 / px)
    np.testing.assert_array_equal(table.obs["spot_id"].to_numpy(), sdata["brain_spots"].index.to_numpy())
    assert table.obs["sample"].unique().tolist() == ["brain"]
    assert table.obs["region"].unique().tolist() == ["brain_spots"]
    assert "X_pca" in table.obsm and "leiden" in table.obs
    # normalised X is kept as given and flagged
    assert table.uns["st_from_he"] == {"raw_counts": False}
    np.testing.assert_allclose(table.X.toarray(), before.X.toarray())
    with pytest.raises(ValueError, match="does not hold raw counts"):
        from st_from_he._validate import check_table_raw_counts

        check_table_raw_counts(table)
    # the input is untouched, and the result shares no memory with it
    table.X.data[:] = -1
    table.obs["leiden"] = "x"
    table.obsm["X_pca"][:] = 0
    np.testing.assert_array_equal(adata.X.toarray(), before.X.toarray())
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    np.testing.assert_array_equal(adata.obsm["X_pca"], before.obsm["X_pca"])
    assert set(adata.uns) == set(before.uns) and set(adata.obsm) == set(before.obsm)


def test_attach_histology_array_and_raw_counts(crop_adata, visium_crop_dir):
    image = np.asarray(Image.open(visium_crop_dir / "image.jpg").convert("RGB"))
    adata = raw_copy(crop_adata)
    del adata.uns["spatial"]
    with pytest.raises(ValueError, match="sample_id"):
        sth.io.attach_histology(adata, image)
    with pytest.raises(ValueError, match="pixel_size_um"):
        sth.io.attach_histology(adata, image, sample_id="b")  # no uns["spatial"]: the technology is unknown
    sdata = sth.io.attach_histology(adata, image, sample_id="b", technology="visium")
    assert pixel_size_um(sdata, "b_image", "b") == pytest.approx(0.725, abs=0.005)
    table = sdata.tables["table"]
    assert table.uns["st_from_he"] == {"raw_counts": True}
    assert np.issubdtype(table.X.dtype, np.integer)
    # a given resolution also tells the technology (100 um pitch -> Visium, 55 um spots)
    sdata = sth.io.attach_histology(adata, image, sample_id="b", pixel_size_um=0.73)
    assert sdata["b_spots"]["radius"].iloc[0] == pytest.approx(27.5 / 0.73)
    # and so does the spot size
    sdata = sth.io.attach_histology(adata, image, sample_id="b", spot_diameter_um=55)
    assert pixel_size_um(sdata, "b_image", "b") == pytest.approx(0.725, abs=0.005)


def test_attach_histology_scanpy_layout(crop_adata, visium_crop_dir):
    adata = crop_adata.copy()
    library = adata.uns["spatial"]["V1_Adult_Mouse_Brain"]
    scalef = library["scalefactors"]["tissue_hires_scalef"]
    # squidpy's crop keeps a 100 x 100 placeholder of float noise as 'hires': refused, naming the image
    with pytest.raises(ValueError, match="hires image.*negative values"):
        sth.io.attach_histology(adata)
    with Image.open(visium_crop_dir / "image.jpg") as im:
        hires = np.asarray(im.resize((round(im.width * scalef), round(im.height * scalef))), dtype=np.float32) / 255
    library["images"]["hires"] = hires  # scanpy stores float thumbnails in [0, 1]
    sdata = sth.io.attach_histology(adata)
    sample = "V1_Adult_Mouse_Brain"
    assert samples(sdata) == [sample]
    assert sdata[f"{sample}_image"]["scale0"]["image"].shape == (3, *hires.shape[:2])
    assert sdata[f"{sample}_image"]["scale0"]["image"].dtype == np.uint8
    np.testing.assert_allclose(sdata.tables["table"].obsm["spatial"], adata.obsm["spatial"] * scalef)
    assert pixel_size_um(sdata, f"{sample}_image", sample) == pytest.approx(0.725 / scalef, rel=0.01)
    # a given pixel size is that of the full-resolution frame of obsm["spatial"]
    sdata = sth.io.attach_histology(adata, pixel_size_um=0.7)
    assert pixel_size_um(sdata, f"{sample}_image", sample) == pytest.approx(0.7 / scalef)
    sdata = sth.io.attach_histology(adata, "lowres", sample_id="low")
    assert sdata["low_image"]["scale0"]["image"].shape[1:] == (88, 49)


def test_attach_histology_errors(crop_adata, visium_crop_dir, tmp_path):
    image = visium_crop_dir / "image.jpg"
    with pytest.raises(TypeError, match="AnnData"):
        sth.io.attach_histology(crop_adata.to_df(), image)
    no_xy = crop_adata.copy()
    del no_xy.obsm["spatial"]
    with pytest.raises(KeyError, match="obsm\\['spatial'\\] is missing"):
        sth.io.attach_histology(no_xy, image)
    two = crop_adata[:2].copy()
    del two.uns["spatial"]
    with pytest.raises(ValueError, match="pixel_size_um"):
        sth.io.attach_histology(two, image, sample_id="two")
    with pytest.raises(ValueError, match="pixel_size_um"):
        sth.io.attach_histology(two, image, sample_id="two", technology="visium")
    with pytest.raises(ValueError, match="spot diameter is unknown"):
        sth.io.attach_histology(two, image, sample_id="two", pixel_size_um=0.7)
    with pytest.raises(ValueError, match="No image"):
        sth.io.attach_histology(two, sample_id="two")
    with pytest.raises(TypeError, match="`image` must be"):
        sth.io.attach_histology(crop_adata, 3)
    with pytest.raises(ValueError, match="Unknown technology"):
        sth.io.attach_histology(crop_adata, image, technology="xenium")
    shifted = crop_adata.copy()
    shifted.obsm["spatial"] = shifted.obsm["spatial"] + 900
    with pytest.raises(ValueError, match="outside"):
        sth.io.attach_histology(shifted, image)
    nan = crop_adata.copy()
    nan.obsm["spatial"] = nan.obsm["spatial"].astype(float)
    nan.obsm["spatial"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sth.io.attach_histology(nan, image, pixel_size_um=0.7)
    fake = tmp_path / "image.jpg"
    fake.write_text("no JPEG here")
    with pytest.raises(ValueError, match="Could not read image"):
        sth.io.attach_histology(crop_adata, fake, pixel_size_um=0.7)


def test_concatenate_keeps_the_raw_counts_flag(crop_adata, visium_crop_dir):
    image = visium_crop_dir / "image.jpg"
    raw = sth.io.attach_histology(raw_copy(crop_adata), image, sample_id="raw")
    normalised = sth.io.attach_histology(crop_adata, image, sample_id="log")
    both = sth.io.concatenate([raw, normalised])
    assert samples(both) == ["raw", "log"]
    assert both.tables["table"].obs_names[0] == f"raw_{crop_adata.obs_names[0]}"  # colliding names get the sample
    assert raw.tables["table"].obs_names[0] == crop_adata.obs_names[0]  # inputs unchanged
    assert both.tables["table"].uns["st_from_he"] == {"raw_counts": False}
    assert sth.io.concatenate([raw]).tables["table"].uns["st_from_he"] == {"raw_counts": True}
    with pytest.raises(ValueError, match="'raw' occurs twice"):
        sth.io.concatenate([raw, raw])


# ----------------------------------------------------------------------------------------------------------------------
# Visium (a minimal Space Ranger outs/ folder written from the real crop)


def write_spaceranger(crop_dir, out, *, prefix="", counts=None):
    """``outs/`` of the crop: 10x HDF5 counts, tissue_positions.csv, scalefactors, hires/lowres PNGs."""
    adata = ad.read_h5ad(crop_dir / "adata.h5ad")
    (out / "spatial").mkdir(parents=True, exist_ok=True)
    if counts is None:
        counts = np.rint(np.expm1(adata.X.toarray()) * 3).astype(np.int32)
    by_gene = sparse.csc_matrix(counts.T)  # 10x stores genes x barcodes in CSC
    with h5py.File(out / f"{prefix}filtered_feature_bc_matrix.h5", "w") as f:
        f.attrs["library_ids"] = np.array([b"V1_Adult_Mouse_Brain"])
        m = f.create_group("matrix")
        m["barcodes"] = np.array(adata.obs_names, dtype="S")
        m["data"] = by_gene.data
        m["indices"] = by_gene.indices.astype(np.int64)
        m["indptr"] = by_gene.indptr.astype(np.int64)
        m["shape"] = np.array(by_gene.shape, dtype=np.int32)
        features = m.create_group("features")
        features["id"] = np.array(adata.var["gene_ids"], dtype="S")
        features["name"] = np.array(adata.var_names, dtype="S")
        features["feature_type"] = np.array([b"Gene Expression"] * adata.n_vars)
        features["genome"] = np.array([b"mm10"] * adata.n_vars)
        features["_all_tag_keys"] = np.array([b"genome"])
    scalefactors = dict(adata.uns["spatial"]["V1_Adult_Mouse_Brain"]["scalefactors"])
    (out / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    xy = adata.obsm["spatial"]
    positions = pd.DataFrame(
        {
            "barcode": [*adata.obs_names, "ACGTACGTACGTACGT-1"],  # Space Ranger lists spots off the tissue too
            "in_tissue": [1] * adata.n_obs + [0],
            "array_row": [*np.rint(xy[:, 1] / 118.7).astype(int), 0],
            "array_col": [*np.rint(xy[:, 0] / 68.5).astype(int), 0],
            "pxl_row_in_fullres": [*xy[:, 1], 10],
            "pxl_col_in_fullres": [*xy[:, 0], 10],
        }
    )
    positions.to_csv(out / "spatial" / "tissue_positions.csv", index=False)
    with Image.open(crop_dir / "image.jpg") as im:
        for name in ("hires", "lowres"):
            s = scalefactors[f"tissue_{name}_scalef"]
            im.resize((round(im.width * s), round(im.height * s))).save(out / "spatial" / f"tissue_{name}_image.png")
    return adata, counts, scalefactors


@pytest.fixture(scope="module")
def spaceranger(visium_crop_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("visium") / "outs"
    adata, counts, scalefactors = write_spaceranger(visium_crop_dir, out)
    return out, adata, counts, scalefactors


def test_read_visium_hires(spaceranger):
    out, adata, counts, scalefactors = spaceranger
    sdata = sth.io.read_visium(out.parent, sample_id="V1")  # the parent of outs/ works too
    assert set(sdata.images) == {"V1_image"} and set(sdata.shapes) == {"V1_spots"}
    table = sdata.tables["table"]
    assert table.n_obs == 49 and "V1_ACGTACGTACGTACGT-1" not in table.obs_names
    assert np.issubdtype(table.X.dtype, np.integer) and table.uns["st_from_he"] == {"raw_counts": True}
    order = pd.Index(adata.obs_names).get_indexer(table.obs["barcode"])
    np.testing.assert_array_equal(table.X.toarray(), counts[order])
    assert list(table.var["gene_ids"]) == list(adata.var["gene_ids"])
    scalef = scalefactors["tissue_hires_scalef"]
    np.testing.assert_allclose(table.obsm["spatial"], adata.obsm["spatial"][order] * scalef)
    assert sdata["V1_image"]["scale0"]["image"].shape == (3, 292, 162)
    assert pixel_size_um(sdata, "V1_image", "V1") == pytest.approx(0.725 / scalef, rel=0.01)
    np.testing.assert_array_equal(table.obs["spot_id"], sdata["V1_spots"].index)
    assert table.obs["region"].unique().tolist() == ["V1_spots"]
    assert {"in_tissue", "array_row", "array_col", "sample"} <= set(table.obs)


def test_read_visium_fullres(spaceranger, visium_crop_dir):
    out, adata, _, _ = spaceranger
    sdata = sth.io.read_visium(out, fullres_image=visium_crop_dir / "image.jpg", sample_id="V1")
    table = sdata.tables["table"]
    assert sdata["V1_image"]["scale0"]["image"].shape == (3, 1717, 950)
    px = pixel_size_um(sdata, "V1_image", "V1")
    assert px == pytest.approx(0.73, abs=0.02)  # from the 100 um grid, not from spot_diameter_fullres
    assert sdata["V1_spots"]["radius"].iloc[0] == pytest.approx(27.5 / px)
    order = pd.Index(adata.obs_names).get_indexer(table.obs["barcode"])
    np.testing.assert_allclose(table.obsm["spatial"], adata.obsm["spatial"][order])
    sdata = sth.io.read_visium(out, fullres_image=visium_crop_dir / "image.jpg", sample_id="V1", pixel_size_um=0.7)
    assert pixel_size_um(sdata, "V1_image", "V1") == pytest.approx(0.7)


def test_read_visium_library_id(visium_crop_dir, tmp_path):
    write_spaceranger(visium_crop_dir, tmp_path / "a", prefix="lib7_")
    assert samples(sth.io.read_visium(tmp_path / "a")) == ["lib7"]
    write_spaceranger(visium_crop_dir, tmp_path / "b")
    assert samples(sth.io.read_visium(tmp_path / "b")) == ["V1_Adult_Mouse_Brain"]  # from the HDF5 attributes


def test_read_visium_errors(spaceranger, visium_crop_dir, tmp_path):
    out, adata, counts, _ = spaceranger
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sth.io.read_visium(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="filtered_feature_bc_matrix.h5"):
        sth.io.read_visium(tmp_path)
    with pytest.raises(FileNotFoundError, match="full-resolution image"):
        sth.io.read_visium(out, fullres_image="slide.tif", sample_id="V1")

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    positions = pd.read_csv(broken / "spatial" / "tissue_positions.csv")
    positions.iloc[2:].to_csv(broken / "spatial" / "tissue_positions.csv", index=False)
    with pytest.raises(ValueError, match="2 of 49 barcodes of the counts have no position"):
        sth.io.read_visium(broken, sample_id="V1")
    (broken / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(FileNotFoundError, match="scalefactors_json.json"):
        sth.io.read_visium(broken, sample_id="V1")

    normalised = tmp_path / "normalised"
    write_spaceranger(visium_crop_dir, normalised, counts=adata.X.toarray())
    with pytest.raises(ValueError, match="non-integer"):
        sth.io.read_visium(normalised, sample_id="V1")


# ----------------------------------------------------------------------------------------------------------------------
# HEST-1k layout (built from her2st C6)


@pytest.fixture(scope="module")
def hest_dir(her2st_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hest")
    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir()
    counts, spots = her2st_frames(her2st_dir, "C6")
    selected = spots[spots["selected"] == 1]
    shared = selected.index.intersection(counts.index)
    adata = ad.AnnData(
        X=sparse.csr_matrix(counts.loc[shared].to_numpy(np.float32)),  # HEST stores counts as floats
        obs=pd.DataFrame(
            {
                "in_tissue": 1,
                "array_col": selected.loc[shared, "x"].to_numpy(),
                "array_row": selected.loc[shared, "y"].to_numpy(),
                "pxl_col_in_fullres": selected.loc[shared, "pixel_x"].to_numpy(),
                "pxl_row_in_fullres": selected.loc[shared, "pixel_y"].to_numpy(),
            },
            index=shared,
        ),
        var=pd.DataFrame(index=counts.columns),
    )
    adata.write_h5ad(root / "st" / "C6.h5ad")
    with Image.open(her2st_dir / "C6" / "C6_HE.jpg") as im:
        rgb = np.asarray(im.convert("RGB"))
    write_pyramid(root / "wsis" / "C6.tif", rgb, levels=3, tile=256, pixel_size=0.7, compression="jpeg")
    metadata = {
        "id": "C6",
        "st_technology": "Spatial Transcriptomics",
        "pixel_size_um_embedded": 0.69,
        "pixel_size_um_estimated": 0.6875,
        "spot_diameter": 100.0,
        "inter_spot_dist": 200.0,
    }
    (root / "metadata" / "C6.json").write_text(json.dumps(metadata))
    return root, adata, rgb.shape


def variant(hest, tmp_path, sample, metadata: dict | None):
    """Another HEST folder holding the same C6 files as ``sample``, with other metadata (or none)."""
    root, _, _ = hest
    for sub in ("st", "wsis", "metadata"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
    (tmp_path / "st" / f"{sample}.h5ad").symlink_to(root / "st" / "C6.h5ad")
    (tmp_path / "wsis" / f"{sample}.tif").symlink_to(root / "wsis" / "C6.tif")
    if metadata is not None:
        (tmp_path / "metadata" / f"{sample}.json").write_text(json.dumps(metadata))
    return tmp_path


def test_read_hest(hest_dir, monkeypatch):
    root, adata, shape = hest_dir
    sdata = sth.io.read_hest(root, "C6")
    assert samples(sdata) == ["C6"]
    assert pixel_size_um(sdata, "C6_image", "C6") == pytest.approx(0.69)  # embedded, preferred
    image = sdata["C6_image"]
    assert list(image) == ["scale0", "scale1", "scale2"]  # the file's own pyramid
    level0 = image["scale0"]["image"].data
    assert level0.shape == (3, *shape[:2])
    assert np.prod(level0.numblocks) >= 90  # read in tiles, not as one block
    reads = []
    original = _image._TiffLevel.__getitem__
    monkeypatch.setattr(_image._TiffLevel, "__getitem__", lambda self, key: reads.append(key) or original(self, key))
    assert level0[:, 2100:2300, 4100:4300].compute().shape == (3, 200, 200)
    assert len(reads) == 1
    table = sdata.tables["table"]
    assert table.n_obs == adata.n_obs and np.issubdtype(table.X.dtype, np.integer)
    np.testing.assert_allclose(table.obsm["spatial"], adata.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]])
    np.testing.assert_array_equal(table.X.toarray(), adata.X.toarray())
    assert table.obs["barcode"].tolist() == adata.obs_names.tolist()
    assert sdata["C6_spots"]["radius"].iloc[0] == pytest.approx(50 / 0.69)


def test_read_hest_resolution_sources(hest_dir, tmp_path):
    estimated = variant(
        hest_dir,
        tmp_path / "a",
        "E",
        {"pixel_size_um_embedded": None, "pixel_size_um_estimated": 0.68, "st_technology": "Visium"},
    )
    sdata = sth.io.read_hest(estimated, ["E"])
    assert pixel_size_um(sdata, "E_image", "E") == pytest.approx(0.68)
    assert sdata["E_spots"]["radius"].iloc[0] == pytest.approx(27.5 / 0.68)  # no spot_diameter: Visium's 55 um
    tags = variant(hest_dir, tmp_path / "b", "T", {"st_technology": "Spatial Transcriptomics"})
    sdata = sth.io.read_hest(tags, "T")
    assert pixel_size_um(sdata, "T_image", "T") == pytest.approx(0.7)  # the TIFF's resolution tags
    assert sdata["T_spots"]["radius"].iloc[0] == pytest.approx(50 / 0.7)
    given = sth.io.read_hest(tags, "T", pixel_size_um={"T": 0.5}, spot_diameter_um=80)
    assert pixel_size_um(given, "T_image", "T") == pytest.approx(0.5)
    assert given["T_spots"]["radius"].iloc[0] == pytest.approx(40 / 0.5)


def test_read_hest_several_ids(hest_dir, tmp_path):
    root, adata, _ = hest_dir
    folder = variant(hest_dir, tmp_path, "A", {"pixel_size_um_estimated": 0.69, "spot_diameter": 100})
    variant(hest_dir, tmp_path, "B", {"pixel_size_um_estimated": 0.70, "spot_diameter": 100})
    sdata = sth.io.read_hest(folder, ["A", "B"])
    assert samples(sdata) == ["A", "B"]
    assert sdata.tables["table"].n_obs == 2 * adata.n_obs
    assert set(sdata.images) == {"A_image", "B_image"}
    assert pixel_size_um(sdata, "B_image", "B") == pytest.approx(0.70)
    assert sdata.tables["table"].uns["spatialdata_attrs"]["region"] == ["A_spots", "B_spots"]


def test_read_hest_errors(hest_dir, tmp_path):
    root, adata, _ = hest_dir
    with pytest.raises(FileNotFoundError, match="samples present: \\['C6'\\]"):
        sth.io.read_hest(root, ["C7"])
    with pytest.raises(ValueError, match="repeat"):
        sth.io.read_hest(root, ["C6", "C6"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sth.io.read_hest(tmp_path / "none", "C6")
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "C6.h5ad").symlink_to(root / "st" / "C6.h5ad")
    with pytest.raises(FileNotFoundError, match="No image"):
        sth.io.read_hest(tmp_path, "C6")
    unknown = variant(hest_dir, tmp_path / "u", "U", {"st_technology": "Xenium"})
    (unknown / "wsis" / "U.tif").unlink()
    tifffile.imwrite(unknown / "wsis" / "U.tif", np.zeros((64, 64, 3), np.uint8), photometric="rgb")  # no resolution
    with pytest.raises(ValueError, match="Pass `pixel_size_um=`"):
        sth.io.read_hest(unknown, "U")
    with pytest.raises(ValueError, match="spot diameter is unknown"):
        sth.io.read_hest(unknown, "U", pixel_size_um=0.7)
    normalised = tmp_path / "n"
    for sub in ("st", "wsis"):
        (normalised / sub).mkdir(parents=True)
    log = adata.copy()
    log.X = np.log1p(log.X.toarray())
    log.write_h5ad(normalised / "st" / "N.h5ad")
    (normalised / "wsis" / "N.tif").symlink_to(root / "wsis" / "C6.tif")
    with pytest.raises(ValueError, match="non-integer"):
        sth.io.read_hest(normalised, "N", spot_diameter_um=100)
