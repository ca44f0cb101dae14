"""Reader for 10x Genomics Visium HD (square bins) with its H&E image, on top of :func:`spatialdata_io.visium_hd`."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from st_from_he._logging import logger
from st_from_he._validate import check_id, check_spots_in_image

from ._image import _check_sample_id, log_pixel_size, read_image_levels

BINS_TABLE = "bins"
"""Key of the table of bins written by :func:`read_visium_hd`."""

_FEATURE_SLICE = "feature_slice.h5"
_BIN_FOLDER = re.compile(r"^square_(\d{3})um$")
_NO_IMAGE = "__st_from_he_reads_the_image__"


def read_visium_hd(
    path: str | Path,
    *,
    sample_id: str,
    bin_size: int = 2,
    patient_id: str | None = None,
    fullres_image: str | Path | None = None,
    filtered: bool = True,
    pool_spacing_um: float | None = None,
    pool_diameter_um: float = 55.0,
    pool_grid: str = "hexagonal",
):
    """Read one 10x Genomics Visium HD section (Space Ranger output, one bin size) into :class:`~spatialdata.SpatialData`.

    Bin counts and positions are read with :func:`spatialdata_io.visium_hd`; the H&E image is read lazily by this
    package (a pyramidal TIFF stays on disk and is read tile by tile). The micrometres per pixel of the full-resolution
    image come from Space Ranger's ``microns_per_pixel``. The bins can be pooled into pseudo-spots
    (:func:`st_from_he.pp.pool_to_spots`, or ``pool_spacing_um=`` here) to train or score a spot-level model: 2 um
    bins pool most exactly (a bin belongs to a spot when its centre lies inside the circle), at the cost of about
    10 million rows for a full capture area.

    Parameters
    ----------
    path
        The Space Ranger ``outs/`` folder: ``feature_slice.h5`` (optionally prefixed ``f"{id}_"``) and
        ``binned_outputs/square_00Xum/`` with ``filtered_feature_bc_matrix.h5`` and ``spatial/``
        (``tissue_positions.parquet``, ``scalefactors_json.json``).
    sample_id
        Section id naming the elements and the micrometre coordinate system. Letters, digits, ``_``, ``-``, ``.``.
    bin_size
        Bin side in micrometres: 2, 8 or 16 (those Space Ranger writes; another size present in ``binned_outputs``
        also reads).
    patient_id
        The patient the section comes from, written to ``obs["patient"]``; ``None`` takes the sample id.
    fullres_image
        The full-resolution H&E image given to Space Ranger (the microscope image, not part of ``outs/``), absolute or
        relative to ``path``. ``None`` takes the one file of ``path/microscope_image/`` if there is one, else the
        hires image of ``spatial/`` (downsampled by ``tissue_hires_scalef``; coarse for training).
    filtered
        Read ``filtered_feature_bc_matrix.h5`` (bins under tissue); ``False`` reads ``raw_feature_bc_matrix.h5``.
    pool_spacing_um
        If given, also pool the bins into pseudo-spots on a grid of this spacing: table ``"table"`` and circles
        ``f"{sample_id}_spots"`` (see :func:`st_from_he.pp.pool_to_spots`).
    pool_diameter_um
        Diameter of those pseudo-spots.
    pool_grid
        ``"hexagonal"`` (Visium-like) or ``"square"``.

    Returns
    -------
    A :class:`~spatialdata.SpatialData` with

    - image ``f"{sample_id}_image"``: the H&E image, with a :class:`~spatialdata.transformations.Scale` to the
      coordinate system ``sample_id`` in micrometres;
    - circles ``f"{sample_id}_bins"``: bin centres in pixels of that image, diameter ``bin_size`` um (the circle
      inscribed in the square bin); index: the bin barcode;
    - table ``"bins"``: raw integer counts in ``X``, ``var`` as Space Ranger wrote it, ``obs["barcode"]``,
      ``obs["in_tissue"]``, ``obs["array_row"]``, ``obs["array_col"]``, ``obs["sample"]``, ``obs["patient"]``,
      ``obs["region"]`` and ``obs["spot_id"]`` (the barcode), ``obs_names`` ``f"{sample_id}_{barcode}"``,
      ``obsm["spatial"]`` the bin centres in pixels;
    - with ``pool_spacing_um``: table ``"table"`` and circles ``f"{sample_id}_spots"`` of pooled pseudo-spots.

    Raises
    ------
    ValueError
        If ``bin_size`` is not among the bin sizes of ``binned_outputs`` (the message lists them), or the data hold
        no bins.
    FileNotFoundError
        If ``path`` is not a Visium HD output folder or ``fullres_image`` does not exist.

    Examples
    --------
    >>> import st_from_he as sth
    >>> sdata = sth.io.read_visium_hd("visium_hd/outs", sample_id="HD1", bin_size=2,
    ...                               fullres_image="slide.btf", pool_spacing_um=100)  # doctest: +SKIP
    >>> sorted(sdata.tables)  # doctest: +SKIP
    ['bins', 'table']
    """
    from spatialdata_io import visium_hd

    from ._cells import cells_section

    if not isinstance(path, str | Path):
        raise TypeError(f"`path` must be the Visium HD `outs/` folder, got {type(path).__name__}.")
    _check_sample_id(sample_id)
    check_id(patient_id, "patient_id", allow_none=True)
    if isinstance(bin_size, bool) or not isinstance(bin_size, int | np.integer):
        raise TypeError(f"`bin_size` must be an integer number of micrometres (2, 8 or 16), got {bin_size!r}.")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"Visium HD folder {str(path)!r} does not exist.")
    if not list(path.glob(f"*{_FEATURE_SLICE}")) and (path / "outs").is_dir():
        path = path / "outs"
    if not list(path.glob(f"*{_FEATURE_SLICE}")):
        raise FileNotFoundError(
            f"{str(path)!r} is not a Visium HD output folder: no {_FEATURE_SLICE!r} (point `path` at Space Ranger's "
            f"`outs/`)."
        )
    bins = _bin_folders(path)
    if int(bin_size) not in bins:
        raise ValueError(
            f"Unknown bin size {bin_size!r} um for {str(path)!r}: the data hold bin sizes {sorted(bins)} um "
            f"(folders binned_outputs/square_00Xum)."
        )
    bin_folder = bins[int(bin_size)]
    counts_name = "filtered_feature_bc_matrix.h5" if filtered else "raw_feature_bc_matrix.h5"
    for needed in (counts_name, "spatial/scalefactors_json.json", "spatial/tissue_positions.parquet"):
        if not (bin_folder / needed).is_file():
            raise FileNotFoundError(f"Visium HD bin folder {str(bin_folder)!r} lacks {needed!r}.")
    if _n_barcodes(bin_folder / counts_name) == 0:  # spatialdata-io fails on an empty matrix
        raise ValueError(f"The Visium HD counts {str(bin_folder / counts_name)!r} hold no bins.")
    scalefactors = json.loads((bin_folder / "spatial/scalefactors_json.json").read_text())
    micron_per_px = float(scalefactors["microns_per_pixel"])
    image_path = _fullres_image(path, fullres_image)

    with warnings.catch_warnings():
        # The H&E image is read below, lazily: spatialdata-io would decode a .btf whole into memory.
        warnings.filterwarnings("ignore", message=".*does not exist, skipping it", category=UserWarning)
        warnings.filterwarnings("ignore", message="No image path found", category=UserWarning)
        warnings.filterwarnings("ignore", message="No full resolution image found", category=UserWarning)
        raw = visium_hd(
            path,
            filtered_counts_file=filtered,
            load_segmentations_only=False,
            bin_size=int(bin_size),
            bins_as_squares=False,
            fullres_image_file=path / _NO_IMAGE,
            load_all_images=False,
        )
    table = raw.tables[bin_folder.name]
    if table.n_obs == 0:
        raise ValueError(f"The Visium HD data in {str(bin_folder)!r} hold no bins.")
    fullres_px = np.asarray(table.obsm["spatial"], dtype=float)[:, :2]
    if not np.isfinite(fullres_px).all():
        raise ValueError(f"{str(bin_folder / 'spatial/tissue_positions.parquet')!r}: some bins have no position.")

    if image_path is not None:
        levels, _ = read_image_levels(image_path)
        scale, what = 1.0, f"full-resolution image {image_path.name}"
    else:
        hires = sorted(path.rglob("tissue_hires_image.png"))
        if not hires:
            raise FileNotFoundError(
                f"No H&E image for {sample_id!r}: pass `fullres_image=` (the microscope image given to Space Ranger); "
                f"{str(path)!r} has neither microscope_image/ nor spatial/tissue_hires_image.png."
            )
        levels, _ = read_image_levels(hires[0])
        scale, what = float(scalefactors["tissue_hires_scalef"]), "hires image"
    pixel_size = micron_per_px / scale
    xy_px = fullres_px * scale
    check_spots_in_image(xy_px, *levels[0].shape[1:], sample=sample_id)
    log_pixel_size(sample_id, pixel_size, f"Space Ranger's microns_per_pixel; {what}")

    obs = pd.DataFrame(index=table.obs_names.copy())
    obs["barcode"] = table.obs_names.to_numpy()
    for column in ("in_tissue", "array_row", "array_col"):
        if column in table.obs:
            obs[column] = table.obs[column].to_numpy()
    sdata = cells_section(
        sample_id,
        x=table.X,
        var=table.var.copy(),
        obs=obs,
        ids=table.obs_names,
        xy_px=xy_px,
        radius_px=int(bin_size) / 2 / pixel_size,
        pixel_size_um=pixel_size,
        levels=levels,
        shapes_key=f"{sample_id}_bins",
        table_key=BINS_TABLE,
        patient=patient_id,
        where=f"Counts of {str(bin_folder / counts_name)!r}",
    )
    logger.info("%s: %d bins of %d um x %d genes from %s", sample_id, table.n_obs, bin_size, table.n_vars, path)
    if pool_spacing_um is not None:
        from st_from_he.pp._pool import pool_to_spots

        pool_to_spots(
            sdata, spacing_um=pool_spacing_um, diameter_um=pool_diameter_um, grid=pool_grid, table_key=BINS_TABLE
        )
    return sdata


def _n_barcodes(file: Path) -> int:
    import h5py

    try:
        with h5py.File(file, "r") as f:
            return int(f["matrix/shape"][1])
    except (OSError, KeyError) as err:
        raise ValueError(f"{str(file)!r} is not a 10x Genomics HDF5 count matrix: {err}") from err


def _bin_folders(path: Path) -> dict[int, Path]:
    """Bin size (um) -> its folder, from ``binned_outputs/square_00Xum`` (or such folders directly in ``path``)."""
    root = path / "binned_outputs" if (path / "binned_outputs").is_dir() else path
    found = {}
    for folder in root.iterdir():
        match = _BIN_FOLDER.match(folder.name)
        if match and folder.is_dir():
            found[int(match.group(1))] = folder
    if not found:
        raise FileNotFoundError(f"No bins in {str(root)!r}: expected folders binned_outputs/square_00Xum.")
    return found


def _fullres_image(path: Path, fullres_image) -> Path | None:
    if fullres_image is not None:
        if not isinstance(fullres_image, str | Path):
            raise TypeError(f"`fullres_image` must be an image file path, got {type(fullres_image).__name__}.")
        image = Path(fullres_image).expanduser()
        if not image.is_absolute() and not image.exists() and (path / image).exists():
            image = path / image
        if not image.is_file():
            raise FileNotFoundError(f"The full-resolution image `fullres_image`={str(fullres_image)!r} does not exist.")
        return image
    folder = path / "microscope_image"
    files = sorted(f for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
    if len(files) > 1:
        raise ValueError(f"Several files in {str(folder)!r}: {[f.name for f in files]}; pass `fullres_image=`.")
    if files:
        logger.info("Using the microscope image %s", files[0].name)
    return files[0] if files else None
