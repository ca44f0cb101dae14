"""Measured and predicted gene-gene correlation heatmaps in one clustered gene order."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from st_from_he._docs import inject_docs
from st_from_he._sdata import PREDICTED_KEY, TABLE_KEY

from ._layout import check_data
from ._utils import finish, given_axes, plot_docs, styled, titled

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

_SET_NAMES = {
    "heg": "highly expressed genes",
    "hvg": "highly variable genes",
    "markers": "marker genes",
    "all": "genes",
    "custom": "genes",
}


def _cluster_order(corr: np.ndarray) -> np.ndarray:
    """Leaf order of average-linkage clustering on the correlation distance ``1 - r``."""
    from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
    from scipy.spatial.distance import squareform

    if len(corr) < 3:
        return np.arange(len(corr))
    dist = squareform(np.clip(1.0 - corr, 0.0, 2.0), checks=False)
    tree = linkage(dist, method="average")
    return leaves_list(optimal_leaf_ordering(tree, dist))


@styled
@inject_docs
@plot_docs(" (two: measured, predicted)")
def gene_correlation(
    data: SpatialData | AnnData,
    genes: str | Sequence[str] = "heg",
    *,
    predicted: AnnData | None = None,
    sample: str | None = None,
    predicted_key: str = PREDICTED_KEY,
    measured_key: str = TABLE_KEY,
    n_genes: int = 50,
    markers: Sequence[str] | None = None,
    layer: str | None = None,
    normalize: bool | None = None,
    cluster: bool = True,
    cmap: str = "RdBu_r",
    ax: Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | list[Axes] | None:
    """Heatmaps of the measured and the predicted gene-gene correlation of one section, in the same gene order.

    The matrices are those of :func:`st_from_he.tl.gene_correlation` (Pearson across the section's spots). Genes
    are ordered by hierarchical clustering (average linkage on ``1 - r``) of the measured matrix, so blocks of
    co-expressed genes line up; both panels share the colour scale from -1 to 1. The title gives the preservation
    score (Pearson r between the matrices' upper triangles).

    Parameters
    ----------
    data
        A SpatialData holding the prediction and the measured table, or the measured table as an AnnData with the
        prediction passed as ``predicted``.
    genes
        A list of genes or a gene set chosen on the section's measured data: ``"heg"``, ``"hvg"``, ``"markers"``
        or ``"all"``.
    predicted
        Table of predicted expression; required with an AnnData ``data``, and used instead of the table
        ``predicted_key`` of a SpatialData.
    sample
        Section to draw; required when the tables cover several.
    predicted_key
        Table of predicted expression in the SpatialData.
    measured_key
        Table of measured raw counts in the SpatialData.
    n_genes
        Size of the ``"heg"`` and ``"hvg"`` sets.
    markers
        Marker genes of the ``"markers"`` set; default :data:`~st_from_he.tl.BREAST_MARKERS`.
    {measured_params}
    cluster
        Order genes by clustering; otherwise keep the gene set's order.
    cmap
        Diverging colour map.
    {plot_output}

    Examples
    --------
    >>> import st_from_he as sth
    >>> sth.pl.gene_correlation(sdata, genes="heg", sample="C6")  # doctest: +SKIP
    >>> sth.pl.gene_correlation(sdata, genes=["ERBB2", "GRB7", "KRT19", "CD74", "IGKC"], sample="C6")  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    from st_from_he.tl._gene_correlation import _gene_correlation

    from ._spatial import _paired_tables

    function = "sth.pl.gene_correlation"
    check_data(data, function)
    axes = given_axes(ax, 2, "gene_correlation (measured, predicted)")
    store, _ = _paired_tables(data, predicted, predicted_key, measured_key, function)
    res = _gene_correlation(
        store,
        genes=genes,
        predicted_key=predicted_key,
        measured_key=measured_key,
        sample=sample,
        n_genes=n_genes,
        markers=markers,
        layer=layer,
        normalize=normalize,
    )
    measured, predicted = res["measured"], res["predicted"]
    order = _cluster_order(measured.to_numpy()) if cluster else np.arange(len(measured))
    names = measured.index.to_numpy()[order]
    n = len(names)

    cell = min(0.16, 9.0 / n)  # inches per gene
    side = max(2.6, cell * n)
    fontsize = min(8.0, cell * 72 * 0.72)
    show_labels = fontsize >= 3.5
    label_room = (max(len(str(g)) for g in names) * fontsize * 0.62 / 72 + 0.15) if show_labels else 0.2
    own = axes is None
    if own:
        fig = plt.figure(figsize=(2 * side + 2 * label_room + 1.0, side + label_room + 0.8), layout="constrained")
        axes = fig.subplots(1, 2)
    else:
        fig = axes[0].figure
    norm = Normalize(-1.0, 1.0)
    im = None
    for ax, matrix, title in ((axes[0], measured, "Measured"), (axes[1], predicted, "Predicted")):
        values = matrix.to_numpy()[np.ix_(order, order)]
        im = ax.imshow(values, cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
        ax.set_title(title)
        for side_ in ax.spines.values():
            side_.set_visible(False)
        if show_labels:
            ticks = np.arange(n)
            ax.set_xticks(ticks, names, rotation=90, fontsize=fontsize)
            ax.set_yticks(ticks, names, fontsize=fontsize)
            ax.tick_params(length=0, pad=1.5)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"{n} genes")
    fig.colorbar(im, ax=axes.tolist(), shrink=0.6, pad=0.02, label="Pearson r")
    what = _SET_NAMES.get(res["gene_set"], "genes")
    sample = None if res["sample"] == "spots" and not _names_sections(data) else res["sample"]
    text = (
        titled(sample, f"gene-gene correlation of {n} {what}")
        + f"\npreservation r = {res['preservation']:.2f}, mean |difference| = {res['mean_abs_diff']:.2f}"
    )
    if own:
        fig.suptitle(text)
    else:  # the caller's figure keeps its title: the scores go above the predicted panel
        axes[1].set_title(f"Predicted\npreservation r = {res['preservation']:.2f}")
    return finish(fig, axes, show=show, save=save, return_fig=return_fig, own_figure=own)


def _names_sections(data) -> bool:
    """Whether an AnnData (or SpatialData) table names its sections (a plain scanpy table does not)."""
    from anndata import AnnData

    from ._layout import table_samples

    return not isinstance(data, AnnData) or table_samples(data) is not None
