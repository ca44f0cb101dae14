"""Does neighbour attention help the default preset? The default with ``neighbour_attention`` on and off, same seed
and training budget, on the cross-patient fold (train C2-C6, test B4) and on one leave-one-section-out fold (train B4,
C2-C5, test C6) of her2st.

Neighbours are the spots of the same section within ``--radius`` micrometres (default 350: on the legacy ST grid,
200 um between spots with detection jitter, exactly the 8 around every interior spot), at most ``max_neighbours``
(8). Genes are chosen as in ``accuracy.py`` (union of per-section top-``n_top`` HVGs of the training sections plus the
breast markers, kept if measured in the test section). Each fit reports the blended prediction, the network alone
(regression head and retrieval, their blend weights renormalised) and the ridge probe alone (which does not see
neighbours: a control, identical in both runs of a seed), scored by :func:`st_from_he.tl.evaluate`. Both runs share
``--budget-s`` training seconds, so the neighbour model, whose steps also encode up to 8 neighbour patches per spot,
trains fewer epochs: the question is whether it helps at the same compute.

Run: ``python benchmarks/neighbours.py [--data ../shared/data/her2st] [--budget-s 150] [--seeds 0 1]``. Writes
``benchmarks/results/neighbours.csv`` and ``benchmarks/results/neighbours.md``; ``--from-csv A.csv B.csv`` only
rewrites them from earlier runs' CSVs (e.g. one per seed).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
FOLDS = {"patient (C2-C6 -> B4)": ["B4"], "section (B4, C2-C5 -> C6)": ["C6"]}
SCORES = ("pcc_hvg", "pcc_heg", "pcc_markers", "preservation", "corr_abs_diff", "moran_ratio")


def variants(blend: dict[str, float]) -> dict[str, dict[str, float]]:
    """The fitted blend, the network alone (its components renormalised) and the probe alone."""
    network = {k: w for k, w in blend.items() if k != "ridge"}
    total = sum(network.values())
    out = {"blend": blend}
    if network:
        out["network"] = {
            k: (w / total if total else 1 / len(network)) if k != "ridge" else 0.0 for k, w in blend.items()
        }
    if "ridge" in blend:
        out["probe"] = {k: float(k == "ridge") for k in blend}
    return out


def run(args) -> pd.DataFrame:
    import st_from_he as sth

    sdata = sth.datasets.her2st(path=args.data)
    rows = []
    for fold, held_out in FOLDS.items():
        train, test = sth.pp.split_sections(sdata, test=held_out)
        measured = set(test.tables["table"].var_names)
        genes = [
            g for g in sth.pp.select_genes(train, n_top=args.n_top, markers=sth.tl.BREAST_MARKERS) if g in measured
        ]
        for seed in args.seeds:
            for attention in (False, True):
                model = sth.tl.ExpressionModel(
                    genes, preset="default", neighbour_attention=attention, neighbour_radius_um=args.radius
                )
                start = time.perf_counter()
                model.fit(train, seed=seed, max_time=args.budget_s, progress_bar=False)
                fit_s = time.perf_counter() - start
                blend = dict(model.blend)
                for name, weights in variants(blend).items():
                    model.blend = weights
                    sth.tl.predict_expression(test, model, key_added="pred", overwrite=True, progress_bar=False)
                    summary = sth.tl.evaluate(test, predicted_key="pred")["summary"].loc[held_out[0]]
                    row = {
                        "fold": fold,
                        "seed": seed,
                        "neighbour_attention": attention,
                        "prediction": name,
                        "epochs": len(model.history),
                        "best_epoch": model.training_info["best_epoch"],
                        "fit_s": round(fit_s),
                        "blend": " ".join(f"{k} {w:.1f}" for k, w in blend.items()),
                        "n_genes": len(genes),
                    }
                    row |= {s: float(summary[s]) for s in SCORES}
                    rows.append(row)
                    print(
                        f"{fold:26s} seed {seed} attention {attention!s:5s} {name:8s} HVG {row['pcc_hvg']:.3f} "
                        f"HEG {row['pcc_heg']:.3f} markers {row['pcc_markers']:.3f} epochs {row['epochs']} "
                        f"fit {fit_s:.0f} s blend {row['blend']}",
                        flush=True,
                    )
                model.blend = blend
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean HVG/HEG/markers PCC over seeds per fold and prediction, attention off and on, and on minus off."""
    scores = ["pcc_hvg", "pcc_heg", "pcc_markers"]
    mean = df.groupby(["fold", "prediction", "neighbour_attention"])[scores].mean().unstack("neighbour_attention")
    out = pd.DataFrame(index=mean.index)
    for s in scores:
        out[f"{s} off"] = mean[(s, False)]
        out[f"{s} on"] = mean[(s, True)]
        out[f"{s} on - off"] = mean[(s, True)] - mean[(s, False)]
    epochs = df.groupby(["fold", "neighbour_attention"])["epochs"].mean().unstack("neighbour_attention")
    out["epochs off / on"] = [f"{epochs.loc[f, False]:.1f} / {epochs.loc[f, True]:.1f}" for f, _ in out.index]
    return out.reset_index()


def report(df: pd.DataFrame, args) -> str:
    table = df.copy()
    for s in SCORES:
        table[s] = table[s].map(lambda v: f"{v:.3f}")
    columns = ["fold", "seed", "neighbour_attention", "prediction", *SCORES, "epochs", "best_epoch", "fit_s", "blend"]
    genes = ", ".join(f"{f}: {n}" for f, n in df.groupby("fold", sort=False)["n_genes"].first().items())
    lines = [
        "# Neighbour attention in the default preset",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.processor() or platform.machine()} (CPU), "
        f"`python benchmarks/neighbours.py --budget-s {args.budget_s:g} --radius {args.radius:g} "
        f"--seeds {' '.join(map(str, sorted(df['seed'].unique())))}`: the default preset with `neighbour_attention` "
        "off and on "
        f"(`neighbour_radius_um={args.radius:g}`, `max_neighbours=8`), same seed and `max_time={args.budget_s:g}` s, "
        f"genes per fold (training-section HVGs + breast markers) {genes}. `network` is the "
        "regression head and retrieval alone, `probe` the ridge probe alone (it sees no neighbours: its change between "
        "the two runs would be noise of the split only; same seed, so none expected).",
        "",
        "Mean over seeds (PCC; `on - off` > 0: neighbour attention helps):",
        "",
        summary(df).to_markdown(index=False, floatfmt=".3f"),
        "",
        "Every fit:",
        "",
        table[columns].to_markdown(index=False),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    parser.add_argument("--budget-s", type=float, default=150, help="training seconds per fit")
    parser.add_argument("--radius", type=float, default=350.0, help="neighbour_radius_um")
    parser.add_argument("--n-top", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--from-csv", nargs="+", help="only rewrite the report from these CSVs (concatenated)")
    args = parser.parse_args()
    df = pd.concat([pd.read_csv(f) for f in args.from_csv]) if args.from_csv else run(args)
    out = Path(args.out)
    df.to_csv(out / "neighbours.csv", index=False)
    (out / "neighbours.md").write_text(report(df, args))
    print(report(df, args))


if __name__ == "__main__":
    main()
