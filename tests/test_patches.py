"""Patches of fixed physical size (`sth.pp.extract_patches`) on the real her2st section C6."""

from __future__ import annotations

import pickle
import subprocess
import sys

import dask.array as da
import numpy as np
import pandas as pd
import pytest

import st_from_he as sth
from st_from_he.io._image import image_element
from st_from_he.io._section import build_section, spots_element
from st_from_he.pp import _patches
from st_from_he.pp._patches import resample_boxes


@pytest.fixture(scope="module")
def c6(her2st_dir):
    """Section C6 read from the files (the JPEG stays lazy until a patch is cut)."""
    return sth.datasets.her2st(["C6"], path=her2st_dir)


@pytest.fixture(scope="module")
def c6_patches(c6):
    """The table's patches, cut from the real JPEG once."""
    dataset = sth.pp.extract_patches(c6)
    return dataset, dataset.to_numpy()


@pytest.fixture(scope="module")
def c6_pixels(c6_patches):
    """Full-resolution pixels of C6, (c, y, x), as the dataset decoded them."""
    dataset, _ = c6_patches
    return dataset._level_array("C6", 0)


def _section(pixels: np.ndarray, pixel_size: float, sample: str, table, spatial: np.ndarray):
    """A section with an in-memory (chunked) image, following the data model."""
    level = da.from_array(pixels, chunks=(3, 2048, 2048))
    return build_section(
        sample,
        x=table.X,
        var=table.var[[]],
        obs=table.obs[[]],
        spatial_px=spatial,
        levels=[level],
        pixel_size_um=pixel_size,
        spot_diameter_um=100.0,
    )


def _downsampled(pixels: np.ndarray, factor: float) -> np.ndarray:
    from PIL import Image

    h, w = pixels.shape[1:]
    size = (round(w / factor), round(h / factor))
    small = Image.fromarray(np.moveaxis(pixels, 0, -1)).resize(size, Image.BILINEAR, reducing_gap=None)
    return np.ascontiguousarray(np.moveaxis(np.asarray(small), -1, 0))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(float).ravel(), b.astype(float).ravel())[0, 1])


def test_table_patches_shape_and_metadata(c6, c6_patches):
    dataset, patches = c6_patches
    table = c6.tables["table"]
    assert len(dataset) == table.n_obs
    assert patches.shape == (table.n_obs, 3, 224, 224) and patches.dtype == np.uint8
    assert dataset.item_shape == (3, 224, 224)
    assert list(dataset.obs_names) == list(table.obs_names)
    assert set(dataset.samples) == {"C6"}
    np.testing.assert_allclose(dataset.spatial, table.obsm["spatial"])
    assert dataset.size_um == 112 and dataset.size_px == 224 and dataset.context == (1.0,)
    assert dataset.levels == {"C6": (0,)}  # the image (0.69 um/px) is coarser than the patches (0.5 um/px)
    np.testing.assert_array_equal(dataset[3], patches[3])
    np.testing.assert_array_equal(dataset[-1], patches[-1])
    np.testing.assert_array_equal(dataset[2:6], patches[2:6])
    np.testing.assert_array_equal(dataset[np.array([7, 1, 7])], patches[[7, 1, 7]])
    mask = np.zeros(len(dataset), bool)
    mask[[0, 5]] = True
    np.testing.assert_array_equal(dataset[mask], patches[[0, 5]])
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_patch_equals_direct_crop_and_resize(c6, c6_patches, c6_pixels):
    """A patch is the window of 112 um centred on the spot (x = column, y = row), resampled; PIL agrees within 1."""
    from PIL import Image

    dataset, patches = c6_patches
    px = dataset.pixel_size_um["C6"]
    side = 112 / px
    for i in (0, 50, 120):
        cx, cy = c6.tables["table"].obsm["spatial"][i]
        x0, y0 = int(cx - side / 2) - 3, int(cy - side / 2) - 3
        crop = c6_pixels[:, y0 : y0 + int(side) + 7, x0 : x0 + int(side) + 7]
        box = (cx - side / 2 - x0, cy - side / 2 - y0, cx + side / 2 - x0, cy + side / 2 - y0)
        np.testing.assert_array_equal(resample_boxes(crop, np.array([box]), 224)[0], patches[i])
        pil = Image.fromarray(np.ascontiguousarray(np.moveaxis(crop, 0, -1))).resize(
            (224, 224), Image.BILINEAR, box=box
        )
        assert np.abs(np.moveaxis(np.asarray(pil), -1, 0).astype(int) - patches[i]).max() <= 1


def test_orientation_on_a_synthetic_image():
    """A red mark at (x=300, y=100) is at the centre of the patch of a spot there; none at the swapped position."""
    pixels = np.full((3, 400, 500), 255, np.uint8)
    pixels[1:, 95:105, 295:305] = 0  # red square of 10 px
    import anndata as ad

    table = ad.AnnData(np.ones((2, 1), np.int32))
    sdata = _section(pixels, 1.0, "S", table, np.array([[300.0, 100.0], [100.0, 300.0]]))
    patches = sth.pp.extract_patches(sdata, size_um=40, size_px=40).to_numpy()
    assert patches[0][:, 20, 20].tolist() == [255, 0, 0]
    assert (patches[0][:, :10, :] == 255).all()  # 20 um away from the mark: white
    assert (patches[1] == 255).all()


def test_same_physical_size_at_any_resolution(c6, c6_pixels):
    """C6 and copies downsampled 2x and 4.6x give the same tissue at the same place in each patch."""
    table = c6.tables["table"]
    px = sth.pp.extract_patches(c6).pixel_size_um["C6"]
    rows = np.arange(0, table.n_obs, 6)
    sub = table[rows]
    spatial = sub.obsm["spatial"]
    reference = _section(c6_pixels, px, "C6", sub, spatial)
    # size_px=48: 2.3 um per output pixel, coarser than every copy, so all are downsampled (antialiased)
    ref = sth.pp.extract_patches(reference, size_um=112, size_px=48).to_numpy()
    for factor in (2.0, 4.6):
        small = _downsampled(c6_pixels, factor)
        scale = np.array([small.shape[2] / c6_pixels.shape[2], small.shape[1] / c6_pixels.shape[1]])
        copy = _section(small, px / scale.mean(), "C6", sub, spatial * scale)
        got = sth.pp.extract_patches(copy, size_um=112, size_px=48).to_numpy()
        wrong = sth.pp.extract_patches(copy, size_um=112 * 1.25, size_px=48).to_numpy()
        same = np.median([_corr(a, b) for a, b in zip(ref, got, strict=True)])
        other = np.median([_corr(a, b) for a, b in zip(ref, wrong, strict=True)])
        print(f"factor {factor}: median correlation {same:.3f} (25% too large: {other:.3f})")
        assert same > 0.9, (factor, same)
        assert same > other + 0.1, (factor, same, other)  # the test can tell a 25% size error


def test_padding_is_white_beyond_the_border(c6, c6_pixels):
    px = sth.pp.extract_patches(c6).pixel_size_um["C6"]
    h, w = c6_pixels.shape[1:]
    c6.shapes["corner"] = spots_element(np.array([[1.0, 1.0], [w - 2.0, h / 2]]), 10, "C6", px)
    try:
        dataset = sth.pp.extract_patches(c6, shapes_key="corner")
        corner, right = dataset.to_numpy()
    finally:
        del c6.shapes["corner"]
    assert list(dataset.obs_names) == ["corner-0", "corner-1"]
    assert (corner[:, :100, :100] == 255).all()  # beyond the top-left corner
    assert (corner[:, 120:, 120:] != 255).any()  # the image inside
    assert (right[:, :, 120:] == 255).all()  # beyond the right edge
    # Independently: the corner of the image pasted onto white, the same window resampled.
    side = 112 / px
    padded = np.full((3, 300, 300), 255, np.uint8)
    padded[:, 150:, 150:] = c6_pixels[:, :150, :150]
    box = np.array([[151 - side / 2, 151 - side / 2, 151 + side / 2, 151 + side / 2]])
    np.testing.assert_array_equal(resample_boxes(padded, box, 224)[0], corner)


def test_multi_context_scales(c6, c6_patches):
    _, single = c6_patches
    dataset = sth.pp.extract_patches(c6, context=(1.0, 3.0))
    assert dataset.levels == {"C6": (0, 1)}  # 3x context: 1.5 um/px, read from the 1.38 um/px level
    assert dataset.item_shape == (2, 3, 224, 224)
    assert dataset[0].shape == (2, 3, 224, 224)
    batch = dataset[[0, 4, 9]]
    assert batch.shape == (3, 2, 3, 224, 224)
    np.testing.assert_array_equal(batch[:, 0], single[[0, 4, 9]])
    # The centre third of the context patch shows the spot patch (same centre, same orientation).
    centre = batch[:, 1, :, 75:149, 75:149]
    shrunk = np.stack([resample_boxes(p, np.array([[0, 0, 224, 224]]), 74)[0] for p in batch[:, 0]])
    assert min(_corr(a, b) for a, b in zip(centre, shrunk, strict=True)) > 0.8


def test_torch_dataloader(c6_patches):
    torch = pytest.importorskip("torch")
    dataset, patches = c6_patches
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=False, num_workers=0)
    batch = next(iter(loader))
    assert batch.shape == (8, 3, 224, 224) and batch.dtype == torch.uint8
    np.testing.assert_array_equal(batch.numpy(), patches[:8])
    assert len(pickle.dumps(dataset)) < 5_000_000  # decoded images are not pickled with the dataset


def test_tiled_levels_are_read_window_by_window(c6, c6_pixels, tmp_path, monkeypatch):
    """A lazily readable (zarr) level too large to keep is read per window, never whole; pixels are the same."""
    import spatialdata as sd

    px = sth.pp.extract_patches(c6).pixel_size_um["C6"]
    crop = np.ascontiguousarray(c6_pixels[:, 3000:6000, 2500:5500])
    table = c6.tables["table"]
    spatial = table.obsm["spatial"] - [2500, 3000]
    keep = np.flatnonzero((spatial > 0).all(1) & (spatial < 3000).all(1))[:12]
    sdata = _section(crop, px, "C6", table[keep], spatial[keep])
    sth.pp.spot_grid(sdata, "C6_image", spacing_um=400, tissue_only=False)  # points near the border too
    sdata.write(tmp_path / "crop.zarr")
    on_disk = sd.read_zarr(tmp_path / "crop.zarr")
    assert not _patches.is_monolithic(on_disk.images["C6_image"]["scale0"]["image"].data)
    for shapes_key in (None, "C6_grid"):
        whole = sth.pp.extract_patches(on_disk, context=(1.0, 3.0), shapes_key=shapes_key)
        assert whole.levels == {"C6": (0, 1)}
        expected = whole.to_numpy()
        with monkeypatch.context() as m:
            m.setattr(_patches, "_SMALL_LEVEL_BYTES", 0)
            lazy = sth.pp.extract_patches(on_disk, context=(1.0, 3.0), shapes_key=shapes_key)
            assert not any(lazy._sections["C6"].materialise(lv) for lv in lazy.levels["C6"])
            _patches.DECODED.clear()
            np.testing.assert_array_equal(lazy.to_numpy(), expected)
            assert not _patches.DECODED._arrays
    assert (expected[:, 0] == 255).any()  # some grid patches reach beyond the image


def test_several_samples_in_table_order(c6, c6_pixels):
    table = c6.tables["table"]
    rows = np.arange(0, table.n_obs, 20)
    px = sth.pp.extract_patches(c6).pixel_size_um["C6"]
    half = _downsampled(c6_pixels, 2.0)
    scale = np.array([half.shape[2] / c6_pixels.shape[2], half.shape[1] / c6_pixels.shape[1]])
    a = _section(c6_pixels, px, "A", table[rows], table.obsm["spatial"][rows])
    b = _section(half, px / scale.mean(), "B", table[rows], table.obsm["spatial"][rows] * scale)
    b.tables["table"].obs_names = [f"B_{i}" for i in range(len(rows))]
    a.tables["table"].obs_names = [f"A_{i}" for i in range(len(rows))]
    both = sth.io.concatenate([a, b])
    dataset = sth.pp.extract_patches(both)
    assert list(dataset.obs_names) == list(both.tables["table"].obs_names)
    assert list(pd.unique(dataset.samples)) == ["A", "B"]
    only_b = sth.pp.extract_patches(both, samples="B")
    assert list(only_b.obs_names) == [f"B_{i}" for i in range(len(rows))]
    # the same spot through two resolutions: the same tissue
    assert _corr(dataset[0], only_b[0]) > 0.8


def test_errors(c6):
    with pytest.raises(ValueError, match="size_um"):
        sth.pp.extract_patches(c6, size_um=0)
    with pytest.raises(ValueError, match="size_px"):
        sth.pp.extract_patches(c6, size_px=0)
    with pytest.raises(ValueError, match="context"):
        sth.pp.extract_patches(c6, context=(1.0, -2.0))
    with pytest.raises(KeyError, match="shapes present"):
        sth.pp.extract_patches(c6, shapes_key="nope")
    with pytest.raises(KeyError, match="tables present"):
        sth.pp.extract_patches(c6, table_key="nope")
    with pytest.raises(ValueError, match="Unknown sample"):
        sth.pp.extract_patches(c6, samples=["C9"])
    px = sth.pp.extract_patches(c6).pixel_size_um["C6"]
    c6.shapes["far"] = spots_element(np.array([[-500.0, 10.0]]), 10, "C6", px)
    try:
        with pytest.raises(ValueError, match="outside"):
            sth.pp.extract_patches(c6, shapes_key="far")
    finally:
        del c6.shapes["far"]


def test_unknown_resolution_is_an_error():
    import anndata as ad
    import spatialdata as sd

    pixels = da.from_array(np.full((3, 100, 100), 200, np.uint8))
    element = image_element([pixels], 1.0, "S")
    from spatialdata.transformations import Identity, set_transformation

    set_transformation(element, {"global": Identity()}, set_all=True)
    table = ad.AnnData(np.ones((1, 1)), obs=pd.DataFrame({"sample": ["S"]}, index=["a"]))
    table.obsm["spatial"] = np.array([[50.0, 50.0]])
    sdata = sd.SpatialData(images={"S_image": element}, tables={"table": table})
    with pytest.raises(ValueError, match="resolution is unknown"):
        sth.pp.extract_patches(sdata)


def test_resampling_kernel_is_loaded_from_numba_disk_cache():
    """A fresh process loads the compiled kernel instead of compiling it again (2-3 s before the first patch).

    The kernel used to be defined inside a function, whose on-disk cache numba never reused: every process compiled.
    """
    code = (
        "import numpy as np\n"
        "from st_from_he.pp._patches import _kernel, resample_boxes\n"
        "out = resample_boxes(np.full((3, 40, 40), 7, np.uint8), np.array([[5.0, 5.0, 25.0, 25.0]]), 8)\n"
        "assert (out == 7).all()\n"
        "stats = _kernel().stats\n"
        "print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))\n"
    )

    def run() -> list[int]:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return [int(v) for v in done.stdout.split()]

    run()  # compiles and saves, unless an earlier process did
    assert run() == [1, 0]
