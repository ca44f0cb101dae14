"""Pseudo-spots on a regular grid over an H&E image, for prediction on slides without measured spots."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from st_from_he._logging import logger
from st_from_he._sdata import check_sdata, only_image, systems_of
from st_from_he._validate import check_number

from ._patches import image_of, to_image_pixels

MAX_SPOTS = 2_000_000
"""Default largest grid :func:`spot_grid` builds (``max_spots``)."""

if TYPE_CHECKING:
    from spatialdata import SpatialData


def spot_grid(
    sdata: SpatialData,
    image_key: str | None = None,
    *,
    pixel_size_um: float | None = None,
    table_key: str | None = None,
    spacing_um: float = 100.0,
    diameter_um: float = 55.0,
    tissue_only: bool = True,
    tissue_key: str | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    max_spots: int = MAX_SPOTS,
) -> str:
    """Add circles on a square grid of given physical spacing over an image: pseudo-spots to predict on.

    The grid's cells (squares of side ``spacing_um``) tile the whole image and are centred on it, so the number of
    columns is ``ceil(width / spacing)`` and every centre lies inside the image. A square grid is used for
    simplicity: at a given spacing it covers the section evenly, and neighbours are found by ``array_row`` and
    ``array_col``. With ``tissue_only`` only the points whose centre falls on tissue are kept.

    Parameters
    ----------
    sdata
        Sections following the package's data model (an image with its micrometre transformation suffices).
    image_key
        The image element, e.g. ``"C6_image"`` (spatialdata-io: ``"C6_full_image"``); default: the only section's.
    pixel_size_um
        Micrometres per pixel of the image's finest level; default: found as :func:`st_from_he.pp.extract_patches`
        says.
    table_key
        Table whose spots tell the image's section and resolution when the image has no micrometre coordinate
        system; default: any table annotating circles on the image.
    spacing_um
        Centre-to-centre distance of neighbouring pseudo-spots in micrometres (Visium: 100; legacy ST: 200).
    diameter_um
        Diameter of each circle in micrometres.
    tissue_only
        Keep only points on tissue. The mask is the labels element ``tissue_key``, else an existing
        ``f"{S}_tissue"``, else one computed with :func:`st_from_he.pp.detect_tissue` (not stored).
    tissue_key
        Labels element holding the tissue mask (non-zero = tissue).
    key_added
        Key of the new shapes element; default ``f"{S}_grid"`` for the image's sample ``S``.
    overwrite
        Replace an existing element ``key_added``.
    max_spots
        Largest number of grid points (over the whole image, before keeping those on tissue) this call builds; a
        finer grid is refused with its size, before any memory is used. The default, 2 million, covers a
        25 x 25 mm slide at 20 um spacing; every pseudo-spot later costs a patch and a prediction, so raise it
        knowingly.

    Returns
    -------
    The key of the new circles element: centres in pixels of the image, radius in pixels of that image, index
    ``0..n-1`` in row-major order, columns ``array_row`` and ``array_col`` (grid indices), and the image's
    transformations (so the circles share every coordinate system of the image).

    Examples
    --------
    >>> import st_from_he as sth
    >>> sdata = sth.datasets.her2st(["C6"], path="../shared/data/her2st")
    >>> key = sth.pp.spot_grid(sdata, "C6_image", spacing_um=100, tissue_only=False)
    >>> key, len(sdata.shapes[key])
    ('C6_grid', 4416)
    """
    from st_from_he.io._section import spots_element

    check_sdata(sdata, "sth.pp.spot_grid")
    if image_key is None:
        image_key = only_image(sdata, "sth.pp.spot_grid")
    spacing_um = check_number(spacing_um, "spacing_um", unit="micrometres")
    diameter_um = check_number(diameter_um, "diameter_um", unit="micrometres")
    max_spots = check_number(max_spots, "max_spots", integer=True, unit="spots")
    sample, px0, levels = image_of(sdata, image_key, table_key=table_key, pixel_size_um=pixel_size_um)
    key = f"{sample}_grid" if key_added is None else key_added
    if not isinstance(key, str) or not key:
        raise TypeError(f"`key_added` must be a non-empty element name, got {key!r}.")
    if not overwrite and key in sdata:
        raise KeyError(f"Element {key!r} exists; pass `overwrite=True` or another `key_added`.")
    height, width = levels[0].shape[1:]
    spacing_px = spacing_um / px0
    n_cols, n_rows = math.ceil(width / spacing_px), math.ceil(height / spacing_px)
    if n_cols * n_rows > max_spots:
        coarsest = spacing_um * math.sqrt(n_cols * n_rows / max_spots)
        raise ValueError(
            f"A {spacing_um:g} um grid over {image_key!r} ({width * px0 / 1000:.1f} x {height * px0 / 1000:.1f} mm) "
            f"has {n_cols * n_rows:,} points, above `max_spots`={max_spots:,}. Use a larger `spacing_um` (about "
            f"{math.ceil(coarsest):g} um or more fits), or pass a larger `max_spots=` if you have the memory and time "
            f"for that many patches and predictions."
        )
    xs = width / 2 + (np.arange(n_cols) - (n_cols - 1) / 2) * spacing_px
    ys = height / 2 + (np.arange(n_rows) - (n_rows - 1) / 2) * spacing_px
    rows, cols = np.divmod(np.arange(n_rows * n_cols), n_cols)
    centres = np.column_stack([xs[cols], ys[rows]])

    if tissue_only:
        on_tissue = _on_tissue(sdata, image_key, sample, centres, tissue_key, px0)
        centres, rows, cols = centres[on_tissue], rows[on_tissue], cols[on_tissue]
        if not len(centres):
            raise ValueError(
                f"No grid point of {image_key!r} falls on tissue; check the tissue mask or pass `tissue_only=False`."
            )
    from spatialdata.transformations import set_transformation

    element = spots_element(centres, diameter_um / 2 / px0, sample, px0)
    set_transformation(element, systems_of(sdata, image_key), set_all=True)  # the circles lie on the image
    element["array_row"] = rows
    element["array_col"] = cols
    sdata[key] = element
    logger.info(
        "Added %r: %d pseudo-spots of %g um on a %g um square grid%s",
        key,
        len(centres),
        diameter_um,
        spacing_um,
        " on tissue" if tissue_only else "",
    )
    return key


def _on_tissue(
    sdata, image_key: str, sample: str, centres: np.ndarray, tissue_key: str | None, pixel_size_um: float
) -> np.ndarray:
    """Whether each centre (image pixels) lies on tissue."""
    if tissue_key is None and f"{sample}_tissue" in sdata.labels:
        tissue_key = f"{sample}_tissue"
        logger.info("Using the tissue mask %r", tissue_key)
    if tissue_key is not None:
        if tissue_key not in sdata.labels:
            raise KeyError(f"No labels element {tissue_key!r}; labels present: {sorted(sdata.labels)}.")
        from ._patches import image_levels

        mask = image_levels(sdata.labels[tissue_key])[0]  # lazy: only the chunks under the centres are read
        to_mask = np.linalg.inv(to_image_pixels(sdata, tissue_key, image_key))
    else:
        from ._tissue import detect_tissue

        mask, (sy, sx) = detect_tissue(sdata, image_key, pixel_size_um=pixel_size_um)
        to_mask = np.diag([1 / sx, 1 / sy, 1.0])
    xy = np.column_stack([centres, np.ones(len(centres))]) @ to_mask.T
    col = np.floor(xy[:, 0]).astype(int)
    row = np.floor(xy[:, 1]).astype(int)
    inside = (row >= 0) & (row < mask.shape[0]) & (col >= 0) & (col < mask.shape[1])
    result = np.zeros(len(centres), dtype=bool)
    if isinstance(mask, np.ndarray):
        result[inside] = mask[row[inside], col[inside]] != 0
    elif inside.any():  # a labels element may be a full-resolution mask: never read it whole
        result[inside] = np.asarray(mask.vindex[row[inside], col[inside]].compute()) != 0
    return result
