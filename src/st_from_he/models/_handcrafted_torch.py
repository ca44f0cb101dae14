"""The hand-crafted and blob features of :mod:`._handcrafted` in torch, on whatever device the patches are.

The NumPy/SciPy functions :func:`~._handcrafted.handcrafted_features` and :func:`~._handcrafted.stain_blob_features`
are the reference; these compute the same columns, equal within float32 rounding (``tests/test_features_torch.py``),
on a GPU when the patches are there and faster than the reference on a CPU:

- optical densities from a 256-entry table made by the reference's own expression (the same values, no logarithm
  per pixel), looked up by NumPy on a CPU (row chunks on threads) and by ``index_select`` on a GPU;
- the percentiles of the RGB channels (integers 0-255) counted from each patch's 256-bin histogram, those of
  continuous values from two order statistics per percentile, both interpolated exactly as
  :func:`numpy.percentile`'s default (linear) method. The order statistics come from a sort on a GPU; on a CPU, for
  long rows, from a bracket read off a random sample of each row: the values below it counted, the few inside it
  gathered and sorted (:func:`_select`; ``np.partition`` for short rows and for the rows whose bracket misses a
  rank), row chunks on threads;
- the blob count's smoothing and connected components (4-connectivity) by SciPy on a CPU, a chunk of patches per
  thread, and on a GPU by label propagation to a fixed point (:func:`_count_components`);
- the Gaussian-derivative filters of the blob features as matrix products with the filters' matrices, boundary
  reflection included (:func:`_filter_matrix`), which a GPU and BLAS run at full speed, a few patches at a time
  (:data:`_BLOB_CHUNK`), each width on its pyramid level (``avg_pool2d``); the 90th percentile of the sign-flipped
  response from the mirrored order statistics of the response itself.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial

import numpy as np
import torch

from ._handcrafted import _BACKGROUND, _BLOB_SIGMAS, _HED_FROM_RGB, BLOB_FILTERS, blob_levels


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


def stain_blob_features_torch(patches: torch.Tensor, filters: str = "pyramid") -> torch.Tensor:
    """:func:`~st_from_he.models._handcrafted.stain_blob_features` of uint8 patches on their own device.

    Parameters
    ----------
    patches
        uint8 tensor ``(n, 3, h, w)`` or ``(n, s, 3, h, w)``, ``h`` and ``w`` at least 8.
    filters
        ``"pyramid"`` or ``"full"``, as there.

    Returns
    -------
    float32 tensor ``(n, 12 * s)`` on the patches' device.
    """
    return probe_features_torch(patches, handcrafted=False, blobs=True, blob_filters=filters)


def probe_features_torch(
    patches: torch.Tensor, *, handcrafted: bool = True, blobs: bool = True, blob_filters: str = "pyramid"
) -> torch.Tensor:
    """The ridge probe's features: hand-crafted features of every scale, then (``blobs``) blob features of every scale.

    The column layout of ``np.concatenate([handcrafted_features(p), stain_blob_features(p, blob_filters)], axis=1)``;
    the optical densities are computed once for both.
    """
    if not (handcrafted or blobs):
        raise ValueError("Ask for the hand-crafted features, the blob features or both (`handcrafted`, `blobs`).")
    if blob_filters not in BLOB_FILTERS:
        raise ValueError(f"`blob_filters` must be one of {BLOB_FILTERS}, got {blob_filters!r}.")
    x = _check_patches(patches)
    if x.device.type == "mps":  # no float64 there, which NumPy's percentile interpolation takes: on the CPU
        return probe_features_torch(x.cpu(), handcrafted=handcrafted, blobs=blobs, blob_filters=blob_filters).to(
            x.device
        )
    scales = [x[:, s] for s in range(x.shape[1])]
    stains = [_stains(p) for p in scales]  # once for both feature sets
    parts = []
    if handcrafted:
        parts += [_handcrafted_one_scale(p, stain) for p, stain in zip(scales, stains, strict=True)]
    if blobs:
        parts += [_blobs_one_scale(p, stain, blob_filters) for p, stain in zip(scales, stains, strict=True)]
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


def _stains(patches: torch.Tensor) -> torch.Tensor:
    """Haematoxylin and eosin optical densities ``(n, 2, h * w)`` of uint8 patches ``(n, 3, h, w)``.

    Each density is the sum over the channels, in order as the reference's einsum, of the channel's table entry.
    """
    n = len(patches)
    if _use_numpy(patches):  # NumPy's lookup by uint8 index, row chunks on the threads: 4-5x torch's index_select
        levels, tables = patches.reshape(n, 3, -1).numpy(), _stain_tables()
        out = np.empty((n, 2, levels.shape[-1]), np.float32)

        def lookup(rows: slice) -> None:
            for s in range(2):
                dst = out[rows, s]
                np.add(tables[s, 0][levels[rows, 0]], tables[s, 1][levels[rows, 1]], out=dst)
                np.add(dst, tables[s, 2][levels[rows, 2]], out=dst)

        list(_pool().map(lookup, _row_chunks(n)))
        return torch.from_numpy(out)
    index = patches.reshape(n, 3, -1).int()  # index_select of int32 indices: torch's fastest lookup
    table = torch.from_numpy(_stain_tables()).to(patches.device)

    def density(stain, channel):
        return table[stain, channel].index_select(0, index[:, channel].reshape(-1)).reshape(n, -1)

    return torch.stack([(density(s, 0) + density(s, 1)) + density(s, 2) for s in range(2)], dim=1)


def _row_chunks(n: int) -> list[slice]:
    """``n`` rows in one contiguous chunk per thread of :func:`_pool`."""
    bounds = np.linspace(0, n, min(torch.get_num_threads(), n) + 1).round().astype(int)
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


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
        rows = x.numpy()
        chunks = [rows[c] for c in _row_chunks(len(rows)) or [slice(0, 0)]]  # no rows: one empty chunk
        values = torch.from_numpy(np.concatenate(list(_pool().map(partial(_select, ranks=unique), chunks))))
    else:
        values = torch.sort(x, dim=1).values[:, unique]
    return values[:, [unique.index(r) for r in ranks]]


def _select(x: np.ndarray, ranks: list[int]) -> np.ndarray:
    """The ``ranks``-th smallest values (sorted ranks) of each row of ``x``, exactly as a partition finds them.

    Long rows: each group of nearby ranks is bracketed between two values of a random sample of the row, the values
    below the bracket counted and those inside it (a few percent of the row) gathered and sorted
    (:func:`_bracket_select`); ``np.partition`` takes short rows and the rows whose bracket misses a rank. On the
    features' 112 px rows, 1.2-1.4 times as fast as ``np.partition`` (which spends ~6 ns a value).
    """
    n, p = x.shape
    if p < _BRACKET_MIN or not n:
        return _partition_select(x, ranks)
    groups = [[ranks[0]]]
    for r in ranks[1:]:  # nearby ranks (a percentile's two neighbours) share a bracket
        (groups[-1].append(r) if r - groups[-1][-1] <= p // 100 else groups.append([r]))
    positions = _sample_positions(p)
    m = len(positions)
    bounds = [(_sample_rank(group[0], p, m, -1), _sample_rank(group[-1] + 1, p, m, 1)) for group in groups]
    kth = sorted({j for bound in bounds for j in bound if 0 <= j < m})
    sample = np.partition(x[:, positions], kth, axis=1) if kth else x[:, positions]  # only the bounds in place
    return np.concatenate(
        [
            _bracket_select(x, group, *(sample[:, j, None] if 0 <= j < m else None for j in bound))
            for group, bound in zip(groups, bounds, strict=True)
        ],
        axis=1,
    )


_BRACKET_MIN = 4096
"""Row length from which :func:`_select` brackets the ranks (shorter rows: partitioned)."""
_SAMPLE = 1024
"""Most values per row sampled to bracket the ranks (at most a sixth of the row): a larger sample narrows the
bracket, hence the values gathered, but costs its own selection."""


@lru_cache(maxsize=16)
def _sample_positions(p: int) -> np.ndarray:
    """Fixed random positions (in order) of the sample of a row of ``p`` values.

    Random, not strided: an image's periodic texture cannot line up with them, so the ranks of the sample's values
    spread as :func:`_sample_rank`'s margin assumes (hypergeometric).
    """
    return np.sort(np.random.default_rng(0).choice(p, size=min(_SAMPLE, p // 6), replace=False))


def _sample_rank(rank: int, p: int, m: int, side: int) -> int:
    """The sample rank that bounds population ``rank`` on its ``side`` (-1: below, 1: above).

    The rank in a sample of ``m`` of ``p`` values expected at ``rank``, moved by 3 standard deviations
    (hypergeometric) and 2 more: a bound misses for about 1 row in 700, which is then partitioned. Outside
    ``[0, m)`` where the bracket needs no bound on that side.
    """
    q = rank / p
    return int(np.floor(q * m + side * (3 * np.sqrt(m * q * (1 - q) * (1 - m / p)) + 2)))


def _bracket_select(x: np.ndarray, ranks: list[int], lo: np.ndarray | None, hi: np.ndarray | None) -> np.ndarray:
    """The ``ranks``-th smallest values (sorted, nearby) of each row of ``x`` ``(n, p)``, between ``lo`` and ``hi``.

    ``lo``, ``hi``: ``(n, 1)`` bounds of the bracket (None: unbounded). The bracket holds the ranks when the
    ``below`` values under ``lo`` and the ``inside`` values in it satisfy ``below <= ranks[0]`` and
    ``below + inside > ranks[-1]``; then rank ``r`` is the ``r - below``-th smallest value inside, exactly. A row
    where it does not (ties, a sample far off by chance, NaN) is partitioned in full, so every row is exact.
    """
    n = len(x)
    below = np.zeros(n, np.int64) if lo is None else _count(x < lo)
    if lo is None:
        inside = ~np.isnan(x) if hi is None else x <= hi
    else:
        inside = x >= lo
        if hi is not None:
            inside &= x <= hi
    k = _count(inside)
    ok = (below <= ranks[0]) & (below + k > ranks[-1])
    if not ok.all():
        inside &= ok[:, None]
        k = np.where(ok, k, 0)
    values = x[inside]  # row by row
    width = max(int(k.max()), 1)
    gathered = np.full((n, width), np.inf, x.dtype)
    starts = np.cumsum(k) - k
    gathered[np.repeat(np.arange(n), k), np.arange(len(values)) - np.repeat(starts, k)] = values
    gathered.sort(axis=1)
    local = np.clip(np.array(ranks)[None] - below[:, None], 0, width - 1)
    out = np.take_along_axis(gathered, local, axis=1)
    if not ok.all():
        out[~ok] = _partition_select(x[~ok], ranks)
    return out


def _count(mask: np.ndarray) -> np.ndarray:
    """True values per row of a boolean ``(n, p)`` (summed as bytes: twice as fast as ``count_nonzero``)."""
    return np.add.reduce(mask.view(np.uint8), axis=1, dtype=np.int64)


def _partition_select(x: np.ndarray, ranks: list[int]) -> np.ndarray:
    """:func:`_select` by ``np.partition``.

    A rank that directly follows a partitioning rank is the smallest value above it, found without partitioning
    at it (in a run of ranks every other one is partitioned at).
    """
    pivots = []
    for r in ranks:
        if not pivots or pivots[-1] != r - 1:
            pivots.append(r)
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
    """Threads for the NumPy/SciPy work on a CPU, one row chunk per torch thread.

    The lookups, selections, box filter and labelling all release the GIL.
    """
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
    ones = torch.ones((), dtype=torch.int32, device=levels.device).expand(n, p)  # no tensor of ones in memory
    counts.scatter_add_(1, levels.long(), ones)
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
    deviation = x - mean[:, None]
    return mean, deviation.mul_(deviation).mean(1).sqrt()  # squared in place: one temporary fewer


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


def _handcrafted_one_scale(patches: torch.Tensor, stains: torch.Tensor) -> torch.Tensor:
    """The 36 columns of :func:`~._handcrafted.handcrafted_features` of uint8 patches ``(n, 3, h, w)``.

    ``stains``: their haematoxylin and eosin densities ``(n, 2, h * w)`` (:func:`_stains`).
    """
    n, _, h, w = patches.shape
    haem, eosin = stains[:, 0], stains[:, 1]
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
        img = _block_mean(grey_img, factor)
        gy, gx = _gradient(img, 1), _gradient(img, 2)
        grad = torch.hypot(gx, gy).reshape(n, -1)
        lap = _laplacian(img).abs_().reshape(n, -1)
        features += [*_mean_std(grad), lap.mean(1)]
    return torch.stack([f.float() for f in features], dim=1)


def _gradient(img: torch.Tensor, axis: int) -> torch.Tensor:
    """``np.gradient`` along ``axis`` of a stack ``(n, h, w)``: central differences, one-sided at the edges."""
    length = img.shape[axis]
    out = torch.empty_like(img)  # each part written in place: no concatenation
    torch.sub(img.narrow(axis, 2, length - 2), img.narrow(axis, 0, length - 2), out=out.narrow(axis, 1, length - 2))
    out.narrow(axis, 1, length - 2).div_(2.0)
    torch.sub(img.narrow(axis, 1, 1), img.narrow(axis, 0, 1), out=out.narrow(axis, 0, 1))
    torch.sub(img.narrow(axis, length - 1, 1), img.narrow(axis, length - 2, 1), out=out.narrow(axis, length - 1, 1))
    return out


def _laplacian(img: torch.Tensor) -> torch.Tensor:
    """4-neighbour Laplacian of each image of a stack ``(n, h, w)`` (edges replicated), the reference's sum order."""
    p = torch.nn.functional.pad(img[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    out = p[:, :-2, 1:-1] + p[:, 2:, 1:-1]  # then in place: the same sums in the same order, fewer temporaries
    out += p[:, 1:-1, :-2]
    out += p[:, 1:-1, 2:]
    return out.sub_(4 * img)


def _blob_count(haem: torch.Tensor) -> torch.Tensor:
    """Haematoxylin-dense blobs per 10,000 pixels of each image ``(n, h, w)``, as the reference's ``_blob_count``."""
    n, h, w = haem.shape
    if _use_numpy(haem):  # SciPy's own filter and labelling, a chunk of the stack per thread: the reference's values
        from scipy import ndimage

        images = haem.numpy()
        low, high, t = _virtual_index(h * w, 85)
        # no connection across the stack: each image labelled on its own, labels numbered on through the chunk
        structure = np.zeros((3, 3, 3), bool)
        structure[1] = ndimage.generate_binary_structure(2, 1)

        def count(rows: slice) -> np.ndarray:
            smooth = ndimage.uniform_filter(images[rows], size=(1, 3, 3))
            values = torch.from_numpy(_select(smooth.reshape(len(smooth), -1), sorted({low, high})))
            threshold = _lerp(values[:, 0], values[:, -1], t, wide=False).numpy()  # as _percentiles
            labels, _ = ndimage.label(smooth > threshold[:, None, None], structure=structure)
            return np.diff(np.maximum.accumulate(labels.reshape(len(smooth), -1).max(1)), prepend=0)

        counts = torch.from_numpy(np.concatenate(list(_pool().map(count, _row_chunks(n)))).astype(np.float32))
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
def _filter_matrices(n: int, sigma: float) -> torch.Tensor:
    """float32 ``(2 n, n)``: the matrices of the second-derivative and smoothing filters of width ``sigma``.

    The second-derivative filter carries the width's scale normalisation ``sigma ** 2`` (one product fewer per
    response; it moves the response by float32 rounding only).
    """
    blocks = [_filter_matrix(n, sigma, 2) * sigma**2, _filter_matrix(n, sigma, 0)]
    return torch.from_numpy(np.concatenate(blocks).astype(np.float32))


_BLOB_CHUNK = 32
"""Patches filtered at a time: their intermediate products (about 10 MB at 112 px) stay in the cache and in reused
memory, where one product for a whole batch pays a page fault per 4 kB (a third or more of its time on a CPU)."""


def _blobs_one_scale(patches: torch.Tensor, stains: torch.Tensor, filters: str = "pyramid") -> torch.Tensor:
    """The 12 columns of :func:`~._handcrafted.stain_blob_features` of uint8 patches ``(n, 3, h, w)``.

    ``stains``: their haematoxylin and eosin densities ``(n, 2, h * w)`` (:func:`_stains`); ``filters`` as there.
    """
    n, _, h, w = patches.shape
    images = stains.reshape(2 * n, h, w)  # (patch, stain) pairs
    columns = []  # for each width: the mean |response| and the 90th percentile of -response, (patch, stain) rows
    for width, factor in blob_levels(filters):
        columns += _blob_responses(_block_mean(images, factor), width)
    features = torch.stack(columns, dim=1)  # ((patch, stain), (width, statistic))
    return features.reshape(n, 2 * 2 * len(_BLOB_SIGMAS))


def _block_mean(images: torch.Tensor, factor: int) -> torch.Tensor:
    """:func:`~._handcrafted.block_mean` of a stack ``(n, h, w)`` (pooling drops the same edge rows and columns)."""
    if factor == 1:
        return images
    return torch.nn.functional.avg_pool2d(images[:, None], factor)[:, 0]  # 3x a mean over a reshaped stack


def _blob_responses(images: torch.Tensor, sigma: float) -> list[torch.Tensor]:
    """Blob statistics of each image ``(m, h, w)`` at width ``sigma`` px: mean |response|, 90th percentile of -response.

    The response is the scale-normalised Laplacian of Gaussian, its filters as products with their matrices.
    """
    m, h, w = images.shape
    columns, rows = (_filter_matrices(size, sigma).to(images.device) for size in (w, h))
    d2_h, smooth_h = rows[:h], rows[h:]
    chunk = 2 * _BLOB_CHUNK
    along_w = torch.empty(min(chunk, m) * h, 2 * w, dtype=images.dtype, device=images.device)
    response = torch.empty(min(chunk, m), h, w, dtype=images.dtype, device=images.device)
    mean_abs, quantile = [], []
    for start in range(0, m, chunk):
        batch = images[start : start + chunk].reshape(-1, w)
        k = len(batch) // h
        # along the columns first: both derivative orders in one product, (k, h, [order, w])
        a = torch.mm(batch, columns.T, out=along_w[: k * h]).view(k, h, 2 * w)
        d2_w, smooth_w = a[..., :w], a[..., w:]
        # then along the rows: d2/dy2 of the column-smoothed image plus the row-smoothed d2/dx2
        r = response[:k]
        torch.matmul(d2_h, smooth_w, out=r).add_(torch.matmul(smooth_h, d2_w))
        summary = _blob_statistics(r.reshape(k, h * w))
        mean_abs.append(summary[0])
        quantile.append(summary[1])
    return [torch.cat(mean_abs), torch.cat(quantile)]


def _blob_statistics(responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean absolute value and 90th percentile of minus each row of ``responses`` ``(r, p)``, as the reference.

    The percentile of ``-x`` from the mirrored order statistics of ``x`` (negation is exact): no negated copy.
    """
    p = responses.shape[1]
    low, high, t = _virtual_index(p, 90)
    ranks = [p - 1 - low, p - 1 - high]
    if _use_numpy(responses):  # one pass over each row chunk on the threads: |x| mean and the selection
        x = responses.numpy()

        def summary(chunk: slice) -> tuple[np.ndarray, np.ndarray]:
            return np.abs(x[chunk]).mean(1), _select(x[chunk], sorted(set(ranks)))

        parts = list(_pool().map(summary, _row_chunks(len(x))))
        mean_abs = torch.from_numpy(np.concatenate([m for m, _ in parts]))
        values = torch.from_numpy(np.concatenate([v for _, v in parts]))
        values = values[:, [sorted(set(ranks)).index(r) for r in ranks]]
    else:
        mean_abs = responses.abs().mean(1)
        values = _order_statistics(responses, ranks)
    return mean_abs, _lerp(-values[:, 0], -values[:, 1], t, wide=False)
