"""Readers that return :class:`~spatialdata.SpatialData` following the package's data model."""

from ._section import concatenate
from ._st import read_st

__all__ = ["concatenate", "read_st"]
