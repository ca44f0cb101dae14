"""Shared plotting helpers: one house style, axes given or made, showing and saving, spots over their image."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ._layout import Overview, SpotLayout

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

PLOT_DOCS = {
    "plot_output": """\
    ax
        Axes to draw into{ax_note}; a new figure otherwise.
    show
        Show the figure (:func:`matplotlib.pyplot.show`). ``None``: show it unless ``return_fig`` or ``ax`` is
        given (scanpy's convention).
    save
        File to save the figure to (format from the suffix, e.g. ``.png``, ``.pdf``, ``.svg``).
    return_fig
        Return the :class:`~matplotlib.figure.Figure`.

    Returns
    -------
    The figure if ``return_fig``; else the axes drawn into when the figure is not shown; else ``None``.""",
    "image_params": """\
    image
        What to draw under the spots. ``True``: the section's image, found through the shapes' coordinate systems
        (none found, e.g. for an AnnData without ``uns["spatial"]``: spots alone); ``False``: spots alone; the name of
        an image element (for an AnnData: of an image in ``uns["spatial"][library]["images"]``, e.g. ``"hires"``);
        or an image itself: an array (``y, x[, c]`` or ``c, y, x``) or an image element, whose pixels are the spot
        positions' units times ``scale_factor``.
    scale_factor
        Image pixels per unit of the spot positions, for an image passed as an array or element (default 1) or an
        AnnData's ``uns["spatial"]`` image (default its ``tissue_{{res}}_scalef``).
    spatial_key
        For an AnnData only: ``obsm`` key of the spot positions, used as they stand (after squidpy's SpatialData
        route they are in coordinate-system units, e.g. micrometres: set ``scale_factor`` to match the image, or pass
        the SpatialData). With a SpatialData, positions always come from the shapes the table annotates and their
        transformations, never from ``obsm``.""",
}
"""Docstring fragments of the plots (``{name}`` placeholders)."""


def plot_docs(ax_note: str = ""):
    """Fill :data:`PLOT_DOCS` placeholders of a plot's docstring; ``ax_note`` says what ``ax`` takes."""

    def decorate(func):
        doc = func.__doc__ or ""
        for name, text in PLOT_DOCS.items():
            doc = doc.replace(f"    {{{name}}}", text.replace("{ax_note}", ax_note).replace("{{res}}", "{res}"))
        func.__doc__ = doc
        return func

    return decorate


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


def given_axes(ax, n: int, what: str) -> np.ndarray | None:
    """``ax`` (one Axes or a sequence) as a flat array of ``n`` Axes; ``None`` when no axes are given."""
    from matplotlib.axes import Axes

    if ax is None:
        return None
    axes = np.array([ax], dtype=object) if isinstance(ax, Axes) else np.asarray(list(np.ravel(ax)), dtype=object)
    if not all(isinstance(a, Axes) for a in axes):
        raise TypeError(f"`ax` must be a matplotlib Axes or a sequence of Axes, got {type(ax).__name__}.")
    if len(axes) != n:
        raise ValueError(f"`ax`: {what} takes {n} Axes, got {len(axes)}.")
    return axes


def finish(
    fig: Figure,
    axes,
    *,
    show: bool | None,
    save: str | Path | None,
    return_fig: bool,
    own_figure: bool,
    dpi: int | None = None,
):
    """Save, show and return as scanpy does: the figure if ``return_fig``, else the axes when not shown, else ``None``.

    ``show=None`` shows the figure only when this function made it and the caller does not take it back.
    """
    import matplotlib.pyplot as plt

    if save is not None:
        if not isinstance(save, str | Path):
            raise TypeError(f"`save` must be a file path, got {type(save).__name__} {save!r}.")
        save = Path(save)
        save.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, dpi=dpi)
    if show is None:
        show = own_figure and not return_fig
    if show:
        plt.show()
    if return_fig:
        return fig
    if show:
        return None
    axes = [a for a in np.ravel(np.asarray(axes, dtype=object)) if a.get_visible()]
    return axes[0] if len(axes) == 1 else axes


def resolve_sample(available: Sequence[str] | None, sample: str | None, what: str) -> str | None:
    """``sample`` if it is among ``available``; the only sample when ``None``; a clear error otherwise.

    ``available`` is ``None`` for a table that names no section (no ``obs["sample"]`` and no region): all its rows
    are one section, and ``sample`` must be ``None``.
    """
    if available is None:
        if sample is not None:
            raise KeyError(
                f"{what} names no sections (no obs['sample'] and no region column), so `sample` cannot apply."
            )
        return None
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


def titled(sample: str | None, text: str) -> str:
    """``"{sample}: {text}"``, or ``text`` alone when the section has no name."""
    return text if sample is None else f"{sample}: {text}"


def spot_bounds(xy: np.ndarray, radius: float, margin: float = 1.5) -> tuple[float, float, float, float]:
    """``x0, x1, y0, y1`` around the spots, with ``margin`` spot radii to spare."""
    pad = margin * radius
    lo, hi = np.nanmin(xy, axis=0), np.nanmax(xy, axis=0)
    return float(lo[0] - pad), float(hi[0] + pad), float(lo[1] - pad), float(hi[1] + pad)


def draw_section(
    ax: Axes,
    layout: SpotLayout,
    values: np.ndarray | None = None,
    *,
    radius: float | None = None,
    cmap=None,
    norm=None,
    image: Overview | None = None,
    image_alpha: float = 1.0,
    spot_alpha: float = 1.0,
    scalebar: bool = True,
):
    """Draw the image overview (if any) and the spots coloured by ``values``; returns the spots' collection."""
    from matplotlib.collections import EllipseCollection

    xy = layout.xy
    radius = layout.radius if radius is None else radius
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
    if scalebar and layout.um_per_unit is not None:
        add_scalebar(ax, layout.um_per_unit, bounds, xy, radius)
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
    um: float,
    bounds: tuple[float, float, float, float],
    xy: np.ndarray | None = None,
    radius: float = 0.0,
) -> None:
    """A scale bar of a round length (about a fifth of the view) in the corner with fewest spots.

    ``um`` is micrometres per data unit of ``ax``.
    """
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

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
