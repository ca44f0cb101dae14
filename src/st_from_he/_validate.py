"""Checks on user data that give a clear error naming the problem and the fix."""

from __future__ import annotations

import numbers

import numpy as np
from scipy import sparse


def check_raw_counts(x, *, where: str, genes=None, spots=None) -> None:
    """Raise if ``x`` is not a matrix of finite, non-negative whole numbers (raw counts).

    Parameters
    ----------
    x
        Dense or sparse matrix.
    where
        What ``x`` is, for the message (e.g. ``"table 'table' X"`` or ``"Counts file 'C6_counts.tsv.gz'"``).
    genes
        Column names of ``x``; when given, the message names the first offending gene.
    spots
        Row names of ``x``; when given, the message names the first offending spot.
    """
    values = x.data if sparse.issparse(x) else np.asarray(x)
    if values.size == 0:
        return
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise TypeError(f"{where} must be numeric raw counts, got dtype {values.dtype}.")
    if not np.all(np.isfinite(values)):
        bad = "NaN or infinite values"
        raise ValueError(
            f"{where} contains {bad}{_first(x, ~np.isfinite(values), genes, spots)}; raw counts are required."
        )
    if values.min() < 0:
        raise ValueError(
            f"{where} contains negative values{_first(x, values < 0, genes, spots)}; raw counts are required."
        )
    if not np.issubdtype(values.dtype, np.integer):
        fractional = np.mod(values, 1) != 0
        if fractional.any():
            raise ValueError(
                f"{where} contains non-integer values{_first(x, fractional, genes, spots)}: it looks normalised or "
                f"log-transformed, but raw counts are required. Pass the raw counts (e.g. from `adata.raw` or a counts "
                f"layer)."
            )


def _first(x, bad: np.ndarray, genes, spots) -> str:
    """`` (e.g. gene 'X', spot 'Y': value)`` for the first True entry of ``bad`` (a mask over ``x``'s stored values)."""
    if genes is None and spots is None:
        return ""
    k = int(np.flatnonzero(np.ravel(bad))[0])
    if sparse.issparse(x):
        coo = x.tocoo()
        row, col, value = int(coo.row[k]), int(coo.col[k]), coo.data[k]
    else:
        dense = np.asarray(x)
        row, col = np.unravel_index(k, dense.shape) if dense.ndim == 2 else (k, 0)
        value = dense.ravel()[k]
    parts = []
    if genes is not None:
        parts.append(f"gene {str(np.asarray(genes)[col])!r}")
    if spots is not None:
        parts.append(f"spot {str(np.asarray(spots)[row])!r}")
    return f" (e.g. {', '.join(parts)}: {value})"


def counts_dtype(x, *, where: str) -> type:
    """The integer dtype that holds the raw counts ``x`` exactly: int32, or int64 when a count exceeds int32.

    Raises
    ------
    ValueError
        If a count does not fit into int64 (a corrupt file, not a count).
    """
    values = x.data if sparse.issparse(x) else np.asarray(x)
    top = values.max() if values.size else 0
    if top <= np.iinfo(np.int32).max:
        return np.int32
    if top <= np.iinfo(np.int64).max:
        return np.int64
    raise ValueError(f"{where} contains a count of {top}, beyond any integer type; the file is probably corrupt.")


def check_number(
    value, name: str, *, positive: bool = True, integer: bool = False, unit: str = "", allow_none: bool = False
) -> float | int | None:
    """``value`` as a float (or int); a clear TypeError or ValueError naming the argument ``name`` otherwise.

    Strings are refused rather than parsed, so that ``pixel_size_um="0.69"`` is caught where it is written; so are
    booleans, NaN, infinities and values out of range.

    Parameters
    ----------
    value
        What the user passed.
    name
        The argument's name, for the message.
    positive
        Require ``value > 0`` (else ``value >= 0``).
    integer
        Require a whole number, returned as :class:`int`.
    unit
        What the number counts, for the message (e.g. ``"micrometres"``).
    allow_none
        Return ``None`` for ``None`` (an optional argument) instead of refusing it.
    """
    if value is None and allow_none:
        return None
    sign = "positive" if positive else "non-negative"
    noun = "integer" if integer else "number"
    of = f" of {unit}" if unit else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a {sign} {noun}{of}, got {type(value).__name__} {value!r}.")
    if not np.isfinite(value) or (value <= 0 if positive else value < 0) or (integer and int(value) != value):
        finite = "" if (unit or integer) else ", finite"  # a count or a quantity with a unit is finite by its name
        raise ValueError(f"`{name}` must be a {sign}{finite} {noun}{of}, got {value!r}.")
    return int(value) if integer else float(value)


def check_id(value, name: str, *, allow_none: bool = False) -> str | None:
    """``value`` if it is a non-empty string (or ``None`` where allowed); else a TypeError naming ``name``."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value:
        raise TypeError(f"`{name}` must be a non-empty string, got {type(value).__name__} {value!r}.")
    return value


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
