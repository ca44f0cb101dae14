"""Micrometres per pixel from the spot grid when no file or user says it."""

from __future__ import annotations

import numpy as np

# Centre-to-centre distance of neighbouring spots, per technology.
GRID_PITCH_UM = {"st": 200.0, "visium": 100.0}
# Physical spot diameters, per technology.
SPOT_DIAMETER_UM = {"st": 100.0, "visium": 55.0}


def infer_pixel_size(spatial_px: np.ndarray, technology: str) -> float:
    """Micrometres per pixel from the median nearest-neighbour distance of spot centres on a known grid.

    Parameters
    ----------
    spatial_px
        Spot centres in pixels, shape ``(n_spots, 2)``.
    technology
        ``"st"`` (legacy Spatial Transcriptomics, 200 um pitch) or ``"visium"`` (100 um pitch).
    """
    from scipy.spatial import cKDTree

    if technology not in GRID_PITCH_UM:
        raise ValueError(f"Unknown technology {technology!r}; expected one of {sorted(GRID_PITCH_UM)}.")
    spatial_px = np.asarray(spatial_px, dtype=float)
    if len(spatial_px) < 3:
        raise ValueError(
            f"Cannot infer the image resolution from {len(spatial_px)} spots; pass `pixel_size_um=` explicitly."
        )
    # The nearest neighbour alone is biased short by detection jitter (a minimum over several noisy distances), so
    # take the median over all grid neighbours: every distance within 1.25x of the nearest-neighbour median (the
    # next shell is 1.41x on a square grid, 1.73x on a hexagonal one).
    dist, _ = cKDTree(spatial_px).query(spatial_px, k=min(7, len(spatial_px)))
    nearest = np.median(dist[:, 1])
    neighbours = dist[:, 1:][dist[:, 1:] < 1.25 * nearest]
    pitch_px = float(np.median(neighbours))
    if not np.isfinite(pitch_px) or pitch_px <= 0:
        raise ValueError("Spot centres coincide; cannot infer the image resolution. Pass `pixel_size_um=`.")
    return GRID_PITCH_UM[technology] / pitch_px
