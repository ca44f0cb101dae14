"""Large uint8 buffers: mapped in bulk, and checked against the memory the machine has before they are taken."""

from __future__ import annotations

import math
import mmap

import numpy as np


def available_bytes() -> int | None:
    """Memory the system can give without swapping (Linux ``MemAvailable``), or ``None`` where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(n_bytes: int, what: str, *, hint: str = "") -> None:
    """Raise a :class:`MemoryError` that says how much ``what`` needs if it cannot fit in available memory.

    Better than a bare ``MemoryError`` deep in a decoder, or, with memory mapped in bulk, the system's out-of-memory
    killer ending the process without a word.
    """
    free = available_bytes()
    if free is not None and n_bytes > free:
        message = f"{what} needs about {n_bytes / 1e9:.1f} GB of memory, but only {free / 1e9:.1f} GB is available."
        raise MemoryError(f"{message} {hint}".strip())


def empty_uint8(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised uint8 array; large ones are mapped with their pages faulted in by one system call.

    Touching fresh memory page by page costs a fault per 4 KiB page, which is slow on virtual machines (seconds per
    gigabyte on some); ``MAP_POPULATE`` (Linux) maps the pages in bulk. Elsewhere, or if it fails, ``np.empty``.
    Faulting in more than the machine has would bring the out-of-memory killer, so a request beyond available memory
    raises a :class:`MemoryError` that gives the size instead.
    """
    n = math.prod(shape)
    if n >= 64 * 2**20 and hasattr(mmap, "MAP_POPULATE"):
        check_fits(n, f"An array of shape {tuple(shape)} (uint8)")
        try:
            buffer = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
            return np.frombuffer(buffer, dtype=np.uint8, count=n).reshape(shape)
        except (OSError, ValueError):
            pass
    try:
        return np.empty(shape, dtype=np.uint8)
    except MemoryError as err:
        raise MemoryError(f"Cannot allocate {n / 1e9:.1f} GB for an array of shape {tuple(shape)} (uint8).") from err
