"""The default probe's blob features filtered on an image pyramid against the full-resolution filters: accuracy on
the folds of ``accuracy.py`` (full and 4.6x lower resolution) and the features' speed, measured in the same run.

``full``: every Laplacian-of-Gaussian width (1.5, 3, 6 px) filtered on the patch's own stain image (the probe up to
issue 16). ``pyramid``: the wider two on the stain image block-averaged 2x and 4x, at 1.5 px of that level (the
default since). Everything else is the default's probe: white balance, ``per_section="hybrid"``, rank 30, low-resolution
copies in training (``lowres=4``), predictions smoothed over grid neighbours (weight 0.5). Scores: HVG-50 mean PCC per
held-out section (:func:`st_from_he.tl.evaluate`). Speed: the probe's features of the 178 spots of C6 (both context
scales) on 2 threads, best of 10 for each side, alternating; and how closely the two sides' blob columns agree.

Run: ``python benchmarks/blob_filters.py [--data ../shared/data/her2st]``; writes ``benchmarks/results/blob_filters.md``
and ``.csv``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from accuracy import DOWNSAMPLE, downsampled_section
from probe_variants import held_out_scores, section_features

HERE = Path(__file__).resolve().parent
FILTERS = ("full", "pyramid")
SECTIONS = ["B4", "C2", "C3", "C4", "C5", "C6"]


def _probe(filters: str, features=None, blurred=None):
    """The default's probe; with ``features``/``blurred`` given, one that looks its features up by row."""
    from st_from_he.tl._baselines import RidgeProbe

    kwargs = {"per_section": "hybrid", "rank": 30, "lowres": 4.0, "seed": 0, "blob_filters": filters}
    if features is None:
        return RidgeProbe("handcrafted+blobs", white_balance=True, **kwargs)

    class Cached(RidgeProbe):
        def _features(self, rows, glass=None, batch_size=64, device="cpu"):
            return features[rows]

        def _blurred_features(self, rows, glass=None, batch_size=256, device="cpu"):
            return blurred[rows]

    return Cached("handcrafted+blobs", **kwargs)  # the cached features are white-balanced already


def speed(sdata) -> dict:
    """Seconds for the probe's features of C6 with each filter set (best of 10, alternating), and their agreement."""
    import torch

    import st_from_he as sth
    from st_from_he.models._handcrafted import N_BLOB, N_HANDCRAFTED

    torch.set_num_threads(2)
    patches = sth.pp.extract_patches(sdata, size_um=112, size_px=112, context=(1.0, 3.0), samples=["C6"])
    x, glass = patches.to_numpy(), patches.glass_per_spot()
    probes = {f: _probe(f) for f in FILTERS}
    best = dict.fromkeys(FILTERS, np.inf)
    for _ in range(10):
        for f in FILTERS:
            start = time.perf_counter()
            probes[f].featurize(x, glass)
            best[f] = min(best[f], time.perf_counter() - start)
    a, b = (probes[f].featurize(x, glass)[:, 2 * N_HANDCRAFTED :] for f in FILTERS)
    r = [np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(2 * N_BLOB)]
    return {"spots": len(x), **{f"{f}_s": best[f] for f in FILTERS}, "min_r": min(r), "median_r": np.median(r)}


def accuracy(data: Path) -> pd.DataFrame:
    import st_from_he as sth

    sdata = sth.datasets.her2st(path=data)
    cache = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in SECTIONS:
            small = downsampled_section(data, s, DOWNSAMPLE, Path(tmp))
            single = sth.pp.split_sections(sdata, test=[s])[1]
            for f in FILTERS:
                cache[(s, "full", f)] = section_features(single, s, _probe(f))
                cache[(s, "low", f)] = section_features(small, s, _probe(f), blurred=False)
            print("features", s, flush=True)
    variants = [({"filters": f}, f, lambda x, b, f=f: _probe(f, x, b)) for f in FILTERS]
    return held_out_scores(sdata, data, SECTIONS, cache, variants)


def report(df: pd.DataFrame, timing: dict, out: Path) -> str:
    df.to_csv(out.with_suffix(".csv"), index=False)
    folds_of = {
        "C->B4": (df["split"] == "patient") & (df["section"] == "B4"),
        "B4->C (mean)": (df["split"] == "patient") & (df["section"] != "B4"),
        "LOSO C (mean)": (df["split"] == "section") & (df["section"] != "B4"),
        "LOSO 6-fold (mean)": df["split"] == "section",
    }
    table = pd.DataFrame(
        {name: df[rows].groupby(["filters", "resolution"])["hvg"].mean() for name, rows in folds_of.items()}
    )
    lines = ["# Blob filters of the default probe: image pyramid against full resolution", "", __doc__, ""]
    lines += ["HVG-50 mean PCC:", "", table.round(3).to_markdown(), ""]
    lines += [
        f"Features of the {timing['spots']} spots of C6 (2 threads, best of 10): full {timing['full_s']:.3f} s, "
        f"pyramid {timing['pyramid_s']:.3f} s ({timing['full_s'] / timing['pyramid_s']:.2f}x). Correlation of each "
        f"blob column between the two, over these spots: median {timing['median_r']:.4f}, lowest {timing['min_r']:.4f}.",
        "",
    ]
    text = "\n".join(lines)
    out.with_suffix(".md").write_text(text)
    return text


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    parser.add_argument("--out", default=str(HERE / "results" / "blob_filters"))
    args = parser.parse_args()
    import st_from_he as sth

    data = Path(args.data)
    timing = speed(sth.datasets.her2st(["C6"], path=data))
    print(timing, flush=True)
    print(report(accuracy(data), timing, Path(args.out)))
