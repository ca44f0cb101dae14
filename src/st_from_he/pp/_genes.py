"""Which genes a model predicts: highly variable or highly expressed per section, or a given list."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from st_from_he._logging import logger
from st_from_he._sdata import as_names, spot_sections
from st_from_he._validate import check_number, check_table_raw_counts

from ._normalize import log_normalize, table_of

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def select_genes(
    sdata: SpatialData | AnnData,
    *,
    n_top: int = 1000,
    method: Literal["hvg", "mean"] = "hvg",
    genes: Sequence[str] | None = None,
    table_key: str | None = None,
    markers: Sequence[str] | None = None,
) -> list[str]:
    """Choose the genes to model, section by section.

    With ``method="hvg"`` each section's spots are normalised to log1p(counts per 10,000) and the ``n_top`` most
    highly variable genes are taken with :func:`scanpy.pp.highly_variable_genes` (``flavor="seurat"``: normalised
    dispersion within mean-expression bins). This flavour needs no extra dependency and is robust on spot data; the
    ``seurat_v3`` flavour would need ``scikit-misc``. Genes without counts in a section are not candidates there.
    With ``method="mean"`` each section contributes its ``n_top`` genes of highest mean log1p(CP10k). The result is
    the union over sections, plus the ``markers`` that are measured. Per-section selection keeps a gene that varies
    in one section only, and no section's depth dominates.

    Parameters
    ----------
    sdata
        Sections with raw counts in the table's ``X`` (or an :class:`~anndata.AnnData`). A spot's section is
        ``obs["sample"]``, else the region it annotates (spatialdata-io's layout); a table with neither is one
        section.
    n_top
        Genes per section.
    method
        ``"hvg"`` (highly variable) or ``"mean"`` (highly expressed).
    genes
        Use exactly these genes instead (their order is kept, duplicates dropped); raises if any is not measured.
    table_key
        Table holding the counts; default ``"table"``, else the only table.
    markers
        Genes to add when measured (e.g. the breast-cancer marker list); those not measured are reported, not an
        error.

    Returns
    -------
    Gene names: in the table's ``var_names`` order, or in the order of ``genes`` (then the added markers). The table
    is not modified.

    Examples
    --------
    >>> import st_from_he as sth
    >>> sdata = sth.datasets.her2st(["C5", "C6"], path="../shared/data/her2st")
    >>> genes = sth.pp.select_genes(sdata, n_top=500, markers=["ERBB2", "KRT19"])
    >>> "ERBB2" in genes
    True
    """
    table_key, table = table_of(sdata, table_key, "sth.pp.select_genes")
    var_names = table.var_names
    marker_list = _present_markers(markers, var_names)
    if genes is not None:
        genes = list(dict.fromkeys(as_names(genes, "genes")))
        if not genes:
            raise ValueError("`genes` is empty.")
        missing = [g for g in genes if g not in var_names]
        if missing:
            raise KeyError(
                f"{len(missing)} of {len(genes)} gene(s) are not measured in table {table_key!r}: {missing[:20]}"
                f"{' ...' if len(missing) > 20 else ''}."
            )
        return genes + [g for g in marker_list if g not in set(genes)]

    if method not in ("hvg", "mean"):
        raise ValueError(f"Unknown `method` {method!r}; use 'hvg' or 'mean'.")
    n_top = check_number(n_top, "n_top", integer=True, unit="genes")
    check_table_raw_counts(table, table_key=table_key)

    try:
        sample_col = spot_sections(table, table_key=table_key)
    except KeyError:  # a table without sections is one section
        sample_col = np.zeros(table.n_obs, str)
    chosen = np.zeros(table.n_vars, dtype=bool)
    sections = list(dict.fromkeys(sample_col))
    for sample in sections:
        rows = np.flatnonzero(sample_col == sample)
        chosen |= _top_genes(table.X[rows], n_top, method, sample)
    chosen[var_names.get_indexer(marker_list)] = True
    result = list(var_names[chosen])
    logger.info(
        "Selected %d genes: union over %d section(s) of the top %d by %s%s",
        len(result),
        len(sections),
        n_top,
        "dispersion (HVG)" if method == "hvg" else "mean log1p(CP10k)",
        f", plus {len(marker_list)} marker(s)" if marker_list else "",
    )
    return result


def _present_markers(markers, var_names: pd.Index) -> list[str]:
    if markers is None:
        return []
    markers = list(dict.fromkeys(as_names(markers, "markers")))
    absent = [g for g in markers if g not in var_names]
    if absent:
        logger.info("%d marker(s) not measured, skipped: %s", len(absent), ", ".join(absent[:20]))
    return [g for g in markers if g in var_names]


def _top_genes(counts, n_top: int, method: str, sample: str) -> np.ndarray:
    """Boolean mask of one section's top genes."""
    lognorm = log_normalize(counts, keep_sparse=True)
    expressed = np.asarray((counts != 0).sum(axis=0)).ravel() > 0
    mask = np.zeros(counts.shape[1], dtype=bool)
    if not expressed.any():
        logger.info("Section %s has no counts; it contributes no genes.", sample)
        return mask
    if method == "mean":
        means = np.asarray(lognorm.mean(axis=0)).ravel()
        order = np.argsort(-means, kind="stable")
        top = order[: min(n_top, int(expressed.sum()))]
        mask[top] = True
        return mask
    import anndata as ad
    import scanpy as sc

    keep = np.flatnonzero(expressed)
    sub = ad.AnnData(lognorm[:, keep])
    n = min(n_top, len(keep))
    hvg = sc.pp.highly_variable_genes(sub, flavor="seurat", n_top_genes=n, inplace=False)
    mask[keep[np.asarray(hvg["highly_variable"], dtype=bool)]] = True
    return mask
