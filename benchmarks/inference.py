"""CPU inference speed of the default preset: this checkout against the code before issue 16, in the same run.

The baseline is the package at ``--baseline`` (default ``76ce258``, the last commit before the scale issue's work:
NumPy/SciPy probe features, the network as trained, patches read one by one), checked out into a temporary git
worktree; the current side is this checkout's ``src``. Each side runs in its own fresh process (``PYTHONPATH``
pointing at its source), the sides alternate ``--rounds`` times and the best of each side counts (a shared machine).
In each process, on 2 CPU threads: a small ``default`` model is fitted (300 random spots of her2st C2-C5 + B4,
1 epoch: inference speed does not depend on how well it is trained), then

- ``cold``: the first prediction of a freshly loaded C6 (178 spots; JPEG decode included), as the issue's
  51 spots/s was measured;
- ``warm``: predicting C6 again, its image decoded (best of ``--repeats``): the per-spot work alone;
- ``whole slide``: the whole C6 image read as H&E-only (no expression), a 100 um grid of 4,416 pseudo-spots, decode
  included (the issue's 58 s).

For the current side it also reports the share of the warm time spent in the probe's features and in the network,
and, when CUDA is available, the same on the GPU. Run: ``python benchmarks/inference.py [--data
../shared/data/her2st]``; writes ``benchmarks/results/inference.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
REPO = HERE.parent
BASELINE = "76ce258"


class Timed:
    """Wraps a callable and adds up the seconds spent in it."""

    def __init__(self, func):
        self.func, self.seconds = func, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.func(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def measure(data: str, repeats: int, device: str = "cpu") -> dict:
    """One side's measurements, in this process (the package found on ``PYTHONPATH``)."""
    import numpy as np
    import torch

    import st_from_he as sth

    torch.set_num_threads(2)
    sdata = sth.datasets.her2st(["B4", "C2", "C3", "C4", "C5"], path=data)
    genes = sth.pp.select_genes(sdata, n_top=1000)
    names = sdata.tables["table"].obs_names
    spots = list(names[np.random.default_rng(0).permutation(len(names))[:300]])
    model = sth.tl.ExpressionModel(genes, preset="default")
    model.fit(sdata, max_epochs=1, patience=None, progress_bar=False, spots=spots)
    out = {"version": sth.__file__}

    c6 = sth.datasets.her2st(["C6"], path=data)
    start = time.perf_counter()
    sth.tl.predict_expression(c6, model, progress_bar=False, device=device)
    n = c6.tables["predicted_expression"].n_obs
    out["cold"] = n / (time.perf_counter() - start)

    probe, module = model._probe, model._module
    features, network = Timed(probe.featurize), Timed(module.embed_images)
    probe.featurize, module.embed_images = features, network
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        sth.tl.predict_expression(c6, model, progress_bar=False, overwrite=True, device=device)
        walls.append(time.perf_counter() - start)
    out["warm"] = n / min(walls)
    out["share_features"], out["share_network"] = features.seconds / sum(walls), network.seconds / sum(walls)
    del probe.featurize, module.embed_images

    start = time.perf_counter()
    slide = sth.io.read_image(Path(data) / "C6" / "C6_HE.jpg", sample_id="slide", pixel_size_um=0.688)
    key = sth.pp.spot_grid(slide, "slide_image", spacing_um=100, diameter_um=55, tissue_only=False)
    sth.tl.predict_expression(slide, model, shapes_key=key, progress_bar=False, device=device)
    out["slide_spots"] = slide.tables["predicted_expression"].n_obs
    out["slide_s"] = time.perf_counter() - start
    return out


def run_side(src: Path, data: str, repeats: int, device: str = "cpu") -> dict:
    """:func:`measure` in a fresh process that imports the package from ``src``."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import inference; "
        f"print(json.dumps(inference.measure({data!r}, {repeats}, {device!r})))"
    )
    env = os.environ | {"PYTHONPATH": str(src), "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"The run of {src} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(args) -> str:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "baseline"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.baseline], check=True
        )
        try:
            sides = {"baseline": worktree / "src", "now": REPO / "src"}
            runs = {name: [] for name in sides}
            for _ in range(args.rounds):
                for name, src in sides.items():
                    runs[name].append(run_side(src, args.data, args.repeats))
            cuda = run_side(REPO / "src", args.data, args.repeats, "cuda") if torch.cuda.is_available() else None
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=True)

    for name, side in runs.items():  # each side's best
        assert all(r["version"].startswith(str(sides[name])) for r in side), f"{name} imported the wrong package"
    best = {
        name: {
            "cold": max(r["cold"] for r in side),
            "warm": max(r["warm"] for r in side),
            "slide_s": min(r["slide_s"] for r in side),
            "slide_spots": side[0]["slide_spots"],
            "share_features": side[0]["share_features"],
            "share_network": side[0]["share_network"],
        }
        for name, side in runs.items()
    }
    base, now = best["baseline"], best["now"]
    rows = [("baseline", base), ("now", now)] + ([("now, CUDA", cuda)] if cuda else [])
    lines = [
        f"Default preset fitted on 300 random spots of her2st C2-C5 + B4 (1 epoch), 2 CPU threads, torch "
        f"{torch.__version__}. `baseline`: the package at commit {args.baseline} (before issue 16), `now`: this "
        f"checkout; each side in fresh processes, alternating, best of {args.rounds} rounds (warm: best of "
        f"{args.repeats} predictions in each). Ratios against the baseline measured in the same run.",
        "",
        "| code | C6 cold, decode included (spots/s) | ratio | C6 warm, image decoded (spots/s) | ratio | "
        f"whole C6 H&E-only, {base['slide_spots']} spots (s) | spots/s | ratio | time in features | in network |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['cold']:.0f} | {r['cold'] / base['cold']:.2f}x | {r['warm']:.0f} | "
            f"{r['warm'] / base['warm']:.2f}x | {r['slide_s']:.1f} | {r['slide_spots'] / r['slide_s']:.0f} | "
            f"{base['slide_s'] / r['slide_s']:.2f}x | {r['share_features']:.0%} | {r['share_network']:.0%} |"
        )
    if not cuda:
        lines += ["", "No CUDA device on this machine: the CUDA row is not measured (the code runs and says so)."]
    lines += [
        "",
        "Every run of a side: "
        + "; ".join(f"{k}: " + ", ".join(f"{r['warm']:.0f}" for r in v) for k, v in runs.items())
        + " warm spots/s.",
        "",
        "The cold C6 figure includes decoding its 9,288 x 9,907 px JPEG and estimating the glass colour, a fixed cost "
        "per slide that dominates a 178-spot section; the warm and whole-slide figures are the per-spot work.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "her2st"))
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the baseline (default: before issue 16)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating fresh processes per side; the best counts")
    parser.add_argument("--repeats", type=int, default=3, help="warm predictions per process; the best counts")
    args = parser.parse_args()
    start = time.perf_counter()
    results = main(args)
    print(results)
    print(f"(benchmark wall time {time.perf_counter() - start:.0f} s)")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "inference.md").write_text("# Inference speed of the default preset\n\n" + results + "\n")
