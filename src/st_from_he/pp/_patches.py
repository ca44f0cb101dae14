"""Patches of fixed physical size around spots: pyramid level choice, decoded-image cache, resampling.

Geometry. A pixel ``i`` of an image covers the continuous coordinates ``[i, i + 1)`` (spatialdata's convention, and
PIL's), so a spot centre ``(x, y)`` in pixels lies in pixel ``(floor(x), floor(y))``. The patch of a spot at context
scale ``c`` is the square of side ``c * size_um`` micrometres centred on the spot; it is resampled onto
``size_px x size_px`` output pixels with a separable triangle (bilinear) filter whose support widens with the
downsampling factor (antialiasing, as PIL's ``Image.resize(..., BILINEAR, box=...)``; the two agree to +-1 grey
level). Pixels beyond the image border count as white (255), the colour of empty glass.
"""

from __future__ import annotations

import math
import numbers
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from st_from_he._logging import logger
from st_from_he._memory import empty_uint8
from st_from_he._sdata import (
    as_names,
    check_sdata,
    element_to_element,
    find_table,
    image_section,
    images_of_shapes,
    per_section,
    table_sections,
)
from st_from_he._sdata import samples as table_samples
from st_from_he._settings import settings
from st_from_he._validate import check_number, check_spots_in_image

if TYPE_CHECKING:
    import dask.array as da
    from spatialdata import SpatialData

FILL_VALUE = 255
"""Value of the pixels beyond an image's border (white, like empty glass)."""

# Chunked (tiled) levels up to this size are read whole once; larger ones are read window by window.
_SMALL_LEVEL_BYTES = 512 * 2**20
# Patches per kernel call when work is spread over threads.
_BATCH = 64


# --------------------------------------------------------------------------------------------------------------------
# Resampling kernel (numba, compiled on first use and cached on disk)
# --------------------------------------------------------------------------------------------------------------------


def _kernel():
    """The compiled resampling kernel (numba imported, the kernel compiled or loaded from its cache, on first use)."""
    from ._resample_kernel import resample  # a module import runs once: later calls find it in sys.modules

    return resample


def resample_boxes(src: np.ndarray, boxes: np.ndarray, size_px: int, *, out: np.ndarray | None = None) -> np.ndarray:
    """Resample square windows of an image onto ``size_px x size_px`` pixels.

    Parameters
    ----------
    src
        ``(c, y, x)`` uint8 image.
    boxes
        ``(n, 4)`` windows ``x0, y0, x1, y1`` in continuous pixel coordinates of ``src`` (pixel ``i`` spans
        ``[i, i + 1)``); they may reach beyond the image, whose outside counts as white.
    size_px
        Side of the output patches.
    out
        Optional ``(n, c, size_px, size_px)`` uint8 array to write into.

    Returns
    -------
    The ``(n, c, size_px, size_px)`` uint8 patches.
    """
    src = np.ascontiguousarray(src, dtype=np.uint8)
    boxes = np.ascontiguousarray(boxes, dtype=np.float64).reshape(-1, 4)
    if out is None:
        out = np.empty((len(boxes), src.shape[0], size_px, size_px), np.uint8)
    if len(boxes):
        _kernel()(src, boxes, out, FILL_VALUE)
    return out


def _n_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


# --------------------------------------------------------------------------------------------------------------------
# Images, levels and elements
# --------------------------------------------------------------------------------------------------------------------


def image_levels(element) -> list[da.Array]:
    """The ``(c, y, x)`` dask arrays of an image element, finest first (one level for a non-multiscale image)."""
    import xarray as xr

    if isinstance(element, xr.DataArray):
        return [element.data]
    levels = []
    for name in sorted(element.children, key=lambda k: int(k.removeprefix("scale"))):
        node = element[name]
        var = next(iter(node.data_vars))
        levels.append(node[var].data)
    return levels


def shapes_image(sdata: SpatialData, shapes_key: str, image_key=None) -> str:
    """The image a shapes element's circles lie on.

    ``image_key`` if given, else the package's ``f"{S}_image"`` of a micrometre system ``S`` the circles are in, else
    the finest image sharing a coordinate system with them.
    """
    from st_from_he._sdata import check_image_key, systems_of

    if image_key is not None:
        return check_image_key(sdata, image_key)
    systems = list(systems_of(sdata, shapes_key))
    own = [f"{cs}_image" for cs in systems if f"{cs}_image" in sdata.images]
    if len(own) > 1:  # prefer the section that names the element
        own = [key for key in own if shapes_key.startswith(key.removesuffix("image"))] or own
    if len(own) == 1:
        return own[0]
    found = images_of_shapes(sdata, shapes_key)
    if len(own) > 1 or not found:
        raise ValueError(
            f"Cannot tell which image the circles {shapes_key!r} lie on: their coordinate systems are {systems}, "
            f"shared by {own or 'no image'} (images present: {sorted(sdata.images)}). Pass `image_key=`."
        )
    return found[0]


def element_sample(sdata: SpatialData, element_key: str) -> str:
    """The section an image or shapes element belongs to (see :func:`st_from_he._sdata.image_section`)."""
    image = element_key if element_key in sdata.images else shapes_image(sdata, element_key)
    return image_section(sdata, image, pixel_size_um=1.0).sample


def to_image_pixels(sdata: SpatialData, element_key: str, image_key: str, sample: str | None = None) -> np.ndarray:
    """3x3 affine (x, y) matrix from an element's intrinsic coordinates to the pixels of an image.

    ``sample`` names the coordinate system to go through; default any system both elements share.
    """
    from st_from_he._sdata import systems_of

    cs = sample if sample is not None and sample in systems_of(sdata, element_key) else None
    return element_to_element(sdata, element_key, image_key, cs)[0]


def image_of(
    sdata: SpatialData, image_key: str, *, table_key: str | None = None, pixel_size_um: float | None = None
) -> tuple[str, float, list[da.Array]]:
    """Section, micrometres per pixel (finest level) and levels of an image element, with clear errors.

    The resolution is found as :func:`st_from_he._sdata.section_resolution` says, or ``pixel_size_um``.
    """
    sec = image_section(sdata, image_key, table_key=table_key, pixel_size_um=pixel_size_um)
    return sec.sample, sec.pixel_size_um, image_levels(sdata.images[image_key])


def is_monolithic(array: da.Array) -> bool:
    """Whether every window of ``array`` needs one computation over the whole image (e.g. a JPEG decode).

    True when the graph's source tasks are function calls, fewer than the chunks they feed (a lazily decoded JPEG
    rechunked after the fact); false for arrays read chunk by chunk (zarr, tiled TIFF) or held in memory.
    """
    try:
        from dask._task_spec import Task, convert_legacy_graph

        graph = convert_legacy_graph(dict(array.__dask_graph__()))
        calls = sum(1 for task in graph.values() if isinstance(task, Task) and not task.dependencies)
    except Exception:  # noqa: BLE001 - graph internals differ between dask versions: fall back on chunk counts
        return array.npartitions == 1
    return 0 < calls < array.npartitions


def index_positions(index, n: int) -> np.ndarray:
    """Positions ``0..n-1`` picked by a slice or a 1D array of ints (negative from the end) or bools, checked."""
    if isinstance(index, slice):
        return np.arange(n)[index]
    idx = np.asarray(index)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise IndexError(f"Boolean index of shape {idx.shape} does not match {n} patches.")
        return np.flatnonzero(idx)
    if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):  # [] is float to numpy
        raise IndexError("Index with an int, a slice, or a 1D array of ints or bools.")
    idx = idx.astype(np.intp)
    if len(idx) and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"Indices out of range for {n} patches.")
    return idx % n if n else idx


@dataclass(frozen=True)
class _Section:
    """One section's image as the dataset reads it."""

    sample: str
    image_key: str
    pixel_size_um: float
    levels: tuple  # dask arrays (c, y, x), finest first
    monolithic: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.levels[0].shape[1:])

    def level_scale(self, level: int) -> tuple[float, float]:
        """Level pixels per full-resolution pixel, along x and y."""
        h0, w0 = self.shape
        h, w = self.levels[level].shape[1:]
        return w / w0, h / h0

    def choose_level(self, target_um: float) -> int:
        """The coarsest level whose pixels are no larger than ``target_um``; level 0 if every level's are larger."""
        best = 0
        for i in range(len(self.levels)):
            fx, fy = self.level_scale(i)
            if self.pixel_size_um / min(fx, fy) <= target_um * 1.01:
                best = i
        return best

    def glass(self) -> np.ndarray:
        """The slide's glass colour (RGB), read from its coarsest level at least 512 px on each side."""
        from st_from_he.models._white_balance import glass_colour

        sides = [min(level.shape[1:]) for level in self.levels]
        level = max([i for i, side in enumerate(sides) if side >= 512] or [0])
        if self.materialise(level):
            image = DECODED.get([self.levels[level]])[0]
        else:  # read chunk by chunk; of a large level (no pyramid) a strided sample of at most 2048 px a side
            step = math.ceil(max(self.levels[level].shape[1:]) / 2048)
            image = np.asarray(self.levels[level][:, ::step, ::step].compute())
        return glass_colour(image)

    def materialise(self, level: int) -> bool:
        """Whether ``level`` is decoded whole (then kept in :data:`DECODED`) rather than read window by window.

        A monolithic image (JPEG, PNG) can only be decoded whole; a tiled level is decoded whole only when it is
        small (512 MB) and fits ``sth.settings.image_cache_gb``, so a level that does not fit is never decoded whole.
        """
        if self.monolithic:
            return True
        return self.levels[level].nbytes <= min(_SMALL_LEVEL_BYTES, settings.image_cache_gb * 2**30)


# --------------------------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------------------------


class PatchDataset:
    """Patches of fixed physical size centred on spots, one item per spot, readable at random.

    Made by :func:`st_from_he.pp.extract_patches`. A map-style dataset (``len`` and integer indexing), so it can be
    handed to :class:`torch.utils.data.DataLoader` directly; torch itself is never imported here.

    Images are decoded once and kept: the pyramid level a patch needs (the coarsest whose pixels are no larger than
    the patch's, so patches are never built from a coarser image than necessary) is read whole when it is small or
    can only be decoded whole (JPEG, PNG), and kept in a process-wide cache of ``sth.settings.image_cache_gb``; large tiled levels
    (zarr, TIFF pyramids) are read window by window instead, through a process-wide cache of decoded tiles of
    ``sth.settings.tile_cache_gb``, so a whole slide's tiles are decoded about once and memory stays bounded.

    Attributes
    ----------
    obs_names
        Name of each item's spot: the table's ``obs_names``, or ``f"{shapes_key}-{index}"`` for a shapes element.
    samples
        Sample (section) id of each item.
    spatial
        Spot centres ``(n, 2)`` in pixels (x, y) of the finest level of each sample's image.
    size_um
        Side of a patch at context scale 1, in micrometres.
    size_px
        Side of every patch in pixels.
    context
        Context scales: the patch at scale ``c`` shows ``c * size_um`` micrometres resampled to ``size_px``.
    pixel_size_um
        Micrometres per pixel of each sample's image (finest level).
    levels
        Pyramid level read for each sample and context scale.

    Examples
    --------
    >>> import st_from_he as sth
    >>> sdata = sth.datasets.her2st(["C6"], path="../shared/data/her2st")
    >>> patches = sth.pp.extract_patches(sdata, size_um=112, size_px=224)
    >>> len(patches) == sdata.tables["table"].n_obs, patches.item_shape
    (True, (3, 224, 224))
    >>> batch = patches[[0, 5, 9]]  # (3, 3, 224, 224) uint8
    >>> import torch  # doctest: +SKIP
    >>> loader = torch.utils.data.DataLoader(patches, batch_size=64, shuffle=True)  # doctest: +SKIP
    """

    def __init__(
        self,
        sections: dict[str, _Section],
        samples: np.ndarray,
        spatial: np.ndarray,
        obs_names: pd.Index,
        *,
        size_um: float,
        size_px: int,
        context: tuple[float, ...],
    ):
        self.obs_names = pd.Index(obs_names)
        self.samples = np.asarray(samples).astype(str)
        self.spatial = np.asarray(spatial, dtype=float)
        self.size_um = float(size_um)
        self.size_px = int(size_px)
        self.context = tuple(float(c) for c in context)
        self.pixel_size_um = {s: sec.pixel_size_um for s, sec in sections.items()}
        self.levels = {
            s: tuple(sec.choose_level(c * self.size_um / self.size_px) for c in self.context)
            for s, sec in sections.items()
        }
        self._sections = sections
        self._rows = {s: np.flatnonzero(self.samples == s) for s in sections}
        self._glass: dict[str, np.ndarray] = {}
        for s, sec in sections.items():
            coarser = self.pixel_size_um[s] > self.size_um / self.size_px * 1.01
            logger.debug(
                "%s: %.3f um/px image, patches of %g um at %d px (%.3f um/px) read from level(s) %s%s",
                s,
                sec.pixel_size_um,
                self.size_um,
                self.size_px,
                self.size_um / self.size_px,
                self.levels[s],
                " (upsampled: the image is coarser than the patches)" if coarser else "",
            )

    # ---- sequence protocol ----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.obs_names)

    @property
    def n_scales(self) -> int:
        """Number of context scales."""
        return len(self.context)

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one item: ``(3, size_px, size_px)``, or ``(n_scales, 3, size_px, size_px)`` with several scales."""
        core = (3, self.size_px, self.size_px)
        return core if self.n_scales == 1 else (self.n_scales, *core)

    def __getitem__(self, index):
        """Patch of one spot (an integer index), or the stacked patches of a slice or an array of indices."""
        if isinstance(index, (int, np.integer)):
            i = int(index)
            if not -len(self) <= i < len(self):
                raise IndexError(f"Index {i} is out of range for {len(self)} patches.")
            return self._patches(np.array([i % len(self)]))[0]
        return self._patches(index_positions(index, len(self)))

    @property
    def glass(self) -> dict[str, np.ndarray]:
        """The colour of empty glass on each section's slide (RGB, float), by sample id.

        Estimated once per section from a coarse level of its image (:func:`~st_from_he.models.glass_colour`); the
        default model's ridge probe white-balances patches with it (:func:`~st_from_he.models.white_balance`).
        """
        for sample, section in self._sections.items():
            if sample not in self._glass:
                self._glass[sample] = section.glass()
        return dict(self._glass)

    def spatial_um(self) -> np.ndarray:
        """Spot centres ``(n, 2)`` in micrometres (:attr:`spatial` times each section's micrometres per pixel)."""
        pixel_size = np.array([self.pixel_size_um[s] for s in self.samples], dtype=float)
        return self.spatial * pixel_size[:, None]

    def glass_per_spot(self) -> np.ndarray:
        """The glass colour of each item's slide, ``(n, 3)`` (see :attr:`glass`)."""
        glass = self.glass
        out = np.empty((len(self), 3))
        for sample, rows in self._rows.items():
            out[rows] = glass[sample]
        return out

    def to_numpy(self) -> np.ndarray:
        """All patches as one array ``(n, *item_shape)`` (for data that fit in memory)."""
        return self._patches(np.arange(len(self)))

    def __repr__(self) -> str:
        samples = ", ".join(self._sections)
        return (
            f"PatchDataset of {len(self)} patches of {self.size_um:g} um at {self.size_px} px, context "
            f"{self.context}, from {len(self._sections)} section(s): {samples}"
        )

    # ---- work -------------------------------------------------------------------------------------------------------

    def _patches(self, idx: np.ndarray) -> np.ndarray:
        out = empty_uint8((len(idx), self.n_scales, 3, self.size_px, self.size_px))
        order = self.samples[idx]
        for sample in dict.fromkeys(order):  # one section at a time, in order of first appearance
            pos = np.flatnonzero(order == sample)
            self._section_patches(sample, idx[pos], out, pos)
        return out[:, 0] if self.n_scales == 1 else out

    def _boxes(self, sample: str, rows: np.ndarray, scale_index: int) -> np.ndarray:
        """Windows (x0, y0, x1, y1) of the rows' patches in pixels of the level read for that scale."""
        sec = self._sections[sample]
        level = self.levels[sample][scale_index]
        fx, fy = sec.level_scale(level)
        half_um = self.context[scale_index] * self.size_um / 2
        half_x = half_um / sec.pixel_size_um * fx
        half_y = half_um / sec.pixel_size_um * fy
        cx = self.spatial[rows, 0] * fx
        cy = self.spatial[rows, 1] * fy
        return np.column_stack([cx - half_x, cy - half_y, cx + half_x, cy + half_y])

    def _section_patches(self, sample: str, rows: np.ndarray, out: np.ndarray, pos: np.ndarray) -> None:
        sec = self._sections[sample]
        for s, level in enumerate(self.levels[sample]):
            boxes = self._boxes(sample, rows, s)
            if sec.materialise(level):
                src = self._level_array(sample, level)
                self._run(src, boxes, out, pos, s)
            else:
                self._windowed(sec.levels[level], boxes, out, pos, s)

    def _run(self, src: np.ndarray, boxes: np.ndarray, out: np.ndarray, pos: np.ndarray, s: int) -> None:
        """Resample ``boxes`` of ``src`` into ``out[pos, s]``, spread over threads for large batches."""
        kernel = _kernel()
        contiguous = len(pos) > 0 and np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos))) and self.n_scales == 1

        def work(sl: slice):
            if contiguous:
                kernel(src, boxes[sl], out[pos[0] + sl.start : pos[0] + sl.stop, 0], FILL_VALUE)
            else:
                tmp = np.empty((sl.stop - sl.start, src.shape[0], self.size_px, self.size_px), np.uint8)
                kernel(src, boxes[sl], tmp, FILL_VALUE)
                out[pos[sl], s] = tmp

        slices = [slice(i, min(i + _BATCH, len(boxes))) for i in range(0, len(boxes), _BATCH)]
        n_threads = _n_threads()
        if len(slices) <= 1 or n_threads == 1:
            for sl in slices:
                work(sl)
            return
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(work, slices))

    def _windowed(self, level: da.Array, boxes: np.ndarray, out: np.ndarray, pos: np.ndarray, s: int) -> None:
        """Read each patch's window (with the filter's margin) from a lazy level, never the whole level.

        Windows are read in order of their place on the slide (by rows of chunks, then across), in batches whose
        chunks come from :data:`TILES`, so that neighbouring spots decode the chunks under them once; each patch is
        still written to its own place in ``out``.
        """
        _, height, width = level.shape
        scale = (boxes[:, 2] - boxes[:, 0]) / self.size_px
        margin = np.ceil(np.maximum(scale, 1.0)) + 1
        x0 = np.clip(np.floor(boxes[:, 0] - margin), 0, width).astype(int)
        x1 = np.clip(np.ceil(boxes[:, 2] + margin), 0, width).astype(int)
        y0 = np.clip(np.floor(boxes[:, 1] - margin), 0, height).astype(int)
        y1 = np.clip(np.ceil(boxes[:, 3] + margin), 0, height).astype(int)
        chunk_row = np.searchsorted(np.cumsum(level.chunks[1]), y0, side="right")
        order = np.lexsort((x0, chunk_row))
        for start in range(0, len(order), _BATCH):
            batch = order[start : start + _BATCH]
            windows = TILES.windows(level, y0[batch], y1[batch], x0[batch], x1[batch])
            for i, window in zip(batch, windows, strict=True):  # each window holds its spot's centre: not empty
                rel = boxes[i] - np.array([x0[i], y0[i], x0[i], y0[i]])
                out[pos[i], s] = resample_boxes(window, rel[None], self.size_px)[0]

    def _level_array(self, sample: str, level: int) -> np.ndarray:
        """A level of a section as an in-memory array, decoded once per process (see :class:`_DecodedLevels`)."""
        sec = self._sections[sample]
        # Every level this section needs that is read whole, computed together so a JPEG is decoded once.
        wanted = [lv for lv in dict.fromkeys(self.levels[sample]) if sec.materialise(lv)]
        arrays = DECODED.get([sec.levels[lv] for lv in wanted])
        return arrays[wanted.index(level)]


class _DecodedLevels:
    """Decoded image levels shared by every :class:`PatchDataset` of the process, least recently used dropped first.

    Keyed by the dask array's name (a token of the file and the level), so training, validation and prediction on
    the same section decode its image once. Its budget is ``sth.settings.image_cache_gb``; worker processes keep
    their own.
    """

    def __init__(self):
        self._arrays: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, levels: list) -> list[np.ndarray]:
        """The levels as uint8 arrays, computing the missing ones together."""
        import dask
        import dask.array

        with self._lock:  # one decode per level, even when threads ask at once
            missing = [lvl for lvl in levels if lvl.name not in self._arrays]
            if missing and all(lvl.npartitions > 1 for lvl in missing):
                # tiled: chunks are written into place as they are decoded, never held twice (as concatenating
                # them would); one store, so chunks shared between levels are computed once
                arrays = [empty_uint8(lvl.shape) for lvl in missing]
                dask.array.store(missing, arrays, lock=False)
            else:  # one chunk (a decoded JPEG) is returned as it is, without a copy
                arrays = dask.compute(*missing)
            for lvl, arr in zip(missing, arrays, strict=True):
                self._arrays[lvl.name] = np.ascontiguousarray(arr, dtype=np.uint8)
            for lvl in levels:
                self._arrays.move_to_end(lvl.name)
            out = [self._arrays[lvl.name] for lvl in levels]
            self._evict(keep={lvl.name for lvl in levels})
            return out

    def _evict(self, keep: set[str]) -> None:
        budget = settings.image_cache_gb * 2**30
        while sum(a.nbytes for a in self._arrays.values()) > budget:
            victim = next((k for k in self._arrays if k not in keep), None)
            if victim is None:
                break
            del self._arrays[victim]

    def clear(self) -> None:
        """Drop every decoded level."""
        with self._lock:
            self._arrays.clear()


DECODED = _DecodedLevels()


def tile_cache_bytes() -> int:
    """``sth.settings.tile_cache_gb`` in bytes, or a clear error for a value that is not a size."""
    budget = settings.tile_cache_gb
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not (math.isfinite(budget) and budget >= 0):
        raise ValueError(
            f"`sth.settings.tile_cache_gb` must be a number of gigabytes, 0 or more (0 turns the decoded-tile cache "
            f"off), got {budget!r}. E.g. `sth.settings.tile_cache_gb = 0.5`."
        )
    return int(budget * 2**30)


class _TileCache:
    """Decoded chunks (tiles) of lazily read image levels (tiled TIFF, zarr), least recently used dropped first.

    Keyed by (dask array name, chunk row, chunk column): the windows of neighbouring spots share the chunks under
    them, so reading a slide's spots row after row decodes each chunk about once, where reading each batch of windows
    on its own decodes a chunk again for every batch that touches it. Its budget is ``sth.settings.tile_cache_gb``
    (``0``: nothing is kept); the chunks one batch of windows needs are held while it is read, even beyond the budget.
    Shared by every :class:`PatchDataset` of the process; worker processes keep their own.
    """

    def __init__(self):
        self._chunks: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        """Bytes of decoded chunks held."""
        self.n_decoded = 0
        """Chunks decoded so far (a chunk decoded again after it was dropped counts again)."""

    def windows(self, level: da.Array, y0, y1, x0, x1) -> list[np.ndarray]:
        """The windows ``level[:, y0[i]:y1[i], x0[i]:x1[i]]`` as uint8 arrays, their missing chunks decoded at once.

        The bounds must lie inside the level and each window must be non-empty.
        """
        import dask

        budget = tile_cache_bytes()
        ybounds = np.concatenate([[0], np.cumsum(level.chunks[1])])
        xbounds = np.concatenate([[0], np.cumsum(level.chunks[2])])
        # chunk ranges [first, last] of each window
        iy0 = np.searchsorted(ybounds, y0, side="right") - 1
        iy1 = np.searchsorted(ybounds, y1, side="left") - 1
        ix0 = np.searchsorted(xbounds, x0, side="right") - 1
        ix1 = np.searchsorted(xbounds, x1, side="left") - 1
        needed = dict.fromkeys(
            (i, j)
            for a, b, c, d in zip(iy0, iy1, ix0, ix1, strict=True)
            for i in range(a, b + 1)
            for j in range(c, d + 1)
        )
        chunks = {}
        with self._lock:
            for key in needed:
                found = self._chunks.get((level.name, *key))
                if found is not None:
                    self._chunks.move_to_end((level.name, *key))
                    chunks[key] = found
        missing = [key for key in needed if key not in chunks]
        if missing:  # one computation, so dask decodes them on its threads
            regions = [level[:, ybounds[i] : ybounds[i + 1], xbounds[j] : xbounds[j + 1]] for i, j in missing]
            for key, array in zip(missing, dask.compute(*regions), strict=True):
                chunks[key] = np.ascontiguousarray(array, dtype=np.uint8)
            with self._lock:
                self.n_decoded += len(missing)
                if budget > 0:
                    for key in missing:
                        full = (level.name, *key)
                        if full not in self._chunks:
                            self._chunks[full] = chunks[key]
                            self.nbytes += chunks[key].nbytes
                self._evict(budget)
        out = []
        for a, b, c, d, top, bottom, left, right in zip(iy0, iy1, ix0, ix1, y0, y1, x0, x1, strict=True):
            window = np.empty((level.shape[0], bottom - top, right - left), np.uint8)
            for i in range(a, b + 1):
                for j in range(c, d + 1):
                    # the overlap of the window and chunk (i, j), in level pixels
                    r0, r1 = max(top, ybounds[i]), min(bottom, ybounds[i + 1])
                    c0, c1 = max(left, xbounds[j]), min(right, xbounds[j + 1])
                    block = chunks[(i, j)]
                    window[:, r0 - top : r1 - top, c0 - left : c1 - left] = block[
                        :, r0 - ybounds[i] : r1 - ybounds[i], c0 - xbounds[j] : c1 - xbounds[j]
                    ]
            out.append(window)
        return out

    def _evict(self, budget: int) -> None:
        while self.nbytes > budget and self._chunks:
            _, dropped = self._chunks.popitem(last=False)
            self.nbytes -= dropped.nbytes

    def clear(self) -> None:
        """Drop every decoded chunk."""
        with self._lock:
            self._chunks.clear()
            self.nbytes = 0


TILES = _TileCache()


# --------------------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------------------


def extract_patches(
    sdata: SpatialData,
    *,
    size_um: float = 112.0,
    size_px: int = 224,
    context: Sequence[float] | float = (1.0,),
    shapes_key: str | None = None,
    table_key: str | None = None,
    image_key: str | Mapping[str, str] | None = None,
    coordinate_system: str | None = None,
    pixel_size_um: float | Mapping[str, float] | None = None,
    samples: Sequence[str] | str | None = None,
) -> PatchDataset:
    """Image patches of fixed physical size centred on each spot, as a random-access dataset.

    Every patch shows the same area of tissue whatever each image's resolution: its side is ``size_um`` micrometres
    (times each context scale), resampled to ``size_px`` pixels. Patches at the image border are padded with white
    (255), the colour of empty glass, rather than mirrored, which would invent tissue.

    Works on any SpatialData whose table annotates circles (spatialdata's ``region``/``instance_key``), e.g. the
    package's readers' or spatialdata-io's: a spot's section is ``obs["sample"]`` when present, else the region it
    annotates; its centre is its circle's, carried into the pixels of the section's image by the transformations.

    Parameters
    ----------
    sdata
        Sections with H&E images (see :func:`st_from_he.io.read_st`, or spatialdata-io's readers).
    size_um
        Side of a patch in micrometres at context scale 1 (the reference uses 112 um: 224 px at 0.5 um/px).
    size_px
        Side of every patch in pixels.
    context
        Context scales: for each ``c`` a patch of side ``c * size_um`` centred on the same spot, resampled to
        ``size_px`` (e.g. ``(1.0, 3.0)`` adds a 3x wider view).
    shapes_key
        Take the spots from this shapes element (e.g. pseudo-spots from :func:`st_from_he.pp.spot_grid`) instead of
        the table: its circle centres (polygon centroids), in element order.
    table_key
        Table whose rows are the spots (in table order). Default: ``"table"``, else the only table.
    image_key
        The H&E image of each section: a name (one section), or a dict by section id. Default: the package's
        ``f"{S}_image"``, else the finest image sharing a coordinate system with the section's circles (those named
        after the section first, e.g. spatialdata-io's ``f"{S}_full_image"`` before ``f"{S}_hires_image"``).
    coordinate_system
        The coordinate system in which circles and image are matched; default: the first one they share.
    pixel_size_um
        Micrometres per pixel of the image (its finest level): a number, or a dict by section. Default, in this
        order: the section's micrometre coordinate system (the package's readers), Space Ranger's
        ``spot_diameter_fullres`` (65 um; in ``table.uns["spatial"]`` or as spatialdata-io's Visium circles), the
        Visium spot grid (``array_row``/``array_col``); else an error asks for it.
    samples
        Only the spots of these sections (default: all).

    Returns
    -------
    A :class:`~st_from_he.pp.PatchDataset`: item ``i`` is the uint8 patch ``(3, size_px, size_px)`` of spot ``i``,
    or ``(n_scales, 3, size_px, size_px)`` with several context scales; a slice or an array of indices gives the
    stacked batch. ``obs_names`` names the spots (the table's ``obs_names``, or ``f"{shapes_key}-{index}"``); also
    ``samples``, ``spatial``, ``to_numpy()``. ``sdata`` is not modified.

    Examples
    --------
    >>> import st_from_he as sth
    >>> sdata = sth.datasets.her2st(["C6"], path="../shared/data/her2st")
    >>> patches = sth.pp.extract_patches(sdata, size_um=112, size_px=224, context=(1.0, 3.0))
    >>> patches[0].shape
    (2, 3, 224, 224)
    >>> patches[:8].shape
    (8, 2, 3, 224, 224)
    """
    check_sdata(sdata, "sth.pp.extract_patches")
    size_um, size_px, context = _check_geometry(size_um, size_px, context)
    if samples is not None:
        samples = as_names(samples, "samples")
    if shapes_key is not None:
        names, sample_of, spatial, found = _spots_from_shapes(
            sdata, shapes_key, samples, image_key, table_key, pixel_size_um, coordinate_system
        )
    else:
        names, sample_of, spatial, found = _spots_from_table(
            sdata, table_key, samples, image_key, pixel_size_um, coordinate_system
        )
    sections = {}
    for sample, sec in found.items():
        levels = tuple(image_levels(sdata.images[sec.image_key]))
        h, w = levels[0].shape[1:]
        check_spots_in_image(spatial[sample_of == sample], h, w, sample=sample)
        logger.debug(
            "%s: image %r, %.4g um per pixel (%s)", sample, sec.image_key, sec.pixel_size_um, sec.resolution_source
        )
        sections[sample] = _Section(sample, sec.image_key, sec.pixel_size_um, levels, is_monolithic(levels[0]))
    return PatchDataset(
        sections,
        sample_of,
        spatial,
        names,
        size_um=size_um,
        size_px=size_px,
        context=context,
    )


def _check_geometry(size_um, size_px, context) -> tuple[float, int, tuple[float, ...]]:
    size_um = check_number(size_um, "size_um", unit="micrometres")
    size_px = check_number(size_px, "size_px", integer=True, unit="pixels")
    if isinstance(context, numbers.Real):
        context = (context,)
    if isinstance(context, str) or not isinstance(context, Sequence | np.ndarray):
        raise TypeError(
            f"`context` must be a positive scale or a list of them, got {type(context).__name__} {context!r}."
        )
    context = tuple(check_number(c, "context", unit="patch sides") for c in context)
    if not context:
        raise ValueError("`context` is empty; give at least one scale, e.g. (1.0,).")
    return size_um, size_px, context


def _spots_from_table(sdata, table_key, samples, image_key, pixel_size_um, coordinate_system):
    if table_key is None and not sdata.tables:
        raise KeyError(
            "The SpatialData has no table. For an H&E-only slide make pseudo-spots with `sth.pp.spot_grid` and pass "
            "their `shapes_key`."
        )
    table_key = find_table(sdata, table_key)
    table = sdata.tables[table_key]
    present = table_samples(sdata, table_key)
    if samples is not None:
        unknown = [s for s in samples if s not in present]
        if unknown:
            raise ValueError(f"Unknown sample(s) {unknown} in table {table_key!r}; present: {present}.")
        from st_from_he._sdata import spot_sections

        rows = np.flatnonzero(np.isin(spot_sections(table, table_key=table_key), samples))
    else:
        rows = np.arange(table.n_obs)
    if len(rows) == 0:
        raise ValueError(f"Table {table_key!r} has no spots{'' if samples is None else f' of samples {samples}'}.")
    found, sample_of, spatial = table_sections(
        sdata,
        table_key,
        rows=rows,
        image_key=image_key,
        coordinate_system=coordinate_system,
        pixel_size_um=pixel_size_um,
    )
    return table.obs_names[rows], sample_of, spatial, found


def _spots_from_shapes(sdata, shapes_key, samples, image_key, table_key, pixel_size_um, coordinate_system):
    if not isinstance(shapes_key, str) or shapes_key not in sdata.shapes:
        raise KeyError(f"No shapes element {shapes_key!r}; shapes present: {sorted(sdata.shapes)}.")
    shapes = sdata.shapes[shapes_key]
    if len(shapes) == 0:
        raise ValueError(f"Shapes element {shapes_key!r} is empty.")
    image = shapes_image(sdata, shapes_key, None if isinstance(image_key, Mapping) else image_key)
    sample = image_section(sdata, image, table_key=table_key, pixel_size_um=1.0).sample  # the id only
    if isinstance(image_key, Mapping) and sample in image_key:
        image = shapes_image(sdata, shapes_key, image_key[sample])
    sec = image_section(sdata, image, table_key=table_key, pixel_size_um=per_section(pixel_size_um, sample))
    if samples is not None and sec.sample not in samples:
        raise ValueError(
            f"Shapes {shapes_key!r} belong to sample {sec.sample!r}, which is not among `samples`={samples}."
        )
    geometry = shapes.geometry
    points = geometry if (geometry.geom_type == "Point").all() else geometry.centroid
    xy = np.column_stack([points.x.to_numpy(float), points.y.to_numpy(float), np.ones(len(points))])
    matrix, _ = element_to_element(sdata, shapes_key, image, coordinate_system)
    spatial = (xy @ matrix.T)[:, :2]
    names = pd.Index([f"{shapes_key}-{i}" for i in shapes.index])
    return names, np.full(len(names), sec.sample), spatial, {sec.sample: sec}
