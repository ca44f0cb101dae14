"""Preprocessing: gene selection, normalisation, section splits, tissue detection, spot grids and image patches."""

from st_from_he.io import attach_histology

from ._genes import select_genes
from ._grid import spot_grid
from ._normalize import normalize
from ._patches import PatchDataset, extract_patches
from ._pool import pool_to_spots
from ._split import split_sections
from ._tissue import detect_tissue

__all__ = [
    "PatchDataset",
    "attach_histology",
    "detect_tissue",
    "extract_patches",
    "normalize",
    "pool_to_spots",
    "select_genes",
    "spot_grid",
    "split_sections",
]
