"""Where the tissue is: a low-resolution mask separating stained tissue from empty glass."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np

from st_from_he._logging import logger
from st_from_he._sdata import check_sdata, only_image, systems_of
from st_from_he._validate import check_number

from ._patches import image_of

if TYPE_CHECKING:
    from spatialdata import SpatialData

# Mask resolution: the coarsest pyramid level no coarser than _MAX_MASK_UM, reduced further below _MIN_MASK_UM.
_MAX_MASK_UM = 16.0
_MIN_MASK_UM = 4.0
_SMOOTH_UM = 10.0  # Gaussian blur before thresholding: nuclei and stroma merge into one tissue signal
_CLOSE_UM = 30.0  # closing: bridges thin gaps inside the tissue
_OPEN_UM = 10.0  # opening: removes specks and threads of dirt


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 255.0))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(float)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (mu0 - mu1) ** 2)])


def _triangle(values: np.ndarray, bins: int = 256) -> float:
    """Triangle threshold on the tail above the histogram's peak (the glass).

    The bin farthest below the line from the peak to the end of the tail; suited to one dominant background peak and a
    long, flat tissue tail.
    """
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 255.0))
    centres = (edges[:-1] + edges[1:]) / 2
    peak = int(np.argmax(hist))
    end = int(np.flatnonzero(hist)[-1])
    if end <= peak + 1:
        return float(centres[min(peak + 1, bins - 1)])
    x = np.arange(peak, end + 1, dtype=float)
    y = hist[peak : end + 1].astype(float)
    x1, y1, x2, y2 = float(peak), float(hist[peak]), float(end), float(hist[end])
    distance = np.abs((y2 - y1) * x - (x2 - x1) * y + x2 * y1 - y2 * x1)
    return float(centres[peak + int(np.argmax(distance))])


def _disk(radius: int) -> np.ndarray:
    r = max(int(radius), 1)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx**2 + yy**2 <= r**2


def detect_tissue(
    sdata: SpatialData,
    image_key: str | None = None,
    *,
    pixel_size_um: float | None = None,
    table_key: str | None = None,
    level: int | None = None,
    method: Literal["triangle", "otsu"] = "triangle",
    min_area_um2: float = 5e4,
    key_added: str | None = None,
    overwrite: bool = False,
) -> tuple[np.ndarray, tuple[float, float]]:
    """Find the tissue on an H&E image, as a low-resolution mask.

    The image is read at a coarse pyramid level (about 4-16 um per pixel), converted to darkness
    (``255 - mean(R, G, B)``), smoothed over about 10 um so nuclei and pale stroma merge, and thresholded. The default
    ``"triangle"`` threshold suits slides where empty glass is one dominant bright peak of the histogram and the
    tissue a long tail: Otsu's threshold, made for two classes of similar weight, tends to split the tissue itself
    (dark nuclei against pale stroma) there. The mask is then cleaned: closing over 30 um, holes filled (fat and
    lumens inside the tissue count as tissue), opening over 10 um, and pieces smaller than ``min_area_um2`` removed
    (dust, fiducial marks). The threshold lies close to the glass, so the mask errs on the side of tissue: its edge
    may reach about 20 um beyond the stained area. The method assumes some glass is visible; an image filled with
    tissue gives a warning.

    Parameters
    ----------
    sdata
        Sections following the package's data model.
    image_key
        The image element, e.g. ``"C6_image"`` (spatialdata-io: ``"C6_full_image"``); default: the only section's.
    pixel_size_um
        Micrometres per pixel of the image's finest level; default: found as :func:`st_from_he.pp.extract_patches`
        says (the micrometre coordinate system, Space Ranger's scale factors or the Visium grid of the table
        ``table_key``'s spots).
    table_key
        Table whose spots tell the image's section and resolution when the image has no micrometre coordinate
        system; default: any table annotating circles on the image.
    level
        Pyramid level to read (0 = finest); by default the coarsest level of at most 16 um per pixel.
    method
        ``"triangle"`` or ``"otsu"`` threshold on the smoothed darkness.
    min_area_um2
        Smallest piece of tissue kept, in square micrometres.
    key_added
        Also store the mask as a labels element under this key (``f"{S}_tissue"`` by convention; 1 = tissue,
        0 = glass), with the image's transformations (to each of its coordinate systems) after the mask's own
        downscaling. ``None`` stores nothing.
    overwrite
        Replace an existing element ``key_added``.

    Returns
    -------
    ``(mask, scale)``: the boolean mask ``(rows, cols)`` and the full-resolution pixels per mask pixel ``(sy, sx)``,
    so that full-resolution pixel ``(x, y)`` lies in mask pixel ``(int(y / sy), int(x / sx))``.

    Examples
    --------
    >>> import st_from_he as sth
    >>> sdata = sth.datasets.her2st(["C6"], path="../shared/data/her2st")
    >>> mask, (sy, sx) = sth.pp.detect_tissue(sdata, "C6_image", key_added="C6_tissue")
    >>> bool(0.05 < mask.mean() < 0.5)
    True
    """
    import dask.array as da
    from scipy import ndimage as ndi

    check_sdata(sdata, "sth.pp.detect_tissue")
    if image_key is None:
        image_key = only_image(sdata, "sth.pp.detect_tissue")
    sample, px0, levels = image_of(sdata, image_key, table_key=table_key, pixel_size_um=pixel_size_um)
    if key_added is not None and not overwrite and key_added in sdata:
        raise KeyError(f"Element {key_added!r} exists; pass `overwrite=True` or another `key_added`.")
    if method not in ("triangle", "otsu"):
        raise ValueError(f"Unknown `method` {method!r}; use 'triangle' or 'otsu'.")
    min_area_um2 = check_number(min_area_um2, "min_area_um2", positive=False, unit="square micrometres")
    if level is not None:
        level = check_number(level, "level", positive=False, integer=True, unit="pyramid levels")
    h0, w0 = levels[0].shape[1:]
    sizes = [px0 * max(h0 / lv.shape[1], w0 / lv.shape[2]) for lv in levels]
    if level is None:
        fine_enough = [i for i, s in enumerate(sizes) if s <= _MAX_MASK_UM]
        level = fine_enough[-1] if fine_enough else 0
    elif not 0 <= int(level) < len(levels):
        raise ValueError(f"`level` must be between 0 and {len(levels) - 1} for image {image_key!r}, got {level}.")
    level = int(level)
    arr = levels[level]
    factor = max(1, math.ceil(_MIN_MASK_UM / sizes[level])) if sizes[level] < _MIN_MASK_UM else 1
    gray = arr.astype(np.float32).mean(axis=0)
    if factor > 1:
        gray = da.coarsen(np.mean, gray, {0: factor, 1: factor}, trim_excess=True)
    darkness = 255.0 - np.asarray(gray.compute(), dtype=np.float32)
    sy = h0 / arr.shape[1] * factor
    sx = w0 / arr.shape[2] * factor
    mask_um = px0 * (sy + sx) / 2

    darkness = ndi.gaussian_filter(darkness, sigma=max(_SMOOTH_UM / mask_um, 0.5))
    threshold = _triangle(darkness) if method == "triangle" else _otsu(darkness)
    mask = darkness > threshold
    close_r = max(1, round(_CLOSE_UM / mask_um))
    padded = np.pad(mask, close_r)  # so that closing does not erode tissue touching the border
    mask = ndi.binary_closing(padded, structure=_disk(close_r))[close_r:-close_r, close_r:-close_r]
    mask = ndi.binary_fill_holes(mask)
    mask = ndi.binary_opening(mask, structure=_disk(max(1, round(_OPEN_UM / mask_um))))
    labels, n = ndi.label(mask)
    if n:
        areas = np.bincount(labels.ravel())[1:] * (sy * px0) * (sx * px0)
        mask = np.isin(labels, 1 + np.flatnonzero(areas >= min_area_um2))
    fraction = float(mask.mean())
    logger.info(
        "%s: tissue covers %.0f%% of %r (mask %d x %d px of %.1f um, %s threshold %.1f)",
        sample,
        100 * fraction,
        image_key,
        *mask.shape,
        mask_um,
        method,
        threshold,
    )
    if fraction > 0.95 or fraction < 0.005:
        logger.warning(
            "%s: the tissue mask covers %.1f%% of the image; the image may show no glass (all tissue) or no tissue. "
            "Check the mask before relying on it.",
            sample,
            100 * fraction,
        )
    if key_added is not None:
        from spatialdata.models import Labels2DModel
        from spatialdata.transformations import Scale, Sequence

        # mask pixel -> image pixel, then wherever the image goes
        down = Scale([sy, sx], axes=("y", "x"))
        transforms = {cs: Sequence([down, t]) for cs, t in systems_of(sdata, image_key).items()}
        sdata[key_added] = Labels2DModel.parse(mask.astype(np.uint8), dims=("y", "x"), transformations=transforms)
        logger.info("Stored the tissue mask as labels %r", key_added)
    return mask, (float(sy), float(sx))
