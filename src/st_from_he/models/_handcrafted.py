"""Hand-crafted colour and texture features of H&E patches: the honest baseline every model is compared against."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Ruifrok & Johnston's haematoxylin, eosin and DAB optical-density vectors (rows), for colour deconvolution.
_HED_FROM_RGB = np.linalg.inv(
    np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
).astype(np.float32)
_BACKGROUND = 220  # grey level above which a pixel is glass, not tissue
N_HANDCRAFTED = 36
"""Columns of :func:`handcrafted_features` per context scale: 25 colour statistics (RGB, haematoxylin, eosin), 4 of
tissue composition, then the nucleus-like blob count and 6 texture energies."""
_N_COLOUR_COMPOSITION = 29
N_BLOB = 12
"""Columns of :func:`stain_blob_features` per context scale."""


def _stats(x: np.ndarray) -> list[np.ndarray]:
    """Mean, standard deviation and 10/50/90th percentiles over the pixels of each patch (x: n, pixels)."""
    q = np.percentile(x, [10, 50, 90], axis=1)
    return [x.mean(1), x.std(1), *q]


def handcrafted_features(patches: np.ndarray) -> np.ndarray:
    """Colour, stain and texture statistics of each patch.

    Parameters
    ----------
    patches
        uint8 array ``(n, 3, h, w)`` of RGB patches, or ``(n, s, 3, h, w)`` with ``s`` context scales (features of each
        scale are concatenated).

    Returns
    -------
    float32 array ``(n, n_features)``: RGB and haematoxylin/eosin optical-density statistics, tissue and nucleus
    fractions, nucleus-like blob counts, and gradient and Laplacian texture energy at two scales.
    """
    patches = np.asarray(patches)
    if patches.ndim == 5:
        return np.concatenate([handcrafted_features(patches[:, s]) for s in range(patches.shape[1])], axis=1)
    if patches.ndim != 4 or patches.shape[1] != 3:
        raise ValueError(f"Expected patches of shape (n, 3, h, w) or (n, s, 3, h, w), got {patches.shape}.")
    n = len(patches)
    rgb = patches.reshape(n, 3, -1).astype(np.float32)
    grey = rgb.mean(1)
    od = -np.log((rgb + 1.0) / 256.0)
    hed = np.einsum("ij,njp->nip", _HED_FROM_RGB.T, od)
    haem, eosin = hed[:, 0], hed[:, 1]
    tissue = grey < _BACKGROUND
    # relative threshold, each patch its own (never the batch's): robust to stain intensity between scanners, and a
    # spot's features depend on its own patch only
    nuclear = haem > np.percentile(haem, 75, axis=1, keepdims=True)
    features = [*[f for c in range(3) for f in _stats(rgb[:, c])], *_stats(haem), *_stats(eosin)]
    features += [tissue.mean(1), (nuclear & tissue).mean(1), (haem * tissue).sum(1) / np.maximum(tissue.sum(1), 1)]
    features += [(eosin * tissue).sum(1) / np.maximum(tissue.sum(1), 1)]
    h, w = patches.shape[2:]
    grey_img = grey.reshape(n, h, w)
    haem_img = haem.reshape(n, h, w)
    features += [_blob_count(haem_img)]
    for factor in (1, 4):
        img = block_mean(grey_img, factor)
        gy, gx = np.gradient(img, axis=(1, 2))
        grad = np.hypot(gx, gy).reshape(n, -1)
        lap = np.abs(_laplacian(img)).reshape(n, -1)
        features += [grad.mean(1), grad.std(1), lap.mean(1)]
    return np.stack(features, axis=1).astype(np.float32)


def structure_columns(n_columns: int, blobs: bool) -> np.ndarray:
    """Which feature columns measure structure whose size in pixels the image's resolution and focus change.

    For features laid out as the default probe's: :func:`handcrafted_features` of every scale, then (``blobs``)
    :func:`stain_blob_features` of every scale. The blob count, the texture energies and the blob responses are
    ``True``; colour and composition statistics, which blur leaves about unchanged, are ``False``.
    """
    per_scale = N_HANDCRAFTED + (N_BLOB if blobs else 0)
    if n_columns % per_scale:
        raise ValueError(f"{n_columns} feature columns are not a whole number of scales of {per_scale}.")
    hand = np.arange(N_HANDCRAFTED) >= _N_COLOUR_COMPOSITION
    scales = n_columns // per_scale
    return np.concatenate([np.tile(hand, scales), np.ones(N_BLOB * scales if blobs else 0, bool)])


def _laplacian(img: np.ndarray) -> np.ndarray:
    """4-neighbour Laplacian of each image in a stack ``(n, h, w)`` (edges replicated)."""
    p = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode="edge")
    return p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:] - 4 * img


def _blob_count(haem: np.ndarray) -> np.ndarray:
    """Number of haematoxylin-dense blobs (a nucleus count proxy) per patch, per 10,000 pixels."""
    counts = np.empty(len(haem), dtype=np.float32)
    for i, img in enumerate(haem):
        smooth = ndimage.uniform_filter(img, size=3)
        mask = smooth > np.percentile(smooth, 85)
        counts[i] = ndimage.label(mask)[1]
    return counts * 1e4 / haem[0].size


# Laplacian-of-Gaussian widths in pixels of a patch cut at 1 um/px (112 px for 112 um): blobs of about 4-17 um across,
# from small lymphocyte nuclei to tumour nuclei and nests of cells.
_BLOB_SIGMAS = (1.5, 3.0, 6.0)
_D2 = ((0, 2, 0), (0, 0, 2))
BLOB_FILTERS = ("pyramid", "full")
"""How :func:`stain_blob_features` filters the wider widths: ``"pyramid"`` (the default of new probes) on the stain
image block-averaged by :data:`_PYRAMID_REDUCE`, ``"full"`` (probes saved before it) on the patch's own pixels."""
_PYRAMID_REDUCE = (1, 2, 4)
"""Block-averaging factor of the stain image for each of :data:`_BLOB_SIGMAS` under ``"pyramid"``: every width is
then 1.5 px of its level, as in an image pyramid. A scale-normalised response does not depend on the unit of length,
and a wide Gaussian leaves little detail for finer pixels to add: each column correlates 0.994 or more with the
full filters' over the spots of her2st C6, held-out HVG PCC is unchanged within 0.003 on every fold, and the probe's
features are 1.2-1.4x as fast (``benchmarks/results/blob_filters.md``)."""


def stain_blob_features(patches: np.ndarray, filters: str = "pyramid") -> np.ndarray:
    """Blob responses of the haematoxylin and eosin channels of each patch, at three sizes.

    Nuclei are haematoxylin-dense blobs whose size and density tell cell types apart; the scale-normalised
    Laplacian of Gaussian responds to blobs of one size. For each stain and width: the mean absolute response and the
    90th percentile of the (sign-flipped) response, i.e. how much blob-like structure of that size the patch holds.

    Parameters
    ----------
    patches
        uint8 array ``(n, 3, h, w)`` of RGB patches, or ``(n, s, 3, h, w)`` with ``s`` context scales.
    filters
        ``"pyramid"``: each width filtered on the stain image block-averaged to make it 1.5 px (see
        :data:`_PYRAMID_REDUCE`); ``"full"``: every width on the full-resolution stain image.

    Returns
    -------
    float32 array ``(n, 12 * s)``.
    """
    if filters not in BLOB_FILTERS:
        raise ValueError(f"`filters` must be one of {BLOB_FILTERS}, got {filters!r}.")
    patches = np.asarray(patches)
    if patches.ndim == 5:
        return np.concatenate([stain_blob_features(patches[:, s], filters) for s in range(patches.shape[1])], axis=1)
    if patches.ndim != 4 or patches.shape[1] != 3:
        raise ValueError(f"Expected patches of shape (n, 3, h, w) or (n, s, 3, h, w), got {patches.shape}.")
    n, _, h, w = patches.shape
    od = -np.log((patches.reshape(n, 3, -1).astype(np.float32) + 1.0) / 256.0)
    hed = np.einsum("ij,njp->nip", _HED_FROM_RGB.T, od).reshape(n, 3, h, w)
    features = []
    for stain in hed[:, 0], hed[:, 1]:
        for width, factor in blob_levels(filters):
            image = block_mean(stain, factor)
            # second derivatives along the two image axes only (not across the stack of patches)
            response = sum(ndimage.gaussian_filter(image, (0, width, width), order=order) for order in _D2)
            response = response.reshape(n, -1) * width**2
            features += [np.abs(response).mean(1), np.percentile(-response, 90, axis=1)]
    return np.stack(features, axis=1).astype(np.float32)


def blob_levels(filters: str) -> list[tuple[float, int]]:
    """``(width in pixels of its level, the level's block-averaging factor)`` of each blob width under ``filters``.

    For each of :data:`_BLOB_SIGMAS`, ``filters`` one of :data:`BLOB_FILTERS`.
    """
    reduce = _PYRAMID_REDUCE if filters == "pyramid" else (1,) * len(_BLOB_SIGMAS)
    return [(sigma / factor, factor) for sigma, factor in zip(_BLOB_SIGMAS, reduce, strict=True)]


def block_mean(images: np.ndarray, factor: int) -> np.ndarray:
    """Each image of a stack ``(n, h, w)`` averaged over blocks of ``factor`` x ``factor`` pixels (edges cropped)."""
    if factor == 1:
        return images
    n, h, w = images.shape
    return (
        images[:, : h - h % factor, : w - w % factor].reshape(n, h // factor, factor, w // factor, factor).mean((2, 4))
    )
