"""Tumour scores from (predicted) biomarker expression, and how well they localise labelled tumour spots."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from st_from_he._logging import logger
from st_from_he._sdata import PREDICTED_KEY, TABLE_KEY, UNS_KEY, check_sdata
from st_from_he._validate import is_raw_counts

from ._evaluate import (
    _align,
    _dense,
    _is_constant,
    _lognorm_rows,
    _matrix,
    _measured_table,
    _predicted_table,
    _samples_of,
    _table,
)
from ._gene_sets import TUMOR_MARKERS, _check_markers, _check_measured_params

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def _marker_expression(
    table: AnnData, markers: Sequence[str], *, key: str, layer: str | None, normalize: bool | None
) -> tuple[np.ndarray, list[str], bool]:
    """Spots x present-markers expression (``log1p`` CP10k when the table holds raw counts), the markers, normalised?"""
    markers = list(dict.fromkeys(_check_markers(markers) or []))
    present = [g for g in markers if g in table.var_names]
    if not present:
        raise ValueError(
            f"None of the markers {markers} is in table {key!r}; pass `markers=` with genes the table holds."
        )
    missing = [g for g in markers if g not in table.var_names]
    if missing:
        logger.info("Markers %s are not in table %r and are left out of the score.", missing, key)
    cols = table.var_names.get_indexer(present)
    rows = np.arange(table.n_obs)
    x = _matrix(table, layer, key)
    if normalize is None:
        marked = layer is None and table.uns.get(UNS_KEY, {}).get("raw_counts") is False
        normalize = not marked and is_raw_counts(x)
    if normalize:
        return _lognorm_rows(table, rows, cols, layer=layer, key=key, require_counts=False), present, True
    values = _dense(x, rows, cols)
    if not np.all(np.isfinite(values)):
        bad = sorted({present[j] for j in np.flatnonzero(~np.isfinite(values).all(axis=0))})
        raise ValueError(
            f"Table {key!r} {'X' if layer is None else f'layer {layer!r}'} holds NaN or infinite values for marker(s) "
            f"{bad}; a tumour score needs finite expression."
        )
    return values, present, False


def _zscore_mean(x: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """Mean over columns of the per-section z-scores of ``x``; a column constant within a section contributes 0."""
    score = np.zeros(len(x))
    for sample in dict.fromkeys(samples):
        rows = samples == sample
        block = x[rows]
        std = block.std(axis=0)
        varying = ~_is_constant(block)
        z = np.divide(block - block.mean(axis=0), std, out=np.zeros_like(block), where=varying)
        score[rows] = z.mean(axis=1)
    return score


def _tumor_scores(
    table: AnnData, markers: Sequence[str], *, key: str, layer: str | None = None, normalize: bool | None = None
) -> tuple[np.ndarray, list[str], bool]:
    x, present, normalized = _marker_expression(table, markers, key=key, layer=layer, normalize=normalize)
    return _zscore_mean(x, _samples_of(table, np.arange(table.n_obs))), present, normalized


def score_tumor(
    sdata: SpatialData,
    *,
    markers: Sequence[str] = TUMOR_MARKERS,
    table_key: str = PREDICTED_KEY,
    key_added: str = "tumor_score",
    layer: str | None = None,
    normalize: bool | None = None,
    overwrite: bool = False,
) -> None:
    """Score each spot for tumour from biomarker expression.

    The score of a spot is the mean, over the markers the table holds, of the marker's z-score within the spot's
    section (a marker constant in a section contributes 0). Works on predicted and measured tables alike: raw counts
    are log-normalised (``log1p`` CP10k) on the fly, the table's data are not changed.

    Parameters
    ----------
    sdata
        Data holding the table.
    markers
        Tumour marker genes; those absent from the table are left out (logged). The default is HER2-positive breast
        cancer's: ``ERBB2``, ``GRB7`` (HER2 amplicon), ``KRT19``, ``KRT8``, ``EPCAM``, ``CD24`` (epithelium).
    table_key
        Table to score: predictions (default) or the measured table.
    key_added
        Column of ``obs`` to write.
    layer
        Layer holding the expression; ``None`` uses ``X``.
    normalize
        Whether to log-normalise first. ``None``: when the values are raw counts (whole numbers, and the table is
        not marked as normalised in ``uns["st_from_he"]``).
    overwrite
        Replace an existing ``obs[key_added]`` column.

    Returns
    -------
    Nothing; writes to ``sdata.tables[table_key]``:

    - ``obs[key_added]``: the tumour score (float, 0 = section average);
    - ``uns[key_added]["params"]``: the markers used, ``table_key``, ``layer`` and whether counts were normalised.

    Examples
    --------
    >>> import st_from_he as sth
    >>> sth.tl.score_tumor(sdata)  # predictions, after sth.tl.predict_expression  # doctest: +SKIP
    >>> sth.tl.score_tumor(sdata, table_key="table", key_added="tumor_score_measured")  # doctest: +SKIP
    >>> sth.pl.tumor_map(sdata, sample="C6")  # doctest: +SKIP
    """
    check_sdata(sdata, "sth.tl.score_tumor", needs_image=False)
    _check_measured_params(layer, normalize)
    if not isinstance(key_added, str) or not key_added:
        raise TypeError(f"`key_added` must be a non-empty column name, got {key_added!r}.")
    table = _table(sdata, table_key, "expression")
    if key_added in table.obs and not overwrite:
        raise KeyError(
            f"Table {table_key!r} already has obs[{key_added!r}]; pass `overwrite=True` or another `key_added`."
        )
    score, present, normalized = _tumor_scores(table, markers, key=table_key, layer=layer, normalize=normalize)
    table.obs[key_added] = score
    table.uns[key_added] = {
        "params": {
            "markers": present,
            "table_key": table_key,
            "layer": "X" if layer is None else layer,
            "normalized": bool(normalized),
        }
    }
    logger.info(
        "Wrote obs[%r] of table %r from %d marker(s): %s.", key_added, table_key, len(present), ", ".join(present)
    )


def _labels(meas: AnnData, labels, measured_key: str) -> pd.Series:
    """Boolean (or missing) label per measured spot, indexed by the measured table's obs_names."""
    if isinstance(labels, str):
        if labels not in meas.obs:
            raise KeyError(f"No column {labels!r} in obs of table {measured_key!r}; columns: {list(meas.obs.columns)}.")
        series = meas.obs[labels]
    elif isinstance(labels, pd.Series):
        series = labels.reindex(meas.obs_names)
        if series.isna().all():
            raise ValueError(f"`labels` shares no index entry with the obs_names of table {measured_key!r}.")
    else:
        raise TypeError("`labels` must be an obs column name of the measured table or a boolean pandas Series.")
    known = series.notna().to_numpy()
    values = series[known]
    if pd.api.types.is_bool_dtype(values) or pd.api.types.infer_dtype(values, skipna=True) == "boolean":
        flags = values.astype(bool)
    elif pd.api.types.is_numeric_dtype(values) and set(np.unique(values.to_numpy())) <= {0, 1}:
        flags = values.astype(bool)
    else:
        raise TypeError(
            "`labels` must be boolean (True = tumour); build them from annotations, e.g. "
            "`sdata.tables['table'].obs['expression_cluster_label'].str.contains('cancer')`."
        )
    out = pd.Series(pd.NA, index=meas.obs_names, dtype="boolean")
    out[known] = flags.to_numpy()
    return out


def evaluate_localization(
    sdata: SpatialData,
    labels: str | pd.Series,
    *,
    score_key: str = "tumor_score",
    predicted_key: str = PREDICTED_KEY,
    measured_key: str = TABLE_KEY,
    markers: Sequence[str] | None = None,
    layer: str | None = None,
    key_added: str = "tumor_localization",
) -> pd.DataFrame:
    """How well a tumour score from predicted expression finds labelled tumour spots, per section.

    The score of the prediction is ``obs[score_key]`` of the prediction table when present (written by
    :func:`~st_from_he.tl.score_tumor`, whose markers are then reused), else computed on the fly from ``markers``. The
    same score is computed from the measured expression as an upper bound: how well the markers themselves localise
    the tumour when measured. Spots are matched by region and instance id, as in :func:`~st_from_he.tl.evaluate`
    (every predicted spot must be in the measured table); spots without a label are left out.

    For her2st, the expression-based cluster annotation of the original study can stand in for pathologist labels:
    ``labels = obs["expression_cluster_label"].str.contains("cancer")``. It is a weak stand-in, derived from the
    measured expression itself, so the measured upper bound is optimistic.

    Parameters
    ----------
    sdata
        Data holding the prediction and the measured table.
    labels
        Tumour labels: the name of a boolean ``obs`` column of the measured table, or a boolean
        :class:`~pandas.Series` indexed by the measured table's ``obs_names`` (missing = unlabelled).
    score_key
        Column of the prediction table's ``obs`` holding the predicted tumour score.
    predicted_key
        Table of predicted expression.
    measured_key
        Table of measured raw counts.
    markers
        Markers of the score; default those recorded by :func:`~st_from_he.tl.score_tumor` for ``score_key``, else
        :data:`~st_from_he.tl.TUMOR_MARKERS`. Passing ``markers`` recomputes the predicted score from them.
    layer
        Layer of the measured table; ``None`` uses ``X``. Raw counts are log-normalised first, other values are
        taken as they are (z-scores do not depend on the scale).
    key_added
        Key in the prediction table's ``uns`` under which the result is stored.

    Returns
    -------
    A :class:`~pandas.DataFrame` with one row per section (index ``sample``): ``n_spots`` (labelled spots),
    ``n_tumor``, ``auroc`` and ``average_precision`` of the predicted score, ``auroc_measured`` and
    ``average_precision_measured`` of the measured score (NaN where a section has one class only). Also stored, with
    the parameters, in ``sdata.tables[predicted_key].uns[key_added]`` (keys ``"per_sample"`` and ``"params"``).

    Examples
    --------
    >>> import st_from_he as sth
    >>> obs = sdata.tables["table"].obs  # doctest: +SKIP
    >>> cancer = obs["expression_cluster_label"].str.contains("cancer")  # doctest: +SKIP
    >>> sth.tl.score_tumor(sdata)  # doctest: +SKIP
    >>> sth.tl.evaluate_localization(sdata, cancer)  # doctest: +SKIP
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    check_sdata(sdata, "sth.tl.evaluate_localization", needs_image=False)
    _check_measured_params(layer, None)
    pred = _predicted_table(sdata, predicted_key)
    meas = _measured_table(sdata, measured_key)
    flags = _labels(meas, labels, measured_key)
    if markers is None and score_key in pred.obs:
        recorded = pred.uns.get(score_key, {}).get("params", {}).get("markers")
        used = [str(g) for g in recorded] if recorded is not None else list(TUMOR_MARKERS)
        predicted_score = pred.obs[score_key].to_numpy(dtype=float)
        if not np.all(np.isfinite(predicted_score)):
            raise ValueError(
                f"obs[{score_key!r}] of table {predicted_key!r} holds NaN or infinite scores; recompute it with "
                f"`sth.tl.score_tumor(sdata, overwrite=True)`."
            )
        source = f"obs[{score_key!r}]"
    else:
        used = list(TUMOR_MARKERS) if markers is None else _check_markers(markers)
        predicted_score, used, _ = _tumor_scores(pred, used, key=predicted_key)
        source = f"markers {used}"
    measured_score, measured_used, _ = _tumor_scores(meas, used, key=measured_key, layer=layer)
    if measured_used != used:
        logger.warning(
            "Markers %s are not measured; the measured upper bound uses %s.",
            sorted(set(used) - set(measured_used)),
            measured_used,
        )
    pred_rows, meas_rows = _align(pred, meas, predicted_key, measured_key)
    y = flags.to_numpy()[meas_rows]
    labelled = ~pd.isna(y)
    samples = _samples_of(meas, meas_rows)
    rows = []
    for sample in dict.fromkeys(samples):
        keep = labelled & (samples == sample)
        truth = y[keep].astype(bool)
        row = {"sample": sample, "n_spots": int(keep.sum()), "n_tumor": int(truth.sum())}
        one_class = truth.all() or not truth.any()
        if one_class:
            logger.warning(
                "Section %r has %s labelled spots only; AUROC is undefined.",
                sample,
                "tumour" if truth.any() else "non-tumour",
            )
        for suffix, score in (("", predicted_score[pred_rows][keep]), ("_measured", measured_score[meas_rows][keep])):
            row[f"auroc{suffix}"] = np.nan if one_class else float(roc_auc_score(truth, score))
            row[f"average_precision{suffix}"] = np.nan if one_class else float(average_precision_score(truth, score))
        rows.append(row)
    if not rows or all(r["n_spots"] == 0 for r in rows):
        raise ValueError("No spot matched between the tables carries a label.")
    result = pd.DataFrame(rows).set_index("sample")
    result = result[
        ["n_spots", "n_tumor", "auroc", "average_precision", "auroc_measured", "average_precision_measured"]
    ]
    pred.uns[key_added] = {
        "per_sample": result,
        "params": {"score": source, "markers": used, "predicted_key": predicted_key, "measured_key": measured_key},
    }
    for sample, row in result.iterrows():
        logger.info(
            "%s: tumour localisation AUROC %.3f (measured %.3f), average precision %.3f (measured %.3f).",
            sample,
            row["auroc"],
            row["auroc_measured"],
            row["average_precision"],
            row["average_precision_measured"],
        )
    return result
