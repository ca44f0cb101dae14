"""sth.pl: figures compared with committed references (``tests/_images``), saving, axes, inputs and errors.

Reference images are made once, and again on purpose after a deliberate change of a plot, with::

    ST_FROM_HE_MAKE_REFERENCES=1 python -m pytest tests/test_pl.py

Open the new PNGs and check them before committing. Figures are compared at a fixed dpi with a tolerance (RMS of
pixel differences on a 0-255 scale) that absorbs font rendering differences between machines, not a changed plot.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import anndata as ad
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.testing.compare import compare_images
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import TableModel

import st_from_he.pl as pl
from st_from_he.pl._layout import spot_layout
from st_from_he.pl._metrics import _tidy
from st_from_he.tl._evaluate import evaluate
from st_from_he.tl._gene_correlation import gene_correlation
from st_from_he.tl._tumor import score_tumor

pytestmark = pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")

EXPECTED = Path(__file__).parent / "_images"
MAKE_REFERENCES = os.environ.get("ST_FROM_HE_MAKE_REFERENCES", "") not in ("", "0")
DPI = 72
TOL = 8


@pytest.fixture(scope="module")
def actual_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("figures")


def compare(fig, name: str, actual_dir: Path) -> None:
    """Save ``fig`` at the test dpi and compare it with ``tests/_images/{name}.png`` (or make that reference)."""
    actual = actual_dir / f"{name}.png"
    fig.savefig(actual, dpi=DPI)
    plt.close(fig)
    expected = EXPECTED / f"{name}.png"
    if MAKE_REFERENCES:
        EXPECTED.mkdir(exist_ok=True)
        shutil.copyfile(actual, expected)
        return
    if not expected.is_file():
        pytest.fail(f"No reference image {expected}; make it with ST_FROM_HE_MAKE_REFERENCES=1 and check it by eye.")
    result = compare_images(str(expected), str(actual), tol=TOL)
    assert result is None, f"{result} (actual and diff images in {actual_dir})"


def _lognorm(x) -> np.ndarray:
    x = sparse.csr_matrix(x, dtype=np.float64)
    totals = np.asarray(x.sum(axis=1)).ravel()
    return np.log1p((sparse.diags(1e4 / totals) @ x).toarray())


def _fake_prediction(table, genes, *, noise, seed, constant=None):
    """Measured lognorm + noise, smoothed over grid neighbours, rows shuffled: a plausible prediction table."""
    rng = np.random.default_rng(seed)
    x = _lognorm(table.X)[:, table.var_names.get_indexer(genes)]
    x = x + rng.normal(scale=noise, size=x.shape)
    samples, xy = table.obs["sample"].astype(str).to_numpy(), table.obsm["spatial"]
    for s in np.unique(samples):
        rows = np.flatnonzero(samples == s)
        d = np.linalg.norm(xy[rows, None] - xy[None, rows], axis=-1)
        w = (d < 1.5 * np.median(np.sort(d, axis=1)[:, 1])).astype(float)
        x[rows] = (w / w.sum(axis=1, keepdims=True)) @ x[rows]
    x = x.astype(np.float32)
    if constant is not None:
        x[:, list(genes).index(constant)] = 1.0
    pred = ad.AnnData(X=x, obs=table.obs[["sample", "region", "spot_id"]].copy(), var=pd.DataFrame(index=genes))
    pred.obsm["spatial"] = xy.copy()
    pred = pred[rng.permutation(pred.n_obs)].copy()
    return TableModel.parse(pred, region=["C5_spots", "C6_spots"], region_key="region", instance_key="spot_id")


@pytest.fixture(scope="module")
def sdata(her2st_small) -> SpatialData:
    """C5 and C6 spots and counts, C6's image with its overview level in memory, and a prediction table."""
    tree = her2st_small.images["C6_image"].copy()  # shallow copy: the session's element stays as it is
    coarsest = sorted(tree.children)[-1]
    level = tree[coarsest].to_dataset()
    level["image"] = level["image"].copy(data=level["image"].data.persist())  # decode once for this module's plots
    tree[coarsest] = level
    table = her2st_small.tables["table"].copy()
    total = np.asarray(table.X.sum(axis=0)).ravel()
    genes = list(
        dict.fromkeys(
            [*table.var_names[np.argsort(-total)[:200]], "ERBB2", "GRB7", "KRT19", "KRT8", "EPCAM", "CD24", "ESR1"]
        )
    )
    out = SpatialData(
        images={"C6_image": tree},
        shapes=dict(her2st_small.shapes),
        tables={
            "table": table,
            "predicted_expression": _fake_prediction(table, genes, noise=1.0, seed=0, constant="ESR1"),
        },
    )
    score_tumor(out)
    return out


@pytest.fixture(scope="module")
def cancer(sdata) -> pd.Series:
    return sdata.tables["table"].obs["expression_cluster_label"].str.contains("cancer")


@pytest.fixture(scope="module")
def results(sdata) -> dict:
    """Evaluations of two 'methods' on the same spots."""
    table = sdata.tables["table"]
    genes = list(sdata.tables["predicted_expression"].var_names)
    other = SpatialData(
        tables={"table": table, "predicted_expression": _fake_prediction(table, genes, noise=2.0, seed=1)}
    )
    return {"model": evaluate(sdata, key_added="eval_model"), "ridge": evaluate(other)}


@pytest.fixture(scope="module")
def history() -> pd.DataFrame:
    """A lightning-like history: train and validation metrics logged on separate rows of each epoch."""
    rows = []
    for e in range(15):
        rows.append(
            {
                "epoch": e,
                "train_loss": 2 * np.exp(-e / 4) + 0.3,
                "train_contrastive": 1.4 * np.exp(-e / 4) + 0.2,
                "train_reconstruction": 0.5 * np.exp(-e / 3) + 0.1,
            }
        )
        rows.append(
            {
                "epoch": e,
                "val_loss": 2 * np.exp(-e / 5) + 0.45 + 0.004 * (e - 10) ** 2,
                "val_contrastive": 1.4 * np.exp(-e / 5) + 0.3,
                "val_reconstruction": 0.5 * np.exp(-e / 4) + 0.15,
                "lr": 1e-4,
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------------------
# figures against references
# --------------------------------------------------------------------------------------------------------------------
def test_plot_predicted_vs_measured_spatial(sdata, actual_dir):
    fig = pl.predicted_vs_measured(sdata, ["ERBB2", "ESR1"], sample="C6", return_fig=True)
    titles = [ax.get_title() for ax in fig.axes]
    assert "ERBB2: measured" in titles and "ESR1: predicted (PCC 0, constant)" in titles
    assert any(t.startswith("ERBB2: predicted (PCC 0.") for t in titles)
    assert sum(ax.get_ylabel() == "log1p(CP10k)" for ax in fig.axes) == 2  # one colour bar per gene
    compare(fig, "predicted_vs_measured_spatial", actual_dir)


def test_plot_predicted_vs_measured_scatter(sdata, actual_dir):
    fig = pl.predicted_vs_measured(sdata, ["ERBB2", "KRT19", "GRB7"], sample="C6", kind="scatter", return_fig=True)
    compare(fig, "predicted_vs_measured_scatter", actual_dir)


def test_plot_gene_correlation(sdata, actual_dir):
    fig = pl.gene_correlation(sdata, "heg", sample="C6", n_genes=20, return_fig=True)
    measured, predicted, difference = fig.axes[:3]
    labels = [t.get_text() for t in measured.get_yticklabels()]
    for ax in (predicted, difference):  # same gene order in every panel
        assert [t.get_text() for t in ax.get_yticklabels()] == labels
        assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert len(labels) == 20
    assert measured.images[0].get_clim() == predicted.images[0].get_clim() == (-1.0, 1.0)
    res = gene_correlation(sdata, sample="C6", n_genes=20)
    # the difference panel is predicted - measured of tl.gene_correlation, drawn in the panels' gene order
    drawn = difference.images[0].get_array()
    expected = (res["predicted"] - res["measured"]).loc[labels, labels].to_numpy()
    np.testing.assert_allclose(drawn, expected, atol=1e-12)
    np.testing.assert_allclose(measured.images[0].get_array(), res["measured"].loc[labels, labels], atol=1e-12)
    assert np.abs(drawn[np.triu_indices(20, k=1)]).mean() == pytest.approx(res["mean_abs_diff"])
    low, high = difference.images[0].get_clim()  # centred at 0, reaching the largest difference
    assert low == -high and np.abs(expected).max() <= high < np.abs(expected).max() + 0.1
    assert difference.images[0].get_cmap().name != measured.images[0].get_cmap().name
    assert difference.get_title() == f"Predicted \u2212 measured\nmean |difference| = {res['mean_abs_diff']:.2f}"
    assert f"preservation r = {res['preservation']:.2f}" in fig.get_suptitle()
    colour_bars = [ax.get_ylabel() for ax in fig.axes[3:]]
    assert colour_bars == ["Pearson r", "difference of r"]  # one shared by the correlations, one of its own
    compare(fig, "gene_correlation", actual_dir)


def test_gene_correlation_panels_and_given_axes(sdata):
    """Two panels without the difference; 2 given Axes draw as before, 3 add the difference; mismatches explained."""
    genes = ["ERBB2", "GRB7", "KRT19", "KRT8"]
    fig = pl.gene_correlation(sdata, genes, sample="C6", difference=False, return_fig=True)
    assert [ax.get_title() for ax in fig.axes] == ["Measured", "Predicted", ""]  # the last: the colour bar
    plt.close(fig)
    fig, two = plt.subplots(1, 2)
    assert list(pl.gene_correlation(sdata, genes, sample="C6", ax=two)) == list(two)
    assert len(fig.axes) == 3 and two[1].get_title().startswith("Predicted\npreservation r = ")
    fig, three = plt.subplots(1, 3)
    pl.gene_correlation(sdata, genes, sample="C6", ax=three, difference=True)
    assert three[2].get_title().startswith("Predicted \u2212 measured\nmean |difference| = ")
    assert len(fig.axes) == 5  # two colour bars
    with pytest.raises(ValueError, match=r"takes 3 Axes with difference=True, got 2; pass 3 Axes or difference=False"):
        pl.gene_correlation(sdata, genes, sample="C6", ax=two, difference=True)
    with pytest.raises(ValueError, match=r"takes 2 Axes \(measured, predicted\) or 3 \(and their difference\), got 4"):
        pl.gene_correlation(sdata, genes, sample="C6", ax=plt.subplots(2, 2)[1])
    with pytest.raises(TypeError, match="`difference` must be True, False or None"):
        pl.gene_correlation(sdata, genes, sample="C6", difference="yes")
    plt.close("all")


def test_plot_metrics(results, actual_dir):
    compare(pl.metrics(results, return_fig=True), "metrics_bar", actual_dir)
    compare(pl.metrics(results, kind="box", return_fig=True), "metrics_box", actual_dir)


def test_plot_training_history(history, actual_dir):
    fig = pl.training_history(history, return_fig=True)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "contrastive", "reconstruction"]  # lr left out
    compare(fig, "training_history", actual_dir)


def test_training_history_of_one_epoch_has_a_whole_epoch_axis():
    one = pd.DataFrame({"epoch": [0], "train_loss": [4.1], "val_loss": [4.7]})
    ax = pl.training_history(one, return_fig=True).axes[0]
    assert list(ax.get_xticks()) == [0] and ax.get_xlim() == (-0.5, 0.5)


def test_plot_tumor_map(sdata, cancer, actual_dir):
    fig = pl.tumor_map(sdata, sample="C6", labels=cancer, return_fig=True)
    legend = fig.axes[0].get_legend().get_texts()[0].get_text()
    assert legend.startswith("tumor label (86 spots, AUROC 0.")
    compare(fig, "tumor_map", actual_dir)


# --------------------------------------------------------------------------------------------------------------------
# saving, axes, inputs
# --------------------------------------------------------------------------------------------------------------------
def test_save_writes_files(sdata, results, history, cancer, tmp_path):
    calls = {
        "pvm.png": lambda p: pl.predicted_vs_measured(sdata, "ERBB2", sample="C6", save=p),
        "scatter.pdf": lambda p: pl.predicted_vs_measured(sdata, ["ERBB2"], sample="C6", kind="scatter", save=p),
        "corr.png": lambda p: pl.gene_correlation(sdata, ["ERBB2", "GRB7", "KRT19"], sample="C6", save=p),
        "metrics.svg": lambda p: pl.metrics(results["model"]["summary"], save=p),
        "history.png": lambda p: pl.training_history(history, save=p),
        "sub/tumor.png": lambda p: pl.tumor_map(sdata, sample="C6", labels=cancer, save=p),
    }
    for name, call in calls.items():
        assert call(tmp_path / name) is None  # nothing returned unless asked
        assert (tmp_path / name).stat().st_size > 1000, name
        plt.close("all")


def test_draw_into_given_axes(sdata, results, history):
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    assert pl.metrics(results, ax=axes[0], return_fig=True) is fig
    pl.training_history(history, keys=["train_loss", "val_loss"], ax=axes[1])
    pl.tumor_map(sdata, sample="C6", ax=axes[2], title="C6")
    assert axes[1].get_title() == "loss" and axes[2].get_title() == "C6"
    assert len(axes[0].patches) == 2 * 4  # 2 methods x 4 gene sets
    plt.close(fig)


def test_metrics_accepts_every_result_form(results):
    res = results["model"]
    per_gene, summary = res["per_gene"], res["summary"]
    for tidy in (_tidy(res), _tidy(per_gene), _tidy(summary)):
        assert list(tidy.columns) == ["method", "sample", "gene_set", "pearson"]
        means = tidy.groupby(["sample", "gene_set"])["pearson"].mean()
        for (sample, name), value in means.items():
            assert value == pytest.approx(summary.loc[sample, f"pcc_{name}"])
    both = _tidy(results)
    assert set(both["method"]) == {"model", "ridge"}
    long = pd.DataFrame(
        {"method": ["a", "a", "b"], "sample": ["S1"] * 3, "gene_set": ["heg"] * 3, "pearson": [0.1, 0.3, 0.5]}
    )
    fig = pl.metrics(long, return_fig=True)
    heights = sorted(p.get_height() for p in fig.axes[0].patches)
    assert heights == pytest.approx([0.2, 0.5])
    plt.close(fig)


def test_training_history_from_model_and_dict(history):
    class Fitted:
        pass

    model = Fitted()
    model.history = history
    fig = pl.training_history(model, log_y=True, return_fig=True)
    assert fig.axes[0].get_yscale() == "log"
    plt.close(fig)
    fig = pl.training_history({"epoch": [0, 1, 2], "loss": [3.0, 2.0, 1.5]}, return_fig=True)
    assert len(fig.axes) == 1 and fig.axes[0].get_title() == "loss"
    plt.close(fig)
    model.history = None
    with pytest.raises(ValueError, match="no training history"):
        pl.training_history(model)
    with pytest.raises(ValueError, match="takes 3 Axes, got 1"):
        pl.training_history(history, ax=plt.subplots()[1])
    with pytest.raises(KeyError, match="No history column"):
        pl.training_history(history, keys=["val_accuracy"])
    plt.close("all")


def test_overview_reads_a_coarse_level_and_maps_to_full_resolution(sdata):
    table = sdata.tables["table"]
    rows = np.flatnonzero(table.obs["sample"] == "C6")
    layout = spot_layout(sdata, table, rows, sample="C6")
    circles = sdata.shapes["C6_spots"].loc[table.obs["spot_id"].to_numpy()[rows]]
    np.testing.assert_allclose(layout.xy, np.c_[circles.geometry.x, circles.geometry.y])  # C6_image pixels
    assert layout.radius == pytest.approx(circles["radius"].median())
    assert layout.um_per_unit == pytest.approx(0.688, abs=0.001)
    xy = layout.xy
    bounds = (xy[:, 0].min(), xy[:, 0].max(), xy[:, 1].min(), xy[:, 1].max())
    rgb, (left, right, bottom, top) = layout.overview(bounds)
    assert rgb.dtype == np.uint8 and rgb.shape[-1] == 3 and max(rgb.shape[:2]) <= 1500
    full_h, full_w = sdata.images["C6_image"]["scale0"]["image"].shape[-2:]
    assert left <= bounds[0] < bounds[1] <= right <= full_w and top <= bounds[2] < bounds[3] <= bottom <= full_h
    assert (right - left) / rgb.shape[1] == pytest.approx(
        full_w / sdata.images["C6_image"][sorted(sdata.images["C6_image"].children)[-1]]["image"].shape[-1]
    )
    c5 = np.flatnonzero(table.obs["sample"] == "C5")
    assert spot_layout(sdata, table, c5, sample="C5").overview(bounds) is None  # no image: spots are drawn alone


def test_section_without_image_draws_spots_only(sdata):
    fig = pl.predicted_vs_measured(sdata, "ERBB2", sample="C5", return_fig=True)
    assert not fig.axes[0].images and len(fig.axes[0].collections) == 1
    plt.close(fig)


def test_plot_errors(sdata):
    with pytest.raises(ValueError, match="several sections"):
        pl.predicted_vs_measured(sdata, "ERBB2")
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        pl.predicted_vs_measured(sdata, ["ERBB2", "NOT_A_GENE"], sample="C6")
    with pytest.raises(ValueError, match="`kind`"):
        pl.predicted_vs_measured(sdata, "ERBB2", sample="C6", kind="violin")
    with pytest.raises(KeyError, match="score_tumor"):
        pl.tumor_map(sdata, score_key="immune_score", sample="C6")
    with pytest.raises(KeyError, match="sample 'B1'"):
        pl.tumor_map(sdata, sample="B1")
    with pytest.raises(ValueError, match="Expected a tidy table"):
        pl.metrics(pd.DataFrame({"x": [1]}))
    with pytest.raises(KeyError, match="gene set"):
        pl.metrics(pd.DataFrame({"gene_set": ["heg"], "pearson": [0.2]}), gene_sets=["hvg"])
    plt.close("all")
