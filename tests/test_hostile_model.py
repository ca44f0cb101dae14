"""Hostile input to ExpressionModel on real her2st sections: no silent wrong result, no lost data.

Predictions must not depend on batching or row order; saved models must reload exactly, refuse foreign or damaged
files and never lose a model (or anything else) on overwrite; bad arguments are refused with errors naming them.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

import st_from_he as sth

# Tiny budgets on 32 px patches: every preset fits in seconds on 2 CPU cores.
TINY = {
    "ridge": {"img_size": 32},
    "default": {"img_size": 32, "batch_size": 16},
    "cmrc": {"img_size": 32, "batch_size": 16, "encoder": "vit_tiny_patch16_224"},
    "ridge_encoder": {"img_size": 32},
    "mean": {},
}


@pytest.fixture(scope="module")
def spots(split):
    """80 training spots of C5 (one section: enough for the per-section probe's own statistics)."""
    return list(split[0].tables["table"].obs_names[:80])


@pytest.fixture(scope="module")
def models(split, genes, spots):
    """One tiny fitted model per preset."""
    out = {}
    for preset, config in TINY.items():
        model = sth.tl.ExpressionModel(genes, preset=preset, **config)
        out[preset] = model.fit(split[0], spots=spots, max_epochs=1, progress_bar=False)
    return out


@pytest.fixture(scope="module")
def test_patches(split):
    """uint8 patches (40, 2 scales, 3, 32, 32) of C6 spots, and the same at one scale."""
    patches = sth.pp.extract_patches(split[1], size_um=112, size_px=32, context=(1.0, 3.0))
    two = np.stack([patches[i] for i in range(40)])
    return {(1.0, 3.0): two, (1.0,): two[:, :1], "glass": patches.glass["C6"]}


def _sdata(test, rows=None):
    """A SpatialData with ``test``'s image and spots, its table reduced to (and ordered as) ``rows``."""
    import spatialdata as sd

    table = test.tables["table"]
    table = table.copy() if rows is None else table[rows].copy()
    return sd.SpatialData(images=dict(test.images), shapes=dict(test.shapes), tables={"table": table})


def _predict(sdata, model, batch_size=64):
    sth.tl.predict_expression(sdata, model, batch_size=batch_size, device="cpu", progress_bar=False)
    return sdata.tables["predicted_expression"].to_df()


# -- 1. a spot's prediction depends on its own patch only ---------------------------------------------------------


def test_features_of_a_patch_do_not_depend_on_its_batch(test_patches):
    from st_from_he.models._handcrafted import handcrafted_features, stain_blob_features

    patches = test_patches[(1.0, 3.0)][:12]
    for featurize in (handcrafted_features, stain_blob_features):
        together = featurize(patches)
        alone = np.concatenate([featurize(patches[i : i + 1]) for i in range(len(patches))])
        np.testing.assert_array_equal(together, alone)
        reversed_ = featurize(patches[::-1])[::-1]
        np.testing.assert_array_equal(together, reversed_)
    # the nucleus fraction follows each patch's own haematoxylin threshold: a dark neighbour does not change it
    dark = np.full_like(patches[:1], 40)
    np.testing.assert_array_equal(
        handcrafted_features(np.concatenate([patches[:1], dark]))[0], handcrafted_features(patches[:1])[0]
    )


@pytest.mark.parametrize("preset", ["ridge", "default", "cmrc"])
def test_predictions_do_not_depend_on_batch_size_or_row_order(split, models, preset):
    test, model = split[1], models[preset]
    rows = np.arange(60)  # 60 spots of C6: enough for the default's per-section statistics
    reference = _predict(_sdata(test, rows), model, batch_size=64)
    assert reference.shape == (60, len(model.genes)) and np.isfinite(reference.values).all()
    assert reference.values.std(0).max() > 0
    for batch_size in (1, 7):
        np.testing.assert_allclose(_predict(_sdata(test, rows), model, batch_size).values, reference.values, atol=1e-5)
    perm = np.random.default_rng(0).permutation(rows)
    permuted = _predict(_sdata(test, perm), model, batch_size=7)
    assert list(permuted.index) == list(test.tables["table"].obs_names[perm])
    np.testing.assert_allclose(permuted.loc[reference.index].values, reference.values, atol=1e-5)
    if preset != "default":
        # no per-section statistics: predicting fewer spots of the section changes none of theirs
        subset = _predict(_sdata(test, rows[:25]), model, batch_size=64)
        np.testing.assert_allclose(subset.values, reference.loc[subset.index].values, atol=1e-5)


def test_per_section_statistics_are_batch_independent(split, genes, spots, test_patches):
    """The default's per-section probe standardises a section with all its spots given in one call."""
    model = sth.tl.ExpressionModel(genes, preset="ridge", img_size=32, per_section=True, features="handcrafted+blobs")
    model.fit(split[0], spots=spots)
    patches = test_patches[(1.0, 3.0)]
    reference = model.predict_patches(patches, batch_size=64, progress_bar=False)[0]
    np.testing.assert_array_equal(model.predict_patches(patches, batch_size=1, progress_bar=False)[0], reference)
    perm = np.random.default_rng(1).permutation(len(patches))
    permuted = model.predict_patches(patches[perm], batch_size=7, progress_bar=False)[0]
    np.testing.assert_array_equal(permuted, reference[perm])  # sorted statistics: identical to the last bit


# -- 2. a saved model loads exactly, and refuses files that are not its own --------------------------------------


@pytest.mark.parametrize("preset", list(TINY))
def test_every_preset_round_trips(tmp_path, models, test_patches, preset):
    import torch

    model = models[preset]
    patches = test_patches[model.context]
    glass = test_patches["glass"]  # the default's probe white-balances: arrays of patches need their slide's glass
    before = model.predict_patches(patches, glass=glass, device="cpu", progress_bar=False)[0]
    torch.manual_seed(12345)  # the global random stream must play no part in rebuilding the model
    loaded = sth.tl.ExpressionModel.load(model.save(tmp_path / preset), device="cpu")
    after = loaded.predict_patches(patches, glass=glass, device="cpu", progress_bar=False)[0]
    np.testing.assert_allclose(after, before, atol=1e-5)
    assert loaded.genes == model.genes and loaded.preset == preset
    if preset != "mean":  # every model but the training mean tells spots apart
        assert before.std(0).max() > 0


def test_ridge_encoder_takes_a_vit(tmp_path, split, genes, spots, test_patches):
    model = sth.tl.ExpressionModel(genes, preset="ridge_encoder", encoder="vit_tiny_patch16_224", img_size=32)
    model.fit(split[0], spots=spots)
    patches = test_patches[(1.0,)]
    before = model.predict_patches(patches, progress_bar=False)[0]
    assert np.isfinite(before).all() and before.std(0).max() > 0
    loaded = sth.tl.ExpressionModel.load(model.save(tmp_path / "vit"))
    np.testing.assert_allclose(loaded.predict_patches(patches, progress_bar=False)[0], before, atol=1e-5)


def test_foreign_arrays_are_refused(tmp_path, split, genes, spots, models):
    a = models["ridge"].save(tmp_path / "a")
    other = sth.tl.ExpressionModel(genes, preset="ridge", img_size=32).fit(split[0], spots=spots[:60])
    b = other.save(tmp_path / "b")
    (a / "arrays.npz").write_bytes((b / "arrays.npz").read_bytes())  # same shapes, another model
    with pytest.raises(ValueError, match=r"arrays\.npz' does not belong to this model"):
        sth.tl.ExpressionModel.load(a)


def _drop_checksums(path):
    """Make ``path`` look like a model saved before checksums were recorded."""
    meta = json.loads((path / "model.json").read_text())
    for key in ("files", "arrays", "package"):
        meta.pop(key)
    (path / "model.json").write_text(json.dumps(meta))


def _rewrite_arrays(path, drop=(), **replace):
    file = path / "arrays.npz"
    with np.load(file) as npz:
        arrays = {k: npz[k] for k in npz.files if k not in drop and k != "model_genes"}
    np.savez(file, **(arrays | replace))


def test_older_models_load_with_a_warning_and_shape_checks(tmp_path, models, test_patches, caplog):
    model = models["ridge"]
    path = model.save(tmp_path / "old")
    _drop_checksums(path)
    _rewrite_arrays(path)  # older arrays.npz: no copy of the genes
    logger = logging.getLogger("st_from_he")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="st_from_he"):
            loaded = sth.tl.ExpressionModel.load(path)
    finally:
        logger.removeHandler(caplog.handler)
    assert "without checksums" in caplog.text
    patches = test_patches[model.context]
    np.testing.assert_allclose(
        loaded.predict_patches(patches, progress_bar=False)[0], model.predict_patches(patches, progress_bar=False)[0]
    )
    # a probe without coefficients used to predict the training mean: now refused, naming the file and the array
    _rewrite_arrays(path, drop=("coef",))
    with pytest.raises(ValueError, match=r"arrays\.npz.*lacks the arrays \['coef'\]"):
        sth.tl.ExpressionModel.load(path)
    _rewrite_arrays(path, coef=np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match=r"arrays\.npz.*`coef` has shape \(3, 2\)"):
        sth.tl.ExpressionModel.load(path)
    # the first saved models kept one blend weight (None: retrieval alone) and no copy of the genes
    cmrc = models["cmrc"]
    old = cmrc.save(tmp_path / "old_cmrc")
    _drop_checksums(old)
    _rewrite_arrays(old)
    meta = json.loads((old / "model.json").read_text())
    (old / "model.json").write_text(json.dumps(meta | {"blend": None}))
    one_scale = test_patches[cmrc.context]
    np.testing.assert_allclose(
        sth.tl.ExpressionModel.load(old).predict_patches(one_scale, progress_bar=False)[0],
        cmrc.predict_patches(one_scale, progress_bar=False)[0],
        atol=1e-6,
    )
    # a truncated archive names the file and the zip error
    data = (path / "arrays.npz").read_bytes()
    (path / "arrays.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"arrays\.npz' is missing or corrupt \(BadZipFile"):
        sth.tl.ExpressionModel.load(path)


def test_damaged_or_incomplete_model_files_are_named(tmp_path, models):
    model = models["cmrc"]
    path = model.save(tmp_path / "m")
    weights = (path / "weights.safetensors").read_bytes()
    (path / "weights.safetensors").write_bytes(weights[:-100])
    with pytest.raises(ValueError, match=r"weights\.safetensors' does not belong to this model"):
        sth.tl.ExpressionModel.load(path)
    (path / "weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"weights\.safetensors' is missing"):
        sth.tl.ExpressionModel.load(path)
    path = model.save(tmp_path / "m", overwrite=True)
    meta = json.loads((path / "model.json").read_text())
    (path / "model.json").write_text(json.dumps(meta | {"genes": [*meta["genes"][1:], "NOT_A_GENE"]}))
    with pytest.raises(ValueError, match=r"arrays\.npz.*its genes differ"):
        sth.tl.ExpressionModel.load(path)
    (path / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model\.json' is corrupt"):
        sth.tl.ExpressionModel.load(path)
    (path / "model.json").unlink()
    with pytest.raises(ValueError, match="has no model.json"):
        sth.tl.ExpressionModel.load(path)


# -- 4. overwriting never loses data ------------------------------------------------------------------------------


def test_overwrite_replaces_only_a_model_directory(tmp_path, models):
    model = models["mean"]
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a model saved by st_from_he"):
        model.save(folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "precious"
    file = tmp_path / "table.csv"
    file.write_text("a,b")
    with pytest.raises(FileExistsError, match="not a model directory"):
        model.save(file, overwrite=True)
    assert file.read_text() == "a,b"
    path = model.save(tmp_path / "model")
    (path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not part of the model \(\['notes.txt'\]\)"):
        model.save(path, overwrite=True)
    (path / "notes.txt").unlink()
    model.save(path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "results", "table.csv"]


def _failing_replace(monkeypatch, fail_calls):
    """Make the ``fail_calls``-th calls (1-based) of os.replace raise, the others rename."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) in fail_calls:
            raise OSError("simulated failure")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_failed_overwrite_keeps_the_previous_model(tmp_path, split, genes, spots, models, test_patches, monkeypatch):
    old = models["ridge"]
    path = old.save(tmp_path / "model")
    patches = test_patches[old.context]
    expected = old.predict_patches(patches, progress_bar=False)[0]
    new = sth.tl.ExpressionModel(genes, preset="ridge", img_size=32).fit(split[0], spots=spots[:50])
    # the new model's rename into place fails: the previous one is put back
    _failing_replace(monkeypatch, {2})
    with pytest.raises(OSError, match="simulated failure"):
        new.save(path, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    loaded = sth.tl.ExpressionModel.load(path)
    np.testing.assert_allclose(loaded.predict_patches(patches, progress_bar=False)[0], expected)
    # the put-back fails too: the error and `load` say where the previous model is
    _failing_replace(monkeypatch, {2, 3})
    with pytest.raises(OSError, match=r"it is kept at '.*\.model\.old-[0-9a-f]+'; rename it to 'model'"):
        new.save(path, overwrite=True)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match=r"left the previous model at '.*\.model\.old-[0-9a-f]+'"):
        sth.tl.ExpressionModel.load(path)
    (backup,) = tmp_path.glob(".model.old-*")
    backup.rename(path)
    np.testing.assert_allclose(sth.tl.ExpressionModel.load(path).predict_patches(patches)[0], expected)


# -- 5. arguments -------------------------------------------------------------------------------------------------


def test_bad_arguments_are_named(tmp_path, split, genes, models, test_patches):
    train = split[0]
    model = models["ridge"]
    patches = test_patches[model.context]
    cases = [
        (lambda: sth.tl.ExpressionModel(None), TypeError, "`genes` must be a list of gene names"),
        (lambda: sth.tl.ExpressionModel([1, 2]), TypeError, "`genes` must hold gene names as non-empty strings"),
        (lambda: sth.tl.ExpressionModel(["A", ""]), TypeError, "non-empty strings"),
        (lambda: sth.tl.ExpressionModel({"A": 1}), TypeError, "`genes` must be a list"),
        (lambda: sth.tl.ExpressionModel([]), ValueError, "`genes` is empty"),
        (lambda: sth.tl.ExpressionModel(["A", "B", "A"]), ValueError, r"more than once: \['A'\]"),
        (lambda: sth.tl.ExpressionModel(genes, preset="magic"), ValueError, "pass `preset=` one of"),
        (lambda: sth.tl.ExpressionModel(genes, preset=None), ValueError, "Unknown preset None"),
        (lambda: sth.tl.ExpressionModel(genes, size_um=-5), ValueError, "`size_um` must be a positive number"),
        (lambda: sth.tl.ExpressionModel(genes, blend_ridge="yes"), TypeError, "`blend_ridge` must be"),
        (lambda: sth.tl.ExpressionModel(genes, img_size=0), ValueError, "`img_size` must be a positive integer"),
        (lambda: sth.tl.ExpressionModel(genes, top_k=0), ValueError, "`top_k` must be a positive integer"),
        (lambda: sth.tl.ExpressionModel(genes, preset="ridge", img_size=0), ValueError, "`img_size` must be at least"),
        (lambda: sth.tl.ExpressionModel(genes, preset="ridge", context_scales=()), ValueError, "`context_scales` is"),
        (lambda: sth.tl.ExpressionModel(genes, preset="ridge", lowres=-1), ValueError, "`lowres` must be"),
        (lambda: sth.tl.ExpressionModel(genes, preset="ridge", per_section=1), TypeError, "`per_section` must be"),
        (lambda: sth.tl.ExpressionModel(genes).fit(train, max_epochs=-1), ValueError, "`max_epochs` must be at least"),
        (lambda: sth.tl.ExpressionModel(genes).fit(train, max_epochs=2.5), TypeError, "`max_epochs` must be an int"),
        (lambda: sth.tl.ExpressionModel(genes).fit(train, batch_size=0), ValueError, "`batch_size` must be at least 2"),
        (lambda: sth.tl.ExpressionModel(genes).fit(train, seed="0"), TypeError, "`seed` must be an integer"),
        (lambda: sth.tl.ExpressionModel(genes).fit(train, seed=1.0), TypeError, "`seed` must be an integer"),
        (lambda: sth.tl.ExpressionModel(genes).fit(train, lr=0), ValueError, "`lr` must be a positive number"),
        (lambda: sth.tl.ExpressionModel(genes).fit(train, patience=0), ValueError, "`patience` must be at least 1"),
        (lambda: sth.tl.ExpressionModel(genes).fit(train, spots="C5"), ValueError, "`spots` must be a list"),
        (lambda: sth.tl.ExpressionModel(genes).fit(train.tables["table"]), TypeError, "got an AnnData. Wrap it"),
        (lambda: sth.tl.ExpressionModel(genes).fit([]), ValueError, "`sdata` is an empty list"),
        (lambda: model.predict_patches(patches, batch_size=0), ValueError, "`batch_size` must be at least 1"),
        (lambda: model.predict_patches(patches, batch_size=True), TypeError, "`batch_size` must be an integer"),
        (lambda: model.predict_patches(patches, batch_size=8.0), TypeError, "`batch_size` must be an integer"),
        (lambda: model.predict_patches(patches, device="gpu"), ValueError, "Unknown `device` 'gpu'; use 'auto'"),
        (lambda: model.predict_patches(patches, groups=["C6"]), ValueError, "`groups` has 1 entries for 40"),
        (lambda: model.predict_patches(patches[:, :1]), ValueError, r"do not fit this model.*extract_patches"),
        (lambda: model.predict_patches(patches.astype(float)), ValueError, r"\(float64\) do not fit"),
        (lambda: model.save(None), TypeError, "`path` must be a directory path"),
        (lambda: model.save(tmp_path / "m", overwrite="yes"), TypeError, "`overwrite` must be True or False"),
        (lambda: sth.tl.ExpressionModel.load(tmp_path / "nowhere"), FileNotFoundError, "No model directory"),
        (lambda: sth.tl.ExpressionModel.load(tmp_path, device="tpu"), ValueError, "Unknown `device` 'tpu'"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    model.device = "quantum"
    with pytest.raises(ValueError, match="Unknown `device` 'quantum'"):
        model.predict_patches(patches)
    model.device = "auto"
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' is not available on this machine"):
            models["cmrc"].predict_patches(patches[:, :1], device="cuda")
