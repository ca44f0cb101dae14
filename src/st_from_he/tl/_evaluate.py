"""Score predicted expression against measured expression, per gene, per spot and per section."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from st_from_he._logging import logger
from st_from_he._sdata import (
    INSTANCE_KEY,
    PREDICTED_KEY,
    REGION_KEY,
    SAMPLE_KEY,
    SPATIAL_KEY,
    TABLE_KEY,
    UNS_KEY,
    check_number,
    check_sdata,
)
from st_from_he._validate import check_raw_counts, is_raw_counts
from st_from_he.pp._normalize import TARGET_SUM  # evaluation targets: log1p of counts per 10,000

from ._ceiling import noise_ceiling
from ._gene_sets import _check_gene_sets, _check_markers, _check_measured_params, _select_genes

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


_CONSTANT_RTOL = 1e-6
# per-gene columns and summary names a gene set must not take
_RESERVED = frozenset(
    "sample gene pearson spearman mse mae constant mean_measured var_measured mean_predicted zero_fraction spots genes "
    "ceiling".split()
)


# --------------------------------------------------------------------------------------------------------------------
# shared helpers (also used by gene_correlation, tumour scoring and the plots)
# --------------------------------------------------------------------------------------------------------------------
def _table(sdata: SpatialData | Mapping[str, AnnData], key: str, what: str) -> AnnData:
    if not isinstance(key, str):
        raise TypeError(f"The {what} table key must be a table name, got {type(key).__name__} {key!r}.")
    tables = sdata if isinstance(sdata, Mapping) else sdata.tables
    if key not in tables:
        hint = " Run `sth.tl.predict_expression` first." if key == PREDICTED_KEY else ""
        raise KeyError(f"No {what} table {key!r} in the SpatialData; tables present: {sorted(tables)}.{hint}")
    return tables[key]


def _tables_of(data, predicted, predicted_key: str, measured_key: str, function: str):
    """The SpatialData, or ``{predicted_key: predicted, measured_key: data}`` when two AnnData tables are given."""
    from anndata import AnnData

    if isinstance(data, AnnData):
        if not isinstance(predicted, AnnData):
            raise TypeError(
                f"`{function}` got an AnnData of measurements: pass the AnnData of predictions as `predicted=` too "
                f"(both tables name their spots through the region and instance key columns), or a SpatialData "
                f"holding both."
            )
        return {predicted_key: predicted, measured_key: data}
    if predicted is not None:
        raise TypeError("`predicted=` goes with an AnnData of measurements; a SpatialData holds its prediction table.")
    check_sdata(data, function, needs_image=False)
    return data


def _measured_table(sdata: SpatialData, key: str = TABLE_KEY) -> AnnData:
    return _table(sdata, key, "measured")


def _predicted_table(sdata: SpatialData, key: str = PREDICTED_KEY) -> AnnData:
    return _table(sdata, key, "prediction")


def _keys(table: AnnData) -> tuple[str, str]:
    """Region and instance key columns of a table (from its spatialdata attributes, else the package defaults)."""
    attrs = table.uns.get("spatialdata_attrs", {}) or {}
    return attrs.get("region_key", REGION_KEY), attrs.get("instance_key", INSTANCE_KEY)


def _spot_index(table: AnnData, key: str) -> pd.MultiIndex:
    region_key, instance_key = _keys(table)
    missing = [k for k in (region_key, instance_key) if k not in table.obs]
    if missing:
        raise KeyError(
            f"Table {key!r} has no obs column(s) {missing}: every table must name the shapes element (region) and the "
            f"spot (instance id) of each row, as `spatialdata.models.TableModel.parse` records."
        )
    index = pd.MultiIndex.from_arrays(
        [table.obs[region_key].astype(str).to_numpy(), table.obs[instance_key].astype(str).to_numpy()],
        names=["region", "spot_id"],
    )
    if index.has_duplicates:
        raise ValueError(f"Table {key!r} annotates some spots twice (duplicate region and instance id pairs).")
    return index


def _align(pred: AnnData, meas: AnnData, predicted_key: str, measured_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Row positions ``(pred_rows, meas_rows)`` of the spots both tables annotate, in measured-table order.

    Spots are matched by (region, instance id), never by row position. Every predicted spot must be in the measured
    table: a prediction that outlived a change of the measured table (spots filtered out, the section re-read) is
    refused rather than scored on part of its spots. Where both tables hold spot centres (``obsm["spatial"]``), the
    matched spots must also lie at the same place (see :func:`_check_positions`).
    """
    for table, key in ((pred, predicted_key), (meas, measured_key)):
        if table.n_obs == 0:
            raise ValueError(f"Table {key!r} has no spots.")
    pred_index = _spot_index(pred, predicted_key)
    meas_index = _spot_index(meas, measured_key)
    hit = meas_index.get_indexer(pred_index)
    missing = hit < 0
    if missing.all():
        raise ValueError(
            f"Tables {predicted_key!r} and {measured_key!r} share no spot: rows are matched by (region, instance id), "
            f"and the prediction annotates regions {sorted(set(pred_index.get_level_values(0)))} while the measured "
            f"table annotates {sorted(set(meas_index.get_level_values(0)))}."
        )
    if missing.any():
        examples = [f"{region}/{spot}" for region, spot in pred_index[missing][:5]]
        raise ValueError(
            f"{int(missing.sum())} of {pred.n_obs} spots of table {predicted_key!r} are not in table {measured_key!r} "
            f"(e.g. region/instance id {examples}). Spots are matched by identity, and every predicted spot must "
            f"have its measurement: the measured table was probably filtered or re-read after the prediction. "
            f"Predict again from the current measured table (`sth.tl.predict_expression(..., overwrite=True)`), or "
            f"drop these rows from {predicted_key!r} yourself if leaving them out is intended."
        )
    pred_rows = np.arange(pred.n_obs)
    meas_rows = hit
    order = np.argsort(meas_rows, kind="stable")
    pred_rows, meas_rows = pred_rows[order], meas_rows[order]
    _check_positions(pred, meas, pred_rows, meas_rows, predicted_key, measured_key)
    return pred_rows, meas_rows


def _check_positions(
    pred: AnnData, meas: AnnData, pred_rows: np.ndarray, meas_rows: np.ndarray, predicted_key: str, measured_key: str
) -> None:
    """Refuse matched spots whose centres disagree: their instance ids do not name the same spots in both tables.

    Per region, a matched spot is misplaced when it lies farther than half the spot spacing from its measured
    centre, compared either as they are (same pixel frame, the usual case) or after the least-squares affine map of
    the measured centres onto the predicted ones (tables in other frames or units); the comparison that misplaces
    fewer spots counts. This catches instance ids that are row numbers of two different readings of a section.
    Regions with fewer than 4 matched spots, and tables without ``obsm["spatial"]``, are not checked.
    """
    from scipy.spatial import cKDTree

    if SPATIAL_KEY not in pred.obsm or SPATIAL_KEY not in meas.obsm:
        return
    p_xy = np.asarray(pred.obsm[SPATIAL_KEY], dtype=float)[pred_rows, :2]
    m_xy = np.asarray(meas.obsm[SPATIAL_KEY], dtype=float)[meas_rows, :2]
    region_key, _ = _keys(meas)
    regions = meas.obs[region_key].astype(str).to_numpy()[meas_rows]
    for region in dict.fromkeys(regions):
        sel = (regions == region) & np.isfinite(p_xy).all(axis=1) & np.isfinite(m_xy).all(axis=1)
        if sel.sum() < 4:
            continue
        p, m = p_xy[sel], m_xy[sel]
        spacing = float(np.median(cKDTree(p).query(p, k=2)[0][:, 1]))
        if not spacing > 0:
            continue
        design = np.column_stack([m, np.ones(len(m))])
        coef, *_ = np.linalg.lstsq(design, p, rcond=None)
        distance = min(
            (np.linalg.norm(m - p, axis=1), np.linalg.norm(design @ coef - p, axis=1)),
            key=lambda d: int((d > 0.5 * spacing).sum()),
        )
        off = distance > 0.5 * spacing
        if off.any():
            worst = int(np.argmax(distance))
            spot = pred.obs[_keys(pred)[1]].astype(str).to_numpy()[pred_rows[sel][worst]]
            raise ValueError(
                f"Tables {predicted_key!r} and {measured_key!r} place {int(off.sum())} of {int(sel.sum())} spots of "
                f"region {region!r} that share an instance id at different positions (e.g. spot {spot!r} at "
                f"{np.round(p[worst], 1).tolist()} in obsm['spatial'] of {predicted_key!r} but "
                f"{np.round(m[worst], 1).tolist()} in {measured_key!r}): the instance ids do not name the same spots, "
                f"so scores would compare different spots. This happens when a section is read again with other "
                f"spots and ids are row numbers; predict again from the measured table you evaluate against."
            )


def _matrix(table: AnnData, layer: str | None, key: str):
    if layer is None:
        return table.X
    if layer not in table.layers:
        raise KeyError(f"Table {key!r} has no layer {layer!r}; layers present: {list(table.layers)}.")
    return table.layers[layer]


def _dense(x, rows: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
    x = x[rows] if cols is None else x[rows][:, cols]
    x = x.toarray() if sparse.issparse(x) else np.asarray(x)
    return x.astype(np.float64, copy=False)


def _lognorm_rows(
    table: AnnData,
    rows: np.ndarray,
    cols: np.ndarray | None = None,
    *,
    layer: str | None = None,
    key: str = TABLE_KEY,
    require_counts: bool = True,
) -> np.ndarray:
    """``log1p`` CP10k of the counts of ``rows`` (library size over all genes), dense for ``cols`` only."""
    x = _matrix(table, layer, key)[np.asarray(rows)]
    where = f"Table {key!r} {'X' if layer is None else f'layer {layer!r}'}"
    if require_counts:
        check_raw_counts(x, where=where)
    else:
        values = x.data if sparse.issparse(x) else np.asarray(x)
        if values.size and (not np.all(np.isfinite(values)) or values.min() < 0):
            raise ValueError(f"{where} holds negative, NaN or infinite values; it cannot be normalised to CP10k.")
    x = sparse.csr_matrix(x, dtype=np.float64)
    totals = np.asarray(x.sum(axis=1)).ravel()
    scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
    x = sparse.diags(scale) @ x
    if cols is not None:
        x = x[:, np.asarray(cols)]
    return np.log1p(x.toarray())


def _measured_expression(
    table: AnnData,
    rows: np.ndarray,
    cols: np.ndarray | None = None,
    *,
    layer: str | None = None,
    key: str = TABLE_KEY,
    normalize: bool | None = None,
) -> np.ndarray:
    """The protocol's targets from the measured table (see ``normalize`` of :func:`evaluate`)."""
    if normalize is False:
        return _dense(_matrix(table, layer, key), np.asarray(rows), cols)
    if normalize is None:
        marked = layer is None and table.uns.get(UNS_KEY, {}).get("raw_counts") is False
        if marked or not is_raw_counts(_matrix(table, layer, key)[np.asarray(rows)]):
            raise ValueError(
                f"Table {key!r} {'X' if layer is None else f'layer {layer!r}'} does not hold raw counts (it looks "
                f"normalised or log-transformed). Targets are log1p(CP10k) of raw counts: name a layer of raw counts "
                f"with `layer=`, or pass `normalize=False` if the values already are log1p(CP10k)."
            )
    return _lognorm_rows(table, rows, cols, layer=layer, key=key, require_counts=normalize is None)


def _samples_of(table: AnnData, rows: np.ndarray) -> np.ndarray:
    if SAMPLE_KEY in table.obs:
        return table.obs[SAMPLE_KEY].astype(str).to_numpy()[rows]
    region_key, _ = _keys(table)
    return table.obs[region_key].astype(str).to_numpy()[rows]


def _is_constant(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Whether each column (``axis=0``) or row of ``x`` is constant, up to float rounding."""
    return x.std(axis=axis) <= _CONSTANT_RTOL * (1.0 + np.abs(x.mean(axis=axis)))


def _pearson(a: np.ndarray, b: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r of matching columns (``axis=0``) or rows of ``a`` and ``b``; constant ones score 0 and are flagged."""
    constant = _is_constant(a, axis) | _is_constant(b, axis)
    a = a - a.mean(axis=axis, keepdims=True)
    b = b - b.mean(axis=axis, keepdims=True)
    num = (a * b).sum(axis=axis)
    den = np.sqrt((a * a).sum(axis=axis) * (b * b).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(constant | (den == 0), 0.0, num / np.where(den == 0, 1.0, den))
    return np.clip(r, -1.0, 1.0), constant


def _spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return _pearson(rankdata(a, axis=0), rankdata(b, axis=0))[0]


def _corrcoef(x: np.ndarray) -> np.ndarray:
    """Gene x gene Pearson matrix of spots x genes ``x``; pairs with a constant gene are 0, the diagonal 1."""
    constant = _is_constant(x)
    z = x - x.mean(axis=0)
    norm = np.sqrt((z * z).sum(axis=0))
    z = z / np.where(constant | (norm == 0), 1.0, norm)
    z[:, constant] = 0.0
    c = np.clip(z.T @ z, -1.0, 1.0)
    np.fill_diagonal(c, 1.0)
    return c


def _preservation(measured_corr: np.ndarray, predicted_corr: np.ndarray) -> tuple[float, float]:
    """Pearson r of the upper triangles (diagonal excluded) and their mean absolute difference."""
    iu = np.triu_indices_from(measured_corr, k=1)
    if iu[0].size < 2:
        return float("nan"), float("nan")
    m, p = measured_corr[iu], predicted_corr[iu]
    r, constant = _pearson(m[:, None], p[:, None])
    return float(r[0]) if not constant[0] else 0.0, float(np.abs(m - p).mean())


def _grid_graph(xy: np.ndarray) -> sparse.csr_matrix | None:
    """Spots within 1.5x the median nearest-neighbour distance of each other (a spot grid's neighbours, any pitch)."""
    from scipy.spatial import cKDTree

    if len(xy) < 4:
        return None
    tree = cKDTree(xy)
    nearest = tree.query(xy, k=2)[0][:, 1]
    pairs = tree.query_pairs(1.5 * float(np.median(nearest)), output_type="ndarray")
    if not len(pairs):
        return None
    i, j = np.r_[pairs[:, 0], pairs[:, 1]], np.r_[pairs[:, 1], pairs[:, 0]]
    return sparse.csr_matrix((np.ones(len(i)), (i, j)), shape=(len(xy), len(xy)))


def _moran_ratio(graph, measured: np.ndarray, predicted: np.ndarray) -> float:
    """Median Moran's I of the predicted genes over that of the measured ones (1: as smooth as measured)."""
    from scanpy.metrics import morans_i

    if graph is None:
        return float("nan")
    keep = ~(_is_constant(measured) | _is_constant(predicted))
    if not keep.any():
        return float("nan")
    m = np.median(morans_i(graph, measured[:, keep].T))
    p = np.median(morans_i(graph, predicted[:, keep].T))
    return float(p / m) if m > 0 else float("nan")


@dataclass
class _Paired:
    """Predicted and measured (log1p CP10k) expression of the spots both tables annotate, on their shared genes."""

    predicted: np.ndarray  # spots x genes
    measured: np.ndarray  # spots x genes
    genes: list[str]
    samples: np.ndarray  # per spot
    obs: pd.DataFrame  # per spot: sample, region, spot_id, indexed by measured obs_names
    measured_rows: np.ndarray
    positions: np.ndarray | None = None  # per spot: the measured table's obsm["spatial"], where it has one

    def rows_of(self, sample: str) -> np.ndarray:
        return np.flatnonzero(self.samples == sample)


def _paired(
    sdata: SpatialData,
    predicted_key: str,
    measured_key: str,
    *,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
    normalize: bool | None = None,
) -> _Paired:
    pred = _predicted_table(sdata, predicted_key)
    meas = _measured_table(sdata, measured_key)
    shared = list(pred.var_names[meas.var_names.get_indexer(pred.var_names) >= 0])
    if not shared:
        raise ValueError(
            f"Tables {predicted_key!r} and {measured_key!r} share no gene (e.g. predicted {list(pred.var_names[:3])}, "
            f"measured {list(meas.var_names[:3])}); are the gene identifiers of the same kind?"
        )
    if genes is not None:
        wanted = list(dict.fromkeys(map(str, genes)))
        missing = [g for g in wanted if g not in set(shared)]
        if missing:
            raise KeyError(
                f"Gene(s) {missing[:10]}{' ...' if len(missing) > 10 else ''} are not in both tables "
                f"{predicted_key!r} and {measured_key!r}."
            )
        shared = wanted
    elif len(shared) < pred.n_vars:
        logger.info(
            "%d of %d predicted genes are not measured and are left out.", pred.n_vars - len(shared), pred.n_vars
        )
    pred_rows, meas_rows = _align(pred, meas, predicted_key, measured_key)
    predicted = _dense(_matrix(pred, None, predicted_key), pred_rows, pred.var_names.get_indexer(shared))
    if not np.all(np.isfinite(predicted)):
        raise ValueError(
            f"Table {predicted_key!r} holds NaN or infinite predictions for the evaluated spots and genes."
        )
    cols = meas.var_names.get_indexer(shared)
    measured = _measured_expression(meas, meas_rows, cols, layer=layer, key=measured_key, normalize=normalize)
    region_key, instance_key = _keys(meas)
    samples = _samples_of(meas, meas_rows)
    obs = pd.DataFrame(
        {
            "sample": samples,
            "region": meas.obs[region_key].astype(str).to_numpy()[meas_rows],
            "spot_id": meas.obs[instance_key].to_numpy()[meas_rows],
        },
        index=pd.Index(meas.obs_names[meas_rows].astype(str), name=None),
    )
    positions = np.asarray(meas.obsm[SPATIAL_KEY], dtype=float)[meas_rows, :2] if SPATIAL_KEY in meas.obsm else None
    return _Paired(predicted, measured, shared, samples, obs, meas_rows, positions)


# --------------------------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------------------------
def evaluate(
    sdata: SpatialData,
    *,
    predicted_key: str = PREDICTED_KEY,
    measured_key: str = TABLE_KEY,
    gene_sets: Sequence[str] | Mapping[str, Sequence[str] | None] = ("heg", "hvg", "markers", "all"),
    n_genes: int = 50,
    markers: Sequence[str] | None = None,
    per: Literal["sample", "all"] = "sample",
    layer: str | None = None,
    normalize: bool | None = None,
    ceiling: bool | None = None,
    predicted: AnnData | None = None,
    key_added: str = "evaluation",
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Score predicted against measured expression with the package's evaluation protocol.

    Spots of the prediction table and the measured table are matched by their region and instance id (never by row
    order), genes are those both tables hold. Every predicted spot must be in the measured table, else an error
    says how many are not (the prediction no longer matches the measured data, e.g. spots were filtered out after
    predicting): scoring only the rest would hide it. Where both tables hold ``obsm["spatial"]``, matched spots must
    also lie at the same place (up to an affine change of frame), which catches instance ids that name different
    spots in the two tables. Measured spots without a prediction are left out. The targets are ``log1p`` of the
    measured raw counts scaled to 10,000 per spot (library size over all measured genes), computed on the fly; the
    measured table is not modified.
    For each section (``per="sample"``) and gene, this computes Pearson's r (PCC), Spearman's rho, the mean squared
    and the mean absolute error across the section's spots. A gene that is constant in the prediction or in the
    measurement of a section (standard deviation below 1e-6 x (1 + abs(mean))) has no defined correlation: it
    scores 0 and is counted in ``n_constant``, as in the reference evaluation.

    Gene sets are chosen on each section's measured data among the evaluated genes:

    - ``"heg"``: the ``n_genes`` genes of highest mean log-normalised expression (highly expressed genes);
    - ``"hvg"``: the ``n_genes`` genes of highest variance of log-normalised expression across the section's spots
      (highly variable genes; this simple criterion is the reference's, not scanpy's dispersion-based
      :func:`~scanpy.pp.highly_variable_genes`);
    - ``"markers"``: ``markers`` (default :data:`~st_from_he.tl.BREAST_MARKERS`) that are evaluated;
    - ``"all"``: every evaluated gene.

    Parameters
    ----------
    sdata
        Data holding a prediction table and the measured table, annotating the same spots; or the measured table
        itself as an :class:`~anndata.AnnData`, with the prediction table as ``predicted=`` (as :mod:`st_from_he.pl`
        takes them). Any table of predicted
        ``log1p`` CP10k expression works (other methods' output too), as long as its rows name their spots through
        the region and instance key columns of :class:`~spatialdata.models.TableModel`.
    predicted_key
        Table of predicted expression (``X``).
    measured_key
        Table of measured raw counts.
    gene_sets
        Names of built-in sets among ``"heg"``, ``"hvg"``, ``"markers"``, ``"all"``, or a mapping from a set name
        to its genes (``None`` for a built-in name), e.g. ``{"heg": None, "immune": ["PTPRC", "CD74"]}``.
    n_genes
        Size of the HEG and HVG sets.
    markers
        Marker genes of the ``"markers"`` set; the default is the breast-cancer list of the protocol.
    per
        ``"sample"`` scores each section on its own spots (the protocol); ``"all"`` pools all spots as one group
        named ``"all"``.
    layer
        Layer of the measured table holding raw counts; ``None`` uses ``X``.
    normalize
        How the measured values become targets. ``None`` (default): ``log1p`` CP10k of raw counts, and an error if
        the values are not raw counts (e.g. a table attached from log-normalised data). ``True``: normalise whatever
        non-negative values there are. ``False``: take the values as they are; they must already be ``log1p`` CP10k
        for MSE and MAE to mean what they say (correlations are unchanged by per-gene linear scaling).
    ceiling
        Also compute the count-noise ceiling of each gene (:func:`~st_from_he.tl.noise_ceiling`: the PCC a perfect
        predictor of the spots' expected expression would reach against counts this noisy, from binomial split
        halves of each spot's molecules). ``None`` (default): whenever the measured values are raw counts. Read a
        score against it: a section sequenced at low depth (e.g. her2st's B4, about 650 UMI per spot) allows less.
    predicted
        The prediction table, when ``sdata`` is the AnnData of measurements.
    key_added
        Key under which the results are stored in the prediction table's ``uns``.
    seed
        Seed of the ceiling's random splits.

    Returns
    -------
    A :class:`dict` of three :class:`~pandas.DataFrame`:

    ``"per_gene"``
        One row per section and gene: ``sample``, ``gene``, ``pearson``, ``spearman``, ``mse``, ``mae``,
        ``constant`` (bool), ``mean_measured``, ``var_measured``, ``mean_predicted``, ``zero_fraction`` (share of
        spots with no measured count), ``ceiling`` (with ``ceiling``), then one bool column per gene set saying
        whether the gene is in that set for that section.
    ``"summary"``
        One row per section (index ``sample``): ``n_spots``, ``n_genes``, ``n_constant``, ``pcc_<set>`` (mean PCC of
        each gene set), ``n_<set>`` (its number of genes) and, with ``ceiling``, ``ceiling_<set>`` (mean ceiling of
        the set's genes), ``spot_pcc`` (mean over spots of the Pearson r across all evaluated genes),
        ``preservation`` (Pearson r between the upper triangles of the measured and the predicted gene-gene
        correlation matrices of the section's HEG; see :func:`~st_from_he.tl.gene_correlation`) and
        ``corr_abs_diff`` (the mean absolute difference of those two matrices: predictions tend to exaggerate
        gene-gene structure, which a high ``preservation`` does not show), and ``moran_ratio``: the median Moran's I
        of the predicted HEG over that of the measured HEG (neighbours: spots within 1.5x the median
        nearest-neighbour distance, from the measured table's ``obsm["spatial"]``; NaN without positions or with
        ``per="all"``). Predictions are smoother than counts: a ratio well above 1 says how much.
    ``"per_spot"``
        One row per spot (index: the measured table's ``obs_names``): ``sample``, ``region``, ``spot_id``,
        ``pearson`` (across all evaluated genes).

    The same dict, with the call's ``"params"``, is stored in ``sdata.tables[predicted_key].uns[key_added]`` (it is
    written to and read back from zarr with the table).

    Examples
    --------
    >>> import st_from_he as sth
    >>> sdata = sth.datasets.her2st(["C6"])
    >>> # ... train a model on other sections, then sth.tl.predict_expression(sdata, model)
    >>> res = sth.tl.evaluate(sdata)  # doctest: +SKIP
    >>> res["summary"][["pcc_heg", "pcc_hvg", "pcc_markers", "n_constant"]]  # doctest: +SKIP
    >>> res["per_gene"].query("markers").sort_values("pearson")  # doctest: +SKIP
    >>> res["summary"][["pcc_hvg", "ceiling_hvg"]]  # a score next to what count noise allows  # doctest: +SKIP
    """
    sdata = _tables_of(sdata, predicted, predicted_key, measured_key, "sth.tl.evaluate")
    sets = _check_gene_sets(gene_sets)
    clash = [name for name in sets if name in _RESERVED]
    if clash:
        raise ValueError(f"Gene set name(s) {clash} clash with result columns; rename them.")
    if per not in ("sample", "all"):
        raise ValueError(f"`per` must be 'sample' or 'all', got {per!r}.")
    n_genes = check_number(n_genes, "n_genes", integer=True, unit="genes")
    markers = _check_markers(markers)
    _check_measured_params(layer, normalize)
    if not isinstance(key_added, str) or not key_added:
        raise TypeError(f"`key_added` must be a non-empty name, got {key_added!r}.")
    if ceiling and normalize is False:
        raise ValueError(
            "`ceiling=True` needs raw counts (it splits each spot's molecules); `normalize=False` says there are none."
        )
    paired = _paired(sdata, predicted_key, measured_key, layer=layer, normalize=normalize)
    genes = paired.genes
    meas_table = _measured_table(sdata, measured_key)
    counts = _matrix(meas_table, layer, measured_key)
    if ceiling is None:  # wherever the measured values are raw counts
        ceiling = normalize is not False and is_raw_counts(counts[paired.measured_rows])
    elif ceiling:
        check_raw_counts(counts[paired.measured_rows], where=f"Table {measured_key!r} (for `ceiling=True`)")
    gene_cols = meas_table.var_names.get_indexer(genes)
    logger.info(
        "Evaluating %d genes shared by %r (%d genes) and %r (%d genes) on %d spots.",
        len(genes),
        predicted_key,
        _predicted_table(sdata, predicted_key).n_vars,
        measured_key,
        meas_table.n_vars,
        len(paired.samples),
    )
    groups = ["all"] if per == "all" else list(dict.fromkeys(paired.samples))

    per_gene, summary, per_spot = [], [], []
    for group in groups:
        rows = np.arange(len(paired.samples)) if per == "all" else paired.rows_of(group)
        p, m = paired.predicted[rows], paired.measured[rows]
        if len(rows) < 3:
            logger.warning(
                "Section %r has only %d matched spots; its correlations are not meaningful.", group, len(rows)
            )
        pearson, constant = _pearson(p, m)
        df = pd.DataFrame(
            {
                "sample": group,
                "gene": genes,
                "pearson": pearson,
                "spearman": _spearman(p, m),
                "mse": ((p - m) ** 2).mean(axis=0),
                "mae": np.abs(p - m).mean(axis=0),
                "constant": constant,
                "mean_measured": m.mean(axis=0),
                "var_measured": m.var(axis=0),
                "mean_predicted": p.mean(axis=0),
                "zero_fraction": (m == 0).mean(axis=0),
            }
        )
        if ceiling:
            df["ceiling"] = noise_ceiling(counts[paired.measured_rows[rows]], gene_cols, seed=seed)
        row = {"n_spots": len(rows), "n_genes": len(genes), "n_constant": int(constant.sum())}
        for name, explicit in sets.items():
            if explicit is None:
                chosen = _select_genes(name, m, genes, n_genes=n_genes, markers=markers)
            else:
                chosen = [g for g in explicit if g in set(genes)]
            if not chosen:
                logger.warning("Gene set %r has no evaluated gene in section %r.", name, group)
            df[name] = df["gene"].isin(chosen)
            row[f"pcc_{name}"] = float(df.loc[df[name], "pearson"].mean()) if chosen else float("nan")
            row[f"n_{name}"] = len(chosen)
            if ceiling:
                row[f"ceiling_{name}"] = float(df.loc[df[name], "ceiling"].mean()) if chosen else float("nan")
        spot_r, _ = _pearson(p, m, axis=1)
        row["spot_pcc"] = float(spot_r.mean())
        heg = np.asarray(_select_genes("heg", m, list(range(len(genes))), n_genes=n_genes), dtype=int)
        row["preservation"], row["corr_abs_diff"] = _preservation(_corrcoef(m[:, heg]), _corrcoef(p[:, heg]))
        xy = paired.positions[rows] if paired.positions is not None and per == "sample" else None
        row["moran_ratio"] = _moran_ratio(None if xy is None else _grid_graph(xy), m[:, heg], p[:, heg])
        per_gene.append(df)
        summary.append(pd.Series(row, name=group))
        spots = paired.obs.iloc[rows].copy()
        spots["pearson"] = spot_r
        per_spot.append(spots)

    per_gene_df = pd.concat(per_gene, ignore_index=True)
    summary_df = pd.DataFrame(summary)
    summary_df.index.name = "sample"
    for col in summary_df.columns:
        if col.startswith("n_"):
            summary_df[col] = summary_df[col].astype(np.int64)
    per_spot_df = pd.concat(per_spot)
    result = {"per_gene": per_gene_df, "summary": summary_df, "per_spot": per_spot_df}

    params = {
        "predicted_key": predicted_key,
        "measured_key": measured_key,
        "gene_sets": list(sets),
        "custom_gene_sets": {name: list(genes) for name, genes in sets.items() if genes is not None},
        "n_genes": int(n_genes),
        "markers": list(markers) if markers is not None else list(_default_markers()),
        "per": per,
        "layer": "X" if layer is None else layer,
        "ceiling": ceiling,
        "seed": int(seed),
        "target": "measured values as given"
        if normalize is False
        else "log1p(normalize_total(1e4)) of the measured values",
    }
    table = _predicted_table(sdata, predicted_key)
    if key_added in table.uns:
        logger.info("Replacing uns[%r] of table %r.", key_added, predicted_key)
    table.uns[key_added] = {**result, "params": params}
    for group, row in summary_df.iterrows():
        logger.info(
            "%s: %s, %d constant gene(s)",
            group,
            ", ".join(f"PCC {name} {row[f'pcc_{name}']:.3f}" for name in sets),
            row["n_constant"],
        )
    return result


def _default_markers() -> tuple[str, ...]:
    from ._gene_sets import BREAST_MARKERS

    return BREAST_MARKERS
