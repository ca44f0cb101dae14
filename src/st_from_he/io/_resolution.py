"""Micrometres per pixel from the spot grid when no file or user says it."""

from __future__ import annotations

import numpy as np

# Centre-to-centre distance of neighbouring spots, per technology.
GRID_PITCH_UM = {"st": 200.0, "visium": 100.0}
# Physical spot diameters, per technology.
SPOT_DIAMETER_UM = {"st": 100.0, "visium": 55.0}


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
        ``"st"`` (legacy Spatial Transcriptomics, 200 um pitch) or ``"visium"`` (100 um pitch).
    """
    if technology not in GRID_PITCH_UM:
        raise ValueError(f"Unknown technology {technology!r}; expected one of {sorted(GRID_PITCH_UM)}.")
    return GRID_PITCH_UM[technology] / grid_pitch_px(spatial_px)


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
