"""The main job (``python -m st_from_he demo``): its command line, and a whole run on the real sections."""

from __future__ import annotations

import pandas as pd
import pytest

from st_from_he import _demo
from st_from_he.__main__ import main


def test_command_line_passes_options(monkeypatch):
    seen = {}
    monkeypatch.setattr(_demo, "run_demo", lambda **kwargs: seen.update(kwargs))
    assert main(["demo", "--data", "somewhere", "--out", "there", "--quick", "--test", "C5"]) == 0
    assert seen["quick"] is True and seen["data"] == "somewhere" and seen["out"] == "there" and seen["test"] == "C5"
    main(["demo"])
    assert seen["quick"] is False and seen["preset"] == "default" and seen["n_top"] == 1000


def test_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["train"])
    assert "invalid choice" in capsys.readouterr().err


def test_quick_demo_writes_scores_figures_and_predictions(her2st_dir, tmp_path):
    # the ridge preset keeps the whole job (data, split, genes, two fits, evaluation, figures, zarr, model) to seconds
    _demo.run_demo(data=her2st_dir, out=tmp_path, test="C6", preset="ridge", quick=True)
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert list(scores["method"]) == ["ridge"]  # the model and the baseline are the same preset here
    assert (scores["sample"] == "C6").all() and scores["pcc_hvg"].between(-1, 1).all()
    assert scores["pcc_hvg"].notna().all()
    for figure in ("predicted_vs_measured.png", "gene_correlation.png"):
        assert (tmp_path / figure).stat().st_size > 10_000
    import spatialdata as sd

    written = sd.read_zarr(tmp_path / "predictions.zarr")
    assert {"predicted_expression", "predicted_ridge", "table"} <= set(written.tables)
    assert written.tables["predicted_expression"].n_vars < 1000  # the quick panel: top 200 per section + markers
    assert (tmp_path / "model").is_dir()
