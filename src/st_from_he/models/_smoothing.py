"""Test-time smoothing of predictions over neighbouring spots of the same section."""

from __future__ import annotations

import numpy as np
from scipy import sparse

NEIGHBOUR_RADIUS = 1.5
"""Neighbours are the spots within this many grid pitches: the 8 around a spot of a square grid (legacy ST, 1.41
pitches away), the 6 of a hexagonal grid (Visium; the next ring is 1.73 away)."""


def smooth_neighbours(
    values: np.ndarray, positions: np.ndarray, groups=None, *, weight: float = 0.5, radius: float = NEIGHBOUR_RADIUS
) -> np.ndarray:
    """Each spot's values blended with the mean of its neighbours': ``(1 - weight) * own + weight * neighbours``.

    Predictions from one spot's image are noisy in a way its neighbours' are not (each sees other tissue), while
    expression varies smoothly over a few spots; averaging over the grid neighbours removes part of that noise using
    image information only. Neighbours are the spots of the same group (section) within ``radius`` grid pitches,
    the pitch being the section's median distance between nearest spots, so the unit of ``positions`` does not
    matter. Spots without neighbours keep their values.

    Parameters
    ----------
    values
        Spots x genes array.
    positions
        Spot centres ``(n, 2)`` (any unit, the same within a group).
    groups
        Section of each spot (``None``: one section); spots of different sections are never neighbours.
    weight
        Weight of the neighbours' mean, in ``[0, 1]`` (0: unchanged).
    radius
        Neighbourhood radius in grid pitches.

    Returns
    -------
    float32 array like ``values`` (a new array).

    Examples
    --------
    >>> import numpy as np
    >>> from st_from_he.models import smooth_neighbours
    >>> xy = np.array([[0, 0], [1, 0], [2, 0], [10, 0]], dtype=float)
    >>> smooth_neighbours(np.array([[0.0], [3.0], [0.0], [5.0]]), xy, weight=0.5).ravel()
    array([1.5, 1.5, 1.5, 5. ], dtype=float32)
    """
    from scipy.spatial import cKDTree

    values = np.asarray(values, dtype=np.float32)  # float32 throughout: a whole slide's predictions are large
    positions = np.asarray(positions, dtype=np.float64)
    if positions.shape != (len(values), 2):
        raise ValueError(f"`positions` must be ({len(values)}, 2) spot centres, got {positions.shape}.")
    if not np.all(np.isfinite(positions)):
        raise ValueError("`positions` contain NaN or infinite coordinates.")
    if not 0 <= weight <= 1:
        raise ValueError(f"`weight` must be in [0, 1], got {weight}.")
    groups = np.zeros(len(values), dtype=int) if groups is None else np.asarray(groups)
    if len(groups) != len(values):
        raise ValueError(f"`groups` has {len(groups)} entries for {len(values)} spots.")
    out = values.copy()
    if weight == 0:
        return out
    for group in np.unique(groups):
        rows = np.flatnonzero(groups == group)
        if len(rows) < 2:
            continue
        tree = cKDTree(positions[rows])
        nearest = tree.query(positions[rows], k=2)[0][:, 1]
        nearest = nearest[nearest > 0]
        if not len(nearest):  # every spot at one point: no grid
            continue
        pairs = tree.query_pairs(radius * float(np.median(nearest)), output_type="ndarray")
        if not len(pairs):
            continue
        i, j = np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])
        adjacency = sparse.csr_matrix((np.ones(len(i), np.float32), (i, j)), shape=(len(rows), len(rows)))
        degree = np.asarray(adjacency.sum(1), dtype=np.float32).ravel()
        has = degree > 0
        mean = adjacency @ values[rows]
        mean[has] /= degree[has, None]
        out[rows[has]] = (1 - weight) * values[rows[has]] + weight * mean[has]
    return out
