"""Whole-slide reading of tiled pyramidal TIFFs: the decoded-tile cache and its byte budget, on a real her2st crop."""

from __future__ import annotations

import numpy as np
import pytest

import st_from_he as sth
from st_from_he.pp import _patches

PIXEL_UM = 0.688  # her2st scans
TILE = 256  # TIFF tiles; the dask chunks over them are 1024 px


@pytest.fixture(scope="module")
def crop_tiff(her2st_dir, tmp_path_factory):
    """A 3072 x 3072 px crop of C6 (tissue and glass) as a pyramidal tiled OME-TIFF (JPEG tiles, 3 levels)."""
    import imagecodecs
    import tifffile
    from PIL import Image

    pixels = imagecodecs.jpeg8_decode((her2st_dir / "C6" / "C6_HE.jpg").read_bytes())[1500:4572, 3000:6072]
    path = tmp_path_factory.mktemp("wholeslide") / "c6_crop.ome.tif"
    options = {"tile": (TILE, TILE), "photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": 90}}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(
            pixels, subifds=2, metadata={"axes": "YXS", "PhysicalSizeX": PIXEL_UM, "PhysicalSizeY": PIXEL_UM}, **options
        )
        for factor in (2, 4):
            small = Image.fromarray(pixels).reduce(factor)
            tif.write(np.asarray(small), subfiletype=1, **options)
    return path


@pytest.fixture(scope="module")
def slide(crop_tiff):
    """The crop read back, with a 100 um pseudo-spot grid over all of it (22 x 22 = 484 spots)."""
    sdata = sth.io.read_image(crop_tiff, sample_id="crop")
    key = sth.pp.spot_grid(sdata, "crop_image", spacing_um=100, tissue_only=False)
    return sdata, key


@pytest.fixture(autouse=True)
def _fresh_caches():
    _patches.TILES.clear()
    _patches.DECODED.clear()
    yield
    _patches.TILES.clear()


def _patches_of(sdata, key, index=None):
    dataset = sth.pp.extract_patches(sdata, size_um=112, size_px=112, context=(1.0, 3.0), shapes_key=key)
    return dataset, (dataset.to_numpy() if index is None else dataset[index])


def test_tile_cache_gives_the_whole_level_patches(slide, monkeypatch):
    """Read window by window through the tile cache, the patches equal those cut from the whole decoded levels."""
    sdata, key = slide
    whole, expected = _patches_of(sdata, key)
    assert whole.levels == {"crop": (0, 2)}  # 0.688 um/px for 1 um/px patches, 2.75 um/px for the 3x context
    assert all(whole._sections["crop"].materialise(lv) for lv in whole.levels["crop"])
    # an image cache too small for any level: no tiled level is decoded whole, every window goes through the tiles
    monkeypatch.setattr(sth.settings, "image_cache_gb", 0)
    _patches.DECODED.clear()
    lazy, got = _patches_of(sdata, key)
    assert not any(lazy._sections["crop"].materialise(lv) for lv in lazy.levels["crop"])
    assert not _patches.DECODED._arrays
    np.testing.assert_array_equal(got, expected)
    assert (expected[:, 0] == 255).any() and (expected[:, 0] < 200).any()  # glass beyond the border, and tissue
    # any order of spots: each patch stays in its place
    order = np.random.default_rng(0).permutation(len(lazy))[:100]
    np.testing.assert_array_equal(lazy[order], expected[order])


def test_each_tile_is_decoded_once_within_the_budget(slide, monkeypatch):
    sdata, key = slide
    monkeypatch.setattr(sth.settings, "image_cache_gb", 0)
    n_chunks = sum(lv.numblocks[1] * lv.numblocks[2] for lv in _patches_of(sdata, key, [0])[0]._sections["crop"].levels)
    _patches.TILES.clear()
    before = _patches.TILES.n_decoded
    dataset, first = _patches_of(sdata, key)
    decoded = _patches.TILES.n_decoded - before
    assert 0 < decoded <= n_chunks  # every chunk at most once, though 484 spots are read in batches of 64
    np.testing.assert_array_equal(dataset.to_numpy(), first)
    assert _patches.TILES.n_decoded - before == decoded  # read again: all from the cache
    assert 0 < _patches.TILES.nbytes <= sth.settings.tile_cache_gb * 2**30

    # off: nothing kept, and batches decode the chunks they share again
    monkeypatch.setattr(sth.settings, "tile_cache_gb", 0)
    _patches.TILES.clear()
    before = _patches.TILES.n_decoded
    np.testing.assert_array_equal(_patches_of(sdata, key)[1], first)
    assert _patches.TILES.nbytes == 0 and _patches.TILES.n_decoded - before > decoded


def test_tile_cache_respects_its_budget(slide, monkeypatch):
    """A budget of two 1024 px chunks: never more held, more decoding, the same patches."""
    sdata, key = slide
    monkeypatch.setattr(sth.settings, "image_cache_gb", 0)
    expected = _patches_of(sdata, key)[1]
    _patches.TILES.clear()
    budget = 2 * 3 * 1024 * 1024
    monkeypatch.setattr(sth.settings, "tile_cache_gb", budget / 2**30)
    dataset = _patches_of(sdata, key, [0])[0]
    for start in range(0, len(dataset), 64):
        np.testing.assert_array_equal(dataset[start : start + 64], expected[start : start + 64])
        assert _patches.TILES.nbytes <= budget
    assert _patches.TILES.nbytes > 0


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "1GB", True, None])
def test_bad_tile_cache_budget(slide, monkeypatch, bad):
    sdata, key = slide
    monkeypatch.setattr(sth.settings, "image_cache_gb", 0)
    monkeypatch.setattr(sth.settings, "tile_cache_gb", bad)
    with pytest.raises(ValueError, match=r"`sth.settings.tile_cache_gb` must be a number of gigabytes, 0 or more"):
        _patches_of(sdata, key, [0])


def test_glass_and_tissue_never_decode_a_large_level_whole(slide, monkeypatch):
    """With no level small enough to keep, glass colour and the tissue grid still work, read chunk by chunk."""
    sdata, key = slide
    whole = _patches_of(sdata, key, [0])[0]
    glass = whole.glass["crop"]
    assert glass.min() > 200  # the crop shows glass
    _patches.DECODED.clear()
    monkeypatch.setattr(sth.settings, "image_cache_gb", 0)
    lazy = _patches_of(sdata, key, [0])[0]
    np.testing.assert_allclose(lazy.glass["crop"], glass)  # the same level, read chunk by chunk
    assert not _patches.DECODED._arrays
    on_tissue = sth.pp.spot_grid(sdata, "crop_image", spacing_um=100, key_added="on_tissue")
    assert 0 < len(sdata.shapes[on_tissue]) < len(sdata.shapes[key])


def test_full_resolution_tissue_labels_are_read_at_the_centres_only(slide):
    """A full-resolution tissue mask (labels, chunked) gives the grid of the coarse mask it was made from."""
    import dask.array as da
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import get_transformation

    sdata, key = slide
    mask, (sy, sx) = sth.pp.detect_tissue(sdata, "crop_image")
    assert (sy, sx) == (8.0, 8.0)
    full = da.from_array(np.repeat(np.repeat(mask, 8, axis=0), 8, axis=1).astype(np.uint8), chunks=1024)
    assert full.shape == (3072, 3072)
    transform = get_transformation(sdata.images["crop_image"], get_all=True)
    sdata["full_mask"] = Labels2DModel.parse(full, dims=("y", "x"), transformations=transform)
    from_full = sth.pp.spot_grid(sdata, "crop_image", tissue_key="full_mask", key_added="from_full")
    from_coarse = sth.pp.spot_grid(sdata, "crop_image", key_added="from_coarse")  # detects the tissue again
    a, b = sdata.shapes[from_full], sdata.shapes[from_coarse]
    assert 0 < len(a) < len(sdata.shapes[key])
    np.testing.assert_array_equal(a[["array_row", "array_col"]].to_numpy(), b[["array_row", "array_col"]].to_numpy())
