"""Image files -> lazy ``c, y, x`` dask arrays and multiscale image elements with a known resolution."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
from dask import delayed

from .._logging import logger
from .._sdata import micrometre_transform

_PLAIN_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
_TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".btf"}
# Coarser levels until the smallest side is about this many pixels: cheap overviews for plots and tissue masks.
_SMALLEST_LEVEL_PX = 1024


def _decode_plain(path: str) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # H&E scans are legitimately huge
    with Image.open(path) as im:
        return np.moveaxis(np.asarray(im.convert("RGB")), -1, 0)


def _plain_image(path: Path) -> da.Array:
    """A lazy array over a JPEG/PNG: the header gives the shape; the pixels are decoded once per compute."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"Could not read image {str(path)!r}: {err}") from err
    return da.from_delayed(delayed(_decode_plain)(str(path)), shape=(3, height, width), dtype=np.uint8)


def _tiff_levels(path: Path) -> tuple[list[da.Array], float | None]:
    """Lazy pyramid levels (finest first) of a (OME-)TIFF, read tile by tile through tifffile's zarr store."""
    import tifffile
    import zarr

    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, OSError) as err:
        raise ValueError(f"Could not read TIFF {str(path)!r}: {err}") from err
    with tif:
        series = tif.series[0]
        axes = series.axes
        pixel_size = _tiff_pixel_size(tif)
    store = tifffile.imread(path, aszarr=True)
    group = zarr.open(store, mode="r")
    arrays = [group] if isinstance(group, zarr.Array) else [group[k] for k in sorted(group.array_keys(), key=int)]
    levels = []
    for arr in arrays:
        level = da.from_zarr(arr)
        if axes.endswith("S"):  # RGB samples last -> channels first
            level = da.moveaxis(level, -1, 0)
        elif axes.startswith("C") or axes.startswith("S"):
            pass
        else:
            level = level[None]
        level = level.reshape(level.shape[-3:])
        levels.append(level)
    return levels, pixel_size


def _tiff_pixel_size(tif) -> float | None:
    """Micrometres per pixel from OME metadata or the TIFF resolution tags, if recorded."""
    if tif.is_ome and tif.ome_metadata:
        import re

        match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
        if match and (unit is None or unit.group(1) in ("µm", "um", "micron")):
            return float(match.group(1))
    page = tif.pages[0]
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


def read_image_levels(path: str | Path) -> tuple[list[da.Array], float | None]:
    """Read an image file lazily.

    Parameters
    ----------
    path
        JPEG, PNG or (pyramidal, OME-)TIFF file.

    Returns
    -------
    The pyramid levels as ``(c, y, x)`` uint8 dask arrays, finest first, and the micrometres per pixel of the finest
    level if the file records it, else ``None``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix in _PLAIN_SUFFIXES:
        return [_plain_image(path)], None
    if suffix in _TIFF_SUFFIXES:
        return _tiff_levels(path)
    raise ValueError(f"Unsupported image format {suffix!r} of {str(path)!r}; use JPEG, PNG or (OME-)TIFF.")


def _scale_factors(height: int, width: int) -> list[int]:
    factors, side = [], min(height, width)
    while side > 2 * _SMALLEST_LEVEL_PX:
        factors.append(2)
        side //= 2
    return factors


def image_element(levels: list[da.Array], pixel_size_um: float, sample: str):
    """A multiscale image element of a section, with its micrometre transformation.

    A file's own pyramid is kept as it is (no level is recomputed); a single-level image gets coarser levels by
    2x downsampling so overviews never touch the full resolution.
    """
    from spatialdata.models import Image2DModel

    transformations = {sample: micrometre_transform(pixel_size_um)}
    finest = levels[0]
    if finest.dtype != np.uint8:
        raise ValueError(f"Expected an 8-bit RGB H&E image, got dtype {finest.dtype}.")
    if finest.shape[0] == 4:  # RGBA -> RGB
        levels = [lvl[:3] for lvl in levels]
    elif finest.shape[0] == 1:
        levels = [da.concatenate([lvl] * 3, axis=0) for lvl in levels]
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
    """Multiscale element from a file's own pyramid levels (each level's scale relative to the finest)."""
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, Sequence

    finest_h, finest_w = levels[0].shape[1:]
    tree = {}
    for i, level in enumerate(levels):
        h, w = level.shape[1:]
        arr = xr.DataArray(level, dims=("c", "y", "x"), coords={"c": ["r", "g", "b"]})
        level_transforms = {
            cs: t if i == 0 else Sequence([Scale([finest_h / h, finest_w / w], axes=("y", "x")), t])
            for cs, t in transformations.items()
        }
        arr.attrs["transform"] = level_transforms
        tree[f"scale{i}"] = xr.Dataset({"image": arr})
    element = xr.DataTree.from_dict(tree)
    Image2DModel().validate(element)
    return element


def log_pixel_size(sample: str, pixel_size: float, source: str) -> None:
    """Say where a section's resolution came from."""
    logger.info("%s: %.3f um per pixel (%s)", sample, pixel_size, source)
