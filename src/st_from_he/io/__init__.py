"""Readers that return :class:`~spatialdata.SpatialData` following the package's data model."""

from ._anndata import attach_histology
from ._hest import read_hest
from ._image import read_image
from ._section import concatenate
from ._st import read_st
from ._visium import read_visium
from ._visium_hd import read_visium_hd
from ._xenium import read_xenium

__all__ = [
    "attach_histology",
    "concatenate",
    "read_hest",
    "read_image",
    "read_st",
    "read_visium",
    "read_visium_hd",
    "read_xenium",
]
