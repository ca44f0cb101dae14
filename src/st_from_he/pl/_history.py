"""Per-epoch training and validation losses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from st_from_he._docs import inject_docs

from ._utils import finish, given_axes, new_figure, plot_docs, styled

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_SPLITS = {"train": ("train_", "_train", "train/"), "val": ("val_", "valid_", "validation_", "_val", "val/")}
_IGNORED = {"epoch", "step", "lr", "learning_rate", "time", "best_epoch"}


def _history_frame(history) -> pd.DataFrame:
    if hasattr(history, "history") and not isinstance(history, pd.DataFrame | Mapping):
        history = history.history
        if history is None:
            raise ValueError("The model has no training history (fit it first, or it is a non-neural preset).")
    if isinstance(history, Mapping):
        history = pd.DataFrame(dict(history))
    if not isinstance(history, pd.DataFrame):
        raise TypeError(
            f"Expected a DataFrame, a dict of lists or a model with `.history`, got {type(history).__name__}."
        )
    if history.empty:
        raise ValueError("The training history is empty.")
    df = history.copy()
    if "epoch" not in df:
        df["epoch"] = np.arange(len(df))
    # Lightning logs train and validation metrics on separate rows of the same epoch: one row per epoch.
    numeric = df.select_dtypes("number")
    return numeric.groupby("epoch", sort=True).mean().reset_index()


def _split(column: str) -> tuple[str, str] | None:
    """``(split, loss name)`` of a column such as ``train_loss``, ``val_contrastive`` or ``loss_val``."""
    for split, affixes in _SPLITS.items():
        for affix in affixes:
            if affix.endswith(("_", "/")) and column.startswith(affix):
                return split, column[len(affix) :]
            if affix.startswith("_") and column.endswith(affix):
                return split, column[: -len(affix)]
    return None


def _panels(df: pd.DataFrame, keys: Sequence[str] | None) -> dict[str, dict[str, str]]:
    """``{loss name: {split: column}}``; columns without a split prefix count as training losses."""
    panels: dict[str, dict[str, str]] = {}
    columns = [c for c in df.columns if c not in _IGNORED] if keys is None else list(keys)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(f"No history column(s) {missing}; columns: {list(df.columns)}.")
    split_columns = [c for c in columns if _split(c) is not None]
    if keys is None and split_columns:
        columns = split_columns  # default: the paired train/val columns (other numbers, e.g. lr, are left out)
    for column in columns:
        split, name = _split(column) or ("train", column)
        panels.setdefault(name, {})[split] = column
    # the total loss first
    return dict(sorted(panels.items(), key=lambda item: (item[0] != "loss", list(panels).index(item[0]))))


@styled
@inject_docs
@plot_docs(" (one per loss panel)")
def training_history(
    history,
    *,
    keys: Sequence[str] | None = None,
    log_y: bool = False,
    mark_best: bool = True,
    ncols: int = 3,
    title: str | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """Training and validation losses per epoch, one panel per loss.

    Columns named ``train_<loss>`` and ``val_<loss>`` (also ``<loss>_train``/``<loss>_val``) are paired in one
    panel: training solid, validation dashed. By default every such pair is drawn (e.g. the total ``loss`` first, then
    ``contrastive``, ``reconstruction``, ``regression``); the epoch of the lowest validation total loss (the weights
    a model keeps) is marked.

    Parameters
    ----------
    history
        A :class:`~pandas.DataFrame` with a column ``epoch`` and loss columns (rows of the same epoch are averaged,
        as lightning logs training and validation separately), a dict of lists, or a fitted model with a
        ``.history`` attribute such as :class:`~st_from_he.tl.ExpressionModel`.
    keys
        Columns to draw; default all ``train_*``/``val_*`` columns (else all numeric columns but ``epoch``).
    log_y
        Logarithmic loss axis.
    mark_best
        Mark the epoch of the lowest validation loss.
    ncols
        Panels per row (new figure only).
    title
        Figure title (the panel's title with a given single ``ax``); default ``"Training history"``.
    {plot_output}

    Examples
    --------
    >>> import st_from_he as sth
    >>> model.fit(train, max_epochs=30)  # doctest: +SKIP
    >>> sth.pl.training_history(model)  # doctest: +SKIP
    >>> sth.pl.training_history(model.history, keys=["train_loss", "val_loss"], log_y=True)  # doctest: +SKIP
    """
    df = _history_frame(history)
    panels = _panels(df, keys)
    if not panels:
        raise ValueError(f"No loss column to draw among {list(df.columns)}.")
    best = None
    if mark_best:
        val = panels.get("loss", {}).get("val") or next((p["val"] for p in panels.values() if "val" in p), None)
        if val is not None and df[val].notna().any():
            best = int(df.loc[df[val].idxmin(), "epoch"])
    given = given_axes(
        ax, len(panels), f"training_history with {len(panels)} loss panel(s) {list(panels)} (choose some with `keys=`)"
    )
    if given is not None:
        fig, axes = given[0].figure, given
    else:
        ncols = max(1, min(ncols, len(panels)))
        nrows = int(np.ceil(len(panels) / ncols))
        fig, axes = new_figure(nrows, ncols, panel_size=(3.2, 2.6))
    colors = {"train": "#1f77b4", "val": "#d62728"}
    for i, a in enumerate(axes.flat):
        if i >= len(panels):
            a.set_visible(False)
            continue
        name, columns = list(panels.items())[i]
        for split in ("train", "val"):
            if split not in columns:
                continue
            series = df[["epoch", columns[split]]].dropna()
            a.plot(
                series["epoch"],
                series[columns[split]],
                color=colors[split],
                ls="-" if split == "train" else "--",
                marker="o" if len(series) <= 30 else None,
                markersize=2.5,
                label="training" if split == "train" else "validation",
            )
        if best is not None:
            a.axvline(best, color="0.5", ls=":", lw=1, label=f"best epoch ({best})")
        a.set_title(name.replace("_", " "))
        a.set_xlabel("epoch")
        a.set_ylabel("loss")
        if log_y:
            a.set_yscale("log")
        a.xaxis.get_major_locator().set_params(integer=True)
        first, last = df["epoch"].min(), df["epoch"].max()
        if last - first < 1:  # one epoch: a unit-wide axis with its one tick, not matplotlib's +-0.05 around it
            a.set_xlim(first - 0.5, last + 0.5)
            a.set_xticks([first])
        if i == 0:
            a.legend(loc="best")
    if given is None:
        fig.suptitle(title or "Training history")
    elif title and len(given) == 1:
        given[0].set_title(title)
    return finish(fig, axes, show=show, save=save, return_fig=return_fig, own_figure=given is None)
