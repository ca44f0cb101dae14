"""Predict spatially resolved gene expression from H&E histology.

Subpackages are imported on first use, so ``import st_from_he as sth`` stays fast and does not import torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from ._settings import settings

try:
    __version__ = version("st-from-he")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

_SUBPACKAGES = ("datasets", "io", "models", "pl", "pp", "tl")

__all__ = [*_SUBPACKAGES, "settings", "__version__"]

if TYPE_CHECKING:
    from . import datasets, io, models, pl, pp, tl


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
