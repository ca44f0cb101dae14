"""Reader for 10x Genomics Visium (Space Ranger ``outs/``), on top of :func:`spatialdata_io.visium`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from st_from_he._logging import logger
from st_from_he._sdata import SPATIAL_KEY, TABLE_KEY
from st_from_he._validate import check_id, check_number

from ._image import _check_sample_id, log_pixel_size, read_image_levels
from ._resolution import SPOT_DIAMETER_UM, check_pixel_size, implied_pixel_size, infer_pixel_size
from ._section import build_section

_COUNTS_FILE = "filtered_feature_bc_matrix.h5"
_SCALEFACTORS_FILE = "spatial/scalefactors_json.json"
_POSITIONS_FILES = ("spatial/tissue_positions.csv", "spatial/tissue_positions_list.csv")


def read_visium(
    path: str | Path,
    *,
    fullres_image: str | Path | None = None,
    sample_id: str | None = None,
    pixel_size_um: float | None = None,
    patient_id: str | None = None,
):
    """Read one 10x Genomics Visium section (Space Ranger output) into :class:`~spatialdata.SpatialData`.

    Counts, spot positions, scale factors and the hires image are read with :func:`spatialdata_io.visium`, then put
    into the package's data model. The full-resolution H&E image (the microscope image given to Space Ranger, not
    part of ``outs/``) is read lazily by this package, so a pyramidal TIFF stays on disk and is read tile by tile.

    Parameters
    ----------
    path
        The Space Ranger ``outs/`` folder (or its parent): ``filtered_feature_bc_matrix.h5`` (optionally prefixed
        with ``f"{library_id}_"``), ``spatial/tissue_positions.csv`` (or ``tissue_positions_list.csv``),
        ``spatial/scalefactors_json.json`` and ``spatial/tissue_hires_image.png``.
    fullres_image
        The full-resolution H&E image (JPEG, PNG or (OME-)TIFF), absolute or relative to ``path``. ``None`` uses the
        hires image of ``outs/spatial`` (downsampled by ``tissue_hires_scalef``; fine for a look, coarse for
        training).
    sample_id
        Section id naming the elements and the coordinate system. ``None`` takes the library id from the counts file
        name or its ``library_ids`` attribute.
    pixel_size_um
        Micrometres per pixel of the full-resolution image (the one Space Ranger's pixel coordinates refer to). ``None``
        infers it from the Visium grid (pixels per step of ``array_col``/``array_row``, 50 um / 86.6 um; logged);
        ``spot_diameter_fullres`` is not used, as it is often not the 55 um spot. A given value more than 25 % away
        from the grid's is used with a ``UserWarning``.
    patient_id
        The patient the section comes from, written to ``obs["patient"]``; ``None`` takes the sample id.

    Returns
    -------
    A :class:`~spatialdata.SpatialData` with image ``f"{sample_id}_image"`` (the full-resolution image if given, else
    the hires image, each with its own micrometre scale), circles ``f"{sample_id}_spots"`` of 55 um diameter, and table
    ``"table"``: raw integer counts in ``X``, ``obs["sample"]``, ``obs["patient"]``, ``obs["barcode"]``,
    ``obs["in_tissue"]``,
    ``obs["array_row"]``, ``obs["array_col"]``, ``var`` as Space Ranger wrote it, and ``obsm["spatial"]``, the spot
    centres in pixels of ``f"{sample_id}_image"``. Each spot's identity is its barcode: ``obs["spot_id"]`` and the
    circles' index are the barcode, ``obs_names`` are ``f"{sample_id}_{barcode}"``.

    Examples
    --------
    >>> import st_from_he as sth
    >>> sdata = sth.io.read_visium("spaceranger/outs", fullres_image="slide.tif", sample_id="V1")  # doctest: +SKIP
    >>> sdata.tables["table"].obs["sample"].unique().tolist()  # doctest: +SKIP
    ['V1']
    """
    from spatialdata_io import visium

    if not isinstance(path, str | Path):
        raise TypeError(f"`path` must be a folder path, got {type(path).__name__}.")
    check_id(sample_id, "sample_id", allow_none=True)
    check_id(patient_id, "patient_id", allow_none=True)
    pixel_size_um = check_number(pixel_size_um, "pixel_size_um", allow_none=True)
    path = _outs_folder(Path(path))
    counts_file = _counts_file(path)
    scalefactors = _read_scalefactors(path)
    if not any((path / name).is_file() for name in _POSITIONS_FILES):
        raise FileNotFoundError(f"No spot positions in {str(path)!r}: expected {' or '.join(_POSITIONS_FILES)}.")
    if sample_id is None:
        sample_id = _library_id(counts_file)
    _check_sample_id(sample_id)
    image_path = None
    if fullres_image is not None:
        image_path = Path(fullres_image)
        if not image_path.is_absolute() and not image_path.exists() and (path / image_path).exists():
            image_path = path / image_path
        if not image_path.is_file():
            raise FileNotFoundError(f"The full-resolution image {str(fullres_image)!r} does not exist.")

    with warnings.catch_warnings():  # spatialdata-io's table has a string region column; ours is rebuilt below
        warnings.filterwarnings("ignore", message="Converting `region_key", category=UserWarning)
        raw = visium(path, dataset_id=sample_id)  # the full-resolution image is read below, lazily
    table = raw.tables[TABLE_KEY]
    fullres_px = np.asarray(table.obsm[SPATIAL_KEY], dtype=float)
    missing = ~np.isfinite(fullres_px).all(axis=1)
    if missing.any():
        raise ValueError(
            f"Sample {sample_id!r}: {int(missing.sum())} of {table.n_obs} barcodes of the counts have no position in "
            f"the tissue positions file (e.g. {list(table.obs_names[missing][:3])}); counts and positions must come "
            f"from the same Space Ranger run."
        )

    if image_path is not None:
        levels, file_pixel_size = read_image_levels(image_path)
        scale, what = 1.0, "full-resolution image"
    else:
        hires_key = f"{sample_id}_hires_image"
        if hires_key not in raw.images:
            raise FileNotFoundError(
                f"No image for sample {sample_id!r}: {str(path / 'spatial/tissue_hires_image.png')!r} is missing and "
                f"no `fullres_image=` was given."
            )
        levels, file_pixel_size = [raw.images[hires_key].data], None
        scale, what = float(scalefactors["tissue_hires_scalef"]), "hires image"
    spatial_px = fullres_px * scale

    has_array = {"array_col", "array_row"} <= set(table.obs.columns)
    col, row = (table.obs["array_col"], table.obs["array_row"]) if has_array else (None, None)
    implied, grid = implied_pixel_size(spatial_px, "visium", col, row)
    if pixel_size_um is not None:
        pixel_size, source = float(pixel_size_um) / scale, "given"
        check_pixel_size(pixel_size, implied, sample=sample_id, source="given as `pixel_size_um`", grid=grid)
    else:
        if implied is None:
            infer_pixel_size(spatial_px, "visium")  # raises: too few spots to tell the grid
        pixel_size, source = implied, f"inferred from the spot grid, {grid}"
        if file_pixel_size is not None and abs(file_pixel_size - pixel_size) > 0.05 * pixel_size:
            logger.warning(
                "%s: the image file records %.3f um per pixel, but the Visium grid gives %.3f; using the grid. Pass "
                "`pixel_size_um=` if the file is right.",
                sample_id,
                file_pixel_size,
                pixel_size,
            )
    log_pixel_size(sample_id, pixel_size, f"{source}; {what}")

    obs = pd.DataFrame(index=[f"{sample_id}_{b}" for b in table.obs_names])
    obs["barcode"] = table.obs_names.to_numpy()
    for column in ("in_tissue", "array_row", "array_col"):
        if column in table.obs:
            obs[column] = table.obs[column].to_numpy()
    return build_section(
        sample_id,
        x=table.X,
        var=table.var.copy(),
        obs=obs,
        spatial_px=spatial_px,
        levels=levels,
        pixel_size_um=pixel_size,
        spot_diameter_um=SPOT_DIAMETER_UM["visium"],
        instance_ids=table.obs_names,
        patient=patient_id,
    )


def _outs_folder(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"Visium folder {str(path)!r} does not exist.")
    if not list(path.glob(f"*{_COUNTS_FILE}")) and (path / "outs").is_dir():
        return path / "outs"
    return path


def _counts_file(path: Path) -> Path:
    found = sorted(path.glob(f"*{_COUNTS_FILE}"))
    if not found:
        raise FileNotFoundError(f"No {_COUNTS_FILE!r} in {str(path)!r}; point `path` at Space Ranger's `outs/` folder.")
    if len(found) > 1:
        raise ValueError(f"Several count files in {str(path)!r}: {[f.name for f in found]}; keep one per folder.")
    return found[0]


def _read_scalefactors(path: Path) -> dict:
    file = path / _SCALEFACTORS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"No scale factors in {str(path)!r}: expected {_SCALEFACTORS_FILE!r}.")
    scalefactors = json.loads(file.read_text())
    missing = {"tissue_hires_scalef", "tissue_lowres_scalef"} - set(scalefactors)
    if missing:
        raise ValueError(f"{str(file)!r} lacks {sorted(missing)}.")
    return scalefactors


def _library_id(counts_file: Path) -> str:
    """Library id from the file name prefix (``f"{id}_filtered_feature_bc_matrix.h5"``) or the HDF5 attributes."""
    import h5py

    prefix = counts_file.name.removesuffix(_COUNTS_FILE).removesuffix("_")
    if prefix:
        return prefix
    with h5py.File(counts_file, "r") as f:
        ids = f.attrs.get("library_ids")
    if ids is not None and len(ids):
        value = ids[0]
        return value.decode() if isinstance(value, bytes) else str(value)
    raise ValueError(f"Cannot tell the library id of {str(counts_file)!r}; pass `sample_id=`.")
