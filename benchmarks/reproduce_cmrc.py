"""Reproduce CMRCNet: the authors' code against our ``preset="cmrc"``, trained on the same spots, scored the same way.

The authors' code is the public repository github ``ngfufdrdh/CMRCNet``. It is not part of this project: pass a
checkout (or a bare git mirror, which is exported to a scratch folder at run time) with ``--cmrc-repo``. From it we
import, unchanged, their model (``model.models.CLIPModel_ViT_itm_v14_MSE``: ViT-B/32, soft-target contrastive loss
plus masked cross-modal reconstruction), their data set class (``utils_data.dataset.Path_ST_Dataset``: its
augmentation and normalisation), their scheduler (``tricks.lr.lr_scheduler.WarmupCosineLR``) and their retrieval
(``inference.find_matches``, top 50 averaged). Only the data loading is adapted: their data set reads HEST ``.h5``
patch files and ``.h5ad`` tables; here it is handed our 224 px patches (112 um at 0.5 um/px) and targets in memory.
Their training and inference loops call ``.cuda()``; they are re-written here for the CPU, step for step (AdamW,
scheduler stepped before each epoch, loss = contrastive + reconstruction, validation loss with masking, the weights
of the best validation epoch; their mixed precision and their unused EMA copy are left out).

Both sides get the same training spots (a seeded subsample of every training section), the same genes (union of
per-section HVGs of the training sections only: the authors' list also takes the test sections' HVGs, which we do not
copy), the same targets (the authors' ``normalize_total`` to each section's median total then log1p, which the
``"cmrc"`` preset now uses: ``ModelConfig.target_sum="median"``),
20% of each section for validation, the same number of epochs of the same 60-epoch cosine schedule, and the same test
spots of C6, scored by :func:`st_from_he.tl.evaluate` on a prediction table. The two splits round differently (the
authors keep ``int(0.8 n)`` spots of a section for training, we hold out ``round(0.2 n)``) and both drop an incomplete
last batch of 64, so on small budgets pick a section size where both take the same number of steps (40 spots: 32
for training on both sides, 160 in all, 2 steps an epoch); the table lists each side's spots and steps.

Run: ``python benchmarks/reproduce_cmrc.py --cmrc-repo PATH [--data ../shared/data/her2st] [--epochs 1]
[--spots-per-section 40] [--test-spots 150] [--seeds 0 1 2]``. Writes ``benchmarks/results/reproduce_cmrc.md`` and
``.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
TRAIN = ["C2", "C3", "C4", "C5", "B4"]
TEST = "C6"
SETS = ("hvg", "heg", "markers")
AUTHORS_EPOCHS = 60


@contextlib.contextmanager
def authors_code(repo: Path):
    """Make the authors' packages importable (a bare git mirror is exported to a scratch folder first)."""
    with tempfile.TemporaryDirectory() as tmp:
        if not (repo / "model" / "models.py").is_file():
            archive = subprocess.run(["git", f"--git-dir={repo}", "archive", "HEAD"], check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
            repo = Path(tmp)
        argv, sys.argv = sys.argv, sys.argv[:1]  # their modules parse the command line at import
        sys.path.insert(0, str(repo))
        # `einops` is imported by their modules but never used: stand in for it when it is not installed
        if "einops" not in sys.modules:
            try:
                import einops  # noqa: F401
            except ImportError:
                sys.modules["einops"] = types.SimpleNamespace(rearrange=None, reduce=None)
        try:
            yield repo
        finally:
            sys.argv = argv
            sys.path.remove(str(repo))


def load_data(data: Path, n_top: int, spots_per_section: int, test_spots: int, seed: int):
    """Sections, genes (training HVGs), the subsampled training spots and the C6 test spots."""
    import st_from_he as sth

    sdata = sth.datasets.her2st([*TRAIN, TEST], path=data)
    train, test = sth.pp.split_sections(sdata, test=[TEST])
    measured = set(test.tables["table"].var_names)
    genes = [g for g in sth.pp.select_genes(train, n_top=n_top, markers=sth.tl.BREAST_MARKERS) if g in measured]
    rng = np.random.default_rng(seed)
    obs = train.tables["table"].obs
    spots = []
    for section in TRAIN:
        names = obs.index[obs["sample"].astype(str) == section]
        spots += list(rng.choice(names, size=min(spots_per_section, len(names)), replace=False))
    names = test.tables["table"].obs_names
    test_names = list(rng.choice(names, size=min(test_spots, len(names)), replace=False))
    return train, test, genes, spots, test_names


def arrays(sdata, genes, spots):
    """Our patches (one 224 px scale) and targets of ``spots`` (each section's counts scaled to its median total,
    then log1p: the authors' preprocessing), concatenated over sections."""
    from st_from_he.tl._data import as_list, concat_arrays, spot_arrays

    parts = []
    for part in as_list(sdata):
        names = part.tables["table"].obs_names
        chosen = names[names.isin(spots)]
        parts.append(
            spot_arrays(part, genes, size_um=112.0, size_px=224, context=(1.0,), spots=chosen, target_sum="median")
        )
    return concat_arrays(parts)


def authors_split(data, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Their ``split_train_val``: shuffle each section's barcodes, the last 20% for validation."""
    rnd = random.Random(seed)
    train, val = [], []
    for section in pd.unique(data.sections):
        rows = list(np.flatnonzero(data.sections == section))
        rnd.shuffle(rows)
        cut = int(len(rows) * 0.8)
        train += rows[:cut]
        val += rows[cut:]
    return np.sort(train), np.sort(val)


def run_authors(data, test_data, seed: int, epochs: int, batch_size: int = 64) -> tuple[np.ndarray, int]:
    """Train their model on ``data`` as their ``train.py`` does (on the CPU) and predict ``test_data`` as their
    ``inference.py`` does; returns the predicted expression of the test spots and the number of training spots."""
    import anndata as ad
    import torch
    from inference import find_matches
    from model.models import CLIPModel_ViT_itm_v14_MSE
    from torch.utils.data import DataLoader
    from tricks.lr.lr_scheduler import WarmupCosineLR
    from Utils.utils import set_seed
    from utils_data.dataset import Path_ST_Dataset

    class OurPatches(Path_ST_Dataset):
        """Their data set over our in-memory patches: only loading changes, their transform and items stay."""

        def __init__(self, patches, targets, mode):
            self.mode = mode
            self.barcode = [str(i) for i in range(len(patches))]
            self.image_dict = {
                b: np.ascontiguousarray(p[0].transpose(1, 2, 0)) for b, p in zip(self.barcode, patches, strict=True)
            }
            self.adate = ad.AnnData(targets.astype(np.float32), obs=pd.DataFrame(index=self.barcode))

    set_seed(seed)
    train_idx, val_idx = authors_split(data, seed)
    model = CLIPModel_ViT_itm_v14_MSE(spot_embedding=data.targets.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)
    # their schedule spans 60 epochs; a shorter budget runs its first `epochs` epochs
    scheduler = WarmupCosineLR(optimizer, warmup_epochs=0, total_epochs=AUTHORS_EPOCHS, min_lr=1e-5, max_lr=5e-5)
    loaders = {
        mode: DataLoader(
            OurPatches(data.patches[idx], data.targets[idx], mode),
            batch_size=batch_size,
            shuffle=mode == "train",
            drop_last=len(idx) > batch_size,
        )
        for mode, idx in (("train", train_idx), ("val", val_idx))
    }
    best, best_state = float("inf"), None
    for epoch in range(epochs):
        scheduler.step(epoch)
        model.train()
        for batch in loaders["train"]:
            contrastive, reconstruction = model({"image": batch["image"], "st_data": batch["st_data"]})
            optimizer.zero_grad()
            (contrastive + reconstruction).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            losses = [sum(model({"image": b["image"], "st_data": b["st_data"]})).item() for b in loaders["val"]]
        if np.mean(losses) < best:
            best, best_state = float(np.mean(losses)), {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():  # their get_embeddings, on the CPU
        bank = model.spot_projection(torch.from_numpy(data.targets)).numpy()
        test = DataLoader(OurPatches(test_data.patches, test_data.targets, "test"), batch_size=32)
        query = np.concatenate(
            [model.image_projection(model.image_encoder(b["image"]).mean(dim=1)).numpy() for b in test]
        )
    indices = find_matches(bank, query, top_k=min(50, len(bank)))  # their top 50, capped as ours
    return np.stack([data.targets[i].mean(axis=0) for i in indices]), len(train_idx)


def run_ours(train, genes, spots, test_data, seed: int, epochs: int) -> tuple[np.ndarray, int]:
    import st_from_he as sth

    model = sth.tl.ExpressionModel(genes, preset="cmrc", max_epochs=epochs)
    model.fit(train, spots=spots, seed=seed, progress_bar=False)
    pred = model.predict_patches(test_data.patches, groups=test_data.sections, progress_bar=False)[0]
    return pred, model.training_info["n_train_spots"]


def score(test, genes, test_data, prediction: np.ndarray) -> dict[str, float]:
    """HVG/HEG/marker PCC of a prediction table of the test spots, by :func:`st_from_he.tl.evaluate`."""
    import anndata as ad

    import st_from_he as sth

    measured = test.tables["table"]
    rows = measured.obs_names.get_indexer(test_data.obs.index)
    table = ad.AnnData(
        prediction.astype(np.float32),
        obs=measured.obs.iloc[rows].copy(),
        var=pd.DataFrame(index=genes),
        obsm={k: v[rows] for k, v in measured.obsm.items() if k == "spatial"},
    )
    summary = sth.tl.evaluate(measured, predicted=table, ceiling=False)["summary"].loc[TEST]
    return {s: float(summary[f"pcc_{s}"]) for s in SETS}


def run(args) -> pd.DataFrame:
    import torch

    torch.set_num_threads(args.threads)
    train, test, genes, spots, test_spots = load_data(
        Path(args.data), args.n_top, args.spots_per_section, args.test_spots, seed=0
    )
    data = arrays(train, genes, spots)
    test_data = arrays(test, genes, test_spots)
    print(f"{len(genes)} genes, {len(data.patches)} training spots, {len(test_data.patches)} test spots", flush=True)
    rows = []
    with authors_code(Path(args.cmrc_repo)):
        for seed in args.seeds:
            for side in ("authors", "ours"):
                start = time.perf_counter()
                if side == "authors":
                    pred, n_train = run_authors(data, test_data, seed, args.epochs)
                else:
                    pred, n_train = run_ours(train, genes, spots, test_data, seed, args.epochs)
                row = {"side": side, "seed": seed, **score(test, genes, test_data, pred)}
                # both drop an incomplete last batch: the optimiser steps per epoch each side took
                row |= {"train_spots": n_train, "steps_per_epoch": n_train // 64 if n_train > 64 else 1}
                row["seconds"] = time.perf_counter() - start
                rows.append(row)
                print(row, flush=True)
    out = pd.DataFrame(rows)
    out.attrs |= {"n_genes": len(genes), "n_train": len(data.patches), "n_test": len(test_data.patches)}
    return out


def report(results: pd.DataFrame, args) -> str:
    stats = results.groupby("side")[list(SETS)].agg(["mean", "std"])
    lines = [
        '# CMRCNet reproduction: the authors\' code against our preset="cmrc"',
        "",
        f"Trained on {results.attrs['n_train']} spots ({args.spots_per_section} drawn from each of "
        f"{', '.join(TRAIN)}), {results.attrs['n_genes']} genes (training-section HVGs plus breast markers), "
        f"224 px patches of 112 um, {args.epochs} epoch(s) of the 60-epoch cosine schedule, seeds "
        f"{', '.join(map(str, args.seeds))}; scored on {results.attrs['n_test']} random spots of {TEST} by "
        "`sth.tl.evaluate` (mean PCC of each gene set, mean and sd over seeds).",
        "",
        f"**Budget**: {args.epochs} of the authors' {AUTHORS_EPOCHS} epochs, on "
        f"{results.attrs['n_train']} of about 3,000 training spots (CPU, 2 shared cores): "
        f"{AUTHORS_EPOCHS // args.epochs}x fewer epochs and far fewer steps than the paper's runs, so both models "
        "are barely trained; the table tests whether the two implementations agree, not how good CMRCNet is.",
        "",
        "| side | HVG | HEG | markers |",
        "|---|---|---|---|",
    ]
    for side in ("authors", "ours"):
        cells = [f"{stats.loc[side, (s, 'mean')]:.3f} ± {stats.loc[side, (s, 'std')]:.3f}" for s in SETS]
        lines.append(f"| {side} | {' | '.join(cells)} |")
    lines += ["", "Agreement (|difference of means| against max(2 sd, 0.02)):", ""]
    for s in SETS:
        diff = abs(stats.loc["authors", (s, "mean")] - stats.loc["ours", (s, "mean")])
        bound = max(2 * max(stats.loc["authors", (s, "std")], stats.loc["ours", (s, "std")]), 0.02)
        lines.append(f"- {s}: {diff:.3f} vs {bound:.3f}: {'agree' if diff <= bound else 'DIFFER'}")
    lines += [
        "",
        "Known differences kept: our gene list uses the training sections only (theirs also the test sections' HVGs);",
        "both sides use the authors' targets (each section's counts scaled to its median total, then log1p);",
        "no mixed precision and no EMA copy on either side (CPU).",
        "",
        "Per run:",
        "",
        results.to_markdown(index=False, floatfmt=".3f"),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cmrc-repo", required=True, help="checkout or bare git mirror of ngfufdrdh/CMRCNet")
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--spots-per-section", type=int, default=40)  # 2 steps an epoch on both sides
    parser.add_argument("--test-spots", type=int, default=150)
    parser.add_argument("--n-top", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "reproduce_cmrc"))
    args = parser.parse_args()
    results = run(args)
    text = report(results, args)
    print(text)
    Path(args.out).with_suffix(".md").write_text(text)
    results.to_csv(Path(args.out).with_suffix(".csv"), index=False)


if __name__ == "__main__":
    main()
