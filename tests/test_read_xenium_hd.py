"""sth.io.read_xenium and sth.io.read_visium_hd on small output folders written from real her2st spots (C6).

The files follow the layouts spatialdata-io's readers expect (and read): no Xenium or Visium HD data ship with the
tests, so the cells and bins are simulated from 30 real C6 spots (raw counts of their 120 most expressed genes):

- Xenium: each spot's counts are split at random over 8 cells placed uniformly within 45 um of its centre
  (``experiment.xenium``, ``cells.parquet``, ``cell_feature_matrix.h5``, ``cells.zarr.zip``). The H&E image is the
  real C6 image (cropped), registered to the Xenium frame by a known affine (90 degree rotation, scale, shift) written
  as Xenium Explorer writes it (``*_imagealignment.csv``) or as keypoints.
- Visium HD: each spot's counts are split at random over the 2 um bins whose centres lie within 45 um of its centre
  (``binned_outputs/square_002um``; ``square_008um`` holds the same counts summed in 4 x 4 blocks), the crop as
  microscope image with Space Ranger's ``microns_per_pixel``.

Pooling at the spot centres with the spot diameter must give back the spots' counts exactly.
"""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from scipy import sparse

import st_from_he as sth

N_SPOTS, N_GENES, CELLS_PER_SPOT, RADIUS_UM, XENIUM_PX = 30, 120, 8, 45.0, 0.2125


@pytest.fixture(scope="module")
def spots(her2st_dir, tmp_path_factory):
    """30 neighbouring real C6 spots: counts, ids, centres (pixels of a crop of the H&E image, saved as TIFF)."""
    sdata = sth.datasets.her2st(["C6"], path=her2st_dir)
    table = sdata.tables["table"]
    px = sth._sdata.pixel_size_um(sdata, "C6_image", "C6")
    xy = np.asarray(table.obsm["spatial"], dtype=float)
    nearest = np.argsort(np.linalg.norm(xy - np.median(xy, axis=0), axis=1))[:N_SPOTS]
    x = table.X[nearest].toarray()
    genes = np.argsort(-x.sum(axis=0))[:N_GENES]
    low = np.floor(xy[nearest].min(axis=0) - 250).astype(int)
    high = np.ceil(xy[nearest].max(axis=0) + 250).astype(int)
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(her2st_dir / "C6" / "C6_HE.jpg") as im:
        crop = np.asarray(im.convert("RGB").crop((*low, *high)))
    folder = tmp_path_factory.mktemp("he")
    tifffile.imwrite(folder / "he.tif", crop, photometric="rgb")
    return {
        "counts": x[:, genes].astype(np.int64),
        "genes": table.var_names[genes].to_numpy(),
        "ids": table.obs["spot_id"].to_numpy()[nearest].astype(str),
        "centres_px": xy[nearest] - low,
        "px": px,
        "he": folder / "he.tif",
        "shape": crop.shape[:2],
    }


def write_10x_h5(file, counts: np.ndarray, barcodes, genes, *, feature_type="Gene Expression"):
    """A Cell Ranger style HDF5 matrix (genes x barcodes, CSC) as ``scanpy.read_10x_h5`` reads it."""
    by_gene = sparse.csc_matrix(counts.T)
    with h5py.File(file, "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.array(barcodes, dtype="S")
        m["data"] = by_gene.data.astype(np.int32)
        m["indices"] = by_gene.indices.astype(np.int64)
        m["indptr"] = by_gene.indptr.astype(np.int64)
        m["shape"] = np.array(by_gene.shape, dtype=np.int32)
        features = m.create_group("features")
        features["id"] = np.array([f"ENSG{i:08d}" for i in range(len(genes))], dtype="S")
        features["name"] = np.array(genes, dtype="S")
        features["feature_type"] = np.array([feature_type] * len(genes), dtype="S")
        features["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")
        features["_all_tag_keys"] = np.array([b"genome"])


def split_over(counts_row: np.ndarray, k: int, rng) -> np.ndarray:
    """One spot's counts spread over k parts at random: (k, genes), summing back to ``counts_row``."""
    return rng.multinomial(counts_row, rng.dirichlet(np.ones(k))).T


# ----------------------------------------------------------------------------------------------------------------------
# Xenium


def he_to_xenium(spots) -> np.ndarray:
    """A known alignment: H&E pixels -> Xenium pixels, rotated by 90 degrees, scaled and shifted."""
    s = spots["px"] / XENIUM_PX
    height = spots["shape"][0]
    return np.array([[0.0, -s, s * height + 400.0], [s, 0.0, 250.0], [0.0, 0.0, 1.0]])


def write_xenium(spots, out, *, seed=0, extra_cells=0):
    """A minimal Xenium output folder of simulated cells; returns their ids, counts and H&E pixel positions."""
    from spatialdata_io.readers.xenium import cell_id_str_from_prefix_suffix_uint32

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    counts = np.concatenate([split_over(row, CELLS_PER_SPOT, rng) for row in spots["counts"]])
    r = RADIUS_UM / spots["px"] * np.sqrt(rng.uniform(size=len(counts)))
    theta = rng.uniform(0, 2 * np.pi, size=len(counts))
    he_px = np.repeat(spots["centres_px"], CELLS_PER_SPOT, axis=0) + np.column_stack(
        [r * np.cos(theta), r * np.sin(theta)]
    )
    n = len(counts)
    prefix, suffix = np.arange(1, n + 1, dtype=np.uint32) * 7919, np.ones(n, dtype=np.uint32)
    ids = cell_id_str_from_prefix_suffix_uint32(prefix, suffix).astype(str)
    xenium_um = (np.column_stack([he_px, np.ones(n)]) @ he_to_xenium(spots).T)[:, :2] * XENIUM_PX
    area = rng.uniform(40, 120, size=n)

    specs = {"pixel_size": XENIUM_PX, "analysis_sw_version": "xenium-2.0.0.10", "run_name": "simulated from her2st C6"}
    (out / "experiment.xenium").write_text(json.dumps(specs))
    write_10x_h5(out / "cell_feature_matrix.h5", counts, ids, spots["genes"])
    pd.DataFrame(
        {
            "cell_id": ids,
            "x_centroid": xenium_um[:, 0],
            "y_centroid": xenium_um[:, 1],
            "transcript_counts": counts.sum(axis=1),
            "control_probe_counts": 0,
            "cell_area": area,
            "nucleus_area": area / 3,
        }
    ).to_parquet(out / "cells.parquet")
    import zarr

    store = zarr.storage.ZipStore(out / "cells.zarr.zip", mode="w")
    root = zarr.open_group(store, mode="w", zarr_format=2)
    root.create_array("cell_id", data=np.column_stack([prefix, suffix]))
    summary = np.column_stack([xenium_um, area, xenium_um, area / 3, np.zeros(n), np.ones(n)])
    column_names = ["cell_centroid_x", "cell_centroid_y", "cell_area", "nucleus_centroid_x", "nucleus_centroid_y"]
    column_names += ["nucleus_area", "z_level", "nucleus_count"]
    root.create_array("cell_summary", data=summary, attributes={"column_names": column_names})
    store.close()
    return ids, counts, he_px


@pytest.fixture(scope="module")
def xenium_dir(spots, tmp_path_factory):
    out = tmp_path_factory.mktemp("xenium") / "outs"
    ids, counts, he_px = write_xenium(spots, out)
    np.savetxt(out / "alignment.csv", he_to_xenium(spots), delimiter=",")
    return out, ids, counts, he_px


def test_read_xenium_registers_cells_on_the_he_image(spots, xenium_dir):
    out, ids, counts, he_px = xenium_dir
    sdata = sth.io.read_xenium(
        out, sample_id="X1", patient_id="C", he_image=spots["he"], he_alignment=out / "alignment.csv"
    )
    assert set(sdata.images) == {"X1_image"} and set(sdata.shapes) == {"X1_cells"} and set(sdata.tables) == {"cells"}
    cells = sdata.tables["cells"]
    np.testing.assert_array_equal(cells.X.toarray(), counts)
    assert np.issubdtype(cells.X.dtype, np.integer) and list(cells.var_names) == list(spots["genes"])
    assert cells.obs["spot_id"].tolist() == list(ids) and cells.obs_names[0] == f"X1_{ids[0]}"
    assert set(cells.obs["sample"]) == {"X1"} and set(cells.obs["patient"]) == {"C"}
    assert set(cells.obs["region"]) == {"X1_cells"} and "cell_area" in cells.obs
    np.testing.assert_allclose(cells.obsm["spatial"], he_px, atol=1e-6)  # Xenium micrometres -> H&E pixels
    assert sth._sdata.pixel_size_um(sdata, "X1_image", "X1") == pytest.approx(spots["px"])
    circles = sdata.shapes["X1_cells"]
    np.testing.assert_allclose(np.column_stack([circles.geometry.x, circles.geometry.y]), he_px, atol=1e-6)
    np.testing.assert_allclose(circles["radius"], np.sqrt(cells.obs["cell_area"] / np.pi) / spots["px"])

    # pooling at the real spot centres with the real spot diameter gives back the spots' counts
    centres = pd.DataFrame(spots["centres_px"] * spots["px"], columns=["x", "y"], index=spots["ids"])
    sth.pp.pool_to_spots(sdata, centres_um=centres, diameter_um=100)
    np.testing.assert_array_equal(sdata.tables["table"].X.toarray(), spots["counts"])
    assert (sdata.tables["table"].obs["n_cells"] == CELLS_PER_SPOT).all()
    np.testing.assert_allclose(sdata.tables["table"].obsm["spatial"], spots["centres_px"], atol=1e-6)


def test_read_xenium_alignment_forms_and_pooling(spots, xenium_dir, tmp_path):
    out, ids, counts, he_px = xenium_dir
    matrix = he_to_xenium(spots)
    # the matrix as an array, its first two rows, and keypoints (Xenium micrometres vs H&E pixels) agree
    corners = np.array([[0.0, 0.0], [1000.0, 0.0], [0.0, 800.0], [900.0, 700.0]])
    fixed = (np.column_stack([corners, np.ones(4)]) @ matrix.T)[:, :2] * XENIUM_PX
    keypoints = pd.DataFrame({"fixedX": fixed[:, 0], "fixedY": fixed[:, 1], "alignmentX": corners[:, 0]})
    keypoints["alignmentY"] = corners[:, 1]
    keypoints.to_csv(tmp_path / "keypoints.csv", index=False)
    for alignment in (matrix, matrix[:2], tmp_path / "keypoints.csv"):
        sdata = sth.io.read_xenium(out, sample_id="X2", he_image=spots["he"], he_alignment=alignment)
        np.testing.assert_allclose(sdata.tables["cells"].obsm["spatial"], he_px, atol=1e-5)

    # pooled on a Visium-like grid in the same call: the package's layout, sums of the cells inside each circle
    sdata = sth.io.read_xenium(out, sample_id="X3", he_image=spots["he"], he_alignment=matrix, pool_spacing_um=100)
    assert set(sdata.tables) == {"cells", "table"} and {"X3_cells", "X3_spots"} <= set(sdata.shapes)
    pooled = sdata.tables["table"]
    assert set(pooled.obs["region"]) == {"X3_spots"} and pooled.uns["pool_to_spots"]["source_table"] == "cells"
    d = np.linalg.norm(pooled.obsm["spatial"][:, None] - he_px[None], axis=-1) * spots["px"]
    np.testing.assert_array_equal(pooled.X.toarray(), (d <= 27.5).astype(np.int64) @ counts)


def test_read_xenium_finds_the_aligned_he_and_works_without(spots, xenium_dir, tmp_path):
    out, ids, counts, he_px = xenium_dir
    folder = tmp_path / "outs"
    folder.mkdir()
    for name in ("experiment.xenium", "cell_feature_matrix.h5", "cells.parquet", "cells.zarr.zip"):
        (folder / name).symlink_to(out / name)
    sdata = sth.io.read_xenium(folder, sample_id="X4")  # no H&E: cells in the Xenium frame, no image
    assert not sdata.images and sth._sdata.pixel_size_um(sdata, "X4_cells", "X4") == pytest.approx(XENIUM_PX)
    sth.pp.pool_to_spots(sdata, spacing_um=100)  # pooling needs no image
    assert sdata.tables["table"].X.sum() > 0
    (folder / "X4_he_image.ome.tif").symlink_to(spots["he"])
    np.savetxt(folder / "X4_he_imagealignment.csv", he_to_xenium(spots), delimiter=",")
    sdata = sth.io.read_xenium(folder, sample_id="X4")
    assert "X4_image" in sdata.images
    np.testing.assert_allclose(sdata.tables["cells"].obsm["spatial"], he_px, atol=1e-6)


def test_read_xenium_errors(spots, xenium_dir, tmp_path):
    out, *_ = xenium_dir
    with pytest.raises(FileNotFoundError, match=r"is not a Xenium output folder: \['experiment.xenium'"):
        sth.io.read_xenium(tmp_path, sample_id="X")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sth.io.read_xenium(tmp_path / "nowhere", sample_id="X")
    with pytest.raises(ValueError, match="`sample_id` 'X 1' is not allowed"):
        sth.io.read_xenium(out, sample_id="X 1")
    with pytest.raises(ValueError, match="without `he_image`"):
        sth.io.read_xenium(out, sample_id="X", he_alignment=np.eye(3))
    with pytest.raises(FileNotFoundError, match="`he_image`="):
        sth.io.read_xenium(out, sample_id="X", he_image=tmp_path / "he.tif")
    bad = {
        "shape": (np.eye(2), r"3 x 3 affine matrix"),
        "singular": (np.array([[1.0, 2, 0], [2, 4, 0], [0, 0, 1]]), "singular"),
        "perspective": (np.array([[1.0, 0, 0], [0, 1, 0], [1e-3, 0, 1]]), "not affine"),
        "reversed": (np.linalg.inv(he_to_xenium(spots)), "No cell of 'X' lies on the H&E image"),
    }
    for alignment, message in bad.values():
        with pytest.raises(ValueError, match=message):
            sth.io.read_xenium(out, sample_id="X", he_image=spots["he"], he_alignment=alignment)
    (tmp_path / "few.csv").write_text("fixedX,fixedY,alignmentX,alignmentY\n1,2,3,4\n5,6,7,8\n")
    with pytest.raises(ValueError, match="at least 3 finite keypoints"):
        sth.io.read_xenium(out, sample_id="X", he_image=spots["he"], he_alignment=tmp_path / "few.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("experiment.xenium", "cell_feature_matrix.h5", "cells.zarr.zip"):
        (empty / name).symlink_to(out / name)
    pd.read_parquet(out / "cells.parquet").iloc[:0].to_parquet(empty / "cells.parquet")
    with pytest.raises(ValueError, match="hold no cells"):
        sth.io.read_xenium(empty, sample_id="X")
    stretched = he_to_xenium(spots) @ np.diag([1.2, 1.0, 1.0])
    with pytest.warns(UserWarning, match="scales x and y differently"):
        sth.io.read_xenium(out, sample_id="X", he_image=spots["he"], he_alignment=stretched)


# ----------------------------------------------------------------------------------------------------------------------
# Visium HD


def write_visium_hd(spots, out, *, seed=0):
    """A minimal Space Ranger Visium HD ``outs/`` of 2 um bins (and 8 um bins summed from them)."""
    rng = np.random.default_rng(seed)
    mpp = spots["px"]  # the microscope image is the H&E crop
    centres_um = spots["centres_px"] * mpp
    rows, cols, parts = [], [], []
    for centre, row in zip(centres_um, spots["counts"], strict=True):
        lo, hi = np.floor((centre - RADIUS_UM) / 2).astype(int), np.ceil((centre + RADIUS_UM) / 2).astype(int)
        c, r = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]))
        inside = np.hypot((c + 0.5) * 2 - centre[0], (r + 0.5) * 2 - centre[1]) <= RADIUS_UM
        rows.append(r[inside])
        cols.append(c[inside])
        parts.append(split_over(row, int(inside.sum()), rng))
    rows, cols, counts = np.concatenate(rows), np.concatenate(cols), np.concatenate(parts)
    (out / "microscope_image").mkdir(parents=True)
    (out / "microscope_image" / "he.tif").symlink_to(spots["he"])
    with h5py.File(out / "feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps({"hd_layout_json": json.dumps({"file_format": "1.0"})})
    bins_written = {}
    for size in (2, 8):
        factor = size // 2
        frame = pd.DataFrame(counts).assign(r=rows // factor, c=cols // factor)
        summed = frame.groupby(["r", "c"]).sum()
        summed = summed[summed.sum(axis=1) > 0]  # bins without a count are left out, to keep the files small
        r, c = summed.index.get_level_values("r").to_numpy(), summed.index.get_level_values("c").to_numpy()
        barcodes = [f"s_{size:03d}um_{a:05d}_{b:05d}-1" for a, b in zip(r, c, strict=True)]
        folder = out / "binned_outputs" / f"square_{size:03d}um"
        (folder / "spatial").mkdir(parents=True)
        write_10x_h5(folder / "filtered_feature_bc_matrix.h5", summed.to_numpy(), barcodes, spots["genes"])
        scalefactors = {
            "bin_size_um": float(size),
            "microns_per_pixel": mpp,
            "spot_diameter_fullres": size / mpp,
            "tissue_hires_scalef": 0.2,
            "tissue_lowres_scalef": 0.05,
            "regist_target_img_scalef": 0.2,
        }
        (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
        pd.DataFrame(
            {
                "barcode": barcodes,
                "in_tissue": 1,
                "array_row": r,
                "array_col": c,
                "pxl_row_in_fullres": (r + 0.5) * size / mpp,
                "pxl_col_in_fullres": (c + 0.5) * size / mpp,
            }
        ).to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
        bins_written[size] = (barcodes, summed.to_numpy())
    return bins_written


@pytest.fixture(scope="module")
def visium_hd_dir(spots, tmp_path_factory):
    out = tmp_path_factory.mktemp("visium_hd") / "outs"
    return out, write_visium_hd(spots, out)


def test_read_visium_hd_bins_pool_back_to_the_spots(spots, visium_hd_dir):
    out, written = visium_hd_dir
    sdata = sth.io.read_visium_hd(out, sample_id="HD1", bin_size=2, patient_id="C")
    assert set(sdata.images) == {"HD1_image"} and set(sdata.shapes) == {"HD1_bins"} and set(sdata.tables) == {"bins"}
    bins = sdata.tables["bins"]
    barcodes, counts = written[2]
    assert bins.obs["spot_id"].tolist() == barcodes and bins.obs["barcode"].tolist() == barcodes
    np.testing.assert_array_equal(bins.X.toarray(), counts)
    assert set(bins.obs["patient"]) == {"C"} and {"array_row", "array_col", "in_tissue"} <= set(bins.obs)
    assert sth._sdata.pixel_size_um(sdata, "HD1_image", "HD1") == pytest.approx(spots["px"])
    np.testing.assert_allclose(sdata.shapes["HD1_bins"]["radius"], 1.0 / spots["px"])

    centres = pd.DataFrame(spots["centres_px"] * spots["px"], columns=["x", "y"], index=spots["ids"])
    sth.pp.pool_to_spots(sdata, centres_um=centres, diameter_um=100)
    np.testing.assert_array_equal(sdata.tables["table"].X.toarray(), spots["counts"])

    # 8 um bins hold the same counts; pooled on a hexagonal grid in the same call (the pooled table trains and
    # scores as in tests/test_pool.py): each pseudo-spot sums the bins whose centre lies inside it
    sdata = sth.io.read_visium_hd(out, sample_id="HD8", bin_size=8, pool_spacing_um=100, pool_diameter_um=55)
    bins, pooled = sdata.tables["bins"], sdata.tables["table"]
    np.testing.assert_array_equal(bins.X.toarray(), written[8][1])
    d = np.linalg.norm(pooled.obsm["spatial"][:, None] - bins.obsm["spatial"][None], axis=-1) * spots["px"]
    np.testing.assert_array_equal(pooled.X.toarray(), (d <= 27.5).astype(np.int64) @ written[8][1])
    assert set(pooled.obs["region"]) == {"HD8_spots"} and pooled.uns["pool_to_spots"]["params"]["grid"] == "hexagonal"


def test_read_visium_hd_errors(spots, visium_hd_dir, tmp_path):
    out, _ = visium_hd_dir
    with pytest.raises(ValueError, match=r"Unknown bin size 16 um .* bin sizes \[2, 8\] um"):
        sth.io.read_visium_hd(out, sample_id="HD", bin_size=16)
    with pytest.raises(TypeError, match="`bin_size` must be an integer"):
        sth.io.read_visium_hd(out, sample_id="HD", bin_size="2um")
    with pytest.raises(FileNotFoundError, match="not a Visium HD output folder"):
        sth.io.read_visium_hd(tmp_path, sample_id="HD")
    with pytest.raises(FileNotFoundError, match="`fullres_image`="):
        sth.io.read_visium_hd(out, sample_id="HD", fullres_image=tmp_path / "missing.tif")
    empty = tmp_path / "empty"
    (empty / "binned_outputs" / "square_002um").mkdir(parents=True)
    (empty / "feature_slice.h5").symlink_to(out / "feature_slice.h5")
    (empty / "binned_outputs" / "square_002um" / "spatial").symlink_to(out / "binned_outputs/square_002um/spatial")
    write_10x_h5(empty / "binned_outputs/square_002um/filtered_feature_bc_matrix.h5", np.zeros((0, 3)), [], list("ABC"))
    with pytest.raises(ValueError, match="hold no bins"):
        sth.io.read_visium_hd(empty, sample_id="HD")
    small = tmp_path / "small.png"
    Image.fromarray(np.full((50, 60, 3), 200, dtype=np.uint8)).save(small)
    with pytest.raises(ValueError, match="spot centres lie outside the 60 x 50 px image"):
        sth.io.read_visium_hd(out, sample_id="HD", fullres_image=small)


def test_read_visium_hd_hires_fallback(spots, visium_hd_dir, tmp_path):
    out, written = visium_hd_dir
    folder = tmp_path / "outs"
    folder.mkdir()
    # no microscope_image/: the hires image is used (copies: spatialdata-io's search does not follow links)
    shutil.copy(out / "feature_slice.h5", folder)
    shutil.copytree(out / "binned_outputs", folder / "binned_outputs")
    with pytest.raises(FileNotFoundError, match="pass `fullres_image=`"):
        sth.io.read_visium_hd(folder, sample_id="HD")
    (folder / "spatial").mkdir()
    height, width = spots["shape"]
    with Image.open(spots["he"]) as im:
        im.resize((round(width * 0.2), round(height * 0.2))).save(folder / "spatial" / "tissue_hires_image.png")
    sdata = sth.io.read_visium_hd(folder, sample_id="HD", bin_size=8)
    assert sth._sdata.pixel_size_um(sdata, "HD_image", "HD") == pytest.approx(spots["px"] / 0.2)
    positions = pd.read_parquet(out / "binned_outputs/square_008um/spatial/tissue_positions.parquet")
    expected = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy() * 0.2
    np.testing.assert_allclose(sdata.tables["bins"].obsm["spatial"], expected)
