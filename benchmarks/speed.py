"""Training and inference speed per preset, and whole-slide prediction on an H&E-only her2st image.

Run: ``python benchmarks/speed.py [--data ../shared/data/her2st] [--epochs 2]``. On this project's CI-class machine
(2 CPU cores, no GPU) it prints, per preset, the training seconds per epoch on the five training sections and the
inference throughput in spots per second, each with its ratio to the faithful reference (``cmrc``) measured in the
same run; then the wall time and peak memory of predicting a whole her2st image used as H&E-only on a 100 um grid.
Results are also written to ``benchmarks/results/speed.md``.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def train_and_infer(data: str, preset: str, epochs: str, save_dir: str = "") -> dict:
    """Fit ``preset`` on C2-C5 + B4 for ``epochs`` and predict C6; time both; save the model to ``save_dir``."""
    import torch

    import st_from_he as sth

    torch.set_num_threads(2)
    sdata = sth.datasets.her2st(path=data)
    train, test = sth.pp.split_sections(sdata, test=["C6"])
    genes = sth.pp.select_genes(train, n_top=1000)
    model = sth.tl.ExpressionModel(genes, preset=preset)
    start = time.perf_counter()
    model.fit(train, max_epochs=int(epochs), patience=None, progress_bar=False)
    fit_s = time.perf_counter() - start
    n_epochs = len(model.history) if model.history is not None else 0
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
        "s_per_epoch": fit_s / n_epochs if n_epochs else float("nan"),
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
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=["cmrc", "default", "ridge"])
    args = parser.parse_args()

    import tempfile

    tmp = tempfile.mkdtemp()
    rows = [_in_subprocess("train_and_infer", args.data, p, str(args.epochs), f"{tmp}/{p}") for p in args.presets]
    ref = next((r for r in rows if r["preset"] == "cmrc"), rows[0])
    lines = [
        f"Training on her2st C2-C5 + B4 ({args.epochs} epochs, 2 CPU threads) and predicting C6; ratios against "
        f"the reference preset `{ref['preset']}` measured in the same run.",
        "",
        "| preset | fit (s) | s / epoch | epoch speed-up vs cmrc | inference (spots/s) | inference speed-up vs cmrc |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['fit_s']:.1f} | {r['s_per_epoch']:.1f} | {ref['s_per_epoch'] / r['s_per_epoch']:.1f}x "
            f"| {r['spots_per_s']:.1f} | {r['spots_per_s'] / ref['spots_per_s']:.1f}x |"
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
    results = "\n".join(lines)
    print(results)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "speed.md").write_text("# Speed\n\n" + results + "\n")


if __name__ == "__main__":
    main()
