"""Spatial plots over the H&E: predicted against measured expression, and tumour score maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from st_from_he._docs import inject_docs
from st_from_he._sdata import PREDICTED_KEY, TABLE_KEY

from ._utils import (
    EXPRESSION_LABEL,
    colorbar_shrink,
    draw_section,
    finish,
    new_figure,
    overview_image,
    resolve_sample,
    spot_bounds,
    spot_centres,
    spot_radius,
    styled,
    table_samples,
)

if TYPE_CHECKING:
    import pandas as pd
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


@styled
@inject_docs
def predicted_vs_measured(
    sdata: SpatialData,
    genes: str | Sequence[str],
    *,
    sample: str | None = None,
    kind: Literal["spatial", "scatter"] = "spatial",
    predicted_key: str = PREDICTED_KEY,
    measured_key: str = TABLE_KEY,
    layer: str | None = None,
    normalize: bool | None = None,
    cmap: str = "viridis",
    spot_scale: float = 1.0,
    image: bool = True,
    image_alpha: float = 0.6,
    ncols: int = 4,
    panel_size: float = 3.0,
    return_fig: bool = False,
    save: str | Path | None = None,
) -> Figure | None:
    """Measured and predicted expression of genes in one section, side by side over the H&E, or as scatter plots.

    Measured values are ``log1p`` CP10k of the raw counts (computed on the fly), predicted ones are read from the
    prediction table; spots are matched by region and instance id. Each gene's two maps share one colour scale and
    the title gives the Pearson correlation across the section's spots (as :func:`~st_from_he.tl.evaluate`).

    Parameters
    ----------
    sdata
        Data holding the prediction, the measured table and the section's image.
    genes
        One gene or a list; each gets a row of two maps (``kind="spatial"``) or a scatter panel.
    sample
        Section to draw; required when the tables cover several.
    kind
        ``"spatial"``: maps over the H&E overview; ``"scatter"``: measured (x) against predicted (y) per spot.
    predicted_key
        Table of predicted expression.
    measured_key
        Table of measured raw counts.
    {measured_params}
    cmap
        Colour map of the expression maps.
    spot_scale
        Factor on the drawn spot radius.
    image
        Draw the H&E under the spots (from a coarse pyramid level).
    image_alpha
        Opacity of the H&E; below 1 it is faded towards white so the spots stand out.
    ncols
        Scatter panels per row.
    panel_size
        Width of a panel in inches.
    {plot_output}

    Examples
    --------
    >>> import st_from_he as sth
    >>> sth.pl.predicted_vs_measured(sdata, ["ERBB2", "KRT19"], sample="C6")  # doctest: +SKIP
    >>> sth.pl.predicted_vs_measured(sdata, ["ERBB2", "KRT19"], sample="C6", kind="scatter")  # doctest: +SKIP
    """
    from st_from_he.tl._evaluate import _paired, _pearson

    if kind not in ("spatial", "scatter"):
        raise ValueError(f"`kind` must be 'spatial' or 'scatter', got {kind!r}.")
    genes = [genes] if isinstance(genes, str) else list(genes)
    if not genes:
        raise ValueError("Give at least one gene.")
    paired = _paired(sdata, predicted_key, measured_key, genes=genes, layer=layer, normalize=normalize)
    sample = resolve_sample(paired.samples, sample, f"the spots of tables {predicted_key!r} and {measured_key!r}")
    rows = paired.rows_of(sample)
    measured, predicted = paired.measured[rows], paired.predicted[rows]
    r, constant = _pearson(predicted, measured)

    if kind == "scatter":
        ncols = max(1, min(ncols, len(genes)))
        nrows = int(np.ceil(len(genes) / ncols))
        fig, axes = new_figure(nrows, ncols, panel_size=(panel_size, panel_size))
        for i, ax in enumerate(axes.flat):
            if i >= len(genes):
                ax.set_visible(False)
                continue
            x, y = measured[:, i], predicted[:, i]
            lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
            pad = 0.05 * (hi - lo or 1.0)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], ls="--", lw=0.8, color="0.6", zorder=1, label="y = x")
            ax.scatter(x, y, s=10, alpha=0.7, color="#3b6ea8", edgecolors="none", zorder=2)
            ax.set_xlim(lo - pad, hi + pad)
            ax.set_ylim(lo - pad, hi + pad)
            ax.set_aspect("equal")
            ax.set_title(f"{genes[i]} ({_pcc_label(r[i], constant[i])})")
            ax.set_xlabel(f"measured {EXPRESSION_LABEL}")
            ax.set_ylabel(f"predicted {EXPRESSION_LABEL}")
            if i == 0:
                ax.legend(loc="upper left")
        fig.suptitle(f"{sample}: predicted vs measured expression ({len(rows)} spots)")
        return finish(fig, save=save, return_fig=return_fig)

    meas = sdata.tables[measured_key]
    meas_rows = paired.measured_rows[rows]
    xy = spot_centres(sdata, meas, meas_rows)
    radius = spot_radius(sdata, meas, meas_rows, xy) * spot_scale
    bounds = spot_bounds(xy, radius)
    overview = overview_image(sdata, sample, bounds) if image else None
    aspect = (bounds[3] - bounds[2]) / (bounds[1] - bounds[0])
    panel_height = panel_size * aspect + 0.35
    fig, axes = new_figure(len(genes), 2, panel_size=(panel_size + 0.45, panel_height))  # + room for colour bars
    fig.get_layout_engine().set(hspace=0.06)
    for i, gene in enumerate(genes):
        values = np.concatenate([measured[:, i], predicted[:, i]])
        norm, extend = _robust_norm(values)
        spots = None
        for ax, data, title in (
            (axes[i, 0], measured[:, i], f"{gene}: measured"),
            (axes[i, 1], predicted[:, i], f"{gene}: predicted ({_pcc_label(r[i], constant[i])})"),
        ):
            spots = draw_section(
                ax, sdata, sample, xy, radius, data, cmap=cmap, norm=norm, image=overview, image_alpha=image_alpha
            )
            ax.set_title(title)
        shrink = colorbar_shrink(panel_height)
        fig.colorbar(spots, ax=axes[i, :].tolist(), shrink=shrink, label=EXPRESSION_LABEL, pad=0.02, extend=extend)
    fig.suptitle(f"{sample}: predicted vs measured expression")
    return finish(fig, save=save, return_fig=return_fig)


@styled
@inject_docs
def tumor_map(
    sdata: SpatialData,
    *,
    score_key: str = "tumor_score",
    table_key: str = PREDICTED_KEY,
    labels: str | pd.Series | None = None,
    sample: str | None = None,
    measured_key: str = TABLE_KEY,
    cmap: str = "magma",
    label_color: str = "#00b4d8",
    spot_scale: float = 1.0,
    image: bool = True,
    image_alpha: float = 0.75,
    title: str | None = None,
    ax: Axes | None = None,
    panel_size: float = 4.5,
    return_fig: bool = False,
    save: str | Path | None = None,
) -> Figure | None:
    """A spot score (by default the tumour score) over the H&E, with labelled tumour spots outlined.

    Parameters
    ----------
    sdata
        Data holding the scored table and the section's image.
    score_key
        Column of the table's ``obs`` to draw, as written by :func:`~st_from_he.tl.score_tumor`.
    table_key
        Table holding the score (predictions by default; the measured table works too).
    labels
        Tumour labels to outline: a boolean ``obs`` column of the measured table or a boolean
        :class:`~pandas.Series` indexed by its ``obs_names`` (as for :func:`~st_from_he.tl.evaluate_localization`).
        The legend gives the AUROC of the score against them.
    sample
        Section to draw; required when the table covers several.
    measured_key
        Table the labels belong to.
    cmap
        Colour map of the score.
    label_color
        Colour of the label outlines.
    spot_scale
        Factor on the drawn spot radius.
    image
        Draw the H&E under the spots (from a coarse pyramid level).
    image_alpha
        Opacity of the H&E; below 1 it is faded towards white so the spots stand out.
    title
        Panel title; default names the section and the table.
    ax
        Axes to draw into; a new figure otherwise.
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
    from matplotlib.lines import Line2D

    from st_from_he.tl._evaluate import _spot_index, _table

    table = _table(sdata, table_key, "scored")
    if score_key not in table.obs:
        raise KeyError(
            f"Table {table_key!r} has no obs[{score_key!r}]; compute it with "
            f"`sth.tl.score_tumor(sdata, table_key={table_key!r}, key_added={score_key!r})`."
        )
    samples = table_samples(table)
    sample = resolve_sample(samples, sample, f"table {table_key!r}")
    rows = np.flatnonzero(samples == sample)
    xy = spot_centres(sdata, table, rows)
    radius = spot_radius(sdata, table, rows, xy) * spot_scale
    values = table.obs[score_key].to_numpy(dtype=float)[rows]
    bounds = spot_bounds(xy, radius)
    overview = overview_image(sdata, sample, bounds) if image else None
    if ax is None:
        aspect = (bounds[3] - bounds[2]) / (bounds[1] - bounds[0])
        fig, axes = new_figure(1, 1, panel_size=(panel_size, panel_size * aspect * 0.85 + 0.4))
        ax = axes[0, 0]
    else:
        fig = ax.figure
    axes_height = ax.get_position().height * fig.get_figheight()
    norm, extend = _robust_norm(values)
    spots = draw_section(
        ax, sdata, sample, xy, radius, values, cmap=cmap, norm=norm, image=overview, image_alpha=image_alpha
    )
    markers = (
        table.uns.get(score_key, {}).get("params", {}).get("markers")
        if isinstance(table.uns.get(score_key), dict)
        else None
    )
    cbar_label = score_key.replace("_", " ")
    if markers is not None:
        cbar_label += f" (mean z-score of {len(markers)} markers)"
    fig.colorbar(spots, ax=ax, shrink=colorbar_shrink(axes_height), pad=0.02, label=cbar_label, extend=extend)
    if labels is not None:
        from matplotlib.collections import EllipseCollection
        from sklearn.metrics import roc_auc_score

        from st_from_he.tl._tumor import _labels

        meas = _table(sdata, measured_key, "measured")
        flags = _labels(meas, labels, measured_key)
        hit = _spot_index(meas, measured_key).get_indexer(_spot_index(table, table_key)[rows])
        state = np.full(len(rows), np.nan)  # 1 tumour, 0 not, NaN unlabelled or unmatched
        state[hit >= 0] = flags.to_numpy(dtype=float, na_value=np.nan)[hit[hit >= 0]]
        known, positive = ~np.isnan(state), state == 1
        diameters = np.full(int(positive.sum()), 2.1 * radius)
        rings = EllipseCollection(
            diameters,
            diameters,
            np.zeros(len(diameters)),
            units="xy",
            offsets=xy[positive],
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
        what = "predicted" if table_key == PREDICTED_KEY else f"{table_key!r}"
        title = f"{sample}: {score_key.replace('_', ' ')} ({what})"
    ax.set_title(title)
    return finish(fig, save=save, return_fig=return_fig)
