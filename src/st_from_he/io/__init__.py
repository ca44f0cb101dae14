"""Readers that return :class:`~spatialdata.SpatialData` following the package's data model."""

from ._anndata import attach_histology
from ._hest import read_hest
from ._image import read_image
from ._section import concatenate
from ._st import read_st
from ._visium import read_visium

__all__ = ["attach_histology", "concatenate", "read_hest", "read_image", "read_st", "read_visium"]
