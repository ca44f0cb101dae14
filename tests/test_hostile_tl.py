"""Hostile input to the pp and tl functions: a clear error or the right result, never a silent wrong one.

Real data: a ridge model fitted on section C5 of her2st predicts 60 spots of C6.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import st_from_he as sth

N_TEST = 60


def _section(test, table=None, **tables):
    """A new SpatialData sharing ``test``'s (lazy) images and shapes, with copies of the given tables."""
    from spatialdata import SpatialData

    table = test.tables["table"] if table is None else table
    return SpatialData(
        images=dict(test.images),
        shapes=dict(test.shapes),
        tables={"table": table.copy(), **{k: v.copy() for k, v in tables.items()}},
    )


@pytest.fixture(scope="module")
def split(her2st_small):
    """(train = C5, test = the first 60 spots of C6)."""
    train, test = sth.pp.split_sections(her2st_small, test="C6")
    return train, _section(test, test.tables["table"][:N_TEST])


@pytest.fixture(scope="module")
def model(split):
    train, _ = split
    genes = sth.pp.select_genes(train, n_top=50, markers=["ERBB2", "KRT19"])
    return sth.tl.ExpressionModel(genes, preset="ridge").fit(train, progress_bar=False)


@pytest.fixture(scope="module")
def prediction(split, model):
    """The prediction table of the test spots."""
    sdata = _section(split[1])
    sth.tl.predict_expression(sdata, model, progress_bar=False)
    return sdata.tables["predicted_expression"]


@pytest.fixture
def predicted(split, prediction):
    """A fresh copy of the test section with (a copy of) its prediction table."""
    return _section(split[1], predicted_expression=prediction)


def _lognorm(table, rows, genes):
    x = table.X[rows].toarray().astype(float)
    x = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)
    return x[:, table.var_names.get_indexer(genes)]


# --------------------------------------------------------------------------------------------------------------------
# 1. evaluation matches spots by identity and refuses a prediction that no longer matches the measured table
# --------------------------------------------------------------------------------------------------------------------
def test_evaluate_aligns_by_identity_on_a_shuffled_subset(predicted):
    pred = predicted.tables["predicted_expression"]
    order = np.random.default_rng(0).permutation(pred.n_obs)[:50]  # 10 spots fewer, rows shuffled
    predicted.tables["predicted_expression"] = pred[order].copy()
    result = sth.tl.evaluate(predicted, gene_sets=["all"])
    pred = predicted.tables["predicted_expression"]
    meas = predicted.tables["table"]
    assert result["summary"].loc["C6", "n_spots"] == 50
    # by hand: measured row of each predicted spot from its spot id
    meas_rows = meas.obs["spot_id"].to_numpy().tolist()
    rows = [meas_rows.index(i) for i in pred.obs["spot_id"]]
    genes = list(pred.var_names)
    m = _lognorm(meas, rows, genes)
    p = np.asarray(pred.X, dtype=float)
    per_gene = result["per_gene"].set_index("gene")
    varying = (m.std(axis=0) > 1e-6) & (p.std(axis=0) > 1e-6)
    assert varying.sum() > 40
    expected = [np.corrcoef(p[:, j], m[:, j])[0, 1] for j in np.flatnonzero(varying)]
    np.testing.assert_allclose(per_gene.loc[np.array(genes)[varying], "pearson"], expected, atol=1e-6)


def test_evaluate_accepts_centres_in_another_frame(predicted, prediction):
    """Centres in micrometres with an offset (another method's table) still match: only ids naming other spots fail."""
    pred = predicted.tables["predicted_expression"]
    pred.obsm["spatial"] = pred.obsm["spatial"] * 0.688 + np.array([100.0, -50.0])
    result = sth.tl.evaluate(predicted, gene_sets=["all"])
    predicted.tables["predicted_expression"] = prediction.copy()
    expected = sth.tl.evaluate(predicted, gene_sets=["all"])
    np.testing.assert_allclose(result["per_gene"]["pearson"], expected["per_gene"]["pearson"])


def test_evaluate_refuses_predicted_spots_missing_from_measured_table(predicted):
    meas = predicted.tables["table"]
    keep = np.r_[0:20, 30 : meas.n_obs]  # the measured table lost 10 spots after the prediction
    predicted.tables["table"] = meas[keep].copy()
    with pytest.raises(ValueError, match=r"10 of 60 spots of table 'predicted_expression' are not in table 'table'"):
        sth.tl.evaluate(predicted)
    with pytest.raises(ValueError, match="10 of 60 spots"):
        sth.tl.gene_correlation(predicted, genes="heg", n_genes=10)
    cancer = meas.obs["expression_cluster_label"].str.contains("cancer")
    with pytest.raises(ValueError, match="10 of 60 spots"):
        sth.tl.evaluate_localization(predicted, cancer)


def test_evaluate_refuses_instance_ids_that_name_other_spots(split, model):
    """A prediction on a re-read of the section with 10 fewer spots, whose instance ids are row numbers."""
    test = split[1]
    full = test.tables["table"].copy()
    full.obs["spot_id"] = np.arange(full.n_obs)  # instance ids that are row numbers (older readers)
    reread = full[np.r_[0:20, 30 : full.n_obs]].copy()
    reread.obs["spot_id"] = np.arange(reread.n_obs)  # the re-read lacks 10 spots: ids shift after them
    other = _section(test, reread)
    sth.tl.predict_expression(other, model, progress_bar=False)
    sdata = _section(test, full, predicted_expression=other.tables["predicted_expression"])
    # every predicted id exists in the measured table, but from the 21st on they name the neighbours' spots
    with pytest.raises(
        ValueError, match=r"place 30 of 50 spots of region 'C6_spots' that share an instance id at different positions"
    ):
        sth.tl.evaluate(sdata)


# --------------------------------------------------------------------------------------------------------------------
# 2. the measured table is never replaced
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shapes_key", [None, "C6_spots"])
def test_predict_never_replaces_the_measured_table(split, model, shapes_key):
    sdata = _section(split[1])
    measured = sdata.tables["table"]
    with pytest.raises(ValueError, match="measured data are never overwritten, whatever `overwrite`"):
        sth.tl.predict_expression(
            sdata, model, key_added="table", shapes_key=shapes_key, overwrite=True, progress_bar=False
        )
    assert sdata.tables["table"] is measured


def test_predict_never_replaces_another_table_of_counts(split, model):
    sdata = _section(split[1], counts=split[1].tables["table"])
    counts = sdata.tables["counts"]
    with pytest.raises(ValueError, match=r"Table 'counts' was not written by `sth.tl.predict_expression`"):
        sth.tl.predict_expression(sdata, model, key_added="counts", overwrite=True, progress_bar=False)
    assert sdata.tables["counts"] is counts
    # a previous prediction is replaced with overwrite=True, refused without
    sth.tl.predict_expression(sdata, model, key_added="pred", progress_bar=False)
    with pytest.raises(KeyError, match="exists; pass `overwrite=True`"):
        sth.tl.predict_expression(sdata, model, key_added="pred", progress_bar=False)
    first = sdata.tables["pred"]
    sth.tl.predict_expression(sdata, model, key_added="pred", overwrite=True, progress_bar=False)
    assert sdata.tables["pred"] is not first


# --------------------------------------------------------------------------------------------------------------------
# 3. pseudo-spot grids are capped
# --------------------------------------------------------------------------------------------------------------------
def test_spot_grid_refuses_grids_above_max_spots(split):
    from spatialdata import SpatialData

    from st_from_he._sdata import pixel_size_um

    sdata = SpatialData(images={"C6_image": split[1].images["C6_image"]})
    _, height, width = sdata.images["C6_image"]["scale0"]["image"].shape
    px = pixel_size_um(sdata, "C6_image", "C6")
    n = math.ceil(width / (2 / px)) * math.ceil(height / (2 / px))
    assert n > 2_000_000
    with pytest.raises(ValueError, match=rf"has {n:,} points, above `max_spots`=2,000,000.*larger `max_spots=`"):
        sth.pp.spot_grid(sdata, "C6_image", spacing_um=2)
    assert "C6_grid" not in sdata.shapes
    n100 = math.ceil(width / (100 / px)) * math.ceil(height / (100 / px))
    with pytest.raises(ValueError, match=rf"has {n100:,} points, above `max_spots`={n100 - 1:,}"):
        sth.pp.spot_grid(sdata, "C6_image", spacing_um=100, tissue_only=False, max_spots=n100 - 1)
    key = sth.pp.spot_grid(sdata, "C6_image", spacing_um=100, tissue_only=False, max_spots=n100)
    assert len(sdata.shapes[key]) == n100


# --------------------------------------------------------------------------------------------------------------------
# 4. an AnnData where a SpatialData is expected
# --------------------------------------------------------------------------------------------------------------------
_SDATA_FUNCTIONS = {
    "sth.tl.evaluate": lambda x, m: sth.tl.evaluate(x),
    "sth.tl.gene_correlation": lambda x, m: sth.tl.gene_correlation(x),
    "sth.tl.gene_set": lambda x, m: sth.tl.gene_set(x),
    "sth.tl.score_tumor": lambda x, m: sth.tl.score_tumor(x),
    "sth.tl.evaluate_localization": lambda x, m: sth.tl.evaluate_localization(x, "label"),
    "sth.tl.predict_expression": lambda x, m: sth.tl.predict_expression(x, m),
    "sth.tl.cross_validate": lambda x, m: sth.tl.cross_validate(x),
    "sth.tl.few_shot": lambda x, m: sth.tl.few_shot(x, test="C6"),
    "sth.pp.split_sections": lambda x, m: sth.pp.split_sections(x, test="C6"),
    "sth.pp.spot_grid": lambda x, m: sth.pp.spot_grid(x, "C6_image"),
    "sth.pp.detect_tissue": lambda x, m: sth.pp.detect_tissue(x, "C6_image"),
    "sth.pp.extract_patches": lambda x, m: sth.pp.extract_patches(x),
}


@pytest.mark.parametrize("name", list(_SDATA_FUNCTIONS))
def test_anndata_instead_of_spatialdata(split, model, name):
    adata = split[1].tables["table"]
    if name == "sth.tl.evaluate":  # takes a measured AnnData with its predictions as `predicted=`
        with pytest.raises(TypeError, match=r"`sth.tl.evaluate` got an AnnData of measurements: pass .*`predicted=`"):
            _SDATA_FUNCTIONS[name](adata, model)
    else:
        with pytest.raises(TypeError, match=rf"`{name}` takes a SpatialData, got an AnnData\..*attach_histology"):
            _SDATA_FUNCTIONS[name](adata, model)
    if name == "sth.tl.predict_expression":  # takes a list of slides (each predicted alone; tests/test_distributed.py)
        return
    with pytest.raises(TypeError, match=rf"`{name}` takes one SpatialData, got a list of 2.*sth.io.concatenate"):
        _SDATA_FUNCTIONS[name]([split[0], split[1]], model)


def test_table_functions_take_anndata_but_nothing_else(split):
    adata = split[1].tables["table"]
    assert len(sth.pp.select_genes(adata, n_top=5)) >= 5  # documented: an AnnData is one section
    with pytest.raises(TypeError, match=r"`sth.pp.select_genes` takes a SpatialData, got dict"):
        sth.pp.select_genes({"table": adata})
    with pytest.raises(TypeError, match=r"`sth.pp.normalize` takes a SpatialData, got DataFrame"):
        sth.pp.normalize(adata.obs)


# --------------------------------------------------------------------------------------------------------------------
# 5. strings, None and nonsense where numbers, lists and keys are expected
# --------------------------------------------------------------------------------------------------------------------
_BAD_ARGUMENTS = [
    ("predict batch_size=0", lambda s, m: sth.tl.predict_expression(s, m, batch_size=0), ValueError, "`batch_size`"),
    ("predict batch_size='64'", lambda s, m: sth.tl.predict_expression(s, m, batch_size="64"), TypeError, "got str"),
    ("predict batch_size=None", lambda s, m: sth.tl.predict_expression(s, m, batch_size=None), TypeError, "NoneType"),
    ("predict batch_size=True", lambda s, m: sth.tl.predict_expression(s, m, batch_size=True), TypeError, "bool"),
    (
        "predict table_key",
        lambda s, m: sth.tl.predict_expression(s, m, table_key="x", overwrite=True),
        KeyError,
        r"present: \['pr",
    ),
    (
        "predict shapes_key",
        lambda s, m: sth.tl.predict_expression(s, m, shapes_key="x", overwrite=True),
        KeyError,
        "shapes present",
    ),
    (
        "predict model=str",
        lambda s, m: sth.tl.predict_expression(s, "ridge", overwrite=True),
        TypeError,
        "`model` must be a fitted",
    ),
    ("predict key_added=None", lambda s, m: sth.tl.predict_expression(s, m, key_added=None), TypeError, "key_added"),
    ("evaluate n_genes='50'", lambda s, m: sth.tl.evaluate(s, n_genes="50"), TypeError, "`n_genes` must be a pos"),
    ("evaluate n_genes=0", lambda s, m: sth.tl.evaluate(s, n_genes=0), ValueError, "`n_genes` must be a positive"),
    ("evaluate gene_sets=None", lambda s, m: sth.tl.evaluate(s, gene_sets=None), TypeError, "`gene_sets` must be"),
    ("evaluate predicted_key", lambda s, m: sth.tl.evaluate(s, predicted_key="x"), KeyError, "tables present"),
    ("evaluate predicted_key=None", lambda s, m: sth.tl.evaluate(s, predicted_key=None), TypeError, "table name"),
    ("evaluate layer", lambda s, m: sth.tl.evaluate(s, layer="counts"), KeyError, "layers present"),
    ("evaluate normalize='yes'", lambda s, m: sth.tl.evaluate(s, normalize="yes"), TypeError, "`normalize` must"),
    ("gene_correlation genes=None", lambda s, m: sth.tl.gene_correlation(s, genes=None), TypeError, "`genes` must"),
    ("gene_correlation sample", lambda s, m: sth.tl.gene_correlation(s, sample="C9"), KeyError, "C9"),
    ("gene_set name", lambda s, m: sth.tl.gene_set(s, "top"), ValueError, "Unknown gene set 'top'"),
    ("select_genes genes=5", lambda s, m: sth.pp.select_genes(s, genes=5), TypeError, "`genes` must be a name"),
    ("select_genes n_top='9'", lambda s, m: sth.pp.select_genes(s, n_top="9"), TypeError, "`n_top` must be"),
    ("select_genes table_key", lambda s, m: sth.pp.select_genes(s, table_key="x"), KeyError, "tables present"),
    ("spot_grid spacing_um='100'", lambda s, m: sth.pp.spot_grid(s, "C6_image", spacing_um="100"), TypeError, "str"),
    ("spot_grid spacing_um=-1", lambda s, m: sth.pp.spot_grid(s, "C6_image", spacing_um=-1), ValueError, "positive"),
    ("spot_grid image_key", lambda s, m: sth.pp.spot_grid(s, "C6"), KeyError, "Did you mean 'C6_image'"),
    ("spot_grid image_key=5", lambda s, m: sth.pp.spot_grid(s, 5), TypeError, r"images present: \['C6_image'"),
    ("patches size_um=-1", lambda s, m: sth.pp.extract_patches(s, size_um=-1), ValueError, "`size_um` must be"),
    ("patches size_um='112'", lambda s, m: sth.pp.extract_patches(s, size_um="112"), TypeError, "`size_um` must"),
    ("patches size_px=2.5", lambda s, m: sth.pp.extract_patches(s, size_px=2.5), ValueError, "`size_px` must"),
    ("patches context='x'", lambda s, m: sth.pp.extract_patches(s, context="x"), TypeError, "`context` must"),
    ("patches samples", lambda s, m: sth.pp.extract_patches(s, samples="C9"), ValueError, r"Unknown sample\(s\)"),
    ("split test unknown", lambda s, m: sth.pp.split_sections(s, test="C9"), ValueError, "Unknown sample id"),
    ("split test=None", lambda s, m: sth.pp.split_sections(s, test=None), TypeError, "`test` must be a name"),
    ("split table_key", lambda s, m: sth.pp.split_sections(s, test="C6", table_key="x"), KeyError, "tables present"),
    ("tissue min_area='1'", lambda s, m: sth.pp.detect_tissue(s, "C6_image", min_area_um2="1"), TypeError, "min_"),
    ("normalize target_sum=0", lambda s, m: sth.pp.normalize(s, target_sum=0), ValueError, "`target_sum` must"),
    ("cross_validate table_key", lambda s, m: sth.tl.cross_validate(s, table_key="x"), KeyError, "tables present"),
    ("cross_validate n_genes", lambda s, m: sth.tl.cross_validate(s, n_genes=0), ValueError, "`n_genes` must"),
    (
        "few_shot n_train_spots='50'",
        lambda s, m: sth.tl.few_shot(s, test="C6", presets=["mean"], n_train_spots="50"),
        TypeError,
        "`n_train_spots` must be a positive integer",
    ),
    ("score_tumor layer=1", lambda s, m: sth.tl.score_tumor(s, layer=1), TypeError, "`layer` must be"),
]


@pytest.mark.parametrize(
    ("call", "error", "match"), [case[1:] for case in _BAD_ARGUMENTS], ids=[case[0] for case in _BAD_ARGUMENTS]
)
def test_bad_arguments_give_clear_errors(predicted, model, call, error, match):
    before = dict(predicted.tables)
    with pytest.raises(error, match=match):
        call(predicted, model)
    assert dict(predicted.tables) == before  # nothing written or replaced


def test_a_single_marker_name_is_one_gene_not_its_letters(predicted):
    result = sth.tl.evaluate(predicted, gene_sets=["markers"], markers="ERBB2")
    assert result["summary"].loc["C6", "n_markers"] == 1
    sth.tl.score_tumor(predicted, markers="ERBB2")
    assert predicted.tables["predicted_expression"].uns["tumor_score"]["params"]["markers"] == ["ERBB2"]


# --------------------------------------------------------------------------------------------------------------------
# 6. predictions do not depend on batch size or row order
# --------------------------------------------------------------------------------------------------------------------
def test_predictions_independent_of_batch_size_and_row_order(split, model):
    test = split[1]
    by_batch = {}
    for batch_size in (1, 7, 64):
        sdata = _section(test)
        sth.tl.predict_expression(sdata, model, batch_size=batch_size, progress_bar=False)
        by_batch[batch_size] = sdata.tables["predicted_expression"]
    reference = by_batch[64]
    assert np.ptp(reference.X, axis=0).max() > 0.1  # spots are told apart
    for batch_size in (1, 7):
        np.testing.assert_allclose(by_batch[batch_size].X, reference.X, atol=1e-5, rtol=0)

    table = test.tables["table"]
    order = np.random.default_rng(1).permutation(table.n_obs)
    shuffled = _section(test, table[order])
    sth.tl.predict_expression(shuffled, model, batch_size=7, progress_bar=False)
    pred = shuffled.tables["predicted_expression"]
    assert list(pred.obs_names) == list(shuffled.tables["table"].obs_names)  # rows follow the input table
    ids = reference.obs["spot_id"].to_numpy().tolist()
    rows = [ids.index(i) for i in pred.obs["spot_id"]]
    np.testing.assert_allclose(pred.X, reference.X[rows], atol=1e-5, rtol=0)
    np.testing.assert_allclose(pred.obsm["spatial"], reference.obsm["spatial"][rows])


# --------------------------------------------------------------------------------------------------------------------
# 7. spot centres outside the image
# --------------------------------------------------------------------------------------------------------------------
def test_spots_outside_the_image_are_refused(split, model):
    table = split[1].tables["table"]
    width = split[1].images["C6_image"]["scale0"]["image"].shape[2]
    sdata = _section(split[1], table.copy())
    # spot centres come from the annotated circles: move three of them off the image
    circles = sdata.shapes["C6_spots"].copy()
    moved = circles.index.isin(table.obs["spot_id"].iloc[[3, 8, 40]])
    circles.loc[moved, "geometry"] = circles.geometry[moved].translate(xoff=width)
    sdata.shapes["C6_spots"] = circles
    with pytest.raises(ValueError, match=r"Sample 'C6': 3 of 60 spot centres lie outside the"):
        sth.pp.extract_patches(sdata)
    with pytest.raises(ValueError, match=r"Sample 'C6': 3 of 60 spot centres lie outside the"):
        sth.tl.predict_expression(sdata, model, progress_bar=False)
    assert "predicted_expression" not in sdata.tables


# --------------------------------------------------------------------------------------------------------------------
# more: NaN predictions, genes not measured, nothing left to train on, unknown resolution
# --------------------------------------------------------------------------------------------------------------------
def test_nan_predictions_are_refused(predicted):
    pred = predicted.tables["predicted_expression"]
    pred.X[5, 2] = np.nan
    with pytest.raises(ValueError, match="holds NaN or infinite predictions"):
        sth.tl.evaluate(predicted)
    with pytest.raises(ValueError, match=r"NaN or infinite values for marker\(s\)"):
        sth.tl.score_tumor(predicted, markers=[pred.var_names[2], "ERBB2"])


def test_predicted_genes_not_measured(predicted):
    with pytest.raises(KeyError, match=r"Gene\(s\) \['NOTAGENE'\] are not in both tables"):
        sth.tl.gene_correlation(predicted, genes=["ERBB2", "NOTAGENE"])
    pred = predicted.tables["predicted_expression"]
    pred.var_names = [f"NOT_{g}" for g in pred.var_names]
    with pytest.raises(ValueError, match="share no gene"):
        sth.tl.evaluate(predicted)


def test_split_leaving_no_training_section(split):
    with pytest.raises(ValueError, match=r"No section is left for training: \['C6'\]"):
        sth.pp.split_sections(split[1], test="C6")


def test_unknown_resolution_is_refused(split):
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    data = split[1].images["C6_image"]["scale0"]["image"].data
    image = Image2DModel.parse(data, dims=("c", "y", "x"))  # no micrometre transformation
    sdata = SpatialData(images={"C6_image": image}, tables={"table": split[1].tables["table"].copy()})
    with pytest.raises(ValueError, match=r"no transformation to the micrometre coordinate system 'C6'.*resolution"):
        sth.pp.extract_patches(sdata)


def test_prediction_table_with_a_spot_twice(predicted):
    pred = predicted.tables["predicted_expression"]
    predicted.tables["predicted_expression"] = pred[[0, 1, 2, 2]].copy()
    with pytest.raises(ValueError, match="annotates some spots twice"):
        sth.tl.evaluate(predicted)


def test_reference_must_be_spatialdata(split):
    sdata = _section(split[1])
    with pytest.raises(TypeError, match=r"`sth.tl.predict_expression\(reference=...\)` takes a SpatialData, got an An"):
        sth.tl.predict_expression(sdata, reference=split[0].tables["table"])
