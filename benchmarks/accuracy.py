"""Leave-one-section-out accuracy on the six her2st sections, at full and at 4.6x lower image resolution.

For each held-out section: genes are chosen on the training sections (union of per-section top-``n_top`` HVGs plus
the breast markers, kept if measured in the held-out section); every preset is trained on the other five sections
with the same epoch budget and seed, predicts the held-out section from its image, and predicts it again from a copy
of its image downsampled 4.6x (about 3.2 um per pixel, the resolution of a Visium "hires" image; the copy is written
as a JPEG and read back like any user file, its resolution inferred from the spot grid). Scores follow the package's
evaluation protocol (:func:`st_from_he.tl.evaluate`).

Run: ``python benchmarks/accuracy.py [--data ../shared/data/her2st] [--epochs 20] [--presets default cmrc ridge
ridge_encoder mean] [--sections C6 ...] [--merge]``. Prints a table and writes ``benchmarks/results/accuracy.md``
and ``benchmarks/results/accuracy.csv``. With ``--merge`` the rows of the presets run replace theirs in the existing
CSV and the other presets' rows are kept (for re-running only a preset whose code changed); every row records when
it was measured (``measured_at``) and the report lists the runs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
DOWNSAMPLE = 4.6
SETS = ("hvg", "heg", "markers", "all")


def downsampled_section(data: Path, section: str, factor: float, folder: Path):
    """The section read from a copy of its files whose image is ``factor`` times smaller (spot pixels scaled)."""
    from PIL import Image

    import st_from_he as sth

    Image.MAX_IMAGE_PIXELS = None
    src = data / section
    with Image.open(src / f"{section}_HE.jpg") as im:
        small = im.resize((round(im.width / factor), round(im.height / factor)), Image.LANCZOS)
        sx, sy = small.width / im.width, small.height / im.height
    small.save(folder / f"{section}_HE.jpg", quality=90)
    spots = pd.read_csv(src / f"{section}_spots.tsv", sep="\t")
    spots["pixel_x"] *= sx
    spots["pixel_y"] *= sy
    spots.to_csv(folder / f"{section}_spots.tsv", sep="\t", index=False)
    return sth.io.read_st(
        src / f"{section}_counts.tsv.gz",
        folder / f"{section}_spots.tsv",
        folder / f"{section}_HE.jpg",
        sample_id=section,
    )


def folds(sdata, data: Path, sections, n_top: int):
    """Per held-out section: the training and test sections, the test section read from a 4.6x smaller image, and
    the genes (chosen on the training sections, kept if measured in the test section)."""
    import st_from_he as sth

    with tempfile.TemporaryDirectory() as tmp:
        for section in sections:
            train, test = sth.pp.split_sections(sdata, test=[section])
            small = downsampled_section(data, section, DOWNSAMPLE, Path(tmp))
            measured = set(test.tables["table"].var_names)
            markers = sth.tl.BREAST_MARKERS
            genes = [g for g in sth.pp.select_genes(train, n_top=n_top, markers=markers) if g in measured]
            yield section, train, test, small, genes


def _localization(sdata, section: str) -> dict:
    """Tumour AUROC of the predicted marker score against the paper's "cancer" expression clusters (weak labels)."""
    import st_from_he as sth

    obs = sdata.tables["table"].obs
    if "expression_cluster_label" not in obs:
        return {}
    labels = obs["expression_cluster_label"].astype(str).str.contains("cancer")
    sth.tl.score_tumor(sdata, table_key="pred", overwrite=True)
    res = sth.tl.evaluate_localization(sdata, labels, predicted_key="pred").loc[section]
    return {"tumor_auroc": res["auroc"], "tumor_auroc_measured": res["auroc_measured"]}


def run(args) -> pd.DataFrame:
    import st_from_he as sth

    data = Path(args.data)
    sdata = sth.datasets.her2st(path=data)
    started = time.strftime("%Y-%m-%d %H:%M")  # one stamp per run, for --merge
    rows = []
    for section, train, test, small, genes in folds(sdata, data, args.sections, args.n_top):
        for preset in args.presets:
            model = sth.tl.ExpressionModel(genes, preset=preset)
            start = time.perf_counter()
            budget = {"max_epochs": args.epochs, "max_time": args.budget_s} if model.is_neural else {}
            model.fit(train, seed=args.seed, progress_bar=False, **budget)
            fit_s = time.perf_counter() - start
            for resolution, target in (("full", test), (f"{DOWNSAMPLE}x lower", small)):
                sth.tl.predict_expression(target, model, key_added="pred", overwrite=True, progress_bar=False)
                summary = sth.tl.evaluate(target, predicted_key="pred")["summary"].loc[section]
                row = {
                    "section": section,
                    "method": preset,
                    "resolution": resolution,
                    "pixel_size_um": sth.pp.extract_patches(target).pixel_size_um[section],
                    "fit_s": fit_s,
                    "measured_at": started,
                    "preservation": summary["preservation"],
                    "n_constant": summary["n_constant"],
                    "n_genes": summary["n_genes"],
                }
                row |= {s: summary[f"pcc_{s}"] for s in SETS}
                row |= _localization(target, section)
                rows.append(row)
                print(
                    f"{section} {preset:14s} {resolution:10s} HVG {row['hvg']:.3f} HEG {row['heg']:.3f} "
                    f"markers {row['markers']:.3f} fit {fit_s:.0f} s",
                    flush=True,
                )
    return pd.DataFrame(rows)


def merge(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """``new`` plus the rows of ``old`` whose (section, method) pair ``new`` did not measure, in the old order."""
    old = old.copy()
    if "measured_at" not in old:
        old["measured_at"] = "an earlier run"
    key = ["section", "method"]
    remeasured = old.set_index(key).index.isin(new.set_index(key).index)
    order = {m: i for i, m in enumerate(dict.fromkeys([*old["method"], *new["method"]]))}
    merged = pd.concat([old[~remeasured], new], ignore_index=True)
    merged["_order"] = merged["method"].map(order)
    return merged.sort_values(["section", "_order"], kind="stable").drop(columns="_order").reset_index(drop=True)


def report(df: pd.DataFrame, args) -> str:
    cols = [c for c in (*SETS, "preservation", "tumor_auroc", "tumor_auroc_measured", "fit_s") if c in df]
    mean = df.groupby(["resolution", "method"], sort=False)[cols].mean()
    lines = [
        "# Accuracy",
        "",
        f"Leave-one-section-out over her2st sections {', '.join(args.sections)}; mean per-gene PCC between predicted "
        f"and measured log1p(CP10k) expression across each held-out section's spots (HVG-50, HEG-50, breast markers, "
        f"all genes of the panel), gene-gene correlation preservation on the HEG, tumour-localisation AUROC of the "
        f"predicted marker score (ERBB2, GRB7, KRT19, KRT8, EPCAM, CD24) against the paper's 'cancer' expression "
        f"clusters (a weak stand-in for pathologist labels: the clusters come from the measured expression itself; "
        f"`tumor_auroc_measured` is the same score on measured expression, the upper bound; computed at full resolution only, since the downsampled copy is read without the cluster file), and fit time. Neural "
        f"presets get the same compute budget: at most {args.budget_s:g} s of training each (and "
        f"{args.epochs or 'the preset default'} epochs, early stopping on validation loss); seed {args.seed}, 2 CPU "
        f"threads. Mean over the held-out sections:",
        "",
        mean.round(3).reset_index().to_markdown(index=False),
        "",
        "![mean PCC per gene set, method and resolution](accuracy.png)",
        "",
    ]
    if "measured_at" in df and df["measured_at"].nunique() > 1:
        runs = df.groupby("measured_at", sort=True)["method"].unique()
        lines += [
            "Rows come from more than one run (`--merge`): "
            + "; ".join(
                f"{', '.join(sorted(m))} measured {'on' if when[:1].isdigit() else 'in'} {when}"
                for when, m in runs.items()
            )
            + ".",
            "",
        ]
    for resolution, block in mean.groupby(level="resolution", sort=False):
        block = block.droplevel("resolution")
        baselines = block.drop(index=[m for m in ("default", "cmrc") if m in block.index])
        if "default" in block.index and len(baselines):
            best = baselines["hvg"].idxmax()
            ratio = block.loc["default", "hvg"] / baselines.loc[best, "hvg"]
            lines.append(
                f"- {resolution} resolution: default HVG PCC {block.loc['default', 'hvg']:.3f} vs best "
                f"baseline `{best}` {baselines.loc[best, 'hvg']:.3f}: ratio **{ratio:.2f}x** (target 1.3x)"
                + (f"; cmrc {block.loc['cmrc', 'hvg']:.3f}" if "cmrc" in block.index else "")
            )
    lines += [
        "",
        "Per section:",
        "",
        df[["section", "resolution", "method", *cols]].round(3).to_markdown(index=False),
        "",
    ]
    return "\n".join(lines)


def figure(df: pd.DataFrame, path: Path) -> None:
    """Mean PCC per gene set and method (dots: sections), at full and at lower resolution, with ``sth.pl.metrics``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import st_from_he as sth

    tidy = df.melt(
        id_vars=["section", "method", "resolution"], value_vars=list(SETS), var_name="gene_set", value_name="pearson"
    ).rename(columns={"section": "sample"})
    resolutions = list(dict.fromkeys(tidy["resolution"]))
    fig, axes = plt.subplots(
        1, len(resolutions), figsize=(6.5 * len(resolutions), 4), sharey=True, layout="constrained"
    )
    for ax, resolution in zip(np.atleast_1d(axes), resolutions, strict=True):
        sth.pl.metrics(tidy[tidy["resolution"] == resolution], ax=ax, title=f"{resolution} resolution")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    parser.add_argument("--sections", nargs="+", default=["B4", "C2", "C3", "C4", "C5", "C6"])
    parser.add_argument("--presets", nargs="+", default=["default", "cmrc", "ridge", "ridge_encoder", "mean"])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=180, help="training seconds per neural preset and fold")
    parser.add_argument("--n-top", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--from-csv", action="store_true", help="only rewrite the report and figure from the CSV")
    parser.add_argument("--merge", action="store_true", help="keep the existing CSV's rows of presets not run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    if args.from_csv:
        df = pd.read_csv(out / "accuracy.csv")
        args.sections = list(dict.fromkeys(df["section"]))
    else:
        import torch

        torch.set_num_threads(2)
        df = run(args)
        if args.merge and (out / "accuracy.csv").exists():
            df = merge(pd.read_csv(out / "accuracy.csv"), df)
            args.sections = list(dict.fromkeys(df["section"]))
        df.to_csv(out / "accuracy.csv", index=False)
    figure(df, out / "accuracy.png")
    text = report(df, args)
    print(text)
    (out / "accuracy.md").write_text(text)


if __name__ == "__main__":
    main()
