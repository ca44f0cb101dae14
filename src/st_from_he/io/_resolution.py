"""Micrometres per pixel from the spot grid when no file or user says it, and a cross-check of a given one.

Array geometry (centre-to-centre distances between spots on the slide):

- legacy Spatial Transcriptomics "1k" array: a square grid of 33 x 35 positions, 200 um between neighbouring spots;
  one step of the array coordinate ``x`` or ``y`` is 200 um.
- legacy ST "2k" array: 67 x 64 positions of which only every other one (a checkerboard) holds a spot, so the
  nearest neighbours are diagonal, 141 um (= 200 / sqrt 2) apart; one array step is 100 um. Taking the 1k pitch for
  a 2k array would be 41 % off.
- Visium: a hexagonal grid with 100 um between neighbours; one step of ``array_col`` is 50 um (spots of a row sit on
  every other column) and one step of ``array_row`` is 100 * sqrt(3) / 2 = 86.6 um.

Where a reader has array coordinates, the pixels per array step (an affine fit of pixel to array coordinates) give
the resolution robustly; the spot-centre distances alone are the fallback.
"""

from __future__ import annotations

import warnings

import numpy as np

from st_from_he._logging import logger

# Centre-to-centre distance of neighbouring spots, per technology (legacy ST: the 1k array).
GRID_PITCH_UM = {"st": 200.0, "visium": 100.0}
# Physical spot diameters, per technology.
SPOT_DIAMETER_UM = {"st": 100.0, "visium": 55.0}
# Micrometres per step of the array coordinates (column, row), per array layout.
ARRAY_STEP_UM = {"st_1k": (200.0, 200.0), "st_2k": (100.0, 100.0), "visium": (50.0, 50.0 * np.sqrt(3.0))}
_LAYOUT_NAMES = {
    "st_1k": "legacy ST 1k array (200 um per array step)",
    "st_2k": "legacy ST 2k array (100 um per array step, 141 um between neighbours)",
    "visium": "Visium array (100 um between neighbours)",
}
# Distance between nearest spots, per array layout.
NEIGHBOUR_UM = {"st_1k": 200.0, "st_2k": 200.0 / np.sqrt(2.0), "visium": 100.0}
# A resolution further than this (relative) from the one implied by the spot grid is warned about.
RESOLUTION_TOLERANCE = 0.25


def grid_pitch_px(spatial_px: np.ndarray) -> float:
    """Centre-to-centre distance of neighbouring spots in pixels: the median over all grid neighbours.

    Parameters
    ----------
    spatial_px
        Spot centres in pixels, shape ``(n_spots, 2)``.
    """
    from scipy.spatial import cKDTree

    spatial_px = np.asarray(spatial_px, dtype=float)
    if spatial_px.ndim != 2 or spatial_px.shape[1] != 2:
        raise ValueError(f"Spot centres must have shape (n_spots, 2), got {spatial_px.shape}.")
    if len(spatial_px) < 3:
        raise ValueError(
            f"Cannot infer the image resolution from {len(spatial_px)} spots; pass `pixel_size_um=` explicitly."
        )
    if not np.all(np.isfinite(spatial_px)):
        raise ValueError("Some spot centres are NaN or infinite; cannot infer the image resolution from them.")
    # The nearest neighbour alone is biased short by detection jitter (a minimum over several noisy distances), so
    # take the median over all grid neighbours: every distance within 1.25x of the nearest-neighbour median (the
    # next shell is 1.41x on a square grid, 1.73x on a hexagonal one).
    dist, _ = cKDTree(spatial_px).query(spatial_px, k=min(7, len(spatial_px)))
    nearest = np.median(dist[:, 1])
    neighbours = dist[:, 1:][dist[:, 1:] < 1.25 * nearest]
    pitch_px = float(np.median(neighbours)) if neighbours.size else float("nan")
    if not np.isfinite(pitch_px) or pitch_px <= 0:
        raise ValueError("Spot centres coincide; cannot infer the image resolution. Pass `pixel_size_um=`.")
    return pitch_px


def infer_pixel_size(spatial_px: np.ndarray, technology: str) -> float:
    """Micrometres per pixel from the median nearest-neighbour distance of spot centres on a known grid.

    Parameters
    ----------
    spatial_px
        Spot centres in pixels, shape ``(n_spots, 2)``.
    technology
        ``"st"`` (legacy Spatial Transcriptomics: 200 um pitch on the 1k array, 141 um on the 2k array, told apart by
        the neighbours' direction, see :func:`st_layout_from_pixels`) or ``"visium"`` (100 um pitch).
    """
    if technology not in GRID_PITCH_UM:
        raise ValueError(f"Unknown technology {technology!r}; expected one of {sorted(GRID_PITCH_UM)}.")
    pitch_px = grid_pitch_px(spatial_px)
    if technology == "st" and st_layout_from_pixels(spatial_px) == "st_2k":
        return NEIGHBOUR_UM["st_2k"] / pitch_px
    return GRID_PITCH_UM[technology] / pitch_px


def st_layout_from_pixels(spatial_px: np.ndarray) -> str:
    """``"st_2k"`` if neighbouring spots lie diagonally in the image (the 2k array's checkerboard), else ``"st_1k"``.

    Without array coordinates the two arrays differ only in orientation: the 2k array is a square grid of 141 um
    turned by 45 degrees against the array axes, which the scanner's image axes follow.
    """
    from scipy.spatial import cKDTree

    spatial_px = np.asarray(spatial_px, dtype=float)
    spatial_px = spatial_px[np.all(np.isfinite(spatial_px), axis=1)]
    if len(spatial_px) < 3:
        return "st_1k"
    _, index = cKDTree(spatial_px).query(spatial_px, k=2)
    step = np.abs(spatial_px[index[:, 1]] - spatial_px)
    angle = np.degrees(np.arctan2(step[:, 1], step[:, 0]))
    return "st_2k" if np.median(np.minimum(angle, 90 - angle)) > 30 else "st_1k"


def implied_pixel_size(
    spatial_px: np.ndarray, technology: str, array_col=None, array_row=None
) -> tuple[float | None, str]:
    """The pixel size the spot grid implies, and the grid's name, for messages.

    Array coordinates, when given, decide the layout (legacy ST 1k or 2k) and give the pixels per array step; else
    the spot-centre distances do (:func:`infer_pixel_size`). ``(None, name)`` when neither can (fewer than 3 spots,
    or coinciding ones).
    """
    if technology not in GRID_PITCH_UM:
        raise ValueError(f"Unknown technology {technology!r}; expected one of {sorted(GRID_PITCH_UM)}.")
    spatial_px = np.asarray(spatial_px, dtype=float)
    if array_col is not None and array_row is not None:
        col = np.asarray(_numeric(array_col), dtype=float)
        row = np.asarray(_numeric(array_row), dtype=float)
        layout = "visium" if technology == "visium" else st_array_layout(col, row)
        implied = pixel_size_from_array(col, row, spatial_px, layout)
        if implied is not None:
            return implied, layout_name(layout)
    else:
        layout = "visium" if technology == "visium" else st_layout_from_pixels(spatial_px)
    pitch_um = GRID_PITCH_UM["visium"] if layout == "visium" else NEIGHBOUR_UM[layout]
    try:
        return pitch_um / grid_pitch_px(spatial_px), layout_name(layout)
    except ValueError:  # too few or coinciding spots: callers that must infer raise the clear message then
        return None, layout_name(layout)


def _numeric(values) -> np.ndarray:
    """Values as floats, anything non-numeric as NaN (array coordinates may arrive as strings or categories)."""
    import pandas as pd

    return pd.to_numeric(pd.Series(np.asarray(values)), errors="coerce").to_numpy(float)


def technology_from_pitch(pitch_um: float, *, tolerance: float = 0.15) -> str | None:
    """The technology whose grid pitch is within ``tolerance`` (relative) of ``pitch_um``, else ``None``."""
    for technology, pitch in GRID_PITCH_UM.items():
        if abs(pitch_um - pitch) <= tolerance * pitch:
            return technology
    return None


def technology_from_diameter(diameter_um: float, *, tolerance: float = 0.15) -> str | None:
    """The technology whose spot diameter is within ``tolerance`` (relative) of ``diameter_um``, else ``None``."""
    for technology, diameter in SPOT_DIAMETER_UM.items():
        if abs(diameter_um - diameter) <= tolerance * diameter:
            return technology
    return None


def st_array_layout(array_col: np.ndarray, array_row: np.ndarray) -> str:
    """``"st_1k"`` or ``"st_2k"``: whether legacy ST spots sit on a square grid or on a checkerboard (2k array).

    On the 1k array neighbouring spots are one array step apart; on the 2k array only positions of one parity of
    ``x + y`` hold spots, so the nearest spot is a diagonal step away. Also a 2k array has coordinates beyond the 1k
    array's 33 x 35.
    """
    from scipy.spatial import cKDTree

    coords = np.c_[np.asarray(array_col, dtype=float), np.asarray(array_row, dtype=float)]
    coords = coords[np.all(np.isfinite(coords), axis=1)]
    if len(coords) < 2:
        return "st_1k"
    dist, _ = cKDTree(coords).query(coords, k=2)
    nearest = np.median(dist[:, 1])
    if 1.2 < nearest < 1.7:  # sqrt(2): diagonal neighbours only
        return "st_2k"
    if coords[:, 0].max() > 34 or coords[:, 1].max() > 36:
        return "st_2k"
    return "st_1k"


def array_step_px(array_col: np.ndarray, array_row: np.ndarray, spatial_px: np.ndarray) -> tuple[float, float] | None:
    """Pixels per step of the array column and of the array row, from an affine fit of pixel to array coordinates.

    Spots the spot detector moved far from their array position (outliers of the first fit) are left out of a second
    fit. ``None`` if the spots do not span two directions of the array (fewer than 3, or all in one line).
    """
    design = np.c_[np.asarray(array_col, dtype=float), np.asarray(array_row, dtype=float), np.ones(len(array_col))]
    target = np.asarray(spatial_px, dtype=float)[:, :2]
    ok = np.all(np.isfinite(design), axis=1) & np.all(np.isfinite(target), axis=1)
    design, target = design[ok], target[ok]
    if len(design) < 3 or np.linalg.matrix_rank(design) < 3:
        return None
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    residual = np.linalg.norm(design @ coef - target, axis=1)
    keep = residual <= max(3 * np.median(residual), 1e-9)
    if keep.sum() >= 3 and np.linalg.matrix_rank(design[keep]) == 3:
        coef, *_ = np.linalg.lstsq(design[keep], target[keep], rcond=None)
    col_px, row_px = float(np.linalg.norm(coef[0])), float(np.linalg.norm(coef[1]))
    if not (col_px > 0 and row_px > 0):
        return None
    return col_px, row_px


def pixel_size_from_array(
    array_col: np.ndarray, array_row: np.ndarray, spatial_px: np.ndarray, layout: str
) -> float | None:
    """Micrometres per pixel implied by the array coordinates and their pixel positions on a known layout.

    Parameters
    ----------
    array_col, array_row
        Array coordinates of the spots (legacy ST: ``x``, ``y`` of the spot file; Visium: ``array_col``,
        ``array_row``).
    spatial_px
        Spot centres in pixels, shape ``(n_spots, 2)``.
    layout
        A key of :data:`ARRAY_STEP_UM` (``"st_1k"``, ``"st_2k"``, ``"visium"``).

    Returns
    -------
    The pixel size, or ``None`` when the spots do not determine it (see :func:`array_step_px`).
    """
    steps = array_step_px(array_col, array_row, spatial_px)
    if steps is None:
        return None
    col_um, row_um = ARRAY_STEP_UM[layout]
    return float(np.mean([col_um / steps[0], row_um / steps[1]]))


def layout_name(layout: str) -> str:
    """Words for an array layout, for messages."""
    return _LAYOUT_NAMES.get(layout, layout)


def check_pixel_size(pixel_size_um: float, implied_um: float | None, *, sample: str, source: str, grid: str) -> None:
    """Warn (``UserWarning`` and the log) when a resolution disagrees with the spot grid by more than 25 %.

    Parameters
    ----------
    pixel_size_um
        The resolution about to be used.
    implied_um
        The one implied by the spot grid; ``None`` skips the check.
    sample
        Section id, for the message.
    source
        Where ``pixel_size_um`` came from (e.g. ``"given"``), for the message.
    grid
        What the grid is (e.g. ``layout_name("st_1k")``), for the message.
    """
    if implied_um is None or not np.isfinite(implied_um):
        return
    ratio = pixel_size_um / implied_um
    if abs(ratio - 1) <= RESOLUTION_TOLERANCE:
        return
    message = (
        f"Sample {sample!r}: the pixel size {pixel_size_um:.4g} um ({source}) is {ratio:.2f}x the {implied_um:.4g} um "
        f"that the spot positions imply on the {grid}. Patches would be cut at the wrong size. Check `pixel_size_um` "
        f"and that the spot coordinates are in pixels of this image (not of a scaled copy)."
    )
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=3)
