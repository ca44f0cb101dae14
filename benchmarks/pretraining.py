"""Does self-supervised pretraining of the encoder on unlabeled H&E tiles help on new patients?

Two arms with the same seed, genes and training budget, on the cross-patient folds of her2st (patient B: section B4;
patient C: serial sections C2-C6):

- ``random``: the encoder starts from a random initialisation (what the presets do without weights);
- ``pretrained``: the encoder starts from weights of :func:`st_from_he.tl.pretrain_encoder`, trained by masked image
  modelling on tissue tiles of ALL six slides, without labels. The held-out patient's slide is among them: that is
  the intended use (the new patient's H&E image is there, its expression is not), and no expression is read.

Folds (leave one patient out): train C2-C6 -> test B4; train B4 -> test C6 (and the other C sections, which cost one
prediction each). Presets: ``ridge_encoder`` with the default preset's encoder (``sth_tinycnn`` at 112 px for 112 um,
frozen, pooled features + ridge; cheap) and ``default`` (the network is trained from the encoder's starting point;
rows ``default:network`` score its network alone, the ridge probe on hand-crafted features left out of the blend, as
in ``benchmarks/accuracy.py``). Scores: :func:`st_from_he.tl.evaluate` per held-out section (PCC on the HVG-50,
HEG-50 and breast markers, the count-noise ceiling of the HVG, Moran's I ratio), and the ratio pretrained / random
of the same run.

Run: ``python benchmarks/pretraining.py [--data ../shared/data/her2st] [--pretrain-s 300] [--presets ridge_encoder
default] [--budget-s 180] [--epochs 20] [--c-sections C6 C2 ...] [--weights mim.safetensors] [--seed 1 --append]
[--from-csv --reading reading.md]``. The pretrained
weights are written to ``--weights`` (reused when the file exists, so a second run compares against the same
encoder). Writes ``benchmarks/results/pretraining.csv`` (after every fit, so an interrupted run keeps what it
measured) and ``benchmarks/results/pretraining.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
SCORES = ("pcc_hvg", "pcc_heg", "pcc_markers", "ceiling_hvg", "moran_ratio")
RATIOS = ("pcc_hvg", "pcc_heg", "pcc_markers")
SIZE_UM, SIZE_PX = 112.0, 112  # the default preset's patch geometry: pretrained weights fit its encoder


def pretrain(sdata, args) -> dict:
    """Pretrain ``sth_tinycnn`` on the tissue tiles of every slide (or reuse ``args.weights``); its summary."""
    import st_from_he as sth

    weights = Path(args.weights)
    summary_path = weights.with_suffix(".json")
    if weights.exists() and summary_path.exists():
        print(f"Reusing the pretrained encoder {weights}", flush=True)
        return json.loads(summary_path.read_text())
    start = time.perf_counter()
    result = sth.tl.pretrain_encoder(
        sdata,
        path=weights,
        encoder="sth_tinycnn",
        size_um=SIZE_UM,
        size_px=SIZE_PX,
        n_tiles=args.n_tiles,
        max_time=args.pretrain_s,
        seed=args.seed,
        progress_bar=False,
        overwrite=True,
    )
    history = result.history
    n = max(1, min(20, len(history) // 5))
    summary = {
        "path": result.path,
        "tiles": result.tiles,
        "n_tiles": int(sum(result.tiles.values())),
        "steps": int(result.params["steps"]),
        "epochs": int(result.params["epochs"]),
        "stopped_by": result.params["stopped_by"],
        "batch_size": int(result.params["batch_size"]),
        "method": result.params["method"],
        "mask_ratio": result.params["mask_ratio"],
        "loss_first": float(history["loss"].head(n).mean()),
        "loss_last": float(history["loss"].tail(n).mean()),
        "flat_loss_last": float(history["flat_loss"].tail(n).mean()),
        "train_s": float(history["time_s"].iloc[-1]),
        "total_s": time.perf_counter() - start,
        "seed": args.seed,
    }
    summary_path.write_text(json.dumps(summary, indent=1))
    print(f"Pretrained: {summary}", flush=True)
    return summary


def folds(sdata, args):
    """``(fold name, training SpatialData, [(section, its SpatialData)], genes)`` per cross-patient fold."""
    import st_from_he as sth

    obs = sdata.tables["table"].obs
    patient_of = dict(zip(obs["sample"].astype(str), obs["patient"].astype(str), strict=False))
    sections = list(patient_of)
    for held_out in (["B4"], args.c_sections):
        train_sections = [s for s in sections if patient_of[s] not in {patient_of[h] for h in held_out}]
        train, _ = sth.pp.split_sections(sdata, test=held_out)
        tests = [sth.pp.split_sections(sdata, test=[s])[1] for s in held_out]
        measured = set.intersection(*(set(t.tables["table"].var_names) for t in tests))
        genes = [
            g for g in sth.pp.select_genes(train, n_top=args.n_top, markers=sth.tl.BREAST_MARKERS) if g in measured
        ]
        name = f"{'+'.join(train_sections)} -> {'+'.join(held_out)}"
        yield name, train, list(zip(held_out, tests, strict=True)), genes


def make_model(genes, preset: str, weights: str | None):
    import st_from_he as sth

    if preset == "ridge_encoder":  # the default preset's encoder and geometry, frozen
        return sth.tl.ExpressionModel(
            genes, preset=preset, encoder="sth_tinycnn", img_size=SIZE_PX, size_um=SIZE_UM, encoder_weights=weights
        )
    return sth.tl.ExpressionModel(genes, preset=preset, size_um=SIZE_UM, img_size=SIZE_PX, encoder_weights=weights)


def network_only(blend: dict[str, float]) -> dict[str, float] | None:
    """The blend without the ridge probe (the network's components renormalised; equal if it gave them no weight)."""
    network = {k: w for k, w in blend.items() if k != "ridge"}
    if not network or "ridge" not in blend:
        return None
    total = sum(network.values())
    return {k: (0.0 if k == "ridge" else (w / total if total > 0 else 1.0 / len(network))) for k, w in blend.items()}


def run(args) -> pd.DataFrame:
    import st_from_he as sth

    out = Path(args.out)
    sdata = sth.datasets.her2st(path=args.data)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    earlier = pd.DataFrame()
    if args.append and (out / "pretraining.csv").exists():  # keep the rows of other seeds and presets
        earlier = read_results(out / "pretraining.csv")
        redone = earlier["method"].str.split(":").str[0].isin(args.presets) & (earlier["seed"] == args.seed)
        earlier = earlier[~redone]
    info = pretrain(sdata, args)
    rows: list[dict] = []
    for fold, train, tests, genes in folds(sdata, args):
        for preset in args.presets:
            for arm, weights in (("random", None), ("pretrained", info["path"])):
                model = make_model(genes, preset, weights)
                budget = {"max_epochs": args.epochs, "max_time": args.budget_s} if model.is_neural else {}
                start = time.perf_counter()
                model.fit(train, seed=args.seed, progress_bar=False, **budget)
                fit_s = time.perf_counter() - start
                blend = dict(model.blend or {})
                epochs = len(model.history) if model.is_neural and model.history is not None else np.nan
                variants = {preset: blend}
                if network_only(blend) is not None:
                    variants[f"{preset}:network"] = network_only(blend)
                for section, test in tests:
                    for method, weights_ in variants.items():
                        model.blend = weights_ or model.blend
                        sth.tl.predict_expression(test, model, key_added="pred", overwrite=True, progress_bar=False)
                        summary = sth.tl.evaluate(test, predicted_key="pred")["summary"].loc[section]
                        row = {
                            "fold": fold,
                            "section": section,
                            "method": method,
                            "arm": arm,
                            "seed": args.seed,
                            **{s: float(summary[s]) for s in SCORES},
                            "n_genes": int(summary["n_genes"]),
                            "fit_s": fit_s,
                            "epochs": epochs,
                            "blend": " ".join(f"{k} {w:.2f}" for k, w in blend.items()),
                            "measured_at": stamp,
                        }
                        rows.append(row)
                        print(
                            f"{fold:28s} {section} {method:22s} {arm:10s} HVG {row['pcc_hvg']:.3f} HEG "
                            f"{row['pcc_heg']:.3f} markers {row['pcc_markers']:.3f} (ceiling {row['ceiling_hvg']:.2f}) "
                            f"moran {row['moran_ratio']:.2f} fit {fit_s:.0f} s",
                            flush=True,
                        )
                    model.blend = blend
                df = pd.concat([earlier, pd.DataFrame(rows)], ignore_index=True)
                df.to_csv(out / "pretraining.csv", index=False)
                (out / "pretraining.md").write_text(report(df, info, args))
    return pd.concat([earlier, pd.DataFrame(rows)], ignore_index=True)


def read_results(path: Path) -> pd.DataFrame:
    """The CSV of earlier runs (written before rows recorded their seed: seed 0)."""
    df = pd.read_csv(path)
    return df if "seed" in df else df.assign(seed=0)


def ratios(df: pd.DataFrame) -> pd.DataFrame:
    """Pretrained over random (and pretrained minus random), per fold, section, method and seed (one run each)."""
    wide = df.pivot_table(index=["fold", "section", "method", "seed"], columns="arm", values=list(RATIOS), sort=False)
    out = pd.DataFrame(index=wide.index)
    for score in RATIOS:
        if {"random", "pretrained"} <= set(wide[score].columns):
            random, pretrained = wide[score]["random"], wide[score]["pretrained"]
            name = score.removeprefix("pcc_")
            out[f"{name} random"] = random
            out[f"{name} pretrained"] = pretrained
            # a ratio over a PCC at or below zero means nothing (B4): left empty, the difference is given beside it
            out[f"{name} ratio"] = (pretrained / random).where(random > 0)
            out[f"{name} diff"] = pretrained - random
    return out.reset_index()


def seed_spread(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of each arm's scores, per fold, section and method."""
    seeds = df.groupby(["fold", "section", "method", "arm"], sort=False)
    stats = seeds[list(RATIOS)].agg(["mean", "std"])
    stats.columns = [f"{score.removeprefix('pcc_')} {stat}" for score, stat in stats.columns]
    return stats.assign(seeds=seeds.size()).reset_index()


def report(df: pd.DataFrame, info: dict, args) -> str:
    tiles = ", ".join(f"{k.split(':', 1)[1].removesuffix('_image')} {v}" for k, v in info["tiles"].items())
    lines = [
        "# Masked-image pretraining of the encoder, on new patients",
        "",
        "Question (issue 13): does `sth.tl.pretrain_encoder` (self-supervised masked image modelling on unlabeled H&E "
        "tiles) help `ExpressionModel` predict expression on a patient it was not trained on?",
        "",
        "What was run (`python benchmarks/pretraining.py`, on 2 CPU cores shared with other jobs; the commands are "
        "under Reading):",
        "",
        f"- Pretraining: `sth_tinycnn` (the default preset's encoder), {SIZE_UM:g} um tiles at {SIZE_PX} px, "
        f"{info['method']} masking of {info['mask_ratio']:.0%} of each tile, batch {info['batch_size']}, "
        f"{info['n_tiles']} tissue tiles shared between all six slides ({tiles}), at most {args.pretrain_s:g} s: "
        f"{info['steps']} steps ({info['epochs']} epoch(s), stopped by {info['stopped_by']}), "
        f"{info['train_s']:.0f} s of training, {info['total_s']:.0f} s with tile cutting. Reconstruction loss "
        f"(L1 on hidden pixels, normalised units) {info['loss_first']:.3f} -> {info['loss_last']:.3f}; the "
        f"flat-colour yardstick (filling hidden squares with the batch mean) {info['flat_loss_last']:.3f}.",
        "- The tiles come from ALL six slides, the held-out patient's slide included, without any expression: this "
        "is the intended use (a new patient's H&E image is available, its expression is not). One pretrained "
        "encoder serves both folds.",
        "- Arms: `random` (encoder randomly initialised from the seed) and `pretrained` (the weights above); "
        "same genes, seed and budget.",
        f"- Genes: `sth.pp.select_genes(train, n_top={args.n_top}, markers=sth.tl.BREAST_MARKERS)` on each fold's "
        "training sections, kept if measured in the held-out sections.",
        f"- `ridge_encoder`: frozen `sth_tinycnn` ({SIZE_UM:g} um at {SIZE_PX} px), pooled features, ridge. "
        f"`default`: the default preset, its encoder started from each arm's weights, at most "
        f"{args.epochs if args.epochs else 'the preset default'} epochs and {args.budget_s:g} s of training "
        "(wall time on a shared machine: the `epochs` column says how many each fit got); `default:network` scores "
        "its network alone (retrieval and regression, without the hand-crafted ridge probe of the blend).",
        "- Scores: `sth.tl.evaluate(test, predicted_key='pred')` summary of each held-out section: mean PCC on the "
        "HVG-50, HEG-50 and breast markers, the HVG count-noise ceiling, and Moran's I ratio (predicted / measured).",
        "",
    ]
    first = df[df["seed"] == df["seed"].min()]
    means = ratios(first).drop(columns=["section", "seed"]).groupby(["fold", "method"], sort=False).mean()
    for score in RATIOS:  # ratios of the means, not means of ratios
        name = score.removeprefix("pcc_")
        if f"{name} ratio" in means:
            random = means[f"{name} random"]
            means[f"{name} ratio"] = (means[f"{name} pretrained"] / random).where(random > 0)
    lines += [
        f"## Mean over each fold's held-out sections (seed {first['seed'].iloc[0]})",
        "",
        means.reset_index().to_markdown(index=False, floatfmt=".3f"),
        "",
        "## Pretrained / random per section, same run",
        "",
    ]
    rat = ratios(df)
    if len(rat):
        lines += [rat.to_markdown(index=False, floatfmt=".3f"), ""]
    if df["seed"].nunique() > 1:
        lines += [
            "## Over seeds",
            "",
            "The fits repeated with other seeds (the same pretrained encoder, pretrained with seed "
            f"{info.get('seed', 0)}): the `random` arm draws another encoder initialisation, both arms another "
            "validation split for the network. Mean and standard deviation over seeds:",
            "",
            seed_spread(df).to_markdown(index=False, floatfmt=".3f"),
            "",
        ]
    lines += ["## All scores", "", df.drop(columns=["measured_at"]).to_markdown(index=False, floatfmt=".3f"), ""]
    runs = ", ".join(f"seed {k} on {v}" for k, v in df.groupby("seed")["measured_at"].first().items())
    lines += [f"Measured (UTC): {runs}.", ""]
    if args.reading:
        lines += ["## Reading", "", Path(args.reading).read_text().strip(), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    parser.add_argument("--presets", nargs="+", default=["ridge_encoder", "default"])
    parser.add_argument("--c-sections", nargs="+", default=["C6", "C2", "C3", "C4", "C5"])
    parser.add_argument("--pretrain-s", type=float, default=300, help="seconds of masked image modelling")
    parser.add_argument("--n-tiles", type=int, default=4096)
    parser.add_argument("--weights", default=str(Path(tempfile.gettempdir()) / "sth_pretraining_mim.safetensors"))
    parser.add_argument("--epochs", type=int, default=None, help="most epochs per default-preset fit")
    parser.add_argument("--budget-s", type=float, default=180, help="most training seconds per default-preset fit")
    parser.add_argument("--n-top", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--reading", default=None, help="a text file with the reading, appended to the report")
    parser.add_argument("--from-csv", action="store_true", help="only rewrite the report from the CSV")
    parser.add_argument("--append", action="store_true", help="keep the CSV's rows of other seeds and presets")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    if args.from_csv:
        df = read_results(out / "pretraining.csv")
        info = json.loads(Path(args.weights).with_suffix(".json").read_text())
    else:
        import torch

        torch.set_num_threads(2)
        df = run(args)
        info = json.loads(Path(args.weights).with_suffix(".json").read_text())
    text = report(df, info, args)
    print(text)
    (out / "pretraining.md").write_text(text)


if __name__ == "__main__":
    main()
