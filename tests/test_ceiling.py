"""The count-noise ceiling: checked against spots simulated with known expected expression, and on real sections."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

import st_from_he as sth
from st_from_he.tl._evaluate import evaluate

pytestmark = pytest.mark.filterwarnings("ignore:The table is annotating:UserWarning")


def _lognorm(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)


@pytest.fixture(scope="module")
def c6_counts(her2st_small):
    table = her2st_small.tables["table"]
    return table[table.obs["sample"] == "C6"].X.toarray()


def _pearson_columns(a, b):
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


@pytest.mark.parametrize("depth", [0.05, 1.0])
def test_ceiling_matches_the_correlation_of_the_truth_with_simulated_counts(c6_counts, depth):
    """Spots drawn as Poisson counts around known rates: the ceiling estimates corr(truth, measurement)."""
    rng = np.random.default_rng(1)
    # expected expression of each spot: its real profile smoothed towards the section mean (a known, varying truth)
    rates = 0.5 * c6_counts + 0.5 * c6_counts.mean(0, keepdims=True)
    rates = rates * depth
    genes = np.argsort(-c6_counts.mean(0))[:200:4]  # 50 genes from deep to moderately shallow
    truth = _lognorm(rates + 1e-9)[:, genes]
    expected, estimated = [], []
    for seed in range(3):
        counts = rng.poisson(rates)
        expected.append(_pearson_columns(truth, _lognorm(counts + 0.0)[:, genes]))
        estimated.append(sth.tl.noise_ceiling(counts, genes, seed=seed))
    expected, estimated = np.mean(expected, 0), np.mean(estimated, 0)
    # an estimate from 178 spots: the mean over 50 genes within 0.03, each gene within about 0.1 on average
    assert abs(estimated.mean() - expected.mean()) < 0.03
    assert np.abs(estimated - expected).mean() < 0.12
    assert 0 <= estimated.min() and estimated.max() <= 1


def test_shallower_counts_allow_less(c6_counts):
    rng = np.random.default_rng(0)
    genes = np.argsort(-c6_counts.var(0))[:50]
    full = sth.tl.noise_ceiling(c6_counts, genes)
    thinned = sth.tl.noise_ceiling(rng.binomial(c6_counts.astype(np.int64), 0.1), genes)
    assert thinned.mean() < full.mean() - 0.05
    assert np.array_equal(full, sth.tl.noise_ceiling(sparse.csr_matrix(c6_counts), genes))  # same seed: same splits


def test_ceiling_rejects_values_that_are_not_counts(c6_counts):
    with pytest.raises(ValueError, match="raw counts"):
        sth.tl.noise_ceiling(np.log1p(c6_counts), [0, 1])
    with pytest.raises(ValueError, match="raw counts"):
        sth.tl.noise_ceiling(-c6_counts, [0, 1])


def test_evaluate_reports_the_ceiling_and_the_matrix_difference(her2st_small):
    """B4-like shallow sections get a lower ceiling; evaluate reports it per gene set next to the PCC."""
    meas = her2st_small.tables["table"]
    rows = meas.obs["sample"].to_numpy() == "C6"
    genes = list(meas.var_names[np.argsort(-np.asarray(meas.X[rows].mean(0)).ravel())[:300]])
    # a prediction: measured log-normalised expression of the same spots, as an AnnData next to the measured one
    x = _lognorm(meas[rows].X.toarray())[:, meas.var_names.get_indexer(genes)]
    pred = ad.AnnData(x.astype(np.float32), obs=meas.obs.loc[rows, ["region", "spot_id", "sample"]].copy())
    pred.var_names = genes
    pred.uns["spatialdata_attrs"] = meas.uns["spatialdata_attrs"]
    res = evaluate(meas, predicted=pred, gene_sets=("hvg", "heg"))
    summary = res["summary"].loc["C6"]
    assert summary["pcc_hvg"] == pytest.approx(1.0)
    assert 0.5 < summary["ceiling_hvg"] < 1.0 and 0.5 < summary["ceiling_heg"] < 1.0
    assert summary["corr_abs_diff"] == pytest.approx(0.0, abs=1e-6)  # float32 predictions
    per_gene = res["per_gene"]
    assert per_gene["ceiling"].between(0, 1).all()
    hvg = per_gene.loc[per_gene["hvg"], "ceiling"].mean()
    assert hvg == pytest.approx(summary["ceiling_hvg"])
    # shallower counts (10% of the molecules) of the same spots: lower ceiling
    shallow = meas[rows].copy()
    shallow.X = sparse.csr_matrix(np.random.default_rng(0).binomial(shallow.X.toarray().astype(np.int64), 0.1))
    low = evaluate(shallow, predicted=pred, gene_sets=("hvg",))["summary"].loc["C6"]
    assert low["ceiling_hvg"] < summary["ceiling_hvg"] - 0.05
    # normalised values have no ceiling: left out by default, refused when asked for
    normed = meas[rows].copy()
    normed.X = sparse.csr_matrix(_lognorm(normed.X.toarray()))
    quiet = evaluate(normed, predicted=pred, normalize=False, gene_sets=("hvg",))
    assert "ceiling_hvg" not in quiet["summary"] and "ceiling" not in quiet["per_gene"]
    with pytest.raises(ValueError, match="needs raw counts"):
        evaluate(normed, predicted=pred, normalize=False, ceiling=True)
    with pytest.raises(TypeError, match="predicted="):
        evaluate(meas)
