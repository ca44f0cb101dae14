"""Whether predictions keep the gene-gene correlation structure of the measured expression."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from st_from_he._docs import inject_docs
from st_from_he._logging import logger
from st_from_he._sdata import PREDICTED_KEY, TABLE_KEY, check_sdata
from st_from_he._validate import check_number

from ._evaluate import _corrcoef, _grid_graph, _moran_ratio, _paired, _predicted_table, _preservation
from ._gene_sets import GENE_SETS, _check_markers, _check_measured_params, _select_genes

if TYPE_CHECKING:
    from spatialdata import SpatialData


def _resolve_sample(paired_samples: np.ndarray, sample: str | None, predicted_key: str) -> str:
    present = list(dict.fromkeys(paired_samples))
    if sample is None:
        if len(present) > 1:
            raise ValueError(
                f"Table {predicted_key!r} covers several sections {present}; correlation structure is a property of "
                f"one section, so pass `sample=` (e.g. in a loop over the sections)."
            )
        return present[0]
    if sample not in present:
        raise KeyError(
            f"No evaluated spots of sample {sample!r}; samples with predicted and measured spots: {present}."
        )
    return sample


def _gene_correlation(
    sdata: SpatialData,
    *,
    genes: str | Sequence[str],
    predicted_key: str,
    measured_key: str,
    sample: str | None,
    n_genes: int,
    markers: Sequence[str] | None = None,
    layer: str | None = None,
    normalize: bool | None = None,
) -> dict[str, Any]:
    """Compute the result of :func:`gene_correlation` without storing it."""
    n_genes = check_number(n_genes, "n_genes", integer=True, unit="genes")
    markers = _check_markers(markers)
    _check_measured_params(layer, normalize)
    if genes is None or not isinstance(genes, str | Sequence | np.ndarray | pd.Index):
        raise TypeError(
            f"`genes` must be a gene set name {list(GENE_SETS)} or a list of genes, got {type(genes).__name__} "
            f"{genes!r}."
        )
    if isinstance(genes, str):
        if genes not in GENE_SETS:
            raise ValueError(f"Unknown gene set {genes!r}; give one of {list(GENE_SETS)} or a list of genes.")
        paired = _paired(sdata, predicted_key, measured_key, layer=layer, normalize=normalize)
        sample = _resolve_sample(paired.samples, sample, predicted_key)
        rows = paired.rows_of(sample)
        chosen = _select_genes(genes, paired.measured[rows], paired.genes, n_genes=n_genes, markers=markers)
        cols = [paired.genes.index(g) for g in chosen]
        measured, predicted = paired.measured[np.ix_(rows, cols)], paired.predicted[np.ix_(rows, cols)]
        gene_set = genes
    else:
        chosen = list(dict.fromkeys(map(str, genes)))
        paired = _paired(sdata, predicted_key, measured_key, genes=chosen, layer=layer, normalize=normalize)
        sample = _resolve_sample(paired.samples, sample, predicted_key)
        rows = paired.rows_of(sample)
        measured, predicted = paired.measured[rows], paired.predicted[rows]
        gene_set = "custom"
    if len(chosen) < 2:
        raise ValueError(f"Gene-gene correlation needs at least 2 genes, got {chosen}.")
    index = pd.Index(chosen, name="gene")
    # the same helpers as tl.evaluate's summary, so both report the same numbers for the same section and genes
    measured_corr, predicted_corr = _corrcoef(measured), _corrcoef(predicted)
    preservation, mean_abs_diff = _preservation(measured_corr, predicted_corr)
    graph = None if paired.positions is None else _grid_graph(paired.positions[rows])
    return {
        "measured": pd.DataFrame(measured_corr, index=index, columns=index.copy()),
        "predicted": pd.DataFrame(predicted_corr, index=index, columns=index.copy()),
        "preservation": preservation,
        "mean_abs_diff": mean_abs_diff,
        "moran_ratio": _moran_ratio(graph, measured, predicted),
        "sample": sample,
        "gene_set": gene_set,
    }


@inject_docs
def gene_correlation(
    sdata: SpatialData,
    *,
    genes: str | Sequence[str] = "heg",
    predicted_key: str = PREDICTED_KEY,
    measured_key: str = TABLE_KEY,
    sample: str | None = None,
    n_genes: int = 50,
    markers: Sequence[str] | None = None,
    layer: str | None = None,
    normalize: bool | None = None,
    key_added: str = "gene_correlation",
) -> dict[str, Any]:
    """Compare the gene-gene correlation structure of predicted and measured expression in one section.

    Pearson correlation matrices between genes are computed across the section's spots, once on the measured
    ``log1p`` CP10k expression and once on the prediction (spots matched by region and instance id, as in
    :func:`~st_from_he.tl.evaluate`). A pair involving a gene that is constant in the section has correlation 0.
    The preservation score is the Pearson correlation between the upper triangles (diagonal excluded) of the two
    matrices: 1 when the prediction keeps the measured co-expression structure, near 0 when it does not. It is blind
    to scale: a prediction whose correlations are all pushed towards +-1 (blocks of genes moving together far more
    than they do in the counts) can still score high, so the mean absolute difference of the two upper triangles is
    reported next to it (0 when the matrices agree). The Moran's I ratio says the same of space: the median Moran's
    I of the predicted genes over that of the measured ones (1: as spatially smooth as the counts). All three are
    computed as in the summary of :func:`~st_from_he.tl.evaluate` (``preservation``, ``corr_abs_diff``,
    ``moran_ratio``, there on the section's HEG), so the numbers agree for the same section and genes.

    Parameters
    ----------
    sdata
        Data holding the prediction and the measured table.
    genes
        A list of genes, or a gene set chosen on the section's measured data among the predicted genes: ``"heg"``,
        ``"hvg"``, ``"markers"`` or ``"all"`` (see :func:`~st_from_he.tl.evaluate`).
    predicted_key
        Table of predicted expression.
    measured_key
        Table of measured raw counts.
    sample
        The section to use. Required when the prediction covers several sections: correlation structure is
        compared within one section, so call the function once per section; the results accumulate in ``uns``.
    n_genes
        Size of the ``"heg"`` and ``"hvg"`` sets.
    markers
        Marker genes of the ``"markers"`` set; default :data:`~st_from_he.tl.BREAST_MARKERS`.
    {measured_params}
    key_added
        Key in the prediction table's ``uns`` under which results are stored, per section.

    Returns
    -------
    A :class:`dict` with

    - ``"measured"`` and ``"predicted"``: gene x gene Pearson correlation :class:`~pandas.DataFrame` (same gene
      order: the gene set order, e.g. highest mean expression first for ``"heg"``);
    - ``"preservation"``: Pearson r between the matrices' upper triangles (:class:`float`);
    - ``"mean_abs_diff"``: mean absolute difference between the upper triangles (:class:`float`; ``corr_abs_diff``
      of :func:`~st_from_he.tl.evaluate`);
    - ``"moran_ratio"``: median Moran's I of the predicted genes over that of the measured genes (:class:`float`;
      neighbours: spots within 1.5x the median nearest-neighbour distance, from the measured table's
      ``obsm["spatial"]``; NaN without positions or where the measured median is not positive);
    - ``"sample"`` and ``"gene_set"`` (``"custom"`` for a gene list).

    The same dict is stored in ``sdata.tables[predicted_key].uns[key_added][sample]``, so results for several
    sections sit side by side.

    Examples
    --------
    >>> import st_from_he as sth
    >>> res = sth.tl.gene_correlation(sdata, genes="heg", sample="C6")  # doctest: +SKIP
    >>> res["preservation"], res["mean_abs_diff"], res["moran_ratio"]  # doctest: +SKIP
    >>> for s in ["C5", "C6"]:  # several test sections
    ...     sth.tl.gene_correlation(sdata, sample=s)  # doctest: +SKIP
    >>> sdata.tables["predicted_expression"].uns["gene_correlation"]["C5"]["preservation"]  # doctest: +SKIP
    """
    check_sdata(sdata, "sth.tl.gene_correlation", needs_image=False)
    result = _gene_correlation(
        sdata,
        genes=genes,
        predicted_key=predicted_key,
        measured_key=measured_key,
        sample=sample,
        n_genes=n_genes,
        markers=markers,
        layer=layer,
        normalize=normalize,
    )
    table = _predicted_table(sdata, predicted_key)
    stored = dict(table.uns.get(key_added, {}))
    stored[result["sample"]] = {**result, "params": {"n_genes": int(n_genes), "measured_key": measured_key}}
    table.uns[key_added] = stored
    logger.info(
        "%s: gene-gene correlation preservation %.3f over %d genes (mean |difference| %.3f, Moran's I ratio %.2f).",
        result["sample"],
        result["preservation"],
        len(result["measured"]),
        result["mean_abs_diff"],
        result["moran_ratio"],
    )
    return result
