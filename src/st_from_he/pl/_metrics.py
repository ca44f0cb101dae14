"""Prediction accuracy by gene set, method and section."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from st_from_he._docs import inject_docs

from ._utils import finish, given_axes, new_figure, plot_docs, styled

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_DEFAULT_METHOD = "prediction"
_SET_ORDER = ("heg", "hvg", "markers", "all")
_SET_LABELS = {"heg": "HEG", "hvg": "HVG", "markers": "markers", "all": "all genes"}
_PER_GENE_COLUMNS = {
    "sample",
    "gene",
    "pearson",
    "spearman",
    "mse",
    "mae",
    "constant",
    "mean_measured",
    "var_measured",
    "mean_predicted",
    "zero_fraction",
    "method",
}


def _tidy_one(results, method: str) -> pd.DataFrame:
    """``method, sample, gene_set, pearson`` rows from one method's results in any accepted form."""
    if isinstance(results, Mapping) and "per_gene" in results:
        results = results["per_gene"]
    if not isinstance(results, pd.DataFrame):
        raise TypeError(
            f"Results of {method!r} must be a DataFrame or the dict returned by `sth.tl.evaluate`, got "
            f"{type(results).__name__}."
        )
    df = results
    if "gene_set" in df.columns and "pearson" in df.columns:  # already tidy
        out = df.copy()
    elif "pearson" in df.columns and "gene" in df.columns:  # evaluate's per-gene table: one bool column per set
        sets = [c for c in df.columns if c not in _PER_GENE_COLUMNS and pd.api.types.is_bool_dtype(df[c])]
        if not sets:
            raise ValueError("The per-gene table has no boolean gene-set column (e.g. 'heg').")
        out = pd.concat(
            [
                df.loc[df[s], [c for c in ("method", "sample", "gene", "pearson") if c in df]].assign(gene_set=s)
                for s in sets
            ],
            ignore_index=True,
        )
    else:  # evaluate's summary: one pcc_<set> column per set, one row per section
        pcc = [c for c in df.columns if c.startswith("pcc_")]
        if not pcc:
            raise ValueError(
                "Expected a tidy table with columns 'gene_set' and 'pearson' (plus 'method', 'sample'), the per-gene "
                f"or the summary table of `sth.tl.evaluate`; got columns {list(df.columns)}."
            )
        wide = df.reset_index() if "sample" not in df.columns else df
        keep = [c for c in ("method", "sample") if c in wide]
        out = wide.melt(id_vars=keep, value_vars=pcc, var_name="gene_set", value_name="pearson")
        out["gene_set"] = out["gene_set"].str.removeprefix("pcc_")
    if "method" not in out:
        out["method"] = method
    if "sample" not in out:
        out["sample"] = "all"
    return out[["method", "sample", "gene_set", "pearson"]]


def _tidy(results) -> pd.DataFrame:
    if isinstance(results, Mapping) and "per_gene" not in results:
        if not results:
            raise ValueError("`results` is empty.")
        frames = [_tidy_one(r, str(name)).assign(method=str(name)) for name, r in results.items()]
        return pd.concat(frames, ignore_index=True)
    return _tidy_one(results, _DEFAULT_METHOD)


def _ordered(values: Sequence[str], preferred: Sequence[str] = ()) -> list[str]:
    values = list(dict.fromkeys(map(str, values)))
    return [v for v in preferred if v in values] + [v for v in values if v not in preferred]


@styled
@inject_docs
@plot_docs(" (one)")
def metrics(
    results: pd.DataFrame | Mapping,
    *,
    kind: Literal["bar", "box"] = "bar",
    gene_sets: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    title: str | None = "Predicted vs measured expression",
    palette: Sequence | str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """Pearson correlation (PCC) of predictions by gene set, per method and per section.

    ``kind="bar"``: a bar per gene set and method at the mean over sections of each section's mean PCC, with a dot
    per section. ``kind="box"``: boxes of the per-gene PCCs (pooled over sections) per gene set and method, with the
    section means as dots (needs per-gene results for boxes to mean anything).

    Parameters
    ----------
    results
        Any of

        - a tidy :class:`~pandas.DataFrame` with columns ``gene_set`` and ``pearson`` and optionally ``method`` and
          ``sample`` (one row per gene, or already one per section);
        - the dict returned by :func:`st_from_he.tl.evaluate`, or its ``"per_gene"`` or ``"summary"`` table;
        - a dict from method name to any of the above, e.g. ``{"model": res, "ridge": res_ridge}``.
    kind
        ``"bar"`` or ``"box"``.
    gene_sets
        Gene sets to show, in order; default all present (``heg``, ``hvg``, ``markers``, ``all`` first).
    methods
        Methods to show, in order; default all, in order of appearance.
    title
        Axes title (``None`` for none).
    palette
        Colours of the methods: a list or a colormap name; default ``tab10``.
    {plot_output}

    Examples
    --------
    >>> import st_from_he as sth
    >>> res = sth.tl.evaluate(sdata)  # doctest: +SKIP
    >>> sth.pl.metrics(res)  # doctest: +SKIP
    >>> sth.pl.metrics({"model": res, "ridge": res_ridge}, kind="box")  # doctest: +SKIP
    """
    import matplotlib as mpl

    if kind not in ("bar", "box"):
        raise ValueError(f"`kind` must be 'bar' or 'box', got {kind!r}.")
    tidy = _tidy(results)
    tidy = tidy[np.isfinite(tidy["pearson"].to_numpy(dtype=float))]
    sets = _ordered(tidy["gene_set"], _SET_ORDER) if gene_sets is None else list(gene_sets)
    names = _ordered(tidy["method"]) if methods is None else list(methods)
    for what, chosen, present in (("gene set", sets, tidy["gene_set"]), ("method", names, tidy["method"])):
        missing = [c for c in chosen if c not in set(present)]
        if missing:
            raise KeyError(f"No results for {what}(s) {missing}; present: {_ordered(present)}.")
    tidy = tidy[tidy["gene_set"].isin(sets) & tidy["method"].isin(names)]
    per_section = tidy.groupby(["method", "gene_set", "sample"], sort=False)["pearson"].mean().reset_index()

    if isinstance(palette, str) or palette is None:
        cmap = mpl.colormaps[palette or "tab10"]
        colors = [cmap(i % cmap.N) for i in range(len(names))]
    else:
        colors = list(palette)
    given = given_axes(ax, 1, "metrics")
    if given is None:
        width = max(3.2, 0.9 + len(sets) * (0.35 + 0.3 * len(names)))
        fig, axes = new_figure(1, 1, panel_size=(width, 3.0))
        ax = axes[0, 0]
    else:
        ax = given[0]
        fig = ax.figure
    group_width = 0.8
    bar_width = group_width / len(names)
    centres = np.arange(len(sets))
    rng = np.random.default_rng(0)
    for j, (name, color) in enumerate(zip(names, colors, strict=False)):
        x = centres - group_width / 2 + (j + 0.5) * bar_width
        sec = per_section[per_section["method"] == name]
        if kind == "bar":
            means = [sec.loc[sec["gene_set"] == s, "pearson"].mean() for s in sets]
            ax.bar(x, means, width=bar_width * 0.9, color=color, alpha=0.85, label=name, zorder=2)
        else:
            data = [tidy.loc[(tidy["method"] == name) & (tidy["gene_set"] == s), "pearson"].to_numpy() for s in sets]
            box = ax.boxplot(
                data,
                positions=x,
                widths=bar_width * 0.8,
                patch_artist=True,
                showfliers=False,
                medianprops={"color": "black", "lw": 1},
                whiskerprops={"color": "0.3"},
                capprops={"color": "0.3"},
            )
            for patch in box["boxes"]:
                patch.set(facecolor=color, alpha=0.75, edgecolor="0.3")
            ax.plot([], [], marker="s", ls="none", color=color, alpha=0.75, label=name)
        for i, s in enumerate(sets):
            points = sec.loc[sec["gene_set"] == s, "pearson"].to_numpy()
            jitter = rng.uniform(-0.18, 0.18, len(points)) * bar_width if len(points) > 1 else np.zeros(len(points))
            ax.scatter(
                np.full(len(points), x[i]) + jitter,
                points,
                s=12,
                color="0.15",
                edgecolors="white",
                linewidths=0.4,
                zorder=3,
                label="section mean" if (i == 0 and j == 0) else None,
            )
    ax.axhline(0, color="0.4", lw=0.8, zorder=1)
    ax.set_xticks(centres, [_SET_LABELS.get(s, s) for s in sets])
    ax.set_xlim(-0.6, len(sets) - 0.4)
    ax.set_xlabel("gene set")
    ax.set_ylabel("mean PCC per section" if kind == "bar" else "PCC per gene")
    if title:
        ax.set_title(title)
    n_sections = per_section["sample"].nunique()
    handles, labels = ax.get_legend_handles_labels()
    order = [i for i, label in enumerate(labels) if label != "section mean"] + [
        i for i, label in enumerate(labels) if label == "section mean"
    ]
    ax.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        title=f"{n_sections} section{'s' if n_sections != 1 else ''}",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0.0,
    )
    return finish(fig, [ax], show=show, save=save, return_fig=return_fig, own_figure=given is None)
