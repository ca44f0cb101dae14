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

# Coarser levels until the smallest side is about this many pixels: cheap overviews for plots and tissue masks.
_SMALLEST_LEVEL_PX = 1024
# Dask chunks over a tiled TIFF: whole tiles, about this many pixels a side.
_TIFF_CHUNK_PX = 1024
# Micrometres per unit of OME's PhysicalSizeXUnit.
_OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}


# A plain (JPEG, PNG, BMP) image is decoded whole; above this many pixels it is refused unless the user raises
# `sth.settings.max_image_pixels`. 10^9 px is 3 GB as RGB: her2st's scans (about 92 Mpx) and full-resolution Visium
# JPEGs fit; a larger slide belongs in a tiled pyramidal TIFF, read tile by tile. PIL's own decompression-bomb check
# stays on for the rest of the process: this module opens images through PIL's format plugins, which do not apply it,
# and checks the declared size against this cap instead.
DEFAULT_MAX_IMAGE_PIXELS = 1_000_000_000
# A float image mostly in [0, 1] with a few values above 1 is ambiguous (overshoot, or a dark 0-255 image): it is read
# as 0-255 only if at least this share of its values exceeds 1.
_FLOAT_255_MIN_SHARE = 0.01
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"BM", "BMP"))
# Names only shape the message for a file that is none of these formats: the format is read from the content.
_PLAIN_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
_TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".btf"}
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# JPEG markers without a length field (restart markers, TEM).
_STANDALONE = {0x01, *range(0xD0, 0xD8)}


def _max_image_pixels() -> float:
    """``sth.settings.max_image_pixels`` (``None``: no cap), else :data:`DEFAULT_MAX_IMAGE_PIXELS`."""
    from st_from_he._settings import settings

    cap = getattr(settings, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    if cap is None:
        return float("inf")
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
        raise ValueError(f"`sth.settings.max_image_pixels` must be a positive number of pixels or None, got {cap!r}.")
    return cap


def _sniff(path: Path) -> str:
    """``"JPEG"``, ``"PNG"``, ``"BMP"`` or ``"TIFF"`` from the file's first bytes (its name may say otherwise)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise ValueError(f"Image file {str(path)!r} is empty (0 bytes).")
    if head[:4] in _TIFF_MAGIC:
        return "TIFF"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    suffix = path.suffix.lower()
    if suffix in _TIFF_SUFFIXES:
        raise ValueError(f"Could not read TIFF {str(path)!r}: it does not start with a TIFF header ({head[:8]!r}).")
    if suffix in _PLAIN_SUFFIXES:
        raise ValueError(
            f"Could not read image {str(path)!r}: it is not a JPEG, PNG, BMP or TIFF file (it starts with "
            f"{head[:8]!r}). Convert it to one of these formats."
        )
    raise ValueError(
        f"Unsupported image format {suffix!r} of {str(path)!r} (it starts with {head[:8]!r}); use JPEG, PNG, BMP or "
        "(OME-)TIFF."
    )


def _open_plain(path: str | Path, fmt: str):
    """A PIL image of a JPEG/PNG/BMP, opened through its format plugin.

    The plugin reads the header only, and does not apply PIL's decompression-bomb check, which ``Image.open`` does with
    a process-wide limit: this module checks the declared size against :data:`DEFAULT_MAX_IMAGE_PIXELS` (or
    ``sth.settings.max_image_pixels``) itself, so the user's own PIL limit stays as it is.
    """
    from PIL import BmpImagePlugin, JpegImagePlugin, PngImagePlugin

    plugin = {
        "JPEG": JpegImagePlugin.JpegImageFile,
        "PNG": PngImagePlugin.PngImageFile,
        "BMP": BmpImagePlugin.BmpImageFile,
    }[fmt]
    try:
        return plugin(str(path))
    except (SyntaxError, OSError, ValueError) as err:
        raise ValueError(
            f"Could not read image {str(path)!r}: its {fmt} header is damaged or incomplete (PIL: {err})."
        ) from err


def _decode_plain(path: str, reduce: int = 1) -> np.ndarray:
    """Decode a JPEG/PNG/BMP to ``(3, y, x)`` uint8, ``reduce`` times smaller on each side.

    An RGB JPEG at full resolution is decoded by imagecodecs straight into memory mapped in bulk (see
    :func:`~st_from_he._memory.empty_uint8`); reduced levels go through PIL, whose JPEG decoder scales in the DCT
    domain (1/2, 1/4, 1/8) and so never builds the full-resolution image. Other modes are converted to 8-bit RGB by
    :func:`_rgb_pixels`. Any failure is raised naming the file.
    """
    from st_from_he._memory import check_fits

    fmt = _sniff(Path(path))
    width = height = 0
    try:
        with _open_plain(path, fmt) as im:
            width, height = im.size
            if reduce == 1 or fmt != "JPEG":  # only JPEG decodes straight to a reduced size
                # decoded RGB plus the decoder's own buffer
                check_fits(
                    2 * 3 * width * height,
                    f"Decoding image {path!r} ({width} x {height} px)",
                    hint="Convert it to a tiled pyramidal TIFF, which is read tile by tile.",
                )
            # Checked again here, not only when read: the file may have changed since, and PIL reads a truncated
            # file without error where ImageFile.LOAD_TRUNCATED_IMAGES is set (as some libraries do).
            data = Path(path).read_bytes() if fmt == "JPEG" else None
            if fmt == "JPEG":
                _check_jpeg(path, data)
            elif fmt == "PNG":
                _check_png(path)
            if reduce == 1 and fmt == "JPEG" and im.mode == "RGB":
                return _decode_jpeg_fast(data, height, width)
            return _decode_pil(im, path, fmt, reduce)
    except MemoryError as err:
        if str(path) in str(err):
            raise
        raise MemoryError(
            f"Not enough memory to decode image {path!r} ({width} x {height} px, {3 * width * height / 1e9:.1f} GB "
            f"as RGB): {err}. Convert it to a tiled pyramidal TIFF, which is read tile by tile."
        ) from err
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"Could not decode image {path!r}: {err}") from err
    except Exception as err:  # a codec's own error type: say which file failed
        raise ValueError(f"Could not decode image {path!r}: {type(err).__name__}: {err}") from err


def _decode_pil(im, path: str, fmt: str, reduce: int) -> np.ndarray:
    from PIL import Image

    target = (-(-im.width // reduce), -(-im.height // reduce))  # ceil, as the level shapes promise
    if reduce > 1:
        im.draft("RGB", target)
    if im.mode != "RGB" or (fmt == "PNG" and _png_bit_depth(path) == 16):
        im = Image.fromarray(_rgb_pixels(im, path, fmt))
    if reduce > 1 and im.size != target:
        im = im.reduce(max(1, round(im.width / target[0])))
        if im.size != target:
            im = im.resize(target)
    return _channels_first(np.asarray(im))


def _rgb_pixels(im, path: str, fmt: str) -> np.ndarray:
    """``(y, x, 3)`` uint8 RGB of a PIL image in any mode, or a clear error.

    Grey repeats to three channels; palette, CMYK and YCbCr convert through PIL; alpha is composited over white
    (a slide's transparent background is background, not black); 16-bit images are scaled by 1/257 (65535 -> 255);
    32-bit integer and float images follow :func:`to_uint8`.
    """
    mode = im.mode
    if fmt == "PNG" and (mode.startswith("I") or _png_bit_depth(path) == 16):
        import imagecodecs

        # PIL reads 16-bit RGB(A) PNGs at 8 bits by truncation, and 16-bit grey as "I;16": decode the 16 bits.
        return _rgb_from_channels(to_uint8(imagecodecs.png_decode(Path(path).read_bytes()), path, sixteen_bit=True))
    if mode in ("RGB", "L"):
        return _rgb_from_channels(np.asarray(im))
    if mode == "1":
        return _rgb_from_channels(np.asarray(im.convert("L")))
    if mode in ("P", "PA", "LA", "La", "RGBA", "RGBa"):
        return _rgb_from_channels(np.asarray(im.convert("RGBA")))
    if mode in ("CMYK", "YCbCr", "RGBX"):
        return np.asarray(im.convert("RGB"))
    if mode.startswith("I;16"):
        return _rgb_from_channels(to_uint8(np.asarray(im), path, sixteen_bit=True))
    if mode in ("I", "F"):
        return _rgb_from_channels(to_uint8(np.asarray(im), path))
    raise ValueError(f"Image {path!r} has PIL mode {mode!r}, which is not an RGB or grey image; convert it to RGB.")


def _rgb_from_channels(pixels: np.ndarray) -> np.ndarray:
    """``(y, x)``, ``(y, x, 1 | 2 | 3 | 4)`` uint8 -> ``(y, x, 3)``: grey repeated, alpha composited over white."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    channels = pixels.shape[-1]
    if channels in (2, 4):
        colour, alpha = pixels[..., :-1].astype(np.uint32), pixels[..., -1:].astype(np.uint32)
        pixels = ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return np.ascontiguousarray(pixels)


def to_uint8(image: np.ndarray, what: str, *, sixteen_bit: bool = False) -> np.ndarray:
    """Pixel values as uint8 0-255 by one documented rule, or a clear error naming ``what``.

    - uint8: as is.
    - 16-bit (a file that declares 16 bits, ``sixteen_bit=True``, or a uint16 array with values above 255):
      divided by 257 and rounded (65535 -> 255).
    - Other integers: values must lie in 0-255.
    - Floats: must be finite. Within [0, 1]: multiplied by 255 and rounded. Above 1 and at most 255: read as 0-255
      (rounded) only if at least 1% of the values exceed 1 (a float copy of an 8-bit image); a [0, 1] image with a few
      values above 1 (interpolation overshoot) is refused rather than read as a nearly black 0-255 image. Values less
      than half a grey level outside the range (e.g. -0.001 or 1.001 in [0, 1]) are clipped, as rounding would; any
      other negative value is refused.
    """
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if image.dtype == bool or not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"Image {what}: expected numeric pixel values, got dtype {image.dtype}.")
    if image.size == 0:
        raise ValueError(f"Image {what} is empty (shape {image.shape}).")
    if np.issubdtype(image.dtype, np.floating):
        if not np.all(np.isfinite(image)):
            raise ValueError(f"Image {what} contains NaN or infinite values.")
        low, high = float(image.min()), float(image.max())
        # Values within half a grey level of the range round into it: clipping them changes nothing visible.
        unit = high <= 1.0 + 0.5 / 255
        if low < (-0.5 / 255 if unit else -0.5):
            raise ValueError(f"Image {what} has negative values (min {low:g}); expected [0, 1] or 0-255.")
        if unit:
            return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
        above = int(np.count_nonzero(image > 1.0 + 0.5 / 255))
        if high <= 255.5 and above >= _FLOAT_255_MIN_SHARE * image.size:
            return np.clip(np.rint(image), 0, 255).astype(np.uint8)
        if high <= 255.5:
            raise ValueError(
                f"Image {what} is a float image mostly in [0, 1], but {above:,} of its {image.size:,} values exceed 1 "
                f"(max {high:g}): it is ambiguous whether it is scaled to [0, 1] or 0-255 (read as 0-255 only if at "
                "least 1% of values exceed 1). Clip it to [0, 1] (np.clip(image, 0, 1)) or give 0-255 values."
            )
        raise ValueError(f"Image {what} is a float image with values up to {high:g}; expected [0, 1] or 0-255.")
    low, high = int(image.min()), int(image.max())
    if low < 0:
        raise ValueError(f"Image {what} has negative values (min {low}); expected 0-255 (8-bit) or 0-65535 (16-bit).")
    if image.dtype.itemsize == 2 and image.dtype.kind == "u" and (sixteen_bit or high > 255):
        if high < 4096:
            logger.warning(
                "Image %s is 16-bit with values only up to %d (12-bit data?); it is scaled as 16-bit (65535 -> 255) "
                "and will look dark.",
                what,
                high,
            )
        return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if high > 255:
        raise ValueError(
            f"Image {what} has dtype {image.dtype} with values up to {high}; expected 8-bit (0-255) or 16-bit "
            "(uint16) pixel values."
        )
    return image.astype(np.uint8)


def _decode_jpeg_fast(data: bytes, height: int, width: int) -> np.ndarray:
    """An RGB JPEG of the header's size decoded into bulk-mapped memory, then laid out channels first.

    Both buffers come from :func:`~st_from_he._memory.empty_uint8`: a decoder's own output buffer is faulted in a
    page at a time as it is written, which cost more than the decoding itself (0.5 of 0.7 s for her2st C6's
    92 MP image; 0.14 s once the memory is mapped in bulk).
    """
    import imagecodecs

    from st_from_he._memory import empty_uint8

    pixels = imagecodecs.jpeg8_decode(data, out=empty_uint8((height, width, 3)))
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an RGB JPEG, got decoded shape {pixels.shape}")
    out = empty_uint8((3, *pixels.shape[:2]))
    np.copyto(out, np.moveaxis(pixels, -1, 0))
    return out


def _channels_first(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    return np.ascontiguousarray(np.moveaxis(pixels[..., :3], -1, 0))


# ----------------------------------------------------------------------------------------------------------------------
# Checks at read time: a damaged file fails when it is read, naming it, not later as a grey or garbled image


def _check_jpeg(path: str | Path, data: bytes) -> None:
    """Walk the JPEG's segments and scans to its end-of-image marker: a truncated or damaged file raises.

    libjpeg (through imagecodecs and PIL alike) decodes a truncated JPEG without error, filling the missing part with
    grey. The walk finds truncation and broken segment structure; damaged entropy-coded data inside a scan is found by
    :func:`_check_jpeg_scans`.
    """
    n = len(data)
    arr = np.frombuffer(data, dtype=np.uint8)
    follows = arr[1:]
    ff = np.flatnonzero(arr[:-1] == 0xFF)
    nxt = follows[ff]
    # Inside a scan, 0xFF is followed by 0x00 (stuffing), a restart marker or more 0xFF fill: anything else ends it.
    scan_ends = ff[(nxt != 0x00) & (nxt != 0xFF) & ((nxt < 0xD0) | (nxt > 0xD7))]
    pos, frame, scans = 2, False, 0

    def fail(reason: str):
        raise ValueError(
            f"JPEG file {str(path)!r} is damaged: {reason}. Its pixels cannot be read reliably; use an intact copy."
        )

    while True:
        if pos + 2 > n:
            fail(f"it ends after {n} bytes without the end-of-image marker (truncated file?)")
        if data[pos] != 0xFF:
            fail(f"expected a marker at byte {pos}, found 0x{data[pos]:02x}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            break
        if marker in _STANDALONE:
            pos += 2
            continue
        if pos + 4 > n:
            fail(f"it ends inside a segment header at byte {pos} (truncated file?)")
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if end > n or end < pos + 4:
            fail(f"segment 0xFF{marker:02X} at byte {pos} runs past the end of the file (truncated file?)")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            frame = True
        if marker == 0xDA:
            scans += 1
            i = np.searchsorted(scan_ends, end)
            if i == len(scan_ends):
                fail(
                    f"scan {scans} (from byte {end}) runs to the end of the file without end-of-image (truncated file?)"
                )
            pos = int(scan_ends[i])
            continue
        pos = end
    if not frame or not scans:
        fail("it holds no image data (no frame header or scan)")


def _check_jpeg_scans(path: Path, data: bytes) -> None:
    """Decode at 1/8 scale with libjpeg's warnings as errors (``simplejpeg``, if installed): damaged scan data raises.

    Decoding at 1/8 scale still reads every coefficient, at a small part of a full decode's cost.
    """
    try:
        import simplejpeg
    except ImportError:  # optional: the segment walk above still finds truncation
        return
    try:
        simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, min_height=1, min_width=1)
    except ValueError as err:
        if "Unsupported color conversion" in str(err) or "colorspace" in str(err).lower():
            return  # CMYK and similar: not this check's business, PIL converts them
        raise ValueError(
            f"JPEG file {str(path)!r} is damaged: {err}. Its pixels cannot be read reliably; use an intact copy (if "
            "this one looks right in a viewer, saving it as PNG or TIFF there keeps what it shows)."
        ) from err


def _check_png(path: Path) -> None:
    """Walk the PNG's chunks, checking each CRC, to ``IEND``: a truncated or damaged file raises."""
    import zlib

    def fail(reason: str):
        raise ValueError(
            f"PNG file {str(path)!r} is damaged: {reason}. Its pixels cannot be read reliably; use an intact copy."
        )

    with open(path, "rb") as f:
        f.seek(8)
        while True:
            start = f.tell()
            head = f.read(8)
            if len(head) < 8:
                fail(f"it ends at byte {start} without the IEND chunk (truncated file?)")
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            body = f.read(length)
            crc = f.read(4)
            if len(body) < length or len(crc) < 4:
                fail(f"chunk {kind!r} at byte {start} runs past the end of the file (truncated file?)")
            if zlib.crc32(kind + body) != int.from_bytes(crc, "big"):
                fail(f"chunk {kind!r} at byte {start} fails its checksum")
            if kind == b"IEND":
                return


def _png_bit_depth(path: str | Path) -> int:
    with open(path, "rb") as f:
        head = f.read(25)
    return head[24] if len(head) == 25 and head[12:16] == b"IHDR" else 8


def _check_bmp(path: Path, im) -> None:
    """An uncompressed BMP must hold all the rows its header declares."""
    data = Path(path).read_bytes()[:64]
    offset = int.from_bytes(data[10:14], "little")
    bits = int.from_bytes(data[28:30], "little") if len(data) >= 30 else 0
    compression = int.from_bytes(data[30:34], "little") if len(data) >= 34 else 0
    if compression in (0, 3) and bits:
        needed = offset + ((bits * im.width + 31) // 32) * 4 * im.height
        size = os.path.getsize(path)
        if size < needed:
            raise ValueError(
                f"BMP file {str(path)!r} is damaged: it holds {size} bytes but its header declares {needed} (truncated "
                "file?). Use an intact copy."
            )


def _check_plain_size(path: Path, width: int, height: int) -> None:
    """Refuse a plain image whose declared size exceeds the cap, before anything is decoded or allocated."""
    cap, pixels = _max_image_pixels(), width * height
    if pixels > cap:
        raise ValueError(
            f"Image {str(path)!r} declares {width} x {height} = {pixels:,} pixels ({3 * pixels / 1e9:.1f} GB as RGB), "
            f"more than the {cap:,.0f} pixels a JPEG/PNG/BMP may have: such a file is decoded whole. Convert it to a "
            "tiled pyramidal TIFF, which is read tile by tile (e.g. `vips tiffsave in.jpg out.tif --tile --pyramid`), "
            f"or, with enough memory, raise the cap: `sth.settings.max_image_pixels = {pixels}`."
        )


def _plain_levels(path: Path, fmt: str) -> list[da.Array]:
    """Lazy pyramid over a JPEG/PNG/BMP: level ``i`` is decoded ``2**i`` times smaller, straight from the file.

    The header gives the shapes; each level is one chunk, decoded when computed (plots and tissue masks decode only
    a small level). The file is checked now, so that a damaged, truncated or oversized one fails here, not at its
    first decode.
    """
    with _open_plain(path, fmt) as im:
        width, height = im.size
        _check_plain_size(path, width, height)
        if fmt == "JPEG":
            data = Path(path).read_bytes()
            _check_jpeg(path, data)
            _check_jpeg_scans(path, data)
        elif fmt == "PNG":
            _check_png(path)
        else:
            _check_bmp(path, im)
        orientation = im.getexif().get(0x0112, 1)
    if orientation not in (1, None):
        logger.warning(
            "%s: its EXIF orientation %s is ignored: pixels are read as stored, so spot coordinates must refer to the "
            "stored (unrotated) pixels. If they were placed on the rotated view, save the image rotated.",
            path,
            orientation,
        )
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
        try:
            return self._open()[key]
        except Exception as err:  # tifffile's and the codecs' own error types: say which file failed
            raise ValueError(f"Could not decode TIFF {self.path!r}: {type(err).__name__}: {err}") from err

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
        photometric = int(keyframe.photometric)
        extra = tuple(int(e) for e in (keyframe.extrasamples or ()))
        pixel_size = _tiff_pixel_size(tif, series)
        _check_tiff_extent(path, series)
    _check_tiff_pixels(path, dtype, photometric)
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
        if level.shape[0] not in (1, 3, 4) or (level.shape[0] == 4 and photometric != 2):
            raise ValueError(
                f"TIFF {str(path)!r} has {level.shape[0]} channels (photometric {photometric}); expected grey, RGB or "
                "RGBA. Convert it to an RGB TIFF."
            )
        level = _tiff_as_uint8(level, photometric)
        if level.shape[0] == 4:
            level = _tiff_alpha(level, extra[0] if extra else 2)
        levels.append(level)
    return levels, pixel_size


def _check_tiff_extent(path: Path, series) -> None:
    """Every tile or strip of every level must lie inside the file: a truncated TIFF fails when read."""
    size = os.path.getsize(path)
    for i, level in enumerate(series.levels):
        for page in level.pages:
            if page is None or not len(page.dataoffsets):
                continue
            ends = np.asarray(page.dataoffsets, dtype=np.int64) + np.asarray(page.databytecounts, dtype=np.int64)
            if int(ends.max()) > size:
                raise ValueError(
                    f"TIFF {str(path)!r} is damaged: level {i} has image data up to byte {int(ends.max())}, but the "
                    f"file holds {size} bytes (truncated file?). Use an intact copy."
                )


def _check_tiff_pixels(path: Path, dtype, photometric: int) -> None:
    """Refuse TIFF pixel types that have no one right reading as 8-bit RGB."""
    dtype = np.dtype(dtype)
    if dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"TIFF {str(path)!r} holds {dtype} pixels; expected 8-bit (or 16-bit) RGB. Float and 32-bit images have no "
            "fixed range to read as colours: convert it to 8-bit RGB."
        )
    if photometric not in (0, 1, 2, 6):  # MINISWHITE, MINISBLACK, RGB, YCbCr (decoded to RGB)
        raise ValueError(
            f"TIFF {str(path)!r} has photometric interpretation {photometric} (palette, CMYK, Lab, ...); expected "
            "RGB or grey. Convert it to an RGB TIFF."
        )


def _tiff_alpha(level: da.Array, kind: int) -> da.Array:
    """RGB + a fourth sample -> RGB: the TIFF ``ExtraSamples`` tag says what the fourth is.

    Unassociated alpha (2) is composited over white like any RGBA image; associated (premultiplied) alpha (1) needs
    only the white added; an unspecified extra sample (0) is no alpha, and is dropped.
    """
    if kind == 0:
        return level[:3]
    if kind == 2:
        return level.rechunk({0: -1}).map_blocks(_over_white, chunks=(3, *level.chunks[1:]), dtype=np.uint8)
    return level.rechunk({0: -1}).map_blocks(_premultiplied_over_white, chunks=(3, *level.chunks[1:]), dtype=np.uint8)


def _premultiplied_over_white(block: np.ndarray) -> np.ndarray:
    colour, alpha = block[:3].astype(np.uint16), block[3:].astype(np.uint16)
    return np.minimum(colour + (255 - alpha), 255).astype(np.uint8)


def _tiff_as_uint8(level: da.Array, photometric: int) -> da.Array:
    """Lazily: 16-bit -> 8-bit (65535 -> 255, rounded), and MINISWHITE grey inverted (0 is white there)."""
    if level.dtype == np.uint16:
        if photometric == 0:
            level = 65535 - level
        return ((level.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if photometric == 0:
        level = 255 - level
    return level


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
        JPEG, PNG, BMP or (pyramidal, OME-)TIFF file; the format is recognised from the content, not the name.

    Returns
    -------
    The pyramid levels as ``(c, y, x)`` dask arrays, finest first, and the micrometres per pixel of the finest level if
    the file records it (OME ``PhysicalSizeX``, Aperio ``MPP``, TIFF resolution tags), else ``None``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"The image path must be a str or pathlib.Path, got {type(path).__name__}.")
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"Image path {str(path)!r} is a folder; give the image file inside it.")
    if not path.is_file():
        raise FileNotFoundError(f"Image file {str(path)!r} does not exist.")
    fmt = _sniff(path)
    if fmt == "TIFF":
        return _tiff_levels(path)
    return _plain_levels(path, fmt), None


def array_levels(image: np.ndarray, what: str | None = None) -> list[da.Array]:
    """An in-memory ``(y, x)``, ``(y, x, 3)`` or ``(y, x, 4)`` image as one ``(c, y, x)`` uint8 dask level.

    Values follow :func:`to_uint8` (floats in ``[0, 1]``, as scanpy stores Visium thumbnails, are scaled to 0-255);
    ``what`` names the image in errors (e.g. ``"uns['spatial']['V1']['images']['hires']"``).
    """
    image = np.asarray(image)
    what = what or f"array of shape {image.shape}"
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"Expected an image array of shape (y, x, 3) (RGB), got shape {image.shape}.")
    image = to_uint8(image, what)
    return [da.from_array(np.ascontiguousarray(np.moveaxis(image, -1, 0)), chunks=(-1, 2048, 2048))]


def _scale_factors(height: int, width: int) -> list[int]:
    factors, side = [], min(height, width)
    while side > 2 * _SMALLEST_LEVEL_PX:
        factors.append(2)
        side //= 2
    return factors


def _over_white(block: np.ndarray) -> np.ndarray:
    """``(4, y, x)`` RGBA uint8 -> RGB composited over white (opaque pixels unchanged)."""
    colour, alpha = block[:3].astype(np.uint32), block[3:].astype(np.uint32)
    return ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _as_rgb(levels: list[da.Array]) -> list[da.Array]:
    channels = levels[0].shape[0]
    if channels == 4:  # RGBA: a transparent background is background, so composite over white
        return [
            lvl.rechunk({0: -1}).map_blocks(_over_white, chunks=(3, *lvl.chunks[1:]), dtype=np.uint8) for lvl in levels
        ]
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

    The file is checked when read, so that a bad one fails here, naming it, rather than later as a wrong image:

    - The format comes from the content, not the name. A truncated or damaged JPEG, PNG, BMP or TIFF raises (damage
      inside a JPEG's compressed data is found where the optional ``simplejpeg`` package is installed).
    - A JPEG, PNG or BMP is decoded whole, so one of more than ``sth.settings.max_image_pixels`` pixels (default
      10^9, 3 GB as RGB) is refused: convert it to a tiled pyramidal TIFF, or raise the setting.
    - Pixels become 8-bit RGB by one rule: grey is repeated, palette/CMYK/YCbCr converted, transparency composited
      over white, 16-bit values divided by 257. Float TIFFs, CMYK or palette TIFFs and 2-channel images are refused.
    - An EXIF orientation is not applied (logged): pixels are read as stored, and spot coordinates refer to them.

    Parameters
    ----------
    path
        JPEG, PNG, BMP or (pyramidal, OME-)TIFF file of the H&E slide.
    sample_id
        Section id; it names the element (``f"{sample_id}_image"``) and the micrometre coordinate system. Letters,
        digits, ``_``, ``-`` and ``.`` only, not starting with ``.``, ``-`` or ``__``.
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
    """A sample id names elements and a coordinate system: letters, digits, ``_``, ``-`` and ``.`` only."""
    if not isinstance(sample_id, str) or not sample_id:
        raise TypeError(f"`sample_id` must be a non-empty string, got {type(sample_id).__name__} {sample_id!r}.")
    bad = sorted({c for c in sample_id if not (c.isalnum() or c in "_-.")})
    if bad or sample_id[0] in ".-" or sample_id.startswith("__"):
        why = f"it contains {bad}" if bad else "it starts with '.', '-' or '__'"
        suggestion = re.sub(r"[^0-9A-Za-z_.-]+", "_", sample_id).lstrip("._-") or "S1"
        raise ValueError(
            f"`sample_id` {sample_id!r} is not allowed ({why}): it names the section's elements and coordinate "
            "system, so it may hold only letters, digits, '_', '-' and '.', and may not start with '.', '-' or '__' "
            f"(e.g. {suggestion!r})."
        )
