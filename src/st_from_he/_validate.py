"""Checks on user data that give a clear error naming the problem and the fix."""

from __future__ import annotations

import numpy as np
from scipy import sparse


def check_raw_counts(x, *, where: str) -> None:
    """Raise if ``x`` is not a matrix of finite, non-negative whole numbers (raw counts).

    Parameters
    ----------
    x
        Dense or sparse matrix.
    where
        What ``x`` is, for the message (e.g. ``"table 'table' X"``).
    """
    values = x.data if sparse.issparse(x) else np.asarray(x)
    if values.size == 0:
        return
    if not np.issubdtype(values.dtype, np.number):
        raise TypeError(f"{where} must be numeric raw counts, got dtype {values.dtype}.")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{where} contains NaN or infinite values; raw counts are required.")
    if values.min() < 0:
        raise ValueError(f"{where} contains negative values; raw counts are required.")
    if not np.issubdtype(values.dtype, np.integer) and not np.all(np.mod(values, 1) == 0):
        raise ValueError(
            f"{where} contains non-integer values: it looks normalised or log-transformed, but raw counts are "
            f"required. Pass the raw counts (e.g. from `adata.raw` or a counts layer)."
        )


def is_raw_counts(x) -> bool:
    """Whether ``x`` (dense or sparse) holds finite, non-negative whole numbers, i.e. could be raw counts."""
    try:
        check_raw_counts(x, where="X")
    except (TypeError, ValueError):
        return False
    return True


def check_table_raw_counts(table, *, table_key: str = "table") -> None:
    """Raise a clear error if the table's ``X`` does not hold raw counts (as training and gene selection need).

    Tables built by :func:`st_from_he.io.attach_histology` from normalised data keep ``X`` as given and say so in
    ``table.uns["st_from_he"]["raw_counts"]``; the message then names that origin and the fix.

    Parameters
    ----------
    table
        The :class:`~anndata.AnnData` table.
    table_key
        Its key in the :class:`~spatialdata.SpatialData`, for the message.
    """
    from ._sdata import UNS_KEY

    if table.uns.get(UNS_KEY, {}).get("raw_counts") is False:
        raise ValueError(
            f"Table {table_key!r} X does not hold raw counts (it was attached from normalised or log-transformed "
            f"data). Training needs raw counts: call `sth.pp.attach_histology` on an AnnData whose X holds the raw "
            f"counts (e.g. `adata.X = adata.layers['counts']` or `adata.raw.to_adata()` first)."
        )
    check_raw_counts(table.X, where=f"Table {table_key!r} X")


def check_spots_in_image(spatial_px: np.ndarray, height: int, width: int, *, sample: str) -> None:
    """Raise if spot centres (x, y in pixels) fall outside an image of ``height`` x ``width`` pixels."""
    spatial_px = np.asarray(spatial_px, dtype=float)
    if not np.all(np.isfinite(spatial_px)):
        raise ValueError(f"Sample {sample!r}: some spot coordinates are NaN or infinite.")
    outside = (
        (spatial_px[:, 0] < 0) | (spatial_px[:, 0] >= width) | (spatial_px[:, 1] < 0) | (spatial_px[:, 1] >= height)
    )
    if outside.any():
        raise ValueError(
            f"Sample {sample!r}: {int(outside.sum())} of {len(spatial_px)} spot centres lie outside the "
            f"{width} x {height} px image (e.g. x, y = {spatial_px[outside][0].tolist()}). Are the coordinates in "
            f"pixels of this image (x = column, y = row), not of a scaled copy or swapped?"
        )
