"""Spatial context: fusion of multi-scale patch features and attention over neighbouring spots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn


def neighbour_index(positions_um, groups=None, *, radius_um: float, max_neighbours: int) -> np.ndarray:
    """The nearest spots of each spot's section within a radius, as row indices padded with ``-1``.

    Row ``i`` lists the other spots of ``i``'s group (section) whose centres lie within ``radius_um`` of ``i``'s,
    nearest first (ties broken by the neighbour's x, then y, so the choice does not depend on the order of the
    spots), at most ``max_neighbours`` of them. Spots at the same position count as neighbours.

    Parameters
    ----------
    positions_um
        Spot centres ``(n, 2)`` in micrometres.
    groups
        Section of each spot (``None``: one section); spots of different sections are never neighbours.
    radius_um
        Neighbourhood radius in micrometres (inclusive). On a legacy ST grid (200 um pitch) 210 gives the 4
        nearest spots and 300 the 8 around a spot (4 at 200 um, 4 diagonal at 283 um); on Visium (100 um
        between neighbours) 110 gives the ring of 6.
    max_neighbours
        Most neighbours kept per spot (the nearest).

    Returns
    -------
    int64 array ``(n, K)``: row indices into ``positions_um``, ``-1`` where a spot has fewer than ``K``
    neighbours. ``K`` is the largest number of neighbours any spot has, at most ``max_neighbours`` (``0`` when no
    spot has one).

    Examples
    --------
    >>> import numpy as np
    >>> from st_from_he.models._context import neighbour_index
    >>> xy = np.array([[0, 0], [200, 0], [400, 0], [2000, 0]], dtype=float)
    >>> neighbour_index(xy, radius_um=250, max_neighbours=8)
    array([[ 1, -1],
           [ 0,  2],
           [ 1, -1],
           [-1, -1]])
    """
    from scipy.spatial import cKDTree

    positions = np.asarray(positions_um, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise ValueError(f"`positions_um` must be spot centres (n, 2) in micrometres, got shape {positions.shape}.")
    if not np.all(np.isfinite(positions)):
        raise ValueError("`positions_um` contain NaN or infinite coordinates.")
    if isinstance(radius_um, bool) or not np.isfinite(radius_um) or radius_um <= 0:
        raise ValueError(f"`radius_um` must be a positive number of micrometres, got {radius_um!r}.")
    if isinstance(max_neighbours, bool) or int(max_neighbours) != max_neighbours or max_neighbours < 0:
        raise ValueError(f"`max_neighbours` must be a whole number >= 0, got {max_neighbours!r}.")
    n = len(positions)
    codes = np.zeros(n, dtype=np.int64) if groups is None else pd.factorize(np.asarray(groups))[0]
    if len(codes) != n:
        raise ValueError(f"`groups` has {len(codes)} entries for {n} spots; give one per spot.")
    rows, cols = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for code in np.unique(codes):
        members = np.flatnonzero(codes == code)
        pairs = cKDTree(positions[members]).query_pairs(float(radius_um), output_type="ndarray")
        i, j = members[pairs[:, 0]], members[pairs[:, 1]]
        rows += [i, j]  # both directions
        cols += [j, i]
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    distance = np.hypot(*(positions[rows] - positions[cols]).T)
    order = np.lexsort((positions[cols, 1], positions[cols, 0], distance, rows))
    rows, cols = rows[order], cols[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)  # position within each spot's sorted run
    k = int(min(max_neighbours, rank.max() + 1 if len(rank) else 0))
    keep = rank < k
    out = np.full((n, k), -1, dtype=np.int64)
    out[rows[keep], rank[keep]] = cols[keep]
    return out


class MultiScaleFusion(nn.Module):
    """Fuse per-scale features ``(B, S, D)`` into one feature ``(B, D)``.

    The spot scale (index 0) passes through a residual connection and the concatenated scales are mixed in by a
    linear layer that starts at zero, so training starts from the single-scale model. With ``n_scales == 1`` the
    module has no parameters and returns the spot scale unchanged.

    Parameters
    ----------
    dim
        Feature dimension ``D``.
    n_scales
        Number of scales ``S``.
    """

    def __init__(self, dim: int, n_scales: int = 1):
        super().__init__()
        self.n_scales = n_scales
        if n_scales > 1:
            self.norm = nn.LayerNorm(n_scales * dim)
            self.mix = nn.Linear(n_scales * dim, dim)
            nn.init.zeros_(self.mix.weight)
            nn.init.zeros_(self.mix.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Fuse ``(B, S, D)`` into ``(B, D)``."""
        if features.shape[1] != self.n_scales:
            raise ValueError(f"Expected {self.n_scales} scales, got {features.shape[1]}.")
        if self.n_scales == 1:
            return features[:, 0]
        return features[:, 0] + self.mix(self.norm(features.flatten(1)))


class NeighbourAttention(nn.Module):
    """Let each spot's embedding attend over its own and its neighbours' embeddings.

    ``out = LayerNorm(x + MultiheadAttention(x, [x; neighbours]))``. The spot itself is always a key, so a spot
    whose neighbours are all padding stays well defined. With no neighbours (``K == 0``) the input is returned
    unchanged.

    Parameters
    ----------
    dim
        Embedding dimension ``D``.
    n_heads
        Attention heads.
    dropout
        Attention dropout.
    """

    def __init__(self, dim: int, n_heads: int = 8, dropout: float = 0.0):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, n_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, neighbours: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Update spot embeddings ``(B, D)`` from neighbour embeddings ``(B, K, D)``.

        ``padding_mask`` ``(B, K)`` is ``True`` where a neighbour slot is padding.
        """
        if neighbours.shape[1] == 0:
            return x
        query = x[:, None]
        keys = torch.cat([query, neighbours], dim=1)
        mask = None
        if padding_mask is not None:
            mask = torch.cat([padding_mask.new_zeros(x.shape[0], 1), padding_mask], dim=1)
        attended, _ = self.attention(query, keys, keys, key_padding_mask=mask, need_weights=False)
        return self.norm(x + attended[:, 0])
