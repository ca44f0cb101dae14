"""cross_validate and few_shot on real her2st sections (C5, C6) with the closed-form presets and tiny budgets."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

import st_from_he as sth
from st_from_he.tl._cross_validate import cross_validate, few_shot
from st_from_he.tl._model import ExpressionModel

# 32 px patches of 112 um (3.5 um/px) and their 3x context are read from the coarse pyramid levels, which the
# `sections` fixture holds in memory: each fit then cuts its patches in well under a second.
SMALL = {"ridge": {"img_size": 32}}
SETS = ["heg", "hvg", "markers", "all"]
SUMMARY_COLUMNS = [
    "fold",
    "group",
    "sample",
    "method",
    "preset",
    "gene_set",
    "pearson",
    "n_genes",
    "n_constant",
    "preservation",
    "n_spots",
    "n_train_spots",
    "train_samples",
    "fit_seconds",
    "predict_seconds",
]


@pytest.fixture(scope="module")
def sections(her2st_small):
    """C5 and C6 with their coarse pyramid levels decoded once and held in memory (the finest stays lazy).

    Every fit and prediction cuts patches anew and would otherwise decode each whole JPEG again; this keeps the
    module fast. Shapes are shared, tables copied: the session fixture is not touched.
    """
    import dask
    import spatialdata as sd
    import xarray as xr

    images = {}
    for key, tree in her2st_small.images.items():
        names = sorted(tree.children, key=lambda k: int(k.removeprefix("scale")))
        coarse = dask.persist(*[tree[n].to_dataset() for n in names[1:]])
        images[key] = xr.DataTree.from_dict(
            {
                f"/{names[0]}": tree[names[0]].to_dataset(),
                **{f"/{n}": ds for n, ds in zip(names[1:], coarse, strict=True)},
            }
        )
    return sd.SpatialData(
        images=images, shapes=dict(her2st_small.shapes), tables={k: v.copy() for k, v in her2st_small.tables.items()}
    )


@pytest.fixture(scope="module")
def genes(sections):
    return sth.pp.select_genes(sections, n_top=20)[:30]


def _snapshot(sdata) -> dict:
    return {
        key: (table.X.copy(), table.obs.copy(), table.var_names.copy(), sorted(table.uns), sorted(table.obsm))
        for key, table in sdata.tables.items()
    }


def _assert_unchanged(sdata, snapshot: dict) -> None:
    assert sorted(sdata.tables) == sorted(snapshot)
    for key, (x, obs, var_names, uns, obsm) in snapshot.items():
        table = sdata.tables[key]
        assert (table.X != x).nnz == 0 if hasattr(x, "nnz") else np.array_equal(table.X, x)
        pd.testing.assert_frame_equal(table.obs, obs)
        assert table.var_names.equals(var_names)
        assert sorted(table.uns) == uns and sorted(table.obsm) == obsm


class _Recorder:
    """Records every fit (model, training samples, spots) and every gene selection (samples it saw)."""

    def __init__(self, monkeypatch):
        self.fits, self.selections = [], []
        fit, select = ExpressionModel.fit, sth.pp.select_genes

        def recording_fit(model, sdata, **kwargs):
            self.fits.append(
                {"model": model, "samples": set(sdata.tables["table"].obs["sample"]), "spots": kwargs.get("spots")}
            )
            return fit(model, sdata, **kwargs)

        def recording_select(sdata, **kwargs):
            self.selections.append(set(sdata.tables["table"].obs["sample"]))
            return select(sdata, **kwargs)

        monkeypatch.setattr(ExpressionModel, "fit", recording_fit)
        monkeypatch.setattr(sth.pp, "select_genes", recording_select)


@pytest.fixture(scope="module")
def cv(sections):
    """One cross-validation of ridge and mean, genes chosen per fold, with every fit recorded."""
    before = _snapshot(sections)
    with pytest.MonkeyPatch.context() as mp:
        recorder = _Recorder(mp)
        summary, per_gene = cross_validate(
            sections,
            presets=["ridge", "mean"],
            n_top=10,
            model_kwargs=SMALL,
            return_per_gene=True,
            progress_bar=False,
        )
    return summary, per_gene, recorder, before


def test_cross_validate_folds(cv, sections):
    summary, _, recorder, _ = cv
    # every section is held out exactly once, and never in its own training data
    folds = summary[["fold", "group", "sample"]].drop_duplicates()
    assert folds["sample"].tolist() == ["C5", "C6"] and folds["fold"].tolist() == [0, 1]
    assert len(recorder.fits) == 4  # 2 folds x 2 presets
    held_out = ["C5", "C5", "C6", "C6"]
    for fit, test in zip(recorder.fits, held_out, strict=True):
        assert test not in fit["samples"] and fit["samples"] == {"C5", "C6"} - {test}
        assert fit["model"].training_info["samples"] == sorted(fit["samples"])
        assert fit["spots"] is None
    # genes are chosen on the training sections only
    assert recorder.selections == [{"C6"}, {"C5"}]
    n_spots = sections.tables["table"].obs["sample"].value_counts()
    for row in summary.itertuples():
        assert row.train_samples == ("C6" if row.sample == "C5" else "C5")
        assert row.n_train_spots == n_spots[row.train_samples] and row.n_spots == n_spots[row.sample]


def test_cross_validate_tidy(cv):
    summary, per_gene, _, _ = cv
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert len(summary) == 2 * 2 * len(SETS)  # folds x methods x gene sets (one section per fold)
    assert set(summary["method"]) == {"ridge", "mean"} and set(summary["gene_set"]) == set(SETS)
    assert summary.groupby(["fold", "method", "sample"]).size().eq(len(SETS)).all()
    assert summary["pearson"].between(-1, 1).all()  # markers are selected too: no empty set
    assert (summary["fit_seconds"] >= 0).all() and (summary["predict_seconds"] >= 0).all()
    # the mean predicts a constant: every gene is constant and scores 0
    mean = summary[summary["method"] == "mean"]
    assert (mean["pearson"] == 0).all() and (mean["n_constant"] == mean["n_genes"]).all()
    # the summary is the per-gene table averaged by gene set
    fold0 = per_gene[(per_gene["fold"] == 0) & (per_gene["method"] == "ridge")]
    row = summary.query("fold == 0 and method == 'ridge' and gene_set == 'hvg'").iloc[0]
    assert row["pearson"] == pytest.approx(fold0.loc[fold0["hvg"], "pearson"].mean())
    assert row["n_genes"] == fold0["hvg"].sum() <= 50
    assert {"fold", "group", "method", "sample", "gene", "pearson", "constant", *SETS} <= set(per_gene.columns)


def test_cross_validate_plottable(cv, tmp_path):
    summary, per_gene, _, _ = cv
    sth.pl.metrics(summary, save=tmp_path / "cv.png")
    sth.pl.metrics(per_gene, kind="box", save=tmp_path / "cv_box.png")
    assert (tmp_path / "cv.png").stat().st_size > 0 and (tmp_path / "cv_box.png").stat().st_size > 0


def test_cross_validate_leaves_input_unchanged(cv, sections):
    _, _, _, before = cv
    _assert_unchanged(sections, before)


def test_cross_validate_reproducible_and_groups(cv, sections, genes):
    summary, _, _, _ = cv
    # the same seed gives the same scores; test_groups runs only the chosen fold; a mapping names the groups
    again = cross_validate(
        sections,
        groups={"C5": "patient_x", "C6": "patient_y"},
        test_groups=["patient_y"],
        presets=["ridge"],
        n_top=10,
        model_kwargs=SMALL,
        progress_bar=False,
    )
    assert set(again["group"]) == {"patient_y"} and set(again["sample"]) == {"C6"} and set(again["fold"]) == {0}
    first = summary.query("sample == 'C6' and method == 'ridge'").reset_index(drop=True)
    pd.testing.assert_series_equal(again["pearson"], first["pearson"])
    assert again.attrs["cross_validate"]["seed"] == 0


def test_cross_validate_fixed_genes(sections, genes):
    summary = cross_validate(sections, presets="mean", genes=genes, test_groups="C6", progress_bar=False)
    assert summary.loc[summary["gene_set"] == "all", "n_genes"].tolist() == [len(genes)]
    assert summary.loc[summary["gene_set"] == "markers", "n_genes"].tolist() == [0]  # no marker among them


def test_cross_validate_errors(sections, genes):
    run = {"genes": genes, "progress_bar": False}
    with pytest.raises(ValueError, match="Unknown preset"):
        cross_validate(sections, presets=["ridge", "lasso"], **run)
    with pytest.raises(KeyError, match="no obs column 'no_such_column'"):
        cross_validate(sections, groups="no_such_column", presets=["mean"], **run)
    with pytest.raises(ValueError, match="one group"):  # the readers record obs['patient']: C5 and C6 are both C
        cross_validate(sections, groups="patient", presets=["mean"], **run)
    with pytest.raises(ValueError, match="no training data"):  # her2st patient C: both sections
        cross_validate(sections, groups=lambda sample: sample[0], presets=["mean"], **run)
    with pytest.raises(ValueError, match="within section"):  # a spot-level column cannot define folds
        cross_validate(sections, groups="expression_cluster", presets=["mean"], **run)
    with pytest.raises(KeyError, match="no group for section"):
        cross_validate(sections, groups={"C5": "a"}, presets=["mean"], **run)
    with pytest.raises(ValueError, match="not groups"):
        cross_validate(sections, test_groups=["C9"], presets=["mean"], **run)
    with pytest.raises(ValueError, match="not in `presets`"):
        cross_validate(sections, presets=["mean"], model_kwargs={"ridge": {}}, **run)
    with pytest.raises(TypeError, match="'ridge'.*does not take"):
        cross_validate(sections, presets=["ridge"], model_kwargs={"ridge": {"depth": 3}}, **run)
    with pytest.raises(TypeError, match="must not set"):
        cross_validate(sections, presets=["mean"], fit_kwargs={"seed": 1}, **run)
    with pytest.raises(KeyError, match="not measured"):
        cross_validate(sections, presets=["mean"], genes=["ERBB2", "NOT_A_GENE"], progress_bar=False)


def test_few_shot(sections, genes, caplog):
    before = _snapshot(sections)
    logger = logging.getLogger("st_from_he")
    logger.addHandler(caplog.handler)
    try:
        with pytest.MonkeyPatch.context() as mp:
            recorder = _Recorder(mp)
            curve = few_shot(
                sections,
                test="C6",
                n_train_spots=[20, 1000],
                presets=["ridge", "mean"],
                genes=genes,
                model_kwargs=SMALL,
                progress_bar=False,
            )
    finally:
        logger.removeHandler(caplog.handler)
    n_c5 = int((sections.tables["table"].obs["sample"] == "C5").sum())
    assert "use them all" in caplog.text  # 1000 > the 181 spots of C5
    assert list(curve.columns[:6]) == ["method", "preset", "n_train_spots", "repeat", "sample", "gene_set"]
    assert sorted(curve["n_train_spots"].unique()) == [20, n_c5]
    assert set(curve["sample"]) == {"C6"} and set(curve["train_samples"]) == {"C5"}
    assert len(curve) == 2 * 2 * len(SETS)  # sizes x methods x gene sets
    # the fitted models saw exactly the requested spots, all from the training section, nested across sizes
    c5 = set(sections.tables["table"].obs_names[sections.tables["table"].obs["sample"] == "C5"])
    assert [len(f["spots"]) for f in recorder.fits] == [20, 20, n_c5, n_c5]
    for fit in recorder.fits:
        info = fit["model"].training_info
        assert info["n_train_spots"] + info["n_val_spots"] == len(fit["spots"]) and info["samples"] == ["C5"]
        assert set(fit["spots"]) <= c5 and fit["samples"] == {"C5"}
    assert recorder.fits[0]["spots"] == recorder.fits[1]["spots"]  # every preset sees the same subset
    assert set(recorder.fits[0]["spots"]) < set(recorder.fits[2]["spots"])
    _assert_unchanged(sections, before)


def test_few_shot_repeats_and_seed(sections, genes):
    with pytest.MonkeyPatch.context() as mp:
        recorder = _Recorder(mp)
        curve = few_shot(
            sections, test=["C6"], n_train_spots=10, n_repeats=2, presets="mean", genes=genes, progress_bar=False
        )
        few_shot(sections, test="C6", n_train_spots=10, presets="mean", genes=genes, progress_bar=False)
    assert sorted(curve["repeat"].unique()) == [0, 1]
    first, second, again = (fit["spots"] for fit in recorder.fits)
    assert first != second and first == again  # repeats draw anew; the same seed draws the same spots


def test_few_shot_errors(sections, genes):
    run = {"presets": ["mean"], "genes": genes, "progress_bar": False}
    with pytest.raises(ValueError, match="at least 2"):
        few_shot(sections, test="C6", n_train_spots=[1, 10], **run)
    with pytest.raises(ValueError, match="No section is left"):
        few_shot(sections, test=["C5", "C6"], **run)
    with pytest.raises(ValueError, match="Unknown sample"):
        few_shot(sections, test="C9", **run)
    with pytest.raises(ValueError, match="not among the non-test"):
        few_shot(sections, test="C6", train="C6", **run)
    with pytest.raises(ValueError, match="n_repeats"):
        few_shot(sections, test="C6", n_repeats=0, **run)


def test_neural_preset_composes(sections, genes):
    """A tiny 'default' network next to ridge, under method names of the user's choice (one epoch, 32 px)."""
    summary = cross_validate(
        sections,
        presets={"tiny_cnn": "default", "ridge": "ridge"},
        genes=genes,
        test_groups=["C6"],
        max_epochs=1,
        model_kwargs={"tiny_cnn": {"img_size": 32}, **SMALL},
        fit_kwargs={"batch_size": 32},
        progress_bar=False,
    )
    assert summary.groupby("method")["preset"].first().to_dict() == {"ridge": "ridge", "tiny_cnn": "default"}
    assert summary["pearson"].notna().sum() == 2 * 3  # heg, hvg, all per method; no marker among the genes
