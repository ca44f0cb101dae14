"""Accuracy on the six her2st sections: leave-one-patient-out first, then leave-one-section-out, at full and at 4.6x
lower image resolution.

Leave-one-patient-out (the headline: users predict new patients): every section of a patient is predicted by a model
trained on the other patients' sections (her2st: C2-C6 -> B4, and B4 -> each of C2-C6; one fit per held-out patient).
Leave-one-section-out: each section by a model trained on the five others (four of whose folds test a serial section of a
training patient). Every score is read next to the held-out section's count-noise ceiling (`sth.tl.noise_ceiling`) and
with the gene-gene structure metrics (`preservation`, `corr_abs_diff`, `moran_ratio`). For the default preset, the rows
`default:probe` and `default:network` score its ridge probe alone and its network alone (same fit; the blend weights are in
the `blend` column).

For each fold: genes are chosen on the training sections (union of per-section top-``n_top`` HVGs plus
the breast markers, kept if measured in the held-out section); every preset is trained on the other five sections
with the same epoch budget and seed, predicts the held-out section from its image, and predicts it again from a copy
of its image downsampled 4.6x (about 3.2 um per pixel, the resolution of a Visium "hires" image; the copy is written
as a JPEG and read back like any user file, its resolution inferred from the spot grid). Scores follow the package's
evaluation protocol (:func:`st_from_he.tl.evaluate`).

Run: ``python benchmarks/accuracy.py [--data ../shared/data/her2st] [--splits patient section] [--epochs 20] [--presets
default cmrc ridge ridge_encoder mean] [--sections C6 ...] [--merge]``. Prints a table and writes ``benchmarks/results/accuracy.md``
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
CEILINGS = ("ceiling_hvg", "ceiling_heg")
STRUCTURE = ("preservation", "corr_abs_diff", "moran_ratio")


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


def folds(sdata, data: Path, sections, n_top: int, split: str):
    """Per fold: the training sections, the held-out sections (each also read from a 4.6x smaller image), and the
    genes (chosen on the training sections, kept if measured in every held-out section)."""
    import st_from_he as sth

    table = sdata.tables["table"]
    patient_of = dict(zip(table.obs["sample"].astype(str), table.obs["patient"].astype(str), strict=False))
    if split == "patient":
        groups = {
            p: [s for s in sections if patient_of[s] == p] for p in dict.fromkeys(patient_of[s] for s in sections)
        }
    else:
        groups = {s: [s] for s in sections}
    with tempfile.TemporaryDirectory() as tmp:
        for held_out in groups.values():
            train, test = sth.pp.split_sections(sdata, test=held_out)
            measured = set(test.tables["table"].var_names)
            genes = [g for g in sth.pp.select_genes(train, n_top=n_top, markers=sth.tl.BREAST_MARKERS) if g in measured]
            tests = [
                (
                    s,
                    sth.pp.split_sections(test, test=[s])[1] if len(held_out) > 1 else test,
                    downsampled_section(data, s, DOWNSAMPLE, Path(tmp)),
                )
                for s in held_out
            ]
            yield train, tests, genes


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


def _parts(model) -> dict[str, dict[str, float]]:
    """The default's probe alone and its network alone, as blend weights (the network's own components renormalised)."""
    blend = model.blend or {}
    network = {k: w for k, w in blend.items() if k != "ridge"}
    total = sum(network.values())
    parts = {}
    if "ridge" in blend:
        parts["probe"] = {k: float(k == "ridge") for k in blend}
    if network:
        if total > 0:
            parts["network"] = {k: (w / total if k != "ridge" else 0.0) for k, w in blend.items()}
        else:  # the blend gave the network no weight: score its components equally
            parts["network"] = {k: (1.0 / len(network) if k != "ridge" else 0.0) for k in blend}
    return parts


def _score(target, section: str) -> dict:
    import st_from_he as sth

    summary = sth.tl.evaluate(target, predicted_key="pred")["summary"].loc[section]
    row = {s: summary[f"pcc_{s}"] for s in SETS}
    row |= {c: summary[c] for c in (*CEILINGS, *STRUCTURE, "n_constant", "n_genes")}
    return row


def run(args) -> pd.DataFrame:
    import st_from_he as sth

    data = Path(args.data)
    sdata = sth.datasets.her2st(path=data)
    started = time.strftime("%Y-%m-%d %H:%M")  # one stamp per run, for --merge
    rows = []
    for split in args.splits:
        for train, tests, genes in folds(sdata, data, args.sections, args.n_top, split):
            trained_on = ",".join(dict.fromkeys(train.tables["table"].obs["sample"].astype(str)))
            for preset in args.presets:
                model = sth.tl.ExpressionModel(genes, preset=preset)
                start = time.perf_counter()
                budget = {"max_epochs": args.epochs, "max_time": args.budget_s} if model.is_neural else {}
                model.fit(train, seed=args.seed, progress_bar=False, **budget)
                fit_s = time.perf_counter() - start
                blend = dict(model.blend or {})
                variants = {preset: blend} | {f"{preset}:{k}": w for k, w in _parts(model).items()}
                for section, test, small in tests:
                    for resolution, target in (("full", test), (f"{DOWNSAMPLE}x lower", small)):
                        for method, weights in variants.items():
                            model.blend = weights or model.blend
                            sth.tl.predict_expression(
                                target, model, key_added="pred", overwrite=True, progress_bar=False
                            )
                            row = {
                                "split": split,
                                "section": section,
                                "trained_on": trained_on,
                                "method": method,
                                "resolution": resolution,
                                "pixel_size_um": sth.pp.extract_patches(target).pixel_size_um[section],
                                "fit_s": fit_s,
                                "blend": " ".join(f"{k} {w:.1f}" for k, w in blend.items()),
                                "measured_at": started,
                            }
                            row |= _score(target, section)
                            if resolution == "full":
                                row |= _localization(target, section)
                            rows.append(row)
                            print(
                                f"{split:7s} {section} {method:16s} {resolution:10s} HVG {row['hvg']:.3f} "
                                f"(ceiling {row['ceiling_hvg']:.2f}) HEG {row['heg']:.3f} markers {row['markers']:.3f} "
                                f"fit {fit_s:.0f} s",
                                flush=True,
                            )
                        model.blend = blend
    return pd.DataFrame(rows)


def merge(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """``new`` plus the rows of ``old`` whose (section, method) pair ``new`` did not measure, in the old order."""
    old = old.copy()
    if "measured_at" not in old:
        old["measured_at"] = "an earlier run"
    if "split" not in old:
        old["split"] = "section"
    key = ["split", "section", "method"]
    remeasured = old.set_index(key).index.isin(new.set_index(key).index)
    order = {m: i for i, m in enumerate(dict.fromkeys([*old["method"], *new["method"]]))}
    merged = pd.concat([old[~remeasured], new], ignore_index=True)
    merged["_order"] = merged["method"].map(order)
    merged = merged.sort_values(["split", "section", "_order"], kind="stable")
    return merged.drop(columns="_order").reset_index(drop=True)


_SPLIT_TITLES = {
    "patient": "Leave-one-patient-out (a model never sees the held-out patient)",
    "section": "Leave-one-section-out (five of six folds test a serial section of a training patient)",
}


def _ratios(block: pd.DataFrame) -> list[str]:
    lines = []
    for resolution, res in block.groupby(level="resolution", sort=False):
        res = res.droplevel("resolution")
        baselines = res.drop(index=[m for m in res.index if m.split(":")[0] in ("default", "cmrc")])
        if "default" in res.index and len(baselines):
            best = baselines["hvg"].idxmax()
            ratio = res.loc["default", "hvg"] / baselines.loc[best, "hvg"]
            lines.append(
                f"- {resolution} resolution: default HVG PCC {res.loc['default', 'hvg']:.3f}"
                + (f" (ceiling {res.loc['default', 'ceiling_hvg']:.2f})" if "ceiling_hvg" in res else "")
                + f" vs best baseline `{best}` {baselines.loc[best, 'hvg']:.3f}: "
                f"ratio **{ratio:.2f}x**" + (f"; cmrc {res.loc['cmrc', 'hvg']:.3f}" if "cmrc" in res.index else "")
            )
    return lines


def report(df: pd.DataFrame, args) -> str:
    cols = [
        c
        for c in (*SETS, *CEILINGS, *STRUCTURE, "tumor_auroc", "tumor_auroc_measured", "fit_s")
        if c in df and df[c].notna().any()
    ]
    lines = [
        "# Accuracy",
        "",
        "Mean per-gene PCC between predicted and measured log1p(CP10k) expression across each held-out section's spots "
        "(HVG-50, HEG-50, breast markers, all genes of the panel), next to the count-noise ceiling of the same genes "
        "(`ceiling_*`: the PCC a perfect predictor of expected expression would reach against counts this noisy, from "
        "binomial split halves); gene-gene structure on the HEG: `preservation` (r between the measured and predicted "
        "correlation matrices), `corr_abs_diff` (their mean absolute difference) and `moran_ratio` (median Moran's I of "
        "predicted over measured genes: predictions are smoother than counts); tumour-localisation AUROC of the "
        "predicted marker score (ERBB2, GRB7, KRT19, KRT8, EPCAM, CD24) against the paper's 'cancer' expression clusters "
        "(a weak stand-in for pathologist labels, derived from the measured expression; `tumor_auroc_measured` is the "
        "score of the measured expression; full resolution only); fit time. `default:probe` and `default:network` are "
        "the default model's ridge probe alone and its network alone (same fit). Neural presets get the same compute "
        f"budget: at most {args.budget_s:g} s of training each ({args.epochs or 'the preset default'} epochs); seed "
        f"{args.seed}, 2 CPU threads.",
        "",
    ]
    for split in [s for s in ("patient", "section") if s in set(df.get("split", pd.Series(["section"])))]:
        part = df[df["split"] == split] if "split" in df else df
        mean = part.groupby(["resolution", "method"], sort=False)[cols].mean()
        lines += [f"## {_SPLIT_TITLES[split]}", "", "Mean over the held-out sections:", ""]
        lines += [mean.round(3).reset_index().to_markdown(index=False), "", *_ratios(mean), ""]
        has_blends = {"trained_on", "blend"} <= set(part)
        blends = (
            part[part["method"] == "default"].drop_duplicates("trained_on")[["trained_on", "blend"]]
            if has_blends
            else []
        )
        if len(blends):
            lines += ["Blend weights of the default model, per fit:", "", blends.to_markdown(index=False), ""]
        per = part[["section", "resolution", "method", *cols]]
        lines += ["Per section:", "", per.round(3).to_markdown(index=False), ""]
    lines += ["![mean PCC per gene set, method and resolution](accuracy.png)", ""]
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
    return "\n".join(lines)


def figure(df: pd.DataFrame, path: Path) -> None:
    """Mean PCC per gene set and method (dots: sections) at full resolution, one panel per split, with ``sth.pl.metrics``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import st_from_he as sth

    df = df.assign(split=df["split"] if "split" in df else "section")
    full = df[df["resolution"] == "full"]
    tidy = full.melt(
        id_vars=["split", "section", "method"], value_vars=list(SETS), var_name="gene_set", value_name="pearson"
    ).rename(columns={"section": "sample"})
    splits = [s for s in ("patient", "section") if s in set(tidy["split"])]
    fig, axes = plt.subplots(1, len(splits), figsize=(7 * len(splits), 4), sharey=True, layout="constrained")
    for ax, split in zip(np.atleast_1d(axes), splits, strict=True):
        title = _SPLIT_TITLES[split].split(" (")[0]
        sth.pl.metrics(tidy[tidy["split"] == split].drop(columns="split"), ax=ax, title=title, show=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    parser.add_argument("--sections", nargs="+", default=["B4", "C2", "C3", "C4", "C5", "C6"])
    parser.add_argument("--splits", nargs="+", default=["patient", "section"], choices=["patient", "section"])
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
