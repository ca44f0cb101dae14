"""Large uint8 buffers whose memory is mapped in bulk: fresh pages are slow to touch one by one on VMs."""

from __future__ import annotations

import math
import mmap

import numpy as np


def empty_uint8(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised uint8 array; large ones are mapped with their pages faulted in by one system call.

    Touching fresh memory page by page costs a fault per 4 KiB page, which is slow on virtual machines (seconds per
    gigabyte on some); ``MAP_POPULATE`` (Linux) maps the pages in bulk. Elsewhere, or if it fails, ``np.empty``.
    """
    n = math.prod(shape)
    if n >= 64 * 2**20 and hasattr(mmap, "MAP_POPULATE"):
        try:
            buffer = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
            return np.frombuffer(buffer, dtype=np.uint8, count=n).reshape(shape)
        except (OSError, ValueError):
            pass
    return np.empty(shape, dtype=np.uint8)
