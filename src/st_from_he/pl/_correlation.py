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


def _axes_for(ax, difference: bool | None) -> tuple[np.ndarray | None, bool]:
    """The caller's axes (2 or 3) and whether the difference panel is drawn."""
    from matplotlib.axes import Axes

    what = "gene_correlation (measured, predicted[, difference])"
    if ax is None:
        return None, difference is not False
    n = 1 if isinstance(ax, Axes) else np.size(np.asarray(list(np.ravel(ax)), dtype=object))
    axes = given_axes(ax, n, what)  # checks that they are Axes
    if difference is None:  # the number of axes says whether the difference panel is wanted
        if n not in (2, 3):
            raise ValueError(f"`ax`: {what} takes 2 Axes (measured, predicted) or 3 (and their difference), got {n}.")
        return axes, n == 3
    wanted = 3 if difference else 2
    if n != wanted:
        raise ValueError(
            f"`ax`: {what} takes {wanted} Axes with difference={difference}, got {n}; pass {wanted} Axes or "
            f"difference={not difference}."
        )
    return axes, bool(difference)


def _symmetric_limit(values: np.ndarray) -> float:
    """Colour limit of the difference panel: its largest absolute off-diagonal value, up to the next 0.1."""
    off = values[~np.eye(len(values), dtype=bool)]
    return max(0.1, float(np.ceil(np.abs(off).max() * 10 - 1e-9) / 10)) if off.size else 1.0


def _draw_matrix(ax, values, names, *, cmap, norm, title, fontsize, show_labels):
    """One gene x gene heatmap with its genes on both axes (or their number, when too many to read)."""
    im = ax.imshow(values, cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
    ax.set_title(title)
    for spine in ax.spines.values():
        spine.set_visible(False)
    n = len(names)
    if show_labels:
        ticks = np.arange(n)
        ax.set_xticks(ticks, names, rotation=90, fontsize=fontsize)
        ax.set_yticks(ticks, names, fontsize=fontsize)
        ax.tick_params(length=0, pad=1.5)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{n} genes")
    return im


@styled
@inject_docs
@plot_docs(" (two: measured, predicted; or three: and their difference)")
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
    difference: bool | None = None,
    difference_cmap: str = "PuOr_r",
    ax: Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | list[Axes] | None:
    """Heatmaps of the measured and the predicted gene-gene correlation of one section and of their difference.

    The matrices are those of :func:`st_from_he.tl.gene_correlation` (Pearson across the section's spots). Genes
    are ordered by hierarchical clustering (average linkage on ``1 - r``) of the measured matrix, so blocks of
    co-expressed genes line up; the measured and predicted panels share the colour scale from -1 to 1. A third
    panel shows predicted minus measured in the same gene order, on a diverging scale centred at 0 with its own
    colour bar (default map: orange where the prediction makes two genes more correlated than they are, purple
    where less). The titles give the preservation score (Pearson r between the matrices' upper triangles) and the
    mean absolute difference (mean of the third panel's upper triangle): a prediction can preserve the pattern
    (high r) while exaggerating it (large difference).

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
        Diverging colour map of the two correlation panels.
    difference
        Draw the difference panel (predicted - measured). ``None`` (default): draw it in a new figure, and with
        ``ax`` when 3 Axes are given (2 Axes: measured and predicted only).
    difference_cmap
        Diverging colour map of the difference panel, centred at 0, symmetric up to the largest absolute
        difference (rounded up to a tenth); another map than ``cmap`` so that a difference is not read as a
        correlation.
    {plot_output}

    Examples
    --------
    >>> import st_from_he as sth
    >>> sth.pl.gene_correlation(sdata, genes="heg", sample="C6")  # doctest: +SKIP
    >>> sth.pl.gene_correlation(sdata, genes=["ERBB2", "GRB7", "KRT19", "CD74", "IGKC"], sample="C6")  # doctest: +SKIP
    >>> sth.pl.gene_correlation(sdata, sample="C6", difference=False)  # measured and predicted only  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    from st_from_he.tl._gene_correlation import _gene_correlation

    from ._spatial import _paired_tables

    function = "sth.pl.gene_correlation"
    check_data(data, function)
    if difference is not None and not isinstance(difference, bool | np.bool_):
        raise TypeError(f"`difference` must be True, False or None, got {difference!r}.")
    axes, with_difference = _axes_for(ax, difference)
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
    n_panels = 3 if with_difference else 2

    cell = min(0.16, (9.0 if n_panels == 2 else 7.0) / n)  # inches per gene: three panels get a little less
    side = max(2.6, cell * n)
    fontsize = min(8.0, cell * 72 * 0.72)
    show_labels = fontsize >= 3.5
    label_room = (max(len(str(g)) for g in names) * fontsize * 0.62 / 72 + 0.15) if show_labels else 0.2
    own = axes is None
    if own:
        width = n_panels * (side + label_room) + 0.9 * (n_panels - 1) + 0.3  # + colour bars
        fig = plt.figure(figsize=(width, side + label_room + 1.0), layout="constrained")
        axes = fig.subplots(1, n_panels)
    else:
        fig = axes[0].figure
    preservation, mean_abs_diff = res["preservation"], res["mean_abs_diff"]
    scores = f"preservation r = {preservation:.2f}"
    common = {"names": names, "fontsize": fontsize, "show_labels": show_labels}
    norm = Normalize(-1.0, 1.0)
    _draw_matrix(axes[0], measured.to_numpy()[np.ix_(order, order)], cmap=cmap, norm=norm, title="Measured", **common)
    im = _draw_matrix(
        axes[1],
        predicted.to_numpy()[np.ix_(order, order)],
        cmap=cmap,
        norm=norm,
        title="Predicted" if own else f"Predicted\n{scores}",  # a caller's figure keeps its own title
        **common,
    )
    fig.colorbar(im, ax=list(axes[:2]), shrink=0.6, pad=0.02, label="Pearson r")
    if with_difference:
        diff = (predicted.to_numpy() - measured.to_numpy())[np.ix_(order, order)]
        limit = _symmetric_limit(diff)
        im = _draw_matrix(
            axes[2],
            diff,
            cmap=difference_cmap,
            norm=Normalize(-limit, limit),
            title=f"Predicted \u2212 measured\nmean |difference| = {mean_abs_diff:.2f}",
            **common,
        )
        fig.colorbar(im, ax=axes[2], shrink=0.6, pad=0.02, label="difference of r")
    if own:
        what = _SET_NAMES.get(res["gene_set"], "genes")
        sample = None if res["sample"] == "spots" and not _names_sections(data) else res["sample"]
        fig.suptitle(
            titled(sample, f"gene-gene correlation of {n} {what}")
            + f"\n{scores}, mean |difference| = {mean_abs_diff:.2f}"
        )
    return finish(fig, axes, show=show, save=save, return_fig=return_fig, own_figure=own)


def _names_sections(data) -> bool:
    """Whether an AnnData (or SpatialData) table names its sections (a plain scanpy table does not)."""
    from anndata import AnnData

    from ._layout import table_samples

    return not isinstance(data, AnnData) or table_samples(data) is not None
