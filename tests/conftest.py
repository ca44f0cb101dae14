"""Shared fixtures: the real data of ``../shared/data`` (or ``$ST_FROM_HE_DATA_DIR``), read once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_DEFAULT_DATA = Path(__file__).parents[1].parent / "shared/data"


def _data_folder(name: str) -> Path:
    """``$ST_FROM_HE_DATA_DIR/name`` if that variable is set and holds it, else ``../shared/data/name``."""
    env = os.environ.get("ST_FROM_HE_DATA_DIR")
    if env and (Path(env) / name).is_dir():
        return (Path(env) / name).resolve()  # absolute: tests link to it from temporary folders
    return (_DEFAULT_DATA / name).resolve()


HER2ST = _data_folder("her2st")
VISIUM_CROP = _data_folder("visium_mouse_brain_crop")


def _require(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.skip(f"test data {str(folder)!r} not found (set ST_FROM_HE_DATA_DIR)")
    return folder


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    """The her2st folder (one sub-folder per section)."""
    return _require(HER2ST)


@pytest.fixture(scope="session")
def her2st_small(her2st_dir):
    """Sections C5 and C6 of her2st as one SpatialData (images stay lazy: nothing is decoded here)."""
    import st_from_he as sth

    return sth.datasets.her2st(["C5", "C6"], path=her2st_dir)


@pytest.fixture(scope="session")
def visium_crop_dir() -> Path:
    """The 49-spot Visium mouse brain crop in the scanpy layout (``adata.h5ad``, ``image.jpg``)."""
    return _require(VISIUM_CROP)
