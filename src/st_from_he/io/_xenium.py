"""Reader for 10x Genomics Xenium (cells) with a registered H&E image, on top of :func:`spatialdata_io.xenium`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from st_from_he._logging import logger
from st_from_he._validate import check_id

from ._image import _check_sample_id, log_pixel_size, read_image_levels

CELLS_TABLE = "cells"
"""Key of the table of cells written by :func:`read_xenium`."""

_REQUIRED = ("experiment.xenium", "cell_feature_matrix.h5", "cells.parquet", "cells.zarr.zip")
_HE_SUFFIX = "he_image.ome.tif"
_ALIGNMENT_SUFFIX = "he_imagealignment.csv"
_DEFAULT_CELL_RADIUS_UM = 5.0


def read_xenium(
    path: str | Path,
    *,
    sample_id: str,
    patient_id: str | None = None,
    he_image: str | Path | None = None,
    he_alignment=None,
    pool_spacing_um: float | None = None,
    pool_diameter_um: float = 55.0,
    pool_grid: str = "hexagonal",
    gex_only: bool = True,
):
    """Read a 10x Genomics Xenium section (cells) and its H&E image into :class:`~spatialdata.SpatialData`.

    Cell counts and centroids are read with :func:`spatialdata_io.xenium` (transcripts, boundaries, labels and the
    morphology images are skipped). Xenium's own morphology image is a DAPI (fluorescence) image, not H&E: the H&E
    is a separate image of the same section stained after the run, registered to the Xenium data by an affine
    transformation, e.g. with Xenium Explorer's image alignment. The cells are put into the pixels of that H&E image,
    so the section follows the package's data model and its cells can be pooled into pseudo-spots
    (:func:`st_from_he.pp.pool_to_spots`, or ``pool_spacing_um=`` here) to train or score a spot-level model.

    Parameters
    ----------
    path
        The Xenium output folder (``experiment.xenium``, ``cell_feature_matrix.h5``, ``cells.parquet``,
        ``cells.zarr.zip``).
    sample_id
        Section id naming the elements and the micrometre coordinate system. Letters, digits, ``_``, ``-``, ``.``.
    patient_id
        The patient the section comes from, written to ``obs["patient"]``; ``None`` takes the sample id.
    he_image
        The H&E image (JPEG, PNG or (OME-)TIFF; read lazily). ``None`` looks for ``*he_image.ome.tif`` in ``path``
        (the name 10x Genomics gives the post-Xenium H&E of its public datasets, which spatialdata-io also looks
        for) with its ``*he_imagealignment.csv``;
        without one the section has cells but no image (enough to pool, not to train).
    he_alignment
        How the H&E image lies on the Xenium data: the affine transformation that maps H&E pixel coordinates
        ``(x, y, 1)`` to Xenium morphology pixel coordinates (micrometres divided by ``pixel_size`` of
        ``experiment.xenium``, 0.2125 um), as Xenium Explorer exports it ("Download transformation matrix",
        ``*_imagealignment.csv``, three comma-separated rows). Give a 3 x 3 (or 2 x 3) array, that CSV file's path,
        or a keypoints CSV exported by Xenium Explorer (header ``fixedX,fixedY,alignmentX,alignmentY``: Xenium
        positions in micrometres and the same points in H&E pixels; at least 3 points, fitted by least squares).
        ``None`` takes the alignment file found next to an auto-detected H&E image, else treats the H&E pixels as
        Xenium morphology pixels (an image already registered and resampled to them).
    pool_spacing_um
        If given, also pool the cells into pseudo-spots on a grid of this spacing: table ``"table"`` and circles
        ``f"{sample_id}_spots"`` (see :func:`st_from_he.pp.pool_to_spots`).
    pool_diameter_um
        Diameter of those pseudo-spots.
    pool_grid
        ``"hexagonal"`` (Visium-like) or ``"square"``.
    gex_only
        Keep only "Gene Expression" features (no negative-control probes or codewords).

    Returns
    -------
    A :class:`~spatialdata.SpatialData` with

    - image ``f"{sample_id}_image"``: the H&E image (if any), with a :class:`~spatialdata.transformations.Scale` to
      the coordinate system ``sample_id`` in micrometres. Its pixel size is the Xenium pixel size times the
      alignment's scale (the square root of its determinant); an alignment that stretches x and y differently by more
      than 2 % is used with a ``UserWarning``, as the package models square pixels.
    - circles ``f"{sample_id}_cells"``: cell centroids in pixels of that image (without an image: of the Xenium
      morphology frame), radius from ``cell_area``; index: the Xenium ``cell_id``.
    - table ``"cells"``: raw integer counts in ``X``, ``var`` as Xenium wrote it, ``obs`` Xenium's cell metadata
      (``transcript_counts``, ``cell_area``, ...) plus ``sample``, ``patient``, ``region`` and ``spot_id`` (the
      ``cell_id``), ``obs_names`` ``f"{sample_id}_{cell_id}"``, ``obsm["spatial"]`` the centroids in pixels.
    - with ``pool_spacing_um``: table ``"table"`` and circles ``f"{sample_id}_spots"`` of pooled pseudo-spots.

    Examples
    --------
    >>> import st_from_he as sth
    >>> sdata = sth.io.read_xenium("xenium_outs", sample_id="X1", he_image="he.ome.tif",
    ...                            he_alignment="he_imagealignment.csv", pool_spacing_um=100)  # doctest: +SKIP
    >>> sorted(sdata.tables)  # doctest: +SKIP
    ['cells', 'table']
    >>> model = sth.tl.ExpressionModel(genes=sth.pp.select_genes(sdata, n_top=200)).fit(sdata)  # doctest: +SKIP
    """
    from spatialdata_io import xenium

    from ._cells import cells_section

    if not isinstance(path, str | Path):
        raise TypeError(f"`path` must be the Xenium output folder, got {type(path).__name__}.")
    _check_sample_id(sample_id)
    check_id(patient_id, "patient_id", allow_none=True)
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"Xenium folder {str(path)!r} does not exist.")
    missing = [name for name in _REQUIRED if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{str(path)!r} is not a Xenium output folder: {missing} missing (point `path` at the folder holding "
            f"{list(_REQUIRED)})."
        )
    xenium_px = _xenium_pixel_size(path / "experiment.xenium")
    if _n_cells(path / "cells.parquet") == 0:  # spatialdata-io fails on an empty table with an IndexError
        raise ValueError(f"The Xenium data in {str(path)!r} hold no cells ({str(path / 'cells.parquet')!r} is empty).")

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Converting `region_key", category=UserWarning)
        # the raw table annotates the cell labels, which are not read: only its counts and centroids are used
        warnings.filterwarnings("ignore", message="The table is annotating", category=UserWarning)
        raw = xenium(
            path,
            cells_boundaries=False,
            nucleus_boundaries=False,
            cells_as_circles=False,
            cells_labels=False,
            nucleus_labels=False,
            transcripts=False,
            morphology_mip=False,
            morphology_focus=False,
            aligned_images=False,
            cells_table=True,
            gex_only=gex_only,
        )
    table = raw.tables["table"]
    if table.n_obs == 0:
        raise ValueError(f"The Xenium data in {str(path)!r} hold no cells.")
    ids = table.obs["cell_id"].astype(str).to_numpy()
    cells_um = np.asarray(table.obsm["spatial"], dtype=float)[:, :2]
    if not np.isfinite(cells_um).all():
        raise ValueError(f"{str(path / 'cells.parquet')!r}: some cell centroids are NaN or infinite.")
    area = table.obs["cell_area"].to_numpy(float) if "cell_area" in table.obs else None
    radius_um = np.sqrt(area / np.pi) if area is not None else np.full(len(ids), _DEFAULT_CELL_RADIUS_UM)
    radius_um = np.where(np.isfinite(radius_um) & (radius_um > 0), radius_um, _DEFAULT_CELL_RADIUS_UM)

    he_image, he_alignment = _find_he(path, he_image, he_alignment)
    levels = None
    if he_image is None:
        logger.warning(
            "%s: no H&E image (pass `he_image=` and `he_alignment=`); cells are kept in the Xenium frame, enough to "
            "pool into pseudo-spots but not to train or predict.",
            sample_id,
        )
        pixel_size, xy_px = xenium_px, cells_um / xenium_px
    else:
        matrix = alignment_matrix(he_alignment, xenium_px)
        levels, file_px = read_image_levels(he_image)
        pixel_size = xenium_px * _scale(matrix, sample_id)
        if file_px is not None and abs(file_px - pixel_size) > 0.05 * pixel_size:
            logger.warning(
                "%s: the H&E file records %.3f um per pixel, the alignment gives %.3f; using the alignment.",
                sample_id,
                file_px,
                pixel_size,
            )
        xenium_xy = np.column_stack([cells_um / xenium_px, np.ones(len(cells_um))])
        xy_px = (xenium_xy @ np.linalg.inv(matrix).T)[:, :2]
        _, height, width = levels[0].shape
        outside = (xy_px[:, 0] < 0) | (xy_px[:, 0] >= width) | (xy_px[:, 1] < 0) | (xy_px[:, 1] >= height)
        if outside.all():
            raise ValueError(
                f"No cell of {sample_id!r} lies on the H&E image {str(he_image)!r} ({width} x {height} px) under "
                f"the given alignment; does `he_alignment` map H&E pixels to Xenium pixels (not the reverse)?"
            )
        if outside.any():
            logger.info("%s: %d of %d cells lie outside the H&E image.", sample_id, int(outside.sum()), len(ids))
        log_pixel_size(sample_id, pixel_size, f"H&E {Path(he_image).name}, from the Xenium alignment")

    obs = table.obs.drop(columns=[c for c in ("region", "cell_labels") if c in table.obs]).copy()
    sdata = cells_section(
        sample_id,
        x=table.X,
        var=table.var.copy(),
        obs=obs,
        ids=ids,
        xy_px=xy_px,
        radius_px=radius_um / pixel_size,
        pixel_size_um=pixel_size,
        levels=levels,
        shapes_key=f"{sample_id}_cells",
        table_key=CELLS_TABLE,
        patient=patient_id,
        where=f"Cell counts of {str(path / 'cell_feature_matrix.h5')!r}",
    )
    logger.info("%s: %d cells x %d genes from %s", sample_id, len(ids), table.n_vars, path)
    if pool_spacing_um is not None:
        from st_from_he.pp._pool import pool_to_spots

        pool_to_spots(
            sdata, spacing_um=pool_spacing_um, diameter_um=pool_diameter_um, grid=pool_grid, table_key=CELLS_TABLE
        )
    return sdata


def _n_cells(file: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file).metadata.num_rows
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise ValueError(f"{str(file)!r} is not a readable Parquet file of cells: {err}") from err


def _xenium_pixel_size(file: Path) -> float:
    try:
        value = json.loads(file.read_text())["pixel_size"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{str(file)!r} does not record the Xenium `pixel_size` (micrometres per pixel).") from err
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{str(file)!r}: `pixel_size` must be a positive number of micrometres, got {value!r}.")
    return float(value)


def _find_he(path: Path, he_image, he_alignment):
    """The H&E image and alignment: as given, else ``*he_image.ome.tif`` (+ ``*he_imagealignment.csv``) in ``path``."""
    if he_image is not None:
        if not isinstance(he_image, str | Path):
            raise TypeError(f"`he_image` must be an image file path, got {type(he_image).__name__}.")
        he_image = Path(he_image).expanduser()
        if not he_image.is_absolute() and not he_image.exists() and (path / he_image).exists():
            he_image = path / he_image
        if not he_image.is_file():
            raise FileNotFoundError(f"The H&E image `he_image`={str(he_image)!r} does not exist.")
        return he_image, he_alignment
    if he_alignment is not None:
        raise ValueError("`he_alignment` was given without `he_image`; pass the H&E image it aligns.")
    found = sorted(path.glob(f"*{_HE_SUFFIX}"))
    if len(found) > 1:
        raise ValueError(f"Several H&E images in {str(path)!r}: {[f.name for f in found]}; pass `he_image=`.")
    if not found:
        return None, None
    alignment = found[0].with_name(found[0].name.removesuffix(".ome.tif") + "alignment.csv")
    logger.info(
        "Using the H&E image %s%s", found[0].name, f" aligned by {alignment.name}" if alignment.is_file() else ""
    )
    return found[0], (alignment if alignment.is_file() else None)


def alignment_matrix(alignment, xenium_px: float) -> np.ndarray:
    """The 3 x 3 affine matrix from H&E pixels to Xenium morphology pixels.

    ``alignment`` is ``None`` (identity), a 3 x 3 or 2 x 3 array, a Xenium Explorer transformation-matrix CSV, or a
    keypoints CSV (``fixedX, fixedY`` in Xenium micrometres, ``alignmentX, alignmentY`` in H&E pixels).
    """
    if alignment is None:
        logger.info("No `he_alignment`: the H&E pixels are taken as Xenium morphology pixels.")
        return np.eye(3)
    where = "`he_alignment`"
    if isinstance(alignment, str | Path):
        file = Path(alignment).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"The alignment file `he_alignment`={str(file)!r} does not exist.")
        where = repr(str(file))
        first = file.read_text().lstrip().split("\n", 1)[0]
        if any(c.isalpha() and c not in "eE" for c in first):
            return _from_keypoints(pd.read_csv(file), xenium_px, where)
        try:
            alignment = np.loadtxt(file, delimiter=",", ndmin=2)
        except ValueError as err:
            raise ValueError(f"{where} is not a comma-separated 3 x 3 matrix: {err}") from err
    matrix = np.asarray(alignment, dtype=float)
    if matrix.shape == (2, 3):
        matrix = np.vstack([matrix, [0.0, 0.0, 1.0]])
    if matrix.shape != (3, 3):
        raise ValueError(f"{where} must be a 3 x 3 affine matrix (or its first two rows), got shape {matrix.shape}.")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{where} holds NaN or infinite values.")
    if not np.allclose(matrix[2], [0.0, 0.0, 1.0], atol=1e-9):
        raise ValueError(
            f"{where} is not affine: its last row is {matrix[2].tolist()}, expected [0, 0, 1] (a perspective "
            f"transformation is not supported)."
        )
    if abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
        raise ValueError(f"{where} is singular (it collapses the image onto a line); check the matrix.")
    return matrix


def _from_keypoints(points: pd.DataFrame, xenium_px: float, where: str) -> np.ndarray:
    columns = ["fixedX", "fixedY", "alignmentX", "alignmentY"]
    if not set(columns) <= set(points.columns):
        raise ValueError(f"{where}: a keypoints file needs columns {columns}, got {list(points.columns)}.")
    values = points[columns].to_numpy(dtype=float)
    if len(values) < 3 or not np.isfinite(values).all():
        raise ValueError(f"{where}: need at least 3 finite keypoints to fit an affine alignment, got {len(values)}.")
    source = np.column_stack([values[:, 2:], np.ones(len(values))])
    if np.linalg.matrix_rank(source) < 3:
        raise ValueError(f"{where}: the keypoints lie on a line; an affine alignment needs points spread out.")
    solution, *_ = np.linalg.lstsq(source, values[:, :2] / xenium_px, rcond=None)
    return np.vstack([solution.T, [0.0, 0.0, 1.0]])


def _scale(matrix: np.ndarray, sample: str) -> float:
    """Xenium pixels per H&E pixel (the alignment's mean scale); warns when x and y scale differently."""
    singular = np.linalg.svd(matrix[:2, :2], compute_uv=False)
    if singular[0] / singular[1] > 1.02:
        warnings.warn(
            f"{sample}: the H&E alignment scales x and y differently ({singular[0]:.4g} vs {singular[1]:.4g}); the "
            f"package models square pixels, so patch sizes in micrometres are approximate. Cell positions are exact.",
            UserWarning,
            stacklevel=3,
        )
    return float(np.sqrt(singular[0] * singular[1]))
