"""Training and inference speed per preset, and whole-slide prediction on an H&E-only her2st image.

Run: ``python benchmarks/speed.py [--data ../shared/data/her2st] [--epochs 2]``. On this project's CI-class machine
(2 CPU cores, no GPU) it prints, per preset, the training seconds per epoch on the five training sections and the
inference throughput in spots per second, each with its ratio to the faithful reference (``cmrc``) measured in the
same run; then the wall time and peak memory of predicting a whole her2st image used as H&E-only on a 100 um grid;
then the wall time of the demo (README's first command, after installation) and of ``demo --quick``, against the
10-minute and 2-minute targets. ``--no-demo`` leaves the demo out. Results are also written to
``benchmarks/results/speed.md``.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).parent


def train_and_infer(data: str, preset: str, epochs: str, save_dir: str = "", n_spots: str = "0") -> dict:
    """Fit ``preset`` on C2-C5 + B4 (or ``n_spots`` of their spots) for ``epochs``, predict C6, time both."""
    import torch

    import st_from_he as sth

    torch.set_num_threads(2)
    sdata = sth.datasets.her2st(path=data)
    train, test = sth.pp.split_sections(sdata, test=["C6"])
    genes = sth.pp.select_genes(train, n_top=1000)
    model = sth.tl.ExpressionModel(genes, preset=preset)
    names = train.tables["table"].obs_names
    spots = None if int(n_spots) <= 0 else list(names[np.random.default_rng(0).permutation(len(names))[: int(n_spots)]])
    sth.pp.extract_patches(train, size_um=model.size_um, size_px=model.size_px, context=model.context)[:1]  # decode
    start = time.perf_counter()
    model.fit(train, max_epochs=int(epochs), patience=None, progress_bar=False, spots=spots)
    fit_s = time.perf_counter() - start
    n_epochs = len(model.history) if model.history is not None else 0
    n_fit = model.training_info["n_train_spots"] + model.training_info["n_val_spots"]
    start = time.perf_counter()
    sth.tl.predict_expression(test, model, progress_bar=False)
    predict_s = time.perf_counter() - start
    n_spots = test.tables["predicted_expression"].n_obs
    if save_dir:
        model.save(save_dir, overwrite=True)
    return {
        "preset": preset,
        "fit_s": fit_s,
        "epochs": n_epochs,
        "n_fit_spots": n_fit,
        "s_per_1000_spots": fit_s / max(n_epochs, 1) / n_fit * 1000,
        "spots_per_s": n_spots / predict_s,
    }


def whole_slide(data: str, model_dir: str) -> dict:
    """Predict a whole her2st image with no expression on a 100 um grid; wall time and peak memory."""
    import torch

    import st_from_he as sth

    torch.set_num_threads(2)
    model = sth.tl.ExpressionModel.load(model_dir, device="cpu")
    start = time.perf_counter()
    he_only = sth.io.read_image(Path(data) / "C6" / "C6_HE.jpg", sample_id="slide", pixel_size_um=0.688)
    key = sth.pp.spot_grid(he_only, "slide_image", spacing_um=100, diameter_um=55, tissue_only=False)
    sth.tl.predict_expression(he_only, model, shapes_key=key, progress_bar=False)
    wall = time.perf_counter() - start
    n = he_only.tables["predicted_expression"].n_obs
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"spots": n, "wall_s": wall, "spots_per_s": n / wall, "peak_rss_mb": peak_mb}


def demo(data: str, quick: bool) -> dict:
    """Wall time and peak memory of ``python -m st_from_he demo`` (``--quick``) in a fresh process."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "st_from_he", "demo", "--data", data, "--out", out]
        start = time.perf_counter()
        child = subprocess.Popen(command + (["--quick"] if quick else []), stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak memory, not the benchmark's other runs
        wall = time.perf_counter() - start
        if status:
            raise RuntimeError(f"The demo failed (exit status {status}): run {' '.join(command)} to see why.")
        scores = pd.read_csv(Path(out) / "scores.csv")
    peak_mb = usage.ru_maxrss / 1024
    hvg = dict(zip(scores["method"], scores["pcc_hvg"], strict=True))
    return {"wall_s": wall, "peak_rss_mb": peak_mb, "hvg": hvg}


def _in_subprocess(func: str, *args: str) -> dict:
    """Run one measurement in a fresh process, so peak memory and imports are its own."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import speed; print(json.dumps(speed.{func}(*{args!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--n-spots", type=int, default=300, help="training spots (0: all); epoch time scales with it")
    parser.add_argument("--presets", nargs="+", default=["cmrc", "default", "ridge"])
    parser.add_argument("--no-demo", action="store_true", help="do not time the demo")
    args = parser.parse_args()

    import tempfile

    tmp = tempfile.mkdtemp()
    rows = [
        _in_subprocess("train_and_infer", args.data, p, str(args.epochs), f"{tmp}/{p}", str(args.n_spots))
        for p in args.presets
    ]
    ref = next((r for r in rows if r["preset"] == "cmrc"), rows[0])
    lines = [
        f"Training on {rows[0]['n_fit_spots']} random spots of her2st C2-C5 + B4 ({args.epochs} epoch(s), 2 CPU "
        f"threads, images decoded beforehand) and predicting the 178 spots of C6; training time is given per epoch "
        f"of 1,000 spots (a her2st epoch is about 1,015 spots). Ratios against the reference preset "
        f"`{ref['preset']}` measured in the same run. Ridge presets have no epochs: their whole closed-form fit is "
        f"shown.",
        "",
        "| preset | fit (s) | s per 1,000-spot epoch | speed-up vs cmrc | inference (spots/s) | speed-up vs cmrc |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['fit_s']:.1f} | {r['s_per_1000_spots']:.1f} | "
            f"{ref['s_per_1000_spots'] / r['s_per_1000_spots']:.1f}x | {r['spots_per_s']:.1f} | "
            f"{r['spots_per_s'] / ref['spots_per_s']:.1f}x |"
        )
    slide_preset = "default" if "default" in args.presets else args.presets[0]
    slide = _in_subprocess("whole_slide", args.data, f"{tmp}/{slide_preset}")
    lines += [
        "",
        f"Whole-slide prediction of the C6 image used as H&E-only (no expression), `{slide_preset}` preset, "
        f"100 um grid over the whole image, file decoding included: {slide['spots']} spots in "
        f"{slide['wall_s']:.1f} s ({slide['spots_per_s']:.0f} spots/s), peak memory {slide['peak_rss_mb']:.0f} MB "
        "(process RSS, including Python, torch and the decoded JPEG).",
    ]
    if not args.no_demo:
        lines += [
            "",
            "The demo (`python -m st_from_he demo`, README's first command, after installation; default preset, up to "
            "20 epochs with early stopping, then the ridge baseline, scores, figures, zarr), each in a fresh process:",
            "",
            "| run | wall time | target | within | HVG PCC on C6 (default / ridge) | peak RSS (MB) |",
            "|---|---|---|---|---|---|",
        ]
        for name, quick, target in (("demo", False, 600), ("demo --quick", True, 120)):
            r = demo(args.data, quick)
            lines.append(
                f"| `{name}` | {r['wall_s'] / 60:.1f} min | {target / 60:.0f} min | "
                f"{'yes' if r['wall_s'] <= target else 'NO'} ({r['wall_s'] / target:.2f} of it) | "
                f"{r['hvg'].get('default', float('nan')):.3f} / {r['hvg'].get('ridge', float('nan')):.3f} | "
                f"{r['peak_rss_mb']:.0f} |"
            )
    results = "\n".join(lines)
    print(results)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "speed.md").write_text("# Speed\n\n" + results + "\n")


if __name__ == "__main__":
    main()
