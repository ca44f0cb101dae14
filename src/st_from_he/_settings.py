"""Package-wide settings: compute device, data loader workers, data directory, progress bars."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DATA_DIR_ENV = "ST_FROM_HE_DATA_DIR"
"""Environment variable naming a folder that holds the package's datasets (e.g. ``her2st/``)."""


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "st_from_he"


@dataclass
class _Settings:
    """Settings of :mod:`st_from_he`, reachable as ``sth.settings``.

    Attributes
    ----------
    device
        ``"auto"`` (CUDA, then MPS, then CPU) or a torch device string such as ``"cpu"`` or ``"cuda:1"``.
    num_workers
        Data loader worker processes. ``0`` loads in the main process, which is fastest for small data.
    num_threads
        CPU threads torch may use; ``None`` leaves torch's choice.
    cache_dir
        Where downloaded datasets are kept.
    image_cache_gb
        Memory for decoded images kept between calls (least recently used dropped first), so that training,
        validation and prediction on a section decode its image once. Large tiled pyramids (TIFF, zarr) are read
        window by window and not kept; a tiled level is only decoded whole when it fits this budget (and 512 MB).
    tile_cache_gb
        Memory for the decoded tiles (chunks) of tiled levels read window by window (TIFF pyramids, zarr), least
        recently used dropped first: neighbouring spots share the tiles under them, so each tile of a whole slide is
        decoded about once. The default, 0.25 GB, holds the tiles under two rows of spots across a 100,000 px slide; ``0``
        turns the cache off (each batch of windows decodes its tiles again).
    progress_bar
        Show progress bars on long work.
    max_image_pixels
        Largest plain (JPEG, PNG, BMP) image, in pixels, that a reader decodes whole; larger files are refused with
        an error that says how to convert them to a tiled pyramidal TIFF, which is read tile by tile. ``None``
        lifts the cap. PIL's own decompression-bomb check stays on for everything else.
    """

    device: str = "auto"
    num_workers: int = 0
    num_threads: int | None = None
    cache_dir: Path = field(default_factory=_default_cache_dir)
    image_cache_gb: float = 4.0
    tile_cache_gb: float = 0.25
    progress_bar: bool = True
    max_image_pixels: int | None = 1_000_000_000


settings = _Settings()
