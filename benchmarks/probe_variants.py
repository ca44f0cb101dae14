"""How the default's ridge probe standardises features, on the folds of ``accuracy.py``, at full and at 4.6x lower
resolution: a fast harness on cached features (the package's own ``RidgeProbe.fit``/``predict_features``, fed
features computed once per section).

Variants: ``zscore`` (each section's features z-scored: the probe before the cross-patient work), ``centre`` (each
section centred, pooled training scale: the current default), ``hybrid`` (colour and composition features centred,
resolution-dependent ones, texture and blobs, z-scored), each with and without white balance; predictions smoothed
over grid neighbours (weight 0.5) as the default does. Scores: HVG-50 mean PCC per held-out section (evaluation
protocol of ``sth.tl.evaluate``).

Run: ``python benchmarks/probe_variants.py [--data ../shared/data/her2st]``; writes
``benchmarks/results/probe_variants.md`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from accuracy import DOWNSAMPLE, downsampled_section, folds

HERE = Path(__file__).resolve().parent
# Columns of handcrafted_features per context scale: 25 colour statistics (RGB, H, E), 4 composition (tissue and
# nuclear fraction, mean H and E in tissue), then the blob count and 6 texture energies (resolution-dependent).
_PER_SCALE, _COLOUR_COMPOSITION = 36, 29
_SCALES = 2  # context (1, 3)
_BLOBS = 12


def resolution_dependent() -> np.ndarray:
    """Mask of the handcrafted+blobs feature columns that blur changes by design (texture, blob sizes)."""
    hand = np.zeros(_PER_SCALE, bool)
    hand[_COLOUR_COMPOSITION:] = True
    return np.concatenate([np.tile(hand, _SCALES), np.ones(_BLOBS * _SCALES, bool)])


def section_features(sdata, section: str, probe, blurred: bool = True) -> dict:
    """Features (and blurred copies' features) of one section's spots as ``probe`` (a ``RidgeProbe``) computes them."""
    import st_from_he as sth

    patches = sth.pp.extract_patches(sdata, size_um=112, size_px=112, context=(1.0, 3.0), samples=[section])
    x = patches.to_numpy()
    glass = patches.glass_per_spot() if probe.white_balance else None
    out = {"x": probe.featurize(x, glass), "spatial": patches.spatial, "obs_names": patches.obs_names}
    if blurred:
        out["blurred"] = probe._blurred_features(x, glass)
    return out


class CachedProbe:
    """A ``RidgeProbe`` whose features are looked up from a cache by row, with a choice of standardisation."""

    def __new__(cls, features, blurred, mode: str):
        from st_from_he.tl._baselines import RidgeProbe, _standardise_sections

        per_section = "zscore" if mode == "zscore" else "centre"

        class Probe(RidgeProbe):
            def _features(self, rows, glass=None, batch_size=64):
                return features[rows]

            def _blurred_features(self, rows, glass=None, batch_size=256):
                return blurred[rows]

            def _standardise(self, x, groups, min_spots, state):
                pooled = state["pooled_mean"], state["pooled_std"]
                centred = _standardise_sections(x, groups, min_spots, *pooled, centre_only=True)
                if mode != "hybrid":
                    return _standardise_sections(x, groups, min_spots, *pooled, centre_only=mode == "centre")
                z = _standardise_sections(x, groups, min_spots, *pooled)
                mask = resolution_dependent()
                return np.where(mask, z, centred)

        return Probe("handcrafted+blobs", per_section=per_section, rank=30, lowres=4.0)


def main(args) -> pd.DataFrame:

    import st_from_he as sth
    from st_from_he.tl._baselines import RidgeProbe

    data = Path(args.data)
    sdata = sth.datasets.her2st(path=data)
    sections = ["B4", "C2", "C3", "C4", "C5", "C6"]
    cache: dict = {}
    cached = Path(tempfile.gettempdir()) / "probe_variants_features.pkl"  # features take minutes: reused on a rerun
    if cached.exists():
        cache = pd.read_pickle(cached)
    with tempfile.TemporaryDirectory() as tmp:
        for s in sections if not cache else ():
            small = downsampled_section(data, s, DOWNSAMPLE, Path(tmp))
            single = sth.pp.split_sections(sdata, test=[s])[1]
            for wb in (False, True):
                probe = RidgeProbe("handcrafted+blobs", white_balance=wb, lowres=4.0, seed=0)
                cache[(s, "full", wb)] = section_features(single, s, probe)
                cache[(s, "low", wb)] = section_features(small, s, probe, blurred=False)
            print("features", s, flush=True)
    pd.to_pickle(cache, cached)
    variants = [
        ({"white_balance": wb, "mode": mode}, wb, lambda f, b, mode=mode: CachedProbe(f, b, mode))
        for wb in (False, True)
        for mode in ("zscore", "centre", "hybrid")
    ]
    return held_out_scores(sdata, data, sections, cache, variants)


def held_out_scores(sdata, data: Path, sections: list[str], cache: dict, variants: list) -> pd.DataFrame:
    """HVG and HEG PCC of every held-out section of the folds of ``accuracy.py``, for each probe variant.

    ``cache[(section, resolution, tag)]``: a section's cached features (``section_features``) at ``"full"`` and
    ``"low"`` resolution. ``variants``: ``(labels, tag, make_probe)``, where ``make_probe(features, blurred)`` gives
    a probe that looks the training rows' features up, fitted on the features of ``tag``; ``labels`` go into its rows.
    Predictions are smoothed over grid neighbours (weight 0.5), as the default does.
    """
    import anndata as ad

    import st_from_he as sth
    from st_from_he.models import smooth_neighbours
    from st_from_he.tl._data import measured_targets

    rows = []
    for split in ("patient", "section"):
        for train, tests, genes in folds(sdata, data, sections, 1000, split):
            table = train.tables["table"]
            groups = table.obs["sample"].astype(str).to_numpy()
            targets = measured_targets(table, genes)
            for labels, tag, make_probe in variants:
                parts = [cache[(s, "full", tag)] for s in dict.fromkeys(groups)]
                assert list(table.obs_names) == [n for p in parts for n in p["obs_names"]]
                feats = np.concatenate([p["x"] for p in parts])
                blurred = np.concatenate([p["blurred"] for p in parts])
                probe = make_probe(feats, blurred).fit(np.arange(len(feats)), targets, groups)
                for section, test, _ in tests:
                    measured = test.tables["table"]
                    for resolution in ("full", "low"):
                        cached = cache[(section, resolution, tag)]
                        assert list(cached["obs_names"]) == list(measured.obs_names)
                        x, spatial = cached["x"], cached["spatial"]
                        pred = probe.predict_features(x, np.full(len(x), section))[0]
                        pred = smooth_neighbours(pred, spatial, weight=0.5)
                        predicted = ad.AnnData(pred, obs=measured.obs[["sample", "region", "spot_id"]].copy())
                        predicted.var_names = genes
                        summary = sth.tl.evaluate(measured, predicted=predicted)["summary"].loc[section]
                        row = {"split": split, "section": section, **labels, "resolution": resolution}
                        rows.append(row | {"hvg": summary["pcc_hvg"], "heg": summary["pcc_heg"]})
                        print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def report(df: pd.DataFrame, out: Path) -> None:
    df.to_csv(out.with_suffix(".csv"), index=False)
    lines = ["# Standardisation of the default's probe features, full and 4.6x lower resolution", "", __doc__, ""]
    folds_of = {
        "C->B4": (df["split"] == "patient") & (df["section"] == "B4"),
        "B4->C (mean)": (df["split"] == "patient") & (df["section"] != "B4"),
        "LOSO C (mean)": (df["split"] == "section") & (df["section"] != "B4"),
        "LOSO 6-fold (mean)": df["split"] == "section",
    }
    table = {}
    for name, rows in folds_of.items():
        table[name] = df[rows].groupby(["white_balance", "mode", "resolution"])["hvg"].mean()
    table = pd.DataFrame(table).round(3)
    lines += ["HVG-50 mean PCC:", "", table.to_markdown(), ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    parser.add_argument("--out", default=str(HERE / "results" / "probe_variants"))
    parser.add_argument("--from-csv", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    report(pd.read_csv(out.with_suffix(".csv")) if args.from_csv else main(args), out)
