"""Neighbour attention on real her2st sections: neighbours found in micrometres, fed at training and prediction.

her2st is a legacy ST array: spots on a 200 um square grid, so the 8 spots around a spot lie at 200 um (4) and
283 um (4, diagonal). The detected spot centres are jittered (measured on C5/C6: grid neighbours 146-268 um apart,
diagonal ones 218-341 um), so a radius of 350 um, below the next ring at 400 um, is what takes exactly the 8 around
every interior spot; the package default of 150 um finds (almost) nothing on this grid.
"""

from __future__ import annotations

import numpy as np
import pytest

import st_from_he as sth
from st_from_he.models._context import neighbour_index

RADIUS = 350.0  # the 8 around a spot of the jittered 200 um legacy ST grid (see the module docstring)
TINY = {"img_size": 32, "batch_size": 16, "neighbour_radius_um": RADIUS}
# no ridge probe (it standardises each section with all its patches) and no smoothing (it mixes in the
# neighbours' predictions): what remains depends on the network, i.e. on the neighbour attention alone
NETWORK_ONLY = {"blend_ridge": False, "neighbour_smoothing": 0.0}


@pytest.fixture(scope="module")
def spots(split):
    """The first 100 spots of C5: a few grid columns, so most of them have neighbours among themselves."""
    return list(split[0].tables["table"].obs_names[:100])


@pytest.fixture(scope="module")
def patches(split):
    """C6 patches at the tiny models' geometry (112 um, 32 px, context 1 and 3)."""
    return sth.pp.extract_patches(split[1], size_um=112, size_px=32, context=(1.0, 3.0))


def _um(dataset) -> np.ndarray:
    """Spot centres of a PatchDataset in micrometres."""
    return dataset.spatial * np.array([dataset.pixel_size_um[s] for s in dataset.samples])[:, None]


def _fit(split, genes, spots, **config):
    """A tiny fit; ``model.batches`` records the keys, shapes and dtypes of every batch the module trained on."""
    from st_from_he.models import ExpressionModule

    seen, original = [], ExpressionModule.compute_losses

    def spy(self, batch):
        seen.append({k: (tuple(v.shape), v.dtype) for k, v in batch.items()})
        return original(self, batch)

    model = sth.tl.ExpressionModel(genes, **(TINY | NETWORK_ONLY | config))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ExpressionModule, "compute_losses", spy)
        model.fit(split[0], spots=spots, max_epochs=1, seed=0, progress_bar=False)
    model.batches = seen
    return model


@pytest.fixture(scope="module")
def with_neighbours(split, genes, spots):
    return _fit(split, genes, spots, neighbour_attention=True, max_neighbours=6)


@pytest.fixture(scope="module")
def without_neighbours(split, genes, spots):
    return _fit(split, genes, spots, neighbour_attention=False)


# -- the neighbour index -------------------------------------------------------------------------------------------


def test_index_takes_the_8_grid_neighbours_of_every_interior_legacy_st_spot(her2st_small):
    dataset = sth.pp.extract_patches(her2st_small, size_um=112, size_px=32)
    um, samples = _um(dataset), dataset.samples
    # array coordinates from the obs names "C5_{x}x{y}": the grid truth to compare with
    xy = np.array([[int(v) for v in name.split("_")[1].split("x")] for name in dataset.obs_names])
    row = {(s, x, y): i for i, (s, (x, y)) in enumerate(zip(samples, xy, strict=True))}
    index = neighbour_index(um, samples, radius_um=RADIUS, max_neighbours=8)
    assert index.shape == (len(um), 8)
    interior = 0
    for i, (s, (x, y)) in enumerate(zip(samples, xy, strict=True)):
        ring = {row.get((s, x + dx, y + dy)) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy}
        if None not in ring:
            interior += 1
            assert set(index[i]) == ring, dataset.obs_names[i]
    assert interior > 150  # C5 and C6 have 200 interior spots
    found = index >= 0
    rows = np.nonzero(found)[0]
    # every neighbour in range, of the same section, never the spot itself, nearest first
    distance = np.full(index.shape, 1e9)  # padding sorts last
    distance[found] = np.hypot(*(um[rows] - um[index[found]]).T)
    assert np.all(distance[found] <= RADIUS)
    assert np.all(samples[rows] == samples[index[found]])
    assert not np.any(index == np.arange(len(um))[:, None])
    assert np.all(np.diff(distance, axis=1)[found[:, 1:]] >= 0)
    # 210 um: at most the 4 orthogonal ones; the default 150 um: hardly any spot has a neighbour on this grid
    assert neighbour_index(um, samples, radius_um=210, max_neighbours=8).shape[1] <= 4
    assert (neighbour_index(um, samples, radius_um=150, max_neighbours=8) >= 0).sum() < 0.05 * len(um)


def test_index_does_not_depend_on_the_order_of_the_spots(her2st_small):
    dataset = sth.pp.extract_patches(her2st_small, size_um=112, size_px=32)
    um, samples = _um(dataset), dataset.samples
    index = neighbour_index(um, samples, radius_um=RADIUS, max_neighbours=5)  # a cap that cuts the ring
    perm = np.random.default_rng(0).permutation(len(um))
    permuted = neighbour_index(um[perm], samples[perm], radius_um=RADIUS, max_neighbours=5)
    back = np.where(permuted >= 0, perm[np.maximum(permuted, 0)], -1)  # rows of the permuted order -> original
    np.testing.assert_array_equal(back[np.argsort(perm)], index)


def test_index_keeps_sections_apart_caps_and_refuses_bad_input():
    xy = np.array([[0, 0], [100, 0], [0, 100], [100, 100], [0, 0]], dtype=float)
    index = neighbour_index(xy, ["a", "a", "a", "a", "b"], radius_um=150, max_neighbours=2)
    assert index.shape == (5, 2)
    np.testing.assert_array_equal(index[4], [-1, -1])  # alone in its section, though at spot 0's position
    np.testing.assert_array_equal(index[0], [2, 1])  # the two at 100 um (tie: smaller x first), not the diagonal
    assert neighbour_index(xy, radius_um=10, max_neighbours=8).shape == (5, 1)  # spots 0 and 4 coincide
    with pytest.raises(ValueError, match="positions_um"):
        neighbour_index(np.array([[0.0, np.nan], [1.0, 1.0]]), radius_um=10, max_neighbours=2)
    with pytest.raises(ValueError, match="radius_um"):
        neighbour_index(xy, radius_um=0, max_neighbours=2)
    with pytest.raises(ValueError, match="groups"):
        neighbour_index(xy, ["a"], radius_um=10, max_neighbours=2)


# -- training batches ------------------------------------------------------------------------------------------------


def test_without_neighbour_attention_batches_carry_image_and_expression_only(without_neighbours):
    batches = without_neighbours.batches
    assert batches and all(set(b) == {"image", "expression"} for b in batches)


def test_with_neighbour_attention_batches_carry_neighbour_patches_and_mask(with_neighbours):
    import torch

    batches = with_neighbours.batches
    assert batches and all(set(b) == {"image", "expression", "neighbours", "neighbour_mask"} for b in batches)
    for b in batches:
        n, scales = b["image"][0][:2]
        assert b["neighbours"] == ((n, 6, scales, 3, 32, 32), torch.float32)  # normalised like the images
        assert b["neighbour_mask"] == ((n, 6), torch.bool)


def test_dataset_gives_neighbour_patches_and_blanks_padding():
    from st_from_he.tl._training import _SpotDataset

    pool = np.arange(4 * 2 * 3 * 2 * 2, dtype=np.uint8).reshape(4, 2, 3, 2, 2) + 1
    targets = np.zeros((4, 3), np.float32)
    assert set(_SpotDataset(pool, targets)[0]) == {"image", "expression"}
    item = _SpotDataset(pool, targets, np.array([[2, -1], [0, 3], [1, -1], [0, 1]]), pool)[0]
    np.testing.assert_array_equal(item["neighbours"][0].numpy(), pool[2])
    assert not item["neighbours"][1].numpy().any()
    np.testing.assert_array_equal(item["neighbour_mask"].numpy(), [False, True])


def test_module_refuses_training_batches_without_neighbours(with_neighbours):
    import torch

    module = with_neighbours._module
    batch = {"image": torch.zeros(2, 2, 3, 32, 32), "expression": torch.zeros(2, len(with_neighbours.genes))}
    with pytest.raises(ValueError, match="neighbours"):
        module.compute_losses(batch)


# -- prediction ------------------------------------------------------------------------------------------------------


def test_changing_a_neighbours_patch_changes_the_spots_prediction(with_neighbours, without_neighbours, patches):
    um = _um(patches)
    arrays = patches.to_numpy()
    index = neighbour_index(um, patches.samples, radius_um=RADIUS, max_neighbours=6)
    spot = int(np.argmax((index >= 0).sum(1)))  # a spot with all its 6 slots filled
    neighbour = int(index[spot, 0])
    far = int(np.argmax(np.hypot(*(um - um[neighbour]).T)))  # neither it nor its neighbours touch `neighbour`
    assert neighbour not in index[far] and far not in index[neighbour]
    changed = arrays.copy()
    changed[neighbour] = 255 - changed[neighbour]
    for model, attends in ((with_neighbours, True), (without_neighbours, False)):
        expression, embeddings = model.predict_patches(arrays, positions_um=um, progress_bar=False)
        expression_after, embeddings_after = model.predict_patches(changed, positions_um=um, progress_bar=False)
        assert np.abs(embeddings_after[neighbour] - embeddings[neighbour]).max() > 0.05  # its own patch changed
        np.testing.assert_array_equal(embeddings_after[far], embeddings[far])
        np.testing.assert_array_equal(expression_after[far], expression[far])
        if attends:  # the spot's embedding moves with its neighbour's patch, and so does its prediction
            assert np.abs(embeddings_after[spot] - embeddings[spot]).max() > 1e-3
            assert not np.array_equal(expression_after[spot], expression[spot])
        else:
            np.testing.assert_array_equal(embeddings_after[spot], embeddings[spot])
            np.testing.assert_array_equal(expression_after[spot], expression[spot])


def test_prediction_from_a_patch_dataset_equals_arrays_with_positions_um_in_any_order(with_neighbours, patches):
    expected = with_neighbours.predict_patches(patches, progress_bar=False)
    perm = np.random.default_rng(1).permutation(len(patches))
    got = with_neighbours.predict_patches(
        patches.to_numpy()[perm], positions_um=_um(patches)[perm], batch_size=7, progress_bar=False
    )
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(b, a[perm], atol=1e-5)


def test_predict_expression_on_a_pseudo_spot_grid(with_neighbours, split):
    import spatialdata as sd

    test = split[1]
    sdata = sd.SpatialData(images=dict(test.images), shapes=dict(test.shapes), tables={})
    key = sth.pp.spot_grid(sdata, "C6_image", spacing_um=300, tissue_only=False)
    sth.tl.predict_expression(sdata, with_neighbours, shapes_key=key, device="cpu", progress_bar=False)
    table = sdata.tables["predicted_expression"]
    grid = sth.pp.extract_patches(sdata, size_um=112, size_px=32, context=(1.0, 3.0), shapes_key=key)
    assert table.n_obs == len(grid) > 100 and np.isfinite(table.X).all()
    # the 300 um grid: interior points attend over their 4 neighbours at 300 um (the diagonals, 424 um, are out)
    assert neighbour_index(_um(grid), radius_um=RADIUS, max_neighbours=6).shape[1] == 4
    expression, _ = with_neighbours.predict_patches(grid.to_numpy(), positions_um=_um(grid), progress_bar=False)
    np.testing.assert_allclose(table.X, expression, atol=1e-5)


def test_save_load_round_trip(with_neighbours, patches, tmp_path):
    path = with_neighbours.save(tmp_path / "model")
    loaded = sth.tl.ExpressionModel.load(path, device="cpu")
    assert loaded.config.neighbour_attention and loaded.config.neighbour_radius_um == RADIUS
    for a, b in zip(
        with_neighbours.predict_patches(patches, progress_bar=False),
        loaded.predict_patches(patches, progress_bar=False),
        strict=True,
    ):
        np.testing.assert_allclose(b, a, atol=1e-6)


# -- errors ----------------------------------------------------------------------------------------------------------


def test_arrays_without_positions_um_are_refused(with_neighbours, patches):
    arrays = patches.to_numpy()
    with pytest.raises(ValueError, match=r"pass `positions_um=` \(n, 2\)"):
        with_neighbours.predict_patches(arrays, progress_bar=False)
    with pytest.raises(ValueError, match=r"`positions_um` must give .* shape \(178, 2\)"):
        with_neighbours.predict_patches(arrays, positions_um=_um(patches)[:10], progress_bar=False)


def test_no_neighbours_possible_is_an_error_naming_the_radius(with_neighbours, split, genes, spots, patches):
    with pytest.raises(ValueError, match=r"No neighbours possible: .*`neighbour_radius_um`=100 um"):
        _fit(split, genes, spots, neighbour_attention=True, neighbour_radius_um=100)
    # positions three times too far apart (e.g. in the wrong unit): no spot within the radius any more
    with pytest.raises(ValueError, match=r"`neighbour_radius_um`=350 um .* in micrometres"):
        with_neighbours.predict_patches(patches.to_numpy(), positions_um=_um(patches) * 3, progress_bar=False)
