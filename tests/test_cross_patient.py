"""What carries a model across patients: white balance per slide, per-section centring, neighbour smoothing."""

from __future__ import annotations

import numpy as np
import pytest

import st_from_he as sth
from st_from_he.models import GLASS_GREY, glass_colour, smooth_neighbours, white_balance


@pytest.fixture(scope="module")
def sections(her2st_dir):
    """B4 (patient B) and C5, C6 (patient C)."""
    return sth.datasets.her2st(["B4", "C5", "C6"], path=her2st_dir)


@pytest.fixture(scope="module")
def patches(sections):
    return sth.pp.extract_patches(sections, size_um=112, size_px=32, context=(1.0, 3.0))


def test_glass_colour_of_real_slides(patches):
    glass = patches.glass
    assert set(glass) == {"B4", "C5", "C6"}
    # patient B's slide has a dark, purple-grey glass; patient C's is brighter
    np.testing.assert_allclose(glass["B4"], [221, 208, 224], atol=3)
    assert glass["C6"].mean() > glass["B4"].mean() + 15
    per_spot = patches.glass_per_spot()
    assert per_spot.shape == (len(patches), 3)
    np.testing.assert_array_equal(per_spot[patches.samples == "B4"][0], glass["B4"])


def test_white_balance_brings_glass_to_one_grey(patches):
    b4 = np.flatnonzero(patches.samples == "B4")[:5]
    raw = patches[b4]
    before = raw.copy()
    balanced = white_balance(raw, patches.glass["B4"])
    np.testing.assert_array_equal(raw, before)  # the input is not modified
    assert balanced.dtype == np.uint8 and balanced.shape == raw.shape
    # a pixel of B4's glass colour comes out at the target grey in every channel
    pixel = np.broadcast_to(np.asarray(patches.glass["B4"]).round().astype(np.uint8)[None, :, None, None], (1, 3, 2, 2))
    np.testing.assert_allclose(white_balance(pixel, patches.glass["B4"]), GLASS_GREY, atol=1)
    # B4's patches get brighter (its glass is darker than the target)
    assert balanced.astype(float).mean() > raw.astype(float).mean()
    with pytest.raises(ValueError, match="one RGB colour"):
        white_balance(raw, np.ones((2, 3)))
    with pytest.raises(ValueError, match="positive and finite"):
        white_balance(raw, [0, 200, 200])


def test_glass_colour_without_glass_leaves_the_image(sections):
    from st_from_he.pp._patches import image_levels

    dark = np.full((3, 64, 64), 120, dtype=np.uint8)
    np.testing.assert_array_equal(glass_colour(dark), GLASS_GREY)
    # the middle of C6 is all tissue: its brighter half is pale tissue, not uniform glass, so it is left as it is
    coarse = np.asarray(image_levels(sections.images["C6_image"])[-1])
    h, w = coarse.shape[1:]
    np.testing.assert_array_equal(glass_colour(coarse[:, h * 2 // 5 : h * 3 // 5, w * 2 // 5 : w * 3 // 5]), GLASS_GREY)
    assert glass_colour(coarse).mean() > 235  # the whole slide has glass
    # uint8 images take an integer path: the same colour as the same image in floats
    np.testing.assert_array_equal(glass_colour(coarse), glass_colour(coarse.astype(np.float64)))
    with pytest.raises(ValueError, match=r"shape \(3, h, w\)"):
        glass_colour(np.zeros((64, 64, 3), np.uint8))


def test_smoothing_over_grid_neighbours(sections):
    table = sections.tables["table"]
    c6 = (table.obs["sample"] == "C6").to_numpy()
    xy = table.obsm["spatial"][c6]
    rng = np.random.default_rng(0)
    values = rng.normal(size=(len(xy), 4))
    smoothed = smooth_neighbours(values, xy, weight=0.5)
    # legacy ST: a spot surrounded on all sides averages with its 8 neighbours (1 and 1.41 pitches away)
    pitch = np.median(np.sort(np.linalg.norm(xy[:, None] - xy[None], axis=2), axis=1)[:, 1])
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    neighbours = (dist > 0) & (dist < 1.5 * pitch)
    inner = int(np.flatnonzero(neighbours.sum(1) == 8)[0])
    expected = 0.5 * values[inner] + 0.5 * values[neighbours[inner]].mean(0)
    np.testing.assert_allclose(smoothed[inner], expected, rtol=1e-5)
    np.testing.assert_allclose(smooth_neighbours(values, xy, weight=0.0), values, rtol=1e-6)
    # other sections never count as neighbours, even at the same coordinates
    groups = np.where(np.arange(len(xy)) == inner, "other", "C6")
    np.testing.assert_allclose(smooth_neighbours(values, xy, groups, weight=0.5)[inner], values[inner], rtol=1e-6)
    with pytest.raises(ValueError, match=r"`positions` must be"):
        smooth_neighbours(values, xy[:5])
    with pytest.raises(ValueError, match="NaN"):
        smooth_neighbours(values, np.full_like(xy, np.nan))
    with pytest.raises(ValueError, match=r"`weight` must be in \[0, 1\]"):
        smooth_neighbours(values, xy, weight=2)


def test_centring_keeps_a_sections_spread(patches):
    from st_from_he.tl._baselines import RidgeProbe

    idx = np.flatnonzero(np.isin(patches.samples, ["C5", "C6"]))
    x = patches[idx]
    targets = np.random.default_rng(0).normal(size=(len(idx), 3))
    groups = patches.samples[idx]
    centred = RidgeProbe("handcrafted", per_section="centre").fit(x, targets, groups)
    zscored = RidgeProbe("handcrafted", per_section=True).fit(x, targets, groups)
    raw = centred.featurize(x)
    c6 = groups == "C6"
    # a section's features spread twice as wide: z-scoring hides it, centring keeps it
    wide = raw.copy()
    wide[c6] = raw[c6].mean(0) + 2 * (raw[c6] - raw[c6].mean(0))
    varying = raw[c6].std(0) > 1e-2 * np.abs(raw[c6]).mean(0)
    z_wide, z = zscored.predict_features(wide, groups)[1], zscored.predict_features(raw, groups)[1]
    np.testing.assert_allclose(z_wide[c6][:, varying], z[c6][:, varying], atol=1e-3)
    c_wide, c = centred.predict_features(wide, groups)[1], centred.predict_features(raw, groups)[1]
    np.testing.assert_allclose(c_wide[c6][:, varying].std(0), 2 * c[c6][:, varying].std(0), rtol=1e-3)
    # each section is centred on its own mean either way
    np.testing.assert_allclose(c[c6].mean(0), c[~c6].mean(0), atol=1e-3)
    with pytest.raises(ValueError, match="'zscore' \\(or True\\), 'centre', 'hybrid' or False"):
        RidgeProbe("handcrafted", per_section="median")


def test_default_probe_needs_each_slides_glass(sections, patches):
    train = sth.pp.split_sections(sections, test=["B4"])[0]
    genes = sth.pp.select_genes(train, n_top=40)
    model = sth.tl.ExpressionModel(
        genes,
        preset="ridge",
        img_size=32,
        features="handcrafted",
        per_section="centre",
        white_balance=True,
        neighbour_smoothing=0.5,
    ).fit(train)
    assert model._probe.white_balance and model._probe.per_section == "centre"
    b4 = sth.pp.split_sections(sections, test=["B4"])[1]
    b4_patches = sth.pp.extract_patches(b4, size_um=112, size_px=32, context=(1.0, 3.0))
    arrays = b4_patches.to_numpy()
    with pytest.raises(ValueError, match="needs the glass colour of each patch's slide"):
        model.predict_patches(arrays, progress_bar=False)
    # a PatchDataset brings its slides' glass, sections and positions
    from_dataset = model.predict_patches(b4_patches, progress_bar=False)[0]
    unsmoothed = model.predict_patches(arrays, glass=b4_patches.glass["B4"], progress_bar=False)[0]
    expected = smooth_neighbours(unsmoothed, b4_patches.spatial, weight=0.5)
    np.testing.assert_allclose(from_dataset, expected, rtol=1e-5, atol=1e-6)
    # the same through predict_expression, and after a save and load
    sth.tl.predict_expression(b4, model, key_added="pred", progress_bar=False)
    np.testing.assert_allclose(b4.tables["pred"].X, from_dataset, rtol=1e-5, atol=1e-6)
    # white balance changes the features a dark slide gives (B4's glass is far from the target grey)
    plain = sth.tl.ExpressionModel(genes, preset="ridge", img_size=32, features="handcrafted", per_section="centre")
    plain.fit(train)
    assert np.abs(plain.predict_patches(arrays, progress_bar=False)[0] - unsmoothed).max() > 1e-3
    with pytest.raises(ValueError, match="applies to hand-crafted features"):
        sth.tl.ExpressionModel(genes, preset="ridge_encoder", white_balance=True)
    with pytest.raises(ValueError, match=r"`neighbour_smoothing` must be a weight in \[0, 1\]"):
        sth.tl.ExpressionModel(genes, preset="ridge", neighbour_smoothing=1.5)
    with pytest.raises(ValueError, match=r"`neighbour_smoothing` must be a weight in \[0, 1\]"):
        sth.tl.ExpressionModel(genes, neighbour_smoothing=-0.1)


def test_hybrid_z_scores_only_the_structure_features(patches):
    from st_from_he.models._handcrafted import (
        N_BLOB,
        N_HANDCRAFTED,
        handcrafted_features,
        stain_blob_features,
        structure_columns,
    )
    from st_from_he.tl._baselines import RidgeProbe

    idx = np.flatnonzero(np.isin(patches.samples, ["C5", "C6"]))
    x = patches[idx]
    assert handcrafted_features(x[:2]).shape[1] == 2 * N_HANDCRAFTED  # the layout structure_columns assumes
    assert stain_blob_features(x[:2]).shape[1] == 2 * N_BLOB
    mask = structure_columns(2 * (N_HANDCRAFTED + N_BLOB), blobs=True)
    assert mask.sum() == 2 * (7 + N_BLOB) and not mask[:29].any() and mask[29:36].all()
    groups = patches.samples[idx]
    targets = np.random.default_rng(0).normal(size=(len(idx), 3))
    probe = RidgeProbe("handcrafted+blobs", per_section="hybrid").fit(x, targets, groups)
    raw = probe.featurize(x)
    c6 = groups == "C6"
    wide = raw.copy()  # C6's features spread twice as wide, as a sharper scan's texture would
    wide[c6] = raw[c6].mean(0) + 2 * (raw[c6] - raw[c6].mean(0))
    out_wide, out = probe.predict_features(wide, groups)[1], probe.predict_features(raw, groups)[1]
    varying = raw[c6].std(0) > 1e-2 * np.abs(raw[c6]).mean(0)
    structure, colour = mask & varying, ~mask & varying
    np.testing.assert_allclose(out_wide[c6][:, structure], out[c6][:, structure], atol=1e-3)  # z-scored
    np.testing.assert_allclose(out_wide[c6][:, colour].std(0), 2 * out[c6][:, colour].std(0), rtol=1e-3)  # centred
    with pytest.raises(ValueError, match="hybrid'` applies to hand-crafted features"):
        sth.tl.ExpressionModel(["ERBB2"], preset="ridge_encoder", per_section="hybrid")
