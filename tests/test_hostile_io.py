"""Hostile input to the readers: no silent wrong result and no lost data (real C6 data, small crops)."""

from __future__ import annotations

import gzip
import shutil
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import st_from_he as sth
from st_from_he._logging import logger
from st_from_he._sdata import pixel_size_um
from st_from_he.datasets import _her2st
from st_from_he.io._resolution import (
    array_step_px,
    grid_pitch_px,
    infer_pixel_size,
    pixel_size_from_array,
    st_array_layout,
    st_layout_from_pixels,
)

N_GENES = 40


@pytest.fixture(scope="module")
def crop(her2st_dir, tmp_path_factory):
    """60 spots of C6 (array x 10-14), 40 genes, and the image cropped around them, written as a legacy ST section."""
    folder = tmp_path_factory.mktemp("c6_crop")
    counts = pd.read_csv(her2st_dir / "C6" / "C6_counts.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(her2st_dir / "C6" / "C6_spots.tsv", sep="\t")
    spots = spots[spots["x"].between(10, 14)]
    spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    spots = spots.loc[spots.index.intersection(counts.index)]
    x0, y0 = (spots[["pixel_x", "pixel_y"]].min() - 200).astype(int)
    x1, y1 = (spots[["pixel_x", "pixel_y"]].max() + 200).astype(int)
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(her2st_dir / "C6" / "C6_HE.jpg") as im:
        im.crop((x0, y0, x1, y1)).save(folder / "he.jpg", quality=90)
    spots[["pixel_x", "pixel_y"]] -= (x0, y0)
    spots.to_csv(folder / "spots.tsv", sep="\t", index=False)
    counts.loc[spots.index].iloc[:, :N_GENES].to_csv(folder / "counts.tsv", sep="\t")
    return folder


def _read(folder, counts="counts.tsv", spots="spots.tsv", **kwargs):
    kwargs.setdefault("sample_id", "C6")
    return sth.io.read_st(folder / counts, folder / spots, folder / "he.jpg", **kwargs)


def _copy(crop, tmp_path, counts: pd.DataFrame | None = None, spots: pd.DataFrame | None = None):
    """A copy of the crop in ``tmp_path`` with modified counts and/or spots tables."""
    shutil.copy(crop / "he.jpg", tmp_path / "he.jpg")
    (counts if counts is not None else _counts(crop)).to_csv(tmp_path / "counts.tsv", sep="\t")
    (spots if spots is not None else _spots(crop)).to_csv(tmp_path / "spots.tsv", sep="\t", index=False)
    return tmp_path


def _counts(crop) -> pd.DataFrame:
    return pd.read_csv(crop / "counts.tsv", sep="\t", index_col=0)


def _spots(crop) -> pd.DataFrame:
    return pd.read_csv(crop / "spots.tsv", sep="\t")


@pytest.fixture(scope="module")
def full(crop):
    return _read(crop)


# ---- 1. spot identity survives re-reading --------------------------------------------------------------------------


def test_spot_identity_survives_rereading_with_spots_dropped(crop, full, tmp_path):
    spots = _spots(crop)
    dropped = spots.sample(10, random_state=0)
    folder = _copy(crop, tmp_path, spots=spots.drop(dropped.index))
    fewer = _read(folder)
    t_full, t_fewer = full.tables["table"], fewer.tables["table"]
    assert t_fewer.n_obs == t_full.n_obs - 10
    # the instance id is the array position, as in the counts file, in the table and the circles' index alike
    assert t_full.obs["spot_id"].tolist() == [
        f"{x}x{y}" for x, y in zip(t_full.obs["array_col"], t_full.obs["array_row"], strict=True)
    ]
    assert full["C6_spots"].index.tolist() == t_full.obs["spot_id"].tolist()
    assert fewer["C6_spots"].index.tolist() == t_fewer.obs["spot_id"].tolist()
    # the remaining spots keep their ids, names and measurements
    kept = t_full.obs["spot_id"].isin(t_fewer.obs["spot_id"]).to_numpy()
    assert t_full.obs["spot_id"][kept].tolist() == t_fewer.obs["spot_id"].tolist()
    assert t_full.obs_names[kept].tolist() == t_fewer.obs_names.tolist()
    np.testing.assert_array_equal(t_full.X[kept].toarray(), t_fewer.X.toarray())
    gone = {f"{x}x{y}" for x, y in zip(dropped["x"], dropped["y"], strict=True)}
    assert gone.isdisjoint(t_fewer.obs["spot_id"])
    # the circle named by a spot's id sits at its centre
    sid = t_fewer.obs["spot_id"].iloc[5]
    point = fewer["C6_spots"].geometry.loc[sid]
    assert (point.x, point.y) == pytest.approx(tuple(t_fewer.obsm["spatial"][5]))


def test_spot_identity_survives_zarr_and_concatenation(crop, full, tmp_path):
    other = _read(crop, sample_id="C6b")
    both = sth.io.concatenate([full, other])
    both.write(tmp_path / "both.zarr")
    import spatialdata as sd

    back = sd.read_zarr(tmp_path / "both.zarr")
    table = back.tables["table"]
    assert table.obs["spot_id"].tolist() == both.tables["table"].obs["spot_id"].tolist()
    assert back["C6b_spots"].index.tolist() == table.obs["spot_id"][table.obs["sample"] == "C6b"].tolist()


def test_patient_recorded(crop, full, her2st_dir):
    assert set(full.tables["table"].obs["patient"]) == {"C6"}  # default: the sample id
    assert set(_read(crop, patient_id="C").tables["table"].obs["patient"]) == {"C"}
    with pytest.raises(TypeError, match="`patient_id` must be a non-empty string"):
        _read(crop, patient_id=3)


# ---- 2. counts: validated before any cast ---------------------------------------------------------------------------


def test_counts_beyond_int32_are_kept_exactly(crop, tmp_path):
    counts = _counts(crop)
    big = 3_000_000_000  # > int32 max: a cast to int32 would wrap it to a negative number
    counts.iloc[2, 3] = big
    table = _read(_copy(crop, tmp_path, counts=counts)).tables["table"]
    assert table.X.dtype == np.int64
    assert table.X[2, 3] == big and table.X.min() >= 0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.nan, "NaN or infinite values"),
        (-3, "negative values"),
        (2.5, "non-integer values"),
    ],
)
def test_bad_counts_name_file_gene_and_spot(crop, tmp_path, value, message):
    counts = _counts(crop).astype(float)
    counts.iloc[4, 7] = value
    folder = _copy(crop, tmp_path, counts=counts)
    gene, spot = counts.columns[7], counts.index[4]
    with pytest.raises(ValueError, match=message) as err:
        _read(folder)
    assert "counts.tsv" in str(err.value) and f"gene {gene!r}" in str(err.value) and f"spot {spot!r}" in str(err.value)


def test_repeated_gene_names_kept_apart_not_renamed_silently(crop, tmp_path, caplog):
    counts = _counts(crop)
    gene = counts.columns[0]
    counts.columns = [gene, gene, *counts.columns[2:]]
    logger.addHandler(caplog.handler)  # the package logger does not propagate
    try:
        table = _read(_copy(crop, tmp_path, counts=counts)).tables["table"]
    finally:
        logger.removeHandler(caplog.handler)
    assert list(table.var_names[:2]) == [gene, f"{gene}-1"]  # not pandas' silent 'GENE.1'
    assert f"names gene(s) ['{gene}'] more than once" in caplog.text
    np.testing.assert_array_equal(table.X[:, 1].toarray().ravel(), counts.iloc[:, 1].to_numpy())


def test_text_in_counts(crop, tmp_path):
    counts = _counts(crop).astype(object)
    counts.iloc[1, 2] = "ten"
    with pytest.raises(ValueError, match=rf"holds text in gene column\(s\) \['{counts.columns[2]}'\]"):
        _read(_copy(crop, tmp_path, counts=counts))


# ---- 3. obscure file errors become clear ones -----------------------------------------------------------------------


def test_empty_and_truncated_files(crop, tmp_path):
    folder = _copy(crop, tmp_path)
    (folder / "empty.tsv").write_text("")
    with pytest.raises(ValueError, match=r"counts file '.*empty.tsv' is empty"):
        _read(folder, counts="empty.tsv")
    with pytest.raises(ValueError, match=r"spots file '.*empty.tsv' is empty"):
        _read(folder, spots="empty.tsv")
    (folder / "header.tsv").write_text("x\ty\tpixel_x\tpixel_y\n")
    with pytest.raises(ValueError, match="has a header but no rows"):
        _read(folder, spots="header.tsv")
    data = gzip.compress((folder / "counts.tsv").read_bytes())
    (folder / "cut.tsv.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"counts file '.*cut.tsv.gz' is truncated or not valid gzip"):
        _read(folder, counts="cut.tsv.gz")


def test_spot_file_problems(crop, tmp_path):
    spots = _spots(crop)
    folder = _copy(crop, tmp_path)
    spots.drop(columns=["pixel_y"]).to_csv(folder / "no_col.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['pixel_y'\]"):
        _read(folder, spots="no_col.tsv")
    pd.concat([spots, spots.iloc[[3]]]).to_csv(folder / "dup.tsv", sep="\t", index=False)
    position = f"{spots['x'].iloc[3]}x{spots['y'].iloc[3]}"
    with pytest.raises(ValueError, match=rf"lists array position\(s\) \['{position}'\] twice"):
        _read(folder, spots="dup.tsv")
    shifted = spots.assign(x=spots["x"] + 0.5)
    shifted.to_csv(folder / "frac.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="must be whole numbers"):
        _read(folder, spots="frac.tsv")
    missing = spots.astype({"pixel_x": object})
    missing.loc[missing.index[2], "pixel_x"] = ""
    missing.to_csv(folder / "nan.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="column 'pixel_x' has missing or non-numeric values"):
        _read(folder, spots="nan.tsv")


def test_counts_index_problems(crop, tmp_path):
    counts = _counts(crop)
    folder = _copy(crop, tmp_path)
    counts.reset_index(drop=True).to_csv(folder / "numbered.tsv", sep="\t")
    with pytest.raises(ValueError, match=r"not an array position '\{x\}x\{y\}'"):
        _read(folder, counts="numbered.tsv")
    counts.T.to_csv(folder / "transposed.tsv", sep="\t")
    with pytest.raises(ValueError, match="looks transposed"):
        _read(folder, counts="transposed.tsv")
    pd.concat([counts, counts.iloc[[0]]]).to_csv(folder / "dup.tsv", sep="\t")
    with pytest.raises(ValueError, match=rf"lists position\(s\) \['{counts.index[0]}'\] more than once"):
        _read(folder, counts="dup.tsv")
    moved = counts.copy()
    moved.index = [f"{int(i.split('x')[0]) + 50}x{i.split('x')[1]}" for i in counts.index]
    moved.to_csv(folder / "other.tsv", sep="\t")
    with pytest.raises(ValueError, match=r"no count row matches a selected spot.*same section"):
        _read(folder, counts="other.tsv")


# ---- 4. resolution: cross-checked against the array grid ------------------------------------------------------------


def test_given_resolution_cross_checked(crop, full):
    true = pixel_size_um(full, "C6_image", "C6")
    assert true == pytest.approx(0.69, rel=0.03)  # inferred from the array grid
    with pytest.warns(UserWarning, match=r"is 4\.0\dx the 0\.6\d+ um that the spot positions imply"):
        _read(crop, pixel_size_um=0.69 * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sdata = _read(crop, pixel_size_um=0.69)
    assert pixel_size_um(sdata, "C6_image", "C6") == 0.69


def test_scaled_spot_coordinates_caught_when_resolution_given(crop, tmp_path):
    spots = _spots(crop)
    spots[["pixel_x", "pixel_y"]] *= 0.5  # still inside the image, but not its pixels
    folder = _copy(crop, tmp_path, spots=spots)
    with pytest.warns(UserWarning, match=r"is 0\.5\dx the"):
        _read(folder, pixel_size_um=0.69)


def test_array_layouts_1k_and_2k(full):
    table = full.tables["table"]
    col, row, spatial = table.obs["array_col"], table.obs["array_row"], table.obsm["spatial"]
    assert st_array_layout(col, row) == "st_1k"
    assert pixel_size_from_array(col, row, spatial, "st_1k") == pytest.approx(0.69, rel=0.03)
    # the same tissue on a 2k array: spots on a checkerboard of 100 um steps, neighbours 141 um apart diagonally
    two_k = (col.to_numpy() % 2 == row.to_numpy() % 2) & np.ones(len(col), bool)
    c2, r2, s2 = col.to_numpy()[two_k], row.to_numpy()[two_k], spatial[two_k]
    assert st_array_layout(c2, r2) == "st_2k"
    # same pixels per array step as the full grid; read as a 2k array (100 um per step) that is half the pixel size
    assert np.asarray(array_step_px(c2, r2, s2)) == pytest.approx(
        np.asarray(array_step_px(col, row, spatial)), rel=0.03
    )
    one_k = pixel_size_from_array(col, row, spatial, "st_1k")
    assert pixel_size_from_array(c2, r2, s2, "st_2k") == pytest.approx(one_k / 2, rel=0.03)
    # the nearest-neighbour distance alone would say 141 um on the 2k array, 41 % off the 1k pitch of 200 um;
    # without array coordinates the 2k array is told by its diagonal neighbours
    assert grid_pitch_px(s2) / grid_pitch_px(spatial) == pytest.approx(np.sqrt(2), rel=0.05)
    assert st_layout_from_pixels(spatial) == "st_1k" and st_layout_from_pixels(s2) == "st_2k"
    assert infer_pixel_size(s2, "st") == pytest.approx(infer_pixel_size(spatial, "st") / 2, rel=0.05)


# ---- 5. wrong argument types ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"pixel_size_um": "0.69"}, TypeError, "`pixel_size_um` must be a positive number, got str '0.69'"),
        ({"pixel_size_um": -1.0}, ValueError, "`pixel_size_um` must be a positive, finite number"),
        ({"pixel_size_um": True}, TypeError, "`pixel_size_um` must be a positive number"),
        ({"sample_id": 6}, TypeError, "`sample_id` must be a non-empty string, got int 6"),
        ({"sample_id": None}, TypeError, "`sample_id` must be a non-empty string"),
    ],
)
def test_read_st_argument_types(crop, kwargs, error, message):
    with pytest.raises(error, match=message):
        _read(crop, **kwargs)


def _adata(full) -> ad.AnnData:
    table = full.tables["table"]
    adata = ad.AnnData(table.X.copy(), obs=table.obs[["array_col", "array_row"]].copy(), var=table.var.copy())
    adata.obsm["spatial"] = table.obsm["spatial"].copy()
    return adata


def test_attach_histology_argument_types(crop, full):
    adata = _adata(full)
    image = str(crop / "he.jpg")
    with pytest.raises(TypeError, match="`spot_diameter_um` must be a positive number, got str 'x'"):
        sth.io.attach_histology(adata, image, sample_id="C6", pixel_size_um=0.69, spot_diameter_um="x")
    with pytest.raises(TypeError, match="`pixel_size_um` must be a positive number, got str"):
        sth.pp.attach_histology(adata, image, sample_id="C6", pixel_size_um="0.69", technology="st")
    with pytest.raises(TypeError, match="`sample_id` must be a non-empty string, got int"):
        sth.io.attach_histology(adata, image, sample_id=6, technology="st")
    with pytest.raises(TypeError, match="`adata` must be an AnnData, got SpatialData"):
        sth.io.attach_histology(full, image, sample_id="C6", technology="st")


def test_anndata_and_spatialdata_mixed_up(crop, full):
    with pytest.raises(TypeError, match="got AnnData .*sth.pp.attach_histology"):
        sth.io.concatenate([full, _adata(full)])
    with pytest.raises(TypeError, match="`hest_dir` must be a folder path, got AnnData"):
        sth.io.read_hest(_adata(full), "S1")
    with pytest.raises(TypeError, match="`counts` must be a file path, got AnnData"):
        sth.io.read_st(_adata(full), crop / "spots.tsv", crop / "he.jpg", sample_id="C6")


def test_attach_histology_duplicate_names_refused(crop, full):
    adata = _adata(full)
    adata.obs_names = [adata.obs_names[0]] * 2 + list(adata.obs_names[2:])
    with pytest.raises(ValueError, match=r"adata.obs_names repeat .*obs_names_make_unique"):
        sth.pp.attach_histology(adata, str(crop / "he.jpg"), sample_id="C6", technology="st")


def test_attach_histology_identity_patient_and_resolution(crop, full):
    adata = _adata(full)
    adata.obs["patient"] = "C"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sdata = sth.io.attach_histology(adata, str(crop / "he.jpg"), sample_id="C6", technology="st")
    table = sdata.tables["table"]
    assert table.obs["spot_id"].tolist() == adata.obs_names.tolist() == sdata["C6_spots"].index.tolist()
    assert set(table.obs["patient"]) == {"C"}  # kept from adata
    assert pixel_size_um(sdata, "C6_image", "C6") == pytest.approx(0.69, rel=0.03)  # from the array coordinates
    with pytest.warns(UserWarning, match="spot positions imply"):
        sth.io.attach_histology(adata, str(crop / "he.jpg"), sample_id="C6", technology="st", pixel_size_um=2.76)
    adata.obs["sample"] = "other"
    with pytest.raises(ValueError, match=r"adata.obs\['sample'\] exists and differs"):
        sth.io.attach_histology(adata, str(crop / "he.jpg"), sample_id="C6", technology="st")


# ---- 6. her2st: missing and corrupted files are named ----------------------------------------------------------------


def _her2st_copy(her2st_dir, tmp_path):
    folder = tmp_path / "her2st"
    (folder / "C6").mkdir(parents=True)
    for f in (her2st_dir / "C6").iterdir():
        (folder / "C6" / f.name).symlink_to(f)
    return folder


def test_her2st_missing_file_named(her2st_dir, tmp_path):
    folder = _her2st_copy(her2st_dir, tmp_path)
    (folder / "C6" / "C6_spots.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"section\(s\) \['C6'\]: missing '.*C6/C6_spots.tsv'"):
        sth.datasets.her2st(["C6"], path=folder)


def test_her2st_corrupted_file_named(her2st_dir, tmp_path, monkeypatch):
    folder = _her2st_copy(her2st_dir, tmp_path)
    (folder / "C6" / "C6_counts.tsv.gz").unlink()
    data = (her2st_dir / "C6" / "C6_counts.tsv.gz").read_bytes()
    (folder / "C6" / "C6_counts.tsv.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"Corrupted or modified her2st file\(s\): '.*C6/C6_counts.tsv.gz' has sha256"):
        sth.datasets.her2st(["C6"], path=folder)
    # the same file in the cache: named when download=False, downloaded again otherwise
    monkeypatch.delenv("ST_FROM_HE_DATA_DIR", raising=False)
    monkeypatch.setattr(sth.settings, "cache_dir", tmp_path)
    with pytest.raises(ValueError, match=r"C6/C6_counts.tsv.gz' has sha256.*download=True"):
        _her2st.her2st_path(["C6"], download=False)
    fetched = []

    def fake_download(target, sections):
        fetched.append(sections)
        (target / "C6" / "C6_counts.tsv.gz").unlink()
        (target / "C6" / "C6_counts.tsv.gz").symlink_to(her2st_dir / "C6" / "C6_counts.tsv.gz")

    monkeypatch.setattr(_her2st, "_download", fake_download)
    assert _her2st.her2st_path(["C6"]) == folder and fetched == [["C6"]]


# ---- HEST and Visium-like readers keep the barcode as identity ------------------------------------------------------


@pytest.fixture
def hest_folder(crop, full, tmp_path):
    """A HEST-layout folder of the crop: barcodes as obs_names, array coordinates, metadata naming the patient."""
    import json

    import tifffile

    for sub in ("st", "wsis", "metadata"):
        (tmp_path / sub).mkdir()
    table = full.tables["table"]
    barcodes = [f"BC{i:03d}-1" for i in range(table.n_obs)]
    adata = ad.AnnData(
        X=table.X.astype(np.float32),  # HEST stores counts as floats
        obs=pd.DataFrame(
            {
                "array_col": table.obs["array_col"].to_numpy(),
                "array_row": table.obs["array_row"].to_numpy(),
                "pxl_col_in_fullres": table.obsm["spatial"][:, 0],
                "pxl_row_in_fullres": table.obsm["spatial"][:, 1],
            },
            index=barcodes,
        ),
        var=table.var.copy(),
    )
    adata.write_h5ad(tmp_path / "st" / "S1.h5ad")
    with Image.open(crop / "he.jpg") as im:
        tifffile.imwrite(tmp_path / "wsis" / "S1.tif", np.asarray(im.convert("RGB")))
    metadata = {"st_technology": "Spatial Transcriptomics", "pixel_size_um_estimated": 0.69, "patient": "C"}
    (tmp_path / "metadata" / "S1.json").write_text(json.dumps(metadata))
    return tmp_path, barcodes


def test_read_hest_identity_patient_and_checks(hest_folder):
    folder, barcodes = hest_folder
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sdata = sth.io.read_hest(folder, "S1")
    table = sdata.tables["table"]
    assert table.obs["spot_id"].tolist() == barcodes == sdata["S1_spots"].index.tolist()
    assert table.obs_names.tolist() == [f"S1_{b}" for b in barcodes]
    assert set(table.obs["patient"]) == {"C"}  # from the metadata
    assert set(sth.io.read_hest(folder, "S1", patient_id={"S1": "P7"}).tables["table"].obs["patient"]) == {"P7"}
    with pytest.warns(UserWarning, match=r"\(given as `pixel_size_um`\) is 4\.\d+x the"):
        sth.io.read_hest(folder, "S1", pixel_size_um=0.69 * 4)
    with pytest.raises(TypeError, match=r"`pixel_size_um\['S1'\]` must be a positive number, got str"):
        sth.io.read_hest(folder, "S1", pixel_size_um={"S1": "0.69"})
    with pytest.raises(TypeError, match="`patient_id` must be a non-empty string"):
        sth.io.read_hest(folder, "S1", patient_id=7)
