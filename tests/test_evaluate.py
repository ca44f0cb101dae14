"""sth.tl evaluation: per-gene/per-spot scores, gene sets, gene-gene correlation, tumour scores and localisation.

Predictions are built from the real her2st measurements (C5, C6): log-normalised counts plus noise, spatially
smoothed, with rows shuffled so that only matching by (region, spot id) can line them up.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import TableModel

from st_from_he.tl._evaluate import evaluate
from st_from_he.tl._gene_correlation import gene_correlation
from st_from_he.tl._gene_sets import BREAST_MARKERS, TUMOR_MARKERS, gene_set
from st_from_he.tl._tumor import evaluate_localization, score_tumor

pytestmark = [
    pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning"),
    pytest.mark.filterwarnings("ignore:The table is annotating:UserWarning"),  # tables without their shapes
]

N_TOP = 300


def _lognorm(x) -> np.ndarray:
    """Reference targets, written independently of the package: log1p of counts per 10,000."""
    x = sparse.csr_matrix(x, dtype=np.float64)
    totals = np.asarray(x.sum(axis=1)).ravel()
    return np.log1p((sparse.diags(1e4 / totals) @ x).toarray())


def _fake_prediction(sdata, genes, *, noise=0.0, smooth=False, seed=0, constant=None, shuffle_within=False):
    """A prediction table like `predict_expression` writes: measured lognorm (+ noise, smoothing), rows shuffled."""
    rng = np.random.default_rng(seed)
    meas = sdata.tables["table"]
    x = _lognorm(meas.X)[:, meas.var_names.get_indexer(genes)]
    x = x + rng.normal(scale=noise, size=x.shape) if noise else x
    samples = meas.obs["sample"].astype(str).to_numpy()
    if smooth:  # average over each spot and its grid neighbours
        xy = meas.obsm["spatial"]
        out = np.empty_like(x)
        for s in np.unique(samples):
            rows = np.flatnonzero(samples == s)
            d = np.linalg.norm(xy[rows, None] - xy[None, rows], axis=-1)
            w = (d < 1.5 * np.median(np.sort(d, axis=1)[:, 1])).astype(float)
            out[rows] = (w / w.sum(axis=1, keepdims=True)) @ x[rows]
        x = out
    if shuffle_within:  # each section's expression given to random other spots of the same section
        for s in np.unique(samples):
            rows = np.flatnonzero(samples == s)
            x[rows] = x[rng.permutation(rows)]
    x = x.astype(np.float32)
    if constant is not None:
        x[:, list(genes).index(constant)] = 1.5
    table = ad.AnnData(
        X=x, obs=meas.obs[["sample", "region", "spot_id"]].copy(), var=pd.DataFrame(index=pd.Index(genes))
    )
    table.obsm["spatial"] = meas.obsm["spatial"].copy()
    table = table[rng.permutation(table.n_obs)].copy()
    regions = list(dict.fromkeys(meas.obs["region"].astype(str)))
    return TableModel.parse(table, region=regions, region_key="region", instance_key="spot_id")


@pytest.fixture(scope="module")
def base(her2st_small):
    """C5 and C6 with their own copy of the measured table (the session's data stay untouched)."""
    return SpatialData(shapes=dict(her2st_small.shapes), tables={"table": her2st_small.tables["table"].copy()})


@pytest.fixture(scope="module")
def genes(base) -> list[str]:
    """The most expressed genes overall, plus the breast markers and a gene absent from one section."""
    meas = base.tables["table"]
    total = np.asarray(meas.X.sum(axis=0)).ravel()
    top = list(meas.var_names[np.argsort(-total)[:N_TOP]])
    return list(dict.fromkeys([*top, *[g for g in BREAST_MARKERS if g in meas.var_names]]))


@pytest.fixture(scope="module")
def zero_in_c6(base) -> str:
    """A gene with counts in C5 but none in C6: constant (all zero) in C6's targets."""
    meas = base.tables["table"]
    c5 = np.asarray(meas[meas.obs["sample"] == "C5"].X.sum(axis=0)).ravel()
    c6 = np.asarray(meas[meas.obs["sample"] == "C6"].X.sum(axis=0)).ravel()
    return str(meas.var_names[np.flatnonzero((c6 == 0) & (c5 >= 5))[0]])


def _with(base, **tables) -> SpatialData:
    return SpatialData(shapes=dict(base.shapes), tables={"table": base.tables["table"], **tables})


@pytest.fixture(scope="module")
def perfect(base, genes, zero_in_c6):
    g = [*genes, zero_in_c6]
    return _with(base, predicted_expression=_fake_prediction(base, g))


@pytest.fixture(scope="module")
def perfect_result(perfect):
    return evaluate(perfect)


def _zero_genes(base, genes, sample) -> list[str]:
    meas = base.tables["table"]
    section = meas[meas.obs["sample"] == sample]
    total = np.asarray(section[:, genes].X.sum(axis=0)).ravel()
    return [g for g, t in zip(genes, total, strict=True) if t == 0]


def test_perfect_prediction_scores_one(base, perfect_result, genes, zero_in_c6):
    evaluated = [*genes, zero_in_c6]
    per_gene = perfect_result["per_gene"]
    scored = per_gene[~per_gene["constant"]]
    np.testing.assert_allclose(scored["pearson"], 1.0, atol=1e-5)
    assert (scored["spearman"] > 0.999).all()
    assert scored["mse"].max() < 1e-10 and scored["mae"].max() < 1e-5
    # genes with no count in a section are constant there: scored 0, flagged, counted
    expected = {(s, g) for s in ("C5", "C6") for g in _zero_genes(base, evaluated, s)}
    assert ("C6", zero_in_c6) in expected and ("C6", "ADIPOQ") in expected  # ADIPOQ: a marker absent from C6
    flagged = per_gene[per_gene["constant"]]
    assert set(zip(flagged["sample"], flagged["gene"], strict=True)) == expected
    assert (flagged["pearson"] == 0.0).all() and (flagged["spearman"] == 0.0).all()
    summary = perfect_result["summary"]
    for sample in ("C5", "C6"):
        n_constant = sum(s == sample for s, _ in expected)
        assert summary.loc[sample, "n_constant"] == n_constant
        assert summary.loc[sample, "pcc_all"] == pytest.approx(1 - n_constant / len(evaluated), abs=1e-5)
    assert list(summary.index) == ["C5", "C6"] and (summary["n_genes"] == len(evaluated)).all()
    np.testing.assert_allclose(summary[["pcc_heg", "pcc_hvg"]], 1.0, atol=1e-5)
    n_markers = summary.loc["C6", "n_markers"]
    assert summary.loc["C6", "pcc_markers"] == pytest.approx((n_markers - 1) / n_markers, abs=1e-5)  # ADIPOQ
    np.testing.assert_allclose(summary["preservation"], 1.0, atol=1e-6)


def test_alignment_by_spot_id_not_row_order_or_names(base, genes, perfect_result):
    pred = _fake_prediction(base, genes, seed=3)
    pred.obs_names = [f"x{i}" for i in range(pred.n_obs)]  # names say nothing; (region, spot_id) does
    res = evaluate(_with(base, predicted_expression=pred))
    per_gene = res["per_gene"]
    np.testing.assert_allclose(per_gene.loc[~per_gene["constant"], "pearson"], 1.0, atol=1e-5)
    assert per_gene["constant"].sum() == len(_zero_genes(base, genes, "C6")) + len(_zero_genes(base, genes, "C5"))
    per_spot = res["per_spot"]
    assert list(per_spot.index) == list(base.tables["table"].obs_names)  # measured order and names
    assert list(per_spot.columns) == ["sample", "region", "spot_id", "pearson"]


def test_shuffled_within_section_scores_about_zero(base, genes):
    res = evaluate(_with(base, predicted_expression=_fake_prediction(base, genes, shuffle_within=True, seed=1)))
    summary = res["summary"]
    assert summary["pcc_all"].abs().max() < 0.05
    assert summary["spot_pcc"].min() > 0.5  # spot profiles still look like spots: spot-level PCC is lenient
    per_gene = res["per_gene"]
    assert per_gene["pearson"].abs().quantile(0.95) < 0.2


def test_noisy_prediction_in_between(base, genes):
    pred = _fake_prediction(base, genes, noise=1.0, smooth=True, constant=genes[10])
    res = evaluate(_with(base, predicted_expression=pred))
    summary = res["summary"]
    assert ((summary["pcc_all"] > 0.2) & (summary["pcc_all"] < 0.8)).all()
    assert (summary["n_constant"] >= 1).all()
    row = res["per_gene"].query("gene == @genes[10]")
    assert (row["pearson"] == 0).all() and row["constant"].all()


def test_structure_metrics_see_smoothing_and_shuffling(base, genes, perfect_result):
    """Moran's I ratio and the gene-gene matrix difference: 1 and 0 for a perfect prediction, larger when smoothed."""
    perfect = perfect_result["summary"]
    assert np.allclose(perfect["moran_ratio"], 1.0) and np.allclose(perfect["corr_abs_diff"], 0.0, atol=1e-6)
    smooth = evaluate(_with(base, predicted_expression=_fake_prediction(base, genes, smooth=True)))["summary"]
    assert (smooth["moran_ratio"] > 1.5).all()  # neighbour averaging makes every gene spatially smoother
    assert (smooth["corr_abs_diff"] > 0.05).all()  # and inflates gene-gene correlations
    shuffled = _fake_prediction(base, genes, shuffle_within=True, seed=1)
    assert (evaluate(_with(base, predicted_expression=shuffled))["summary"]["moran_ratio"] < 0.5).all()


def test_gene_sets_are_chosen_on_each_test_section(base, perfect_result, genes, zero_in_c6):
    per_gene = perfect_result["per_gene"]
    meas = base.tables["table"]
    evaluated = [*genes, zero_in_c6]
    chosen = {}
    for sample in ("C5", "C6"):
        section = meas[meas.obs["sample"] == sample]
        x = _lognorm(section.X)[:, section.var_names.get_indexer(evaluated)]
        rows = per_gene[per_gene["sample"] == sample].set_index("gene")
        expected_heg = {evaluated[i] for i in np.argsort(-x.mean(axis=0))[:50]}
        expected_hvg = {evaluated[i] for i in np.argsort(-x.var(axis=0))[:50]}
        assert set(rows.index[rows["heg"]]) == expected_heg
        assert set(rows.index[rows["hvg"]]) == expected_hvg
        assert rows["all"].all()
        chosen[sample] = (expected_heg, expected_hvg)
        assert gene_set(base, "hvg", sample=sample, genes=evaluated) == [
            evaluated[i] for i in np.argsort(-x.var(axis=0), kind="stable")[:50]
        ]
    assert chosen["C5"] != chosen["C6"]  # the sets really are per section
    assert (perfect_result["summary"][["n_heg", "n_hvg"]] == 50).all().all()


def test_markers_present_and_custom_sets(base, perfect, genes):
    res = evaluate(perfect, n_genes=20, key_added="top20")
    markers = [g for g in BREAST_MARKERS if g in genes]
    rows = res["per_gene"].query("sample == 'C6'")
    assert list(rows.loc[rows["markers"], "gene"]) == [g for g in rows["gene"] if g in markers]
    assert set(rows.loc[rows["markers"], "gene"]) == set(markers)
    assert (res["summary"]["n_markers"] == len(markers)).all() and (res["summary"]["n_heg"] == 20).all()
    custom = evaluate(
        perfect, gene_sets={"heg": None, "immune": ["PTPRC", "CD74", "NOT_A_GENE"]}, markers=["ERBB2"], key_added="c"
    )
    assert list(custom["summary"].columns[:5]) == ["n_spots", "n_genes", "n_constant", "pcc_heg", "n_heg"]
    assert "pcc_immune" in custom["summary"] and "markers" not in custom["per_gene"]
    assert (custom["summary"]["n_immune"] == len({"PTPRC", "CD74"} & set(genes))).all()


def test_spot_level_pcc(perfect_result):
    per_spot = perfect_result["per_spot"]
    assert len(per_spot) == 359
    np.testing.assert_allclose(np.median(per_spot["pearson"]), 1.0, atol=1e-5)
    for sample, row in perfect_result["summary"].iterrows():
        assert row["spot_pcc"] == pytest.approx(per_spot.loc[per_spot["sample"] == sample, "pearson"].mean())
        assert row["n_spots"] == (per_spot["sample"] == sample).sum()


def test_gene_set_helper(base, perfect, genes):
    assert gene_set(perfect, "markers", sample="C6") == [g for g in BREAST_MARKERS if g in genes]  # predicted genes
    assert gene_set(perfect, "markers", sample="C6", markers=["CD74", "NOT_A_GENE"]) == ["CD74"]
    assert len(gene_set(base, "heg", sample="C5", genes=None, n_genes=7)) == 7  # any measured gene
    assert gene_set(perfect, "all", sample="C5") == list(perfect.tables["predicted_expression"].var_names)
    with pytest.raises(ValueError, match="several sections"):
        gene_set(perfect, "heg")
    with pytest.raises(KeyError, match="No sample 'B1'"):
        gene_set(perfect, "heg", sample="B1")
    with pytest.raises(ValueError, match="Unknown gene set"):
        gene_set(perfect, "top", sample="C5")


def test_pooled_evaluation(perfect):
    res = evaluate(perfect, per="all", gene_sets=["heg", "all"], key_added="pooled")
    assert list(res["summary"].index) == ["all"] and res["summary"].loc["all", "n_spots"] == 359
    assert set(res["per_gene"]["sample"]) == {"all"}


def test_results_stored_and_survive_zarr(perfect, tmp_path):
    import spatialdata as sd

    stored = perfect.tables["predicted_expression"].uns["evaluation"]
    perfect_result = stored
    assert set(stored) == {"per_gene", "summary", "per_spot", "params"}
    assert stored["params"]["gene_sets"] == ["heg", "hvg", "markers", "all"]
    perfect.write(tmp_path / "eval.zarr")
    back = sd.read_zarr(tmp_path / "eval.zarr").tables["predicted_expression"].uns["evaluation"]
    pd.testing.assert_frame_equal(
        back["per_gene"].reset_index(drop=True), perfect_result["per_gene"], check_dtype=False, check_index_type=False
    )
    np.testing.assert_allclose(back["summary"]["pcc_heg"], perfect_result["summary"]["pcc_heg"])
    assert list(back["params"]["markers"]) == list(BREAST_MARKERS)


def test_evaluate_errors(base, genes, perfect):
    with pytest.raises(KeyError, match="predict_expression"):
        evaluate(base)
    with pytest.raises(KeyError, match="No measured table 'counts'"):
        evaluate(perfect, measured_key="counts")
    with pytest.raises(ValueError, match="Unknown gene set"):
        evaluate(perfect, gene_sets=("heg", "hgv"))
    with pytest.raises(ValueError, match="clash"):
        evaluate(perfect, gene_sets={"mse": ["ERBB2"]})
    with pytest.raises(ValueError, match="`per`"):
        evaluate(perfect, per="spot")
    other = _fake_prediction(base, genes)
    other.var_names = [f"ENSG{i:011d}" for i in range(other.n_vars)]
    with pytest.raises(ValueError, match="share no gene"):
        evaluate(_with(base, predicted_expression=other))
    moved = _fake_prediction(base, genes)
    moved.obs["region"] = moved.obs["region"].astype(str) + "_grid"
    moved = TableModel.parse(
        moved,
        region=["C5_spots_grid", "C6_spots_grid"],
        region_key="region",
        instance_key="spot_id",
        overwrite_metadata=True,
    )
    with pytest.raises(ValueError, match="share no spot"):
        evaluate(_with(base, predicted_expression=moved))
    doubled = ad.concat([perfect.tables["predicted_expression"]] * 2, index_unique="-")
    with pytest.raises(ValueError, match="twice"):
        evaluate(SpatialData(tables={"table": base.tables["table"], "predicted_expression": doubled}))


def test_measured_table_already_log_normalised(base, perfect, perfect_result):
    """Tables attached from scanpy-processed data hold log1p(CP10k): refused by default, used as is when asked."""
    normalised = base.tables["table"].copy()
    normalised.X = sparse.csr_matrix(_lognorm(normalised.X))
    sdata = _with(base, predicted_expression=perfect.tables["predicted_expression"])
    sdata.tables["table"] = normalised
    with pytest.raises(ValueError, match="normalize=False"):
        evaluate(sdata)
    res = evaluate(sdata, normalize=False, gene_sets=["heg", "all"])
    scored = res["per_gene"][~res["per_gene"]["constant"]]
    np.testing.assert_allclose(scored["pearson"], 1.0, atol=1e-5)
    np.testing.assert_allclose(res["summary"]["pcc_heg"], perfect_result["summary"]["pcc_heg"], atol=1e-6)
    raw_in_layer = normalised.copy()
    raw_in_layer.layers["counts"] = base.tables["table"].X.copy()
    sdata.tables["table"] = raw_in_layer
    assert evaluate(sdata, layer="counts", gene_sets=["heg"])["summary"]["pcc_heg"].tolist() == pytest.approx(
        [1.0, 1.0], abs=1e-5
    )


def test_predictions_on_extra_spots_are_left_out(base, genes):
    pred = _fake_prediction(base, genes)
    c6 = TableModel.parse(
        pred[pred.obs["sample"] == "C6"].copy(),
        region="C6_spots",
        region_key="region",
        instance_key="spot_id",
        overwrite_metadata=True,
    )
    res = evaluate(_with(base, predicted_expression=c6))
    assert list(res["summary"].index) == ["C6"]  # only the spots both tables annotate


# --------------------------------------------------------------------------------------------------------------------
# gene-gene correlation
# --------------------------------------------------------------------------------------------------------------------
def test_gene_correlation_perfect_and_noisy(perfect, base, genes):
    res = gene_correlation(perfect, sample="C6")
    assert res["preservation"] == pytest.approx(1.0, abs=1e-6) and res["mean_abs_diff"] < 1e-5
    assert res["moran_ratio"] == pytest.approx(1.0)
    m = res["measured"]
    assert m.shape == (50, 50) and list(m.index) == list(m.columns) == list(res["predicted"].index)
    np.testing.assert_allclose(np.diag(m), 1.0)
    np.testing.assert_allclose(m, m.T)
    c6 = base.tables["table"][base.tables["table"].obs["sample"] == "C6"]
    x = _lognorm(c6.X)[:, c6.var_names.get_indexer(m.index)]
    np.testing.assert_allclose(m, np.corrcoef(x.T), atol=1e-8)
    assert perfect.tables["predicted_expression"].uns["gene_correlation"]["C6"]["preservation"] == res["preservation"]

    noisy = _with(base, predicted_expression=_fake_prediction(base, genes, noise=1.0, smooth=True))
    res = gene_correlation(noisy, genes=["ERBB2", "GRB7", "KRT19", "CD74", "IGKC"], sample="C5")
    assert 0 < res["preservation"] < 1 and res["gene_set"] == "custom"
    assert list(res["measured"].index) == ["ERBB2", "GRB7", "KRT19", "CD74", "IGKC"]


def test_gene_correlation_structure_metrics_are_evaluates(base, genes):
    """A smoothed prediction exaggerates gene-gene structure: the same numbers as evaluate's, and as computed here."""
    smooth = _with(base, predicted_expression=_fake_prediction(base, genes, noise=0.5, smooth=True, seed=2))
    summary = evaluate(smooth, gene_sets=["heg"])["summary"]
    for sample in ("C5", "C6"):
        res = gene_correlation(smooth, sample=sample)  # the section's 50 HEG, as in evaluate's summary
        row = summary.loc[sample]
        assert res["preservation"] == pytest.approx(row["preservation"], abs=1e-12)
        assert res["mean_abs_diff"] == pytest.approx(row["corr_abs_diff"], abs=1e-12)
        assert res["moran_ratio"] == pytest.approx(row["moran_ratio"], rel=1e-12)
        assert res["mean_abs_diff"] > 0.05 and res["moran_ratio"] > 1.5  # neighbour averaging: both well off
        # independently: numpy's correlation matrices of the lognorm targets and of the prediction table
        meas = base.tables["table"][base.tables["table"].obs["sample"] == sample]
        pred = smooth.tables["predicted_expression"]
        pred = pred[pred.obs["sample"] == sample]
        pred = pred[pd.Index(pred.obs["spot_id"]).get_indexer(meas.obs["spot_id"])]  # rows in measured order
        m = np.corrcoef(_lognorm(meas.X)[:, meas.var_names.get_indexer(res["measured"].index)].T)
        p = np.corrcoef(np.asarray(pred[:, res["measured"].index].X, dtype=np.float64).T)
        np.testing.assert_allclose(res["predicted"], p, atol=1e-5)
        iu = np.triu_indices(len(m), k=1)
        assert res["mean_abs_diff"] == pytest.approx(np.abs(p - m)[iu].mean(), abs=1e-5)
        stored = smooth.tables["predicted_expression"].uns["gene_correlation"][sample]
        assert stored["mean_abs_diff"] == res["mean_abs_diff"] and stored["moran_ratio"] == res["moran_ratio"]


def test_gene_correlation_errors(perfect):
    with pytest.raises(ValueError, match="several sections"):
        gene_correlation(perfect)
    with pytest.raises(KeyError, match="sample 'B1'"):
        gene_correlation(perfect, sample="B1")
    with pytest.raises(ValueError, match="Unknown gene set"):
        gene_correlation(perfect, genes="top", sample="C6")
    with pytest.raises(KeyError, match="not in both tables"):
        gene_correlation(perfect, genes=["ERBB2", "NOT_A_GENE"], sample="C6")


# --------------------------------------------------------------------------------------------------------------------
# tumour score and localisation
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cancer(base) -> pd.Series:
    """Weak stand-in for pathologist labels: the study's expression clusters annotated as cancer."""
    return base.tables["table"].obs["expression_cluster_label"].str.contains("cancer")


def test_score_tumor_on_predicted_and_measured_tables(base, genes):
    sdata = SpatialData(
        shapes=dict(base.shapes),
        tables={"table": base.tables["table"].copy(), "predicted_expression": _fake_prediction(base, genes)},
    )
    score_tumor(sdata)
    pred = sdata.tables["predicted_expression"]
    assert pred.uns["tumor_score"]["params"]["markers"] == list(TUMOR_MARKERS)
    score_tumor(sdata, table_key="table", key_added="tumor_measured")  # raw counts: log-normalised on the fly
    meas = sdata.tables["table"]
    assert meas.uns["tumor_measured"]["params"]["normalized"] is True
    assert sparse.issparse(meas.X) and meas.X.dtype.kind == "i"  # the counts are untouched
    # independent reference: mean over markers of per-section z-scores of log1p CP10k
    x = pd.DataFrame(_lognorm(meas.X)[:, meas.var_names.get_indexer(TUMOR_MARKERS)], index=meas.obs_names)
    z = x.groupby(meas.obs["sample"].to_numpy()).transform(lambda c: (c - c.mean()) / c.std(ddof=0))
    np.testing.assert_allclose(meas.obs["tumor_measured"], z.mean(axis=1), atol=1e-10)
    # the perfect prediction gives the same score to the same spot
    np.testing.assert_allclose(pred.obs["tumor_score"], meas.obs.loc[pred.obs_names, "tumor_measured"], atol=1e-5)
    with pytest.raises(KeyError, match="overwrite=True"):
        score_tumor(sdata)
    score_tumor(sdata, markers=["ERBB2", "GRB7", "NOT_A_GENE"], overwrite=True)
    assert pred.uns["tumor_score"]["params"]["markers"] == ["ERBB2", "GRB7"]
    with pytest.raises(ValueError, match="None of the markers"):
        score_tumor(sdata, markers=["NOT_A_GENE"], key_added="x")


def test_localization_on_c6(base, genes, cancer):
    perfect = _with(base, predicted_expression=_fake_prediction(base, genes))
    res = evaluate_localization(perfect, cancer)  # no score yet: computed on the fly from TUMOR_MARKERS
    assert list(res.columns) == [
        "n_spots",
        "n_tumor",
        "auroc",
        "average_precision",
        "auroc_measured",
        "average_precision_measured",
    ]
    c6 = res.loc["C6"]
    assert c6["n_spots"] == 176 and c6["n_tumor"] == 86  # 'unknown' spots count as non-tumour; 2 unlabelled
    assert c6["auroc_measured"] == pytest.approx(0.777, abs=0.005)  # the markers localise the labelled tumour
    assert c6["auroc"] == pytest.approx(c6["auroc_measured"], abs=1e-6)  # perfect prediction reaches the bound
    assert perfect.tables["predicted_expression"].uns["tumor_localization"]["per_sample"].equals(res)

    shuffled = _fake_prediction(base, genes, shuffle_within=True, seed=2)
    sdata = _with(base, predicted_expression=shuffled)
    score_tumor(sdata)  # the recorded score (and its markers) is used
    res = evaluate_localization(sdata, cancer.astype(float))
    assert abs(res.loc["C6", "auroc"] - 0.5) < 0.15 and res.loc["C6", "auroc_measured"] == c6["auroc_measured"]


def test_localization_labels(base, genes, cancer):
    table = base.tables["table"].copy()
    table.obs["is_cancer"] = cancer.eq(True)  # unlabelled spots count as non-tumour here
    sdata = SpatialData(
        shapes=dict(base.shapes), tables={"table": table, "predicted_expression": _fake_prediction(base, genes)}
    )
    res = evaluate_localization(sdata, "is_cancer", markers=["ERBB2", "GRB7"])
    assert res.loc["C6", "n_spots"] == 178
    assert sdata.tables["predicted_expression"].uns["tumor_localization"]["params"]["markers"] == ["ERBB2", "GRB7"]
    with pytest.raises(TypeError, match="boolean"):
        evaluate_localization(sdata, "expression_cluster_label")
    with pytest.raises(KeyError, match="No column"):
        evaluate_localization(sdata, "pathology")
    with pytest.raises(ValueError, match="shares no index"):
        evaluate_localization(sdata, pd.Series(True, index=["a", "b"]))
