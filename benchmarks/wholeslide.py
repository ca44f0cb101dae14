"""Whole-slide prediction at 40x (0.25 um/px) from pyramidal tiled TIFFs of 20k, 40k and 60k px a side.

Run (each step under the benchmark lock; the build and train steps keep their files for the next)::

    python benchmarks/wholeslide.py --step build
    python benchmarks/wholeslide.py --step train
    python benchmarks/wholeslide.py --step predict     # writes results/wholeslide.md, then deletes the slides

or all at once with ``--step all``. Options: ``--data`` (her2st folder), ``--sizes``, ``--tmp``, ``--keep``.

The slides. her2st has no 40x scan, so each slide is built from the real sections' H&E (0.688 um/px, about
9,300 x 9,900 px). The plane is cut into cells of 20,000 x 20,000 px (5 x 5 mm at 0.25 um/px); cell ``k`` (row
major) shows the centre 5 x 5 mm of section ``SECTIONS[k % 6]`` (B4, C2, C3, C4, C5, C6, B4, ...), resampled up by
0.688 / 0.25 = 2.752 with PIL's bilinear resize (``Image.resize(..., BILINEAR, box=...)``), after white-balancing
each section so that its glass is grey 242 (the sections' glass ranges from white to lavender; one slide has one
glass colour). A 20k slide is one cell, 40k a 2 x 2 mosaic, 60k a 3 x 3 mosaic, so the share of tissue is about the
same at every size and the number of spots grows with the area. Each file is an OME-TIFF (``PhysicalSizeX`` 0.25 um)
written tile by tile from a generator, so the writer never holds a level: tiles of 512 x 512 px, JPEG quality 90,
RGB; level 0 and 2x coarser levels as SubIFDs down to about 1,000 px, each level resampled straight from the source
sections at its own resolution (the filter antialiases when it shrinks). Files go to ``--tmp`` (default ``/tmp``,
about 0.6 GB for the three) and are deleted after the predict step unless ``--keep``.

The measurement. A ``default``-preset model over :func:`st_from_he.pp.select_genes` of C2-C5 (``n_top=200`` per
section, their union: about 750 genes) is fitted once on 300 of their spots for one epoch (accuracy is not the point
here) and saved. Then, for each slide, a fresh process (so that its peak memory, ``ru_maxrss``, is its own) does what
a user does, timed from reading the file to the finished table: ``sth.io.read_image`` (resolution read from the OME
metadata), ``sth.pp.spot_grid`` (100 um square grid, 55 um spots, points on tissue only, the tissue found by
:func:`st_from_he.pp.detect_tissue`) and ``sth.tl.predict_expression(..., shapes_key=...)``. The baseline, measured
in the same run on the smallest slide, is the same code with the decoded-tile cache off
(``sth.settings.tile_cache_gb = 0``): each batch of 64 windows decodes the TIFF tiles under it again, which is what
the code did before the cache.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
SECTIONS = ("B4", "C2", "C3", "C4", "C5", "C6")
SOURCE_UM = 0.688  # her2st scans, micrometres per pixel
TARGET_UM = 0.25  # 40x
CELL_PX = 20_000  # one mosaic cell, level-0 pixels (5 mm)
TILE = 512
SMALLEST_LEVEL_PX = 1024


def _sources(data: Path, names: list[str]):
    """The sections' H&E as PIL images, each white-balanced so that its glass is grey 242.

    The sections' glass differs (white to lavender): a mosaic of them would be a slide with several glass colours,
    which no scanner makes and which misleads a tissue threshold over the whole slide. Each channel is scaled by
    242 / the section's glass colour (:func:`st_from_he.models.glass_colour` of every 8th pixel).
    """
    import imagecodecs
    from PIL import Image

    from st_from_he.models import glass_colour

    out = {}
    for name in names:
        pixels = imagecodecs.jpeg8_decode((data / name / f"{name}_HE.jpg").read_bytes())
        glass = glass_colour(np.moveaxis(pixels[::8, ::8], -1, 0))
        levels = np.arange(256)
        lut = [min(255, round(v * 242 / g)) for g in glass for v in levels]
        out[name] = Image.fromarray(pixels).point(lut)
    return out


def _tiles(side: int, level: int, sources: dict, n_cells: int):
    """Tiles (row major, ``(512, 512, 3)`` uint8) of one level of a ``side`` x ``side`` mosaic."""
    from PIL import Image

    factor = 2**level
    n = math.ceil(side / factor)
    zoom = SOURCE_UM / TARGET_UM  # level-0 pixels per source pixel
    for y0 in range(0, n, TILE):
        for x0 in range(0, n, TILE):
            h, w = min(TILE, n - y0), min(TILE, n - x0)
            tile = np.full((TILE, TILE, 3), 255, np.uint8)
            # level-0 extent of this tile, split along the mosaic's cells
            ly0, ly1, lx0, lx1 = y0 * factor, (y0 + h) * factor, x0 * factor, (x0 + w) * factor
            for cy in range(ly0 // CELL_PX, min(n_cells, -(-ly1 // CELL_PX))):
                for cx in range(lx0 // CELL_PX, min(n_cells, -(-lx1 // CELL_PX))):
                    src = sources[SECTIONS[(cy * n_cells + cx) % len(SECTIONS)]]
                    # the part of the tile inside this cell, in level pixels of the tile
                    r0 = (max(ly0, cy * CELL_PX) - ly0) // factor
                    r1 = -(-(min(ly1, (cy + 1) * CELL_PX) - ly0) // factor)
                    c0 = (max(lx0, cx * CELL_PX) - lx0) // factor
                    c1 = -(-(min(lx1, (cx + 1) * CELL_PX) - lx0) // factor)
                    # the cell shows the centre CELL_PX / zoom source pixels of its section
                    oy = (src.height - CELL_PX / zoom) / 2 - cy * CELL_PX / zoom
                    ox = (src.width - CELL_PX / zoom) / 2 - cx * CELL_PX / zoom
                    box = (
                        max(0.0, ox + (lx0 + c0 * factor) / zoom),
                        max(0.0, oy + (ly0 + r0 * factor) / zoom),
                        min(src.width, ox + (lx0 + c1 * factor) / zoom),
                        min(src.height, oy + (ly0 + r1 * factor) / zoom),
                    )
                    # PIL's bilinear resize with a box: a triangle filter that antialiases when it shrinks
                    tile[r0:r1, c0:c1] = np.asarray(src.resize((c1 - c0, r1 - r0), Image.BILINEAR, box=box))
            yield tile


def build_slide(path: Path, side: int, data: Path) -> dict:
    """Write the ``side`` x ``side`` mosaic slide as a pyramidal tiled OME-TIFF; seconds and bytes."""
    import tifffile

    n_cells = math.ceil(side / CELL_PX)
    names = sorted({SECTIONS[k % len(SECTIONS)] for k in range(n_cells * n_cells)})
    start = time.perf_counter()
    sources = _sources(data, names)
    n_levels = 1
    while math.ceil(side / 2**n_levels) >= SMALLEST_LEVEL_PX:
        n_levels += 1
    options = {
        "dtype": np.uint8,
        "tile": (TILE, TILE),
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": 90},
    }
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(
            _tiles(side, 0, sources, n_cells),
            shape=(side, side, 3),
            subifds=n_levels - 1,
            metadata={
                "axes": "YXS",
                "PhysicalSizeX": TARGET_UM,
                "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": TARGET_UM,
                "PhysicalSizeYUnit": "µm",
            },
            **options,
        )
        for level in range(1, n_levels):
            n = math.ceil(side / 2**level)
            tif.write(_tiles(side, level, sources, n_cells), shape=(n, n, 3), subfiletype=1, **options)
    return {"build_s": time.perf_counter() - start, "bytes": path.stat().st_size, "levels": n_levels}


def train_model(data: str, model_dir: str) -> dict:
    """Fit a small ``default`` model (200 genes, 300 spots of C2-C5, one epoch) and save it."""
    import torch

    import st_from_he as sth

    torch.set_num_threads(2)
    train = sth.datasets.her2st(["C2", "C3", "C4", "C5"], path=data)
    genes = sth.pp.select_genes(train, n_top=200)
    names = train.tables["table"].obs_names
    spots = list(names[np.random.default_rng(0).permutation(len(names))[:300]])
    model = sth.tl.ExpressionModel(genes, preset="default")
    start = time.perf_counter()
    model.fit(train, max_epochs=1, patience=None, progress_bar=False, spots=spots)
    model.save(model_dir, overwrite=True)
    return {"fit_s": time.perf_counter() - start, "n_genes": len(genes)}


def predict_slide(path: str, model_dir: str, tile_cache_gb: str) -> dict:
    """Read the slide, grid it over tissue, predict; spots, seconds and this process's peak memory."""
    import torch

    import st_from_he as sth

    torch.set_num_threads(2)
    if tile_cache_gb != "default":
        sth.settings.tile_cache_gb = float(tile_cache_gb)
    model = sth.tl.ExpressionModel.load(model_dir, device="cpu")
    start = time.perf_counter()
    slide = sth.io.read_image(path, sample_id="slide")
    key = sth.pp.spot_grid(slide, "slide_image", spacing_um=100, diameter_um=55, tissue_only=True)
    grid_s = time.perf_counter() - start
    sth.tl.predict_expression(slide, model, shapes_key=key, progress_bar=False)
    wall = time.perf_counter() - start
    table = slide.tables["predicted_expression"]
    return {
        "spots": table.n_obs,
        "grid_s": grid_s,
        "wall_s": wall,
        "spots_per_s": table.n_obs / wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "finite": bool(np.isfinite(table.X).all()),
    }


def read_patches(path: str, model_dir: str, tile_cache_gb: str) -> dict:
    """Only cut the grid's patches (the model's geometry), in batches of 64 as prediction reads them."""
    import st_from_he as sth

    if tile_cache_gb != "default":
        sth.settings.tile_cache_gb = float(tile_cache_gb)
    model = sth.tl.ExpressionModel.load(model_dir, device="cpu")
    slide = sth.io.read_image(path, sample_id="slide")
    key = sth.pp.spot_grid(slide, "slide_image", spacing_um=100, diameter_um=55, tissue_only=True)
    patches = sth.pp.extract_patches(
        slide, size_um=model.size_um, size_px=model.size_px, context=tuple(model.context), shapes_key=key
    )
    start = time.perf_counter()
    for i in range(0, len(patches), 64):
        patches[i : i + 64]
    wall = time.perf_counter() - start
    return {
        "spots": len(patches),
        "read_s": wall,
        "read_spots_per_s": len(patches) / wall,
        "levels": [int(lv) for lv in patches.levels["slide"]],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _in_subprocess(func: str, *args: str) -> dict:
    """Run one step in a fresh process, so its peak memory and imports are its own."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import wholeslide; "
        f"print(json.dumps(wholeslide.{func}(*{args!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise RuntimeError(f"{func}{args} failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    parser.add_argument("--all-sizes", type=int, nargs="+", default=[20_000, 40_000, 60_000], help="sides in px")
    parser.add_argument("--sizes", type=int, nargs="+", help="only these of --all-sizes in this run (default all)")
    parser.add_argument(
        "--baseline-size", type=int, default=60_000, help="slide also predicted with the tile cache off"
    )
    parser.add_argument("--tmp", default="/tmp", help="folder for the slides (about 0.4 GB for 60k px)")
    parser.add_argument(
        "--step",
        choices=["all", "build", "train", "predict"],
        default="all",
        help="run one step only (each keeps its files for the next; the last run without --keep deletes them)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the slides and model for a later step")
    args = parser.parse_args()
    args.sizes = args.sizes or args.all_sizes

    work = Path(args.tmp) / "st_from_he_wholeslide"
    work.mkdir(parents=True, exist_ok=True)
    slides_all = {side: work / f"mosaic_{side}.ome.tif" for side in args.all_sizes}
    slides = {side: slides_all[side] for side in args.sizes}
    model_dir = work / "model"
    keep = args.keep or args.step in ("build", "train")
    if args.step in ("all", "build"):
        for stale in work.glob("result_*.json"):  # measurements of an earlier run
            stale.unlink()
        for side, path in slides.items():
            if not path.exists():
                built = _in_subprocess("build_slide_cli", str(path), str(side), args.data)
                (work / f"{path.name}.json").write_text(json.dumps(built))
                print(f"built {path.name}: {built}", flush=True)
    if args.step in ("all", "train") and not model_dir.exists():
        fit = _in_subprocess("train_model", args.data, str(model_dir))
        (work / "model.json").write_text(json.dumps(fit))
        print(f"model: {fit}", flush=True)
    if args.step in ("all", "predict"):
        missing = [str(p) for p in [*slides.values(), model_dir] if not p.exists()]
        if missing:
            raise FileNotFoundError(f"Missing {missing}: run the build and train steps first.")
        for side in args.sizes:
            result = _in_subprocess("predict_slide", str(slides[side]), str(model_dir), "default")
            result["read"] = _in_subprocess("read_patches", str(slides[side]), str(model_dir), "default")
            result["read_off"] = _in_subprocess("read_patches", str(slides[side]), str(model_dir), "0")
            if side == args.baseline_size:
                result["off"] = _in_subprocess("predict_slide", str(slides[side]), str(model_dir), "0")
            (work / f"result_{side}.json").write_text(json.dumps(result))
            print(f"{side}: {result}", flush=True)
        done = sorted(int(f.stem.removeprefix("result_")) for f in work.glob("result_*.json"))
        if set(args.all_sizes) <= set(done):
            results = {side: json.loads((work / f"result_{side}.json").read_text()) for side in args.all_sizes}
            builds = {side: json.loads((work / f"{slides_all[side].name}.json").read_text()) for side in results}
            model = json.loads((work / "model.json").read_text())
            _write_results(builds, model, results, args.baseline_size)
        else:
            keep = True  # the other sizes' step is still to run
    if not keep:  # only after a run that finished: a failed one keeps its files to look at
        shutil.rmtree(work, ignore_errors=True)


def build_slide_cli(path: str, side: str, data: str) -> dict:
    return build_slide(Path(path), int(side), Path(data))


def _write_results(builds, model, results, baseline_size) -> None:
    off = results[baseline_size]["off"]
    lines = [
        "Prediction on a 100 um pseudo-spot grid over the tissue of pyramidal tiled OME-TIFFs at 0.25 um/px (40x), "
        "built from the real her2st sections as `benchmarks/wholeslide.py` says: mosaics of 5 x 5 mm cells, each the "
        "centre of a section (B4, C2-C6 in turn) white-balanced and resampled up by 0.688 / 0.25 = 2.752; 512 px JPEG "
        f"tiles; 2x pyramid written tile by tile. `default` preset over {model['n_genes']} genes (fitted on 300 spots "
        "of C2-C5, one epoch), 2 CPU threads, no GPU. Each measurement in a fresh process; peak RSS is the process's "
        "`ru_maxrss` (Python, torch and the model included).",
        "",
        "**Whole slide**, timed from `sth.io.read_image` through `sth.pp.spot_grid` (tissue only) to the finished "
        "table of `sth.tl.predict_expression`, every spot of the grid predicted. Baseline, measured in the same run: "
        f"the {baseline_size:,} px slide with the decoded-tile cache off (`sth.settings.tile_cache_gb = 0`: each "
        "batch of 64 windows decodes its TIFF tiles again, as before the cache); the rows use the default 0.25 GB.",
        "",
        "| slide (px) | file (MB) | levels read (um/px) | spots | grid (s) | total (s) | spots/s | peak RSS (MB) | "
        "spots/s vs baseline (same slide) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = off["spots_per_s"]

    def level_um(r):
        return ", ".join(f"{0.25 * 2**lv:g}" for lv in r["read"]["levels"])

    def row(label, side, r):
        ratio = f"{r['spots_per_s'] / base:.2f}x" if side == baseline_size else "-"
        return (
            f"| {label} | {builds[side]['bytes'] / 1e6:.0f} | {level_um(results[side])} | {r['spots']:,} | "
            f"{r['grid_s']:.1f} | {r['wall_s']:.1f} | {r['spots_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {ratio} |"
        )

    lines.append(row(f"{baseline_size:,}, tile cache off (baseline)", baseline_size, off))
    for side, r in results.items():
        lines.append(row(f"{side:,}", side, r))
    lines += [
        "",
        "**Patch reading only**: the same grid's patches (112 um at 112 px, and the 3x context) cut in batches of 64, "
        "as prediction reads them, after `read_image` and `spot_grid`; cache off against the default cache, each in "
        "its own process. Levels up to 512 MB are decoded whole (the same either way); larger ones are read window by "
        "window, which is where the cache works.",
        "",
        "| slide (px) | spots | cache off: spots/s | peak RSS (MB) | cache on: spots/s | peak RSS (MB) | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, r in results.items():
        a, b = r["read_off"], r["read"]
        lines.append(
            f"| {side:,} | {b['spots']:,} | {a['read_spots_per_s']:.0f} | {a['peak_rss_mb']:.0f} | "
            f"{b['read_spots_per_s']:.0f} | {b['peak_rss_mb']:.0f} | {b['read_spots_per_s'] / a['read_spots_per_s']:.2f}x |"
        )
    sides = list(results)
    peaks = [results[side]["peak_rss_mb"] for side in sides]
    largest = results[sides[-1]]
    lines += [
        "",
        f"Peak RSS over the slides: {min(peaks):.0f} to {max(peaks):.0f} MB for {sides[0]:,} to {sides[-1]:,} px "
        f"({sides[-1] ** 2 / sides[0] ** 2:.0f}x the pixels, {largest['spots'] / results[sides[0]]['spots']:.1f}x the "
        "spots). What is decoded whole is bounded (a level only when it is at most 512 MB, and the tiles within "
        "`tile_cache_gb`); what still grows with the slide is the per-spot output (expression of every gene and the "
        "embeddings, kept until the table is written). Cutting the patches takes "
        f"{largest['read']['read_s']:.1f} s of the {largest['wall_s']:.0f} s of the {sides[-1]:,} px slide "
        f"({100 * largest['read']['read_s'] / largest['wall_s']:.0f}%): whole-slide time is the model's.",
    ]
    text = "\n".join(lines)
    print(text)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "wholeslide.md").write_text("# Whole-slide prediction at 40x\n\n" + text + "\n")


if __name__ == "__main__":
    main()
