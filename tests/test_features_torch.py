"""The torch hand-crafted and blob features against the NumPy/SciPy reference, on real her2st patches.

Tolerance: every column within ``rtol=1e-5`` of the reference, or ``1e-5`` of its column's typical magnitude
(float32 sums in another order); the threshold features (nuclear fraction, blob count) and the RGB percentiles equal.
The GPU code paths (torch sort, label propagation, float64 box filter) run here on CPU tensors by switching the
dispatch, so they are checked without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import st_from_he as sth
from st_from_he.models import _handcrafted_torch as ht
from st_from_he.models._handcrafted import N_HANDCRAFTED, handcrafted_features, stain_blob_features
from st_from_he.models._handcrafted_torch import (
    handcrafted_features_torch,
    probe_features_torch,
    stain_blob_features_torch,
    white_balance_torch,
)

EXACT = [2, 3, 4, 7, 8, 9, 12, 13, 14, 25, 26, 29]  # per scale: RGB percentiles, tissue and nuclear fractions, blobs


@pytest.fixture(scope="module")
def c6(her2st_small):
    return sth.pp.split_sections(her2st_small, test=["C6"])[1]


@pytest.fixture(scope="module", params=[112, 37, 13])
def patches(request, c6):
    """40 C6 spots at two context scales, cut at 112 px and at odd sides (13 px: the widest filter reflects twice)."""
    data = sth.pp.extract_patches(c6, size_um=112, size_px=request.param, context=(1.0, 3.0))
    return np.stack([data[i] for i in range(40)])


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    scale = np.abs(expected).mean(0, keepdims=True)
    bad = np.abs(actual - expected) > 1e-5 * np.maximum(np.abs(expected), scale)
    assert not bad.any(), f"columns {sorted(set(np.nonzero(bad)[1]))} differ beyond float32 rounding"


@pytest.mark.parametrize("filters", ["pyramid", "full"])
def test_torch_features_equal_the_reference(patches, filters):
    x = torch.from_numpy(patches)
    hand, blobs = handcrafted_features(patches), stain_blob_features(patches, filters)
    hand_t, blobs_t = handcrafted_features_torch(x).numpy(), stain_blob_features_torch(x, filters).numpy()
    assert hand_t.shape == hand.shape == (40, 2 * N_HANDCRAFTED) and hand_t.dtype == np.float32
    assert blobs_t.shape == blobs.shape == (40, 24)
    _assert_close(hand_t, hand)
    _assert_close(blobs_t, blobs)
    exact = EXACT + [c + N_HANDCRAFTED for c in EXACT]
    np.testing.assert_array_equal(hand_t[:, exact], hand[:, exact])
    assert hand[:, 29].std() > 0 and np.abs(blobs).min() > 0  # the blob counts and responses vary: a real check
    # both sets at once: the probe's column layout
    both = probe_features_torch(x, blob_filters=filters).numpy()
    np.testing.assert_array_equal(both, np.concatenate([hand_t, blobs_t], axis=1))


def test_gpu_code_paths_equal_the_reference(patches, monkeypatch):
    """The sort, the float64 box filter and the label propagation that CUDA tensors take, run on the CPU."""
    monkeypatch.setattr(ht, "_use_numpy", lambda x: False)
    x = torch.from_numpy(patches)
    hand = handcrafted_features(patches)
    hand_t = handcrafted_features_torch(x).numpy()
    _assert_close(hand_t, hand)
    np.testing.assert_array_equal(hand_t[:, [29, 29 + N_HANDCRAFTED]], hand[:, [29, 29 + N_HANDCRAFTED]])
    for filters in ("pyramid", "full"):
        _assert_close(stain_blob_features_torch(x, filters).numpy(), stain_blob_features(patches, filters))


def test_pyramid_blob_features_follow_the_full_filters(c6):
    """The pyramid moves each blob column little: across real spots it ranks them as the full filters do."""
    data = sth.pp.extract_patches(c6, size_um=112, size_px=112, context=(1.0, 3.0))
    x = np.stack([data[i] for i in range(60)])
    full, pyramid = stain_blob_features(x, "full"), stain_blob_features(x, "pyramid")
    r = np.array([np.corrcoef(full[:, j], pyramid[:, j])[0, 1] for j in range(full.shape[1])])
    assert r.min() > 0.98, r.round(4)
    # the narrowest width is filtered at full resolution by both: its columns are the same
    narrow = [c + 12 * s for s in range(2) for c in (0, 1, 6, 7)]
    np.testing.assert_array_equal(full[:, narrow], pyramid[:, narrow])
    assert not np.allclose(full, pyramid)  # the wider widths are not
    with pytest.raises(ValueError, match=r"`filters` must be one of \('pyramid', 'full'\), got 'half'"):
        stain_blob_features(x, "half")
    with pytest.raises(ValueError, match=r"`blob_filters` must be one of"):
        stain_blob_features_torch(torch.from_numpy(x), "half")


def test_bracketed_selection_is_exact(c6, monkeypatch):
    """The sample-bracketed order statistics equal a full sort's, on real rows and on rows whose bracket fails."""
    data = sth.pp.extract_patches(c6, size_um=112, size_px=112)
    stains = ht._stains(torch.from_numpy(np.stack([data[i] for i in range(24)]))).numpy()
    p = stains.shape[-1]
    assert p >= ht._BRACKET_MIN  # the bracketed path, not the partition
    rng = np.random.default_rng(0)
    adversarial = rng.normal(size=(6, p)).astype(np.float32)
    adversarial[:, ht._sample_positions(p)] = -100  # the sample holds only the smallest values: brackets miss
    rows = {
        "haematoxylin": stains[:, 0],  # a strided view, as the features pass it
        "eosin": stains[:, 1],
        "few levels": rng.integers(0, 3, size=(8, p)).astype(np.float32),  # long runs of ties
        "constant": np.full((3, p), 0.5, np.float32),
        "adversarial": adversarial,
    }
    partitioned = {}  # rows that the partition took, by kind of row
    partition = ht._partition_select

    def counting_partition(x, ranks):
        partitioned[name] = partitioned.get(name, 0) + len(x)
        return partition(x, ranks)

    monkeypatch.setattr(ht, "_partition_select", counting_partition)
    percentiles = [r for q in (10, 50, 75, 85, 90) for r in ht._virtual_index(p, q)[:2]]
    for name, x in rows.items():
        for ranks in (sorted(set(percentiles)), [0, 1], [p - 2, p - 1], list(range(3000, 3040))):
            expected = np.sort(x, axis=1)[:, ranks]
            np.testing.assert_array_equal(ht._select(x, ranks), expected, err_msg=f"{name}, ranks {ranks[:2]}")
    # the adversarial rows took the fallback (their brackets hold only the sample's -100s); real rows hardly ever
    assert partitioned.get("adversarial", 0) >= 6 * 3
    assert partitioned.get("haematoxylin", 0) + partitioned.get("eosin", 0) <= 2


def test_label_propagation_counts_components_as_scipy():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    masks = rng.random((6, 31, 45)) > 0.45  # near the percolation threshold: long, winding components
    masks[0] = False  # no component at all
    masks[1] = True  # one that fills the image
    spiral = np.zeros((31, 45), bool)  # one snake through the whole image: the slowest case to propagate
    spiral[::2] = True
    spiral[1::4, -1] = spiral[3::4, 0] = True
    masks[2] = spiral
    expected = [ndimage.label(m)[1] for m in masks]
    assert ht._count_components(torch.from_numpy(masks)).tolist() == expected
    assert expected[:3] == [0, 1, 1] and max(expected) > 20


def test_white_balance_torch_is_the_numpy_one(patches):
    from st_from_he.models import white_balance

    glass = np.random.default_rng(1).uniform(200, 250, size=(len(patches), 3))
    out = white_balance_torch(torch.from_numpy(patches), glass)
    assert out.dtype == torch.uint8
    np.testing.assert_array_equal(out.numpy(), white_balance(patches, glass))


def test_bad_input_is_refused_clearly(patches):
    with pytest.raises(TypeError, match=r"torch.Tensor of uint8 patches, got ndarray.*torch.from_numpy"):
        handcrafted_features_torch(patches)
    with pytest.raises(TypeError, match=r"uint8 RGB \(0-255\), got dtype torch.float32"):
        stain_blob_features_torch(torch.from_numpy(patches).float())
    with pytest.raises(ValueError, match=r"shape \(n, 3, h, w\) or \(n, s, 3, h, w\), got \(40, 2, 4,"):
        probe_features_torch(torch.zeros((40, 2, 4, 16, 16), dtype=torch.uint8))
    with pytest.raises(ValueError, match="the blob features or both"):
        probe_features_torch(torch.from_numpy(patches), handcrafted=False, blobs=False)
    with pytest.raises(ValueError, match="7 x 16 px are too small"):
        probe_features_torch(torch.zeros((2, 3, 7, 16), dtype=torch.uint8))


def test_probe_predicts_the_same_with_either_backend(c6):
    from st_from_he.tl._baselines import RidgeProbe

    data = sth.pp.extract_patches(c6, size_um=112, size_px=48, context=(1.0, 3.0))
    x = np.stack([data[i] for i in range(80)])
    glass = data.glass_per_spot()[:80]
    y = np.random.default_rng(0).normal(size=(80, 4)) + handcrafted_features(x)[:, [0, 29]] @ np.ones((2, 4)) / 100
    groups = np.repeat(["a", "b"], 40)

    def fitted(device):
        probe = RidgeProbe("handcrafted+blobs", per_section="hybrid", rank=3, white_balance=True, lowres=2.0)
        return probe.fit(x, y, groups, glass=glass, device=device)

    reference, new = fitted(None), fitted("cpu")
    np.testing.assert_allclose(new.state["coef"], reference.state["coef"], rtol=1e-4, atol=1e-5)
    features = reference.featurize(x, glass, device=None)
    np.testing.assert_allclose(reference.featurize(x, glass), features, rtol=1e-4, atol=1e-6)
    expected = reference.predict_features(features, groups)[0]
    np.testing.assert_allclose(new.predict_features(new.featurize(x, glass), groups)[0], expected, atol=1e-4)
    assert expected.std(0).min() > 1e-3  # the spots' predictions differ
    with pytest.raises(TypeError, match="got dtype torch.float32"):
        reference.featurize(x.astype(np.float32), glass)


def test_probe_keeps_the_blob_filters_it_was_fitted_with(c6):
    """New probes filter on the pyramid; a state saved before the choice existed loads with the full filters."""
    from st_from_he.tl._baselines import RidgeProbe

    data = sth.pp.extract_patches(c6, size_um=112, size_px=48, context=(1.0, 3.0))
    x = np.stack([data[i] for i in range(40)])
    y = np.random.default_rng(0).normal(size=(40, 3))
    probe = RidgeProbe("handcrafted+blobs").fit(x, y)
    assert probe.blob_filters == "pyramid" and str(probe.get_state()["blob_filters"]) == "pyramid"
    restored = RidgeProbe("handcrafted+blobs", blob_filters="full").set_state(probe.get_state())
    assert restored.blob_filters == "pyramid"
    np.testing.assert_array_equal(restored.featurize(x), probe.featurize(x))
    old = {k: v for k, v in probe.get_state().items() if k != "blob_filters"}
    legacy = RidgeProbe("handcrafted+blobs").set_state(old)
    assert legacy.blob_filters == "full"
    expected = np.concatenate([handcrafted_features(x), stain_blob_features(x, "full")], axis=1)
    _assert_close(legacy.featurize(x), expected)
    with pytest.raises(ValueError, match=r"`blob_filters` must be one of \('pyramid', 'full'\), got 'fast'"):
        RidgeProbe("handcrafted+blobs", blob_filters="fast")
    with pytest.raises(ValueError, match="unknown blob filters 'fast'"):
        RidgeProbe("handcrafted+blobs").set_state(old | {"blob_filters": np.array("fast")})


def test_blob_filter_names_agree_between_tl_and_models():
    from st_from_he.models._handcrafted import BLOB_FILTERS
    from st_from_he.tl._baselines import BLOB_FILTERS as TL_BLOB_FILTERS

    assert TL_BLOB_FILTERS == BLOB_FILTERS
