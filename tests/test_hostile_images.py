"""Hostile image input: damaged, oversized, unusual or mislabelled files fail clearly, naming the file, or read right.

Built from the real her2st image of C6: a small crop of tissue, and damaged or converted copies of it in ``tmp_path``.
"""

from __future__ import annotations

import logging
import warnings
import zlib

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image, ImageFile

import st_from_he as sth
from st_from_he.io import _image

# A tissue window of C6_HE.jpg (x0, y0, x1, y1): small enough to decode in milliseconds.
CROP_BOX = (3000, 3000, 3600, 3400)


def _decoded(path):
    """The finest level of an image file as (y, x, 3) uint8, decoded through the package."""
    levels, _ = _image.read_image_levels(path)
    return np.moveaxis(levels[0].compute(), 0, -1)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


@pytest.fixture(scope="module")
def c6_image(her2st_dir):
    return her2st_dir / "C6" / "C6_HE.jpg"


@pytest.fixture(scope="module")
def crop(c6_image):
    """The tissue crop as (y, x, 3) uint8, decoded by PIL."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # C6 is 92 Mpx, PIL's warning limit 89 Mpx
        with Image.open(c6_image) as im:
            return np.asarray(im.crop(CROP_BOX))


@pytest.fixture
def crop_jpg(tmp_path, crop):
    path = tmp_path / "crop.jpg"
    Image.fromarray(crop).save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def c6_tables(her2st_dir, tmp_path_factory):
    """Counts and spot files of 30 C6 spots (5 genes), for reading damaged images through ``read_st``."""
    folder = tmp_path_factory.mktemp("c6_tables")
    counts = pd.read_csv(her2st_dir / "C6" / "C6_counts.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(her2st_dir / "C6" / "C6_spots.tsv", sep="\t")
    spots = spots[spots["selected"] == 1]
    spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    shared = spots.index.intersection(counts.index)[:30]
    counts.loc[shared].iloc[:, :5].to_csv(folder / "counts.tsv", sep="\t")
    spots.loc[shared].to_csv(folder / "spots.tsv", sep="\t", index=False)
    return folder / "counts.tsv", folder / "spots.tsv"


# ----------------------------------------------------------------------------------------------------------------------
# valid images decode exactly as before


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # this test's own Image.open of C6
def test_valid_jpeg_decodes_bit_identical_to_pil(c6_image, crop_jpg):
    # Full resolution goes through imagecodecs, reduced levels through PIL's DCT scaling: both as PIL decodes.
    with Image.open(crop_jpg) as im:
        np.testing.assert_array_equal(_decoded(crop_jpg), np.asarray(im))
    levels, _ = _image.read_image_levels(c6_image)
    assert [lvl.shape for lvl in levels] == [(3, 9907, 9288), (3, 4954, 4644), (3, 2477, 2322), (3, 1239, 1161)]
    with Image.open(c6_image) as im:
        im.draft("RGB", (2322, 2477))  # libjpeg's 1/2 DCT scaling (1/4 would give 2476.75 rows), then a 2x2 mean
        np.testing.assert_array_equal(levels[2].compute(), np.moveaxis(np.asarray(im.reduce(2)), -1, 0))


def test_pil_bomb_limit_stays_on(c6_image):
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None  # the package no longer switches PIL's check off for the whole process
    sth.io.read_image(c6_image, sample_id="C6", pixel_size_um=0.69)
    assert Image.MAX_IMAGE_PIXELS == limit


# ----------------------------------------------------------------------------------------------------------------------
# truncated and damaged files


def test_truncated_jpeg_fails_at_read(tmp_path, c6_image, c6_tables):
    half = tmp_path / "half.jpg"
    data = c6_image.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"half\.jpg.*damaged.*truncated"):
        sth.io.read_image(half, sample_id="C6", pixel_size_um=0.69)
    with pytest.raises(ValueError, match=r"half\.jpg.*damaged.*truncated"):
        sth.io.read_st(*c6_tables, half, sample_id="C6")
    # Dropping only the end-of-image marker is enough to be refused.
    no_end = tmp_path / "no_end.jpg"
    no_end.write_bytes(data[:-2])
    with pytest.raises(ValueError, match=r"no_end\.jpg.*without end-of-image"):
        _image.read_image_levels(no_end)


@pytest.mark.parametrize("level", [0, 1])
def test_jpeg_truncated_after_read_fails_at_decode(tmp_path, c6_image, c6_tables, level, monkeypatch):
    # The file is damaged between reading and the first decode (fast full-resolution path and PIL's reduced path),
    # and PIL is set to pad truncated files as some libraries set it: the decode still refuses, naming the file.
    path = tmp_path / "slide.jpg"
    data = c6_image.read_bytes()
    path.write_bytes(data)
    sdata = sth.io.read_st(*c6_tables, path, sample_id="C6")
    path.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ValueError, match=r"slide\.jpg.*truncated"):
        sdata.images["C6_image"][f"scale{level}"]["image"].data[:, :10, :10].compute()
    if level == 0:
        with pytest.raises(ValueError, match=r"slide\.jpg.*truncated"):
            sth.pp.extract_patches(sdata, size_um=100, size_px=32)[0]


def test_damaged_jpeg_scan_fails_at_read(tmp_path, crop_jpg):
    pytest.importorskip("simplejpeg")  # finds damage inside the entropy-coded data (libjpeg's warnings as errors)
    data = crop_jpg.read_bytes()
    middle = len(data) // 2
    zeroed = tmp_path / "zeroed.jpg"
    zeroed.write_bytes(data[:middle] + bytes(2000) + data[middle + 2000 :])
    with pytest.raises(ValueError, match=r"zeroed\.jpg.*damaged.*Corrupt JPEG data"):
        sth.io.read_image(zeroed, sample_id="crop", pixel_size_um=0.69)
    flipped = tmp_path / "flipped.jpg"
    flipped.write_bytes(data[:middle] + bytes([data[middle] ^ 0x5A]) + data[middle + 1 :])
    with pytest.raises(ValueError, match=r"flipped\.jpg.*damaged"):
        _image.read_image_levels(flipped)


def test_jpeg_variants_decode_as_pil(tmp_path, crop):
    # Progressive (several scans with tables between them), bytes after the end-of-image marker, a bilevel PNG.
    progressive = tmp_path / "progressive.jpg"
    Image.fromarray(crop).save(progressive, quality=90, progressive=True, optimize=True)
    with Image.open(progressive) as im:
        np.testing.assert_array_equal(_decoded(progressive), np.asarray(im))
    trailing = tmp_path / "trailing.jpg"
    trailing.write_bytes(progressive.read_bytes() + b"\x00" * 100 + b"camera maker notes")
    np.testing.assert_array_equal(_decoded(trailing), _decoded(progressive))
    bilevel = tmp_path / "bilevel.png"
    Image.fromarray(crop[..., 0] > 128).save(bilevel)
    np.testing.assert_array_equal(_decoded(bilevel)[..., 0], np.where(crop[..., 0] > 128, 255, 0))


def test_truncated_or_damaged_png_fails_at_read(tmp_path, crop):
    path = tmp_path / "crop.png"
    Image.fromarray(crop).save(path)
    np.testing.assert_array_equal(_decoded(path), crop)
    data = path.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.png.*damaged.*truncated"):
        sth.io.read_image(cut, sample_id="crop", pixel_size_um=0.69)
    flipped = tmp_path / "flipped.png"
    middle = len(data) // 2
    flipped.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    with pytest.raises(ValueError, match=r"flipped\.png.*damaged.*checksum"):
        _image.read_image_levels(flipped)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jpg", b"", r"empty\.jpg.* is empty \(0 bytes\)"),
        ("noise.jpg", np.random.default_rng(0).bytes(5000), r"noise\.jpg.*not a JPEG, PNG, BMP or TIFF"),
        ("text.png", b"counts\tgene\n1\t2\n", r"text\.png.*not a JPEG, PNG, BMP or TIFF"),
        ("header_only.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00", r"header_only"),
        ("bad.tif", b"II*\x00" + bytes(50), r"bad\.tif"),
    ],
)
def test_corrupt_files_fail_at_read(tmp_path, c6_tables, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        sth.io.read_image(path, sample_id="S", pixel_size_um=0.5)
    with pytest.raises(ValueError, match=message):
        sth.io.read_st(*c6_tables, path, sample_id="C6")


def test_missing_image(tmp_path, c6_tables):
    missing = tmp_path / "nowhere" / "slide.jpg"
    with pytest.raises(FileNotFoundError, match=r"nowhere/slide\.jpg.*does not exist"):
        sth.io.read_image(missing, sample_id="S", pixel_size_um=0.5)
    with pytest.raises(FileNotFoundError, match=r"nowhere/slide\.jpg.*does not exist"):
        sth.io.read_st(*c6_tables, missing, sample_id="C6")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        sth.io.read_image(tmp_path, sample_id="S", pixel_size_um=0.5)
    with pytest.raises(TypeError, match="image path must be a str or pathlib.Path, got ndarray"):
        sth.io.read_image(np.zeros((4, 4, 3), np.uint8), sample_id="S", pixel_size_um=0.5)


# ----------------------------------------------------------------------------------------------------------------------
# size: refused before anything is allocated


def _huge_png(path, width=40_000, height=40_000):
    """A PNG of a few hundred bytes whose header declares ``width x height`` RGB pixels."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    row = bytes(1 + 3 * width)
    idat = zlib.compress(row * 4, 9)  # a few rows only: the rest is "missing", never decoded
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    )


def test_oversized_plain_image_is_refused_with_the_way_out(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    _huge_png(path)
    assert path.stat().st_size < 10_000
    with pytest.raises(ValueError, match=r"bomb\.png.*40000 x 40000 = 1,600,000,000 pixels.*4\.8 GB") as err:
        sth.io.read_image(path, sample_id="S", pixel_size_um=0.5)
    assert "1,000,000,000" in str(err.value) and "tiled pyramidal TIFF" in str(err.value)
    assert "sth.settings.max_image_pixels = 1600000000" in str(err.value)
    # The her2st scans (about 92 Mpx each) are well under the cap.
    assert 9907 * 9288 < _image.DEFAULT_MAX_IMAGE_PIXELS
    # Raising the cap lets the file be read (lazily: nothing is decoded, so nothing is allocated).
    monkeypatch.setattr(sth.settings, "max_image_pixels", 2_000_000_000, raising=False)
    levels, _ = _image.read_image_levels(path)
    assert levels[0].shape == (3, 40_000, 40_000)


def test_decode_beyond_available_memory_says_so(tmp_path, crop_jpg, monkeypatch):
    from st_from_he import _memory

    monkeypatch.setattr(_memory, "available_bytes", lambda: 1000)
    levels, _ = _image.read_image_levels(crop_jpg)
    with pytest.raises(MemoryError, match=r"crop\.jpg.*600 x 400 px.*GB of memory.*tiled pyramidal TIFF"):
        levels[0].compute()
    with pytest.raises(MemoryError, match=r"shape \(3, 10000, 10000\).*0\.3 GB"):
        _memory.empty_uint8((3, 10_000, 10_000))


# ----------------------------------------------------------------------------------------------------------------------
# bit depths and colour modes


def test_16_bit_png_and_tiff_scale_to_8_bit(tmp_path, crop):
    import imagecodecs

    # The same picture at 16 bits, each value 128/257 of a step above v * 257: dividing by 257 and rounding gives the
    # crop back, where taking the high byte (PIL's reading of 16-bit RGB PNGs) would give v + 1 for v >= 128.
    wide = np.minimum(crop.astype(np.uint32) * 257 + 128, 65535).astype(np.uint16)
    assert ((wide >> 8) != crop).any()
    rgb16 = tmp_path / "rgb16.png"
    rgb16.write_bytes(imagecodecs.png_encode(wide))
    np.testing.assert_array_equal(_decoded(rgb16), crop)
    grey16 = tmp_path / "grey16.png"
    grey16.write_bytes(imagecodecs.png_encode(np.ascontiguousarray(wide[..., 1])))
    assert Image.open(grey16).mode == "I;16"  # the mode that PIL's convert("RGB") clipped to white
    np.testing.assert_array_equal(_decoded(grey16), np.repeat(crop[..., 1:2], 3, axis=-1))
    tif16 = tmp_path / "rgb16.tif"
    tifffile.imwrite(tif16, wide, photometric="rgb", tile=(128, 128))
    np.testing.assert_array_equal(_decoded(tif16), crop)


def test_float_arrays_follow_one_rule(crop):
    unit = crop.astype(np.float32) / 255
    np.testing.assert_array_equal(_image.to_uint8(unit, "unit"), crop)
    np.testing.assert_array_equal(_image.to_uint8(crop.astype(np.float64), "copy"), crop)
    overshoot = unit.copy()
    overshoot[0, 0, 0] = 1.02
    with pytest.raises(
        ValueError, match=r"mostly in \[0, 1\], but 1 of its 720,000 values exceed 1 \(max 1\.02\).*Clip it"
    ):
        _image.array_levels(overshoot)
    # Overshoot by less than half a grey level rounds into the range, as resampling leaves it: clipped.
    tiny = unit.copy()
    tiny[0, 0] = [1.0015, -0.0015, 0.5]
    expected = crop.copy()
    expected[0, 0] = [255, 0, 128]
    np.testing.assert_array_equal(_image.to_uint8(tiny, "tiny"), expected)
    nan = unit.copy()
    nan[5, 5, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        _image.array_levels(nan)
    with pytest.raises(ValueError, match=r"negative values \(min -0\.4\d+\)"):
        _image.array_levels(unit - 0.5)
    with pytest.raises(ValueError, match="values up to 510"):
        _image.array_levels(unit * 510)
    np.testing.assert_array_equal(
        _image.array_levels(crop.astype(np.uint16) * 257)[0].compute(), np.moveaxis(crop, -1, 0)
    )
    with pytest.raises(ValueError, match="dtype int32 with values up to 300"):
        _image.array_levels(np.full((4, 4, 3), 300, dtype=np.int32))


def test_grey_palette_cmyk_and_alpha_images(tmp_path, crop):
    grey = tmp_path / "grey.jpg"
    Image.fromarray(crop).convert("L").save(grey, quality=95)
    with Image.open(grey) as im:
        np.testing.assert_array_equal(_decoded(grey), np.repeat(np.asarray(im)[..., None], 3, axis=-1))
    palette = tmp_path / "palette.png"
    Image.fromarray(crop).quantize(64).save(palette)
    with Image.open(palette) as im:
        np.testing.assert_array_equal(_decoded(palette), np.asarray(im.convert("RGB")))
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(crop).convert("CMYK").save(cmyk, quality=95)
    assert np.abs(_decoded(cmyk).astype(int) - crop).mean() < 3  # close to the picture, not inverted or black
    # Transparent background over white, opaque tissue unchanged.
    alpha = np.full(crop.shape[:2], 255, dtype=np.uint8)
    alpha[:, :100] = 0
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([crop, alpha])).save(rgba)
    pixels = _decoded(rgba)
    np.testing.assert_array_equal(pixels[:, 100:], crop[:, 100:])
    assert (pixels[:, :100] == 255).all()
    rgba_tif = tmp_path / "rgba.tif"
    tifffile.imwrite(rgba_tif, np.dstack([crop, alpha]), photometric="rgb", extrasamples=["unassalpha"])
    element = _image.image_element(_image.read_image_levels(rgba_tif)[0], 0.5, "S")
    np.testing.assert_array_equal(np.moveaxis(element["scale0"]["image"].values, 0, -1), pixels)
    # A fourth TIFF sample that its ExtraSamples tag does not call alpha is dropped, not composited.
    extra_tif = tmp_path / "extra.tif"
    tifffile.imwrite(extra_tif, np.dstack([crop, alpha]), photometric="rgb", extrasamples=["unspecified"])
    np.testing.assert_array_equal(_decoded(extra_tif), crop)
    premultiplied = tmp_path / "premultiplied.tif"
    tifffile.imwrite(
        premultiplied,
        np.dstack([crop * (alpha[..., None] // 255), alpha]),
        photometric="rgb",
        extrasamples=["assocalpha"],
    )
    np.testing.assert_array_equal(_decoded(premultiplied), pixels)


@pytest.mark.parametrize("compression", [None, "zlib", "jpeg"])
def test_truncated_or_damaged_tiff(tmp_path, crop, compression):
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, crop, photometric="rgb", tile=(128, 128), compression=compression)
    if compression != "jpeg":  # lossless: the intact file reads back exactly
        np.testing.assert_array_equal(_decoded(path), crop)
    data = path.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.tif.*damaged.*truncated"):
        sth.io.read_image(cut, sample_id="S", pixel_size_um=0.5)
    # Damage inside a tile surfaces when the tile is decoded, naming the file.
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    damaged = tmp_path / "damaged.tif"
    damaged.write_bytes(data[:offset] + bytes(count) + data[offset + count :])
    levels, _ = _image.read_image_levels(damaged)
    if compression is None:  # raw bytes: zeros are valid (black) pixels
        assert (levels[0][:, :128, :128].compute() == 0).all()
    else:
        with pytest.raises(ValueError, match=r"Could not decode TIFF .*damaged\.tif"):
            levels[0][:, :128, :128].compute()


def test_unreadable_tiff_pixels_are_refused(tmp_path, crop):
    two = tmp_path / "two.tif"
    tifffile.imwrite(two, np.moveaxis(crop[..., :2], -1, 0), photometric="minisblack", planarconfig="separate")
    with pytest.raises(ValueError, match=r"two\.tif.*2 channels.*Convert it to an RGB TIFF"):
        sth.io.read_image(two, sample_id="S", pixel_size_um=0.5)
    floats = tmp_path / "float.tif"
    tifffile.imwrite(floats, crop.astype(np.float32) / 255, photometric="rgb")
    with pytest.raises(ValueError, match=r"float\.tif.*float32 pixels.*convert it to 8-bit RGB"):
        sth.io.read_image(floats, sample_id="S", pixel_size_um=0.5)
    cmyk = tmp_path / "cmyk.tif"
    tifffile.imwrite(cmyk, np.dstack([crop, crop[..., :1]]), photometric="separated")
    with pytest.raises(ValueError, match=r"cmyk\.tif.*photometric interpretation 5"):
        sth.io.read_image(cmyk, sample_id="S", pixel_size_um=0.5)
    inverted = tmp_path / "miniswhite.tif"
    tifffile.imwrite(inverted, 255 - crop[..., 0], photometric="miniswhite")
    np.testing.assert_array_equal(_decoded(inverted)[..., 0], crop[..., 0])


def test_mislabelled_tiny_and_rotated_images(tmp_path, crop, crop_jpg, caplog):
    # A PNG named .jpg, and a JPEG named .png, are read by their content.
    png_as_jpg = tmp_path / "really_png.jpg"
    Image.fromarray(crop).save(png_as_jpg, format="PNG")
    np.testing.assert_array_equal(_decoded(png_as_jpg), crop)
    jpg_as_png = tmp_path / "really_jpeg.png"
    jpg_as_png.write_bytes(crop_jpg.read_bytes())
    np.testing.assert_array_equal(_decoded(jpg_as_png), _decoded(crop_jpg))
    tiny = tmp_path / "one_pixel.png"
    Image.fromarray(crop[:1, :1]).save(tiny)
    assert sth.io.read_image(tiny, sample_id="tiny", pixel_size_um=0.5)["tiny_image"]["scale0"]["image"].shape == (
        3,
        1,
        1,
    )
    np.testing.assert_array_equal(_decoded(tiny), crop[:1, :1])
    # An EXIF rotation is not applied (spot coordinates refer to stored pixels), and the user is told.
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(crop).save(rotated, quality=90, exif=exif)
    logger = logging.getLogger("st_from_he")
    logger.addHandler(caplog.handler)
    try:
        levels, _ = _image.read_image_levels(rotated)
    finally:
        logger.removeHandler(caplog.handler)
    assert levels[0].shape == (3, 400, 600)
    assert "EXIF orientation 6 is ignored" in caplog.text and "rotated.jpg" in caplog.text


# ----------------------------------------------------------------------------------------------------------------------
# sample ids


@pytest.mark.parametrize(
    ("sample_id", "error", "message"),
    [
        ("a/b", ValueError, r"'a/b' is not allowed \(it contains \['/'\]\).*letters, digits.*e\.g\. 'a_b'"),
        ("..", ValueError, r"'\.\.' is not allowed \(it starts with"),
        ("../up", ValueError, r"'\.\./up' is not allowed \(it contains \['/'\]\).*e\.g\. 'up'"),
        ("my sample", ValueError, r"'my sample' is not allowed \(it contains \[' '\]\).*'my_sample'"),
        ("C6\n", ValueError, r"it contains \['\\n'\]"),
        ("__private", ValueError, "may not start with"),
        ("", TypeError, "must be a non-empty string, got str ''"),
        (3, TypeError, "must be a non-empty string, got int 3"),
        (None, TypeError, "must be a non-empty string, got NoneType None"),
    ],
)
def test_sample_id_is_checked(crop_jpg, sample_id, error, message):
    with pytest.raises(error, match=message):
        sth.io.read_image(crop_jpg, sample_id=sample_id, pixel_size_um=0.69)


def test_ordinary_sample_ids_pass(crop_jpg):
    for sample_id in ("C6", "V1_Mouse_Brain", "TENX95", "patient-3.section_2"):
        assert list(sth.io.read_image(crop_jpg, sample_id=sample_id, pixel_size_um=0.69).images) == [
            f"{sample_id}_image"
        ]
