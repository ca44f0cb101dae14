"""Gene-gene structure against accuracy: how the default probe's reduced rank, neighbour smoothing and a retrieval of
real training profiles move the HEG-50 correlation-matrix difference (``corr_abs_diff``) and the HVG-50 PCC, on the
leave-one-section-out folds (full resolution).

Reuses the feature cache of ``probe_variants.py`` (run it first) and its ``CachedProbe`` (the package's own
``RidgeProbe`` fed cached features, white balance and ``per_section="hybrid"`` as the default). Variants:

- ``rank``: the probe's reduced rank (30 in the default; ``None``: full-rank ridge);
- ``smoothing``: weight of the grid neighbours' mean (0.5 in the default);
- ``retrieval k``: the mean measured profile of the ``k`` training spots nearest in the probe's standardised feature
  space (real profiles, as the network's retrieval head returns), alone and blended half-half with the probe.

The target of the issue: HEG-50 ``corr_abs_diff`` <= 0.20 with HVG-50 PCC within 0.01 of the default's.

Run: ``python benchmarks/structure_tradeoff.py``; writes ``benchmarks/results/structure_tradeoff.md`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from accuracy import folds
from probe_variants import CachedProbe

HERE = Path(__file__).resolve().parent


def nearest_profiles(train_x: np.ndarray, test_x: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Mean target of the ``k`` training rows nearest to each test row (Euclidean, standardised features)."""
    from scipy.spatial import cKDTree

    _, idx = cKDTree(train_x).query(test_x, k=k)
    return targets[idx.reshape(len(test_x), -1)].mean(1)


def main(args) -> pd.DataFrame:
    import anndata as ad

    import st_from_he as sth
    from st_from_he.models import smooth_neighbours
    from st_from_he.tl._data import measured_targets

    cache_file = Path(tempfile.gettempdir()) / "probe_variants_features.pkl"
    if not cache_file.exists():
        raise SystemExit("Run benchmarks/probe_variants.py first: it caches the features this script reads.")
    cache = pd.read_pickle(cache_file)
    data = Path(args.data)
    sdata = sth.datasets.her2st(path=data)
    sections = ["B4", "C2", "C3", "C4", "C5", "C6"]
    rows = []
    for train, tests, genes in folds(sdata, data, sections, 1000, "section"):
        table = train.tables["table"]
        groups = table.obs["sample"].astype(str).to_numpy()
        targets = measured_targets(table, genes)
        parts = [cache[(s, "full", True)] for s in dict.fromkeys(groups)]
        feats = np.concatenate([p["x"] for p in parts])
        blurred = np.concatenate([p["blurred"] for p in parts])
        ((section, test, _),) = tests
        measured = test.tables["table"]
        cached = cache[(section, "full", True)]
        assert list(cached["obs_names"]) == list(measured.obs_names)
        predictions = {}
        for rank in (3, 10, 30, 100, None):
            probe = CachedProbe(feats, blurred, "hybrid")
            probe.rank = rank
            probe.fit(np.arange(len(feats)), targets, groups)
            pred, test_std = probe.predict_features(cached["x"], np.full(len(cached["x"]), section))
            predictions[("probe", rank)] = pred
            if rank == 30:
                train_std = probe.predict_features(feats, groups, min_section_spots=5)[1]
                for k in (5, 50):
                    retrieved = nearest_profiles(train_std, test_std, targets, k)
                    predictions[(f"retrieval k={k}", None)] = retrieved
                    predictions[(f"probe + retrieval k={k} (half each)", 30)] = 0.5 * pred + 0.5 * retrieved
        for (method, rank), pred in predictions.items():
            for smoothing in (0.0, 0.5):
                values = smooth_neighbours(pred, cached["spatial"], weight=smoothing)
                predicted = ad.AnnData(values, obs=measured.obs[["sample", "region", "spot_id"]].copy())
                predicted.var_names = genes
                summary = sth.tl.evaluate(measured, predicted=predicted)["summary"].loc[section]
                row = {
                    "section": section,
                    "method": method,
                    "rank": "full" if rank is None else rank,
                    "smoothing": smoothing,
                    "hvg": summary["pcc_hvg"],
                    "heg": summary["pcc_heg"],
                    "corr_abs_diff": summary["corr_abs_diff"],
                    "preservation": summary["preservation"],
                    "moran_ratio": summary["moran_ratio"],
                }
                rows.append(row)
                print(row, flush=True)
    return pd.DataFrame(rows)


def report(df: pd.DataFrame, out: Path) -> None:
    df.to_csv(out.with_suffix(".csv"), index=False)
    mean = df.groupby(["method", "rank", "smoothing"], sort=False)[
        ["hvg", "heg", "corr_abs_diff", "preservation", "moran_ratio"]
    ].mean()
    lines = [
        "# Gene-gene structure against accuracy (leave-one-section-out, six folds, full resolution)",
        "",
        __doc__,
        "",
        "Mean over the six held-out sections (HVG/HEG: mean per-gene PCC of 50 genes; `corr_abs_diff`,",
        "`preservation`, `moran_ratio`: on the HEG-50):",
        "",
        mean.round(3).to_markdown(),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    parser.add_argument("--out", default=str(HERE / "results" / "structure_tradeoff"))
    parser.add_argument("--from-csv", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    report(pd.read_csv(out.with_suffix(".csv")) if args.from_csv else main(args), out)
