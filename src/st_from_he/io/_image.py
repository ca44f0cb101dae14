"""Image files -> lazy ``c, y, x`` dask arrays and multiscale image elements with a known resolution."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import dask.array as da
import numpy as np
from dask import delayed

from st_from_he._logging import logger
from st_from_he._sdata import image_key, micrometre_transform

_PLAIN_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
_TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".btf"}
# Coarser levels until the smallest side is about this many pixels: cheap overviews for plots and tissue masks.
_SMALLEST_LEVEL_PX = 1024
# Dask chunks over a tiled TIFF: whole tiles, about this many pixels a side.
_TIFF_CHUNK_PX = 1024
# Micrometres per unit of OME's PhysicalSizeXUnit.
_OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}


def _allow_large_images() -> None:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # H&E scans are legitimately huge; PIL's bomb check would refuse them


def _decode_plain(path: str, reduce: int = 1) -> np.ndarray:
    """Decode a JPEG/PNG to ``(3, y, x)`` uint8, ``reduce`` times smaller on each side.

    A full-resolution JPEG is decoded by imagecodecs straight into memory mapped in bulk (see
    :func:`~st_from_he._memory.empty_uint8`); reduced levels go through PIL, whose JPEG decoder scales in the DCT
    domain (1/2, 1/4, 1/8) and so never builds the full-resolution image.
    """
    if reduce == 1:
        try:
            return _decode_jpeg_fast(path)
        except Exception:  # noqa: BLE001 - not a JPEG, or a codec failure: PIL decodes it or gives the clear error
            pass
    from PIL import Image

    _allow_large_images()
    with Image.open(path) as im:
        target = (-(-im.width // reduce), -(-im.height // reduce))  # ceil, as the level shapes promise
        if reduce > 1:
            im.draft("RGB", target)
        im = im if im.mode == "RGB" else im.convert("RGB")
        if reduce > 1 and im.size != target:
            im = im.reduce(max(1, round(im.width / target[0])))
            if im.size != target:
                im = im.resize(target)
        return _channels_first(np.asarray(im))


def _decode_jpeg_fast(path: str) -> np.ndarray:
    import imagecodecs

    from st_from_he._memory import empty_uint8

    data = Path(path).read_bytes()
    if not imagecodecs.jpeg8_check(data):
        raise ValueError("not a JPEG")
    pixels = imagecodecs.jpeg8_decode(data)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError("not an RGB JPEG")
    out = empty_uint8((3, *pixels.shape[:2]))
    np.copyto(out, np.moveaxis(pixels, -1, 0))
    return out


def _channels_first(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    return np.ascontiguousarray(np.moveaxis(pixels[..., :3], -1, 0))


def _plain_levels(path: Path) -> list[da.Array]:
    """Lazy pyramid over a JPEG/PNG: level ``i`` is decoded ``2**i`` times smaller, straight from the file.

    The header gives the shapes; each level is one chunk, decoded when computed (plots and tissue masks decode only
    a small level).
    """
    from PIL import Image, UnidentifiedImageError

    _allow_large_images()
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"Could not read image {str(path)!r}: {err}") from err
    levels = [da.from_delayed(delayed(_decode_plain)(str(path)), shape=(3, height, width), dtype=np.uint8)]
    for i in range(1, len(_scale_factors(height, width)) + 1):
        reduce = 2**i
        shape = (3, -(-height // reduce), -(-width // reduce))
        levels.append(da.from_delayed(delayed(_decode_plain)(str(path), reduce), shape=shape, dtype=np.uint8))
    return levels


class _TiffLevel:
    """One pyramid level of a TIFF series as an array dask can slice: opened on first read, picklable.

    Reads go tile by tile through tifffile's zarr store, so cutting a window decodes only the tiles under it. The
    file handle is not pickled: each worker process opens the file itself.
    """

    def __init__(self, path: str, level: int, shape: tuple[int, ...], dtype):
        self.path, self.level, self.shape, self.dtype = path, level, tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)
        self._array = None
        self._lock = threading.Lock()

    def _open(self):
        with self._lock:
            if self._array is None:
                import tifffile
                import zarr

                self._tif = tifffile.TiffFile(self.path)
                self._array = zarr.open(self._tif.series[0].aszarr(level=self.level), mode="r")
        return self._array

    def __getitem__(self, key):
        return self._open()[key]

    def __getstate__(self):
        return {"path": self.path, "level": self.level, "shape": self.shape, "dtype": self.dtype}

    def __setstate__(self, state):
        self.__init__(**state)


def _chunk_side(tile: int) -> int:
    tile = int(tile) or _TIFF_CHUNK_PX
    return max(tile, round(_TIFF_CHUNK_PX / tile) * tile)


def _tiff_levels(path: Path) -> tuple[list[da.Array], float | None]:
    """Lazy pyramid levels (finest first) of a (OME-)TIFF, read tile by tile through tifffile's zarr store."""
    import tifffile
    from dask.base import tokenize

    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, OSError, ValueError) as err:
        raise ValueError(f"Could not read TIFF {str(path)!r}: {err}") from err
    with tif:
        if not tif.series:
            raise ValueError(f"TIFF {str(path)!r} holds no image.")
        series = tif.series[0]
        axes = series.axes.upper()
        shapes = [tuple(level.shape) for level in series.levels]
        dtype = series.dtype
        keyframe = series.keyframe
        tile = (keyframe.tilelength, keyframe.tilewidth) if keyframe.is_tiled else (0, 0)
        pixel_size = _tiff_pixel_size(tif, series)
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"TIFF {str(path)!r} has axes {axes!r}; expected an image with Y and X axes.")
    channel_axis = next((axes.index(a) for a in "SC" if a in axes), None)
    stamp = os.stat(path).st_mtime_ns
    levels = []
    for i, shape in enumerate(shapes):
        chunks = tuple(_chunk_side(tile[0]) if ax == "Y" else _chunk_side(tile[1]) if ax == "X" else -1 for ax in axes)
        reader = _TiffLevel(str(path), i, shape, dtype)
        level = da.from_array(
            reader,
            chunks=chunks,
            name=f"tiff-{tokenize(str(path), stamp, i)}",
            asarray=True,
            fancy=False,
            meta=np.empty((0,) * len(shape), dtype=dtype),
        )
        # Pick the first plane of any other axis (time, z, series), then order as (c, y, x).
        index, kept = [], []
        for j, ax in enumerate(axes):
            if ax in "YX" or j == channel_axis:
                index.append(slice(None))
                kept.append("C" if j == channel_axis else ax)
            else:
                if shape[j] != 1:
                    raise ValueError(
                        f"TIFF {str(path)!r} has axes {axes!r} with {shape[j]} planes along {ax!r}; expected a "
                        f"single 2D (RGB) image."
                    )
                index.append(0)
        level = level[tuple(index)]
        if channel_axis is None:
            level, kept = level[None], ["C", *kept]
        level = level.transpose([kept.index(a) for a in "CYX"])
        levels.append(level)
    return levels, pixel_size


def _tiff_pixel_size(tif, series=None) -> float | None:
    """Micrometres per pixel of the finest level from OME metadata, Aperio's MPP or the TIFF resolution tags."""
    if tif.is_ome and tif.ome_metadata:
        size = _ome_pixel_size(tif.ome_metadata)
        if size is not None:
            return size
    page = series.keyframe if series is not None else tif.pages[0]
    description = getattr(page, "description", "") or ""
    match = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", description)
    if match:
        size = float(match.group(1))
        if 0.01 < size < 100:
            return size
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        if num and den and unit in (2, 3):  # inch, centimetre
            per_unit = num / den
            um_per_unit = 25400.0 if unit == 2 else 10000.0
            size = um_per_unit / per_unit
            if 0.05 < size < 50:  # 72 dpi and similar defaults are not a scan resolution
                return size
    return None


def _ome_pixel_size(ome_xml: str) -> float | None:
    """``PhysicalSizeX`` of the first image of an OME-XML document, in micrometres (``None`` if absent)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] == "Pixels":
            value = element.get("PhysicalSizeX")
            if value is None:
                return None
            unit = element.get("PhysicalSizeXUnit", "µm")
            if unit not in _OME_UNITS_UM:
                logger.warning("Ignoring OME PhysicalSizeX in unknown unit %r.", unit)
                return None
            size = float(value) * _OME_UNITS_UM[unit]
            return size if np.isfinite(size) and size > 0 else None
    return None


def read_image_levels(path: str | Path) -> tuple[list[da.Array], float | None]:
    """Read an image file lazily.

    Parameters
    ----------
    path
        JPEG, PNG or (pyramidal, OME-)TIFF file.

    Returns
    -------
    The pyramid levels as ``(c, y, x)`` dask arrays, finest first, and the micrometres per pixel of the finest level if
    the file records it (OME ``PhysicalSizeX``, Aperio ``MPP``, TIFF resolution tags), else ``None``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix in _PLAIN_SUFFIXES:
        return _plain_levels(path), None
    if suffix in _TIFF_SUFFIXES:
        return _tiff_levels(path)
    raise ValueError(f"Unsupported image format {suffix!r} of {str(path)!r}; use JPEG, PNG or (OME-)TIFF.")


def array_levels(image: np.ndarray) -> list[da.Array]:
    """An in-memory ``(y, x)``, ``(y, x, 3)`` or ``(y, x, 4)`` image as one ``(c, y, x)`` uint8 dask level.

    Float images are taken to lie in ``[0, 1]`` (as scanpy stores Visium thumbnails) and scaled to 0-255.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"Expected an image array of shape (y, x, 3) (RGB), got shape {image.shape}.")
    if np.issubdtype(image.dtype, np.floating):
        if not np.all(np.isfinite(image)):
            raise ValueError("The image array contains NaN or infinite values.")
        top = 1.0 if image.max() <= 1.0 else 255.0
        image = np.clip(np.rint(image / top * 255), 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        if image.min() < 0 or image.max() > 255:
            raise ValueError(f"Expected an 8-bit RGB image, got dtype {image.dtype} with values beyond 0-255.")
        image = image.astype(np.uint8)
    return [da.from_array(np.ascontiguousarray(np.moveaxis(image, -1, 0)), chunks=(-1, 2048, 2048))]


def _scale_factors(height: int, width: int) -> list[int]:
    factors, side = [], min(height, width)
    while side > 2 * _SMALLEST_LEVEL_PX:
        factors.append(2)
        side //= 2
    return factors


def _as_rgb(levels: list[da.Array]) -> list[da.Array]:
    channels = levels[0].shape[0]
    if channels == 4:  # RGBA -> RGB
        return [lvl[:3] for lvl in levels]
    if channels == 1:
        return [da.concatenate([lvl] * 3, axis=0) for lvl in levels]
    if channels != 3:
        raise ValueError(f"Expected an RGB H&E image, got {channels} channels.")
    return levels


def image_element(levels: list[da.Array], pixel_size_um: float, sample: str):
    """A multiscale image element of a section, with its micrometre transformation.

    A file's own pyramid is kept as it is (no level is recomputed); a single-level image gets coarser levels by
    2x downsampling so overviews never touch the full resolution.
    """
    from spatialdata.models import Image2DModel

    if not np.isfinite(pixel_size_um) or pixel_size_um <= 0:
        raise ValueError(
            f"Sample {sample!r}: pixel size must be a positive number of micrometres, got {pixel_size_um}."
        )
    transformations = {sample: micrometre_transform(pixel_size_um)}
    finest = levels[0]
    if finest.dtype != np.uint8:
        raise ValueError(f"Expected an 8-bit RGB H&E image, got dtype {finest.dtype}.")
    levels = _as_rgb(levels)
    if len(levels) == 1:
        _, height, width = finest.shape
        return Image2DModel.parse(
            levels[0],
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            scale_factors=_scale_factors(height, width),
            transformations=transformations,
            chunks=(3, 2048, 2048),
        )
    return _pyramid_element(levels, transformations)


def _pyramid_element(levels: list[da.Array], transformations: dict):
    """Multiscale element from a file's own pyramid levels.

    Stored as spatialdata 0.7 stores the pyramids it builds: every level ``scale{i}`` carries its own
    transformations, ``scale0`` the given ones and level ``i`` ``Sequence([Scale(level-0 size / level size),
    t])`` (spatialdata's ``set_transformation`` on a ``DataTree`` writes exactly these), and pixel-centre coordinates
    in level-0 pixels (``compute_coordinates``), as ``Image2DModel.parse(..., scale_factors=...)`` leaves them.
    """
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import set_transformation
    from spatialdata.transformations._utils import compute_coordinates

    previous = None
    for level in levels:
        if level.shape[0] != levels[0].shape[0] or (
            previous is not None and (level.shape[1] > previous[1] or level.shape[2] > previous[2])
        ):
            raise ValueError(f"Pyramid levels must shrink from the finest: got shapes {[lvl.shape for lvl in levels]}.")
        previous = level.shape
    tree = {}
    for i, level in enumerate(levels):
        arr = xr.DataArray(level, dims=("c", "y", "x"), coords={"c": ["r", "g", "b"]})
        tree[f"scale{i}"] = xr.Dataset({"image": arr})
    element = xr.DataTree.from_dict(tree)
    set_transformation(element, dict(transformations), set_all=True)
    element = compute_coordinates(element)
    Image2DModel().validate(element)
    return element


def log_pixel_size(sample: str, pixel_size: float, source: str) -> None:
    """Say where a section's resolution came from."""
    logger.info("%s: %.3f um per pixel (%s)", sample, pixel_size, source)


def read_image(path: str | Path, *, sample_id: str, pixel_size_um: float | None = None):
    """Read an H&E image without expression (a slide to predict on) into :class:`~spatialdata.SpatialData`.

    The image is read lazily: a pyramidal (OME-)TIFF keeps its own levels and is read tile by tile; a JPEG or PNG gets
    2x-downsampled overview levels.

    Parameters
    ----------
    path
        JPEG, PNG or (pyramidal, OME-)TIFF file of the H&E slide.
    sample_id
        Section id; it names the element (``f"{sample_id}_image"``) and the micrometre coordinate system.
    pixel_size_um
        Micrometres per pixel of the finest level. ``None`` reads it from the file (OME ``PhysicalSizeX``, Aperio
        ``MPP`` or TIFF resolution tags); without spots it cannot be inferred, so a file that does not record it needs
        it given.

    Returns
    -------
    A :class:`~spatialdata.SpatialData` holding only the image ``f"{sample_id}_image"`` (multiscale, ``c, y, x``),
    with a :class:`~spatialdata.transformations.Scale` to the coordinate system ``sample_id`` in micrometres.

    Examples
    --------
    >>> import st_from_he as sth
    >>> sdata = sth.io.read_image("../shared/data/her2st/C6/C6_HE.jpg", sample_id="C6", pixel_size_um=0.69)
    >>> list(sdata.images)
    ['C6_image']
    """
    from spatialdata import SpatialData

    _check_sample_id(sample_id)
    levels, file_pixel_size = read_image_levels(path)
    if pixel_size_um is not None:
        source = "given"
    elif file_pixel_size is not None:
        pixel_size_um, source = file_pixel_size, "read from the image file"
    else:
        raise ValueError(
            f"The resolution of {str(path)!r} is unknown: the file does not record it and an image without spots gives "
            f"no grid to infer it from. Pass `pixel_size_um=` (micrometres per pixel, e.g. 0.5 for a 20x scan)."
        )
    log_pixel_size(sample_id, float(pixel_size_um), source)
    return SpatialData(images={image_key(sample_id): image_element(levels, float(pixel_size_um), sample_id)})


def _check_sample_id(sample_id) -> None:
    if not isinstance(sample_id, str) or not sample_id:
        raise TypeError(f"`sample_id` must be a non-empty string, got {sample_id!r}.")
