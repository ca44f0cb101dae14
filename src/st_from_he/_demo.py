"""The main job: train on real her2st sections, predict a held-out section, score it against a baseline, draw it."""

from __future__ import annotations

import os
import shutil
import time
import uuid
import warnings
from pathlib import Path

from ._logging import logger

# `--quick`: the network trains for this many seconds (its best weights kept) on a smaller gene panel, for a look at
# the whole job in about two minutes; the ridge probe, most of the default's accuracy, is fitted in full either way.
QUICK_MAX_TIME_S = 20
QUICK_N_TOP = 200


def run_demo(
    *, data=None, out="st_from_he_demo", test="C6", epochs=None, preset="default", n_top=1000, seed=0, quick=False
):
    """Train ``preset`` on every her2st section but ``test``, predict ``test``, print scores, write figures.

    The model is compared with ridge regression on hand-crafted colour/texture features fitted on the same spots,
    under the evaluation protocol (per-gene PCC over the held-out section's spots; HEG/HVG chosen on its measured
    data). Figures (PNG), the scores (CSV) and the predictions (zarr) go to ``out``. ``quick``: the network trains
    for :data:`QUICK_MAX_TIME_S` seconds on the top :data:`QUICK_N_TOP` genes per section (a two-minute look; its
    scores are lower than the full demo's).
    """
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    import st_from_he as sth
    from st_from_he.tl import BREAST_MARKERS

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    max_time = None
    if quick:
        max_time, n_top = QUICK_MAX_TIME_S, min(n_top, QUICK_N_TOP)
        logger.info("Quick demo: %d s of network training, top %d genes per section", max_time, n_top)
    sdata = sth.datasets.her2st(path=data)
    train, held_out = sth.pp.split_sections(sdata, test=[test])
    genes = sth.pp.select_genes(train, n_top=n_top, markers=BREAST_MARKERS)
    logger.info("Gene panel: %d genes (union of per-section top-%d HVGs plus markers)", len(genes), n_top)

    results, models = {}, {}
    for name, key in ((preset, "predicted_expression"), ("ridge", "predicted_ridge")):
        t0 = time.perf_counter()
        model = sth.tl.ExpressionModel(genes, preset=name)
        model.fit(train, max_epochs=epochs, max_time=max_time if name == preset else None, seed=seed)
        fit_s = time.perf_counter() - t0
        sth.tl.predict_expression(held_out, model, key_added=key)
        scores = sth.tl.evaluate(held_out, predicted_key=key)["summary"]
        scores.insert(0, "fit_seconds", round(fit_s, 1))
        results[name], models[name] = scores, model

    table = pd.concat(results, names=["method"]).reset_index()
    columns = [
        "method",
        "sample",
        "pcc_hvg",
        "pcc_heg",
        "pcc_markers",
        "pcc_all",
        "n_constant",
        "preservation",
        "fit_seconds",
    ]
    table = table[[c for c in columns if c in table]]
    table.to_csv(out / "scores.csv", index=False)
    print(f"\nHeld-out section {test}: mean per-gene PCC (HVG-50 / HEG-50 / markers / all genes)\n")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))

    markers = [g for g in ("ERBB2", "KRT19", "COL1A1", "CD74") if g in genes]
    sth.pl.predicted_vs_measured(held_out, markers, save=out / "predicted_vs_measured.png", show=False)
    sth.pl.gene_correlation(held_out, genes="heg", save=out / "gene_correlation.png", show=False)
    if models[preset].history is not None:
        sth.pl.training_history(models[preset], save=out / "training_history.png", show=False)
    _write_predictions(held_out, out / "predictions.zarr")
    models[preset].save(out / "model", overwrite=True)
    print(f"\nFigures, scores, predictions and the model are in {out}/ ({time.perf_counter() - start:.0f} s in all)")


def _write_predictions(sdata, path: Path) -> None:
    """The held-out spots and all tables (measured and predicted) to zarr, atomically; images are not copied."""
    import spatialdata as sd

    light = sd.SpatialData(shapes=dict(sdata.shapes), tables=dict(sdata.tables))
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with warnings.catch_warnings():  # zarr's notice of a future default, printed once per array: noise here
            warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
            light.write(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
