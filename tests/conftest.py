"""Shared fixtures: the real data of ``../shared/data`` (or ``$ST_FROM_HE_DATA_DIR``), read once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_DEFAULT_DATA = Path(__file__).parents[1].parent / "shared/data"


def _data_folder(name: str) -> Path:
    """``$ST_FROM_HE_DATA_DIR/name`` if that variable is set and holds it, else ``../shared/data/name``."""
    env = os.environ.get("ST_FROM_HE_DATA_DIR")
    if env and (Path(env) / name).is_dir():
        return (Path(env) / name).resolve()  # absolute: tests link to it from temporary folders
    return (_DEFAULT_DATA / name).resolve()


HER2ST = _data_folder("her2st")
VISIUM_CROP = _data_folder("visium_mouse_brain_crop")


def _require(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.skip(f"test data {str(folder)!r} not found (set ST_FROM_HE_DATA_DIR)")
    return folder


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    """The her2st folder (one sub-folder per section)."""
    return _require(HER2ST)


@pytest.fixture(scope="session")
def her2st_small(her2st_dir):
    """Sections C5 and C6 of her2st as one SpatialData (images stay lazy: nothing is decoded here)."""
    import st_from_he as sth

    return sth.datasets.her2st(["C5", "C6"], path=her2st_dir)


@pytest.fixture(scope="module")
def split(her2st_small):
    """``(train, test)``: C5 to train on, C6 held out (a module may define its own)."""
    import st_from_he as sth

    return sth.pp.split_sections(her2st_small, test=["C6"])


@pytest.fixture(scope="module")
def genes(split):
    """30 of C5's most variable genes measured in both sections (a module may define its own)."""
    import st_from_he as sth

    train, test = split
    shared = set(train.tables["table"].var_names) & set(test.tables["table"].var_names)
    return [g for g in sth.pp.select_genes(train, n_top=50) if g in shared][:30]


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """Saved random weights of the tiny CNN (seed 0), so that separate calls embed with one encoder."""
    import torch

    from st_from_he.models import TinyCNN

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pth"
    torch.save(TinyCNN().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def visium_crop_dir() -> Path:
    """The 49-spot Visium mouse brain crop in the scanpy layout (``adata.h5ad``, ``image.jpg``)."""
    return _require(VISIUM_CROP)


# --------------------------------------------------------------------------------------------------------------------
# A Space Ranger ``outs/`` folder written from a real her2st section, to read with spatialdata-io
# --------------------------------------------------------------------------------------------------------------------
SPOT_DIAMETER_FULLRES_UM = 65.0  # 10x: spot_diameter_fullres spans a theoretical 65 um spot of the full-res image


def write_spaceranger_section(
    sdata, sample: str, he_jpeg: Path, out: Path, *, down: int = 4, n_genes: int = 300, genes=()
):
    """Write ``sample`` of one of our readers' SpatialData as a Space Ranger ``outs/`` folder.

    The "full-resolution" image ``f"{sample}_full.tif"`` is the section's H&E decoded at ``1/down`` scale (JPEG draft
    decoding: fast) and cropped around the spots; the scale factors are truthful for it (``spot_diameter_fullres`` is
    the pixels of 65 um, as Space Ranger records); ``array_row``/``array_col`` are the legacy ST array coordinates
    (not a Visium grid). The counts are the ``n_genes`` genes of highest total count and ``genes``, as raw integers.

    Returns
    -------
    ``(out, pixel_size_um)``: the folder and the full-resolution image's micrometres per pixel.
    """
    import json

    import h5py
    import numpy as np
    import pandas as pd
    from PIL import Image
    from scipy import sparse

    from st_from_he._sdata import pixel_size_um

    (out / "spatial").mkdir(parents=True, exist_ok=True)
    table = sdata.tables["table"]
    table = table[table.obs["sample"].astype(str) == sample]
    px_um = pixel_size_um(sdata, f"{sample}_image", sample) * down
    with Image.open(he_jpeg) as im:
        im.draft("RGB", (im.width // down, im.height // down))
        small = im.convert("RGB")
    xy = np.asarray(table.obsm["spatial"], dtype=float) / down
    margin = 100.0 / px_um  # 100 um of glass around the outermost spots
    x0, y0 = np.floor(xy.min(axis=0) - margin).astype(int)
    x1, y1 = np.ceil(xy.max(axis=0) + margin).astype(int)
    full = small.crop((x0, y0, x1, y1))
    full.save(out / f"{sample}_full.tif")
    xy = xy - [x0, y0]
    scalefactors = {
        "spot_diameter_fullres": SPOT_DIAMETER_FULLRES_UM / px_um,
        "fiducial_diameter_fullres": 1.6 * SPOT_DIAMETER_FULLRES_UM / px_um,
        "tissue_hires_scalef": 0.5,
        "tissue_lowres_scalef": 0.15,
    }
    (out / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    for name in ("hires", "lowres"):
        s = scalefactors[f"tissue_{name}_scalef"]
        full.resize((round(full.width * s), round(full.height * s))).save(out / "spatial" / f"tissue_{name}_image.png")
    barcodes = table.obs["spot_id"].astype(str).to_numpy()
    pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": 1,
            "array_row": table.obs["array_row"].to_numpy(),
            "array_col": table.obs["array_col"].to_numpy(),
            "pxl_row_in_fullres": xy[:, 1],
            "pxl_col_in_fullres": xy[:, 0],
        }
    ).to_csv(out / "spatial" / "tissue_positions.csv", index=False)
    total = np.asarray(table.X.sum(axis=0)).ravel()
    keep = np.union1d(np.argsort(-total, kind="stable")[:n_genes], table.var_names.get_indexer(list(genes)))
    by_gene = sparse.csc_matrix(table.X[:, keep].T.astype(np.int32))  # 10x stores genes x barcodes in CSC
    with h5py.File(out / "filtered_feature_bc_matrix.h5", "w") as f:
        f.attrs["library_ids"] = np.array([sample.encode()])
        m = f.create_group("matrix")
        m["barcodes"] = np.array(barcodes, dtype="S")
        m["data"] = by_gene.data
        m["indices"] = by_gene.indices.astype(np.int64)
        m["indptr"] = by_gene.indptr.astype(np.int64)
        m["shape"] = np.array(by_gene.shape, dtype=np.int32)
        features = m.create_group("features")
        features["id"] = np.array([f"ENSG{i:011d}" for i in keep], dtype="S")
        features["name"] = np.array(table.var_names[keep], dtype="S")
        features["feature_type"] = np.array([b"Gene Expression"] * len(keep))
        features["genome"] = np.array([b"GRCh38"] * len(keep))
        features["_all_tag_keys"] = np.array([b"genome"])
    return out, px_um


@pytest.fixture(scope="session")
def spaceranger_writer():
    """:func:`write_spaceranger_section`, for tests that write a Space Ranger folder of their own."""
    return write_spaceranger_section


@pytest.fixture(scope="session")
def spaceranger_c6(her2st_dir, her2st_small, tmp_path_factory):
    """C6 of her2st as a Space Ranger ``outs/`` folder (see :func:`write_spaceranger_section`): ``(outs, um/px)``."""
    out = tmp_path_factory.mktemp("spaceranger_c6") / "outs"
    return write_spaceranger_section(her2st_small, "C6", her2st_dir / "C6" / "C6_HE.jpg", out)


@pytest.fixture(scope="session")
def spaceranger_c5(her2st_dir, her2st_small, tmp_path_factory):
    """C5 of her2st as a Space Ranger ``outs/`` folder (see :func:`write_spaceranger_section`): ``(outs, um/px)``."""
    out = tmp_path_factory.mktemp("spaceranger_c5") / "outs"
    return write_spaceranger_section(her2st_small, "C5", her2st_dir / "C5" / "C5_HE.jpg", out)
