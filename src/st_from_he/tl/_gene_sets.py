"""Gene sets of the evaluation protocol: highly expressed (HEG), highly variable (HVG) and marker genes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from st_from_he._docs import inject_docs
from st_from_he._sdata import PREDICTED_KEY, TABLE_KEY
from st_from_he._validate import check_number

if TYPE_CHECKING:
    from spatialdata import SpatialData

BREAST_MARKERS: tuple[str, ...] = (
    "ERBB2", "GRB7", "ESR1", "PGR", "KRT19", "KRT8", "KRT18", "EPCAM", "CD24", "MUC1",
    "FASN", "SCD", "MGP", "COL1A1", "COL3A1", "FN1", "SPARC", "PTPRC", "CD74", "IGKC",
    "IGHG3", "HLA-DRA", "FABP4", "ADIPOQ", "PLIN1", "ACTA2", "MYH11", "VIM", "CXCL14", "S100A4",
)  # fmt: skip
"""The breast-cancer marker genes of the evaluation protocol (tumour, HER2 amplicon, stroma, immune, fat)."""

TUMOR_MARKERS: tuple[str, ...] = ("ERBB2", "GRB7", "KRT19", "KRT8", "EPCAM", "CD24")
"""Epithelial and HER2-amplicon genes whose mean z-score marks tumour spots in HER2+ breast cancer."""

GENE_SETS: tuple[str, ...] = ("heg", "hvg", "markers", "all")
"""Names of the built-in gene sets."""


def _check_gene_sets(gene_sets) -> dict[str, Sequence[str] | None]:
    """Normalise ``gene_sets`` to ``{name: explicit genes or None for a built-in}``; raise on unknown names."""
    if isinstance(gene_sets, str):
        gene_sets = (gene_sets,)
    if gene_sets is None or not isinstance(gene_sets, Mapping | Sequence | set | frozenset):
        raise TypeError(
            f"`gene_sets` must be names of built-in sets {list(GENE_SETS)} or a mapping from set name to genes, got "
            f"{type(gene_sets).__name__} {gene_sets!r}."
        )
    if isinstance(gene_sets, Mapping):
        out = {}
        for name, genes in gene_sets.items():
            if isinstance(genes, str):
                raise TypeError(f"Gene set {name!r} must be a list of gene names, not the string {genes!r}.")
            out[str(name)] = None if genes is None else [str(g) for g in genes]
        unknown = [n for n, g in out.items() if g is None and n not in GENE_SETS]
    else:
        out = {str(name): None for name in gene_sets}
        unknown = [n for n in out if n not in GENE_SETS]
    if unknown:
        raise ValueError(
            f"Unknown gene set(s) {unknown}; the built-in sets are {list(GENE_SETS)}. Pass your own as a mapping, "
            f"e.g. `gene_sets={{'heg': None, 'immune': ['PTPRC', 'CD74']}}`."
        )
    if not out:
        raise ValueError(f"`gene_sets` is empty; give at least one of {list(GENE_SETS)} or a mapping to gene lists.")
    return out


def _check_markers(markers) -> list[str] | None:
    """``markers`` as a list of gene names (one name alone is one marker, not its letters), or ``None``."""
    if markers is None:
        return None
    if isinstance(markers, str):
        return [markers]
    if not isinstance(markers, Sequence | set | frozenset | np.ndarray):
        raise TypeError(f"`markers` must be a list of gene names, got {type(markers).__name__} {markers!r}.")
    return [str(g) for g in markers]


def _check_measured_params(layer, normalize) -> None:
    """Types of the ``layer`` and ``normalize`` arguments shared by the evaluation functions."""
    if layer is not None and not isinstance(layer, str):
        raise TypeError(f"`layer` must be the name of a layer or None (X), got {type(layer).__name__} {layer!r}.")
    if normalize is not None and not isinstance(normalize, bool | np.bool_):
        raise TypeError(f"`normalize` must be None, True or False, got {normalize!r}.")


def _top_genes(expression: np.ndarray, genes: Sequence[str], n_genes: int, *, by: str) -> list[str]:
    """The ``n_genes`` genes with the highest mean (``by="mean"``) or variance (``by="var"``) across spots.

    ``expression`` is spots x genes log-normalised expression; ties are broken by the order of ``genes``.
    """
    if n_genes < 1:
        raise ValueError(f"`n_genes` must be a positive number of genes, got {n_genes}.")
    expression = np.asarray(expression, dtype=np.float64)
    if by == "mean":
        stat = expression.mean(axis=0)
    elif by == "var":
        stat = expression.var(axis=0)
    else:
        raise ValueError(f"`by` must be 'mean' or 'var', got {by!r}.")
    order = np.argsort(-stat, kind="stable")[:n_genes]
    return [str(genes[i]) for i in order]


def _select_genes(
    name: str,
    expression: np.ndarray,
    genes: Sequence[str],
    *,
    n_genes: int = 50,
    markers: Sequence[str] | None = None,
) -> list[str]:
    """Genes of the built-in set ``name`` among ``genes``, chosen on ``expression`` (spots x genes, log-normalised).

    - ``"heg"``: the ``n_genes`` highest mean expression;
    - ``"hvg"``: the ``n_genes`` highest variance across spots;
    - ``"markers"``: ``markers`` (default :data:`BREAST_MARKERS`) that are among ``genes``, in the marker list order;
    - ``"all"``: every gene.
    """
    if name == "heg":
        return _top_genes(expression, genes, n_genes, by="mean")
    if name == "hvg":
        return _top_genes(expression, genes, n_genes, by="var")
    if name == "markers":
        present = set(map(str, genes))
        return [g for g in dict.fromkeys(BREAST_MARKERS if markers is None else markers) if g in present]
    if name == "all":
        return [str(g) for g in genes]
    raise ValueError(f"Unknown gene set {name!r}; the built-in sets are {list(GENE_SETS)}.")


@inject_docs
def gene_set(
    sdata: SpatialData,
    name: str = "heg",
    *,
    sample: str | None = None,
    n_genes: int = 50,
    markers: Sequence[str] | None = None,
    genes: Sequence[str] | str | None = PREDICTED_KEY,
    measured_key: str = TABLE_KEY,
    layer: str | None = None,
    normalize: bool | None = None,
) -> list[str]:
    """Choose a gene set of the evaluation protocol on a section's measured expression.

    Highly expressed (HEG) and highly variable (HVG) genes are chosen on the measured data of the test section, as in
    :func:`st_from_he.tl.evaluate`, among the candidate ``genes`` (by default those of the prediction table).

    Parameters
    ----------
    sdata
        The data, with a measured table of raw counts.
    name
        ``"heg"`` (the ``n_genes`` genes of highest mean log-normalised expression), ``"hvg"`` (the ``n_genes`` genes
        of highest variance of log-normalised expression across spots), ``"markers"`` (``markers`` that are
        measured) or ``"all"``.
    sample
        Section whose spots are used; required when the measured table holds several sections.
    n_genes
        Size of the HEG and HVG sets.
    markers
        Marker genes for ``"markers"``; default :data:`~st_from_he.tl.BREAST_MARKERS`.
    genes
        Candidate genes: a list, the key of a table whose genes are the candidates (default: the prediction table,
        when it exists), or ``None`` for every measured gene.
    measured_key
        Table of measured raw counts.
    {measured_params}

    Returns
    -------
    Gene names, best first for ``"heg"`` and ``"hvg"``.

    Examples
    --------
    >>> import st_from_he as sth
    >>> sdata = sth.datasets.her2st(["C6"])
    >>> sth.tl.gene_set(sdata, "heg", n_genes=3, genes=None)  # any measured gene  # doctest: +SKIP
    ['IGKC', 'ERBB2', 'IGLC2']
    >>> sth.tl.gene_set(sdata, "hvg", n_genes=3, genes=None)  # doctest: +SKIP
    ['SCGB2A2', 'CEACAM6', 'KRT86']
    """
    from st_from_he._sdata import check_sdata, samples, table_rows

    from ._evaluate import _measured_expression, _measured_table

    check_sdata(sdata, "sth.tl.gene_set", needs_image=False)
    if name not in GENE_SETS:
        raise ValueError(f"Unknown gene set {name!r}; the built-in sets are {list(GENE_SETS)}.")
    n_genes = check_number(n_genes, "n_genes", integer=True, unit="genes")
    markers = _check_markers(markers)
    _check_measured_params(layer, normalize)
    table = _measured_table(sdata, measured_key)

    try:  # sections: obs["sample"], else the regions the spots annotate
        all_samples = samples(sdata, measured_key)
    except KeyError:  # a table that tells no sections is one
        all_samples = []
    if sample is None:
        if len(all_samples) > 1:
            raise ValueError(
                f"Table {measured_key!r} holds several sections {all_samples}; pass `sample=` to choose the one whose "
                f"measured data select the genes."
            )
        rows = np.arange(table.n_obs)
    else:
        if sample not in all_samples:
            raise KeyError(f"No sample {sample!r} in table {measured_key!r}; samples present: {all_samples}.")
        rows = table_rows(table, sample)
    if isinstance(genes, str):
        if genes not in sdata.tables:
            if genes != PREDICTED_KEY:
                raise KeyError(f"No table {genes!r} to take candidate genes from; tables: {sorted(sdata.tables)}.")
            genes = None
        else:
            genes = list(sdata.tables[genes].var_names)
    candidates = (
        list(table.var_names) if genes is None else [g for g in dict.fromkeys(map(str, genes)) if g in table.var_names]
    )
    if not candidates:
        raise ValueError(f"None of the candidate genes is measured in table {measured_key!r}.")
    if name in ("markers", "all"):
        return _select_genes(name, np.empty((0, len(candidates))), candidates, n_genes=n_genes, markers=markers)
    cols = table.var_names.get_indexer(candidates)
    expression = _measured_expression(table, rows, cols, layer=layer, key=measured_key, normalize=normalize)
    return _select_genes(name, expression, candidates, n_genes=n_genes, markers=markers)
