"""ExpressionModel and predict_expression end to end on real her2st sections, with tiny budgets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

import st_from_he as sth

# Tiny budgets: 32 px patches, a few optimiser steps; enough to exercise every path on 2 CPU cores.
TINY = {"img_size": 32, "batch_size": 16}


@pytest.fixture(scope="module")
def genes(split):
    train, test = split
    shared = set(train.tables["table"].var_names) & set(test.tables["table"].var_names)
    return [g for g in sth.pp.select_genes(train, n_top=50) if g in shared][:40]


@pytest.fixture(scope="module")
def cmrc_model(split, genes):
    train, _ = split
    model = sth.tl.ExpressionModel(genes, preset="cmrc", encoder="vit_tiny_patch16_224", **TINY)
    return model.fit(train, max_epochs=1, progress_bar=False)


def _copy(sdata):
    import spatialdata as sd

    return sd.SpatialData(
        images=dict(sdata.images), shapes=dict(sdata.shapes), tables={k: v.copy() for k, v in sdata.tables.items()}
    )


def test_cmrc_is_the_reference(genes):
    model = sth.tl.ExpressionModel(genes, preset="cmrc")
    c = model.config
    assert (c.tau, c.lr, c.weight_decay, c.top_k, c.mask_ratio, c.batch_size) == (1.0, 1e-4, 1e-3, 50, 0.5, 64)
    assert c.encoder.startswith("vit") and c.use_reconstruction and c.contrastive and not c.regression_head
    assert (model.size_um, model.size_px, model.context) == (112.0, 224, (1.0,))


def test_cmrc_end_to_end(split, genes, cmrc_model):
    train, test = split
    test = _copy(test)
    measured_before = test.tables["table"].copy()
    assert cmrc_model.history is not None and {"epoch", "train_loss", "val_loss"} <= set(cmrc_model.history)
    sth.tl.predict_expression(test, cmrc_model, progress_bar=False)
    pred = test.tables["predicted_expression"]
    measured = test.tables["table"]
    assert pred.shape == (measured.n_obs, len(genes))
    assert list(pred.var_names) == genes
    assert np.isfinite(pred.X).all() and (pred.X >= 0).all()
    # predictions annotate the same circles, row by row
    assert (pred.obs["region"].astype(str) == measured.obs["region"].astype(str)).all()
    assert (pred.obs["spot_id"].to_numpy() == measured.obs["spot_id"].to_numpy()).all()
    assert pred.uns["spatialdata_attrs"]["instance_key"] == "spot_id"
    np.testing.assert_allclose(pred.obsm["spatial"], measured.obsm["spatial"])
    assert pred.obsm["X_he"].shape == (measured.n_obs, 256)
    assert pred.uns["predict_expression"]["model"]["preset"] == "cmrc"
    assert pred.uns["predict_expression"]["coordinate_systems"] == {"C6_spots": "C6"}
    # retrieval averages 50 training spots: each prediction is a mean of real training profiles
    train_max = sth.tl._data.measured_targets(train.tables["table"], genes).max(0)
    assert (pred.X <= train_max + 1e-5).all()
    # the measured table is untouched
    assert (measured.X != measured_before.X).nnz == 0
    assert list(measured.obs.columns) == list(measured_before.obs.columns)


def test_existing_key_is_refused(split, cmrc_model):
    test = _copy(split[1])
    sth.tl.predict_expression(test, cmrc_model, progress_bar=False)
    with pytest.raises(KeyError, match="overwrite=True"):
        sth.tl.predict_expression(test, cmrc_model, progress_bar=False)
    sth.tl.predict_expression(test, cmrc_model, progress_bar=False, overwrite=True)
    with pytest.raises(ValueError, match="never"):
        sth.tl.predict_expression(test, cmrc_model, key_added="table", overwrite=True)


def test_save_load_round_trip_is_identical(tmp_path, split, cmrc_model):
    test = split[1]
    a, b = _copy(test), _copy(test)
    path = cmrc_model.save(tmp_path / "model")
    assert {p.name for p in path.iterdir()} == {"model.json", "weights.safetensors", "arrays.npz"}
    with pytest.raises(FileExistsError):
        cmrc_model.save(path)
    loaded = sth.tl.ExpressionModel.load(path, device="cpu")
    assert loaded.genes == cmrc_model.genes and loaded.blend == cmrc_model.blend == {"retrieval": 1.0}
    sth.tl.predict_expression(a, cmrc_model, device="cpu", progress_bar=False)
    sth.tl.predict_expression(b, loaded, device="cpu", progress_bar=False)
    np.testing.assert_array_equal(a.tables["predicted_expression"].X, b.tables["predicted_expression"].X)
    cmrc_model.save(path, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_interrupted_save_leaves_nothing(tmp_path, cmrc_model, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(OSError, match="disk full"):
        cmrc_model.save(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_or_incompatible_model_directory(tmp_path, cmrc_model):
    path = cmrc_model.save(tmp_path / "model")
    meta = json.loads((path / "model.json").read_text())
    meta["genes"] = meta["genes"][:-1]  # the weights were trained for one more gene
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not fit"):
        sth.tl.ExpressionModel.load(path)
    (path / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        sth.tl.ExpressionModel.load(path)
    with pytest.raises(FileNotFoundError):
        sth.tl.ExpressionModel.load(tmp_path / "nowhere")


def test_fit_is_deterministic_on_cpu(split, genes):
    train, test = split
    preds = []
    for _ in range(2):
        model = sth.tl.ExpressionModel(genes, preset="default", **TINY)
        model.fit(train, max_epochs=1, progress_bar=False, seed=3)
        preds.append(
            model.predict_patches(
                sth.pp.extract_patches(test, size_um=model.size_um, size_px=model.size_px, context=model.context),
                progress_bar=False,
            )[0]
        )
    np.testing.assert_array_equal(preds[0], preds[1])


def test_default_preset_blends_regression_retrieval_and_ridge(tmp_path, split, genes):
    model = sth.tl.ExpressionModel(genes, preset="default", **TINY)
    model.fit(split[0], max_epochs=1, progress_bar=False)
    patches = sth.pp.extract_patches(split[1], size_um=model.size_um, size_px=model.size_px, context=model.context)
    loaded = sth.tl.ExpressionModel.load(model.save(tmp_path / "default"), device="cpu")
    assert loaded.blend == model.blend and loaded.blend_ridge
    np.testing.assert_array_equal(
        model.predict_patches(patches, device="cpu", progress_bar=False)[0],
        loaded.predict_patches(patches, device="cpu", progress_bar=False)[0],
    )
    assert model.config.regression_head and model.context == (1.0, 3.0)
    assert set(model.blend) == {"regression", "retrieval", "ridge"}
    assert np.isclose(sum(model.blend.values()), 1.0) and min(model.blend.values()) >= 0
    # the blend is the best of its grid on validation spots, so never below its components there
    scores = model.training_info["validation_pcc"]
    assert scores["blend"] >= max(scores["regression"], scores["retrieval"], scores["ridge"]) - 1e-9
    # predictions retrieve from every measured spot (validation spots join the bank once the blend is chosen)
    info = model.training_info
    assert len(model._bank["expression"]) == info["n_train_spots"] + info["n_val_spots"]
    # and so does the probe, refitted on every spot once the blend has weighed it on the validation spots
    if model.blend["ridge"] > 0:
        assert info["probe_spots"] == info["n_train_spots"] + info["n_val_spots"]
        assert model._probe.state["feature_mean"].shape == (2 * (36 + 12),)  # hand-crafted + blobs, 2 scales
    assert model._probe.per_section == "hybrid" and model._probe.white_balance
    assert model.neighbour_smoothing == 0.5
    assert model._probe.lowres == model.config.augment_lowres == 4.0  # the probe is trained on blurred copies too
    # the blend is scored on the validation spots' 50 most variable and 50 most expressed genes: here all 40
    assert info["blend_genes"] == len(genes)
    # predictions are blended batch by batch into one array: the weighted sum of the components, as computed apart
    parts, _ = model._predict_parts(patches, groups=patches.samples, glass=patches.glass_per_spot(), device="cpu")
    weighed = sum(model.blend[name] * parts[name] for name in parts)
    blended, _ = model._predict_parts(
        patches, groups=patches.samples, glass=patches.glass_per_spot(), device="cpu", batch_size=7, blend=model.blend
    )
    np.testing.assert_allclose(blended["blend"], weighed, rtol=1e-6, atol=1e-6)
    # a component of weight 0 is not computed at all
    only_ridge, _ = model._predict_parts(
        patches[:20],
        groups=patches.samples[:20],
        glass=patches.glass_per_spot()[:20],
        device="cpu",
        blend={"regression": 0.0, "retrieval": 0.0, "ridge": 1.0},
    )
    unblended, _ = model._predict_parts(
        patches[:20], groups=patches.samples[:20], glass=patches.glass_per_spot()[:20], device="cpu"
    )
    np.testing.assert_allclose(only_ridge["blend"], unblended["ridge"], rtol=1e-6, atol=1e-6)


def test_informative_genes_are_the_most_variable_and_most_expressed():
    from st_from_he.tl._model import informative_genes

    rng = np.random.default_rng(0)
    targets = rng.normal(0, 0.1, (200, 30))
    targets[:, 3] += 5  # highly expressed, barely variable
    targets[:, 7] *= 20  # highly variable
    assert set(informative_genes(targets, 1)) == {3, 7}
    assert len(informative_genes(targets, 100)) == 30  # more than the genes: all of them, once each


def test_few_shot_subset_of_spots(split, genes):
    train = split[0]
    spots = list(train.tables["table"].obs_names[:40])
    model = sth.tl.ExpressionModel(genes, preset="ridge").fit(train, spots=spots)
    assert model.training_info["n_train_spots"] == 40 and model.training_info["n_val_spots"] == 0
    with pytest.raises(KeyError, match="not in the training tables"):
        sth.tl.ExpressionModel(genes, preset="mean").fit(train, spots=["nope"])


def test_missing_genes_are_named(split, genes):
    train = split[0]
    with pytest.raises(ValueError, match="NOT_A_GENE"):
        sth.tl.ExpressionModel([*genes[:5], "NOT_A_GENE"], preset="mean").fit(train)
    model = sth.tl.ExpressionModel([*genes[:5], "NOT_A_GENE"], preset="mean").fit(train, fill_missing_genes=True)
    assert model.is_fitted


def test_table_without_raw_counts_is_refused(split, genes):
    train = _copy(split[0])
    table = train.tables["table"]
    table.X = sp.csr_matrix(np.log1p(table.X.toarray().astype(float) / 7))
    with pytest.raises(ValueError, match="raw counts"):
        sth.tl.ExpressionModel(genes, preset="mean").fit(train)


def test_bad_arguments(genes):
    with pytest.raises(ValueError, match="Unknown preset"):
        sth.tl.ExpressionModel(genes, preset="magic")
    with pytest.raises(ValueError, match="empty"):
        sth.tl.ExpressionModel([])
    with pytest.raises(ValueError, match="more than once"):
        sth.tl.ExpressionModel(["A", "A"])
    with pytest.raises(RuntimeError, match="not fitted"):
        sth.tl.ExpressionModel(genes, preset="ridge").save("x")


def test_he_only_slide_on_a_pseudo_spot_grid(tmp_path, split, cmrc_model):
    import spatialdata as sd

    test = split[1]
    he_only = sd.SpatialData(images={"C6_image": test.images["C6_image"]})
    key = sth.pp.spot_grid(he_only, "C6_image", spacing_um=400, diameter_um=100)
    with pytest.raises(KeyError, match="spot_grid"):
        sth.tl.predict_expression(he_only, cmrc_model)
    sth.tl.predict_expression(he_only, cmrc_model, shapes_key=key, progress_bar=False)
    pred = he_only.tables["predicted_expression"]
    assert pred.n_obs == len(he_only.shapes[key]) > 20
    assert (pred.obs["region"] == key).all()
    assert np.isfinite(pred.X).all()


def test_val_sections_must_be_a_list(genes):
    with pytest.raises(ValueError, match="list of sample ids"):
        sth.tl.ExpressionModel(genes).fit(sdata=None, val_sections="C5")


def test_ridge_with_blur_augmentation(split, genes):
    train, test = split
    spots = list(train.tables["table"].obs_names[:60])
    plain = sth.tl.ExpressionModel(genes, preset="ridge", img_size=32).fit(train, spots=spots)
    blurred = sth.tl.ExpressionModel(genes, preset="ridge", img_size=32, lowres=4).fit(train, spots=spots)
    assert blurred._probe.lowres == 4 and plain._probe.lowres == 0
    patches = sth.pp.extract_patches(test, size_um=112, size_px=32, context=(1.0, 3.0))[:20]
    a, b = plain.predict_patches(patches)[0], blurred.predict_patches(patches)[0]
    assert np.isfinite(b).all() and not np.allclose(a, b)  # the blurred copies change the fit
    with pytest.raises(TypeError, match="does not take"):
        sth.tl.ExpressionModel(genes, preset="ridge", lowres_factor=4)


def test_ridge_standardised_per_section(tmp_path, split, genes):
    train, test = split
    model = sth.tl.ExpressionModel(genes, preset="ridge", img_size=32, per_section=True).fit(train)
    probe = model._probe
    assert probe.per_section and "pooled_mean" in probe.state
    sth.tl.predict_expression(test, model, key_added="per_section", progress_bar=False)
    loaded = sth.tl.ExpressionModel.load(model.save(tmp_path / "ridge"))
    assert loaded._probe.per_section
    sth.tl.predict_expression(test, loaded, key_added="loaded", progress_bar=False)
    np.testing.assert_allclose(test.tables["loaded"].X, test.tables["per_section"].X, rtol=1e-5, atol=1e-6)

    # a section-wide shift of the features (stain, scanner) leaves a per-section probe's predictions unchanged
    patches = sth.pp.extract_patches(test, size_um=112, size_px=32, context=(1.0, 3.0))
    features = probe.featurize(np.stack([patches[i] for i in range(len(patches))]))
    shift = 0.5 * features.std(0)
    pred, _ = probe.predict_features(features)
    np.testing.assert_allclose(probe.predict_features(features + shift)[0], pred, rtol=1e-4, atol=1e-4)
    plain = sth.tl.ExpressionModel(genes, preset="ridge", img_size=32).fit(train)._probe
    assert not np.allclose(plain.predict_features(features + shift)[0], plain.predict_features(features)[0])
    # two sections predicted together are standardised each with its own statistics
    both = np.concatenate([features, features + shift])
    np.testing.assert_allclose(
        probe.predict_features(both, groups=["a"] * len(features) + ["b"] * len(features))[0],
        np.concatenate([pred, pred]),
        rtol=1e-4,
        atol=1e-4,
    )
    # too few spots for their own statistics: the training statistics standardise them, with a log line
    few = probe.predict_features(features[:5])[0]
    assert np.isfinite(few).all() and not np.allclose(few, pred[:5])
    with pytest.raises(ValueError, match="`groups` has 3 entries for"):
        probe.predict_features(features, groups=["a", "b", "c"])


def test_section_standardisation_thresholds():
    from st_from_he.tl._baselines import MIN_SECTION_SPOTS, MIN_TRAINING_SECTION_SPOTS, _standardise_sections

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 4)) + np.repeat([[0.0], [5.0]], 6, axis=0)  # two sections of 6 spots, far apart
    groups = np.repeat(["a", "b"], 6)
    pooled = x.mean(0), x.std(0)
    assert MIN_TRAINING_SECTION_SPOTS <= 6 < MIN_SECTION_SPOTS
    # training sections this small still use their own statistics (better than pooled, even for few-shot fits) ...
    own = _standardise_sections(x, groups, MIN_TRAINING_SECTION_SPOTS, *pooled)
    np.testing.assert_allclose(own[:6].mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(own[6:].mean(0), 0, atol=1e-9)
    # ... sections to predict need more spots before their own statistics are trusted
    np.testing.assert_allclose(_standardise_sections(x, groups, MIN_SECTION_SPOTS, *pooled), (x - x.mean(0)) / x.std(0))


def test_stain_blob_features_on_real_patches(split):
    from st_from_he.models._handcrafted import stain_blob_features

    train, _ = split
    patches = sth.pp.extract_patches(train, size_um=112, size_px=64, context=(1.0, 3.0))
    batch = np.stack([patches[i] for i in range(24)])  # (24, 2 scales, 3, 64, 64)
    features = stain_blob_features(batch)
    assert features.shape == (24, 24) and features.dtype == np.float32 and np.isfinite(features).all()
    # tissue holds blob-like structure at every size; a flat patch (no structure) has none
    assert (features[:, 0::2] > 0).all()
    flat = np.full((1, 3, 64, 64), 180, dtype=np.uint8)
    assert (np.abs(stain_blob_features(flat)[0]) < 0.05 * np.abs(features[:, :12]).mean(0)).all()
    # nuclei are haematoxylin blobs: the small-blob response follows the blob count of the hand-crafted features
    from st_from_he.models._handcrafted import handcrafted_features

    spot = np.stack([patches[i][0] for i in range(len(patches))])
    nuclei = handcrafted_features(spot)[:, 29]  # the nucleus-like blob count
    assert np.corrcoef(stain_blob_features(spot)[:, 1], nuclei)[0, 1] > 0.3
    with pytest.raises(ValueError, match="Expected patches of shape"):
        stain_blob_features(spot[:, 0])


def test_reduced_rank_ridge_on_blob_features(tmp_path, split, genes):
    train, test = split
    kw = {"img_size": 32, "features": "handcrafted+blobs", "per_section": True, "rank": 5}
    model = sth.tl.ExpressionModel(genes, preset="ridge", **kw).fit(train)
    coef = model._probe.state["coef"]
    assert coef.shape == (2 * (36 + 12), len(genes))  # two context scales of hand-crafted + blob features
    assert np.linalg.matrix_rank(coef, tol=1e-4 * np.abs(coef).max()) <= 5
    sth.tl.predict_expression(test, model, key_added="rank5", progress_bar=False)
    pred = test.tables["rank5"].X
    # back on the expression scale: the mean prediction is near the training mean, the spread within a section's
    assert np.abs(pred.mean(0) - model._probe.state["target_mean"]).max() < 0.5
    loaded = sth.tl.ExpressionModel.load(model.save(tmp_path / "rank5"))
    assert loaded._probe.features == "handcrafted+blobs" and loaded._probe.per_section
    sth.tl.predict_expression(test, loaded, key_added="rank5_loaded", progress_bar=False)
    np.testing.assert_allclose(test.tables["rank5_loaded"].X, pred, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Unknown `features`"):
        sth.tl.ExpressionModel(genes, preset="ridge", features="hog").fit(train)
    with pytest.raises(ValueError, match="`rank` must be"):
        sth.tl.ExpressionModel(genes, preset="ridge", rank=0).fit(train)


def test_per_section_probe_ignores_section_wide_expression_shifts(her2st_small, caplog):
    from st_from_he.tl._baselines import RidgeProbe

    patches = sth.pp.extract_patches(her2st_small, size_um=112, size_px=32, context=(1.0,))
    x = np.stack([patches[i] for i in range(len(patches))])
    table = her2st_small.tables["table"][patches.obs_names]
    y = np.log1p(np.asarray(table.X[:, :30].todense() if hasattr(table.X, "todense") else table.X[:, :30]))
    groups = table.obs["sample"].to_numpy()
    assert len(set(groups)) == 2
    shifted = y + np.where(groups == groups[0], 2.0, 0.0)[:, None]  # one section's expression shifted
    fits = [RidgeProbe(per_section=True).fit(x, t, groups=groups).state for t in (y, shifted)]
    np.testing.assert_allclose(fits[0]["coef"], fits[1]["coef"], rtol=1e-4, atol=1e-6)
    pooled = [RidgeProbe().fit(x, t).state["coef"] for t in (y, shifted)]
    assert not np.allclose(pooled[0], pooled[1], atol=1e-4)
    # the expression is scaled per section only when every training section has enough spots to estimate its scale
    import logging

    few = np.concatenate([np.flatnonzero(groups == g)[:10] for g in set(groups)])
    logger = logging.getLogger("st_from_he")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="st_from_he"):
            RidgeProbe(per_section=True).fit(x[few], y[few], groups=groups[few])
    finally:
        logger.removeHandler(caplog.handler)
    assert "the expression is not standardised per section" in caplog.text


def test_too_few_validation_spots_weigh_the_components_equally(split, genes):
    """A 40-spot few-shot fit keeps 4 for validation: too few to choose blend weights on, so none is preferred."""
    spots = list(split[0].tables["table"].obs_names[:40])
    model = sth.tl.ExpressionModel(genes, preset="default", **TINY).fit(
        split[0], spots=spots, max_epochs=1, progress_bar=False
    )
    assert model.training_info["n_val_spots"] < 10
    assert set(model.blend) == {"regression", "retrieval", "ridge"}
    np.testing.assert_allclose(list(model.blend.values()), 1 / 3)
    patches = sth.pp.extract_patches(split[1], size_um=model.size_um, size_px=model.size_px, context=model.context)
    expression = model.predict_patches(patches, progress_bar=False)[0]
    assert expression.std(0).max() > 0  # spots still differ (retrieval of the whole bank alone would not)
