"""Real datasets, found locally or downloaded with checksums."""

from ._her2st import SECTIONS, her2st

__all__ = ["SECTIONS", "her2st"]
