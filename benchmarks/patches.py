"""Speed of cutting spot patches from an H&E JPEG: st_from_he against squidpy.

A square grid of pseudo-spots 100 um apart over a whole her2st section (about 4,400 spots, glass included) is cut
into patches of 112 um resampled to 224 px, from the JPEG file to an in-memory uint8 array, decoding included:

- st_from_he: ``sth.pp.attach_histology`` (the measured spots' AnnData plus the JPEG) + ``sth.pp.spot_grid`` +
  ``sth.pp.extract_patches(...).to_numpy()``;
- squidpy: ``sq.im.ImageContainer(path, lazy=False)`` (decoded once; the lazy default decodes the JPEG again for
  every crop), ``generate_spot_crops`` at the same centres with a radius covering the patch and the filter's
  margin, then each crop resized with PIL (bilinear, with the exact sub-pixel box), as a squidpy user would.

Each side runs in its own process (imports and the one-off loading of compiled code are not timed) so that its
peak memory (maximum resident set size) is its own. The two results must hold the same pixels up to PIL's rounding
(at most 1 grey level apart).

Usage: ``python benchmarks/patches.py [--data ../shared/data/her2st] [--section C6] [--repeats 3]``.
Writes ``benchmarks/results/patches.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SPACING_UM, DIAMETER_UM, SIZE_UM, SIZE_PX = 100.0, 55.0, 112.0, 224


def _maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spot_table(folder: Path, section: str):
    """The measured spots of the section as a plain AnnData (raw counts, centres in pixels of the JPEG)."""
    import anndata as ad
    import pandas as pd

    counts = pd.read_csv(folder / section / f"{section}_counts.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(folder / section / f"{section}_spots.tsv", sep="\t")
    spots = spots[spots["selected"] == 1]
    spots.index = spots["x"].astype(int).astype(str) + "x" + spots["y"].astype(int).astype(str)
    shared = counts.index.intersection(spots.index)
    adata = ad.AnnData(counts.loc[shared].to_numpy(np.float32))
    adata.obs_names = [f"{section}_{i}" for i in shared]
    adata.var_names = counts.columns.astype(str)
    adata.obsm["spatial"] = spots.loc[shared, ["pixel_x", "pixel_y"]].to_numpy(float)
    return adata


def run_st_from_he(args) -> dict:
    import st_from_he as sth

    adata = _spot_table(Path(args.data), args.section)

    def pipeline(image, spots):
        sdata = sth.pp.attach_histology(
            spots, image, pixel_size_um=args.pixel_size, sample_id=args.section, technology="st"
        )
        key = sth.pp.spot_grid(
            sdata, f"{args.section}_image", spacing_um=SPACING_UM, diameter_um=DIAMETER_UM, tissue_only=False
        )
        dataset = sth.pp.extract_patches(sdata, size_um=SIZE_UM, size_px=SIZE_PX, shapes_key=key)
        dataset._level_array(args.section, dataset.levels[args.section][0])  # decode (to_numpy would do it anyway)
        decoded = time.perf_counter()
        return dataset.to_numpy(), dataset.spatial, decoded

    return _timed(pipeline, adata, args)


def run_squidpy(args) -> dict:
    import anndata as ad
    import squidpy as sq
    from PIL import Image

    from st_from_he.pp._patches import empty_uint8

    side = SIZE_UM / args.pixel_size  # patch side in pixels
    radius = math.ceil(side / 2) + 2  # the patch plus the bilinear filter's margin

    def spots_at(centres):
        adata = ad.AnnData(np.zeros((len(centres), 1), np.float32))
        adata.obs_names = [str(i) for i in range(len(centres))]
        adata.obsm["spatial"] = centres
        adata.uns["spatial"] = {args.section: {"scalefactors": {"spot_diameter_fullres": float(2 * radius)}}}
        return adata

    def pipeline(image, spots):
        centres = spots.obsm["spatial"]
        img = sq.im.ImageContainer(image, layer="image", lazy=False)
        decoded = time.perf_counter()
        out = empty_uint8((len(centres), 3, SIZE_PX, SIZE_PX))  # allocated as st_from_he allocates its output
        crops = img.generate_spot_crops(
            spots, library_id=args.section, as_array="image", squeeze=True, cval=np.uint8(255)
        )
        for i, crop in enumerate(crops):
            cx, cy = centres[i]
            ox, oy = int(cx) - radius, int(cy) - radius  # squidpy's crop origin (crop_center -> crop_corner)
            box = (cx - side / 2 - ox, cy - side / 2 - oy, cx + side / 2 - ox, cy + side / 2 - oy)
            resized = Image.fromarray(np.asarray(crop)).resize((SIZE_PX, SIZE_PX), Image.BILINEAR, box=box)
            out[i] = np.moveaxis(np.asarray(resized), -1, 0)
        return out, centres, decoded

    return _timed(pipeline, spots_at(np.load(args.centres)), args, warmup_spots=spots_at)


def _timed(pipeline, spots, args, warmup_spots=None) -> dict:
    """Warm up on a small image (imports, compiled code), then time one run on the section."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small.jpg"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (2200, 2200, 3), dtype=np.uint8)).save(small)
        xy = rng.uniform(200, 2000, (20, 2))
        if warmup_spots is None:
            warm_spots = spots[:20].copy()
            warm_spots.obsm["spatial"] = xy
        else:
            warm_spots = warmup_spots(xy)
        pipeline(str(small), warm_spots)
    base = _maxrss_mb()
    start = time.perf_counter()
    patches, centres, decoded = pipeline(args.image, spots)
    seconds = time.perf_counter() - start
    peak = _maxrss_mb()
    np.save(args.out, patches)
    if not Path(args.centres).exists():
        np.save(args.centres, centres)
    return {"seconds": seconds, "decode_seconds": decoded - start, "n": len(patches), "peak_mb": peak, "base_mb": base}


def _child(side: str, args, workdir: Path, repeat: int) -> dict:
    out = workdir / f"{side}.npy"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        side,
        "--data",
        args.data,
        "--section",
        args.section,
        "--pixel-size",
        str(args.pixel_size),
        "--out",
        str(out),
        "--centres",
        str(workdir / "centres.npy"),
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"{side} run {repeat} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    parser.add_argument("--section", default="C6")
    parser.add_argument("--pixel-size", type=float, default=None, help="um per pixel (default: from the spot grid)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["st_from_he", "squidpy"])
    parser.add_argument("--out")
    parser.add_argument("--centres")
    args = parser.parse_args()
    args.image = str(Path(args.data) / args.section / f"{args.section}_HE.jpg")
    if args.child:
        result = run_st_from_he(args) if args.child == "st_from_he" else run_squidpy(args)
        print(json.dumps(result))
        return

    if args.pixel_size is None:
        from st_from_he.io._resolution import infer_pixel_size

        args.pixel_size = infer_pixel_size(_spot_table(Path(args.data), args.section).obsm["spatial"], "st")
    results: dict[str, list[dict]] = {"st_from_he": [], "squidpy": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for repeat in range(args.repeats):
            for side in results:  # st_from_he first: it writes the centres squidpy uses
                results[side].append(_child(side, args, workdir, repeat))
                r = results[side][-1]
                print(
                    f"run {repeat + 1}/{args.repeats} {side}: {r['seconds']:.2f} s ({r['decode_seconds']:.2f} s to "
                    f"the decoded image)",
                    flush=True,
                )
        ours = np.load(workdir / "st_from_he.npy")
        theirs = np.load(workdir / "squidpy.npy")
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    if diff.max() > 1:
        raise SystemExit(f"The two pipelines disagree: pixels differ by up to {diff.max()} grey levels.")
    report = _report(args, results, ours.shape, int(diff.max()), float((diff > 0).mean()))
    print(report)
    target = HERE / "results" / "patches.md"
    target.parent.mkdir(exist_ok=True)
    target.write_text(report)
    print(f"Wrote {target}")


def _report(args, results, shape, max_diff: int, frac_diff: float) -> str:
    rows = []
    for side, label in (("st_from_he", "st_from_he"), ("squidpy", "squidpy 1.8 + PIL resize per crop")):
        best = min(results[side], key=lambda r: r["seconds"])
        n = best["n"]
        rows.append(
            (
                label,
                n,
                best["seconds"],
                n / best["seconds"],
                best["decode_seconds"],
                best["seconds"] - best["decode_seconds"],
                max(r["peak_mb"] for r in results[side]),
                min(r["base_mb"] for r in results[side]),
            )
        )
    ratio = rows[0][3] / rows[1][3]
    cut_ratio = rows[1][5] / rows[0][5]
    lines = [
        "# Patch extraction speed",
        "",
        f"Patches of {SIZE_UM:g} um resampled to {SIZE_PX} px around every point of a {SPACING_UM:g} um square grid "
        f"over the whole her2st section {args.section} ({shape[0]} pseudo-spots, glass included), from the JPEG "
        f"file ({args.pixel_size:.3f} um/px, 92 megapixels) to one in-memory uint8 array of shape {tuple(shape)}, "
        f"JPEG decoding included. Each side runs in its own process, warmed up on a small image first (imports and "
        f"compiled code are not timed). Times: the best of {args.repeats} processes, split into reading the file "
        f"up to the decoded image, and cutting and resampling the patches. Peak memory: maximum resident set size "
        f"of the process (after imports and warm-up: the baseline).",
        "",
        "- **st_from_he**: `sth.pp.attach_histology` (the section's spots and the JPEG) + `sth.pp.spot_grid` + "
        "`sth.pp.extract_patches(...).to_numpy()`.",
        "- **squidpy**: `sq.im.ImageContainer(path, lazy=False)` + `generate_spot_crops` at the same centres (crops "
        "covering each patch and the filter's margin, white padding) + `PIL.Image.resize(..., BILINEAR, box=...)` "
        "per crop, into an output array allocated the same way. With the default `lazy=True` squidpy decodes the JPEG again for "
        "every crop (about 150 s for 200 spots here).",
        "",
        "| pipeline | patches | total (s) | patches / s | to decoded image (s) | cut + resample (s) | peak RSS (MB) "
        "| RSS baseline (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.0f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.0f} | {r[7]:.0f} |"
        for r in rows
    ]
    lines += [
        "",
        f"Throughput ratio st_from_he / squidpy: **{ratio:.1f}x** end to end; **{cut_ratio:.1f}x** for cutting and "
        f"resampling alone. Pixels: maximum absolute difference {max_diff} (fraction of differing values "
        f"{frac_diff:.2%}).",
        "",
        f"Hardware: {platform.machine()}, {os.cpu_count()} CPU core(s), Python {platform.python_version()}, "
        f"{platform.system()} (a virtual machine on which touching memory for the first time costs about 3 s per "
        f"GB, page by page; both sides pay it for the decoded image).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
