"""log1p(counts per 10,000): the package's expression scale (evaluation protocol: normalize_total(1e4), then log1p)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from st_from_he._logging import logger
from st_from_he._sdata import check_sdata, find_table
from st_from_he._validate import check_number, check_raw_counts

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

TARGET_SUM = 1e4


def log_normalize(counts, *, target_sum: float = TARGET_SUM, keep_sparse: bool = False):
    """``log1p`` of counts scaled to ``target_sum`` per spot (row), as float32.

    The same numbers as :func:`scanpy.pp.normalize_total` with ``target_sum`` followed by :func:`scanpy.pp.log1p`,
    computed in float64 and returned as float32. Spots without counts stay zero. The input is not modified.

    Parameters
    ----------
    counts
        Spots x genes raw counts, dense or sparse.
    target_sum
        Total each spot is scaled to before the logarithm: one number, or one per spot (an array of ``n`` values,
        e.g. each section's median total, as :func:`scanpy.pp.normalize_total` with ``target_sum=None`` per section).
    keep_sparse
        Return a CSR matrix when ``counts`` is sparse (zeros stay zeros); by default a dense array.

    Returns
    -------
    float32 array (or CSR matrix) of the same shape as ``counts``.
    """
    target_sum = np.asarray(target_sum, dtype=np.float64)
    n_spots = np.shape(counts)[0] if np.ndim(counts) else 0
    if target_sum.ndim > 1 or (target_sum.ndim == 1 and len(target_sum) != n_spots):
        raise ValueError(f"`target_sum` must be one number or one per spot ({n_spots}), got shape {target_sum.shape}.")
    if not np.all(np.isfinite(target_sum)) or np.any(target_sum <= 0):
        raise ValueError(f"`target_sum` must be positive and finite, got {target_sum.min()}.")
    if sparse.issparse(counts):
        x = sparse.csr_matrix(counts, dtype=np.float64, copy=True)
        totals = np.asarray(x.sum(axis=1)).ravel()
        factor = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        x.data *= np.repeat(factor, np.diff(x.indptr))
        np.log1p(x.data, out=x.data)
        x = x.astype(np.float32)
        return x if keep_sparse else x.toarray()
    x = np.array(counts, dtype=np.float64)  # a copy
    if x.ndim != 2:
        raise ValueError(f"Expected a spots x genes matrix, got an array of shape {x.shape}.")
    totals = x.sum(axis=1)
    factor = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    x *= factor[:, None]
    np.log1p(x, out=x)
    return x.astype(np.float32)


def table_of(sdata, table_key: str | None, function: str) -> tuple[str, AnnData]:
    """The key and table ``table_key`` of a SpatialData (or an AnnData itself), with clear errors naming ``function``.

    ``table_key=None`` takes ``"table"``, else the only table (see :func:`st_from_he._sdata.find_table`).
    """
    from anndata import AnnData

    if isinstance(sdata, AnnData):
        return (table_key or "adata"), sdata
    check_sdata(sdata, function, needs_image=False)
    table_key = find_table(sdata, table_key)
    return table_key, sdata.tables[table_key]


def normalize(
    sdata: SpatialData | AnnData,
    *,
    table_key: str | None = None,
    target_sum: float = TARGET_SUM,
    key_added: str = "lognorm",
    overwrite: bool = False,
) -> None:
    """Store log1p(counts per ``target_sum``) of the raw counts in a new layer; ``X`` keeps the raw counts.

    This is the package's expression scale (the evaluation protocol: ``normalize_total(1e4)`` then ``log1p``) and the
    scale of :func:`st_from_he.tl.predict_expression`'s output, so measured and predicted values compare directly.

    Parameters
    ----------
    sdata
        Sections whose table ``table_key`` holds raw counts in ``X`` (or an :class:`~anndata.AnnData` table itself).
    table_key
        The table to normalise; default ``"table"``, else the only table.
    target_sum
        Total each spot is scaled to before the logarithm.
    key_added
        Name of the new layer.
    overwrite
        Replace an existing layer ``key_added``.

    Returns
    -------
    Nothing; writes to the table:

    - ``layers[key_added]``: float32 log1p(CP10k) values (sparse if ``X`` is sparse);
    - ``uns[key_added]["params"]``: ``{"target_sum": ..., "log1p": True, "source": "X"}``.

    Examples
    --------
    >>> import st_from_he as sth
    >>> sdata = sth.datasets.her2st(["C6"], path="../shared/data/her2st")
    >>> sth.pp.normalize(sdata)
    >>> sdata.tables["table"].layers["lognorm"].dtype
    dtype('float32')
    """
    table_key, table = table_of(sdata, table_key, "sth.pp.normalize")
    target_sum = check_number(target_sum, "target_sum", unit="counts")
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"`key_added` must be a non-empty layer name, got {key_added!r}.")
    if not overwrite and (key_added in table.layers or key_added in table.uns):
        raise ValueError(
            f"Table {table_key!r} already has layers[{key_added!r}] or uns[{key_added!r}]; pass `overwrite=True` or "
            f"another `key_added`."
        )
    check_raw_counts(table.X, where=f"Table {table_key!r} X")
    table.layers[key_added] = log_normalize(table.X, target_sum=target_sum, keep_sparse=sparse.issparse(table.X))
    table.uns[key_added] = {"params": {"target_sum": float(target_sum), "log1p": True, "source": "X"}}
    logger.info("Wrote layers[%r]: log1p(counts per %g) of %d spots x %d genes", key_added, target_sum, *table.shape)
