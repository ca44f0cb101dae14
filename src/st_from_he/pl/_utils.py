"""Shared plotting helpers: one house style, saving, the section image at overview resolution, spots as circles."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from st_from_he._sdata import SAMPLE_KEY, image_key

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "regular",
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.title_fontsize": 8,
    "legend.frameon": False,
    "figure.titlesize": 11,
    "figure.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "image.interpolation": "antialiased",
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "savefig.facecolor": "white",
    "figure.facecolor": "white",
}
"""Matplotlib settings every ``sth.pl`` function draws with."""

EXPRESSION_LABEL = "log1p(CP10k)"
OVERVIEW_MAX_SIDE = 1500
"""The overview image is the finest pyramid level whose longer side is at most this many pixels."""


def styled(func):
    """Run a plotting function under :data:`STYLE` (fonts are fixed when text is created, so the style sticks)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        import matplotlib.pyplot as plt

        with plt.rc_context(STYLE):
            return func(*args, **kwargs)

    return wrapper


def new_figure(nrows: int = 1, ncols: int = 1, *, panel_size: tuple[float, float] = (3.2, 3.2), **kwargs):
    """A constrained-layout figure of ``nrows`` x ``ncols`` panels of ``panel_size`` inches (axes squeezed off)."""
    import matplotlib.pyplot as plt

    width, height = panel_size
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows), layout="constrained", squeeze=False, **kwargs
    )
    return fig, axes


def finish(fig: Figure, *, save: str | Path | None, return_fig: bool, dpi: int | None = None):
    """Save ``fig`` if asked; return it if asked, else ``None`` (Jupyter shows it either way)."""
    if save is not None:
        save = Path(save)
        save.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, dpi=dpi)
    return fig if return_fig else None


def resolve_sample(available: Sequence[str], sample: str | None, what: str) -> str:
    """``sample`` if it is among ``available``; the only sample when ``None``; a clear error otherwise."""
    available = list(dict.fromkeys(available))
    if not available:
        raise ValueError(f"{what} has no spots.")
    if sample is None:
        if len(available) > 1:
            raise ValueError(f"{what} covers several sections {available}; pass `sample=` to choose one.")
        return available[0]
    if sample not in available:
        raise KeyError(f"No sample {sample!r} in {what}; samples present: {available}.")
    return sample


def table_samples(table: AnnData) -> np.ndarray:
    """Sample of every row of a table (the region when there is no ``obs["sample"]``)."""
    from st_from_he.tl._evaluate import _keys

    if SAMPLE_KEY in table.obs:
        return table.obs[SAMPLE_KEY].astype(str).to_numpy()
    return table.obs[_keys(table)[0]].astype(str).to_numpy()


def _levels(element) -> list:
    """The ``(c, y, x)`` DataArrays of an image element, finest first."""
    import xarray as xr

    if isinstance(element, xr.DataArray):
        return [element]
    names = sorted(element.children, key=lambda name: int("".join(ch for ch in name if ch.isdigit()) or 0))
    return [next(iter(element[name].to_dataset().data_vars.values())) for name in names]


def overview_image(
    sdata: SpatialData,
    sample: str,
    bounds: tuple[float, float, float, float] | None = None,
    *,
    max_side: int = OVERVIEW_MAX_SIDE,
) -> tuple[np.ndarray, tuple[float, float, float, float]] | None:
    """The section's H&E at overview resolution, cropped to ``bounds`` (``x0, x1, y0, y1`` in full-resolution pixels).

    Picks the finest pyramid level whose longer side is at most ``max_side`` (else the coarsest, strided), so a
    whole-slide image is never read at full resolution. Returns ``(rgb, extent)`` with ``rgb`` a ``(y, x, 3)`` uint8
    array and ``extent`` its ``(left, right, bottom, top)`` in full-resolution pixels for :meth:`~Axes.imshow`, or
    ``None`` when the section has no image.
    """
    key = image_key(sample)
    if key not in sdata.images:
        return None
    levels = _levels(sdata.images[key])
    full_h, full_w = levels[0].shape[-2:]
    level = next((lvl for lvl in levels if max(lvl.shape[-2:]) <= max_side), levels[-1])
    data = level.data
    stride = max(1, int(np.ceil(max(data.shape[-2:]) / (2 * max_side))))
    if stride > 1:
        data = data[:, ::stride, ::stride]
    h, w = data.shape[-2:]
    sy, sx = full_h / h, full_w / w  # full-resolution pixels per overview pixel
    x0, x1, y0, y1 = (0.0, float(full_w), 0.0, float(full_h)) if bounds is None else bounds
    c0, c1 = max(0, int(np.floor(x0 / sx))), min(w, int(np.ceil(x1 / sx)))
    r0, r1 = max(0, int(np.floor(y0 / sy))), min(h, int(np.ceil(y1 / sy)))
    if c1 <= c0 or r1 <= r0:
        return None
    crop = np.asarray(data[:3, r0:r1, c0:c1])
    rgb = np.moveaxis(crop, 0, -1)
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    return rgb, (c0 * sx, c1 * sx, r1 * sy, r0 * sy)


def spot_radius(sdata: SpatialData, table: AnnData, rows: np.ndarray, xy: np.ndarray) -> float:
    """Spot radius in full-resolution pixels: from the circles the rows annotate, else 45% of the spot spacing."""
    from st_from_he.tl._evaluate import _keys

    region_key, _ = _keys(table)
    regions = table.obs[region_key].astype(str).to_numpy()[rows]
    for region in dict.fromkeys(regions):
        if region in sdata.shapes and "radius" in sdata.shapes[region]:
            return float(np.median(sdata.shapes[region]["radius"]))
    if len(xy) < 2:
        return 50.0
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(xy).query(xy, k=2)
    return 0.45 * float(np.median(dist[:, 1]))


def spot_bounds(xy: np.ndarray, radius: float, margin: float = 1.5) -> tuple[float, float, float, float]:
    """``x0, x1, y0, y1`` around the spots, with ``margin`` spot radii to spare."""
    pad = margin * radius
    return xy[:, 0].min() - pad, xy[:, 0].max() + pad, xy[:, 1].min() - pad, xy[:, 1].max() + pad


def draw_section(
    ax: Axes,
    sdata: SpatialData,
    sample: str,
    xy: np.ndarray,
    radius: float,
    values: np.ndarray | None = None,
    *,
    cmap=None,
    norm=None,
    image: tuple[np.ndarray, tuple] | None = None,
    image_alpha: float = 1.0,
    spot_alpha: float = 1.0,
    scalebar: bool = True,
):
    """Draw the H&E overview (if any) and the spots coloured by ``values``; returns the spots' collection."""
    from matplotlib.collections import EllipseCollection

    bounds = spot_bounds(xy, radius)
    if image is not None:
        rgb, extent = image
        ax.imshow(rgb, extent=extent, alpha=image_alpha, zorder=0)
    diameters = np.full(len(xy), 2 * radius)
    spots = EllipseCollection(
        diameters,
        diameters,
        np.zeros(len(xy)),
        units="xy",
        offsets=xy,
        offset_transform=ax.transData,
        cmap=cmap,
        norm=norm,
        alpha=spot_alpha,
        linewidths=0.4,
        edgecolors="white",
        zorder=2,
    )
    if values is not None:
        spots.set_array(np.asarray(values, dtype=float))
    ax.add_collection(spots)
    ax.set_xlim(bounds[0], bounds[1])
    ax.set_ylim(bounds[3], bounds[2])  # image rows grow downwards
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    if scalebar:
        add_scalebar(ax, sdata, sample, bounds, xy, radius)
    return spots


def _free_corner(xy: np.ndarray, radius: float, bounds: tuple[float, float, float, float], box: tuple[float, float]):
    """The corner of the view (``"lower left"`` first) whose ``box`` (width, height in data units) covers fewest spots."""
    x0, x1, y0, y1 = bounds  # y grows downwards: "lower" is y1
    width, height = box
    corners = {
        "lower left": (x0, x0 + width, y1 - height, y1),
        "lower right": (x1 - width, x1, y1 - height, y1),
        "upper left": (x0, x0 + width, y0, y0 + height),
        "upper right": (x1 - width, x1, y0, y0 + height),
    }

    def covered(area):
        ax0, ax1, ay0, ay1 = area
        inside = (xy[:, 0] + radius > ax0) & (xy[:, 0] - radius < ax1) & (xy[:, 1] + radius > ay0)
        return int((inside & (xy[:, 1] - radius < ay1)).sum())

    return min(corners, key=lambda name: covered(corners[name]))


def add_scalebar(
    ax: Axes,
    sdata: SpatialData,
    sample: str,
    bounds: tuple[float, float, float, float],
    xy: np.ndarray | None = None,
    radius: float = 0.0,
) -> None:
    """A scale bar of a round length (about a fifth of the view) in the corner with fewest spots.

    Drawn when the section's resolution is known (from its image, else its spots).
    """
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    from st_from_he._sdata import pixel_size_um, spots_key

    um = None
    for key in (image_key(sample), spots_key(sample)):
        if key in sdata.images or key in sdata.shapes:
            try:
                um = pixel_size_um(sdata, key, sample)
                break
            except (ValueError, KeyError):
                continue
    if um is None:
        return
    width, height = bounds[1] - bounds[0], bounds[3] - bounds[2]
    target = width * um / 5
    length = max(v for v in (10, 20, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000) if v <= max(target, 10))
    label = f"{length // 1000} mm" if length >= 1000 and length % 1000 == 0 else f"{length} µm"
    loc = (
        "lower left"
        if xy is None
        else _free_corner(xy, radius, bounds, (max(1.4 * length / um, 0.2 * width), 0.1 * height))
    )
    bar = AnchoredSizeBar(
        ax.transData,
        length / um,
        label,
        loc,
        pad=0.4,
        sep=3,
        color="black",
        frameon=True,
        size_vertical=width / 120,
        fontproperties={"size": 7},
    )
    bar.patch.set_alpha(0.6)
    bar.patch.set_edgecolor("none")
    ax.add_artist(bar)


def colorbar_shrink(axes_height_in: float, longest_in: float = 3.0, default: float = 0.8) -> float:
    """Fraction of the axes height a colour bar takes: ``default``, but at most ``longest_in`` inches long."""
    return float(min(default, longest_in / max(axes_height_in, 1e-6)))


def spot_centres(sdata: SpatialData, table: AnnData, rows: np.ndarray) -> np.ndarray:
    """Centres (x, y in full-resolution pixels) of table ``rows``: ``obsm["spatial"]``, else the circles annotated."""
    from st_from_he._sdata import SPATIAL_KEY
    from st_from_he.tl._evaluate import _keys

    if SPATIAL_KEY in table.obsm:
        return np.asarray(table.obsm[SPATIAL_KEY], dtype=float)[rows, :2]
    region_key, instance_key = _keys(table)
    out = np.full((len(rows), 2), np.nan)
    regions = table.obs[region_key].astype(str).to_numpy()[rows]
    ids = table.obs[instance_key].to_numpy()[rows]
    for region in dict.fromkeys(regions):
        if region not in sdata.shapes:
            raise KeyError(
                f"Table rows annotate {region!r}, which is not a shapes element, and obsm['spatial'] is absent."
            )
        geometry = sdata.shapes[region].geometry
        mask = regions == region
        points = geometry.loc[ids[mask]]
        out[mask] = np.c_[points.x.to_numpy(), points.y.to_numpy()]
    return out
