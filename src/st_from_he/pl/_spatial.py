"""Spatial plots over the H&E: predicted against measured expression, and tumour score maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from st_from_he._docs import inject_docs
from st_from_he._sdata import PREDICTED_KEY, TABLE_KEY

from ._layout import check_data, spot_layout, table_samples, table_store
from ._utils import (
    EXPRESSION_LABEL,
    colorbar_shrink,
    draw_section,
    finish,
    given_axes,
    new_figure,
    plot_docs,
    resolve_sample,
    spot_bounds,
    styled,
    titled,
)

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData


def _robust_norm(values: np.ndarray, percentiles: tuple[float, float] = (1, 99)):
    """A colour scale over the 1st-99th percentiles (outliers saturate) and the colour bar's matching ``extend``."""
    from matplotlib.colors import Normalize

    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return Normalize(0.0, 1.0), "neither"
    lo, hi = (float(v) for v in np.percentile(finite, percentiles))
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + 1.0
    below, above = finite.min() < lo, finite.max() > hi
    extend = {(True, True): "both", (True, False): "min", (False, True): "max"}.get((below, above), "neither")
    return Normalize(lo, hi), extend


def _pcc_label(r: float, constant: bool) -> str:
    return "PCC 0, constant" if constant else f"PCC {r:.2f}"


def _paired_tables(data, predicted, predicted_key: str, measured_key: str, function: str):
    """``(tables with .tables, measured AnnData)`` for a SpatialData or an AnnData measured table."""
    from anndata import AnnData

    check_data(data, function)
    if predicted is not None and not isinstance(predicted, AnnData):
        raise TypeError(f"`predicted` must be an AnnData of predicted expression, got {type(predicted).__name__}.")
    if isinstance(data, AnnData):
        if predicted is None:
            raise TypeError(
                f"`{function}` got an AnnData, taken as the measured table: pass the table of predicted expression "
                f"as `predicted=` (e.g. `sdata.tables[{PREDICTED_KEY!r}]`), or pass the SpatialData holding both."
            )
        store = table_store(data, {predicted_key: predicted, measured_key: data}, function)
        return store, data
    store = table_store(data, {predicted_key: predicted, measured_key: None}, function)
    return store, data.tables[measured_key]


@styled
@inject_docs
@plot_docs(" (``kind='spatial'``: two per gene, measured then predicted; ``'scatter'``: one per gene)")
def predicted_vs_measured(
    data: SpatialData | AnnData,
    genes: str | Sequence[str],
    *,
    predicted: AnnData | None = None,
    sample: str | None = None,
    kind: Literal["spatial", "scatter"] = "spatial",
    predicted_key: str = PREDICTED_KEY,
    measured_key: str = TABLE_KEY,
    layer: str | None = None,
    normalize: bool | None = None,
    cmap: str = "viridis",
    spot_scale: float = 1.0,
    image=True,
    image_alpha: float = 0.6,
    scale_factor: float | None = None,
    spatial_key: str = "spatial",
    ncols: int = 4,
    panel_size: float = 3.0,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """Measured and predicted expression of genes in one section, side by side over the H&E, or as scatter plots.

    Measured values are ``log1p`` CP10k of the raw counts (computed on the fly), predicted ones are read from the
    prediction table; spots are matched by region and instance id (by ``obs_names`` for tables without them). Each
    gene's two maps share one colour scale and the title gives the Pearson correlation across the section's spots
    (as :func:`~st_from_he.tl.evaluate`). A spot's section is ``obs["sample"]`` of the measured table, else the
    region (shapes element) its row annotates.

    Parameters
    ----------
    data
        A SpatialData holding the prediction, the measured table and (optionally) the section's image; or the
        measured table as an AnnData, with the prediction passed as ``predicted``.
    genes
        One gene or a list; each gets a row of two maps (``kind="spatial"``) or a scatter panel.
    predicted
        Table of predicted expression; required with an AnnData ``data``, and used instead of the table
        ``predicted_key`` of a SpatialData.
    sample
        Section to draw; required when the tables cover several.
    kind
        ``"spatial"``: maps over the H&E overview; ``"scatter"``: measured (x) against predicted (y) per spot.
    predicted_key
        Table of predicted expression in the SpatialData.
    measured_key
        Table of measured raw counts in the SpatialData.
    {measured_params}
    cmap
        Colour map of the expression maps.
    spot_scale
        Factor on the drawn spot radius.
    {image_params}
    image_alpha
        Opacity of the H&E; below 1 it is faded towards white so the spots stand out.
    ncols
        Scatter panels per row.
    panel_size
        Width of a panel in inches (new figure only).
    {plot_output}

    Examples
    --------
    >>> import st_from_he as sth
    >>> sth.pl.predicted_vs_measured(sdata, ["ERBB2", "KRT19"], sample="C6")  # doctest: +SKIP
    >>> sth.pl.predicted_vs_measured(sdata, ["ERBB2", "KRT19"], sample="C6", kind="scatter")  # doctest: +SKIP
    >>> table, pred = sdata.tables["table"], sdata.tables["predicted_expression"]  # doctest: +SKIP
    >>> sth.pl.predicted_vs_measured(table, "ERBB2", predicted=pred, sample="C6", image=he_array)  # doctest: +SKIP
    """
    from st_from_he.tl._evaluate import _paired, _pearson

    function = "sth.pl.predicted_vs_measured"
    if kind not in ("spatial", "scatter"):
        raise ValueError(f"`kind` must be 'spatial' or 'scatter', got {kind!r}.")
    genes = [genes] if isinstance(genes, str) else list(genes)
    if not genes:
        raise ValueError("Give at least one gene.")
    store, meas = _paired_tables(data, predicted, predicted_key, measured_key, function)
    paired = _paired(store, predicted_key, measured_key, genes=genes, layer=layer, normalize=normalize)
    names = None if table_samples(meas) is None else paired.samples
    sample = resolve_sample(names, sample, f"the spots of tables {predicted_key!r} and {measured_key!r}")
    rows = np.arange(len(paired.samples)) if sample is None else paired.rows_of(sample)
    measured, predicted_values = paired.measured[rows], paired.predicted[rows]
    r, constant = _pearson(predicted_values, measured)

    if kind == "scatter":
        axes = given_axes(ax, len(genes), f"kind='scatter' with {len(genes)} gene(s)")
        own = axes is None
        if own:
            ncols = max(1, min(ncols, len(genes)))
            nrows = int(np.ceil(len(genes) / ncols))
            fig, grid = new_figure(nrows, ncols, panel_size=(panel_size, panel_size))
            axes = grid.ravel()
        else:
            fig = axes[0].figure
        for i, a in enumerate(axes):
            if i >= len(genes):
                a.set_visible(False)
                continue
            x, y = measured[:, i], predicted_values[:, i]
            lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
            pad = 0.05 * (hi - lo or 1.0)
            a.plot([lo - pad, hi + pad], [lo - pad, hi + pad], ls="--", lw=0.8, color="0.6", zorder=1, label="y = x")
            a.scatter(x, y, s=10, alpha=0.7, color="#3b6ea8", edgecolors="none", zorder=2)
            a.set_xlim(lo - pad, hi + pad)
            a.set_ylim(lo - pad, hi + pad)
            a.set_aspect("equal")
            a.set_title(f"{genes[i]} ({_pcc_label(r[i], constant[i])})")
            a.set_xlabel(f"measured {EXPRESSION_LABEL}")
            a.set_ylabel(f"predicted {EXPRESSION_LABEL}")
            if i == 0:
                a.legend(loc="upper left")
        if own:
            fig.suptitle(titled(sample, f"predicted vs measured expression ({len(rows)} spots)"))
        return finish(fig, axes, show=show, save=save, return_fig=return_fig, own_figure=own)

    meas_rows = paired.measured_rows[rows]
    layout = spot_layout(
        data,
        meas,
        meas_rows,
        sample=sample,
        image=image,
        scale_factor=scale_factor,
        spatial_key=spatial_key,
        table_key=measured_key,
    )
    radius = layout.radius * spot_scale
    bounds = spot_bounds(layout.xy, radius)
    overview = layout.overview(bounds)
    axes = given_axes(ax, 2 * len(genes), f"kind='spatial' with {len(genes)} gene(s) (measured, predicted per gene)")
    own = axes is None
    aspect = (bounds[3] - bounds[2]) / (bounds[1] - bounds[0])
    panel_height = panel_size * aspect + 0.35
    if own:
        fig, grid = new_figure(len(genes), 2, panel_size=(panel_size + 0.45, panel_height))  # + room for colour bars
        fig.get_layout_engine().set(hspace=0.06)
    else:
        fig, grid = axes[0].figure, axes.reshape(len(genes), 2)
    for i, gene in enumerate(genes):
        values = np.concatenate([measured[:, i], predicted_values[:, i]])
        norm, extend = _robust_norm(values)
        spots = None
        for a, values_, title in (
            (grid[i, 0], measured[:, i], f"{gene}: measured"),
            (grid[i, 1], predicted_values[:, i], f"{gene}: predicted ({_pcc_label(r[i], constant[i])})"),
        ):
            spots = draw_section(
                a, layout, values_, radius=radius, cmap=cmap, norm=norm, image=overview, image_alpha=image_alpha
            )
            a.set_title(title)
        height = grid[i, 0].get_position().height * fig.get_figheight() if not own else panel_height
        fig.colorbar(
            spots,
            ax=grid[i, :].tolist(),
            shrink=colorbar_shrink(height),
            label=EXPRESSION_LABEL,
            pad=0.02,
            extend=extend,
        )
    if own:
        fig.suptitle(titled(sample, "predicted vs measured expression"))
    return finish(fig, grid, show=show, save=save, return_fig=return_fig, own_figure=own)


@styled
@inject_docs
@plot_docs(" (one)")
def tumor_map(
    data: SpatialData | AnnData,
    *,
    score_key: str = "tumor_score",
    table_key: str = PREDICTED_KEY,
    labels: str | pd.Series | None = None,
    sample: str | None = None,
    measured_key: str = TABLE_KEY,
    cmap: str = "magma",
    label_color: str = "#00b4d8",
    spot_scale: float = 1.0,
    image=True,
    image_alpha: float = 0.75,
    scale_factor: float | None = None,
    spatial_key: str = "spatial",
    title: str | None = None,
    panel_size: float = 4.5,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """A spot score (by default the tumour score) over the H&E, with labelled tumour spots outlined.

    Parameters
    ----------
    data
        A SpatialData holding the scored table and (optionally) the section's image, or the scored table itself as an
        AnnData.
    score_key
        Column of the table's ``obs`` to draw, as written by :func:`~st_from_he.tl.score_tumor`.
    table_key
        Table of the SpatialData holding the score (predictions by default; the measured table works too).
    labels
        Tumour labels to outline: a boolean ``obs`` column of the measured table (of the table itself for an AnnData)
        or a boolean :class:`~pandas.Series` indexed by its ``obs_names`` (as for
        :func:`~st_from_he.tl.evaluate_localization`). The legend gives the AUROC of the score against them.
    sample
        Section to draw; required when the table covers several. A spot's section is ``obs["sample"]``, else the
        region (shapes element) its row annotates.
    measured_key
        Table of the SpatialData the labels belong to.
    cmap
        Colour map of the score.
    label_color
        Colour of the label outlines.
    spot_scale
        Factor on the drawn spot radius.
    {image_params}
    image_alpha
        Opacity of the H&E; below 1 it is faded towards white so the spots stand out.
    title
        Panel title; default names the section and the table.
    panel_size
        Width of the panel in inches (new figure only).
    {plot_output}

    Examples
    --------
    >>> import st_from_he as sth
    >>> sth.tl.score_tumor(sdata)  # doctest: +SKIP
    >>> cancer = sdata.tables["table"].obs["expression_cluster_label"].str.contains("cancer")  # doctest: +SKIP
    >>> sth.pl.tumor_map(sdata, sample="C6", labels=cancer)  # doctest: +SKIP
    """
    from anndata import AnnData
    from matplotlib.lines import Line2D

    from st_from_he.tl._evaluate import _spot_index, _table

    function = "sth.pl.tumor_map"
    check_data(data, function)
    if isinstance(data, AnnData):
        table, where = data, "The AnnData"
        hint = f"`sth.tl.score_tumor(sdata, key_added={score_key!r})` on the SpatialData it came from"
    else:
        table = _table(data, table_key, "scored")
        where = f"Table {table_key!r}"
        hint = f"`sth.tl.score_tumor(sdata, table_key={table_key!r}, key_added={score_key!r})`"
    if score_key not in table.obs:
        raise KeyError(f"{where} has no obs[{score_key!r}]; compute it with {hint}.")
    samples = table_samples(table)
    sample = resolve_sample(samples, sample, "the AnnData" if isinstance(data, AnnData) else f"table {table_key!r}")
    rows = np.arange(table.n_obs) if sample is None else np.flatnonzero(samples == sample)
    layout = spot_layout(
        data,
        table,
        rows,
        sample=sample,
        image=image,
        scale_factor=scale_factor,
        spatial_key=spatial_key,
        table_key=table_key,
    )
    radius = layout.radius * spot_scale
    values = table.obs[score_key].to_numpy(dtype=float)[rows]
    bounds = spot_bounds(layout.xy, radius)
    overview = layout.overview(bounds)
    axes = given_axes(ax, 1, "tumor_map")
    own = axes is None
    if own:
        aspect = (bounds[3] - bounds[2]) / (bounds[1] - bounds[0])
        fig, grid = new_figure(1, 1, panel_size=(panel_size, panel_size * aspect * 0.85 + 0.4))
        ax = grid[0, 0]
    else:
        ax = axes[0]
        fig = ax.figure
    axes_height = ax.get_position().height * fig.get_figheight()
    norm, extend = _robust_norm(values)
    spots = draw_section(
        ax, layout, values, radius=radius, cmap=cmap, norm=norm, image=overview, image_alpha=image_alpha
    )
    params = table.uns.get(score_key)
    markers = params.get("params", {}).get("markers") if isinstance(params, dict) else None
    cbar_label = score_key.replace("_", " ")
    if markers is not None:
        cbar_label += f" (mean z-score of {len(markers)} markers)"
    fig.colorbar(spots, ax=ax, shrink=colorbar_shrink(axes_height), pad=0.02, label=cbar_label, extend=extend)
    if labels is not None:
        from matplotlib.collections import EllipseCollection
        from sklearn.metrics import roc_auc_score

        from st_from_he.tl._tumor import _labels

        if isinstance(data, AnnData):
            flags = _labels(table, labels, "the AnnData")
            hit = rows
        else:
            store = table_store(data, {table_key: None, measured_key: None}, function)
            meas = data.tables[measured_key]
            flags = _labels(meas, labels, measured_key)
            scored = _spot_index(store[table_key], table_key)[rows]
            hit = _spot_index(store[measured_key], measured_key).get_indexer(scored)
        state = np.full(len(rows), np.nan)  # 1 tumour, 0 not, NaN unlabelled or unmatched
        state[hit >= 0] = flags.to_numpy(dtype=float, na_value=np.nan)[hit[hit >= 0]]
        known, positive = ~np.isnan(state), state == 1
        diameters = np.full(int(positive.sum()), 2.1 * radius)
        rings = EllipseCollection(
            diameters,
            diameters,
            np.zeros(len(diameters)),
            units="xy",
            offsets=layout.xy[positive],
            offset_transform=ax.transData,
            facecolors="none",
            edgecolors=label_color,
            linewidths=1.2,
            zorder=3,
        )
        ax.add_collection(rings)
        truth = positive[known]
        label = f"tumor label ({int(positive.sum())} spots"
        if truth.any() and not truth.all():
            label += f", AUROC {roc_auc_score(truth, values[known]):.2f}"
        handle = Line2D(
            [],
            [],
            ls="none",
            marker="o",
            markersize=8,
            markerfacecolor="none",
            markeredgecolor=label_color,
            markeredgewidth=1.2,
            label=label + ")",
        )
        ax.legend(handles=[handle], loc="upper center", bbox_to_anchor=(0.5, 0.0), frameon=False)
    if title is None:
        if isinstance(data, AnnData):
            title = titled(sample, score_key.replace("_", " "))
        else:
            what = "predicted" if table_key == PREDICTED_KEY else f"{table_key!r}"
            title = titled(sample, f"{score_key.replace('_', ' ')} ({what})")
    ax.set_title(title)
    return finish(fig, [ax], show=show, save=save, return_fig=return_fig, own_figure=own)
