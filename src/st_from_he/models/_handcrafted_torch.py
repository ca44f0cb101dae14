"""The hand-crafted and blob features of :mod:`._handcrafted` in torch, on whatever device the patches are.

The NumPy/SciPy functions :func:`~._handcrafted.handcrafted_features` and :func:`~._handcrafted.stain_blob_features`
are the reference; these compute the same columns, equal within float32 rounding (``tests/test_features_torch.py``),
on a GPU when the patches are there and faster than the reference on a CPU:

- optical densities from a 256-entry table made by the reference's own expression (the same values, no logarithm
  per pixel);
- the percentiles of the RGB channels (integers 0-255) counted from each patch's 256-bin histogram, those of
  continuous values from two order statistics per percentile (``np.partition`` on a CPU, a sort on a GPU), both
  interpolated exactly as :func:`numpy.percentile`'s default (linear) method;
- the blob count's smoothing and connected components (4-connectivity) by SciPy on a CPU, one call for the whole
  batch, and on a GPU by label propagation to a fixed point (:func:`_count_components`);
- the Gaussian-derivative filters of the blob features as matrix products with the filters' matrices, boundary
  reflection included (:func:`_filter_matrix`), which a GPU and BLAS run at full speed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial

import numpy as np
import torch

from ._handcrafted import _BACKGROUND, _BLOB_SIGMAS, _HED_FROM_RGB


def handcrafted_features_torch(patches: torch.Tensor) -> torch.Tensor:
    """:func:`~st_from_he.models._handcrafted.handcrafted_features` of uint8 patches on their own device.

    Parameters
    ----------
    patches
        uint8 tensor ``(n, 3, h, w)`` or ``(n, s, 3, h, w)`` (``s`` context scales), ``h`` and ``w`` at least 8.

    Returns
    -------
    float32 tensor ``(n, 36 * s)`` on the patches' device.
    """
    return probe_features_torch(patches, blobs=False)


def stain_blob_features_torch(patches: torch.Tensor) -> torch.Tensor:
    """:func:`~st_from_he.models._handcrafted.stain_blob_features` of uint8 patches on their own device.

    Parameters
    ----------
    patches
        uint8 tensor ``(n, 3, h, w)`` or ``(n, s, 3, h, w)``, ``h`` and ``w`` at least 8.

    Returns
    -------
    float32 tensor ``(n, 12 * s)`` on the patches' device.
    """
    return probe_features_torch(patches, handcrafted=False, blobs=True)


def probe_features_torch(patches: torch.Tensor, *, handcrafted: bool = True, blobs: bool = True) -> torch.Tensor:
    """The ridge probe's features: hand-crafted features of every scale, then (``blobs``) blob features of every scale.

    The column layout of ``np.concatenate([handcrafted_features(p), stain_blob_features(p)], axis=1)``; the optical
    densities are computed once for both.
    """
    if not (handcrafted or blobs):
        raise ValueError("Ask for the hand-crafted features, the blob features or both (`handcrafted`, `blobs`).")
    x = _check_patches(patches)
    if x.device.type == "mps":  # no float64 there, which NumPy's percentile interpolation takes: on the CPU
        return probe_features_torch(x.cpu(), handcrafted=handcrafted, blobs=blobs).to(x.device)
    scales = [x[:, s] for s in range(x.shape[1])]
    stains = [_stains(p) for p in scales]  # once for both feature sets
    parts = []
    if handcrafted:
        parts += [_handcrafted_one_scale(p, *stain) for p, stain in zip(scales, stains, strict=True)]
    if blobs:
        parts += [_blobs_one_scale(p, *stain) for p, stain in zip(scales, stains, strict=True)]
    return torch.cat(parts, dim=1)


def white_balance_torch(patches: torch.Tensor, glass) -> torch.Tensor:
    """:func:`~st_from_he.models.white_balance` of a uint8 tensor ``(n, [s,] 3, h, w)`` on its own device.

    ``glass``: one RGB colour per patch ``(n, 3)`` (array or tensor; see
    :func:`~st_from_he.models._white_balance.glass_per_patch`). The same float32 product, round half to even and clip
    as the NumPy version, hence the same uint8 values.
    """
    from ._white_balance import GLASS_GREY, glass_per_patch

    glass = glass_per_patch(glass.cpu().numpy() if isinstance(glass, torch.Tensor) else glass, len(patches))
    if not np.all(np.isfinite(glass)) or np.any(glass <= 0):
        raise ValueError("`glass` colours must be positive and finite (RGB in 0-255).")
    gain = (GLASS_GREY / glass).astype(np.float32).reshape(len(patches), *([1] * (patches.ndim - 4)), 3, 1, 1)
    gain = torch.from_numpy(gain).to(patches.device)
    return torch.round(patches * gain).clamp_(0, 255).to(torch.uint8)


def _check_patches(patches) -> torch.Tensor:
    """``patches`` as a uint8 tensor ``(n, s, 3, h, w)``, or a clear error."""
    if not isinstance(patches, torch.Tensor):
        raise TypeError(
            f"The torch features take a torch.Tensor of uint8 patches, got {type(patches).__name__}; convert with "
            "`torch.from_numpy(patches)` (or use the NumPy functions of st_from_he.models._handcrafted)."
        )
    if patches.dtype != torch.uint8:
        raise TypeError(
            f"Patches must be uint8 RGB (0-255), got dtype {patches.dtype}; convert images in [0, 1] with "
            "`(x * 255).round().to(torch.uint8)`."
        )
    if patches.ndim == 4:
        patches = patches[:, None]
    if patches.ndim != 5 or patches.shape[2] != 3:
        raise ValueError(f"Expected patches of shape (n, 3, h, w) or (n, s, 3, h, w), got {tuple(patches.shape)}.")
    if min(patches.shape[-2:]) < 8:
        raise ValueError(
            f"Patches of {patches.shape[-2]} x {patches.shape[-1]} px are too small: the texture features need at "
            "least 8 px a side (two pixels after 4x downsampling)."
        )
    return patches


def _use_numpy(x: torch.Tensor) -> bool:
    """Whether the selections and the labelling run in NumPy/SciPy (CPU tensors) or in torch (GPU tensors)."""
    return x.device.type == "cpu"


# ---- optical densities ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _od_table() -> np.ndarray:
    """Optical density of each uint8 level, by the reference's expression (hence the same float32 values)."""
    return -np.log((np.arange(256, dtype=np.float32) + 1.0) / 256.0)


@lru_cache(maxsize=1)
def _stain_tables() -> np.ndarray:
    """``(stain, channel, level)``: each channel's term of the haematoxylin and eosin densities, by uint8 level.

    The float32 product of the level's optical density and the deconvolution weight, as the reference's einsum
    forms it before summing over channels.
    """
    return np.stack([[_od_table() * _HED_FROM_RGB.T[s, c] for c in range(3)] for s in range(2)])


def _stains(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Haematoxylin and eosin optical densities ``(n, h * w)`` of uint8 patches ``(n, 3, h, w)``."""
    n = len(patches)
    index = patches.reshape(n, 3, -1).int()  # index_select of int32 indices: the fastest lookup on a CPU
    table = torch.from_numpy(_stain_tables()).to(patches.device)

    def density(stain, channel):
        return table[stain, channel].index_select(0, index[:, channel].reshape(-1)).reshape(n, -1)

    # summed over the channels in order, as the reference's einsum
    return tuple((density(s, 0) + density(s, 1)) + density(s, 2) for s in range(2))


# ---- percentiles as numpy.percentile(method="linear") ----------------------------------------------------------------


def _virtual_index(n: int, q: float) -> tuple[int, int, float]:
    """NumPy's neighbouring order statistics and interpolation weight of percentile ``q`` of ``n`` values."""
    q = q / 100
    v = n * q + (1 + q * (1 - 1 - 1)) - 1  # numpy's _compute_virtual_index with alpha = beta = 1, in float64
    if v >= n - 1:
        return n - 1, n - 1, v - np.floor(v)
    if v < 0:
        return 0, 0, v - np.floor(v)
    low = int(np.floor(v))
    return low, low + 1, v - low


def _lerp(a: torch.Tensor, b: torch.Tensor, t: float, wide: bool) -> torch.Tensor:
    """NumPy's ``_lerp``: in float32 for one percentile (a Python-scalar ``q``), in float64 for a list of them."""
    diff = b - a
    if wide:
        a, b, diff = a.double(), b.double(), diff.double()
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t


def _order_statistics(x: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """The ``ranks``-th smallest values of each row of ``x`` ``(n, p)``, as ``(n, len(ranks))``."""
    unique = sorted(set(ranks))
    if _use_numpy(x):  # numpy's introselect: several times faster than a full torch sort on a CPU
        chunks = np.array_split(x.numpy(), min(torch.get_num_threads(), len(x)) or 1)
        values = torch.from_numpy(np.concatenate(list(_pool().map(partial(_select, ranks=unique), chunks))))
    else:
        values = torch.sort(x, dim=1).values[:, unique]
    return values[:, [unique.index(r) for r in ranks]]


def _select(x: np.ndarray, ranks: list[int]) -> np.ndarray:
    """The ``ranks``-th smallest values (sorted ranks) of each row of ``x``.

    Ranks that directly follow another are the smallest value above it, found without partitioning at them.
    """
    pivots = [r for r in ranks if r - 1 not in ranks]
    part = np.partition(x, pivots, axis=1)
    columns = []
    for r in ranks:
        if r in pivots:
            columns.append(part[:, r])
        else:  # the minimum of what lies between the rank below and the next pivot (or the end)
            stop = next((p for p in pivots if p > r), x.shape[1] - 1)
            columns.append(part[:, r : stop + 1].min(1))
    return np.stack(columns, axis=1)


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    """Threads for NumPy's selections (which release the GIL), one row chunk per torch thread."""
    return ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="st_from_he_features")


def _percentiles(x: torch.Tensor, qs: list[float], wide: bool) -> list[torch.Tensor]:
    """Percentiles ``qs`` of each row of float32 ``x`` ``(n, p)``, as ``np.percentile(x, qs, axis=1)``.

    ``wide``: as for a list of percentiles (interpolated in float64); else as for one Python number (float32).
    """
    index = [_virtual_index(x.shape[1], q) for q in qs]
    values = _order_statistics(x, [r for low, high, _ in index for r in (low, high)])
    return [_lerp(values[:, 2 * i], values[:, 2 * i + 1], t, wide) for i, (_, _, t) in enumerate(index)]


def _level_percentiles(levels: torch.Tensor, qs: list[float]) -> list[torch.Tensor]:
    """:func:`_percentiles` (``wide``) of uint8 values ``(n, p)``, from each row's histogram: no sort."""
    n, p = levels.shape
    counts = torch.zeros(n, 256, dtype=torch.int32, device=levels.device)
    counts.scatter_add_(1, levels.long(), torch.ones_like(levels, dtype=torch.int32))
    cumulative = counts.cumsum(1)
    out = []
    for q in qs:
        low, high, t = _virtual_index(p, q)
        # the r-th smallest value (from 0) is the first level whose cumulative count exceeds r
        a, b = ((cumulative <= r).sum(1).float() for r in (low, high))
        out.append(_lerp(a, b, t, wide=True))
    return out


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) standard deviation of each row, in two passes as NumPy (torch's own std is slower)."""
    mean = x.mean(1)
    return mean, (x - mean[:, None]).square().mean(1).sqrt()


def _stats(x: torch.Tensor, levels: torch.Tensor | None = None, extra: tuple[float, ...] = ()) -> list:
    """Mean, standard deviation and 10/50/90th percentiles of each row (and the percentiles ``extra``, float32)."""
    if levels is not None:
        q = _level_percentiles(levels, [10, 50, 90])
        return [*_mean_std(x), *q]
    index = [_virtual_index(x.shape[1], q) for q in (10, 50, 90, *extra)]
    values = _order_statistics(x, [r for low, high, _ in index for r in (low, high)])
    q = [_lerp(values[:, 2 * i], values[:, 2 * i + 1], t, wide=i < 3) for i, (_, _, t) in enumerate(index)]
    return [*_mean_std(x), *q]


# ---- hand-crafted features -------------------------------------------------------------------------------------------


def _handcrafted_one_scale(patches: torch.Tensor, haem: torch.Tensor, eosin: torch.Tensor) -> torch.Tensor:
    """The 36 columns of :func:`~._handcrafted.handcrafted_features` of uint8 patches ``(n, 3, h, w)``.

    ``haem``, ``eosin``: their stain densities ``(n, h * w)`` (:func:`_stains`).
    """
    n, _, h, w = patches.shape
    levels = patches.reshape(n, 3, -1)
    rgb = levels.float()
    grey = (rgb[:, 0] + rgb[:, 1] + rgb[:, 2]) / 3  # the reference's mean over channels: exact sum, one division
    tissue = (grey < _BACKGROUND).float()
    features = [f for c in range(3) for f in _stats(rgb[:, c], levels[:, c])]
    *haem_stats, haem_75 = _stats(haem, extra=(75,))
    features += [*haem_stats, *_stats(eosin)]
    nuclear = (haem > haem_75[:, None]).float()
    n_tissue = tissue.sum(1).clamp_min(1).double()
    features += [tissue.mean(1), (nuclear * tissue).mean(1), (haem * tissue).sum(1).double() / n_tissue]
    features += [(eosin * tissue).sum(1).double() / n_tissue]
    grey_img, haem_img = grey.reshape(n, h, w), haem.reshape(n, h, w)
    features += [_blob_count(haem_img)]
    for factor in (1, 4):
        img = grey_img
        if factor > 1:
            img = grey_img[:, : h - h % factor, : w - w % factor]
            img = img.reshape(n, h // factor, factor, w // factor, factor).mean((2, 4))
        gy, gx = _gradient(img, 1), _gradient(img, 2)
        grad = torch.hypot(gx, gy).reshape(n, -1)
        lap = _laplacian(img).abs().reshape(n, -1)
        features += [*_mean_std(grad), lap.mean(1)]
    return torch.stack([f.float() for f in features], dim=1)


def _gradient(img: torch.Tensor, axis: int) -> torch.Tensor:
    """``np.gradient`` along ``axis`` of a stack ``(n, h, w)``: central differences, one-sided at the edges."""
    length = img.shape[axis]
    inner = (img.narrow(axis, 2, length - 2) - img.narrow(axis, 0, length - 2)) / 2.0
    first = img.narrow(axis, 1, 1) - img.narrow(axis, 0, 1)
    last = img.narrow(axis, length - 1, 1) - img.narrow(axis, length - 2, 1)
    return torch.cat([first, inner, last], dim=axis)


def _laplacian(img: torch.Tensor) -> torch.Tensor:
    """4-neighbour Laplacian of each image of a stack ``(n, h, w)`` (edges replicated), the reference's sum order."""
    p = torch.nn.functional.pad(img[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    return p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:] - 4 * img


def _blob_count(haem: torch.Tensor) -> torch.Tensor:
    """Haematoxylin-dense blobs per 10,000 pixels of each image ``(n, h, w)``, as the reference's ``_blob_count``."""
    n, h, w = haem.shape
    if _use_numpy(haem):  # SciPy's own filter and labelling, once for the stack: the reference's values
        from scipy import ndimage

        smooth = ndimage.uniform_filter(haem.numpy(), size=(1, 3, 3))
        threshold = _percentiles(torch.from_numpy(smooth.reshape(n, -1)), [85], wide=False)[0].numpy()
        # no connection across the stack: each image labelled on its own, labels numbered on through the stack
        structure = np.zeros((3, 3, 3), bool)
        structure[1] = ndimage.generate_binary_structure(2, 1)
        labels, _ = ndimage.label(smooth > threshold[:, None, None], structure=structure)
        last = np.maximum.accumulate(labels.reshape(n, -1).max(1))
        counts = torch.from_numpy(np.diff(last, prepend=0).astype(np.float32))
    else:
        smooth = _uniform3(_uniform3(haem.double(), 1).float().double(), 2).float()
        threshold = _percentiles(smooth.reshape(n, -1), [85], wide=False)[0]
        counts = _count_components(smooth > threshold[:, None, None]).float()
    return counts * 1e4 / (h * w)


def _uniform3(img: torch.Tensor, axis: int) -> torch.Tensor:
    """Mean of 3 neighbours along ``axis`` (edges reflected, which for 1 pixel is replicating), in float64."""
    length = img.shape[axis]
    p = torch.cat([img.narrow(axis, 0, 1), img, img.narrow(axis, length - 1, 1)], dim=axis)
    return (p.narrow(axis, 0, length) + p.narrow(axis, 1, length) + p.narrow(axis, 2, length)) / 3


def _count_components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected components of each boolean image ``(n, h, w)``, by label propagation (for GPUs).

    Every foreground pixel starts with its own number; each round, a pixel takes the largest number among itself
    and its 4 neighbours, then the number of the pixel its number names (pointer jumping, which shortens long
    chains). At the fixed point every component carries its largest pixel number, so the components are the pixels
    that still carry their own.
    """
    n, h, w = mask.shape
    ids = torch.arange(1, n * h * w + 1, device=mask.device, dtype=torch.int64).reshape(n, h, w)
    labels = torch.where(mask, ids, 0)
    while True:
        p = torch.nn.functional.pad(labels, (1, 1, 1, 1))
        grown = torch.stack([labels, p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]).amax(0)
        grown = torch.where(mask, grown, 0)
        jumped = torch.where(mask, grown.reshape(-1)[(grown - 1).clamp_min(0).reshape(-1)].reshape(n, h, w), 0)
        if torch.equal(jumped, labels):
            return (mask & (labels == ids)).reshape(n, -1).sum(1)
        labels = jumped


# ---- blob features ---------------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _filter_matrix(n: int, sigma: float, order: int) -> np.ndarray:
    """The matrix of ``scipy.ndimage.gaussian_filter1d(x, sigma, order=order)`` on ``n`` samples (mode reflect).

    Column ``j`` is the filter's response to the unit impulse at ``j``: the same weights and boundary reflections
    as the reference's filter, so that ``matrix @ x`` equals it up to float rounding.
    """
    from scipy import ndimage

    return ndimage.gaussian_filter1d(np.eye(n), sigma, axis=0, order=order)


@lru_cache(maxsize=16)
def _filter_matrices(n: int) -> torch.Tensor:
    """float32 ``(6 n, n)``: for each blob width, the matrices of its second-derivative and smoothing filters."""
    blocks = [_filter_matrix(n, sigma, order) for sigma in _BLOB_SIGMAS for order in (2, 0)]
    return torch.from_numpy(np.concatenate(blocks).astype(np.float32))


def _blobs_one_scale(patches: torch.Tensor, haem: torch.Tensor, eosin: torch.Tensor) -> torch.Tensor:
    """The 12 columns of :func:`~._handcrafted.stain_blob_features` of uint8 patches ``(n, 3, h, w)``.

    ``haem``, ``eosin``: their stain densities ``(n, h * w)`` (:func:`_stains`).
    """
    n, _, h, w = patches.shape
    stains = torch.stack([haem, eosin], dim=1).reshape(2 * n, h, w)  # (patch, stain) pairs

    def matrices(size):
        return _filter_matrices(size).to(patches.device)

    # along the columns first: one product for all widths and both derivative orders, (2n, h, [width, order, w])
    along_w = (stains.reshape(-1, w) @ matrices(w).T).reshape(2 * n, h, 2 * len(_BLOB_SIGMAS) * w)
    rows = matrices(h)
    features = {}
    for i, sigma in enumerate(_BLOB_SIGMAS):
        d2_w, smooth_w = along_w[..., 2 * i * w : (2 * i + 1) * w], along_w[..., (2 * i + 1) * w : (2 * i + 2) * w]
        d2_h, smooth_h = rows[2 * i * h : (2 * i + 1) * h], rows[(2 * i + 1) * h : (2 * i + 2) * h]
        # then along the rows: d2/dy2 of the column-smoothed image plus the row-smoothed d2/dx2
        response = torch.matmul(d2_h, smooth_w).add_(torch.matmul(smooth_h, d2_w)).reshape(n, 2, h * w)
        response *= sigma**2
        for stain in range(2):
            r = response[:, stain]
            features[stain, i] = [r.abs().mean(1), _percentiles(-r, [90], wide=False)[0]]
    return torch.stack([f for stain in range(2) for i in range(len(_BLOB_SIGMAS)) for f in features[stain, i]], 1)
