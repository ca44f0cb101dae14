"""Few-shot learning curve: the default preset against the ridge baseline on nested subsets of training spots.

Trains on random nested subsets of the spots of her2st C2-C5 + B4 (50 to all of them) and scores the held-out section
C6 with the package's evaluation protocol; every neural fit gets the same compute budget (``--budget-s`` seconds).

Run: ``python benchmarks/few_shot.py [--data ../shared/data/her2st] [--budget-s 120]``. Writes
``benchmarks/results/few_shot.md``, ``few_shot.csv`` and ``few_shot.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    parser.add_argument("--test", default="C6")
    parser.add_argument("--sizes", nargs="+", type=int, default=[50, 100, 200, 400, 800, 10_000])
    parser.add_argument("--presets", nargs="+", default=["default", "ridge"])
    parser.add_argument("--budget-s", type=float, default=120)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    import st_from_he as sth

    torch.set_num_threads(2)
    sdata = sth.datasets.her2st(path=args.data)
    res = sth.tl.few_shot(
        sdata,
        test=args.test,
        n_train_spots=args.sizes,
        presets=args.presets,
        fit_kwargs={"max_time": args.budget_s},
        progress_bar=False,
    )
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    res.to_csv(out / "few_shot.csv", index=False)
    table = res.pivot_table(index="n_train_spots", columns=["gene_set", "method"], values="pearson").round(3)
    table = table.reindex(columns=["hvg", "heg", "markers"], level=0)
    table.columns = [
        f"{gene_set.upper() if gene_set != 'markers' else 'markers'}: {method}" for gene_set, method in table.columns
    ]

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), sharey=True, layout="constrained")
    for ax, gene_set in zip(axes, ("hvg", "heg", "markers"), strict=True):
        for method, block in res[res["gene_set"] == gene_set].groupby("method"):
            block = block.groupby("n_train_spots")["pearson"].mean()
            ax.plot(block.index, block.values, marker="o", label=method)
        ax.set_xscale("log")
        ax.set_title(f"{gene_set.upper() if gene_set != 'markers' else 'markers'}")
        ax.set_xlabel("training spots")
        ax.axhline(0, color="0.7", lw=0.8)
    axes[0].set_ylabel(f"mean PCC on {args.test}")
    axes[-1].legend(frameon=False)
    fig.suptitle(f"Few-shot learning curve (held-out {args.test}; nested random subsets of C2-C5 + B4 spots)")
    fig.savefig(out / "few_shot.png", dpi=110)

    text = "\n".join(
        [
            "# Few-shot learning curve",
            "",
            f"Models trained on nested random subsets of the spots of the other five her2st sections and scored on "
            f"{args.test} (mean per-gene PCC over HVG-50, HEG-50 and the breast markers; the largest size uses every "
            f"spot). Neural fits get at most {args.budget_s:g} s each on 2 CPU threads; seed 0, one repeat.",
            "",
            "![few-shot learning curve](few_shot.png)",
            "",
            table.to_markdown(),
            "",
        ]
    )
    (out / "few_shot.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
