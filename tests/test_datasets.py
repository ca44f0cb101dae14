"""sth.datasets.her2st: local path, $ST_FROM_HE_DATA_DIR, cache, download (pooch mocked), resolution."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import st_from_he as sth
from st_from_he._sdata import pixel_size_um, samples
from st_from_he._settings import DATA_DIR_ENV
from st_from_he.datasets import _her2st

REPO = "https://raw.githubusercontent.com/almaan/her2st/85df7411b987a7dec3feff9718b869a7a82091ec/"


def readme_sources(her2st_dir) -> dict[str, tuple[str, str]]:
    """Local file -> (path in almaan/her2st, sha256), read from the data README's table (not from the package)."""
    rows = re.findall(
        r"^\| `([^`]+)` \| `([^`]+)` \| `([0-9a-f]{64})` \|$", (her2st_dir / "README.md").read_text(), re.M
    )
    return {local: (remote, sha) for local, remote, sha in rows}


@pytest.fixture
def no_local_data(monkeypatch, tmp_path):
    """Neither $ST_FROM_HE_DATA_DIR nor the cache holds her2st: the cache is an empty temporary folder."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(sth.settings, "cache_dir", tmp_path / "cache")
    return tmp_path / "cache"


def test_explicit_path(her2st_small):
    assert samples(her2st_small) == ["C5", "C6"]
    table = her2st_small.tables["table"]
    for s in ("C5", "C6"):
        assert pixel_size_um(her2st_small, f"{s}_image", s) == pytest.approx(0.69, abs=0.015)
    assert {"expression_cluster", "expression_cluster_label", "array_col", "array_row"} <= set(table.obs)
    assert table.obs["expression_cluster_label"].notna().mean() > 0.9
    assert np.issubdtype(table.X.dtype, np.integer)


def test_env_var(her2st_dir, no_local_data, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "her2st").symlink_to(her2st_dir)
    monkeypatch.setenv(DATA_DIR_ENV, str(data))
    assert _her2st.her2st_path(["C6"]) == data / "her2st"
    sdata = sth.datasets.her2st(["C6"], download=False)
    assert samples(sdata) == ["C6"]


def test_cache_dir(her2st_dir, no_local_data):
    no_local_data.mkdir()
    (no_local_data / "her2st").symlink_to(her2st_dir)
    assert _her2st.her2st_path(["B4", "C6"], download=False) == no_local_data / "her2st"


def test_env_var_without_data_falls_back_to_cache(her2st_dir, no_local_data, tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "empty"))
    no_local_data.mkdir()
    (no_local_data / "her2st").symlink_to(her2st_dir)
    assert _her2st.her2st_path(["C6"]) == no_local_data / "her2st"


def test_download_with_checksums(her2st_dir, no_local_data, monkeypatch):
    import pooch

    sources = readme_sources(her2st_dir)
    by_url = {REPO + remote: (local, sha) for local, (remote, sha) in sources.items()}
    calls = []

    def fake_retrieve(url, known_hash, fname, path, progressbar=False, **kwargs):
        calls.append((url, known_hash, fname, path))
        local, _ = by_url[url]
        target = path / fname
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(her2st_dir / local, target)
        return str(target)

    monkeypatch.setattr(pooch, "retrieve", fake_retrieve)
    sdata = sth.datasets.her2st(["C6"])
    assert samples(sdata) == ["C6"]
    folder = no_local_data / "her2st"
    expected = {f"C6/{n}" for n in ("C6_HE.jpg", "C6_counts.tsv.gz", "C6_spots.tsv", "C6_expression_clusters.tsv.gz")}
    expected.add("cluster_annotation_motivation.csv")
    assert {str((p / f).relative_to(folder)) for _, _, f, p in calls} == expected
    for url, known_hash, fname, path in calls:
        local, sha = by_url[url]
        assert known_hash == f"sha256:{sha}"
        assert str((path / fname).relative_to(folder)) == local
    assert "expression_cluster_label" in sdata.tables["table"].obs
    # now cached: no second download
    calls.clear()
    assert _her2st.her2st_path(["C6"]) == folder and not calls


def test_download_failure_is_clear(no_local_data, monkeypatch):
    import pooch

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(pooch, "retrieve", offline)
    with pytest.raises(RuntimeError, match=r"Could not download the her2st data \(no network\).*ST_FROM_HE_DATA_DIR"):
        sth.datasets.her2st(["C6"])
    with pytest.raises(FileNotFoundError, match="download=False"):
        sth.datasets.her2st(["C6"], download=False)


def test_bad_arguments(her2st_dir, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown her2st section\(s\) \['C9'\]"):
        sth.datasets.her2st(["C9"], path=her2st_dir)
    with pytest.raises(ValueError, match="repeat"):
        sth.datasets.her2st(["C6", "C6"], path=her2st_dir)
    with pytest.raises(FileNotFoundError, match=r"section\(s\) \['C6'\]"):
        sth.datasets.her2st(["C6"], path=tmp_path)


def test_downsampled_copy_reads_at_its_own_resolution(her2st_dir, tmp_path):
    factor = 4.6
    with Image.open(her2st_dir / "C6" / "C6_HE.jpg") as im:
        size = (round(im.width / factor), round(im.height / factor))
        im.draft("RGB", (im.width // 4, im.height // 4))  # decode at 1/4 scale (fast), then resize exactly
        im.convert("RGB").resize(size, Image.Resampling.BILINEAR).save(tmp_path / "small.jpg", quality=90)
    spots = pd.read_csv(her2st_dir / "C6" / "C6_spots.tsv", sep="\t")
    spots[["pixel_x", "pixel_y"]] /= factor
    spots.to_csv(tmp_path / "spots.tsv", sep="\t", index=False)
    sdata = sth.io.read_st(
        her2st_dir / "C6" / "C6_counts.tsv.gz", tmp_path / "spots.tsv", tmp_path / "small.jpg", sample_id="C6_small"
    )
    assert pixel_size_um(sdata, "C6_small_image", "C6_small") == pytest.approx(0.69 * factor, rel=0.03)
    assert sdata["C6_small_image"]["scale0"]["image"].shape == (3, size[1], size[0])
