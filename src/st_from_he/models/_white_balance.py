"""White balance of H&E images: every slide's empty glass brought to one colour before colour features are read.

Scanners and slide preparations differ in the colour of empty glass (on the her2st data: RGB (221, 208, 224) on
patient B's slide, 231-245 grey on patient C's). Hand-crafted colour, optical-density and tissue features read that
offset as biology, and a fixed glass threshold calls every pixel of a dark slide tissue; scaling each channel so
that the slide's glass comes out at :data:`GLASS_GREY` removes it (cross-patient HVG PCC of the default probe 0.002
-> 0.049 on its own, no change within a patient; ``benchmarks/results/cross_patient_ideas.md``).
"""

from __future__ import annotations

import numpy as np

from st_from_he._logging import logger

GLASS_GREY = 242.0
"""Grey level every slide's glass is scaled to (the typical glass of a well-exposed brightfield scan)."""
_MIN_GLASS = 170.0  # darker "glass" means no glass was found (an all-tissue crop, or not a brightfield image)
_MAX_GLASS_SPREAD = 12.0  # grey levels between the quartiles of the brighter half: glass is uniform (2-3 on her2st
# slides), pale tissue is not (11-47 in all-tissue crops of the same slides)
_MAX_SIDE = 4096  # pixels of the longer side the estimate reads at most (a median needs no more)


def glass_colour(image) -> np.ndarray:
    """The colour of empty glass on a slide: the median RGB of the brighter half of its pixels.

    Most H&E slides are more than half glass around the tissue, and their glass is the brightest thing on them; the
    brighter half of the pixels is therefore glass (and fat, whose empty cells show the glass), and its median is
    robust to dust and to the tissue edge. Read it from a coarse level of the image (about 1/8 of full resolution is
    plenty).

    Parameters
    ----------
    image
        RGB image ``(3, h, w)`` (channels first, as SpatialData stores images), uint8 or any array convertible to it.

    Returns
    -------
    float64 array ``(3,)``: the glass colour in RGB. If no glass is found (the brighter half is darker than grey
    170, or not uniform: more than 12 grey levels between its quartiles, as in a crop that is all tissue, or not a
    brightfield image), a warning is logged and ``GLASS_GREY`` is returned for every channel, so that white balance
    leaves the image unchanged.

    Examples
    --------
    >>> import numpy as np
    >>> from st_from_he.models import glass_colour
    >>> slide = np.full((3, 100, 100), [[[221]], [[208]], [[224]]], dtype=np.uint8)
    >>> slide[:, 40:60, 40:60] = 120  # tissue
    >>> glass_colour(slide)
    array([221., 208., 224.])
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"Expected an RGB image of shape (3, h, w), got {image.shape}.")
    step = max(1, int(np.ceil(max(image.shape[1:]) / _MAX_SIDE)))
    pixels = image[:, ::step, ::step].reshape(3, -1)
    # the brighter half by the channels' sum is the brighter half by their mean; uint8 sums exactly in uint16, on
    # which NumPy's selections are about 5x faster than on float64 means
    total = pixels.sum(0, dtype=np.uint16 if pixels.dtype == np.uint8 else np.float64)
    bright = total >= np.median(total)
    glass = np.median(pixels[:, bright], axis=1).astype(np.float64)
    low, high = np.percentile(total[bright], [25, 75]) / 3  # quartiles of the grey level
    if glass.mean() < _MIN_GLASS or high - low > _MAX_GLASS_SPREAD:
        logger.warning(
            "No glass found on the slide (its brighter half is RGB %s, grey %d to %d between its quartiles; glass "
            "is brighter than %g and uniform): it is not white balanced. Is it a brightfield H&E image, and does it "
            "show glass around the tissue (not a crop of tissue only)?",
            tuple(int(v) for v in np.round(glass)),
            low,
            high,
            _MIN_GLASS,
        )
        return np.full(3, GLASS_GREY)
    return glass


def glass_per_patch(glass, n: int) -> np.ndarray:
    """``glass`` as one RGB colour per patch ``(n, 3)``: one colour ``(3,)`` is repeated; other shapes raise."""
    glass = np.asarray(glass, dtype=np.float64)
    if glass.shape == (3,):
        glass = np.tile(glass, (n, 1))
    if glass.shape != (n, 3):
        raise ValueError(f"`glass` must be one RGB colour (3,) or one per patch ({n}, 3), got {glass.shape}.")
    return glass


def white_balance(patches: np.ndarray, glass) -> np.ndarray:
    """Patches with each channel scaled so that the glass of their slide comes out at grey :data:`GLASS_GREY`.

    Parameters
    ----------
    patches
        uint8 array ``(n, [s,] 3, h, w)``.
    glass
        Glass colour of each patch's slide: ``(n, 3)``, or one colour ``(3,)`` for all (see :func:`glass_colour`).

    Returns
    -------
    uint8 array of the same shape (values clipped to 0-255); ``patches`` is not modified.
    """
    patches = np.asarray(patches)
    glass = glass_per_patch(glass, len(patches))
    if not np.all(np.isfinite(glass)) or np.any(glass <= 0):
        raise ValueError("`glass` colours must be positive and finite (RGB in 0-255).")
    gain = (GLASS_GREY / glass).reshape(len(patches), *([1] * (patches.ndim - 4)), 3, 1, 1)
    return np.clip(np.rint(patches * gain.astype(np.float32)), 0, 255).astype(np.uint8)
