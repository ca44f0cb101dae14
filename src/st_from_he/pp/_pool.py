"""Pool single cells (Xenium) or small bins (Visium HD) into pseudo-spots: a new table of summed counts and circles."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from st_from_he._logging import logger
from st_from_he._sdata import (
    INSTANCE_KEY,
    REGION_KEY,
    SAMPLE_KEY,
    SPATIAL_KEY,
    TABLE_KEY,
    UNS_KEY,
    check_number,
    check_sdata,
    image_key,
    pixel_size_um,
)

from ._grid import MAX_SPOTS

if TYPE_CHECKING:
    from spatialdata import SpatialData

POOL_KEY = "pool_to_spots"
"""``uns`` key of a pooled table: the call's parameters (also marks the table as written by :func:`pool_to_spots`)."""

PATIENT_KEY = "patient"
_GRIDS = ("hexagonal", "square")


def pool_to_spots(
    sdata: SpatialData,
    *,
    spacing_um: float = 100.0,
    diameter_um: float = 55.0,
    grid: str = "hexagonal",
    centres_um=None,
    table_key: str | None = None,
    key_added: str = TABLE_KEY,
    shapes_suffix: str = "spots",
    min_cells: int = 1,
    max_spots: int = MAX_SPOTS,
    overwrite: bool = False,
) -> str:
    """Sum the counts of cells or bins into pseudo-spots, as a new table annotating new circles.

    Single-cell (Xenium) or subcellular-bin (Visium HD) data become spot-level data, so that a model trained on
    spots (Visium, legacy ST) can be trained or scored on them. Each pseudo-spot is a circle of ``diameter_um``; its
    counts are the sum of the raw counts of every cell or bin whose centre lies inside the circle (distance to the
    circle's centre at most its radius). Circles are laid on a regular grid of ``spacing_um`` over the cells of
    each section (only circles holding at least ``min_cells`` cells are kept, so the grid covers the tissue), or
    placed at given centres. With a spacing below the diameter circles overlap and a cell counts in each circle
    that holds it, as overlapping measured spots would.

    Positions come from the circles or polygons the source table annotates (their centres, through their
    transformation to the section's micrometre coordinate system ``S``), never from ``obsm``. The source table is
    never modified. Use it on the output of :func:`st_from_he.io.read_xenium` or :func:`st_from_he.io.read_visium_hd`
    (or any table of raw counts with ``obs["sample"]`` whose elements carry a micrometre transformation to ``S``).

    Parameters
    ----------
    sdata
        Sections with a table of raw counts of cells or bins.
    spacing_um
        Centre-to-centre distance of neighbouring pseudo-spots in micrometres (Visium: 100; legacy ST: 200).
    diameter_um
        Diameter of each pseudo-spot in micrometres (Visium: 55; legacy ST: 100).
    grid
        ``"hexagonal"`` (rows ``spacing_um * sqrt(3) / 2`` apart, every other row shifted by half a spacing, as
        Visium; ``array_col`` counts half steps, so it is even on even rows and odd on odd rows) or ``"square"``.
    centres_um
        Instead of a grid: pseudo-spot centres, x and y in micrometres of the section's coordinate system. An
        ``(n, 2)`` array (spots named ``"0"`` ... ``"n-1"``), a :class:`~pandas.DataFrame` with columns ``x`` and
        ``y`` whose index names the spots, or a mapping from sample id to either (needed when the table holds
        several sections). ``spacing_um`` and ``grid`` are then not used.
    table_key
        Table of raw counts of the cells or bins; ``None`` takes the only table other than ``key_added`` (e.g.
        ``"cells"`` of :func:`~st_from_he.io.read_xenium`, ``"bins"`` of :func:`~st_from_he.io.read_visium_hd`).
    key_added
        Key of the new table. The default ``"table"`` is the package's measured table, so
        :meth:`~st_from_he.tl.ExpressionModel.fit`, :func:`~st_from_he.tl.predict_expression` and
        :func:`~st_from_he.tl.evaluate` take the pooled spots with their defaults.
    shapes_suffix
        The circles of section ``S`` are written to ``f"{S}_{shapes_suffix}"`` (default ``f"{S}_spots"``, the package's
        spots element).
    min_cells
        Keep only pseudo-spots holding at least this many cells or bins.
    max_spots
        Largest number of grid points (over the bounding box of a section's cells, before keeping those with cells)
        this call builds; a finer grid is refused before any memory is used.
    overwrite
        Replace a table ``key_added`` and circles written by an earlier call of this function. The source table, and
        any table this function did not write, are never replaced.

    Returns
    -------
    ``key_added``. Adds to ``sdata``:

    - ``sdata.shapes[f"{S}_{shapes_suffix}"]`` per section ``S``: circles of radius ``diameter_um / 2`` in pixels of
      the image ``f"{S}_image"`` (else of the source cells' element), with that element's transformation to ``S``;
      index: the spot ids;
    - ``sdata.tables[key_added]``: ``X`` the summed raw counts (integers), ``var`` the source table's;
      ``obs["sample"]``, ``obs["patient"]`` (the section's), ``obs["region"]`` (the circles element),
      ``obs["spot_id"]`` (circle index: ``f"{array_row}x{array_col}"`` on a grid, else the given names),
      ``obs["array_row"]``, ``obs["array_col"]`` (grid indices, grid only), ``obs["n_cells"]`` (cells or bins
      pooled); ``obs_names`` ``f"{S}_{spot_id}"``; ``obsm["spatial"]`` the centres in pixels of that image;
      ``uns["pool_to_spots"]`` the parameters and the source table.

    Raises
    ------
    ValueError
        If a section has no cells, the source counts are not raw counts, ``spacing_um`` or ``diameter_um`` are not
        positive, ``grid`` is unknown, the grid exceeds ``max_spots``, given centres lie outside the image, or no
        pseudo-spot holds ``min_cells`` cells.
    KeyError
        If tables or elements are missing, or ``key_added`` exists and may not be replaced.

    Examples
    --------
    >>> import st_from_he as sth
    >>> sdata = sth.io.read_xenium("xenium_outs", sample_id="X1", he_image="he.ome.tif",
    ...                            he_alignment="he_imagealignment.csv")  # doctest: +SKIP
    >>> sth.pp.pool_to_spots(sdata, spacing_um=100, diameter_um=55)  # doctest: +SKIP
    'table'
    >>> sdata.tables["table"].obs[["sample", "spot_id", "n_cells"]].head(2)  # doctest: +SKIP
    """
    from spatialdata.models import TableModel

    check_sdata(sdata, "sth.pp.pool_to_spots", needs_image=False)
    spacing_um = check_number(spacing_um, "spacing_um", unit="micrometres")
    diameter_um = check_number(diameter_um, "diameter_um", unit="micrometres")
    min_cells = check_number(min_cells, "min_cells", integer=True, unit="cells")
    max_spots = check_number(max_spots, "max_spots", integer=True, unit="spots")
    if grid not in _GRIDS:
        raise ValueError(f"`grid` must be one of {list(_GRIDS)}, got {grid!r}.")
    for value, name in ((key_added, "key_added"), (shapes_suffix, "shapes_suffix")):
        if not isinstance(value, str) or not value:
            raise TypeError(f"`{name}` must be a non-empty name, got {type(value).__name__} {value!r}.")
    table_key = _source_table_key(sdata, table_key, key_added)
    source = sdata.tables[table_key]
    _check_source(source, table_key)
    _check_key_added(sdata, key_added, table_key, overwrite)

    samples = list(dict.fromkeys(source.obs[SAMPLE_KEY].astype(str)))
    if isinstance(centres_um, Mapping):
        unknown = sorted(set(map(str, centres_um)) - set(samples))
        if unknown:
            raise KeyError(f"`centres_um` names sample(s) {unknown} absent from table {table_key!r} ({samples}).")
        samples = [s for s in samples if s in centres_um]
    elif centres_um is not None and len(samples) > 1:
        raise ValueError(
            f"Table {table_key!r} holds {len(samples)} sections ({samples}); give `centres_um` as a mapping from "
            f"sample id to centres."
        )
    source_regions = set(source.obs[REGION_KEY].astype(str))
    new_shapes = {s: f"{s}_{shapes_suffix}" for s in samples}
    for key in new_shapes.values():
        if key in source_regions:
            raise ValueError(
                f"`shapes_suffix`={shapes_suffix!r} would replace {key!r}, the cells of table {table_key!r}; choose "
                f"another suffix."
            )
        if key not in sdata:
            continue
        users = [name for name, t in sdata.tables.items() if name != key_added and _annotates(t, key)]
        if key not in sdata.shapes or users:
            why = f"annotated by table(s) {users}" if users else "not a shapes element"
            raise KeyError(f"Element {key!r} exists and is {why}, so it is kept; pass another `shapes_suffix`.")
        if not overwrite:
            raise KeyError(f"Element {key!r} exists; pass `overwrite=True` or another `shapes_suffix`.")

    parts, shapes = [], {}
    for sample in samples:
        rows = np.flatnonzero(source.obs[SAMPLE_KEY].astype(str).to_numpy() == sample)
        given = None if centres_um is None else (centres_um[sample] if isinstance(centres_um, Mapping) else centres_um)
        part, circles = _pool_section(
            sdata,
            source,
            table_key,
            sample,
            rows,
            spacing_um=spacing_um,
            diameter_um=diameter_um,
            grid=grid,
            centres=given,
            min_cells=min_cells,
            max_spots=max_spots,
            shapes_key=new_shapes[sample],
        )
        parts.append(part)
        shapes[new_shapes[sample]] = circles

    import anndata as ad

    table = ad.concat(parts, join="outer", merge="same") if len(parts) > 1 else parts[0]
    table.var = source.var.copy()
    for column in (SAMPLE_KEY, REGION_KEY, PATIENT_KEY):
        table.obs[column] = pd.Categorical(table.obs[column].astype(str))
    table.uns[UNS_KEY] = {"raw_counts": True}
    table.uns[POOL_KEY] = {
        "params": {
            "spacing_um": spacing_um,
            "diameter_um": diameter_um,
            "grid": "given centres" if centres_um is not None else grid,
            "min_cells": min_cells,
        },
        "source_table": table_key,
    }
    table = TableModel.parse(table, region=list(shapes), region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    if key_added in sdata.tables:
        del sdata.tables[key_added]
    for key, circles in shapes.items():
        if key in sdata:
            del sdata[key]
        sdata.shapes[key] = circles
    sdata.tables[key_added] = table
    return key_added


def _annotates(table, element: str) -> bool:
    region = table.uns.get("spatialdata_attrs", {}).get("region")
    return element in ([region] if isinstance(region, str) else list(region or []))


def _source_table_key(sdata, table_key, key_added: str) -> str:
    if table_key is not None:
        if not isinstance(table_key, str) or table_key not in sdata.tables:
            raise KeyError(f"No table {table_key!r} (`table_key`); tables present: {sorted(sdata.tables)}.")
        return table_key
    candidates = [k for k in sdata.tables if k != key_added]
    if len(candidates) != 1:
        found = f"tables present: {sorted(sdata.tables)}" if sdata.tables else "there are no tables"
        raise KeyError(f"Pass `table_key=`, the table of cells or bins to pool ({found}).")
    return candidates[0]


def _check_source(source, table_key: str) -> None:
    from st_from_he._validate import check_table_raw_counts

    missing = [k for k in (SAMPLE_KEY, REGION_KEY) if k not in source.obs]
    attrs = source.uns.get("spatialdata_attrs", {})
    instance = attrs.get("instance_key")
    if missing or instance is None or instance not in source.obs:
        raise KeyError(
            f"Table {table_key!r} must name each row's section (obs[{SAMPLE_KEY!r}]), element (obs[{REGION_KEY!r}]) "
            f"and instance (the table's instance key): read the data with `sth.io.read_xenium` or "
            f"`sth.io.read_visium_hd`, which write them."
        )
    if source.n_obs == 0:
        raise ValueError(f"Table {table_key!r} has no cells or bins to pool.")
    check_table_raw_counts(source, table_key=table_key)


def _check_key_added(sdata, key_added: str, table_key: str, overwrite: bool) -> None:
    if key_added == table_key:
        raise ValueError(
            f"`key_added`={key_added!r} is the source table; pooled counts go to a new table (e.g. 'table' or "
            f"'pseudo_spots')."
        )
    if key_added not in sdata.tables:
        return
    if POOL_KEY not in sdata.tables[key_added].uns:
        raise KeyError(
            f"Table {key_added!r} exists and was not written by `sth.pp.pool_to_spots`, so it is kept whatever "
            f"`overwrite`; pass another `key_added` (e.g. 'pseudo_spots')."
        )
    if not overwrite:
        raise KeyError(f"Table {key_added!r} exists; pass `overwrite=True` or another `key_added`.")


def _affine(element, sample: str, key: str) -> tuple[np.ndarray, object]:
    from spatialdata.transformations import get_transformation

    transforms = get_transformation(element, get_all=True)
    if sample not in transforms:
        raise ValueError(
            f"Element {key!r} has no transformation to the micrometre coordinate system {sample!r}; read the data "
            f"with `sth.io.read_xenium` or `sth.io.read_visium_hd`, which record it."
        )
    matrix = transforms[sample].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    return np.asarray(matrix, dtype=float), transforms[sample]


def _cell_positions_um(sdata, source, table_key: str, sample: str, rows: np.ndarray) -> tuple[np.ndarray, str]:
    """Centres (micrometres of ``sample``) of the cells of ``rows``, from the elements they annotate."""
    instance_key = source.uns["spatialdata_attrs"]["instance_key"]
    regions = source.obs[REGION_KEY].astype(str).to_numpy()[rows]
    ids = source.obs[instance_key].to_numpy()[rows]
    xy = np.empty((len(rows), 2))
    for region in dict.fromkeys(regions):
        if region not in sdata.shapes:
            raise KeyError(
                f"Table {table_key!r} annotates {region!r}, which is not a shapes element (shapes present: "
                f"{sorted(sdata.shapes)}); pooling needs the cells' circles or polygons."
            )
        shapes = sdata.shapes[region]
        here = regions == region
        position = shapes.index.get_indexer(pd.Index(ids[here]))
        if (position < 0).any():
            raise ValueError(
                f"{int((position < 0).sum())} rows of table {table_key!r} name instances absent from {region!r} "
                f"(e.g. {list(ids[here][position < 0][:3])})."
            )
        geometry = shapes.geometry.iloc[position]
        points = geometry if (geometry.geom_type == "Point").all() else geometry.centroid
        local = np.column_stack([points.x.to_numpy(float), points.y.to_numpy(float), np.ones(len(points))])
        matrix, _ = _affine(shapes, sample, region)
        xy[here] = (local @ matrix.T)[:, :2]
    return xy, str(regions[0])


def _grid_centres(xy: np.ndarray, spacing: float, grid: str, radius: float, max_spots: int, sample: str):
    """Grid points (micrometres) over the bounding box of ``xy``, with their row and column indices."""
    low, high = xy.min(axis=0) - radius, xy.max(axis=0) + radius
    width, height = high - low
    row_step = spacing * math.sqrt(3) / 2 if grid == "hexagonal" else spacing
    n_cols, n_rows = math.floor(width / spacing) + 2, math.floor(height / row_step) + 2
    if n_cols * n_rows > max_spots:
        coarsest = spacing * math.sqrt(n_cols * n_rows / max_spots)
        raise ValueError(
            f"A {spacing:g} um {grid} grid over the cells of {sample!r} ({width / 1000:.1f} x {height / 1000:.1f} mm) "
            f"has {n_cols * n_rows:,} points, above `max_spots`={max_spots:,}. Use a larger `spacing_um` (about "
            f"{math.ceil(coarsest):g} um or more fits), or pass a larger `max_spots=`."
        )
    rows, cols = np.divmod(np.arange(n_rows * n_cols), n_cols)
    shift = (rows % 2) * spacing / 2 if grid == "hexagonal" else 0.0
    centre = (low + high) / 2
    x = centre[0] + (cols - (n_cols - 1) / 2) * spacing + shift - (spacing / 4 if grid == "hexagonal" else 0.0)
    y = centre[1] + (rows - (n_rows - 1) / 2) * row_step
    array_col = 2 * cols + rows % 2 if grid == "hexagonal" else cols
    ids = pd.Index([f"{r}x{c}" for r, c in zip(rows, array_col, strict=True)])
    return np.column_stack([x, y]), ids, rows, array_col


def _given_centres(centres, sample: str) -> tuple[np.ndarray, pd.Index]:
    if isinstance(centres, pd.DataFrame):
        if not {"x", "y"} <= set(centres.columns):
            raise ValueError(f"`centres_um` for {sample!r} needs columns 'x' and 'y', got {list(centres.columns)}.")
        xy, ids = centres[["x", "y"]].to_numpy(dtype=float), centres.index.astype(str)
    else:
        xy = np.asarray(centres, dtype=float)
        ids = pd.Index(np.arange(len(xy)).astype(str)) if xy.ndim == 2 else None
    if xy.ndim != 2 or xy.shape[1] != 2 or not len(xy):
        raise ValueError(f"`centres_um` for {sample!r} must be an (n, 2) array of x, y, got shape {xy.shape}.")
    if not np.isfinite(xy).all():
        raise ValueError(f"`centres_um` for {sample!r} holds NaN or infinite values.")
    if ids.has_duplicates:
        raise ValueError(f"`centres_um` for {sample!r}: spot names repeat ({list(ids[ids.duplicated()][:3])}).")
    return xy, ids


def _pool_section(
    sdata,
    source,
    table_key: str,
    sample: str,
    rows: np.ndarray,
    *,
    spacing_um: float,
    diameter_um: float,
    grid: str,
    centres,
    min_cells: int,
    max_spots: int,
    shapes_key: str,
):
    """The pooled rows (an AnnData) and circles of one section."""
    import anndata as ad
    from scipy.spatial import cKDTree
    from spatialdata.models import ShapesModel

    if not len(rows):
        raise ValueError(f"Section {sample!r} has no cells or bins in table {table_key!r}.")
    cells_um, cells_region = _cell_positions_um(sdata, source, table_key, sample, rows)
    radius = diameter_um / 2
    if centres is None:
        spots_um, ids, array_row, array_col = _grid_centres(cells_um, spacing_um, grid, radius, max_spots, sample)
    else:
        spots_um, ids = _given_centres(centres, sample)
        array_row = array_col = None

    # The frame of the new circles: pixels of the section's image (else of the cells' element).
    frame_key = image_key(sample) if image_key(sample) in sdata.images else cells_region
    frame = sdata[frame_key]
    to_um, transformation = _affine(frame, sample, frame_key)
    px = pixel_size_um(sdata, frame_key, sample)
    spots_px = (np.column_stack([spots_um, np.ones(len(spots_um))]) @ np.linalg.inv(to_um).T)[:, :2]
    keep = np.ones(len(spots_um), dtype=bool)
    if frame_key == image_key(sample):
        from ._patches import image_levels

        _, height, width = image_levels(frame)[0].shape
        keep = (spots_px[:, 0] >= 0) & (spots_px[:, 0] < width) & (spots_px[:, 1] >= 0) & (spots_px[:, 1] < height)
        if centres is not None and not keep.all():
            raise ValueError(
                f"{int((~keep).sum())} of the {len(keep)} given centres of {sample!r} lie outside the image "
                f"{frame_key!r} (e.g. x, y = {spots_um[~keep][0].tolist()} um); are they micrometres of the section's "
                f"coordinate system?"
            )

    # Each spot sums the cells whose centre lies within its radius (a cell may lie in several overlapping spots);
    # the (spot, cell) pairs come from one vectorised KD-tree join, so millions of 2 um bins stay cheap.
    pairs = cKDTree(spots_um).sparse_distance_matrix(cKDTree(cells_um), radius, output_type="ndarray")
    n_cells = np.bincount(pairs["i"], minlength=len(spots_um))
    keep &= n_cells >= min_cells
    if not keep.any():
        raise ValueError(
            f"No pseudo-spot of {sample!r} holds at least {min_cells} cell(s) or bin(s) (of {len(rows)}); check "
            f"`centres_um`, `diameter_um` ({diameter_um:g} um) and `min_cells`."
        )
    if centres is None and (~keep & (n_cells >= min_cells)).any():
        logger.info(
            "%s: %d pseudo-spots with cells lie outside the image and were left out.",
            sample,
            int((~keep & (n_cells >= min_cells)).sum()),
        )
    kept = np.flatnonzero(keep)
    new_index = np.full(len(spots_um), -1)
    new_index[kept] = np.arange(len(kept))
    pairs = pairs[keep[pairs["i"]]]
    spot_of, cell_of = new_index[pairs["i"]], pairs["j"]
    assign = sparse.csr_matrix(
        (np.ones(len(cell_of), dtype=np.int64), (spot_of, cell_of)), shape=(len(kept), len(rows))
    )
    x = sparse.csr_matrix(source.X[rows])
    pooled = sparse.csr_matrix(assign.astype(x.dtype) @ x)

    ids = ids[kept]
    obs = pd.DataFrame(index=pd.Index([f"{sample}_{i}" for i in ids]))
    obs[SAMPLE_KEY] = sample
    obs[PATIENT_KEY] = _patient(source, rows, sample)
    obs[REGION_KEY] = shapes_key
    obs[INSTANCE_KEY] = np.asarray(ids, dtype=object)
    if array_row is not None:
        obs["array_row"] = array_row[kept]
        obs["array_col"] = array_col[kept]
    obs["n_cells"] = n_cells[kept]
    part = ad.AnnData(X=pooled, obs=obs, var=pd.DataFrame(index=source.var_names.copy()))
    part.obsm[SPATIAL_KEY] = spots_px[kept]

    circles = ShapesModel.parse(
        spots_px[kept],
        geometry=0,
        radius=np.full(len(kept), radius / px),
        index=pd.Index(np.asarray(ids, dtype=object), dtype=object),
        transformations={sample: transformation},
    )
    if array_row is not None:
        circles["array_row"] = array_row[kept]
        circles["array_col"] = array_col[kept]
    logger.info(
        "%s: pooled %d of %d cells/bins into %d pseudo-spots of %g um%s (median %d per spot)",
        sample,
        int(np.unique(cell_of).size),
        len(rows),
        len(kept),
        diameter_um,
        f" on a {spacing_um:g} um {grid} grid" if centres is None else " at the given centres",
        int(np.median(n_cells[kept])),
    )
    return part, circles


def _patient(source, rows: np.ndarray, sample: str) -> str:
    if PATIENT_KEY not in source.obs:
        return sample
    patients = pd.unique(source.obs[PATIENT_KEY].astype(str).to_numpy()[rows])
    if len(patients) != 1:
        raise ValueError(f"Section {sample!r} has cells of several patients ({list(patients[:5])}); expected one.")
    return str(patients[0])
